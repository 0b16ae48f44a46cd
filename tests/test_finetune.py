"""Fine-tuning without the real model: the config schema, the data pipeline, checkpoints, and the
whole job on a tiny random Llama (SmolLM2's tokenizer, 2 layers of width 32) so it runs in seconds.

Bad input must give a one-line error, exit status 2 and leave nothing registered."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from sqlalchemy import func, select

from tests.prompts import SPAM_PROMPT as PROMPT
from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.finetune import FineTuneConfig, load_config
from tunelab.finetune.config import default_epochs, field_help, resolve
from tunelab.datasets import subsample
from tunelab.finetune.data import IGNORE, Tokenized, collate, common_prefix, epoch_batches, micro_batches, truncate
from tunelab.store.models import FineTuneRow


SPAM = ["WIN a free prize now, call 0800", "URGENT! claim your cash reward", "Free entry: text WIN to 8007",
        "You have won a holiday, reply YES"]
HAM = ["see you at lunch", "can you pick up milk?", "running late, 10 min", "thanks for yesterday!",
       "what time is the game", "ok sounds good"]


def examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(Example(f"{rng.choice(SPAM)} #{i}", "spam"))
        else:
            out.append(Example(f"{rng.choice(HAM)} ({i})", "ham"))
    return out


# -- the config schema ------------------------------------------------------------------------------

def test_config_file_and_flags_share_one_schema(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("data: spam\nprompt: spam\nname: a\nlr: 0.001\nepochs: 2\ntarget_modules: q_proj,v_proj\n")
    cfg = load_config(path, {"epochs": 5, "batch_size": None})  # a flag given overrides; None = not given
    assert (cfg.lr, cfg.epochs, cfg.batch_size) == (0.001, 5, 8)
    assert cfg.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize("text, words", [
    ("lr: 0.1\nlearning_rate: 3\n", ["unknown key 'learning_rate'"]),
    ("lr: -0.001\n", ["field 'lr'", "positive"]),
    ("lora_r: 0\n", ["field 'lora_r'"]),
    ("method: qlora\n", ["field 'method'"]),
    ("- a\n- b\n", ["expected a mapping"]),
    ("lr: [1\n", ["YAML error"]),
])
def test_config_errors_name_the_file_and_field(tmp_path, text, words):
    path = tmp_path / "ft.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for w in words:
        assert w in message


def test_every_field_has_help_and_a_cli_flag():
    import inspect

    from tunelab.cli.finetune import finetune

    params = set(inspect.signature(finetune).parameters)
    for name, info in FineTuneConfig.model_fields.items():
        assert info.description, name
        assert name in params, f"config field {name} has no CLI flag"
    assert "(default: 8)" in field_help("batch_size")


def test_defaults_come_from_the_data():
    assert [default_epochs(n) for n in (200, 1000, 1001, 5000, 20000)] == [3, 3, 2, 2, 1]
    small = resolve(FineTuneConfig(), n_train=400, longest=90)
    assert (small.epochs, small.lr, small.max_length, small.max_steps) == (3, 1e-3, 90, None)
    assert resolve(FineTuneConfig(method="full"), 400, 90).lr == 2e-5
    assert resolve(FineTuneConfig(), 400, 5000).max_length == 1024
    huge = resolve(FineTuneConfig(batch_size=1), n_train=50_000, longest=60)
    assert huge.epochs == 1 and huge.max_steps == 2000  # a cap on the total steps
    mine = resolve(FineTuneConfig(epochs=7, lr=0.01, max_length=64), 400, 90)
    assert (mine.epochs, mine.lr, mine.max_length) == (7, 0.01, 64)  # what the user set is kept
    # label outputs: few examples per label get more epochs (each label seen ~150 times, at most 8)
    assert [default_epochs(2000, n) for n in (2, 8, 20, 77, 151)] == [2, 2, 2, 6, 8]
    assert default_epochs(400, 2) == 3 and default_epochs(400, 40) == 8
    # examples per label: the median label's count, not the mean — legal_unfair_tos's 2,000 sentences
    # average 222 a label, but eight of its nine labels have 7 to 51 (median 20): 150 / 20 -> 8
    legal = [1813, 51, 37, 28, 20, 17, 14, 13, 7]
    assert default_epochs(2000, 9) == 2 and default_epochs(2000, 9, legal) == 8
    assert default_epochs(2000, 2, [1740, 260]) == 2  # sms_spam: 1,000 a label by the median, the size rule
    assert default_epochs(2000, 151, [13] * 151) == default_epochs(2000, 151) == 8  # balanced: the same
    assert default_epochs(2000, 3, [1000, 990, 10]) == 2  # the median label is well covered
    assert default_epochs(300, 3, [0, 0, 300]) == 8  # labels without train examples count as 0
    assert resolve(FineTuneConfig(), 2000, 60, n_labels=9, label_counts=legal).epochs == 8
    intents = resolve(FineTuneConfig(), n_train=2000, longest=60, n_labels=151)
    assert intents.epochs == 8 and intents.max_steps is None  # 250 steps an epoch: within the cap
    assert resolve(FineTuneConfig(batch_size=1), 2000, 60, n_labels=151).epochs == 1  # the step cap still rules


# -- the data pipeline ------------------------------------------------------------------------------

def test_batches_group_by_length_are_seeded_and_cover_every_example():
    rng = random.Random(1)
    lengths = [rng.randint(10, 300) for _ in range(1000)]
    a = epoch_batches(lengths, 8, seed=3, epoch=0)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=0)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in a)
    random_order = list(range(1000))
    rng.shuffle(random_order)
    unsorted = sum(len(random_order[i:i + 8]) * max(lengths[j] for j in random_order[i:i + 8])
                   for i in range(0, 1000, 8))
    assert padded < 0.7 * unsorted  # grouping by length removes most of the padding
    assert padded < 1.1 * sum(lengths)


def test_micro_batches_keep_under_the_token_budget():
    lengths = [300, 290, 280, 100, 90, 80, 70, 60]
    pieces = micro_batches(list(range(8)), lengths, 600)
    assert sorted(i for p in pieces for i in p) == list(range(8))
    for p in pieces:
        assert len(p) * max(lengths[i] for i in p) <= 600 or len(p) == 1


def test_micro_batches_count_a_shared_prefix_once():
    lengths = [300, 290, 280, 250, 240, 230, 220, 210]
    plain = micro_batches(list(range(8)), lengths, 600)
    shared = micro_batches(list(range(8)), lengths, 600, shared=200)  # computed once per piece
    assert sorted(i for p in shared for i in p) == list(range(8))
    for p in shared:
        assert 200 + len(p) * (max(lengths[i] for i in p) - 200) <= 600 or len(p) == 1
    assert (len(plain), len(shared)) == (4, 2)


def test_common_prefix_stops_before_the_first_completion():
    head = [7, 8, 9, 10]
    items = [Tokenized(head + [1, 2, 3], 6), Tokenized(head + [1, 4], 5), Tokenized(head + [5, 6, 7], 5)]
    assert common_prefix(items) == 4  # the 5th tokens differ
    assert common_prefix(items[:2]) == 4  # they agree on [1] too, but position 4 predicts item 2's completion
    assert common_prefix(items[:1]) == 0
    assert common_prefix([Tokenized([3] + head, 3), Tokenized(head, 2)]) == 0


def test_collate_masks_prompt_and_padding():
    items = [Tokenized([5, 6, 7, 8, 9], 3), Tokenized([5, 6, 10], 2)]
    batch = collate(items, pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 6, 10, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 8, 9], [IGNORE, IGNORE, 10, IGNORE, IGNORE]]


def test_truncate_keeps_instruction_header_and_completion():
    item = Tokenized(list(range(100)) + [500, 501], 100)
    cut = truncate(item, 30, keep_tail=8)
    assert len(cut) == 30 and cut.truncated
    assert cut.input_ids[-2:] == [500, 501] and cut.n_prompt == 28
    assert cut.input_ids[:20] == list(range(20)) and cut.input_ids[20:28] == list(range(92, 100))
    assert truncate(item, 200) is item


def test_max_examples_takes_a_seeded_sample_in_order():
    items = [Example(f"text {i}", f"a free answer number {i} with no labels") for i in range(100)]
    s = subsample(items, 10, seed=4)
    order = [items.index(e) for e in s]
    assert order == sorted(order) and s == subsample(items, 10, seed=4) and len(s) == 10
    assert subsample(items, None, 0) == items


# -- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_rename_is_atomic(tmp_path):
    from tunelab.finetune.checkpoint import STATE_FILE, _replace_dir, find

    target = tmp_path / "last"
    for step in (1, 2):
        tmp = tmp_path / ".tmp-last"
        tmp.mkdir()
        (tmp / STATE_FILE).write_text(json.dumps({"step": step}))
        _replace_dir(tmp, target)
    assert json.loads((find(target) / STATE_FILE).read_text())["step"] == 2
    # a crash between "old moved away" and "new renamed in" leaves the old copy, which is found
    target.rename(tmp_path / ".old-last")
    assert find(target) == tmp_path / ".old-last"
    shutil.rmtree(tmp_path / ".old-last")
    assert find(target) is None


# -- the whole job on a tiny model ------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, bundled_model_dir):
    """A 2-layer Llama of width 32 with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def ws(workspace):
    save_dataset(workspace, "sms", {"train": examples(48), "validation": examples(12, seed=1),
                                    "test": examples(12, seed=2)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    return workspace


def rows(ws) -> int:
    with ws.store.session() as s:
        return s.scalar(select(func.count()).select_from(FineTuneRow))


def nothing_left(ws, name: str) -> bool:
    return rows(ws) == 0 and not (ws.artifacts_dir / "finetunes" / name).exists()


@pytest.mark.parametrize("extra, words", [
    (["--lr", "-0.001"], ["lr", "positive"]),
    (["--lora-r", "0"], ["lora_r"]),
    (["--batch-size", "64"], ["batch size 64", "48 training examples"]),
    (["--epochs", "0"], ["epochs"]),
    (["--method", "qlora"], ["method"]),
    (["--target-modules", "nope_proj"], ["target_modules", "q_proj"]),
    (["--base", "/nonexistent/model"], ["no such model folder"]),
])
def test_bad_hyperparameters_exit_2_and_register_nothing(ws, cli, tiny_base, extra, words):
    args = ["finetune", "--data", "sms", "--prompt", "spam", "--name", "bad"]
    if "--base" not in extra:
        args += ["--base", str(tiny_base)]
    r = cli(*args, *extra)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error:") and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
    for w in words:
        assert w in r.stderr
    assert nothing_left(ws, "bad")


def test_bad_data_exit_2_and_register_nothing(ws, cli, tiny_base):
    save_dataset(ws, "blank", {"train": [Example("hi", "ham"), Example("yo", " ")], "validation": examples(4)})
    save_dataset(ws, "testonly", {"test": examples(12)})
    base = ["--prompt", "spam", "--name", "bad", "--base", str(tiny_base)]
    for args, words in ((["--data", "blank"], ["1 of 2 train examples have no output"]),
                        (["--data", "testonly"], ["no train split"]),
                        (["--data", "nosuch"], ["unknown dataset 'nosuch'"]),
                        (["--data", "sms", "--prompt", "nosuch"], ["unknown prompt 'nosuch'"]),
                        (["--data", "sms", "--name", "bad name!"], ["invalid fine-tune name"]),
                        (["--data", "sms", "--config", "nosuch.yaml"], ["config file not found"])):
        r = cli("finetune", *base, *args)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and len(r.stderr.strip().splitlines()) == 1
        for w in words:
            assert w in r.stderr, r.stderr
    assert rows(ws) == 0 and not (ws.artifacts_dir / "finetunes").exists()


def test_missing_required_settings(ws, cli):
    r = cli("finetune", "--data", "sms", "--name", "x")
    assert r.exit_code == 2 and "missing prompt" in r.stderr


def test_tiny_lora_job_end_to_end(ws, cli, tiny_base, tmp_path):
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.models import load_model
    from tunelab.models.base import Request

    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"base: {tiny_base}\nlr: 0.01\nbatch_size: 8\nepochs: 3\nsave_every_steps: 2\n"
                   "eval_every_steps: 4\nlora_r: 4\n")
    r = cli("finetune", "--config", cfg, "--data", "sms", "--prompt", "spam", "--name", "tiny", "--epochs", "2",
            "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == "ft:tiny" and out["status"] == "done"
    assert out["config"]["epochs"] == 2 and out["config"]["lr"] == 0.01  # flag over file
    assert out["steps"] == 12 and out["n_train"] == 48 and out["n_validation"] == 12
    assert "schedule 2 epochs x 6 steps = 12 steps" in r.stderr  # the resolved config, printed first
    with ws.store.session() as s:
        row = s.scalars(select(FineTuneRow)).one()
    assert row.status == "done" and row.method == "lora" and row.dataset == "sms"
    assert row.tokens_trained == out["tokens_trained"] > 0 and row.wall_s > 0
    assert row.cost == pytest.approx(0.10 * row.wall_s / 3600, rel=1e-3)  # local $0.10/h of tunelab.yaml
    evals = row.result["curves"]["eval_curve"]
    assert [e["step"] for e in evals] == [4, 6, 8, 12]  # every 4 steps and at each epoch's end
    assert all(e["metric_name"] == "accuracy" and 0 <= e["metric"] <= 1 for e in evals)
    train_losses = [t["loss"] for t in row.result["curves"]["train_curve"]]
    assert len(train_losses) == 12 and sum(train_losses[-3:]) < sum(train_losses[:3])
    best = row.result["best"]
    assert best["step"] in [e["step"] for e in evals]
    folder = ws.artifacts_dir / row.path
    for name in ("adapter/adapter_config.json", "curves.png", "curves.json", "metadata.json"):
        assert (folder / name).is_file(), name
    assert not (folder / "checkpoints").exists() and not (folder / "best").exists()
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["prompt_text"] == PROMPT and meta["dataset"].startswith("sms@")
    # ft:NAME is a model every command can use
    model = load_model("ft:tiny", ws)
    assert model.name == "ft:tiny" and model.adapter == folder / "adapter"
    [c] = model.complete([Request(messages=[{"role": "user", "content": "hi"}], max_tokens=4)])
    assert isinstance(c.text, str) and c.completion_tokens >= 1
    result = evaluate(ws, resolve_candidate(ws, "ft:tiny"), "sms:test", progress=False)
    assert result.status == "done" and 0 <= result.metrics["accuracy"]["value"] <= 1
    # the same name again is an error, and nothing changes
    again = cli("finetune", "--config", cfg, "--data", "sms", "--prompt", "spam", "--name", "tiny")
    assert again.exit_code == 2 and "already exists" in again.stderr
    # export: adapter, merged (a standalone HF folder), gguf without llama.cpp -> how to get it
    r = cli("export", "ft:tiny", "--format", "adapter", "--out", tmp_path / "a")
    assert r.exit_code == 0 and (tmp_path / "a" / "adapter_config.json").is_file()
    r = cli("export", "ft:tiny", "--format", "merged", "--out", tmp_path / "m")
    assert r.exit_code == 0 and (tmp_path / "m" / "config.json").is_file()
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    merged = load_model(f"local:{tmp_path / 'm'}", ws, precision="fp32")
    assert merged.complete([Request(messages=[{"role": "user", "content": "hi"}], labels=["ham", "spam"])])
    r = cli("export", "ft:tiny", "--format", "merged", "--out", tmp_path / "m")
    assert r.exit_code == 2 and "already exists" in r.stderr


def test_gguf_export_of_a_llama_model_needs_no_llama_cpp(ws, cli, tiny_base, tmp_path, monkeypatch):
    """tunelab's own converter writes Llama-architecture GGUFs; llama.cpp's scripts are not needed."""
    from gguf import GGUFReader  # a core dependency (the bundled model ships as GGUF)

    from tunelab.models import gguf

    monkeypatch.setattr(gguf, "find_converter", lambda script=gguf.CONVERTER: None)
    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "g", "--base", tiny_base, "--max-steps", "1",
            "--max-val-examples", "2", "--json")
    assert r.exit_code == 0, r.output
    r = cli("export", "ft:g", "--format", "gguf", "--out", tmp_path / "g.gguf")
    assert r.exit_code == 0, r.output
    arch = GGUFReader(str(tmp_path / "g.gguf")).fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    r = cli("export", "ft:nosuch", "--format", "merged", "--out", tmp_path / "x")
    assert r.exit_code == 2 and "unknown fine-tune 'nosuch'" in r.stderr


def test_full_finetune_saves_weights_and_serves_them(ws, cli, tiny_base):
    from tunelab.models import load_model
    from tunelab.models.base import Request

    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "full", "--base", tiny_base,
            "--method", "full", "--epochs", "1", "--lr", "1e-3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["config"]["lr"] == 1e-3 and out["method"] == "full"
    folder = ws.artifacts_dir / out["path"]
    assert (folder / "model" / "config.json").is_file() and not (folder / "adapter").exists()
    model = load_model("ft:full", ws)
    [c] = model.complete([Request(messages=[{"role": "user", "content": "free prize"}], labels=["ham", "spam"])])
    assert c.text in ("ham", "spam")


def power_cut_at(monkeypatch, n: int):
    """The n-th optimizer step from now raises RuntimeError("power cut") (a crash mid-training);
    returns the real step, to put back with `monkeypatch.setattr(torch.optim.AdamW, "step", real)`."""
    import torch

    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("power cut")
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    return real_step


def test_interrupted_run_needs_resume_and_resume_finishes_it(ws, cli, tiny_base, monkeypatch):
    """An exception mid-training marks the row failed and keeps the checkpoint; --resume ends it."""
    import torch

    real_step = power_cut_at(monkeypatch, 5)
    args = ["finetune", "--data", "sms", "--prompt", "spam", "--name", "cut", "--base", tiny_base, "--epochs", "1",
            "--save-every-steps", "2", "--lr", "0.01"]
    with pytest.raises(RuntimeError, match="power cut"):  # not a user error: it propagates
        cli(*args)
    with ws.store.session() as s:
        row = s.scalars(select(FineTuneRow)).one()
    assert row.status == "failed" and "power cut" in row.result["error"]
    state = json.loads((ws.artifacts_dir / row.path / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert state["step"] == 4
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    r = cli(*args)
    assert r.exit_code == 2 and "--resume" in r.stderr
    import fcntl

    with open(ws.artifacts_dir / row.path / ".lock", "a+") as held:  # another trainer at work
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = cli(*args, "--resume")
        assert r.exit_code == 2 and "being trained by another process" in r.stderr
    r = cli(*args, "--resume", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["status"] == "done" and out["steps"] == 6
    assert json.loads((ws.artifacts_dir / out["path"] / "metadata.json").read_text())["segments"] == 2
    assert "resuming at step 4/6" in r.stderr


def test_gradient_checkpointing_trains_the_same(tiny_base):
    """Recomputing activations changes memory, not the result."""
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.data import collate
    from tunelab.finetune.train import completion_loss, load_for_training

    items = [Tokenized(list(range(5, 25)), 12), Tokenized(list(range(30, 42)), 8)]
    batch = collate(items, pad_id=2)
    grads = []
    for ckpt in (False, True):
        model, _ = load_for_training(tiny_base, FineTuneConfig(gradient_checkpointing=ckpt, lora_dropout=0.0,
                                                                   precision="fp32"))
        model.train()
        loss, n = completion_loss(model, batch, bf16=False)
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert (grads[0][k] - grads[1][k]).abs().max() < 1e-5, k


def test_chunked_loss_equals_the_whole_loss_and_its_gradients(tiny_base, monkeypatch):
    """The vocabulary projection a few positions at a time (recomputed in the backward pass) gives
    the loss and the gradients of the projection done at once."""
    from tunelab.finetune import train as tr
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.data import collate

    items = [Tokenized(list(range(5, 25)), 6), Tokenized(list(range(30, 42)), 3)]
    batch = collate(items, pad_id=2)
    model, _ = tr.load_for_training(tiny_base, FineTuneConfig(lora_dropout=0.0, precision="fp32"))
    model.train()
    vocab = model.config.get_text_config().vocab_size
    results = []
    for chunk_logits in (1 << 30, 5 * vocab):  # everything at once; 16 positions a chunk (the floor)
        monkeypatch.setattr(tr, "LOSS_CHUNK_LOGITS", chunk_logits)
        model.zero_grad()
        loss, n = tr.completion_loss(model, batch, bf16=False)
        (loss / n).backward()
        results.append((float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    assert tr.loss_chunk_rows(vocab) == 16 and results[0][1] == 14 + 9 and results[0][1] > 16
    assert abs(results[0][0] - results[1][0]) < 1e-4 * abs(results[0][0])
    for k, g in results[0][2].items():
        assert (g - results[1][2][k]).abs().max() < 1e-6, k


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lora_in_bf16_loads_linears_in_bf16_and_everything_else_exactly(tiny_base, tmp_path, monkeypatch, arch):
    """LoRA in bf16 loads the frozen linears in bf16 directly (no fp32 copy of the whole model on the
    way) and restores the rest in fp32 from the files (embeddings, norms) or from the float a buffer
    was made of (Gemma 3's embed_scale): the tensors of an fp32 load whose frozen linears are cast,
    but the adapters' first draw, which PEFT makes over the base layer's dtype (rounded to bf16)."""
    import torch

    from tunelab.finetune import train as tr
    from tunelab.finetune.config import FineTuneConfig

    base = tiny_base
    if arch == "gemma3":
        from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

        base = tmp_path / "tiny-gemma3"
        tok = AutoTokenizer.from_pretrained(tiny_base)
        torch.manual_seed(0)
        Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=len(tok), hidden_size=40, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16, sliding_window=16, pad_token_id=tok.pad_token_id)
                          ).save_pretrained(base)
        tok.save_pretrained(base)
    config = FineTuneConfig(precision="bf16", lora_dropout=0.0, target_modules=["q_proj", "v_proj"])

    def state(model):
        return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}

    new = state(tr.load_for_training(base, config)[0])
    monkeypatch.setattr(tr, "restore_fp32", lambda model, base_dir: False)  # the fp32 load, then the cast
    old = state(tr.load_for_training(base, config)[0])
    assert new.keys() == old.keys()
    bf16 = tr.use_bf16("bf16")
    embedding = next(k for k in new if k.endswith("embed_tokens.weight"))
    assert new[embedding].dtype == torch.float32
    assert next(v for k, v in new.items() if k.endswith("k_proj.weight")).dtype == (torch.bfloat16 if bf16
                                                                                     else torch.float32)
    for key in new:
        assert new[key].dtype == old[key].dtype, key
        if "lora_A" in key and bf16:
            assert torch.equal(new[key], old[key].bfloat16().float()), key
        else:
            assert torch.equal(new[key], old[key]), key
    if arch == "gemma3":
        scale = next(k for k in new if k.endswith("embed_scale"))
        assert torch.equal(new[scale], torch.tensor(40 ** 0.5))  # fp32, from the float itself


def test_the_validation_copy_takes_the_embedding_straight_to_the_served_precision(tiny_base):
    """The inference copy validation evaluates is built without an fp32 copy of the frozen embedding:
    the clone's embedding (tied to its output layer) is the training one rounded to bf16, and the
    training model keeps its fp32 embedding untouched."""
    import torch

    from tunelab.finetune import train as tr
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.validate import inference_copy

    model, _ = tr.load_for_training(tiny_base, FineTuneConfig(precision="bf16", lora_dropout=0.0))
    before = model.get_input_embeddings().weight.detach().clone()
    clone = inference_copy(model, "bf16")
    emb = clone.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, before.to(torch.bfloat16))
    assert clone.get_output_embeddings().weight is emb  # still tied
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.equal(model.get_input_embeddings().weight, before)
    assert not any("lora" in name for name, _ in clone.named_parameters())  # merged


def test_the_validation_metric_is_what_eval_measures_on_the_validation_split(ws, cli, tiny_base):
    """Served = measured for training too: the metric the best checkpoint was kept for (the inference
    copy validation builds, bf16) is what `tunelab eval ft:NAME` measures on the same split."""
    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "vm", "--base", str(tiny_base),
            "--precision", "bf16", "--lr", "0.01", "--batch-size", "8", "--max-steps", "6",
            "--eval-every-steps", "3", "--patience", "10", "--json")
    assert r.exit_code == 0, r.output
    with ws.store.session() as s:
        row = s.scalars(select(FineTuneRow).where(FineTuneRow.name == "vm")).one()
    best = row.result["validation"]
    r = cli("eval", "ft:vm", "--data", "sms:validation", "--json")
    assert r.exit_code == 0, r.output
    measured = json.loads(r.stdout)["metrics"]
    assert measured["accuracy"]["value"] == pytest.approx(best["metric"], abs=1e-5)  # stored rounded to 5 places
    assert best["metric_name"] == "accuracy"
