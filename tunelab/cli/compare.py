"""`tunelab compare`, `tunelab advise`, `tunelab hybrid`, `tunelab demo`: the answer.

    tunelab compare --data NAME:SPLIT CANDIDATE... [--volume N] [--report FILE] [--json]
    tunelab advise [--comparison ID|latest] [--volume N] [--budget USD] [--deadline-days N] ...
    tunelab hybrid create NAME --model ft:X --fallback PROMPT[@V] [--threshold auto]
    tunelab demo [--dir DIR] [--quick]

Thin: tunelab.compare, tunelab.hybrid and tunelab.flow do the work.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from pydantic import ValidationError

from tunelab.cli._common import console, err_console, print_json, workspace
from tunelab.errors import UserError, pydantic_message


def _log(message: str) -> None:
    err_console.print(message, markup=False, highlight=False)


def _hours(values: list[str]) -> dict[str, float]:
    out = {}
    for v in values:
        name, sep, hours = v.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name] = float(hours)
        except ValueError:
            raise UserError(f"--engineer-hours expects NAME=HOURS or KIND=HOURS, e.g. prompt=2 (got {v!r})") from None
    return out


def compare(
    candidates: List[str] = typer.Argument(None, help="Candidates: PROMPT[@VERSION|@LABEL], ft:NAME, hybrid:NAME, "
                                           "baseline:majority|tfidf|embed|nearest|copy (trained on the data's train split)."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="The split every candidate is measured on: NAME[@VERSION][:SPLIT] (default split test)."),
    from_logs: Optional[str] = typer.Option(None, "--from-logs", help="Compare on a deployment's live calls instead: the deployment (with --shadow)."),
    shadow: Optional[str] = typer.Option(None, "--shadow", help="With --from-logs: the shadow candidate to compare with what answered the calls."),
    since: Optional[str] = typer.Option(None, "--since", help="With --from-logs: calls from this time (UTC) or age (24h, 7d)."),
    volume: Optional[float] = typer.Option(None, "--volume", help="Expected requests a month, for the 12-month cost and the advice (default 10,000)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the HTML report here (default .tunelab/artifacts/comparisons/ID/report.html); report.json beside it."),
    repeat: int = typer.Option(1, "--repeat", help="Answers per example, for consistency (agreement, pass^k)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N examples of the split."),
    metric: Optional[str] = typer.Option(None, "--metric", help="The metric to compare on (default: the candidates' output.metric, else accuracy for labels, field_f1 for JSON, chrf for text)."),
    learning_curve: bool = typer.Option(False, "--learning-curve", help="Also measure every trainable candidate (fine-tune: retrained, baselines, a prompt's per-input demo pool) on 10/25/50% of train, with the crossover point (a fine-tune makes it slow)."),
    curve_sample: Optional[int] = typer.Option(None, "--curve-sample", min=1, help="With --learning-curve: measure every curve point on this many examples of the split (chosen by content, the same rows for every point) instead of all of them."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Add the classical reference rows: labels baseline:majority and baseline:tfidf, JSON baseline:majority and baseline:nearest, free text baseline:copy and baseline:nearest."),
    engineer_hours: List[str] = typer.Option([], "--engineer-hours", help="Engineer hours in a setup: NAME=H or KIND=H (prompt, ft, hybrid); default: the setup's wall time. Costed at engineer_hourly_rate."),
    judge_sample: Optional[str] = typer.Option(None, "--judge-sample", help="With --metric judge: a split of "
                                               "human-graded answers (meta.human_score or meta.human_label); the "
                                               "judge's agreement with them says how far to trust its grades."),
    as_json: bool = typer.Option(False, "--json", help="Print the comparison JSON instead of the table."),
) -> None:
    """Measure candidates side by side on one split: quality with intervals and paired tests, consistency,
    tokens, latency, setup and running cost, break-even volume, flexibility; write the HTML report.
    With --from-logs DEPLOYMENT --shadow CANDIDATE: the shadow against what answered the live calls
    (agreement, latency, cost and, where feedback exists, quality, with intervals)."""
    from tunelab.compare import compare as run_compare, print_table

    ws = workspace()
    if from_logs or shadow:
        if not (from_logs and shadow) or candidates or data:
            raise UserError("--from-logs DEPLOYMENT needs --shadow CANDIDATE (and no --data or candidates)")
        from tunelab.lifecycle.calls import parse_time
        from tunelab.lifecycle.evidence import compare_shadow

        ev = compare_shadow(ws, from_logs, shadow, since=parse_time(since))
        if as_json:
            print_json(ev.to_dict())
            return
        for line in ev.lines():
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    if not data or not candidates:
        raise UserError("compare needs --data NAME[:SPLIT] and candidates (or --from-logs DEPLOYMENT --shadow CANDIDATE)")
    comp = run_compare(ws, data, list(candidates), volume=volume, repeat=repeat, limit=limit, metric=metric,
                       learning_curve=learning_curve, curve_sample=curve_sample, baselines=baselines,
                       engineer_hours=_hours(engineer_hours), report=report, progress=err_console if not as_json else False, log=_log,
                       judge_sample=judge_sample)
    if as_json:
        print_json(comp.to_json())
        return
    print_table(comp, console)
    if comp.judge is not None:
        console.print(f"judge {comp.judge.judge}: {comp.judge.trust}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"report: {comp.report}", markup=False, highlight=False, soft_wrap=True)


def advise(
    comparison: str = typer.Option("latest", "--comparison", "-c", help="The comparison to advise on: its id, or latest."),
    deadline_days: Optional[float] = typer.Option(None, "--deadline-days", help="Days until it must be in production."),
    budget: Optional[float] = typer.Option(None, "--budget", help="USD available for setup (optimization, training, engineer time)."),
    volume: Optional[float] = typer.Option(None, "--volume", help="Expected requests a month (default: the comparison's)."),
    change_frequency: Optional[str] = typer.Option(None, "--change-frequency", help="How often the required behaviour changes: weekly, monthly or rarely."),
    examples: Optional[int] = typer.Option(None, "--examples", help="Labelled examples you have for training."),
    required_metric: Optional[float] = typer.Option(None, "--required-metric", help="The lowest acceptable value of the comparison's metric."),
    data_must_stay_local: bool = typer.Option(False, "--data-must-stay-local", help="Data may not be sent to a remote API."),
    as_json: bool = typer.Option(False, "--json", help="Print the advice as JSON."),
) -> None:
    """Recommend prompt engineering, fine-tuning or a hybrid from a comparison and your constraints
    (deterministic rules, see docs/advise.md); every reason cites the measured numbers."""
    from tunelab.compare import Constraints, advise as run_advise, load_comparison

    ws = workspace()
    try:
        cons = Constraints(deadline_days=deadline_days, budget=budget, volume=volume, change_frequency=change_frequency,
                           examples=examples, required_metric=required_metric, data_must_stay_local=data_must_stay_local)
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, Constraints).replace("_", "-")) from None
    comp = load_comparison(ws, comparison)
    advice = run_advise(comp, cons)
    if as_json:
        print_json(advice.model_dump(mode="json"))
        return
    ds = comp.dataset
    console.print(f"comparison {comp.id} on {ds.name}:{ds.split}; "
                  f"volume {advice.volume_per_month:,.0f} requests/month", markup=False, highlight=False)
    console.print(f"[bold]{advice.headline}[/bold]")
    for reason in advice.reasons:
        console.print(f"  - {reason}", markup=False, highlight=False)


hybrid_app = typer.Typer(help="Hybrid routers (hybrid:NAME): a fine-tuned model first, a prompt where it is unsure "
                              "or the input is unlike its training data.", no_args_is_help=True, rich_markup_mode=None)


@hybrid_app.command("create")
def hybrid_create(
    name: str = typer.Argument(..., help="Name of the hybrid: it becomes hybrid:NAME."),
    model: str = typer.Option(..., "--model", help="The candidate that answers first, usually ft:NAME."),
    fallback: str = typer.Option(..., "--fallback", help="The prompt that answers the rest: PROMPT[@VERSION|@LABEL]."),
    threshold: str = typer.Option("auto", "--threshold", help="Label-margin threshold under which the fallback answers: auto (tuned on validation), off, or 0..1."),
    similarity: str = typer.Option("auto", "--similarity", help="Similarity to the training inputs under which the fallback answers: auto (tuned on validation), off, or 0..1."),
    rule: List[str] = typer.Option([], "--rule", help="A regular expression; matching inputs always go to the fallback (repeatable)."),
    no_length_check: bool = typer.Option(False, "--no-length-check", help="Do not route inputs longer or shorter than every training input."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset whose validation split tunes the thresholds (default: the fine-tune's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Tune on the first N validation examples only."),
    as_json: bool = typer.Option(False, "--json", help="Print the stored hybrid as JSON."),
) -> None:
    """Make hybrid:NAME and tune its thresholds on the validation split."""
    from tunelab.hybrid import create_hybrid


    ws = workspace()
    spec = create_hybrid(ws, name, model, fallback, threshold=threshold, similarity=similarity, rules=rule,
                         length_check=not no_length_check, data=data, limit=limit,
                         progress=err_console if not as_json else False).spec
    if as_json:
        print_json(spec.model_dump(mode="json"))
        return
    _print_hybrid(spec)


def _print_hybrid(spec) -> None:
    t = spec.tuning or {}
    lines = [f"hybrid:{spec.name}: {spec.primary} first, {spec.fallback} as fallback",
             f"  margin threshold {spec.margin_threshold:.3f}, similarity threshold {spec.similarity_threshold:.3f}"
             + (f", input length {spec.length_range[0]}–{spec.length_range[1]} chars" if spec.length_range else ""),
             *[f"  rule: {r.pattern}" for r in spec.rules]]
    if t.get("validation_score") is not None:
        lines.append(f"  on {t.get('data')} ({t.get('n')} examples), {t.get('metric')}: hybrid {t['validation_score']:.3f}, "
                     f"primary alone {t.get('primary_score', 0):.3f}, fallback alone {t.get('fallback_score', 0):.3f}; "
                     f"fallback takes {t.get('fallback_share', 0):.0%} of requests")
    for line in lines:
        console.print(line, markup=False, highlight=False)


@hybrid_app.command("show")
def hybrid_show(name: str = typer.Argument(..., help="The hybrid's name."),
                as_json: bool = typer.Option(False, "--json", help="Print it as JSON.")) -> None:
    """Show a hybrid: its sides, thresholds, rules and how they were tuned."""
    from tunelab.hybrid import get_hybrid


    spec = get_hybrid(workspace(), name)
    if as_json:
        print_json(spec.model_dump(mode="json"))
    else:
        _print_hybrid(spec)


@hybrid_app.command("list")
def hybrid_list() -> None:
    """List the hybrids of this workspace."""
    from tunelab.evaluate import list_hybrids


    specs = list_hybrids(workspace())
    if not specs:
        console.print("no hybrids yet (tunelab hybrid create NAME --model ft:X --fallback PROMPT)")
    for spec in specs:
        console.print(f"hybrid:{spec.name}  {spec.primary} -> {spec.fallback}", markup=False, highlight=False)


def demo(
    directory: Path = typer.Option(Path("demo-workspace"), "--dir", help="The demo workspace (made if missing, reused if there)."),
    quick: bool = typer.Option(False, "--quick", help="A tiny version: few examples, a few training steps (for tests)."),
    volume: float = typer.Option(100_000, "--volume", help="Expected requests a month for the cost model and advice."),
    learning_curve: Optional[bool] = typer.Option(None, "--learning-curve/--no-learning-curve", help="Learning curves on 10/25/50/100% of train (default: those that fit what is left of --minutes; --learning-curve: the fine-tune retrained too, adds a few minutes)."),
    minutes: float = typer.Option(10.0, "--minutes", help="The demo's time budget in minutes: the learning curves measure only the series that fit what is left of it."),
) -> None:
    """Run the whole flow on the bundled support-ticket data: check the data, a baseline prompt,
    optimization, fine-tuning, a hybrid, the comparison and the advice; prints where the report is.
    Re-running reuses finished work."""
    from tunelab.flow import run_demo


    run_demo(directory, quick=quick, volume=volume, log=_log, console=console, learning_curve=learning_curve,
             minutes=minutes)
