"""The optimizer's search space: instruction variants and demo selection (no model needed)."""

from __future__ import annotations

from collections import Counter

import pytest

from tunelab.datasets import Example
from tunelab.demos import DemoSpec, NearestDemos, TfidfVectors
from tunelab.optimize.proposer import parse_instruction
from tunelab.optimize.space import fallback_label, format_contract, instruction_variants

POOL = [Example(f"free prize money win {i}", "spam") for i in range(6)] + \
       [Example(f"see you at lunch today {i}", "ham") for i in range(6)] + \
       [Example(f"meeting moved to friday {i}", "other") for i in range(3)]


def test_stratified_demos_cover_every_label_interleaved():
    demos = DemoSpec("stratified", per_label=2).draw(POOL, ["ham", "spam", "other"], seed=1)
    assert Counter(d.output for d in demos) == {"ham": 2, "spam": 2, "other": 2}
    first_round = {d.output for d in demos[:3]}
    assert first_round == {"ham", "spam", "other"}  # a, b, c then a, b, c
    assert all(d in POOL for d in demos)
    # seeded: the same seed, the same demos; another seed, others
    assert demos == DemoSpec("stratified", per_label=2).draw(POOL, ["ham", "spam", "other"], seed=1)


def test_random_demos_are_seeded_and_sized():
    a = DemoSpec("random", k=4).draw(POOL, seed=3)
    assert len(a) == 4 and len({id(x) for x in a}) == 4
    assert a == DemoSpec("random", k=4).draw(POOL, seed=3)
    assert DemoSpec("none").draw(POOL, seed=3) == []
    assert len(DemoSpec("random", k=8).draw(POOL[:2])) == 2  # never more than the pool


def test_tfidf_neighbours_are_the_similar_inputs_nearest_last():
    index = NearestDemos(POOL, "tfidf")
    demos = index.select(Example("win free money now", ""), k=3)
    assert [d.output for d in demos] == ["spam"] * 3
    demos = index.select(Example("lunch today?", ""), k=2)
    assert [d.output for d in demos] == ["ham", "ham"]
    # an input that is in the pool never gets itself as its demo
    itself = POOL[0]
    assert itself not in index.select(itself, k=3)


def test_tfidf_vectors_are_unit_length_and_idf_downweights_common_terms():
    vec = TfidfVectors(["a b", "a c", "a d"])
    m = vec.transform(["a b", "zzz"])
    row = m.toarray()[0]
    assert abs((row ** 2).sum() - 1) < 1e-5
    assert row[vec.vocab["a"]] < row[vec.vocab["b"]]
    assert m.toarray()[1].sum() == 0  # unknown words: an empty row, no crash


def test_instruction_variants_cover_the_patterns():
    variants = instruction_variants("Classify the SMS.", ["ham", "spam", "Other"])
    names = [v.name for v in variants]
    assert names[0] == "seed" and variants[0].text == "Classify the SMS."
    assert "seed in user turn" in names
    assert {v.placement for v in variants} == {"system", "user"}
    full = next(v for v in variants if v.name == "role+labels+format+boundary")
    assert "- spam" in full.text and format_contract(["ham", "spam", "Other"]) in full.text
    assert "answer Other" in full.text
    assert len({(v.text, v.placement) for v in variants}) == len(variants)  # no duplicates
    assert fallback_label(["a", "b"]) is None
    with_defs = instruction_variants("x", ["a", "b"], definitions={"a": "the first"})
    assert any("- a: the first" in v.text for v in with_defs)


def test_json_outputs_vary_only_role_and_placement():
    variants = instruction_variants("Extract the slots.", None)
    assert all("Answer with exactly one of" not in v.text for v in variants)
    assert len(variants) >= 3


@pytest.mark.parametrize("reply, expected", [
    ("<instruction>Label spam.</instruction>", "Label spam."),
    ("Sure!\n<instruction>\nLabel spam as spam.\n</instruction>\nHope it helps", "Label spam as spam."),
    ("Just a plain rewrite.", "Just a plain rewrite."),
    ("<instruction>{{ ''.__class__ }}</instruction>", None),
    ("", None),
    ("<instruction>" + "x" * 5000 + "</instruction>", None),
])
def test_parse_proposed_instruction(reply, expected):
    assert parse_instruction(reply) == expected
