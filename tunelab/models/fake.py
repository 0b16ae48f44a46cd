"""A fake model that ships in the package, for fast offline tests (like llm's MockModel).

    model = FakeModel()
    model.enqueue("spam", "ham")         # the next answers, in order
    model.rules["free money"] = "spam"   # an input containing the key gets this answer

Without a queued answer or a matching rule it answers deterministically: for a label request,
the label named in the last user message (else a hash-chosen label); for free text, a short echo.
At temperature > 0 the answer varies with the request's seed, so repeats are really independent.
Spec strings: `fake`, or `fake:NAME` (only the name differs).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque

from tunelab.models.base import Completion, Model, Request, match_label


class FakeModel(Model):
    backend = "fake"
    constrains_json = True  # a constrained JSON request gets "{}" where its answer would not parse

    def __init__(self, name: str = "fake", answers: list[str] | None = None,
                 rules: dict[str, str] | None = None, latency_s: float = 0.0, **_: object):
        self.name = name
        self.queue: deque[str] = deque(answers or [])
        self.rules: dict[str, str] = dict(rules or {})
        self.latency_s = latency_s
        self.calls: list[Request] = []  # every request seen, for assertions

    def enqueue(self, *answers: str) -> "FakeModel":
        self.queue.extend(answers)
        return self

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def context_length(self) -> int:
        return 2048

    def complete(self, requests: list[Request]) -> list[Completion]:
        out = []
        for req in requests:
            start = time.perf_counter()
            if self.latency_s:
                time.sleep(self.latency_s)
            self.calls.append(req)
            text = self._answer(req)
            prompt_tokens = sum(self.count_tokens(m["content"]) + 3 for m in req.messages)
            if req.constrained and not req.labels and not _parses(text):
                text = "{}"
            comp = Completion(text=text, prompt_tokens=prompt_tokens,
                              completion_tokens=max(1, self.count_tokens(text)))
            if not req.labels:  # a deterministic confidence per answer, for the hybrid's routing
                p = 0.3 + 0.69 * (_hash(text) % 100) / 100
                comp.token_logprobs = [round(math.log(p), 4)] * comp.completion_tokens
            if req.labels:
                free = text
                chosen = match_label(text, req.labels) or req.labels[_hash(text) % len(req.labels)]
                comp.text = chosen
                comp.label_logprobs = {
                    label: (math.log(0.7) if label == chosen else math.log(0.3 / max(1, len(req.labels) - 1)))
                    for label in req.labels
                }
                if req.free_text:
                    comp.free_text = free
            comp.latency_s = time.perf_counter() - start
            out.append(comp)
        return out

    def _answer(self, req: Request) -> str:
        if self.queue:
            return self.queue.popleft()
        last_user = next((m["content"] for m in reversed(req.messages) if m["role"] == "user"), "")
        lowered = last_user.lower()
        for key, answer in self.rules.items():
            if key.lower() in lowered:
                return answer
        salt = f"{req.seed}" if req.temperature > 0 else ""
        if req.labels:
            named = match_label(last_user, req.labels)
            if named and not salt:
                return named
            return req.labels[_hash(last_user + salt) % len(req.labels)]
        if req.json_schema is not None:
            return json.dumps({})
        words = last_user.split()
        return " ".join(words[: max(1, min(len(words), req.max_tokens))]) + (f" #{_hash(salt) % 7}" if salt else "")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
