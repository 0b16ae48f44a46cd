"""tunelab.metrics against hand-computed values."""

from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest

from tunelab.errors import NotFound, UserError
from tunelab.prompts import OutputSpec
from tunelab.metrics import (Answer, aggregate, default_metric_names, make_metric, make_metrics,
                             parse_json, score_answers)

LABELS = OutputSpec(type="label", labels=["a", "b", "c"])


def answers(pairs, **extra):
    return [Answer(expected=e, prediction=p, extra=dict(extra)) for e, p in pairs]


def test_accuracy_with_wilson_interval():
    ans = answers([("a", "a"), ("b", "a"), ("b", "b"), ("c", "c"), ("a", "a")])
    v = aggregate(make_metrics(["accuracy"], LABELS), ans)["accuracy"]
    assert v.value == pytest.approx(0.8)
    assert v.method == "wilson" and v.n == 5
    z = 1.959963984540054
    center = (0.8 + z * z / 10) / (1 + z * z / 5)
    half = z / (1 + z * z / 5) * math.sqrt(0.16 / 5 + z * z / 100)
    assert (v.lo, v.hi) == pytest.approx((center - half, center + half))


def test_macro_f1_per_label_and_confusion():
    # expected a a b b c / predicted a b b b a
    #   a: tp1 fp1 fn1 -> F1 0.5;  b: tp2 fp1 fn0 -> 0.8;  c: tp0 fp0 fn1 -> 0
    ans = answers([("a", "a"), ("a", "b"), ("b", "b"), ("b", "b"), ("c", "a")])
    v = aggregate(make_metrics(["macro_f1"], LABELS), ans)["macro_f1"]
    assert v.value == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert v.method == "bootstrap" and v.lo <= v.value <= v.hi
    d = v.details
    assert d["confusion"]["a"] == {"a": 1, "b": 1, "c": 0}
    assert d["confusion"]["c"]["a"] == 1
    assert d["per_label"]["b"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8),
                                   "support": 2}
    assert d["per_label"]["c"]["support"] == 1 and d["per_label"]["c"]["f1"] == 0.0


def test_macro_f1_ignores_labels_never_seen():
    # 'c' is a label of the task but neither expected nor predicted: it is not averaged in as 0
    ans = answers([("a", "a"), ("b", "b"), ("a", "b")])
    v = aggregate(make_metrics(["macro_f1"], LABELS), ans)["macro_f1"]
    # a: tp1 fp0 fn1 -> 2/3;  b: tp1 fp1 fn0 -> 2/3
    assert v.value == pytest.approx(2 / 3)


def test_format_valid_and_free_accuracy_use_the_free_answer():
    ans = [
        Answer("a", "a", extra={"free_text": "The answer is a."}),
        Answer("b", "b", extra={"free_text": "Sure! I'd be happy to help."}),
        Answer("b", "b", extra={"free_text": "c"}),
        Answer("c", "c", extra={}),  # no free answer: counts for format (it is a label), not for free accuracy
    ]
    vals = aggregate(make_metrics(["format_valid", "free_accuracy"], LABELS), ans)
    assert vals["format_valid"].value == pytest.approx(3 / 4)
    assert vals["free_accuracy"].value == pytest.approx(1 / 3)
    assert vals["free_accuracy"].n == 3


def test_format_valid_does_not_count_rows_outside_the_free_answer_sample():
    ans = [
        Answer("a", "a", extra={"free_text": "The answer is a."}),
        Answer("b", "b", extra={"free_text": "no idea"}),
        Answer("c", "c", extra={"free_text_skipped": True}),
        Answer("a", "b", extra={"free_text_skipped": True}),
    ]
    fmt = make_metric("format_valid", LABELS)
    assert [fmt.score(a) for a in ans] == [1.0, 0.0, None, None]
    assert "format_valid" not in score_answers([fmt], [ans[2]])[0]
    vals = aggregate(make_metrics(["format_valid", "free_accuracy"], LABELS), ans)
    assert vals["format_valid"].value == pytest.approx(1 / 2) and vals["format_valid"].n == 2
    assert vals["free_accuracy"].n == 2
    lo, hi = vals["format_valid"].lo, vals["format_valid"].hi
    from tunelab.stats import wilson

    assert (lo, hi) == pytest.approx(wilson(1.0, 2))  # the interval is from the 2 measured rows


def test_text_metrics():
    out = OutputSpec(type="text")
    ans = answers([("Paris", "Paris"), ("Paris", " paris. "), ("New York", "I think new york!"), ("Rome", "Milan")])
    vals = aggregate(make_metrics(["exact_match", "normalized_match", "contains", r"regex:^\s*[A-Z]"], out), ans)
    assert vals["exact_match"].value == pytest.approx(1 / 4)
    assert vals["normalized_match"].value == pytest.approx(2 / 4)
    assert vals["contains"].value == pytest.approx(3 / 4)
    assert vals[r"regex:^\s*[A-Z]"].value == pytest.approx(3 / 4)  # ' paris. ' starts lower-case


def test_contains_matches_whole_words_only():
    m = make_metric("contains")
    assert m.score(Answer("cat", "concatenate")) == 0.0
    assert m.score(Answer("cat", "a cat!")) == 1.0


def test_parse_json_leniency():
    assert parse_json('{"a": 1}') == (True, {"a": 1})
    assert parse_json('```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert parse_json('{"a": 1}\nHope this helps!') == (True, {"a": 1})
    assert parse_json("Here you go: {\"a\": 1}") == (True, {"a": 1})
    assert parse_json("{'a': 1}")[0] is False
    assert parse_json("")[0] is False


def test_json_metrics_hand_computed():
    schema = {"type": "object", "properties": {"people": {"type": "string"}, "time": {"type": "string"},
                                               "date": {"type": "string"}},
              "additionalProperties": False}
    out = OutputSpec(type="json", schema=schema)
    ans = answers([
        (json.dumps({"people": "4", "time": "7pm"}), json.dumps({"people": "4", "time": "8pm", "date": "x"})),
        ("{}", "{}"),
        (json.dumps({"date": "today"}), "not json"),
        (json.dumps({"time": "noon"}), '{"time": "noon", "extra": 1}'),
        (json.dumps({"people": "2"}), ' {"people": "2"} '),
    ])
    names = default_metric_names(out)
    assert names == ["field_f1", "field_precision", "field_recall", "json_match", "json_valid", "json_schema",
                     "format_valid"]
    vals = aggregate(make_metrics(names, out), ans)
    assert vals["json_valid"].value == pytest.approx(4 / 5)
    assert vals["json_schema"].value == pytest.approx(3 / 5)  # 'extra' breaks additionalProperties
    assert vals["json_match"].value == pytest.approx(2 / 5)
    # fields: ex1 tp1 fp2 fn1; ex2 0 0 0; ex3 tp0 fp0 fn1; ex4 tp1 fp1 fn0; ex5 tp1 fp0 fn0 -> tp3 fp3 fn2
    assert vals["field_precision"].value == pytest.approx(3 / 6)
    assert vals["field_recall"].value == pytest.approx(3 / 5)
    assert vals["field_f1"].value == pytest.approx(6 / (6 + 3 + 2))
    per = vals["field_f1"].details["per_field"]
    assert per["time"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert per["extra"]["support"] == 0 and per["extra"]["precision"] == 0.0
    # per-example scores for the failures view
    s = score_answers(make_metrics(["field_f1"], out), [ans[1]])[0]
    assert s["field_f1"] == 1.0  # nothing expected, nothing predicted


def test_json_schema_metric_needs_a_schema():
    with pytest.raises(UserError, match="needs a JSON schema"):
        make_metric("json_schema", OutputSpec(type="json"))


def test_unknown_metric_is_not_found():
    with pytest.raises(NotFound, match="unknown metric 'acuracy'"):
        make_metric("acuracy", LABELS)
    with pytest.raises(NotFound, match="cannot import module"):
        make_metric("no_such_module_xyz:score")
    with pytest.raises(UserError, match="invalid regular expression"):
        make_metric("regex:([")


def test_custom_metric_from_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_metrics_mod.py").write_text(textwrap.dedent("""
        def length_ratio(example, prediction):
            return len(prediction) / max(1, len(example.output))
        def is_short(example, prediction):
            return len(prediction) <= 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_metrics_mod", raising=False)
    from tunelab.datasets import Example

    exs = [Example("x", "abcd"), Example("y", "ab")]
    ans = [Answer(e.output, p, example=e) for e, p in zip(exs, ["ab", "abcd"])]
    vals = aggregate(make_metrics(["my_metrics_mod:length_ratio", "my_metrics_mod:is_short"]), ans)
    assert vals["my_metrics_mod:length_ratio"].value == pytest.approx((0.5 + 2.0) / 2)
    assert vals["my_metrics_mod:length_ratio"].method == "bootstrap"
    assert vals["my_metrics_mod:is_short"].value == pytest.approx(0.5)
    assert vals["my_metrics_mod:is_short"].method == "wilson"
    with pytest.raises(NotFound, match="has no function 'nope'"):
        make_metric("my_metrics_mod:nope")


def test_primary_metric_is_always_included():
    names = [m.name for m in make_metrics(["macro_f1"], LABELS)]
    assert names == ["accuracy", "macro_f1"]


def test_repeats_are_averaged_per_example_before_the_interval():
    # two examples, three repeats each: example 0 right 3/3, example 1 right 1/3
    ans = answers([("a", "a")] * 3 + [("b", "b"), ("b", "a"), ("b", "c")])
    groups = [0, 0, 0, 1, 1, 1]
    v = aggregate(make_metrics(["accuracy"], LABELS), ans, groups)["accuracy"]
    assert v.value == pytest.approx((1 + 1 / 3) / 2)
    assert v.method == "bootstrap" and v.n == 2  # over examples, not over 6 answers


def test_stored_scores_are_reused():
    # a custom score stored on a row is aggregated without calling the function again
    m = make_metric("accuracy")
    ans = [Answer("a", "b", scores={"accuracy": 1.0})]
    assert aggregate([m], ans)["accuracy"].value == 1.0
    assert np.array_equal(m.stats(ans), [[1.0, 1.0]])
