"""The console's pages other than prompts, logs and administration: login, datasets, runs,
comparisons (the recommendation and the per-example output matrix, disagreements first), jobs and
fine-tunes.

Log in with a user's password or an API key (an `app` key may not: it only calls deployments); the
session is an opaque cookie (HttpOnly, SameSite=Strict) whose sha256 is stored; every form and HTMX
request carries the session's CSRF token. Templates autoescape everything.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from tunelab.compare import list_comparisons, load_comparison, report_path
from tunelab.datasets import dataset_rows, get_dataset
from tunelab.errors import UserError
from tunelab.evaluate import list_runs, run_row, run_rows
from tunelab.finetune import list_finetunes
from tunelab.server.auth import (SESSION_COOKIE, SESSION_HOURS, KeyInfo, authenticate, create_session, end_session,
                                 form_fields, login_user, require)
from tunelab.server.jobs import enqueue_job, list_jobs
from tunelab.server.ui.render import checked_name, field, not_found, page, polyline, ws_of

router = APIRouter()
viewer, editor = require("viewer"), require("editor")


# -- login --------------------------------------------------------------------------------------
@router.get("/", include_in_schema=False)
def home():
    return RedirectResponse("/ui/prompts", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request):
    return page(request, "login.html", error=None)


@router.post("/login")
def login(request: Request, form: dict = Depends(form_fields)):
    ws = ws_of(request)
    if form.get("user"):
        key = login_user(ws, form["user"].strip(), form.get("password", ""))
        error = "wrong user name or password"
    else:
        key = authenticate(ws, form.get("api_key", "").strip())
        error = "unknown or revoked API key"
    if key is not None and key.role == "app":
        key, error = None, "an app key only calls deployments; log in as a user or with a viewer key"
    if key is None:
        return page(request, "login.html", status=401, error=error)
    token, _csrf = create_session(ws, key)
    response = RedirectResponse("/ui/prompts", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", max_age=SESSION_HOURS * 3600,
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
def logout(request: Request, key: KeyInfo = Depends(viewer)):

    end_session(ws_of(request), request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- datasets, runs, comparisons, fine-tunes, jobs ------------------------------------------------
@router.get("/ui/datasets", response_class=HTMLResponse)
def datasets_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "datasets.html", rows=list(reversed(dataset_rows(ws_of(request)))))


@router.get("/ui/datasets/{name}", response_class=HTMLResponse)
def dataset_page(request: Request, name: str, key: KeyInfo = Depends(viewer)):

    ws = ws_of(request)
    rows = dataset_rows(ws, checked_name(name, "dataset"))
    if not rows:
        raise not_found(f"unknown dataset '{name}'")
    ds = get_dataset(ws, name)
    sample = {split: exs[:5] for split, exs in ds.splits.items()}
    return page(request, "dataset.html", row=rows[-1], versions=rows, check=rows[-1].check or {}, sample=sample)


@router.get("/ui/runs", response_class=HTMLResponse)
def runs_page(request: Request, key: KeyInfo = Depends(viewer)):

    return page(request, "runs.html", runs=list_runs(ws_of(request), limit=200))


@router.get("/ui/runs/{run_id}", response_class=HTMLResponse)
def run_page(request: Request, run_id: str, failures: bool = False, key: KeyInfo = Depends(viewer)):

    ws = ws_of(request)
    try:
        run = run_row(ws, run_id)
    except UserError:
        raise not_found(f"unknown run '{run_id}'") from None
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
    return page(request, "comparisons.html", comparisons=list_comparisons(ws_of(request)))


@router.get("/ui/comparisons/{cid}", response_class=HTMLResponse)
def comparison_page(request: Request, cid: str, disagree: bool = False, limit: int = 200,
                    key: KeyInfo = Depends(viewer)):
    """A comparison: the recommendation, the candidates, and every test example's answers side by
    side (input, expected, each candidate's answer and score), disagreements first."""
    ws = ws_of(request)
    try:
        comp = load_comparison(ws, checked_name(cid, "comparison"))
    except UserError:
        raise not_found(f"unknown comparison '{cid}'") from None
    rows = output_matrix(ws, comp)
    n_disagree = sum(r["disagree"] for r in rows)
    shown = [r for r in rows if r["disagree"]] if disagree else rows
    return page(request, "comparison.html", comp=comp, rows=shown[:max(1, min(limit, 5000))], n_rows=len(rows),
                n_shown=len(shown), n_disagree=n_disagree, disagree=disagree, limit=limit,
                report=report_path(ws, comp.id) is not None)


def output_matrix(ws, comp) -> list[dict[str, Any]]:
    """One row per example (first repeat): input, expected, and per candidate (answer, score);
    rows where the candidates answer differently come first."""
    metric = comp.metric
    by_example: dict[int, dict[str, Any]] = {}
    for entry in comp.candidates:
        if not entry.run_id:
            continue
        try:
            rows = run_rows(ws, entry.run_id)
        except UserError:
            continue
        for r in rows:
            if r.repeat_index:
                continue
            row = by_example.setdefault(r.example_index, {"index": r.example_index, "input": r.input,
                                                          "expected": r.expected, "answers": {}})
            score = (r.scores or {}).get(metric, next(iter((r.scores or {}).values()), None))
            row["answers"][entry.name] = (r.prediction, score)
    out = []
    for row in by_example.values():
        answers = [row["answers"].get(e.name) for e in comp.candidates]
        predictions = {a[0] for a in answers if a is not None}
        scores = {a[1] for a in answers if a is not None}
        row["disagree"] = len(predictions) > 1 or len(scores) > 1
        row["cells"] = answers
        out.append(row)
    out.sort(key=lambda r: (not r["disagree"], r["index"]))
    return out


@router.get("/ui/comparisons/{cid}/report")
def comparison_report(request: Request, cid: str, key: KeyInfo = Depends(viewer)):
    """The comparison's self-contained HTML report: only an .html file inside the workspace, served
    in a CSP sandbox (an opaque origin: its scripts cannot reach the UI's session)."""
    ws = ws_of(request)
    path = report_path(ws, cid)
    if path is None:
        raise not_found("no such report")
    root = ws.artifacts_dir.resolve()
    path = (path if path.is_absolute() else root / path).resolve()
    if path.suffix.lower() not in (".html", ".htm") or not (path.is_relative_to(root) or path.is_relative_to(ws.root)):
        raise not_found("no such report")
    if not path.is_file():
        raise not_found("the report file is gone")
    return FileResponse(path, media_type="text/html",
                        headers={"Content-Security-Policy": "sandbox allow-scripts"})


@router.get("/ui/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, key: KeyInfo = Depends(viewer)):
    ws = ws_of(request)
    finetunes = list(reversed(list_finetunes(ws)))
    template = "_jobs.html" if request.headers.get("hx-request") else "jobs.html"
    return page(request, template, jobs=list_jobs(ws), finetunes=finetunes, curve=polyline, error=None)


@router.post("/ui/jobs", response_class=HTMLResponse)
def start_job(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    kind = field(form, "kind")
    candidate = form.get("candidate", "")
    data = form.get("data", "")
    limit = form.get("limit", "")

    ws = ws_of(request)
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
        request, "jobs.html", status=400, jobs=[], finetunes=[], curve=polyline, error=error)
