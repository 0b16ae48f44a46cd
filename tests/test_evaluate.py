"""The run loop with the fake model: rows, resume, repeats, cache, cost, consistency, diff."""

from __future__ import annotations

import csv
import json

import pytest
from sqlalchemy import func, select

from tunelab.datasets import Example, save_dataset
from tunelab.errors import NotFound, UserError
from tunelab.evaluate import (Candidate, PromptCandidate, diff_runs, evaluate, export_run, failure_groups,
                              free_answer_count, free_answer_key, load_run, resolve_candidate, run_rows, sample_label)
from tunelab.store.models import CacheRow, RunExampleRow, RunRow

N = 120


def spam_examples(n: int) -> list[Example]:
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(Example(f"msg {i}: WIN a free prize, call now", "spam"))
        elif i % 7 == 0:
            out.append(Example(f"msg {i}: cheap loans today", "spam"))  # the fake's rules miss these
        else:
            out.append(Example(f"msg {i}: see you at lunch", "ham"))
    return out


LABEL_PROMPT = """---
model: fake
temperature: {temperature}
output: {{type: label, labels: [ham, spam]}}
---
system:
Answer ham or spam.
user:
{{{{ input }}}}
"""


def write_prompt(ws, name: str, temperature: float = 0.0, text: str | None = None) -> None:
    (ws.prompts_dir / f"{name}.prompt").write_text(text or LABEL_PROMPT.format(temperature=temperature))


@pytest.fixture
def spam_ws(workspace):
    save_dataset(workspace, "sms", {"train": spam_examples(30), "test": spam_examples(N)})
    write_prompt(workspace, "spam")
    return workspace


def candidate(ws, spec: str = "spam", **rules) -> PromptCandidate:
    cand = resolve_candidate(ws, spec)
    cand.model.rules.clear()
    cand.model.rules.update({"win": "spam", "lunch": "ham", **rules})
    return cand


def n_rows(ws, run_id: str) -> int:
    with ws.store.session() as s:
        return s.scalar(select(func.count()).select_from(RunExampleRow).where(RunExampleRow.run_id == run_id))


def expected_accuracy(examples: list[Example]) -> float:
    # the rules answer 'win' -> spam and 'lunch' -> ham; 'cheap loans' (spam) falls through to the
    # fake's deterministic hash choice, so compute what it answers
    from tunelab.models.fake import FakeModel

    fake = FakeModel(rules={"win": "spam", "lunch": "ham"})
    right = 0
    for ex in examples:
        from tunelab.models.base import Request

        comp = fake.complete([Request(messages=[{"role": "user", "content": ex.input}], labels=["ham", "spam"])])[0]
        right += comp.text == ex.output
    return right / len(examples)


def test_rows_are_stored_with_scores_tokens_latency_cost(spam_ws):
    cand = candidate(spam_ws)
    result = evaluate(spam_ws, cand, "sms:test", progress=False, free_answers="all")
    rows = run_rows(spam_ws, result.id)
    assert len(rows) == N == result.rows
    assert sorted(r.example_index for r in rows) == list(range(N))
    r0 = rows[0]
    assert r0.input == spam_examples(N)[0].input and r0.expected == "spam" and r0.prediction == "spam"
    assert set(r0.scores) == {"accuracy", "format_valid", "free_accuracy"}  # macro_f1 is corpus-level only
    assert r0.prompt_tokens > 0 and r0.completion_tokens == 1 and r0.latency_s >= 0
    assert set(r0.extra["label_logprobs"]) == {"ham", "spam"} and r0.extra["margin"] > 0
    assert r0.extra["free_text"] == "spam" and r0.extra["free_valid"] is True and r0.extra["format_valid"] is True
    acc = sum(r.scores["accuracy"] for r in rows) / N
    assert result.metrics["accuracy"]["value"] == pytest.approx(acc)
    assert acc == pytest.approx(expected_accuracy(spam_examples(N)))
    lo, hi = result.metrics["accuracy"]["lo"], result.metrics["accuracy"]["hi"]
    assert lo < acc < hi and result.metrics["accuracy"]["method"] == "wilson"
    assert result.tokens["prompt"] == pytest.approx(sum(r.prompt_tokens for r in rows) / N)
    assert result.status == "done" and result.throughput["examples_per_s"] > 0
    with spam_ws.store.session() as s:
        run = s.get(RunRow, result.id)
        assert run.status == "done" and run.summary["metrics"]["accuracy"]["value"] == pytest.approx(acc)
    # each request asked for the free answer too, with the repeat index as the seed
    assert all(req.free_text and req.seed == 0 and req.labels == ["ham", "spam"] for req in cand.model.calls)


class Crashing(Candidate):
    """Wraps a candidate and raises on the n-th batch (a crash in the middle of a run)."""

    def __init__(self, inner: Candidate, crash_on: int | None):
        self.inner, self.crash_on, self.batches = inner, crash_on, 0
        self.name, self.kind, self.model_name = inner.name, inner.kind, inner.model_name
        self.backend, self.output, self.temperature = inner.backend, inner.output, inner.temperature

    @property
    def fingerprint(self):
        return self.inner.fingerprint

    def predict(self, examples, repeat_index=0):
        self.batches += 1
        if self.batches == self.crash_on:
            raise RuntimeError("simulated crash")
        return self.inner.predict(examples, repeat_index)

    def with_free_answers(self, pick):
        return Crashing(self.inner.with_free_answers(pick), self.crash_on)

    def map_models(self, fn):
        return Crashing(self.inner.map_models(fn), self.crash_on)


def test_resume_after_a_crash_gives_exactly_n_rows_and_the_same_metrics(spam_ws):
    cand = candidate(spam_ws)
    crashing = Crashing(cand, crash_on=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        evaluate(spam_ws, crashing, "sms:test", batch_size=25, progress=False, use_cache=False)
    with spam_ws.store.session() as s:
        run = s.scalars(select(RunRow)).one()
        assert run.status == "failed" and "simulated crash" in run.error
        run_id = run.id
    assert n_rows(spam_ws, run_id) == 50  # two batches stored, the third lost
    calls_before = len(cand.model.calls)
    resumed = evaluate(spam_ws, Crashing(cand, None), "sms:test", batch_size=25, progress=False, use_cache=False)
    assert resumed.id == run_id and resumed.resumed
    assert n_rows(spam_ws, run_id) == N
    assert len(cand.model.calls) - calls_before == N - 50  # only the missing examples were asked
    fresh = evaluate(spam_ws, cand, "sms:test", batch_size=25, progress=False, use_cache=False, rerun=True)
    assert fresh.id != run_id
    for name in ("accuracy", "macro_f1", "format_valid"):
        assert resumed.metrics[name] == fresh.metrics[name]


def test_finished_run_is_reused_and_rerun_is_served_from_the_cache(spam_ws):
    cand = candidate(spam_ws)
    first = evaluate(spam_ws, cand, "sms:test", progress=False)
    calls = len(cand.model.calls)
    assert calls == N
    again = evaluate(spam_ws, cand, "sms:test", progress=False)
    assert again.reused and again.id == first.id and len(cand.model.calls) == calls
    rerun = evaluate(spam_ws, cand, "sms:test", progress=False, rerun=True)
    assert rerun.id != first.id and rerun.cached_rows == N
    assert len(cand.model.calls) == calls  # the model was not asked again
    assert rerun.metrics == first.metrics
    assert rerun.cost["per_request"] == pytest.approx(first.cost["per_request"])  # cached rows keep their cost
    nocache = evaluate(spam_ws, cand, "sms:test", progress=False, rerun=True, use_cache=False)
    assert len(cand.model.calls) == 2 * N and nocache.cached_rows == 0


def test_repeats_are_independent_at_temperature(spam_ws):
    write_prompt(spam_ws, "warm", temperature=1.0)
    cand = resolve_candidate(spam_ws, "warm")  # no rules: the fake's answer depends on the seed
    K = 4
    result = evaluate(spam_ws, cand, "sms:test", repeat=K, limit=40, progress=False)
    rows = run_rows(spam_ws, result.id)
    assert len(rows) == 40 * K
    assert sorted({r.repeat_index for r in rows}) == list(range(K))
    assert sorted({req.seed for req in cand.model.calls}) == list(range(K))
    by_example = {}
    for r in rows:
        by_example.setdefault(r.example_index, []).append(r.prediction)
    varied = sum(len(set(p)) > 1 for p in by_example.values())
    assert varied >= 20  # the cache did not hand back the first answer K times
    with spam_ws.store.session() as s:
        assert s.scalar(select(func.count()).select_from(CacheRow)) == 40 * K
    c = result.consistency
    all_same = sum(len(set(p)) == 1 for p in by_example.values()) / 40
    assert c["agreement"]["value"] == pytest.approx(all_same) and c["note"] is None
    assert 0 < c["pairwise_agreement"]["value"] < 1
    passk = sum(all(r.scores["accuracy"] == 1 for r in rows if r.example_index == i) for i in by_example) / 40
    assert c["pass_k"]["value"] == pytest.approx(passk)
    assert result.repeat == K and result.metrics["accuracy"]["n"] == 40  # intervals over examples
    # a rerun with the same seeds is free and identical
    calls = len(cand.model.calls)
    again = evaluate(spam_ws, cand, "sms:test", repeat=K, limit=40, progress=False, rerun=True)
    assert len(cand.model.calls) == calls and again.consistency == c


def test_temperature_zero_repeats_say_so(spam_ws):
    result = evaluate(spam_ws, candidate(spam_ws), "sms:test", repeat=2, limit=10, progress=False)
    c = result.consistency
    assert c["agreement"]["value"] == 1.0 and "temperature 0" in c["note"]


def test_sample_label_follows_the_distribution_and_is_seeded():
    import math

    logprobs = {"a": math.log(0.8), "b": math.log(0.2)}
    draws = [sample_label(logprobs, 1.0, f"seed {i}") for i in range(2000)]
    assert 0.76 < draws.count("a") / 2000 < 0.84
    assert sample_label(logprobs, 1.0, "x") == sample_label(logprobs, 1.0, "x")
    assert sample_label(logprobs, 0.0, "anything") == "a"


def test_cost_from_the_pricing_table(workspace):
    (workspace.root / "tunelab.yaml").write_text(
        "name: t\npricing:\n  fake: {input_per_million: 2.0, output_per_million: 10.0}\n")
    from tunelab.workspace import Workspace

    ws = Workspace(workspace.root)
    save_dataset(ws, "sms", {"test": spam_examples(20)})
    write_prompt(ws, "spam")
    result = evaluate(ws, candidate(ws), "sms:test", progress=False)
    rows = run_rows(ws, result.id)
    for r in rows:
        assert r.cost == pytest.approx(r.prompt_tokens * 2e-6 + r.completion_tokens * 10e-6)
    assert result.cost["per_1000"] == pytest.approx(1000 * sum(r.cost for r in rows) / len(rows))
    assert result.cost["pricing"]["input_per_million"] == 2.0


def test_local_pricing_is_per_hour_of_measured_time(spam_ws):
    from tunelab.evaluate import request_cost
    from tunelab.models.base import Completion
    from tunelab.workspace import Pricing

    assert request_cost(Pricing(per_hour=3.6), Completion("x", latency_s=0.5)) == pytest.approx(0.0005)
    assert request_cost(Pricing(per_hour=3.6), Completion("x", latency_s=0.5, meta={"cost": 0.1})) == 0.1


JSON_PROMPT = """---
model: fake
output:
  type: json
  schema: {type: object, properties: {people: {type: string}, time: {type: string}},
           additionalProperties: false}
---
Extract the booking slots of: {{ input }}
"""


def test_json_candidate_metrics(workspace):
    exs = [Example("table for 4 people", '{"people": "4 people"}'),
           Example("at 7pm please", '{"time": "7pm"}'),
           Example("hello", "{}"),
           Example("2 people at 8pm", '{"people": "2 people", "time": "8pm"}')]
    save_dataset(workspace, "slots", {"test": exs})
    (workspace.prompts_dir / "slots.prompt").write_text(JSON_PROMPT)
    cand = resolve_candidate(workspace, "slots")
    cand.model.rules.update({"table for 4": '{"people": "4 people"}', "7pm": 'Sure: {"time": "7 pm"}',
                             "hello": "no idea", "8pm": '{"people": "2 people", "time": "8pm"}'})
    result = evaluate(workspace, cand, "slots:test", progress=False, batch_size=10, use_cache=False)
    m = result.metrics
    assert result.primary_metric == "field_f1"
    assert m["json_valid"]["value"] == pytest.approx(3 / 4)
    assert m["json_schema"]["value"] == pytest.approx(3 / 4)
    assert m["json_match"]["value"] == pytest.approx(2 / 4)
    # fields: tp 1+0+0+2 = 3, fp 0+1+0+0 = 1, fn 0+1+0+0 = 1
    assert m["field_f1"]["value"] == pytest.approx(6 / 8)
    assert m["field_precision"]["value"] == pytest.approx(3 / 4)
    assert result.consistency["format_valid"]["value"] == pytest.approx(3 / 4)
    groups = {g["key"]: g["count"] for g in failure_groups(workspace, result.id)}
    assert groups == {"invalid JSON": 1, "wrong time": 1}


def test_diff_runs_says_whether_the_difference_is_real(spam_ws):
    good = candidate(spam_ws, cheap="spam")
    bad_text = LABEL_PROMPT.format(temperature=0).replace("Answer ham or spam.", "Answer.").replace(
        "model: fake", "model: fake:worse")  # its own fake instance, with its own rules
    write_prompt(spam_ws, "worse", text=bad_text)
    bad = resolve_candidate(spam_ws, "worse")
    bad.model.rules.clear()
    bad.model.rules.update({"win": "ham", "lunch": "ham"})  # misses every spam
    ra = evaluate(spam_ws, bad, "sms:test", progress=False)
    rb = evaluate(spam_ws, good, "sms:test", progress=False)
    d = diff_runs(spam_ws, ra.id, rb.id)
    acc = next(r for r in d.results if r.metric == "accuracy")
    assert acc.test == "mcnemar-exact" and acc.discordant[0] == 0 and acc.discordant[1] > 30
    assert acc.diff == pytest.approx(rb.metrics["accuracy"]["value"] - ra.metrics["accuracy"]["value"])
    assert acc.p < 0.001
    text = d.verdicts[[r.metric for r in d.results].index("accuracy")]
    assert text.startswith("accuracy: B (spam@") and "the difference is real" in text
    f1 = next(r for r in d.results if r.metric == "macro_f1")
    assert f1.test == "paired-bootstrap" and f1.lo > 0
    same = diff_runs(spam_ws, rb.id, rb.id)
    assert all("not distinguishable from noise" in v for v in same.verdicts)


def test_diff_needs_the_same_data(spam_ws):
    save_dataset(spam_ws, "other", {"test": spam_examples(10)[::-1]})
    ra = evaluate(spam_ws, candidate(spam_ws), "sms:test", progress=False, limit=10)
    rb = evaluate(spam_ws, candidate(spam_ws), "other:test", progress=False)
    with pytest.raises(UserError, match="different data"):
        diff_runs(spam_ws, ra.id, rb.id)


def test_failures_and_export(spam_ws, tmp_path):
    result = evaluate(spam_ws, candidate(spam_ws), "sms:test", progress=False)
    groups = failure_groups(spam_ws, result.id)
    wrong = [r for r in run_rows(spam_ws, result.id) if r.scores["accuracy"] < 1]
    assert sum(g["count"] for g in groups) == len(wrong) > 0
    assert [g["count"] for g in groups] == sorted((g["count"] for g in groups), reverse=True)
    assert all(g["key"] in ("spam -> ham", "ham -> spam") for g in groups)
    path = export_run(spam_ws, result.id[:6], tmp_path / "out.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == N and table[0]["score:accuracy"] in ("0.0", "1.0")
    path = export_run(spam_ws, "last", tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == N and lines[0]["scores"]["accuracy"] in (0.0, 1.0) and "label_logprobs" in lines[0]["extra"]
    with pytest.raises(UserError, match=".csv or .jsonl"):
        export_run(spam_ws, result.id, tmp_path / "out.txt")
    assert load_run(spam_ws, result.id[:8]).id == result.id


def test_custom_metric_in_a_run(spam_ws, monkeypatch):
    (spam_ws.root / "ws_metrics.py").write_text(
        "def long_input(example, prediction):\n    return float(len(example.input) > 20)\n")
    monkeypatch.syspath_prepend(str(spam_ws.root))
    result = evaluate(spam_ws, candidate(spam_ws), "sms:test", metrics=["ws_metrics:long_input"], progress=False)
    expect = sum(len(e.input) > 20 for e in spam_examples(N)) / N
    assert result.metrics["ws_metrics:long_input"]["value"] == pytest.approx(expect)
    assert list(result.metrics) == ["accuracy", "ws_metrics:long_input"]


def test_unknown_names_are_not_found(spam_ws):
    with pytest.raises(NotFound, match="unknown dataset"):
        evaluate(spam_ws, candidate(spam_ws), "nope:test", progress=False)
    with pytest.raises(NotFound, match="no split 'dev'"):
        evaluate(spam_ws, candidate(spam_ws), "sms:dev", progress=False)
    with pytest.raises(NotFound, match="unknown metric"):
        evaluate(spam_ws, candidate(spam_ws), "sms:test", metrics=["acc"], progress=False)
    with pytest.raises(NotFound, match="unknown fine-tune 'x'"):
        resolve_candidate(spam_ws, "ft:x")
    with pytest.raises(NotFound):
        resolve_candidate(spam_ws, "hybrid:nothing")
    with pytest.raises(NotFound, match="unknown prompt"):
        resolve_candidate(spam_ws, "nothing")
    with pytest.raises(NotFound, match="unknown model"):
        resolve_candidate(spam_ws, "spam", model="no-such-model")
    with pytest.raises(NotFound, match="unknown run"):
        load_run(spam_ws, "ffffffff")
    with pytest.raises(UserError, match="--repeat"):
        evaluate(spam_ws, candidate(spam_ws), "sms:test", repeat=0, progress=False)


def test_free_answers_on_a_seeded_sample_of_the_examples(spam_ws):
    big = spam_examples(300)
    save_dataset(spam_ws, "big", {"test": big})
    cand = candidate(spam_ws)
    cand.model.calls.clear()
    result = evaluate(spam_ws, cand, "big:test", progress=False, use_cache=False)
    rows = run_rows(spam_ws, result.id)
    asked = [req for req in cand.model.calls if req.free_text]
    assert len(cand.model.calls) == 300 and len(asked) == 100  # default: max(100, 20%) of 300
    with_free = [r for r in rows if "free_text" in r.extra]
    skipped = [r for r in rows if r.extra.get("free_text_skipped")]
    assert len(with_free) == 100 and len(skipped) == 200
    # the sample: the 100 examples with the smallest input hashes, whatever their order
    chosen = sorted(range(300), key=lambda i: free_answer_key(big[i]))[:100]
    assert sorted(r.example_index for r in with_free) == sorted(chosen)
    for r in skipped:
        assert r.extra["format_valid"] is None and "format_valid" not in r.scores and "free_accuracy" not in r.scores
        assert "accuracy" in r.scores
    valid = sum(r.extra["format_valid"] for r in with_free)
    assert result.metrics["format_valid"]["value"] == pytest.approx(valid / 100)
    assert result.metrics["format_valid"]["n"] == 100 and result.metrics["free_accuracy"]["n"] == 100
    fv = result.consistency["format_valid"]
    assert fv["n"] == 100 and fv["rows"] == 100 and fv["of"] == 300 and fv["value"] == pytest.approx(valid / 100)
    assert result.metrics["accuracy"]["n"] == 300
    # the same sample in another order; a different sample size is another run
    save_dataset(spam_ws, "big", {"test": big[::-1]})
    again = evaluate(spam_ws, candidate(spam_ws), "big:test", progress=False, use_cache=False)
    rows2 = run_rows(spam_ws, again.id)
    assert sorted(r.input for r in rows2 if "free_text" in r.extra) == sorted(r.input for r in with_free)
    every = evaluate(spam_ws, cand, "big:test", progress=False, free_answers="all")
    assert every.id != again.id and every.consistency["format_valid"]["n"] == 300


def test_every_row_gets_the_free_answer_when_repeating_or_asked(spam_ws):
    save_dataset(spam_ws, "big", {"test": spam_examples(150)})
    cand = candidate(spam_ws)
    cand.model.calls.clear()
    result = evaluate(spam_ws, cand, "big:test", repeat=2, progress=False, use_cache=False)
    assert sum(req.free_text for req in cand.model.calls) == 300
    assert result.consistency["format_valid"]["rows"] == 300 and result.metrics["format_valid"]["n"] == 150
    cand.model.calls.clear()
    result = evaluate(spam_ws, cand, "big:test", free_answers="10%", progress=False, use_cache=False)
    assert sum(req.free_text for req in cand.model.calls) == 15 and result.metrics["format_valid"]["n"] == 15
    # a candidate without free answers keeps "the prediction is a label" for every row
    cand = resolve_candidate(spam_ws, "spam", free_text=False)
    cand.model.calls.clear()
    result = evaluate(spam_ws, cand, "big:test", progress=False, use_cache=False)
    assert len(cand.model.calls) == 150 and not any(req.free_text for req in cand.model.calls)
    assert result.metrics["format_valid"]["n"] == 150 and result.metrics["format_valid"]["value"] == 1.0


def test_free_answer_count():
    assert free_answer_count(None, 500) == 100 and free_answer_count("auto", 1000) == 200
    assert free_answer_count(None, 60) == 60 and free_answer_count(None, 500, repeat=3) == 500
    assert free_answer_count("all", 500) == 500 and free_answer_count("20%", 501) == 101
    assert free_answer_count("7", 500) == 7 and free_answer_count(700, 500) == 500 and free_answer_count(0, 5) == 0
    for bad in ("some", "-3", "120%"):
        with pytest.raises(UserError, match="--free-answers"):
            free_answer_count(bad, 500)


def test_a_run_on_a_free_answer_sample_reuses_the_cached_run_on_all(spam_ws):
    save_dataset(spam_ws, "big", {"test": spam_examples(150)})
    cand = candidate(spam_ws)
    every = evaluate(spam_ws, cand, "big:test", progress=False, free_answers="all")
    assert sum(req.free_text for req in cand.model.calls) == 150
    cand.model.calls.clear()
    sample = evaluate(spam_ws, cand, "big:test", progress=False, free_answers="10%")
    assert sample.id != every.id
    assert cand.model.calls == [] and sample.cached_rows == 150  # scoring-only rows took the fuller entries
    rows = run_rows(spam_ws, sample.id)
    assert sum("free_text" in r.extra for r in rows) == 15
    assert all(r.extra.get("free_text_skipped") and r.extra["format_valid"] is None
               for r in rows if "free_text" not in r.extra)
    assert sample.metrics["accuracy"] == every.metrics["accuracy"]
    # the other way round does not hold: a request asking for a free answer needs one
    cand.model.calls.clear()
    save_dataset(spam_ws, "fresh", {"test": [Example(f"new {ex.input}", ex.output) for ex in spam_examples(40)]})
    evaluate(spam_ws, resolve_candidate(spam_ws, "spam", free_text=False), "fresh:test", progress=False)
    evaluate(spam_ws, cand, "fresh:test", progress=False, free_answers="all")
    assert sum(req.free_text for req in cand.model.calls) == 40
