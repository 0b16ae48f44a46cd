"""Promotion: a deployment moves to its challenger (the canary, or a shadow) once a gate the user
sets is met by live evidence; every promotion, refusal and rollback is recorded with who, when,
the gate and the evidence.

    gate = Gate(min_agreement=0.95, min_calls=500, alpha=0.05)
    result = promote(ws, "support@production", gate)       # the canary, if the gate is met
    result.promoted, result.checks, result.evidence
    rollback(ws, "support@production")                      # undo the last promotion

The gate (`Gate`): the challenger agrees with the primary on at least `min_agreement` of at least
`min_calls` calls both answered (`tunelab.lifecycle.evidence`), and its answers are not
significantly worse by feedback (one-sided Fisher exact test at level `alpha`; with
`min_feedback` > 0, each side needs that many judged answers first, else the check passes with
"not tested"). A gate that no traffic could ever meet is refused as bad input (exit status 2):
bounds outside their range, or a challenger that answers none of the deployment's calls.

Moving a deployment: when it is `PROMPT@LABEL` and the challenger is a version (or another label)
of the same prompt, the label moves (`tag_prompt`, in the prompt's deploy history too); otherwise
the deployment answers with the challenger from now on (its rollout's `primary`). Either way the
canary (and a shadow of the same candidate) stops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from tunelab.errors import NotFound, UserError
from tunelab.lifecycle.evidence import Evidence, evidence
from tunelab.lifecycle.rollouts import check_candidate, get_rollout, set_primary
from tunelab.prompts import default_author, prompt_labels, tag_prompt
from tunelab.store.models import PromotionRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


class Gate(BaseModel):
    """What live traffic must show before a challenger takes over a deployment."""

    model_config = ConfigDict(extra="forbid")
    min_agreement: float = Field(0.95, description="share of calls on which the challenger agrees with the primary")
    min_calls: int = Field(500, description="calls both answered, at least")
    alpha: float = Field(0.05, description="a quality drop with a one-sided Fisher p below this blocks the promotion")
    min_feedback: int = Field(0, description="judged answers each side needs before quality counts (0: test what there is)")

    def check_reachable(self) -> None:
        """UserError for a gate no traffic could ever meet."""
        if not isinstance(self.min_agreement, (int, float)) or math.isnan(self.min_agreement) or not 0 <= self.min_agreement <= 1:
            raise UserError(f"--min-agreement {self.min_agreement} can never be met: agreement is a share from 0 to 1",
                            field="min_agreement")
        if self.min_calls < 1:
            raise UserError(f"--min-calls {self.min_calls}: at least 1 call must have been answered by both",
                            field="min_calls")
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha {self.alpha}: a significance level lies between 0 and 1 (e.g. 0.05)",
                            field="alpha")
        if self.min_feedback < 0:
            raise UserError(f"--min-feedback {self.min_feedback}: a number of judged answers, 0 or more",
                            field="min_feedback")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Promotion:
    """What `promote` found and did."""

    deployment: str
    primary: str
    challenger: str
    promoted: bool
    checks: list[Check]
    evidence: Evidence
    gate: Gate
    dry_run: bool = False
    moved: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "primary": self.primary, "challenger": self.challenger,
                "promoted": self.promoted, "dry_run": self.dry_run, "gate": self.gate.model_dump(),
                "checks": [c.__dict__ for c in self.checks], "evidence": self.evidence.to_dict(), "moved": self.moved}


def gate_checks(gate: Gate, ev: Evidence) -> list[Check]:
    """Each condition of the gate against the evidence, in words."""
    agree = ev.agreement
    checks = [Check("calls", agree.n >= gate.min_calls,
                    f"{agree.n} calls answered by both (need {gate.min_calls})"),
              Check("agreement", agree.value is not None and agree.value >= gate.min_agreement,
                    f"agreement {agree.text()} (need {gate.min_agreement:.1%})")]
    c, p = ev.challenger_side.quality, ev.primary_side.quality
    if gate.min_feedback and (c.n < gate.min_feedback or p.n < gate.min_feedback):
        checks.append(Check("quality", False, f"judged answers: {ev.challenger} {c.n}, {ev.primary} {p.n} "
                                              f"(need {gate.min_feedback} each; give feedback on calls)"))
    elif ev.quality_drop_p is None:
        checks.append(Check("quality", True, "not tested: no feedback judges both sides yet"))
    else:
        checks.append(Check("quality", ev.quality_drop_p >= gate.alpha,
                            f"right by feedback {c.text()} vs {p.text()}; one-sided Fisher exact "
                            f"p={ev.quality_drop_p:.3f} ({'significant drop' if ev.quality_drop_p < gate.alpha else 'no significant drop'} "
                            f"at {gate.alpha})"))
    return checks


def promote(ws: "Workspace", deployment: str, gate: Gate | None = None, *, candidate: str | None = None,
            author: str | None = None, note: str = "", dry_run: bool = False) -> Promotion:
    """Promote `candidate` (default: the deployment's canary, else its shadow) when `gate` is met;
    the attempt is recorded (unless `dry_run`), refused or not."""
    gate = gate or Gate()
    gate.check_reachable()
    check_candidate(ws, deployment, "deployment")
    rollout = get_rollout(ws, deployment)
    challenger = candidate or rollout.canary or rollout.shadow
    if not challenger:
        raise UserError(f"deployment '{deployment}' has no canary or shadow to promote: set one (tunelab rollout "
                        f"canary {deployment} CANDIDATE --weight 0.1) or name it with --candidate")
    check_candidate(ws, challenger, "candidate")
    primary = rollout.answering
    if challenger == primary:
        raise UserError(f"'{challenger}' already answers {deployment}")
    ev = evidence(ws, deployment, primary, challenger)
    gets_traffic = ((rollout.canary == challenger and rollout.canary_weight > 0)
                    or (rollout.shadow == challenger and rollout.shadow_share > 0))
    if not gets_traffic and ev.agreement.n < gate.min_calls:
        raise UserError(f"the gate can never be met: '{challenger}' answers none of {deployment}'s calls "
                        f"({ev.agreement.n} of the {gate.min_calls} calls needed so far); make it the canary "
                        f"(tunelab rollout canary {deployment} {challenger} --weight 0.1) or a shadow "
                        f"(tunelab rollout shadow {deployment} {challenger})")
    checks = gate_checks(gate, ev)
    passed = all(c.ok for c in checks)
    result = Promotion(deployment, primary, challenger, passed and not dry_run, checks, ev, gate, dry_run)
    if dry_run:
        return result
    author = author or default_author(ws)
    frm = primary
    if passed:
        result.moved = _move(ws, deployment, primary, challenger, rollout.primary, author, note)
        if result.moved.get("label"):
            frm = f"{deployment.partition('@')[0]}@{result.moved['from_version']}"
    _record(ws, deployment, "promote" if passed else "refused", frm, challenger, gate.model_dump(),
            {**ev.to_dict(), "checks": [c.__dict__ for c in checks], "moved": result.moved}, author, note)
    return result


def _move(ws: "Workspace", deployment: str, primary: str, challenger: str, promoted_before: str | None,
          author: str, note: str) -> dict[str, Any]:
    name, _, label = deployment.partition("@")
    own_label = not deployment.startswith(("ft:", "hybrid:")) and label in prompt_labels(ws, name)
    if own_label and challenger.partition("@")[0] == name:
        before = prompt_labels(ws, name)[label]
        after = tag_prompt(ws, challenger, label, note=f"promoted from {primary}" + (f": {note}" if note else ""),
                           author=author)
        set_primary(ws, deployment, None, clear=("canary",), author=author, note=note)
        return {"label": label, "from_version": before, "to_version": after, "primary_before": promoted_before}
    set_primary(ws, deployment, challenger, clear=("canary",), author=author, note=note)
    return {"primary": challenger, "primary_before": promoted_before}


def _record(ws: "Workspace", deployment: str, action: str, frm: str, to: str, gate: dict, ev: dict, author: str,
            note: str) -> int:
    with ws.store.session() as s:
        row = PromotionRow(deployment=deployment, action=action, from_candidate=frm, to_candidate=to, gate=gate,
                           evidence=ev, author=author, note=(note or "").strip())
        s.add(row)
        s.flush()
        return row.id


@dataclass
class PromotionRecord:
    id: int
    deployment: str
    action: str  # promote | refused | rollback
    from_candidate: str
    to_candidate: str
    gate: dict
    evidence: dict
    author: str
    note: str
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "created_at": self.created_at.isoformat(timespec="seconds")}


def promotion_history(ws: "Workspace", deployment: str | None = None, limit: int = 200) -> list[PromotionRecord]:
    """Promotions, refusals and rollbacks (of `deployment`), newest first."""
    q = select(PromotionRow).order_by(PromotionRow.id.desc()).limit(limit)
    if deployment:
        q = q.where(PromotionRow.deployment == deployment)
    with ws.store.session() as s:
        return [PromotionRecord(r.id, r.deployment, r.action, r.from_candidate, r.to_candidate, r.gate or {},
                                r.evidence or {}, r.author, r.note, r.created_at) for r in s.scalars(q)]


def rollback(ws: "Workspace", deployment: str, *, author: str | None = None, note: str = "") -> PromotionRecord:
    """Undo the last promotion of `deployment` not undone yet: the label moves back (or the
    previous primary answers again); recorded as a rollback."""
    history = list(reversed(promotion_history(ws, deployment, limit=10_000)))
    undone = {int(r.evidence.get("undoes", -1)) for r in history if r.action == "rollback"}
    last = next((r for r in reversed(history) if r.action == "promote" and r.id not in undone), None)
    if last is None:
        raise NotFound(f"deployment '{deployment}' has no promotion to roll back (see: tunelab rollout history {deployment})")
    author = author or default_author(ws)
    moved = last.evidence.get("moved") or {}
    current = get_rollout(ws, deployment).answering
    if moved.get("label"):
        name = deployment.partition("@")[0]
        current = f"{name}@{prompt_labels(ws, name).get(moved['label'])}"
        tag_prompt(ws, f"{name}@{moved['from_version']}", moved["label"], note=f"rollback of promotion #{last.id}"
                   + (f": {note}" if note else ""), author=author)
    set_primary(ws, deployment, moved.get("primary_before"), author=author, note=note)
    rid = _record(ws, deployment, "rollback", current, last.from_candidate, {}, {"undoes": last.id, "moved": moved},
                  author, note)
    return next(r for r in promotion_history(ws, deployment, limit=5) if r.id == rid)
