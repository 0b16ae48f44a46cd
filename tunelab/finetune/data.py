"""Training data: examples rendered by the prompt as chat turns, tokenized, grouped by length.

Each example becomes `prompt ids + completion ids`: the prompt is the chat template applied to the
prompt's messages with the assistant header (exactly what the model sees when it answers:
`tunelab.models.chat`, shared with the local backend), the completion is the example's output
followed by the end-of-turn token the backend stops and scores labels at. Only completion tokens
carry a loss (the labels of prompt and padding are -100).

Batches hold examples of similar length (sorted within seeded, shuffled mega-batches) so little
padding is computed; a batch with more padded tokens than the token budget is split into
micro-batches whose gradients are accumulated.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tunelab.models.chat import end_of_turn_ids, render_chat

IGNORE = -100
MEGA_BATCH = 50  # batches per mega-batch in which examples are sorted by length


@dataclass
class Tokenized:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens are prompt (no loss); the rest is the completion
    truncated: bool = False
    label: int | None = None  # a head fine-tune's item: the prompt alone, its label's index the target
    weight: float = 1.0  # its loss's weight (`balance_weights`: class balance of a skewed train split)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_completion(self) -> int:
        """Loss terms of the item: its completion tokens (one for a head's label)."""
        return 1 if self.label is not None else len(self.input_ids) - self.n_prompt


def prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The prompt's tokens exactly as the local backend renders them (`tunelab.models.chat`)."""
    return tokenizer(render_chat(tokenizer, messages), add_special_tokens=False).input_ids


def completion_ids(tokenizer, output: str, eot: list[int] | None = None) -> list[int]:
    """The answer's tokens followed by the end-of-turn token(s) the backend stops and scores at."""
    eot = end_of_turn_ids(tokenizer) if eot is None else eot
    return tokenizer(output, add_special_tokens=False).input_ids + list(eot)


def tokenize_pair(tokenizer, messages: list[dict[str, str]], output: str, eot: list[int] | None = None) -> Tokenized:
    prompt = prompt_ids(tokenizer, messages)
    return Tokenized(prompt + completion_ids(tokenizer, output, eot), len(prompt))


def truncate(item: Tokenized, max_length: int, keep_tail: int = 8) -> Tokenized:
    """Fit `item` into `max_length` tokens: drop the middle of the prompt (its head holds the
    instruction, its tail the assistant header), then, if still needed, the completion's end."""
    if len(item) <= max_length:
        return item
    prompt, completion = item.input_ids[:item.n_prompt], item.input_ids[item.n_prompt:]
    room = max_length - len(completion)
    if room >= keep_tail + 1:
        head = room - keep_tail
        prompt = prompt[:head] + prompt[-keep_tail:]
    else:
        prompt = prompt[:1] + prompt[-keep_tail:]
        completion = completion[:max(1, max_length - len(prompt))]
    return Tokenized(prompt + completion, len(prompt), truncated=True, label=item.label, weight=item.weight)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch: a seeded shuffle, sorted by length
    within mega-batches of MEGA_BATCH batches, then the batches shuffled. Same seed and epoch,
    same batches: a resumed run sees the same order."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = batch_size * MEGA_BATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def micro_batches(batch: list[int], lengths: Sequence[int], token_budget: int, shared: int = 0) -> list[list[int]]:
    """Split a batch so that each piece computes at most `token_budget` token rows (longest first):
    its padded tokens, or, where the training pass computes the `shared` tokens every item starts
    with once (`tunelab.finetune.fused`), those once plus each item's padded rest."""
    ordered = sorted(batch, key=lambda i: -lengths[i])
    pieces: list[list[int]] = []
    current: list[int] = []
    for i in ordered:
        longest = lengths[current[0]] if current else lengths[i]
        if current and shared + (len(current) + 1) * (longest - shared) > token_budget:
            pieces.append(current)
            current = []
        current.append(i)
    if current:
        pieces.append(current)
    return pieces


def common_prefix(items: Sequence[Tokenized]) -> int:
    """How many tokens all `items` start with before the first one whose output carries a loss
    (a prompt's last token predicts the completion's first): what the fused training pass computes
    once for a batch (`tunelab.finetune.fused.shared_prefix` finds at least as many)."""
    if len(items) < 2:
        return 0
    shared = os.path.commonprefix([it.input_ids for it in items])  # element-wise: any sequences
    return max(0, min(len(shared), min(it.n_prompt for it in items) - 1))


def collate(items: Sequence[Tokenized], pad_id: int, torch_module=None) -> dict[str, Any]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 on prompt and padding)."""
    import torch

    width = max(len(it) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it)
        ids[row, :n] = torch.tensor(it.input_ids)
        mask[row, :n] = 1
        labels[row, it.n_prompt:n] = torch.tensor(it.input_ids[it.n_prompt:], dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if any(it.weight != 1.0 for it in items):  # class balance: each row's loss weight
        batch["weights"] = torch.tensor([it.weight for it in items], dtype=torch.float32)
    if items[0].label is not None:  # a head's items: the label indices
        batch["targets"] = torch.tensor([it.label for it in items], dtype=torch.long)
    return batch


def balance_weights(outputs: Sequence[str], balance: float) -> list[float]:
    """Each example's loss weight for class balance `balance` (0..1): (n / (k * count of its
    output))^balance over the k distinct outputs, normalized to a mean of 1 (the learning rate
    keeps its scale). 0 or outputs that never repeat: all 1."""
    from collections import Counter

    counts = Counter(outputs)
    if not balance or not outputs or len(counts) == len(outputs):
        return [1.0] * len(outputs)
    raw = [(len(outputs) / (len(counts) * counts[o])) ** balance for o in outputs]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def render_examples(examples, render: Callable[[Any], list[dict[str, str]]], tokenizer) -> list[Tokenized]:
    """Tokenize every example: `render(example)` gives its chat messages, its output the completion."""
    eot = end_of_turn_ids(tokenizer)
    return [tokenize_pair(tokenizer, render(ex), ex.output, eot) for ex in examples]
