"""The `tunelab` command: thin — it parses, calls the library, and prints.

Each command group lives in its own module here (`data.py`, `prompt.py`, ...) and imports heavy
libraries (torch, transformers) inside its functions, so `tunelab --help` stays instant.

Errors: a `UserError` raised anywhere prints as one line on stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from tunelab.cli._common import err_console, state
from tunelab.errors import UserError

app = typer.Typer(
    name="tunelab",
    help="Prompt engineering or fine-tuning? tunelab measures both on your data and tells you.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    workspace: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar="TUNELAB_WORKSPACE",
        help="Workspace folder (default: found upward from the current folder).",
    ),
) -> None:
    """Prompt engineering or fine-tuning? tunelab measures both on your data and tells you."""
    state.workspace_path = workspace


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Folder to make the workspace in."),
    name: Optional[str] = typer.Option(None, help="Workspace name (default: the folder's name)."),
) -> None:
    """Make a workspace: tunelab.yaml, prompts/, data/ and .tunelab/ (database, artifacts)."""
    from tunelab.workspace import Workspace


    ws = Workspace.init(directory, name=name)
    typer.echo(f"workspace ready at {ws.root}")


# -- command groups: one module each (add a line here when a module lands) -----------------------
# e.g.  from tunelab.cli import data as _data  # noqa: E402
#       app.add_typer(_data.app, name="data")
from tunelab.cli import serve as _serve  # noqa: E402

app.command(name="serve")(_serve.serve)
app.command(name="worker")(_serve.worker)
app.add_typer(_serve.keys_app, name="keys")
app.add_typer(_serve.logs_app, name="logs")
app.add_typer(_serve.users_app, name="users")
from tunelab.cli import prompt as _prompt  # noqa: E402

app.add_typer(_prompt.app, name="prompt")
app.command(name="run")(_prompt.run)
from tunelab.cli import data as _data  # noqa: E402

app.add_typer(_data.app, name="data")
from tunelab.cli import evaluate as _evaluate  # noqa: E402

app.add_typer(_evaluate.app, name="eval")
from tunelab.cli import compare as _compare  # noqa: E402

app.command(name="compare")(_compare.compare)
app.command(name="advise")(_compare.advise)
app.add_typer(_compare.hybrid_app, name="hybrid")
app.command(name="demo")(_compare.demo)
from tunelab.cli import flow as _flow  # noqa: E402

app.command(name="flow")(_flow.flow)
from tunelab.cli import optimize as _optimize  # noqa: E402

app.command(name="optimize")(_optimize.optimize)
from tunelab.cli import finetune as _finetune  # noqa: E402

app.command(name="finetune")(_finetune.finetune)
app.command(name="export")(_finetune.export)
from tunelab.cli import lifecycle as _lifecycle  # noqa: E402

app.add_typer(_lifecycle.rollout_app, name="rollout")
app.command(name="promote")(_lifecycle.promote)
app.command(name="rollback")(_lifecycle.rollback)
app.command(name="distill")(_lifecycle.distill)
app.command(name="monitor")(_lifecycle.monitor)
# -------------------------------------------------------------------------------------------------


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status (used by `main` and by the tests).

    Usage errors are printed by typer with status 2; a `UserError` from the library prints as
    one line with status 2; nothing a user can cause ends in a traceback.
    """
    try:
        app(args=argv, prog_name="tunelab", standalone_mode=True)
    except SystemExit as exc:
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    except UserError as exc:
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is kept (run the same command again to resume)")
        return 130
    return 0


def main() -> None:
    sys.exit(run())
