"""The judge's rubric and scale in the prompt file, and how far to trust it (kappa, Spearman)."""

from __future__ import annotations

import math

from tunelab.datasets import Example
from tunelab.judge import Judge, agreement, judge_metric, spearman, trust
from tunelab.metrics import Answer, make_metric
from tunelab.models.fake import FakeModel
from tunelab.prompts import parse_prompt

PROMPT = """---
model: fake
output:
  type: text
  judge:
    rubric: "Faithfulness: every fact of the input is stated and nothing is invented."
    scale: [0, 3]
    model: fake:judge
---
user:
Write one sentence: {{ input }}
"""


def test_a_prompts_rubric_and_scale_make_its_judge(workspace):
    output = parse_prompt(PROMPT, "say").output
    metric = judge_metric("judge", output, workspace)
    assert metric.judge.rubric.startswith("Faithfulness") and (metric.judge.low, metric.judge.high) == (0, 3)
    assert metric.judge.model.name == "judge"
    request = metric.judge.grade_request("A | B | C", "A is B.")
    assert request.labels == ["0", "1", "2", "3"] and "Faithfulness" in request.messages[0]["content"]
    assert output.to_dict()["judge"]["scale"] == [0, 3]
    # the registered metric `judge` finds it too, through the entry point
    assert make_metric("judge", output, workspace).judge.high == 3


def test_agreement_reports_spearman_and_a_verdict():
    judge = Judge(FakeModel(), low=1, high=5)
    humans = [1, 2, 3, 4, 5, 5, 1, 2]
    examples = [Example("x", "y", meta={"human_score": h}) for h in humans]

    class Score:
        def __init__(self, s):
            self.score = s

    close = agreement(judge, examples, [Score(min(5, h + (i % 2))) for i, h in enumerate(humans)])
    assert close["spearman"] > 0.9 and close["weighted_kappa"] > 0.6
    assert close["trust"].startswith(("substantial", "almost perfect")) and "use its scores" in close["trust"]
    noisy = agreement(judge, examples, [Score(s) for s in [5, 1, 4, 2, 1, 3, 5, 4]])
    assert noisy["spearman"] < 0 and "do not rely" in noisy["trust"]
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert trust({"n": 3}).startswith("unknown")


def test_the_judge_grades_a_batch_against_every_reference_it_is_shown(workspace):
    metric = judge_metric("judge", parse_prompt(PROMPT, "say").output, workspace)
    scores = metric.score_many([Answer("A is B.", "A is B.", example=Example("A | B", "A is B.")),
                                Answer("A is B.", "Nonsense.", example=Example("A | B", "A is B."))])
    assert all(s is None or 0.0 <= s <= 1.0 for s in scores) and len(scores) == 2
