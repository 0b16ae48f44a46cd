"""Numbers as text, one way everywhere: the terminal table, the HTML report, the advice and the UI
print the same cost, time or interval the same."""

from __future__ import annotations

import math
from typing import Any


def fmt_money(x: float | None) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "$0"
    if abs(x) < 0.01:
        return f"${x:.5f}"
    if abs(x) < 1000:
        return f"${x:,.2f}"
    return f"${x:,.0f}"


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    if s < 2 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def fmt_months(m: float | None) -> str:
    if m is None:
        return "–"
    if m < 1:
        return f"{m * 30.4:.1f} days"
    return f"{m:.1f} months"


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "no paired test"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def fmt_volume(v: float) -> str:
    if v >= 100:
        return f"{round(v, -2 if v >= 10_000 else -1):,.0f}"
    return f"{v:,.1f}" if v != int(v) else f"{int(v):,}"


def fmt_interval(m: Any, digits: int = 3) -> str:
    """`value [low, high]` of an interval (an `Interval`, or a dict with value/low/high)."""
    get = (lambda k: m.get(k)) if isinstance(m, dict) else (lambda k: getattr(m, k, None))
    if m is None or get("value") is None:
        return "–"
    if get("low") is None or get("high") is None:
        return f"{get('value'):.{digits}f}"
    return f"{get('value'):.{digits}f} [{get('low'):.{digits}f}, {get('high'):.{digits}f}]"
