"""Evaluation: one evaluator for every candidate — a prompt version on a model, a fine-tuned model,
a hybrid router — on one split, with the same metrics, tokens, latency and cost.

    from tunelab.evaluate import evaluate, resolve_candidate, load_run, diff_runs

    cand = resolve_candidate(ws, "spam@production")            # PROMPT[@VERSION|@LABEL], ft:NAME, hybrid:NAME
    result = evaluate(ws, cand, "sms:test", limit=200, repeat=3)
    result.id, result.metrics["accuracy"]["value"], result.metrics["accuracy"]["lo"]
    result.cost["per_1000"], result.latency["p95"], result.consistency["agreement"]
    diff = diff_runs(ws, run_a, run_b); print(diff.verdicts)

Candidates
----------
A `Candidate` has a `name`, a `kind` ("prompt" | "ft" | "hybrid"), a `model_name` and `backend`
(for pricing), an `output` spec (type label/json/text, labels, schema), a `temperature` (the
deployment temperature), a `fingerprint` (everything that changes its answers) and
`predict(examples, repeat_index) -> list[Completion]`. `PromptCandidate(prompt, model, demos)`
is the one most candidates are: a fine-tuned model is a `PromptCandidate` of kind "ft" (its
training prompt on `ft:NAME`); the router (`tunelab.router.load_router`) is its own Candidate.

For label outputs at temperature > 0 a PromptCandidate draws its answer from the labels'
distribution (softmax of the label log-probabilities / temperature, seeded by the repeat index
and the request), as sampling constrained to the labels would; at temperature 0 it is the most
likely label. `sample_label` is public so a deployment answers the same way.

The response cache
------------------
`CachedModel(model, ResponseCache(ws))` answers a request from the store's `cache` table when the
sha256 of canonical JSON {model fingerprint, messages, request parameters (seed = the repeat
index included)} is there, and stores what it computes. Re-running an unchanged candidate costs
nothing; repeats have different seeds, so the cache never hands the first answer back K times.
A cached completion keeps its measured latency and tokens, so its row (and cost) is as measured.

A router (`tunelab.router.load_router(ws, name) -> Candidate`, kind "hybrid") should answer
through `CachedModel` when `with_cache` is called, put the route it took in `Completion.meta`
(stored in the row's extra["meta"]) and, since it mixes models, the request's price in
`Completion.meta["cost"]` (see `request_cost`), which the run uses instead of its own pricing.

Runs
----
`evaluate()` keys a run by sha256 of (candidate fingerprint, dataset version, split, limit,
repeat, metrics). A finished run with the same key is returned as is (`rerun=True` makes a new
one); an unfinished one (killed, failed, interrupted) is resumed: the rows already stored are
skipped. Rows are inserted per batch, each batch in its own transaction, so a SIGKILL loses at most
the batch in flight; the (run, example, repeat) unique constraint means never a duplicate row.

Row: input, expected, prediction, scores {metric: value}, prompt/completion tokens, latency,
cost, extra {label_logprobs, margin, free_text, free_valid, format_valid, free_text_skipped, cached,
route, ...}.

Free answers (label outputs): the model's unconstrained answer, for the format-validity rate, costs
a short generation, so by default it is asked for on a seeded sample of the examples only: at least
100 or 20% of them, whichever is more (the examples with the smallest sha256 of their input, so
two runs on one split measure the same rows), every example with `repeat` > 1, and as many as
`evaluate(free_answers="all" | N | "P%")` says. Rows outside the sample have
`extra["free_text_skipped"]` and `format_valid` None, and do not count in format_valid or
free_accuracy; `consistency["format_valid"]` says over how many rows it was measured (`rows` of
`of`; `n` examples, the interval's n).

The summary (`RunResult`, also stored in `runs.summary`): metrics with 95% intervals (Wilson
for 0/1 metrics, a seeded bootstrap otherwise; see tunelab.metrics), consistency over repeats
(agreement, pairwise agreement, pass^k, format validity), tokens per request, latency p50/p95,
throughput, cost per 1,000 requests (API $/million tokens, or local $/hour x measured seconds).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
import uuid
from abc import ABC, abstractmethod
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
from sqlalchemy import select

from tunelab import stats as st
from tunelab.errors import NotFound, UserError
from tunelab.metrics import (Answer, FormatValid, Metric, OutputInfo, aggregate, example_stats, make_metric,
                             make_metrics, parse_json, primary_metric, score_answer)
from tunelab.models.base import Completion, Model, Request, match_label
from tunelab.store.models import CacheRow, RunExampleRow, RunRow, utcnow

if TYPE_CHECKING:
    from tunelab.datasets import Example
    from tunelab.workspace import Workspace

DEFAULT_BATCH = 128  # examples per model call and per stored batch
SCHEMA = "tunelab.run/1"


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def sha256(data: Any) -> str:
    return hashlib.sha256(canonical_json(data).encode("utf-8")).hexdigest()


# -- candidates ----------------------------------------------------------------------------------

class Candidate(ABC):
    """Something that answers examples: the unit every comparison is made of."""

    name: str
    kind: str = "prompt"  # prompt | ft | hybrid
    model_name: str = ""
    backend: str = ""
    output: Any = None  # OutputSpec-like: .type, .labels, .schema
    temperature: float = 0.0

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 of everything that changes the answers (prompt version, model, demos, ...)."""

    @abstractmethod
    def predict(self, examples: list["Example"], repeat_index: int = 0) -> list[Completion]:
        """One completion per example; `repeat_index` is also the sampling seed."""

    def with_cache(self, cache: "ResponseCache") -> "Candidate":
        """This candidate answering through the response cache (default: no caching)."""
        return self

    def with_free_answers(self, pick: Callable[["Example"], bool]) -> "Candidate":
        """This candidate asking for the free answer of label outputs only for the examples
        `pick` selects (default: the candidate does as it always does)."""
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "model": self.model_name, "backend": self.backend,
                "temperature": self.temperature, "fingerprint": self.fingerprint,
                "output": OutputInfo.of(self.output).to_dict()}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} on {self.model_name}>"


class PromptCandidate(Candidate):
    """A prompt (one version) on a model, with its few-shot demos.

    `free_text` (label outputs): also ask the model for its unconstrained answer, to measure how
    often it would not have been a valid label (costs a short generation per example)."""

    def __init__(self, prompt, model: Model, demos: list["Example"] | None = None, *,
                 name: str | None = None, kind: str = "prompt", model_name: str | None = None,
                 free_text: bool = True, workspace: "Workspace | None" = None):
        self.prompt = prompt
        self.model = model
        from tunelab.prompts import DemoSelector

        demos = prompt.resolve_demos(workspace) if demos is None else demos
        self.demos = demos if isinstance(demos, DemoSelector) else list(demos)  # a selector picks per input
        self.name = name or f"{prompt.name}@{prompt.version}"
        self.kind = kind
        self.model_name = model_name or getattr(model, "name", "model")
        self.backend = getattr(model, "backend", "")
        self.output = prompt.output
        self.temperature = float(prompt.temperature)
        self.free_text = bool(free_text) and OutputInfo.of(self.output).type == "label"

    @property
    def fingerprint(self) -> str:
        return sha256({"kind": self.kind, "prompt": self.prompt.name, "version": self.prompt.version,
                       "model": self.model.fingerprint, "demos": self._demos_fingerprint(),
                       "free_text": self.free_text})

    def _demos_fingerprint(self) -> Any:
        from tunelab.prompts import DemoSelector

        if isinstance(self.demos, DemoSelector):
            return self.demos.to_dict()
        return [d.to_dict() for d in self.demos]

    def requests(self, examples: list["Example"], repeat_index: int = 0) -> list[Request]:
        extra = {"free_text": True} if self.free_text else {}
        return [self.prompt.request(ex, self.demos, seed=repeat_index, **extra) for ex in examples]

    def predict(self, examples: list["Example"], repeat_index: int = 0) -> list[Completion]:
        reqs = self.requests(examples, repeat_index)
        pick = self.__dict__.get("_free_pick")
        if pick is not None:  # free answers on a sample of the examples only
            reqs = [req if not req.free_text or pick(ex) else replace(req, free_text=False)
                    for ex, req in zip(examples, reqs)]
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

    def with_cache(self, cache: "ResponseCache") -> "PromptCandidate":
        if isinstance(self.model, CachedModel):
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.model = CachedModel(self.model, cache)
        return clone

    def with_free_answers(self, pick: Callable[["Example"], bool]) -> "PromptCandidate":
        if not self.free_text:
            return self
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._free_pick = pick
        return clone


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


def resolve_candidate(ws: "Workspace", spec: str, model: str | Model | None = None, *,
                      free_text: bool = True) -> Candidate:
    """`PROMPT[@VERSION|@LABEL]` (on `model`, else the prompt's model, else the workspace default),
    `ft:NAME` (the fine-tune's training prompt on its model) or `hybrid:NAME` (a router)."""
    from tunelab.models import load_model

    spec = (spec or "").strip()
    if not spec:
        raise UserError("no candidate given (PROMPT[@VERSION], ft:NAME or hybrid:NAME)")
    if spec.startswith("ft:"):
        if model is not None:
            raise UserError(f"'{spec}' is a model of its own; --model applies to prompt candidates")
        return _finetune_candidate(ws, spec[3:], free_text=free_text)
    if spec.startswith("hybrid:"):
        if model is not None:
            raise UserError(f"'{spec}' picks its own models; --model applies to prompt candidates")
        try:
            from tunelab.router import load_router
        except ImportError:
            raise NotFound(f"unknown hybrid '{spec[7:]}': this tunelab has no router module") from None
        return load_router(ws, spec[7:])
    from tunelab.prompts import load_prompt

    prompt = load_prompt(ws, spec)
    if isinstance(model, Model):
        m = model
    else:
        m = load_model(model or prompt.model, ws)
    return PromptCandidate(prompt, m, workspace=ws, model_name=m.name if isinstance(model, Model)
                           else (model or prompt.model), free_text=free_text)


def _finetune_candidate(ws: "Workspace", name: str, *, free_text: bool = True) -> PromptCandidate:
    from tunelab.models import load_model
    from tunelab.prompts import load_prompt
    from tunelab.store.models import FineTuneRow

    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))
        known = sorted(s.scalars(select(FineTuneRow.name)))
    if row is None:
        raise NotFound(f"unknown fine-tune '{name}' (fine-tunes: {', '.join(known) or 'none'})")
    prompt = load_prompt(ws, f"{row.prompt}@{row.prompt_version}")
    model = load_model(f"ft:{name}", ws)
    return PromptCandidate(prompt, model, workspace=ws, name=f"ft:{name}", kind="ft", model_name=f"ft:{name}",
                           free_text=free_text)


# -- the response cache --------------------------------------------------------------------------

class ResponseCache:
    """Completions in the store's `cache` table, keyed by the sha256 of the request."""

    def __init__(self, ws: "Workspace"):
        self.ws = ws
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(model: Model, request: Request) -> str:
        return sha256({"model": model.fingerprint, "messages": request.messages, "params": request.cache_params()})

    def get_many(self, keys: list[str]) -> dict[str, Completion]:
        found: dict[str, Completion] = {}
        unique = list(dict.fromkeys(keys))
        with self.ws.store.session() as s:
            for start in range(0, len(unique), 500):
                for row in s.scalars(select(CacheRow).where(CacheRow.key.in_(unique[start:start + 500]))):
                    try:
                        found[row.key] = Completion.from_dict(row.value)
                    except TypeError:
                        continue  # an entry from an older Completion layout: recompute it
        return found

    def put_many(self, items: dict[str, Completion]) -> None:
        if not items:
            return
        values = [{"key": k, "value": c.to_dict(), "created_at": utcnow()} for k, c in items.items()]
        with self.ws.store.session() as s:
            s.execute(_insert_ignore(s, CacheRow), values)


FREE_ANSWER_META = ("free_text_tokens", "free_text_from_scoring", "decode_batch_size")


class CachedModel(Model):
    """A model answering through a ResponseCache; misses go to the wrapped model in one batch."""

    def __init__(self, model: Model, cache: ResponseCache):
        self.inner = model
        self.cache = cache
        self.name = model.name
        self.backend = model.backend  # type: ignore[misc]

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    @property
    def context_length(self) -> int | None:
        return self.inner.context_length

    def complete(self, requests: list[Request]) -> list[Completion]:
        keys = [ResponseCache.key(self.inner, r) for r in requests]
        # A label request without a free answer can take the entry of the same request with one
        # (same scores; the free answer is dropped): a run on a free-answer sample reuses a run on all.
        fuller = {i: ResponseCache.key(self.inner, replace(r, free_text=True))
                  for i, r in enumerate(requests) if r.labels and not r.free_text}
        found = self.cache.get_many(keys + list(fuller.values()))
        out: list[Completion | None] = [None] * len(requests)
        for i, k in enumerate(keys):
            hit = found.get(k) or found.get(fuller.get(i, ""))
            if hit is None:
                continue
            comp = Completion.from_dict(hit.to_dict())
            if k not in found:
                comp.free_text = None
                comp.meta = {m: v for m, v in comp.meta.items() if m not in FREE_ANSWER_META}
            comp.meta = {**comp.meta, "cached": True}
            out[i] = comp
        missing = [i for i, c in enumerate(out) if c is None]
        self.cache.hits += len(requests) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            fresh = self.inner.complete([requests[i] for i in missing])
            new: dict[str, Completion] = {}
            for i, comp in zip(missing, fresh):
                out[i] = comp
                new[keys[i]] = comp
            self.cache.put_many(new)
        return [c for c in out if c is not None]

    def close(self) -> None:
        self.inner.close()


def _insert_ignore(session, table):
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()


# -- results -------------------------------------------------------------------------------------

@dataclass
class RunResult:
    """A run's summary. Every number a comparison needs, as plain data (`to_dict()`).

    metrics:      {name: {value, lo, hi, n, method, details?}} (95% interval; details: per-label
                  precision/recall/F1 + confusion for macro_f1, per-field for field_f1)
    consistency:  {repeat, temperature, agreement, pairwise_agreement, pass_k, format_valid, note}
                  (each an interval dict or None; agreement/pass_k need repeat > 1)
    tokens:       {prompt, completion, total} mean per request
    latency:      {p50, p95, mean} seconds per request (a batch's wall time shared by its requests)
    throughput:   {examples_per_s (wall clock of the run), wall_s, model_s (sum of latencies)}
    cost:         {per_request, per_1000, total, pricing}
    """

    id: str
    candidate: str
    kind: str
    model: str
    dataset: str
    dataset_version: str
    split: str
    n_examples: int
    repeat: int
    status: str
    primary_metric: str
    metrics: dict[str, dict]
    consistency: dict[str, Any]
    tokens: dict[str, float]
    latency: dict[str, float]
    throughput: dict[str, float]
    cost: dict[str, Any]
    rows: int = 0
    cached_rows: int = 0
    created_at: str = ""
    reused: bool = False  # a finished run returned as is
    resumed: bool = False  # an unfinished run continued
    schema: str = SCHEMA

    def value(self, metric: str) -> float | None:
        if metric not in self.metrics:
            raise NotFound(f"run {self.id} has no metric '{metric}' (metrics: {', '.join(self.metrics)})")
        return self.metrics[metric]["value"]

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def _clean(data: Any) -> Any:
    """NaN -> None, numpy scalars -> Python numbers (JSON-safe)."""
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    if isinstance(data, (np.floating, float)):
        v = float(data)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(data, np.integer):
        return int(data)
    return data


# -- the run loop --------------------------------------------------------------------------------

def run_key(candidate: Candidate, dataset: str, version: str, split: str, limit: int | None, repeat: int,
            metrics: list[str], free_answers: int | None = None) -> str:
    data = {"candidate": candidate.fingerprint, "dataset": dataset, "version": version, "split": split,
            "limit": limit, "repeat": repeat, "metrics": sorted(metrics)}
    if free_answers is not None:  # free answers on a sample of the examples only
        data["free_answers"] = free_answers
    return sha256(data)


FREE_ANSWERS_MIN = 100  # default sample: at least this many examples ...
FREE_ANSWERS_SHARE = 0.2  # ... or this share of them, whichever is more


def free_answer_count(spec: int | str | None, n: int, repeat: int = 1) -> int:
    """How many of `n` examples get the free answer of a label output (the format-validity rate).

    `spec`: None or "auto" (the default: every example when repeating, else at least
    FREE_ANSWERS_MIN examples or FREE_ANSWERS_SHARE of them, whichever is more), "all", a count
    N ("100") or a share ("20%"). Which examples: `free_answer_sample`."""
    text = str(spec).strip().lower() if spec is not None else "auto"
    if text == "auto":
        if repeat > 1:
            return n
        return min(n, max(FREE_ANSWERS_MIN, math.ceil(FREE_ANSWERS_SHARE * n)))
    if text == "all":
        return n
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return min(n, math.ceil(share / 100 * n))
        count = int(text)
        if count < 0:
            raise ValueError
        return min(n, count)
    except ValueError:
        raise UserError(f"--free-answers: expected all, auto, a count (100) or a share (20%), got '{spec}'",
                        field="free_answers") from None


def free_answer_key(example: "Example") -> str:
    """What the free-answer sample is drawn by: the sha256 of the example's input."""
    return hashlib.sha256(example.input.encode("utf-8")).hexdigest()


def free_answer_sample(examples: list["Example"], k: int) -> set[str]:
    """The `free_answer_key`s of the k examples with the smallest keys: a sample that depends on
    the examples' content only (not on their order), so two runs on one split measure the same rows."""
    keys = sorted((free_answer_key(ex), i) for i, ex in enumerate(examples))
    return {key for key, _ in keys[:k]}


def request_cost(pricing, completion: Completion) -> float:
    """$ for one request: tokens x API prices, plus local $/hour x the request's measured seconds."""
    if "cost" in (completion.meta or {}):
        return float(completion.meta["cost"])
    return (completion.prompt_tokens * pricing.input_per_million / 1e6
            + completion.completion_tokens * pricing.output_per_million / 1e6
            + pricing.per_hour * max(0.0, completion.latency_s) / 3600.0)


def evaluate(ws: "Workspace", candidate: Candidate | str, data: str, *, limit: int | None = None, repeat: int = 1,
             metrics: list[str] | None = None, batch_size: int | None = None, use_cache: bool = True,
             rerun: bool = False, progress: bool | Any = True, model: str | None = None,
             on_batch: Callable[[int, int], None] | None = None,
             free_answers: int | str | None = None) -> RunResult:
    """Evaluate `candidate` on `data` ("DATASET[@VERSION][:SPLIT]", default split test).

    Returns the finished run's summary. `progress`: True for a bar on stderr, False for none, or a
    rich Console to draw it on. `on_batch(done, total)` is called after each stored batch.
    `free_answers` (label outputs of a candidate asking for free answers): on how many examples
    the free answer is generated, see `free_answer_count` (default: at least 100 examples or 20%,
    every example with `repeat` > 1). Rows without one are marked `free_text_skipped` and do not
    count in format_valid / free_accuracy.
    """
    from tunelab.datasets import get_split

    if isinstance(candidate, str):
        candidate = resolve_candidate(ws, candidate, model)
    if repeat < 1:
        raise UserError(f"--repeat must be at least 1 (got {repeat})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    ds, split, examples = get_split(ws, data)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"split '{split}' of dataset '{ds.name}' has no examples")
    output = OutputInfo.of(candidate.output)
    if output.type == "label" and not output.labels:
        output.labels = ds.labels
    metric_objs = make_metrics(metrics, output)
    names = [m.name for m in metric_objs]
    n_free = free_answer_count(free_answers, len(examples), repeat)
    sampler = candidate
    if n_free < len(examples):
        chosen = free_answer_sample(examples, n_free)
        sampler = candidate.with_free_answers(lambda ex: free_answer_key(ex) in chosen)
    sampling = sampler is not candidate
    key = run_key(candidate, ds.name, ds.version, split, len(examples), repeat, names,
                  n_free if sampling else None)

    run_id, resumed = None, False
    with ws.store.session() as s:
        existing = s.scalars(select(RunRow).where(RunRow.key == key)
                             .order_by(RunRow.created_at.desc(), RunRow.id.desc())).first()
        if existing is not None and not rerun:
            if existing.status == "done" and existing.summary:
                result = RunResult.from_dict(existing.summary)
                result.reused = True
                return result
            run_id, resumed = existing.id, True
            existing.status = "running"
            existing.error = None
        else:
            run_id = new_run_id()
            s.add(RunRow(id=run_id, key=key, candidate=candidate.name, kind=candidate.kind,
                         model=candidate.model_name, dataset=ds.name, dataset_version=ds.version, split=split,
                         n_examples=len(examples), repeat=repeat, status="running",
                         params={"metrics": names, "output": output.to_dict(), "limit": limit,
                                 "data": data, "temperature": candidate.temperature, "cache": use_cache,
                                 "candidate": candidate.describe(),
                                 **({"free_answers": n_free} if sampling else {})}))
        done = set(s.execute(select(RunExampleRow.example_index, RunExampleRow.repeat_index)
                             .where(RunExampleRow.run_id == run_id)).all())

    worker = sampler.with_cache(ResponseCache(ws)) if use_cache else sampler
    pricing = ws.pricing_for(candidate.model_name, candidate.backend)
    format_metric = FormatValid(output)
    size = batch_size or DEFAULT_BATCH
    # Within a repeat, similar lengths together: less padding in the model's batches. With free
    # answers on a sample, the sampled examples come first, so that they decode in wide batches
    # (a decoding step costs about as much for 10 rows as for 60).
    free_first = (lambda i: free_answer_key(examples[i]) not in chosen) if sampling else (lambda i: False)
    order = sorted(range(len(examples)), key=lambda i: (free_first(i), len(examples[i].input), i))
    batches: list[tuple[int, list[int]]] = []
    for r in range(repeat):
        todo = [i for i in order if (i, r) not in done]
        batches += [(r, todo[k:k + size]) for k in range(0, len(todo), size)]
    total = len(examples) * repeat

    bar = _Progress(progress, total, len(done), f"{candidate.name} on {ds.name}:{split}")
    try:
        with bar:
            for r, batch in batches:
                start = time.perf_counter()
                exs = [examples[i] for i in batch]
                comps = worker.predict(exs, r)
                rows = []
                for i, ex, comp in zip(batch, exs, comps):
                    rows.append(_row(run_id, i, r, ex, comp, metric_objs, format_metric, pricing, sampling))
                elapsed = time.perf_counter() - start
                with ws.store.session() as s:
                    s.execute(_insert_ignore(s, RunExampleRow), rows)
                    run = s.get(RunRow, run_id)
                    run.wall_s = (run.wall_s or 0.0) + elapsed
                bar.advance(len(batch))
                if on_batch is not None:
                    on_batch(bar.completed, total)
    except BaseException as exc:
        with ws.store.session() as s:
            run = s.get(RunRow, run_id)
            run.status = "failed"
            run.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise

    result = summarize_run(ws, run_id, metric_objs)
    result.resumed = resumed
    with ws.store.session() as s:
        run = s.get(RunRow, run_id)
        run.status = "done"
        run.finished_at = utcnow()
        result.status = "done"
        run.summary = result.to_dict()
    return result


def _row(run_id: str, index: int, repeat_index: int, ex: "Example", comp: Completion, metrics: list[Metric],
         format_metric: FormatValid, pricing, sampling: bool = False) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if comp.label_logprobs:
        extra["label_logprobs"] = comp.label_logprobs
        extra["margin"] = comp.label_margin
    if comp.free_text is not None:
        extra["free_text"] = comp.free_text
        labels = list(comp.label_logprobs or format_metric.output.labels or [])
        extra["free_valid"] = match_label(comp.free_text, labels) is not None if labels else None
    elif sampling and format_metric.output.type == "label":
        extra["free_text_skipped"] = True  # not in the free-answer sample: no format validity
    meta = dict(comp.meta or {})
    meta.pop("label_logprobs_raw", None)
    if meta.pop("cached", False):
        extra["cached"] = True
    if meta:
        extra["meta"] = _clean(meta)
    answer = Answer(expected=ex.output, prediction=comp.text, example=ex, extra=extra)
    valid = format_metric.score(answer)
    extra["format_valid"] = None if valid is None else bool(valid)
    return {
        "run_id": run_id, "example_index": index, "repeat_index": repeat_index,
        "input": ex.input, "expected": ex.output, "prediction": comp.text,
        "scores": score_answer(metrics, answer),
        "prompt_tokens": int(comp.prompt_tokens or 0), "completion_tokens": int(comp.completion_tokens or 0),
        "latency_s": float(comp.latency_s or 0.0), "cost": request_cost(pricing, comp),
        "extra": _clean(extra), "created_at": utcnow(),
    }


class _Progress:
    """A rich progress bar with ETA on stderr (or nothing)."""

    def __init__(self, progress: bool | Any, total: int, completed: int, description: str):
        self.completed = completed
        self._bar = None
        if progress is False or progress is None:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = progress if isinstance(progress, Console) else Console(stderr=True)
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), console=console, transient=False)
        self._task = self._bar.add_task(description, total=total, completed=completed, rate="")
        self._start = time.perf_counter()
        self._start_done = completed

    def __enter__(self):
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, n: int) -> None:
        self.completed += n
        if self._bar is not None:
            rate = (self.completed - self._start_done) / max(1e-9, time.perf_counter() - self._start)
            self._bar.update(self._task, advance=n, rate=f"{rate:.1f} ex/s")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


# -- summaries -----------------------------------------------------------------------------------

def run_row(ws: "Workspace", run: str) -> RunRow:
    """The run `run`: an id, a unique prefix of one, or `last`."""
    with ws.store.session() as s:
        if run in ("last", "latest"):
            row = s.scalars(select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc())).first()
            if row is None:
                raise NotFound("no runs yet (tunelab eval CANDIDATE --data DATASET:SPLIT)")
            return row
        rows = list(s.scalars(select(RunRow).where(RunRow.id.startswith(run)).limit(3))) if run else []
    if not rows:
        raise NotFound(f"unknown run '{run}' (tunelab eval list shows the runs)")
    if len(rows) > 1:
        raise UserError(f"run '{run}' is ambiguous ({', '.join(r.id for r in rows)}, ...): give more of the id")
    return rows[0]


def run_rows(ws: "Workspace", run: str) -> list[RunExampleRow]:
    """The stored rows of a run, by example then repeat."""
    run_id = run_row(ws, run).id
    with ws.store.session() as s:
        return list(s.scalars(select(RunExampleRow).where(RunExampleRow.run_id == run_id)
                              .order_by(RunExampleRow.example_index, RunExampleRow.repeat_index)))


def list_runs(ws: "Workspace", limit: int | None = None) -> list[RunRow]:
    with ws.store.session() as s:
        q = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc())
        if limit:
            q = q.limit(limit)
        return list(s.scalars(q))


def load_run(ws: "Workspace", run: str) -> RunResult:
    """A run's summary: the stored one for a finished run, computed from its rows otherwise."""
    row = run_row(ws, run)
    if row.status == "done" and row.summary:
        return RunResult.from_dict(row.summary)
    return summarize_run(ws, row.id)


def _answers(rows: list[RunExampleRow]) -> tuple[list[Answer], list[int]]:
    return ([Answer(expected=r.expected, prediction=r.prediction, extra=r.extra or {}, scores=r.scores or {})
             for r in rows], [r.example_index for r in rows])


def stored_metrics(run: RunRow) -> list[Metric]:
    """The metric objects of a stored run (custom metrics come back from their stored scores)."""
    output = OutputInfo.of((run.params or {}).get("output"))
    out = []
    for name in (run.params or {}).get("metrics", []):
        out.append(make_metric(name, output) if ":" not in name or name.startswith("regex:")
                   else _StoredScore(name))
    return out


class _StoredScore(Metric):
    """A custom metric read back from its stored per-example scores."""

    percent = False

    def __init__(self, name: str):
        self.name = name

    def score(self, answer: Answer) -> float | None:
        return answer.scores.get(self.name)


def summarize_run(ws: "Workspace", run_id: str, metric_objs: list[Metric] | None = None) -> RunResult:
    """Aggregate a run's stored rows into its summary."""
    row = run_row(ws, run_id)
    rows = run_rows(ws, row.id)
    metric_objs = metric_objs or stored_metrics(row)
    output = OutputInfo.of((row.params or {}).get("output"))
    primary = primary_metric(output)
    answers, groups = _answers(rows)
    values = aggregate(metric_objs, answers, groups) if rows else {}
    n_rows = len(rows)

    def mean(attr):
        return float(np.mean([getattr(r, attr) for r in rows])) if rows else None

    latencies = np.array([r.latency_s for r in rows], float)
    costs = np.array([r.cost for r in rows], float)
    wall = float(row.wall_s or 0.0)
    pricing = ws.pricing_for(row.model, ((row.params or {}).get("candidate") or {}).get("backend", ""))
    result = RunResult(
        id=row.id, candidate=row.candidate, kind=row.kind, model=row.model, dataset=row.dataset,
        dataset_version=row.dataset_version, split=row.split, n_examples=row.n_examples, repeat=row.repeat,
        status=row.status, primary_metric=primary,
        metrics={k: v.to_dict() for k, v in values.items()},
        consistency=consistency(rows, primary, row.repeat, float((row.params or {}).get("temperature") or 0.0),
                                output.type),
        tokens={"prompt": mean("prompt_tokens"), "completion": mean("completion_tokens"),
                "total": (mean("prompt_tokens") or 0) + (mean("completion_tokens") or 0) if rows else None},
        latency={"p50": float(np.percentile(latencies, 50)) if n_rows else None,
                 "p95": float(np.percentile(latencies, 95)) if n_rows else None,
                 "mean": float(latencies.mean()) if n_rows else None},
        throughput={"examples_per_s": n_rows / wall if wall > 0 else None, "wall_s": wall,
                    "model_s": float(latencies.sum())},
        cost={"per_request": float(costs.mean()) if n_rows else None,
              "per_1000": float(costs.mean() * 1000) if n_rows else None, "total": float(costs.sum()),
              "pricing": pricing.model_dump()},
        rows=n_rows, cached_rows=sum(1 for r in rows if (r.extra or {}).get("cached")),
        created_at=row.created_at.isoformat(timespec="seconds") if row.created_at else "",
    )
    return RunResult.from_dict(result.to_dict())


def _answer_key(prediction: str, output_type: str) -> str:
    if output_type == "json":
        ok, value = parse_json(prediction)
        if ok:
            return canonical_json(value)
    return prediction.strip()


def consistency(rows: list[RunExampleRow], primary: str, repeat: int, temperature: float,
                output_type: str | None = None) -> dict[str, Any]:
    """Agreement over repeats (all K answers identical; mean pairwise agreement), pass^k (all K
    correct), and the format-validity rate, each with a 95% interval over examples."""
    by_example: dict[int, list[RunExampleRow]] = defaultdict(list)
    for r in rows:
        by_example[r.example_index].append(r)
    # rows outside the free-answer sample (format_valid None) do not count
    measured = [r for r in rows if (r.extra or {}).get("format_valid", True) is not None]
    fmt = np.array([float(bool((r.extra or {}).get("format_valid", True))) for r in measured])
    fmt_groups = [r.example_index for r in measured]
    out: dict[str, Any] = {"repeat": repeat, "temperature": temperature, "agreement": None,
                           "pairwise_agreement": None, "pass_k": None, "format_valid": None, "note": None}
    if measured:
        out["format_valid"] = _interval_of(fmt, fmt_groups)
        out["format_valid"]["rows"] = len(measured)  # rows measured (n: examples), of
        out["format_valid"]["of"] = len(rows)  # all the run's rows
    complete = [rs for rs in by_example.values() if len(rs) >= 2]
    if repeat < 2 or not complete:
        return _clean(out)
    otype = output_type or "text"
    agree, pairwise, passk = [], [], []
    for rs in complete:
        keys = [_answer_key(r.prediction, otype) for r in rs]
        agree.append(float(len(set(keys)) == 1))
        counts = Counter(keys)
        k = len(keys)
        pairwise.append(sum(c * (c - 1) for c in counts.values()) / (k * (k - 1)))
        passk.append(float(all((r.scores or {}).get(primary, 0.0) >= 1.0 for r in rs)))
    out["agreement"] = _interval_of(np.array(agree))
    out["pairwise_agreement"] = _interval_of(np.array(pairwise))
    out["pass_k"] = _interval_of(np.array(passk))
    if temperature == 0:
        out["note"] = ("temperature 0: repeats are deterministic, so agreement is trivially high; "
                       "set a temperature in the prompt to measure consistency at deployment settings")
    return _clean(out)


def _interval_of(values: np.ndarray, groups: list[int] | None = None) -> dict[str, Any]:
    """{value, lo, hi, n}: Wilson for one 0/1 value per example, else a bootstrap over examples."""
    if groups is not None and len(set(groups)) != len(groups):
        g = np.asarray(groups)
        keys, inv = np.unique(g, return_inverse=True)
        values = np.bincount(inv, weights=values) / np.bincount(inv)
    n = int(values.size)
    if n == 0:
        return {"value": None, "lo": None, "hi": None, "n": 0}
    v = float(values.mean())
    if np.all(np.isin(values, (0.0, 1.0))):
        lo, hi = st.wilson(float(values.sum()), n)
    else:
        lo, hi = st.bootstrap(values, lambda s, m: s[..., 0] / m)
    return {"value": v, "lo": lo, "hi": hi, "n": n}


# -- failures, export, diff ---------------------------------------------------------------------

def failure_groups(ws: "Workspace", run: str, metric: str | None = None) -> list[dict[str, Any]]:
    """The wrong answers (primary metric < 1) grouped by confusion, most common first:
    label: "expected -> predicted"; json: "invalid JSON" or the fields missing/extra/wrong;
    text: "expected 'X'"."""
    row = run_row(ws, run)
    output = OutputInfo.of((row.params or {}).get("output"))
    metric = metric or primary_metric(output)
    groups: dict[str, list[RunExampleRow]] = defaultdict(list)
    for r in run_rows(ws, row.id):
        score = (r.scores or {}).get(metric)
        if score is None or score >= 1.0:
            continue
        groups[_failure_key(r, output.type)].append(r)
    return [{"key": k, "count": len(v), "rows": v}
            for k, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]


def _failure_key(r: RunExampleRow, output_type: str) -> str:
    if output_type == "label":
        return f"{r.expected.strip()} -> {r.prediction.strip() or '(empty)'}"
    if output_type == "json":
        ok_p, pred = parse_json(r.prediction)
        if not ok_p:
            return "invalid JSON"
        ok_e, exp = parse_json(r.expected)
        exp = exp if ok_e and isinstance(exp, dict) else {}
        if not isinstance(pred, dict):
            return "not a JSON object"
        parts = []
        missing = sorted(set(exp) - set(pred))
        extra = sorted(set(pred) - set(exp))
        wrong = sorted(k for k in set(exp) & set(pred) if canonical_json(exp[k]) != canonical_json(pred[k]))
        if missing:
            parts.append("missing " + ", ".join(missing))
        if extra:
            parts.append("extra " + ", ".join(extra))
        if wrong:
            parts.append("wrong " + ", ".join(wrong))
        return "; ".join(parts) or "different"
    return f"expected {r.expected.strip()[:60]!r}"


EXPORT_FIELDS = ["example_index", "repeat_index", "input", "expected", "prediction", "prompt_tokens",
                 "completion_tokens", "latency_s", "cost"]


def export_run(ws: "Workspace", run: str, path: str | Path) -> Path:
    """Write a run's rows to a .csv or .jsonl file (atomically)."""
    path = Path(path)
    fmt = path.suffix.lower()
    if fmt not in (".csv", ".jsonl"):
        raise UserError("export needs a .csv or .jsonl file name", path=path)
    row = run_row(ws, run)
    rows = run_rows(ws, row.id)
    names = list((row.params or {}).get("metrics", []))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="") as f:
        if fmt == ".jsonl":
            for r in rows:
                data = {k: getattr(r, k) for k in EXPORT_FIELDS}
                data.update(run_id=r.run_id, scores=r.scores, extra=r.extra)
                f.write(json.dumps(data, ensure_ascii=False) + "\n")
        else:
            writer = csv.writer(f)
            writer.writerow(EXPORT_FIELDS + [f"score:{n}" for n in names] + ["free_text", "format_valid"])
            for r in rows:
                scores = r.scores or {}
                extra = r.extra or {}
                writer.writerow([getattr(r, k) for k in EXPORT_FIELDS]
                                + [scores.get(n, "") for n in names]
                                + [extra.get("free_text", ""), extra.get("format_valid", "")])
    tmp.replace(path)
    return path


@dataclass
class DiffResult:
    """Paired tests of run B against run A on the examples both answered."""

    a: str
    b: str
    n: int
    results: list[st.PairedResult] = field(default_factory=list)
    verdicts: list[str] = field(default_factory=list)
    primary_metric: str = ""

    def to_dict(self) -> dict[str, Any]:
        return _clean({"a": self.a, "b": self.b, "n": self.n, "primary_metric": self.primary_metric,
                       "results": [r.to_dict() for r in self.results], "verdicts": self.verdicts})


def diff_runs(ws: "Workspace", run_a: str, run_b: str, metrics: list[str] | None = None) -> DiffResult:
    """Paired tests B - A per metric: McNemar's exact test for 0/1 metrics of single-repeat runs,
    a paired bootstrap for everything else; each with a plain-words verdict."""
    ra, rb = run_row(ws, run_a), run_row(ws, run_b)
    if (ra.dataset, ra.dataset_version, ra.split) != (rb.dataset, rb.dataset_version, rb.split):
        raise UserError(f"runs {ra.id} and {rb.id} are on different data "
                        f"({ra.dataset}@{ra.dataset_version}:{ra.split} vs "
                        f"{rb.dataset}@{rb.dataset_version}:{rb.split}); a paired test needs the same examples")
    rows_a, rows_b = run_rows(ws, ra.id), run_rows(ws, rb.id)
    common = sorted({r.example_index for r in rows_a} & {r.example_index for r in rows_b})
    keep = set(common)
    rows_a = [r for r in rows_a if r.example_index in keep]
    rows_b = [r for r in rows_b if r.example_index in keep]
    ans_a, g_a = _answers(rows_a)
    ans_b, g_b = _answers(rows_b)
    ma = {m.name: m for m in stored_metrics(ra)}
    mb = {m.name for m in stored_metrics(rb)}
    names = [n for n in (metrics or list(ma)) if n in ma and n in mb]
    if metrics:
        missing = [n for n in metrics if n not in ma or n not in mb]
        if missing:
            raise NotFound(f"metric '{missing[0]}' is not in both runs (common: {', '.join(names) or 'none'})")
    primary = primary_metric(OutputInfo.of((ra.params or {}).get("output")))
    a_name, b_name = f"A ({ra.candidate})", f"B ({rb.candidate})"
    out = DiffResult(a=ra.id, b=rb.id, n=len(common), primary_metric=primary)
    single = ra.repeat == 1 and rb.repeat == 1
    for name in names:
        m = ma[name]
        sa, sb = m.paired_stats(ans_a, ans_b)
        sa = _group_mean(sa, g_a)
        sb = _group_mean(sb, g_b)
        binary = (m.binary and single and sa.shape[1] == 2 and np.all(sa[:, 1] == 1) and np.all(sb[:, 1] == 1)
                  and np.all(np.isin(sa[:, 0], (0, 1))) and np.all(np.isin(sb[:, 0], (0, 1))))
        if binary:
            res = st.paired_proportion(sa[:, 0], sb[:, 0], metric=name)
        else:
            res = st.paired_bootstrap(sa, sb, m.value, metric=name, higher_is_better=m.higher_is_better)
        out.results.append(res)
        out.verdicts.append(st.verdict(res, a_name=a_name, b_name=b_name, percent=m.percent))
    return out


def _group_mean(stats: np.ndarray, groups: list[int]) -> np.ndarray:
    from tunelab.metrics import _group_rows

    return _group_rows(stats, groups)
