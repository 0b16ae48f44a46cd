"""The architecture, checked (docs/architecture.md): the layers and no import cycles (import-linter,
configured in pyproject.toml), tunelab's own imports at the top of library modules, and modules of
a readable size."""

from __future__ import annotations

import ast
import contextlib
import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tunelab"
MAX_LINES = 600
REASON = "# longer than 600 lines:"


def test_the_import_contract_holds():
    """cli -> server -> flow -> compare -> hybrid | optimize | finetune -> evaluate | judge -> metrics
    -> prompts -> demos -> datasets -> models -> workspace -> store | files | canonical | stats -> errors,
    and no two modules of one package import each other in a cycle."""
    pytest.importorskip("importlinter", reason="import-linter is a dev dependency")
    from importlinter.application import use_cases as lint
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does first
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        kept = lint.lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    assert kept, out.getvalue()


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts)


def test_library_modules_import_tunelab_at_the_top():
    """A function-level import of tunelab's own modules hides the import graph. The CLI is the one
    exception: its commands import the library when they run, so `tunelab --help` stays instant."""
    hidden = []
    for path in _modules():
        rel = path.relative_to(ROOT)
        if rel.parts[:2] == ("tunelab", "cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("tunelab"):
                        hidden.append(f"{rel}:{sub.lineno} from {sub.module}")
                    elif isinstance(sub, ast.Import) and any(a.name.startswith("tunelab") for a in sub.names):
                        hidden.append(f"{rel}:{sub.lineno} import {sub.names[0].name}")
    assert not hidden, "move these imports to the top of their module:\n" + "\n".join(hidden)


def test_modules_stay_readable_or_say_why_not():
    long = []
    for path in _modules():
        lines = path.read_text(encoding="utf-8").splitlines()
        if len(lines) > MAX_LINES and not any(line.startswith(REASON) for line in lines[:3]):
            long.append(f"{path.relative_to(ROOT)}: {len(lines)} lines")
    assert not long, f"split these, or put a line '{REASON} WHY' at the top:\n" + "\n".join(long)


def test_importing_tunelab_bounds_onednn_primitive_cache_unless_the_user_set_it():
    """oneDNN's primitive cache (1,024 by default) held hundreds of MB over a flow: tunelab sets 64
    before torch builds a primitive, and keeps a value the user chose."""
    import os
    import subprocess
    import sys

    code = "import tunelab, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "64"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "512"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "512"
