"""Served = measured: for every kind of candidate, the gateway answers an input exactly as the
evaluator's stored run answered it — asked through the official `openai` SDK, as a user's
application would.

Kinds: a labelled prompt version; a prompt at temperature > 0 (the seeded draw among the labels); a
prompt with per-input (nearest-neighbour) demos; a fine-tuned model `ft:NAME` (its training prompt on
its model); a hybrid `hybrid:NAME`; a JSON-output prompt; the classical baselines `baseline:METHOD:DATA`
(`baseline:nearest` on labels and on JSON outputs too, `baseline:copy`);
and each arm of a canary and a shadow answering a deployment's calls. This module uses the fake model; the same
checks on the real SmolLM2 are in tests/test_served_equals_measured_realmodel.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.fakes import fake_finetune
from tests.servers import measured_and_served
from tunelab.datasets import Example, get_dataset, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate, run_rows
from tunelab.files import write_atomic
from tunelab.hybrid import create_hybrid
from tunelab.models import clear_loaded, load_model
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import create_key

openai = pytest.importorskip("openai", reason="the official openai SDK (a dev dependency) is not installed")

LABELS = ["billing", "bug"]
ROUTE = """---
model: {model}
temperature: {temperature}
output: {{type: label, labels: [billing, bug]}}
{demos}---
user:
Which team? {{{{ input }}}}
"""
JSON = """---
model: fake:json
output:
  type: json
  schema: {type: object, properties: {team: {type: string}}}
---
user:
Extract the team as JSON: {{ input }}
"""
WORDS = [("card", "billing"), ("crash", "bug"), ("refund", "billing"), ("freeze", "bug")]


def _examples(n: int, seed: int) -> list[Example]:
    return [Example(f"ticket {seed}-{i}: my {w} problem", label) for i, (w, label) in
            ((i, WORDS[i % 4]) for i in range(n))]


@pytest.fixture
def ws(workspace):
    ds = save_dataset(workspace, "tickets", {"train": _examples(24, 0), "validation": _examples(12, 1),
                                             "test": _examples(12, 2)})
    save_dataset(workspace, "slots", {split: [Example(ex.input, '{"team": "%s"}' % ex.output)
                                              for ex in _examples(n, seed)]
                                      for split, n, seed in (("train", 24, 0), ("test", 12, 2))})
    files = {
        "route": ROUTE.format(model="fake:route", temperature=0, demos=""),
        "warm": ROUTE.format(model="fake:warm", temperature=0.9, demos=""),
        "knn": ROUTE.format(model="fake:knn", temperature=0,
                            demos="demos: {dataset: tickets, split: train, strategy: knn_tfidf, k: 2}\n"),
        "short": ROUTE.format(model="fake:base", temperature=0, demos=""),
        "extract": JSON,
    }
    for name, text in files.items():
        write_atomic(workspace.prompts_dir / f"{name}.prompt", text)
        commit_prompt(workspace, name, "first")
    tag_prompt(workspace, "route@current", "production")
    # answers that depend on the input: the route model is right about half the time
    load_model("fake:route", workspace).rules.update({"card": "billing", "crash": "billing", "refund": "bug",
                                                      "freeze": "bug"})
    load_model("fake:json", workspace).rules.update({"card": '{"team": "billing"}', "crash": '{"team": "bug"}'})
    short = get_dataset(workspace, "tickets")
    fake_finetune(workspace, "tk", prompt=f"short@{_version(workspace, 'short')}", dataset=f"tickets@{short.version}",
                  rules={"card": "billing", "crash": "bug", "refund": "bug", "freeze": "billing"})
    create_hybrid(workspace, "hy", "ft:tk", "route@production", data=f"tickets@{ds.version}", progress=False)
    yield workspace
    clear_loaded()


def _version(ws, name: str) -> str:
    from tunelab.prompts import current_version

    return current_version(ws, name)


def _client(ws):
    _, key = create_key(ws, "app", "viewer")
    http = TestClient(create_app(ws))
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0), http


@pytest.mark.parametrize("deployment", ["route@production", "warm@current", "knn@current", "ft:tk", "hybrid:hy",
                                        "extract@current", "baseline:tfidf:tickets", "baseline:majority:tickets",
                                        "baseline:embed:tickets", "baseline:nearest:tickets",
                                        "baseline:nearest:slots", "baseline:copy:tickets"])
def test_the_gateway_answers_as_the_evaluator_measured(ws, deployment):
    data = "slots:test" if deployment.endswith(":slots") else "tickets:test"
    rows, served = measured_and_served(ws, deployment, data)
    assert served == [r.prediction for r in rows]
    assert {r.prediction for r in rows} != {""}  # something was answered
    if deployment == "hybrid:hy":  # both sides answered some requests, in the gateway as in the run
        routes = [(r.extra or {}).get("meta", {}).get("route") for r in rows]
        assert {"primary", "fallback"} <= set(routes)


def test_each_arm_of_a_canary_and_a_shadow_answer_as_their_candidates_were_measured(ws):
    from tunelab.lifecycle.calls import shadow_rows
    from tunelab.lifecycle.rollouts import set_canary, set_shadow

    measured = {c: {r.input: r.prediction for r in run_rows(ws, evaluate(ws, resolve_candidate(ws, c), "tickets:test",
                                                                         progress=False).id)}
                for c in ("route@production", "ft:tk", "hybrid:hy")}
    set_canary(ws, "route@production", "ft:tk", 0.5)
    set_shadow(ws, "route@production", "hybrid:hy", 1.0)
    client, http = _client(ws)
    http.app.state.rollouts.refresh_s = 0.0
    with http:
        served = [(text, client.chat.completions.create(model="route@production",
                                                        messages=[{"role": "user", "content": text}]))
                  for text in measured["ft:tk"]]
        assert http.app.state.shadows.wait_idle()
    arms = {s.model_extra["tunelab"]["arm"] for _, s in served}
    assert arms == {"primary", "canary"}
    for text, s in served:
        assert s.choices[0].message.content == measured[s.model_extra["tunelab"]["candidate"]][text]
    inputs = {s.id: text for text, s in served}
    shadows = shadow_rows(ws, "route@production")
    assert {r.role for r in shadows} == {"shadow", "baseline"}
    for r in shadows:  # the answers the callers never saw are the measured ones too
        assert r.output == measured[r.candidate][inputs[r.call_id]]


def test_a_deployment_keeps_its_measured_settings_and_says_what_it_ignored(ws):
    client, http = _client(ws)
    with http:
        raw = client.chat.completions.with_raw_response.create(
            model="route@production", messages=[{"role": "user", "content": "my card problem"}],
            temperature=1.5, max_tokens=3)
        body = raw.parse()
        extra = raw.http_response.json()["tunelab"]
    assert body.choices[0].message.content == "billing"
    assert extra["ignored"] == ["temperature", "max_tokens"] and extra["kind"] == "prompt"
    # the request's seed is the repeat index: seed 1 answers as the evaluator's second repeat
    measured = evaluate(ws, resolve_candidate(ws, "warm@current"), "tickets:test", repeat=2, progress=False)
    second = {r.input: r.prediction for r in run_rows(ws, measured.id) if r.repeat_index == 1}
    with http:
        for text, answer in list(second.items())[:6]:
            got = client.chat.completions.create(model="warm@current", seed=1,
                                                 messages=[{"role": "user", "content": text}])
            assert got.choices[0].message.content == answer


def test_models_lists_every_kind_of_deployment(ws):
    tfidf = resolve_candidate(ws, "baseline:tfidf:tickets")  # trained: now a deployment
    client, http = _client(ws)
    with http:
        ids = {m.id for m in client.models.list()}
    assert {"route@production", "ft:tk", "hybrid:hy", "route", "knn", tfidf.name} <= ids


@pytest.mark.parametrize("deployment", ["route@production", "warm@current", "knn@current", "ft:tk", "hybrid:hy",
                                        "extract@current"])
def test_a_streamed_answer_is_the_measured_answer(ws, deployment):
    measured = evaluate(ws, resolve_candidate(ws, deployment), "tickets:test", progress=False)
    rows = [r for r in run_rows(ws, measured.id) if r.repeat_index == 0][:6]
    client, http = _client(ws)
    with http:
        for r in rows:
            stream = client.chat.completions.create(model=deployment, stream=True,
                                                    messages=[{"role": "user", "content": r.input}])
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == r.prediction


# -- a classification-head fine-tune (`--head classify`) on a tiny random Llama --------------------

from tests.test_finetune import tiny_base  # noqa: E402,F401 (the fixture: 2 layers of width 32, SmolLM2's tokenizer)


@pytest.fixture
def head_ws(ws, tiny_base, monkeypatch):  # noqa: F811
    """`ft:tkhead`: the short prompt fine-tuned with a head on the tiny model (fp32: a batch of one
    answers as a wide batch does), and a hybrid with it first."""
    from tunelab.finetune import FineTuneConfig, finetune

    monkeypatch.setenv("TUNELAB_PRECISION", "fp32")
    finetune(ws, FineTuneConfig(data="tickets", prompt="short", name="tkhead", base=str(tiny_base), head="classify",
                                precision="fp32", lr=0.01, epochs=2, batch_size=8, max_val_examples=6), progress=False)
    create_hybrid(ws, "hyhead", "ft:tkhead", "route@production", data="tickets", progress=False)
    return ws


@pytest.mark.parametrize("deployment", ["ft:tkhead", "hybrid:hyhead"])
def test_a_head_finetune_answers_and_scores_as_the_evaluator_measured(head_ws, deployment):
    ws = head_ws
    rows, served = measured_and_served(ws, deployment, "tickets:test")
    assert served == [r.prediction for r in rows] and set(served) <= set(LABELS)
    _, key = create_key(ws, "app-logprobs", "viewer")
    http = TestClient(create_app(ws))
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
    with http:
        for r in rows[:6]:
            got = client.chat.completions.create(model=deployment, messages=[{"role": "user", "content": r.input}],
                                                 logprobs=True, top_logprobs=2)
            [token] = got.choices[0].logprobs.content
            measured = r.extra["label_logprobs"]
            assert token.token == r.prediction
            assert {t.token: t.logprob for t in token.top_logprobs} == pytest.approx(measured, abs=1e-6)
            stream = client.chat.completions.create(model=deployment, stream=True,
                                                    messages=[{"role": "user", "content": r.input}])
            assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.prediction
    if deployment == "ft:tkhead":
        assert {r.extra["meta"].get("head") for r in rows} == {True}  # the head answered
