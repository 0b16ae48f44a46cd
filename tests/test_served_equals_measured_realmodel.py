"""Served = measured on the real SmolLM2: for every kind of candidate — a prompt version, a prompt
with per-input demos, a fine-tuned model (generative, and with a classification head), a hybrid and
a JSON-output prompt — the gateway's answer to
an input equals the evaluator's stored prediction for it, asked through the official `openai` SDK.

In fp32 (TUNELAB_PRECISION) a batched answer equals the one-at-a-time answer, so the evaluator's wide
batches and the gateway's single requests must agree exactly."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.prompts import SPAM_PROMPT
from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate, run_rows
from tunelab.hybrid import create_hybrid
from tunelab.models import clear_loaded
from tunelab.prompts import commit_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import create_key

openai = pytest.importorskip("openai", reason="the official openai SDK (a dev dependency) is not installed")
pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

KNN = SPAM_PROMPT.replace("---\noutput", "---\ndemos: {dataset: sms, split: train, strategy: knn_tfidf, k: 2}\noutput")
REPLY_PROMPT = """---
max_tokens: 24
output: {type: text}
---
user:
Reply to this SMS in one friendly sentence.

{{ input }}
"""
JSON_PROMPT = """---
max_tokens: 24
output:
  type: json
  schema: {type: object, properties: {spam: {type: boolean}}}
---
user:
Is this SMS spam? Answer with JSON like {"spam": true}.

{{ input }}
"""


def read(folder, split: str, n: int) -> list[Example]:
    rows = [Example.from_dict(json.loads(line)) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    spam = [r for r in rows if r.output == "spam"]
    ham = [r for r in rows if r.output == "ham"]
    return spam[:n // 3] + ham[:n - n // 3]


@pytest.fixture(scope="module")
def ws(tmp_path_factory, shared_data_dir):
    from tunelab.workspace import Workspace

    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELAB_PRECISION", "fp32")
    mp.delenv("TUNELAB_DATABASE_URL", raising=False)
    clear_loaded()
    ws = Workspace.init(tmp_path_factory.mktemp("served") / "ws")
    src = shared_data_dir / "sms_spam"
    save_dataset(ws, "sms", {"train": read(src, "train", 24), "validation": read(src, "validation", 9),
                             "test": read(src, "test", 6)})
    for name, text in (("spam", SPAM_PROMPT), ("knn", KNN), ("extract", JSON_PROMPT), ("reply", REPLY_PROMPT)):
        (ws.prompts_dir / f"{name}.prompt").write_text(text)
        commit_prompt(ws, name, "first")
    from tunelab.finetune import FineTuneConfig, finetune

    finetune(ws, FineTuneConfig(data="sms", prompt="spam", name="spam", max_steps=2, batch_size=4, lr=2e-3,
                                max_val_examples=3, epochs=1, precision="fp32"))
    finetune(ws, FineTuneConfig(data="sms", prompt="spam", name="spamhead", head="classify", max_steps=2,
                                batch_size=4, lr=2e-3, max_val_examples=3, epochs=1, precision="fp32"))
    create_hybrid(ws, "hy", "ft:spam", "knn@current", data="sms", progress=False)
    yield ws
    clear_loaded()
    mp.undo()


@pytest.fixture(scope="module")
def shared_data_dir():
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA} (set TUNELAB_SHARED_DATA)")
    return SHARED_DATA


@pytest.mark.parametrize("deployment", ["spam@current", "knn@current", "ft:spam", "ft:spamhead", "hybrid:hy",
                                        "extract@current"])
def test_the_gateway_answers_as_the_evaluator_measured_on_smollm2(ws, deployment):
    measured = evaluate(ws, resolve_candidate(ws, deployment), "sms:test", progress=False)
    rows = [r for r in run_rows(ws, measured.id) if r.repeat_index == 0]
    _, key = create_key(ws, f"app-{deployment.replace(':', '-').replace('@', '-')}", "viewer")
    with TestClient(create_app(ws)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
        answers = [client.chat.completions.create(model=deployment, messages=[{"role": "user", "content": r.input}],
                                                  logprobs=True, top_logprobs=2).choices[0] for r in rows]
    served = [a.message.content for a in answers]
    assert served == [r.prediction for r in rows]
    for a, r in zip(answers, rows):  # label scores (a head's log-softmax, a prompt's label log-probs) as measured
        if r.extra.get("label_logprobs"):
            top = {t.token: t.logprob for t in a.logprobs.content[0].top_logprobs}
            assert top == pytest.approx(r.extra["label_logprobs"], abs=1e-4)  # fp32 rounding across batch widths
    if deployment.startswith("extract"):  # generated text (SmolLM2 rarely writes JSON unconstrained), not labels
        assert all(len(p) > 10 for p in served), served


def test_free_text_streams_token_by_token_and_is_the_measured_answer_on_smollm2(ws):
    measured = evaluate(ws, resolve_candidate(ws, "reply@current"), "sms:test", limit=3, progress=False)
    rows = [r for r in run_rows(ws, measured.id) if r.repeat_index == 0]
    _, key = create_key(ws, "streaming-app", "app")
    with TestClient(create_app(ws)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
        for r in rows:
            pieces = [c.choices[0].delta.content for c in client.chat.completions.create(
                model="reply@current", stream=True, messages=[{"role": "user", "content": r.input}])
                if c.choices and c.choices[0].delta.content]
            assert "".join(pieces) == r.prediction and len(r.prediction) > 10
            assert len(pieces) > 3  # token by token, not one piece at the end


def test_a_canary_and_a_shadow_answer_in_the_worker_process_as_they_were_measured_on_smollm2(ws):
    """On a local model the shadow's answers (and the primary's on a canary's calls) come from the
    gateway's worker process, with its own copy of the model: still the measured answers."""
    import os

    from tunelab.lifecycle.calls import shadow_rows
    from tunelab.lifecycle.rollouts import set_canary, set_shadow, stop_rollout
    from tunelab.prompts import tag_prompt

    tag_prompt(ws, "spam@current", "live")
    measured = {c: {r.input: r.prediction for r in run_rows(ws, evaluate(ws, resolve_candidate(ws, c), "sms:test",
                                                                         progress=False).id) if r.repeat_index == 0}
                for c in ("spam@live", "ft:spam", "hybrid:hy")}
    set_canary(ws, "spam@live", "ft:spam", 0.5)
    set_shadow(ws, "spam@live", "hybrid:hy", 1.0)
    _, key = create_key(ws, "rollout-app", "app")
    app = create_app(ws)
    app.state.rollouts.refresh_s = 0.0
    try:
        with TestClient(app) as http:
            client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
            served = [(text, client.chat.completions.create(model="spam@live",
                                                            messages=[{"role": "user", "content": text}]))
                      for text in measured["ft:spam"]]
            assert app.state.shadows.wait_idle(600)
            pid = app.state.shadows.process.pid
            assert pid is not None and pid != os.getpid() and app.state.shadows.process.started == 1
        with pytest.raises(ProcessLookupError):  # stopped (and reaped) with the app
            os.kill(pid, 0)
    finally:
        stop_rollout(ws, "spam@live")
    for text, s in served:
        assert s.choices[0].message.content == measured[s.model_extra["tunelab"]["candidate"]][text]
    inputs = {s.id: text for text, s in served}
    rows = shadow_rows(ws, "spam@live")
    assert {r.role for r in rows} == {"shadow", "baseline"} and {r.status for r in rows} == {"ok"}
    assert len([r for r in rows if r.role == "shadow"]) == len(served)
    for r in rows:  # the answers no caller saw, from the worker process: the measured ones
        assert r.output == measured[r.candidate][inputs[r.call_id]]
