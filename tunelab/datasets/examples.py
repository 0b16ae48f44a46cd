"""Datasets: versioned examples `{input, output, meta}` in named splits, and the store of them.

An imported dataset is written under the artifacts folder as one JSONL file per split and
registered in the store (this module owns the `datasets` rows); its version is the sha256 of its
canonical content, so the same data gets the same version on any machine.

    ds = get_dataset(workspace, "support")          # newest version; "support@1a2b3c" for one
    ds.split("test")                                # list[Example]; unknown split -> NotFound
    ds, split, examples = get_split(workspace, "support@1a2b3c:validation")
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import select

from tunelab.errors import NotFound, UserError
from tunelab.files import write_atomic
from tunelab.store.models import DatasetRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SPLITS = ("train", "validation", "test")
MAX_LABELS = 1000  # more distinct outputs than this are not class labels
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


def normalize_input(text: str) -> str:
    """The form two inputs share when they count as the same (case and whitespace folded)."""
    return " ".join(text.lower().split())


def content_version(splits: dict[str, list[Example]]) -> str:
    """sha256 of the canonical JSON of all splits (first 12 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(json.dumps(name).encode())
        for ex in splits[name]:
            h.update(json.dumps(ex.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
            h.update(b"\n")
    return h.hexdigest()[:12]


def infer_labels(examples: Iterable[Example], max_labels: int = MAX_LABELS) -> list[str] | None:
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
                write_atomic(folder / f"{split_name}.jsonl",
                             "".join(json.dumps(ex.to_dict(), ensure_ascii=False) + "\n" for ex in examples))
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
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", name or ""):
        raise UserError(f"invalid {what} name '{name}': use letters, digits, '-', '_' and '.' (at most 100)")
