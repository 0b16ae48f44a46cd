"""Checking data before it is used, and importing it: errors by file, line and field;
duplicates and conflicting duplicates; leakage across splits; label balance; token lengths
against the model's context.

    report, splits = check_path("data/support.jsonl")   # every problem, by file, line and field
    ds, report = import_dataset(workspace, "data/support/", name="support")  # refuses on errors
    report = check_dataset(workspace, "support")         # an imported dataset
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.datasets.examples import (Dataset, Example, get_dataset, infer_labels, normalize_input, save_dataset,
                                       validate_name)
from tunelab.datasets.read import Issue, Issues, clip_text, read_source
from tunelab.errors import UserError
from tunelab.models.weights import load_tokenizer, resolve_model_dir

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SKEWED_SHARE = 0.6  # labels where one is this share of train or more are judged by macro-F1, not accuracy
MAX_FLOW_LABELS = 1000  # the datasets' own bound (datasets.examples.MAX_LABELS)
MAX_LABEL_CHARS = 60    # a longer output is text, not a label
MIN_SPLIT_EXAMPLES = 20         # fewer in a split -> warning (scores too noisy, too little to train on)
MIN_LABEL_EXAMPLES = 5          # fewer examples of a label in train -> warning
IMBALANCE_WARN_RATIO = 10.0     # most / least frequent label in train above this -> warning
DEFAULT_CONTEXT = 8192          # assumed when the tokenizer's model cannot be read (SmolLM2's)
LONG_TEXT_CHARS = 100_000       # longer texts are tokenized by a prefix and extrapolated (fast on 5 MB)

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
    found = Issues()
    report = CheckReport(source=source, format=format, splits={s: len(v) for s, v in splits.items()},
                         issues=list(issues or []))
    _check_sizes(splits, where, found)
    _check_duplicates(splits, where, found, report)
    _check_leakage(splits, where, found, report)
    _check_labels(splits, where, found, report)
    _check_refs(splits, where, found)
    _check_tokens(splits, where, found, report, model)
    report.issues.extend(found.finish())
    return report


def _check_sizes(splits, where, found: Issues) -> None:
    for s, exs in splits.items():
        if exs and len(exs) < MIN_SPLIT_EXAMPLES:
            found.add("warning", "too_few", f"split '{s}' has only {len(exs)} examples (fewer than "
                      f"{MIN_SPLIT_EXAMPLES}): its scores will have wide intervals and it is little to train on",
                      path=where[s][0])
    if sum(map(len, splits.values())) and not ({"validation", "test"} & {s for s, v in splits.items() if v}):
        found.add("note", "no_heldout", "no validation or test split: after import, 'tunelab data split NAME' "
                  "makes seeded, stratified ones", path=next(iter(where.values()))[0])


def _check_duplicates(splits, where, found: Issues, report: CheckReport) -> None:
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
                shown = ", ".join(f"line {lines[i]} -> {clip_text(exs[i].output, 30)!r}" for i in idx[:4])
                found.add("warning", "conflicting_duplicate", f"conflicting duplicates: the same input has "
                          f"{len(outputs)} different outputs ({shown})", lines[idx[0]], path=path)
            else:
                dupes += len(idx) - 1
                found.add("warning", "duplicate", f"duplicate example: the same input and output at lines {at}",
                          lines[idx[0]], path=path)
        report.duplicates[s] = dupes
        report.conflicts[s] = conflicts


def _check_leakage(splits, where, found: Issues, report: CheckReport) -> None:
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


def _check_refs(splits, where, found: Issues) -> None:
    """`meta.refs` (every reference answer, for multi-reference metrics) is a list of strings."""
    for s, exs in splits.items():
        path, lines = where[s]
        for i, ex in enumerate(exs):
            refs = (ex.meta or {}).get("refs")
            if refs is None:
                continue
            if not isinstance(refs, list) or not refs:
                found.add("error", "bad_refs", f"meta.refs must be a non-empty list of reference texts (got "
                          f"{type(refs).__name__})", lines[i], field="meta.refs", path=path)
                continue
            bad = next((k for k, r in enumerate(refs) if not isinstance(r, str) or not r.strip()), None)
            if bad is not None:
                found.add("error", "bad_refs", f"meta.refs[{bad}] must be a non-empty string (got "
                          f"{json.dumps(refs[bad])[:40]})", lines[i], field=f"meta.refs[{bad}]", path=path)


def infer_output(outputs: list[str]) -> str:
    """The output type of a task from its train outputs: json when every output is a JSON object
    (or array), label for 2 to MAX_FLOW_LABELS distinct short outputs that repeat (at most one
    distinct output per two examples), else text."""
    if output_kind(outputs) == "json":
        return "json"
    distinct = set(outputs)
    if 2 <= len(distinct) <= min(MAX_FLOW_LABELS, max(2, len(outputs) // 2)) \
            and all(len(o) <= MAX_LABEL_CHARS and "\n" not in o for o in distinct):
        return "label"
    return "text"


def output_kind(outputs: list[str]) -> str:
    """json when every output is a JSON object or array, else text (labels are told apart first,
    by `infer_labels`)."""
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


def _check_labels(splits, where, found: Issues, report: CheckReport) -> None:
    everything = [ex for exs in splits.values() for ex in exs]
    report.labels = infer_labels(everything)
    if report.labels is None:
        report.output_kind = output_kind([ex.output for ex in everything])
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
                  f"'{least}' {counts[least]}); watch macro-F1, not only accuracy "
                  "(`metric: macro_f1` in a prompt's output judges by it)", path=where[main][0])
    few = [f"{label!r} ({n})" for label, n in counts.items() if 0 < n < MIN_LABEL_EXAMPLES]
    if few:
        found.add("warning", "few_per_label", f"label(s) with fewer than {MIN_LABEL_EXAMPLES} examples in "
                  f"'{main}': {', '.join(few)}", path=where[main][0])


@functools.lru_cache(maxsize=4)
def _tokenizer_for(model: str | None) -> tuple[Any, int | None, str, int, str | None]:
    """(tokenizer or None, context length, model name, chat-template overhead, note)."""
    try:

        folder = resolve_model_dir(model)
        fast = _fast_tokenizer(folder)  # `tokenizers` alone: ~0.2 s, where transformers takes ~2 s to import
        tokenizer = fast if fast is not None else load_tokenizer(model)
    except Exception as exc:  # any failure falls back to an estimate, and the report says why
        reason = exc.format() if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        return None, DEFAULT_CONTEXT, model or "smollm2-135m", 0, (
            f"tokenizer not loaded ({clip_text(reason, 160)}); token counts are estimated as characters / 4 "
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


def _check_tokens(splits, where, found: Issues, report: CheckReport, model: str | None) -> None:
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


def skewed_labels(kind: str, outputs: list[str]) -> list[tuple[str, int]] | None:
    """The label counts, most frequent first, when `outputs` are labels one of which is SKEWED_SHARE
    of them or more (what the flow's `judged_by` and `flow_epochs` and the classical baselines' class
    weights act on); else None."""
    if kind != "label" or not outputs:
        return None
    counts = Counter(outputs).most_common()
    return counts if counts[0][1] / len(outputs) >= SKEWED_SHARE else None
