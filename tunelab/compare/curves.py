"""Learning curves: every trainable candidate of a comparison on 10/25/50/100% of train, and where
prompting stops winning (the data-requirements row).

    curve = learning_curves(ws, entries, candidates, "support@3f2a:test", "accuracy", budget_s=600)
    curve.series           # one CurveSeries per trainable candidate: fine-tune, baselines, demo prompt
    curve.crossover.text   # "with fewer than ~120 labelled examples, prompting wins" (or no crossover)

The trainable candidates: the fine-tune (`ft:NAME` trained again on a seeded, stratified sample of
its training examples: `NAME-lc10`, ...), the classical baselines (`baseline:METHOD-nN`, trained on
the same sample) and a prompt whose demos are chosen per input (its demo pool limited to the same
sample). Each point is evaluated by the same evaluator on the same split; with `sample`, on the
same `sample` examples of it (chosen by content, `evaluate.sample_indices`), the 100% points too, so
that a curve's points are measured on the same rows. With `budget_s`, a series is measured only when
its estimated time fits the budget (the fine-tune's from its training time, the prompt's from its
evaluation time; baselines take seconds); the ones left out are named in `LearningCurve.left_out`
with their estimate, so a report says what it does not show and how to measure it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

from tunelab import finetune
from tunelab.compare.format import fmt_seconds
from tunelab.compare.result import (CandidateEntry, Crossover, CurveSeries, Interval, LearningCurve,
                                    LearningCurvePoint)
from tunelab.datasets import get_split, subsample
from tunelab.demos import DemoSelector
from tunelab.errors import NotFound
from tunelab.models import free_weights
from tunelab.evaluate import BaselineCandidate, Candidate, PromptCandidate, evaluate, parse_baseline, resolve_candidate
from tunelab.evaluate.baselines import FLOORS

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

LEARNING_CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def _interval(m: dict[str, Any]) -> Interval:
    return Interval(value=m.get("value"), low=m.get("lo"), high=m.get("hi"))


def _point(frac: float, n: int | None, name: str, result, metric: str, wall_s: float = 0.0,
           cost: float = 0.0) -> LearningCurvePoint:
    m = result.metrics.get(metric) or result.metrics[result.primary_metric]
    return LearningCurvePoint(fraction=frac, n_train=n, candidate=name, metric=_interval(m), wall_s=wall_s, cost=cost,
                              run_id=result.id)


def run_learning_curve(ws: "Workspace", ft_name: str, ref: str, metric: str, *, limit: int | None = None,
                       sample: int | None = None, fractions: Iterable[float] = LEARNING_CURVE_FRACTIONS,
                       progress: bool | Any = True, log: Callable[[str], None] | None = None) -> LearningCurve:
    """Fine-tune `ft_name`'s configuration again on a share of its training examples (a seeded,
    stratified sample) and evaluate each on `ref`. Fine-tunes already made (`NAME-lc10`, ...) are
    reused."""
    say = log or (lambda _msg: None)
    base = finetune.get_row(ws, ft_name)
    if base is None:
        raise NotFound(f"unknown fine-tune '{ft_name}'")
    n_full = finetune.examples_trained(ws, base) or 0
    points = []
    for frac in sorted(set(float(f) for f in fractions)):
        name = ft_name if frac >= 1.0 else f"{ft_name}-lc{int(round(frac * 100))}"
        row = finetune.get_row(ws, name)
        if frac < 1.0 and (row is None or row.status != "done"):
            n = max(1, int(round(frac * n_full)))
            say(f"learning curve: fine-tuning {name} on {n:,} of {n_full:,} training examples")
            config = {k: v for k, v in (base.config or {}).items() if k in finetune.FineTuneConfig.model_fields}
            config.update(name=name, max_examples=n, data=f"{base.dataset}@{base.dataset_version}",
                          prompt=f"{base.prompt}@{base.prompt_version}")
            cfg = finetune.FineTuneConfig.model_validate(config)
            if cfg.batch_size > n:  # a small share of a small train split: a batch cannot hold more than it
                cfg = cfg.model_copy(update={"batch_size": n})
            free_weights()  # the evaluator's models are not needed while training
            finetune.finetune(ws, cfg, resume=row is not None)
            row = finetune.get_row(ws, name)
        result = evaluate(ws, resolve_candidate(ws, f"ft:{name}"), ref, limit=limit, sample=sample,
                          progress=progress)
        if not result.reused:
            free_weights()  # this share's model is not used again
        points.append(_point(frac, finetune.examples_trained(ws, row), f"ft:{name}", result, metric,
                             float(row.wall_s or 0.0), float(row.cost or 0.0)))
        say(f"learning curve: {points[-1].n_train} examples -> {metric} {points[-1].metric.value:.3f}")
    return LearningCurve(candidate=f"ft:{ft_name}", metric=metric, points=points)


def _budget_left(seconds: float) -> str:
    """The end of a left-out series' line: what the time budget had left for it."""
    if seconds < 1:
        return "and the time budget was spent (--minutes sets it)"
    return f"more than the {fmt_seconds(seconds)} the time budget had left"


def baseline_series(ws: "Workspace", cand: BaselineCandidate, ref: str, metric: str, *, limit: int | None = None,
                    sample: int | None = None, fractions: Iterable[float] = LEARNING_CURVE_FRACTIONS,
                    progress: bool | Any = False) -> CurveSeries:
    """A classical baseline trained on the same seeded, stratified samples of train."""
    method, _, _ = parse_baseline(cand.name)
    ds, _, _ = get_split(ws, ref)
    n_full = len(ds.split("train"))
    points = []
    for frac in sorted(set(float(f) for f in fractions)):
        n = n_full if frac >= 1.0 else max(1, int(round(frac * n_full)))
        spec = f"baseline:{method}{'' if n >= n_full else f'-n{n}'}:{ds.name}@{ds.version}"
        sized = resolve_candidate(ws, spec)
        sized.output = cand.output  # a JSON or text baseline is scored as the comparison scored it
        result = evaluate(ws, sized, ref, limit=limit, sample=sample, progress=progress)
        points.append(_point(frac, sized.setup.examples, sized.name, result, metric, sized.setup.wall_s,
                             sized.setup.compute_cost))
    return CurveSeries(candidate=cand.name, kind="baseline", points=points)


def demo_prompt_series(ws: "Workspace", cand: PromptCandidate, ref: str, metric: str, *, limit: int | None = None,
                       sample: int | None = None, fractions: Iterable[float] = LEARNING_CURVE_FRACTIONS,
                       progress: bool | Any = False) -> CurveSeries | None:
    """A prompt with per-input demos, its demo pool limited to the same samples of its split
    (None when its demos are not chosen per input)."""
    sel = cand.demos
    if not isinstance(sel, DemoSelector):
        return None
    pool = sel.pool
    points = []
    for frac in sorted(set(float(f) for f in fractions)):
        n = len(pool) if frac >= 1.0 else max(1, int(round(frac * len(pool))))
        if n >= len(pool):
            sized: Candidate = cand
        else:
            small = DemoSelector(sel.strategy, sel.k, sel.dataset, sel.version, f"{sel.split}[n={n}]",
                                 subsample(pool, n, 0))
            sized = cand.with_demos(small, name=f"{cand.name}~n{n}")
        result = evaluate(ws, sized, ref, limit=limit, sample=sample, progress=progress)
        points.append(_point(frac, n, sized.name, result, metric))
    return CurveSeries(candidate=cand.name, kind="prompt", points=points)


def _overlap(a: Any, b: Any) -> bool:
    """Whether two measured values' 95% intervals overlap (False when either has none)."""
    if a is None or b is None or None in (a.low, a.high, b.low, b.high):
        return False
    return a.low <= b.high and b.low <= a.high


def crossover(series: list[CurveSeries], entries: list[CandidateEntry]) -> Crossover | None:
    """Where the best trained curve (fine-tune, baselines) overtakes prompting: the per-input-demo
    prompt's curve, else the best prompt candidate's measured metric (which needs no training data).
    Linear between the two measured points around it; point estimates."""
    trained = [s for s in series if s.kind in ("ft", "baseline") and s.points]
    prompt_curve = next((s for s in series if s.kind == "prompt" and s.points), None)
    prompts = [e for e in entries if e.kind == "prompt" and e.metric.value is not None]
    if not trained or (prompt_curve is None and not prompts):
        return None
    best_prompt = max(prompts, key=lambda e: e.metric.value) if prompts else None
    fracs = sorted({p.fraction for s in trained for p in s.points})
    rows = []  # (n, trained value, trained name, prompting value, prompting name, intervals overlap)
    for f in fracs:
        at = [(p, s) for s in trained for p in s.points if p.fraction == f and p.metric.value is not None]
        if not at:
            continue
        p, s = max(at, key=lambda x: x[0].metric.value)
        flat = (best_prompt.metric, best_prompt.name) if best_prompt else None
        pp = next((q for q in (prompt_curve.points if prompt_curve else []) if q.fraction == f), None)
        side = (pp.metric, prompt_curve.candidate) if pp is not None and pp.metric.value is not None else flat
        if side is not None and flat is not None and flat[0].value > side[0].value:
            side = flat  # the best prompt overall, when it beats the demo prompt at this size
        if side is None:
            continue
        pm, pn = side
        rows.append((p.n_train or 0, p.metric.value, s.candidate, pm.value, pn, _overlap(p.metric, pm)))
    if not rows:
        return None
    n0, t0, name0, p0, pname0, _ = rows[0]
    if t0 >= p0:
        return Crossover(prompting=pname0, trained=name0,
                         text=f"no crossover in the measured range: {name0} is at least as good as prompting "
                              f"({pname0}) from {n0:,} labelled examples on")
    for (na, ta, _, pa, pna, tied_a), (nb, tb, nameb, pb, _, tied_b) in zip(rows, rows[1:]):
        da, db = ta - pa, tb - pb
        if da < 0 <= db:
            n = na + (nb - na) * (-da) / (db - da) if db != da else nb
            tied = [f"{m:,}" for m, t in ((na, tied_a), (nb, tied_b)) if t]
            caveat = (f" (point estimates: at {' and '.join(tied)} examples the two are within each other's "
                      "95% intervals)") if tied else ""
            return Crossover(n_train=round(n, 1), prompting=pna, trained=nameb,
                             text=f"with fewer than ~{n:,.0f} labelled examples, prompting ({pna}) wins; "
                                  f"from there {nameb} is better{caveat}")
    nl, _, namel, _, pnl, _ = rows[-1]
    return Crossover(prompting=pnl, trained=namel,
                     text=f"no crossover in the measured range: prompting ({pnl}) wins up to {nl:,} labelled examples")


def learning_curves(ws: "Workspace", entries: list[CandidateEntry], candidates: list[Candidate], ref: str,
                    metric: str, *, finetunes: bool = True, budget_s: float | None = None, limit: int | None = None,
                    sample: int | None = None, progress: bool | Any = True,
                    log: Callable[[str], None] | None = None) -> LearningCurve | None:
    """The learning curves of every trainable candidate of a comparison (see the module doc):
    the first fine-tune (when `finetunes` and, with `budget_s`, when retraining it on 10+25+50% of
    its data fits), the classical baselines but the majority class, and the first prompt with
    per-input demos (with `budget_s`, when three more evaluations of it fit). `sample`: every point
    on that many examples of `ref` (see the module doc). None when nothing is trainable."""
    say = log or (lambda _msg: None)
    series: list[CurveSeries] = []
    left_out: list[str] = []
    ft_curve = None
    spent = 0.0
    by_name = {e.name: e for e in entries}

    def eval_s(entry: CandidateEntry) -> float:  # one evaluation on the curve's examples
        share = 1.0 if sample is None or not entry.n else min(1.0, sample / entry.n)
        return entry.eval_wall_s * share

    ft = next((e for e in entries if e.kind == "ft"), None)
    if ft is not None and finetunes:
        estimate = ft.setup.wall_s * 0.85 + 3 * eval_s(ft)
        if budget_s is None or estimate <= budget_s:
            ft_curve = run_learning_curve(ws, ft.name[3:], ref, metric, limit=limit, sample=sample,
                                          progress=progress, log=say)
            series.append(CurveSeries(candidate=ft_curve.candidate, kind="ft", points=ft_curve.points))
            spent += estimate
        else:
            left_out.append(f"{ft.name}: retraining it on 10/25/50% of train would take ~{fmt_seconds(estimate)}, "
                            + _budget_left(budget_s))
            say(f"learning curve: {left_out[-1]}")
    for cand in candidates:
        if isinstance(cand, BaselineCandidate) and cand.method not in FLOORS:  # floors learn nothing
            series.append(baseline_series(ws, cand, ref, metric, limit=limit, sample=sample))
            say(f"learning curve: {cand.name}: " + ", ".join(f"{p.n_train} -> {p.metric.value:.3f}"
                                                             for p in series[-1].points))
    demo = next((c for c in candidates if isinstance(c, PromptCandidate) and c.kind == "prompt"
                 and isinstance(c.demos, DemoSelector)), None)
    if demo is not None:
        estimate = 3 * eval_s(by_name[demo.name]) if demo.name in by_name else 0.0
        if budget_s is None or spent + estimate <= budget_s:
            found = demo_prompt_series(ws, demo, ref, metric, limit=limit, sample=sample, progress=progress)
            if found is not None:
                series.append(found)
                say(f"learning curve: {demo.name} (demo pool of n): " + ", ".join(
                    f"{p.n_train} -> {p.metric.value:.3f}" for p in found.points))
        else:
            left_out.append(f"{demo.name} (demo pool of n): three more evaluations would take "
                            f"~{fmt_seconds(estimate)}, " + _budget_left(budget_s - spent))
            say(f"learning curve: {left_out[-1]}")
    if not series:
        return None
    n_eval = max((e.n for e in entries), default=0)  # the comparison's rows: the split after `limit`
    curve = LearningCurve(candidate=ft_curve.candidate if ft_curve else "", metric=metric,
                          points=ft_curve.points if ft_curve else [], series=series,
                          n_eval=(min(n_eval, sample) if sample else n_eval) or None, left_out=left_out)
    curve.crossover = crossover(series, entries)
    if curve.crossover is not None:
        say(f"learning curve: {curve.crossover.text}")
    return curve
