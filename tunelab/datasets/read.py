"""Reading data files: JSONL (`{input, output}` records or OpenAI chat records), CSV/TSV, or a
folder of train/validation/test files. Never raises on bad content: every problem becomes an
`Issue` naming the file, the line and the field.

    files, folder_issues = read_source("data/support/")     # {split: SplitFile}
    f = read_file("data/train.jsonl", input_field="text", output_field="label")
    f.examples, f.lines, f.issues

Formats: `.jsonl` with `input`/`output` fields (other names mapped with `input_field=`/
`output_field=`; other fields go into `meta`), chat `.jsonl` in the OpenAI fine-tuning format
(`{"messages": [...]}`: the last user message is the input, the final assistant message the
output, a system message `meta["system"]`, earlier turns `meta["history"]`), `.csv`/`.tsv` with
a header, or a folder of `train`/`validation` (`val`, `dev`)/`test` files kept as those splits.
An empty output is an error unless `allow_empty_output=True`; a non-string output is an error
unless `json_output=True` (objects, arrays and numbers become JSON strings).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tunelab.datasets.examples import SPLITS, Example
from tunelab.errors import UserError

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test"}
CHAT_ROLES = ("system", "user", "assistant")
MAX_ISSUES_PER_KIND = 50        # per file (or split) and kind; the rest are counted in one summary issue

@dataclass
class Issue:
    """One problem found in a data file or a dataset: an error blocks import, a warning does not."""

    level: str                  # "error" | "warning" | "note"
    kind: str                   # short code: encoding, json, not_object, missing_field, empty, ...
    message: str
    path: str | None = None
    line: int | None = None
    field: str | None = None
    count: int = 1              # a summary issue stands for this many problems of its kind

    def format(self) -> str:
        return UserError(self.message, path=self.path, line=self.line, field=self.field).format()

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "kind": self.kind, "message": self.message, "path": self.path,
                "line": self.line, "field": self.field, "count": self.count}


class Issues(list):
    """A list of issues that keeps at most MAX_ISSUES_PER_KIND per kind and counts the rest."""

    def __init__(self, path: str | None = None):
        super().__init__()
        self.path = path
        self._counts: Counter = Counter()

    def add(self, level: str, kind: str, message: str, line: int | None = None, field: str | None = None,
            path: str | None = None) -> None:
        self._counts[(level, kind, path or self.path)] += 1
        if self._counts[(level, kind, path or self.path)] <= MAX_ISSUES_PER_KIND:
            self.append(Issue(level, kind, message, path or self.path, line, field))

    def finish(self) -> "Issues":
        for (level, kind, path), n in list(self._counts.items()):
            if n > MAX_ISSUES_PER_KIND:
                more = n - MAX_ISSUES_PER_KIND
                self.append(Issue(level, kind, f"... and {more} more '{kind}' {level}s", path, count=more))
        self._counts.clear()
        return self


@dataclass
class SplitFile:
    """The examples read from one file, the line each came from, and the problems found."""

    path: Path
    format: str                 # "jsonl" | "chat" | "csv"
    examples: list[Example]
    lines: list[int]
    issues: list[Issue]


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    return "a string" if isinstance(value, str) else f"a {type(value).__name__}"


def clip_text(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _text_value(value: Any, name: str, *, is_output: bool, json_output: bool, allow_empty_output: bool,
                add: Callable[..., None], line: int | None, field: str | None = None) -> str | None:
    """`value` as the text of an input or output; problems are added as issues (then None)."""
    field = field or name
    what = "output" if is_output else "input"
    if value is None:
        add("error", "null", f"is null; expected the {what} as a string", line, field)
        return None
    if isinstance(value, str):
        if value.strip():
            return value
        if is_output and allow_empty_output:
            return value
        hint = "; pass --allow-empty-output to keep examples without an answer" if is_output else ""
        add("error", "empty", f"is empty; expected the {what} text{hint}", line, field)
        return None
    if is_output and json_output:
        return json.dumps(value, ensure_ascii=False)
    if is_output and isinstance(value, (dict, list)):
        hint = "serialize it to a JSON string, or pass --json-output to do that on import"
    elif is_output:
        hint = f"quote it ({json.dumps(json.dumps(value))}), or pass --json-output"
    else:
        hint = "the input must be text"
    add("error", "not_string", f"expected a string, got {_kind_of(value)}; {hint}", line, field)
    return None


def _binary_problem(data: bytes) -> str | None:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "is UTF-16 text; re-save it as UTF-8"
    nul = data.find(b"\x00")
    if nul >= 0:
        return f"is a binary file, not UTF-8 text (NUL byte at byte offset {nul})"
    head = data[:65536]
    control = sum(head.count(bytes([b])) for b in (*range(1, 9), *range(14, 32)) if b != 27)
    if head and control / len(head) > 0.1:
        return "is a binary file, not UTF-8 text (mostly control bytes)"
    return None


def _encoding_message(raw: bytes, exc: UnicodeDecodeError, start: int) -> str:
    byte = raw[exc.start] if exc.start < len(raw) else 0
    return (f"not UTF-8 text (byte 0x{byte:02X} at byte offset {start + exc.start}); "
            "if the file is Latin-1 or Windows-1252, re-save it as UTF-8")


def read_file(path: str | Path, *, input_field: str = "input", output_field: str = "output",
              json_output: bool = False, allow_empty_output: bool = False) -> SplitFile:
    """Read one `.jsonl` (input/output or chat) or `.csv`/`.tsv` file; never raises on bad content:
    every problem becomes an issue naming the file, the line and the field."""
    path = Path(path)
    issues = Issues(str(path))
    fmt = FILE_FORMATS.get(path.suffix.lower())
    opts = dict(input_field=input_field, output_field=output_field, json_output=json_output,
                allow_empty_output=allow_empty_output)
    result = SplitFile(path, fmt or "unknown", [], [], issues)
    if input_field == output_field:
        raise UserError(f"the input and output fields are both '{input_field}'")
    if fmt is None:
        issues.add("error", "format", f"unsupported file type '{path.suffix or '(none)'}': expected .jsonl "
                   "(input/output records or chat messages) or .csv")
        return result
    try:
        data = path.read_bytes()
    except OSError as exc:
        issues.add("error", "read", f"cannot read: {exc.strerror or exc}")
        return result
    if not data:
        issues.add("error", "empty_file", "is empty (0 bytes): expected one example per line")
        return result
    problem = _binary_problem(data)
    if problem:
        issues.add("error", "binary", problem)
        return result
    if not data.strip():
        issues.add("error", "empty_file", "has only blank lines: expected one example per line")
        return result
    if fmt == "jsonl":
        _read_jsonl(data, result, issues, **opts)
    else:
        _read_csv(data, result, issues, delimiter="\t" if path.suffix.lower() == ".tsv" else ",", **opts)
    if not result.examples and not any(i.level == "error" for i in issues):
        issues.add("error", "no_examples", "has no examples")
    issues.finish()
    return result


def _read_jsonl(data: bytes, result: SplitFile, issues: Issues, *, input_field: str, output_field: str,
                json_output: bool, allow_empty_output: bool) -> None:
    opts = dict(json_output=json_output, allow_empty_output=allow_empty_output, add=issues.add)
    mode: str | None = None
    offset = 0
    first_content_line = True
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        start = offset
        offset += len(raw) + 1
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw, start = raw[3:], start + 3
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            issues.add("error", "encoding", _encoding_message(raw, exc, start), lineno)
            first_content_line = False
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = ""
            if first_content_line and text.strip() in ("[", "{"):
                hint = "; the file looks like one pretty-printed JSON document: JSONL needs one object per line"
            issues.add("error", "json", f"not valid JSON: {exc.msg} (column {exc.colno}){hint}", lineno)
            first_content_line = False
            continue
        except RecursionError:
            issues.add("error", "json", "not valid JSON: nested too deeply", lineno)
            continue
        first_content_line = False
        if not isinstance(obj, dict):
            issues.add("error", "not_object", f"expected a JSON object like "
                       f"{{\"{input_field}\": ..., \"{output_field}\": ...}}, got {_kind_of(obj)}", lineno)
            continue
        if mode is None:
            mode = "chat" if "messages" in obj and input_field not in obj else "plain"
            result.format = "chat" if mode == "chat" else "jsonl"
        if mode == "chat":
            ex = _chat_example(obj, lineno, **opts)
        else:
            ex = _plain_example(obj, lineno, input_field=input_field, output_field=output_field, **opts)
        if ex is not None:
            result.examples.append(ex)
            result.lines.append(lineno)


def _plain_example(obj: dict, line: int, *, input_field: str, output_field: str, json_output: bool,
                   allow_empty_output: bool, add: Callable[..., None]) -> Example | None:
    values = []
    for name, is_output in ((input_field, False), (output_field, True)):
        if name not in obj:
            if "messages" in obj:
                hint = "; this record is in the chat format but the file's first record is not (one format a file)"
            else:
                have = ", ".join(obj) or "none"
                hint = f" (fields here: {have}; map yours with --input-field/--output-field)"
            add("error", "missing_field", f"missing field '{name}'{hint}", line, name)
            values.append(None)
            continue
        values.append(_text_value(obj[name], name, is_output=is_output, json_output=json_output,
                                  allow_empty_output=allow_empty_output, add=add, line=line))
    if values[0] is None or values[1] is None:
        return None
    meta = {k: v for k, v in obj.items() if k not in (input_field, output_field)}
    if isinstance(meta.get("meta"), dict):
        meta = {**meta.pop("meta"), **meta}
    return Example(values[0], values[1], meta)


def _chat_example(obj: dict, line: int, *, json_output: bool, allow_empty_output: bool,
                  add: Callable[..., None]) -> Example | None:
    """An OpenAI fine-tuning record -> Example (last user turn -> input, final assistant -> output)."""
    if "messages" not in obj:
        add("error", "missing_field", "missing field 'messages' (the file's first record is in the chat "
            "format, so every record must be)", line, "messages")
        return None
    msgs = obj["messages"]
    if not isinstance(msgs, list):
        add("error", "not_list", f"expected a list of messages, got {_kind_of(msgs)}", line, "messages")
        return None
    if not msgs:
        add("error", "empty", "is an empty list; expected user and assistant messages", line, "messages")
        return None
    ok = True
    for i, msg in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            add("error", "not_object", f"expected a message object with 'role' and 'content', got "
                f"{_kind_of(msg)}", line, where)
            ok = False
            continue
        role = msg.get("role")
        if role not in CHAT_ROLES:
            shown = "missing" if "role" not in msg else f"unknown role {json.dumps(role, ensure_ascii=False)}"
            add("error", "role", f"{shown}; expected one of {', '.join(CHAT_ROLES)}", line, f"{where}.role")
            ok = False
        if not isinstance(msg.get("content"), str):
            got = "missing" if "content" not in msg else f"got {_kind_of(msg.get('content'))}"
            add("error", "not_string", f"expected the message text as a string, {got}", line, f"{where}.content")
            ok = False
    if not ok:
        return None
    if msgs[-1]["role"] != "assistant":
        add("error", "chat_shape", f"the last message must be the assistant's answer (it is '{msgs[-1]['role']}')",
            line, f"messages[{len(msgs) - 1}].role")
        return None
    users = [i for i, m in enumerate(msgs[:-1]) if m["role"] == "user"]
    if not users:
        add("error", "chat_shape", "has no user message before the assistant's answer", line, "messages")
        return None
    k = users[-1]
    if k != len(msgs) - 2:
        add("error", "chat_shape", f"expected the final assistant message right after the last user message "
            f"(messages[{k}]), found '{msgs[k + 1]['role']}' between them", line, f"messages[{k + 1}]")
        return None
    last = len(msgs) - 1
    output = _text_value(msgs[-1]["content"], "content", is_output=True, json_output=json_output,
                         allow_empty_output=allow_empty_output, add=add, line=line, field=f"messages[{last}].content")
    text = _text_value(msgs[k]["content"], "content", is_output=False, json_output=False,
                       allow_empty_output=False, add=add, line=line, field=f"messages[{k}].content")
    if output is None or text is None:
        return None
    meta = {key: v for key, v in obj.items() if key != "messages"}
    start = 0
    if msgs[0]["role"] == "system":
        meta["system"] = msgs[0]["content"]
        start = 1
    if k > start:
        meta["history"] = [{"role": m["role"], "content": m["content"]} for m in msgs[start:k]]
    return Example(text, output, meta)


def _read_csv(data: bytes, result: SplitFile, issues: Issues, *, delimiter: str, input_field: str,
              output_field: str, json_output: bool, allow_empty_output: bool) -> None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raw = data[line_start: data.find(b"\n", exc.start) if b"\n" in data[exc.start:] else len(data)]
        inner = UnicodeDecodeError(exc.encoding, exc.object, exc.start - line_start, exc.end - line_start, exc.reason)
        bad = sum(1 for chunk in data.split(b"\n") if not _is_utf8(chunk))
        more = f" ({bad} lines are not UTF-8)" if bad > 1 else ""
        issues.add("error", "encoding", _encoding_message(raw, inner, line_start) + more, line)
        return
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a 5 MB cell is a warning, not a crash
    # strict: a quote that never closes, or text after a closing quote, is an error naming the line
    # (not a field that silently swallows the rows after it)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    positions: tuple[int, int] | None = None
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            issues.add("error", "csv", _csv_error(exc, delimiter), start_line)
            return
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            dupes = sorted(n for n, c in Counter(header).items() if c > 1)
            if dupes:
                issues.add("error", "header", f"the header repeats column '{dupes[0]}'", start_line, dupes[0])
                return
            missing = [n for n in (input_field, output_field) if n not in header]
            for name in missing:
                issues.add("error", "missing_field", f"missing column '{name}' in the header (columns: "
                           f"{', '.join(header)}); name yours with --input-field/--output-field", start_line, name)
            if missing:
                return
            positions = (header.index(input_field), header.index(output_field))
            continue
        if len(row) != len(header):
            issues.add("error", "ragged", f"expected {len(header)} columns (as in the header), got {len(row)}",
                       start_line)
            continue
        values = [_text_value(row[pos], name, is_output=is_output, json_output=json_output,
                              allow_empty_output=allow_empty_output, add=issues.add, line=start_line)
                  for pos, name, is_output in ((positions[0], input_field, False), (positions[1], output_field, True))]
        if values[0] is None or values[1] is None:
            continue
        meta = {name: cell for i, (name, cell) in enumerate(zip(header, row)) if i not in positions}
        result.examples.append(Example(values[0], values[1], meta))
        result.lines.append(start_line)
    if header is not None and not result.examples and not any(i.level == "error" for i in issues):
        issues.add("error", "no_examples", "has a header but no rows", 1)


def _csv_error(exc: csv.Error, delimiter: str) -> str:
    text = str(exc)
    if "unexpected end of data" in text:
        return ("CSV error: a quoted field that starts on this line is never closed (unterminated quote); "
                "close the quote, or double a quote inside a quoted field (\"\")")
    if "expected after" in text:
        return (f"CSV error: text after a closing quote ({text}); quote the whole field and double the "
                "quotes inside it (\"\")")
    return f"CSV error: {text}"


def _is_utf8(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def read_source(path: str | Path, *, split: str | None = None, **read_opts: Any) -> tuple[dict[str, SplitFile], list[Issue]]:
    """A file (one split: `split`, default train) or a folder of train/validation/test files.
    Returns the files read by split, and the problems of the folder itself."""
    path = Path(path)
    if not path.exists():
        raise UserError("no such file or folder", path=path)
    issues = Issues(str(path))
    if not path.is_dir():
        split = split or "train"
        if split not in SPLITS:
            raise UserError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
        return {split: read_file(path, **read_opts)}, issues
    if split is not None:
        raise UserError("--split names the split of a single file; a folder's files are named by split", path=path)
    files: dict[str, Path] = {}
    for child in sorted(path.iterdir()):
        if child.name.startswith(".") or not child.is_file() or child.suffix.lower() not in FILE_FORMATS:
            continue
        name = SPLIT_ALIASES.get(child.stem.lower())
        if name is None:
            issues.add("warning", "ignored", f"ignored {child.name}: a folder's data files are named train, "
                       "validation (or val, dev) and test")
        elif name in files:
            issues.add("error", "split_twice", f"both {files[name].name} and {child.name} would be the '{name}' split")
        else:
            files[name] = child
    if not files:
        issues.add("error", "no_files", "has no train, validation or test file (.jsonl or .csv)")
    ordered = {s: files[s] for s in SPLITS if s in files}
    return {s: read_file(p, **read_opts) for s, p in ordered.items()}, issues.finish()
