"""The cost model: what a candidate costs over a horizon, and when a higher setup cost pays back.

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
"""

from __future__ import annotations

import math
from typing import Iterable

HORIZON_MONTHS = 12
DEFAULT_VOLUME = 10_000  # requests a month, when the user says nothing
ALPHA = 0.05  # significance level of the paired tests


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


def cost_curve(setup_cost: float, cost_per_request: float, volumes: list[float],
               months: int = HORIZON_MONTHS) -> list[float]:
    return [horizon_cost(setup_cost, cost_per_request, v, months) for v in volumes]


def volume_grid(volume_per_month: float, break_evens: Iterable[float] = ()) -> list[float]:
    """Monthly volumes to plot costs over: 0 to a little past the expected volume and break-evens."""
    top = max([volume_per_month or DEFAULT_VOLUME, *[v for v in break_evens if v and math.isfinite(v)]])
    top = top * 1.5 if top > 0 else DEFAULT_VOLUME
    return [top * i / 60 for i in range(61)]
