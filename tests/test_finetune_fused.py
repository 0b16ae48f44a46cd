"""The fused training pass (`tunelab.finetune.fused`) against transformers + PEFT: in fp32 with no
dropout the completion loss and every LoRA gradient agree to float rounding; in bf16 the loss agrees
within bf16 noise; a model it does not cover falls back to transformers' forward."""

from __future__ import annotations

import pytest

from tests.test_finetune import tiny_base  # noqa: F401  (fixture)
from tunelab.finetune.data import Tokenized, collate


def batch():
    items = [Tokenized(list(range(5, 25)), 12), Tokenized(list(range(30, 42)), 8), Tokenized(list(range(50, 57)), 3)]
    return collate(items, pad_id=2)


def loss_and_grads(base, fused: bool, monkeypatch, precision="fp32", modules="q_proj,k_proj,v_proj,o_proj"):
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
    loss, n = tr.completion_loss(model, batch(), bf16=precision == "bf16")
    (loss / n).backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("modules", ["q_proj,k_proj,v_proj,o_proj", "q_proj,v_proj,gate_proj,up_proj,down_proj"])
def test_fp32_loss_and_gradients_agree_with_transformers(tiny_base, monkeypatch, modules):  # noqa: F811
    plain_loss, plain = loss_and_grads(tiny_base, False, monkeypatch, modules=modules)
    fused_loss, fused = loss_and_grads(tiny_base, True, monkeypatch, modules=modules)
    assert abs(plain_loss - fused_loss) < 1e-4 * abs(plain_loss)
    assert plain.keys() == fused.keys() and plain
    for k in plain:
        assert (plain[k] - fused[k]).abs().max() <= 1e-5 + 1e-4 * plain[k].abs().max(), k


def test_bf16_loss_agrees_within_noise(tiny_base, monkeypatch):  # noqa: F811
    plain_loss, _ = loss_and_grads(tiny_base, False, monkeypatch, precision="bf16")
    fused_loss, _ = loss_and_grads(tiny_base, True, monkeypatch, precision="bf16")
    assert abs(plain_loss - fused_loss) < 0.02 * abs(plain_loss)
