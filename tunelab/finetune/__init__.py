"""Fine-tuning: LoRA or full, on CPU, into a model `ft:NAME` that every command accepts.

    from tunelab.finetune import FineTuneConfig, finetune, load_finetuned, export

    config = FineTuneConfig(data="spam", prompt="spam-short", name="spam")   # defaults from the data
    result = finetune(ws, config)              # checks, registers ft:spam, trains, keeps the best
    result.best, result.validation, result.tokens_per_s, result.cost
    model = load_finetuned(ws, "spam")         # a LocalModel: base + adapter (same as load_model("ft:spam", ws))
    export(ws, "spam", "merged", "out/spam")   # adapter | merged | gguf

Modules: `config` (the one typed schema for the YAML file and the CLI flags), `data` (rendering by
the prompt, tokenization, length-grouped batches), `train` (the hand-written loop), `validate`
(validation loss and the evaluator's task metric), `checkpoint` (crash-safe state), `job` (the
job: checks, the finetunes row, artifacts), `exporter` (adapter, merged weights, GGUF).

Importing this package imports neither torch nor the store: names load on first use (the CLI
reads the config schema's help texts at startup).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {
    "FineTuneConfig": "config", "load_config": "config", "export": "exporter",
    "FineTuneResult": "job", "finetune": "job", "finetune_info": "job", "get_row": "job",
    "list_finetunes": "job", "load_finetuned": "job", "plan": "job",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f"tunelab.finetune.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunelab.finetune' has no attribute '{name}'")
