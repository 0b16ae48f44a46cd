"""Comparison: candidates side by side on one split, every aspect measured (this module owns the
`comparisons` rows).

    comp = compare(ws, "support:test", ["support-router@v2", "ft:support", "hybrid:support"],
                   volume=100_000)
    comp.candidates[0].metric            # Interval(value=0.78, low=0.73, high=0.82)
    comp.recommendation.headline         # the advice (tunelab.compare.advise)

Every candidate is evaluated by the same evaluator on the same split (a run with the same
configuration is reused, never repeated). What made each candidate is read the same way for every
kind, from the rows of the module that made it: the optimization that committed a prompt version
(`tunelab.optimize.setup_of`), the fine-tune (`tunelab.finetune.setup_of`), a hybrid's tuning plus
both its sides. The result is a `Comparison` (`tunelab.compare.result`), stored in the
`comparisons` table and written as an HTML report with its JSON twin. The cost model is
`tunelab.compare.costs`.
"""

from __future__ import annotations

import math
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import urlparse

from pydantic import ValidationError
from sqlalchemy import select

from tunelab import finetune, optimize
from tunelab.compare.advise import advise
from tunelab.compare.curves import learning_curves
from tunelab.compare.costs import ALPHA, DEFAULT_VOLUME, HORIZON_MONTHS, break_even_volume, horizon_cost, payback_months
from tunelab.compare.report import write_report
from tunelab.compare.result import (Answered, BreakEven, CandidateEntry, Comparison, Confusion, Consistency,
                                    DatasetRef, FieldScore, Flexibility, Interval, JudgeTrust, Latency, OutputRow,
                                    PairTest, Search, SearchTrial, SetupCost, Tokens,
                                    TrafficShare, TrainingCurves, VsBest)
from tunelab.datasets import get_split
from tunelab.judge import judge_sample, make_judge
from tunelab.errors import NotFound, UserError
from tunelab.models import free_weights
from tunelab.evaluate import (BaselineCandidate, Candidate, HybridCandidate, PromptCandidate, RunResult, Setup,
                              diff_runs, evaluate, resolve_candidate, run_rows)
from tunelab.files import write_json
from tunelab.metrics import default_metric_names, example_metric
from tunelab.store.models import ComparisonRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

# the classical reference rows of every comparison, by output type (labels: baseline:embed too when named: the flow)
REFERENCE_BASELINES = {"label": ("majority", "tfidf"), "json": ("majority", "nearest"), "text": ("copy", "nearest")}
MAX_CONFUSION_LABELS = 400  # kept for the advice (chance, out-of-scope recall); the report draws up to 60


def compare(ws: "Workspace", data: str, candidates: list[str], *, volume: float | None = None,
            repeat: int = 1, limit: int | None = None, metric: str | None = None,
            learning_curve: bool = False, curve_deadline: float | None = None, curve_sample: int | None = None,
            baselines: bool = True, engineer_hours: dict[str, float] | None = None,
            report: str | Path | None = None, progress: bool | Any = True,
            log: Callable[[str], None] | None = None, judge_sample: str | None = None) -> Comparison:
    """Evaluate (or reuse the runs of) every candidate on the same split and put them side by side.

    `data`: DATASET[@VERSION][:SPLIT] (default split test; pinned to one version for all).
    `volume`: expected requests a month (default 10,000). `repeat`: answers per example, for
    consistency. `learning_curve`: also measure every trainable candidate on 10/25/50% of train
    (`tunelab.compare.curves`: the fine-tune retrained, the baselines, a prompt's per-input demo
    pool; the 100% points are the candidates themselves), with `curve_deadline` (a `time.monotonic()`
    instant: the budget is what is left of it when the curves start) only the series whose estimated time fits, with `curve_sample` every point on that many test examples (chosen by
    content, the same for every point). `baselines`: add the classical reference rows (trained in
    seconds on the same dataset version's train split) the candidates do not name: for labels
    `baseline:majority` and `baseline:tfidf`, for JSON `baseline:majority` (the most frequent output)
    and `baseline:nearest` (the nearest train input's output), for free text `baseline:copy` (the
    input itself) and `baseline:nearest`; a
    JSON or text baseline is scored by the LLM candidates' output spec (their metrics).
    `engineer_hours`: {candidate name or kind: hours} of engineer time in the setup (default: the
    setup's wall time). `judge_sample`: with a `judge`
    metric, a split whose examples carry human grades (`meta.human_score` / `meta.human_label`): the
    judge's agreement with them says how far its grades can be trusted (`Comparison.judge`). Returns
    the comparison, stored in the `comparisons`
    table and written as an HTML report with its JSON twin.
    """
    say = log or (lambda _msg: None)
    if not candidates:
        raise UserError("compare needs at least one candidate (PROMPT[@VERSION], ft:NAME, hybrid:NAME)")
    if len(set(candidates)) != len(candidates):
        raise UserError("a candidate is named twice: " + ", ".join(sorted({c for c in candidates if candidates.count(c) > 1})))
    ds, split, examples = get_split(ws, data)
    ref = f"{ds.name}@{ds.version}:{split}"
    volume = DEFAULT_VOLUME if volume is None else float(volume)
    if volume < 0:
        raise UserError(f"--volume must be a number of requests a month, at least 0 (got {volume:g})")
    resolved = [resolve_candidate(ws, spec, data=ref) for spec in candidates]  # every name checked before any work
    kind = resolved[0].output.type
    if baselines and (kind != "label" or ds.labels):
        named = {c.name.split(":")[1].split("-n")[0] for c in resolved if c.kind == "baseline"}
        for m in REFERENCE_BASELINES.get(kind, ()):
            if m in named:
                continue
            try:
                resolved.append(resolve_candidate(ws, f"baseline:{m}", data=ref))
            except UserError as err:  # a reference row the data cannot train (no words to weigh): left out
                say(f"classical reference baseline:{m} left out: {err}")
    spec = next((c.output for c in resolved if c.kind != "baseline"), None)
    for c in resolved:  # a JSON or text baseline answers as the LLM candidates do: their metrics
        if isinstance(c, BaselineCandidate) and spec is not None and spec.type != "label":
            c.output = spec
    rate = float(ws.config.engineer_hourly_rate or 0.0)

    entries: list[CandidateEntry] = []
    runs: dict[str, RunResult] = {}
    for i, cand in enumerate(resolved, start=1):
        say(f"[{i}/{len(resolved)}] evaluating {cand.name} on {ref}")
        result = evaluate(ws, cand, ref, limit=limit, repeat=repeat, progress=progress,
                          metrics=None if metric is None else _metric_names(cand, metric))
        say(f"      {'reused run' if result.reused else 'run'} {result.id}: "
            f"{result.primary_metric} {result.metrics[result.primary_metric]['value']:.3f}")
        runs[cand.name] = result
        entries.append(_candidate_entry(ws, cand, result, volume, rate, engineer_hours or {}))
        if not result.reused:
            free_weights()  # one candidate's models at a time (they reload in about a second)

    # what the candidates are judged by: the first LLM candidate's (a prompt's `output.metric`, the
    # type's default); the classical baselines know only the labels
    judged = next((c for c in resolved if c.kind != "baseline"), resolved[0])
    metric_name = metric or runs[judged.name].primary_metric
    for entry, cand in zip(entries, resolved):
        m = runs[cand.name].metrics.get(metric_name)
        if m is None:
            raise UserError(f"candidate {cand.name} has no metric '{metric_name}' (its output type differs?)")
        entry.metric = _interval(m)

    pairwise = _pairwise(ws, [c.name for c in resolved], runs, metric_name)
    best = max(entries, key=lambda e: (e.metric.value if e.metric.value is not None else -1))
    comparison = Comparison(
        id=uuid.uuid4().hex[:12], created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dataset=DatasetRef(name=ds.name, version=ds.version, split=split,
                           n_examples=len(examples) if limit is None else min(limit, len(examples)), labels=ds.labels),
        metric=metric_name, volume_per_month=volume, months=HORIZON_MONTHS, engineer_hourly_rate=rate,
        repeat=repeat, best=best.name, candidates=entries, pairwise=pairwise,
        break_even=break_even_pairs(entries, volume))
    for e in entries:
        e.vs_best = None if e is best else _vs(comparison, e.name, best.name)
    if learning_curve:
        budget = None if curve_deadline is None else curve_deadline - time.monotonic()
        comparison.learning_curve = learning_curves(ws, entries, resolved, ref, metric_name, budget_s=budget,
                                                    limit=limit, sample=curve_sample, progress=progress, log=say)
        if comparison.learning_curve is None:
            raise UserError("--learning-curve needs a trainable candidate (ft:NAME, baseline:tfidf, or a prompt with "
                            "per-input demos) to vary the training data of")
    comparison.output_type = resolved[0].output.type
    if metric_name.split(":", 1)[0] == "judge":
        comparison.judge = judge_trust(ws, metric_name, resolved[0], judge_sample)
    elif judge_sample:
        raise UserError(f"--judge-sample measures the judge of a judge metric; this comparison is on '{metric_name}' "
                        "(add --metric judge)")
    if comparison.output_type != "label":
        comparison.outputs = output_matrix(ws, [(c.name, runs[c.name].id) for c in resolved], metric_name)
    comparison.recommendation = advise(comparison)
    save_comparison(ws, comparison, report)
    return comparison


def judge_trust(ws: "Workspace", metric: str, cand: Candidate, sample: str | None) -> JudgeTrust:
    """The judge of `metric` (on `cand`'s rubric, as the evaluator graded it) against the human
    grades of `sample`; without a sample, a record that its trust was not measured."""
    spec = metric.split(":", 1)[1] if ":" in metric else None
    judge = make_judge(spec or None, ws, cand.output.judge)
    if sample is None:
        return JudgeTrust(judge=judge.model.name, trust="not measured: give a sample of human-graded answers "
                          "(meta.human_score or meta.human_label) with --judge-sample DATA")
    report = judge_sample(ws, sample, judge)
    a = report.agreement
    if not a:
        raise UserError(f"--judge-sample {sample}: no example carries meta.human_score or meta.human_label")
    return JudgeTrust(judge=judge.model.name, sample=report.data, n=a["n"], trust=a["trust"],
                      **{k: _num(a.get(k)) for k in ("weighted_kappa", "spearman", "pass_kappa")})


def _metric_names(cand: Candidate, metric: str) -> list[str]:
    names = default_metric_names(cand.output)
    return names if metric in names else [metric] + names


def _interval(m: dict[str, Any]) -> Interval:
    return Interval(value=m.get("value"), low=m.get("lo"), high=m.get("hi"))


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _pairwise(ws: "Workspace", names: list[str], runs: dict[str, RunResult], metric: str) -> list[PairTest]:
    """A paired test for every pair (a, b): difference = a − b on the same examples."""
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if runs[a].id == runs[b].id:
                continue
            diff = diff_runs(ws, runs[b].id, runs[a].id, metrics=[metric])  # B − A with B = a
            if not diff.results:
                continue
            r = diff.results[0]
            p = _num(r.p)
            out.append(PairTest(a=a, b=b, test="mcnemar" if r.test.startswith("mcnemar") else "paired bootstrap",
                                p_value=p, difference=_num(r.diff), diff_low=_num(r.lo), diff_high=_num(r.hi),
                                n=r.n, significant=p is not None and p < ALPHA, verdict=diff.verdicts[0]))
    return out


def _vs(comparison: Comparison, name: str, best: str) -> VsBest | None:
    t = comparison.pair(name, best)
    if t is None:
        return None
    return VsBest(other=best, test=t.test, p_value=t.p_value, difference=t.difference, significant=t.significant)


def break_even_pairs(entries: Iterable[CandidateEntry], volume_per_month: float,
                     months: int = HORIZON_MONTHS) -> list[BreakEven]:
    """Every pair with a break-even volume; `a` is the one with the higher setup cost."""
    cands = list(entries)
    out = []
    for i, x in enumerate(cands):
        for y in cands[i + 1:]:
            a, b = (x, y) if x.setup.total_cost >= y.setup.total_cost else (y, x)
            v = break_even_volume(a.setup.total_cost, a.cost_per_request, b.setup.total_cost, b.cost_per_request,
                                  months)
            if v is None:
                continue
            out.append(BreakEven(a=a.name, b=b.name, volume_per_month=v,
                                 payback_months=payback_months(a.setup.total_cost, a.cost_per_request,
                                                               b.setup.total_cost, b.cost_per_request,
                                                               volume_per_month)))
    return out


# -- one candidate's row ----------------------------------------------------------------------------
def _candidate_entry(ws: "Workspace", cand: Candidate, result: RunResult, volume: float, rate: float,
                     engineer_hours: dict[str, float]) -> CandidateEntry:
    first = [r for r in run_rows(ws, result.id) if r.repeat_index == 0]
    judged = example_metric(cand.output)  # the per-example score of its primary metric
    made = setup_of(ws, cand)
    hours = engineer_hours.get(cand.name, engineer_hours.get(cand.kind))
    eng_hours = float(hours) if hours is not None else made.wall_s / 3600.0
    setup = SetupCost(**made.model_dump(), engineer_hours=eng_hours, engineer_cost=eng_hours * rate,
                      total_cost=made.compute_cost + eng_hours * rate)
    per_request = float(result.cost.get("per_request") or 0.0)
    eval_wall = _eval_seconds(result)
    cons = result.consistency or {}
    lat = result.latency or {}
    curves = finetune.training_curves(ws, cand.name[3:]) if cand.kind == "ft" else None
    searched = finetune.search_of(ws, cand.name[3:]) if cand.kind == "ft" else None
    return CandidateEntry(
        name=cand.name, kind=cand.kind, model=cand.model_name, base=base_of(ws, cand), local=is_local(ws, cand),
        run_id=result.id, reused_run=bool(result.reused), n=result.n_examples, eval_wall_s=eval_wall,
        metrics={k: _interval(v) for k, v in result.metrics.items()},
        consistency=Consistency(repeat=result.repeat, agreement=_value(cons.get("agreement")),
                                pass_k=_value(cons.get("pass_k")), format_validity=_value(cons.get("format_valid")),
                                note=cons.get("note")),
        tokens=Tokens(**{k: float(result.tokens.get(k) or 0.0) for k in ("prompt", "completion", "total")}),
        latency=Latency(p50=lat.get("p50"), p95=lat.get("p95"), mean=lat.get("mean"),
                        throughput_per_s=_throughput(result), samples=[round(r.latency_s, 6) for r in first]),
        setup=setup, cost_per_request=per_request, cost_per_1k=per_request * 1000,
        cost_horizon=horizon_cost(setup.total_cost, per_request, volume),
        flexibility=flexibility(ws, cand, made, eval_wall),
        confusion=confusion(first) if cand.output.type == "label" else None,
        training_curves=TrainingCurves(**curves) if curves else None,
        search=_search(searched) if searched else None,
        routing=routing_shares(first) if cand.kind == "hybrid" else None,
        examples_trained=made.examples,
        per_field=_per_field(result) if cand.output.type == "json" else None,
        scores=[round(float(v), 4) for r in first if (v := (r.scores or {}).get(judged)) is not None])


OUTPUT_ROWS = 60  # examples in a report's side-by-side outputs


def output_matrix(ws: "Workspace", runs: list[tuple[str, str]], metric: str, limit: int = OUTPUT_ROWS) -> list[OutputRow]:
    """Every candidate's answer to each example (first repeat), scored by `metric`: the examples
    where the candidates' scores differ most first, then the lowest best score (all wrong)."""
    by_name = {name: {r.example_index: r for r in run_rows(ws, run_id) if r.repeat_index == 0} for name, run_id in runs}
    common = sorted(set.intersection(*(set(rows) for rows in by_name.values()))) if by_name else []
    out = []
    for i in common:
        first = next(iter(by_name.values()))[i]
        answers = {name: Answered(text=rows[i].prediction, score=_num((rows[i].scores or {}).get(metric)))
                   for name, rows in by_name.items()}
        scores = [a.score for a in answers.values() if a.score is not None]
        refs = (first.extra or {}).get("refs") or []
        out.append(OutputRow(index=i, input=first.input, reference=first.expected, references=list(refs),
                             answers=answers, spread=(max(scores) - min(scores)) if scores else 0.0))
    out.sort(key=lambda r: (-r.spread, max((a.score or 0.0) for a in r.answers.values()), r.index))
    return out[:limit]


def _per_field(result: RunResult) -> dict[str, FieldScore] | None:
    details = (result.metrics.get("field_f1") or {}).get("details") or {}
    fields = details.get("per_field")
    return {k: FieldScore(**{n: (_num(v.get(n)) if n != "support" else int(v.get(n) or 0))
                             for n in ("precision", "recall", "f1", "support")})
            for k, v in fields.items()} if fields else None


def _search(found: dict[str, Any]) -> Search:
    keys = set(SearchTrial.model_fields)
    return Search(best_trial=found["best_trial"],
                  trials=[SearchTrial(**{k: v for k, v in t.items() if k in keys}) for t in found.get("trials", [])])


def base_of(ws: "Workspace", cand: Candidate) -> str:
    """The base model under a candidate: a prompt's model, a fine-tune's base (bundled name or folder),
    a hybrid's primary's base; none under a classical baseline."""
    if isinstance(cand, HybridCandidate):
        return base_of(ws, cand.primary)
    if isinstance(cand, BaselineCandidate):
        return ""  # no model under a classical baseline
    if cand.kind == "ft":
        row = finetune.get_row(ws, cand.name[3:].split("@")[0])
        return row.base if row is not None else cand.model_name
    return cand.model_name


def _value(x: Any) -> float | None:
    return x.get("value") if isinstance(x, dict) else x


def _throughput(result: RunResult) -> float | None:
    """Requests a second: from the run's wall time, or (when some answers came from the response
    cache, which keeps their measured latency) from the mean measured latency."""
    t = result.throughput or {}
    mean = (result.latency or {}).get("mean")
    if t.get("examples_per_s") and not result.cached_rows:
        return float(t["examples_per_s"])
    return 1.0 / mean if mean else None


def _eval_seconds(result: RunResult) -> float:
    """The measured time of one evaluation of the split: the wall time, or the sum of the measured
    per-request times when answers came from the response cache."""
    t = result.throughput or {}
    wall, model_s = float(t.get("wall_s") or 0.0), float(t.get("model_s") or 0.0)
    return model_s if result.cached_rows else (wall or model_s)


def setup_of(ws: "Workspace", cand: Candidate) -> Setup:
    """What it took to make the candidate, from the rows of the module that made it: the
    optimization of a prompt version (none: hand-written), the fine-tune, or for a hybrid both
    sides plus its threshold tuning."""
    if isinstance(cand, HybridCandidate):
        sides = setup_of(ws, cand.primary).plus(setup_of(ws, cand.fallback))
        return sides.plus(cand.spec.setup, how="hybrid")
    if isinstance(cand, BaselineCandidate):
        return cand.setup
    if cand.kind == "ft":
        return finetune.setup_of(ws, cand.name[3:])
    if isinstance(cand, PromptCandidate):
        found = optimize.setup_of(ws, cand.prompt.name, cand.prompt.version)
        if found is not None:
            return found
    return Setup(how="hand-written", sources=["hand-written prompt: no optimization recorded"])


def flexibility(ws: "Workspace", cand: Candidate, made: Setup, eval_wall_s: float) -> Flexibility:
    """Time to change behaviour, from measured times: a new prompt version is checked by one
    re-evaluation; a fine-tuned model must be retrained (the measured training time) and
    re-evaluated; a hybrid also re-tunes its thresholds (measured too)."""
    if isinstance(cand, HybridCandidate):
        train = setup_of(ws, cand.primary).wall_s if cand.primary.kind == "ft" else 0.0
        return Flexibility(change_s=train + cand.spec.setup.wall_s + eval_wall_s,
                           how="retrain + re-tune + re-evaluation (a fallback-only change: prompt edit + re-evaluation)")
    if cand.kind in ("ft", "baseline"):
        return Flexibility(change_s=made.wall_s + eval_wall_s, how="retrain + re-evaluation")
    return Flexibility(change_s=eval_wall_s, how="prompt edit + re-evaluation")


def confusion(rows) -> Confusion | None:
    labels = sorted({r.expected for r in rows} | {r.prediction for r in rows})
    if not labels or len(labels) > MAX_CONFUSION_LABELS:
        return None
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for r in rows:
        matrix[index[r.expected]][index[r.prediction]] += 1
    return Confusion(labels=labels, matrix=matrix)


def routing_shares(rows) -> TrafficShare | None:
    """Who answered, from the rows' `extra.meta.route`."""
    routes = []
    for r in rows:
        meta = (r.extra or {}).get("meta") or {}
        if meta.get("route"):
            routes.append((meta["route"], meta.get("route_reason")))
    if not routes:
        return None
    n = len(routes)
    counts: dict[str, int] = {}
    for route, reason in routes:
        if route == "fallback":
            counts[reason or "other"] = counts.get(reason or "other", 0) + 1
    fb = sum(counts.values())
    return TrafficShare(primary=(n - fb) / n, fallback=fb / n, reasons={k: v / n for k, v in counts.items()}, n=n)


def is_local(ws: "Workspace", cand: Candidate) -> bool:
    """Whether the candidate's data stays on this machine (a local or fake model, or a server on
    localhost); a hybrid only when both its sides are."""
    if isinstance(cand, HybridCandidate):
        return is_local(ws, cand.primary) and is_local(ws, cand.fallback)
    backend = cand.backend or ""
    if backend in ("local", "fake", "llamacpp") or (cand.model_name or "").startswith("ft:"):
        return True
    if backend == "openai":
        model = getattr(cand, "model", None)
        url = getattr(getattr(model, "inner", model), "base_url", None)
        cfg = ws.config.models.get(cand.model_name)
        url = url or (cfg.base_url if cfg is not None else None)
        if url:
            return (urlparse(str(url)).hostname or "") in ("localhost", "127.0.0.1", "::1")
    return False


# -- storage ----------------------------------------------------------------------------------------
def save_comparison(ws: "Workspace", comparison: Comparison, report: str | Path | None = None) -> Path:
    """Store the comparison and write its report (default artifacts/comparisons/ID/report.html)."""
    html_path = Path(report) if report else ws.artifact_path("comparisons", comparison.id, "report.html")
    comparison.report = str(html_path.resolve())
    write_report(comparison, html_path)
    if report:  # the JSON twin is always kept under the artifacts folder too
        write_json(ws.artifact_path("comparisons", comparison.id, "report.json"), comparison.to_json())
    with ws.store.session() as s:
        row = s.get(ComparisonRow, comparison.id)
        ds = comparison.dataset
        if row is None:
            s.add(ComparisonRow(id=comparison.id, dataset=f"{ds.name}@{ds.version}", split=ds.split,
                                candidates=[c.name for c in comparison.candidates], result=comparison.to_json(),
                                report_path=comparison.report))
        else:
            row.result = comparison.to_json()
            row.report_path = comparison.report
    return html_path


def _parse(row: ComparisonRow) -> Comparison:
    try:
        return Comparison.model_validate(row.result or {})
    except ValidationError:
        schema = (row.result or {}).get("schema", "?")
        raise UserError(f"comparison {row.id} was made by an older tunelab (schema {schema}); "
                        "run tunelab compare again") from None


def load_comparison(ws: "Workspace", ref: str = "latest") -> Comparison:
    """A stored comparison: its id (a unique prefix is enough) or `latest`."""
    with ws.store.session() as s:
        if ref in ("latest", "last", ""):
            row = s.scalars(select(ComparisonRow).order_by(ComparisonRow.created_at.desc(), ComparisonRow.id.desc())).first()
            if row is None:
                raise NotFound("no comparisons yet (tunelab compare --data DATASET:SPLIT CANDIDATE...)")
            return _parse(row)
        rows = list(s.scalars(select(ComparisonRow).where(ComparisonRow.id.startswith(ref)).limit(3)))
    if not rows:
        known = [c.id for c in list_comparisons(ws)[:5]]
        raise NotFound(f"unknown comparison '{ref}' (latest: {', '.join(known) or 'none yet'})")
    if len(rows) > 1:
        raise UserError(f"comparison '{ref}' is ambiguous: give more of the id")
    return _parse(rows[0])


def list_comparisons(ws: "Workspace") -> list[Comparison]:
    """Every stored comparison, newest first (ones made by an older tunelab are left out)."""
    with ws.store.session() as s:
        rows = list(s.scalars(select(ComparisonRow).order_by(ComparisonRow.created_at.desc())))
    out = []
    for row in rows:
        try:
            out.append(_parse(row))
        except UserError:
            continue
    return out


def report_path(ws: "Workspace", comparison_id: str) -> Path | None:
    """Where the comparison's HTML report was written (None: no such comparison or report)."""
    with ws.store.session() as s:
        row = s.get(ComparisonRow, comparison_id)
    return Path(row.report_path) if row is not None and row.report_path else None
