"""The command line as a whole: help everywhere, fast help, errors without tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer.main

from tunelab.cli import app

TUNELAB = str(Path(sys.executable).with_name("tunelab"))


def _walk(command, path: tuple[str, ...] = ()):
    yield path, command
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _walk(sub, path + (name,))


def test_every_command_and_option_has_help_text():
    root = typer.main.get_command(app)
    missing = []
    for path, command in _walk(root):
        if path and not (command.help or command.short_help):
            missing.append(" ".join(path))
        for param in command.params:
            if param.param_type_name == "option" and not param.help and param.name not in {"help"}:
                missing.append(f"{' '.join(path)} --{param.name}")
            if param.param_type_name == "argument" and not getattr(param, "help", None):
                missing.append(f"{' '.join(path)} {param.name.upper()} (argument)")
    assert not missing, f"commands/options without help text: {missing}"
    assert len(list(_walk(root))) > 10  # the walk really reached the subcommands


def test_help_is_fast_and_imports_no_torch():
    probe = ("import sys, time; t=time.perf_counter(); "
             "from tunelab.cli import run; "
             "import contextlib, io; buf=io.StringIO(); "
             "ctx=contextlib.redirect_stdout(buf); ctx.__enter__(); run(['--help']); ctx.__exit__(None,None,None); "
             "heavy=[m for m in ('torch','transformers','peft','matplotlib','trl','fastapi') if m in sys.modules]; "
             "print(heavy)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    best = min(_timed([TUNELAB, "--help"]) for _ in range(3))
    assert best < 0.5, f"tunelab --help took {best:.2f}s"


def _timed(cmd: list[str]) -> float:
    """CPU seconds the command used (robust to a machine busy with other work, unlike wall time)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def test_every_subcommand_help_runs(cli):
    root = typer.main.get_command(app)
    for path, _command in _walk(root):
        result = cli(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        assert "Usage" in result.output


def test_user_error_outside_a_workspace_is_one_line_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TUNELAB_WORKSPACE"}
    # any command that needs a workspace; `data list` belongs to the data module
    proc = subprocess.run([TUNELAB, "data", "list"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "tunelab init" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2_without_traceback(tmp_path):
    proc = subprocess.run([TUNELAB, "init", "--no-such-flag"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "No such option" in proc.stderr
