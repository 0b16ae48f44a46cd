"""Comparison: candidates side by side on one split, every aspect measured.

    result = compare(ws, "support:test", ["support-router@v2", "ft:support", "hybrid:support"],
                     volume=100_000)
    result["candidates"][0]["metric"]        # {"value": 0.78, "low": 0.73, "high": 0.82}

Every candidate is evaluated by the same evaluator on the same split (a run with the same
configuration is reused, never repeated). The result is a plain JSON structure — the report's
"JSON twin" — stored in the `comparisons` table and written next to the HTML report.

The cost model
--------------
* cost per request `c` = the mean of the run's per-request cost (the evaluator prices each request
  from `tunelab.yaml`: API $/token, or local $/hour × the request's measured share of batch time).
  `cost_per_1k = 1000 · c`.
* setup cost `S` = compute cost of what made the candidate (the prompt optimization that committed
  the prompt version; the fine-tune that trained the model; for a hybrid both sides plus the
  threshold tuning) + engineer hours × `engineer_hourly_rate` (engineer hours default to the setup
  wall time, i.e. someone attends the run; `--engineer-hours NAME=H` overrides).
* cost over a horizon of `H` months (12) at `V` requests a month: `S + H · V · c`.
* **break-even volume** between `a` (higher setup cost, lower cost per request) and `b`:
  the monthly volume at which the two cost the same over the horizon,
  `V* = (S_a − S_b) / (H · (c_b − c_a))`. Above `V*`, `a` is cheaper over the horizon.
  Only pairs where one has the higher setup cost *and* the lower per-request cost have one.
* **payback** at the expected volume `V`: `(S_a − S_b) / (V · (c_b − c_a))` months — how long
  `a`'s cheaper requests take to pay back its extra setup cost.

The comparison JSON (schema "tunelab.comparison/1")
---------------------------------------------------
    {
      "schema": "tunelab.comparison/1",
      "id": str, "created_at": ISO time,
      "dataset": {"name", "version", "split", "n_examples", "labels": [str] | null},
      "metric": str,                       # the primary metric (higher is better)
      "volume_per_month": int, "months": int, "engineer_hourly_rate": float,
      "best": str,                         # the candidate with the highest metric
      "candidates": [{
        "name": str, "kind": "prompt" | "ft" | "hybrid", "model": str, "local": bool,
        "run_id": str, "reused_run": bool, "n": int, "eval_wall_s": float,
        "metric": {"value", "low", "high"},            # 95% interval
        "metrics": {name: {"value", "low", "high"}},
        "vs_best": {"other", "test", "p_value", "difference", "significant"} | null,
        "consistency": {"repeat", "agreement", "pass_k", "format_validity"},   # values may be null
        "tokens": {"prompt", "completion", "total"},                          # mean per request
        "latency": {"p50", "p95", "mean", "throughput_per_s", "samples": [float]},
        "setup": {"wall_s", "compute_cost", "engineer_hours", "engineer_cost", "total_cost",
                  "tokens", "sources": [str]},
        "cost_per_request", "cost_per_1k", "cost_horizon": float,        # horizon = months
        "flexibility": {"change_s", "how"},
        "confusion": {"labels": [str], "matrix": [[int]]} | null,          # rows: expected
        "training_curves": {"train_loss": [[step, v]], "val_loss": [[epoch, v]],
                            "val_metric": [[epoch, v]]} | null,
        "routing": {"primary": share, "fallback": share, "reasons": {reason: share}} | null,
        "examples_trained": int | null
      }],
      "pairwise": [{"a", "b", "test", "p_value", "difference", "significant"}],   # a − b
      "break_even": [{"a", "b", "volume_per_month", "payback_months"}],
      "learning_curve": {"candidate", "points": [{"fraction", "n_train", "metric": {...},
                                                  "wall_s"}]} | null,
      "recommendation": {...} | null        # tunelab.advise.advise()'s answer
    }
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from tunelab.errors import NotFound, UserError

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

SCHEMA = "tunelab.comparison/1"
HORIZON_MONTHS = 12
DEFAULT_VOLUME = 10_000  # requests a month, when the user says nothing
ALPHA = 0.05  # significance level of the paired tests


# -- the cost model -------------------------------------------------------------------------------
def horizon_cost(setup_cost: float, cost_per_request: float, volume_per_month: float,
                 months: int = HORIZON_MONTHS) -> float:
    """What a candidate costs over `months` at `volume_per_month`: setup + months · V · c."""
    return setup_cost + months * volume_per_month * cost_per_request


def break_even_volume(setup_a: float, cost_a: float, setup_b: float, cost_b: float,
                      months: int = HORIZON_MONTHS) -> float | None:
    """The monthly volume at which `a` and `b` cost the same over `months`.

    Defined only when one of them has the higher setup cost and the lower cost per request;
    None otherwise (one is cheaper at every volume, or they cost the same at every volume).
    """
    d_setup = setup_a - setup_b
    d_cost = cost_b - cost_a  # > 0 when a's requests are cheaper
    if d_setup == 0 or d_cost == 0 or (d_setup > 0) != (d_cost > 0):
        return None
    return d_setup / (months * d_cost)


def payback_months(setup_a: float, cost_a: float, setup_b: float, cost_b: float,
                   volume_per_month: float) -> float | None:
    """Months for the candidate with the higher setup cost to pay it back at `volume_per_month`."""
    d_setup = setup_a - setup_b
    d_cost = cost_b - cost_a
    if d_setup == 0 or d_cost == 0 or (d_setup > 0) != (d_cost > 0) or volume_per_month <= 0:
        return None
    return d_setup / (volume_per_month * d_cost)


def break_even_pairs(candidates: Iterable[dict[str, Any]], volume_per_month: float,
                     months: int = HORIZON_MONTHS) -> list[dict[str, Any]]:
    """Every pair with a break-even volume; `a` is the one with the higher setup cost."""
    cands = list(candidates)
    out = []
    for i, x in enumerate(cands):
        for y in cands[i + 1:]:
            a, b = (x, y) if x["setup"]["total_cost"] >= y["setup"]["total_cost"] else (y, x)
            v = break_even_volume(a["setup"]["total_cost"], a["cost_per_request"],
                                  b["setup"]["total_cost"], b["cost_per_request"], months)
            if v is None:
                continue
            out.append({
                "a": a["name"], "b": b["name"], "volume_per_month": v,
                "payback_months": payback_months(a["setup"]["total_cost"], a["cost_per_request"],
                                                 b["setup"]["total_cost"], b["cost_per_request"],
                                                 volume_per_month),
            })
    return out


def cost_curve(setup_cost: float, cost_per_request: float, volumes: list[float],
               months: int = HORIZON_MONTHS) -> list[float]:
    return [horizon_cost(setup_cost, cost_per_request, v, months) for v in volumes]


def volume_grid(volume_per_month: float, break_evens: Iterable[float] = ()) -> list[float]:
    """Monthly volumes to plot costs over: 0 to a little past the expected volume and break-evens."""
    top = max([volume_per_month or DEFAULT_VOLUME, *[v for v in break_evens if v and math.isfinite(v)]])
    top = top * 1.5 if top > 0 else DEFAULT_VOLUME
    return [top * i / 60 for i in range(61)]


# -- the comparison ---------------------------------------------------------------------------------
LEARNING_CURVE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)


def compare(ws: "Workspace", data: str, candidates: list[str], *, volume: float | None = None,
            repeat: int = 1, limit: int | None = None, metric: str | None = None,
            learning_curve: bool = False, engineer_hours: dict[str, float] | None = None,
            report: str | Path | None = None, progress: bool | Any = True,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate (or reuse the runs of) every candidate on the same split and put them side by side.

    `data`: DATASET[@VERSION][:SPLIT] (default split test; pinned to one version for all).
    `volume`: expected requests a month (default 10,000). `repeat`: answers per example, for
    consistency. `learning_curve`: also fine-tune on 10/25/50% of train (the 100% point is the
    existing fine-tune). `engineer_hours`: {candidate name or kind: hours} of engineer time in the
    setup (default: the setup's wall time). Returns the comparison JSON (see the module doc),
    stored in the `comparisons` table and written as an HTML report with its JSON twin.
    """
    from tunelab.datasets import get_split
    from tunelab.evaluate import evaluate, resolve_candidate

    say = log or (lambda _msg: None)
    if not candidates:
        raise UserError("compare needs at least one candidate (PROMPT[@VERSION], ft:NAME, hybrid:NAME)")
    if len(set(candidates)) != len(candidates):
        raise UserError("a candidate is named twice: " + ", ".join(sorted({c for c in candidates if candidates.count(c) > 1})))
    ds, split, examples = get_split(ws, data)
    ref = f"{ds.name}@{ds.version}:{split}"
    volume = DEFAULT_VOLUME if volume is None else float(volume)
    if volume < 0:
        raise UserError(f"--volume must be a number of requests a month, at least 0 (got {volume:g})")
    resolved = [resolve_candidate(ws, spec) for spec in candidates]  # every name checked before any work
    rate = float(ws.config.engineer_hourly_rate or 0.0)

    entries: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for i, cand in enumerate(resolved, start=1):
        say(f"[{i}/{len(resolved)}] evaluating {cand.name} on {ref}")
        result = evaluate(ws, cand, ref, limit=limit, repeat=repeat, progress=progress,
                          metrics=None if metric is None else _metric_names(cand, metric))
        say(f"      {'reused run' if result.reused else 'run'} {result.id}: "
            f"{result.primary_metric} {result.metrics[result.primary_metric]['value']:.3f}")
        runs[cand.name] = result
        entries.append(_candidate_entry(ws, cand, result, volume, rate, engineer_hours or {}))

    metric_name = metric or runs[resolved[0].name].primary_metric
    for entry, cand in zip(entries, resolved):
        m = runs[cand.name].metrics.get(metric_name)
        if m is None:
            raise UserError(f"candidate {cand.name} has no metric '{metric_name}' (its output type differs?)")
        entry["metric"] = _interval(m)

    pairwise = _pairwise(ws, [c.name for c in resolved], runs, metric_name)
    best = max(entries, key=lambda e: (e["metric"]["value"] if e["metric"]["value"] is not None else -1))
    for e in entries:
        e["vs_best"] = None if e is best else _vs(pairwise, e["name"], best["name"])

    comparison: dict[str, Any] = {
        "schema": SCHEMA, "id": uuid.uuid4().hex[:12],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": {"name": ds.name, "version": ds.version, "split": split,
                    "n_examples": len(examples) if limit is None else min(limit, len(examples)), "labels": ds.labels},
        "metric": metric_name, "volume_per_month": volume, "months": HORIZON_MONTHS, "engineer_hourly_rate": rate,
        "repeat": repeat, "best": best["name"], "candidates": entries, "pairwise": pairwise,
        "break_even": break_even_pairs(entries, volume), "learning_curve": None, "recommendation": None,
    }
    if learning_curve:
        ft = [e for e in entries if e["kind"] == "ft"]
        if not ft:
            raise UserError("--learning-curve needs a fine-tuned candidate (ft:NAME) to vary the training data of")
        comparison["learning_curve"] = run_learning_curve(ws, ft[0]["name"][3:], ref, metric_name, limit=limit,
                                                          progress=progress, log=say)
    from tunelab.advise import advise

    comparison["recommendation"] = advise(comparison)
    save_comparison(ws, comparison, report)
    return comparison


def _metric_names(cand, metric: str) -> list[str]:
    from tunelab.metrics import default_metric_names

    names = default_metric_names(cand.output)
    return names if metric in names else [metric] + names


def _interval(m: dict[str, Any]) -> dict[str, Any]:
    return {"value": m.get("value"), "low": m.get("lo"), "high": m.get("hi")}


def _pairwise(ws: "Workspace", names: list[str], runs: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """A paired test for every pair (a, b): difference = a − b on the same examples."""
    from tunelab.evaluate import diff_runs

    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if runs[a].id == runs[b].id:
                continue
            diff = diff_runs(ws, runs[b].id, runs[a].id, metrics=[metric])  # B − A with B = a
            if not diff.results:
                continue
            r = diff.results[0]
            p = None if r.p is None or (isinstance(r.p, float) and math.isnan(r.p)) else float(r.p)
            out.append({"a": a, "b": b, "test": "mcnemar" if r.test.startswith("mcnemar") else "paired bootstrap",
                        "p_value": p, "difference": _num(r.diff), "diff_low": _num(r.lo), "diff_high": _num(r.hi),
                        "n": r.n, "significant": p is not None and p < ALPHA, "verdict": diff.verdicts[0]})
    return out


def _vs(pairwise: list[dict[str, Any]], name: str, best: str) -> dict[str, Any] | None:
    for t in pairwise:
        if {t["a"], t["b"]} == {name, best}:
            diff = t["difference"]
            if diff is not None and t["a"] != name:
                diff = -diff
            return {"other": best, "test": t["test"], "p_value": t["p_value"], "difference": diff,
                    "significant": t["significant"]}
    return None


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def _candidate_entry(ws: "Workspace", cand, result, volume: float, rate: float,
                     engineer_hours: dict[str, float]) -> dict[str, Any]:
    from tunelab.evaluate import run_rows

    rows = run_rows(ws, result.id)
    first = [r for r in rows if r.repeat_index == 0]
    setup = setup_of(ws, cand)
    curves = setup.pop("_curves", None)
    trained = setup.pop("_examples_trained", None)
    hours = engineer_hours.get(cand.name, engineer_hours.get(cand.kind))
    setup["engineer_hours"] = float(hours) if hours is not None else setup["wall_s"] / 3600.0
    setup["engineer_cost"] = setup["engineer_hours"] * rate
    setup["total_cost"] = setup["compute_cost"] + setup["engineer_cost"]
    per_request = float(result.cost.get("per_request") or 0.0)
    eval_wall = _eval_seconds(result)
    cons = result.consistency or {}
    lat = result.latency or {}
    entry = {
        "name": cand.name, "kind": cand.kind, "model": cand.model_name, "local": is_local(ws, cand),
        "run_id": result.id, "reused_run": bool(result.reused), "n": result.n_examples, "eval_wall_s": eval_wall,
        "metric": None,
        "metrics": {k: _interval(v) for k, v in result.metrics.items()},
        "vs_best": None,
        "consistency": {"repeat": result.repeat, "agreement": _value(cons.get("agreement")),
                        "pass_k": _value(cons.get("pass_k")), "format_validity": _value(cons.get("format_valid")),
                        "note": cons.get("note")},
        "tokens": {k: float(result.tokens.get(k) or 0.0) for k in ("prompt", "completion", "total")},
        "latency": {"p50": lat.get("p50"), "p95": lat.get("p95"), "mean": lat.get("mean"),
                    "throughput_per_s": _throughput(result), "samples": [round(r.latency_s, 6) for r in first]},
        "setup": setup,
        "cost_per_request": per_request, "cost_per_1k": per_request * 1000,
        "cost_horizon": horizon_cost(setup["total_cost"], per_request, volume),
        "flexibility": flexibility(cand.kind, setup, eval_wall),
        "confusion": confusion(first) if (getattr(cand.output, "type", None) == "label") else None,
        "training_curves": curves,
        "routing": routing_shares(first) if cand.kind == "hybrid" else None,
        "examples_trained": trained,
    }
    return entry


def _value(x: Any) -> float | None:
    if isinstance(x, dict):
        return x.get("value")
    return x


def _throughput(result) -> float | None:
    """Requests a second: from the run's wall time, or (when some answers came from the response
    cache, which keeps their measured latency) from the mean measured latency."""
    t = result.throughput or {}
    mean = (result.latency or {}).get("mean")
    if t.get("examples_per_s") and not result.cached_rows:
        return float(t["examples_per_s"])
    return 1.0 / mean if mean else None


def _eval_seconds(result) -> float:
    """The measured time of one evaluation of the split: the wall time, or the sum of the measured
    per-request times when answers came from the response cache."""
    t = result.throughput or {}
    wall, model_s = float(t.get("wall_s") or 0.0), float(t.get("model_s") or 0.0)
    return model_s if result.cached_rows else (wall or model_s)


def flexibility(kind: str, setup: dict[str, Any], eval_wall_s: float) -> dict[str, Any]:
    """Time to change behaviour, from measured times: a new prompt version is checked by one
    re-evaluation; a fine-tuned model must be retrained (the measured training time) and
    re-evaluated; a hybrid also re-tunes its thresholds (measured too)."""
    if kind == "prompt":
        return {"change_s": eval_wall_s, "how": "prompt edit + re-evaluation"}
    if kind == "ft":
        return {"change_s": float(setup.get("train_wall_s") or setup["wall_s"]) + eval_wall_s,
                "how": "retrain + re-evaluation"}
    return {"change_s": float(setup.get("train_wall_s") or 0.0) + float(setup.get("tuning_wall_s") or 0.0) + eval_wall_s,
            "how": "retrain + re-tune + re-evaluation (a fallback-only change: prompt edit + re-evaluation)"}


def confusion(rows) -> dict[str, Any] | None:
    labels = sorted({r.expected for r in rows} | {r.prediction for r in rows})
    if not labels or len(labels) > 60:
        return None
    index = {lab: i for i, lab in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for r in rows:
        matrix[index[r.expected]][index[r.prediction]] += 1
    return {"labels": labels, "matrix": matrix}


def routing_shares(rows) -> dict[str, Any] | None:
    """Who answered, from the rows' `extra.meta.route` (or `extra.route`)."""
    routes = []
    for r in rows:
        extra = r.extra or {}
        meta = extra.get("meta") or {}
        route = extra.get("route") or meta.get("route")
        reason = extra.get("route_reason") or meta.get("route_reason")
        if route:
            routes.append((route, reason))
    if not routes:
        return None
    n = len(routes)
    counts: dict[str, int] = {}
    for route, reason in routes:
        if route == "fallback":
            counts[reason or "other"] = counts.get(reason or "other", 0) + 1
    fb = sum(counts.values())
    return {"primary": (n - fb) / n, "fallback": fb / n, "reasons": {k: v / n for k, v in counts.items()}, "n": n}


def is_local(ws: "Workspace", cand) -> bool:
    """Whether the candidate's data stays on this machine (a local or fake model, or a server on
    localhost); a hybrid only when both its sides are."""
    if cand.kind == "hybrid":
        return is_local(ws, cand.primary) and is_local(ws, cand.fallback)
    backend = getattr(cand, "backend", "") or ""
    if backend in ("local", "fake", "llamacpp") or (cand.model_name or "").startswith("ft:"):
        return True
    if backend == "openai":
        model = getattr(cand, "model", None)
        url = getattr(getattr(model, "inner", model), "base_url", None)
        cfg = ws.config.models.get(cand.model_name)
        url = url or (cfg.base_url if cfg is not None else None)
        if url:
            from urllib.parse import urlparse

            return (urlparse(str(url)).hostname or "") in ("localhost", "127.0.0.1", "::1")
    return False


# -- setup costs ------------------------------------------------------------------------------------
def setup_of(ws: "Workspace", cand) -> dict[str, Any]:
    """What it took to make the candidate: wall time, compute cost, tokens, and where from."""
    empty = {"wall_s": 0.0, "compute_cost": 0.0, "tokens": 0, "sources": []}
    if cand.kind == "prompt":
        opt = optimization_of(ws, cand)
        if opt is None:
            return {**empty, "sources": ["hand-written prompt: no optimization recorded"]}
        return {"wall_s": float(opt.wall_s or 0.0), "compute_cost": float(opt.cost or 0.0), "tokens": int(opt.tokens or 0),
                "sources": [f"optimization {opt.id} ({_fmt_s(opt.wall_s)})"]}
    if cand.kind == "ft":
        return finetune_setup(ws, cand.name[3:])
    if cand.kind == "hybrid":
        p, f = setup_of(ws, cand.primary), setup_of(ws, cand.fallback)
        tuning = cand.spec.tuning or {}
        tw, tc = float(tuning.get("wall_s") or 0.0), float(tuning.get("cost") or 0.0)
        return {"wall_s": p["wall_s"] + f["wall_s"] + tw, "compute_cost": p["compute_cost"] + f["compute_cost"] + tc,
                "tokens": p["tokens"] + f["tokens"], "train_wall_s": p.get("train_wall_s", p["wall_s"]),
                "tuning_wall_s": tw,
                "sources": p["sources"] + f["sources"] + [f"threshold tuning on validation ({_fmt_s(tw)})"],
                "_examples_trained": p.get("_examples_trained")}
    return {**empty, "sources": [f"unknown kind {cand.kind}"]}


def _fmt_s(s: float | None) -> str:
    s = float(s or 0.0)
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def optimization_of(ws: "Workspace", cand):
    """The prompt optimization that committed this prompt version, if any."""
    from sqlalchemy import select

    from tunelab.store.models import OptimizationRow, PromptCommitRow

    prompt = getattr(cand, "prompt", None)
    if prompt is None:
        return None
    with ws.store.session() as s:
        commits = list(s.scalars(select(PromptCommitRow).where(PromptCommitRow.name == prompt.name,
                                                               PromptCommitRow.version == prompt.version)))
        opt_ids = [str(v) for c in commits for k, v in (c.meta or {}).items()
                   if k in ("optimization", "optimization_id") and v]
        for oid in opt_ids:
            row = s.get(OptimizationRow, oid)
            if row is not None:
                return row
        for row in s.scalars(select(OptimizationRow).where(OptimizationRow.prompt == prompt.name,
                                                           OptimizationRow.status == "done")
                             .order_by(OptimizationRow.created_at.desc())):
            result = row.result or {}
            # the version it committed; or, when nothing beat the seed, the seed it searched around
            if result.get("version") == prompt.version or (
                    not result.get("version") and result.get("seed_version") == prompt.version):
                return row
    return None


def finetune_setup(ws: "Workspace", name: str) -> dict[str, Any]:
    from sqlalchemy import select

    from tunelab.store.models import FineTuneRow

    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))
    if row is None:
        raise NotFound(f"unknown fine-tune '{name}'")
    result = row.result or {}
    return {"wall_s": float(row.wall_s or 0.0), "compute_cost": float(row.cost or 0.0),
            "tokens": int(row.tokens_trained or 0), "train_wall_s": float(row.wall_s or 0.0),
            "sources": [f"fine-tune {name} ({row.method}, {_fmt_s(row.wall_s)}, {row.tokens_trained or 0:,} tokens)"],
            "_curves": training_curves(ws, row), "_examples_trained": _examples_trained(ws, row)}


def _examples_trained(ws: "Workspace", row) -> int | None:
    result, config = row.result or {}, row.config or {}
    for key in ("n_train", "train_examples", "examples"):
        if isinstance(result.get(key), int):
            return result[key]
    try:
        from tunelab.datasets import get_dataset

        n = len(get_dataset(ws, f"{row.dataset}@{row.dataset_version}").split("train"))
    except UserError:
        return None
    if config.get("max_examples"):
        n = min(n, int(config["max_examples"]))
    return n


def training_curves(ws: "Workspace", row) -> dict[str, Any] | None:
    """Loss and metric curves of a fine-tune: from its result, else its curves.json."""
    result = row.result or {}
    curves = result.get("curves") if isinstance(result.get("curves"), dict) else None
    if curves is None and row.path:
        path = ws.artifacts_dir / row.path / "curves.json"
        if path.is_file():
            try:
                curves = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                curves = None
    source = curves or result
    train = source.get("train_curve") or source.get("train") or []
    evals = source.get("eval_curve") or source.get("eval") or source.get("validation") or []
    if not (isinstance(train, list) and isinstance(evals, list)) or not (train or evals):
        return None

    def pts(items, key):
        out = []
        for it in items:
            if isinstance(it, dict) and it.get(key) is not None:
                x = it.get("epoch", it.get("step"))
                if x is not None:
                    out.append([x, it[key]])
        return out

    return {"train_loss": pts(train, "loss"), "val_loss": pts(evals, "loss"), "val_metric": pts(evals, "metric"),
            "x_label": "epoch"}


# -- the learning curve -----------------------------------------------------------------------------
def run_learning_curve(ws: "Workspace", ft_name: str, ref: str, metric: str, *, limit: int | None = None,
                       fractions: Iterable[float] = LEARNING_CURVE_FRACTIONS, progress: bool | Any = True,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune `ft_name`'s configuration again on a share of its training examples (a seeded
    sample) and evaluate each on `ref`. Fine-tunes already made (`NAME-lc10`, ...) are reused."""
    from sqlalchemy import select

    from tunelab import finetune as ft
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.store.models import FineTuneRow

    say = log or (lambda _msg: None)
    with ws.store.session() as s:
        base = s.scalar(select(FineTuneRow).where(FineTuneRow.name == ft_name))
    if base is None:
        raise NotFound(f"unknown fine-tune '{ft_name}'")
    n_full = _examples_trained(ws, base) or 0
    points = []
    for frac in sorted(set(float(f) for f in fractions)):
        if frac >= 1.0:
            name = ft_name
        else:
            name = f"{ft_name}-lc{int(round(frac * 100))}"
            with ws.store.session() as s:
                row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))
            if row is None or row.status != "done":
                n = max(1, int(round(frac * n_full)))
                say(f"learning curve: fine-tuning {name} on {n:,} of {n_full:,} training examples")
                config = dict(base.config or {})
                config.update(name=name, max_examples=n, data=f"{base.dataset}@{base.dataset_version}",
                              prompt=f"{base.prompt}@{base.prompt_version}")
                ft.finetune(ws, ft.FineTuneConfig.model_validate(_config_fields(config)), resume=row is not None)
        with ws.store.session() as s:
            row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == name))
        result = evaluate(ws, resolve_candidate(ws, f"ft:{name}"), ref, limit=limit, progress=progress)
        m = result.metrics.get(metric) or result.metrics[result.primary_metric]
        points.append({"fraction": frac, "n_train": _examples_trained(ws, row), "candidate": f"ft:{name}",
                       "metric": _interval(m), "wall_s": float(row.wall_s or 0.0), "cost": float(row.cost or 0.0),
                       "run_id": result.id})
        say(f"learning curve: {points[-1]['n_train']} examples -> {metric} {m['value']:.3f}")
    return {"candidate": f"ft:{ft_name}", "metric": metric, "points": points}


def _config_fields(config: dict[str, Any]) -> dict[str, Any]:
    from tunelab.finetune import FineTuneConfig

    return {k: v for k, v in config.items() if k in FineTuneConfig.model_fields}


# -- storage ----------------------------------------------------------------------------------------
def save_comparison(ws: "Workspace", comparison: dict[str, Any], report: str | Path | None = None) -> Path:
    """Store the comparison and write its report (default artifacts/comparisons/ID/report.html)."""
    from tunelab.report import write_report
    from tunelab.store.models import ComparisonRow

    html_path = Path(report) if report else ws.artifact_path("comparisons", comparison["id"], "report.html")
    comparison["report"] = str(html_path.resolve())
    write_report(comparison, html_path)
    if report:  # the JSON twin is always kept under the artifacts folder too
        from tunelab.report import write_atomic

        write_atomic(ws.artifact_path("comparisons", comparison["id"], "report.json"),
                     json.dumps(comparison, indent=2, default=str, ensure_ascii=False) + "\n")
    with ws.store.session() as s:
        row = s.get(ComparisonRow, comparison["id"])
        ds = comparison["dataset"]
        if row is None:
            s.add(ComparisonRow(id=comparison["id"], dataset=f"{ds['name']}@{ds['version']}", split=ds["split"],
                                candidates=[c["name"] for c in comparison["candidates"]], result=comparison,
                                report_path=str(html_path.resolve())))
        else:
            row.result = comparison
            row.report_path = str(html_path.resolve())
    return html_path


def load_comparison(ws: "Workspace", ref: str = "latest") -> dict[str, Any]:
    """A stored comparison: its id (a unique prefix is enough) or `latest`."""
    from sqlalchemy import select

    from tunelab.store.models import ComparisonRow

    with ws.store.session() as s:
        if ref in ("latest", "last", ""):
            row = s.scalars(select(ComparisonRow).order_by(ComparisonRow.created_at.desc(), ComparisonRow.id.desc())).first()
            if row is None:
                raise NotFound("no comparisons yet (tunelab compare --data DATASET:SPLIT CANDIDATE...)")
            return row.result
        rows = list(s.scalars(select(ComparisonRow).where(ComparisonRow.id.startswith(ref)).limit(3)))
    if not rows:
        known = [r.id for r in list_comparisons(ws)[:5]]
        raise NotFound(f"unknown comparison '{ref}' (latest: {', '.join(known) or 'none yet'})")
    if len(rows) > 1:
        raise UserError(f"comparison '{ref}' is ambiguous: give more of the id")
    return rows[0].result


def list_comparisons(ws: "Workspace") -> list[Any]:
    from sqlalchemy import select

    from tunelab.store.models import ComparisonRow

    with ws.store.session() as s:
        return list(s.scalars(select(ComparisonRow).order_by(ComparisonRow.created_at.desc())))
