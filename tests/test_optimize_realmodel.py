"""The optimizer on the bundled SmolLM2 and a small slice of a real data set."""

from __future__ import annotations

import json

import pytest

from tunelab.datasets import Example, save_dataset
from tunelab.optimize import optimize
from tunelab.prompts import load_prompt

SEED = """---
output: {type: label, labels: [ham, spam]}
---
system:
Classify the SMS message as spam or ham.
user:
{{ input }}
"""


def read(path, n):
    with open(path, encoding="utf-8") as f:
        return [Example.from_dict(json.loads(line)) for line, _ in zip(f, range(n))]


@pytest.mark.realmodel
def test_optimize_sms_spam_on_smollm2(workspace, shared_data, bundled_model_dir):
    folder = shared_data / "sms_spam"
    save_dataset(workspace, "sms", {"train": read(folder / "train.jsonl", 40),
                                    "validation": read(folder / "validation.jsonl", 30)})
    (workspace.prompts_dir / "sms.prompt").write_text(SEED, encoding="utf-8")
    result = optimize(workspace, "sms", "sms", budget=4, demo_strategies=("stratified", "knn_tfidf"),
                      test=False, progress=False)
    seed, winner = result.seed, result.winner
    assert seed["status"] == "ok" and seed["n"] == 30 and 2 <= len(result.candidates) <= 4
    assert result.tokens > 0 and result.wall_s > 0
    if result.improved:
        # a better score, or the same score within the interval at fewer prompt tokens
        assert winner["score"] > seed["score"] or winner["prompt_tokens"] < seed["prompt_tokens"]
        assert winner["score"] >= seed["lo"]
        assert load_prompt(workspace, "sms@current").version == result.version
    else:
        assert result.message.startswith("Nothing beat the seed prompt") and result.version is None
    print(result.message)
