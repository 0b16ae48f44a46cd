"""`tunelab optimize PROMPT --data NAME`: search instructions and few-shot demos on the validation
split and keep the winner as a new prompt version. Thin: `tunelab.optimize.optimize` does the work.
"""

from __future__ import annotations

from typing import Optional

import typer

from tunelab.cli._common import console, err_console, print_json, workspace
from tunelab.errors import UserError


def optimize(
    prompt: str = typer.Argument(..., help="The seed prompt: NAME (the working file), NAME@VERSION or NAME@LABEL."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset NAME[@VERSION]: demos from its train split, "
                                                       "candidates scored on its validation split."),
    budget: str = typer.Option("20", "--budget", "-b",
                               help="Candidates to evaluate (20), or a time limit (15m, 90s, 1h)."),
    objective: Optional[str] = typer.Option(None, "--objective",
                                            help="Metric to maximize: accuracy, macro_f1, field_f1, ... "
                                                 "(default: the prompt's output.metric, else the output type's primary metric)."),
    max_prompt_tokens: Optional[int] = typer.Option(None, "--max-prompt-tokens",
                                                    help="Reject candidates with more prompt tokens per request."),
    proposer: Optional[str] = typer.Option(None, "--proposer",
                                           help="A model (any backend) that rewrites the instruction from "
                                                "the current best prompt's failures on train examples."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Evaluate on this model instead of the prompt's."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Use only the first N validation examples."),
    demos: str = typer.Option("stratified,random,knn_tfidf,knn_embed", "--demos",
                              help="Demo strategies to try, comma-separated: stratified, random, knn_tfidf, "
                                   "knn_embed (or 'none')."),
    label_definitions: Optional[str] = typer.Option(None, "--label-definitions",
                                                    help="A YAML or JSON file mapping each label to what it "
                                                         "means, used by the instruction variants."),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo draws and the proposer's samples."),
    no_test: bool = typer.Option(False, "--no-test",
                                 help="Do not score the seed and the winner on the test split afterwards."),
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Score at most N test examples."),
    no_commit: bool = typer.Option(False, "--no-commit", help="Report the winner but commit no new version."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Optimize a prompt: instruction variants and few-shot demos scored on the validation split
    (never test); the winner becomes a new prompt version with its provenance."""
    from tunelab.optimize import optimize as run_optimize


    strategies = tuple(s.strip() for s in demos.split(",") if s.strip() and s.strip() != "none")
    result = run_optimize(workspace(), prompt, data, budget=budget, objective=objective,
                          max_prompt_tokens=max_prompt_tokens, proposer=proposer, model=model,
                          limit_validation=limit, seed=seed, demo_strategies=strategies,
                          label_definitions=read_definitions(label_definitions) if label_definitions else None,
                          test=not no_test,
                          limit_test=test_limit, commit=not no_commit, progress=False if as_json else err_console)
    if as_json:
        print_json(result.to_dict())
        return
    print_result(result)


def read_definitions(path: str) -> dict[str, str]:
    """{label: definition} from a YAML/JSON mapping file; errors name the file."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8").read())
    except FileNotFoundError:
        raise UserError("not found", path=path) from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"not a YAML/JSON mapping: {str(exc).splitlines()[0]}", path=path) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UserError("expected a mapping of each label to its definition (label: text)", path=path)
    return {str(k): v for k, v in data.items()}


def _pct(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _interval(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return "-"
    if d.get("lo") is None:
        return _pct(d["value"])
    return f"{_pct(d['value'])} [{_pct(d['lo'])}, {_pct(d['hi'])}]"


def print_result(result) -> None:
    """Every candidate tried, then the outcome, then the test scores (apart from validation)."""
    from rich.table import Table

    r = result
    table = Table(title=f"optimize {r.prompt}@{r.seed_version} on {r.dataset}:validation "
                        f"({r.validation_n} examples, {r.objective}, model {r.model})")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("candidate: instruction · demos", ratio=1, min_width=24)
    table.add_column(f"{r.objective} [95% CI]", no_wrap=True)
    table.add_column("tok/req", justify="right", no_wrap=True)
    table.add_column("status")
    for c in r.candidates:
        score = (_interval({"value": c["score"], "lo": c["lo"], "hi": c["hi"]}) if c["score"] is not None
                 else f"screen {_pct(c['screen_score'])}" if c["screen_score"] is not None else "-")
        mark = " ← winner" if c["id"] == r.winner["id"] else ""
        mark += " (seed)" if c["id"] == r.seed["id"] else ""
        status = c["status"] + (f": {c['note']}" if c["note"] else "") + mark
        table.add_row(str(c["id"]), c["name"], score,
                      "-" if c["prompt_tokens"] is None else f"{c['prompt_tokens']:.0f}", status)
    console.print(table)
    console.print(r.message, markup=False)
    budget = r.budget
    used = f"{budget['used']}" + (f"/{budget['evaluations']}" if budget.get("evaluations") else "")
    console.print(f"search cost: {used} candidates, {r.wall_s:.1f} s, {r.tokens:,} tokens, ${r.cost:.4f} "
                  f"(optimization {r.id})", markup=False)
    for note in r.notes:
        console.print(f"note: {note}", markup=False)
    if r.test:
        console.print(f"TEST split ({r.test.get('n')} examples, scored after the search; not used to choose):",
                      markup=False)
        for label in ("seed", "winner"):
            t = r.test.get(label)
            if t:
                console.print(f"  {label:<6} {r.objective} {_interval(t)}, "
                              f"{(t.get('prompt_tokens') or 0):.0f} prompt tokens per request (run {t['run_id']})",
                              markup=False)
