"""Evidence from live traffic, with intervals: how often two candidates agree on the same calls,
how each arm of a deployment does, and what a shadow would have done.

    evidence(ws, "support@production", "ft:distilled")    # the challenger against the primary
    compare_shadow(ws, "support@production", "hybrid:support")   # tunelab compare --from-logs
    arm_stats(ws, "support@production")                    # per arm: calls, errors, latency, cost, quality

**Agreement** of a challenger C with the primary P is measured on calls both answered: a shadow C
on P's calls, and the baseline P on a canary C's calls (`tunelab.server.rollout`). Two answers
agree when both parse as the same JSON value, or read the same once case, spaces and punctuation
are set aside (labels, short texts). The share comes with a 95% Wilson interval.

**Quality** comes from feedback (`tunelab.lifecycle.calls.add_feedback`): an answer is judged
right or wrong when its call has a correction (the answer agrees with it or not) or a score and the
answer agrees with the answer that was scored (the same answer, the same verdict). Each side's share
of right answers has a Wilson interval; "significantly worse" is a one-sided Fisher exact test
(scipy) of the challenger's right/wrong counts against the primary's.

Latency and cost per 1,000 calls are means over the answers, with percentile-bootstrap intervals
(`tunelab.stats.bootstrap`); p50 and p95 latency are given as measured. The newest `MAX_CALLS`
calls of a window count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from tunelab import stats as st
from tunelab.errors import UserError
from tunelab.lifecycle.calls import Feedback, feedback_for, list_calls, shadow_rows
from tunelab.metrics import parse_json
from tunelab.models.base import normalize

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

MAX_CALLS = 200_000


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two answers say the same: equal JSON values, else equal normalized text."""
    a, b = a or "", b or ""
    ok_a, va = parse_json(a) if a.lstrip()[:1] in "{[" else (False, None)
    ok_b, vb = parse_json(b) if b.lstrip()[:1] in "{[" else (False, None)
    if ok_a and ok_b:
        return json.dumps(va, sort_keys=True) == json.dumps(vb, sort_keys=True)
    return normalize(a) == normalize(b)


def judge(output: str, call_output: str, fb: Feedback | None) -> bool | None:
    """Whether `output` (an answer to a call whose logged answer was `call_output`) was right by
    the call's feedback; None when the feedback does not say."""
    if fb is None:
        return None
    if fb.correction is not None:
        return same_answer(output, fb.correction)
    if fb.good is not None and same_answer(output, call_output):
        return fb.good
    return None


@dataclass
class Share:
    """k of n, with its 95% Wilson interval (None: nothing counted)."""

    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float | None, float | None]:
        return st.wilson(self.k, self.n) if self.n else (None, None)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.interval
        return {"k": self.k, "n": self.n, "value": self.value, "lo": lo, "hi": hi}

    def text(self) -> str:
        if not self.n:
            return "n/a (none counted)"
        lo, hi = self.interval
        return f"{self.value:.1%} ({self.k}/{self.n}; 95% CI {lo:.1%}–{hi:.1%})"


@dataclass
class Mean:
    """A mean with its 95% percentile-bootstrap interval."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int

    @classmethod
    def of(cls, values: list[float], scale: float = 1.0) -> "Mean":
        if not values:
            return cls(None, None, None, 0)
        arr = np.asarray(values, dtype=float) * scale
        lo, hi = st.bootstrap(arr, lambda sums, n: sums[..., 0] / n, resamples=1000)
        return cls(float(arr.mean()), float(lo), float(hi), len(values))


@dataclass
class Side:
    """One candidate's answers in a comparison or an arm: volume, errors, speed, cost, quality."""

    candidate: str
    answers: int = 0
    errors: int = 0
    latency_p50: float | None = None
    latency_p95: float | None = None
    latency: Mean | None = None
    cost_per_1000: Mean | None = None
    quality: Share = field(default_factory=lambda: Share(0, 0))
    agreement: Share | None = None  # with the primary (an arm's; a comparison keeps it apart)

    @classmethod
    def of(cls, candidate: str, latencies: list[float], costs: list[float], errors: int, judged: list[bool],
           agreement: Share | None = None) -> "Side":
        lat = sorted(latencies)
        pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: None)
        return cls(candidate, len(latencies), errors, pick(0.5), pick(0.95), Mean.of(latencies),
                   Mean.of(costs, 1000.0), Share(sum(judged), len(judged)), agreement)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["quality"] = self.quality.to_dict()
        out["agreement"] = self.agreement.to_dict() if self.agreement else None
        return out


def worse_p(challenger: Share, primary: Share) -> float | None:
    """One-sided Fisher exact p-value that the challenger's share of right answers is lower than
    the primary's (None: either side has no judged answers)."""
    if not challenger.n or not primary.n:
        return None
    from scipy.stats import fisher_exact

    table = [[challenger.k, challenger.n - challenger.k], [primary.k, primary.n - primary.k]]
    return float(fisher_exact(table, alternative="less").pvalue)


# -- the challenger against the primary -------------------------------------------------------------
@dataclass
class Evidence:
    """What the live traffic says about `challenger` against `primary` on `deployment`."""

    deployment: str
    primary: str
    challenger: str
    agreement: Share
    primary_side: Side
    challenger_side: Side
    quality_drop_p: float | None  # one-sided Fisher exact: the challenger is worse
    dropped: int  # calls the shadow queue could not mirror
    since: datetime | None = None
    until: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "primary": self.primary, "challenger": self.challenger,
                "agreement": self.agreement.to_dict(), "primary_side": self.primary_side.to_dict(),
                "challenger_side": self.challenger_side.to_dict(), "quality_drop_p": self.quality_drop_p,
                "dropped": self.dropped, "since": _iso(self.since), "until": _iso(self.until)}

    def lines(self) -> list[str]:
        """The evidence in words."""
        p, c = self.primary_side, self.challenger_side
        out = [f"agreement of {self.challenger} with {self.primary}: {self.agreement.text()}"]
        for side in (p, c):
            lat = (f"latency p50 {side.latency_p50 * 1000:.0f} ms, p95 {side.latency_p95 * 1000:.0f} ms"
                   if side.latency_p50 is not None else "latency n/a")
            cost = side.cost_per_1000.value if side.cost_per_1000 and side.cost_per_1000.value is not None else None
            out.append(f"{side.candidate}: {side.answers} answers, {side.errors} errors, {lat}, "
                       f"{'$%.4f' % cost if cost is not None else 'n/a'} per 1,000; right by feedback "
                       f"{side.quality.text()}")
        if self.quality_drop_p is not None:
            out.append(f"quality drop of {self.challenger}: one-sided Fisher exact p={self.quality_drop_p:.3f}")
        else:
            out.append("quality: no feedback judges both sides yet (POST /v1/feedback, or the console's call log)")
        if self.dropped:
            out.append(f"{self.dropped} calls were not mirrored (the shadow queue was full): counted, not compared")
        return out


def _iso(t: datetime | None) -> str | None:
    return t.isoformat(timespec="seconds") if t else None


def evidence(ws: "Workspace", deployment: str, primary: str, challenger: str, *, since: datetime | None = None,
             until: datetime | None = None) -> Evidence:
    """`challenger` against `primary` on `deployment`'s calls from `since` until before `until`."""
    calls = {c.call_id: c for c in list_calls(ws, deployment, limit=MAX_CALLS, since=since, until=until) if c.call_id}
    fb = feedback_for(ws, [cid for cid, c in calls.items()])
    agree: list[bool] = []
    sides: dict[str, dict[str, list]] = {name: {"lat": [], "cost": [], "judged": [], "errors": [0]}
                                         for name in (primary, challenger)}

    def add(name: str, output: str, status: str, latency: float, cost: float, call) -> None:
        side = sides[name]
        if status != "ok":
            side["errors"][0] += 1
            return
        side["lat"].append(latency or 0.0)
        side["cost"].append(cost or 0.0)
        verdict = judge(output, call.output, fb.get(call.call_id))
        if verdict is not None:
            side["judged"].append(verdict)

    for c in calls.values():  # the answers callers got
        if c.candidate in sides:
            add(c.candidate, c.output, c.status, c.latency_s, c.cost, c)
    dropped = 0
    for r in shadow_rows(ws, deployment, since=since, until=until):
        call = calls.get(r.call_id)
        if call is None:
            continue
        pair = {call.candidate, r.candidate}
        if pair != {primary, challenger}:
            continue
        if r.status == "dropped":
            dropped += 1
            continue
        add(r.candidate, r.output, r.status, r.latency_s, r.cost, call)
        if r.status == "ok" and call.status == "ok":
            agree.append(same_answer(r.output, call.output))
    p_side, c_side = (Side.of(name, s["lat"], s["cost"], s["errors"][0], s["judged"])
                      for name, s in ((primary, sides[primary]), (challenger, sides[challenger])))
    return Evidence(deployment, primary, challenger, Share(sum(agree), len(agree)), p_side, c_side,
                    worse_p(c_side.quality, p_side.quality), dropped, since, until)


def compare_shadow(ws: "Workspace", deployment: str, shadow: str, *, since: datetime | None = None,
                   until: datetime | None = None) -> Evidence:
    """What `shadow` would have done on `deployment`'s calls it mirrored, against the candidate that
    answered them (`tunelab compare --from-logs DEPLOYMENT --shadow CANDIDATE`)."""
    rows = shadow_rows(ws, deployment, since=since, until=until, candidate=shadow)
    if not rows:
        raise UserError(f"no shadow answers of '{shadow}' on deployment '{deployment}'"
                        f"{' in this window' if since or until else ''}: mirror its calls first with "
                        f"tunelab rollout shadow {deployment} {shadow}")
    mirrored = {r.call_id for r in rows}
    answered = [c for c in list_calls(ws, deployment, limit=MAX_CALLS, since=since, until=until)
                if c.call_id in mirrored and c.candidate]
    primaries = sorted({c.candidate for c in answered})
    if not primaries:
        raise UserError(f"the calls '{shadow}' mirrored on '{deployment}' are no longer in the call log")
    primary = max(primaries, key=lambda p: sum(c.candidate == p for c in answered))
    return evidence(ws, deployment, primary, shadow, since=since, until=until)


# -- the arms of a deployment ------------------------------------------------------------------------
def arm_stats(ws: "Workspace", deployment: str, *, since: datetime | None = None,
              until: datetime | None = None) -> dict[str, Side]:
    """Per arm (primary, canary) of `deployment`: its candidate's answers, errors, latency, cost,
    quality by feedback and, for the canary, agreement with the primary's baseline answers."""
    calls = [c for c in list_calls(ws, deployment, limit=MAX_CALLS, since=since, until=until) if c.arm]
    if not calls:
        return {}
    fb = feedback_for(ws, [c.call_id for c in calls])
    baseline = {r.call_id: r for r in shadow_rows(ws, deployment, since=since, until=until)
                if r.role == "baseline" and r.status == "ok"}
    out: dict[str, Side] = {}
    for arm in ("primary", "canary"):
        mine = [c for c in calls if c.arm == arm]
        if not mine:
            continue
        ok = [c for c in mine if c.status == "ok"]
        judged = [v for v in (judge(c.output, c.output, fb.get(c.call_id)) for c in ok) if v is not None]
        agreement = None
        if arm == "canary":
            pairs = [same_answer(c.output, baseline[c.call_id].output) for c in ok if c.call_id in baseline]
            agreement = Share(sum(pairs), len(pairs))
        names = sorted({c.candidate or deployment for c in mine})
        out[arm] = Side.of(", ".join(names), [c.latency_s for c in ok], [c.cost for c in ok], len(mine) - len(ok),
                           judged, agreement)
    return out
