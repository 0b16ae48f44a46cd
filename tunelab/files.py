"""Reading the files a user names, and writing files so that a crash never leaves half of one.

    text = read_text(path)                 # UserError naming the path: missing, a folder, not UTF-8
    data = load_yaml(text, path)           # UserError with the file and line of a YAML error
    write_atomic(path, text)               # a temporary file beside it, then an atomic rename
    write_json(path, data)                 # the same, as indented JSON
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunelab.errors import UserError


def read_text(path, *, missing: str = "not found", missing_error: type[UserError] = UserError) -> str:
    """The UTF-8 text of a file the user named; a missing file, a folder or bytes that are not
    UTF-8 are a `UserError` naming the path (`missing`: the message for a missing file)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise missing_error(missing, path=path) from None
    except IsADirectoryError:
        raise UserError("is a folder, not a file", path=path) from None
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text", path=path) from None


def load_yaml(text: str, path: object = None) -> Any:
    """`yaml.safe_load(text)`; a syntax error is a `UserError` with the file and line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(f"YAML error: {getattr(exc, 'problem', exc)}", path=path,
                        line=None if mark is None else mark.line + 1) from None


def write_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a reader
    sees the old file or the new one, never half of one. Makes the folder when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically."""
    return write_atomic(path, json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
