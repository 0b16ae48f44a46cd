"""Advice: prompt engineering, fine-tuning, or a hybrid — from a comparison and your constraints.

    advice = advise(comparison, Constraints(volume=100_000, budget=50))
    advice.recommendation      # "prompt" | "ft" | "hybrid" | "none": a candidate kind, or none
    advice.candidate           # the recommended candidate, e.g. "ft:support"
    advice.reasons             # sentences citing the measured numbers

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
6. **Usable at all**: when no LLM candidate beats chance with its 95% interval, the answer is
   "none": "No candidate is usable yet". Chance for labels (accuracy or macro-F1) is the highest of
   the majority-class baseline's metric, what always answering the most frequent expected label
   scores and (accuracy) 1/labels; for JSON and text the higher of the floors compared: always the
   most frequent train output (`baseline:majority`: `{}` for most slot-filling data) and the input
   itself (`baseline:copy`, free text). When a classical
   baseline (`baseline:tfidf`, `baseline:embed`, `baseline:nearest`) is not significantly worse than
   the best LLM candidate, it is the answer ("You may not need an LLM for this task"). An
   out-of-scope class (`oos`) adds its share and each candidate's recall on it to the reasons.
7. **Quality**: the best remaining candidate by metric leads. Every remaining candidate that is
   *not significantly worse* stays a contender: significance is the comparison's paired test
   (McNemar or paired bootstrap) at p < 0.05; without a paired test, non-overlapping 95%
   intervals. When the leader is the only contender it is the recommendation.
8. **Change frequency** (`--change-frequency weekly`): when requirements change weekly and a
   prompt candidate is a contender, the best such prompt is recommended — a prompt edit and
   re-evaluation is measured against a retrain and re-evaluation.
9. **Cost**: otherwise the contender with the lowest cost over the comparison's horizon
   (12 months) at the expected volume wins: setup + 12 · volume · cost per request + the cost of
   changes (weekly 52, monthly 12, rarely 1 per year; a change costs its measured time ×
   engineer rate, plus the training compute again for a fine-tuned or hybrid candidate).
   Costs equal within 1e-9 (relative) — e.g. exactly at the break-even volume — are a tie, which
   goes to the simpler approach: prompt, then fine-tune, then hybrid. The reasons cite the
   break-even volume against the expected one.

The volume is `--volume`, else the comparison's. The recommendation is the kind of the candidate
it names — "hybrid" a `hybrid:NAME`, "ft" an `ft:NAME`, "prompt" a prompt version, "baseline" a
`baseline:METHOD` — or "none".
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.compare.costs import ALPHA, HORIZON_MONTHS, break_even_volume, horizon_cost
from tunelab.compare.format import fmt_interval, fmt_money, fmt_p, fmt_seconds, fmt_volume
from tunelab.compare.result import Advice, CandidateEntry, Comparison, Excluded, PairTest
from tunelab.evaluate.baselines import FLOORS

RULES_VERSION = "tunelab.advise/3"  # 3: chance for JSON and text outputs (majority, copy)
CHANGES_PER_YEAR = {"weekly": 52, "monthly": 12, "rarely": 1}
SIMPLICITY = {"baseline": -1, "prompt": 0, "ft": 1, "hybrid": 2}
KIND_WORD = {"prompt": "prompt", "ft": "fine-tuned", "hybrid": "hybrid", "baseline": "classical baseline"}
HEADLINE = {"prompt": "Prompt engineering", "ft": "Fine-tuning", "hybrid": "Hybrid (fine-tuned model with a prompt fallback)",
            "baseline": "You may not need an LLM for this task", "none": "Neither: no candidate meets the constraints",
            "unusable": "No candidate is usable yet"}
OOS_LABELS = ("oos", "out_of_scope", "out-of-scope", "none_of_the_above")


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


def fmt_metric(c: CandidateEntry) -> str:
    return fmt_interval(c.metric, digits=2)


def _describe(c: CandidateEntry, metric: str) -> str:
    return f"{KIND_WORD.get(c.kind, c.kind)} {c.name} {metric} {fmt_metric(c)}"


def significantly_worse(comparison: Comparison, worse: CandidateEntry, best: CandidateEntry) -> tuple[bool, PairTest | None]:
    """Whether `worse` is significantly below `best` (paired test, else interval overlap)."""
    test = None
    if not (best.estimated_from_learning_curve or worse.estimated_from_learning_curve):
        test = comparison.pair(best.name, worse.name)  # measured on the full model only
    if test is not None and test.p_value is not None:
        return (test.p_value < ALPHA and best.metric.value > worse.metric.value), test
    bl, wh = best.metric.low, worse.metric.high
    if bl is None or wh is None:
        return False, None
    return bl > wh, None


def _estimate_from_learning_curve(comparison: Comparison, cand: CandidateEntry, examples: int):
    curve = comparison.learning_curve
    if curve is None or curve.candidate != cand.name:
        return None
    points = [p for p in curve.points if p.n_train is not None and p.n_train <= examples]
    return max(points, key=lambda p: p.n_train) if points else None


def _is_majority(c: CandidateEntry) -> bool:
    return c.kind == "baseline" and c.name.startswith("baseline:majority")


def _is_floor(c: CandidateEntry) -> bool:
    """A baseline that needs no model of the task (`baselines.FLOORS`: majority, copy): a floor for
    the rule "usable at all", never a recommendation."""
    return c.kind == "baseline" and c.name.startswith(tuple(f"baseline:{m}" for m in FLOORS))


def _beats(c: CandidateEntry, level: float) -> bool:
    """Whether `c` is above `level` with its 95% interval (its low end; the point without one)."""
    low = c.metric.low if c.metric.low is not None else c.metric.value
    return low is not None and low > level + 1e-12


def chance_level(comparison: Comparison) -> tuple[float, str] | None:
    """What a label candidate must beat to be usable (accuracy or macro-F1): the highest of the
    majority-class baseline's measured metric (when it was compared), what always answering the
    split's most frequent expected label scores (from a confusion matrix: its share for accuracy;
    its F1 over the labels present for macro-F1), and for accuracy 1/the number of labels. None when
    the comparison cannot tell (not labels, another metric, no labels known). JSON and text: the
    higher of the floors compared (`baseline:majority`, always the most frequent train output;
    `baseline:copy`, the input itself), else None."""
    if comparison.output_type != "label":
        floors = [c for c in comparison.candidates if _is_floor(c) and c.metric.value is not None]
        if not floors:
            return None
        top = max(floors, key=lambda c: c.metric.value)
        copy = top.name.startswith("baseline:copy")
        what = "copying the input" if copy else "always answering the most frequent output"
        return float(top.metric.value), f"{what} ({top.name})"
    if comparison.metric not in ("accuracy", "macro_f1"):
        return None
    macro = comparison.metric == "macro_f1"
    levels: list[tuple[float, str]] = []
    labels = comparison.dataset.labels or []
    if len(labels) >= 2 and not macro:
        levels.append((1.0 / len(labels), f"chance (1 of {len(labels)} labels)"))
    majority = next((c for c in comparison.candidates if _is_majority(c) and c.metric.value is not None), None)
    if majority is not None:
        levels.append((float(majority.metric.value), f"the majority class ({majority.name})"))
    conf = next((c.confusion for c in comparison.candidates if c.confusion is not None), None)
    rows = [sum(r) for r in conf.matrix] if conf is not None else []
    if sum(rows):  # the split's own most frequent label (clinc150's test: 18% oos, 0.7% of train)
        top = max(range(len(rows)), key=lambda i: rows[i])
        share = rows[top] / sum(rows)
        # macro-F1 of a constant answer: its label's F1 (precision = share, recall 1), the others 0
        level = 2 * share / (1 + share) / sum(1 for r in rows if r) if macro else share
        levels.append((level, f"always answering the most frequent label ({conf.labels[top]})"))
    return max(levels, key=lambda x: x[0]) if levels else None


def oos_reasons(comparison: Comparison) -> list[str]:
    """Where the labels have an out-of-scope class (`oos` in clinc150): its share of the split and
    how often each candidate catches it (recall), so the advice weighs abstention."""
    labels = comparison.dataset.labels or []
    oos = next((lab for lab in labels if lab.lower() in OOS_LABELS), None)
    if oos is None:
        return []
    recalls, share = [], None
    for c in comparison.candidates:
        conf = c.confusion
        if conf is None or oos not in conf.labels:
            continue
        i = conf.labels.index(oos)
        total = sum(sum(r) for r in conf.matrix)
        support = sum(conf.matrix[i])
        if total and share is None:
            share = support / total
        if support:
            recalls.append(f"{c.name} {conf.matrix[i][i] / support:.0%}")
    if share is None:
        return [f"the labels include an out-of-scope class '{oos}': a hybrid (its fallback) or a confidence "
                "threshold can abstain on inputs no label fits"]
    return [f"{share:.0%} of the examples are out of scope ('{oos}'); caught (recall): " + (", ".join(recalls) or "n/a")
            + ". A hybrid or a confidence threshold may abstain on them rather than force an intent"]


def advise(comparison: Comparison, constraints: Constraints | None = None) -> Advice:
    """The recommendation for `comparison` under `constraints` (see the module doc for the rules)."""
    cons = constraints or Constraints()
    metric = comparison.metric
    months = int(comparison.months or HORIZON_MONTHS)
    volume = cons.volume if cons.volume is not None else float(comparison.volume_per_month or 0)
    rate = float(comparison.engineer_hourly_rate or 0.0)
    excluded: list[Excluded] = []
    reasons: list[str] = []

    def drop(c: CandidateEntry, rule: str, why: str) -> None:
        excluded.append(Excluded(candidate=c.name, rule=rule, reason=why))

    remaining: list[CandidateEntry] = []
    for c in comparison.candidates:
        if c.metric.value is None:
            drop(c, "metric", f"{c.name} has no measured {metric}")
            continue
        # 1. locality
        if cons.data_must_stay_local and not c.local:
            drop(c, "local", f"{c.name} sends data to a remote server ({c.model or '?'}); your data must stay local")
            continue
        # 2. data available
        trained = c.examples_trained
        if cons.examples is not None and c.kind in ("ft", "hybrid") and trained is not None and trained > cons.examples:
            point = _estimate_from_learning_curve(comparison, c, cons.examples) if c.kind == "ft" else None
            if point is None:
                drop(c, "examples", f"{c.name} was trained on {trained:,} examples; you have {cons.examples:,}"
                     + (" and the learning curve has no point that small"
                        if comparison.learning_curve is not None and c.kind == "ft" else ""))
                continue
            c = c.model_copy(update={"metric": point.metric, "estimated_from_learning_curve": point.n_train})
            reasons.append(f"{c.name} was trained on {trained:,} examples but you have {cons.examples:,}: the learning "
                           f"curve's point at {point.n_train:,} examples ({metric} {fmt_metric(c)}) stands in for it")
        # 3. budget
        total = c.setup.total_cost
        if cons.budget is not None and total > cons.budget:
            drop(c, "budget", f"{c.name}'s setup cost {fmt_money(total)} is above your budget {fmt_money(cons.budget)}")
            continue
        # 4. deadline
        wall = c.setup.wall_s
        if cons.deadline_days is not None and wall > cons.deadline_days * 86400:
            drop(c, "deadline", f"{c.name}'s setup took {fmt_seconds(wall)}, longer than your deadline of "
                 f"{cons.deadline_days:g} days")
            continue
        # 5. required metric
        if cons.required_metric is not None and c.metric.value < cons.required_metric:
            drop(c, "required_metric", f"{_describe(c, metric)} is below the required {cons.required_metric:g}")
            continue
        remaining.append(c)

    base = {"rules": RULES_VERSION, "metric": metric, "volume_per_month": volume, "months": months,
            "constraints": cons.model_dump(exclude_defaults=True), "excluded": excluded}

    if not remaining:
        cands = comparison.candidates
        rules_hit = {e.rule for e in excluded}
        if cands and rules_hit == {"required_metric"}:
            best = max(cands, key=lambda c: c.metric.value)
            lead = (f"neither meets the required {metric} of {cons.required_metric:g}: the best, "
                    f"{_describe(best, metric)}, falls short")
        elif not cands:
            lead = "the comparison has no candidates"
        else:
            lead = "no candidate meets the constraints"
        return Advice(**base, recommendation="none", candidate=None, headline=HEADLINE["none"],
                      reasons=[lead] + reasons + [e.reason for e in excluded], contenders=[])

    # 6. usable at all: an LLM candidate must beat chance (the majority class) with its interval
    floor = chance_level(comparison)
    llms = [c for c in remaining if c.kind != "baseline"]
    refs = [c for c in remaining if c.kind == "baseline" and not _is_floor(c)]
    if floor is not None:
        level, what = floor
        usable = [c for c in llms if _beats(c, level)]
        if llms and not usable:
            best_llm = max(llms, key=lambda c: c.metric.value)
            good_refs = [c for c in refs if _beats(c, level)]
            floor_word = "chance" if comparison.output_type == "label" else "it"
            why = [f"no LLM candidate beats {what} ({metric} {level:.2f}) with its 95% interval: the best, "
                   f"{_describe(best_llm, metric)}, is not above {floor_word}"]
            if good_refs:
                ref = max(good_refs, key=lambda c: c.metric.value)
                why.append(f"the {_describe(ref, metric)} does beat it: "
                           "you may not need an LLM for this task")
            why.append("more training data, a longer fine-tune or a better prompt is needed before any of them is used")
            return Advice(**base, recommendation="none", candidate=None,
                          headline=f"{HEADLINE['unusable']}: none beats {what} ({metric} {level:.2f})",
                          reasons=why + oos_reasons(comparison) + reasons + [e.reason for e in excluded],
                          contenders=[])
        remaining = [c for c in remaining if c.kind != "baseline" or _beats(c, level)]
        llms = usable
    # a classical baseline as good as the best LLM candidate (within its interval / paired test)
    if llms and refs:
        best_llm = max(llms, key=lambda c: c.metric.value)
        ref = max(refs, key=lambda c: c.metric.value)
        worse, test = significantly_worse(comparison, ref, best_llm)
        if not worse:
            better, above = significantly_worse(comparison, best_llm, ref)
            how = "better than" if better else "as good as"
            test = above if better else test
            return Advice(**base, recommendation="baseline", candidate=ref.name,
                          headline=f"{HEADLINE['baseline']}: {ref.name}",
                          reasons=[f"the {_describe(ref, metric)} is {how} the best LLM candidate, "
                                   f"{_describe(best_llm, metric)} ({fmt_p(test.p_value if test else None)}), "
                                   f"at {fmt_money(ref.cost_per_request * 1000)} per 1,000 requests and "
                                   f"{fmt_seconds(ref.setup.wall_s)} of training"]
                          + oos_reasons(comparison) + reasons + [e.reason for e in excluded],
                          contenders=[ref.name, best_llm.name])
    remaining = llms or remaining
    reasons += oos_reasons(comparison)

    # 7. quality
    remaining.sort(key=lambda c: (-c.metric.value, SIMPLICITY.get(c.kind, 9), c.name))
    best = remaining[0]
    contenders = [best]
    for c in remaining[1:]:
        worse, test = significantly_worse(comparison, c, best)
        p = fmt_p(test.p_value if test is not None else None)
        if worse:
            reasons.append(f"{_describe(best, metric)} vs {_describe(c, metric)}, {p}: {c.name} is significantly worse")
        else:
            contenders.append(c)
            reasons.append(f"{_describe(best, metric)} vs {_describe(c, metric)}, {p}: not a significant difference")
    if cons.required_metric is not None:
        reasons.append(f"{len(remaining)} candidate(s) meet the required {metric} of {cons.required_metric:g}")

    bases = {c.base for c in comparison.candidates if c.base}

    def on_base(choice: CandidateEntry) -> str:  # with several bases compared, the advice names the base
        return f" on {choice.base}" if len(bases) > 1 and choice.base else ""

    def done(choice: CandidateEntry, why: list[str]) -> Advice:
        return Advice(**base, recommendation=choice.kind, candidate=choice.name,
                      headline=f"{HEADLINE.get(choice.kind, choice.kind)}: {choice.name}" + on_base(choice),
                      reasons=why + reasons + [e.reason for e in excluded], contenders=[c.name for c in contenders])

    if len(contenders) == 1:
        return done(best, [f"{best.name} has the best {metric} and every other candidate is significantly worse"
                           if len(remaining) > 1 else f"{best.name} is the only candidate that meets the constraints"])

    # 8. change frequency
    prompts = [c for c in contenders if c.kind == "prompt"]
    if cons.change_frequency == "weekly" and prompts:
        choice = prompts[0]
        others = [c for c in contenders if c.kind != "prompt"]
        why = ["requirements change weekly: a prompt change takes "
               f"{fmt_seconds(choice.flexibility.change_s)} (edit + re-evaluation)"
               + (f" vs {fmt_seconds(max(o.flexibility.change_s for o in others))} for a retrain + re-evaluation"
                  if others else "")]
        return done(choice, why)

    # 9. cost over the horizon at the expected volume
    n_changes = CHANGES_PER_YEAR.get(cons.change_frequency or "", 0) * months / 12

    def total(c: CandidateEntry) -> float:
        per_change = c.flexibility.change_s / 3600 * rate
        if c.kind in ("ft", "hybrid"):
            per_change += c.setup.compute_cost
        return horizon_cost(c.setup.total_cost, c.cost_per_request, volume, months) + n_changes * per_change

    costs = {c.name: total(c) for c in contenders}
    cheapest = min(costs.values())
    tied = [c for c in contenders if math.isclose(costs[c.name], cheapest, rel_tol=1e-9, abs_tol=1e-12)]
    choice = min(tied, key=lambda c: (SIMPLICITY.get(c.kind, 9), -c.metric.value, c.name))
    why = [f"{len(contenders)} candidates are statistically tied on {metric}; cost over {months} months at "
           f"{fmt_volume(volume)} requests/month decides: "
           + ", ".join(f"{c.name} {fmt_money(costs[c.name])}" for c in contenders)]
    if len(tied) > 1:
        why.append(f"{', '.join(c.name for c in tied)} cost the same; the simpler approach wins")
    for other in contenders:
        if other is choice:
            continue
        v = break_even_volume(choice.setup.total_cost, choice.cost_per_request, other.setup.total_cost,
                              other.cost_per_request, months)
        if v is not None:
            pricier = choice if choice.setup.total_cost > other.setup.total_cost else other
            why.append(f"break-even between {choice.name} and {other.name} at {fmt_volume(v)} requests/month "
                       f"({pricier.name} pays back its setup above it); you expect {fmt_volume(volume)}")
    if cons.change_frequency and n_changes:
        why.append(f"requirements change {cons.change_frequency} ({n_changes:g} changes over {months} months) — counted in the cost")
    return done(choice, why)
