"""Datasets: versioned examples `{input, output, meta}` in named splits.

An imported dataset is written under the artifacts folder as one JSONL file per split and
registered in the store; its version is the sha256 of its canonical content, so the same data
gets the same version on any machine.

    ds = get_dataset(workspace, "support")          # newest version; "support@1a2b3c" for one
    ds.split("test")                                # list[Example]; unknown split -> NotFound

Reading and checking files:

    report, splits = check_path("data/support.jsonl")   # every problem, by file, line and field
    ds, report = import_dataset(workspace, "data/support/", name="support")  # refuses on errors
    ds = split_dataset(workspace, "support", test=0.1, validation=0.1, seed=0)  # a new version

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
import functools
import hashlib
import io
import json
import math
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from sqlalchemy import select

from tunelab.errors import NotFound, UserError
from tunelab.store.models import DatasetRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SPLITS = ("train", "validation", "test")


@dataclass
class Example:
    input: str
    output: str
    meta: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The variables a prompt template sees: `input`, `output`, and every other field."""
        return {**self.meta, "input": self.input, "output": self.output}

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"input": self.input, "output": self.output}
        if self.meta:
            data["meta"] = self.meta
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Example":
        return cls(input=data["input"], output=data["output"], meta=dict(data.get("meta") or {}))


@dataclass
class Dataset:
    name: str
    version: str
    splits: dict[str, list[Example]]
    source: str = ""
    labels: list[str] | None = None  # set when outputs look like class labels
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def split(self, name: str) -> list[Example]:
        if name not in self.splits:
            have = ", ".join(self.splits) or "none"
            raise NotFound(f"dataset '{self.name}' has no split '{name}' (splits: {have})")
        return self.splits[name]

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())


def content_version(splits: dict[str, list[Example]]) -> str:
    """sha256 of the canonical JSON of all splits (first 12 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(json.dumps(name).encode())
        for ex in splits[name]:
            h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
            h.update(b"\n")
    return h.hexdigest()[:12]


def infer_labels(examples: Iterable[Example], max_labels: int = 50) -> list[str] | None:
    """The distinct outputs, when they look like class labels (few, short, repeated)."""
    outputs = [ex.output for ex in examples]
    distinct = sorted(set(outputs))
    if not outputs or len(distinct) > max_labels or len(distinct) > max(2, len(outputs) // 2):
        return None
    if any(len(o) > 60 or "\n" in o or o.lstrip().startswith(("{", "[")) for o in distinct):
        return None
    return distinct


def save_dataset(workspace: "Workspace", name: str, splits: dict[str, list[Example]], *,
                 source: str = "", check: dict | None = None, meta: dict | None = None) -> Dataset:
    """Write the splits under the artifacts folder and register the version (idempotent)."""
    validate_name(name, "dataset")
    splits = {k: v for k, v in splits.items() if v}
    if not splits:
        raise UserError(f"dataset '{name}' has no examples")
    version = content_version(splits)
    all_examples = [ex for exs in splits.values() for ex in exs]
    labels = infer_labels(all_examples)
    rel = Path("datasets") / name / version
    folder = workspace.artifacts_dir / rel
    with workspace.store.session() as s:
        existing = s.scalar(select(DatasetRow).where(DatasetRow.name == name, DatasetRow.version == version))
        if existing is None:
            folder.mkdir(parents=True, exist_ok=True)
            for split_name, examples in splits.items():
                tmp = folder / f".{split_name}.jsonl.tmp"
                with tmp.open("w", encoding="utf-8") as f:
                    for ex in examples:
                        f.write(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n")
                tmp.replace(folder / f"{split_name}.jsonl")
            s.add(DatasetRow(name=name, version=version, source=source, path=str(rel),
                             n_examples=len(all_examples), splits={k: len(v) for k, v in splits.items()},
                             labels=labels, check=check, meta=meta or {}))
        elif check is not None:
            existing.check = check
    return Dataset(name=name, version=version, splits=splits, source=source, labels=labels, meta=meta or {})


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`name[@version][:split]` -> (name, version, split)."""
    split = None
    if ":" in ref:
        ref, split = ref.rsplit(":", 1)
    name, _, version = ref.partition("@")
    return name, (version or None), (split or None)


def dataset_rows(workspace: "Workspace", name: str | None = None) -> list[DatasetRow]:
    with workspace.store.session() as s:
        q = select(DatasetRow).order_by(DatasetRow.created_at, DatasetRow.id)
        if name:
            q = q.where(DatasetRow.name == name)
        return list(s.scalars(q))


def get_dataset(workspace: "Workspace", ref: str) -> Dataset:
    """The dataset `name[@version]` (newest version when none is given)."""
    name, version, _ = parse_ref(ref)
    rows = dataset_rows(workspace, name)
    if version:
        rows = [r for r in rows if r.version.startswith(version)]
    if not rows:
        known = sorted({r.name for r in dataset_rows(workspace)})
        what = f"dataset '{name}'" + (f" version '{version}'" if version else "")
        raise NotFound(f"unknown {what} (datasets: {', '.join(known) or 'none; use tunelab data import'})")
    row = rows[-1]
    folder = workspace.artifacts_dir / row.path
    splits: dict[str, list[Example]] = {}
    for split_name in row.splits:
        with (folder / f"{split_name}.jsonl").open(encoding="utf-8") as f:
            splits[split_name] = [Example.from_dict(json.loads(line)) for line in f if line.strip()]
    return Dataset(name=row.name, version=row.version, splits=splits, source=row.source,
                   labels=row.labels, meta=row.meta or {})


def get_split(workspace: "Workspace", ref: str, default_split: str = "test") -> tuple[Dataset, str, list[Example]]:
    """`name[@version][:split]` -> (dataset, split name, examples)."""
    _, _, split = parse_ref(ref)
    ds = get_dataset(workspace, ref)
    split = split or default_split
    return ds, split, ds.split(split)


def validate_name(name: str, what: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name or ""):
        raise UserError(f"invalid {what} name '{name}': use letters, digits, '-', '_' and '.' (at most 100)")


# -- reading files ----------------------------------------------------------------------------

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv"}
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test"}
CHAT_ROLES = ("system", "user", "assistant")
MAX_ISSUES_PER_KIND = 50        # per file (or split) and kind; the rest are counted in one summary issue
MIN_SPLIT_EXAMPLES = 20         # fewer in a split -> warning (scores too noisy, too little to train on)
MIN_LABEL_EXAMPLES = 5          # fewer examples of a label in train -> warning
IMBALANCE_WARN_RATIO = 10.0     # most / least frequent label in train above this -> warning
DEFAULT_CONTEXT = 8192          # assumed when the tokenizer's model cannot be read (SmolLM2's)
LONG_TEXT_CHARS = 100_000       # longer texts are tokenized by a prefix and extrapolated (fast on 5 MB)


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


class _Issues(list):
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

    def finish(self) -> "_Issues":
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


def _clip(text: str, n: int = 40) -> str:
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
    issues = _Issues(str(path))
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


def _read_jsonl(data: bytes, result: SplitFile, issues: _Issues, *, input_field: str, output_field: str,
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


def _read_csv(data: bytes, result: SplitFile, issues: _Issues, *, delimiter: str, input_field: str,
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
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    positions: tuple[int, int] | None = None
    while True:
        start_line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            issues.add("error", "csv", f"CSV error: {exc}", reader.line_num)
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
    issues = _Issues(str(path))
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


# -- checking -----------------------------------------------------------------------------------

@dataclass
class CheckReport:
    """What `check` found: counts, labels, duplicates, leakage, token lengths, and every issue."""

    source: str
    format: str
    splits: dict[str, int]
    issues: list[Issue]
    output_kind: str = "text"                                   # label | json | text
    labels: list[str] | None = None
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)   # split -> label -> n
    imbalance: dict[str, float | None] = field(default_factory=dict)        # split -> max/min
    duplicates: dict[str, int] = field(default_factory=dict)                # split -> extra copies
    conflicts: dict[str, int] = field(default_factory=dict)                 # split -> inputs with >1 output
    leakage: dict[str, int] = field(default_factory=dict)                   # "train/test" -> shared inputs
    tokens: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    @property
    def n_errors(self) -> int:
        return sum(i.count for i in self.errors)

    @property
    def n_warnings(self) -> int:
        return sum(i.count for i in self.warnings)

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        n = sum(self.splits.values())
        parts = [f"{n} examples", f"{self.n_errors} errors", f"{self.n_warnings} warnings"]
        return f"{self.source}: " + ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "format": self.format, "ok": self.ok, "splits": self.splits,
            "n_errors": self.n_errors, "n_warnings": self.n_warnings,
            "output_kind": self.output_kind, "labels": self.labels, "label_counts": self.label_counts,
            "imbalance": self.imbalance, "duplicates": self.duplicates, "conflicts": self.conflicts,
            "leakage": self.leakage, "tokens": self.tokens, "seconds": round(self.seconds, 3),
            "issues": [i.to_dict() for i in self.issues],
        }


def normalize_input(text: str) -> str:
    """The form two inputs share when they count as the same (case and whitespace folded)."""
    return " ".join(text.lower().split())


def check_path(path: str | Path, *, split: str | None = None, model: str | None = None,
               **read_opts: Any) -> tuple[CheckReport, dict[str, list[Example]]]:
    """Read and check a file or folder. Returns the report and the examples that parsed."""
    started = time.perf_counter()
    files, folder_issues = read_source(path, split=split, **read_opts)
    issues = list(folder_issues)
    for f in files.values():
        issues.extend(f.issues)
    formats = {f.format for f in files.values()}
    splits = {s: f.examples for s, f in files.items()}
    where = {s: (str(f.path), f.lines) for s, f in files.items()}
    report = check_examples(splits, source=str(path), where=where, model=model, issues=issues,
                            format=formats.pop() if len(formats) == 1 else "mixed")
    report.seconds = time.perf_counter() - started
    return report, splits


def check_dataset(workspace: "Workspace", ref: str, *, model: str | None = None) -> CheckReport:
    """Check an imported dataset `name[@version]` (its stored splits; lines count from 1)."""
    started = time.perf_counter()
    ds = get_dataset(workspace, ref)
    where = {s: (f"{ds.ref}:{s}", list(range(1, len(exs) + 1))) for s, exs in ds.splits.items()}
    report = check_examples(ds.splits, source=ds.ref, where=where, model=model, format="dataset")
    report.seconds = time.perf_counter() - started
    return report


def check_examples(splits: dict[str, list[Example]], *, source: str = "examples",
                   where: dict[str, tuple[str, list[int]]] | None = None, model: str | None = None,
                   issues: list[Issue] | None = None, format: str = "examples") -> CheckReport:
    """The checks that need examples: sizes, duplicates, conflicts, leakage, labels, token lengths."""
    where = where or {s: (s, list(range(1, len(exs) + 1))) for s, exs in splits.items()}
    found = _Issues()
    report = CheckReport(source=source, format=format, splits={s: len(v) for s, v in splits.items()},
                         issues=list(issues or []))
    _check_sizes(splits, where, found)
    _check_duplicates(splits, where, found, report)
    _check_leakage(splits, where, found, report)
    _check_labels(splits, where, found, report)
    _check_tokens(splits, where, found, report, model)
    report.issues.extend(found.finish())
    return report


def _check_sizes(splits, where, found: _Issues) -> None:
    for s, exs in splits.items():
        if exs and len(exs) < MIN_SPLIT_EXAMPLES:
            found.add("warning", "too_few", f"split '{s}' has only {len(exs)} examples (fewer than "
                      f"{MIN_SPLIT_EXAMPLES}): its scores will have wide intervals and it is little to train on",
                      path=where[s][0])
    if sum(map(len, splits.values())) and not ({"validation", "test"} & {s for s, v in splits.items() if v}):
        found.add("note", "no_heldout", "no validation or test split: after import, 'tunelab data split NAME' "
                  "makes seeded, stratified ones", path=next(iter(where.values()))[0])


def _check_duplicates(splits, where, found: _Issues, report: CheckReport) -> None:
    for s, exs in splits.items():
        path, lines = where[s]
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(exs):
            groups[normalize_input(ex.input)].append(i)
        dupes = conflicts = 0
        for idx in groups.values():
            if len(idx) < 2:
                continue
            outputs = Counter(exs[i].output for i in idx)
            at = ", ".join(str(lines[i]) for i in idx[:6]) + (", ..." if len(idx) > 6 else "")
            if len(outputs) > 1:
                conflicts += 1
                shown = ", ".join(f"line {lines[i]} -> {_clip(exs[i].output, 30)!r}" for i in idx[:4])
                found.add("warning", "conflicting_duplicate", f"conflicting duplicates: the same input has "
                          f"{len(outputs)} different outputs ({shown})", lines[idx[0]], path=path)
            else:
                dupes += len(idx) - 1
                found.add("warning", "duplicate", f"duplicate example: the same input and output at lines {at}",
                          lines[idx[0]], path=path)
        report.duplicates[s] = dupes
        report.conflicts[s] = conflicts


def _check_leakage(splits, where, found: _Issues, report: CheckReport) -> None:
    names = [s for s in splits if splits[s]]
    index = {s: {} for s in names}
    for s in names:
        for i, ex in enumerate(splits[s]):
            index[s].setdefault(normalize_input(ex.input), i)
    for a_pos, a in enumerate(names):
        for b in names[a_pos + 1:]:
            shared = [k for k in index[b] if k in index[a]]
            report.leakage[f"{a}/{b}"] = len(shared)
            if shared:
                first = shared[0]
                line_b, line_a = where[b][1][index[b][first]], where[a][1][index[a][first]]
                found.add("warning", "leakage", f"{len(shared)} inputs of split '{b}' also appear in split '{a}' "
                          f"(e.g. line {line_b} = {where[a][0]} line {line_a}); scores on '{b}' would be "
                          "inflated", line_b, path=where[b][0])


def _output_kind(outputs: list[str]) -> str:
    if not outputs:
        return "text"
    for o in outputs:
        if not o.lstrip().startswith(("{", "[")):
            return "text"
        try:
            json.loads(o)
        except ValueError:
            return "text"
    return "json"


def _check_labels(splits, where, found: _Issues, report: CheckReport) -> None:
    everything = [ex for exs in splits.values() for ex in exs]
    report.labels = infer_labels(everything)
    if report.labels is None:
        report.output_kind = _output_kind([ex.output for ex in everything])
        return
    report.output_kind = "label"
    for s, exs in splits.items():
        counts = Counter(ex.output for ex in exs)
        report.label_counts[s] = {label: counts.get(label, 0) for label in report.labels}
        present = [n for n in counts.values() if n]
        report.imbalance[s] = round(max(present) / min(present), 2) if present else None
        missing = [label for label in report.labels if not counts.get(label)]
        if exs and missing:
            found.add("warning", "label_missing", f"split '{s}' has no example of label(s) "
                      f"{', '.join(repr(m) for m in missing)}", path=where[s][0])
    main = "train" if "train" in splits else max(splits, key=lambda k: len(splits[k]))
    counts = report.label_counts.get(main, {})
    ratio = report.imbalance.get(main)
    if ratio and ratio > IMBALANCE_WARN_RATIO:
        most = max(counts, key=counts.get)
        least = min((k for k in counts if counts[k]), key=counts.get)
        found.add("warning", "imbalance", f"labels are imbalanced in '{main}': {ratio:g}:1 ('{most}' {counts[most]}, "
                  f"'{least}' {counts[least]}); watch macro-F1, not only accuracy", path=where[main][0])
    few = [f"{label!r} ({n})" for label, n in counts.items() if 0 < n < MIN_LABEL_EXAMPLES]
    if few:
        found.add("warning", "few_per_label", f"label(s) with fewer than {MIN_LABEL_EXAMPLES} examples in "
                  f"'{main}': {', '.join(few)}", path=where[main][0])


@functools.lru_cache(maxsize=4)
def _tokenizer_for(model: str | None) -> tuple[Any, int | None, str, int, str | None]:
    """(tokenizer or None, context length, model name, chat-template overhead, note)."""
    try:
        from tunelab.models.weights import load_tokenizer, resolve_model_dir

        folder = resolve_model_dir(model)
        fast = _fast_tokenizer(folder)  # `tokenizers` alone: ~0.2 s, where transformers takes ~2 s to import
        tokenizer = fast if fast is not None else load_tokenizer(model)
    except Exception as exc:  # any failure falls back to an estimate, and the report says why
        reason = exc.format() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return None, DEFAULT_CONTEXT, model or "smollm2-135m", 0, (
            f"tokenizer not loaded ({_clip(reason, 160)}); token counts are estimated as characters / 4 "
            f"and the context is assumed to be {DEFAULT_CONTEXT:,} tokens")
    context = None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        context = config.get("max_position_embeddings") or config.get("n_positions")
    except (OSError, ValueError):
        pass
    overhead = 0
    try:
        if isinstance(tokenizer, _FastTokenizer):
            return tokenizer, context, model or folder.name, tokenizer.chat_overhead, None
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": "y"}], tokenize=False)
        overhead = max(0, len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - 2)
    except Exception:  # a tokenizer without a chat template: count the texts alone
        overhead = 0
    return tokenizer, context, model or folder.name, overhead, None


class _FastTokenizer:
    """A model folder's `tokenizer.json` read by `tokenizers` directly, with the token overhead of
    its chat template (`chat_template.jinja`) for one user/assistant turn pair."""

    def __init__(self, backend: Any, chat_overhead: int):
        self.backend_tokenizer = backend
        self.chat_overhead = chat_overhead


def _fast_tokenizer(folder: Path) -> _FastTokenizer | None:
    """The fast tokenizer of `folder`, or None where it needs transformers (no tokenizer.json, a
    chat template only in tokenizer_config.json or one that does not render plainly)."""
    template_file = folder / "chat_template.jinja"
    if not (folder / "tokenizer.json").is_file() or not template_file.is_file():
        return None
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
            if (folder / "tokenizer_config.json").is_file() else {}
        specials = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            template_file.read_text(encoding="utf-8"))
        rendered = template.render(messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                   add_generation_prompt=False, **specials)
        overhead = max(0, len(backend.encode(rendered, add_special_tokens=False).ids) - 2)
    except Exception:  # an unusual template (raise_exception, custom filters): the transformers path
        return None
    return _FastTokenizer(backend, overhead)


def _rendered_text(ex: Example) -> str:
    parts = [ex.meta.get("system")] if isinstance(ex.meta.get("system"), str) else []
    for turn in ex.meta.get("history") or []:
        if isinstance(turn, dict) and isinstance(turn.get("content"), str):
            parts.append(turn["content"])
    return "\n".join([*parts, ex.input, ex.output])


def _count_tokens(texts: list[str], tokenizer: Any) -> tuple[list[int], bool]:
    """Token counts of `texts`; very long texts are counted by a prefix and extrapolated."""
    clipped = [t if len(t) <= LONG_TEXT_CHARS else t[:LONG_TEXT_CHARS] for t in texts]
    if tokenizer is None:
        return [math.ceil(len(t) / 4) for t in texts], True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):  # no offsets: about 2x faster
        counts = [len(enc.ids) for enc in backend.encode_batch_fast(clipped, add_special_tokens=False)]
    else:
        counts = [len(ids) for ids in tokenizer(clipped, add_special_tokens=False)["input_ids"]]
    for i, t in enumerate(texts):
        if len(t) > LONG_TEXT_CHARS:
            counts[i] = math.ceil(counts[i] * len(t) / LONG_TEXT_CHARS)
    return counts, False


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _check_tokens(splits, where, found: _Issues, report: CheckReport, model: str | None) -> None:
    if not any(splits.values()):
        return
    started = time.perf_counter()
    tokenizer, context, model_name, overhead, note = _tokenizer_for(model)  # cached for the process
    report.tokens = {"model": model_name, "context": context, "estimated": tokenizer is None,
                     "template_overhead": overhead, "load_seconds": round(time.perf_counter() - started, 3),
                     "splits": {}}
    if note:
        report.tokens["note"] = note
        found.add("note", "tokenizer", note)
    for s, exs in splits.items():
        if not exs:
            continue
        texts = [_rendered_text(ex) for ex in exs]
        counts, _ = _count_tokens(texts, tokenizer)
        counts = [c + overhead for c in counts]
        ordered = sorted(counts)
        over = [i for i, c in enumerate(counts) if context and c > context]
        report.tokens["splits"][s] = {"p50": _percentile(ordered, 0.5), "p95": _percentile(ordered, 0.95),
                                      "max": ordered[-1], "over_context": len(over)}
        path, lines = where[s]
        for i in over:
            size = len(texts[i].encode("utf-8"))
            what = f"is {size / 1e6:.1f} MB (~{counts[i]:,} tokens)" if size >= 1e6 else f"has {counts[i]:,} tokens"
            found.add("warning", "too_long", f"example at line {lines[i]} {what}; it exceeds the context of "
                      f"{model_name} ({context:,} tokens) and will be truncated", lines[i], path=path)


class CheckFailed(UserError):
    """An import refused because its check found errors; `.report` holds all of them."""

    def __init__(self, report: CheckReport):
        self.report = report
        errors = report.errors
        more = f" (and {report.n_errors - 1} more errors; 'tunelab data check {report.source}' lists them)" \
            if report.n_errors > 1 else ""
        super().__init__(f"{errors[0].format()}{more}; nothing was imported")


# -- import and split -------------------------------------------------------------------------

def default_name(path: str | Path) -> str:
    """The dataset name a path gets when none is given: the folder's name or the file's stem."""
    path = Path(path).resolve()
    return path.name if path.is_dir() else path.stem


def import_dataset(workspace: "Workspace", path: str | Path, name: str | None = None, *,
                   split: str | None = None, model: str | None = None, input_field: str = "input",
                   output_field: str = "output", json_output: bool = False,
                   allow_empty_output: bool = False) -> tuple[Dataset, CheckReport]:
    """Check a file or folder and, when it has no errors, save it as a dataset version.
    Raises `CheckFailed` (a UserError) and writes nothing when the check finds errors."""
    name = name or default_name(path)
    validate_name(name, "dataset")
    report, splits = check_path(path, split=split, model=model, input_field=input_field,
                                output_field=output_field, json_output=json_output,
                                allow_empty_output=allow_empty_output)
    if report.errors:
        raise CheckFailed(report)
    meta = {"format": report.format, "output_kind": report.output_kind}
    if (input_field, output_field) != ("input", "output"):
        meta["fields"] = {"input": input_field, "output": output_field}
    ds = save_dataset(workspace, name, splits, source=str(Path(path).resolve()), check=report.to_dict(), meta=meta)
    return ds, report


def _allocate(n: int, test: float, validation: float) -> tuple[int, int]:
    """How many of `n` go to test and validation: rounded shares, at least one each when n >= 3."""
    n_test, n_val = int(n * test + 0.5), int(n * validation + 0.5)
    if n >= 3:
        n_test = max(n_test, 1) if test > 0 else 0
        n_val = max(n_val, 1) if validation > 0 else 0
    elif n == 2:
        n_test, n_val = (1, 0) if test > 0 else (0, 1 if validation > 0 else 0)
    else:
        n_test = n_val = 0
    while n_test + n_val > n - 1 and n_test + n_val > 0:  # keep at least one for train
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def split_examples(examples: list[Example], *, test: float = 0.1, validation: float = 0.1,
                   seed: int = 0) -> dict[str, list[Example]]:
    """Seeded train/validation/test splits, stratified by label when outputs are labels.
    Examples with the same (normalized) input stay together, so a split never leaks into another."""
    if not (0 <= test < 1 and 0 <= validation < 1 and test + validation < 1):
        raise UserError(f"split fractions must be in [0, 1) with test + validation < 1 (got test={test}, "
                        f"validation={validation})")
    labels = infer_labels(examples)
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in examples:
        groups[normalize_input(ex.input)].append(ex)
    strata: dict[str, list[str]] = defaultdict(list)
    for key, exs in groups.items():
        strata[Counter(e.output for e in exs).most_common(1)[0][0] if labels else ""].append(key)
    rng = random.Random(seed)
    out: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    for stratum in sorted(strata):
        # order by a content hash first, so the result depends on the content and seed, not the input order
        keys = sorted(strata[stratum], key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        rng.shuffle(keys)
        n_test, n_val = _allocate(len(keys), test, validation)
        for j, key in enumerate(keys):
            target = "test" if j < n_test else "validation" if j < n_test + n_val else "train"
            out[target].extend(groups[key])
    for exs in out.values():
        exs.sort(key=lambda e: hashlib.sha256(json.dumps(e.to_dict(), sort_keys=True).encode()).hexdigest())
        rng.shuffle(exs)
    return {k: v for k, v in out.items() if v}


def split_dataset(workspace: "Workspace", ref: str, *, test: float = 0.1, validation: float = 0.1,
                  seed: int = 0, name: str | None = None) -> Dataset:
    """A new version of `ref` (all its examples pooled) with seeded, stratified splits."""
    ds = get_dataset(workspace, ref)
    ordered = [s for s in SPLITS if s in ds.splits] + [s for s in ds.splits if s not in SPLITS]
    pool = [ex for s in ordered for ex in ds.splits[s]]
    splits = split_examples(pool, test=test, validation=validation, seed=seed)
    report = check_examples(splits, source=f"{name or ds.name} (split of {ds.ref})", format="dataset")
    meta = {**ds.meta, "split_from": ds.ref, "split": {"seed": seed, "test": test, "validation": validation}}
    return save_dataset(workspace, name or ds.name, splits, source=f"split of {ds.ref}", check=report.to_dict(),
                        meta=meta)
