"""The hybrid router `hybrid:NAME`: a fine-tuned model first, a prompt-engineered one as fallback.

    spec = create_hybrid(ws, "support", primary="ft:support", fallback="support-router@v2")
    cand = load_router(ws, "support")        # a Candidate, like `ft:support` or a prompt version
    cand.predict(examples, 0)                # Completion.meta["route"] says who answered and why

Per example, in this order:

1. **exception rules** — an input matching a rule's regex goes to the fallback (`rule`);
2. **out of distribution** — an input whose length (characters) lies outside the training inputs'
   range, or whose highest cosine similarity to the training inputs (TF-IDF over words and word
   pairs) is below `similarity_threshold`, goes to the fallback (`out_of_distribution`);
3. **unsure** — otherwise the fine-tuned model answers; when its label-probability margin
   (`Completion.label_margin`: best minus second-best label probability) is below
   `margin_threshold`, the fallback answers instead (`unsure`).

Both thresholds are tuned on the **validation** split (never the test split) to maximize the
primary metric; among equally good settings the one sending the least traffic to the fallback
wins. A hybrid is stored as JSON at `artifacts/hybrids/NAME.json` (primary, fallback, thresholds,
rules, how they were tuned); no table is needed.

The combined completion counts the tokens and latency of every model that was called (an
unsure answer costs a primary *and* a fallback call), so the hybrid's cost is measured honestly.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import NotFound, UserError
from tunelab.evaluate import Candidate
from tunelab.models.base import Completion

if TYPE_CHECKING:
    from tunelab.datasets import Example
    from tunelab.workspace import Workspace

ROUTES = ("primary", "fallback")
REASONS = ("rule", "out_of_distribution", "unsure")


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
    length_range: tuple[int, int] | None = Field(None, description="fallback when the input's length (characters) is outside")
    rules: list[ExceptionRule] = Field(default_factory=list)
    train_data: str | None = Field(None, description="DATASET@VERSION:train — the training inputs for the distribution check")
    tuning: dict[str, Any] = Field(default_factory=dict, description="how the thresholds were chosen")
    created_at: str = ""


# -- the distribution check -------------------------------------------------------------------------
class NgramIndex:
    """Max cosine similarity of inputs to a reference set (the optimizer's TF-IDF: word unigrams
    and bigrams, sublinear tf, L2-normalised); an input sharing no term with it scores 0."""

    def __init__(self, texts: Sequence[str]):
        from tunelab.optimize.demos import TfidfVectors

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
        return meta


class Router:
    """The routing decisions of a hybrid, with no models attached (testable on its own)."""

    def __init__(self, spec: HybridSpec, train_inputs: Sequence[str] | None = None):
        self.spec = spec
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
        """The route once the primary has answered: fallback when it is unsure."""
        margin = completion.label_margin
        sim = pre.similarity if pre is not None else None
        if margin is not None and margin < self.spec.margin_threshold:
            return Route("fallback", "unsure", f"margin {margin:.3f} < {self.spec.margin_threshold:.3f}",
                         similarity=sim, margin=margin)
        return Route("primary", similarity=sim, margin=margin)


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


# -- tuning -----------------------------------------------------------------------------------------
def tune_thresholds(primary_scores: Sequence[float], fallback_scores: Sequence[float],
                    margins: Sequence[float | None], similarities: Sequence[float | None] | None = None,
                    forced: Sequence[bool] | None = None, *, max_grid: int = 60) -> dict[str, Any]:
    """Thresholds that maximize the mean per-example score of the combined answers.

    `primary_scores[i]`/`fallback_scores[i]`: each side's score on validation example i;
    `margins[i]`: the primary's label margin; `similarities[i]`: max similarity to the training
    inputs; `forced[i]`: the example goes to the fallback anyway (rule, length). Ties go to the
    setting with the least fallback traffic, then to the lower thresholds.
    """
    n = len(primary_scores)
    if n == 0:
        return {"margin_threshold": 0.0, "similarity_threshold": 0.0, "score": None, "fallback_share": 0.0,
                "primary_score": None, "fallback_score": None, "n": 0}
    forced = list(forced) if forced is not None else [False] * n
    sims = list(similarities) if similarities is not None else [None] * n

    def grid(values: list[float]) -> list[float]:
        vals = sorted(set(v for v in values if v is not None))
        cuts = [0.0]
        # a threshold just above each observed value routes that value and everything below it
        for a, b in zip(vals, vals[1:] + [None]):
            cuts.append(a + 1e-9 if b is None else (a + b) / 2)
        if len(cuts) > max_grid:
            step = len(cuts) / max_grid
            cuts = sorted(set([0.0] + [cuts[int(i * step)] for i in range(max_grid)]))
        return [min(1.0, c) for c in cuts]

    margin_grid = grid([m for m in margins if m is not None])
    sim_grid = grid([s for s in sims if s is not None]) if any(s is not None for s in sims) else [0.0]
    best: tuple | None = None
    for st in sim_grid:
        for mt in margin_grid:
            total = 0.0
            fb = 0
            for i in range(n):
                to_fb = forced[i] or (sims[i] is not None and sims[i] < st) or (margins[i] is not None and margins[i] < mt)
                total += fallback_scores[i] if to_fb else primary_scores[i]
                fb += to_fb
            key = (round(total / n, 12), -fb, -st, -mt)
            if best is None or key > best[0]:
                best = (key, mt, st, total / n, fb / n)
    assert best is not None
    return {"margin_threshold": best[1], "similarity_threshold": best[2], "score": best[3], "fallback_share": best[4],
            "primary_score": sum(primary_scores) / n, "fallback_score": sum(fallback_scores) / n, "n": n,
            "grid": {"margin": len(margin_grid), "similarity": len(sim_grid)}}


# -- storage ----------------------------------------------------------------------------------------
def hybrid_path(ws: "Workspace", name: str):
    return ws.artifact_path("hybrids", f"{name}.json")


def save_hybrid(ws: "Workspace", spec: HybridSpec) -> None:
    path = hybrid_path(ws, spec.name)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(spec.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def load_hybrid(ws: "Workspace", name: str) -> HybridSpec:
    path = hybrid_path(ws, name)
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.json"))
        raise NotFound(f"unknown hybrid '{name}' (hybrids: {', '.join(known) or 'none; use tunelab hybrid create'})")
    try:
        return HybridSpec.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        from tunelab.workspace import pydantic_message

        raise UserError(pydantic_message(exc), path=path) from None


def list_hybrids(ws: "Workspace") -> list[HybridSpec]:
    folder = ws.artifacts_dir / "hybrids"
    return [load_hybrid(ws, p.stem) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# -- the hybrid as a candidate ---------------------------------------------------------------------
class HybridCandidate(Candidate):
    """`hybrid:NAME`: answers like any candidate; `Completion.meta` carries the route taken."""

    kind = "hybrid"

    def __init__(self, ws: "Workspace", spec: HybridSpec, primary, fallback, router: Router):
        self.ws = ws
        self.spec = spec
        self.primary = primary
        self.fallback = fallback
        self.router = router
        self.name = f"hybrid:{spec.name}"
        self.model_name = f"hybrid:{spec.name}"
        self.backend = "hybrid"
        self.output = primary.output
        self.temperature = primary.temperature

    @property
    def fingerprint(self) -> str:
        from tunelab.evaluate import sha256

        routing = self.spec.model_dump(mode="json", exclude={"created_at", "tuning", "name"})
        return sha256({"kind": "hybrid", "routing": routing, "primary": self.primary.fingerprint,
                       "fallback": self.fallback.fingerprint})

    def describe(self) -> dict[str, Any]:
        data = super().describe()
        data.update(primary=self.primary.describe(), fallback=self.fallback.describe(),
                    thresholds={"margin": self.spec.margin_threshold, "similarity": self.spec.similarity_threshold,
                                "length_range": self.spec.length_range})
        return data

    def with_cache(self, cache) -> "HybridCandidate":
        return HybridCandidate(self.ws, self.spec, self.primary.with_cache(cache), self.fallback.with_cache(cache),
                               self.router)

    def _cost(self, cand, comp: Completion | None) -> float:
        from tunelab.evaluate import request_cost

        if comp is None:
            return 0.0
        return request_cost(self.ws.pricing_for(cand.model_name, cand.backend), comp)

    def predict(self, examples: list["Example"], repeat_index: int = 0) -> list[Completion]:
        pre = self.router.before([ex.input for ex in examples])
        ask = [i for i, r in enumerate(pre) if r is None or r.route == "primary"]
        routes: list[Route] = [r if r is not None else Route("primary") for r in pre]
        primary_out: dict[int, Completion] = {}
        if ask:
            for i, comp in zip(ask, self.primary.predict([examples[i] for i in ask], repeat_index)):
                primary_out[i] = comp
                routes[i] = self.router.after(comp, pre[i])
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


def _train_inputs(ws: "Workspace", ref: str | None) -> list[str]:
    if not ref:
        return []
    from tunelab.datasets import get_split

    _, _, examples = get_split(ws, ref, default_split="train")
    return [ex.input for ex in examples]


def load_router(ws: "Workspace", name: str) -> HybridCandidate:
    """The candidate `hybrid:NAME` (see `create_hybrid`)."""
    from tunelab.evaluate import resolve_candidate

    spec = load_hybrid(ws, name)
    primary = resolve_candidate(ws, spec.primary)
    fallback = resolve_candidate(ws, spec.fallback)
    inputs = _train_inputs(ws, spec.train_data) if spec.similarity_threshold > 0 else None
    return HybridCandidate(ws, spec, primary, fallback, Router(spec, inputs))


def _training_data_of(ws: "Workspace", primary: str) -> str | None:
    """DATASET@VERSION of the fine-tune behind `ft:NAME`, when it is one."""
    if not primary.startswith("ft:"):
        return None
    from sqlalchemy import select

    from tunelab.store.models import FineTuneRow

    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == primary[3:]))
    return f"{row.dataset}@{row.dataset_version}" if row is not None else None


def create_hybrid(ws: "Workspace", name: str, primary: str, fallback: str, *,
                  threshold: float | str = "auto", similarity: float | str = "auto", length_check: bool = True,
                  rules: Sequence[str | ExceptionRule] = (), data: str | None = None, limit: int | None = None,
                  progress: bool | Any = True) -> HybridSpec:
    """Make `hybrid:NAME`: tune its thresholds on the validation split and store it.

    `primary` is usually `ft:NAME`; `fallback` a prompt `PROMPT[@VERSION|@LABEL]` (pinned to its
    version). `threshold`/`similarity`: "auto" (tuned on validation), a number, or "off" (0).
    `data`: the dataset `NAME[@VERSION]` (default: the fine-tune's). Both candidates are evaluated
    on its validation split with the evaluator (runs are stored, and reused next time).
    """
    from tunelab.datasets import get_dataset, validate_name
    from tunelab.evaluate import evaluate, resolve_candidate, run_rows

    validate_name(name, "hybrid")
    if primary.startswith("hybrid:") or fallback.startswith("hybrid:"):
        raise UserError("a hybrid's primary and fallback must be a prompt or a fine-tuned model, not another hybrid")
    p_cand = resolve_candidate(ws, primary)
    f_cand = resolve_candidate(ws, fallback)
    for cand in (p_cand, f_cand):
        _pin(ws, cand, name)
    data_ref = data or _training_data_of(ws, primary)
    if data_ref is None:
        raise UserError(f"which data? '{primary}' is not a fine-tune of this workspace: pass --data DATASET")
    ds = get_dataset(ws, data_ref.split(":")[0])
    if "validation" not in ds.splits:
        raise UserError(f"dataset '{ds.name}' has no validation split to tune the hybrid's thresholds on "
                        "(tunelab data split makes one)")
    train_ref = f"{ds.name}@{ds.version}:train" if "train" in ds.splits else None
    train_inputs = _train_inputs(ws, train_ref)
    rule_objs = [r if isinstance(r, ExceptionRule) else ExceptionRule(pattern=r) for r in rules]
    lengths = [len(t) for t in train_inputs]
    spec = HybridSpec(name=name, primary=p_cand.name, fallback=f_cand.name, rules=rule_objs,
                      length_range=(min(lengths), max(lengths)) if (length_check and lengths) else None,
                      train_data=train_ref, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Router(spec)  # validates the rules' regular expressions before any work

    val_ref = f"{ds.name}@{ds.version}:validation"
    # tuning needs each side's scores and margins only: no free-text answers (they cost generation)
    p_run = evaluate(ws, resolve_candidate(ws, p_cand.name, free_text=False), val_ref, limit=limit, progress=progress)
    f_run = evaluate(ws, resolve_candidate(ws, f_cand.name, free_text=False), val_ref, limit=limit, progress=progress)
    metric = p_run.primary_metric
    p_rows = {r.example_index: r for r in run_rows(ws, p_run.id) if r.repeat_index == 0}
    f_rows = {r.example_index: r for r in run_rows(ws, f_run.id) if r.repeat_index == 0}
    common = sorted(set(p_rows) & set(f_rows))
    inputs = [p_rows[i].input for i in common]
    margins = [(p_rows[i].extra or {}).get("margin") for i in common]
    index = NgramIndex(train_inputs) if (train_inputs and similarity != "off") else None
    sims = index.max_similarity(inputs) if index is not None else None
    forced = [r is not None and r.route == "fallback" for r in Router(spec).before(inputs)]

    fixed_margin = None if threshold == "auto" else (0.0 if threshold == "off" else _unit(threshold, "threshold"))
    fixed_sim = None if similarity == "auto" else (0.0 if similarity == "off" else _unit(similarity, "similarity"))
    tuned = tune_thresholds([float((p_rows[i].scores or {}).get(metric, 0.0)) for i in common],
                            [float((f_rows[i].scores or {}).get(metric, 0.0)) for i in common],
                            margins if fixed_margin is None else [None] * len(common),
                            sims if fixed_sim is None else None, forced)
    spec.margin_threshold = tuned["margin_threshold"] if fixed_margin is None else fixed_margin
    spec.similarity_threshold = tuned["similarity_threshold"] if fixed_sim is None else fixed_sim
    if fixed_margin is not None or fixed_sim is not None:  # the score of the setting actually kept
        fb = [forced[k] or (sims is not None and sims[k] < spec.similarity_threshold)
              or (margins[k] is not None and margins[k] < spec.margin_threshold) for k in range(len(common))]
        scores = [float(((f_rows if fb[k] else p_rows)[i].scores or {}).get(metric, 0.0)) for k, i in enumerate(common)]
        tuned["score"] = sum(scores) / len(scores) if scores else None
        tuned["fallback_share"] = sum(fb) / len(fb) if fb else 0.0
    spec.tuning = {"data": val_ref, "metric": metric, "n": len(common), "validation_score": tuned["score"],
                   "primary_score": tuned["primary_score"], "fallback_score": tuned["fallback_score"],
                   "fallback_share": tuned["fallback_share"], "threshold": str(threshold), "similarity": str(similarity),
                   "runs": {"primary": p_run.id, "fallback": f_run.id},
                   "wall_s": float(p_run.throughput.get("wall_s") or 0) + float(f_run.throughput.get("wall_s") or 0),
                   "cost": float(p_run.cost.get("total") or 0) + float(f_run.cost.get("total") or 0)}
    save_hybrid(ws, spec)
    return spec


def _pin(ws: "Workspace", cand, hybrid: str) -> None:
    """Make sure a prompt candidate's version is committed, so `NAME@VERSION` names it later."""
    if cand.kind != "prompt" or not hasattr(cand, "prompt"):
        return
    from tunelab.prompts import commit_prompt, load_prompt

    try:
        load_prompt(ws, cand.name)
    except NotFound:
        commit_prompt(ws, cand.prompt.name, f"pinned by hybrid {hybrid}", text=cand.prompt.to_text(), write_file=False)


def _unit(value: float | str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{what} must be 'auto', 'off' or a number between 0 and 1 (got {value!r})") from None
    if not 0 <= v <= 1:
        raise UserError(f"--{what} must be between 0 and 1 (got {v})")
    return v
