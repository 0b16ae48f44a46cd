"""The call log in the console: pages of calls with filters (deployment, key, status, time, text),
one call's detail (with the answers its shadows gave and its feedback), charts per deployment
(calls, cost and p50 latency by hour), and calls saved as a dataset. Viewers and up read every
call (an `app` key never logs into the console); editors give feedback on a call."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from tunelab.errors import UserError
from tunelab.server.auth import KeyInfo, form_fields, require
from tunelab.lifecycle.calls import (CallFilter, add_feedback, call_facets, call_input, call_stats, feedback_for,
                                    feedback_history, find_calls, get_call, logs_to_dataset, shadow_rows)
from tunelab.lifecycle.evidence import same_answer
from tunelab.server.ui.render import bad_request, bars, field, not_found, page, polyline, ws_of

router = APIRouter()
viewer, editor = require("viewer"), require("editor")
PER_PAGE = 50
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}


def _time(value: str, name: str) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"'{name}' must be a date and time like 2025-01-31T14:00") from None


def _filter(params: dict[str, str]) -> CallFilter:
    since = _time(params.get("since", ""), "since")
    if params.get("window") in WINDOWS and since is None:
        since = datetime.utcnow() - WINDOWS[params["window"]]
    status = params.get("status") or None
    if status not in (None, "ok", "error"):
        raise bad_request("'status' is ok or error")
    return CallFilter(deployment=params.get("deployment") or None, key=params.get("key") or None, status=status,
                      since=since, until=_time(params.get("until", ""), "until"),
                      text=(params.get("q") or "").strip()[:200] or None)


@router.get("/ui/logs", response_class=HTMLResponse)
def logs_page(request: Request, key: KeyInfo = Depends(viewer), message: str | None = None):
    ws = ws_of(request)
    params = {k: v for k, v in request.query_params.items() if k in
              ("deployment", "key", "status", "since", "until", "window", "q") and v}
    where = _filter(params)
    try:
        number = max(1, int(request.query_params.get("page") or 1))
    except ValueError:
        raise bad_request("'page' must be a number") from None
    calls, total = find_calls(ws, where, page=number, per_page=PER_PAGE)
    pages = max(1, math.ceil(total / PER_PAGE))
    stats = call_stats(ws, where)
    charts = [{"name": name, **st, "volume_bars": bars(st["volume"]), "cost_bars": bars(st["cost_per_hour"]),
               "latency_line": polyline(st["latency_p50"])} for name, st in sorted(stats["deployments"].items())]

    def link(n: int) -> str:
        return "/ui/logs?" + urlencode({**params, "page": n})

    return page(request, "logs.html", calls=calls, total=total, page=number, pages=pages, params=params,
                facets=call_facets(ws), charts=charts, stats=stats, link=link, call_input=call_input,
                message=message, windows=list(WINDOWS), feedback=feedback_for(ws, [c.call_id for c in calls]))


@router.get("/ui/logs/{call_id}", response_class=HTMLResponse)
def call_page(request: Request, call_id: int, key: KeyInfo = Depends(viewer), message: str | None = None):
    ws = ws_of(request)
    call = get_call(ws, call_id)
    if call is None:
        raise not_found(f"no call #{call_id}")
    shadows = [r for r in shadow_rows(ws, call.deployment, since=call.created_at) if r.call_id == call.call_id] \
        if call.call_id else []
    return page(request, "call.html", call=call, call_input=call_input(call), shadows=shadows,
                agrees=lambda r: r.status == "ok" and same_answer(r.output, call.output),
                feedback=feedback_history(ws, call.call_id) if call.call_id else [], message=message)


@router.post("/ui/logs/{call_id}/feedback", response_class=HTMLResponse)
def give_feedback(request: Request, call_id: int, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    ws = ws_of(request)
    call = get_call(ws, call_id)
    if call is None or not call.call_id:
        raise not_found(f"no call #{call_id} with an id to give feedback on")
    score = form.get("score", "")
    correction = form.get("correction", "")
    try:
        add_feedback(ws, call.call_id, score=float(score) if score.strip() else None,
                     correction=correction if correction.strip() else None, note=form.get("note", ""),
                     author=key.name)
        message = "feedback saved"
    except ValueError:
        raise bad_request("'score' is 0 (wrong) or 1 (right)") from None
    except UserError as exc:
        message = f"error: {exc}"
    return call_page(request, call_id, key=key, message=message)


@router.post("/ui/logs/export", response_class=HTMLResponse)
def export_logs(request: Request, form: dict = Depends(form_fields), key: KeyInfo = Depends(editor)):
    name = field(form, "name")
    deployment = form.get("deployment", "")
    try:
        ds = logs_to_dataset(ws_of(request), name.strip(), deployment or None)
        message = f"saved dataset {ds.name}@{ds.version} ({sum(len(v) for v in ds.splits.values())} examples)"
    except UserError as exc:
        message = f"error: {exc}"
    return logs_page(request, key=key, message=message)
