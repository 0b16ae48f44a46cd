"""A prompt's working file and its version history (this module owns the prompt rows).

A commit records which version became current, its parent, message, author and time; labels such
as `production` point at a version. A reference is `NAME` (the working file), `NAME@VERSION` (a
unique prefix is enough), `NAME@LABEL` or `NAME@current` (the newest commit).

    commit_prompt(ws, "support", "first version")      # -> the version (content hash)
    tag_prompt(ws, "support@3f2a9c81d0e4", "production")
    prompt = load_prompt(ws, "support@production")
    prompt_log(ws, "support"), diff_prompts(ws, "support"), rollback_prompt(ws, "support", "3f2a")
"""

from __future__ import annotations

import difflib
import getpass
import os
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from tunelab.datasets import Example, get_split, validate_name
from tunelab.datasets import parse_ref as parse_data_ref
from tunelab.errors import NotFound, UserError
from tunelab.files import write_atomic
from tunelab.models.base import Message
from tunelab.prompts.spec import DemoSource
from tunelab.prompts.template import SAMPLE_INPUT, Prompt, as_example, parse_prompt
from tunelab.store.models import PromptCommitRow, PromptDeployRow, PromptLabelRow, PromptVersionRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SUFFIX = ".prompt"

# -- the working file and the store ----------------------------------------------------------
def prompt_path(ws: "Workspace", name: str) -> Path:
    return ws.prompts_dir / f"{name}{SUFFIX}"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`NAME[@VERSION|@LABEL]` -> (name, version-or-label), read by the one parser of references
    (`tunelab.datasets.parse_ref`: `NAME[@AT][:SPLIT]`); a prompt reference has no split."""
    name, at, split = parse_data_ref(ref)
    if split is not None:
        raise UserError(f"'{ref}': a prompt is named NAME[@VERSION|@LABEL], without ':{split}'")
    return name, at


def read_prompt_file(path: Path | str, name: str | None = None, workspace: "Workspace | None" = None) -> Prompt:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound("prompt file not found", path=path) from None
    except IsADirectoryError:
        raise UserError("is a folder, not a prompt file", path=path) from None
    except UnicodeDecodeError:
        raise UserError("is not UTF-8 text", path=path) from None
    return parse_prompt(text, name or path.name.removesuffix(SUFFIX), path=_display_path(path, workspace),
                        workspace=workspace)


def _display_path(path: Path, ws: "Workspace | None") -> str:
    if ws is not None:
        try:
            return str(path.resolve().relative_to(ws.root))
        except ValueError:
            pass
    return str(path)


def load_prompt(ws: "Workspace", ref: str) -> Prompt:
    """The prompt `NAME` (the working file), `NAME@VERSION`, `NAME@LABEL` or `NAME@current`.
    A path to a `.prompt` file is read as it is."""
    if ref.endswith(SUFFIX) and "@" not in ref:
        return read_prompt_file(Path(ref), workspace=ws)
    name, at = parse_ref(ref)
    validate_name(name, "prompt")
    if at is None:
        path = prompt_path(ws, name)
        if path.is_file():
            return read_prompt_file(path, name, workspace=ws)
        current = current_version(ws, name)
        if current is None:
            raise NotFound(f"unknown prompt '{name}': no file {_display_path(path, ws)} and no committed "
                           f"versions (prompts: {', '.join(list_prompt_names(ws)) or 'none'})")
        at = current
    version = resolve_version(ws, name, at)

    with ws.store.session() as s:
        row = s.scalar(select(PromptVersionRow).where(PromptVersionRow.name == name,
                                                      PromptVersionRow.version == version))
    if row is None:
        raise NotFound(f"prompt '{name}' has no version '{version}'")
    return parse_prompt(row.content, name, path=f"{name}@{version}", workspace=ws)


# -- versions ----------------------------------------------------------------------------------
RESERVED_LABELS = {"current", "working"}


@dataclass
class Commit:
    """One entry of a prompt's history."""

    name: str
    version: str
    parent: str | None
    message: str
    author: str
    created_at: datetime
    meta: dict[str, Any]
    labels: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "parent": self.parent, "message": self.message,
                "author": self.author, "created_at": self.created_at.isoformat(timespec="seconds"),
                "meta": self.meta, "labels": self.labels}


def _rows(ws: "Workspace", model, name: str | None = None, order=None):

    with ws.store.session() as s:
        q = select(model)
        if name is not None:
            q = q.where(model.name == name)
        if order is not None:
            q = q.order_by(*order)
        return list(s.scalars(q))


def current_version(ws: "Workspace", name: str) -> str | None:
    """The version of the newest commit of `name` (None when it has none)."""

    rows = _rows(ws, PromptCommitRow, name, order=(PromptCommitRow.id.desc(),))
    return rows[0].version if rows else None


def prompt_labels(ws: "Workspace", name: str) -> dict[str, str]:
    """label -> version for `name`."""

    return {r.label: r.version for r in _rows(ws, PromptLabelRow, name, order=(PromptLabelRow.label,))}


def prompt_versions(ws: "Workspace", name: str) -> list[str]:

    return [r.version for r in _rows(ws, PromptVersionRow, name, order=(PromptVersionRow.id,))]


def resolve_version(ws: "Workspace", name: str, at: str) -> str:
    """The full version `at` names: `current`, a label, or a unique prefix of a version."""
    if at == "current":
        version = current_version(ws, name)
        if version is None:
            raise NotFound(f"prompt '{name}' has no commits yet (use: tunelab prompt commit {name} -m MESSAGE)")
        return version
    labels = prompt_labels(ws, name)
    if at in labels:
        return labels[at]
    versions = prompt_versions(ws, name)
    matches = [v for v in versions if v.startswith(at.lower())] if re.fullmatch(r"[0-9a-fA-F]{4,64}", at) else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"version '{at}' of prompt '{name}' is ambiguous: {', '.join(matches)}")
    if not versions:
        raise NotFound(f"prompt '{name}' has no committed versions")
    known = ", ".join(["current", *labels]) if labels else "current"
    raise NotFound(f"prompt '{name}' has no version or label '{at}' (labels: {known}; "
                   f"see: tunelab prompt log {name})")


def list_prompt_names(ws: "Workspace") -> list[str]:

    names = {p.name.removesuffix(SUFFIX) for p in ws.prompts_dir.glob(f"*{SUFFIX}")} if ws.prompts_dir.is_dir() else set()
    names |= {r.name for r in _rows(ws, PromptVersionRow)}
    return sorted(names)


def default_author(ws: "Workspace") -> str:
    """tunelab.yaml `author`, else $USER, else git's user.name."""
    if ws.config.author:
        return ws.config.author
    for var in ("TUNELAB_AUTHOR", "USER", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        out = subprocess.run(["git", "config", "user.name"], capture_output=True, text=True, timeout=5,
                             cwd=ws.root).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is not an error
        return "unknown"



def save_version(ws: "Workspace", prompt: Prompt) -> str:
    """Keep `prompt`'s content as a version of its name without committing it (nothing becomes
    current): `NAME@VERSION` then always names it — a fine-tune's training prompt, a hybrid's
    fallback. Returns the version."""
    with ws.store.session() as s:
        exists = s.scalar(select(PromptVersionRow.id).where(PromptVersionRow.name == prompt.name,
                                                            PromptVersionRow.version == prompt.version))
        if exists is None:
            s.add(PromptVersionRow(name=prompt.name, version=prompt.version, content=prompt.to_text()))
    return prompt.version


def _record(ws: "Workspace", prompt: Prompt, message: str, author: str | None, meta: dict | None,
            parent: str | None) -> None:
    save_version(ws, prompt)
    with ws.store.session() as s:
        s.add(PromptCommitRow(name=prompt.name, version=prompt.version, parent=parent, message=message,
                              author=author or default_author(ws), meta=dict(meta or {})))


def commit_prompt(ws: "Workspace", name: str, message: str, author: str | None = None,
                  meta: dict | None = None, text: str | None = None, write_file: bool | None = None) -> str:
    """Record a new version of prompt `name` and make it current; returns the version.

    `text` defaults to the working file. With `text` given (an optimizer's result), the working
    file is updated too when it is missing or has no uncommitted changes (`write_file=None`), or
    as `write_file` says. Committing the current version again is an error ("nothing to commit").
    """
    validate_name(name, "prompt")
    path = prompt_path(ws, name)
    if text is None:
        prompt = read_prompt_file(path, name, workspace=ws)
    else:
        prompt = parse_prompt(text, name, path=f"{name} (new version)", workspace=ws)
    if not (message or "").strip():
        raise UserError("a commit needs a message (-m MESSAGE)")
    prompt.check_renders(ws)  # a version that can never render is never committed
    current = current_version(ws, name)
    if prompt.version == current:
        raise UserError(f"nothing to commit: prompt '{name}' is version {current}, already current")
    if text is not None:
        if write_file is None:
            write_file = not path.exists() or (current is not None and _file_version(ws, name) == current)
        if write_file:
            write_atomic(path, prompt.to_text())
    _record(ws, prompt, message.strip(), author, meta, parent=current)
    return prompt.version


def _file_version(ws: "Workspace", name: str) -> str | None:
    path = prompt_path(ws, name)
    if not path.is_file():
        return None
    try:
        return read_prompt_file(path, name, workspace=ws).version
    except UserError:
        return "invalid"


def prompt_log(ws: "Workspace", name: str) -> list[Commit]:
    """The commits of `name`, newest first, with the labels pointing at each version."""

    rows = _rows(ws, PromptCommitRow, name, order=(PromptCommitRow.id.desc(),))
    if not rows and not prompt_path(ws, name).is_file():
        raise NotFound(f"unknown prompt '{name}' (prompts: {', '.join(list_prompt_names(ws)) or 'none'})")
    by_version: dict[str, list[str]] = defaultdict(list)
    for label, version in prompt_labels(ws, name).items():
        by_version[version].append(label)
    return [Commit(r.name, r.version, r.parent, r.message, r.author, r.created_at, dict(r.meta or {}),
                   sorted(by_version.get(r.version, []))) for r in rows]


OVERRIDABLE = ("temperature", "max_tokens", "stop")  # request parameters a deployment may let clients set


@dataclass
class Deploy:
    """One deploy of a prompt: `label` moved to `version` (from `previous`), by whom, why."""

    name: str
    label: str
    version: str
    previous: str | None
    note: str
    author: str
    overrides: list[str]
    created_at: datetime


def tag_prompt(ws: "Workspace", ref: str, label: str, note: str = "", author: str | None = None,
               overrides: list[str] | None = None) -> str:
    """Deploy: point `label` (e.g. `production`) at the version `ref` names; returns the version.

    `note` says why (kept with the label and in the deploy history, `deploy_log`). `overrides`
    names the request parameters (of OVERRIDABLE) a client calling `NAME@LABEL` may set in place
    of the prompt's own; None keeps the label's current setting (a new label: none)."""
    name, at = parse_ref(ref)
    validate_name(name, "prompt")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]{0,99}", label or ""):
        raise UserError(f"invalid label '{label}': start with a letter; use letters, digits, '-', '_', '.'")
    if label in RESERVED_LABELS:
        raise UserError(f"'{label}' is reserved and cannot be a label")
    if overrides is not None:
        unknown = [o for o in overrides if o not in OVERRIDABLE]
        if unknown:
            raise UserError(f"cannot let clients override '{unknown[0]}': choose from {', '.join(OVERRIDABLE)}",
                            field="overrides")
        overrides = [o for o in OVERRIDABLE if o in overrides]
    if len(note or "") > 2000:
        raise UserError("a deploy note has at most 2000 characters", field="note")
    if at is None:
        version = _file_version(ws, name)
        if version is None or version not in prompt_versions(ws, name):
            raise UserError(f"the working file of prompt '{name}' is not committed; commit it first "
                            f"or tag a committed version (NAME@VERSION)")
    else:
        version = resolve_version(ws, name, at)
    author = author or default_author(ws)
    with ws.store.session() as s:
        row = s.get(PromptLabelRow, (name, label))
        previous = row.version if row is not None else None
        if row is None:
            row = PromptLabelRow(name=name, label=label, version=version, overrides=list(overrides or []))
            s.add(row)
        row.version, row.note, row.author = version, (note or "").strip(), author
        if overrides is not None:
            row.overrides = list(overrides)
        s.add(PromptDeployRow(name=name, label=label, version=version, previous=previous, note=(note or "").strip(),
                              author=author, overrides=list(row.overrides or [])))
    return version


def deploy_log(ws: "Workspace", name: str, limit: int = 200) -> list[Deploy]:
    """The deploys of prompt `name`, newest first."""
    with ws.store.session() as s:
        rows = s.scalars(select(PromptDeployRow).where(PromptDeployRow.name == name)
                         .order_by(PromptDeployRow.id.desc()).limit(limit))
        return [Deploy(r.name, r.label, r.version, r.previous, r.note, r.author, list(r.overrides or []),
                       r.created_at) for r in rows]


def label_overrides(ws: "Workspace", name: str, label: str) -> list[str] | None:
    """The parameters clients may override when calling `NAME@LABEL` (None: not a label)."""
    with ws.store.session() as s:
        row = s.get(PromptLabelRow, (name, label))
        return None if row is None else list(row.overrides or [])


def show_prompt(ws: "Workspace", ref: str) -> str:
    """The text of the prompt `ref` names (the working file for a plain name)."""
    return load_prompt(ws, ref).to_text()


def diff_prompts(ws: "Workspace", a: str, b: str | None = None) -> str:
    """A unified diff between two references (default: `NAME@current` vs the working file).
    With one plain name, `a` becomes `NAME@current` and `b` the working file."""
    if b is None:
        name, at = parse_ref(a)
        a, b = (f"{name}@current", name) if at is None else (a, name)
    pa, pb = load_prompt(ws, a), load_prompt(ws, b)
    label_a = a if "@" in a else f"{a} (working file)"
    label_b = b if "@" in b else f"{b} (working file)"
    lines = difflib.unified_diff(pa.to_text().splitlines(keepends=True), pb.to_text().splitlines(keepends=True),
                                 fromfile=f"{label_a} {pa.version}", tofile=f"{label_b} {pb.version}")
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def rollback_prompt(ws: "Workspace", name: str, version: str, author: str | None = None,
                    force: bool = False) -> str | None:
    """Make an old version current again: write it into the working file and record a commit
    "rollback to VERSION" whose parent is the current version. Refuses to overwrite uncommitted
    changes in the working file unless `force`. Returns the version, or None when it was already
    current (then only the working file is restored)."""
    validate_name(name, "prompt")
    target = resolve_version(ws, name, version)
    prompt = load_prompt(ws, f"{name}@{target}")
    current = current_version(ws, name)
    file_version = _file_version(ws, name)
    if not force and file_version is not None and file_version not in (current, target):
        raise UserError(f"prompts/{name}{SUFFIX} has uncommitted changes (version {file_version}); commit "
                        "them first or pass --force to discard them")
    if file_version != target:
        write_atomic(prompt_path(ws, name), prompt.to_text())
    if target == current:
        return None
    _record(ws, prompt, f"rollback to {target}", author, {"rollback_of": current}, parent=current)
    return target


@dataclass
class PromptSummary:
    name: str
    current: str | None
    file_version: str | None  # None: no working file; "invalid": it does not parse
    labels: dict[str, str]
    commits: int

    @property
    def status(self) -> str:
        if self.file_version is None:
            return "no file"
        if self.file_version == "invalid":
            return "invalid"
        if self.current is None:
            return "uncommitted"
        return "clean" if self.file_version == self.current else "modified"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "current": self.current, "file_version": self.file_version,
                "labels": self.labels, "commits": self.commits, "status": self.status}


def list_prompts(ws: "Workspace") -> list[PromptSummary]:
    """Every prompt of the workspace: working files and committed ones."""

    counts: dict[str, int] = defaultdict(int)
    for r in _rows(ws, PromptCommitRow):
        counts[r.name] += 1
    return [PromptSummary(n, current_version(ws, n), _file_version(ws, n), prompt_labels(ws, n), counts[n])
            for n in list_prompt_names(ws)]





def check_prompt(ws: "Workspace | None", path_or_ref: str, sample: Example | str | None = None,
                 data: str | None = None) -> tuple[Prompt, list[Message], Example]:
    """Validate a prompt and render it against a sample: `sample`, else the first example of
    dataset `data` (`NAME[@VER][:SPLIT]`, default split train), else a placeholder input.
    Returns (prompt, messages, the example used)."""
    path = Path(path_or_ref)
    if path.suffix == SUFFIX or path.is_file() or ws is None:
        prompt = read_prompt_file(path, workspace=ws)
    else:
        prompt = load_prompt(ws, path_or_ref)
    if sample is not None:
        example = as_example(sample)
    elif data is not None:
        if ws is None:
            raise UserError("--data needs a workspace")

        _, _, examples = get_split(ws, data, default_split="train")
        if not examples:
            raise UserError(f"dataset split '{data}' is empty")
        example = examples[0]
    else:
        example = Example(input=SAMPLE_INPUT, output="")
    if isinstance(prompt.demos, DemoSource) and ws is not None:
        demos = prompt.resolve_demos(ws)
    else:
        demos = None
    try:
        messages = prompt.render(example, demos=demos)
    except UserError as exc:
        if sample is None and data is None and exc.raw_message.startswith("undefined variable"):
            raise UserError(exc.raw_message + " (rendered with a placeholder input; pass --data DATASET "
                            "or --field KEY=VALUE to render with an example that has more fields)",
                            path=exc.path, line=exc.line) from None
        raise
    return prompt, messages, example


def list_labels(ws: "Workspace") -> list[tuple[str, str, str]]:
    """Every (prompt, label, version) of the workspace, by prompt then label."""
    with ws.store.session() as s:
        rows = s.scalars(select(PromptLabelRow).order_by(PromptLabelRow.name, PromptLabelRow.label))
        return [(r.name, r.label, r.version) for r in rows]
