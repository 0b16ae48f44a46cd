"""The README's tour names real commands and real flags (a doc that drifts from the CLI fails here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer.main

from tunelab.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.splitlines():
            for part in line.split("&&"):
                part = part.split("#", 1)[0].strip()
                if part.startswith("tunelab "):
                    commands.append(shlex.split(part)[1:])
    return commands


def test_readme_opens_with_the_two_commands():
    head = README.read_text(encoding="utf-8")[:600]
    assert "make demo" in head and "make test" in head


def test_every_tour_command_and_flag_exists():
    commands = _tour_commands()
    assert len(commands) >= 10
    root = typer.main.get_command(app)
    for argv in commands:
        command, rest = root, list(argv)
        while rest and hasattr(command, "commands") and rest[0] in command.commands:
            command = command.commands[rest.pop(0)]
        if hasattr(command, "commands"):  # a group with a default command (tunelab eval CANDIDATE)
            command = command.commands[getattr(command, "default_command")]
        flags = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        used = [a.split("=", 1)[0] for a in rest if a.startswith("-")]
        unknown = [f for f in used if f not in flags]
        assert not unknown, f"README: 'tunelab {' '.join(argv)}' uses unknown flags {unknown}"
