"""Class balance of the fine-tuning loss (`FineTuneConfig.balance`): each example's weight from its
output's count, the weighted loss on both training passes and the head's, the job's note, the
search's choice of it (searched by the flow for skewed labels judged by macro-F1)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from tests.test_finetune import PROMPT, tiny_base  # noqa: F401  (fixture: a 2-layer Llama)
from tests.test_finetune_fused import BATCHES
from tunelab.finetune.data import balance_weights, collate


def test_weights_follow_the_output_counts():
    outputs = ["a"] * 8 + ["b"] * 2
    full = balance_weights(outputs, 1.0)
    # n / (k * count): 10 / 16 for 'a', 10 / 4 for 'b' (scikit-learn's 'balanced'); their mean is already 1
    assert full[0] == pytest.approx(0.625) and full[-1] == pytest.approx(2.5)
    half = balance_weights(outputs, 0.5)
    assert half[-1] / half[0] == pytest.approx(2.0) and sum(half) / len(half) == pytest.approx(1.0)
    assert balance_weights(outputs, 0.0) == [1.0] * 10
    assert balance_weights(["x", "y", "z"], 1.0) == [1.0] * 3  # outputs that never repeat: nothing to balance


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("which", ["distinct", "shared"])
def test_the_weighted_loss_is_each_rows_loss_times_its_weight(tiny_base, monkeypatch, fused, which):  # noqa: F811
    from tunelab.finetune import train as tr
    from tunelab.finetune.config import FineTuneConfig

    monkeypatch.setenv("TUNELAB_FUSED", "1" if fused else "0")
    model, _ = tr.load_for_training(tiny_base, FineTuneConfig(lora_dropout=0.0, precision="fp32", lora_r=4, seed=3))
    assert (tr.fused_pass(model, False) is not None) == fused
    items = BATCHES[which]
    alone = [float(tr.completion_loss(model, collate([it], pad_id=2), False)[0]) for it in items]
    weights = [0.5, 2.0, 1.25]
    batch = collate([replace(it, weight=w) for it, w in zip(items, weights)], pad_id=2)
    loss, n = tr.completion_loss(model, batch, False)
    assert float(loss) == pytest.approx(sum(w * x for w, x in zip(weights, alone)), rel=1e-4)
    assert n == sum(it.n_completion for it in items)  # terms are counted as they are; weights scale them
    plain, _ = tr.completion_loss(model, collate(items, pad_id=2), False)
    assert float(plain) == pytest.approx(sum(alone), rel=1e-4) and "weights" not in collate(items, pad_id=2)


def test_the_heads_loss_is_weighted_too(monkeypatch):
    import torch

    from tunelab.finetune import head

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    monkeypatch.setattr(head, "last_hidden", lambda model, batch, bf16: logits)
    monkeypatch.setattr(head, "head_of", lambda model: (lambda h: h))
    targets = torch.tensor([0, 1, 0])
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    plain, n = head.head_loss(None, {"targets": targets}, False)
    weighted, _ = head.head_loss(None, {"targets": targets, "weights": torch.tensor([1.0, 3.0, 0.5])}, False)
    assert n == 3 and float(plain) == pytest.approx(float(each.sum()))
    assert float(weighted) == pytest.approx(float(each[0] + 3 * each[1] + 0.5 * each[2]))


def test_a_balanced_fine_tune_says_its_weights_and_trains(workspace, cli, tiny_base):  # noqa: F811
    from tunelab.datasets import Example, save_dataset

    skewed = [Example(f"message {i} about the weather", "ham") for i in range(18)] + \
        [Example(f"WIN a prize now {i}", "spam") for i in range(6)]
    save_dataset(workspace, "skew", {"train": skewed, "validation": skewed[:6] + skewed[-2:], "test": skewed[:4]})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    r = cli("finetune", "--data", "skew", "--prompt", "spam", "--name", "bal", "--base", str(tiny_base),
            "--balance", "1", "--max-steps", "2", "--batch-size", "4", "--json")
    assert r.exit_code == 0, r.stderr
    # 24 examples over 2 outputs: 'ham' 24/36, 'spam' 24/12
    assert "class balance 1: loss weights 0.67 (the most frequent output) to 2.00 (the rarest)" in r.stderr
    out = json.loads(r.stdout)
    assert out["status"] == "done" and out["config"]["balance"] == 1.0
    assert out["steps"] == 2 and math.isfinite(out["validation"]["loss"])
    bad = cli("finetune", "--data", "skew", "--prompt", "spam", "--name", "bad", "--base", str(tiny_base),
              "--balance", "2")
    assert bad.exit_code == 2 and "balance" in bad.stderr and "Traceback" not in bad.stderr


def test_the_search_chooses_a_balance_only_when_offered_one():
    import optuna

    from tunelab.errors import UserError
    from tunelab.finetune.search import SearchSpace, _suggest, load_space

    params = {"lr": 1e-3, "epochs": 1, "lora_r": 8, "lora_alpha_ratio": 2.0, "target_modules": "q_proj,v_proj",
              "base": "smollm2-135m"}
    plain = _suggest(optuna.trial.FixedTrial(params), SearchSpace(), ["smollm2-135m"])
    assert "balance" not in plain  # a space without a choice: trials keep the parameters they always had
    chosen = _suggest(optuna.trial.FixedTrial({**params, "balance": 0.5}), SearchSpace(balance=[0.0, 0.5, 1.0]),
                      ["smollm2-135m"])
    assert chosen["balance"] == 0.5
    with pytest.raises(ValueError, match="class balance is between 0 and 1 \\(got 2\\)"):
        SearchSpace(balance=[0.0, 2.0])
    with pytest.raises(UserError, match="balance"):
        load_space(_space_file(balance="[]"))


def _space_file(**fields) -> str:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("".join(f"{k}: {v}\n" for k, v in fields.items()))
    return f.name


def test_the_flow_searches_the_balance_of_skewed_labels_judged_by_macro_f1(workspace, monkeypatch, tmp_path):
    import tunelab.flow as flow_mod
    from tests.test_judged_by import _folder

    seen = []

    def fake_search(ws, config, *, trials, space=None, progress, log):
        seen.append(space)
        return SimpleNamespace(best=SimpleNamespace(candidate=f"ft:{config.name}", wall_s=1.0, tokens_trained=1, cost=0.0))

    monkeypatch.setattr(flow_mod, "search_finetune", fake_search)
    skewed = flow_mod.flow_for(_folder(tmp_path, 0.9), search=2)
    flow_mod._finetune(workspace, "d@v:train", skewed, quick=True, log=lambda _: None)
    told = flow_mod.flow_for(tmp_path / "skew90", search=2, metric="accuracy")
    flow_mod._finetune(workspace, "d@v:train", told, quick=True, log=lambda _: None)
    assert seen[0].balance == [0.0, 0.5, 1.0] and seen[1] is None
