"""The second bundled base, Gemma 3 270M (pretrained, plain-text prompts, 262k vocabulary), through
the transformers path: a LoRA fine-tune on a slice of the spam set learns (the loss falls, the LoRA
weights move, the frozen base does not) and `ft:NAME` on it evaluates; the local backend's batched
label scores and greedy answers equal a plain forward pass one sequence at a time."""

from __future__ import annotations

import json

import pytest

from tests.prompts import SPAM_PROMPT
from tunelab.datasets import Example, save_dataset

pytestmark = [pytest.mark.realmodel, pytest.mark.slow]

PROMPT = SPAM_PROMPT.replace("---\noutput:", "---\nmodel: gemma3-270m\noutput:")


def read(folder, split: str, n: int) -> list[Example]:
    with (folder / f"{split}.jsonl").open(encoding="utf-8") as f:
        rows = [Example.from_dict(json.loads(line)) for line in f]
    rows = [r for r in rows if len(r.input) < 80]  # short: a 270M model on 2 cores
    spam = [r for r in rows if r.output == "spam"]
    ham = [r for r in rows if r.output == "ham"]
    return spam[:n // 2] + ham[:n - n // 2]


@pytest.fixture(scope="module")
def gemma_dir():
    from tunelab.models.weights import bundled_model_dir

    return bundled_model_dir("gemma3-270m")


def test_backend_scores_and_answers_like_a_plain_forward_pass(gemma_dir):
    import torch

    from tunelab.models import load_model
    from tunelab.models.base import Request

    model = load_model("gemma3-270m", precision="fp32", cached=False)
    assert model.template == "plain text" and model.path == gemma_dir
    texts = ["WIN a free cruise! Text WIN to 80086 now", "are we still on for lunch?"]
    messages = [[{"role": "user", "content": f"Is this SMS spam or ham?\n\n{t}"}] for t in texts]
    rendered = model.render(messages[0])
    assert rendered.startswith("<bos>user:\n") and rendered.endswith("\nassistant:\n")
    scored = model.complete([Request(messages=m, labels=["spam", "ham"]) for m in messages])
    free = model.complete([Request(messages=m, max_tokens=6) for m in messages])
    tok, hf, eot = model.tokenizer, model.hf_model, model.end_of_turn_ids()
    assert eot == tok("\n", add_special_tokens=False).input_ids
    for m, s, f in zip(messages, scored, free):
        prompt = tok(model.render(m), add_special_tokens=False).input_ids
        assert prompt[0] == tok.bos_token_id
        for label in ("spam", "ham"):
            answer = tok(label, add_special_tokens=False).input_ids + eot
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([prompt + answer])).logits[0].float(), dim=-1)
            want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(answer))
            assert abs(s.meta["label_logprobs_raw"][label] - want) < 1e-3
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
        reference = tok.decode(out[0, len(prompt):], skip_special_tokens=True).split("\n")[0].strip()
        assert f.text == reference and "\n" not in f.text
    model.close()


def test_lora_on_gemma_learns_leaves_the_base_frozen_and_evaluates(workspace, shared_data, gemma_dir, cli, tmp_path):
    from tests.test_finetune_realmodel import train_and_compare
    from tunelab.finetune import FineTuneConfig, plan

    src = shared_data / "sms_spam"
    save_dataset(workspace, "sms", {"train": read(src, "train", 8), "validation": read(src, "validation", 4),
                                    "test": read(src, "test", 4)})
    (workspace.prompts_dir / "spam.prompt").write_text(PROMPT)
    p = plan(workspace, FineTuneConfig(data="sms", prompt="spam", name="unit", base="gemma3-270m", lr=2e-3,
                                       batch_size=4, epochs=2, patience=None, lora_r=4,
                                       target_modules=["q_proj", "v_proj"]))
    assert p.base_dir == gemma_dir and all(it.input_ids[0] == p.tokenizer.bos_token_id for it in p.train_items)
    loss_before, state, lora_moved, frozen_moved = train_and_compare(p, tmp_path / "run")
    assert state["step"] == 4
    assert state["eval_curve"][-1]["loss"] < 0.7 * loss_before, (loss_before, state["eval_curve"])
    assert lora_moved >= 18 * 2 and frozen_moved == 0  # 18 layers x 2 modules, A or B of each moved

    r = cli("finetune", "--data", "sms", "--prompt", "spam", "--name", "g", "--base", "gemma3-270m",
            "--max-steps", "1", "--batch-size", "4", "--lr", "2e-3", "--lora-r", "4", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["base"] == "gemma3-270m" and out["validation"]["metric_name"] == "accuracy"
    r = cli("eval", "ft:g", "--data", "sms:test", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["accuracy"]["n"] == 4
