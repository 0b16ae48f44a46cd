"""The one evaluator: a candidate on one split, with the same metrics, tokens, latency and cost
for every kind of candidate.

    result = evaluate(ws, resolve_candidate(ws, "spam@production"), "sms:test", limit=200, repeat=3)
    result.id, result.metrics["accuracy"]["value"], result.metrics["accuracy"]["lo"]
    result.cost["per_1000"], result.latency["p95"], result.consistency["agreement"]

`evaluate()` keys a run by sha256 of (candidate fingerprint, dataset version, split, limit,
repeat, metrics). A finished run with the same key is returned as is (`rerun=True` makes a new
one); an unfinished one (killed, failed, interrupted) is resumed: the rows already stored are
skipped. Rows are inserted per batch, each batch in its own transaction, so a SIGKILL loses at most
the batch in flight; the (run, example, repeat) unique constraint means never a duplicate row.

Row: input, expected, prediction, scores {metric: value}, prompt/completion tokens, latency,
cost, extra {label_logprobs, margin, free_text, free_valid, format_valid, free_text_skipped, cached,
route, ...}. A candidate answers through the response cache (`tunelab.evaluate.cache`); a hybrid
puts the route it took in `Completion.meta` (stored in the row's extra["meta"]) and, since it mixes
models, the request's price in `Completion.meta["cost"]`.

Free answers (label outputs): the model's unconstrained answer, for the format-validity rate, costs
a short generation, so by default it is asked for on a seeded sample of the examples only: at least
100 or 20% of them, whichever is more (the examples with the smallest sha256 of their input, so
two runs on one split measure the same rows), every example with `repeat` > 1, and as many as
`evaluate(free_answers="all" | N | "P%")` says. Rows outside the sample have
`extra["free_text_skipped"]` and `format_valid` None, and do not count in format_valid or
free_accuracy; `consistency["format_valid"]` says over how many rows it was measured (`rows` of
`of`; `n` examples, the interval's n).
"""

from __future__ import annotations

import hashlib
import math
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from sqlalchemy import select

from tunelab.canonical import plain, sha256
from tunelab.datasets import Example, get_split
from tunelab.errors import UserError
from tunelab.evaluate.cache import ResponseCache
from tunelab.evaluate.candidates import Candidate, request_cost
from tunelab.evaluate.runs import RunResult, summarize_run
from tunelab.metrics import Answer, FormatValid, Metric, make_metrics, score_answers
from tunelab.models.base import Completion, match_label
from tunelab.store import insert_ignore
from tunelab.store.models import RunExampleRow, RunRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

# Examples per model call and per stored batch. Wider calls give the local engine wider passes and
# shards: the 200-example many-label bench case ran 19.7 s as 128 + 72 and 17.5 s as one call
# (median of 4, alternating, 2 cores); an interrupted run still keeps every finished batch.
DEFAULT_BATCH = 256

def run_key(candidate: Candidate, dataset: str, version: str, split: str, limit: int | None, repeat: int,
            metrics: list[str], free_answers: int | None = None, sample: int | None = None) -> str:
    data = {"candidate": candidate.fingerprint, "dataset": dataset, "version": version, "split": split,
            "limit": limit, "repeat": repeat, "metrics": sorted(metrics)}
    if free_answers is not None:  # free answers on a sample of the examples only
        data["free_answers"] = free_answers
    if sample is not None:  # a sample of the split's examples (`sample_indices`), not its first `limit`
        data["sample"] = sample
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


def free_answer_key(example: Example) -> str:
    """What the free-answer sample is drawn by: the sha256 of the example's input."""
    return hashlib.sha256(example.input.encode("utf-8")).hexdigest()


def sample_indices(examples: list[Example], k: int) -> list[int]:
    """The positions of k of `examples`, chosen by the sha256 of their inputs (as the free-answer
    sample): the same rows for every candidate and every run on one split, whatever its order."""
    keys = sorted((free_answer_key(ex), i) for i, ex in enumerate(examples))
    return sorted(i for _, i in keys[:k])


def free_answer_sample(examples: list[Example], k: int) -> set[str]:
    """The `free_answer_key`s of the k examples with the smallest keys: a sample that depends on
    the examples' content only (not on their order), so two runs on one split measure the same rows."""
    return {free_answer_key(examples[i]) for i in sample_indices(examples, k)}


def evaluate(ws: "Workspace", candidate: Candidate, data: str, *, limit: int | None = None, repeat: int = 1,
             metrics: list[str] | None = None, batch_size: int | None = None, use_cache: bool = True,
             rerun: bool = False, progress: bool | Any = True,
             on_batch: Callable[[int, int], None] | None = None,
             free_answers: int | str | None = None, sample: int | None = None) -> RunResult:
    """Evaluate `candidate` (see `resolve_candidate`) on `data` ("DATASET[@VERSION][:SPLIT]",
    default split test).

    Returns the finished run's summary. `progress`: True for a bar on stderr, False for none, or a
    rich Console to draw it on. `on_batch(done, total)` is called after each stored batch.
    `free_answers` (label outputs of a candidate asking for free answers): on how many examples
    the free answer is generated, see `free_answer_count` (default: at least 100 examples or 20%,
    every example with `repeat` > 1). Rows without one are marked `free_text_skipped` and do not
    count in format_valid / free_accuracy. `sample`: evaluate on `sample_indices` (k examples
    chosen by content; stored under their positions in the split, so runs on one sample pair up)
    instead of all of them (after `limit`).
    """
    if repeat < 1:
        raise UserError(f"--repeat must be at least 1 (got {repeat})")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 (got {limit})")
    if sample is not None and sample < 1:
        raise UserError(f"a sample must hold at least 1 example (got {sample})")
    ds, split, examples = get_split(ws, data)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"split '{split}' of dataset '{ds.name}' has no examples")
    positions = list(range(len(examples)))
    if sample is not None and sample < len(examples):
        positions = sample_indices(examples, sample)
    else:
        sample = None
    measured = [examples[i] for i in positions]
    output = candidate.output
    metric_objs = make_metrics(metrics, output, ws)
    names = [m.name for m in metric_objs]
    n_free = free_answer_count(free_answers, len(measured), repeat)
    sampler = candidate
    if n_free < len(measured):
        chosen = free_answer_sample(measured, n_free)
        sampler = candidate.with_free_answers(lambda ex: free_answer_key(ex) in chosen)
    sampling = sampler is not candidate
    key = run_key(candidate, ds.name, ds.version, split, len(examples), repeat, names,
                  n_free if sampling else None, sample)

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
                         n_examples=len(measured), repeat=repeat, status="running",
                         params={"metrics": names, "output": output.to_dict(), "limit": limit,
                                 **({"sample": sample} if sample is not None else {}),
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
    order = sorted(positions, key=lambda i: (free_first(i), len(examples[i].input), i))
    batches: list[tuple[int, list[int]]] = []
    for r in range(repeat):
        todo = [i for i in order if (i, r) not in done]
        batches += [(r, todo[k:k + size]) for k in range(0, len(todo), size)]
    total = len(measured) * repeat

    bar = _Progress(progress, total, len(done), f"{candidate.name} on {ds.name}:{split}")
    try:
        with bar:
            for r, batch in batches:
                start = time.perf_counter()
                exs = [examples[i] for i in batch]
                comps = worker.predict(exs, r)
                rows = _rows(run_id, batch, r, exs, comps, metric_objs, format_metric, pricing, sampling)
                elapsed = time.perf_counter() - start
                with ws.store.session() as s:
                    s.execute(insert_ignore(s, RunExampleRow), rows)
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


def _rows(run_id: str, indices: list[int], repeat_index: int, examples: list[Example], comps: list[Completion],
          metrics: list[Metric], format_metric: FormatValid, pricing, sampling: bool = False) -> list[dict[str, Any]]:
    """The stored rows of one batch: each answer with its scores (every metric scores the batch
    at once), tokens, latency, cost and what else the model said."""
    answers = []
    for ex, comp in zip(examples, comps):
        extra: dict[str, Any] = {}
        if comp.label_logprobs:
            extra["label_logprobs"] = comp.label_logprobs
            extra["margin"] = comp.label_margin
        if comp.confidence is not None:  # generated answers: the model's confidence in its tokens
            extra["confidence"] = {k: round(v, 6) for k, v in comp.confidence.items()}
        refs = (ex.meta or {}).get("refs")
        if isinstance(refs, list) and refs:  # multi-reference data: a stored row re-scores without the dataset
            extra["refs"] = refs
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
            extra["meta"] = plain(meta)
        answer = Answer(expected=ex.output, prediction=comp.text, example=ex, extra=extra)
        valid = format_metric.score(answer)
        extra["format_valid"] = None if valid is None else bool(valid)
        answers.append(answer)
    return [{
        "run_id": run_id, "example_index": index, "repeat_index": repeat_index,
        "input": ex.input, "expected": ex.output, "prediction": comp.text, "scores": scores,
        "prompt_tokens": int(comp.prompt_tokens or 0), "completion_tokens": int(comp.completion_tokens or 0),
        "latency_s": float(comp.latency_s or 0.0), "cost": request_cost(pricing, comp),
        "extra": plain(answer.extra), "created_at": utcnow(),
    } for index, ex, comp, answer, scores in zip(indices, examples, comps, answers, score_answers(metrics, answers))]


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
