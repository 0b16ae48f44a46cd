"""Validation during training: the loss on the validation split and the task metric.

The loss is the mean cross-entropy of the completion tokens, as in training. The task metric is the
evaluator's: the training prompt on the model as it is at that step (merged into an inference copy,
in the precision the fine-tuned model will be served in), answered by the local backend exactly as
`tunelab eval ft:NAME` will answer it, scored with the metrics of `tunelab.metrics`. Training thus
keeps the checkpoint that is best by the very number the comparison reports.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

from tunelab.evaluate import PromptCandidate
from tunelab.finetune.data import Tokenized, collate, micro_batches
from tunelab.finetune.fused import HEAD_MODULE
from tunelab.finetune.train import causal_lm, completion_token_logprobs
from tunelab.metrics import Answer, aggregate, default_metric_names, make_metrics, primary_metric
from tunelab.models import trim_malloc
from tunelab.models.local import LocalModel
from tunelab.models.local.head import HeadModel

EVAL_TOKEN_BUDGET = 4096
SKIP_METRICS = ("format_valid", "free_accuracy")  # need free generation; not worth it every epoch


def completion_logprobs(model, items: list[Tokenized], pad_id: int, bf16: bool) -> list[float]:
    """Per item: the summed log-likelihood of its completion tokens."""
    lengths = [len(it) for it in items]
    sums = [0.0] * len(items)
    for piece in micro_batches(list(range(len(items))), lengths, EVAL_TOKEN_BUDGET):
        batch = collate([items[i] for i in piece], pad_id)
        token_lp, select = completion_token_logprobs(model, batch, bf16)
        offset = 0
        for row, n in enumerate(select.sum(dim=1).tolist()):
            sums[piece[row]] = float(token_lp[offset:offset + n].sum())
            offset += n
    return sums


def make_validator(items: list[Tokenized], tokenizer, bf16: bool,
                   task_metric: Callable[[Any], dict[str, Any]] | None = None):
    """`validate(model) -> {loss, metric, metric_name, metrics}` over the validation items."""
    n_tokens = sum(it.n_completion for it in items)

    def validate(model) -> dict[str, Any]:
        sums = completion_logprobs(model, items, tokenizer.pad_token_id, bf16)
        result: dict[str, Any] = {"loss": round(-sum(sums) / max(1, n_tokens), 5)}
        if task_metric is not None:
            result.update(task_metric(model))
        return result

    return validate


def inference_copy(model, precision: str):
    """A copy of the training model as it would be served: LoRA merged, in `precision`. Frozen
    fp32 embeddings (and an output layer tied to them) are copied straight into `precision`, not
    copied in fp32 first (SmolLM2: 113 MB less at the validation's peak; Gemma 3: 680 MB)."""
    import copy

    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    memo: dict[int, Any] = {}
    for param in {id(p): p for p in (causal_lm(model).get_input_embeddings().weight,
                                     getattr(causal_lm(model).get_output_embeddings(), "weight", None))
                  if p is not None and not p.requires_grad}.values():
        memo[id(param)] = torch.nn.Parameter(param.detach().to(dtype, copy=True), requires_grad=False)
    clone = copy.deepcopy(model, memo)
    if hasattr(clone, "merge_and_unload"):
        clone = clone.merge_and_unload()
    clone = causal_lm(clone)
    if any(getattr(m, "gradient_checkpointing", False) is True for m in clone.modules()):
        disable = (getattr(clone, "activation_checkpointing_disable", None)
                   or getattr(clone, "gradient_checkpointing_disable"))
        disable()
    clone.config.use_cache = True
    clone.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    clone.eval()
    return clone


def evaluator_metric(prompt, demos, examples, base_dir: Path, precision: str, name: str, *,
                     labels: list[str] | None = None, max_length: int | None = None):
    """The task metric hook: `metric(model) -> {metric, metric_name, metrics}`. With `labels`, a
    head fine-tune: the model's head answers, as `ft:NAME` will (`tunelab.models.local.head`)."""
    output = prompt.output
    metrics = make_metrics([n for n in default_metric_names(output) if n not in SKIP_METRICS], output)
    primary = primary_metric(output)

    def metric(model) -> dict[str, Any]:
        if labels is None:
            served = LocalModel(name=f"ft:{name}@training", path=str(base_dir), precision=precision)
        else:
            head = getattr(model, HEAD_MODULE)
            served = HeadModel(name=f"ft:{name}@training", path=str(base_dir), precision=precision,
                               head_tensors=(head.weight.detach().clone(), head.bias.detach().clone()),
                               head_meta={"labels": list(labels), "max_length": max_length})
        # LocalModel loads its weights lazily into `_model`; hand it the live copy instead.
        served._model = inference_copy(model, served.precision)
        candidate = PromptCandidate(prompt, served, demos, name=f"ft:{name}", kind="ft", free_text=False)
        try:
            completions = candidate.predict(list(examples))
        finally:
            served.close()  # the inference copy goes: training continues without it
            del candidate
            gc.collect()
            trim_malloc()
        answers = [Answer(expected=ex.output, prediction=c.text, example=ex,
                          extra={"label_logprobs": c.label_logprobs}) for ex, c in zip(examples, completions)]
        values = aggregate(metrics, answers, resamples=200)
        flat = {k: (None if v.value != v.value else round(float(v.value), 5)) for k, v in values.items()}
        return {"metric": flat.get(primary), "metric_name": primary, "metrics": flat}

    return metric
