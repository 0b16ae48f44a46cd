"""Making a hybrid `hybrid:NAME`: the fine-tuned model first, a prompt where it is unsure, with its
thresholds tuned on the validation split.

    result = create_hybrid(ws, "support", primary="ft:support", fallback="support-router@v2")
    result.candidate                 # "hybrid:support", which every command and the gateway accept
    result.setup, result.spec        # what tuning took; the stored routing (tunelab.evaluate.routing)

The thresholds (the primary's unsureness: its label margin, or for generated JSON and text the
probability of its answer's tokens — their geometric mean and the least likely one —; the input's
similarity to the training inputs; for JSON whether an unusable answer goes to the fallback) are
tuned on the **validation** split (never the test split) to maximize the primary metric; among
equally good settings the one sending the least traffic to the fallback wins. Both sides are
evaluated on validation by the one evaluator (their runs are stored and reused next time). How a
hybrid then answers each request is `tunelab.evaluate.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from tunelab.datasets import get_dataset, validate_name
from tunelab.errors import UserError
from tunelab.evaluate import (ExceptionRule, HybridSpec, NgramIndex, PromptCandidate, Routing, Setup, evaluate,
                              read_hybrid, resolve_candidate, run_rows, save_hybrid)
from tunelab.evaluate.routing import train_inputs
from tunelab.metrics import Answer, make_metric
from tunelab.models import free_weights
from tunelab.prompts import save_version

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


@dataclass
class HybridResult:
    """What `create_hybrid` returns: the candidate it made, what that took, and the stored spec."""

    spec: HybridSpec

    @property
    def candidate(self) -> str:
        return f"hybrid:{self.spec.name}"

    @property
    def setup(self) -> Setup:
        return self.spec.setup



def tune_thresholds(primary_scores: Sequence[float], fallback_scores: Sequence[float],
                    margins: Sequence[float | None], similarities: Sequence[float | None] | None = None,
                    forced: Sequence[bool] | None = None, *, min_probs: Sequence[float | None] | None = None,
                    max_grid: int = 60, value: Callable[[np.ndarray, int], np.ndarray] | None = None
                    ) -> dict[str, Any]:
    """Thresholds that maximize the mean per-example score of the combined answers, or with `value`
    a corpus metric of them (macro-F1).

    `primary_scores[i]`/`fallback_scores[i]`: each side's score on validation example i;
    `margins[i]`: the primary's unsureness signal (its label margin, or for generated answers the
    geometric-mean probability of its tokens); `min_probs[i]`: (generated answers) the probability
    of its least likely token; `similarities[i]`: max similarity to the training inputs;
    `forced[i]`: the example goes to the fallback anyway (rule, length, invalid answer). With
    `value` (a corpus metric's `Metric.value`), the scores are each side's rows of sufficient
    statistics (`Metric.paired_stats`, n x k) and a setting scores `value` of the combined rows'
    sums. Ties go to the setting with the least fallback traffic, then to the lower thresholds.
    """
    n = len(primary_scores)
    if n == 0:
        return {"margin_threshold": 0.0, "similarity_threshold": 0.0, "min_token_threshold": 0.0, "score": None,
                "fallback_share": 0.0, "primary_score": None, "fallback_score": None, "n": 0}
    P = np.asarray(primary_scores, float)
    F = np.asarray(fallback_scores, float)
    if value is None:  # the mean of per-example scores: one statistic, the sum
        P, F = P[:, None], F[:, None]

    def score(sums: np.ndarray) -> np.ndarray:
        return sums[..., 0] / n if value is None else np.nan_to_num(np.asarray(value(sums, n), float), nan=0.0)
    forced_a = np.asarray(list(forced) if forced is not None else [False] * n, bool)

    def signal(values: Sequence[float | None] | None) -> np.ndarray | None:
        if values is None or all(v is None for v in values):
            return None
        return np.array([np.nan if v is None else float(v) for v in values])

    def grid(values: np.ndarray | None, size: int) -> np.ndarray:
        if values is None:
            return np.zeros(1)
        vals = np.unique(values[~np.isnan(values)])
        # a threshold just above each observed value routes that value and everything below it
        cuts = [0.0] + [float(a + 1e-9 if b is None else (a + b) / 2)
                        for a, b in zip(vals, list(vals[1:]) + [None])]
        if len(cuts) > size:
            step = len(cuts) / size
            cuts = sorted(set([0.0] + [cuts[int(i * step)] for i in range(size)]))
        return np.minimum(1.0, np.asarray(cuts))

    marg, sims, mins = signal(margins), signal(similarities), signal(min_probs)
    size = max_grid if mins is None or sims is None else max(10, max_grid // 3)
    m_grid, s_grid, t_grid = grid(marg, max_grid), grid(sims, size), grid(mins, size)
    below_m = (np.nan_to_num(marg, nan=np.inf)[None, :] < m_grid[:, None]) if marg is not None \
        else np.zeros((1, n), bool)
    best: tuple | None = None
    with np.errstate(invalid="ignore"):
        for st in s_grid:
            by_sim = forced_a | ((sims < st) if sims is not None else False)
            for tt in t_grid:
                base = by_sim | ((mins < tt) if mins is not None else False)
                fb = (base[None, :] | below_m).astype(float)  # (margin grid, n)
                scores = score(fb @ F + (1.0 - fb) @ P)
                shares = fb.sum(1)
                for k, mt in enumerate(m_grid if marg is not None else [0.0]):
                    key = (round(float(scores[k]), 12), -int(shares[k]), -st, -tt, -mt)
                    if best is None or key > best[0]:
                        best = (key, float(mt), float(st), float(tt), float(scores[k]), int(shares[k]) / n)
    assert best is not None
    return {"margin_threshold": best[1], "similarity_threshold": best[2], "min_token_threshold": best[3],
            "score": best[4], "fallback_share": best[5], "primary_score": float(score(P.sum(0))),
            "fallback_score": float(score(F.sum(0))), "n": n,
            "grid": {"margin": len(m_grid), "similarity": len(s_grid), "min_token": len(t_grid)}}


def create_hybrid(ws: "Workspace", name: str, primary: str, fallback: str, *,
                  threshold: float | str = "auto", similarity: float | str = "auto", length_check: bool = True,
                  rules: Sequence[str | ExceptionRule] = (), data: str | None = None, limit: int | None = None,
                  progress: bool | Any = True) -> HybridResult:
    """Make `hybrid:NAME`: tune its thresholds on the validation split and store it.

    `primary` is usually `ft:NAME`; `fallback` a prompt `PROMPT[@VERSION|@LABEL]` (pinned to its
    version). `threshold`/`similarity`: "auto" (tuned on validation), a number, or "off" (0).
    `data`: the dataset `NAME[@VERSION]` (default: the fine-tune's). Both candidates are evaluated
    on its validation split with the evaluator (runs are stored, and reused next time).
    """
    validate_name(name, "hybrid")
    if primary.startswith("hybrid:") or fallback.startswith("hybrid:"):
        raise UserError("a hybrid's primary and fallback must be a prompt or a fine-tuned model, not another hybrid")
    p_cand = resolve_candidate(ws, primary, free_text=False)
    f_cand = resolve_candidate(ws, fallback, free_text=False)
    for cand in (p_cand, f_cand):  # NAME@VERSION must name the same prompt later, committed or not
        if isinstance(cand, PromptCandidate) and cand.kind == "prompt":
            save_version(ws, cand.prompt)
    data_ref = data or getattr(p_cand, "training_data", None)
    if data_ref is None:
        raise UserError(f"which data? '{primary}' is not a fine-tune of this workspace: pass --data DATASET")
    ds = get_dataset(ws, data_ref.split(":")[0])
    if "validation" not in ds.splits:
        raise UserError(f"dataset '{ds.name}' has no validation split to tune the hybrid's thresholds on "
                        "(tunelab data split makes one)")
    train_ref = f"{ds.name}@{ds.version}:train" if "train" in ds.splits else None
    inputs_train = train_inputs(ws, train_ref)
    rule_objs = [r if isinstance(r, ExceptionRule) else ExceptionRule(pattern=r) for r in rules]
    lengths = [len(t) for t in inputs_train]
    spec = HybridSpec(name=name, primary=p_cand.name, fallback=f_cand.name, rules=rule_objs,
                      length_range=(min(lengths), max(lengths)) if (length_check and lengths) else None,
                      train_data=train_ref, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    Routing(spec)  # validates the rules' regular expressions before any work

    val_ref = f"{ds.name}@{ds.version}:validation"
    # tuning needs each side's scores and margins only: no free-text answers (they cost generation)
    p_run = evaluate(ws, p_cand, val_ref, limit=limit, progress=progress)
    if not p_run.reused:
        free_weights()  # one side's model at a time: they reload in about a second (a flow's peak was here)
    f_run = evaluate(ws, f_cand, val_ref, limit=limit, progress=progress)
    metric = p_run.primary_metric
    p_rows = {r.example_index: r for r in run_rows(ws, p_run.id) if r.repeat_index == 0}
    f_rows = {r.example_index: r for r in run_rows(ws, f_run.id) if r.repeat_index == 0}
    common = sorted(set(p_rows) & set(f_rows))
    inputs = [p_rows[i].input for i in common]
    generative = p_cand.output.type != "label"
    if generative:  # the primary's confidence in its generated tokens (geometric mean, least likely)
        confidence = [(p_rows[i].extra or {}).get("confidence") or {} for i in common]
        margins = [c.get("mean") for c in confidence]
        min_probs: list | None = [c.get("min") for c in confidence]
    else:
        margins = [(p_rows[i].extra or {}).get("margin") for i in common]
        min_probs = None
    index = NgramIndex(inputs_train) if (inputs_train and similarity != "off") else None
    sims = index.max_similarity(inputs) if index is not None else None
    forced = [r is not None and r.route == "fallback" for r in Routing(spec).before(inputs)]
    # JSON: an answer that does not parse or match the schema is of no use to a caller; whether to
    # send it to the fallback is tuned like the thresholds (ties: send it)
    invalid = [p_cand.output.type == "json" and (p_rows[i].extra or {}).get("format_valid") is False for i in common]

    fixed_margin = None if threshold == "auto" else (0.0 if threshold == "off" else _unit(threshold, "threshold"))
    fixed_sim = None if similarity == "auto" else (0.0 if similarity == "off" else _unit(similarity, "similarity"))
    judged = make_metric(metric, p_cand.output)
    if judged.per_example:
        p_scores: Any = [float((p_rows[i].scores or {}).get(metric, 0.0)) for i in common]
        f_scores: Any = [float((f_rows[i].scores or {}).get(metric, 0.0)) for i in common]
        corpus = None
    else:  # macro-F1: each side's rows of counts, the metric of the combined counts
        p_scores, f_scores = judged.paired_stats(
            [Answer(expected=p_rows[i].expected, prediction=p_rows[i].prediction) for i in common],
            [Answer(expected=f_rows[i].expected, prediction=f_rows[i].prediction) for i in common])
        corpus = judged.value
    options = [False, True] if any(invalid) else [False]
    results = []
    for on in options:
        forced_now = [a or (on and b) for a, b in zip(forced, invalid)]
        results.append((on, forced_now, tune_thresholds(
            p_scores, f_scores, margins if fixed_margin is None else [None] * len(common),
            sims if fixed_sim is None else None, forced_now,
            min_probs=min_probs if fixed_margin is None else None, value=corpus)))
    on, forced, tuned = max(results, key=lambda r: (round(r[2]["score"] or 0.0, 12), r[0]))
    spec.invalid_to_fallback = on
    threshold_value = tuned["margin_threshold"] if fixed_margin is None else fixed_margin
    if generative:
        spec.confidence_threshold = threshold_value
        spec.min_token_threshold = tuned["min_token_threshold"] if fixed_margin is None else 0.0
    else:
        spec.margin_threshold = threshold_value
    spec.similarity_threshold = tuned["similarity_threshold"] if fixed_sim is None else fixed_sim
    if fixed_margin is not None or fixed_sim is not None:  # the score of the setting actually kept
        fb = [forced[k] or (sims is not None and sims[k] < spec.similarity_threshold)
              or (margins[k] is not None and margins[k] < threshold_value) for k in range(len(common))]
        tuned["score"] = tune_thresholds(p_scores, f_scores, [None] * len(common), None, fb, value=corpus)["score"]
        tuned["fallback_share"] = sum(fb) / len(fb) if fb else 0.0
    wall = float(p_run.throughput.get("wall_s") or 0) + float(f_run.throughput.get("wall_s") or 0)
    cost = float(p_run.cost.get("total") or 0) + float(f_run.cost.get("total") or 0)
    spec.tuning = {"data": val_ref, "metric": metric, "n": len(common), "validation_score": tuned["score"],
                   "signal": "token probability (geometric mean, least likely token)" if generative else "label margin",
                   "invalid_share": sum(invalid) / len(invalid) if invalid else 0.0,
                   "primary_score": tuned["primary_score"], "fallback_score": tuned["fallback_score"],
                   "fallback_share": tuned["fallback_share"], "threshold": str(threshold), "similarity": str(similarity),
                   "runs": {"primary": p_run.id, "fallback": f_run.id}}
    spec.setup = Setup(how="hybrid", wall_s=wall, compute_cost=cost,
                       sources=[f"threshold tuning on {val_ref} ({len(common)} examples, {wall:.0f} s)"])
    save_hybrid(ws, spec)
    return HybridResult(spec)


def get_hybrid(ws: "Workspace", name: str) -> HybridSpec:
    """The stored spec of `hybrid:NAME` (thresholds, rules, how they were tuned)."""
    return read_hybrid(ws, name)


def _unit(value: float | str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--{what} must be 'auto', 'off' or a number between 0 and 1 (got {value!r})") from None
    if not 0 <= v <= 1:
        raise UserError(f"--{what} must be between 0 and 1 (got {v})")
    return v
