"""Rollouts: how a deployment name answers beyond its own candidate — a canary taking a share of
the calls, a shadow answering a share of them in the background, and the candidate it was
promoted to.

    set_canary(ws, "support@production", "ft:support-distilled", weight=0.1, sticky=True)
    set_shadow(ws, "support@production", "hybrid:support", share=0.5)
    get_rollout(ws, "support@production").answering      # the candidate answering the primary arm

A deployment here is a candidate's name (`PROMPT@LABEL`, `PROMPT@VERSION`, `ft:NAME`,
`hybrid:NAME`); so are its canary and its shadow, each resolved by the evaluator's
`resolve_candidate` when the gateway serves it: what is served is what was measured.

- **canary**: each call goes to the canary with probability `canary_weight` (`choose_arm`); with
  `sticky`, a caller (the request's `user`, else the API key's name) always gets the same arm.
- **shadow**: `shadow_share` of the calls are also answered by the shadow candidate, in the
  background, never returned and never waited for (the gateway's bounded queue; a call it cannot
  take is logged as dropped). On a canary's calls the primary answers in the shadows too (role
  `baseline`), so each arm's agreement with the primary is measured on live inputs.
- **primary**: after `tunelab promote` moved the deployment to a candidate that is not a version of
  its own prompt, the deployment answers with that candidate (`primary`); a prompt's own version is
  promoted by moving the prompt's label instead. `tunelab.lifecycle.promote` records both.

Every change bumps the rollout's `generation`; a running gateway re-reads a deployment's rollout
at most every `REFRESH_S` seconds and, when the generation moved, resolves the deployment again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import select

from tunelab.errors import NotFound, UserError
from tunelab.evaluate import read_hybrid
from tunelab.models.finetuned import read_finetuned
from tunelab.prompts import default_author, load_prompt
from tunelab.store.models import RolloutRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

ARMS = ("primary", "canary")
REFRESH_S = 1.0


@dataclass(frozen=True)
class Rollout:
    """A deployment's rollout (an empty one when none was set)."""

    deployment: str
    primary: str | None = None
    canary: str | None = None
    canary_weight: float = 0.0
    sticky: bool = False
    shadow: str | None = None
    shadow_share: float = 0.0
    generation: int = 0
    author: str = ""
    note: str = ""
    updated_at: datetime | None = None

    @property
    def answering(self) -> str:
        """The candidate of the primary arm: the promoted one, else the deployment's own."""
        return self.primary or self.deployment

    @property
    def active(self) -> bool:
        return bool(self.primary or (self.canary and self.canary_weight > 0) or (self.shadow and self.shadow_share > 0))

    def arm_candidate(self, arm: str) -> str:
        return self.canary if arm == "canary" and self.canary else self.answering

    def choose_arm(self, caller: str, call_id: str) -> str:
        """primary | canary: the canary with probability `canary_weight`, decided by the call's
        (random) id, or with `sticky` by the caller, so one caller always gets the same arm."""
        if not self.canary or self.canary_weight <= 0:
            return "primary"
        key = f"{self.deployment}\0{caller}" if self.sticky else call_id
        return "canary" if unit_hash(key) < self.canary_weight else "primary"

    def mirrors(self, call_id: str) -> bool:
        """Whether the shadow answers this call too (`shadow_share` of the calls, by call id)."""
        return bool(self.shadow) and self.shadow_share > 0 and unit_hash("shadow\0" + call_id) < self.shadow_share

    def to_dict(self) -> dict:
        return {"deployment": self.deployment, "answering": self.answering, "primary": self.primary,
                "canary": self.canary, "canary_weight": self.canary_weight, "sticky": self.sticky,
                "shadow": self.shadow, "shadow_share": self.shadow_share, "generation": self.generation,
                "author": self.author, "note": self.note,
                "updated_at": self.updated_at.isoformat(timespec="seconds") if self.updated_at else None}


def unit_hash(text: str) -> float:
    """A number in [0, 1) from sha256 of `text` (uniform, the same in every process)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:15], 16) / 16**15


def _rollout(row: RolloutRow | None, deployment: str) -> Rollout:
    if row is None:
        return Rollout(deployment)
    return Rollout(row.deployment, row.primary, row.canary, row.canary_weight, row.sticky, row.shadow,
                   row.shadow_share, row.generation, row.author, row.note, row.updated_at)


def get_rollout(ws: "Workspace", deployment: str) -> Rollout:
    with ws.store.session() as s:
        return _rollout(s.get(RolloutRow, deployment), deployment)


def list_rollouts(ws: "Workspace") -> list[Rollout]:
    """Every deployment with a rollout row (active or not), by name."""
    with ws.store.session() as s:
        return [_rollout(r, r.deployment) for r in s.scalars(select(RolloutRow).order_by(RolloutRow.deployment))]


def check_candidate(ws: "Workspace", spec: str, what: str = "candidate") -> str:
    """`spec` when it names a candidate of this workspace (a prompt version or label, `ft:NAME`,
    `hybrid:NAME`), checked without loading a model; NotFound or UserError otherwise."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError(f"no {what} given (PROMPT@LABEL, PROMPT@VERSION, ft:NAME or hybrid:NAME)")
    if spec.startswith("ft:"):
        read_finetuned(ws, spec[3:])
    elif spec.startswith("hybrid:"):
        read_hybrid(ws, spec[7:])
    elif "@" not in spec:
        raise UserError(f"{what} '{spec}' is a prompt's working file, which changes as it is edited: name a "
                        f"version or a label ({spec}@production, {spec}@VERSION)")
    else:
        load_prompt(ws, spec)
    return spec


def _weight(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or not 0 <= value <= 1:
        raise UserError(f"{name} is a share of the calls from 0 to 1 (0.1 = 10%), got {value!r}", field=name)
    return float(value)


def _change(ws: "Workspace", deployment: str, author: str | None, note: str, **fields) -> Rollout:
    if len(note or "") > 2000:
        raise UserError("a note has at most 2000 characters", field="note")
    with ws.store.session() as s:
        row = s.get(RolloutRow, deployment)
        if row is None:
            row = RolloutRow(deployment=deployment, canary_weight=0.0, sticky=False, shadow_share=0.0, generation=0)
            s.add(row)
        for k, v in fields.items():
            setattr(row, k, v)
        row.generation = (row.generation or 0) + 1
        row.author = author or default_author(ws)
        row.note = (note or "").strip()
        s.flush()
        return _rollout(row, deployment)


def _challenger(ws: "Workspace", deployment: str, candidate: str, what: str, share: float, name: str) -> float:
    """The checks a canary and a shadow share: a share from 0 to 1, two candidates, not the same one."""
    share = _weight(share, name)
    check_candidate(ws, deployment, "deployment")
    check_candidate(ws, candidate, what)
    if candidate == get_rollout(ws, deployment).answering:
        raise UserError(f"'{candidate}' already answers {deployment}: a {what} is another candidate")
    return share


def set_canary(ws: "Workspace", deployment: str, candidate: str, weight: float, *, sticky: bool = False,
               author: str | None = None, note: str = "") -> Rollout:
    """Send `weight` (0-1) of `deployment`'s calls to `candidate`; `sticky`: per caller."""
    weight = _challenger(ws, deployment, candidate, "canary", weight, "weight")
    return _change(ws, deployment, author, note, canary=candidate, canary_weight=weight, sticky=bool(sticky))


def set_shadow(ws: "Workspace", deployment: str, candidate: str, share: float = 1.0, *,
               author: str | None = None, note: str = "") -> Rollout:
    """Mirror `share` (0-1) of `deployment`'s calls to `candidate` in the background."""
    share = _challenger(ws, deployment, candidate, "shadow", share, "share")
    return _change(ws, deployment, author, note, shadow=candidate, shadow_share=share)


def stop_rollout(ws: "Workspace", deployment: str, what: str = "all", *, author: str | None = None,
                 note: str = "") -> Rollout:
    """Stop the canary, the shadow, or both (`all`); the promoted primary stays (see rollback)."""
    if what not in ("canary", "shadow", "all"):
        raise UserError(f"stop what: canary, shadow or all (got '{what}')")
    if get_rollout(ws, deployment).generation == 0:
        raise NotFound(f"deployment '{deployment}' has no rollout (see: tunelab rollout show)")
    fields: dict = {}
    if what in ("canary", "all"):
        fields.update(canary=None, canary_weight=0.0, sticky=False)
    if what in ("shadow", "all"):
        fields.update(shadow=None, shadow_share=0.0)
    return _change(ws, deployment, author, note, **fields)


def set_primary(ws: "Workspace", deployment: str, primary: str | None, *, clear: tuple[str, ...] = (),
                author: str | None = None, note: str = "") -> Rollout:
    """Make `primary` answer `deployment` (None: its own candidate again); a canary or shadow that
    was that candidate is stopped (`clear` names more to stop). Used by promote and rollback."""
    current = get_rollout(ws, deployment)
    fields: dict = {"primary": primary if primary != deployment else None}
    target = primary or deployment
    if current.canary == target or "canary" in clear:
        fields.update(canary=None, canary_weight=0.0, sticky=False)
    if current.shadow == target or "shadow" in clear:
        fields.update(shadow=None, shadow_share=0.0)
    return _change(ws, deployment, author, note, **fields)
