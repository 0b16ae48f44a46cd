"""Shared fixtures. Unit tests use the fake model; tests marked `realmodel` load SmolLM2.

Real data sets live in ../shared/data (override with TUNELAB_SHARED_DATA); tests that need them
skip with a reason when the folder is absent.
"""

from __future__ import annotations

import io
import os
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TUNELAB_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Run `tunelab ARGS` in-process (through the same error handling as the real command)."""
    from tunelab.cli import run
    from tunelab.cli import _common

    out, err = io.StringIO(), io.StringIO()
    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        _common.console.file = out
        _common.err_console.file = err
        with redirect_stdout(out), redirect_stderr(err):
            code = run([str(a) for a in args])
    finally:
        _common.console.file = None
        _common.err_console.file = None
        os.chdir(old)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A fresh workspace, made the current folder."""
    from tunelab.workspace import Workspace

    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    monkeypatch.delenv("TUNELAB_DATABASE_URL", raising=False)
    ws = Workspace.init(tmp_path / "ws")
    monkeypatch.chdir(ws.root)
    return ws


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set TUNELAB_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2 converted to safetensors (once per machine, in TUNELAB_CACHE)."""
    from tunelab.models.weights import bundled_model_dir as find

    return find()


@pytest.fixture(scope="module")
def fp32_model(bundled_model_dir):
    """The bundled SmolLM2 in fp32 (batched answers equal one-at-a-time ones), once per test module."""
    from tunelab.models.local import LocalModel

    model = LocalModel(precision="fp32")
    _ = model.hf_model
    yield model
    model.close()


def pytest_addoption(parser):
    parser.addoption("--llamacpp", action="store_true", default=False,
                     help="run the tests marked llamacpp (they need the optional llama.cpp extra; "
                          "make test-llamacpp installs it and passes this; env TUNELAB_TEST_LLAMACPP=1 too)")


def pytest_collection_modifyitems(config, items):
    # Real-model and slow tests run last, so a quick failure shows first.
    def weight(item):
        return ("slow" in item.keywords) * 2 + ("realmodel" in item.keywords)

    items.sort(key=weight)
    # The llama.cpp extra's tests run only when asked for, even where the extra is installed.
    if not (config.getoption("--llamacpp") or os.environ.get("TUNELAB_TEST_LLAMACPP") == "1"):
        skip = pytest.mark.skip(reason="llama.cpp extra tests run with 'make test-llamacpp' (or pytest --llamacpp)")
        for item in items:
            if "llamacpp" in item.keywords:
                item.add_marker(skip)
