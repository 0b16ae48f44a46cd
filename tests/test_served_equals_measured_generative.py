"""Served = measured for generative outputs: a JSON prompt, the same prompt decoded under its
schema's grammar (constrained), a free-text prompt, and a JSON hybrid that routes on the
fine-tuned model's token confidence and on invalid answers — the gateway answers each input as the
evaluator's stored run did, asked through the official `openai` SDK. Fake model; the constrained
local backend is checked on SmolLM2 in tests/test_generative_realmodel.py."""

from __future__ import annotations

import json

import pytest

from tests.fakes import fake_finetune
from tests.servers import measured_and_served
from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import evaluate, read_hybrid, resolve_candidate, run_rows
from tunelab.files import write_atomic
from tunelab.hybrid import create_hybrid
from tunelab.models import clear_loaded, load_model
from tunelab.prompts import commit_prompt, current_version

openai = pytest.importorskip("openai", reason="the official openai SDK (a dev dependency) is not installed")

SCHEMA = '{type: object, properties: {people: {type: string}, time: {type: string}}, additionalProperties: false}'
EXTRACT = """---
model: fake:{model}
output:
  type: json
  schema: {schema}
{extra}---
user:
Extract the booking as JSON: {{{{ input }}}}
"""
SAY = """---
model: fake:say
output: text
---
user:
Say it in one sentence: {{ input }}
"""
TIMES = ["7pm", "noon", "8:30", "9am"]


def _examples(n: int, seed: int) -> list[Example]:
    out = []
    for i in range(n):
        people, time = str(2 + (i + seed) % 5), TIMES[i % 4]
        out.append(Example(f"table {seed}-{i}: {people} people at {time}",
                           json.dumps({"people": people, "time": time}),
                           meta={"refs": [json.dumps({"people": people, "time": time})]}))
    return out


@pytest.fixture
def ws(workspace):
    ds = save_dataset(workspace, "slots", {"train": _examples(24, 0), "validation": _examples(16, 1),
                                           "test": _examples(16, 2)})
    files = {"extract": EXTRACT.format(model="slots", schema=SCHEMA, extra=""),
             "strict": EXTRACT.format(model="slots", schema=SCHEMA, extra="  constrained: true\n"),
             "short": EXTRACT.format(model="short", schema=SCHEMA, extra=""),
             "say": SAY}
    for name, text in files.items():
        write_atomic(workspace.prompts_dir / f"{name}.prompt", text)
        commit_prompt(workspace, name, "first")
    # the prompt's model answers some inputs well, some with text that is not JSON
    load_model("fake:slots", workspace).rules.update({"7pm": '{"time": "7pm"}', "noon": "sure, at noon!",
                                                      "8:30": '{"time": "8:30", "people": "3"}'})
    load_model("fake:say", workspace).rules.update({"7pm": "A table at seven.", "noon": "Lunch for a group."})
    fake_finetune(workspace, "sl", prompt=f"short@{current_version(workspace, 'short')}",
                  dataset=f"slots@{ds.version}",
                  rules={"7pm": '{"time": "7pm"}', "noon": '{"time": "noon", "people": "9"}', "9am": "oops"})
    create_hybrid(workspace, "hys", "ft:sl", "extract@current", data=f"slots@{ds.version}", progress=False)
    yield workspace
    clear_loaded()


@pytest.mark.parametrize("deployment", ["extract@current", "strict@current", "say@current", "ft:sl", "hybrid:hys"])
def test_the_gateway_answers_generative_outputs_as_measured(ws, deployment):
    rows, served = measured_and_served(ws, deployment, "slots:test")
    assert served == [r.prediction for r in rows]
    assert len({r.prediction for r in rows}) > 1


def test_constrained_answers_always_match_the_schema(ws):
    loose = evaluate(ws, resolve_candidate(ws, "extract@current"), "slots:test", progress=False)
    strict = evaluate(ws, resolve_candidate(ws, "strict@current"), "slots:test", progress=False)
    assert loose.metrics["format_valid"]["value"] < 1.0
    assert strict.metrics["format_valid"]["value"] == 1.0 and strict.metrics["json_schema"]["value"] == 1.0
    assert strict.primary_metric == "field_f1"


def test_a_generative_hybrid_routes_on_token_confidence_and_invalid_answers(ws):
    spec = read_hybrid(ws, "hys")
    assert spec.margin_threshold == 0.0  # no label margin for generated answers
    assert spec.tuning["signal"].startswith("token probability")
    run = evaluate(ws, resolve_candidate(ws, "hybrid:hys"), "slots:validation", progress=False)
    rows = run_rows(ws, run.id)
    meta = [(r.extra or {}).get("meta", {}) for r in rows]
    assert all("confidence" in m for m in meta if m.get("route") == "primary")
    if spec.invalid_to_fallback:  # the fine-tuned model's invalid answers ("oops") went to the fallback
        assert all(m["route"] == "fallback" for r, m in zip(rows, meta) if "9am" in r.input)
    # the tuned setting scores at least as well as either side alone on validation
    assert spec.tuning["validation_score"] >= max(spec.tuning["primary_score"], spec.tuning["fallback_score"]) - 1e-9


def test_text_runs_score_chrf_against_every_reference(ws):
    run = evaluate(ws, resolve_candidate(ws, "say@current"), "slots:test", progress=False)
    assert run.primary_metric == "chrf" and 0 <= run.metrics["chrf"]["value"] <= 1
    rows = run_rows(ws, run.id)
    assert all((r.extra or {}).get("refs") for r in rows)  # stored for re-scoring without the dataset
    assert all("confidence" in (r.extra or {}) for r in rows)


def test_a_constrained_prompt_on_a_model_that_cannot_is_refused(ws):
    from tunelab.errors import UserError
    from tunelab.evaluate import PromptCandidate
    from tunelab.models.base import Completion, Model
    from tunelab.prompts import load_prompt

    class Plain(Model):
        def complete(self, requests):
            return [Completion(text="{}") for _ in requests]

    with pytest.raises(UserError, match="cannot do"):
        PromptCandidate(load_prompt(ws, "strict"), Plain())
