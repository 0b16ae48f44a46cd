"""JSON and text on the bundled SmolLM2, end to end on small slices of the shared data sets:
constrained decoding gives schema-valid answers where free decoding does not, every generated
token's log-probability comes back, and a LoRA fine-tune on JSON raises field F1."""

from __future__ import annotations

import json

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import PromptCandidate, evaluate, resolve_candidate
from tunelab.flow import infer_schema

pytestmark = pytest.mark.realmodel

EXTRACT = """---
model: smollm2-135m
max_tokens: 48
output:
  type: json
  schema: {schema}
{extra}---
user:
Extract the booking slots of this message as a JSON object.

Message: {{{{ input }}}}
"""


def read(folder, split: str, n: int, with_slots: bool = False) -> list[Example]:
    rows = [Example.from_dict(json.loads(line)) for line in (folder / f"{split}.jsonl").open(encoding="utf-8")]
    if with_slots:
        rows = [r for r in rows if r.output != "{}"]
    return rows[:n]


@pytest.fixture
def ws(workspace, shared_data):
    src = shared_data / "restaurant8k_slots"
    train = read(src, "train", 64, with_slots=True)
    splits = {"train": train, "validation": read(src, "validation", 12, with_slots=True),
              "test": read(src, "test", 16, with_slots=True)}
    save_dataset(workspace, "slots", splits)
    schema = json.dumps(infer_schema([ex.output for ex in train]))
    for name, extra in (("free", ""), ("strict", "  constrained: true\n")):
        (workspace.prompts_dir / f"{name}.prompt").write_text(EXTRACT.format(schema=schema, extra=extra))
    (workspace.prompts_dir / "short.prompt").write_text(
        "---\nmodel: smollm2-135m\nmax_tokens: 48\noutput:\n  type: json\n  schema: " + schema
        + "\n---\nuser:\nSlots as JSON.\n\nMessage: {{ input }}\n")
    return workspace


def test_constrained_decoding_gives_schema_valid_json(ws):
    free = evaluate(ws, resolve_candidate(ws, "free"), "slots:test", progress=False)
    strict = evaluate(ws, resolve_candidate(ws, "strict"), "slots:test", progress=False)
    assert strict.metrics["json_schema"]["value"] == 1.0 and strict.metrics["format_valid"]["value"] == 1.0
    assert free.metrics["json_schema"]["value"] < 1.0  # SmolLM2 alone writes prose or other JSON
    assert strict.metrics["field_f1"]["value"] >= free.metrics["field_f1"]["value"]


def test_generated_tokens_carry_their_log_probabilities(ws):
    cand = resolve_candidate(ws, "strict")
    assert isinstance(cand, PromptCandidate) and cand.model.constrains_json
    (comp,) = cand.predict([Example("book a table for 4 people at 7pm tomorrow", "{}")])
    assert comp.meta["constrained"] == "json_schema"
    assert len(comp.token_logprobs) == comp.completion_tokens and all(lp <= 0 for lp in comp.token_logprobs)
    assert 0 < comp.confidence["min"] <= comp.confidence["mean"] <= 1


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a few minutes on an idle 2-core machine; much more on a busy one
def test_a_lora_fine_tune_on_json_raises_field_f1(ws):
    from tunelab.finetune import FineTuneConfig, finetune

    base = evaluate(ws, resolve_candidate(ws, "short"), "slots:test", limit=12, progress=False)
    result = finetune(ws, FineTuneConfig(data="slots", prompt="short", name="slots-ft", lr=2e-3, batch_size=8,
                                         epochs=2, max_examples=40, max_val_examples=6, lora_r=16,
                                         lora_alpha=32.0, patience=None), progress=False)
    evals = result.curves["eval_curve"]
    assert evals and all(e["metric_name"] == "field_f1" for e in evals)  # the best checkpoint by field F1
    tuned = evaluate(ws, resolve_candidate(ws, "ft:slots-ft"), "slots:test", limit=12, progress=False)
    assert tuned.metrics["field_f1"]["value"] > base.metrics["field_f1"]["value"] + 0.1, (base.metrics, tuned.metrics)
    assert tuned.metrics["json_valid"]["value"] > base.metrics["json_valid"]["value"]
