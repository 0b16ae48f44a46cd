"""The advisor's rules, table-driven: each recommendation and the edges between them."""

from __future__ import annotations

import pytest

from tunelab.compare import Comparison, Constraints, advise, break_even_volume


def cand(name, kind, value, low=None, high=None, *, setup=0.0, per_req=0.0, wall_s=0.0, local=True,
         change_s=60.0, trained=None, compute=None):
    return {
        "name": name, "kind": kind, "model": "openai:gpt" if not local else "smollm2-135m", "local": local,
        "metric": {"value": value, "low": value - 0.04 if low is None else low,
                   "high": value + 0.04 if high is None else high},
        "setup": {"total_cost": setup, "compute_cost": setup if compute is None else compute, "wall_s": wall_s},
        "cost_per_request": per_req, "flexibility": {"change_s": change_s}, "examples_trained": trained,
    }


def comparison(*cands, pairwise=(), volume=10_000, learning_curve=None, rate=0.0, labels=None, metric="accuracy",
               output_type="label"):
    return Comparison.model_validate({"output_type": output_type,
        "id": "c", "created_at": "2026-12-01T00:00:00+00:00", "best": cands[0]["name"] if cands else "",
        "dataset": {"name": "d", "version": "v", "split": "test", "n_examples": 100, "labels": labels},
        "metric": metric, "volume_per_month": volume, "months": 12, "engineer_hourly_rate": rate,
        "candidates": list(cands), "learning_curve": learning_curve,
        "pairwise": [{"a": a, "b": b, "test": "mcnemar", "p_value": p, "difference": None} for a, b, p in pairwise]})


# prompt: free setup, expensive requests; ft: $12 setup, cheap requests.
# break-even: 12 / (12 * (0.0003 - 0.0001)) = 5,000 requests a month.
P = dict(setup=0.0, per_req=0.0003, change_s=120)
F = dict(setup=12.0, per_req=0.0001, wall_s=1800, change_s=2400, trained=2000)
BE = break_even_volume(12.0, 0.0001, 0.0, 0.0003)

TIED = [("ft:a", "p@1", 0.40)]
EIGHT = ["billing", "technical", "account", "shipping", "returns", "sales", "security", "feedback"]
FT_BETTER = [("ft:a", "p@1", 0.0004)]

CASES = [
    # id, comparison, constraints, expected recommendation, expected candidate
    ("ft clearly better",
     comparison(cand("p@1", "prompt", 0.78, 0.73, 0.82, **P), cand("ft:a", "ft", 0.91, 0.87, 0.94, **F), pairwise=FT_BETTER),
     Constraints(), "ft", "ft:a"),
    ("prompt clearly better",
     comparison(cand("p@1", "prompt", 0.90, **P), cand("ft:a", "ft", 0.70, **F), pairwise=[("p@1", "ft:a", 0.001)]),
     Constraints(volume=1_000_000), "prompt", "p@1"),
    ("hybrid clearly better",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.80, **F),
                cand("hybrid:h", "hybrid", 0.90, setup=12.0, per_req=0.00015, trained=2000),
                pairwise=[("hybrid:h", "p@1", 0.001), ("hybrid:h", "ft:a", 0.01), ("ft:a", "p@1", 0.5)]),
     Constraints(), "hybrid", "hybrid:h"),
    ("tied, volume above break-even -> ft",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE * 2), "ft", "ft:a"),
    ("tied, volume below break-even -> prompt",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE / 2), "prompt", "p@1"),
    ("tied, exactly at break-even -> the simpler prompt",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE), "prompt", "p@1"),
    ("tied, just above break-even -> ft",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE * 1.001), "ft", "ft:a"),
    ("intervals overlap but paired test significant -> quality decides",
     comparison(cand("p@1", "prompt", 0.84, 0.80, 0.88, **P), cand("ft:a", "ft", 0.87, 0.83, 0.91, **F),
                pairwise=[("ft:a", "p@1", 0.01)]),
     Constraints(volume=10), "ft", "ft:a"),
    ("no paired test, intervals overlap -> tie, cost decides",
     comparison(cand("p@1", "prompt", 0.84, 0.80, 0.88, **P), cand("ft:a", "ft", 0.87, 0.83, 0.91, **F)),
     Constraints(volume=10), "prompt", "p@1"),
    ("no paired test, intervals apart -> quality decides",
     comparison(cand("p@1", "prompt", 0.70, 0.65, 0.75, **P), cand("ft:a", "ft", 0.87, 0.83, 0.91, **F)),
     Constraints(volume=10), "ft", "ft:a"),
    ("budget just below the ft setup cost -> prompt",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **F), pairwise=FT_BETTER),
     Constraints(budget=11.99), "prompt", "p@1"),
    ("budget exactly the ft setup cost -> ft fits",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **F), pairwise=FT_BETTER),
     Constraints(budget=12.0), "ft", "ft:a"),
    ("required metric met only by ft",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **F), pairwise=TIED),
     Constraints(required_metric=0.85, volume=1), "ft", "ft:a"),
    ("required metric met by none",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.81, **F), pairwise=TIED),
     Constraints(required_metric=0.85), "none", None),
    ("required metric exactly met",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.80, **F), pairwise=TIED),
     Constraints(required_metric=0.85), "prompt", "p@1"),
    ("data must stay local excludes a remote prompt",
     comparison(cand("p@1", "prompt", 0.95, local=False, **P), cand("ft:a", "ft", 0.85, **F),
                pairwise=[("p@1", "ft:a", 0.001)]),
     Constraints(data_must_stay_local=True), "ft", "ft:a"),
    ("deadline shorter than the training time",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **{**F, "wall_s": 3 * 86400}),
                pairwise=FT_BETTER),
     Constraints(deadline_days=2), "prompt", "p@1"),
    ("too few examples for the fine-tune, no learning curve",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **F), pairwise=FT_BETTER),
     Constraints(examples=100), "prompt", "p@1"),
    ("weekly changes and a tie -> prompt even above break-even",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE * 10, change_frequency="weekly"), "prompt", "p@1"),
    ("weekly changes do not override quality",
     comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.91, **F), pairwise=FT_BETTER),
     Constraints(change_frequency="weekly"), "ft", "ft:a"),
    ("monthly retrains cost more than the volume saves -> prompt",
     comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED),
     Constraints(volume=BE * 1.5, change_frequency="monthly"), "prompt", "p@1"),
    ("metric tie and cost tie among three -> simplest",
     comparison(cand("p@1", "prompt", 0.85, setup=0, per_req=0.0001), cand("ft:a", "ft", 0.85, setup=0, per_req=0.0001),
                cand("hybrid:h", "hybrid", 0.85, setup=0, per_req=0.0001)),
     Constraints(), "prompt", "p@1"),
    ("only a prompt", comparison(cand("p@1", "prompt", 0.5, **P)), Constraints(), "prompt", "p@1"),
    ("a candidate without a metric is left out",
     comparison(cand("p@1", "prompt", 0.5, **P), {**cand("ft:a", "ft", 0.9, **F), "metric": {"value": None}}),
     Constraints(), "prompt", "p@1"),
    ("empty comparison", comparison(), Constraints(), "none", None),
    # the truth: chance, and a classical baseline as good as an LLM (labels known: chance is 1/8)
    ("every LLM candidate at chance -> no candidate is usable yet",
     comparison(cand("p@1", "prompt", 0.16, 0.10, 0.23, **P), cand("ft:a", "ft", 0.19, 0.12, 0.26, **F),
                labels=EIGHT),
     Constraints(), "none", None),
    ("at the majority class's accuracy -> not usable",
     comparison(cand("p@1", "prompt", 0.45, 0.38, 0.52, **P), cand("ft:a", "ft", 0.47, 0.40, 0.54, **F),
                cand("baseline:majority:d@v", "baseline", 0.44, 0.37, 0.51), labels=EIGHT),
     Constraints(), "none", None),
    ("above the majority class with its interval -> usable, the rules go on",
     comparison(cand("p@1", "prompt", 0.78, 0.73, 0.82, **P), cand("ft:a", "ft", 0.91, 0.87, 0.94, **F),
                cand("baseline:majority:d@v", "baseline", 0.44, 0.37, 0.51), pairwise=FT_BETTER, labels=EIGHT),
     Constraints(), "ft", "ft:a"),
    ("a classical baseline as good as the best LLM -> you may not need an LLM",
     comparison(cand("p@1", "prompt", 0.78, 0.73, 0.82, **P), cand("ft:a", "ft", 0.86, 0.82, 0.90, **F),
                cand("baseline:tfidf:d@v", "baseline", 0.85, 0.81, 0.89, wall_s=1.5),
                pairwise=[("ft:a", "baseline:tfidf:d@v", 0.6), ("ft:a", "p@1", 0.01)], labels=EIGHT),
     Constraints(), "baseline", "baseline:tfidf:d@v"),
    ("a classical baseline significantly worse than the best LLM -> the LLM",
     comparison(cand("p@1", "prompt", 0.78, 0.73, 0.82, **P), cand("ft:a", "ft", 0.93, 0.90, 0.96, **F),
                cand("baseline:tfidf:d@v", "baseline", 0.80, 0.75, 0.85, wall_s=1.5),
                pairwise=[("ft:a", "baseline:tfidf:d@v", 0.001), ("ft:a", "p@1", 0.001)], labels=EIGHT),
     Constraints(), "ft", "ft:a"),
    ("LLMs at chance, a baseline above it -> still not usable, the reasons name the baseline",
     comparison(cand("p@1", "prompt", 0.13, 0.08, 0.19, **P), cand("baseline:tfidf:d@v", "baseline", 0.80, 0.75, 0.85),
                labels=EIGHT),
     Constraints(), "none", None),
    # JSON and text: chance is the majority baseline (the most frequent train output), retrieval a reference
    ("JSON: no LLM above always answering {} (json_match) -> not usable",
     comparison(cand("p@1", "prompt", 0.47, 0.42, 0.51, **P), cand("ft:a", "ft", 0.50, 0.45, 0.54, **F),
                cand("baseline:majority:d@v", "baseline", 0.45, 0.41, 0.50), pairwise=TIED,
                output_type="json", metric="json_match"),
     Constraints(), "none", None),
    ("JSON: field F1 above {} and above the nearest train output -> the LLM",
     comparison(cand("p@1", "prompt", 0.44, 0.39, 0.49, **P), cand("ft:a", "ft", 0.71, 0.66, 0.75, **F),
                cand("baseline:majority:d@v", "baseline", 0.0, 0.0, 0.0),
                cand("baseline:nearest:d@v", "baseline", 0.23, 0.19, 0.27),
                pairwise=[("ft:a", "p@1", 0.001), ("ft:a", "baseline:nearest:d@v", 0.001)],
                output_type="json", metric="field_f1"),
     Constraints(), "ft", "ft:a"),
    ("text: the nearest train output as good as the best prompt -> you may not need an LLM",
     comparison(cand("p@1", "prompt", 0.51, 0.48, 0.54, **P),
                cand("baseline:nearest:d@v", "baseline", 0.49, 0.46, 0.51),
                pairwise=[("p@1", "baseline:nearest:d@v", 0.2)], output_type="text", metric="chrf"),
     Constraints(), "baseline", "baseline:nearest:d@v"),
    ("text: no LLM above copying the input -> not usable, and copy is never the recommendation",
     comparison(cand("p@1", "prompt", 0.31, 0.29, 0.33, **P), cand("baseline:copy:d@v", "baseline", 0.46, 0.43, 0.48),
                cand("baseline:nearest:d@v", "baseline", 0.49, 0.46, 0.51), output_type="text", metric="chrf"),
     Constraints(), "none", None),
    ("text: above copying the input, tied with it in a paired test -> still the LLM, copy is a floor",
     comparison(cand("ft:a", "ft", 0.59, 0.565, 0.61, **F), cand("baseline:copy:d@v", "baseline", 0.46, 0.43, 0.48),
                pairwise=[("ft:a", "baseline:copy:d@v", 0.3)], output_type="text", metric="chrf"),
     Constraints(), "ft", "ft:a"),
    ("text without a floor row: no floor, the rules go on",
     comparison(cand("p@1", "prompt", 0.01, 0.0, 0.02, **P), output_type="text", metric="chrf"),
     Constraints(), "prompt", "p@1"),
]


@pytest.mark.parametrize("comp,constraints,expected,candidate", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rules(comp, constraints, expected, candidate):
    advice = advise(comp, constraints)
    assert advice.recommendation == expected, advice.reasons
    assert advice.candidate == candidate
    assert advice.reasons, "every answer gives reasons"


def test_reasons_cite_measured_numbers():
    comp = comparison(cand("p@1", "prompt", 0.78, 0.73, 0.82, **P), cand("ft:a", "ft", 0.91, 0.87, 0.94, **F),
                      pairwise=FT_BETTER)
    text = " ".join(advise(comp).reasons)
    assert "0.91 [0.87, 0.94]" in text and "0.78 [0.73, 0.82]" in text and "p<0.001" in text


def test_break_even_reason_cites_volumes():
    comp = comparison(cand("p@1", "prompt", 0.85, **P), cand("ft:a", "ft", 0.86, **F), pairwise=TIED)
    text = " ".join(advise(comp, Constraints(volume=100_000)).reasons)
    assert "break-even" in text and "5,000 requests/month" in text and "you expect 100,000" in text


def test_baseline_reason_says_better_when_it_is_significantly_better():
    better = comparison(cand("ft:a", "ft", 0.70, 0.66, 0.74, **F),
                        cand("baseline:embed:d@v", "baseline", 0.81, 0.78, 0.85, wall_s=7.9),
                        pairwise=[("baseline:embed:d@v", "ft:a", 0.0001)], labels=EIGHT)
    tied = comparison(cand("ft:a", "ft", 0.86, 0.82, 0.90, **F),
                      cand("baseline:tfidf:d@v", "baseline", 0.85, 0.81, 0.89, wall_s=1.5),
                      pairwise=[("ft:a", "baseline:tfidf:d@v", 0.6)], labels=EIGHT)
    first = advise(better).reasons[0]
    assert "is better than the best LLM candidate" in first and "p<0.001" in first
    assert "is as good as the best LLM candidate" in advise(tied).reasons[0]


def test_none_names_the_best_and_the_requirement():
    comp = comparison(cand("p@1", "prompt", 0.78, **P), cand("ft:a", "ft", 0.81, **F))
    advice = advise(comp, Constraints(required_metric=0.9))
    assert advice.recommendation == "none"
    assert "neither meets the required accuracy of 0.9" in advice.reasons[0]
    assert "ft:a" in advice.reasons[0]
    assert {e.rule for e in advice.excluded} == {"required_metric"}


def test_learning_curve_point_stands_in_when_data_is_short():
    curve = {"candidate": "ft:a", "metric": "accuracy", "points": [
        {"fraction": 0.1, "n_train": 200, "candidate": "ft:a-lc10", "metric": {"value": 0.66, "low": 0.61, "high": 0.71}},
        {"fraction": 0.25, "n_train": 500, "candidate": "ft:a-lc25", "metric": {"value": 0.88, "low": 0.84, "high": 0.92}},
        {"fraction": 1.0, "n_train": 2000, "candidate": "ft:a", "metric": {"value": 0.91, "low": 0.87, "high": 0.94}}]}
    comp = comparison(cand("p@1", "prompt", 0.78, 0.74, 0.82, **P), cand("ft:a", "ft", 0.91, **F), learning_curve=curve)
    assert advise(comp, Constraints(examples=600)).recommendation == "ft"  # 0.88 [0.84, 0.92] still wins
    short = advise(comp, Constraints(examples=300))  # 0.66 [0.61, 0.71] vs 0.78 [0.74, 0.82]: prompt
    assert short.recommendation == "prompt"
    assert any("200 examples" in r for r in short.reasons)
    too_short = advise(comp, Constraints(examples=100))
    assert too_short.recommendation == "prompt"
    assert any(e.rule == "examples" for e in too_short.excluded)


def test_the_truth_is_in_the_headline_and_reasons():
    at_chance = comparison(cand("p@1", "prompt", 0.16, 0.10, 0.23, **P), cand("ft:a", "ft", 0.19, 0.12, 0.26, **F),
                           cand("baseline:tfidf:d@v", "baseline", 0.70, 0.64, 0.76), labels=EIGHT)
    advice = advise(at_chance)
    assert advice.headline.startswith("No candidate is usable yet") and "0.12" in advice.headline  # 1 of 8
    assert "not above chance" in advice.reasons[0] and "you may not need an LLM" in advice.reasons[1]
    good = comparison(cand("ft:a", "ft", 0.86, 0.82, 0.90, **F), cand("baseline:embed:d@v", "baseline", 0.87, 0.83, 0.91),
                      labels=EIGHT)
    advice = advise(good)
    assert advice.headline == "You may not need an LLM for this task: baseline:embed:d@v"
    assert "0.87 [0.83, 0.91]" in advice.reasons[0] and "0.86 [0.82, 0.90]" in advice.reasons[0]


def test_the_out_of_scope_share_is_weighed():
    labels = ["balance", "oos", "transfer"]
    conf = {"labels": labels, "matrix": [[30, 0, 0], [12, 6, 2], [0, 0, 30]]}  # 20 of 80 out of scope, 6 caught
    comp = comparison({**cand("p@1", "prompt", 0.82, 0.74, 0.88, **P), "confusion": conf},
                      {**cand("ft:a", "ft", 0.90, 0.83, 0.95, **F), "confusion": conf},
                      pairwise=[("ft:a", "p@1", 0.01)], labels=labels)
    advice = advise(comp)
    assert advice.recommendation == "ft"
    assert any("25% of the examples are out of scope ('oos')" in r and "ft:a 30%" in r for r in advice.reasons)


def test_constraints_reject_unknown_fields():
    with pytest.raises(Exception):
        Constraints(budjet=5)
