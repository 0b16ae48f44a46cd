"""The optional llama.cpp extra: the `llamacpp` backend and GGUF export, on the bundled SmolLM2.

Tests marked `llamacpp` need `llama_cpp` (pip install 'tunelab[llamacpp]') and run with
`make test-llamacpp` (pytest --llamacpp); `make test` skips them. The unmarked tests run in the
default suite: the converter's pure parts, and the one-line error when the extra is missing.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.prompts import SPAM_PROMPT
from tunelab.datasets import Example, save_dataset
from tunelab.models.base import Request


SPAM_TEXTS = ["WINNER!! You have won a 1000 cash prize. Call 09061701461 to claim now",
              "Hey, are we still meeting for lunch tomorrow?",
              "URGENT! Your mobile number has been awarded a free holiday. Text YES to 80082",
              "Ok I'll call you when I get home",
              "Free entry in a weekly competition to win FA Cup final tickets. Text FA to 87121"]


def spam_request(text: str, **kw) -> Request:
    content = SPAM_PROMPT.split("user:\n", 1)[1].replace("{{ input }}", text)
    return Request(messages=[{"role": "user", "content": content}], labels=["ham", "spam"], max_tokens=8, **kw)


@pytest.fixture(scope="module")
def llama():
    return pytest.importorskip("llama_cpp", reason="the llama.cpp extra is not installed: "
                                                   "pip install 'tunelab[llamacpp]' (or make test-llamacpp)")


# -- default run: no llama_cpp needed -----------------------------------------------------------------

def test_permute_qk_interleaves_the_rotary_halves_per_head():
    from tunelab.models.gguf import permute_qk

    # 2 heads of dimension 4: rows [a0 a1 b0 b1] per head become [a0 b0 a1 b1]
    w = np.arange(8 * 3).reshape(8, 3)
    p = permute_qk(w, 2)
    assert [list(p[:, 0] // 3)] == [[0, 2, 1, 3, 4, 6, 5, 7]]
    assert sorted(p.reshape(-1).tolist()) == list(range(24))


def test_label_grammar_escapes_and_lists_every_label():
    from tunelab.models.llamacpp import label_grammar

    g = label_grammar(["ham", 'say "hi"', "a\\b"])
    assert g == 'root ::= "ham" | "say \\"hi\\"" | "a\\\\b"'


def test_converter_refuses_other_architectures_with_a_clear_error(tmp_path):
    from tunelab.errors import UserError
    from tunelab.models.gguf import convert_model

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError, match="Llama-architecture models; this one is GPT2LMHeadModel"):
        convert_model(tmp_path, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


def test_gguf_export_of_another_architecture_without_llama_cpp_says_how(tmp_path, monkeypatch):
    from tunelab.errors import UserError
    from tunelab.models.gguf import to_gguf

    monkeypatch.setenv("TUNELAB_LLAMA_CPP", str(tmp_path / "no-llama.cpp"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    model = tmp_path / "ft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UserError) as err:
        to_gguf(model, tmp_path / "g.gguf", name="ft:g")
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "convert_hf_to_gguf.py" in message and "tunelab[llamacpp]" in message
    assert "\n" not in message and not list(tmp_path.glob("*.gguf"))


def test_missing_extra_is_one_line_and_exit_2(workspace, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    save_dataset(workspace, "sms", {"test": [Example("Free prize! Call now", "spam"), Example("see you", "ham")]})
    (workspace.prompts_dir / "spam.prompt").write_text(SPAM_PROMPT)
    r = cli("eval", "spam", "--data", "sms:test", "--model", "llamacpp:smollm2-135m")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'tunelab[llamacpp]'" in lines[0] and "Traceback" not in r.output


# -- with the extra ----------------------------------------------------------------------------------

@pytest.mark.llamacpp
def test_labels_are_scored_and_constrained(llama):
    from tunelab.models import load_model

    model = load_model("llamacpp:smollm2-135m", cached=False)
    reqs = [spam_request(t) for t in SPAM_TEXTS] + [spam_request(SPAM_TEXTS[0], free_text=True)]
    out = model.complete(reqs)
    for c in out:
        assert c.text in ("ham", "spam")
        assert set(c.label_logprobs) == {"ham", "spam"}
        assert abs(sum(np.exp(v) for v in c.label_logprobs.values()) - 1) < 1e-6
        assert c.text == max(c.label_logprobs, key=c.label_logprobs.get)
        raw = c.meta["label_logprobs_raw"]
        assert all(v < 0 for v in raw.values())  # real log-probabilities of whole answers
        assert c.prompt_tokens > 20 and c.completion_tokens >= 1 and c.latency_s > 0
    assert out[-1].free_text is not None and out[-1].free_text.strip()
    assert len({round(c.label_logprobs["spam"], 4) for c in out[:5]}) > 1  # depends on the input

    grammar = load_model("llamacpp:smollm2-135m", cached=False, label_mode="grammar")
    odd = ["Unilateral change", "Unilateral termination", "none"]
    g = grammar.complete([Request(messages=spam_request(t).messages, labels=odd) for t in SPAM_TEXTS[:3]])
    assert all(c.text in odd and set(c.label_logprobs) == set(odd) for c in g)
    assert all(c.meta["label_mode"] == "grammar" for c in g)


@pytest.mark.llamacpp
def test_eval_runs_on_the_llamacpp_backend(llama, workspace, cli):
    gold = ["spam", "ham", "spam", "ham", "spam"]
    save_dataset(workspace, "sms", {"test": [Example(t, y) for t, y in zip(SPAM_TEXTS, gold)]})
    (workspace.prompts_dir / "spam.prompt").write_text(SPAM_PROMPT)
    r = cli("eval", "spam", "--data", "sms:test", "--model", "llamacpp:smollm2-135m", "--limit", "3", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["metrics"]["accuracy"]["n"] == 3 and summary["model"] == "llamacpp:smollm2-135m"


@pytest.mark.llamacpp
def test_label_logprobs_match_the_local_backend(llama, bundled_model_dir):
    """The same weights (the bundled model as f16 GGUF; the local backend runs it in fp32) give the
    same prompt tokens, the same labels and nearly the same log-probabilities."""
    from tunelab.models import load_model
    from tunelab.models.local import LocalModel

    cpp = load_model("llamacpp:smollm2-135m", cached=False)
    torch_model = LocalModel(precision="fp32")
    reqs = [spam_request(t) for t in SPAM_TEXTS]
    a, b = cpp.complete(reqs), torch_model.complete(reqs)
    assert [c.prompt_tokens for c in a] == [c.prompt_tokens for c in b]  # same chat template and tokens
    for x, y in zip(a, b):
        assert x.text == y.text
        for label in ("ham", "spam"):
            assert abs(x.meta["label_logprobs_raw"][label] - y.meta["label_logprobs_raw"][label]) < 0.1


@pytest.mark.llamacpp
def test_json_outputs_follow_the_schema(llama, shared_data):
    import jsonschema

    from tunelab.models import load_model

    desc = json.loads((shared_data / "restaurant8k_slots" / "schema.json").read_text())
    # slot values are short phrases; the bound keeps a small model's greedy repetition inside max_tokens
    schema = {"type": "object", "properties": {k: {"type": "string", "maxLength": 30} for k in desc["key_order"]},
              "additionalProperties": False}
    rows = [json.loads(line) for line in (shared_data / "restaurant8k_slots" / "test.jsonl").open()][:3]
    model = load_model("llamacpp:smollm2-135m", cached=False)
    reqs = [Request(messages=[{"role": "user", "content": f"{desc['description']}\nSlots: {', '.join(desc['key_order'])}"
                                                          f"\n\nMessage: {r['input']}\nJSON:"}],
                    json_schema=schema, max_tokens=96) for r in rows]
    for c in model.complete(reqs):
        value = json.loads(c.text)
        jsonschema.validate(value, schema)
        assert c.meta["grammar"] == "json_schema" and c.completion_tokens >= 2


@pytest.mark.llamacpp
def test_converted_base_model_matches_torch(llama, bundled_model_dir, tmp_path):
    """tunelab's converter (f32): llama.cpp's next-token logits agree with transformers'."""
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.gguf import convert_model

    path = convert_model(bundled_model_dir, tmp_path / "base-f32.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False)
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    for text in ["The capital of France is", "def fibonacci(n):\n   ", "Once upon a time, there was a"]:
        ids = tok(text)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False) == ids  # the tokenizer survived the trip
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[len(ids) - 1])
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1].numpy()
        assert ours.argmax() == ref.argmax()
        assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()
    llm.close()


# -- fine-tunes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny LoRA fine-tune of SmolLM2: 3 steps of 4 spam examples."""
    pytest.importorskip("llama_cpp", reason="the llama.cpp extra is not installed")
    from tests.conftest import SHARED_DATA
    from tunelab.finetune import FineTuneConfig, finetune
    from tunelab.workspace import Workspace

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data sets not found at {SHARED_DATA}")
    ws = Workspace.init(tmp_path_factory.mktemp("ws") / "ws")
    rows = [Example.from_dict(json.loads(line)) for line in (SHARED_DATA / "sms_spam" / "train.jsonl").open()]
    spam, ham = [r for r in rows if r.output == "spam"], [r for r in rows if r.output == "ham"]
    save_dataset(ws, "sms", {"train": spam[:8] + ham[:16], "validation": spam[8:10] + ham[16:20]})
    (ws.prompts_dir / "spam.prompt").write_text(SPAM_PROMPT)
    finetune(ws, FineTuneConfig(data="sms", prompt="spam", name="spam", max_steps=3, epochs=1, lr=2e-3, batch_size=4,
                                patience=None, precision="fp32"))
    return ws


@pytest.mark.llamacpp
def test_merged_gguf_export_agrees_with_torch(tuned, cli, monkeypatch):
    from tunelab.models import load_model

    monkeypatch.chdir(tuned.root)
    r = cli("export", "ft:spam", "--format", "gguf", "--out", str(tuned.root / "out"), "--json")
    assert r.exit_code == 0, r.output
    path = json.loads(r.stdout)["path"]
    assert path.endswith("spam.gguf")
    cpp = load_model(f"llamacpp:{path}", cached=False)
    ft = load_model("ft:spam", tuned, cached=False, precision="fp32")
    reqs = [spam_request(t) for t in SPAM_TEXTS]
    a, b = cpp.complete(reqs), ft.complete(reqs)
    assert [x.text for x in a] == [y.text for y in b]
    for x, y in zip(a, b):
        assert abs(x.label_logprobs["spam"] - y.label_logprobs["spam"]) < 0.05
    # the same model through the spec the evaluator takes: llamacpp:ft:NAME (the workspace found from
    # the current folder; converted once, cached)
    again = load_model("llamacpp:ft:spam", tuned, cached=False).complete(reqs[:2])
    assert [c.text for c in again] == [x.text for x in a[:2]]


@pytest.mark.llamacpp
def test_lora_gguf_loads_over_the_base_and_moves_the_scores(tuned, tmp_path):
    from tunelab.finetune import export
    from tunelab.models import load_model
    from tunelab.models.llamacpp import LlamaCppModel

    lora = export(tuned, "spam", "gguf-lora", tmp_path / "spam-lora.gguf")
    import gguf

    fields = gguf.GGUFReader(str(lora)).fields
    assert fields["general.type"].contents() == "adapter" and fields["adapter.type"].contents() == "lora"
    # over the Q4_1 GGUF file the bundled model ships as (the adapter was trained on its fp32 weights)
    base = LlamaCppModel(name="llamacpp:smollm2-135m-q4")
    tuned_cpp = LlamaCppModel(name="llamacpp:smollm2-135m-q4", lora=lora)
    reqs = [spam_request(t) for t in SPAM_TEXTS]
    a, b = base.complete(reqs), tuned_cpp.complete(reqs)
    shift = [abs(x.label_logprobs["spam"] - y.label_logprobs["spam"]) for x, y in zip(a, b)]
    assert max(shift) > 0.05  # the adapter changes the output distribution
    # ... as torch's ft:spam does: over the f16 base the adapter (q/k rows of lora_b permuted like the
    # base's) reproduces the fp32 model's scores; over Q4_1 it picks the same labels
    ft = load_model("ft:spam", tuned, cached=False, precision="fp32").complete(reqs)
    assert [x.text for x in b] == [y.text for y in ft]
    f16 = LlamaCppModel(name="llamacpp:smollm2-135m", lora=lora).complete(reqs)
    for x, y in zip(f16, ft):
        assert abs(x.meta["label_logprobs_raw"]["spam"] - y.meta["label_logprobs_raw"]["spam"]) < 0.1
    assert tuned_cpp.fingerprint != base.fingerprint
