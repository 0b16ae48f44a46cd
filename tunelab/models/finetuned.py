"""Fine-tuned models of a workspace: `ft:NAME` is the model folder a fine-tune leaves behind.

`.tunelab/artifacts/finetunes/NAME/` holds `adapter/` (LoRA, PEFT format) or `model/` (full
weights) and `metadata.json`, the manifest that makes the folder a model: its base model, method,
the prompt version it was trained with and its data. The manifest is written last, when training
has finished; a folder without one is a fine-tune still running or interrupted.

`tunelab.finetune` writes these folders (and owns the `finetunes` table of training jobs); this
module reads them, so every command that takes a model spec takes `ft:NAME` and a backend only
ever gets paths: `load_model("ft:NAME", ws)` is the base model's backend with the adapter (or the
trained weights' folder).

    ft = read_finetuned(ws, "spam")      # FinetunedModel: base, method, weights, prompt, dataset
    ft.adapter                           # the PEFT adapter folder (None for a full fine-tune)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import NotFound, UserError
from tunelab.files import write_json

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

MANIFEST = "metadata.json"


@dataclass
class FinetunedModel:
    """What `ft:NAME` is: read from its manifest."""

    name: str
    folder: Path  # artifacts/finetunes/NAME
    base: str  # the base model's spec (smollm2-135m) or folder
    method: str  # lora | full
    prompt: str  # NAME@VERSION: the prompt it was trained (and is evaluated and served) with
    dataset: str  # NAME@VERSION: its training data
    manifest: dict[str, Any]

    @property
    def weights(self) -> Path:
        """The adapter folder (LoRA) or the model folder (full)."""
        return self.folder / ("adapter" if self.method == "lora" else "model")

    @property
    def adapter(self) -> Path | None:
        return self.weights if self.method == "lora" else None

    @property
    def spec(self) -> str:
        return f"ft:{self.name}"


def finetune_dir(ws: "Workspace", name: str) -> Path:
    return ws.artifacts_dir / "finetunes" / name


def finetuned_names(ws: "Workspace") -> list[str]:
    """The finished fine-tunes of the workspace (folders with a manifest), by name."""
    root = ws.artifacts_dir / "finetunes"
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def read_finetuned(ws: "Workspace", name: str) -> FinetunedModel:
    """The model `ft:NAME`: NotFound for an unknown name, a UserError for one not finished or
    whose weights are missing."""
    folder = finetune_dir(ws, name)
    path = folder / MANIFEST
    if not path.is_file():
        if folder.is_dir():
            raise UserError(f"fine-tune 'ft:{name}' is not finished; continue it with: "
                            f"tunelab finetune --name {name} --resume")
        known = finetuned_names(ws)
        raise NotFound(f"unknown fine-tune '{name}' (fine-tunes: {', '.join(known) or 'none; use tunelab finetune'})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ft = FinetunedModel(name=name, folder=folder, base=str(data["base"]), method=str(data["method"]),
                            prompt=str(data["prompt"]), dataset=str(data["dataset"]), manifest=data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"not a fine-tune manifest ({type(exc).__name__}: {exc})", path=path) from None
    marker = "adapter_config.json" if ft.method == "lora" else "config.json"
    if not (ft.weights / marker).is_file():
        raise UserError(f"the fine-tune's {'adapter' if ft.method == 'lora' else 'weights'} are missing",
                        path=ft.weights)
    return ft


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write the manifest that makes `folder` the model `ft:NAME` (the last step of a fine-tune).
    `data` needs base, method, prompt and dataset."""
    missing = [k for k in ("base", "method", "prompt", "dataset") if k not in data]
    if missing:
        raise ValueError(f"a fine-tune manifest needs {', '.join(missing)}")
    write_json(folder / MANIFEST, data)
