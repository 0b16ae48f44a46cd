"""`tunelab eval`: evaluate a candidate on a split; show, diff, list and export runs.

    tunelab eval CANDIDATE --data NAME:SPLIT [--model M] [--limit N] [--repeat K] [--metric M ...]
    tunelab eval show RUN [--failures] [--export FILE.csv|.jsonl]
    tunelab eval diff RUN_A RUN_B
    tunelab eval list

`tunelab eval CANDIDATE ...` is short for `tunelab eval run CANDIDATE ...` (a group that falls back
to its default command when the first word is not one of its commands). Thin: tunelab.evaluate
does the work.
"""

from __future__ import annotations

from typing import Any, List, Optional

import typer
from typer.core import TyperGroup

from tunelab.cli._common import console, err_console, print_json, workspace
from tunelab.errors import UserError


class DefaultGroup(TyperGroup):
    """A group that runs `default_command` when the first argument is not a command name."""

    default_command = "run"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: Any, formatter: Any) -> None:
        formatter.write_usage(ctx.command_path, "CANDIDATE --data NAME:SPLIT [OPTIONS] | COMMAND [ARGS]...")


app = typer.Typer(
    cls=DefaultGroup,
    help="Evaluate a candidate (PROMPT[@VERSION|@LABEL], ft:NAME, hybrid:NAME) on a split: metrics with "
         "95% intervals, consistency, tokens, latency, cost. 'tunelab eval CANDIDATE --data NAME:SPLIT' "
         "runs it; 'show', 'diff' and 'list' look at runs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _fmt(v, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{v * 100:.1f}%" if pct else f"{v:.4g}"


def _interval(m: dict, pct: bool = True) -> str:
    if m is None or m.get("value") is None:
        return "-"
    if m.get("lo") is None:
        return _fmt(m["value"], pct)
    return f"{_fmt(m['value'], pct)}  [{_fmt(m['lo'], pct)}, {_fmt(m['hi'], pct)}]"


def _is_share(name: str) -> bool:

    from tunelab.metrics import SIMPLE

    return name in SIMPLE or name.startswith("regex:")


def print_summary(result) -> None:
    """A run's summary as tables on stdout."""
    from rich.table import Table

    r = result
    head = f"run {r.id}: {r.candidate} ({r.kind}) on {r.model}; {r.dataset}@{r.dataset_version}:{r.split}, " \
           f"{r.n_examples} examples" + (f" x {r.repeat} repeats" if r.repeat > 1 else "")
    notes = []
    if r.status != "done":
        notes.append(f"status {r.status}: {r.rows} of {r.n_examples * r.repeat} answers stored; run the same "
                     "command again to resume")
    if r.reused:
        notes.append("finished earlier with this configuration; shown as stored (--rerun to run again)")
    if r.resumed:
        notes.append("resumed an unfinished run")
    if r.cached_rows:
        notes.append(f"{r.cached_rows} of {r.rows} answers from the response cache")
    console.print(head, markup=False)
    for n in notes:
        console.print(f"  ({n})", markup=False)
    t = Table(title=None, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value [95% CI]", justify="right")
    t.add_column("interval")
    for name, m in r.metrics.items():
        t.add_row(name + (" *" if name == r.primary_metric else ""), _interval(m, _is_share(name)),
                  m.get("method", ""))
    console.print(t)
    details = (r.metrics.get("macro_f1") or {}).get("details")
    if details and len(details.get("labels", [])) <= 12:
        _print_confusion(details)
    c = r.consistency or {}
    if c.get("agreement"):
        console.print(f"consistency over {c['repeat']} repeats at temperature {c['temperature']:g}: "
                      f"agreement {_interval(c['agreement'])}, pairwise {_interval(c['pairwise_agreement'])}, "
                      f"pass^{c['repeat']} {_interval(c['pass_k'])}", markup=False)
    if c.get("format_valid"):
        fv = c["format_valid"]
        rows = fv.get("rows") if isinstance(fv, dict) else None
        note = f" (free answers on {rows} of {fv['of']} rows)" if rows is not None and rows != fv.get("of") else ""
        console.print(f"format valid: {_interval(fv)}{note}", markup=False)
    if c.get("note"):
        console.print(f"  note: {c['note']}", markup=False)
    tok, lat, thr, cost = r.tokens, r.latency, r.throughput, r.cost
    console.print(f"tokens per request: {_fmt(tok.get('prompt'), False)} prompt + "
                  f"{_fmt(tok.get('completion'), False)} completion", markup=False)
    console.print(f"latency per request: p50 {_fmt(lat.get('p50'), False)} s, p95 {_fmt(lat.get('p95'), False)} s; "
                  f"throughput {_fmt(thr.get('examples_per_s'), False)} examples/s "
                  f"(wall {_fmt(thr.get('wall_s'), False)} s)", markup=False)
    console.print(f"cost per 1,000 requests: ${cost.get('per_1000') or 0:.4f} (total ${cost.get('total') or 0:.4f})",
                  markup=False)


def _print_confusion(details: dict) -> None:
    from rich.table import Table

    labels = details["labels"]
    console.print("confusion (rows: expected, columns: predicted):")
    t = Table(show_header=True, header_style="bold")
    t.add_column("")
    for label in labels:
        t.add_column(label, justify="right")
    t.add_column("recall", justify="right")
    for e in labels:
        row = details["confusion"][e]
        t.add_row(e, *[str(row.get(p, 0)) for p in labels], _fmt(details["per_label"][e]["recall"]))
    t.add_row("precision", *[_fmt(details["per_label"][p]["precision"]) for p in labels], "")
    console.print(t)


def _parse_thresholds(items: List[str]) -> list[tuple[str, float]]:

    out = []
    for item in items:
        name, sep, value = item.rpartition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise UserError(f"--fail-under expects METRIC=VALUE (e.g. accuracy=0.8), got '{item}'")
    return out


@app.command("run")
def run(
    candidate: str = typer.Argument(..., help="PROMPT[@VERSION|@LABEL], ft:NAME or hybrid:NAME."),
    data: str = typer.Option(..., "--data", "-d", help="DATASET[@VERSION][:SPLIT] (default split: test)."),
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model for a prompt candidate (default: the prompt's, else the "
                                             "workspace's default_model)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N examples of the split."),
    repeat: int = typer.Option(1, "--repeat", "-k", help="Answer each example K times at the candidate's "
                                                         "temperature (consistency: agreement, pass^k)."),
    metric: List[str] = typer.Option([], "--metric", help="A metric (repeatable): accuracy, macro_f1, "
                                                          "format_valid, exact_match, normalized_match, contains, "
                                                          "regex:PATTERN, json_valid, json_schema, field_f1, "
                                                          "json_match, module:function. Default: by output type."),
    as_json: bool = typer.Option(False, "--json", help="Print the machine-readable summary (no progress bar)."),
    fail_under: List[str] = typer.Option([], "--fail-under",
                                         help="METRIC=VALUE: exit with status 1 when the metric is below VALUE "
                                              "(repeatable; for CI)."),
    rerun: bool = typer.Option(False, "--rerun", help="Run again even when a finished run with this exact "
                                                      "configuration exists."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not answer from (or write to) the response cache."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per model call and stored batch (default 256)."),
    free_text: bool = typer.Option(True, "--free-text/--no-free-text",
                                   help="Label outputs: also generate the model's free answer to measure how "
                                        "often it is not a valid label (default: on)."),
    free_answers: Optional[str] = typer.Option(None, "--free-answers",
                                               help="Label outputs: on how many examples to generate the free answer: "
                                                    "auto (default: at least 100 or 20%, all with --repeat), all, "
                                                    "a count (200) or a share (50%)."),
) -> None:
    """Evaluate CANDIDATE on a split (also: tunelab eval CANDIDATE --data NAME:SPLIT)."""
    from tunelab.evaluate import evaluate, resolve_candidate


    thresholds = _parse_thresholds(fail_under)
    ws = workspace()
    cand = resolve_candidate(ws, candidate, model, free_text=free_text, data=data)
    result = evaluate(ws, cand, data, limit=limit, repeat=repeat, metrics=metric or None, batch_size=batch_size,
                      use_cache=not no_cache, rerun=rerun, progress=False if as_json else err_console,
                      free_answers=free_answers)
    failed = []
    for name, threshold in thresholds:
        value = result.value(name)
        if value is None or value < threshold:
            failed.append(f"{name} {_fmt(value, False)} is under {threshold:g}")
    if as_json:
        data_out = result.to_dict()
        data_out["fail_under"] = {"passed": not failed, "failed": failed} if thresholds else None
        print_json(data_out)
    else:
        print_summary(result)
    if failed:
        err_console.print("fail-under: " + "; ".join(failed), markup=False)
        raise typer.Exit(1)


@app.command("show")
def show(
    run_id: str = typer.Argument(..., metavar="RUN", help="A run id (a unique prefix is enough), or 'last'."),
    failures: bool = typer.Option(False, "--failures", help="List the wrong answers, grouped by confusion, "
                                                            "most common first."),
    per_group: int = typer.Option(3, "--examples", help="With --failures: examples shown per group."),
    export: Optional[str] = typer.Option(None, "--export", help="Write the run's rows to FILE.csv or FILE.jsonl."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary (and failures) as JSON."),
) -> None:
    """Show a run: its summary, its failures, or export its rows."""
    from tunelab.evaluate import export_run, failure_groups, load_run


    ws = workspace()
    result = load_run(ws, run_id)
    if export:
        path = export_run(ws, result.id, export)
        err_console.print(f"wrote {result.rows} rows to {path}", markup=False)
    groups = failure_groups(ws, result.id) if failures else None
    if as_json:
        out = result.to_dict()
        if groups is not None:
            out["failures"] = [{"key": g["key"], "count": g["count"],
                                "examples": [{"example_index": r.example_index, "repeat_index": r.repeat_index,
                                              "input": r.input, "expected": r.expected, "prediction": r.prediction,
                                              "free_text": (r.extra or {}).get("free_text")}
                                             for r in g["rows"][:per_group]]} for g in groups]
        print_json(out)
        return
    print_summary(result)
    if groups is not None:
        total = sum(g["count"] for g in groups)
        judged = groups[0]["metric"] if groups else result.primary_metric
        console.print(f"\n{total} wrong answers ({judged} < 1) in {len(groups)} groups:", markup=False)
        for g in groups:
            console.print(f"\n[bold]{g['key']}[/bold]  x{g['count']}")
            for r in g["rows"][:per_group]:
                text = r.input.replace("\n", " ")
                console.print(f"  #{r.example_index}: {text[:160]}", markup=False)
                if judged != "accuracy":
                    console.print(f"     expected: {r.expected[:160]}", markup=False)
                    console.print(f"     got:      {r.prediction[:160]}", markup=False)
                free = (r.extra or {}).get("free_text")
                if free is not None:
                    console.print(f"     free answer: {free[:160]!r}", markup=False)


@app.command("diff")
def diff(
    run_a: str = typer.Argument(..., help="Run A (id, prefix, or 'last')."),
    run_b: str = typer.Argument(..., help="Run B, compared against A on the same examples."),
    metric: List[str] = typer.Option([], "--metric", help="Only these metrics (default: all the runs share)."),
    as_json: bool = typer.Option(False, "--json", help="Print the paired tests as JSON."),
) -> None:
    """Paired tests of B against A (McNemar for per-example correctness, paired bootstrap otherwise)."""
    from tunelab.evaluate import diff_runs


    ws = workspace()
    result = diff_runs(ws, run_a, run_b, metric or None)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"A = {result.a}, B = {result.b}: {result.n} examples in common", markup=False)
    for res, text in zip(result.results, result.verdicts):
        mark = "*" if res.metric == result.primary_metric else " "
        console.print(f"{mark} {text}  [{res.test}]", markup=False)


@app.command("list")
def list_(
    limit: int = typer.Option(30, "--limit", "-n", help="The newest N runs."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs as JSON."),
) -> None:
    """The runs of this workspace, newest first."""
    from tunelab.evaluate import list_runs

    from rich.table import Table

    ws = workspace()
    runs = list_runs(ws, limit)
    rows = []
    for r in runs:
        summary = r.summary or {}
        primary = summary.get("primary_metric")
        value = ((summary.get("metrics") or {}).get(primary) or {}).get("value") if primary else None
        rows.append({"id": r.id, "created_at": r.created_at.isoformat(timespec="seconds"), "candidate": r.candidate,
                     "kind": r.kind, "model": r.model, "data": f"{r.dataset}:{r.split}", "n": r.n_examples,
                     "repeat": r.repeat, "status": r.status, "metric": primary, "value": value})
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no runs yet (tunelab eval CANDIDATE --data DATASET:SPLIT)")
        return
    t = Table(show_header=True, header_style="bold")
    for col in ("id", "created", "candidate", "model", "data", "n", "status", "primary metric"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["id"], r["created_at"].replace("T", " "), r["candidate"], r["model"], r["data"],
                  str(r["n"]) + (f"x{r['repeat']}" if r["repeat"] > 1 else ""), r["status"],
                  f"{r['metric']} {_fmt(r['value'])}" if r["metric"] else "-")
    console.print(t)


@app.command("judge")
def judge(
    data: str = typer.Argument(..., help="DATASET[@VERSION][:SPLIT] whose outputs the judge grades; examples with "
                                         "meta.human_score or meta.human_label also give the judge's agreement."),
    judge_model: Optional[str] = typer.Option(None, "--judge", help="The judge model (default: tunelab.yaml's "
                                                                   "judge.model, else the default model)."),
    rubric: Optional[str] = typer.Option(None, "--rubric", help="What a good answer is (default: tunelab.yaml's "
                                                               "judge.rubric, else a generic rubric)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Grade on this prompt's rubric and scale "
                                         "(its front matter's output.judge)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N examples."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Grade a labelled sample with the LLM judge: its mean score, and its agreement with the human
    grades (Cohen's kappa, weighted kappa, Spearman, MCC of pass/fail), so you know how far to trust it."""
    from tunelab.errors import UserError
    from tunelab.judge import judge_sample, make_judge
    from tunelab.prompts import load_prompt

    ws = workspace()
    graded = load_prompt(ws, prompt).output.judge if prompt else None
    if prompt and graded is None:
        raise UserError(f"prompt '{prompt}' has no judge rubric (output: {{judge: {{rubric: ..., scale: [1, 5]}}}})")
    j = make_judge(judge_model, ws, graded)
    if rubric:
        j.rubric = rubric
    report = judge_sample(ws, data, j, limit=limit)
    if as_json:
        print_json(report.to_dict())
        return
    console.print(f"judge {report.judge} on {report.data}: mean score {_fmt(report.mean)} "
                  f"[{_fmt(report.lo)}, {_fmt(report.hi)}] (scale {report.scale[0]}-{report.scale[1]} as 0-100%), "
                  f"{report.n_graded}/{report.n} graded", markup=False)
    a = report.agreement
    if not a:
        console.print("agreement: no example carries meta.human_score or meta.human_label", markup=False)
        return
    parts = [f"{k} {a[k]:.3f}" for k in ("kappa", "weighted_kappa", "spearman", "exact", "mcc", "pass_kappa",
                                         "pass_agreement") if a.get(k) is not None and a[k] == a[k]]
    console.print(f"agreement with humans on {a['n']} examples: " + ", ".join(parts), markup=False)
    console.print(f"trust: {a['trust']}", markup=False)


@app.command("judge-pairwise")
def judge_pairwise(
    run_a: str = typer.Argument(..., help="Run A (id, prefix, or 'last')."),
    run_b: str = typer.Argument(..., help="Run B, on the same split."),
    judge_model: Optional[str] = typer.Option(None, "--judge", help="The judge model (default: tunelab.yaml's "
                                                                   "judge.model, else the default model)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Only the first N shared examples."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Which run's answers the LLM judge prefers, example by example (each pair asked in both orders)."""
    from tunelab.evaluate import paired_rows
    from tunelab.judge import make_judge, pairwise

    ws = workspace()
    ra, rb, rows_a, rows_b = paired_rows(ws, run_a, run_b)
    result = pairwise(make_judge(judge_model, ws), rows_a, rows_b, ra.id, rb.id, limit=limit)
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"judge {result.judge}: A={result.a} wins {result.a_wins}, B={result.b} wins {result.b_wins}, "
                  f"ties {result.ties} of {result.n} (order-dependent choices: {result.position_flips}); "
                  f"A's win rate {_fmt(result.a_win_rate)}", markup=False)
