"""The shadow's worker process (`tunelab.server.shadows.ShadowProcess`), on the fake model forced
into it (`shadow_worker="process"`; "auto" sends only local models there, see
tests/test_served_equals_measured_realmodel.py): its answers are the candidate's, it runs at the
lowest priority beside the gateway, its queue is bounded and what it drops or never answers (a
crash, a stop) is logged, and it never outlives the gateway — stopped with it, or gone by itself
when the gateway's process is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.servers import free_port
from tunelab.datasets import Example
from tunelab.evaluate import resolve_candidate
from tunelab.files import write_atomic
from tunelab.lifecycle.calls import shadow_rows, write_shadow_answers
from tunelab.lifecycle.rollouts import set_canary, set_shadow
from tunelab.models import clear_loaded
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server import shadows as shadows_module
from tunelab.server.app import create_app
from tunelab.server.auth import create_key
from tunelab.server.deployments import Deployments
from tunelab.server.rollout import ShadowJob, ShadowQueue

# rule-free fake models: their answers depend on the input only, the same in any process
ROUTE = """---
model: fake:{model}
output: {{type: label, labels: [billing, bug, other]}}
---
user:
{question} {{{{ input }}}}
"""
TEXTS = [f"ticket {i}: my card broke and the app crashed" for i in range(12)]


@pytest.fixture
def ws(workspace):
    for version, (model, question) in enumerate([("one", "Which team?"), ("two", "Which team must act?")]):
        write_atomic(workspace.prompts_dir / "route.prompt", ROUTE.format(model=model, question=question))
        commit_prompt(workspace, "route", f"v{version}")
        tag_prompt(workspace, "route@current", ["production", "next"][version])
    write_atomic(workspace.prompts_dir / "other.prompt", ROUTE.format(model="three", question="Who answers?"))
    commit_prompt(workspace, "other", "first")
    tag_prompt(workspace, "other@current", "v1")
    yield workspace
    clear_loaded()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


def _chat(http, key: str, text: str) -> dict:
    r = http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                  json={"model": "route@production", "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_worker_process_answers_as_the_candidate_measures_at_the_lowest_priority_and_stops_with_the_app(ws):
    _, key = create_key(ws, "svc", "app")
    set_canary(ws, "route@production", "route@next", 0.5)
    set_shadow(ws, "route@production", "other@v1", 1.0)
    app = create_app(ws, rate=0, shadow_worker="process")
    with TestClient(app) as http:
        answers = [_chat(http, key, text) for text in TEXTS]
        pid = app.state.shadows.process.pid
        assert pid is not None and pid != os.getpid()
        assert os.getpriority(os.PRIO_PROCESS, pid) == shadows_module.SHADOW_NICE
        assert app.state.shadows.wait_idle(120)
        assert app.state.shadows.process.started == 1
    assert _wait_gone(pid, 10)  # the app's shutdown stopped it
    rows = shadow_rows(ws, "route@production")
    text_of = {a["id"]: text for a, text in zip(answers, TEXTS)}
    canary_calls = {a["id"] for a in answers if a["tunelab"]["arm"] == "canary"}
    assert 0 < len(canary_calls) < len(TEXTS)
    assert {(r.call_id, r.role) for r in rows} == ({(i, "shadow") for i in text_of} | {(i, "baseline") for i in canary_calls})
    assert {r.status for r in rows} == {"ok"}
    for r in rows:  # what the process answered is what the candidate answers here, as measured
        cand = resolve_candidate(ws, r.candidate, free_text=False)
        assert r.output == cand.predict([Example(text_of[r.call_id], "")], 0)[0].text
    assert {r.output for r in rows if r.role == "shadow"} != {""}
    for a in answers:  # never returned: the caller got its own arm's answer
        assert a["tunelab"]["candidate"] in ("route@production", "route@next")


def test_the_worker_processs_queue_is_bounded_and_a_crash_or_a_stop_is_logged_not_lost(ws, monkeypatch):
    monkeypatch.setattr(shadows_module, "RESTART_AFTER_S", 0.0)
    # the worker process writes its answers to the store itself; this side its drops and crashes
    queue = ShadowQueue(Deployments(ws), lambda answers: write_shadow_answers(ws, answers), capacity=3,
                        worker="process")

    def rows() -> list:
        return shadow_rows(ws, "route@production")

    def job(i: int) -> ShadowJob:
        return ShadowJob(f"c{i}", "route@production", "route@next", "shadow",
                         [{"role": "user", "content": f"my card {i}"}], {}, 0)

    try:
        accepted = [queue.submit(job(i)) for i in range(8)]
        assert accepted.count(True) == 3 and queue.counts["dropped"] == 5
        assert queue.wait_idle(120)
        by = {s: sorted(r.call_id for r in rows() if r.status == s) for s in ("ok", "dropped", "error")}
        assert len(by["ok"]) == 3 and len(by["dropped"]) == 5 and not by["error"]
        assert sorted(by["ok"] + by["dropped"]) == sorted(f"c{i}" for i in range(8))  # nothing lost
        assert queue.counts["answered"] == 3
        # the worker process dies with jobs it took: they are logged as errors, and a new one answers the next
        pid = queue.process.pid
        queue.process.submit(job(100))
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid, 10)
        deadline = time.time() + 30
        while not any(r.call_id == "c100" for r in rows()) and time.time() < deadline:
            time.sleep(0.05)
        (crashed,) = [r for r in rows() if r.call_id == "c100"]
        assert crashed.status == "error" and "exited" in crashed.error
        assert queue.submit(job(101)) and queue.wait_idle(120)
        assert [r.status for r in rows() if r.call_id == "c101"] == ["ok"] and queue.process.started == 2
        # stopped before it answered: logged as dropped, and the process is gone
        pid = queue.process.pid
        queue.process.submit(job(102))
    finally:
        queue.close()
    assert _wait_gone(pid, 10)
    assert [r.status for r in rows() if r.call_id == "c102"] in (["dropped"], ["ok"])
    assert queue.process.submit(job(103)) is not None  # closed: refused


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_tunelab_serve_never_leaves_its_shadow_worker_behind(ws, how):
    _, key = create_key(ws, "svc", "app")
    set_shadow(ws, "route@production", "other@v1", 1.0)
    port = free_port()
    env = {**os.environ, "TUNELAB_WORKSPACE": str(ws.root)}
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--no-worker",
                               "--shadow-worker", "process"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                try:
                    http.get("/v1/models")
                    break
                except httpx.HTTPError:
                    assert server.poll() is None and time.time() < deadline, server.stderr.read().decode()[-2000:]
                    time.sleep(0.2)
            _chat(http, key, "my card broke")
            while not shadow_rows(ws, "route@production") and time.time() < deadline:
                time.sleep(0.2)
        assert [r.status for r in shadow_rows(ws, "route@production")] == ["ok"]
        workers = _children(server.pid)  # the worker process (and multiprocessing's resource tracker)
        assert any("multiprocessing" in Path(f"/proc/{c}/cmdline").read_text() for c in workers), workers
        if how == "terminate":
            server.terminate()  # what Ctrl-C or a service manager does: the gateway shuts down and stops it
        else:
            server.kill()  # the gateway dies at once: the worker notices and exits by itself
        server.wait(30)
        assert all(_wait_gone(c, 15) for c in workers), "a shadow worker outlived the gateway"
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
