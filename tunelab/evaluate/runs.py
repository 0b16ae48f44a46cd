"""Stored runs: their summaries, rows, failures, exports and paired comparisons (this module and
`tunelab.evaluate.run` own the `runs` and `run_rows` tables).

The summary (`RunResult`, also stored in `runs.summary`): metrics with 95% intervals (Wilson for
0/1 metrics, a seeded bootstrap otherwise; see tunelab.metrics), consistency over repeats
(agreement, pairwise agreement, pass^k, format validity), tokens per request, latency p50/p95,
throughput, cost per 1,000 requests (API $/million tokens, or local $/hour x measured seconds).

    result = load_run(ws, "last")              # or an id, or a unique prefix of one
    rows = run_rows(ws, result.id)             # per example and repeat
    diff = diff_runs(ws, run_a, run_b)         # paired tests, with plain-words verdicts
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from tunelab import stats as st
from tunelab.canonical import canonical_json, plain
from tunelab.errors import NotFound, UserError
from tunelab.files import write_atomic
from tunelab.metrics import (SIMPLE, Answer, Metric, aggregate, example_metric, group_rows, make_metric, parse_json,
                             primary_metric)
from tunelab.prompts import OutputSpec
from tunelab.store.models import RunExampleRow, RunRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SCHEMA = "tunelab.run/1"

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
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})



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
    return ([Answer(expected=r.expected, prediction=r.prediction, extra={**(r.extra or {}), "input": r.input},
                    scores=r.scores or {}) for r in rows], [r.example_index for r in rows])


def stored_metrics(run: RunRow) -> list[Metric]:
    """The metric objects of a stored run (plug-in and custom metrics, a judge's say, come back
    from their stored scores: nothing is asked of a model again)."""
    output = OutputSpec.of((run.params or {}).get("output"))
    return [make_metric(name, output) if name in SIMPLE or name.startswith("regex:") else _StoredScore(name)
            for name in (run.params or {}).get("metrics", [])]


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
    output = OutputSpec.of((row.params or {}).get("output"))
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
        consistency=consistency(rows, example_metric(output), row.repeat, float((row.params or {}).get("temperature") or 0.0),
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
        return plain(out)
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
    return plain(out)


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
    """The wrong answers (per-example primary metric < 1: `example_metric`) grouped by confusion, most common first:
    label: "expected -> predicted"; json: "invalid JSON" or the fields missing/extra/wrong;
    text: "expected 'X'"."""
    row = run_row(ws, run)
    output = OutputSpec.of((row.params or {}).get("output"))
    metric = metric or example_metric(output)
    groups: dict[str, list[RunExampleRow]] = defaultdict(list)
    for r in run_rows(ws, row.id):
        score = (r.scores or {}).get(metric)
        if score is None or score >= 1.0:
            continue
        groups[_failure_key(r, output.type)].append(r)
    return [{"key": k, "count": len(v), "rows": v, "metric": metric}
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
    f = io.StringIO(newline="")
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
    return write_atomic(path, f.getvalue())


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
        return plain({"a": self.a, "b": self.b, "n": self.n, "primary_metric": self.primary_metric,
                       "results": [r.to_dict() for r in self.results], "verdicts": self.verdicts})


def paired_rows(ws: "Workspace", run_a: str, run_b: str) -> tuple[RunRow, RunRow, list[RunExampleRow],
                                                                  list[RunExampleRow]]:
    """Two runs on the same data and their rows on the examples both answered (a UserError when
    they ran on different data: a paired test needs the same examples)."""
    ra, rb = run_row(ws, run_a), run_row(ws, run_b)
    if (ra.dataset, ra.dataset_version, ra.split) != (rb.dataset, rb.dataset_version, rb.split):
        raise UserError(f"runs {ra.id} and {rb.id} are on different data "
                        f"({ra.dataset}@{ra.dataset_version}:{ra.split} vs "
                        f"{rb.dataset}@{rb.dataset_version}:{rb.split}); a paired test needs the same examples")
    rows_a, rows_b = run_rows(ws, ra.id), run_rows(ws, rb.id)
    keep = {r.example_index for r in rows_a} & {r.example_index for r in rows_b}
    return ra, rb, [r for r in rows_a if r.example_index in keep], [r for r in rows_b if r.example_index in keep]


def diff_runs(ws: "Workspace", run_a: str, run_b: str, metrics: list[str] | None = None) -> DiffResult:
    """Paired tests B - A per metric: McNemar's exact test for 0/1 metrics of single-repeat runs,
    a paired bootstrap for everything else; each with a plain-words verdict."""
    ra, rb, rows_a, rows_b = paired_rows(ws, run_a, run_b)
    common = sorted({r.example_index for r in rows_a})
    ans_a, g_a = _answers(rows_a)
    ans_b, g_b = _answers(rows_b)
    ma = {m.name: m for m in stored_metrics(ra)}
    mb = {m.name for m in stored_metrics(rb)}
    names = [n for n in (metrics or list(ma)) if n in ma and n in mb]
    if metrics:
        missing = [n for n in metrics if n not in ma or n not in mb]
        if missing:
            raise NotFound(f"metric '{missing[0]}' is not in both runs (common: {', '.join(names) or 'none'})")
    primary = primary_metric(OutputSpec.of((ra.params or {}).get("output")))
    a_name, b_name = f"A ({ra.candidate})", f"B ({rb.candidate})"
    out = DiffResult(a=ra.id, b=rb.id, n=len(common), primary_metric=primary)
    single = ra.repeat == 1 and rb.repeat == 1
    for name in names:
        m = ma[name]
        sa, sb = m.paired_stats(ans_a, ans_b)
        sa = group_rows(sa, g_a)
        sb = group_rows(sb, g_b)
        binary = (m.binary and single and sa.shape[1] == 2 and np.all(sa[:, 1] == 1) and np.all(sb[:, 1] == 1)
                  and np.all(np.isin(sa[:, 0], (0, 1))) and np.all(np.isin(sb[:, 0], (0, 1))))
        if binary:
            res = st.paired_proportion(sa[:, 0], sb[:, 0], metric=name)
        else:
            res = st.paired_bootstrap(sa, sb, m.value, metric=name, higher_is_better=m.higher_is_better)
        out.results.append(res)
        out.verdicts.append(st.verdict(res, a_name=a_name, b_name=b_name, percent=m.percent))
    return out
