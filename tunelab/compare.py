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

import math
from typing import Any, Iterable

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
