"""The team server: call logs, logs -> dataset, keys CLI, background jobs, and every page renders."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tunelab.datasets import Example, get_dataset, save_dataset
from tunelab.files import write_atomic
from tunelab.prompts import commit_prompt, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import authenticate, create_key
from tunelab.server.jobs import Worker, claim_job, enqueue_job, get_job, requeue_stale
from tunelab.lifecycle.calls import list_calls

PROMPT = """---
model: fake
output: {type: label, labels: [spam, ham]}
---
user:
{{ input }}
"""


@pytest.fixture
def ws(workspace):
    write_atomic(workspace.prompts_dir / "sms.prompt", PROMPT)
    commit_prompt(workspace, "sms", "first")
    tag_prompt(workspace, "sms@current", "production")
    examples = [Example(input=w, output=w) for w in ("spam", "ham", "spam", "ham", "hello")]
    save_dataset(workspace, "sms", {"train": examples, "validation": examples, "test": examples})
    return workspace


def _client(ws, **kw):
    _, key = create_key(ws, "svc", "admin")
    return TestClient(create_app(ws, **kw)), {"Authorization": f"Bearer {key}"}


def test_every_gateway_call_is_logged_with_version_tokens_and_cost(ws):
    ws.config.pricing["fake"] = type(ws.config.pricing["local"])(input_per_million=1000.0, output_per_million=2000.0)
    client, h = _client(ws)
    r = client.post("/v1/chat/completions", headers=h, json={
        "model": "sms@production", "messages": [{"role": "user", "content": "ignored"}],
        "tunelab_variables": {"input": "spam"}})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "spam"
    r = client.post("/v1/chat/completions", headers=h, json={
        "model": "sms@production", "stream": True, "messages": [{"role": "user", "content": "ham"}]})
    assert r.status_code == 200 and "data: [DONE]" in r.text
    (stream_call, call) = list_calls(ws)
    assert call.key_name == "svc" and call.deployment == "sms@production" and call.kind == "prompt"
    from tunelab.prompts import prompt_labels

    assert call.prompt_version == prompt_labels(ws, "sms")["production"]
    assert call.variables == {"input": "spam"} and call.output == "spam" and call.status == "ok"
    assert call.prompt_tokens > 0 and call.completion_tokens > 0 and call.latency_s > 0
    expected = call.prompt_tokens * 1000 / 1e6 + call.completion_tokens * 2000 / 1e6
    assert call.cost == pytest.approx(expected)
    assert stream_call.output == "ham" and stream_call.meta["stream"] is True


def test_failed_calls_are_logged_as_errors(ws):
    client, h = _client(ws)
    bad = PROMPT.replace("{{ input }}", "{{ input }} {{ missing_variable }}")
    write_atomic(ws.prompts_dir / "broken.prompt", bad)
    r = client.post("/v1/chat/completions", headers=h, json={
        "model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    (call,) = list_calls(ws)
    assert call.status == "error" and "missing_variable" in call.error


def test_logs_become_a_dataset_from_the_cli_and_the_api(ws, cli):
    client, h = _client(ws)
    for text in ("spam", "ham", "hello there"):
        assert client.post("/v1/chat/completions", headers=h, json={
            "model": "sms@production", "messages": [{"role": "user", "content": text}]}).status_code == 200
    client.post("/v1/chat/completions", headers=h, json={"model": "fake", "messages": [{"role": "user", "content": "raw"}]})
    res = cli("logs", "export", "--to-dataset", "from-logs", "--deployment", "sms@production")
    assert res.exit_code == 0, res.output
    ds = get_dataset(ws, "from-logs")
    assert [e.input for e in ds.split("train")] == ["spam", "ham", "hello there"]
    assert all(e.meta["deployment"] == "sms@production" for e in ds.split("train"))
    r = client.post("/api/logs/export", headers=h, json={"name": "all-logs"})
    assert r.status_code == 200 and r.json()["examples"] == 4
    assert cli("logs", "export", "--to-dataset", "x", "--deployment", "nope").exit_code == 2


def test_keys_cli_create_list_revoke(ws, cli):
    res = cli("keys", "create", "--name", "bob", "--role", "editor")
    assert res.exit_code == 0
    secret = res.stdout.strip().splitlines()[-1]
    assert secret.startswith("tl-") and authenticate(ws, secret).role == "editor"
    listing = cli("keys", "list", "--json")
    assert json.loads(listing.stdout)[0]["name"] == "bob" and secret[3:] not in listing.stdout
    assert cli("keys", "create", "--name", "bob").exit_code == 2  # names are unique
    assert cli("keys", "create", "--name", "eve", "--role", "root").exit_code == 2
    assert cli("keys", "revoke", "bob").exit_code == 0
    assert authenticate(ws, secret) is None
    assert cli("keys", "revoke", "nobody").exit_code == 2


def test_an_eval_job_runs_in_the_worker_with_progress(ws):
    client, h = _client(ws)
    r = client.post("/api/jobs", headers=h, json={"kind": "eval", "args": {"candidate": "sms@production",
                                                                          "data": "sms:test", "limit": 4}})
    assert r.status_code == 200 and r.json()["status"] == "queued"
    job_id = r.json()["id"]
    assert client.post("/api/jobs", headers=h, json={"kind": "eval", "args": {"candidat": "x"}}).status_code == 400
    assert client.post("/api/jobs", headers=h, json={"kind": "mine", "args": {}}).status_code == 400
    assert Worker(ws).run_once() == job_id
    job = client.get(f"/api/jobs/{job_id}", headers=h).json()
    assert job["status"] == "done", job
    assert job["progress"] == {"done": 4, "total": 4}
    assert job["result"]["metrics"]["accuracy"] == pytest.approx(1.0)
    assert Worker(ws).run_once() is None  # the queue is empty
    assert "run " + job["result"]["run"] in client.get("/ui/jobs", headers=h).text


def test_a_failing_job_is_recorded_and_the_worker_goes_on(ws):
    bad = enqueue_job(ws, "eval", {"candidate": "sms", "data": "no-such-dataset:test"})
    good = enqueue_job(ws, "eval", {"candidate": "sms", "data": "sms:test", "limit": 2})
    worker = Worker(ws, poll_s=0.05).start()
    try:
        import time

        deadline = time.time() + 30
        while time.time() < deadline and get_job(ws, good.id).status not in ("done", "failed"):
            time.sleep(0.05)
    finally:
        worker.stop()
    assert get_job(ws, bad.id).status == "failed" and "no-such-dataset" in get_job(ws, bad.id).error
    assert get_job(ws, good.id).status == "done"


def test_a_job_whose_worker_died_is_requeued_and_finished_by_the_next(ws):
    from sqlalchemy import update

    from tunelab.store.models import JobRow, utcnow

    job = enqueue_job(ws, "eval", {"candidate": "sms", "data": "sms:test", "limit": 3})
    claimed = claim_job(ws, "dead-worker")  # the worker claims it, then dies without a heartbeat
    assert claimed.id == job.id and get_job(ws, job.id).status == "running"
    assert requeue_stale(ws, stale_s=60) == 0  # a fresh heartbeat is left alone
    with ws.store.session() as s:
        s.execute(update(JobRow).where(JobRow.id == job.id).values(heartbeat_at=utcnow() - timedelta(minutes=5)))
    # "server restart": a new worker requeues the stale job and runs it
    assert Worker(ws, stale_s=60).run_once() == job.id
    done = get_job(ws, job.id)
    assert done.status == "done" and done.attempts == 2 and done.worker != "dead-worker"


def test_two_workers_never_claim_the_same_job(ws):
    jobs = {enqueue_job(ws, "eval", {"candidate": "sms", "data": "sms:test"}).id for _ in range(6)}
    claimed: list[str] = []
    lock = threading.Lock()

    def grab(n):
        while (job := claim_job(ws, f"w{n}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(jobs)


def test_every_page_renders_for_a_viewer(ws, cli):
    from tunelab.evaluate import evaluate, resolve_candidate

    run = evaluate(ws, resolve_candidate(ws, "sms"), "sms:test", progress=False)
    client, _ = _client(ws)
    _, viewer = create_key(ws, "vic", "viewer")
    assert client.post("/login", data={"api_key": viewer}).status_code == 200  # redirected to the prompts page
    pages = {"/ui/prompts": "sms", "/ui/prompts/sms": "textarea", "/ui/prompts/sms/history": "first",
             "/ui/datasets": "sms", "/ui/datasets/sms": "First examples", f"/ui/runs/{run.id}": "hello",
             f"/ui/runs/{run.id}?failures=1": "1 failures", "/ui/runs": run.id, "/ui/comparisons": "Comparisons",
             "/ui/jobs": "Fine-tunes", "/ui/logs": "Call logs"}
    for path, text in pages.items():
        r = client.get(path)
        assert r.status_code == 200 and text in r.text, path
    assert client.get("/ui/keys").status_code == 403
    assert client.get("/static/htmx.min.js").text.startswith("/* htmx")


def test_playground_runs_on_dataset_examples_and_marks_failures(ws):
    client, _ = _client(ws)
    _, editor = create_key(ws, "ed", "editor")
    client.post("/login", data={"api_key": editor})
    csrf = client.cookies and __import__("re").search(r'"X-CSRF-Token": "([^"]+)"', client.get("/ui/prompts").text).group(1)
    r = client.post("/ui/prompts/sms/run", headers={"X-CSRF-Token": csrf},
                    data={"text": PROMPT, "data": "sms:test", "limit": "5"})
    assert r.status_code == 200
    assert r.text.count('class="pass"') == 4 and r.text.count('class="fail"') == 1  # "hello" is no label


def test_finetune_curves_comparison_report_and_worker_cli(ws, cli):
    from tunelab.store.models import ComparisonRow, FineTuneRow

    curves = {"train_curve": [{"step": i, "loss": 2.0 / i} for i in range(1, 6)],
              "eval_curve": [{"step": 2, "loss": 1.1}, {"step": 4, "loss": 0.8}]}
    report = ws.artifact_path("comparisons", "c1", "report.html")
    report.write_text("<html><body><h1>the report</h1></body></html>")
    with ws.store.session() as s:
        s.add(FineTuneRow(name="sms-lora", status="done", base="smollm2-135m", method="lora", dataset="sms",
                          dataset_version="v", prompt="sms", prompt_version="v", result={"curves": curves}))
        s.add(ComparisonRow(id="c1", dataset="sms", split="test", candidates=["sms"], result={},
                            report_path=str(report.relative_to(ws.artifacts_dir))))
        s.add(ComparisonRow(id="c2", dataset="sms", split="test", candidates=["sms"], result={},
                            report_path="../../../../etc/passwd"))
    client, h = _client(ws)
    page = client.get("/ui/jobs", headers=h).text
    assert page.count("<polyline") == 2 and "ft:sms-lora" in page
    r = client.get("/ui/comparisons/c1/report", headers=h)
    assert r.status_code == 200 and "the report" in r.text and "sandbox" in r.headers["content-security-policy"]
    assert client.get("/ui/comparisons/c2/report", headers=h).status_code == 404
    enqueue_job(ws, "eval", {"candidate": "sms", "data": "sms:test", "limit": 2})
    res = cli("worker", "--once")
    assert res.exit_code == 0 and "finished" in res.output
    assert [j.status for j in __import__("tunelab.server.jobs", fromlist=["list_jobs"]).list_jobs(ws)] == ["done"]


def test_jobs_started_from_the_ui_run_in_the_servers_worker_thread(ws):
    from tunelab.server.jobs import list_jobs

    _, editor = create_key(ws, "ed", "editor")
    with TestClient(create_app(ws, worker=True)) as client:  # the context runs startup: the worker starts
        client.post("/login", data={"api_key": editor})
        csrf = __import__("re").search(r'"X-CSRF-Token": "([^"]+)"', client.get("/ui/jobs").text).group(1)
        r = client.post("/ui/jobs", data={"csrf": csrf, "kind": "optimize", "candidate": "sms", "data": "sms",
                                          "limit": "3"}, follow_redirects=False)
        assert r.status_code == 303
        r = client.post("/ui/jobs", data={"csrf": csrf, "kind": "finetune", "candidate": "sms", "data": "sms",
                                          "limit": "abc"})
        assert r.status_code == 400
        import time

        deadline = time.time() + 120
        while time.time() < deadline and list_jobs(ws)[0].status in ("queued", "running"):
            time.sleep(0.2)
    (job,) = list_jobs(ws)
    assert job.kind == "optimize" and job.created_by == "ed"
    assert job.status == "done", job.error
    assert job.result["optimization"] and "message" in job.result


def test_concurrent_calls_to_a_local_model_share_batches():
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tunelab.models.base import Request
    from tunelab.models.fake import FakeModel
    from tunelab.server.deployments import BatchedModel

    class SlowLocal(FakeModel):
        backend = "local"
        sizes: list[int] = []

        def complete(self, requests):
            self.sizes.append(len(requests))
            time.sleep(0.2)
            if any(r.messages[-1]["content"] == "boom" for r in requests):
                raise RuntimeError("model failed")
            return super().complete(requests)

    model = SlowLocal("slow")
    batched = BatchedModel(model, max_batch=8)
    with ThreadPoolExecutor(9) as pool:
        texts = [f"message {i}" for i in range(9)]
        out = list(pool.map(lambda t: batched.complete([Request(messages=[{"role": "user", "content": t}])])[0],
                            texts))
    assert [c.text for c in out] == texts  # every caller gets its own answer
    assert sum(model.sizes) == 9 and max(model.sizes) > 1 and len(model.sizes) < 9
    with pytest.raises(RuntimeError, match="model failed"):
        batched.complete([Request(messages=[{"role": "user", "content": "boom"}])])
    batched.close()  # its thread ends; the wrapped model is untouched
    batched._thread.join(timeout=5)
    assert not batched._thread.is_alive()


def test_a_finetune_job_trains_through_the_launcher_its_config_names(ws, monkeypatch):
    """The worker runs a fine-tune job as the CLI would: `launcher: accelerate` goes through
    `accelerate launch`, and --num-processes without it is a clear error in the job."""
    import tunelab.finetune.launch as launch_mod
    from tunelab.server.jobs import run_job

    calls = []
    monkeypatch.setattr(launch_mod, "launch", lambda ws_, cfg, **kw: calls.append((cfg.launcher, cfg.num_processes,
                                                                                   kw["resume"])) or "launched")
    job = enqueue_job(ws, "finetune", {"data": "sms", "prompt": "sms", "name": "multi",
                                       "launcher": "accelerate", "num_processes": 2})
    run_job(ws, job)
    assert calls == [("accelerate", 2, False)]
    from tunelab.errors import UserError

    bad = enqueue_job(ws, "finetune", {"data": "sms", "prompt": "sms", "name": "bad", "num_processes": 2})
    with pytest.raises(UserError, match="needs --launcher accelerate"):
        run_job(ws, bad)
