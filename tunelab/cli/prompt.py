"""`tunelab prompt ...` (prompt files and their versions) and `tunelab run` (the playground).

Thin: every command is a call into `tunelab.prompts` plus printing.
"""

from __future__ import annotations

from typing import List, Optional

import typer

from tunelab.cli._common import console, print_json, state, workspace
from tunelab.errors import UserError

app = typer.Typer(help="Prompt files and their versions: check, commit, log, diff, show, tag, rollback.",
                  no_args_is_help=True)


def _optional_workspace():
    """The workspace when there is one; `prompt check FILE` and `run FILE` also work outside one."""

    try:
        return workspace()
    except UserError:
        if state.workspace_path is not None:
            raise
        return None


def _print_messages(messages: list[dict]) -> None:
    for m in messages:
        console.print(f"[bold]{m['role']}:[/bold]")
        console.print(m["content"], markup=False)


def _output_text(prompt) -> str:
    out = prompt.output
    if out.type == "label":
        return f"label ({', '.join(out.labels or [])})"
    if out.type == "json":
        return "json" + (" with schema" if out.schema is not None else "")
    return "text"


def _example(input_text: Optional[str], fields: List[str]):

    from tunelab.datasets import Example

    meta = {}
    for item in fields:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--field expects KEY=VALUE, got '{item}'")
        meta[key.strip()] = value
    if input_text is None:
        return Example(input="This is a sample input.", output="", meta=meta) if meta else None
    if input_text == "-":
        import sys

        input_text = sys.stdin.read()
    return Example(input=input_text, output="", meta=meta)


@app.command()
def check(
    file: str = typer.Argument(..., help="A .prompt file, or a prompt name of the workspace (NAME[@VERSION])."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Sample input to render ('-' reads stdin)."),
    field: List[str] = typer.Option([], "--field", "-f", help="An extra example field, KEY=VALUE (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", "-d",
                                       help="Render the first example of DATASET[:SPLIT] (default split train)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Validate a prompt file and render it against a sample input (exit status 2 when invalid)."""
    from tunelab.models import template_of
    from tunelab.prompts import check_prompt


    ws = _optional_workspace()
    prompt, messages, example = check_prompt(ws, file, sample=_example(input, field), data=data)
    template = template_of(prompt.model, ws)
    if as_json:
        print_json({"name": prompt.name, "version": prompt.version, "model": prompt.model, "template": template,
                    "output": {k: v for k, v in prompt.output.to_dict().items() if v is not None},
                    "max_tokens": prompt.max_tokens, "temperature": prompt.temperature,
                    "input": example.input, "messages": messages})
        return
    console.print(f"ok: {prompt.where} (version {prompt.version}; model {prompt.model}, rendered with {template}; "
                  f"output {_output_text(prompt)}; max_tokens {prompt.max_tokens}; "
                  f"temperature {prompt.temperature:g})", markup=False)
    _print_messages(messages)


@app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")) -> None:
    """List the workspace's prompts: current version, labels, working-file status."""
    from tunelab.prompts import list_prompts


    rows = list_prompts(workspace())
    if as_json:
        print_json([r.to_dict() for r in rows])
        return
    if not rows:
        console.print("no prompts yet: write prompts/NAME.prompt, then: tunelab prompt commit NAME -m MESSAGE")
        return
    from rich.table import Table

    table = Table("name", "current", "working file", "labels", "commits")
    for r in rows:
        labels = ", ".join(f"{k}={v[:7]}" for k, v in r.labels.items())
        table.add_row(r.name, r.current or "-", r.status, labels, str(r.commits))
    console.print(table)


@app.command()
def commit(
    name: str = typer.Argument(..., help="Prompt name (the file prompts/NAME.prompt)."),
    message: str = typer.Option(..., "--message", "-m", help="What changed and why."),
    author: Optional[str] = typer.Option(None, help="Author (default: tunelab.yaml author, $USER, git)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new version as JSON."),
) -> None:
    """Record the working file as a new version and make it current."""
    from tunelab.prompts import commit_prompt


    version = commit_prompt(workspace(), name, message, author=author)
    if as_json:
        print_json({"name": name, "version": version})
    else:
        console.print(f"committed {name}@{version}", markup=False)


@app.command()
def log(
    name: str = typer.Argument(..., help="Prompt name."),
    as_json: bool = typer.Option(False, "--json", help="Print the history as JSON."),
) -> None:
    """Show a prompt's history, newest first: version, parent, labels, author, time, message."""
    from tunelab.prompts import prompt_log


    commits = prompt_log(workspace(), name)
    if as_json:
        print_json([c.to_dict() for c in commits])
        return
    if not commits:
        console.print(f"{name} has no commits yet (tunelab prompt commit {name} -m MESSAGE)", markup=False)
    for i, c in enumerate(commits):
        tags = ["current"] if i == 0 else []
        tags += c.labels
        suffix = f" ({', '.join(tags)})" if tags else ""
        console.print(f"[bold]{c.version}[/bold]{suffix}  parent {c.parent or '-'}", highlight=False)
        console.print(f"  {c.created_at:%Y-%m-%d %H:%M:%S}  {c.author}  {c.message}", markup=False)


@app.command()
def diff(
    a: str = typer.Argument(..., help="NAME (the working file), NAME@VERSION, NAME@LABEL or NAME@current."),
    b: Optional[str] = typer.Argument(None, help="The other side (default: the working file of A's prompt)."),
) -> None:
    """Unified diff of two prompt versions (default: the current version vs the working file)."""
    from tunelab.prompts import diff_prompts


    text = diff_prompts(workspace(), a, b)
    if not text:
        console.print("no differences")
        return
    for line in text.splitlines():
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else None
        console.print(line, style=style, markup=False)


@app.command()
def show(ref: str = typer.Argument(..., help="NAME, NAME@VERSION, NAME@LABEL or NAME@current.")) -> None:
    """Print the text of a prompt version."""
    from tunelab.prompts import show_prompt

    import sys

    sys.stdout.write(show_prompt(workspace(), ref))
    sys.stdout.flush()


@app.command()
def tag(
    ref: str = typer.Argument(..., help="NAME@VERSION (or NAME@LABEL, NAME@current) to point at."),
    label: str = typer.Argument(..., help="The label, e.g. production."),
    note: str = typer.Option("", "--note", help="Why (kept with the label and in the deploy history)."),
    allow_override: List[str] = typer.Option([], "--allow-override", help="A request setting clients calling "
                                             "NAME@LABEL may override: temperature, max_tokens or stop (repeatable)."),
    no_overrides: bool = typer.Option(False, "--no-overrides", help="Clients may override nothing (the default "
                                      "for a new label; an existing label keeps its setting unless given)."),
) -> None:
    """Deploy: point a label (e.g. production) at a version; moves the label if it exists."""
    from tunelab.prompts import parse_ref, tag_prompt

    overrides = [] if no_overrides else (allow_override or None)
    version = tag_prompt(workspace(), ref, label, note=note, overrides=overrides)
    console.print(f"{parse_ref(ref)[0]}@{label} -> {version}", markup=False)


@app.command()
def rollback(
    name: str = typer.Argument(..., help="Prompt name."),
    version: str = typer.Argument(..., help="The version (a unique prefix) or label to make current again."),
    force: bool = typer.Option(False, "--force", help="Discard uncommitted changes in the working file."),
) -> None:
    """Make an old version current again: rewrite the working file and record a commit."""
    from tunelab.prompts import rollback_prompt


    done = rollback_prompt(workspace(), name, version, force=force)
    if done is None:
        console.print(f"{name}@{version} is already current; working file restored", markup=False)
    else:
        console.print(f"rolled back {name} to {done}", markup=False)


def run(
    prompt: str = typer.Argument(..., help="A prompt (NAME[@VERSION|@LABEL]), a .prompt file, ft:NAME or hybrid:NAME."),
    input: str = typer.Option(..., "--input", "-i", help="The input text ('-' reads stdin)."),
    field: List[str] = typer.Option([], "--field", "-f", help="An extra example field, KEY=VALUE (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec (default: the prompt's model)."),
    precision: Optional[str] = typer.Option(None, help="Local models: auto, bf16 or fp32."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Run one input through a candidate (a prompt, a .prompt file, ft:NAME or hybrid:NAME), exactly as
    an evaluation measures it and the gateway serves it: the answer, tokens and latency."""
    from tunelab.evaluate import answer


    result = answer(_optional_workspace(), prompt, _example(input, field), model=model, precision=precision)
    if as_json:
        print_json(result)
        return
    console.print(result["output"], markup=False)
    probs = result.get("label_probs")
    if probs:
        for label, p in sorted(probs.items(), key=lambda kv: -kv[1]):
            bar = "#" * int(round(p * 20))
            console.print(f"  {label:<20} {p:6.1%} {bar}", markup=False)
    console.print(f"[dim]{result['prompt']} on {result['model']}: {result['prompt_tokens']} prompt + "
                  f"{result['completion_tokens']} completion tokens, {result['latency_s'] * 1000:.0f} ms[/dim]")
