"""A fake model that ships in the package, for fast offline tests (like llm's MockModel).

    model = FakeModel()
    model.enqueue("spam", "ham")         # the next answers, in order
    model.rules["free money"] = "spam"   # an input containing the key gets this answer

Without a queued answer or a matching rule it answers deterministically: for a label request,
the label named in the last user message (else a hash-chosen label); for free text, a short echo.
At temperature > 0 the answer varies with the request's seed, so repeats are really independent.
Spec strings: `fake`, or `fake:NAME` (only the name differs).

`stream()` hands the answer over word by word; `stream_gate` (a threading.Event), when set on the
model, holds the rest of a stream after its first word until the event is set — so a test can see
that the first words arrive before the answer is finished. A request with `constrained=True` gets
JSON matching its `json_schema`: the queued or rule answer when it matches, else the smallest
instance of the schema (set `constrains_json = False` on the instance to play a backend that cannot).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import threading
from collections import deque
from typing import Any, Callable

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
        self.stream_gate: threading.Event | None = None

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

    def stream(self, request: Request, emit: Callable[[str], None]) -> Completion:
        comp = self.complete([request])[0]
        if request.labels:  # a label is chosen whole
            emit(comp.text)
            return comp
        words = comp.text.split(" ")
        for i, word in enumerate(words):
            emit(word if i == 0 else " " + word)
            if i == 0 and self.stream_gate is not None and len(words) > 1:
                self.stream_gate.wait(30)
        return comp

    def _answer(self, req: Request) -> str:
        text = self._raw_answer(req)
        if req.constrained and req.json_schema is not None and self.constrains_json:
            return _matching_json(text, req.json_schema)
        for stop in req.stop or []:  # cut at a stop string, as a real backend does
            if stop and stop in text:
                text = text[:text.index(stop)].rstrip()
        return text

    def _raw_answer(self, req: Request) -> str:
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


def _matching_json(text: str, schema: dict) -> str:
    """`text` when it is JSON matching `schema`, else the smallest instance of the schema."""
    import jsonschema

    try:
        value = json.loads(text)
        jsonschema.validate(value, schema)
        return text
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError):
        return json.dumps(_instance(schema))


def _instance(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return _instance(schema[key][0])
    kind = schema.get("type", "object")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: _instance(props[k]) for k in schema.get("required", list(props)) if k in props}
    if kind == "array":
        return [_instance(schema.get("items") or {}) for _ in range(schema.get("minItems", 0))]
    return {"string": "x" * schema.get("minLength", 0), "integer": schema.get("minimum", 0),
            "number": schema.get("minimum", 0), "boolean": False, "null": None}.get(kind)
