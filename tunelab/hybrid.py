"""Making a hybrid `hybrid:NAME`: the fine-tuned model first, a prompt where it is unsure, with its
thresholds tuned on the validation split.

    result = create_hybrid(ws, "support", primary="ft:support", fallback="support-router@v2")
    result.candidate                 # "hybrid:support", which every command and the gateway accept
    result.setup, result.spec        # what tuning took; the stored routing (tunelab.evaluate.routing)

Both thresholds (the primary's label margin, the input's similarity to the training inputs) are
tuned on the **validation** split (never the test split) to maximize the primary metric; among
equally good settings the one sending the least traffic to the fallback wins. Both sides are
evaluated on validation by the one evaluator (their runs are stored and reused next time). How a
hybrid then answers each request is `tunelab.evaluate.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Sequence

from tunelab.datasets import get_dataset, validate_name
from tunelab.errors import UserError
from tunelab.evaluate import (ExceptionRule, HybridSpec, NgramIndex, PromptCandidate, Routing, Setup, evaluate,
                              read_hybrid, resolve_candidate, run_rows, save_hybrid)
from tunelab.evaluate.routing import train_inputs
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
                    forced: Sequence[bool] | None = None, *, max_grid: int = 60) -> dict[str, Any]:
    """Thresholds that maximize the mean per-example score of the combined answers.

    `primary_scores[i]`/`fallback_scores[i]`: each side's score on validation example i;
    `margins[i]`: the primary's label margin; `similarities[i]`: max similarity to the training
    inputs; `forced[i]`: the example goes to the fallback anyway (rule, length). Ties go to the
    setting with the least fallback traffic, then to the lower thresholds.
    """
    n = len(primary_scores)
    if n == 0:
        return {"margin_threshold": 0.0, "similarity_threshold": 0.0, "score": None, "fallback_share": 0.0,
                "primary_score": None, "fallback_score": None, "n": 0}
    forced = list(forced) if forced is not None else [False] * n
    sims = list(similarities) if similarities is not None else [None] * n

    def grid(values: list[float]) -> list[float]:
        vals = sorted(set(v for v in values if v is not None))
        cuts = [0.0]
        # a threshold just above each observed value routes that value and everything below it
        for a, b in zip(vals, vals[1:] + [None]):
            cuts.append(a + 1e-9 if b is None else (a + b) / 2)
        if len(cuts) > max_grid:
            step = len(cuts) / max_grid
            cuts = sorted(set([0.0] + [cuts[int(i * step)] for i in range(max_grid)]))
        return [min(1.0, c) for c in cuts]

    margin_grid = grid([m for m in margins if m is not None])
    sim_grid = grid([s for s in sims if s is not None]) if any(s is not None for s in sims) else [0.0]
    best: tuple | None = None
    for st in sim_grid:
        for mt in margin_grid:
            total = 0.0
            fb = 0
            for i in range(n):
                to_fb = forced[i] or (sims[i] is not None and sims[i] < st) or (margins[i] is not None and margins[i] < mt)
                total += fallback_scores[i] if to_fb else primary_scores[i]
                fb += to_fb
            key = (round(total / n, 12), -fb, -st, -mt)
            if best is None or key > best[0]:
                best = (key, mt, st, total / n, fb / n)
    assert best is not None
    return {"margin_threshold": best[1], "similarity_threshold": best[2], "score": best[3], "fallback_share": best[4],
            "primary_score": sum(primary_scores) / n, "fallback_score": sum(fallback_scores) / n, "n": n,
            "grid": {"margin": len(margin_grid), "similarity": len(sim_grid)}}




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
    f_run = evaluate(ws, f_cand, val_ref, limit=limit, progress=progress)
    metric = p_run.primary_metric
    p_rows = {r.example_index: r for r in run_rows(ws, p_run.id) if r.repeat_index == 0}
    f_rows = {r.example_index: r for r in run_rows(ws, f_run.id) if r.repeat_index == 0}
    common = sorted(set(p_rows) & set(f_rows))
    inputs = [p_rows[i].input for i in common]
    margins = [(p_rows[i].extra or {}).get("margin") for i in common]
    index = NgramIndex(inputs_train) if (inputs_train and similarity != "off") else None
    sims = index.max_similarity(inputs) if index is not None else None
    forced = [r is not None and r.route == "fallback" for r in Routing(spec).before(inputs)]

    fixed_margin = None if threshold == "auto" else (0.0 if threshold == "off" else _unit(threshold, "threshold"))
    fixed_sim = None if similarity == "auto" else (0.0 if similarity == "off" else _unit(similarity, "similarity"))
    tuned = tune_thresholds([float((p_rows[i].scores or {}).get(metric, 0.0)) for i in common],
                            [float((f_rows[i].scores or {}).get(metric, 0.0)) for i in common],
                            margins if fixed_margin is None else [None] * len(common),
                            sims if fixed_sim is None else None, forced)
    spec.margin_threshold = tuned["margin_threshold"] if fixed_margin is None else fixed_margin
    spec.similarity_threshold = tuned["similarity_threshold"] if fixed_sim is None else fixed_sim
    if fixed_margin is not None or fixed_sim is not None:  # the score of the setting actually kept
        fb = [forced[k] or (sims is not None and sims[k] < spec.similarity_threshold)
              or (margins[k] is not None and margins[k] < spec.margin_threshold) for k in range(len(common))]
        scores = [float(((f_rows if fb[k] else p_rows)[i].scores or {}).get(metric, 0.0)) for k, i in enumerate(common)]
        tuned["score"] = sum(scores) / len(scores) if scores else None
        tuned["fallback_share"] = sum(fb) / len(fb) if fb else 0.0
    wall = float(p_run.throughput.get("wall_s") or 0) + float(f_run.throughput.get("wall_s") or 0)
    cost = float(p_run.cost.get("total") or 0) + float(f_run.cost.get("total") or 0)
    spec.tuning = {"data": val_ref, "metric": metric, "n": len(common), "validation_score": tuned["score"],
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
