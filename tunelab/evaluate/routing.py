"""The hybrid candidate `hybrid:NAME`: a fine-tuned model first, a prompt-engineered one where it is
unsure. This is how a hybrid answers (evaluated and served alike); `tunelab.hybrid` makes one.

Per example, in this order:

1. **exception rules** — an input matching a rule's regex goes to the fallback (`rule`);
2. **out of distribution** — an input whose length (characters) lies outside the training inputs'
   range, or whose highest cosine similarity to the training inputs (TF-IDF over words and word
   pairs) is below `similarity_threshold`, goes to the fallback (`out_of_distribution`);
3. **invalid** — (JSON outputs, `invalid_to_fallback`) the fine-tuned model's answer does not parse
   or does not match the output schema: the fallback answers (`invalid_output`);
4. **unsure** — otherwise the fine-tuned model answers; when it is unsure, the fallback answers
   instead (`unsure`). For labels: its label-probability margin (`Completion.label_margin`: best
   minus second-best label probability) is below `margin_threshold`. For generated answers (JSON,
   text): the probability of its answer's tokens (`Completion.confidence`: the geometric mean,
   exp of the mean token log-probability, and the least likely token) is below
   `confidence_threshold` or `min_token_threshold`.

A hybrid is stored as JSON at `artifacts/hybrids/NAME.json` (`HybridSpec`: primary, fallback,
thresholds, rules, how they were tuned, its setup); no table is needed. The combined completion
counts the tokens and latency of every model that was called (an unsure answer costs a primary
*and* a fallback call), so the hybrid's cost is measured honestly; `Completion.meta["route"]` says
who answered and why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.canonical import sha256
from tunelab.datasets import Example, get_split
from tunelab.demos import TfidfVectors
from tunelab.errors import NotFound, UserError, pydantic_message
from tunelab.evaluate.candidates import Candidate, Setup, request_cost
from tunelab.files import write_atomic
from tunelab.models.base import Completion, Model

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

ROUTES = ("primary", "fallback")
REASONS = ("rule", "out_of_distribution", "invalid_output", "unsure")


class ExceptionRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pattern: str = Field(description="a regular expression (re.search, case-insensitive) on the input")
    note: str = Field("", description="why inputs like this go to the fallback")


class HybridSpec(BaseModel):
    """`artifacts/hybrids/NAME.json`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    primary: str = Field(description="the fine-tuned candidate that answers first: ft:NAME")
    fallback: str = Field(description="the prompt candidate for the rest: PROMPT[@VERSION|@LABEL]")
    margin_threshold: float = Field(0.0, ge=0, le=1, description="fallback when the primary's label margin is below this")
    similarity_threshold: float = Field(0.0, ge=0, le=1, description="fallback when the input's max similarity to training inputs is below this")
    confidence_threshold: float = Field(0.0, ge=0, le=1, description="generated answers: fallback when the geometric-mean probability of the primary's tokens is below this")
    min_token_threshold: float = Field(0.0, ge=0, le=1, description="generated answers: fallback when the primary's least likely token's probability is below this")
    invalid_to_fallback: bool = Field(False, description="JSON outputs: fallback when the primary's answer does not parse or match the schema")
    length_range: tuple[int, int] | None = Field(None, description="fallback when the input's length (characters) is outside")
    rules: list[ExceptionRule] = Field(default_factory=list)
    train_data: str | None = Field(None, description="DATASET@VERSION:train — the training inputs for the distribution check")
    tuning: dict[str, Any] = Field(default_factory=dict, description="how the thresholds were chosen")
    setup: Setup = Field(default_factory=lambda: Setup(how="hybrid"),
                         description="what tuning the thresholds took (its sides' setups come on top)")
    created_at: str = ""

    @model_validator(mode="after")
    def _setup_of_older_specs(self) -> "HybridSpec":
        """Specs stored before `setup` existed kept the tuning's time and cost in `tuning`."""
        if not self.setup.wall_s and self.tuning.get("wall_s"):
            self.setup = Setup(how="hybrid", wall_s=float(self.tuning["wall_s"]),
                               compute_cost=float(self.tuning.get("cost") or 0.0),
                               sources=[f"threshold tuning on {self.tuning.get('data', 'validation')}"])
        return self


# -- the distribution check -------------------------------------------------------------------------
class NgramIndex:
    """Max cosine similarity of inputs to a reference set (the optimizer's TF-IDF: word unigrams
    and bigrams, sublinear tf, L2-normalised); an input sharing no term with it scores 0."""

    def __init__(self, texts: Sequence[str]):
        self._tfidf = TfidfVectors(list(texts))
        self.matrix = self._tfidf.transform(list(texts))

    def max_similarity(self, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        if self.matrix.shape[0] == 0 or self.matrix.shape[1] == 0:
            return [0.0] * len(texts)
        sims = (self._tfidf.transform(list(texts)) @ self.matrix.T).max(axis=1).toarray().ravel()
        return [float(min(1.0, s)) for s in sims]


@dataclass
class Route:
    route: str  # primary | fallback
    reason: str | None = None  # rule | out_of_distribution | unsure
    detail: str = ""
    similarity: float | None = None
    margin: float | None = None
    confidence: dict[str, float] | None = None

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"route": self.route}
        if self.reason:
            meta["route_reason"] = self.reason
        if self.detail:
            meta["route_detail"] = self.detail
        if self.similarity is not None:
            meta["similarity"] = round(self.similarity, 4)
        if self.margin is not None:
            meta["margin"] = round(self.margin, 4)
        if self.confidence is not None:
            meta["confidence"] = {k: round(v, 4) for k, v in self.confidence.items()}
        return meta


class Routing:
    """The routing decisions of a hybrid, with no models attached (testable on its own)."""

    def __init__(self, spec: HybridSpec, train_inputs: Sequence[str] | None = None,
                 valid: Callable[[str], bool] | None = None):
        self.spec = spec
        self.valid = valid  # JSON outputs: is an answer usable (parses, matches the schema)?
        self._rules = []
        for i, rule in enumerate(spec.rules):
            try:
                self._rules.append((re.compile(rule.pattern, re.IGNORECASE), rule))
            except re.error as exc:
                raise UserError(f"rule {i + 1}: invalid regular expression {rule.pattern!r}: {exc}", field="rules") from None
        self.index = NgramIndex(train_inputs) if (train_inputs and spec.similarity_threshold > 0) else None

    def before(self, inputs: Sequence[str]) -> list[Route | None]:
        """Routes decided before the primary runs (rules, distribution); None: ask the primary."""
        sims = self.index.max_similarity(inputs) if self.index is not None else [None] * len(inputs)
        out: list[Route | None] = []
        lo_hi = self.spec.length_range
        for text, sim in zip(inputs, sims):
            rule = next((r for rx, r in self._rules if rx.search(text)), None)
            if rule is not None:
                out.append(Route("fallback", "rule", rule.note or rule.pattern, similarity=sim))
            elif lo_hi is not None and not (lo_hi[0] <= len(text) <= lo_hi[1]):
                out.append(Route("fallback", "out_of_distribution",
                                 f"length {len(text)} outside the training range {lo_hi[0]}–{lo_hi[1]}", similarity=sim))
            elif sim is not None and sim < self.spec.similarity_threshold:
                out.append(Route("fallback", "out_of_distribution",
                                 f"similarity {sim:.3f} < {self.spec.similarity_threshold:.3f}", similarity=sim))
            else:
                out.append(None if sim is None else Route("primary", similarity=sim))
        return out

    def after(self, completion: Completion, pre: Route | None) -> Route:
        """The route once the primary has answered: fallback when its answer is unusable or it is unsure."""
        spec = self.spec
        margin = completion.label_margin
        conf = completion.confidence if margin is None else None
        sim = pre.similarity if pre is not None else None
        if spec.invalid_to_fallback and self.valid is not None and not self.valid(completion.text):
            return Route("fallback", "invalid_output", "the answer does not match the output format",
                         similarity=sim, confidence=conf)
        if margin is not None and margin < spec.margin_threshold:
            return Route("fallback", "unsure", f"margin {margin:.3f} < {spec.margin_threshold:.3f}",
                         similarity=sim, margin=margin)
        if conf is not None and (conf["mean"] < spec.confidence_threshold or conf["min"] < spec.min_token_threshold):
            return Route("fallback", "unsure", f"token probability {conf['mean']:.3f} (least {conf['min']:.3f}) "
                         f"< {spec.confidence_threshold:.3f} (least {spec.min_token_threshold:.3f})",
                         similarity=sim, confidence=conf)
        return Route("primary", similarity=sim, margin=margin, confidence=conf)


def merge(route: Route, primary: Completion | None, fallback: Completion | None) -> Completion:
    """One completion for the hybrid: the answering side's text, every called side's tokens and time."""
    chosen = fallback if route.route == "fallback" else primary
    assert chosen is not None
    called = [c for c in (primary, fallback) if c is not None]
    meta = dict(chosen.meta or {})
    meta.update(route.to_meta())
    return Completion(
        text=chosen.text,
        prompt_tokens=sum(c.prompt_tokens for c in called),
        completion_tokens=sum(c.completion_tokens for c in called),
        latency_s=sum(c.latency_s for c in called),
        label_logprobs=chosen.label_logprobs,
        free_text=chosen.free_text,
        meta=meta,
    )



# -- storage ----------------------------------------------------------------------------------------
def hybrid_path(ws: "Workspace", name: str) -> Path:
    return ws.artifact_path("hybrids", f"{name}.json")


def save_hybrid(ws: "Workspace", spec: HybridSpec) -> Path:
    """Store (or replace) the spec of `hybrid:NAME`."""
    return write_atomic(hybrid_path(ws, spec.name), json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")


def read_hybrid(ws: "Workspace", name: str) -> HybridSpec:
    """The stored spec of `hybrid:NAME`."""
    path = hybrid_path(ws, name)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise NotFound(f"unknown hybrid '{name}' (hybrids: {', '.join(known) or 'none; use tunelab hybrid create'})")
    try:
        return HybridSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, HybridSpec), path=path) from None


def list_hybrids(ws: "Workspace") -> list[HybridSpec]:
    folder = ws.artifacts_dir / "hybrids"
    return [read_hybrid(ws, p.stem) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# -- the hybrid as a candidate ---------------------------------------------------------------------
class HybridCandidate(Candidate):
    """`hybrid:NAME`: answers like any candidate; `Completion.meta` carries the route taken."""

    kind = "hybrid"

    def __init__(self, ws: "Workspace", spec: HybridSpec, primary: Candidate, fallback: Candidate,
                 routing: Routing):
        self.ws = ws
        self.spec = spec
        self.primary = primary
        self.fallback = fallback
        self.routing = routing
        self.name = f"hybrid:{spec.name}"
        self.model_name = f"hybrid:{spec.name}"
        self.backend = "hybrid"
        self.output = primary.output
        self.temperature = primary.temperature

    @property
    def fingerprint(self) -> str:
        routing = self.spec.model_dump(mode="json", exclude={"created_at", "tuning", "name", "setup"})
        return sha256({"kind": "hybrid", "routing": routing, "primary": self.primary.fingerprint,
                       "fallback": self.fallback.fingerprint})

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        data.update(primary=self.primary.describe(), fallback=self.fallback.describe(),
                    thresholds={"margin": self.spec.margin_threshold, "similarity": self.spec.similarity_threshold,
                                "confidence": self.spec.confidence_threshold,
                                "min_token": self.spec.min_token_threshold,
                                "invalid_to_fallback": self.spec.invalid_to_fallback,
                                "length_range": self.spec.length_range})
        return data

    def model_requests(self, example: Example, repeat_index: int = 0) -> list:
        return self.primary.model_requests(example, repeat_index) + self.fallback.model_requests(example, repeat_index)

    def map_models(self, fn: Callable[[Model], Model]) -> "HybridCandidate":
        return HybridCandidate(self.ws, self.spec, self.primary.map_models(fn), self.fallback.map_models(fn),
                               self.routing)

    def with_free_answers(self, pick: Callable[[Example], bool]) -> "HybridCandidate":
        return HybridCandidate(self.ws, self.spec, self.primary.with_free_answers(pick),
                               self.fallback.with_free_answers(pick), self.routing)

    def _cost(self, cand: Candidate, comp: Completion | None) -> float:
        if comp is None:
            return 0.0
        return request_cost(self.ws.pricing_for(cand.model_name, cand.backend), comp)

    def predict(self, examples: list[Example], repeat_index: int = 0) -> list[Completion]:
        pre = self.routing.before([ex.input for ex in examples])
        ask = [i for i, r in enumerate(pre) if r is None or r.route == "primary"]
        routes: list[Route] = [r if r is not None else Route("primary") for r in pre]
        primary_out: dict[int, Completion] = {}
        if ask:
            for i, comp in zip(ask, self.primary.predict([examples[i] for i in ask], repeat_index)):
                primary_out[i] = comp
                routes[i] = self.routing.after(comp, pre[i])
        to_fallback = [i for i, r in enumerate(routes) if r.route == "fallback"]
        fallback_out: dict[int, Completion] = {}
        if to_fallback:
            for i, comp in zip(to_fallback, self.fallback.predict([examples[i] for i in to_fallback], repeat_index)):
                fallback_out[i] = comp
        out = []
        for i, route in enumerate(routes):
            p, f = primary_out.get(i), fallback_out.get(i)
            merged = merge(route, p, f)
            merged.meta["cost"] = self._cost(self.primary, p) + self._cost(self.fallback, f)
            out.append(merged)
        return out


def train_inputs(ws: "Workspace", ref: str | None) -> list[str]:
    """The inputs of a hybrid's training split (`DATASET@VERSION:train`), for its distribution check."""
    if not ref:
        return []
    _, _, examples = get_split(ws, ref, default_split="train")
    return [ex.input for ex in examples]
