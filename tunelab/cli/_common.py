"""What every command module shares: the consoles, the global state, the workspace, JSON output."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console


console = Console(highlight=False, emoji=False)
err_console = Console(stderr=True, highlight=False, emoji=False)


@dataclass
class _State:
    workspace_path: Path | None = None


state = _State()


def workspace():
    """The workspace of this invocation (from --workspace, TUNELAB_WORKSPACE, or the cwd)."""
    from tunelab.workspace import Workspace


    return Workspace.find(state.workspace_path)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout (nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    sys.stdout.flush()
