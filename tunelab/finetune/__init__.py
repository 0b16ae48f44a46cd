"""Fine-tuning: LoRA or full, on CPU or GPUs, into a model `ft:NAME` that every command accepts.

    from tunelab.finetune import FineTuneConfig, finetune, export

    config = FineTuneConfig(data="spam", prompt="spam-short", name="spam")   # defaults from the data
    result = finetune(ws, config)              # checks, registers ft:spam, trains, keeps the best
    result.candidate, result.setup             # "ft:spam"; what training took
    result.best, result.validation, result.tokens_per_s, result.cost
    export(ws, "spam", "merged", "out/spam")   # adapter | merged | gguf | gguf-lora
    finetune(ws, FineTuneConfig(data="spam", prompt="spam-short", name="spam-head", head="classify"))

Modules: `config` (the one typed schema for the YAML file and the CLI flags), `data` (rendering by
the prompt, tokenization, length-grouped batches), `train` (the hand-written loop), `validate`
(validation loss and the evaluator's task metric), `head` (`--head classify`: LoRA plus a linear
head on the prompt's last token, cross-entropy over the labels; its loss, items and validation), `checkpoint` (crash-safe state), `job` (the
job: checks, the `finetunes` rows it owns, artifacts), `launch` (in this process or through
`accelerate launch`), `distributed` (collectives inside the workers), `worker` (one such process),
`exporter` (adapter, merged weights, GGUF). A finished fine-tune's folder is the model `ft:NAME`
(`tunelab.models.finetuned` reads it).
"""

from importlib import import_module
from typing import Any

# The names below load on first use (PEP 562): the CLI builds `tunelab finetune`'s flags from the
# config schema at start-up, and `tunelab --help` must not pay for the training code and the store.
_WHERE = {
    "FineTuneConfig": "config", "load_config": "config", "field_help": "config", "export": "exporter",
    "FineTuneResult": "job", "examples_trained": "job", "finetune": "job", "finetune_info": "job",
    "get_row": "job", "list_finetunes": "job", "plan": "job", "setup_of": "job", "training_curves": "job",
    "run": "launch", "search": "search", "search_of": "search", "draw_trials": "search",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f"tunelab.finetune.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tunelab.finetune' has no attribute '{name}'")
