"""Scale-out training: the same LoRA fine-tune in one process and in two processes started by
`accelerate launch` (DDP on CPU with gloo) ends at the same losses, and rank 0 alone writes the
store row and the artifacts. The global batch is the same in both: each of the 2 processes trains
on half of every batch, and their gradients are summed."""

from __future__ import annotations

import json
import random

import pytest
from sqlalchemy import select

from tests.prompts import SPAM_PROMPT as PROMPT
from tunelab.datasets import Example, save_dataset
from tunelab.finetune.distributed import shard
from tunelab.finetune.launch import command
from tunelab.finetune.config import FineTuneConfig
from tunelab.store.models import FineTuneRow


SPAM = ["WIN a free prize now, call 0800", "URGENT! claim your cash reward", "Free entry: text WIN to 8007"]
HAM = ["see you at lunch", "can you pick up milk?", "running late, 10 min", "ok sounds good"]


def examples(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(f"{rng.choice(SPAM)} #{i}", "spam") if i % 3 == 0 else Example(f"{rng.choice(HAM)} ({i})", "ham")
            for i in range(n)]


def test_the_launch_command(tmp_path):
    cfg = FineTuneConfig(name="x", launcher="accelerate", num_processes=4)
    cmd = command(cfg, tmp_path / "p.json", port=29555)
    assert cmd[1:3] == ["-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "4" and "--multi_gpu" in cmd
    assert cmd[cmd.index("--main_process_port") + 1] == "29555"
    assert cmd[-3:] == ["-m", "tunelab.finetune.worker", str(tmp_path / "p.json")]
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text("distributed_type: FSDP\nnum_processes: 8\n")
    cmd = command(cfg.model_copy(update={"accelerate_config": str(fsdp)}), tmp_path / "p.json")
    assert cmd[cmd.index("--config_file") + 1] == str(fsdp) and "--multi_gpu" not in cmd  # the file decides


def test_a_missing_accelerate_config_is_a_user_error(workspace, cli):
    r = cli("finetune", "--data", "x", "--prompt", "p", "--name", "n", "--launcher", "accelerate",
            "--num-processes", "2", "--accelerate-config", "nope.yaml")
    assert r.exit_code == 2 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr


def test_shards_cover_a_batch_once():
    batch = list(range(11))
    parts = [shard(batch, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == batch and [len(p) for p in parts] == [4, 4, 3]


@pytest.mark.realmodel
@pytest.mark.slow
def test_two_processes_train_like_one(workspace, cli):
    save_dataset(workspace, "sms", {"train": examples(32, 0), "validation": examples(8, 1)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    common = ["--data", "sms", "--prompt", "spam", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3",
              "--lora-r", "4", "--lora-dropout", "0", "--target-modules", "q_proj,v_proj", "--json"]
    one = cli("finetune", "--name", "one", *common)
    assert one.exit_code == 0, one.output
    two = cli("finetune", "--name", "two", "--launcher", "accelerate", "--num-processes", "2", *common)
    assert two.exit_code == 0, two.output
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert b["model"] == "ft:two" and b["status"] == "done" and b["steps"] == a["steps"] == 4
    assert b["tokens_trained"] == a["tokens_trained"]  # every example once: the ranks' shares add up
    with workspace.store.session() as s:
        rows = {r.name: r for r in s.scalars(select(FineTuneRow))}
    assert set(rows) == {"one", "two"} and rows["two"].status == "done"  # one row, written by rank 0
    curve_a = [t["loss"] for t in rows["one"].result["curves"]["train_curve"]]
    curve_b = [t["loss"] for t in rows["two"].result["curves"]["train_curve"]]
    assert curve_b == pytest.approx(curve_a, rel=0.05)  # the same steps, up to float rounding
    assert curve_a[-1] < curve_a[0]  # and it learned
    assert b["validation"]["loss"] == pytest.approx(a["validation"]["loss"], rel=0.05)
    assert (workspace.artifacts_dir / "finetunes" / "two" / "adapter" / "adapter_config.json").is_file()
    assert "accelerate launch" in two.stderr and "--num_processes 2" in two.stderr
