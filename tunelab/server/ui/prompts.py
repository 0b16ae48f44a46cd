"""The prompt workspace of the console: the editor (CodeMirror: front matter + Jinja highlighting,
variable completion; read-only for viewers), the live preview, the playground, commits, the
history with its "current" marker, any two versions side by side with a word diff, an old version's
page (view, restore it as current, deploy it: a rollback), and deploys with a note and the
request settings clients may override.

Roles: viewers read (the preview renders the saved text, never posted text); editors edit, run,
commit and restore; admins deploy.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from tunelab.datasets import Example, dataset_rows, get_split, validate_name
from tunelab.errors import NotFound, UserError
from tunelab.evaluate import PromptCandidate
from tunelab.files import write_atomic
from tunelab.models import load_model
from tunelab.prompts import (OVERRIDABLE, SAMPLE_INPUT, commit_prompt, current_version, deploy_log, list_prompts,
                             load_prompt, parse_prompt, prompt_labels, prompt_log, prompt_path, resolve_version,
                             rollback_prompt, tag_prompt)
from tunelab.server.auth import KeyInfo, form_fields, require
from tunelab.server.ui.render import checked_name, field, fragment_error, int_field, not_found, page, ws_of

router = APIRouter()
viewer, editor, admin = require("viewer"), require("editor"), require("admin")
BUILTIN_VARIABLES = ["input", "labels", "schema", "demos"]

NEW_PROMPT = """---
model: fake
temperature: 0
output: {type: text}
---
system:
You are a helpful assistant.
user:
{{ input }}
"""


@router.get("/ui/prompts", response_class=HTMLResponse)
def prompts_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "prompts.html", prompts=list_prompts(ws_of(request)), error=None)


@router.post("/ui/prompts")
def new_prompt(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    name = field(form, "name")
    ws = ws_of(request)
    try:
        validate_name(name, "prompt")
    except UserError as exc:
        return page(request, "prompts.html", status=400, prompts=list_prompts(ws), error=str(exc))
    path = prompt_path(ws, name)
    if not path.exists():
        write_atomic(path, NEW_PROMPT)
    return RedirectResponse(f"/ui/prompts/{name}", status_code=303)


def _prompt_text(ws, name: str) -> str:
    path = prompt_path(ws, name)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        return load_prompt(ws, f"{name}@current").to_text()
    except NotFound:
        raise not_found(f"unknown prompt '{name}'") from None


def _variables(ws, name: str, text: str) -> list[str]:
    try:
        found = parse_prompt(text, name, workspace=ws).variables
    except UserError:
        found = set()
    return BUILTIN_VARIABLES + sorted(v for v in found if v not in BUILTIN_VARIABLES and v != "loop")


@router.get("/ui/prompts/{name}", response_class=HTMLResponse)
def prompt_page(request: Request, name: str, key: KeyInfo = Depends(viewer)):
    ws = ws_of(request)
    checked_name(name)
    text = _prompt_text(ws, name)
    datasets = sorted({r.name for r in dataset_rows(ws)})
    return page(request, "prompt.html", text=text, datasets=datasets, variables=_variables(ws, name, text),
                **_history_context(ws, name))


def _parse(ws, name: str, text: str):
    return parse_prompt(text, name, path=f"prompts/{name}.prompt (editor)", workspace=ws)


@router.post("/ui/prompts/{name}/render", response_class=HTMLResponse)
def render_preview(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(viewer)):
    """The rendered messages for the sample input: of the posted text for editors, of the saved
    text for viewers (who may not run templates of their own)."""
    ws = ws_of(request)
    checked_name(name)
    text = form.get("text", "") if key.can("editor") else _prompt_text(ws, name)
    try:
        prompt = _parse(ws, name, text)
        messages = prompt.render(form.get("sample") or SAMPLE_INPUT, demos=prompt.resolve_demos(ws))
    except UserError as exc:
        return fragment_error(exc)
    except Exception as exc:  # noqa: BLE001 - the sandbox's SecurityError and friends become a message
        return fragment_error(f"{type(exc).__name__}: {exc}")
    return page(request, "_preview.html", messages=messages, version=prompt.version)


@router.post("/ui/prompts/{name}/run", response_class=HTMLResponse)
def run_playground(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    """Run the editor's text (saved or not) on the sample input or on the first examples of a split."""
    data = form.get("data", "")
    limit = int_field(form, "limit", 3)
    ws = ws_of(request)
    checked_name(name)
    try:
        prompt = _parse(ws, name, form.get("text", ""))
        if data.strip():
            ref = data.strip() if ":" in data else f"{data.strip()}:validation"
            _, _, examples = get_split(ws, ref, default_split="validation")
            examples = examples[:max(1, min(limit, 20))]
        else:
            examples = [Example(input=form.get("sample") or "", output="")]
        model = load_model(prompt.model or ws.config.default_model, ws)
        # the same candidate an evaluation of this text would measure, and a deployment would serve
        completions = PromptCandidate(prompt, model, workspace=ws, free_text=False).predict(examples)
    except UserError as exc:
        return fragment_error(exc)
    except Exception as exc:  # noqa: BLE001
        return fragment_error(f"{type(exc).__name__}: {exc}")
    rows = [{"input": ex.input, "expected": ex.output, "output": c.text, "tokens": c.prompt_tokens + c.completion_tokens,
             "latency": c.latency_s, "ok": (ex.output == c.text.strip()) if ex.output else None}
            for ex, c in zip(examples, completions)]
    return page(request, "_run.html", rows=rows, model=getattr(model, "name", ""))


@router.post("/ui/prompts/{name}/commit", response_class=HTMLResponse)
def commit(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    text = field(form, "text")
    message = form.get("message", "")
    ws = ws_of(request)
    checked_name(name)
    try:
        _parse(ws, name, text)  # never write a file that does not parse
        if not message.strip():
            raise UserError("a commit needs a message")
        path = prompt_path(ws, name)
        old = path.read_text(encoding="utf-8") if path.is_file() else None
        write_atomic(path, text)
        try:
            version = commit_prompt(ws, name, message, author=key.name)
        except UserError:
            if old is not None:
                write_atomic(path, old)
            raise
    except UserError as exc:
        return fragment_error(exc)
    response = page(request, "_committed.html", version=version, name=name)
    response.headers["HX-Trigger"] = "history-changed"
    return response


def _history_context(ws, name: str, error: str | None = None, notice: str | None = None) -> dict[str, Any]:
    try:
        history = prompt_log(ws, name)
    except NotFound:
        history = []
    labels = prompt_labels(ws, name)
    return {"name": name, "history": history, "current": current_version(ws, name), "labels": labels,
            "deploys": deploy_log(ws, name, limit=20), "overridable": OVERRIDABLE, "error": error, "notice": notice}


@router.get("/ui/prompts/{name}/history", response_class=HTMLResponse)
def history(request: Request, name: str, key: KeyInfo = Depends(viewer)):
    checked_name(name)
    return page(request, "_history.html", **_history_context(ws_of(request), name))


@router.post("/ui/prompts/{name}/tag", response_class=HTMLResponse)
def tag(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    """Deploy: point a label (default `production`) at a version, with a note and the request
    settings clients may override (checkboxes `allow_<setting>`; none checked: none)."""
    version = field(form, "version")
    label = form.get("label", "production").strip() or "production"
    overrides = [o for o in OVERRIDABLE if form.get(f"allow_{o}")]
    ws = ws_of(request)
    checked_name(name)
    error = notice = None
    try:
        done = tag_prompt(ws, f"{name}@{version}", label, note=form.get("note", ""), author=key.name,
                          overrides=overrides)
        request.app.state.deployments.forget()
        notice = f"deployed {name}@{label} → {done}"
    except UserError as exc:
        error = str(exc)
    if form.get("next") == "version":  # the version page's "deploy this version" (a rollback)
        if error is None:
            return RedirectResponse(f"/ui/prompts/{name}/versions/{done}", status_code=303)
        full, text = _text_of(ws, name, version)
        return page(request, "version.html", status=400, name=name, version=full, text=text, commit=None, labels=[],
                    is_current=current_version(ws, name) == full, overridable=OVERRIDABLE, error=error,
                    variables=_variables(ws, name, text))
    return page(request, "_history.html", **_history_context(ws, name, error=error, notice=notice))


def _text_of(ws, name: str, ref: str) -> tuple[str, str]:
    """(title, text) of `working` (the working file) or a version / label of `name`."""
    if ref == "working":
        path = prompt_path(ws, name)
        if not path.is_file():
            raise not_found(f"prompt '{name}' has no working file")
        return "working file", path.read_text(encoding="utf-8")
    try:
        version = resolve_version(ws, name, ref)
        return version, load_prompt(ws, f"{name}@{version}").to_text()
    except UserError:
        raise not_found(f"prompt '{name}' has no version or label '{ref}'") from None


@router.get("/ui/prompts/{name}/diff", response_class=HTMLResponse)
def diff(request: Request, name: str, a: str = "", b: str = "", key: KeyInfo = Depends(viewer)):
    """Any two versions (or the working file) side by side, changed words marked."""
    ws = ws_of(request)
    checked_name(name)
    history = prompt_log(ws, name) if current_version(ws, name) else []
    choices = [("working", "working file")] + [(c.version, f"{c.version} · {c.message[:50]}") for c in history]
    a = a or (history[1].version if len(history) > 1 else "working")
    b = b or (history[0].version if history else "working")
    for ref in (a, b):
        if ref != "working" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}", ref):
            raise not_found(f"prompt '{name}' has no version or label '{ref}'")
    (title_a, text_a), (title_b, text_b) = _text_of(ws, name, a), _text_of(ws, name, b)
    rows = side_by_side(text_a, text_b)
    changed = sum(r["kind"] != "same" for r in rows)
    return page(request, "diff.html", name=name, a=a, b=b, title_a=title_a, title_b=title_b, rows=rows,
                choices=choices, changed=changed)


@router.get("/ui/prompts/{name}/versions/{version}", response_class=HTMLResponse)
def version_page(request: Request, name: str, version: str, key: KeyInfo = Depends(viewer)):
    """An old version: its text (read-only), its commit, its labels; restore it, or deploy it."""
    ws = ws_of(request)
    checked_name(name)
    full, text = _text_of(ws, name, checked_name(version, "version"))
    commit_row = next((c for c in prompt_log(ws, name) if c.version == full), None)
    labels = [label for label, v in prompt_labels(ws, name).items() if v == full]
    return page(request, "version.html", name=name, version=full, text=text, commit=commit_row, labels=labels,
                is_current=current_version(ws, name) == full, overridable=OVERRIDABLE, error=None,
                variables=_variables(ws, name, text))


@router.post("/ui/prompts/{name}/restore")
def restore(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    """Make an old version current again (a commit "rollback to VERSION"; the working file too)."""
    version = field(form, "version")
    ws = ws_of(request)
    checked_name(name)
    try:
        rollback_prompt(ws, name, version, author=key.name, force=bool(form.get("force")))
    except UserError as exc:
        full, text = _text_of(ws, name, version)
        return page(request, "version.html", status=400, name=name, version=full, text=text, commit=None,
                    labels=[], is_current=False, overridable=OVERRIDABLE, error=str(exc),
                    variables=_variables(ws, name, text))
    return RedirectResponse(f"/ui/prompts/{name}", status_code=303)


# -- the word diff ----------------------------------------------------------------------------------
_TOKENS = re.compile(r"\s+|\w+|[^\w\s]")


def _words(a: str, b: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Two lines as segments (class, text): '' unchanged, 'del' / 'ins' the changed words."""
    ta, tb = _TOKENS.findall(a), _TOKENS.findall(b)
    left: list[tuple[str, str]] = []
    right: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ta, tb, autojunk=False).get_opcodes():
        if tag == "equal":
            left.append(("", "".join(ta[i1:i2])))
            right.append(("", "".join(tb[j1:j2])))
        else:
            if i2 > i1:
                left.append(("del", "".join(ta[i1:i2])))
            if j2 > j1:
                right.append(("ins", "".join(tb[j1:j2])))
    return left, right


def side_by_side(a: str, b: str) -> list[dict[str, Any]]:
    """Rows of a side-by-side diff: kind same | changed | deleted | added, line numbers and segments."""
    la, lb = a.splitlines(), b.splitlines()
    rows: list[dict[str, Any]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, la, lb, autojunk=False).get_opcodes():
        if tag == "equal":
            rows += [{"kind": "same", "a_no": i + 1, "b_no": j + 1, "a": [("", la[i])], "b": [("", lb[j])]}
                     for i, j in zip(range(i1, i2), range(j1, j2))]
            continue
        n = max(i2 - i1, j2 - j1)
        for k in range(n):
            i, j = i1 + k, j1 + k
            if i < i2 and j < j2:
                left, right = _words(la[i], lb[j])
                rows.append({"kind": "changed", "a_no": i + 1, "b_no": j + 1, "a": left, "b": right})
            elif i < i2:
                rows.append({"kind": "deleted", "a_no": i + 1, "b_no": None, "a": [("del", la[i])], "b": []})
            else:
                rows.append({"kind": "added", "a_no": None, "b_no": j + 1, "a": [], "b": [("ins", lb[j])]})
    return rows

