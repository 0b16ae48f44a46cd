"""What a task is judged by: `output.metric` (macro-F1 for skewed labels) through every step —
evaluation, the comparison, the hybrid's tuning, the advisor's chance level — and the flow's
choice of it (`--metric`, or macro-F1 where one label dominates train)."""

from __future__ import annotations

import json

import pytest

from tests.test_advise import P, cand, comparison
from tests.test_hybrid import PROMPT, hybrid_ws  # noqa: F401  (fixture: tickets data, prim/fall prompts on fake models)
from tunelab.compare import advise, compare
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, failure_groups, resolve_candidate
from tunelab.hybrid import create_hybrid, tune_thresholds
from tunelab.metrics import Answer, MacroF1, make_metrics, primary_metric
from tunelab.prompts import OutputSpec, parse_prompt

MACRO = PROMPT.replace("labels: [billing, bug]}", "labels: [billing, bug], metric: macro_f1}")


def test_an_output_names_its_metric_and_only_one_of_its_type():
    out = OutputSpec(type="label", labels=["a", "b"], metric="macro_f1")
    assert primary_metric(out) == "macro_f1" and primary_metric({"type": "label", "labels": ["a"]}) == "accuracy"
    assert OutputSpec.of(out.to_dict()).metric == "macro_f1"  # what a run stores comes back
    assert [m.name for m in make_metrics(["accuracy"], out)] == ["macro_f1", "accuracy"]  # the primary always
    assert primary_metric(OutputSpec(type="text", metric="bleu")) == "bleu"
    with pytest.raises(ValueError, match="metric 'chrf' does not judge label answers \\(choose: accuracy, macro_f1\\)"):
        OutputSpec(type="label", labels=["a"], metric="chrf")
    with pytest.raises(UserError, match="does not judge json answers"):
        parse_prompt("---\nmodel: fake:x\noutput: {type: json, metric: accuracy}\n---\nuser:\n{{ input }}\n", "p")


def test_tuning_maximizes_a_corpus_metric_where_accuracy_would_stop_short():
    """Eight 'a', two 'b'. The primary always answers 'a'; the fallback finds both 'b' but calls one
    'a' a 'b'. Routing only the least sure example is as accurate as routing all three (0.9) and
    sends less traffic; macro-F1 (each label counts the same) needs all three."""
    expected = ["b", "a", "b"] + ["a"] * 7
    primary, fallback = ["a"] * 10, ["b", "b", "b"] + ["a"] * 7
    margins = [0.1, 0.15, 0.2] + [0.5] * 7
    by_accuracy = tune_thresholds([float(p == e) for p, e in zip(primary, expected)],
                                  [float(f == e) for f, e in zip(fallback, expected)], margins)
    assert 0.1 < by_accuracy["margin_threshold"] <= 0.15 and by_accuracy["score"] == pytest.approx(0.9)
    macro = MacroF1(OutputSpec(type="label", labels=["a", "b"]))
    p_stats, f_stats = macro.paired_stats([Answer(e, p) for e, p in zip(expected, primary)],
                                          [Answer(e, f) for e, f in zip(expected, fallback)])
    by_macro = tune_thresholds(p_stats, f_stats, margins, value=macro.value)
    assert 0.2 < by_macro["margin_threshold"] <= 0.5 and by_macro["fallback_share"] == pytest.approx(0.3)
    # F1 of 'a' 14/15 (7 right, 1 missed), of 'b' 4/5 (2 right, 1 wrong): the mean
    assert by_macro["score"] == pytest.approx((14 / 15 + 4 / 5) / 2)
    assert by_macro["primary_score"] == pytest.approx((16 / 18 + 0.0) / 2)  # 'a' everywhere: F1 of 'b' is 0


def test_a_prompt_judged_by_macro_f1_is_judged_so_everywhere(hybrid_ws):  # noqa: F811
    """Evaluation, the hybrid's tuning (both the tuned and a fixed routing) and the comparison —
    where a classical baseline named first does not impose its default."""
    for name, model in (("prim", "fake:primary"), ("fall", "fake:fallback")):
        (hybrid_ws.prompts_dir / f"{name}.prompt").write_text(MACRO.format(model=model))
    spec = create_hybrid(hybrid_ws, "h", "prim", "fall", data="tickets", progress=False).spec
    # the primary is right on card/crash, wrong on refund/freeze: F1 0.5 for each label; routed: 1.0
    assert spec.tuning["metric"] == "macro_f1" and spec.tuning["primary_score"] == pytest.approx(0.5)
    assert spec.tuning["validation_score"] == 1.0 and 0.1 < spec.margin_threshold <= 0.4
    fixed = create_hybrid(hybrid_ws, "h2", "prim", "fall", data="tickets", progress=False, threshold="off",
                          similarity="off", rules=[r"\bcard\b"]).spec
    # card -> the fallback (bug, wrong); crash right; refund, freeze wrong: F1 billing 0, bug 8/20
    assert fixed.tuning["validation_score"] == pytest.approx((0 + 8 / 20) / 2)

    comp = compare(hybrid_ws, "tickets:test", ["baseline:majority", "prim", "hybrid:h"], progress=False)
    assert comp.metric == "macro_f1"
    by_name = {c.name.split("@")[0]: c.metric.value for c in comp.candidates}
    assert by_name["prim"] == pytest.approx(0.5) and by_name["hybrid:h"] == 1.0
    assert by_name["baseline:majority:tickets"] < 0.5  # one label always: F1 of the other is 0
    # where one example is judged (failures, pass^k, the report's per-example scores), accuracy stands in
    prim = next(c for c in comp.candidates if c.name.startswith("prim@"))
    assert len(prim.scores) == 20 and sum(prim.scores) == 10
    run = evaluate(hybrid_ws, resolve_candidate(hybrid_ws, "prim"), "tickets:test", progress=False)
    assert run.reused and run.primary_metric == "macro_f1"
    groups = failure_groups(hybrid_ws, run.id)
    assert {g["metric"] for g in groups} == {"accuracy"} and sum(g["count"] for g in groups) == 10


MACRO_CASES = [
    ("macro-F1 at the majority class's macro-F1 -> not usable",
     comparison(cand("p@1", "prompt", 0.50, 0.44, 0.56, **P), cand("baseline:majority:d@v", "baseline", 0.47),
                metric="macro_f1", labels=["a", "b"]), "none"),
    ("macro-F1 above the majority class with its interval -> usable",
     comparison(cand("p@1", "prompt", 0.72, 0.65, 0.78, **P), cand("baseline:majority:d@v", "baseline", 0.47),
                metric="macro_f1", labels=["a", "b"]), "prompt"),
]


@pytest.mark.parametrize("comp,expected", [c[1:] for c in MACRO_CASES], ids=[c[0] for c in MACRO_CASES])
def test_the_advisor_floor_for_macro_f1_is_the_majority_class(comp, expected):
    advice = advise(comp)
    assert advice.recommendation == expected, advice.reasons
    if expected == "none":
        assert "the majority class (baseline:majority:d@v) (macro_f1 0.47)" in advice.reasons[0]


def _folder(tmp_path, share: float):
    """A label folder where 'other' is `share` of train."""
    n_other = round(40 * share)
    rows = [{"input": f"clause {i} about other things", "output": "other"} for i in range(n_other)] + \
        [{"input": f"clause {i} about arbitration", "output": "arbitration"} for i in range(40 - n_other)]
    folder = tmp_path / f"skew{int(share * 100)}"
    folder.mkdir()
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def test_the_flow_judges_skewed_labels_by_macro_f1_unless_told(tmp_path, cli):
    from tunelab.flow import SKEWED_SHARE, flow_for

    skewed = flow_for(_folder(tmp_path, 0.9))
    assert skewed.metric == "macro_f1" and "'other' is 90% of the train outputs" in skewed.metric_why
    for text, name in ((skewed.base_prompt_text, "b"), (skewed.short_prompt_text, "s")):
        assert parse_prompt(text, name).output.metric == "macro_f1"
    balanced = flow_for(_folder(tmp_path, SKEWED_SHARE - 0.1))
    assert balanced.metric is None and parse_prompt(balanced.short_prompt_text, "s").output.metric is None
    told = flow_for(tmp_path / "skew90", metric="accuracy")
    assert told.metric == "accuracy" and parse_prompt(told.base_prompt_text, "b").output.metric == "accuracy"
    result = cli("flow", tmp_path / "skew90", "--metric", "chrf")
    assert result.exit_code == 2 and "metric 'chrf' does not judge label answers" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_flow_trains_skewed_labels_until_their_rare_labels_are_seen_enough(tmp_path):
    """One epoch by default; skewed labels whose other labels have few examples: until those (their
    median count) have been seen ~RARE_LABEL_EXPOSURES times, at most FLOW_MAX_EPOCHS; --epochs wins."""
    from tunelab.flow import FLOW_MAX_EPOCHS, RARE_LABEL_EXPOSURES, flow_epochs, flow_for

    # legal_unfair_tos's train counts: 'Other' 1,813 and eight clause types of 7 to 51 (median 18.5)
    legal = ["Other"] * 1813 + [lab for lab, n in zip("abcdefgh", (51, 37, 28, 20, 17, 14, 13, 7)) for _ in range(n)]
    epochs, why = flow_epochs("label", legal)
    assert epochs == FLOW_MAX_EPOCHS == 3 and RARE_LABEL_EXPOSURES / 18.5 > 2
    assert why.startswith("fine-tuning for 3 epochs: the 8 labels other than 'Other' have a median of 18.5 train")
    # a skewed label with plenty of examples (sms_spam: 'spam' ~13% of 2,000), balanced labels with few
    # examples each (clinc150), JSON: one epoch, nothing to say
    assert flow_epochs("label", ["ham"] * 1740 + ["spam"] * 260) == (1, "")
    assert flow_epochs("label", [f"intent{i}" for i in range(150) for _ in range(13)]) == (1, "")
    assert flow_epochs("json", ['{"a": 1}'] * 9 + ['{"b": 2}']) == (1, "")
    # between: 'b' has 20 examples, 50 / 20 -> 3; 30 -> 2
    assert flow_epochs("label", ["a"] * 100 + ["b"] * 20)[0] == 3 and flow_epochs("label", ["a"] * 100 + ["b"] * 30)[0] == 2

    skewed = flow_for(_folder(tmp_path, 0.9))  # 36 'other', 4 'arbitration': 50 / 4 -> at most 3
    assert skewed.finetune_settings["epochs"] == 3 and "labels other than 'other'" in skewed.epochs_why
    told = flow_for(tmp_path / "skew90", epochs=1)
    assert told.finetune_settings["epochs"] == 1 and told.epochs_why == ""
    balanced = flow_for(_folder(tmp_path, 0.5))
    assert balanced.finetune_settings["epochs"] == 1 and balanced.epochs_why == ""
