"""The openai backend against real OpenAI-compatible servers on loopback (never a mock of HTTP)."""


import asyncio
import time

import pytest

from tests.servers import free_port, serve_app
from tunelab.models.base import Request
from tunelab.models.openai import BackendError, OpenAIModel
from tunelab.server.app import create_app


def test_completes_a_batch_through_tunelabs_own_gateway(workspace):
    with serve_app(create_app(workspace, auth=False)) as url:
        model = OpenAIModel(name="gw", model="fake", base_url=f"{url}/v1", concurrency=4)
        reqs = [Request(messages=[{"role": "user", "content": f"hello number {i}"}], max_tokens=8) for i in range(6)]
        out = model.complete(reqs)
    assert [c.text for c in out] == [f"hello number {i}" for i in range(6)]
    # usage comes from the server's response (the fake model counts words + 3 per message)
    assert all(c.prompt_tokens == 3 + 3 for c in out)
    assert all(c.completion_tokens == 3 for c in out)
    assert all(c.latency_s > 0 for c in out)


def test_label_requests_match_the_generated_answer(workspace):
    with serve_app(create_app(workspace, auth=False)) as url:
        model = OpenAIModel(name="gw", model="fake", base_url=f"{url}/v1")
        out = model.complete([
            Request(messages=[{"role": "user", "content": "spam"}], labels=["ham", "spam"]),
            Request(messages=[{"role": "user", "content": "no idea at all"}], labels=["ham", "spam"]),
        ])
    assert out[0].text == "spam" and out[0].meta["valid_label"] is True
    assert out[1].meta["valid_label"] is False and out[1].free_text == out[1].text


def _flaky_app(fail_times: int, status: int = 429):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    app.state.calls = 0

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        app.state.calls += 1
        if app.state.calls <= fail_times:
            return JSONResponse({"error": {"message": "slow down"}}, status_code=status,
                                headers={"Retry-After": "0"})
        return {"choices": [{"message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 1}}

    return app


@pytest.mark.parametrize("status", [429, 503])
def test_retries_429_and_5xx_then_succeeds(status):
    app = _flaky_app(2, status)
    with serve_app(app) as url:
        model = OpenAIModel(name="x", model="m", base_url=f"{url}/v1", backoff_s=0.01)
        out = model.complete([Request(messages=[{"role": "user", "content": "hi"}])])
    assert out[0].text == "ok" and out[0].prompt_tokens == 11
    assert app.state.calls == 3


def test_gives_up_with_a_clear_error_when_retries_run_out():
    app = _flaky_app(100)
    with serve_app(app) as url:
        model = OpenAIModel(name="x", model="m", base_url=f"{url}/v1", backoff_s=0.01, max_retries=2)
        with pytest.raises(BackendError, match="failed after 3 attempts .*HTTP 429"):
            model.complete([Request(messages=[{"role": "user", "content": "hi"}])])
    assert app.state.calls == 3


def test_dead_server_is_a_clear_error_after_the_timeout():
    port = free_port()  # nothing listens there
    model = OpenAIModel(name="x", model="m", base_url=f"http://127.0.0.1:{port}/v1", backoff_s=0.01,
                        max_retries=1, timeout_s=1)
    start = time.perf_counter()
    with pytest.raises(BackendError, match="is the server running"):
        model.complete([Request(messages=[{"role": "user", "content": "hi"}])])
    assert time.perf_counter() - start < 10


def test_client_errors_are_not_retried_and_name_the_server_message():
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls = []

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        calls.append(1)
        return JSONResponse({"error": {"message": "model 'nope' does not exist"}}, status_code=404)

    with serve_app(app) as url:
        model = OpenAIModel(name="x", model="nope", base_url=f"{url}/v1")
        with pytest.raises(BackendError, match="does not exist"):
            model.complete([Request(messages=[{"role": "user", "content": "hi"}])])
    assert len(calls) == 1


@pytest.mark.parametrize("concurrency", [1, 4])
def test_never_more_requests_in_flight_than_the_concurrency_limit(concurrency):
    from fastapi import FastAPI

    app = FastAPI()
    state = {"now": 0, "peak": 0}

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.05)
        state["now"] -= 1
        return {"choices": [{"message": {"content": body["messages"][0]["content"]}}]}

    with serve_app(app) as url:
        model = OpenAIModel(name="x", model="m", base_url=f"{url}/v1", concurrency=concurrency)
        out = model.complete([Request(messages=[{"role": "user", "content": str(i)}]) for i in range(12)])
    assert [c.text for c in out] == [str(i) for i in range(12)]  # order kept
    assert state["peak"] == concurrency


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    from fastapi import FastAPI, Request as HttpRequest

    app = FastAPI()
    seen = []

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest):
        seen.append(request.headers.get("authorization"))
        return {"choices": [{"message": {"content": "ok"}}]}

    monkeypatch.setenv("MY_KEY", "sk-test-123")
    with serve_app(app) as url:
        OpenAIModel(name="x", model="m", base_url=f"{url}/v1", api_key_env="MY_KEY").complete(
            [Request(messages=[{"role": "user", "content": "hi"}])])
    assert seen == ["Bearer sk-test-123"]
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(Exception, match="MY_KEY"):
        OpenAIModel(name="x", model="m", base_url="http://127.0.0.1:9/v1", api_key_env="MY_KEY").complete(
            [Request(messages=[{"role": "user", "content": "hi"}])])


def test_gateway_streams_server_sent_events(workspace):
    import httpx

    with serve_app(create_app(workspace, auth=False)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions",
                          json={"model": "fake", "stream": True,
                                "messages": [{"role": "user", "content": "stream me"}]}) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        body = httpx.get(f"{url}/v1/models").json()
    assert any(m["id"] == "smollm2-135m" for m in body["data"])
    import json

    text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "") for ln in lines[:-1])
    assert text == "stream me"


def test_gateway_unknown_deployment_is_404_in_openai_shape(workspace):
    import httpx

    with serve_app(create_app(workspace, auth=False)) as url:
        resp = httpx.post(f"{url}/v1/chat/completions",
                          json={"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})
    assert resp.status_code == 404
    assert "unknown model" in resp.json()["error"]["message"]
