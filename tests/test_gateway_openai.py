"""The gateway's OpenAI semantics, asked through the official `openai` SDK (a dev dependency, the
real client, not a mock): n, max_completion_tokens, response_format (json_object, json_schema with
constrained decoding, 400 where it cannot be honoured), logprobs/top_logprobs, stop, seed, tools
refused, content parts, the error shape, GET /v1/models/{id}, auth before the body, streaming as
generated, and the deployment's own choice of which client settings may override its prompt."""

from __future__ import annotations

import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from tests.servers import serve_app
from tunelab.datasets import Example, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate, run_rows
from tunelab.files import write_atomic
from tunelab.models import clear_loaded, load_model
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import create_key
from tunelab.workspace import ModelConfig

openai = pytest.importorskip("openai", reason="the official openai SDK (a dev dependency) is not installed")

ROUTE = """---
model: fake:route
temperature: {temperature}
output: {{type: label, labels: [billing, bug, other]}}
---
user:
Which team? {{{{ input }}}}
"""
REPLY = """---
model: fake:reply
max_tokens: 64
output: {type: text}
---
system:
Answer the customer.
user:
{{ input }}
"""
EXTRACT = """---
model: fake:extract
output:
  type: json
  schema: {type: object, properties: {team: {type: string}}, required: [team], additionalProperties: false}
---
user:
Extract the team as JSON: {{ input }}
"""


class Team(BaseModel):
    team: str


@pytest.fixture
def ws(workspace):
    files = {"route": ROUTE.format(temperature=0), "warm": ROUTE.format(temperature=1.0), "reply": REPLY,
             "extract": EXTRACT}
    for name, text in files.items():
        write_atomic(workspace.prompts_dir / f"{name}.prompt", text)
        commit_prompt(workspace, name, "first")
        tag_prompt(workspace, f"{name}@current", "production")
    tag_prompt(workspace, "reply@current", "flexible", overrides=["temperature", "max_tokens", "stop"],
               note="clients may shorten answers")
    load_model("fake:route", workspace).rules.update({"card": "billing", "crash": "bug"})
    load_model("fake:extract", workspace).rules.update({"card": '{"team": "billing"}'})
    workspace.config.models["strict"] = ModelConfig(backend="fake")  # a raw model whose backend constrains JSON
    load_model("strict", workspace).constrains_json = True
    workspace.config.models["loose"] = ModelConfig(backend="fake")  # a raw model whose backend cannot constrain
    load_model("loose", workspace).constrains_json = False
    examples = [Example(f"my card problem {i}", "billing") for i in range(3)] + [Example("app crash", "bug")]
    save_dataset(workspace, "tickets", {"train": examples, "validation": examples, "test": examples})
    yield workspace
    clear_loaded()


@pytest.fixture
def client(ws):
    _, key = create_key(ws, "checkout", "app")
    with TestClient(create_app(ws)) as http:
        yield openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def ask(client, model, content="my card problem", **kw):
    return client.chat.completions.with_raw_response.create(model=model, messages=[{"role": "user", "content": content}],
                                                            **kw)


def test_n_choices_are_the_evaluators_repeats(ws, client):
    measured = evaluate(ws, resolve_candidate(ws, "warm@production"), "tickets:test", repeat=3, progress=False)
    rows = run_rows(ws, measured.id)
    for example in {r.example_index for r in rows}:
        repeats = [r for r in rows if r.example_index == example]
        got = client.chat.completions.create(model="warm@production", n=3,
                                             messages=[{"role": "user", "content": repeats[0].input}])
        assert [c.index for c in got.choices] == [0, 1, 2]
        assert [c.message.content for c in got.choices] == [r.prediction for r in repeats]
    texts = client.chat.completions.create(model="fake", n=2, messages=[{"role": "user", "content": "hi there"}])
    assert len(texts.choices) == 2 and texts.usage.completion_tokens == 4


def test_max_completion_tokens_temperature_and_stop_apply_only_where_the_deployment_allows(client):
    long = "one two three four five six seven eight"
    raw = ask(client, "fake", long, max_completion_tokens=3)
    body = raw.parse()
    assert body.choices[0].message.content == "one two three" and body.choices[0].finish_reason == "length"
    assert raw.http_response.json()["tunelab"]["applied"] == ["max_completion_tokens"]
    # the production label allows nothing: the prompt's own settings answer, and the response says so
    raw = ask(client, "reply@production", long, max_completion_tokens=3, temperature=0.7, stop=["five"])
    assert raw.parse().choices[0].message.content == long
    assert raw.http_response.json()["tunelab"]["ignored"] == ["temperature", "max_completion_tokens", "stop"]
    # the flexible label lets clients set them
    raw = ask(client, "reply@flexible", long, max_completion_tokens=30, stop=["five"])
    info = raw.http_response.json()["tunelab"]
    assert raw.parse().choices[0].message.content == "one two three four"
    assert info["applied"] == ["max_completion_tokens", "stop"] and info["ignored"] == []
    raw = ask(client, "reply@flexible", long, max_tokens=4)
    assert raw.parse().choices[0].message.content == "one two three four"
    assert raw.parse().choices[0].finish_reason == "length"


def test_response_format_json_object_and_json_schema(client):
    # a JSON candidate: the candidate decides, with its own schema
    got = client.chat.completions.create(model="extract@production", response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "my card problem"}])
    assert got.choices[0].message.content == '{"team": "billing"}'
    parsed = client.chat.completions.parse(model="extract@production", response_format=Team,
                                           messages=[{"role": "user", "content": "my card problem"}])
    assert parsed.choices[0].message.parsed == Team(team="billing")
    # a raw model whose backend constrains JSON: constrained decoding to the requested schema
    parsed = client.chat.completions.parse(model="strict", response_format=Team,
                                           messages=[{"role": "user", "content": "anything at all"}])
    assert isinstance(parsed.choices[0].message.parsed, Team)
    got = client.chat.completions.create(model="strict", response_format={"type": "json_object"},
                                         messages=[{"role": "user", "content": "anything"}])
    assert got.choices[0].message.content.startswith("{")
    # and 400 wherever it cannot be honoured
    for model, fmt, words in [("route@production", {"type": "json_object"}, "answers label"),
                              ("loose", {"type": "json_object"}, "cannot constrain"),
                              ("extract@production", {"type": "json_schema", "json_schema": {
                                  "name": "Other", "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
                               "not the requested schema 'Other'")]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, response_format=fmt,
                                           messages=[{"role": "user", "content": "x"}])
        assert words in err.value.message and err.value.code == "unsupported_response_format"


def test_logprobs_are_the_label_scores(client):
    got = client.chat.completions.create(model="route@production", logprobs=True, top_logprobs=2,
                                         messages=[{"role": "user", "content": "my card problem"}])
    choice = got.choices[0]
    [token] = choice.logprobs.content
    assert token.token == "billing" == choice.message.content
    assert [t.token for t in token.top_logprobs] == ["billing", "bug"]  # the best two labels, best first
    assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob < 0
    raw = ask(client, "reply@production", logprobs=True)
    assert raw.parse().choices[0].logprobs is None and "logprobs" in raw.http_response.json()["tunelab"]["ignored"]
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        ask(client, "route@production", top_logprobs=2)


def test_seed_is_the_repeat_index(client):
    answers = {s: client.chat.completions.create(model="warm@production", seed=s, messages=[
        {"role": "user", "content": "ticket 17"}]).choices[0].message.content for s in range(6)}
    again = {s: client.chat.completions.create(model="warm@production", seed=s, messages=[
        {"role": "user", "content": "ticket 17"}]).choices[0].message.content for s in range(6)}
    assert answers == again and len(set(answers.values())) > 1


def test_tools_tool_turns_and_images_are_refused_never_ignored(client):
    tool = {"type": "function", "function": {"name": "refund", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError, match="not supported by this deployment") as err:
        client.chat.completions.create(model="reply@production", tools=[tool], tool_choice="required",
                                       messages=[{"role": "user", "content": "refund me"}])
    assert err.value.code == "unsupported_parameter" and err.value.param == "tools"
    with pytest.raises(openai.BadRequestError, match="tool calls and tool results"):
        client.chat.completions.create(model="fake", messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                  "function": {"name": "refund", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


def test_content_parts_developer_role_and_null_assistant_content(client):
    got = client.chat.completions.create(model="route@production", messages=[
        {"role": "developer", "content": "be terse"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "text", "text": "my card"}, {"type": "text", "text": "problem"}]}])
    assert got.choices[0].message.content == "billing"
    got = client.chat.completions.create(model="fake", messages=[
        {"role": "user", "content": [{"type": "text", "text": "alpha"}, {"type": "text", "text": "beta"}]}])
    assert got.choices[0].message.content == "alpha beta"


def test_every_error_has_the_openai_shape(ws, client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fake", messages=[{"role": "wizard", "content": "hi"}])
    assert "not a valid role" in err.value.message and err.value.param == "messages.0.role"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}], n=99)
    assert err.value.param == "n" and err.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, "no-such-deployment")
    assert err.value.code == "model_not_found"
    _, key = create_key(ws, "admin", "admin")
    with TestClient(create_app(ws)) as http:
        for method, path, body in [("post", "/v1/chat/completions", b"{not json"), ("get", "/v1/nope", None),
                                   ("put", "/v1/models", None), ("post", "/v1/chat/completions", b"[]")]:
            r = http.request(method, path, content=body, headers={"Authorization": f"Bearer {key}"})
            error = r.json()["error"]
            assert r.status_code in (400, 404, 405) and set(error) == {"message", "type", "param", "code"}, r.text


def test_models_list_and_retrieve(client):
    ids = {m.id for m in client.models.list()}
    assert {"route@production", "reply@flexible", "extract"} <= ids
    assert client.models.retrieve("route@production").id == "route@production"
    assert client.models.retrieve("route").id == "route"  # the working file is a deployment too
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-thing@production")


def test_authentication_comes_before_the_body(ws):
    with TestClient(create_app(ws)) as http:
        for body in (b"{broken", b'{"model": 3}', b'{"model": "fake", "messages": [{"role": "wizard"}]}'):
            r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 401 and r.json()["error"]["code"] in (None, "invalid_api_key")


def test_streaming_sends_text_as_it_is_generated_and_the_same_answer(ws):
    """The fake model holds the rest of its answer after the first word until the test has read
    that word from the stream: the first chunk arrives before the answer is finished."""
    measured = evaluate(ws, resolve_candidate(ws, "reply@production"), "tickets:test", progress=False)
    rows = [r for r in run_rows(ws, measured.id) if r.repeat_index == 0]
    model = load_model("fake:reply", ws)
    _, key = create_key(ws, "streamer", "app")
    with serve_app(create_app(ws)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        for row in rows:
            gate = threading.Event()
            model.stream_gate = gate
            pieces, first_before_rest = [], None
            stream = client.chat.completions.create(model="reply@production", stream=True,
                                                    stream_options={"include_usage": True},
                                                    messages=[{"role": "user", "content": row.input}])
            usage = None
            for chunk in stream:
                if chunk.usage:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        pieces.append(choice.delta.content)
                        if first_before_rest is None:
                            first_before_rest = not gate.is_set()
                            gate.set()
            assert first_before_rest is True
            assert len(pieces) == len(row.prediction.split()) >= 2  # word by word, as generated
            assert "".join(pieces) == row.prediction  # served = measured, streamed
            assert usage is not None and usage.completion_tokens > 0
        model.stream_gate = None
        r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                       json={"model": "route@production", "stream": True, "logprobs": True,
                             "messages": [{"role": "user", "content": "my card problem"}]})
        assert r.headers["cache-control"] == "no-cache" and r.headers["content-type"].startswith("text/event-stream")
        assert '"content": "billing"' in r.text and r.text.rstrip().endswith("data: [DONE]")


def test_the_deploy_note_and_overrides_are_kept_with_the_label(ws, cli):
    from tunelab.prompts import deploy_log

    [flexible, *_] = [d for d in deploy_log(ws, "reply") if d.label == "flexible"]
    assert flexible.note == "clients may shorten answers" and flexible.overrides == ["temperature", "max_tokens", "stop"]
    res = cli("prompt", "tag", "reply@current", "flexible", "--note", "moved again")
    assert res.exit_code == 0, res.output
    assert deploy_log(ws, "reply")[0].overrides == ["temperature", "max_tokens", "stop"]  # the label keeps its setting
    assert cli("prompt", "tag", "reply@current", "flexible", "--no-overrides").exit_code == 0
    assert deploy_log(ws, "reply")[0].overrides == []
    res = cli("prompt", "tag", "reply@current", "x", "--allow-override", "top_k")
    assert res.exit_code == 2 and "top_k" in res.output
