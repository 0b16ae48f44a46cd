"""Export a fine-tuned model: the adapter, merged weights, or a GGUF file for llama.cpp.

    export(ws, "spam", "adapter", "out/spam-adapter")   # PEFT adapter + metadata.json
    export(ws, "spam", "merged", "out/spam")            # a standalone Hugging Face model folder
    export(ws, "spam", "gguf", "out/spam.gguf")         # llama.cpp's converter on the merged model

GGUF needs llama.cpp's `convert_hf_to_gguf.py`: found through `TUNELAB_LLAMA_CPP` (a llama.cpp
checkout or the script itself), on PATH, or inside an installed `llama_cpp` package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import UserError

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

FORMATS = ("adapter", "merged", "gguf")
CONVERTER = "convert_hf_to_gguf.py"


def _fresh_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("already exists and is not an empty folder; choose another --out", path=out)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))


def find_converter() -> Path | None:
    """llama.cpp's HF-to-GGUF converter script, if it can be found."""
    candidates: list[Path] = []
    env = os.environ.get("TUNELAB_LLAMA_CPP")
    if env:
        p = Path(env).expanduser()
        candidates += [p] if p.is_file() else [p / CONVERTER]
    for name in (CONVERTER, "convert-hf-to-gguf.py", "convert_hf_to_gguf"):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    try:
        import importlib.util

        spec = importlib.util.find_spec("llama_cpp")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            candidates += [root / CONVERTER, root / "vendor" / "llama.cpp" / CONVERTER,
                           root.parent / "vendor" / "llama.cpp" / CONVERTER]
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c.is_file()), None)


def export(ws: "Workspace", name: str, format: str, out: str | Path, *, outtype: str = "f16") -> Path:
    """Write `ft:NAME` as `format` to `out`; returns the path written."""
    from tunelab.finetune.job import get_row, load_finetuned

    if name.startswith("ft:"):
        name = name[3:]
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}' (expected one of: {', '.join(FORMATS)})", field="format")
    load_finetuned(ws, name)  # the checks: known, finished, artifacts present
    row = get_row(ws, name)
    folder = ws.artifacts_dir / row.path
    out = Path(out).expanduser().resolve()
    if format == "gguf":
        converter = find_converter()
        if converter is None:
            raise UserError("GGUF export needs llama.cpp's converter (convert_hf_to_gguf.py): install the extra "
                            "with pip install 'tunelab[llamacpp]' and set TUNELAB_LLAMA_CPP to a llama.cpp "
                            "checkout (or put convert_hf_to_gguf.py on PATH)")
        target = out / f"{name}.gguf" if out.suffix != ".gguf" else out
        if target.exists():
            raise UserError("already exists; choose another --out", path=target)
        with tempfile.TemporaryDirectory(prefix=".tunelab-export-") as tmp:
            merged = Path(tmp) / "merged"
            _write_merged(folder, row, merged)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.tmp")
            proc = subprocess.run([sys.executable, str(converter), str(merged), "--outfile", str(partial),
                                   "--outtype", outtype], capture_output=True, text=True)
            if proc.returncode != 0:
                partial.unlink(missing_ok=True)
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                raise UserError(f"llama.cpp's converter failed: {tail[0]}", path=converter)
            os.replace(partial, target)
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
    model = PeftModel.from_pretrained(model, str(folder / "adapter")).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)
