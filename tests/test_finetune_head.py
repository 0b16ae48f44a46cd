"""The classification-head fine-tune (`tunelab finetune --head classify`) on a tiny random Llama
(SmolLM2's tokenizer, 2 layers of width 32): the job, what it stores, that `ft:NAME` answers with
the head, save/load/resume, and bad input (one line, exit 2, nothing registered). The real-model
test that a head raises accuracy is tests/test_finetune_realmodel.py."""

from __future__ import annotations

import json
import math

import pytest
from sqlalchemy import select

from tests.prompts import SPAM_PROMPT as PROMPT
from tests.test_finetune import examples, nothing_left, power_cut_at, rows, tiny_base  # noqa: F401 (fixtures)
from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.store.models import FineTuneRow

REPLY = """---
output: {type: text}
---
user:
Reply to: {{ input }}
"""


@pytest.fixture
def ws(workspace, monkeypatch):
    monkeypatch.setenv("TUNELAB_PRECISION", "fp32")  # served as validated: exact agreement
    save_dataset(workspace, "sms", {"train": examples(48), "validation": examples(12, seed=1),
                                    "test": examples(12, seed=2)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    (workspace.prompts_dir / "reply.prompt").write_text(REPLY)
    yield workspace
    from tunelab.models import clear_loaded

    clear_loaded()


def head_args(tiny_base, name: str = "hd", *extra: str) -> list[str]:
    return ["finetune", "--data", "sms", "--prompt", "spam", "--name", name, "--base", str(tiny_base), "--head",
            "classify", "--precision", "fp32", "--lr", "0.01", "--batch-size", "8", *extra]


def test_head_job_trains_stores_the_head_and_answers_with_it(ws, cli, tiny_base, tmp_path):
    from tunelab.evaluate import evaluate, resolve_candidate, run_rows
    from tunelab.models import load_model
    from tunelab.models.base import Request
    from tunelab.models.local.head import HeadModel

    r = cli(*head_args(tiny_base, "hd", "--epochs", "3", "--json"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "done" and out["config"]["head"] == "classify" and out["steps"] == 18
    assert "lora + classification head" in r.stderr and "linear head over 2 labels" in r.stderr
    with ws.store.session() as s:
        row = s.scalars(select(FineTuneRow)).one()
    curves = row.result["curves"]
    losses = [t["loss"] for t in curves["train_curve"]]
    assert sum(losses[-6:]) < sum(losses[:6])  # learning happened: the last epoch below the first
    assert all(e["metric_name"] == "accuracy" for e in curves["eval_curve"])
    adapter = ws.artifacts_dir / row.path / "adapter"
    meta = json.loads((adapter / "label_head.json").read_text())
    assert meta["labels"] == ["ham", "spam"] and meta["hidden_size"] == 32  # the prompt's label order
    assert (adapter / "label_head.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert json.loads((ws.artifacts_dir / row.path / "metadata.json").read_text())["head"] == {"kind": "classify",
                                                                                              "labels": 2}
    model = load_model("ft:hd", ws)
    assert isinstance(model, HeadModel) and model.labels == ["ham", "spam"]
    [c] = model.complete([Request(messages=[{"role": "user", "content": "hi"}], labels=["ham", "spam"],
                                  free_text=True)])
    assert c.text in ("ham", "spam") and c.free_text == c.text
    assert math.isclose(sum(math.exp(v) for v in c.label_logprobs.values()), 1.0, rel_tol=1e-6)
    assert c.text == max(c.label_logprobs, key=c.label_logprobs.get)
    # saved and loaded = trained: the evaluator on the validation split gives the best validation's accuracy
    best = row.result["validation"]
    measured = evaluate(ws, resolve_candidate(ws, "ft:hd"), "sms:validation", progress=False)
    assert measured.metrics["accuracy"]["value"] == pytest.approx(best["metrics"]["accuracy"], abs=1e-4)
    assert measured.metrics["format_valid"]["value"] == 1.0  # a head's only answers are labels
    stored = run_rows(ws, measured.id)
    loss = -sum(r.extra["label_logprobs"][r.expected] for r in stored) / len(stored)
    assert loss == pytest.approx(best["loss"], abs=1e-4)  # the head's cross-entropy, as validation measured it
    # export: the adapter carries the head; merged weights or GGUF would lose it
    r = cli("export", "ft:hd", "--format", "adapter", "--out", tmp_path / "a")
    assert r.exit_code == 0 and (tmp_path / "a" / "label_head.json").is_file()
    for fmt in ("merged", "gguf"):
        r = cli("export", "ft:hd", "--format", fmt, "--out", tmp_path / fmt)
        assert r.exit_code == 2 and "classification-head" in r.stderr and "--format adapter" in r.stderr


def test_a_head_answers_labels_only_and_a_subset_renormalized(ws, cli, tiny_base):
    from tunelab.models import load_model
    from tunelab.models.base import Request

    assert cli(*head_args(tiny_base, "hd", "--max-steps", "2", "--max-val-examples", "4")).exit_code == 0
    model = load_model("ft:hd", ws)
    msg = [{"role": "user", "content": "WIN a prize"}]
    with pytest.raises(UserError, match="answers label outputs only"):
        model.complete([Request(messages=msg)])
    with pytest.raises(UserError, match="knows none of the labels"):
        model.complete([Request(messages=msg, labels=["billing", "bug"])])
    [c] = model.complete([Request(messages=msg, labels=["spam", "other"])])  # unknown labels are not scored
    assert c.text == "spam" and c.label_logprobs == {"spam": 0.0}
    r = cli("eval", "reply", "--model", "ft:hd", "--data", "sms:test", "--limit", "2")
    assert r.exit_code == 2 and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    assert "answers label outputs only" in r.stderr


def test_an_interrupted_head_run_resumes_with_its_head(ws, cli, tiny_base, monkeypatch):
    import torch

    real_step = power_cut_at(monkeypatch, 5)
    args = head_args(tiny_base, "cut", "--epochs", "1", "--save-every-steps", "2")
    with pytest.raises(RuntimeError, match="power cut"):
        cli(*args)
    with ws.store.session() as s:
        row = s.scalars(select(FineTuneRow)).one()
    last = ws.artifacts_dir / row.path / "checkpoints" / "last"
    assert row.status == "failed" and json.loads((last / "trainer_state.json").read_text())["step"] == 4
    saved = torch.load(last / "weights.pt", weights_only=True)
    assert saved["label_head.weight"].shape == (2, 32)  # the head is checkpointed with the adapter
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    r = cli(*args, "--resume", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steps"] == 6 and "resuming at step 4/6" in r.stderr
    assert (ws.artifacts_dir / out["path"] / "adapter" / "label_head.safetensors").is_file()


def test_resume_continues_exactly_where_an_uninterrupted_head_run_ends(ws, tiny_base):
    """Same seed, same data: a run cut after its checkpoint and resumed ends with the head weights
    of a run never cut."""
    import torch
    from safetensors.torch import load_file

    from tunelab.finetune import FineTuneConfig, finetune

    settings = dict(data="sms", prompt="spam", base=str(tiny_base), head="classify", precision="fp32", lr=0.01,
                    epochs=1, save_every_steps=3, lora_dropout=0.0, max_val_examples=4)
    finetune(ws, FineTuneConfig(name="whole", **settings), progress=False)
    with pytest.MonkeyPatch.context() as mp:
        power_cut_at(mp, 4)
        with pytest.raises(RuntimeError):
            finetune(ws, FineTuneConfig(name="cut", **settings), progress=False)
    finetune(ws, FineTuneConfig(name="cut", **settings), resume=True, progress=False)
    heads = [load_file(str(ws.artifacts_dir / "finetunes" / n / "adapter" / "label_head.safetensors"))
             for n in ("whole", "cut")]
    assert torch.allclose(heads[0]["weight"], heads[1]["weight"], atol=1e-6)


@pytest.mark.parametrize("extra, words", [
    (["--head", "regress"], ["field 'head'", "classify"]),
    (["--head", "classify", "--method", "full"], ["use --method lora"]),
    (["--head", "classify", "--launcher", "accelerate"], ["use --launcher local"]),
    (["--head", "classify", "--prompt", "reply"], ["label outputs", "text output"]),
])
def test_bad_head_settings_exit_2_and_register_nothing(ws, cli, tiny_base, extra, words):
    args = ["finetune", "--data", "sms", "--prompt", "spam", "--name", "bad", "--base", str(tiny_base)]
    r = cli(*args, *extra)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error:") and "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in r.stderr, r.stderr
    assert nothing_left(ws, "bad")


def test_a_head_needs_two_labels_in_train(ws, cli, tiny_base):
    save_dataset(ws, "one", {"train": [Example(f"hi {i}", "ham") for i in range(10)], "validation": examples(4)})
    r = cli("finetune", "--data", "one", "--prompt", "spam", "--name", "bad", "--base", str(tiny_base), "--head",
            "classify", "--batch-size", "2")
    assert r.exit_code == 2 and "at least 2 distinct labels" in r.stderr and rows(ws) == 0


def test_a_damaged_head_is_a_one_line_error_naming_the_file(ws, cli, tiny_base):
    from tunelab.models import clear_loaded

    assert cli(*head_args(tiny_base, "hd", "--max-steps", "1", "--max-val-examples", "2")).exit_code == 0
    path = ws.artifacts_dir / "finetunes" / "hd" / "adapter" / "label_head.json"
    for text in ("{not json", json.dumps({"labels": ["ham"]}), json.dumps({"labels": ["a", "a"]})):
        path.write_text(text)
        clear_loaded()
        r = cli("eval", "ft:hd", "--data", "sms:test", "--limit", "2")
        assert r.exit_code == 2 and str(path) in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
