"""The console's Monitor: each deployment's rollout (who answers, the canary, the shadow) and, for
one deployment, its drift and health in a window against the split it was measured on — plots
by bucket, the alarms with what to do, each arm's figures, the shadow's agreement and the
promotion history (`tunelab.lifecycle`: drift, evidence, promote). Viewers read it; the figures
are the ones `tunelab monitor` and `tunelab rollout show` print."""

from __future__ import annotations

from datetime import datetime, timedelta

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse

from tunelab.errors import UserError
from tunelab.lifecycle.calls import call_facets
from tunelab.lifecycle.drift import monitor
from tunelab.lifecycle.evidence import arm_stats, compare_shadow
from tunelab.lifecycle.promote import promotion_history
from tunelab.lifecycle.rollouts import get_rollout, list_rollouts
from tunelab.server.auth import KeyInfo, require
from tunelab.server.ui.render import bad_request, polyline, page, ws_of

router = APIRouter()
viewer = require("viewer")
UI_INPUTS = 500  # window inputs embedded for a page view (an even sample): a page answers in seconds
WINDOWS = {"1h": timedelta(hours=1), "24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
PLOTS = [("distance", "input embedding distance", ".3f"), ("ood_share", "out-of-distribution share", ".0%"),
         ("mean_length", "mean input length (chars)", ".0f"), ("label_shift", "label shift (total variation)", ".0%"),
         ("json_valid", "JSON valid", ".0%"), ("fallback_share", "hybrid fallback share", ".0%"),
         ("confidence", "mean confidence", ".2f")]


@router.get("/ui/monitor", response_class=HTMLResponse)
def monitor_list(request: Request, key: KeyInfo = Depends(viewer)):
    ws = ws_of(request)
    rollouts = {r.deployment: r for r in list_rollouts(ws)}
    names = sorted(set(call_facets(ws)["deployments"]) | set(rollouts))
    return page(request, "monitor_list.html", names=names, rollouts=rollouts)


@router.get("/ui/monitor/{deployment:path}", response_class=HTMLResponse)
def monitor_page(request: Request, deployment: str, key: KeyInfo = Depends(viewer)):
    ws = ws_of(request)
    window = request.query_params.get("window") or "24h"
    if window not in WINDOWS:
        raise bad_request(f"'window' is one of {', '.join(WINDOWS)}")
    until = datetime.utcnow()
    report, problem = None, None
    try:
        report = monitor(ws, deployment, since=until - WINDOWS[window], until=until, max_inputs=UI_INPUTS)
    except UserError as exc:
        problem = str(exc)
    plots = []
    if report is not None:
        for attr, title, fmt in PLOTS:
            values = [getattr(s, attr) for s in report.series]
            now, then = getattr(report.current, attr), getattr(report.baseline, attr)
            if now is None and then is None:
                continue
            if attr == "confidence":
                title = f"mean {report.confidence_measure}"
            plots.append({"attr": attr, "title": title, "line": polyline([v for v in values if v is not None]),
                          "now": "-" if now is None else format(now, fmt),
                          "then": "-" if then is None else format(then, fmt)})
    rollout = get_rollout(ws, deployment)
    shadow = None
    if rollout.shadow:
        try:
            shadow = compare_shadow(ws, deployment, rollout.shadow, since=until - WINDOWS[window])
        except UserError as exc:
            shadow = str(exc)
    labels = []
    if report is not None and report.current.label_shares is not None:
        names = list(dict.fromkeys([*(report.baseline.label_shares or {}), *(report.current.label_shares or {})]))
        labels = [(n, (report.current.label_shares or {}).get(n, 0.0), (report.baseline.label_shares or {}).get(n, 0.0))
                  for n in names]
    return page(request, "monitor.html", deployment=deployment, window=window, windows=list(WINDOWS), report=report,
                problem=problem, plots=plots, labels=labels, rollout=rollout,
                arms=arm_stats(ws, deployment, since=until - WINDOWS[window]), shadow=shadow,
                history=promotion_history(ws, deployment, limit=20))
