"""The optimizer's pieces: its budget, the trials (candidates) it tries, how a trial's prompt is
built from the seed, which demo settings it tries, and how the winner is chosen.

The winner: candidates over `max_prompt_tokens` (mean prompt tokens per request) are rejected;
among the fully evaluated candidates whose score lies within the 95% interval of the best one,
the one with the fewest prompt tokens per request wins — a lower score is traded only for a real
saving (`MIN_TOKEN_SAVING`). If that is the seed prompt, nothing beat it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from tunelab.canonical import sha256
from tunelab.datasets import Example
from tunelab.demos import DemoSelector, DemoSpec
from tunelab.errors import UserError
from tunelab.optimize.space import InstructionVariant
from tunelab.prompts import Part, Prompt, join_parts

DEFAULT_BUDGET = 20

# -- budget ------------------------------------------------------------------------------------

@dataclass
class Budget:
    """At most `evaluations` candidates, and/or at most `seconds` of wall time."""

    evaluations: int | None = DEFAULT_BUDGET
    seconds: float | None = None
    used: int = 0
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def parse(cls, value: int | str | None) -> "Budget":
        """`20` (candidates), `"20"`, `"15m"`, `"90s"`, `"1h"`."""
        if value is None:
            return cls()
        if isinstance(value, int):
            if value < 1:
                raise UserError(f"--budget must be at least 1 candidate (got {value})")
            return cls(evaluations=value)
        text = str(value).strip().lower()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?", text)
        if not m:
            raise UserError(f"--budget '{value}': expected a number of candidates (20) or a time (15m, 90s, 1h)")
        number, unit = float(m.group(1)), m.group(2)
        if unit is None:
            if number < 1 or number != int(number):
                raise UserError(f"--budget '{value}': a number of candidates is a whole number of at least 1")
            return cls(evaluations=int(number))
        seconds = number * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
        if seconds <= 0:
            raise UserError(f"--budget '{value}' must be more than 0")
        return cls(evaluations=None, seconds=seconds)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> int | None:
        return None if self.evaluations is None else max(0, self.evaluations - self.used)

    def exhausted(self) -> bool:
        if self.evaluations is not None and self.used >= self.evaluations:
            return True
        return self.seconds is not None and self.elapsed >= self.seconds

    def to_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "seconds": self.seconds, "used": self.used,
                "elapsed_s": round(self.elapsed, 3)}


# -- candidates --------------------------------------------------------------------------------

@dataclass
class Trial:
    """One candidate tried: what it is, and how it scored on validation."""

    id: int
    stage: str  # seed | instruction | demos | proposer
    variant: InstructionVariant
    demos: DemoSpec
    prompt: "Prompt"
    fixed_demos: list[Example]
    status: str = "pending"  # ok | screened | too_long | failed | pending
    score: float | None = None
    lo: float | None = None
    hi: float | None = None
    n: int = 0
    screen_score: float | None = None
    prompt_tokens: float | None = None  # mean per request
    completion_tokens: float | None = None
    tokens_spent: int = 0  # tokens of the requests this trial really sent (cache misses)
    cost: float = 0.0
    wall_s: float = 0.0
    run_ids: list[str] = field(default_factory=list)
    note: str = ""
    candidate: Any = None

    @property
    def name(self) -> str:
        return f"{self.variant.name} · {self.demos.describe()}"

    @property
    def selector(self) -> dict[str, Any] | None:
        """The per-input demo choice ({strategy, dataset, split, k}), as a committed version stores it."""
        demos = getattr(self.candidate, "demos", None)
        return demos.to_dict() if isinstance(demos, DemoSelector) else None

    def key(self) -> str:
        sel = self.selector
        return sha256({"version": self.prompt.version, "placement": self.variant.placement,
                       "demos": [d.to_dict() for d in self.fixed_demos], "selector": sel})

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "stage": self.stage, "status": self.status,
                "instruction": self.variant.to_dict(), "demos": self.demos.to_dict(),
                "prompt_version": self.prompt.version, "score": self.score, "lo": self.lo, "hi": self.hi,
                "n": self.n, "screen_score": self.screen_score, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "tokens_spent": self.tokens_spent,
                "cost": self.cost, "wall_s": round(self.wall_s, 3), "run_ids": self.run_ids, "note": self.note}


# -- building prompts --------------------------------------------------------------------------

def has_system_part(prompt: "Prompt") -> bool:
    return any(p.role == "system" for p in prompt.parts)


def seed_task(prompt: "Prompt") -> str:
    """The seed's own instruction (its system part), the task context every variant keeps."""
    if has_system_part(prompt):
        return prompt.instruction
    return (prompt.description or "").strip()


def build_prompt(seed: "Prompt", variant: InstructionVariant, demos: list[Example] | None,
                 per_input: bool = False) -> "Prompt":
    """The seed prompt with `variant`'s instruction and `demos` inline (None/[]: no demos).

    In the user turn the instruction opens the user message when there are no demos, and is a
    user message of its own before the demos otherwise (so it is not repeated in every demo)."""
    if variant.name == "seed":
        return seed.replace(demos=demos or None)
    rest = [Part(p.role, p.text, p.line) for p in seed.parts if p.role != "system"]
    if variant.placement == "system":
        parts = [Part("system", variant.text, 0), *rest]
    elif demos or per_input:
        parts = [Part("user", variant.text, 0), *rest]
    else:
        last_user = max(i for i, p in enumerate(rest) if p.role == "user")
        rest[last_user].text = variant.text.rstrip() + "\n\n" + rest[last_user].text.lstrip("\n")
        parts = rest
    return seed.replace(body=join_parts(parts), demos=demos or None)


def rendered_instruction(seed: "Prompt", text: str) -> str:
    """An instruction template rendered with the prompt's labels/schema (for the proposer)."""
    try:
        probe = seed.replace(body=f"system:\n{text}\nuser:\nx\n", demos=None)
        return probe.render(Example("x", ""), [])[0]["content"]
    except UserError:
        return text


def describe_selector(selector: dict[str, Any]) -> str:
    """One sentence on per-input demos as a committed version stores them."""
    how = "TF-IDF similarity" if selector["strategy"] == "knn_tfidf" else "sentence-embedding similarity"
    return (f"Its demos are chosen per input: the {selector['k']} examples of {selector['dataset']}:"
            f"{selector['split']} nearest to each input by {how} (front matter demos: "
            f"{{dataset: {selector['dataset']}, split: {selector['split']}, k: {selector['k']}, "
            f"strategy: {selector['strategy']}}}).")



def demo_specs(n_labels: int, strategies: Sequence[str]) -> list[DemoSpec]:
    """The demo settings to try, the usually most useful first."""
    out: list[DemoSpec] = []
    for strategy, spec in (
        ("stratified", DemoSpec("stratified", per_label=1)),
        ("knn_tfidf", DemoSpec("knn_tfidf", k=4)),
        ("knn_embed", DemoSpec("knn_embed", k=4)),
        ("random", DemoSpec("random", k=4)),
        ("stratified", DemoSpec("stratified", per_label=2)),
        ("knn_tfidf", DemoSpec("knn_tfidf", k=8)),
        ("random", DemoSpec("random", k=8)),
    ):
        if strategy not in strategies:
            continue
        if spec.strategy == "stratified" and (n_labels == 0 or spec.count(n_labels) > 16):
            continue
        out.append(spec)
    return out


MIN_TOKEN_SAVING = 0.10  # a shorter candidate within the best's interval wins only if it saves this share of tokens


def choose_winner(trials: Sequence[Trial], max_prompt_tokens: int | None = None) -> tuple[Trial | None, Trial | None]:
    """(winner, best). The best scores highest; the winner is the candidate with the fewest prompt
    tokens per request among those scoring within the best's 95% interval — but a lower score is
    traded only for a real saving: a candidate other than the best (or the seed) must be at least
    MIN_TOKEN_SAVING shorter than the best. Candidates over `max_prompt_tokens` (the seed included)
    cannot win: (None, None) if none is left."""
    eligible = [t for t in trials if t.status == "ok" and t.score is not None
                and (max_prompt_tokens is None or (t.prompt_tokens or 0) <= max_prompt_tokens)]
    if not eligible:
        return None, None
    best = max(eligible, key=lambda t: (t.score, -(t.prompt_tokens or 0), -t.id))
    floor = best.lo if best.lo is not None else best.score
    best_tokens = best.prompt_tokens or 0
    within = [t for t in eligible if t.score >= floor
              and (t is best or t.stage == "seed" or (t.prompt_tokens or 0) <= (1 - MIN_TOKEN_SAVING) * best_tokens)]
    winner = min(within, key=lambda t: (t.prompt_tokens or 0, -t.score, t.id))
    return winner, best


def outcome(seed: Trial, best: Trial | None, winner: Trial | None, improved: bool, objective: str,
             max_prompt_tokens: int | None = None) -> str:
    def fmt(t: Trial) -> str:
        return f"{t.score:.3f} [{t.lo:.3f}, {t.hi:.3f}]" if t.lo is not None else f"{t.score:.3f}"

    if winner is None or best is None:
        return (f"No candidate fits within --max-prompt-tokens {max_prompt_tokens} (the seed prompt has "
                f"{seed.prompt_tokens or 0:.0f} tokens per request). No new version.")
    if not improved:
        if best is seed:
            return (f"Nothing beat the seed prompt: it scored {objective} {fmt(seed)} on validation, "
                    "the best of every eligible candidate tried. No new version.")
        return (f"Nothing beat the seed prompt by more than the noise: the best candidate (#{best.id} "
                f"{best.name}) scored {objective} {fmt(best)}, the seed {fmt(seed)} — within the best's 95% "
                f"interval, and the seed is the shortest prompt there "
                f"({seed.prompt_tokens or 0:.0f} tokens per request). No new version.")
    gain = winner.score - seed.score
    text = (f"Candidate #{winner.id} ({winner.name}) scored {objective} {fmt(winner)} on validation vs the "
            f"seed's {fmt(seed)} ({gain:+.3f}), {winner.prompt_tokens or 0:.0f} vs "
            f"{seed.prompt_tokens or 0:.0f} prompt tokens per request.")
    if winner is not best:
        text += (f" It won over the top scorer #{best.id} ({best.name}, {fmt(best)}) because it lies within "
                 f"that 95% interval with fewer prompt tokens ({winner.prompt_tokens or 0:.0f} vs "
                 f"{best.prompt_tokens or 0:.0f}).")
    return text



def fmt_interval(metric: dict) -> str:
    if metric.get("value") is None:
        return "n/a"
    if metric.get("lo") is None:
        return f"{metric['value']:.3f}"
    return f"{metric['value']:.3f} [{metric['lo']:.3f}, {metric['hi']:.3f}]"


def trial_line(t: Trial, objective: str, plan: Budget) -> str:
    of = f"/{plan.evaluations}" if plan.evaluations else ""
    if t.status == "ok":
        what = f"{objective} {fmt_interval({'value': t.score, 'lo': t.lo, 'hi': t.hi})} (n={t.n})"
    elif t.status == "screened":
        what = f"screen {objective} {t.screen_score:.3f}"
    else:
        what = f"{t.status}: {t.note}"
    tok = f", {t.prompt_tokens:.0f} tok" if t.prompt_tokens else ""
    return f"[{t.id}{of}] {t.stage:<11} {t.name}: {what}{tok}"
