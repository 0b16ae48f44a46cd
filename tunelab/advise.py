"""Advice: prompt engineering, fine-tuning, or a hybrid — from a comparison and your constraints.

    advice = advise(comparison, Constraints(volume=100_000, budget=50))
    advice["recommendation"]   # "prompt" | "finetune" | "hybrid" | "none"
    advice["reasons"]          # sentences citing the measured numbers

The rules are deterministic and applied in this order (docs/advise.md says the same):

1. **Data must stay local** (`--data-must-stay-local`): candidates whose model runs on a remote
   server (an API backend not on this machine) are excluded.
2. **Data available** (`--examples N`): a fine-tuned candidate trained on more than N examples is
   excluded — unless the comparison has a learning curve with a point at or below N, whose measured
   metric then stands in for the candidate's. A hybrid whose fine-tuned side was trained on more
   than N examples is excluded.
3. **Budget** (`--budget USD`): candidates whose setup cost (compute + engineer time) is above the
   budget are excluded. A setup cost exactly equal to the budget fits.
4. **Deadline** (`--deadline-days N`): candidates whose measured setup wall time is longer than
   N days are excluded.
5. **Required metric** (`--required-metric X`): candidates whose metric (point estimate) is below
   X are excluded. When nothing is left after rules 1–5 the answer is "none": no candidate meets
   the constraints, and the reasons say which rule removed each one.
6. **Quality**: the best remaining candidate by metric leads. Every remaining candidate that is
   *not significantly worse* stays a contender: significance is the comparison's paired test
   (McNemar or paired bootstrap) at p < 0.05; without a paired test, non-overlapping 95%
   intervals. When the leader is the only contender it is the recommendation.
7. **Change frequency** (`--change-frequency weekly`): when requirements change weekly and a
   prompt candidate is a contender, the best such prompt is recommended — a prompt edit and
   re-evaluation is measured against a retrain and re-evaluation.
8. **Cost**: otherwise the contender with the lowest cost over the comparison's horizon
   (12 months) at the expected volume wins: setup + 12 · volume · cost per request + the cost of
   changes (weekly 52, monthly 12, rarely 1 per year; a change costs its measured time ×
   engineer rate, plus the training compute again for a fine-tuned or hybrid candidate).
   Costs equal within 1e-9 (relative) — e.g. exactly at the break-even volume — are a tie, which
   goes to the simpler approach: prompt, then fine-tune, then hybrid. The reasons cite the
   break-even volume against the expected one.

The volume is `--volume`, else the comparison's. A recommendation of kind "hybrid" names a
`hybrid:NAME` candidate; "finetune" an `ft:NAME`; "prompt" a prompt version.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.compare import ALPHA, HORIZON_MONTHS, break_even_volume, horizon_cost

RULES_VERSION = "tunelab.advise/1"
CHANGES_PER_YEAR = {"weekly": 52, "monthly": 12, "rarely": 1}
SIMPLICITY = {"prompt": 0, "ft": 1, "hybrid": 2}
KIND_WORD = {"prompt": "prompt", "ft": "fine-tuned", "hybrid": "hybrid"}
RECOMMENDATION = {"prompt": "prompt", "ft": "finetune", "hybrid": "hybrid"}
HEADLINE = {"prompt": "Prompt engineering", "finetune": "Fine-tuning", "hybrid": "Hybrid (fine-tuned model with a prompt fallback)",
            "none": "Neither: no candidate meets the constraints"}


class Constraints(BaseModel):
    """What the user knows about their situation; every field is optional."""

    model_config = ConfigDict(extra="forbid")
    deadline_days: float | None = Field(None, ge=0, description="days until it must be in production")
    budget: float | None = Field(None, ge=0, description="USD available for setup (optimization, training, engineer time)")
    volume: float | None = Field(None, ge=0, description="expected requests a month")
    change_frequency: Literal["weekly", "monthly", "rarely"] | None = Field(
        None, description="how often the required behaviour changes")
    examples: int | None = Field(None, ge=0, description="labelled examples available for training")
    required_metric: float | None = Field(None, description="the minimum acceptable metric value")
    data_must_stay_local: bool = Field(False, description="data may not leave this machine")


def fmt_metric(c: dict[str, Any]) -> str:
    m = c["metric"]
    if m.get("low") is None or m.get("high") is None:
        return f"{m['value']:.2f}"
    return f"{m['value']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "no paired test"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def fmt_money(x: float) -> str:
    if x == 0:
        return "$0"
    if abs(x) < 0.01:
        return f"${x:.4f}"
    if abs(x) < 100:
        return f"${x:,.2f}"
    return f"${x:,.0f}"


def fmt_volume(v: float) -> str:
    if v >= 100:
        return f"{round(v, -2 if v >= 10_000 else -1):,.0f}"
    return f"{v:,.1f}" if v != int(v) else f"{int(v):,}"


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _describe(c: dict[str, Any], metric: str) -> str:
    return f"{KIND_WORD.get(c['kind'], c['kind'])} {c['name']} {metric} {fmt_metric(c)}"


def _pair_test(comparison: dict[str, Any], a: str, b: str) -> dict[str, Any] | None:
    """The paired test of `a` against `b`, oriented so that difference = a − b."""
    for t in comparison.get("pairwise") or []:
        if t["a"] == a and t["b"] == b:
            return t
        if t["a"] == b and t["b"] == a:
            flipped = dict(t)
            flipped["a"], flipped["b"] = a, b
            if flipped.get("difference") is not None:
                flipped["difference"] = -flipped["difference"]
            return flipped
    return None


def significantly_worse(comparison: dict[str, Any], worse: dict[str, Any], best: dict[str, Any]) -> tuple[bool, dict | None]:
    """Whether `worse` is significantly below `best` (paired test, else interval overlap)."""
    test = None
    if not (best.get("estimated_from_learning_curve") or worse.get("estimated_from_learning_curve")):
        test = _pair_test(comparison, best["name"], worse["name"])  # measured on the full model only
    if test is not None and test.get("p_value") is not None:
        return (test["p_value"] < ALPHA and best["metric"]["value"] > worse["metric"]["value"]), test
    bl, wh = best["metric"].get("low"), worse["metric"].get("high")
    if bl is None or wh is None:
        return False, None
    return bl > wh, None


def _estimate_from_learning_curve(comparison: dict[str, Any], cand: dict[str, Any], examples: int) -> dict | None:
    curve = comparison.get("learning_curve") or {}
    if curve.get("candidate") not in (None, cand["name"]):
        return None
    points = [p for p in curve.get("points") or [] if p.get("n_train") is not None and p["n_train"] <= examples]
    if not points:
        return None
    return max(points, key=lambda p: p["n_train"])


def advise(comparison: dict[str, Any], constraints: Constraints | None = None) -> dict[str, Any]:
    """The recommendation for `comparison` under `constraints` (see the module doc for the rules)."""
    cons = constraints or Constraints()
    metric = comparison.get("metric", "metric")
    months = int(comparison.get("months") or HORIZON_MONTHS)
    volume = cons.volume if cons.volume is not None else float(comparison.get("volume_per_month") or 0)
    rate = float(comparison.get("engineer_hourly_rate") or 0.0)
    cands = [dict(c) for c in comparison.get("candidates") or []]
    excluded: list[dict[str, str]] = []
    reasons: list[str] = []

    def drop(c: dict[str, Any], rule: str, why: str) -> None:
        excluded.append({"candidate": c["name"], "rule": rule, "reason": why})

    remaining = []
    for c in cands:
        setup = c.get("setup") or {}
        if (c.get("metric") or {}).get("value") is None:
            drop(c, "metric", f"{c['name']} has no measured {metric}")
            continue
        # 1. locality
        if cons.data_must_stay_local and not c.get("local", True):
            drop(c, "local", f"{c['name']} sends data to a remote server ({c.get('model', '?')}); your data must stay local")
            continue
        # 2. data available
        trained = c.get("examples_trained")
        if cons.examples is not None and c["kind"] in ("ft", "hybrid") and trained is not None and trained > cons.examples:
            point = _estimate_from_learning_curve(comparison, c, cons.examples) if c["kind"] == "ft" else None
            if point is None:
                drop(c, "examples", f"{c['name']} was trained on {trained:,} examples; you have {cons.examples:,}"
                     + (" and the learning curve has no point that small" if comparison.get("learning_curve") and c["kind"] == "ft" else ""))
                continue
            c["metric"] = dict(point["metric"])
            c["estimated_from_learning_curve"] = point["n_train"]
            reasons.append(f"{c['name']} was trained on {trained:,} examples but you have {cons.examples:,}: the learning "
                           f"curve's point at {point['n_train']:,} examples ({metric} {fmt_metric(c)}) stands in for it")
        # 3. budget
        total = float(setup.get("total_cost") or 0.0)
        if cons.budget is not None and total > cons.budget:
            drop(c, "budget", f"{c['name']}'s setup cost {fmt_money(total)} is above your budget {fmt_money(cons.budget)}")
            continue
        # 4. deadline
        wall = float(setup.get("wall_s") or 0.0)
        if cons.deadline_days is not None and wall > cons.deadline_days * 86400:
            drop(c, "deadline", f"{c['name']}'s setup took {fmt_duration(wall)}, longer than your deadline of {cons.deadline_days:g} days")
            continue
        # 5. required metric
        if cons.required_metric is not None and c["metric"]["value"] < cons.required_metric:
            drop(c, "required_metric", f"{_describe(c, metric)} is below the required {cons.required_metric:g}")
            continue
        remaining.append(c)

    base = {"rules": RULES_VERSION, "metric": metric, "volume_per_month": volume, "months": months,
            "constraints": cons.model_dump(exclude_defaults=True), "excluded": excluded}

    if not remaining:
        rules_hit = {e["rule"] for e in excluded}
        if cands and rules_hit == {"required_metric"}:
            best = max(cands, key=lambda c: c["metric"]["value"])
            lead = (f"neither meets the required {metric} of {cons.required_metric:g}: the best, "
                    f"{_describe(best, metric)}, falls short")
        elif not cands:
            lead = "the comparison has no candidates"
        else:
            lead = "no candidate meets the constraints"
        return {**base, "recommendation": "none", "candidate": None, "headline": HEADLINE["none"],
                "reasons": [lead] + reasons + [e["reason"] for e in excluded], "contenders": []}

    # 6. quality
    order = lambda c: (-c["metric"]["value"], SIMPLICITY.get(c["kind"], 9), c["name"])  # noqa: E731
    remaining.sort(key=order)
    best = remaining[0]
    contenders = [best]
    for c in remaining[1:]:
        worse, test = significantly_worse(comparison, c, best)
        if worse:
            reasons.append(f"{_describe(best, metric)} vs {_describe(c, metric)}, {fmt_p(test and test.get('p_value'))}: "
                           f"{c['name']} is significantly worse")
        else:
            contenders.append(c)
            reasons.append(f"{_describe(best, metric)} vs {_describe(c, metric)}, {fmt_p(test and test.get('p_value'))}: "
                           "not a significant difference")
    if cons.required_metric is not None:
        reasons.append(f"{len(remaining)} candidate(s) meet the required {metric} of {cons.required_metric:g}")

    def done(choice: dict[str, Any], why: list[str]) -> dict[str, Any]:
        rec = RECOMMENDATION.get(choice["kind"], choice["kind"])
        return {**base, "recommendation": rec, "candidate": choice["name"],
                "headline": f"{HEADLINE.get(rec, rec)}: {choice['name']}",
                "reasons": why + reasons + [e["reason"] for e in excluded],
                "contenders": [c["name"] for c in contenders]}

    if len(contenders) == 1:
        return done(best, [f"{best['name']} has the best {metric} and every other candidate is significantly worse"
                           if len(remaining) > 1 else f"{best['name']} is the only candidate that meets the constraints"])

    # 7. change frequency
    prompts = [c for c in contenders if c["kind"] == "prompt"]
    if cons.change_frequency == "weekly" and prompts:
        choice = prompts[0]
        others = [c for c in contenders if c["kind"] != "prompt"]
        why = ["requirements change weekly: a prompt change takes "
               f"{fmt_duration(_change_s(choice))} (edit + re-evaluation)"
               + (f" vs {fmt_duration(max(_change_s(o) for o in others))} for a retrain + re-evaluation" if others else "")]
        return done(choice, why)

    # 8. cost over the horizon at the expected volume
    n_changes = CHANGES_PER_YEAR.get(cons.change_frequency or "", 0) * months / 12

    def total(c: dict[str, Any]) -> float:
        setup = c.get("setup") or {}
        per_change = _change_s(c) / 3600 * rate
        if c["kind"] in ("ft", "hybrid"):
            per_change += float(setup.get("compute_cost") or 0.0)
        return horizon_cost(float(setup.get("total_cost") or 0.0), float(c.get("cost_per_request") or 0.0),
                            volume, months) + n_changes * per_change

    costs = {c["name"]: total(c) for c in contenders}
    cheapest = min(costs.values())
    tied = [c for c in contenders if math.isclose(costs[c["name"]], cheapest, rel_tol=1e-9, abs_tol=1e-12)]
    choice = min(tied, key=lambda c: (SIMPLICITY.get(c["kind"], 9), -c["metric"]["value"], c["name"]))
    why = [f"{len(contenders)} candidates are statistically tied on {metric}; cost over {months} months at "
           f"{fmt_volume(volume)} requests/month decides: "
           + ", ".join(f"{c['name']} {fmt_money(costs[c['name']])}" for c in contenders)]
    if len(tied) > 1:
        why.append(f"{', '.join(c['name'] for c in tied)} cost the same; the simpler approach wins")
    for other in contenders:
        if other is choice:
            continue
        v = break_even_volume(float(choice["setup"].get("total_cost") or 0), float(choice.get("cost_per_request") or 0),
                              float(other["setup"].get("total_cost") or 0), float(other.get("cost_per_request") or 0),
                              months)
        if v is not None:
            pricier = choice if choice["setup"]["total_cost"] > other["setup"]["total_cost"] else other
            why.append(f"break-even between {choice['name']} and {other['name']} at {fmt_volume(v)} requests/month "
                       f"({pricier['name']} pays back its setup above it); you expect {fmt_volume(volume)}")
    if cons.change_frequency and n_changes:
        why.append(f"requirements change {cons.change_frequency} ({n_changes:g} changes over {months} months) — counted in the cost")
    return done(choice, why)


def _change_s(c: dict[str, Any]) -> float:
    return float((c.get("flexibility") or {}).get("change_s") or 0.0)
