"""Fine-tuning the bundled SmolLM2 on small slices of the spam set: learning happens (the loss falls,
the LoRA weights move, the frozen base does not), `ft:NAME` evaluates and generates, and a run
killed with SIGKILL halfway ends, after --resume, where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import select

from tests.prompts import SPAM_PROMPT as PROMPT
from tunelab.datasets import Example, save_dataset
from tunelab.store.models import FineTuneRow

pytestmark = pytest.mark.realmodel


def read(folder, split: str, n: int) -> list[Example]:
    with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
        rows = [Example.from_dict(json.loads(line)) for line in f]
    spam = [r for r in rows if r.output == "spam"]
    ham = [r for r in rows if r.output == "ham"]
    k = n // 3  # a third spam, so a few steps see both labels
    return spam[:k] + ham[:n - k]


@pytest.fixture
def ws(workspace, shared_data):
    src = shared_data / "sms_spam"
    save_dataset(workspace, "sms", {"train": read(src, "train", 48), "validation": read(src, "validation", 12),
                                    "test": read(src, "test", 12)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    return workspace


def train_and_compare(p, run_dir):
    """Train the plan `p` as `train()` does; returns (validation loss before, the trainer state, LoRA
    tensors that moved, frozen tensors that moved), checking every LoRA tensor trains and nothing else."""
    import torch

    from tunelab.finetune.train import load_for_training, train
    from tunelab.finetune.validate import make_validator

    model, tok = load_for_training(p.base_dir, p.config)
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    validate = make_validator(p.val_items, tok, bf16=True)
    model.eval()
    with torch.no_grad():
        loss_before = validate(model)["loss"]
    model.train()
    state = train(model, tok, p.train_items, validate, p.config, run_dir, progress=False).state
    lora_moved = frozen_moved = 0
    for n, t in model.named_parameters():
        moved = not torch.equal(before[n], t.detach())
        assert t.requires_grad == ("lora_" in n), n
        if "lora_" in n:
            lora_moved += moved
        else:
            frozen_moved += moved
    return loss_before, state, lora_moved, frozen_moved


def test_lora_learns_and_leaves_the_base_frozen(ws, bundled_model_dir, tmp_path):
    from tunelab.finetune import FineTuneConfig, plan

    p = plan(ws, FineTuneConfig(data="sms", prompt="spam", name="unit", lr=1e-3, batch_size=8, max_examples=32,
                                epochs=1, patience=None))
    loss_before, state, changed_lora, frozen_moved = train_and_compare(p, tmp_path / "run")
    assert state["step"] == 4 and state["tokens"] > 0
    loss_after = state["eval_curve"][-1]["loss"]
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    assert changed_lora >= 60 and frozen_moved == 0  # 30 layers x 4 modules, A or B of each moved


def test_finetune_then_eval_and_generate(ws, cli):
    from tunelab.models import load_model
    from tunelab.models.base import Request

    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "spam", "--max-examples", "32", "--epochs",
            "1", "--lr", "1e-3", "--max-val-examples", "12", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["steps"] == 4 and out["validation"]["metric_name"] == "accuracy"
    train_curve = out.get("curves") or json.loads((ws.artifacts_dir / out["path"] / "curves.json").read_text())
    losses = [t["loss"] for t in train_curve["train_curve"]]
    assert losses[-1] < losses[0]
    r = cli("eval", "ft:spam", "--data", "sms:test", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["metrics"]["accuracy"]["n"] == 12
    model = load_model("ft:spam", ws)
    [c] = model.complete([Request(messages=[{"role": "user", "content": PROMPT.split("user:\n")[1]
                                              .replace("{{ input }}", "WIN a free cruise! Text WIN now")}],
                                  max_tokens=8)])
    assert c.text.strip() and c.completion_tokens >= 1


# -- SIGKILL halfway, then --resume ------------------------------------------------------------------

# The real `tunelab` entry point; after the checkpoint of step KILL_AT is written the process kills
# itself with SIGKILL (no cleanup, no exception handlers: as if the machine lost power).
KILLING_TUNELAB = (
    "import os, signal, sys\n"
    "from tunelab.finetune import checkpoint\n"
    "_save = checkpoint.save\n"
    "def save(target, model, optimizer, scheduler, state):\n"
    "    _save(target, model, optimizer, scheduler, state)\n"
    "    if state['step'] >= int(os.environ['KILL_AT']):\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "checkpoint.save = save\n"
    "from tunelab.cli import main\n"
    "sys.argv = ['tunelab', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.mark.slow
def test_sigkill_halfway_then_resume_ends_like_an_uninterrupted_run(ws, cli):
    args = ["--data", "sms", "--prompt", "spam", "--max-examples", "24", "--batch-size", "4", "--epochs", "1",
            "--lr", "1e-3", "--save-every-steps", "1", "--max-val-examples", "8"]
    env = {**os.environ, "TUNELAB_WORKSPACE": str(ws.root), "KILL_AT": "3"}
    proc = subprocess.run([sys.executable, "-c", KILLING_TUNELAB, "finetune", "--name", "killed", *args],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with ws.store.session() as s:
        row = s.scalar(select(FineTuneRow).where(FineTuneRow.name == "killed"))
    assert row.status == "running"  # it never got to say anything
    last = ws.artifacts_dir / row.path / "checkpoints" / "last" / "trainer_state.json"
    assert json.loads(last.read_text())["step"] == 3  # half of 6 steps
    r = cli("finetune", "--name", "killed", "--resume", *args, "--json")
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    r = cli("finetune", "--name", "whole", *args, "--json")
    assert r.exit_code == 0, r.output
    whole = json.loads(r.stdout)
    assert resumed["steps"] == whole["steps"] == 6
    assert resumed["tokens_trained"] == whole["tokens_trained"]  # the same batches, none twice
    curve = lambda res: json.loads((ws.artifacts_dir / res["path"] / "curves.json").read_text())  # noqa: E731
    a, b = curve(resumed), curve(whole)
    for x, y in zip(a["train_curve"], b["train_curve"]):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=0.05)
    assert resumed["validation"]["loss"] == pytest.approx(whole["validation"]["loss"], abs=0.05)
    assert abs(resumed["validation"]["metric"] - whole["validation"]["metric"]) <= 1 / 8


INTENTS = ["alarm", "balance", "book_flight", "calories", "translate", "weather"]
INTENT_PROMPT = """---
output: {type: label, labels: [alarm, balance, book_flight, calories, translate, weather]}
---
user:
Classify the intent of this message.

Message: {{ input }}
"""


def test_a_head_finetune_raises_accuracy_and_evaluates(workspace, shared_data, cli):
    """`--head classify` on six clinc150 intents (10 train examples each): validation accuracy rises
    from the first validation (4 steps in) to the best, and `ft:NAME` evaluates on the test split
    well above chance (1/6), answering with the head."""
    src = shared_data / "clinc150"

    def split(name: str, per_label: int) -> list[Example]:
        rows = [Example.from_dict(json.loads(line)) for line in (src / f"{name}.jsonl").read_text().splitlines()]
        return [r for label in INTENTS for r in [r for r in rows if r.output == label][:per_label]]

    save_dataset(workspace, "intents", {"train": split("train", 10), "validation": split("validation", 2),
                                        "test": split("test", 3)})
    (workspace.prompts_dir / "intent.prompt").write_text(INTENT_PROMPT)
    r = cli("finetune", "--data", "intents", "--prompt", "intent", "--name", "ih", "--head", "classify",
            "--epochs", "2", "--lr", "3e-3", "--eval-every-steps", "4", "--patience", "10", "--json")
    assert r.exit_code == 0, r.output
    with workspace.store.session() as s:
        row = s.scalars(select(FineTuneRow)).one()
    evals = row.result["curves"]["eval_curve"]
    first, best = evals[0], row.result["validation"]
    assert first["step"] == 4 and best["metric"] > first["metric"] + 0.2, [e["metric"] for e in evals]
    train = [t["loss"] for t in row.result["curves"]["train_curve"]]
    assert sum(train[-4:]) < 0.7 * sum(train[:4])  # from about ln 6 = 1.8 per example down
    r = cli("eval", "ft:ih", "--data", "intents:test", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    accuracy = result["metrics"]["accuracy"]
    assert accuracy["lo"] > 1 / 6 and accuracy["value"] >= 0.6, accuracy
