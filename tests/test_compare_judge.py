"""A comparison on an LLM judge's grades says how far the judge can be trusted: its agreement with a
sample of human-graded answers (`--judge-sample`), in the comparison, the terminal and the report."""

from __future__ import annotations

import json

import pytest

from tunelab.compare import compare
from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.files import write_atomic
from tunelab.models import load_model
from tunelab.prompts import commit_prompt

PROMPT = """---
model: fake:writer
output:
  type: text
  judge:
    rubric: "Faithfulness: every fact of the input is stated and nothing is invented."
    scale: [1, 5]
    model: fake:judge
---
user:
Write one sentence: {{ input }}
"""

# the judge's grade of an answer, keyed by a word the answer contains
GRADES = {"exact": "5", "mostly": "4", "partly": "3", "barely": "2", "wrong": "1"}


@pytest.fixture
def judged(workspace):
    write_atomic(workspace.prompts_dir / "say.prompt", PROMPT)
    commit_prompt(workspace, "say", "first")
    load_model("fake:judge", workspace).rules.update(GRADES)
    load_model("fake:writer", workspace).rules.update({"alpha": "an exact sentence", "beta": "a partly right one"})
    items = [Example(f"alpha {i}", "an exact sentence") for i in range(4)] + \
            [Example(f"beta {i}", "a sentence about beta") for i in range(4)]
    save_dataset(workspace, "notes", {"train": items, "validation": items, "test": items})
    # humans graded answers of another writer: the judge agrees with them but on one answer
    humans = [("exact", 5), ("mostly", 4), ("partly", 3), ("barely", 2), ("wrong", 1), ("exact", 5),
              ("partly", 2), ("wrong", 1)]
    graded = [Example(f"case {i}", f"a {word} answer", meta={"human_score": h}) for i, (word, h) in enumerate(humans)]
    save_dataset(workspace, "graded", {"test": graded})
    return workspace


def test_the_comparison_says_how_far_its_judge_can_be_trusted(judged):
    comp = compare(judged, "notes:test", ["say"], metric="judge", judge_sample="graded:test", progress=False)
    jt = comp.judge
    assert jt is not None and jt.judge == "judge" and jt.n == 8 and jt.sample.startswith("graded@")
    assert jt.weighted_kappa > 0.9 and jt.spearman > 0.9
    assert jt.trust.startswith("almost perfect") and "use its scores" in jt.trust
    # the judge graded the candidate's answers on the prompt's rubric: 5 for exact, 3 for partly
    assert comp.candidates[0].metric.value == pytest.approx((4 * 1.0 + 4 * 0.5) / 8)
    html = open(comp.report, encoding="utf-8").read()
    assert 'id="judge-trust"' in html and "almost perfect" in html
    assert json.load(open(comp.report.replace("report.html", "report.json")))["judge"]["n"] == 8


def test_without_a_sample_the_trust_is_said_to_be_unmeasured(judged):
    comp = compare(judged, "notes:test", ["say"], metric="judge", progress=False)
    assert comp.judge.n == 0 and comp.judge.trust.startswith("not measured") and "--judge-sample" in comp.judge.trust
    assert compare(judged, "notes:test", ["say"], progress=False).judge is None  # chrf: no judge


def test_a_judge_sample_without_a_judge_metric_or_grades_is_a_clear_error(judged, cli):
    with pytest.raises(UserError, match="add --metric judge"):
        compare(judged, "notes:test", ["say"], judge_sample="graded:test", progress=False)
    r = cli("compare", "say", "--data", "notes:test", "--metric", "judge", "--judge-sample", "notes:test")
    assert r.exit_code == 2 and "no example carries meta.human_score" in r.output
    r = cli("compare", "say", "--data", "notes:test", "--metric", "judge", "--judge-sample", "graded:test")
    assert r.exit_code == 0 and "judge judge: almost perfect agreement" in r.output
