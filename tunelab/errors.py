"""Errors a user can fix.

A `UserError` is bad input (a file, a flag, a name): the CLI prints its message on one line and
exits with status 2, never with a traceback. Name the file, the line and the field where there is
one, and say what was expected.
"""

from __future__ import annotations

import difflib


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


def pydantic_message(exc, model=None) -> str:
    """One line from a pydantic `ValidationError`: every problem, with the field path and what was
    expected; an unknown key names the closest known one (`model`: the pydantic class validated,
    for the known keys)."""
    return "; ".join(pydantic_error_text(err, model) for err in exc.errors())


def pydantic_error_text(err: dict, model=None, *, known: list[str] | None = None) -> str:
    """The text of one pydantic error (see `pydantic_message`); `known`: the keys accepted where
    an unknown key was found, when the caller knows them better than `model` does."""
    loc = tuple(err["loc"])
    field = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        if known is None:
            known = known_keys(model, loc[:-1]) if model is not None else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        if close:
            return f"unknown key '{field}' (did you mean '{close[0]}'?)"
        return f"unknown key '{field}'" + (f" (known keys: {', '.join(known)})" if known else "")
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    got = "" if isinstance(value, (dict, list)) or value is None or err["type"] == "missing" else f" (got {value!r})"
    return (f"field '{field}': " if field else "") + msg + got


def known_keys(model, loc: tuple = ()) -> list[str]:
    """The keys the pydantic model nested at `loc` inside `model` accepts (by alias)."""
    for part in loc:
        if model is None:
            return []
        if not isinstance(part, str) or part not in getattr(model, "model_fields", {}):
            continue  # a list index, a dict key or a union tag: the same model goes on
        model = _model_in(model.model_fields[part].annotation)
    fields = getattr(model, "model_fields", None) or {}
    return [f.alias or name for name, f in fields.items()]


def _model_in(annotation):
    """The first pydantic model class inside a type annotation (Optional, list, dict, union)."""
    if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    for meta in getattr(annotation, "__metadata__", ()) or ():
        found = _model_in(meta)
        if found is not None:
            return found
    origin = getattr(annotation, "__origin__", None)
    return _model_in(origin) if origin is not None and origin is not annotation else None
