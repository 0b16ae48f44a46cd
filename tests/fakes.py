"""Test helpers: a finished fine-tune on the fake model, without training one.

    model = fake_finetune(ws, "tk", prompt="prim@3f2a", dataset="tickets@1a2b", rules={"card": "billing"})

It writes what a real fine-tune leaves (its `finetunes` row and its model folder with the manifest
that makes it `ft:NAME`), with a fake base model (`fake:ft-NAME`) whose answers `rules` decide;
`load_model("ft:NAME", ws)` returns that same fake model, so a test can change its rules later.
"""

from __future__ import annotations

import json
from typing import Any

from tunelab.models import load_model
from tunelab.models.finetuned import finetune_dir, write_manifest
from tunelab.store.models import FineTuneRow


def fake_finetune(ws, name: str, *, prompt: str, dataset: str, rules: dict[str, str] | None = None,
                  n_train: int = 40, wall_s: float = 100.0, cost: float = 0.01, tokens: int = 4000,
                  config: dict[str, Any] | None = None):
    """`ft:NAME` on a fake base; returns the model `load_model("ft:NAME", ws)` gives."""
    folder = finetune_dir(ws, name)
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    prompt_name, prompt_version = prompt.split("@")
    ds_name, ds_version = dataset.split("@")
    with ws.store.session() as s:
        s.add(FineTuneRow(name=name, status="done", base=f"fake:ft-{name}", method="lora", dataset=ds_name,
                          dataset_version=ds_version, prompt=prompt_name, prompt_version=prompt_version,
                          config=config or {"name": name, "data": ds_name}, result={"n_train": n_train},
                          wall_s=wall_s, cost=cost, tokens_trained=tokens, path=f"finetunes/{name}"))
    write_manifest(folder, {"name": name, "base": f"fake:ft-{name}", "method": "lora", "prompt": prompt,
                            "dataset": dataset, "n_train": n_train})
    model = load_model(f"ft:{name}", ws)
    model.rules = dict(rules or {})
    return model
