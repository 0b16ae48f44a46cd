"""`tunelab data`: import, check, split, list and show datasets (thin: tunelab.datasets does the work)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tunelab.cli._common import console, err_console, print_json, workspace
from tunelab.errors import UserError

app = typer.Typer(
    help="Datasets: import JSONL/CSV/chat files, check them, split them, list and show versions.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

MAX_ISSUES_SHOWN = 40

_input_field = typer.Option("input", "--input-field", help="Field (JSONL) or column (CSV) holding the input.")
_output_field = typer.Option("output", "--output-field", help="Field (JSONL) or column (CSV) holding the output.")
_json_output = typer.Option(False, "--json-output",
                            help="Serialize non-string outputs (objects, arrays, numbers) to JSON strings "
                                 "instead of rejecting them.")
_allow_empty = typer.Option(False, "--allow-empty-output",
                            help="Keep examples whose output is empty (an error by default).")
_model = typer.Option(None, "--model", help="Model whose tokenizer and context length to check against "
                                            "(default: the bundled smollm2-135m; or a local model folder).")


@app.command("import")
def import_(
    path: Path = typer.Argument(..., help="A .jsonl/.csv file, or a folder of train/validation/test files."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Dataset name (default: the folder's "
                                                                   "name or the file's stem)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a single file (default: train)."),
    input_field: str = _input_field,
    output_field: str = _output_field,
    json_output: bool = _json_output,
    allow_empty_output: bool = _allow_empty,
    model: Optional[str] = _model,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check a file or folder and import it as a new dataset version (refused if the check has errors)."""
    from tunelab.datasets import CheckFailed, import_dataset


    ws = workspace()
    try:
        ds, report = import_dataset(ws, path, name, split=split, model=model, input_field=input_field,
                                    output_field=output_field, json_output=json_output,
                                    allow_empty_output=allow_empty_output)
    except CheckFailed as exc:
        if not as_json and exc.report.n_errors > 1:  # the last line (from the error handler) names the first
            _print_issues(exc.report.issues, levels=("error",), stderr=True, limit=10)
        raise
    if as_json:
        print_json({"name": ds.name, "version": ds.version, "splits": {s: len(v) for s, v in ds.splits.items()},
                    "labels": ds.labels, "check": report.to_dict()})
        return
    _print_issues(report.issues, levels=("warning",), stderr=True, limit=10)
    counts = ", ".join(f"{s} {len(v)}" for s, v in ds.splits.items())
    console.print(f"imported {ds.ref} ({counts}); {report.n_warnings} warnings", markup=False, soft_wrap=True)


@app.command()
def check(
    target: str = typer.Argument(..., help="A file or folder to check, or the name[@version] of an imported dataset."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a single file (default: train)."),
    input_field: str = _input_field,
    output_field: str = _output_field,
    json_output: bool = _json_output,
    allow_empty_output: bool = _allow_empty,
    model: Optional[str] = _model,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Report parse errors, missing/empty/non-string fields, duplicates, leakage, labels and token lengths.

    Exit status 2 when the check finds errors."""
    from tunelab.datasets import FILE_FORMATS, check_dataset, check_path


    looks_like_path = "/" in target or "\\" in target or Path(target).suffix.lower() in FILE_FORMATS
    if Path(target).exists() or looks_like_path:
        report, _ = check_path(target, split=split, model=model, input_field=input_field,
                               output_field=output_field, json_output=json_output,
                               allow_empty_output=allow_empty_output)
    else:
        report = check_dataset(workspace(), target, model=model)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_report(report)
    if report.errors:
        first = report.errors[0].format()
        n = report.n_errors
        raise UserError(f"{n} error{'s' if n > 1 else ''} in {report.source}; first: {first}")


@app.command()
def split(
    name: str = typer.Argument(..., help="Dataset name[@version] to split (all its examples are pooled)."),
    test: float = typer.Option(0.1, "--test", help="Fraction for the test split."),
    validation: float = typer.Option(0.1, "--validation", help="Fraction for the validation split."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed and data give the same splits."),
    new_name: Optional[str] = typer.Option(None, "--name", help="Save under this name (default: the same name, "
                                                                 "as a new version)."),
) -> None:
    """Make seeded train/validation/test splits (stratified by label) as a new dataset version."""
    from tunelab.datasets import split_dataset


    ds = split_dataset(workspace(), name, test=test, validation=validation, seed=seed, name=new_name)
    counts = ", ".join(f"{s} {len(v)}" for s, v in ds.splits.items())
    console.print(f"split into {ds.ref} ({counts}; seed {seed})", markup=False, soft_wrap=True)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List dataset versions: name, version, created, splits, labels."""
    from tunelab.datasets import dataset_rows

    from rich.table import Table

    rows = dataset_rows(workspace())
    if as_json:
        print_json([{"name": r.name, "version": r.version, "created": r.created_at, "source": r.source,
                     "splits": r.splits, "labels": r.labels} for r in rows])
        return
    if not rows:
        console.print("no datasets yet; use 'tunelab data import PATH --name NAME'")
        return
    table = Table("name", "version", "created", "splits", "labels")
    for r in rows:
        splits = ", ".join(f"{s} {n}" for s, n in r.splits.items())
        labels = "-" if not r.labels else (", ".join(r.labels) if len(r.labels) <= 6 else f"{len(r.labels)} labels")
        table.add_row(r.name, r.version, r.created_at.strftime("%Y-%m-%d %H:%M"), splits, labels)
    console.print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="Dataset name[@version]."),
    split_name: Optional[str] = typer.Option(None, "--split", help="Split to show (default: the first)."),
    limit: int = typer.Option(10, "--limit", min=0, help="How many examples to show."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show a dataset version: splits, labels, and the first examples of a split."""
    from tunelab.datasets import get_dataset

    from rich.table import Table

    ds = get_dataset(workspace(), ref)
    split_name = split_name or next(iter(ds.splits))
    examples = ds.split(split_name)[:limit]
    if as_json:
        print_json({"name": ds.name, "version": ds.version, "source": ds.source, "labels": ds.labels,
                    "splits": {s: len(v) for s, v in ds.splits.items()}, "split": split_name,
                    "examples": [ex.to_dict() for ex in examples]})
        return
    console.print(f"{ds.ref}  source: {ds.source or '-'}", markup=False, soft_wrap=True)
    console.print("splits: " + ", ".join(f"{s} {len(v)}" for s, v in ds.splits.items()), markup=False)
    if ds.labels:
        console.print("labels: " + ", ".join(ds.labels), markup=False, soft_wrap=True)
    table = Table("#", "input", "output", title=f"{split_name} (first {len(examples)})")
    for i, ex in enumerate(examples, 1):
        table.add_row(str(i), _clip(ex.input, 200), _clip(ex.output, 80))
    console.print(table)


# -- printing ---------------------------------------------------------------------------------------

def _clip(text: str, n: int) -> str:
    text = " ".join(text.split()) if len(text) < 10 * n else " ".join(text[: 10 * n].split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _print_issues(issues, *, levels=("error", "warning", "note"), stderr: bool = False,
                  limit: int = MAX_ISSUES_SHOWN) -> None:
    out = err_console if stderr else console
    chosen = [i for i in issues if i.level in levels]
    for issue in chosen[:limit]:
        out.print(f"{issue.level}: {issue.format()}", markup=False, highlight=False, soft_wrap=True)
    if len(chosen) > limit:
        out.print(f"... and {len(chosen) - limit} more (use 'tunelab data check --json' for all)", markup=False)


def _print_report(report) -> None:
    from rich.table import Table

    console.print(f"check of {report.source} (format: {report.format}, outputs: {report.output_kind})",
                  markup=False, soft_wrap=True)
    table = Table("split", "examples", "dupes", "conflicts", "tokens p50", "p95", "max", ">context",
                  title="splits")
    for s, n in report.splits.items():
        tok = report.tokens.get("splits", {}).get(s, {})
        table.add_row(s, str(n), str(report.duplicates.get(s, 0)), str(report.conflicts.get(s, 0)),
                      str(tok.get("p50", "-")), str(tok.get("p95", "-")), str(tok.get("max", "-")),
                      str(tok.get("over_context", "-")))
    console.print(table)
    if report.tokens:
        est = " (estimated)" if report.tokens.get("estimated") else ""
        context = report.tokens.get("context")
        console.print(f"tokens{est}: input + output in {report.tokens.get('model')}'s chat template "
                      f"(+{report.tokens.get('template_overhead', 0)}), context {context if context else 'unknown'}",
                      markup=False, soft_wrap=True)
    if report.label_counts:
        splits = list(report.label_counts)
        labels_table = Table("label", *splits, title="labels")
        for label in report.labels or []:
            labels_table.add_row(label, *(str(report.label_counts[s].get(label, 0)) for s in splits))
        labels_table.add_row("imbalance (max/min)", *(f"{report.imbalance.get(s) or '-'}" for s in splits))
        console.print(labels_table)
    leaks = {k: v for k, v in report.leakage.items() if v}
    if leaks:
        console.print("leakage (shared inputs): " + ", ".join(f"{k} {v}" for k, v in leaks.items()), markup=False)
    _print_issues(report.issues)
    load = report.tokens.get("load_seconds", 0.0)
    timing = f"{report.seconds - load:.2f} s" + (f" + {load:.1f} s loading the tokenizer" if load >= 0.05 else "")
    console.print(f"{report.n_errors} errors, {report.n_warnings} warnings ({timing})", markup=False)
