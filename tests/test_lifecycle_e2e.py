"""The combined approach as a running loop, end to end, on the bundled support data and through the
official `openai` SDK (docs/lifecycle.md walks the same steps): serve a prompt, answer calls,
take feedback, distill a student from a teacher, shadow it, promote it past a gate, and see a
shifted input stream raise the drift alarm. On the fake model (the student's training is the
test suite's fake fine-tune), and a real-model `--quick` variant that trains the student on SmolLM2."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import pytest

from tests.fakes import fake_finetune
from tests.servers import serve_app
from tunelab.datasets import check_path, get_dataset, save_dataset
from tunelab.evaluate import evaluate, resolve_candidate
from tunelab.files import write_atomic
from tunelab.flow import examples_dir
from tunelab.lifecycle.calls import list_calls
from tunelab.lifecycle.distill import DistillConfig, distill, judge_student
from tunelab.lifecycle.drift import monitor
from tunelab.lifecycle.evidence import compare_shadow
from tunelab.lifecycle.promote import Gate, promote, promotion_history
from tunelab.lifecycle.rollouts import set_canary, set_shadow
from tunelab.models import clear_loaded, load_model
from tunelab.prompts import commit_prompt, prompt_labels, tag_prompt
from tunelab.server.app import create_app
from tunelab.server.auth import create_key

openai = pytest.importorskip("openai", reason="the official openai SDK (a dev dependency) is not installed")

LABELS = "[billing, technical, account, shipping, returns, sales, security, feedback]"
PROMPT = """---
model: {model}
output: {{type: label, labels: """ + LABELS + """}}
---
user:
Which team should handle this customer message? {{{{ input }}}}
"""
KEYWORDS = {"invoice": "billing", "charged": "billing", "refund": "billing", "parcel": "shipping",
            "delivery": "shipping", "password": "account", "log in": "account", "crash": "technical",
            "error": "technical", "return": "returns"}
# an input stream the deployment was never measured on
SHIFTED = [f"How long should I {verb} the {food} at {temp} degrees before serving it to {who}?"
           for verb, food, who in zip(["bake", "roast", "grill", "steam", "braise", "poach"] * 5,
                                      ["bread", "chicken", "salmon", "carrots", "lamb shoulder", "pears"] * 5,
                                      ["guests", "my kids", "friends", "the team", "my parents", "neighbours"] * 5)
           for temp in [180]][:25]


def _support(ws):
    _, splits = check_path(examples_dir())
    return save_dataset(ws, "support", splits, source="examples/support")


def _chat(client, text: str):
    return client.chat.completions.create(model="support@production", messages=[{"role": "user", "content": text}])


@pytest.fixture
def loop(workspace):
    ws = workspace
    ds = _support(ws)
    for name, model in (("support", "fake:support"), ("support-teacher", "fake:teacher")):
        write_atomic(ws.prompts_dir / f"{name}.prompt", PROMPT.format(model=model))
        commit_prompt(ws, name, "first")
        tag_prompt(ws, f"{name}@current", "production")
    load_model("fake:support", ws).rules.update(KEYWORDS)
    every = [ex for split in ds.splits.values() for ex in split]
    load_model("fake:teacher", ws).rules.update({ex.input: ex.output for ex in every})  # the strong teacher
    evaluate(ws, resolve_candidate(ws, "support@production"), "support:test", progress=False)  # measured first
    yield ws, ds
    clear_loaded()


def test_the_loop_end_to_end_on_the_fake_model_through_the_openai_sdk(loop, cli):
    ws, ds = loop
    app = create_app(ws, rate=0)
    app.state.rollouts.refresh_s = 0.0
    _, key = create_key(ws, "support-app", "app")
    traffic = [ex.input for ex in ds.splits["validation"]]
    with serve_app(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        # 1. serve a prompt: calls through the official client; each answer's id is the call's id
        raw = client.chat.completions.with_raw_response.create(
            model="support@production", messages=[{"role": "user", "content": traffic[0]}])
        first = raw.parse()
        assert raw.headers["x-tunelab-call-id"] == first.id and first.id.startswith("chatcmpl-")
        answers = [first] + [_chat(client, text) for text in traffic[1:40]]

        # 2. feedback: the right label where the answer was wrong, a score where it was right
        truth = {ex.input: ex.output for ex in ds.splits["validation"]}
        given = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
            for text, comp in list(zip(traffic, answers))[:20]:
                said = comp.choices[0].message.content
                body = {"call_id": comp.id, "score": 1.0} if said == truth[text] else \
                    {"call_id": comp.id, "score": 0.0, "correction": truth[text]}
                assert http.post("/v1/feedback", json=body).status_code == 200
                given += "correction" in body
        assert given > 0

        # 3. distill: the teacher labels the logged inputs; corrections win; a dataset with provenance
        config = DistillConfig(deployment="support@production", teacher="support-teacher@production",
                               name="support-distilled", train=False, eval_data="support:test", holdout=0.25)
        result = distill(ws, config)
        prov = get_dataset(ws, result.dataset).meta["distilled"]
        assert prov["calls"] == 40 and prov["distinct_inputs"] == 40 and prov["teacher"] == "support-teacher@production"
        assert prov["feedback"]["corrections"] == given and prov["splits"]["holdout"] >= 5
        distilled = get_dataset(ws, result.dataset)
        assert all(ex.output == truth[ex.input] for s in distilled.splits.values() for ex in s)
        student_prompt = f"support@{prompt_labels(ws, 'support')['production']}"
        teacher = load_model("fake:teacher", ws).rules  # the fake student learned its teacher well
        fake_finetune(ws, "support-distilled", prompt=student_prompt, dataset=result.dataset, rules=dict(teacher))
        agreement, comparison, _ = judge_student(ws, result.dataset, "ft:support-distilled", config)
        assert agreement.metrics["accuracy"]["n"] == prov["splits"]["holdout"]
        names = [c.name for c in comparison.candidates]
        assert names[0].startswith("support-teacher@") and names[1] == "ft:support-distilled"

        # 4. shadow: the student answers the next calls in the background; the callers get the prompt's answers
        set_shadow(ws, "support@production", "ft:support-distilled", 1.0)
        before = [_chat(client, text) for text in traffic[40:70]]
        assert all(c.model_extra["tunelab"]["candidate"] == "support@production" for c in before)
        assert app.state.shadows.wait_idle()
        ev = compare_shadow(ws, "support@production", "ft:support-distilled")
        assert ev.agreement.n == 30 and ev.dropped == 0

        # 5. canary + promote: a strict gate is refused (and recorded), a met gate moves the deployment
        set_canary(ws, "support@production", "ft:support-distilled", 0.5)
        canary = [_chat(client, ex.input) for ex in ds.splits["test"][:30]]
        assert {c.model_extra["tunelab"]["arm"] for c in canary} == {"primary", "canary"}
        assert app.state.shadows.wait_idle()
        strict = promote(ws, "support@production", Gate(min_agreement=0.999, min_calls=30))
        assert not strict.promoted and promotion_history(ws, "support@production")[0].action == "refused"
        measured = strict.evidence.agreement.value
        done = promote(ws, "support@production", Gate(min_agreement=measured - 0.01, min_calls=30), note="e2e")
        assert done.promoted and done.moved["primary"] == "ft:support-distilled"
        after = _chat(client, ds.splits["test"][0].input)
        assert after.model_extra["tunelab"]["kind"] == "ft"

        # 6. drift: the usual traffic is healthy; a shifted input stream raises the alarm, saying what to do
        t1 = datetime.utcnow()
        for ex in ds.splits["test"][30:55]:
            _chat(client, ex.input)
        t2 = datetime.utcnow()
        time.sleep(0.01)
        for text in SHIFTED:
            _chat(client, text)
        t3 = datetime.utcnow()
    healthy = monitor(ws, "support@production", since=t1, until=t2)
    assert healthy.current.calls == 25 and healthy.healthy, [a.message for a in healthy.alarms]
    shifted = monitor(ws, "support@production", since=t2, until=t3)
    metrics = {a.metric for a in shifted.alarms}
    assert {"input_distance", "ood_share"} <= metrics, shifted.to_dict()
    assert shifted.current.ood_share > 0.8 and healthy.current.ood_share < 0.25
    assert all("tunelab distill --from support@production" in a.action for a in shifted.alarms
               if a.metric in ("input_distance", "ood_share"))
    res = cli("monitor", "support@production", "--since", t2.isoformat(), "--until", t3.isoformat())
    assert res.exit_code == 1 and "ALARM input_distance" in res.stdout and "what to do: retrain" in res.stdout
    assert len(list_calls(ws, "support@production", limit=None)) == 40 + 30 + 30 + 1 + 25 + len(SHIFTED)


def test_the_console_monitor_page_shows_the_alarm_and_the_arms(loop):
    ws, ds = loop
    from fastapi.testclient import TestClient

    app = create_app(ws, rate=0)
    client = TestClient(app)
    _, key = create_key(ws, "svc", "app")
    _, viewer = create_key(ws, "vic", "viewer")
    h = {"Authorization": f"Bearer {key}"}
    for text in SHIFTED:
        client.post("/v1/chat/completions", headers=h,
                    json={"model": "support@production", "messages": [{"role": "user", "content": text}]})
    client.post("/login", data={"api_key": viewer})
    listing = client.get("/ui/monitor").text
    assert "support@production" in listing
    page = client.get("/ui/monitor/support@production?window=1h")
    assert page.status_code == 200 and 'data-metric="ood_share"' in page.text and "what to do" in page.text
    assert 'data-arm="primary"' in page.text and 'data-plot="distance"' in page.text and "label shares" in page.text
    assert client.get("/ui/monitor/support@production?window=2h").status_code == 400
    nothing = client.get("/ui/monitor/ft:unknown")
    assert nothing.status_code == 200 and "unknown fine-tune" in nothing.text


@pytest.mark.realmodel
@pytest.mark.slow
def test_the_loop_quick_on_smollm2_trains_a_real_student(workspace, cli):
    """Serve the bundled support prompt on SmolLM2, 16 calls through the openai SDK (concurrent: the
    gateway batches them), `tunelab distill --quick` (a real LoRA, 10 steps), shadow the student,
    promote it past a gate, monitor against the test split."""
    from concurrent.futures import ThreadPoolExecutor

    ws = workspace
    ds = _support(ws)
    write_atomic(ws.prompts_dir / "support.prompt", (examples_dir() / "support-router.prompt").read_text())
    commit_prompt(ws, "support", "bundled")
    tag_prompt(ws, "support@current", "production")
    app = create_app(ws, rate=0)
    app.state.rollouts.refresh_s = 0.0
    _, key = create_key(ws, "svc", "app")
    with serve_app(app) as url, ThreadPoolExecutor(8) as pool:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=300)
        calls = list(pool.map(lambda ex: _chat(client, ex.input), ds.splits["validation"][:16]))
        assert {c.choices[0].message.content for c in calls} <= set(LABELS.strip("[]").split(", "))
        res = cli("distill", "--from", "support@production", "--teacher", "support@production", "--name", "sd",
                  "--quick", "--holdout", "0.25")
        assert res.exit_code == 0, res.output
        assert "student ft:sd" in res.stdout and "agreement with the teacher on held-back calls" in res.stdout
        set_shadow(ws, "support@production", "ft:sd", 1.0)
        list(pool.map(lambda ex: _chat(client, ex.input), ds.splits["test"][:8]))
        # the student answers in the gateway's worker process, at the lowest priority: slow on a busy machine
        assert app.state.shadows.wait_idle(900) and app.state.shadows.process.started == 1
        res = cli("promote", "support@production", "--min-agreement", "0", "--min-calls", "8")
        assert res.exit_code == 0 and "now answers with ft:sd" in res.stdout, res.output
        assert _chat(client, "I was charged twice").model_extra["tunelab"]["candidate"] == "ft:sd"
    app.state.shadows.close()  # serve_app runs no lifespan: stop the worker process here
    res = cli("monitor", "support@production", "--since", "1h", "--reference", "support:test", "--min-calls", "5",
              "--json")
    assert res.exit_code in (0, 1) and '"calls": 25' in res.stdout
