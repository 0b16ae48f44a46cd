"""The web UI: server-rendered Jinja2 pages with HTMX (served from /static, nothing from a CDN).

Log in with an API key; the session is an opaque cookie (HttpOnly, SameSite=Strict) whose sha256
is stored; every form and HTMX request carries the session's CSRF token. Roles are checked by the
same dependency as the API: viewers read, editors edit/commit/run/start jobs, admins deploy (tag
labels) and manage keys. Templates autoescape everything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from tunelab.compare import list_comparisons, report_path
from tunelab.datasets import Example, dataset_rows, get_dataset, get_split, validate_name
from tunelab.errors import NotFound, UserError
from tunelab.evaluate import PromptCandidate, list_runs, run_row, run_rows
from tunelab.files import write_atomic
from tunelab.finetune import list_finetunes
from tunelab.models import load_model
from tunelab.prompts import (SAMPLE_INPUT, commit_prompt, diff_prompts, list_prompts, load_prompt, parse_prompt,
                             prompt_log, prompt_path, tag_prompt)
from tunelab.server.auth import (SESSION_COOKIE, SESSION_HOURS, KeyInfo, authenticate, create_key, create_session,
                                 end_session, form_fields, list_keys, login_user, require, revoke_key)
from tunelab.server.jobs import enqueue_job, list_jobs
from tunelab.server.logs import list_calls, logs_to_dataset

HERE = Path(__file__).parent
router = APIRouter()
viewer, editor, admin = require("viewer"), require("editor"), require("admin")

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


def _env():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["t"] = lambda v: v.isoformat(sep=" ", timespec="seconds") if v else "-"
    env.filters["num"] = lambda v, d=3: "-" if v is None else (f"{v:.{d}f}" if isinstance(v, float) else str(v))
    return env


ENV = _env()


def page(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    key = getattr(request.state, "key", None)
    html = ENV.get_template(template).render(request=request, key=key, csrf=getattr(request.state, "csrf", ""),
                                             **context)
    return HTMLResponse(html, status_code=status)


def _field(form: dict, name: str) -> str:
    if name not in form:
        raise HTTPException(400, detail={"message": f"missing form field '{name}'", "type": "invalid_request"})
    return form[name]


def _int(form: dict, name: str, default: int) -> int:
    try:
        return int(form.get(name) or default)
    except ValueError:
        raise HTTPException(400, detail={"message": f"form field '{name}' must be a number", "type": "invalid_request"}) from None


def _ws(request: Request):
    return request.app.state.workspace


def _name(name: str) -> str:

    try:
        validate_name(name, "prompt")
    except UserError:
        raise HTTPException(404, detail={"message": "no such prompt", "type": "not_found"}) from None
    return name


def fragment_error(exc: Exception) -> HTMLResponse:
    html = ENV.get_template("_error.html").render(message=str(exc))
    return HTMLResponse(html, status_code=200)


# -- login --------------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
def home():
    return RedirectResponse("/ui/prompts", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return page(request, "login.html", error=None)


@router.post("/login")
def login(request: Request, form: dict = Depends(form_fields)):
    ws = _ws(request)
    if form.get("user"):
        key = login_user(ws, form["user"].strip(), form.get("password", ""))
        error = "wrong user name or password"
    else:
        key = authenticate(ws, form.get("api_key", "").strip())
        error = "unknown or revoked API key"
    if key is None:
        return page(request, "login.html", status=401, error=error)
    token, _csrf = create_session(ws, key)
    response = RedirectResponse("/ui/prompts", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", max_age=SESSION_HOURS * 3600,
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request, key: KeyInfo = Depends(viewer)):

    end_session(_ws(request), request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- prompts ------------------------------------------------------------------------------------
@router.get("/ui/prompts", response_class=HTMLResponse)
def prompts_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "prompts.html", prompts=list_prompts(_ws(request)), error=None)


@router.post("/ui/prompts")
def new_prompt(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    name = _field(form, "name")

    ws = _ws(request)
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
        raise HTTPException(404, detail={"message": f"unknown prompt '{name}'", "type": "not_found"}) from None


@router.get("/ui/prompts/{name}", response_class=HTMLResponse)
def prompt_page(request: Request, name: str, key: KeyInfo = Depends(viewer)):

    ws = _ws(request)
    _name(name)
    datasets = sorted({r.name for r in dataset_rows(ws)})
    return page(request, "prompt.html", name=name, text=_prompt_text(ws, name), datasets=datasets,
                history=_history(ws, name))


def _parse(ws, name: str, text: str):

    return parse_prompt(text, name, path=f"prompts/{name}.prompt (editor)", workspace=ws)


@router.post("/ui/prompts/{name}/render", response_class=HTMLResponse)
def render_preview(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(viewer)):
    text = form.get("text", "")
    sample = form.get("sample", "")

    ws = _ws(request)
    _name(name)
    try:
        prompt = _parse(ws, name, text)
        messages = prompt.render(sample or SAMPLE_INPUT, demos=prompt.resolve_demos(ws))
    except UserError as exc:
        return fragment_error(exc)
    except Exception as exc:  # noqa: BLE001 - the sandbox's SecurityError and friends become a message
        return fragment_error(f"{type(exc).__name__}: {exc}")
    return page(request, "_preview.html", messages=messages, version=prompt.version)


@router.post("/ui/prompts/{name}/run", response_class=HTMLResponse)
def run_playground(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    """Run the editor's text (saved or not) on the sample input or on the first examples of a split."""
    text = form.get("text", "")
    sample = form.get("sample", "")
    data = form.get("data", "")
    limit = _int(form, "limit", 3)
    ws = _ws(request)
    _name(name)
    try:
        prompt = _parse(ws, name, text)
        if data.strip():
            ref = data.strip() if ":" in data else f"{data.strip()}:validation"
            _, _, examples = get_split(ws, ref, default_split="validation")
            examples = examples[:max(1, min(limit, 20))]
        else:
            examples = [Example(input=sample or "", output="")]
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
    text = _field(form, "text")
    message = form.get("message", "")

    ws = _ws(request)
    _name(name)
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


def _history(ws, name: str) -> list:

    try:
        return prompt_log(ws, name)
    except NotFound:
        return []


@router.get("/ui/prompts/{name}/history", response_class=HTMLResponse)
def history(request: Request, name: str, key: KeyInfo = Depends(viewer)):
    _name(name)
    return page(request, "_history.html", name=name, history=_history(_ws(request), name), error=None)


@router.post("/ui/prompts/{name}/tag", response_class=HTMLResponse)
def tag(request: Request, name: str, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    """Deploy: point a label (default `production`) at a version."""
    version = _field(form, "version")
    label = form.get("label", "production")

    ws = _ws(request)
    _name(name)
    error = None
    try:
        tag_prompt(ws, f"{name}@{version}", label)
        request.app.state.deployments.forget()
    except UserError as exc:
        error = str(exc)
    return page(request, "_history.html", name=name, history=_history(ws, name), error=error)


@router.get("/ui/prompts/{name}/diff", response_class=HTMLResponse)
def diff(request: Request, name: str, a: str, b: str, key: KeyInfo = Depends(viewer)):

    _name(name)
    try:
        text = diff_prompts(_ws(request), f"{name}@{_name(a)}", f"{name}@{_name(b)}")
    except UserError as exc:
        raise HTTPException(404, detail={"message": str(exc), "type": "not_found"}) from None
    return page(request, "diff.html", name=name, a=a, b=b, lines=text.splitlines())


# -- datasets, runs, comparisons, fine-tunes, jobs ------------------------------------------------
@router.get("/ui/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "datasets.html", rows=list(reversed(dataset_rows(_ws(request)))))


@router.get("/ui/datasets/{name}", response_class=HTMLResponse)
def dataset_page(request: Request, name: str, key: KeyInfo = Depends(viewer)):

    ws = _ws(request)
    rows = dataset_rows(ws, _name(name))
    if not rows:
        raise HTTPException(404, detail={"message": f"unknown dataset '{name}'", "type": "not_found"})
    ds = get_dataset(ws, name)
    sample = {split: exs[:5] for split, exs in ds.splits.items()}
    return page(request, "dataset.html", row=rows[-1], versions=rows, check=rows[-1].check or {}, sample=sample)


@router.get("/ui/runs", response_class=HTMLResponse)
def runs_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "runs.html", runs=list_runs(_ws(request), limit=200))


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, failures: bool = False, key: KeyInfo = Depends(viewer)):

    ws = _ws(request)
    try:
        run = run_row(ws, run_id)
    except UserError:
        raise HTTPException(404, detail={"message": f"unknown run '{run_id}'", "type": "not_found"}) from None
    rows = run_rows(ws, run.id)
    primary = next(iter((run.summary or {}).get("metrics", {}) or {}), None)

    def failed(r) -> bool:
        scores = r.scores or {}
        value = scores.get(primary) if primary else next(iter(scores.values()), None)
        return isinstance(value, (int, float)) and value < 1

    shown = [r for r in rows if failed(r)] if failures else rows
    return page(request, "run.html", run=run, rows=shown[:1000], n_rows=len(rows),
                n_failed=sum(failed(r) for r in rows), failures=failures, failed=failed)


@router.get("/ui/comparisons", response_class=HTMLResponse)
def comparisons_page(request: Request, key: KeyInfo = Depends(viewer)):
    return page(request, "comparisons.html", comparisons=list_comparisons(_ws(request)))


@router.get("/ui/comparisons/{cid}/report")
def comparison_report(request: Request, cid: str, key: KeyInfo = Depends(viewer)):
    """The comparison's self-contained HTML report: only an .html file inside the workspace, served
    in a CSP sandbox (an opaque origin: its scripts cannot reach the UI's session)."""
    ws = _ws(request)
    path = report_path(ws, cid)
    if path is None:
        raise HTTPException(404, detail={"message": "no such report", "type": "not_found"})
    root = ws.artifacts_dir.resolve()
    path = (path if path.is_absolute() else root / path).resolve()
    if path.suffix.lower() not in (".html", ".htm") or not (path.is_relative_to(root) or path.is_relative_to(ws.root)):
        raise HTTPException(404, detail={"message": "no such report", "type": "not_found"})
    if not path.is_file():
        raise HTTPException(404, detail={"message": "the report file is gone", "type": "not_found"})
    return FileResponse(path, media_type="text/html",
                        headers={"Content-Security-Policy": "sandbox allow-scripts"})


@router.get("/ui/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, key: KeyInfo = Depends(viewer)):
    ws = _ws(request)
    finetunes = list(reversed(list_finetunes(ws)))
    template = "_jobs.html" if request.headers.get("hx-request") else "jobs.html"
    return page(request, template, jobs=list_jobs(ws), finetunes=finetunes, curve=_curve, error=None)


@router.post("/ui/jobs", response_class=HTMLResponse)
def start_job(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    kind = _field(form, "kind")
    candidate = form.get("candidate", "")
    data = form.get("data", "")
    limit = form.get("limit", "")

    ws = _ws(request)
    try:
        args: dict[str, Any] = {"data": data.strip()}
        args["candidate" if kind == "eval" else "prompt"] = candidate.strip()
        if kind == "finetune":
            args["name"] = form.get("name", "").strip() or None
            if limit.strip():
                args["max_steps"] = int(limit)
        elif limit.strip():
            args["limit" if kind == "eval" else "limit_validation"] = int(limit)
        enqueue_job(ws, kind, args, created_by=key.name)
        error = None
    except (UserError, ValueError) as exc:
        error = str(exc)
    return RedirectResponse("/ui/jobs", status_code=303) if error is None else page(
        request, "jobs.html", status=400, jobs=[], finetunes=[], curve=_curve, error=error)


def _curve(points: list, width: int = 240, height: int = 60) -> str:
    """An SVG polyline's points for a list of numbers (a training curve)."""
    values = [float(p) for p in points if isinstance(p, (int, float))]
    if len(values) < 2:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    step = width / (len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - (v - lo) / span * height:.1f}" for i, v in enumerate(values))


# -- call logs -----------------------------------------------------------------------------------
@router.get("/ui/logs", response_class=HTMLResponse)
def logs_page(request: Request, deployment: str = "", key: KeyInfo = Depends(viewer)):

    return page(request, "logs.html", calls=list_calls(_ws(request), deployment or None, limit=300),
                deployment=deployment, message=None)


@router.post("/ui/logs/export", response_class=HTMLResponse)
def export_logs(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    name = _field(form, "name")
    deployment = form.get("deployment", "")

    ws = _ws(request)
    try:
        ds = logs_to_dataset(ws, name.strip(), deployment or None)
        message = f"saved dataset {ds.name}@{ds.version} ({sum(len(v) for v in ds.splits.values())} examples)"
    except UserError as exc:
        message = f"error: {exc}"
    return page(request, "logs.html", calls=list_calls(ws, deployment or None, limit=300), deployment=deployment,
                message=message)


# -- keys ----------------------------------------------------------------------------------------
@router.get("/ui/keys", response_class=HTMLResponse)
def keys_page(request: Request, key: KeyInfo = Depends(admin)):

    return page(request, "keys.html", keys=list_keys(_ws(request)), secret=None, error=None)


@router.post("/ui/keys", response_class=HTMLResponse)
def create_key_form(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(admin)):
    name = _field(form, "name")
    role = form.get("role", "viewer")

    ws = _ws(request)
    secret, error = None, None
    try:
        _, secret = create_key(ws, name.strip(), role)
    except UserError as exc:
        error = str(exc)
    response = page(request, "keys.html", keys=list_keys(ws), secret=secret, error=error)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/ui/keys/{name}/revoke", response_class=HTMLResponse)
def revoke_key_form(request: Request, name: str, key: KeyInfo = Depends(admin)):

    ws = _ws(request)
    error = None
    try:
        revoke_key(ws, name)
    except UserError as exc:
        error = str(exc)
    return page(request, "keys.html", keys=list_keys(ws), secret=None, error=error)


def mount_ui(app) -> None:
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
