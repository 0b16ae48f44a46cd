"""The Model boundary: a backend turns a batch of chat requests into completions.

A backend subclasses `Model` and implements `complete()`. Built-in backends are registered
through the `tunelab.models` entry point group, exactly as a plugin's are.

A request with `labels` asks the backend to choose one of those labels (classification): a
backend that can score continuations (the local one) scores each label and reports their
log-probabilities; one that cannot generates and matches (`match_label`). A request may also
ask for `free_text` alongside the labels, so the evaluator can report how often the model's
unconstrained answer would not have been a valid label.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class Request:
    messages: list[Message]
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None  # for sampling at temperature > 0 (the evaluator passes the repeat index)
    labels: list[str] | None = None  # choose one of these instead of generating freely
    free_text: bool = False  # with labels: also generate freely (for the format-compliance rate)
    json_schema: dict | None = None  # the expected JSON output, for backends that can constrain it
    constrained: bool = False  # force the answer to match json_schema (backends with constrains_json)
    stop: list[str] | None = None

    def cache_params(self) -> dict[str, Any]:
        """Everything that changes the answer, for the response cache key."""
        data = asdict(self)
        data.pop("messages")
        return data


@dataclass
class Completion:
    text: str  # the answer: the chosen label, or the generated text
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0  # this request's share of the wall time of its batch
    label_logprobs: dict[str, float] | None = None  # per label, when labels were scored
    free_text: str | None = None  # the unconstrained answer, when asked for
    meta: dict[str, Any] = field(default_factory=dict)
    token_logprobs: list[float] | None = None  # per generated token, when the backend reports them

    @property
    def confidence(self) -> dict[str, float] | None:
        """The model's confidence in a generated answer: the probability of its tokens as their
        geometric mean (exp of the mean log-probability) and of the least likely one (exp of the
        minimum); None without token log-probabilities (a hybrid's unsureness for JSON and text)."""
        lps = self.token_logprobs
        if not lps:
            return None
        return {"mean": math.exp(sum(lps) / len(lps)), "min": math.exp(min(lps))}

    @property
    def label_margin(self) -> float | None:
        """Probability of the best label minus the second best (the router's unsureness)."""
        if not self.label_logprobs or len(self.label_logprobs) < 2:
            return None
        probs = sorted((math.exp(v) for v in self.label_logprobs.values()), reverse=True)
        total = sum(probs) or 1.0
        return (probs[0] - probs[1]) / total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Completion":
        return cls(**data)


class Model(ABC):
    """A backend. `name` is what run rows and reports show; `backend` the registry name."""

    backend: ClassVar[str] = "base"
    name: str = "model"
    constrains_json: ClassVar[bool] = False  # can force an answer to match Request.json_schema

    @abstractmethod
    def complete(self, requests: list[Request]) -> list[Completion]:
        """Answer every request, in order. Batch as the backend sees fit."""

    # -- optional refinements a backend may override ------------------------------------------
    def stream(self, request: Request, emit: Callable[[str], None]) -> Completion:
        """Answer one request as `complete` does, handing its text to `emit` piece by piece as it
        is generated; the pieces joined are the completion's text. Default: one piece, at the end
        (a backend that generates token by token overrides this)."""
        comp = self.complete([request])[0]
        if comp.text:
            emit(comp.text)
        return comp

    def count_tokens(self, text: str) -> int:
        """Tokens in `text` by this model's tokenizer (default: a rough word-piece estimate)."""
        return max(1, math.ceil(len(text) / 4)) if text else 0

    @property
    def context_length(self) -> int | None:
        return None

    @property
    def fingerprint(self) -> str:
        """Identifies the weights and settings for the response cache."""
        return f"{self.backend}:{self.name}"

    def close(self) -> None:
        """Release resources (threads, servers, memory)."""


class WrappedModel(Model):
    """A model that answers through another one (`inner`): the response cache and the gateway's
    micro-batcher are these. Its name, backend, fingerprint, tokenizer and context are the inner
    model's, so a wrapped model is the same model to everything that keys or prices by them."""

    def __init__(self, inner: Model):
        self.inner = inner
        self.name = inner.name
        self.backend = inner.backend  # type: ignore[misc]
        self.constrains_json = inner.constrains_json  # type: ignore[misc]

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    @property
    def context_length(self) -> int | None:
        return self.inner.context_length


class StreamText:
    """Turns the growing decoded text of a generation into the pieces to stream, so that the
    pieces joined are exactly the final answer: leading whitespace is dropped (answers are
    stripped), and text that may still change is held back — trailing whitespace, an incomplete
    UTF-8 character, and the tail that could be the start of a stop string."""

    def __init__(self, stops: list[str] | None = None):
        self.stops = [s for s in (stops or []) if s]
        self.sent = ""

    def feed(self, text: str) -> str:
        text = text.lstrip()
        for stop in self.stops:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        safe = len(text.rstrip().rstrip("\ufffd"))
        for stop in self.stops:  # a tail that is a prefix of a stop string may still become one
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):safe], text[:safe]
        return piece

    def finish(self, final: str) -> str:
        """The rest of the final answer (it always starts with what was sent)."""
        rest = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final if final.startswith(self.sent) else self.sent
        return rest


_WORD = re.compile(r"[^a-z0-9]+")


def normalize(text: str) -> str:
    return _WORD.sub(" ", text.lower()).strip()


def match_label(text: str, labels: list[str]) -> str | None:
    """The label a free answer names, or None when it names none (or several equally).

    Exact match first (case and punctuation ignored), then the label that appears first in the
    text as a whole word.
    """
    norm = normalize(text)
    by_norm = {normalize(label): label for label in labels}
    if norm in by_norm:
        return by_norm[norm]
    best: tuple[int, int, str] | None = None
    padded = f" {norm} "
    for key, label in by_norm.items():
        if not key:
            continue
        pos = padded.find(f" {key} ")
        if pos >= 0:
            cand = (pos, -len(key), label)  # earliest; at a tie the longer label
            if best is None or cand < best:
                best = cand
    return best[2] if best else None
