"""Export a fine-tuned model: the adapter, merged weights, or GGUF files for llama.cpp.

    export(ws, "spam", "adapter", "out/spam-adapter")   # PEFT adapter + metadata.json
    export(ws, "spam", "merged", "out/spam")            # a standalone Hugging Face model folder
    export(ws, "spam", "gguf", "out/spam.gguf")         # the merged model as one GGUF file (f16)
    export(ws, "spam", "gguf-lora", "out/spam-lora.gguf")  # the LoRA adapter as a llama.cpp adapter GGUF

A classification-head fine-tune (`--head classify`) exports as its adapter only (the LoRA adapter
with `label_head.safetensors` and `label_head.json`): merged weights or GGUF would lose the head.

GGUF files of Llama-architecture models (SmolLM2 and the other Llama-family models) are written by
tunelab's own converter (`tunelab.models.gguf`, with the `gguf` package): nothing else needed.
Other architectures go through llama.cpp's converters (see `tunelab.models.gguf`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import UserError
from tunelab.models.finetuned import read_finetuned
from tunelab.models.gguf import lora_to_gguf, merge_adapter, to_gguf
from tunelab.models.local.head import has_head
from tunelab.models.weights import resolve_model_dir

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

FORMATS = ("adapter", "merged", "gguf", "gguf-lora")


def _fresh_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError("already exists and is not an empty folder; choose another --out", path=out)


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), str(out))


def export(ws: "Workspace", name: str, format: str, out: str | Path, *, outtype: str | None = None) -> Path:
    """Write `ft:NAME` as `format` to `out`; returns the path written. `outtype` (f16 or f32) is the
    GGUF tensor type: default f16 for gguf, f32 for gguf-lora."""
    if name.startswith("ft:"):
        name = name[3:]
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}' (expected one of: {', '.join(FORMATS)})", field="format")
    ft = read_finetuned(ws, name)  # the checks: known, finished, artifacts present
    if format != "adapter" and has_head(ft.adapter):
        raise UserError(f"ft:{name} is a classification-head fine-tune: its head answers, which merged weights and "
                        "GGUF files leave out; use --format adapter (the LoRA adapter with label_head.*)")
    out = Path(out).expanduser().resolve()
    if format in ("gguf", "gguf-lora"):
        target = out / f"{name}{'-lora' if format == 'gguf-lora' else ''}.gguf" if out.suffix != ".gguf" else out
        if target.exists():
            raise UserError("already exists; choose another --out", path=target)
        if format == "gguf":
            base = resolve_model_dir(ft.base) if ft.adapter is not None else ft.weights
            return to_gguf(base, target, outtype or "f16", name=ft.spec, adapter_dir=ft.adapter)
        if ft.adapter is None:
            raise UserError(f"ft:{name} is a full fine-tune: it has no adapter; use --format gguf")
        return lora_to_gguf(ft.adapter, resolve_model_dir(ft.base), target, outtype or "f32")
    _fresh_target(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        if format == "adapter":
            if ft.adapter is None:
                raise UserError(f"ft:{name} is a full fine-tune: it has no adapter; use --format merged")
            shutil.copytree(ft.adapter, tmp, dirs_exist_ok=True)
        elif ft.adapter is None:
            shutil.copytree(ft.weights, tmp, dirs_exist_ok=True)
        else:
            merge_adapter(resolve_model_dir(ft.base), ft.adapter, tmp)
        shutil.copy2(ft.folder / "metadata.json", tmp / "tunelab_metadata.json")
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
