"""LLM-as-judge with the fake model as the judge: rubric grades normalized to 0-1, the `judge`
metric in a real evaluation, agreement with human grades (kappa and MCC against values computed
by hand), and pairwise preference asked in both orders."""

from __future__ import annotations

import json

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate, run_rows
from tunelab.judge import Judge, cohen_kappa, mcc, pairwise
from tunelab.models import load_model
from tunelab.models.base import Completion
from tunelab.models.fake import FakeModel

HUMAN = [1, 1, 2, 2, 3, 3]
JUDGE = [1, 2, 2, 2, 3, 1]


def test_kappa_and_mcc_match_hand_computed_values():
    # observed agreement 4/6; chance (2*2 + 2*3 + 2*1)/36 = 1/3 -> kappa (2/3 - 1/3) / (2/3) = 0.5
    assert cohen_kappa(HUMAN, JUDGE, [1, 2, 3]) == pytest.approx(0.5)
    # quadratic weights (i-j)^2/4: observed (1/4 + 1)/6, expected 10.5/36 -> 1 - 7.5/10.5 = 2/7
    assert cohen_kappa(HUMAN, JUDGE, [1, 2, 3], weights="quadratic") == pytest.approx(2 / 7)
    # unused categories change neither (the weights scale by a constant)
    assert cohen_kappa(HUMAN, JUDGE, [1, 2, 3, 4, 5]) == pytest.approx(0.5)
    assert cohen_kappa(HUMAN, JUDGE, [1, 2, 3, 4, 5], weights="quadratic") == pytest.approx(2 / 7)
    assert cohen_kappa(HUMAN, HUMAN) == pytest.approx(1.0)
    # pass = grade >= 2: tp 3, tn 1, fp 1, fn 1 -> (3 - 1) / sqrt(4 * 4 * 2 * 2) = 0.25
    assert mcc([h >= 2 for h in HUMAN], [j >= 2 for j in JUDGE]) == pytest.approx(0.25)


def test_grades_are_normalized_and_unparseable_ones_are_none():
    judge = Judge(FakeModel(rules={"resp-good": "5", "resp-ok": "3", "resp-bad": "1"}))
    exs = [Example("q", "ref") for _ in range(3)]
    scores = judge.grade(exs, ["resp-good", "resp-ok", "resp-bad"])
    assert [s.score for s in scores] == [5, 3, 1]
    assert [s.normalized for s in scores] == [1.0, 0.5, 0.0]
    request = judge.model.calls[0]
    assert request.labels == ["1", "2", "3", "4", "5"] and "Reference answer:\nref" in request.messages[0]["content"]

    class Rambler(FakeModel):  # a judge that answers without a grade (no label constraint honoured)
        def complete(self, requests):
            return [Completion(text="I cannot say") for _ in requests]

    [s] = Judge(Rambler()).grade(exs[:1], ["x"])
    assert s.score is None and s.normalized is None


def _labelled_sample(ws):
    examples = [Example(f"question {i}", f"resp-{i}", {"human_score": h}) for i, h in enumerate(HUMAN)]
    save_dataset(ws, "graded", {"test": examples})
    with open(ws.root / "tunelab.yaml", "a", encoding="utf-8") as f:
        f.write("judge:\n  model: fake:judge\n  rubric: be strict\n  scale: [1, 3]\n")
    judge = load_model("fake:judge", ws)
    judge.rules.update({f"resp-{i}": str(g) for i, g in enumerate(JUDGE)})
    return judge


def test_judge_command_reports_agreement_next_to_the_scores(workspace, cli):
    judge = _labelled_sample(workspace)
    r = cli("eval", "judge", "graded:test", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["judge"] == "judge" and report["grades"] == JUDGE and report["scale"] == [1, 3]
    assert report["mean"] == pytest.approx(sum((g - 1) / 2 for g in JUDGE) / 6)
    a = report["agreement"]
    assert a["n"] == 6 and a["exact"] == pytest.approx(4 / 6)
    assert a["kappa"] == pytest.approx(0.5) and a["weighted_kappa"] == pytest.approx(2 / 7)
    assert a["mcc"] == pytest.approx(0.25)  # pass at the midpoint 2 of the scale 1-3
    assert "Rubric: be strict" in judge.calls[-1].messages[0]["content"]
    text = cli("eval", "judge", "graded:test")
    assert text.exit_code == 0 and "kappa 0.500" in text.stdout and "weighted_kappa 0.286" in text.stdout
    assert "mean score 41.7%" in text.stdout


def test_bad_human_grades_are_user_errors(workspace, cli):
    save_dataset(workspace, "graded", {"test": [Example("q", "a", {"human_score": 9})]})
    r = cli("eval", "judge", "graded:test", "--judge", "fake")
    assert r.exit_code == 2 and "human_score 9" in r.stderr and "Traceback" not in r.output


TEXT_PROMPT = """---
output: {type: text}
---
user:
{{ input }}
"""


def _two_runs(ws):
    save_dataset(ws, "qa", {"test": [Example(f"q-{w}", "ref") for w in ("alpha", "beta", "gamma")]})
    (ws.prompts_dir / "a.prompt").write_text(TEXT_PROMPT.replace("{{ input }}", "aside {{ input }}"))
    (ws.prompts_dir / "b.prompt").write_text(TEXT_PROMPT.replace("{{ input }}", "bside {{ input }}"))
    run_a = evaluate(ws, resolve_candidate(ws, "a", "fake"), "qa:test", progress=False)
    run_b = evaluate(ws, resolve_candidate(ws, "b", "fake"), "qa:test", progress=False)
    return run_a, run_b


def test_judge_metric_in_an_evaluation(workspace, cli):
    save_dataset(workspace, "qa", {"test": [Example("q-alpha", "ref"), Example("q-beta", "ref")]})
    (workspace.prompts_dir / "echo.prompt").write_text(TEXT_PROMPT)
    judge = load_model("fake:grader", workspace)
    judge.rules.update({"q-alpha": "5", "q-beta": "2"})
    r = cli("eval", "echo", "--data", "qa:test", "--model", "fake", "--metric", "judge:fake:grader", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]["judge:fake:grader"]
    assert m["value"] == pytest.approx((1.0 + 0.25) / 2)  # grades 5 and 2 on 1-5
    assert m["details"]["judge"] == "grader"
    assert all(c.labels == ["1", "2", "3", "4", "5"] for c in judge.calls)


def test_pairwise_asks_both_orders(workspace, cli):
    run_a, run_b = _two_runs(workspace)
    fair = FakeModel(rules={"response a:\naside": "A", "response b:\naside": "B"})  # always prefers run a
    rows_a, rows_b = run_rows(workspace, run_a.id), run_rows(workspace, run_b.id)
    result = pairwise(Judge(fair), rows_a, rows_b, run_a.id, run_b.id)
    assert (result.a, result.b) == (run_a.id, run_b.id)
    assert (result.a_wins, result.b_wins, result.ties, result.position_flips) == (3, 0, 0, 0)
    assert result.a_win_rate == 1.0 and len(fair.calls) == 6
    biased = FakeModel(answers=["A"] * 6)  # always the first position: every choice flips
    result = pairwise(Judge(biased), rows_a, rows_b)
    assert (result.a_wins, result.b_wins, result.ties, result.position_flips) == (0, 0, 3, 3)
    assert result.a_win_rate == 0.5
    judge = load_model("fake:pj", workspace)
    judge.rules.update({"response a:\nbside": "A", "response b:\nbside": "B"})  # prefers run b
    r = cli("eval", "judge-pairwise", run_a.id, run_b.id, "--judge", "fake:pj", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["b_wins"] == 3


def test_the_judge_reads_the_workspace_given_and_grades_a_batch_in_one_call(tmp_path, cli, monkeypatch):
    """`tunelab -w X eval --metric judge` takes X's judge settings (not the current folder's), and a
    batch of answers costs the judge one model call, not one per row."""
    from tunelab.workspace import Workspace

    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    ws = Workspace.init(tmp_path / "with-judge")
    config = ws.root / "tunelab.yaml"
    config.write_text(config.read_text() + "judge:\n  model: fake:grader-x\n  scale: [1, 10]\n")
    elsewhere = Workspace.init(tmp_path / "elsewhere")  # the current folder: its own (default) settings
    save_dataset(ws, "qa", {"test": [Example(f"q-{i}", "ref") for i in range(6)]})
    (ws.prompts_dir / "echo.prompt").write_text(TEXT_PROMPT)
    grader = load_model("fake:grader-x", Workspace(ws.root))
    grader.rules.update({"q-": "10"})
    batches = []
    inner = grader.complete
    monkeypatch.setattr(grader, "complete", lambda requests: batches.append(len(requests)) or inner(requests))
    r = cli("-w", ws.root, "eval", "echo", "--data", "qa:test", "--model", "fake", "--metric", "judge", "--json",
            cwd=elsewhere.root)
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)["metrics"]["judge"]
    assert m["details"]["judge"] == "grader-x" and m["details"]["scale"] == [1, 10] and m["value"] == 1.0
    assert batches == [6]  # one call for the batch
