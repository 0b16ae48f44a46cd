"""The classification-head fine-tune (`--head classify`): LoRA plus a linear head on the final
hidden state of the prompt's last token, trained with cross-entropy over the labels of the train
split.

The same job as the generative fine-tune (`job`: checks, rows, checkpoints, early stopping on the
evaluator's metric, resume), with three differences: an item is the rendered prompt alone with its
label's index (`head_items`), the loss is the head's (`head_loss`), and the head is a module of the
trained model (`attach_head`), so the optimizer, the best-weights copy and the crash-safe checkpoint
hold it with the LoRA matrices. The finished adapter folder carries the head and its labels
(`tunelab.models.local.head`), and `ft:NAME` answers with a label and the head's log-softmax as its
label log-probabilities.

A generative fine-tune spends its capacity on spelling labels token by token; with many labels and
few examples each (clinc150: 151 intents, ~13 examples each) a head learns one row per label from
the prompt's representation instead (docs/results.md has both, measured).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from tunelab.errors import UserError
from tunelab.finetune.data import Tokenized, collate, micro_batches, prompt_ids
from tunelab.finetune.distributed import device
from tunelab.finetune.fused import HEAD_MODULE
from tunelab.finetune.train import attention_kernel, autocast, causal_lm, cross_entropy_sum, fused_pass
from tunelab.models.local.head import write_head

if TYPE_CHECKING:
    from tunelab.datasets import Example

HEADS = ("none", "classify")
EVAL_TOKEN_BUDGET = 4096


def head_labels(prompt, train: list["Example"], notes: list[str]) -> list[str]:
    """The head's labels: the distinct outputs of the train split, in the prompt's label order (its
    rows are these). Refused for a prompt whose output is not a label; `notes` gets what a user
    should know (prompt labels the head cannot answer, train outputs no request will ask for)."""
    if prompt.output.type != "label":
        raise UserError(f"--head classify fine-tunes label outputs; prompt '{prompt.name}' has a {prompt.output.type} "
                        "output (use the generative fine-tune: drop --head)", field="head")
    seen = {ex.output for ex in train}
    if len(seen) < 2:
        raise UserError(f"--head classify needs at least 2 distinct labels in the train split (it has {len(seen)})",
                        field="head")
    asked = list(prompt.output.labels or [])
    labels = [x for x in asked if x in seen] + sorted(seen - set(asked))
    missing = [x for x in asked if x not in seen]
    if missing:
        notes.append(f"head: {len(missing)} of the prompt's labels never occur in train (e.g. '{missing[0]}'); "
                     "the head cannot answer them")
    if asked and len(labels) > len(asked) - len(missing):
        extra = [x for x in labels if x not in asked]
        notes.append(f"head: {len(extra)} train outputs are not labels of the prompt (e.g. '{extra[0]}'); "
                     "they are trained but never asked for")
    return labels


def head_items(examples: list["Example"], render: Callable[[Any], list[dict[str, str]]], tokenizer,
               labels: list[str]) -> list[Tokenized]:
    """Each example as its rendered prompt (what the head reads, exactly as `HeadModel` renders it)
    with its label's index; examples whose output is not one of `labels` are left out."""
    index = {label: k for k, label in enumerate(labels)}
    out = []
    for ex in examples:
        if ex.output in index:
            ids = prompt_ids(tokenizer, render(ex))
            out.append(Tokenized(ids, len(ids), label=index[ex.output]))
    return out


def attach_head(model, n_labels: int, seed: int) -> None:
    """Add the linear head (hidden size -> `n_labels`) to `model` as its module `label_head`,
    initialized as transformers initializes a classifier (normal, std initializer_range; bias 0)."""
    import torch

    config = causal_lm(model).config
    text = config.get_text_config()
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(text.hidden_size, n_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * getattr(text, "initializer_range", 0.02))
        head.bias.zero_()
    model.add_module(HEAD_MODULE, head.to(device()))


def head_of(model):
    return getattr(model, HEAD_MODULE)


def last_hidden(model, batch: dict[str, Any], bf16: bool):
    """The final hidden state (fp32) of each row's last real token (rows right-padded)."""
    import torch

    lm = causal_lm(model)
    dev = device()
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    last = mask.sum(dim=1) - 1
    rows = torch.arange(ids.shape[0], device=dev)
    fused = fused_pass(model, bf16)
    if fused is not None:
        keep = torch.zeros_like(mask, dtype=torch.bool)
        keep[rows, last] = True
        return fused(ids, mask, keep).float()
    checkpointing = (lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing")
                     else lm.is_gradient_checkpointing)
    with autocast(bf16), attention_kernel(0 if checkpointing else ids.shape[1]):
        hidden = lm.base_model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
                               use_cache=False).last_hidden_state
    return hidden[rows, last].float()


def head_loss(model, batch: dict[str, Any], bf16: bool):
    """Summed cross-entropy of the head's scores over the labels against the batch's targets, and
    the number of examples (the training loop's `loss_fn`)."""
    logits = head_of(model)(last_hidden(model, batch, bf16))
    targets = batch["targets"].to(logits.device)
    return cross_entropy_sum(logits, targets, batch.get("weights")), int(targets.numel())


def make_head_validator(items: list[Tokenized], tokenizer, bf16: bool,
                        task_metric: Callable[[Any], dict[str, Any]] | None = None):
    """`validate(model) -> {loss, metric, metric_name, metrics}`: the head's mean cross-entropy on
    the validation items, and the evaluator's task metric."""
    lengths = [len(it) for it in items]

    def validate(model) -> dict[str, Any]:
        total, n = 0.0, 0
        for piece in micro_batches(list(range(len(items))), lengths, EVAL_TOKEN_BUDGET):
            loss, k = head_loss(model, collate([items[i] for i in piece], tokenizer.pad_token_id), bf16)
            total, n = total + float(loss), n + k
        result: dict[str, Any] = {"loss": round(total / max(1, n), 5)}
        if task_metric is not None:
            result.update(task_metric(model))
        return result

    return validate


def save_head(model, folder, labels: list[str], max_length: int | None) -> None:
    """Write the trained head and its labels into the adapter folder."""
    head = head_of(model)
    write_head(folder, head.weight, head.bias, labels, max_length)
