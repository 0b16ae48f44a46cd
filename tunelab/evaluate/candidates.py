"""Candidates: the things one evaluator measures and the gateway serves.

A `Candidate` has a `name` (its spec: `PROMPT@VERSION`, `ft:NAME`, `hybrid:NAME`), a `kind`
("prompt" | "ft" | "hybrid"), a `model_name` and `backend` (for pricing), an `output` spec (an
`OutputSpec`: label/json/text, labels, schema), a `temperature` (the deployment temperature), a
`fingerprint` (everything that changes its answers) and `predict(examples, repeat_index) ->
list[Completion]`. Every kind is made by `resolve_candidate` (`tunelab.evaluate.resolve`):

- `PromptCandidate(prompt, model)`: a prompt version on a model, with its few-shot demos (a list,
  or a `DemoSelector` that picks them per input);
- a fine-tuned model is a `PromptCandidate` of kind "ft": its training prompt on `ft:NAME`;
- `HybridCandidate` (`tunelab.evaluate.routing`): the fine-tuned model first, a prompt where it is
  unsure.

For label outputs at temperature > 0 a PromptCandidate draws its answer from the labels'
distribution (softmax of the label log-probabilities / temperature, seeded by the repeat index and
the request), as sampling constrained to the labels would; at temperature 0 it is the most likely
label. The gateway answers through `predict` too, so a deployment answers exactly as it was measured.

`map_models(fn)` gives the same candidate with every model it calls wrapped by `fn`: the response
cache (`with_cache`) and the gateway's micro-batcher wrap models this way, without changing what
the candidate answers.

Each strategy records what it took to make its candidate (`Setup`: wall time, compute cost,
tokens, examples) with the candidate's own rows; the comparison reads them the same way for every
kind.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from pydantic import BaseModel, Field

from tunelab.canonical import canonical_json, sha256
from tunelab.datasets import Example
from tunelab.demos import DemoSelector
from tunelab.errors import UserError
from tunelab.evaluate.cache import CachedModel, ResponseCache
from tunelab.models.base import Completion, Model, Request
from tunelab.prompts import OutputSpec, Prompt

if TYPE_CHECKING:
    from tunelab.workspace import Pricing, Workspace

KINDS = ("prompt", "ft", "hybrid", "baseline")


class Setup(BaseModel):
    """What it took to make a candidate: the setup-cost aspect of a comparison."""

    how: str = Field("hand-written", description="hand-written | optimization | fine-tune | hybrid | baseline")
    wall_s: float = Field(0.0, description="wall time of the search, the training or the tuning")
    compute_cost: float = Field(0.0, description="$ of the compute it used (local $/hour, API tokens)")
    tokens: int = Field(0, description="tokens it processed (trained on, or sent to a model)")
    examples: int | None = Field(None, description="training examples (a fine-tune), else None")
    sources: list[str] = Field(default_factory=list, description="where the numbers come from, in words")

    def plus(self, other: "Setup", how: str | None = None) -> "Setup":
        """Both setups together (a hybrid's: its sides' plus its own tuning)."""
        return Setup(how=how or self.how, wall_s=self.wall_s + other.wall_s,
                     compute_cost=self.compute_cost + other.compute_cost, tokens=self.tokens + other.tokens,
                     examples=self.examples if self.examples is not None else other.examples,
                     sources=self.sources + other.sources)


class Candidate(ABC):
    """Something that answers examples: the unit every comparison is made of."""

    name: str
    kind: str = "prompt"  # prompt | ft | hybrid | baseline
    model_name: str = ""
    backend: str = ""
    output: OutputSpec
    temperature: float = 0.0

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 of everything that changes the answers (prompt version, model, demos, ...)."""

    @abstractmethod
    def predict(self, examples: list[Example], repeat_index: int = 0) -> list[Completion]:
        """One completion per example; `repeat_index` is also the sampling seed."""

    @abstractmethod
    def map_models(self, fn: Callable[[Model], Model]) -> "Candidate":
        """This candidate with every model it calls replaced by `fn(model)` (same answers)."""

    def stream(self, example: Example, repeat_index: int, emit: Callable[[str], None]) -> Completion:
        """Answer one example exactly as `predict` does, handing the answer's text to `emit` as it
        is generated. Default: the whole answer in one piece (a label, a hybrid's routed answer)."""
        comp = self.predict([example], repeat_index)[0]
        if comp.text:
            emit(comp.text)
        return comp

    def model_requests(self, example: Example, repeat_index: int = 0) -> list[tuple[Model, Request]]:
        """Every model request answering `example` may make, with its model (for limits checked
        before any compute: the gateway's context-length check)."""
        return []

    def with_cache(self, cache: ResponseCache) -> "Candidate":
        """This candidate answering through the response cache."""
        return self.map_models(lambda m: m if isinstance(m, CachedModel) else CachedModel(m, cache))

    def with_free_answers(self, pick: Callable[[Example], bool]) -> "Candidate":
        """This candidate asking for the free answer of label outputs only for the examples
        `pick` selects (default: the candidate does as it always does)."""
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.model_name, "backend": self.backend,
                "temperature": self.temperature, "fingerprint": self.fingerprint, "output": self.output.to_dict()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.model_name}>"


class PromptCandidate(Candidate):
    """A prompt (one version) on a model, with its few-shot demos: a list, or a `DemoSelector`
    that chooses them per input. A fine-tuned model is one of kind "ft" (its training prompt).

    `free_text` (label outputs): also ask the model for its unconstrained answer, to measure how
    often it would not have been a valid label (costs a short generation per example)."""

    def __init__(self, prompt: Prompt, model: Model, demos: "list[Example] | DemoSelector | None" = None, *,
                 name: str | None = None, kind: str = "prompt", model_name: str | None = None,
                 free_text: bool = True, workspace: "Workspace | None" = None):
        if prompt.output.constrained and not getattr(model, "constrains_json", False):
            raise UserError(f"prompt '{prompt.name}' decodes under its JSON schema (output.constrained), which "
                            f"model '{getattr(model, 'name', model)}' (backend {getattr(model, 'backend', '?')}) "
                            "cannot do: use a local or llamacpp model, or drop 'constrained'")
        if prompt.output.type != "label" and getattr(model, "labels_only", False):  # a classification head
            raise UserError(f"model '{getattr(model, 'name', model)}' is a classification head: it answers label "
                            f"outputs only, and prompt '{prompt.name}' has a {prompt.output.type} output")
        self.prompt = prompt
        self.model = model
        demos = prompt.resolve_demos(workspace) if demos is None else demos
        self.demos = demos if isinstance(demos, DemoSelector) else list(demos)
        self.name = name or prompt.ref
        self.kind = kind
        self.model_name = model_name or getattr(model, "name", "model")
        self.backend = getattr(model, "backend", "")
        self.output = prompt.output
        self.temperature = float(prompt.temperature)
        self.free_text = bool(free_text) and self.output.type == "label"
        self.free_pick: Callable[[Example], bool] | None = None
        self.training_data: str | None = None  # kind ft: the fine-tune's DATASET@VERSION
        self.settings: dict[str, Any] = {}  # request settings in place of the prompt's (with_settings)

    @property
    def fingerprint(self) -> str:
        demos = self.demos.to_dict() if isinstance(self.demos, DemoSelector) else [d.to_dict() for d in self.demos]
        return sha256({"kind": self.kind, "prompt": self.prompt.name, "version": self.prompt.version,
                       "model": self.model.fingerprint, "demos": demos, "free_text": self.free_text,
                       **({"settings": self.settings} if self.settings else {})})

    def requests(self, examples: list[Example], repeat_index: int = 0) -> list[Request]:
        if isinstance(self.demos, DemoSelector):
            self.demos.select_many(examples)  # one batched pass; the requests then hit its memo
        reqs = []
        for ex in examples:
            free = self.free_text and (self.free_pick is None or self.free_pick(ex))
            reqs.append(self.prompt.request(ex, self.demos, seed=repeat_index, **({"free_text": True} if free else {}),
                                            **self.settings))
        return reqs

    def stream(self, example: Example, repeat_index: int, emit: Callable[[str], None]) -> Completion:
        req = self.requests([example], repeat_index)[0]
        if req.labels:  # a label is chosen whole (and drawn at temperature > 0): predict's answer
            return super().stream(example, repeat_index, emit)
        return self.model.stream(req, emit)

    def model_requests(self, example: Example, repeat_index: int = 0) -> list[tuple[Model, Request]]:
        return [(self.model, req) for req in self.requests([example], repeat_index)]

    def with_settings(self, **settings: Any) -> "PromptCandidate":
        """The same candidate with request settings (`temperature`, `max_tokens`, `stop`) in place
        of its prompt's: a deployment applies the ones its label lets clients override."""
        if not settings:
            return self
        temperature = float(settings.get("temperature", self.temperature))
        return self._copy(settings={**self.settings, **settings}, temperature=temperature)

    def predict(self, examples: list[Example], repeat_index: int = 0) -> list[Completion]:
        reqs = self.requests(examples, repeat_index)
        comps = self.model.complete(reqs)
        if len(comps) != len(reqs):
            raise RuntimeError(f"model {self.model_name} answered {len(comps)} of {len(reqs)} requests")
        for req, comp in zip(reqs, comps):
            if req.labels and req.temperature > 0 and comp.label_logprobs:
                drawn = sample_label(comp.label_logprobs, req.temperature,
                                     f"{req.seed}:{canonical_json(req.messages)}")
                if drawn != comp.text:
                    comp.meta = {**comp.meta, "most_likely": comp.text}
                    comp.text = drawn
        return comps

    def _copy(self, **changes: Any) -> "PromptCandidate":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.__dict__.update(changes)
        return clone

    def map_models(self, fn: Callable[[Model], Model]) -> "PromptCandidate":
        return self._copy(model=fn(self.model))

    def with_demos(self, demos: "list[Example] | DemoSelector", name: str | None = None) -> "PromptCandidate":
        """The same prompt and model with other demos (a learning curve's smaller demo pool)."""
        return self._copy(demos=demos if isinstance(demos, DemoSelector) else list(demos), name=name or self.name)

    def with_free_answers(self, pick: Callable[[Example], bool]) -> "PromptCandidate":
        return self._copy(free_pick=pick) if self.free_text else self

    def with_free_text(self, free_text: bool) -> "PromptCandidate":
        """The same candidate asking (or not) for free answers of label outputs."""
        return self._copy(free_text=bool(free_text) and self.output.type == "label")


def sample_label(logprobs: dict[str, float], temperature: float, seed_material: str) -> str:
    """A label drawn from softmax(logprob / temperature), seeded by `seed_material`."""
    labels = list(logprobs)
    if temperature <= 0 or len(labels) < 2:
        return max(labels, key=lambda k: logprobs[k])
    x = np.array([logprobs[k] for k in labels], dtype=float) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    seed = int(hashlib.sha256(seed_material.encode("utf-8")).hexdigest()[:16], 16)
    return labels[int(np.random.default_rng(seed).choice(len(labels), p=p))]


def request_cost(pricing: "Pricing", completion: Completion) -> float:
    """$ for one request: tokens x API prices, plus local $/hour x the request's measured seconds
    (a hybrid's completion carries its own price in `meta["cost"]`: it called two models)."""
    if "cost" in (completion.meta or {}):
        return float(completion.meta["cost"])
    return (completion.prompt_tokens * pricing.input_per_million / 1e6
            + completion.completion_tokens * pricing.output_per_million / 1e6
            + pricing.per_hour * max(0.0, completion.latency_s) / 3600.0)


def example_for(messages: list[dict], variables: dict[str, Any] | None = None) -> Example:
    """The example a chat request stands for: `variables["input"]` (the gateway's
    `tunelab_variables`), else the last user message; the other variables are its fields."""
    fields = dict(variables or {})
    text = fields.pop("input", None)
    if text is None:
        text = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return Example(input=str(text), output="", meta=fields)

