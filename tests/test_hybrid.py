"""Hybrids: the routing rules, merged completions, threshold tuning, and hybrid:NAME end to end."""

from __future__ import annotations

import math

import pytest

from tunelab.errors import UserError
from tunelab.models.base import Completion
from tunelab.evaluate import ExceptionRule, HybridSpec, NgramIndex, Routing, merge, resolve_candidate
from tunelab.hybrid import create_hybrid, tune_thresholds

TRAIN = ["my invoice is wrong", "refund my payment please", "the app crashes on start",
         "login button does nothing", "charged twice this month", "error 500 when saving"]


def comp(label, margin=None, tokens=10, latency=0.01):
    lp = None
    if margin is not None:  # two labels whose probabilities differ by `margin`
        p = (1 + margin) / 2
        lp = {label: math.log(p), "other": math.log(1 - p)}
    return Completion(text=label, prompt_tokens=tokens, completion_tokens=1, latency_s=latency, label_logprobs=lp)


def spec(**kw):
    return HybridSpec(name="h", primary="ft:x", fallback="p@1", **kw)


def test_rules_then_length_then_similarity():
    routing = Routing(spec(rules=[ExceptionRule(pattern=r"\blawyer\b", note="legal")], length_range=(5, 40),
                         similarity_threshold=0.2), TRAIN)
    routes = routing.before(["talk to my LAWYER now", "hi", "charged twice for my invoice",
                            "quantum chromodynamics lattice", "x" * 50])
    assert routes[0].route == "fallback" and routes[0].reason == "rule" and routes[0].detail == "legal"
    assert routes[1].reason == "out_of_distribution" and "length 2" in routes[1].detail
    assert routes[2].route == "primary" and routes[2].similarity > 0.2
    assert routes[3].reason == "out_of_distribution" and routes[3].similarity < 0.2
    assert routes[4].reason == "out_of_distribution" and "length 50" in routes[4].detail


def test_unsure_primary_goes_to_fallback():
    routing = Routing(spec(margin_threshold=0.3))
    assert routing.after(comp("bug", margin=0.1), None).reason == "unsure"
    assert routing.after(comp("bug", margin=0.5), None).route == "primary"
    assert routing.after(comp("bug", margin=None), None).route == "primary"  # free text: no margin
    assert Completion("x", label_logprobs={"a": math.log(0.55), "b": math.log(0.45)}).label_margin == pytest.approx(0.1)


def test_invalid_rule_is_a_user_error():
    with pytest.raises(UserError, match="invalid regular expression"):
        Routing(spec(rules=[ExceptionRule(pattern="(unclosed")]))


def test_merge_counts_every_called_side():
    p, f = comp("bug", 0.1, tokens=20, latency=0.02), comp("billing", 0.9, tokens=200, latency=0.2)
    routing = Routing(spec(margin_threshold=0.3))
    out = merge(routing.after(p, None), p, f)
    assert out.text == "billing"
    assert out.prompt_tokens == 220 and out.completion_tokens == 2
    assert out.latency_s == pytest.approx(0.22)
    assert out.meta["route"] == "fallback" and out.meta["route_reason"] == "unsure"
    only_fb = merge(Routing(spec(rules=[ExceptionRule(pattern="x")])).before(["x"])[0], None, f)
    assert only_fb.prompt_tokens == 200 and only_fb.meta["route"] == "fallback"
    prim = merge(routing.after(comp("bug", 0.8), None), comp("bug", 0.8, tokens=20), None)
    assert prim.meta == {"route": "primary", "margin": 0.8} and prim.prompt_tokens == 20


def test_similarity_index():
    index = NgramIndex(TRAIN)
    sims = index.max_similarity(["refund my payment please", "zebra giraffe", ""])
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] == 0.0 and sims[2] == 0.0


def test_tuning_picks_the_margin_that_fixes_unsure_errors():
    # the primary is wrong exactly where it is unsure (margin < 0.3); the fallback is right there
    margins = [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95]
    primary = [0, 0, 0, 1, 1, 1, 1, 1]
    fallback = [1, 1, 1, 0, 1, 0, 0, 1]
    t = tune_thresholds(primary, fallback, margins)
    assert 0.2 < t["margin_threshold"] <= 0.4
    assert t["score"] == 1.0 and t["fallback_share"] == pytest.approx(3 / 8)
    assert t["primary_score"] == pytest.approx(5 / 8)


def test_tuning_prefers_less_fallback_traffic_at_a_tie():
    # the fallback is never better: routing nothing is best, threshold 0
    t = tune_thresholds([1, 1, 0, 1], [1, 0, 0, 1], [0.1, 0.2, 0.3, 0.4])
    assert t["margin_threshold"] == 0.0 and t["fallback_share"] == 0.0 and t["score"] == 0.75


def test_tuning_similarity_and_forced_routes():
    sims = [0.05, 0.1, 0.5, 0.6, 0.7, 0.8]
    margins = [0.9] * 6
    primary = [0, 0, 1, 1, 1, 1]  # wrong on the two far-from-training inputs
    fallback = [1, 1, 0, 0, 0, 1]
    t = tune_thresholds(primary, fallback, margins, sims)
    assert 0.1 < t["similarity_threshold"] <= 0.5 and t["score"] == 1.0 and t["margin_threshold"] == 0.0
    forced = tune_thresholds(primary, fallback, margins, sims, forced=[False] * 5 + [True])
    assert forced["fallback_share"] >= 3 / 6  # forced one counts


def test_tuning_empty():
    assert tune_thresholds([], [], [])["margin_threshold"] == 0.0


# -- the hybrid candidate end to end, on fake models ---------------------------------------------
PROMPT = """---
model: {model}
output: {{type: label, labels: [billing, bug]}}
---
user:
Route this message: {{{{ input }}}}
"""

# The primary is right and sure on "card"/"crash" inputs, wrong and unsure on "refund"/"freeze";
# the fallback is the other way round.
PRIMARY_RULES = {"card": "billing", "crash": "bug", "refund": "bug", "freeze": "billing"}
FALLBACK_RULES = {"card": "bug", "crash": "billing", "refund": "billing", "freeze": "bug"}
UNSURE = ("refund", "freeze")


def _examples(n, seed):
    from tunelab.datasets import Example

    words = [("card", "billing"), ("crash", "bug"), ("refund", "billing"), ("freeze", "bug")]
    return [Example(f"ticket {seed}-{i}: my {w} problem", label) for i, (w, label) in
            ((i, words[i % 4]) for i in range(n))]


@pytest.fixture
def hybrid_ws(workspace, monkeypatch):
    from tunelab.datasets import save_dataset
    from tunelab.models import load_model

    save_dataset(workspace, "tickets", {"train": _examples(40, 0), "validation": _examples(16, 1),
                                        "test": _examples(20, 2)})
    for name, model in (("prim", "fake:primary"), ("fall", "fake:fallback")):
        (workspace.prompts_dir / f"{name}.prompt").write_text(PROMPT.format(model=model))
    primary = load_model("fake:primary", workspace)
    primary.rules = dict(PRIMARY_RULES)
    load_model("fake:fallback", workspace).rules = dict(FALLBACK_RULES)
    inner = primary.complete

    def unsure_where_wrong(requests):
        out = inner(requests)
        for req, comp in zip(requests, out):
            if comp.label_logprobs and any(w in req.messages[-1]["content"] for w in UNSURE):
                other = next(lab for lab in comp.label_logprobs if lab != comp.text)
                comp.label_logprobs = {comp.text: math.log(0.55), other: math.log(0.45)}
        return out

    monkeypatch.setattr(primary, "complete", unsure_where_wrong)
    yield workspace
    from tunelab.models import clear_loaded

    clear_loaded()


def test_create_hybrid_tunes_on_validation_and_routes(hybrid_ws, monkeypatch):
    import tunelab.hybrid
    from tunelab.evaluate import evaluate, run_rows

    freed: list[int] = []
    real_free = tunelab.hybrid.free_weights
    monkeypatch.setattr(tunelab.hybrid, "free_weights", lambda: (freed.append(1), real_free()))
    made = create_hybrid(hybrid_ws, "h", "prim", "fall", data="tickets", progress=False, rules=[r"\bmanager\b"])
    assert freed == [1]  # the primary's weights go before the fallback is evaluated: one model at a time
    spec = made.spec
    assert made.candidate == "hybrid:h" and made.setup.how == "hybrid" and made.setup.wall_s > 0
    assert 0.1 < spec.margin_threshold <= 0.4
    assert spec.tuning["validation_score"] == 1.0
    assert spec.tuning["primary_score"] == 0.5 and spec.tuning["data"].endswith(":validation")
    assert spec.primary.startswith("prim@") and spec.fallback.startswith("fall@")  # pinned versions
    assert (hybrid_ws.artifacts_dir / "hybrids" / "h.json").is_file()

    cand = resolve_candidate(hybrid_ws, "hybrid:h")
    assert cand.kind == "hybrid" and cand.name == "hybrid:h"
    result = evaluate(hybrid_ws, cand, "tickets:test", progress=False)
    assert result.metrics["accuracy"]["value"] == 1.0
    rows = run_rows(hybrid_ws, result.id)
    routes = [(r.extra["meta"]["route"], r.extra["meta"].get("route_reason")) for r in rows]
    assert routes.count(("fallback", "unsure")) == 10 and routes.count(("primary", None)) == 10
    # an unsure request paid for both models' tokens
    fb = next(r for r in rows if r.extra["meta"]["route"] == "fallback")
    pr = next(r for r in rows if r.extra["meta"]["route"] == "primary")
    assert fb.prompt_tokens > pr.prompt_tokens


def test_hybrid_rules_and_fixed_threshold(hybrid_ws):
    from tunelab.datasets import Example

    spec = create_hybrid(hybrid_ws, "h2", "prim", "fall", data="tickets", progress=False, threshold="off",
                         similarity="off", rules=[r"\bcard\b"]).spec
    assert spec.margin_threshold == 0.0 and spec.similarity_threshold == 0.0
    # the rule sends card tickets (primary right) to the fallback (wrong); nothing else is routed
    assert spec.tuning["validation_score"] == 0.25
    cand = resolve_candidate(hybrid_ws, "hybrid:h2")
    comps = cand.predict([Example("my card was declined", "billing"), Example("ticket 7-17: my crash problem", "bug"),
                          Example("x" * 500, "bug")])
    assert [c.meta["route"] for c in comps] == ["fallback", "primary", "fallback"]
    assert comps[0].meta["route_reason"] == "rule" and comps[0].text == "bug"
    assert comps[2].meta["route_reason"] == "out_of_distribution"  # longer than any training input


def test_hybrid_errors(hybrid_ws):
    from tunelab.errors import NotFound

    with pytest.raises(NotFound, match="unknown hybrid 'nope'"):
        resolve_candidate(hybrid_ws, "hybrid:nope")
    with pytest.raises(UserError, match="which data"):
        create_hybrid(hybrid_ws, "h3", "prim", "fall", progress=False)
    with pytest.raises(UserError, match="between 0 and 1"):
        create_hybrid(hybrid_ws, "h3", "prim", "fall", data="tickets", threshold="2", progress=False)
    with pytest.raises(UserError, match="invalid regular expression"):
        create_hybrid(hybrid_ws, "h3", "prim", "fall", data="tickets", rules=["(x"], progress=False)


def test_generated_answers_tune_on_the_mean_and_the_least_likely_token():
    # the primary is wrong exactly where one of its tokens was unlikely, whatever its mean
    primary = [1, 1, 0, 1, 0, 1]
    fallback = [0, 0, 1, 0, 1, 0]
    means = [0.9, 0.8, 0.85, 0.7, 0.9, 0.75]
    mins = [0.6, 0.5, 0.05, 0.4, 0.1, 0.45]
    t = tune_thresholds(primary, fallback, means, min_probs=mins)
    assert t["score"] == 1.0 and t["fallback_share"] == pytest.approx(2 / 6)
    assert 0.1 < t["min_token_threshold"] <= 0.4 and t["margin_threshold"] == 0.0
