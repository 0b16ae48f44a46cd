"""The evaluator end to end on the bundled SmolLM2 and small slices of the shared data sets."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate, run_rows
from tunelab.metrics import parse_json
from tunelab.models.base import match_label

pytestmark = pytest.mark.realmodel

N = 20

LABEL_PROMPT = """---
model: smollm2-135m
output: {type: label, labels: [ham, spam]}
---
user:
Is this SMS message spam or ham? Answer with one word: spam or ham.

Message: {{ input }}
"""

JSON_PROMPT = """---
model: smollm2-135m
max_tokens: 40
output:
  type: json
  schema: {type: object, additionalProperties: false,
           properties: {people: {type: string}, date: {type: string}, time: {type: string},
                        first_name: {type: string}, last_name: {type: string}}}
demos:
  - {input: "table for 4 people tomorrow at 7pm", output: '{"people": "4 people", "date": "tomorrow", "time": "7pm"}'}
  - {input: "hi there", output: '{}'}
---
user:
Extract the booking slots (people, date, time, first_name, last_name) from the message as a JSON object.

Message: {{ input }}
"""


def read(folder, split: str, n: int) -> list[Example]:
    with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [Example.from_dict(json.loads(line)) for line, _ in zip(f, range(n))]


def test_label_output_on_sms_spam(workspace, shared_data):
    save_dataset(workspace, "sms", {"test": read(shared_data / "sms_spam", "test", N)})
    (workspace.prompts_dir / "spam.prompt").write_text(LABEL_PROMPT)
    cand = resolve_candidate(workspace, "spam")
    result = evaluate(workspace, cand, "sms:test", progress=False)
    rows = run_rows(workspace, result.id)
    assert len(rows) == N and result.status == "done"
    tok = cand.model.tokenizer
    for r in rows:
        probs = {k: math.exp(v) for k, v in r.extra["label_logprobs"].items()}
        assert set(probs) == {"ham", "spam"} and sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
        assert r.prediction == max(probs, key=probs.get)  # temperature 0: the most likely label
        assert isinstance(r.extra["free_text"], str)
        assert r.extra["free_valid"] == (match_label(r.extra["free_text"], ["ham", "spam"]) is not None)
        assert r.latency_s > 0 and r.cost == pytest.approx(0.10 * r.latency_s / 3600)
    # tokens by the model's own tokenizer
    messages = cand.prompt.render(read(shared_data / "sms_spam", "test", 1)[0], cand.demos)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    r0 = next(r for r in rows if r.example_index == 0)
    assert r0.prompt_tokens == len(tok(rendered, add_special_tokens=False)["input_ids"])
    acc = sum(r.prediction == r.expected for r in rows) / N
    m = result.metrics
    assert m["accuracy"]["value"] == pytest.approx(acc) and m["accuracy"]["lo"] <= acc <= m["accuracy"]["hi"]
    free_valid = sum(r.extra["free_valid"] for r in rows) / N
    assert m["format_valid"]["value"] == pytest.approx(free_valid)
    assert result.latency["p50"] > 0 and result.cost["per_1000"] > 0 and result.tokens["prompt"] > 20
    # an unchanged candidate is answered from the cache, with the same answers
    again = evaluate(workspace, cand, "sms:test", progress=False, rerun=True)
    assert again.cached_rows == N
    assert [r.prediction for r in run_rows(workspace, again.id)] == [r.prediction for r in rows]


def test_json_output_on_restaurant8k_slots(workspace, shared_data):
    save_dataset(workspace, "slots", {"test": read(shared_data / "restaurant8k_slots", "test", N)})
    (workspace.prompts_dir / "slots.prompt").write_text(JSON_PROMPT)
    cand = resolve_candidate(workspace, "slots")
    result = evaluate(workspace, cand, "slots:test", progress=False)
    rows = run_rows(workspace, result.id)
    assert len(rows) == N
    assert all(0 < r.completion_tokens <= 40 and r.prompt_tokens > 50 for r in rows)
    # reference computations from the stored predictions
    parsed = [parse_json(r.prediction) for r in rows]
    valid = sum(ok for ok, _ in parsed) / N
    tp = fp = fn = 0
    for r, (ok, pred) in zip(rows, parsed):
        exp = json.loads(r.expected)
        pred = pred if ok and isinstance(pred, dict) else {}
        hit = sum(1 for k, v in pred.items() if k in exp and isinstance(v, str) and v.strip() == exp[k].strip())
        tp, fp, fn = tp + hit, fp + len(pred) - hit, fn + len(exp) - hit
    m = result.metrics
    assert m["json_valid"]["value"] == pytest.approx(valid)
    expected_f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    assert m["field_f1"]["value"] == pytest.approx(expected_f1)
    assert m["field_f1"]["lo"] <= m["field_f1"]["value"] <= m["field_f1"]["hi"]
    assert m["json_schema"]["value"] <= m["json_valid"]["value"]
    # format validity of a JSON output with a schema: it parses and matches the schema
    assert result.primary_metric == "field_f1"
    assert result.consistency["format_valid"]["value"] == pytest.approx(m["json_schema"]["value"])
