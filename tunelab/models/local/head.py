"""A classification-head fine-tune served by the local backend: `tunelab finetune --head classify`.

The fine-tune's adapter folder holds, beside the PEFT LoRA adapter, a linear head over the final
hidden state of the prompt's last token (`label_head.safetensors`: `weight` labels x hidden, `bias`)
and what it needs to be read (`label_head.json`: the labels in the head's row order, the longest
prompt it was trained on). `HeadModel` is the base model with the adapter merged, answering a label
request by one forward pass of its prompt (the chat template with the assistant turn opened: the
same tokens it was trained on) and the head: the answer is the best label, `label_logprobs` the
log-softmax of the head's scores over the request's labels, as a generative model's label scores
are. The hybrid, the gateway's `logprobs`, sampling at temperature > 0 and the evaluator read them
the same way.

A head answers labels only: a free answer asked beside the labels (`free_text`, for the format
validity) is its label; a request without labels is refused with a one-line error.

    model = HeadModel(name="ft:intents", path=base_dir, adapter=folder / "adapter")
    model.complete([Request(messages=[...], labels=["balance", "transfer"])])
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Request
from tunelab.models.local.model import LocalModel, _file_digest

HEAD_WEIGHTS = "label_head.safetensors"
HEAD_META = "label_head.json"
KEEP_TAIL = 8  # a prompt longer than the head was trained on loses its middle, as in training
BATCH_TOKENS = 8192  # padded tokens per forward pass


def has_head(adapter: str | Path | None) -> bool:
    """Whether the adapter folder carries a classification head (a `--head classify` fine-tune)."""
    return adapter is not None and (Path(adapter) / HEAD_META).is_file()


def read_head(folder: str | Path) -> dict[str, Any]:
    """The head's description: {labels, max_length, hidden_size}; a UserError naming the file when
    it is not one."""
    path = Path(folder) / HEAD_META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        labels = meta["labels"]
        if (not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels)
                or len(set(labels)) != len(labels)):
            raise ValueError("'labels' must be a list of at least 2 distinct strings")
        int(meta.get("max_length") or 0)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"not a classification head description ({type(exc).__name__}: {exc})", path=path) from None
    return meta


def write_head(folder: str | Path, weight, bias, labels: list[str], max_length: int | None) -> None:
    """Store a head (tensors `weight` labels x hidden and `bias`) and its labels in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    save_file({"weight": weight.detach().float().contiguous().cpu(), "bias": bias.detach().float().contiguous().cpu()},
              str(folder / HEAD_WEIGHTS))
    (folder / HEAD_META).write_text(json.dumps({"labels": list(labels), "max_length": max_length,
                                                "hidden_size": int(weight.shape[1]),
                                                "pooling": "last prompt token"}, indent=2), encoding="utf-8")


def fit_prompt(ids: list[int], max_length: int | None, keep_tail: int = KEEP_TAIL) -> list[int]:
    """`ids` cut to `max_length` tokens by dropping the middle (the head keeps the instruction, the
    tail the assistant header), as training cut its prompts."""
    if not max_length or len(ids) <= max_length:
        return ids
    return ids[:max(1, max_length - keep_tail)] + ids[-keep_tail:]


class HeadModel(LocalModel):
    """The local backend for a classification-head fine-tune (see the module doc). `head_tensors`
    (weight, bias) and `head_meta` may be handed in (validation during training); otherwise they
    load from the adapter folder."""

    labels_only = True  # a prompt candidate refuses it for JSON and text outputs

    def __init__(self, *args: Any, head_tensors: tuple | None = None, head_meta: dict[str, Any] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        if head_meta is None and not has_head(self.adapter):
            raise UserError("no classification head in this adapter folder", path=self.adapter)
        self.head_meta = head_meta if head_meta is not None else read_head(self.adapter)
        self.labels: list[str] = list(self.head_meta["labels"])
        self._head = head_tensors

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            base = super().fingerprint
            if self.adapter is not None:
                self._fingerprint = f"{base}:head={_file_digest([self.adapter / HEAD_WEIGHTS, self.adapter / HEAD_META])}"
        return self._fingerprint

    def head(self):
        """(weight, bias) in fp32 on the model's device."""
        if self._head is None:
            with self.lock:
                if self._head is None:
                    from safetensors.torch import load_file

                    path = self.adapter / HEAD_WEIGHTS
                    try:
                        tensors = load_file(str(path))
                        weight, bias = tensors["weight"], tensors["bias"]
                    except (OSError, KeyError, ValueError, RuntimeError) as exc:
                        raise UserError(f"cannot read the classification head ({exc})", path=path) from None
                    if tuple(weight.shape[:1]) != (len(self.labels),) or tuple(bias.shape) != (len(self.labels),):
                        raise UserError(f"the head has {weight.shape[0]} rows for {len(self.labels)} labels", path=path)
                    self._head = (weight, bias)
        weight, bias = self._head
        return weight.float().to(self.device), bias.float().to(self.device)

    def stream(self, request: Request, emit) -> Completion:
        comp = self.complete([request])[0]
        if comp.text:
            emit(comp.text)
        return comp

    def complete(self, requests: list[Request]) -> list[Completion]:
        for req in requests:
            if not req.labels:
                raise UserError(f"model '{self.name}' is a classification head: it answers label outputs only "
                                f"(one of its {len(self.labels)} labels), not free text or JSON")
        known = set(self.labels)
        for req in requests:
            if not known.intersection(req.labels):
                raise UserError(f"model '{self.name}' knows none of the labels asked for (e.g. '{req.labels[0]}'); "
                                f"its labels: {', '.join(self.labels[:8])}" + (", ..." if len(self.labels) > 8 else ""))
        prompts = [fit_prompt(self.tokenizer(self.render(req.messages), add_special_tokens=False).input_ids,
                              self.head_meta.get("max_length")) for req in requests]
        scores, seconds = self.scores(prompts)
        index = {label: k for k, label in enumerate(self.labels)}
        out = []
        for req, ids, row, share in zip(requests, prompts, scores, seconds):
            asked = [label for label in req.labels if label in index]
            logits = [row[index[label]] for label in asked]
            top = max(logits)
            norm = top + math.log(sum(math.exp(v - top) for v in logits))
            logprobs = {label: v - norm for label, v in zip(asked, logits)}
            best = max(asked, key=lambda label: logprobs[label])
            comp = Completion(text=best, prompt_tokens=len(ids), completion_tokens=1, latency_s=share,
                              label_logprobs=logprobs, meta={"precision": self.precision, "head": True})
            if req.free_text:
                comp.free_text = best  # a head's only answer is a label
            out.append(comp)
        return out

    def scores(self, prompts: list[list[int]]) -> tuple[list[list[float]], list[float]]:
        """The head's scores (logits over its labels) for each tokenized prompt, and each prompt's
        share of the wall time of its batch. Prompts are right-padded in batches of similar length:
        each one's last token sees only itself and what precedes it, at the positions it was trained at."""
        import torch

        weight, bias = self.head()
        lm = self.hf_model
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        scores: list[list[float]] = [[] for _ in prompts]
        seconds = [0.0] * len(prompts)
        pad = self.tokenizer.pad_token_id or 0
        start = 0
        with self.lock, torch.inference_mode():
            while start < len(order):
                width = len(prompts[order[start]])
                size = max(1, min(self.max_batch, BATCH_TOKENS // max(1, width)))
                batch = order[start:start + size]
                start += size
                t0 = time.perf_counter()
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
                    mask[row, :len(prompts[i])] = 1
                hidden = lm.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  use_cache=False).last_hidden_state
                last = hidden[torch.arange(len(batch)), mask.sum(dim=1).to(self.device) - 1].float()
                logits = (last @ weight.T + bias).cpu().tolist()
                share = (time.perf_counter() - t0) / len(batch)
                for row, i in enumerate(batch):
                    scores[i], seconds[i] = logits[row], share
        return scores, seconds
