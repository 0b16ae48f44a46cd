"""Text metrics against their libraries' own figures: corpus chrF and BLEU equal sacrebleu's on a
fixed multi-reference sample (DART triples -> sentences), ROUGE-L equals rouge-score's best over
the references, and the intervals and paired tests work on them as on labels."""

from __future__ import annotations

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from tunelab.datasets import Example
from tunelab.metrics import Answer, aggregate, default_metric_names, make_metric, make_metrics, primary_metric
from tunelab.prompts import OutputSpec

# A fixed sample: DART inputs, their human references (meta.refs), and system outputs of varying quality.
SAMPLE = [
    ("United States | LEADER_NAME | Paul Ryan",
     ["Paul Ryan is the leader of the United States.", "The leader of the United States is Paul Ryan."],
     "Paul Ryan leads the United States."),
    ("Buzz Aldrin | BIRTH_PLACE | Glen Ridge, New Jersey\nBuzz Aldrin | WAS_A_CREW_MEMBER_OF | Apollo 11",
     ["Buzz Aldrin, who was a member of the Apollo 11 crew, was born in Glen Ridge New Jersey.",
      "Born in Glen Ridge New Jersey, Apollo 11 crewman Buzz Aldrin."],
     "Buzz Aldrin was born in Glen Ridge, New Jersey and flew on Apollo 11."),
    ("Adisham Hall | COUNTRY | Sri Lanka",
     ["Adisham Hall is in Sri Lanka."],
     "Adisham Hall is located in Sri Lanka."),
    ("Baked Alaska | COUNTRY | France",
     ["Baked Alaska comes from France.", "Baked Alaska is a dish from France.", "France is where Baked Alaska is from."],
     "The weather is nice today."),
    ("Aarhus Airport | CITY_SERVED | Aarhus, Denmark",
     ["Aarhus airport serves the city of Aarhus, Denmark.", "The city of Aarhus, Denmark is served by Aarhus Airport."],
     ""),
]


def answers() -> list[Answer]:
    return [Answer(expected=refs[0], prediction=hyp, example=Example(inp, refs[0], meta={"refs": refs}))
            for inp, refs, hyp in SAMPLE]


def streams() -> tuple[list[str], list[list[str | None]]]:
    hyps = [hyp for _, _, hyp in SAMPLE]
    width = max(len(refs) for _, refs, _ in SAMPLE)
    return hyps, [[refs[j] if j < len(refs) else None for _, refs, _ in SAMPLE] for j in range(width)]


def test_primary_metric_per_output_type():
    assert primary_metric({"type": "text"}) == "chrf"
    assert primary_metric({"type": "json"}) == "field_f1"
    assert primary_metric({"type": "label", "labels": ["a", "b"]}) == "accuracy"
    assert default_metric_names("text")[:4] == ["chrf", "bleu", "rouge_l", "semantic"]


def test_corpus_chrf_and_bleu_equal_sacrebleus_own_figures():
    hyps, refs = streams()
    vals = aggregate(make_metrics(["chrf", "bleu"], "text"), answers())
    assert vals["chrf"].value * 100 == pytest.approx(sacrebleu.corpus_chrf(hyps, refs).score, abs=1e-9)
    assert vals["bleu"].value * 100 == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    for name in ("chrf", "bleu"):
        v = vals[name]
        assert v.method == "bootstrap" and v.lo <= v.value <= v.hi and v.n == len(SAMPLE)


def test_sentence_scores_are_sacrebleus_and_use_every_reference():
    ans = answers()
    chrf, bleu = make_metric("chrf"), make_metric("bleu")
    for a, (_, refs, hyp) in zip(ans, SAMPLE):
        assert chrf.score(a) * 100 == pytest.approx(sacrebleu.sentence_chrf(hyp, refs).score)
        assert bleu.score(a) * 100 == pytest.approx(sacrebleu.sentence_bleu(hyp, refs).score)
    # the second reference of example 1 is the better match: scoring it alone gives less
    one_ref = Answer(expected=SAMPLE[0][1][1], prediction=SAMPLE[0][2])
    alone = Answer(expected=SAMPLE[0][1][0], prediction=SAMPLE[0][2])
    assert chrf.score(ans[0]) == pytest.approx(max(chrf.score(one_ref), chrf.score(alone)))


def test_rouge_l_is_the_best_over_references():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    m = make_metric("rouge_l")
    for a, (_, refs, hyp) in zip(answers(), SAMPLE):
        best = max(scorer.score(r, hyp)["rougeL"].fmeasure for r in refs)
        assert m.score(a) == pytest.approx(best)


def test_length_and_copy_rate():
    ans = answers()
    assert make_metric("length_ratio").score(ans[2]) == pytest.approx(7 / 6)  # 7 words vs the 6-word reference
    assert make_metric("copy_rate").score(ans[3]) == 0.0  # nothing of the input
    assert make_metric("copy_rate").score(ans[0]) == pytest.approx(4 / 6)  # "leads" and "the" are new
    assert make_metric("copy_rate").score(ans[4]) is None  # an empty answer has no words


def test_semantic_similarity_ranks_a_paraphrase_above_an_unrelated_answer():
    m = make_metric("semantic")
    good, off = m.score_many([answers()[0], answers()[3]])
    assert 0.7 < good <= 1.0 and off < 0.4


def test_a_stored_row_rescored_without_its_example_keeps_every_reference():
    """A run stores meta.refs with each row; re-aggregating the stored rows gives the same chrF."""
    live = aggregate(make_metrics(["chrf"], "text"), answers())["chrf"]
    stored = [Answer(expected=a.expected, prediction=a.prediction, extra={"refs": a.example.meta["refs"]})
              for a in answers()]
    assert aggregate(make_metrics(["chrf"], "text"), stored)["chrf"].value == pytest.approx(live.value)


def test_paired_test_on_chrf_prefers_the_better_system():
    from tunelab import stats as st

    m = make_metric("chrf")
    worse = [Answer(a.expected, "something else entirely", example=a.example) for a in answers()]
    sa, sb = m.paired_stats(worse, answers())
    res = st.paired_bootstrap(sa, sb, m.value, metric="chrf")
    assert res.diff > 0 and res.lo <= res.diff <= res.hi


def test_format_valid_of_json_needs_the_schema():
    out = OutputSpec(type="json", schema={"type": "object", "properties": {"a": {"type": "string"}},
                                          "additionalProperties": False})
    m = make_metric("format_valid", out)
    assert m.score(Answer("{}", '{"a": "x"}')) == 1.0
    assert m.score(Answer("{}", '{"b": 1}')) == 0.0  # parses, but not the schema
    assert m.score(Answer("{}", "not json")) == 0.0
    assert np.isclose(aggregate([m], [Answer("{}", '{"a": "x"}'), Answer("{}", "x")])["format_valid"].value, 0.5)
