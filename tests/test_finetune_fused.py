"""The fused training pass (`tunelab.finetune.fused`) against transformers + PEFT, on batches with and
without a shared prefix (computed once by the fused pass): in fp32 with no
dropout the completion loss and every LoRA gradient agree to float rounding; in bf16 the loss agrees
within bf16 noise; a model it does not cover falls back to transformers' forward."""

from __future__ import annotations

import pytest

from tests.test_finetune import tiny_base  # noqa: F401  (fixture)
from tunelab.finetune.data import Tokenized, collate


HEAD = list(range(100, 111))  # 11 tokens every row starts with (a system turn and instruction)

BATCHES = {
    "distinct": [Tokenized(list(range(5, 25)), 12), Tokenized(list(range(30, 42)), 8), Tokenized(list(range(50, 57)), 3)],
    # a shared prefix, computed once (`fused.shared_prefix`); rows of different lengths (padding)
    "shared": [Tokenized(HEAD + list(range(5, 17)), 15), Tokenized(HEAD + list(range(30, 36)), 14),
               Tokenized(HEAD + [7, 8, 9], 12)],
    # the common start runs into the completions (two rows alike): the prefix stops at the first read position
    "shared into completions": [Tokenized(HEAD + [60, 61, 62, 63], 12), Tokenized(HEAD + [60, 61, 62, 63], 12),
                                Tokenized(HEAD + [60, 61, 70], 12)],
}


def batch(name="distinct"):
    return collate(BATCHES[name], pad_id=2)


def test_shared_prefix_length():
    import torch

    from tunelab.finetune.fused import shared_prefix

    def keep_of(b):
        select = b["labels"][:, 1:] != -100
        return torch.cat([select, select.new_zeros((select.shape[0], 1))], dim=1)

    assert shared_prefix(batch()["input_ids"], batch()["attention_mask"], keep_of(batch())) == 0
    b = batch("shared")
    assert shared_prefix(b["input_ids"], b["attention_mask"], keep_of(b)) == len(HEAD)
    b = batch("shared into completions")  # position 11 predicts the first completion token: read, not shared
    assert shared_prefix(b["input_ids"], b["attention_mask"], keep_of(b)) == 11
    one = collate(BATCHES["shared"][:1], pad_id=2)
    assert shared_prefix(one["input_ids"], one["attention_mask"], keep_of(one)) == 0


def loss_and_grads(base, fused: bool, monkeypatch, precision="fp32", modules="q_proj,k_proj,v_proj,o_proj",
                   which="distinct"):
    from tunelab.finetune import train as tr
    from tunelab.finetune.config import FineTuneConfig

    monkeypatch.setenv("TUNELAB_FUSED", "1" if fused else "0")
    model, _ = tr.load_for_training(base, FineTuneConfig(lora_dropout=0.0, precision=precision, lora_r=4,
                                                         target_modules=modules, seed=3))
    model.train()
    for name, p in model.named_parameters():  # B starts at zero: give it values so every gradient shows
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    assert (tr.fused_pass(model, precision == "bf16") is not None) == fused
    loss, n = tr.completion_loss(model, batch(which), bf16=precision == "bf16")
    (loss / n).backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", list(BATCHES))
@pytest.mark.parametrize("modules", ["q_proj,k_proj,v_proj,o_proj", "q_proj,v_proj,gate_proj,up_proj,down_proj"])
def test_fp32_loss_and_gradients_agree_with_transformers(tiny_base, monkeypatch, modules, which):  # noqa: F811
    plain_loss, plain = loss_and_grads(tiny_base, False, monkeypatch, modules=modules, which=which)
    fused_loss, fused = loss_and_grads(tiny_base, True, monkeypatch, modules=modules, which=which)
    assert abs(plain_loss - fused_loss) < 1e-4 * abs(plain_loss)
    assert plain.keys() == fused.keys() and plain
    for k in plain:
        assert (plain[k] - fused[k]).abs().max() <= 1e-5 + 1e-4 * plain[k].abs().max(), k


@pytest.mark.parametrize("which", ["distinct", "shared"])
def test_bf16_loss_agrees_within_noise(tiny_base, monkeypatch, which):  # noqa: F811
    plain_loss, _ = loss_and_grads(tiny_base, False, monkeypatch, precision="bf16", which=which)
    fused_loss, _ = loss_and_grads(tiny_base, True, monkeypatch, precision="bf16", which=which)
    assert abs(plain_loss - fused_loss) < 0.02 * abs(plain_loss)
