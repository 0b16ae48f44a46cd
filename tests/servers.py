"""Real HTTP servers on loopback for tests (uvicorn in a thread, on a free port)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager


@contextmanager
def serve_app(app):
    """Run an ASGI app on 127.0.0.1 (a free port) for the duration of the block; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gateway_client(ws):
    """An official `openai` client on the workspace's gateway (in process), and its HTTP client."""
    import openai
    from fastapi.testclient import TestClient

    from tunelab.server.app import create_app
    from tunelab.server.auth import create_key

    _, key = create_key(ws, "app", "viewer")
    http = TestClient(create_app(ws))
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0), http


def measured_and_served(ws, deployment: str, data: str):
    """The evaluator's stored rows of `deployment` on `data` (first repeat), and the gateway's answers
    to the same inputs, asked through the official `openai` SDK."""
    from tunelab.evaluate import evaluate, resolve_candidate, run_rows

    measured = evaluate(ws, resolve_candidate(ws, deployment), data, progress=False)
    rows = [r for r in run_rows(ws, measured.id) if r.repeat_index == 0]
    client, http = gateway_client(ws)
    with http:
        served = [client.chat.completions.create(model=deployment, messages=[{"role": "user", "content": r.input}])
                  for r in rows]
    return rows, [s.choices[0].message.content for s in served]
