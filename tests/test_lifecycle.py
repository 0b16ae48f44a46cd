"""The lifecycle's parts on the fake model: feedback on calls (API, console, CLI, export), canary
arms (weights, stickiness), the shadow queue (never returned, bounded, drops logged), evidence and
`compare --from-logs`, promotion gates and rollbacks, distillation's checks, the monitor's alarms,
and 200 concurrent calls with a shadow and a canary active."""

from __future__ import annotations

import asyncio
import re
import threading

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.fakes import fake_finetune
from tests.servers import serve_app
from tunelab.datasets import Example, get_dataset, save_dataset
from tunelab.files import write_atomic
from tunelab.lifecycle.calls import (ShadowAnswer, add_feedback, list_calls, logs_to_dataset, shadow_rows,
                                    write_shadow_answers)
from tunelab.lifecycle.distill import DistillConfig, distilled_dataset
from tunelab.lifecycle.evidence import arm_stats, compare_shadow, same_answer
from tunelab.lifecycle.promote import Gate, promote, promotion_history, rollback
from tunelab.lifecycle.rollouts import get_rollout, set_canary, set_shadow, stop_rollout
from tunelab.models import clear_loaded, load_model
from tunelab.prompts import commit_prompt, prompt_labels, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import create_key
from tunelab.server.deployments import Deployments
from tunelab.server.rollout import ShadowJob, ShadowQueue
from tunelab.store.models import ShadowCallRow

ROUTE = """---
model: fake:route
output: {type: label, labels: [billing, bug, other]}
---
user:
Which team? {{ input }}
"""


@pytest.fixture
def ws(workspace):
    write_atomic(workspace.prompts_dir / "route.prompt", ROUTE)
    commit_prompt(workspace, "route", "first")
    tag_prompt(workspace, "route@current", "production")
    write_atomic(workspace.prompts_dir / "route.prompt", ROUTE.replace("Which team?", "Which team must act?"))
    commit_prompt(workspace, "route", "second")
    tag_prompt(workspace, "route@current", "next")
    load_model("fake:route", workspace).rules.update({"card": "billing", "crash": "bug"})
    examples = [Example(f"my card was charged {i}", "billing") for i in range(4)] + [Example("app crash", "bug")]
    save_dataset(workspace, "tickets", {"train": examples, "validation": examples, "test": examples})
    yield workspace
    clear_loaded()


def _app(ws, **kw):
    app = create_app(ws, rate=0, **kw)
    app.state.rollouts.refresh_s = 0.0  # see rollout changes at once
    return app, TestClient(app)


def _call(client, key, text, model="route@production", **extra):
    r = client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                    json={"model": model, "messages": [{"role": "user", "content": text}], **extra})
    assert r.status_code == 200, r.text
    return r


# -- feedback ---------------------------------------------------------------------------------------
def test_feedback_on_a_call_by_its_id_with_the_errors_a_caller_can_get(ws):
    app, client = _app(ws)
    _, mine = create_key(ws, "app-a", "app")
    _, theirs = create_key(ws, "app-b", "app")
    _, editor = create_key(ws, "ed", "editor")
    r = _call(client, mine, "my card was charged twice")
    call_id = r.json()["id"]
    assert r.headers["x-tunelab-call-id"] == call_id and r.json()["tunelab"]["arm"] == "primary"

    def fb(key, **body):
        return client.post("/v1/feedback", headers={"Authorization": f"Bearer {key}"}, json=body)

    ok = fb(mine, call_id=call_id, score=0, correction="bug", note="it was the app")
    assert ok.status_code == 200 and ok.json()["correction"] == "bug" and ok.json()["author"] == "app-a"
    assert fb(mine, call_id="chatcmpl-nope", score=1).status_code == 404
    other = fb(theirs, call_id=call_id, score=1)
    assert other.status_code == 403 and other.json()["error"]["code"] == "not_your_call"
    assert fb(editor, call_id=call_id, score=1).status_code == 200  # an editor reviews any call
    for bad in ({"call_id": call_id, "score": 1.5}, {"call_id": call_id}, {"call_id": call_id, "score": 1, "x": 1}):
        r = fb(mine, **bad)
        assert r.status_code == 400 and r.json()["error"]["message"], bad
    assert client.post("/v1/feedback", json={"call_id": call_id, "score": 1}).status_code == 401

    # stored with the call, shown with it, and exported with it (the newest feedback counts)
    logs = client.get("/api/logs", headers={"Authorization": f"Bearer {mine}"}).json()["calls"]
    assert logs[0]["feedback"]["score"] == 1.0 and logs[0]["feedback"]["author"] == "ed"
    add_feedback(ws, call_id, score=0, correction="bug")
    _call(client, mine, "app crash on login")
    wrong = _call(client, mine, "something else").json()["id"]
    add_feedback(ws, wrong, score=0)
    ds = logs_to_dataset(ws, "reviewed", "route@production")
    rows = {ex.input: ex for ex in ds.splits["train"]}
    assert rows["my card was charged twice"].output == "bug"  # the correction
    assert rows["my card was charged twice"].meta["feedback"]["score"] == 0
    assert "something else" not in rows and "1 answers marked wrong left out" in get_dataset(ws, "reviewed").source


def test_feedback_in_the_console_and_the_cli(ws, cli):
    app, client = _app(ws)
    _, appkey = create_key(ws, "svc", "app")
    _, editor = create_key(ws, "ed", "editor")
    call_id = _call(client, appkey, "my card").json()["id"]
    row = list_calls(ws, "route@production")[0]
    client.post("/login", data={"api_key": editor})
    page = client.get(f"/ui/logs/{row.id}").text
    assert call_id in page and "no feedback yet" in page
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', page).group(1)
    r = client.post(f"/ui/logs/{row.id}/feedback", data={"csrf": csrf, "score": "0", "correction": "bug",
                                                        "note": "wrong team"})
    assert r.status_code == 200 and "feedback saved" in r.text and "wrong team" in r.text
    assert "wrong (corrected)" in client.get("/ui/logs").text
    res = cli("logs", "feedback", call_id, "--score", "1")
    assert res.exit_code == 0 and "score 1.0" in res.stdout
    bad = cli("logs", "feedback", "chatcmpl-unknown", "--score", "1")
    assert bad.exit_code == 2 and "no call 'chatcmpl-unknown'" in bad.stderr and "Traceback" not in bad.output
    bad = cli("logs", "feedback", call_id, "--score", "7")
    assert bad.exit_code == 2 and "from 0 (wrong) to 1 (right)" in bad.stderr


# -- canary and shadow --------------------------------------------------------------------------------
def test_canary_weights_sticky_callers_and_weights_outside_0_1(ws, cli):
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    set_canary(ws, "route@production", "route@next", 0.3)
    arms = [_call(client, key, f"my card {i}").json()["tunelab"]["arm"] for i in range(200)]
    assert 30 < arms.count("canary") < 90  # 30% of 200, by the call's random id
    rows = list_calls(ws, "route@production", limit=None)
    assert {(r.arm, r.candidate) for r in rows} == {("primary", "route@production"), ("canary", "route@next")}
    assert {r.call_id for r in rows} and all(r.call_id.startswith("chatcmpl-") for r in rows)

    set_canary(ws, "route@production", "route@next", 0.5, sticky=True)
    for user in ("ann", "bob", "cyd", "dee"):
        got = {_call(client, key, "my card", user=user).json()["tunelab"]["arm"] for _ in range(5)}
        assert len(got) == 1, user  # the same caller, the same arm
    for weight in ("1.5", "-0.1", "nan"):
        res = cli("rollout", "canary", "route@production", "route@next", "--weight", weight)
        assert res.exit_code == 2 and "from 0 to 1" in res.stderr and "Traceback" not in res.output, weight
    res = cli("rollout", "canary", "route@production", "route", "--weight", "0.2")
    assert res.exit_code == 2 and "working file" in res.stderr
    res = cli("rollout", "shadow", "route@production", "ft:nothing")
    assert res.exit_code == 2 and "unknown fine-tune" in res.stderr


def test_a_shadow_answers_in_the_background_and_is_never_returned(ws, cli):
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    load_model("fake:ft-shadowy", ws)  # the shadow's base answers differently from the primary
    fake_finetune(ws, "shadowy", prompt=f"route@{prompt_labels(ws, 'route')['production']}", dataset="tickets@x",
                  rules={"card": "other"})
    res = cli("rollout", "shadow", "route@production", "ft:shadowy", "--share", "1")
    assert res.exit_code == 0 and "shadow ft:shadowy on 100% of calls" in res.stdout
    answers = [_call(client, key, f"my card {i}").json()["choices"][0]["message"]["content"] for i in range(10)]
    assert answers == ["billing"] * 10  # the caller gets the primary's answer, never the shadow's
    assert app.state.shadows.wait_idle()
    shadows = shadow_rows(ws, "route@production")
    assert len(shadows) == 10 and {s.output for s in shadows} == {"other"} and {s.role for s in shadows} == {"shadow"}
    ev = compare_shadow(ws, "route@production", "ft:shadowy")
    assert ev.agreement.n == 10 and ev.agreement.k == 0 and ev.primary == "route@production"
    res = cli("compare", "--from-logs", "route@production", "--shadow", "ft:shadowy")
    assert res.exit_code == 0 and "agreement of ft:shadowy with route@production: 0.0% (0/10" in res.stdout
    res = cli("compare", "--from-logs", "route@production", "--shadow", "route@next")
    assert res.exit_code == 2 and "no shadow answers of 'route@next'" in res.stderr
    page = client.get(f"/ui/logs/{list_calls(ws)[0].id}", headers={"Authorization": f"Bearer {key}"})
    assert page.status_code == 403  # an app key does not read the console


def test_the_shadow_queue_is_bounded_and_logs_what_it_drops(ws):
    rows: list = []
    lock = threading.Lock()

    def write(batch):
        with lock:
            rows.extend(batch)

    deps = Deployments(ws)
    queue = ShadowQueue(deps, write, capacity=3, batch=1)
    with queue.serving():  # a caller is being answered: the shadow waits
        accepted = [queue.submit(ShadowJob(f"c{i}", "route@production", "route@next", "shadow",
                                           [{"role": "user", "content": f"my card {i}"}], {}, 0)) for i in range(8)]
        assert accepted.count(True) == 3 and queue.counts["dropped"] == 5
    assert queue.wait_idle()
    queue.close()
    by_status = {s: sorted(r.call_id for r in rows if r.status == s) for s in ("ok", "dropped")}
    assert len(by_status["ok"]) == 3 and len(by_status["dropped"]) == 5
    assert sorted(by_status["ok"] + by_status["dropped"]) == sorted(f"c{i}" for i in range(8))  # nothing lost
    assert all(isinstance(r, ShadowAnswer) for r in rows) and {r.output for r in rows if r.status == "ok"} == {"billing"}
    queue2 = ShadowQueue(deps, write, capacity=10)
    with queue2.serving():
        queue2.submit(ShadowJob("late", "route@production", "route@next", "shadow", [], {}, 0))
        queue2.close()  # the server stops before the shadow ran: logged as dropped
    assert any(r.call_id == "late" and r.status == "dropped" for r in rows)


def test_same_answer_reads_labels_json_and_text():
    assert same_answer("Billing", "billing.") and same_answer('{"a": 1, "b": [2]}', '{"b":[2],"a":1}')
    assert not same_answer('{"a": 1}', '{"a": 2}') and not same_answer("bug", "billing")


# -- promotion --------------------------------------------------------------------------------------
def test_promote_moves_the_label_after_the_gate_and_records_every_step(ws, cli):
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    production = prompt_labels(ws, "route")["production"]
    set_canary(ws, "route@production", "route@next", 0.5)
    for i in range(60):
        _call(client, key, f"my card {i}")
    assert app.state.shadows.wait_idle()
    arms = arm_stats(ws, "route@production")
    assert arms["canary"].agreement.n == arms["canary"].answers > 10 and arms["canary"].agreement.value == 1.0

    # gates no traffic could meet are bad input; an unmet gate is refused and recorded
    res = cli("promote", "route@production", "--min-agreement", "1.5")
    assert res.exit_code == 2 and "can never be met" in res.stderr
    res = cli("promote", "route@production", "--candidate", "route@current", "--min-calls", "10")
    assert res.exit_code == 2 and "can never be met" in res.stderr and "answers none" in res.stderr
    res = cli("promote", "route@production", "--min-calls", "100000")
    assert res.exit_code == 1 and "[NO] calls" in res.stdout and "not promoted" in res.stdout
    assert promotion_history(ws, "route@production")[0].action == "refused"
    res = cli("promote", "route@production", "--min-calls", "10", "--dry-run")
    assert res.exit_code == 0 and "dry run: the gate is met" in res.stdout
    assert prompt_labels(ws, "route")["production"] == production

    res = cli("promote", "route@production", "--min-calls", "10", "--note", "same answers, clearer prompt")
    assert res.exit_code == 0 and "promoted" in res.stdout, res.output
    assert prompt_labels(ws, "route")["production"] == prompt_labels(ws, "route")["next"] != production
    assert get_rollout(ws, "route@production").canary is None
    served = _call(client, key, "my card").json()["tunelab"]
    assert served["prompt_version"] == prompt_labels(ws, "route")["next"] and served["arm"] == "primary"
    record = promotion_history(ws, "route@production")[0]
    assert record.action == "promote" and record.note == "same answers, clearer prompt"
    assert record.evidence["agreement"]["value"] == 1.0 and record.gate["min_calls"] == 10
    assert record.from_candidate == f"route@{production}" and record.author

    res = cli("rollback", "route@production")
    assert res.exit_code == 0 and prompt_labels(ws, "route")["production"] == production
    assert _call(client, key, "my card").json()["tunelab"]["prompt_version"] == production
    assert [r.action for r in promotion_history(ws, "route@production")] == ["rollback", "promote", "refused"]
    res = cli("rollback", "route@production")
    assert res.exit_code == 2 and "no promotion to roll back" in res.stderr
    res = cli("rollout", "history", "route@production")
    assert res.exit_code == 0 and "promote" in res.stdout and "agreement 100.0% over" in res.stdout


def test_promoting_a_fine_tune_makes_it_answer_the_deployment_and_quality_can_block_it(ws):
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    fake_finetune(ws, "student", prompt=f"route@{prompt_labels(ws, 'route')['production']}", dataset="tickets@x",
                  rules={"card": "billing", "parcel": "other"})
    set_canary(ws, "route@production", "ft:student", 0.5)
    ids = [_call(client, key, f"where is my parcel {i}").json() for i in range(40)]
    assert app.state.shadows.wait_idle()
    for r in ids:  # people say the primary's answers were right and the student's wrong
        add_feedback(ws, r["id"], score=1.0 if r["tunelab"]["arm"] == "primary" else 0.0)
    refused = promote(ws, "route@production", Gate(min_agreement=0.0, min_calls=5))
    assert not refused.promoted and [c.name for c in refused.checks if not c.ok] == ["quality"]
    assert refused.evidence.quality_drop_p < 0.05
    for r in ids:
        add_feedback(ws, r["id"], score=1.0)
    done = promote(ws, "route@production", Gate(min_agreement=0.0, min_calls=5))
    assert done.promoted and done.moved["primary"] == "ft:student"
    served = _call(client, key, "where is my parcel").json()
    assert served["tunelab"]["kind"] == "ft" and served["tunelab"]["candidate"] == "ft:student"
    assert served["choices"][0]["message"]["content"] == "other"
    rollback(ws, "route@production")
    assert _call(client, key, "where is my parcel").json()["tunelab"]["candidate"] == "route@production"


def test_rollout_show_and_stop(ws, cli):
    set_canary(ws, "route@production", "route@next", 0.25, sticky=True)
    res = cli("rollout", "show")
    assert "canary route@next on 25% of calls (sticky per caller)" in res.stdout
    stop_rollout(ws, "route@production", "canary")
    assert get_rollout(ws, "route@production").canary is None
    res = cli("rollout", "stop", "route@next")
    assert res.exit_code == 2 and "has no rollout" in res.stderr


# -- distillation's checks --------------------------------------------------------------------------
def test_distill_from_a_window_without_calls_and_inputs_with_personal_data(ws, cli):
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d1")
    assert res.exit_code == 2 and "has no successful calls at all" in res.stderr and "Traceback" not in res.output
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    for text in ("my card was charged twice", "app crash on start", "mail me at ann@example.com about my card"):
        _call(client, key, text)
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d1", "--since",
              "2000-01-01T00:00", "--until", "2000-01-02T00:00")
    assert res.exit_code == 2 and "no successful calls in the window" in res.stderr and "3 calls outside it" in res.stderr
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d1", "--since", "yesterday")
    assert res.exit_code == 2 and "--since takes a time like" in res.stderr
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d1", "--no-train")
    assert res.exit_code == 2 and "look like personal data (email: 1)" in res.stderr and "--pii keep" in res.stderr
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d1", "--no-train",
              "--pii", "drop", "--holdout", "0")
    assert res.exit_code == 0, res.output
    ds = get_dataset(ws, "d1")
    prov = ds.meta["distilled"]
    assert prov["pii"]["kinds"] == {"email": 1} and prov["pii"]["action"] == "drop" and prov["teacher"] == "route@next"
    assert sorted(ex.input for ex in ds.splits["train"]) == ["app crash on start", "my card was charged twice"]
    assert {ex.output for ex in ds.splits["train"]} == {"billing", "bug"}
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d2", "--unsure", "maybe")
    assert res.exit_code == 2 and "unsure" in res.stderr


def test_distill_keeps_unsure_teacher_answers_out_or_marks_them(ws):
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    for i in range(12):
        _call(client, key, f"my card {i}" if i % 2 else f"something {i}")
    base = dict(deployment="route@production", teacher="route@next", train=False, holdout=0.0)
    # the fake model puts 0.7 on its answer: margin 0.55; demand more and every answer is unsure
    with pytest.raises(Exception, match="no training examples left: 12 teacher answers were unsure"):
        distilled_dataset(ws, DistillConfig(name="u1", min_confidence=0.9, **base))
    ref, prov = distilled_dataset(ws, DistillConfig(name="u2", min_confidence=0.9, unsure="mark", **base))
    train = get_dataset(ws, ref).splits["train"] + get_dataset(ws, ref).splits.get("validation", [])
    assert len(train) == 12 and all(ex.meta["teacher_unsure"] for ex in train) and prov["unsure"]["count"] == 12
    ref, prov = distilled_dataset(ws, DistillConfig(name="u3", min_confidence=0.5, holdout=0.5,
                                                    **{k: v for k, v in base.items() if k != "holdout"}))
    ds = get_dataset(ws, ref)
    assert prov["unsure"]["count"] == 0 and 0 < len(ds.splits["holdout"]) < 12
    assert len(ds.splits["holdout"]) + sum(len(ds.splits.get(s, [])) for s in ("train", "validation")) == 12


# -- load ---------------------------------------------------------------------------------------------
def test_200_concurrent_calls_with_a_shadow_and_a_canary_all_logged_with_their_arm(ws):
    import httpx

    app = create_app(ws, rate=0, shadow_capacity=64)
    _, key = create_key(ws, "load", "app")
    set_canary(ws, "route@production", "route@next", 0.2)
    fake_finetune(ws, "shade", prompt=f"route@{prompt_labels(ws, 'route')['production']}", dataset="tickets@x",
                  rules={"card": "billing"})
    set_shadow(ws, "route@production", "ft:shade", 0.5)

    async def burst():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120,
                                     limits=httpx.Limits(max_connections=200)) as c:
            async def one(i):
                r = await c.post(f"{url}/v1/chat/completions", json={
                    "model": "route@production", "messages": [{"role": "user", "content": f"my card {i}"}]})
                return r.status_code, r.json()
            return await asyncio.gather(*(one(i) for i in range(200)))

    with serve_app(app) as url:
        results = asyncio.run(burst())
        assert app.state.shadows.wait_idle(60)
    assert [s for s, _ in results].count(200) == 200
    calls = list_calls(ws, "route@production", limit=None)
    assert len(calls) == 200 and {c.arm for c in calls} == {"primary", "canary"}
    assert all(c.status == "ok" and c.call_id for c in calls)
    served = {body["id"]: body["tunelab"]["arm"] for _, body in results}
    assert {c.call_id: c.arm for c in calls} == served
    with ws.store.session() as s:
        shadows = list(s.scalars(select(ShadowCallRow)))
    rollout = get_rollout(ws, "route@production")
    wanted = {(c.call_id, "baseline") for c in calls if c.arm == "canary"}
    wanted |= {(c.call_id, "shadow") for c in calls if rollout.mirrors(c.call_id)}
    assert {(r.call_id, r.role) for r in shadows} == wanted  # each answered or logged as dropped: nothing lost
    assert len(shadows) == len(wanted) and {r.status for r in shadows} <= {"ok", "dropped"}
    assert sum(r.status == "dropped" for r in shadows) == app.state.shadows.counts["dropped"]


def test_shadow_answer_rows_keep_long_outputs_clipped(ws):
    write_shadow_answers(ws, [ShadowAnswer("c1", "d", "x", output="y" * 30_000)])
    (row,) = shadow_rows(ws, "d")
    assert len(row.output) < 21_000 and "more characters" in row.output and row.created_at is not None


# -- the monitor on a hybrid and on JSON answers --------------------------------------------------------
EXTRACT = """---
model: fake:extract
output: {type: json, schema: {type: object, properties: {team: {type: string}}, required: [team]}}
---
user:
The team as JSON: {{ input }}
"""


def test_monitor_alarms_for_a_hybrids_fallback_share_and_for_json_validity(ws, cli):
    from tunelab.evaluate import HybridSpec, evaluate, resolve_candidate, save_hybrid
    from tunelab.lifecycle.drift import monitor

    ds = get_dataset(ws, "tickets")
    fake_finetune(ws, "tk", prompt=f"route@{prompt_labels(ws, 'route')['production']}", dataset=ds.ref,
                  rules={"card": "billing"})
    save_hybrid(ws, HybridSpec(name="hy", primary="ft:tk", fallback="route@production", similarity_threshold=0.3,
                               train_data=f"{ds.ref}:train"))
    write_atomic(ws.prompts_dir / "extract.prompt", EXTRACT)
    commit_prompt(ws, "extract", "first")
    tag_prompt(ws, "extract@current", "production")
    load_model("fake:extract", ws).rules.update({"card": '{"team": "billing"}', "password": "Sure! The team is IT."})
    save_dataset(ws, "teams", {"test": [Example(f"my card was charged {i}", '{"team": "billing"}') for i in range(5)]})
    evaluate(ws, resolve_candidate(ws, "hybrid:hy"), "tickets:test", progress=False)  # inputs like its training: primary
    evaluate(ws, resolve_candidate(ws, "extract@production"), "teams:test", progress=False)
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    for i in range(24):  # unlike the training inputs: the hybrid's fallback answers them all
        _call(client, key, f"please reset the router password for office {i}", model="hybrid:hy")
        _call(client, key, f"please reset the router password for office {i}", model="extract@production")
    hy = monitor(ws, "hybrid:hy")
    assert hy.baseline.fallback_share == 0.0 and hy.current.fallback_share > 0.5
    fallback = next(a for a in hy.alarms if a.metric == "fallback_share")
    assert "retrain on the new window: tunelab distill --from hybrid:hy" in fallback.action
    inputs = next(a for a in hy.alarms if a.metric in ("input_distance", "ood_share"))
    assert "widen the hybrid's fallback" in inputs.action and "tunelab distill --from hybrid:hy" in inputs.action
    ex = monitor(ws, "extract@production", reference="teams:test")
    assert ex.baseline.json_valid == 1.0 and ex.current.json_valid == 0.0
    assert any(a.metric == "json_valid" and "format instructions" in a.action for a in ex.alarms)
    res = cli("monitor", "extract@production", "--since", "2000-01-01T00:00", "--until", "2000-01-02T00:00",
              "--reference", "teams:test")
    assert res.exit_code == 0 and "0 calls in the window" in res.stdout
    res = cli("monitor", "route@next")
    assert res.exit_code == 2 and "no finished evaluation" in res.stderr and "--reference" in res.stderr


def _token_probability(text: str) -> float:
    """The fake model's confidence (geometric-mean token probability) when it answers `text`."""
    from tunelab.models.base import Request
    from tunelab.models.fake import FakeModel

    (comp,) = FakeModel(rules={"x": text}).complete([Request(messages=[{"role": "user", "content": "x"}])])
    return comp.confidence["mean"]


def test_json_answers_log_their_token_confidence_the_monitor_alarms_and_distill_marks_unsure(ws, cli):
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.lifecycle.drift import monitor

    answers = [f'{{"team": "billing", "ticket": {i}}}' for i in range(200)]
    sure = next(a for a in answers if _token_probability(a) >= 0.9)
    unsure = next(a for a in answers if _token_probability(a) <= 0.45)
    write_atomic(ws.prompts_dir / "extract.prompt", EXTRACT)
    commit_prompt(ws, "extract", "first")
    tag_prompt(ws, "extract@current", "production")
    model = load_model("fake:extract", ws)
    model.rules["card"] = sure
    save_dataset(ws, "teams", {"test": [Example(f"my card was charged {i}", sure) for i in range(5)]})
    run = evaluate(ws, resolve_candidate(ws, "extract@production"), "teams:test", progress=False)
    assert run.status == "done"
    model.rules["card"] = unsure  # the same inputs, answered less surely
    app, client = _app(ws)
    _, key = create_key(ws, "svc", "app")
    for i in range(5, 29):  # like the split's inputs, new to the response cache
        _call(client, key, f"my card was charged {i}", model="extract@production")
    logged = list_calls(ws, "extract@production")
    assert {c.meta["confidence"] for c in logged} == {round(_token_probability(unsure), 4)}
    report = monitor(ws, "extract@production")
    assert report.confidence_measure == "token probability"
    assert report.baseline.confidence == pytest.approx(_token_probability(sure), abs=1e-3)
    assert report.current.confidence == pytest.approx(_token_probability(unsure), abs=1e-3)
    alarm = next(a for a in report.alarms if a.metric == "confidence")
    assert "mean token probability" in alarm.message and "re-optimize the prompt" in alarm.action
    res = cli("monitor", "extract@production")
    assert res.exit_code == 1 and "token probability" in res.stdout and "ALARM confidence" in res.stdout
    # distillation reads the same confidence of a JSON teacher
    between = (_token_probability(sure) + _token_probability(unsure)) / 2
    base = dict(deployment="extract@production", teacher="extract@production", train=False, holdout=0.0,
                min_confidence=between)
    with pytest.raises(Exception, match="no training examples left: 24 teacher answers were unsure"):
        distilled_dataset(ws, DistillConfig(name="j1", **base))
    ref, prov = distilled_dataset(ws, DistillConfig(name="j2", unsure="mark", **base))
    train = get_dataset(ws, ref).splits["train"] + get_dataset(ws, ref).splits.get("validation", [])
    assert len(train) == 24 and prov["unsure"]["count"] == 24 and all(ex.meta["teacher_unsure"] for ex in train)
    assert {ex.meta["teacher"]["confidence"] for ex in train} == {round(_token_probability(unsure), 4)}


def test_distill_prints_the_student_against_the_teacher_on_labelled_data(ws, cli, monkeypatch):
    """The command's last lines, from a real comparison (the training itself is tests/test_lifecycle_e2e.py's)."""
    from tunelab.compare import compare
    from tunelab.lifecycle import distill as distill_module

    comparison = compare(ws, "tickets:test", ["route@production", "route@next"], progress=False)

    def fake_distill(workspace, config, progress=None, log=None):
        return distill_module.DistillResult(dataset="d@1", provenance={}, student="ft:d", comparison=comparison)

    monkeypatch.setattr(distill_module, "distill", fake_distill)
    res = cli("distill", "--from", "route@production", "--teacher", "route@next", "--name", "d",
              "--eval-data", "tickets:test")
    assert res.exit_code == 0, res.output
    for entry in comparison.candidates:  # each one's metric with its interval (the CLI read `.lo` once)
        assert f"{entry.name}: accuracy {entry.metric.value:.3f} (95% CI {entry.metric.low:.3f}–" in res.stdout
    assert len(comparison.candidates) >= 2 and "report:" in res.stdout


def test_a_call_id_that_looks_like_a_card_number_is_not_personal_data():
    """A logged example's call id is tunelab's: its hex can hold a Luhn-valid run of digits."""
    from tunelab.lifecycle.pii import find_pii

    ids = {"call_id": "chatcmpl-4111111111111111abcdefab"}  # 4111 1111 1111 1111 passes the Luhn check
    assert not find_pii([Example("my parcel is late", "", ids)]).found
    assert find_pii([Example("my parcel is late", "", {"note": "card 4111 1111 1111 1111"})]).kinds == {"card": 1}
