"""The fine-tuning configuration: one typed schema for the YAML file (`--config FILE`) and the
CLI flags (flags override the file). Unknown keys are errors that name the key.

Fields left unset (None) are chosen from the dataset by `resolve()`, the way hosted fine-tuning
services do: epochs scaled to the number of examples, a learning rate by method, a maximum length
from the longest rendered example.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.errors import UserError, pydantic_message
from tunelab.files import load_yaml, read_text

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
MAX_AUTO_STEPS = 2000  # default epochs are lowered so that a run stays under this many steps
MAX_AUTO_LENGTH = 1024
LABEL_EXPOSURES = 150  # label outputs: default epochs so that each label is seen about this many times
MAX_LABEL_EPOCHS = 8


class FineTuneConfig(BaseModel):
    """What a user writes (a YAML file or flags). None means: chosen from the data."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data: str | None = Field(None, description="dataset NAME[@VERSION]; trains on its train split, validates on its validation split")
    prompt: str | None = Field(None, description="prompt NAME[@VERSION|@LABEL] that renders each example (the same prompt the fine-tuned candidate runs with)")
    name: str | None = Field(None, description="name of the fine-tuned model: it becomes ft:NAME")
    base: str = Field("smollm2-135m", description="base model: smollm2-135m (bundled) or a local Hugging Face model folder")
    method: Literal["lora", "full"] = Field("lora", description="lora (train small adapter matrices) or full (train every weight)")
    head: Literal["none", "classify"] = Field("none", description="none: the generative fine-tune (the model writes the label); classify: LoRA plus a linear head on the prompt's last token, cross-entropy over the train split's labels (label outputs only)")
    lr: float | None = Field(None, gt=0, description="peak learning rate (default: 1e-3 for lora — 2e-4 left a 135M model at the majority class after an epoch —, 2e-5 for full)")
    batch_size: int = Field(8, ge=1, description="examples per batch")
    grad_accum: int = Field(1, ge=1, description="batches per optimizer step (gradient accumulation)")
    epochs: int | None = Field(None, ge=1, description="passes over the training split (default: 3 up to 1,000 examples, 2 up to 5,000, else 1; label outputs with few examples per label (the median label's count): enough for each label to be seen ~150 times, at most 8)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (default: no limit beyond the epochs)")
    lora_r: int = Field(8, ge=1, description="LoRA rank")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                      description="module names that get LoRA adapters (comma-separated on the command line)")
    max_length: int | None = Field(None, ge=8, description="longest sequence in tokens; longer examples lose the middle of their prompt (default: the longest example, at most 1024)")
    micro_batch_tokens: int = Field(512, ge=64, description="most token rows computed in one forward pass (padded tokens; a prefix all rows share counted once where the fused pass computes it once); bigger batches are split and their gradients accumulated (bounds memory: a 135M model keeps ~1.4 MB of activations per token; 512 costs no speed against 2048 on CPU)")
    seed: int = Field(0, description="seed for data order, dropout and initialization")
    patience: int | None = Field(2, ge=1, description="stop after this many validations without improvement (none: never stop early)")
    eval_every_steps: int | None = Field(None, ge=1, description="also validate every N optimizer steps (default: once per epoch)")
    save_every_steps: int | None = Field(None, ge=1, description="write a crash-safe checkpoint every N optimizer steps (default: 25 for lora, each epoch only for full)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, about 30% slower")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast where the CPU/GPU supports it (fp32 master weights), else fp32")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="share of the steps spent warming the learning rate up linearly")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm to this (none: no clipping)")
    balance: float = Field(0.0, ge=0, le=1, description="class balance of the loss: each training example's loss weighted by (n / (outputs x its output's count))^balance, normalized to a mean of 1 — 0 plain, 1 every output counts the same (scikit-learn's class_weight='balanced'), 0.5 between; for skewed labels judged by macro-F1")
    max_examples: int | None = Field(None, ge=1, description="train on at most this many examples (a seeded sample of the train split)")
    max_val_examples: int | None = Field(None, ge=1, description="validate on at most this many examples (a seeded sample of the validation split)")
    launcher: Literal["local", "accelerate"] = Field("local", description="local (this process) or accelerate (several processes through `accelerate launch`: DDP, one replica per process; batch_size stays the global batch)")
    num_processes: int = Field(1, ge=1, description="processes (GPUs, or CPU workers with gloo) for --launcher accelerate")
    accelerate_config: str | None = Field(None, description="an accelerate config file (from `accelerate config`: multi-node, FSDP, DeepSpeed) passed through to `accelerate launch`")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_modules(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one module name, e.g. q_proj,v_proj")
        return value

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_positive(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"must be a positive learning rate such as 2e-4 (got {value})")
        return value


def field_help(name: str) -> str:
    """A field's description (and its default): the CLI flags use it as their help text."""
    info = FineTuneConfig.model_fields[name]
    text = info.description or name
    default = info.get_default(call_default_factory=True)
    if "default" not in text and default is not None:
        shown = ",".join(default) if isinstance(default, list) else default
        text += f" (default: {shown})"
    return text


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> FineTuneConfig:
    """The config from a YAML file (optional) with `overrides` (the flags that were given) on top."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = load_yaml(read_text(path, missing="config file not found"), path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError("expected a mapping of fine-tuning settings (lr: 2e-4, epochs: 2, ...)", path=path)
        data.update(loaded)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return FineTuneConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, FineTuneConfig), path=path) from None


def default_epochs(n_train: int, n_labels: int | None = None, label_counts: list[int] | None = None) -> int:
    """Epochs by dataset size, as hosted fine-tuning services choose them; for label outputs with
    few examples per label, more: each label seen about LABEL_EXPOSURES times (at most MAX_LABEL_EPOCHS
    epochs; early stopping on validation keeps the best epoch). 77 intents with ~26 examples each
    were still climbing after the size default's 2 epochs (validation accuracy 0.59, then 0.70).
    Examples per label: the median of `label_counts` (the train count of each label) when given,
    else `n_train / n_labels` — the mean would call legal_unfair_tos's labels well covered (222 a
    label) where eight of its nine have 7 to 51 examples and 'Other' 1,813."""
    epochs = 3 if n_train <= 1000 else 2 if n_train <= 5000 else 1
    if label_counts and len(label_counts) > 1:
        per_label = statistics.median(label_counts)
    elif n_labels and n_labels > 1 and n_train:
        per_label = n_train / n_labels
    else:
        return epochs
    return max(epochs, min(MAX_LABEL_EPOCHS, math.ceil(LABEL_EXPOSURES / max(1, per_label))))


def resolve(config: FineTuneConfig, n_train: int, longest: int, n_labels: int | None = None,
            label_counts: list[int] | None = None) -> FineTuneConfig:
    """A copy with every unset field chosen from the data (`n_train` examples, the longest
    rendered example `longest` tokens, `n_labels` labels for a label output, `label_counts` the
    train examples of each)."""
    changes: dict[str, Any] = {}
    if config.lr is None:
        changes["lr"] = 1e-3 if config.method == "lora" else 2e-5
    if config.max_length is None:
        changes["max_length"] = max(16, min(MAX_AUTO_LENGTH, longest))
    batches = math.ceil(n_train / config.batch_size)
    steps_per_epoch = max(1, math.ceil(batches / config.grad_accum))
    if config.epochs is None:
        epochs = default_epochs(n_train, n_labels, label_counts)
        while epochs > 1 and epochs * steps_per_epoch > MAX_AUTO_STEPS:
            epochs -= 1
        changes["epochs"] = epochs
        if config.max_steps is None and epochs * steps_per_epoch > MAX_AUTO_STEPS:
            changes["max_steps"] = MAX_AUTO_STEPS
    if config.save_every_steps is None and config.method == "lora":
        changes["save_every_steps"] = 25
    return config.model_copy(update=changes)
