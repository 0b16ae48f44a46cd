"""`tunelab eval`: the default command, --json, --fail-under, show/diff/list, errors, and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from sqlalchemy import func, select

from tunelab.datasets import Example, save_dataset
from tunelab.store.models import RunExampleRow, RunRow

PROMPT = """---
model: fake
output: {type: label, labels: [ham, spam]}
---
system:
Answer ham or spam.
user:
{{ input }}
"""


def examples(n: int) -> list[Example]:
    # the fake names the label it sees in the input: 'spam' inputs say spam; every fifth ham says spam too
    return [Example(f"message {i}: " + ("spam offer" if i % 2 else ("spam?" if i % 5 == 0 else "ham here")),
                    "spam" if i % 2 else "ham") for i in range(n)]


@pytest.fixture
def ws(workspace):
    save_dataset(workspace, "sms", {"train": examples(20), "test": examples(60)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    return workspace


def test_eval_candidate_prints_a_summary(ws, cli):
    r = cli("eval", "spam", "--data", "sms:test")
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.stdout and "macro_f1" in r.stdout and "cost per 1,000 requests" in r.stdout
    assert "latency per request: p50" in r.stdout
    # 'eval run CANDIDATE' is the same command: the finished run is shown as stored
    r2 = cli("eval", "run", "spam", "--data", "sms:test")
    assert r2.exit_code == 0 and "finished earlier" in r2.stdout


def test_eval_json_summary(ws, cli):
    r = cli("eval", "spam", "--data", "sms:test", "--limit", "40", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # nothing but JSON on stdout
    acc = data["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx(0.9)  # 4 of the 20 hams in 40 say 'spam?'
    assert acc["lo"] < 0.9 < acc["hi"]
    assert data["tokens"]["prompt"] > 0 and data["latency"]["p50"] is not None and data["latency"]["p95"] is not None
    assert data["throughput"]["examples_per_s"] > 0 and "per_1000" in data["cost"]
    assert data["n_examples"] == 40 and len(data["id"]) == 12
    with ws.store.session() as s:
        assert s.get(RunRow, data["id"]).status == "done"


def test_fail_under(ws, cli):
    r = cli("eval", "spam", "--data", "sms:test", "--fail-under", "accuracy=0.95")
    assert r.exit_code == 1 and "accuracy 0.9 is under 0.95" in r.stderr
    r = cli("eval", "spam", "--data", "sms:test", "--fail-under", "accuracy=0.85", "--fail-under", "macro_f1=0.5")
    assert r.exit_code == 0
    r = cli("eval", "spam", "--data", "sms:test", "--json", "--fail-under", "accuracy=0.95")
    assert r.exit_code == 1 and json.loads(r.stdout)["fail_under"]["passed"] is False
    r = cli("eval", "spam", "--data", "sms:test", "--fail-under", "accuracy")
    assert r.exit_code == 2 and "METRIC=VALUE" in r.stderr
    r = cli("eval", "spam", "--data", "sms:test", "--fail-under", "bleu=0.3")
    assert r.exit_code == 2 and "no metric 'bleu'" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["spam", "--data", "nope:test"], "unknown dataset 'nope'"),
    (["spam", "--data", "sms:dev"], "no split 'dev'"),
    (["nope", "--data", "sms:test"], "unknown prompt 'nope'"),
    (["spam@0000", "--data", "sms:test"], "spam"),
    (["spam", "--data", "sms:test", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["spam", "--data", "sms:test", "--metric", "acc"], "unknown metric 'acc'"),
    (["ft:nothing", "--data", "sms:test"], "unknown fine-tune 'nothing'"),
    (["spam", "--data", "sms:test", "--limit", "0"], "--limit"),
])
def test_unknown_names_are_one_line_errors(ws, cli, args, message):
    r = cli("eval", *args)
    assert r.exit_code == 2, r.output
    assert message in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.output


def test_show_failures_export_diff_list(ws, cli, tmp_path):
    a = json.loads(cli("eval", "spam", "--data", "sms:test", "--json").stdout)
    better = PROMPT.replace("model: fake", "model: fake:b")
    (ws.prompts_dir / "better.prompt").write_text(better)
    b = json.loads(cli("eval", "better", "--data", "sms:test", "--json").stdout)
    r = cli("eval", "show", a["id"][:7], "--failures")
    assert r.exit_code == 0
    assert "6 wrong answers" in r.stdout and "ham -> spam  x6" in r.stdout and "free answer" in r.stdout
    r = cli("eval", "show", a["id"], "--failures", "--json")
    fails = json.loads(r.stdout)["failures"]
    assert fails[0]["key"] == "ham -> spam" and fails[0]["count"] == 6
    r = cli("eval", "show", "last", "--export", str(tmp_path / "rows.jsonl"))
    assert r.exit_code == 0 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 60
    r = cli("eval", "diff", a["id"], b["id"])
    assert r.exit_code == 0 and "60 examples in common" in r.stdout
    assert "score the same" in r.stdout and "[mcnemar-exact]" in r.stdout
    r = cli("eval", "diff", a["id"], b["id"], "--json")
    assert json.loads(r.stdout)["results"][0]["metric"] == "accuracy"
    r = cli("eval", "list", "--json")
    ids = [row["id"] for row in json.loads(r.stdout)]
    assert ids == [b["id"], a["id"]]
    assert cli("eval", "list").exit_code == 0
    r = cli("eval", "show", "zzzz")
    assert r.exit_code == 2 and "unknown run 'zzzz'" in r.stderr


def test_eval_help_lists_commands(cli):
    r = cli("eval", "--help")
    assert r.exit_code == 0
    for word in ("CANDIDATE", "show", "diff", "list"):
        assert word in r.stdout


# -- SIGKILL halfway, then resume ------------------------------------------------------------------

# The real `tunelab` entry point, with the fake model slowed down (10 ms per request) so that a
# run of 500 examples takes a few seconds and can be killed in the middle.
SLOW_TUNELAB = (
    "import sys, time\n"
    "from tunelab.models.fake import FakeModel\n"
    "_complete = FakeModel.complete\n"
    "def slow(self, requests):\n"
    "    time.sleep(0.01 * len(requests))\n"
    "    return _complete(self, requests)\n"
    "FakeModel.complete = slow\n"
    "from tunelab.cli import main\n"
    "sys.argv = ['tunelab', *sys.argv[1:]]\n"
    "main()\n"
)


def _count(db_ws, run_id=None) -> int:
    with db_ws.store.session() as s:
        q = select(func.count()).select_from(RunExampleRow)
        if run_id:
            q = q.where(RunExampleRow.run_id == run_id)
        return s.scalar(q)


@pytest.mark.slow
def test_sigkill_halfway_then_resume_gives_500_rows_and_the_same_metrics(workspace, tmp_path):
    save_dataset(workspace, "big", {"test": examples(500)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    env = {**os.environ, "TUNELAB_WORKSPACE": str(workspace.root)}
    cmd = [sys.executable, "-c", SLOW_TUNELAB, "eval", "spam", "--data", "big:test", "--batch-size", "20",
           "--no-cache"]
    proc = subprocess.Popen(cmd + ["--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and _count(workspace) < 200:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _count(workspace)
    assert 200 <= killed_at < 500, f"the run was not killed halfway ({killed_at} rows)"
    with workspace.store.session() as s:
        run = s.scalars(select(RunRow)).one()
        assert run.status == "running"  # it never got to say anything
        run_id = run.id
    out = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    resumed = json.loads(out.stdout)
    assert resumed["id"] == run_id and resumed["resumed"] is True
    assert _count(workspace, run_id) == 500
    with workspace.store.session() as s:
        pairs = s.execute(select(RunExampleRow.example_index).where(RunExampleRow.run_id == run_id)).scalars().all()
    assert sorted(pairs) == list(range(500))
    # an uninterrupted run of the same configuration
    out = subprocess.run(cmd + ["--json", "--rerun"], env=env, capture_output=True, text=True, timeout=180)
    fresh = json.loads(out.stdout)
    assert fresh["id"] != run_id and _count(workspace, fresh["id"]) == 500
    assert resumed["metrics"] == fresh["metrics"]
    assert resumed["metrics"]["accuracy"]["value"] == pytest.approx(0.9)


def test_free_answers_option_sets_how_many_rows_measure_format_validity(ws, cli):
    r = cli("eval", "spam", "--data", "sms:test", "--free-answers", "10")
    assert r.exit_code == 0, r.output
    assert "(free answers on 10 of 60 rows)" in r.stdout
    r = cli("eval", "spam", "--data", "sms:test", "--free-answers", "all", "--json")
    assert r.exit_code == 0, r.output
    fv = json.loads(r.stdout)["consistency"]["format_valid"]
    assert fv["rows"] == fv["of"] == 60
    r = cli("eval", "spam", "--data", "sms:test", "--free-answers", "lots")
    assert r.exit_code == 2 and "--free-answers" in r.stderr and "Traceback" not in r.output
