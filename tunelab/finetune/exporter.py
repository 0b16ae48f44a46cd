"""Export a fine-tuned model: the adapter, merged weights, or GGUF files for llama.cpp.

    export(ws, "spam", "adapter", "out/spam-adapter")   # PEFT adapter + metadata.json
    export(ws, "spam", "merged", "out/spam")            # a standalone Hugging Face model folder
    export(ws, "spam", "gguf", "out/spam.gguf")         # the merged model as one GGUF file (f16)
    export(ws, "spam", "gguf-lora", "out/spam-lora.gguf")  # the LoRA adapter as a llama.cpp adapter GGUF

GGUF files of Llama-architecture models (SmolLM2 and the other Llama-family models) are written by
tunelab's own converter (`tunelab.finetune.gguf`, with the `gguf` package): nothing else needed.
Other architectures go through llama.cpp's converters (`convert_hf_to_gguf.py`,
`convert_lora_to_gguf.py`), found through `TUNELAB_LLAMA_CPP` (a llama.cpp checkout or the
script itself), on PATH, or inside an installed `llama_cpp` package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

FORMATS = ("adapter", "merged", "gguf", "gguf-lora")
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"


def _fresh_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("already exists and is not an empty folder; choose another --out", path=out)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))


def find_converter(script: str = CONVERTER) -> Path | None:
    """llama.cpp's HF-to-GGUF (or, with `script`=LORA_CONVERTER, LoRA-to-GGUF) converter script,
    if it can be found."""
    candidates: list[Path] = []
    env = os.environ.get("TUNELAB_LLAMA_CPP")
    if env:
        p = Path(env).expanduser()
        candidates += [p.with_name(script) if p.is_file() else p / script]
    for name in (script, script.replace("_", "-"), script.removesuffix(".py")):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            candidates += [root / script, root / "vendor" / "llama.cpp" / script,
                           root.parent / "vendor" / "llama.cpp" / script]
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c.is_file()), None)


def export(ws: "Workspace", name: str, format: str, out: str | Path, *, outtype: str | None = None) -> Path:
    """Write `ft:NAME` as `format` to `out`; returns the path written. `outtype` (f16 or f32) is the
    GGUF tensor type: default f16 for gguf, f32 for gguf-lora."""
    from tunelab.finetune.job import get_row, load_finetuned

    if name.startswith("ft:"):
        name = name[3:]
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}' (expected one of: {', '.join(FORMATS)})", field="format")
    load_finetuned(ws, name)  # the checks: known, finished, artifacts present
    row = get_row(ws, name)
    folder = ws.artifacts_dir / row.path
    out = Path(out).expanduser().resolve()
    if format in ("gguf", "gguf-lora"):
        target = out / f"{name}{'-lora' if format == 'gguf-lora' else ''}.gguf" if out.suffix != ".gguf" else out
        if target.exists():
            raise UserError("already exists; choose another --out", path=target)
        if format == "gguf":
            write_gguf(folder, row, target, outtype=outtype or "f16")
        else:
            write_gguf_lora(folder, row, target, outtype=outtype or "f32")
        return target
    _fresh_target(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        if format == "adapter":
            if row.method != "lora":
                raise UserError(f"ft:{name} is a full fine-tune: it has no adapter; use --format merged")
            shutil.copytree(folder / "adapter", tmp, dirs_exist_ok=True)
        else:
            _write_merged(folder, row, tmp)
        if (folder / "metadata.json").is_file():
            shutil.copy2(folder / "metadata.json", tmp / "tunelab_metadata.json")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_merged(folder: Path, row, target: Path) -> None:
    """A standalone Hugging Face folder: base + adapter merged (LoRA), or the trained weights."""
    target.mkdir(parents=True, exist_ok=True)
    if row.method != "lora":
        shutil.copytree(folder / "model", target, dirs_exist_ok=True)
        return
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.weights import resolve_model_dir

    base_dir = resolve_model_dir(row.base)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)


def write_gguf(folder: Path, row, target: Path, *, outtype: str = "f16") -> Path:
    """The fine-tune (merged, for LoRA) as one GGUF file: tunelab's converter for Llama-architecture
    models, llama.cpp's converter for others."""
    from tunelab.finetune import gguf

    with tempfile.TemporaryDirectory(prefix=".tunelab-export-") as tmp:
        if row.method == "lora":
            merged = Path(tmp) / "merged"
            _write_merged(folder, row, merged)
        else:
            merged = folder / "model"
        try:
            return gguf.convert_model(merged, target, outtype, name=f"ft:{row.name}")
        except gguf.Unsupported as exc:
            return _external(CONVERTER, exc, [str(merged)], target, outtype)


def write_gguf_lora(folder: Path, row, target: Path, *, outtype: str = "f32") -> Path:
    """The fine-tune's LoRA adapter as a llama.cpp adapter GGUF (load it over the base's GGUF)."""
    from tunelab.finetune import gguf
    from tunelab.models.weights import resolve_model_dir

    if row.method != "lora":
        raise UserError(f"ft:{row.name} is a full fine-tune: it has no adapter; use --format gguf")
    base_dir = resolve_model_dir(row.base)
    try:
        return gguf.convert_lora(folder / "adapter", base_dir, target, outtype)
    except gguf.Unsupported as exc:
        return _external(LORA_CONVERTER, exc, [str(folder / "adapter"), "--base", str(base_dir)], target, outtype)


def _external(script: str, why: Exception, args: list[str], target: Path, outtype: str) -> Path:
    """Run llama.cpp's own converter `script` (for what tunelab's converter does not cover)."""
    converter = find_converter(script)
    if converter is None:
        raise UserError(f"{why}; for other models GGUF export needs llama.cpp's {script}: install the "
                        "extra with pip install 'tunelab[llamacpp]' and set TUNELAB_LLAMA_CPP to a "
                        f"llama.cpp checkout (or put {script} on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    proc = subprocess.run([sys.executable, str(converter), *args, "--outfile", str(partial), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"llama.cpp's converter failed: {tail[0]}", path=converter)
    os.replace(partial, target)
    return target
