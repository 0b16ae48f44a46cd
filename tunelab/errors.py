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
