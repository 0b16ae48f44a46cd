"""Any number of labels: the flow takes 2 to several hundred, a long label list stays out of its
prompts (the label trie constrains the answer), and labels sharing a prefix score as if alone."""

from __future__ import annotations

import json

import pytest

from tunelab.datasets import Example
from tunelab.flow import PROMPT_LABELS, flow_for, infer_output
from tunelab.prompts import parse_prompt

# clinc150's intents that share a prefix with another intent
NESTED = ["cancel", "cancel_reservation", "calendar", "calendar_update", "credit_limit", "credit_limit_change",
          "gas", "gas_type", "pto_request", "pto_request_status", "reminder", "reminder_update", "todo_list",
          "todo_list_update", "insurance", "insurance_change"]


def _write(folder, labels, per_label=3):
    folder.mkdir()
    lines = [json.dumps({"input": f"request {i} about {label.replace('_', ' ')}", "output": label})
             for label in labels for i in range(per_label)]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_many_labels_are_labels_and_their_list_stays_out_of_the_prompt(tmp_path):
    many = NESTED + [f"intent_{i:03d}" for i in range(150)]
    flow = flow_for(_write(tmp_path / "intents", many))
    assert flow.output_type == "label"
    base = parse_prompt(flow.base_prompt_text, "b")
    assert base.output.labels == sorted(many)
    body = base.request(Example("request 1 about gas", ""), []).messages[-1]["content"]
    assert "intent_007" not in body and "Answer with the label only." in body
    assert len(many) > PROMPT_LABELS
    # many labels: a smaller optimization budget and validation sample, the fine-tune validates on it too
    assert flow.optimize_budget == 4 and flow.limit_validation == 100
    assert flow.finetune_settings["max_val_examples"] == 100

    few = flow_for(_write(tmp_path / "few", NESTED[:6]))
    text = parse_prompt(few.base_prompt_text, "f").request(Example("x", ""), []).messages[-1]["content"]
    assert "calendar, calendar_update, cancel, cancel_reservation" in text  # a short list is listed
    assert few.optimize_budget == 8 and few.limit_validation == 150 and "max_val_examples" not in few.finetune_settings


def test_output_inference_counts_repeated_outputs_as_labels():
    assert infer_output([f"intent_{i % 151}" for i in range(151 * 13)]) == "label"  # clinc150's shape
    assert infer_output([f"intent_{i}" for i in range(300)]) == "text"  # every output once: not labels
    assert infer_output([f"intent_{i % 400}" for i in range(1200)]) == "label"


@pytest.mark.realmodel
def test_labels_sharing_a_prefix_score_as_if_each_were_alone(bundled_model_dir, shared_data):
    """The flow's zero-shot prompt on clinc150's 151 intents (no list in the prompt), fp32: the answer
    is the argmax of the textbook full-sequence log-probabilities of the nested labels, and every label
    scored to its end has exactly that score."""
    from tests.test_local_model import naive_label_logprob
    from tunelab.models.local import LocalModel

    flow = flow_for(shared_data / "clinc150")
    prompt = parse_prompt(flow.base_prompt_text, "clinc150-zero-shot")
    assert len(prompt.output.labels) == 151 and set(NESTED) <= set(prompt.output.labels)
    model = LocalModel(precision="fp32")
    try:
        ex = Example("please cancel my dinner reservation at the italian place", "cancel_reservation")
        req = prompt.request(ex, [])
        (res,) = model.complete([req])
        raw = res.meta["label_logprobs_raw"]
        assert set(raw) == set(prompt.output.labels)
        checked = NESTED + [res.text]
        naive = {label: naive_label_logprob(model, req.messages, label) for label in checked}
        # the answer is scored exactly and is the argmax of the exact scores, nested labels included
        assert raw[res.text] == pytest.approx(naive[res.text], abs=2e-3)
        assert all(naive[res.text] >= naive[label] - 2e-3 for label in checked)
        # every label the trie search scored to its end has its exact score (the rest are bounds:
        # tunelab.models.local.labels), so a label that is a prefix of another is not confused with it
        exact = [label for label in checked if raw[label] == pytest.approx(naive[label], abs=2e-3)]
        assert len(exact) >= len(checked) - res.meta.get("labels_cut", 0)
        assert naive["cancel"] != pytest.approx(naive["cancel_reservation"], abs=1e-3)
    finally:
        model.close()
