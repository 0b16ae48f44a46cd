"""Crash-safe checkpoints: a folder written under a temporary name and renamed into place.

`checkpoints/last/` holds everything a resumed run needs to end where an uninterrupted one would:
the trainable weights (the LoRA adapter, or every weight for a full fine-tune), the optimizer and
scheduler states, the random states of python, numpy and torch, and the trainer state (epoch, step
within the epoch, tokens, curves so far, best validation). `best/` holds the trainable weights of
the best validation so far.

A folder is replaced by renaming: the new one is written as `.tmp-NAME`, the old one moved to
`.old-NAME`, the new one renamed to `NAME`, the old one removed. A crash at any point leaves either
`NAME` or `.old-NAME` complete; `find()` takes whichever exists.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"


def _replace_dir(tmp: Path, target: Path) -> None:
    old = target.parent / f".old-{target.name}"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _fresh_tmp(target: Path) -> Path:
    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def find(target: Path) -> Path | None:
    """The complete folder for `target`: itself, or its old copy if a crash hit mid-rename."""
    if (target / STATE_FILE).is_file() or (target / "weights.pt").is_file():
        return target
    old = target.parent / f".old-{target.name}"
    if (old / STATE_FILE).is_file() or (old / "weights.pt").is_file():
        return old
    return None


def trainable_state(model) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, weights: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint weights do not match the model (e.g. {missing[0]})")
    with torch.no_grad():
        for n, tensor in weights.items():
            params[n].copy_(tensor)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_weights(target: Path, model, meta: dict[str, Any] | None = None) -> None:
    """The trainable weights alone (the best checkpoint)."""
    import torch

    tmp = _fresh_tmp(target)
    torch.save(trainable_state(model), tmp / "weights.pt")
    (tmp / "meta.json").write_text(json.dumps(meta or {}, indent=2), encoding="utf-8")
    _replace_dir(tmp, target)


def load_weights(target: Path, model) -> dict[str, Any]:
    import torch

    folder = find(target)
    if folder is None:
        raise FileNotFoundError(target)
    load_trainable(model, torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    meta = folder / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}


def save(target: Path, model, optimizer, scheduler, state: dict[str, Any]) -> None:
    """Everything a resumed run needs (see the module doc), atomically."""
    import torch

    tmp = _fresh_tmp(target)
    torch.save(trainable_state(model), tmp / "weights.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "optimizer.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
    _replace_dir(tmp, target)


def load(target: Path, model, optimizer, scheduler) -> dict[str, Any] | None:
    """Restore a checkpoint written by `save`; returns the trainer state (None: no checkpoint)."""
    import torch

    folder = find(target)
    if folder is None or not (folder / STATE_FILE).is_file():
        return None
    load_trainable(model, torch.load(folder / "weights.pt", map_location="cpu", weights_only=True))
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
