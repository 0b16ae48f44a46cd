"""Errors a user can fix.

A `UserError` is bad input (a file, a flag, a name): the CLI prints its message on one line and
exits with status 2, never with a traceback. Name the file, the line and the field where there is
one, and say what was expected.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""

    def __init__(self, message: str, *, path: object = None, line: int | None = None, field: str | None = None):
        self.raw_message = message
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        where = ""
        if self.path is not None:
            where = str(self.path)
            if self.line is not None:
                where += f":{self.line}"
            if self.field:
                where += f": field '{self.field}'"
            where += ": "
        elif self.field:
            where = f"field '{self.field}': "
        return where + self.raw_message


class NotFound(UserError):
    """An unknown name: dataset, split, prompt, version, model, metric, run."""


def read_text(path, *, missing: str = "not found", missing_error: type[UserError] = UserError) -> str:
    """The UTF-8 text of a file the user named; a missing file, a folder or bytes that are not
    UTF-8 are a `UserError` naming the path (`missing`: the message for a missing file)."""
    from pathlib import Path

    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise missing_error(missing, path=path) from None
    except IsADirectoryError:
        raise UserError("is a folder, not a file", path=path) from None
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text", path=path) from None


def load_yaml(text: str, path: object = None):
    """`yaml.safe_load(text)`; a syntax error is a `UserError` with the file and line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"YAML error: {getattr(exc, 'problem', exc)}", path=path,
                        line=None if mark is None else mark.line + 1) from None
