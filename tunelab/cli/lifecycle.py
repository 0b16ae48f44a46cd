"""The lifecycle on live traffic: `tunelab rollout ...`, `tunelab promote`, `tunelab rollback`,
`tunelab distill`, `tunelab monitor`.

    tunelab rollout canary support@production ft:support-distilled --weight 0.1 [--sticky]
    tunelab rollout shadow support@production hybrid:support [--share 0.5]
    tunelab rollout show [support@production]          tunelab rollout stop support@production
    tunelab promote support@production --min-agreement 0.95 --min-calls 500 [--dry-run]
    tunelab rollback support@production
    tunelab distill --from support@production --teacher support@v2 --name support-distilled
    tunelab monitor support@production --since 24h

Thin: tunelab.lifecycle does the work.
"""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.cli._common import console, err_console, print_json, workspace


def _say(message: str) -> None:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)


def _out(message: str) -> None:
    console.print(message, markup=False, highlight=False, soft_wrap=True)


rollout_app = typer.Typer(help="Canaries and shadows of a deployment: a share of its calls answered by another "
                               "candidate, or answered in the background and compared.", no_args_is_help=True,
                          rich_markup_mode=None)


def _show(r) -> str:
    parts = [f"{r.deployment}: answered by {r.answering}"]
    if r.canary:
        parts.append(f"canary {r.canary} on {r.canary_weight:.0%} of calls{' (sticky per caller)' if r.sticky else ''}")
    if r.shadow:
        parts.append(f"shadow {r.shadow} on {r.shadow_share:.0%} of calls")
    return "; ".join(parts)


@rollout_app.command("canary")
def rollout_canary(
    deployment: str = typer.Argument(..., help="The deployment: PROMPT@LABEL, ft:NAME or hybrid:NAME."),
    candidate: str = typer.Argument(..., help="The candidate that answers a share of its calls."),
    weight: float = typer.Option(..., "--weight", help="Share of the calls it answers, 0 to 1 (0.1 = 10%)."),
    sticky: bool = typer.Option(False, "--sticky", help="A caller (the request's 'user', else the API key) always gets the same arm."),
    note: str = typer.Option("", "--note", help="Why (kept with the rollout)."),
) -> None:
    """Send a share of a deployment's calls to a canary candidate (the primary answers in the background too)."""
    from tunelab.lifecycle.rollouts import set_canary

    _out(_show(set_canary(workspace(), deployment, candidate, weight, sticky=sticky, note=note)))


@rollout_app.command("shadow")
def rollout_shadow(
    deployment: str = typer.Argument(..., help="The deployment: PROMPT@LABEL, ft:NAME or hybrid:NAME."),
    candidate: str = typer.Argument(..., help="The candidate that answers in the background."),
    share: float = typer.Option(1.0, "--share", help="Share of the calls it mirrors, 0 to 1."),
    note: str = typer.Option("", "--note", help="Why (kept with the rollout)."),
) -> None:
    """Mirror a share of a deployment's calls to a shadow candidate: logged, never returned, never waited for."""
    from tunelab.lifecycle.rollouts import set_shadow

    _out(_show(set_shadow(workspace(), deployment, candidate, share, note=note)))


@rollout_app.command("stop")
def rollout_stop(
    deployment: str = typer.Argument(..., help="The deployment."),
    what: str = typer.Option("all", "--what", help="canary, shadow or all."),
    note: str = typer.Option("", "--note", help="Why."),
) -> None:
    """Stop a deployment's canary, shadow, or both (a promotion stays: see tunelab rollback)."""
    from tunelab.lifecycle.rollouts import stop_rollout

    _out(_show(stop_rollout(workspace(), deployment, what, note=note)))


@rollout_app.command("show")
def rollout_show(
    deployment: Optional[str] = typer.Argument(None, help="One deployment, with each arm's figures (default: all rollouts)."),
    since: Optional[str] = typer.Option(None, "--since", help="Figures from this time (UTC, 2025-01-31T14:00) or age (24h, 7d)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show rollouts: who answers, the canary and the shadow; for one deployment, each arm's calls, errors,
    latency, cost, feedback and agreement with the primary."""
    from tunelab.lifecycle.calls import parse_time
    from tunelab.lifecycle.evidence import arm_stats
    from tunelab.lifecycle.rollouts import get_rollout, list_rollouts

    ws = workspace()
    if deployment is None:
        rows = list_rollouts(ws)
        if as_json:
            print_json([r.to_dict() for r in rows])
            return
        for r in rows:
            _out(_show(r))
        if not rows:
            _out("no rollouts (tunelab rollout canary|shadow DEPLOYMENT CANDIDATE ...)")
        return
    r = get_rollout(ws, deployment)
    arms = arm_stats(ws, deployment, since=parse_time(since))
    if as_json:
        print_json({**r.to_dict(), "arms": {k: v.to_dict() for k, v in arms.items()}})
        return
    _out(_show(r))
    for arm, side in arms.items():
        lat = f"p50 {side.latency_p50 * 1000:.0f} ms, p95 {side.latency_p95 * 1000:.0f} ms" if side.latency_p50 is not None else "-"
        agree = f"; agreement with the primary {side.agreement.text()}" if side.agreement else ""
        _out(f"  {arm:<7} {side.candidate}: {side.answers} answers, {side.errors} errors, {lat}; right by feedback "
             f"{side.quality.text()}{agree}")


@rollout_app.command("history")
def rollout_history(
    deployment: str = typer.Argument(..., help="The deployment."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (with each record's gate and evidence)."),
) -> None:
    """Promotions, refused promotions and rollbacks of a deployment: who, when, from what to what."""
    from tunelab.lifecycle.promote import promotion_history

    rows = promotion_history(workspace(), deployment)
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    for r in rows:
        agree = (r.evidence.get("agreement") or {})
        why = f" agreement {agree['value']:.1%} over {agree['n']} calls" if agree.get("value") is not None else ""
        _out(f"#{r.id} {r.created_at:%Y-%m-%d %H:%M} {r.action:<8} {r.from_candidate} -> {r.to_candidate} by "
             f"{r.author}{why}{' — ' + r.note if r.note else ''}")
    if not rows:
        _out(f"no promotions of {deployment} yet")


def promote(
    deployment: str = typer.Argument(..., help="The deployment to move: PROMPT@LABEL, ft:NAME or hybrid:NAME."),
    candidate: Optional[str] = typer.Option(None, "--candidate", help="The challenger (default: its canary, else its shadow)."),
    min_agreement: float = typer.Option(0.95, "--min-agreement", help="Share of calls on which the challenger agrees with the primary."),
    min_calls: int = typer.Option(500, "--min-calls", help="Calls both answered, at least."),
    alpha: float = typer.Option(0.05, "--alpha", help="A quality drop by feedback with a one-sided Fisher p below this blocks it."),
    min_feedback: int = typer.Option(0, "--min-feedback", help="Judged answers each side needs before quality counts (0: test what there is)."),
    note: str = typer.Option("", "--note", help="Why (recorded with the promotion)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the gate and print the evidence; move and record nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Move a deployment to its challenger when the gate is met by live evidence; refusals are recorded too
    (exit status 1 when the gate is not met)."""
    from tunelab.lifecycle.promote import Gate, promote as run_promote

    gate = Gate(min_agreement=min_agreement, min_calls=min_calls, alpha=alpha, min_feedback=min_feedback)
    result = run_promote(workspace(), deployment, gate, candidate=candidate, note=note, dry_run=dry_run)
    if as_json:
        print_json(result.to_dict())
    else:
        for line in result.evidence.lines():
            _out(line)
        for c in result.checks:
            _out(f"  [{'ok' if c.ok else 'NO'}] {c.name}: {c.detail}")
        met = all(c.ok for c in result.checks)
        if result.promoted:
            _out(f"promoted: {deployment} now answers with {result.challenger} (was {result.primary}); "
                 f"undo with tunelab rollback {deployment}")
        elif dry_run:
            _out(f"dry run: the gate is {'met' if met else 'not met'}; nothing moved or recorded")
        else:
            _out(f"not promoted: the gate is not met; {deployment} still answers with {result.primary} (recorded)")
    if not result.promoted and not (dry_run and all(c.ok for c in result.checks)):
        raise typer.Exit(1)


def rollback(
    deployment: str = typer.Argument(..., help="The deployment."),
    note: str = typer.Option("", "--note", help="Why (recorded)."),
) -> None:
    """Undo a deployment's last promotion (the label moves back, or the previous candidate answers again)."""
    from tunelab.lifecycle.promote import rollback as run_rollback

    r = run_rollback(workspace(), deployment, note=note)
    _out(f"rolled back: {deployment} answers with {r.to_candidate} again (was {r.from_candidate}); record #{r.id}")


def distill(
    source: str = typer.Option(..., "--from", help="The deployment whose logged inputs are distilled."),
    teacher: str = typer.Option(..., "--teacher", help="The candidate that labels them: PROMPT@VERSION (a strong openai: model in practice), hybrid:NAME, ft:NAME."),
    name: str = typer.Option(..., "--name", help="The dataset and the student's name (it becomes ft:NAME)."),
    since: Optional[str] = typer.Option(None, "--since", help="Only calls from this time (UTC, 2025-01-31T14:00) or age (7d, 24h)."),
    until: Optional[str] = typer.Option(None, "--until", help="Only calls before this time (UTC) or age."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most this many distinct inputs (the newest)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The student's prompt (default: the one the deployment answers with)."),
    min_confidence: float = typer.Option(0.0, "--min-confidence", help="Teacher answers less sure than this (0-1) are unsure: the label margin for labels, the mean token probability for JSON and text."),
    unsure: str = typer.Option("drop", "--unsure", help="Unsure teacher answers: drop (left out) or mark (kept, meta.teacher_unsure)."),
    holdout: float = typer.Option(0.2, "--holdout", help="Share of the inputs held back to measure the student's agreement with the teacher."),
    pii: str = typer.Option("ask", "--pii", help="Inputs that look like personal data: ask (stop and list them), keep, or drop."),
    no_feedback: bool = typer.Option(False, "--no-feedback", help="Ignore feedback (default: corrections replace teacher labels)."),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="A labelled split (NAME[:SPLIT]) to compare student and teacher on."),
    no_train: bool = typer.Option(False, "--no-train", help="Only write the dataset."),
    quick: bool = typer.Option(False, "--quick", help="A short fine-tune (10 steps): a smoke run of the loop, not a good student."),
    base: Optional[str] = typer.Option(None, "--base", help="The student's base model (default smollm2-135m)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (default: from the data)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Label a deployment's logged inputs with a teacher, write a dataset version with its provenance,
    fine-tune a student on it and compare the student with the teacher."""
    from pydantic import ValidationError

    from tunelab.errors import UserError, pydantic_message
    from tunelab.lifecycle.calls import parse_time
    from tunelab.lifecycle.distill import DistillConfig, distill as run_distill

    ft = {k: v for k, v in (("base", base), ("epochs", epochs)) if v is not None}
    try:
        config = DistillConfig(deployment=source, teacher=teacher, name=name, since=parse_time(since, "since"),
                               until=parse_time(until, "until"), limit=limit, prompt=prompt,
                               min_confidence=min_confidence, unsure=unsure, holdout=holdout, pii=pii,
                               use_feedback=not no_feedback, eval_data=eval_data, train=not no_train, quick=quick,
                               finetune=ft)
    except ValidationError as exc:
        raise UserError(pydantic_message(exc, DistillConfig).replace("_", "-")) from None
    result = run_distill(workspace(), config, progress=err_console if not as_json else False, log=_say)
    if as_json:
        print_json(result.to_dict())
        return
    _out(f"dataset {result.dataset} (distilled from {source} by {teacher})")
    if result.student:
        _out(f"student {result.student}")
    if result.agreement is not None:
        m = result.agreement.metrics[result.agreement.primary_metric]
        _out(f"agreement with the teacher on held-back calls: {m['value']:.1%} (95% CI {m['lo']:.1%}–{m['hi']:.1%}, n={m['n']})")
    if result.comparison is not None:
        for c in result.comparison.candidates:
            ci = f" (95% CI {c.metric.low:.3f}–{c.metric.high:.3f})" if c.metric.low is not None else ""
            value = f"{c.metric.value:.3f}" if c.metric.value is not None else "–"
            _out(f"{c.name}: {result.comparison.metric} {value}{ci}")
        _out(f"report: {result.comparison.report}")
    for n in result.notes:
        _out(n)


def monitor(
    deployment: str = typer.Argument(..., help="The deployment."),
    since: Optional[str] = typer.Option("24h", "--since", help="The window's start (UTC, 2025-01-31T14:00) or age (24h, 7d)."),
    until: Optional[str] = typer.Option(None, "--until", help="The window's end (default: now)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="The split to compare with, NAME[:SPLIT] (default: the newest run of the deployment's candidate)."),
    max_distance: Optional[float] = typer.Option(None, "--max-distance", help="Alarm above this embedding distance of the inputs (default 0.15)."),
    max_ood_share: Optional[float] = typer.Option(None, "--max-ood-share", help="Alarm above this share of out-of-distribution inputs (default 0.25)."),
    min_calls: Optional[int] = typer.Option(None, "--min-calls", help="Calls a window needs before it can raise an alarm (default 20)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Drift and health of a deployment's traffic against its evaluation split: inputs (embedding distance,
    out-of-distribution share, length), outputs (labels, JSON validity, a hybrid's fallback share), confidence;
    alarms say what to do (exit status 1 when one is raised)."""
    from tunelab.lifecycle.calls import parse_time
    from tunelab.lifecycle.drift import Thresholds, monitor as run_monitor

    th = Thresholds(**{k: v for k, v in (("max_distance", max_distance), ("max_ood_share", max_ood_share),
                                         ("min_calls", min_calls)) if v is not None})
    report = run_monitor(workspace(), deployment, since=parse_time(since, "since"), until=parse_time(until, "until"),
                         reference=reference, thresholds=th)
    if as_json:
        print_json(report.to_dict())
    else:
        cur, ref = report.current, report.baseline
        _out(f"{deployment} ({report.candidate}) from {cur.start:%Y-%m-%d %H:%M} to {cur.end:%Y-%m-%d %H:%M} UTC: "
             f"{cur.calls} calls; reference: {report.reference}")

        def row(name: str, now, then, fmt: str) -> None:
            if now is not None or then is not None:
                _out(f"  {name:<16} {format(now, fmt) if now is not None else '-':>8}   reference "
                     f"{format(then, fmt) if then is not None else '-'}")

        row("input distance", cur.distance, ref.distance, ".3f")
        row("out of dist.", cur.ood_share, ref.ood_share, ".1%")
        row("input length", cur.mean_length, ref.mean_length, ".0f")
        row("label shift", cur.label_shift, ref.label_shift, ".1%")
        row("JSON valid", cur.json_valid, ref.json_valid, ".1%")
        row("fallback share", cur.fallback_share, ref.fallback_share, ".1%")
        row(report.confidence_measure, cur.confidence, ref.confidence, ".3f")
        for n in report.notes:
            _out(n)
        for a in report.alarms:
            _out(f"ALARM {a.metric}: {a.message}\n  what to do: {a.action}")
        if report.healthy and not report.notes:
            _out("healthy: no threshold crossed")
    if report.alarms:
        raise typer.Exit(1)
