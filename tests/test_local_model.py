"""The local backend: pure helpers (fast) and the bundled SmolLM2 end to end (realmodel)."""

from __future__ import annotations

import json
import math

import pytest

from tunelab.errors import UserError
from tunelab.models.base import Request
from tunelab.models.local import engine
from tunelab.models.local import (
    LocalModel,
    build_trie,
    common_prefix_len,
    find_stop,
    greedy_label,
    json_end,
    make_batches,
    trim_output,
)

LEGAL = ["Other", "Arbitration", "Unilateral change", "Content removal", "Jurisdiction", "Choice of law",
         "Limitation of liability", "Unilateral termination", "Contract by using"]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- pure helpers -----------------------------------------------------------------------------

def test_make_batches_respects_budget_and_keeps_every_index_once():
    lengths = [5, 100, 7, 60, 61, 8, 300, 9, 10]
    batches = make_batches(lengths, token_budget=128, max_batch=3, overhead=50)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        longest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= 128
    assert batches[0] == [6]  # longest first; an item over the budget runs alone
    # neighbours in length share a batch, so padding stays small
    assert [3, 4] in [sorted(b) for b in batches]


def test_make_batches_max_batch_and_empty():
    assert make_batches([], 100) == []
    assert [len(b) for b in make_batches([1] * 10, token_budget=10**6, max_batch=4)] == [4, 4, 2]


def test_make_batches_weighs_padding_against_the_cost_of_a_pass():
    lengths = [100, 95, 90, 50, 48, 10]
    # no fixed cost per pass: only padding counts, and equal cost prefers fewer batches
    assert make_batches(lengths, token_budget=10**6) == [[0], [1], [2], [3], [4], [5]]
    assert make_batches([7, 7, 7, 3], token_budget=10**6) == [[0, 1, 2], [3]]
    # a pass costs 20 tokens: merging 100/95/90 pads 15 tokens and saves two passes
    assert make_batches(lengths, token_budget=10**6, overhead=20) == [[0, 1, 2], [3, 4], [5]]
    # a pass costs 1000 tokens: one batch, whatever the padding
    assert make_batches(lengths, token_budget=10**6, overhead=1000) == [[0, 1, 2, 3, 4, 5]]
    # the cheapest grouping: cost = passes x overhead + padded tokens, checked against brute force
    import itertools

    for overhead in (0, 5, 30, 200):
        batches = make_batches(lengths, token_budget=10**6, overhead=overhead)
        cost = sum(overhead + len(b) * max(lengths[i] for i in b) for b in batches)
        for cuts in itertools.product([0, 1], repeat=len(lengths) - 1):  # contiguous groupings
            groups, current = [], [0]
            for i, c in enumerate(cuts, start=1):
                if c:
                    groups.append(current)
                    current = []
                current.append(i)
            groups.append(current)
            assert cost <= sum(overhead + len(g) * lengths[g[0]] for g in groups)


def test_common_prefix_len():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2], [1, 2]]) == 2
    assert common_prefix_len([[7], [1, 2]]) == 0
    assert common_prefix_len([]) == 0


def test_find_stop_and_trim_output():
    assert find_stop("hello world\nUser: hi", ["\nUser:", "world"]) == 6
    assert find_stop("hello", ["x", ""]) is None
    assert find_stop("hello", None) is None
    assert trim_output("a b STOP c", ["STOP"], False) == ("a b ", True)
    assert trim_output('Sure: {"a": 1} and more', None, True) == ('Sure: {"a": 1}', True)
    assert trim_output('{"a": ', None, True) == ('{"a": ', False)  # still open: keep everything
    assert trim_output("plain", None, False) == ("plain", False)


def test_json_end_balances_objects_arrays_and_ignores_brackets_in_strings():
    assert json_end('{"a": {"b": [1, 2]}} tail') == len('{"a": {"b": [1, 2]}}')
    assert json_end('```json\n{"x": "}{"}\n```') == len('```json\n{"x": "}{"}')
    assert json_end('{"q": "say \\"}\\" now"}!') == len('{"q": "say \\"}\\" now"}')
    assert json_end("[1, [2], 3] x") == len("[1, [2], 3]")
    assert json_end('{"open": [1, 2') is None
    assert json_end("no json at all") is None
    assert json_end("{}") == 2


def test_build_trie_shares_prefixes_and_feeds_all_but_last_token():
    # "Unilateral change" / "Unilateral termination" share their first two tokens
    seqs = [[10, 11, 12, 2], [10, 11, 13, 2], [20, 2], [2]]
    trie = build_trie(seqs)
    assert trie.tokens == [10, 11, 12, 13, 20]
    assert trie.parents == [-1, 0, 1, 1, -1]
    assert trie.depths == [1, 2, 3, 3, 1]
    assert trie.paths == [[-1, 0, 1, 2], [-1, 0, 1, 3], [-1, 4], [-1]]
    assert trie.targets == seqs
    sees = trie.ancestry()
    assert [k for k, v in enumerate(sees[3]) if v] == [0, 1, 3]  # itself and its ancestors, not node 2
    assert [k for k, v in enumerate(sees[4]) if v] == [4]


def test_constructor_validates_precision_and_adapter(tmp_path):
    with pytest.raises(UserError, match="precision"):
        LocalModel(precision="fp16")
    with pytest.raises(UserError, match="adapter_config.json"):
        LocalModel(adapter=tmp_path)
    with pytest.raises(UserError, match="no such model folder"):
        _ = LocalModel(path=tmp_path / "missing").path


def test_fingerprint_names_weights_precision_and_adapter(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"0" * 10)
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"1" * 10)
    base32 = LocalModel(name="m", path=folder, precision="fp32").fingerprint
    assert base32 != LocalModel(name="m", path=folder, precision="bf16").fingerprint
    tuned = LocalModel(name="m", path=folder, precision="fp32", adapter=adapter).fingerprint
    assert tuned != base32
    (adapter / "adapter_model.safetensors").write_bytes(b"2" * 10)  # retrained: a new fingerprint
    assert LocalModel(name="m", path=folder, precision="fp32", adapter=adapter).fingerprint != tuned
    (folder / "model.safetensors").write_bytes(b"0" * 11)
    assert LocalModel(name="m", path=folder, precision="fp32").fingerprint != base32


def test_load_model_builds_the_local_backend_lazily():
    from tunelab.models import load_model

    model = load_model("smollm2-135m", cached=False, precision="fp32")
    assert isinstance(model, LocalModel) and model.backend == "local"
    assert model._model is None  # nothing loaded until the first complete()


# -- the bundled model --------------------------------------------------------------------------

def test_greedy_label_reads_the_free_answer_off_the_label_trie():
    EOT = 0
    # labels "spam" = [5, 6], "spammy" = [5, 6, 7], "ham" = [8], each followed by the end of turn
    labels = [[5, 6], [5, 6, 7], [8]]
    trie = build_trie([ids + [EOT] for ids in labels])
    lengths = [len(ids) for ids in labels]
    assert trie.tokens == [5, 6, 7, 8] and trie.parents == [-1, 0, 1, -1]

    def top(**after):  # the argmax after the prompt ("prompt") and after each node ("n0".."n3")
        out = [99] * (len(trie.tokens) + 1)
        for key, tok in after.items():
            out[0 if key == "prompt" else int(key[1:]) + 1] = tok
        return out

    stops = {EOT, 1}
    assert greedy_label(trie, lengths, top(prompt=8, n3=EOT), stops, 16) == (2, [8])
    assert greedy_label(trie, lengths, top(prompt=8, n3=1), stops, 16) == (2, [8])  # any stop token ends it
    assert greedy_label(trie, lengths, top(prompt=5, n0=6, n1=EOT), stops, 16) == (0, [5, 6])
    assert greedy_label(trie, lengths, top(prompt=5, n0=6, n1=7, n2=EOT), stops, 16) == (1, [5, 6, 7])
    # greedy leaves the labels: the answer has to be generated
    assert greedy_label(trie, lengths, top(prompt=8, n3=5), stops, 16) is None  # "ham" and more
    assert greedy_label(trie, lengths, top(prompt=5, n0=42), stops, 16) is None
    assert greedy_label(trie, lengths, top(prompt=42), stops, 16) is None
    assert greedy_label(trie, lengths, top(prompt=5, n0=6, n1=7, n2=9), stops, 16) is None
    # max_tokens reached inside or right at the end of a label: no stop token needed
    assert greedy_label(trie, lengths, top(prompt=5, n0=6, n1=7), stops, 2) == (0, [5, 6])
    assert greedy_label(trie, lengths, top(prompt=5, n0=9), stops, 1) == (0, [5])
    assert greedy_label(trie, lengths, top(prompt=8), stops, 1) == (2, [8])


def naive_label_logprob(model: LocalModel, messages, label: str) -> float:
    """The textbook computation: run prompt + label + end-of-turn as one sequence."""
    import torch

    tok = model.tokenizer
    prompt = tok(model.render(messages), add_special_tokens=False)["input_ids"]
    answer = tok(label, add_special_tokens=False)["input_ids"] + model.end_of_turn_ids()
    with torch.inference_mode():
        logits = model.hf_model(torch.tensor([prompt + answer])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[len(prompt) - 1 + k, t] for k, t in enumerate(answer)))


@pytest.mark.realmodel
def test_batch_of_8_equals_one_at_a_time_in_fp32(fp32_model, shared_data):
    lines = (shared_data / "sms_spam" / "test.jsonl").read_text().splitlines()[:8]
    requests = [Request(messages=chat(f"Is this message spam? {json.loads(line)['input']}"), max_tokens=12)
                for line in lines]
    batched = fp32_model.complete(requests)
    single = [fp32_model.complete([r])[0] for r in requests]
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert all(c.text and 0 < c.completion_tokens <= 12 for c in batched)
    assert len({c.prompt_tokens for c in batched}) > 1  # the batch really was left-padded
    assert all(c.prompt_tokens == fp32_model.count_tokens(fp32_model.render(r.messages))
               for c, r in zip(batched, requests))
    assert all(c.latency_s > 0 and c.meta["decode_batch_size"] == 8 for c in batched)


@pytest.mark.realmodel
def test_label_scores_match_the_naive_full_sequence_computation(fp32_model):
    clauses = ["we may terminate your account at any time without notice .",
               "these terms are governed by the laws of the state of california ."]
    requests = [Request(messages=chat(f"Which kind of clause is this? {c}\nOptions: {', '.join(LEGAL)}"),
                        labels=LEGAL) for c in clauses]
    requests.append(Request(messages=chat("Is 'WIN a FREE prize now!!!' spam or ham?"),
                            labels=["ham", "spam", "spammy"]))  # a label that is a prefix of another
    results = fp32_model.complete(requests)
    for req, res in zip(requests, results):
        raw = res.meta["label_logprobs_raw"]
        for label in req.labels:
            assert raw[label] == pytest.approx(naive_label_logprob(fp32_model, req.messages, label), abs=2e-3)
        assert res.text == max(req.labels, key=lambda label: raw[label])
        assert math.isclose(sum(math.exp(v) for v in res.label_logprobs.values()), 1.0, rel_tol=1e-6)
        assert res.completion_tokens == fp32_model.count_tokens(res.text)
        assert res.prompt_tokens > 20
    # "Unilateral change" / "Unilateral termination" share their first tokens but not their scores
    raw = results[0].meta["label_logprobs_raw"]
    assert raw["Unilateral change"] != pytest.approx(raw["Unilateral termination"], abs=1e-3)
    assert results[0].meta["shared_prefix_tokens"] > 10  # the system prompt ran once for all three
    # requests with different label sets in one call are scored as if alone
    alone = fp32_model.complete([requests[2]])[0]
    assert alone.meta["label_logprobs_raw"] == pytest.approx(results[2].meta["label_logprobs_raw"], abs=1e-3)


@pytest.mark.realmodel
def test_label_scores_without_a_shared_prefix_are_the_same(fp32_model, monkeypatch):
    requests = [Request(messages=chat(f"Is '{t}' spam or ham?"), labels=["ham", "spam"])
                for t in ("see you at 5", "WIN cash now, txt 80082")]
    shared = fp32_model.complete(requests)
    monkeypatch.setattr(engine, "MIN_SHARED_PREFIX", 10**6)
    plain = fp32_model.complete(requests)
    assert plain[0].meta["shared_prefix_tokens"] == 0 < shared[0].meta["shared_prefix_tokens"]
    for a, b in zip(shared, plain):
        assert a.meta["label_logprobs_raw"] == pytest.approx(b.meta["label_logprobs_raw"], abs=1e-3)


@pytest.mark.realmodel
def test_free_text_alongside_labels_is_the_plain_generation(fp32_model):
    msgs = chat("Is this message spam or ham? 'Call now to claim your prize'")
    scored = fp32_model.complete([Request(messages=msgs, labels=["ham", "spam"], free_text=True, max_tokens=10),
                                  Request(messages=msgs, labels=["ham", "spam"], max_tokens=10),
                                  Request(messages=msgs, max_tokens=10)])
    plain = fp32_model.complete([Request(messages=msgs, max_tokens=10)])[0]
    assert scored[0].text in {"ham", "spam"}
    assert scored[0].free_text == plain.text == scored[2].text and plain.text
    assert scored[0].meta["free_text_tokens"] == plain.completion_tokens
    assert scored[0].meta["label_logprobs_raw"] == pytest.approx(scored[1].meta["label_logprobs_raw"], abs=1e-3)
    assert scored[1].free_text is None


def few_shot_spam(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Classify SMS messages. Answer with exactly one word: spam or ham."},
            {"role": "user", "content": "WINNER!! Claim your free prize now, call 0800"},
            {"role": "assistant", "content": "spam"},
            {"role": "user", "content": "ok see you at lunch"}, {"role": "assistant", "content": "ham"},
            {"role": "user", "content": text}]


@pytest.mark.realmodel
def test_free_answer_read_off_the_scoring_pass_is_the_plain_greedy_generation(fp32_model, shared_data):
    lines = (shared_data / "sms_spam" / "test.jsonl").read_text().splitlines()[:5]
    texts = [json.loads(line)["input"] for line in lines]
    fast = fp32_model.complete([Request(messages=few_shot_spam(t), labels=["ham", "spam"], free_text=True,
                                        max_tokens=12) for t in texts])
    plain = fp32_model.complete([Request(messages=few_shot_spam(t), max_tokens=12) for t in texts])
    assert [f.free_text for f in fast] == [p.text for p in plain]
    assert [f.meta["free_text_tokens"] for f in fast] == [p.completion_tokens for p in plain]
    reused = [f for f in fast if f.meta.get("free_text_from_scoring")]
    assert reused and len(reused) < len(fast)  # both paths ran: some answers are a label, some are not
    assert all(f.free_text in ("ham", "spam") for f in reused)


@pytest.mark.realmodel
def test_sampling_is_seeded_per_request(fp32_model):
    msgs = chat("Write a short sentence about the sea.")
    reqs = [Request(messages=msgs, temperature=1.0, seed=seed, max_tokens=12) for seed in range(4)]
    first = [c.text for c in fp32_model.complete(reqs)]
    assert len(set(first)) >= 3  # different seeds: independent samples
    again = fp32_model.complete([reqs[2], reqs[0]])  # same seed, another batch: the same answer
    assert [c.text for c in again] == [first[2], first[0]]
    greedy = fp32_model.complete([Request(messages=msgs, max_tokens=12)])[0].text
    mixed = fp32_model.complete([Request(messages=msgs, max_tokens=12), reqs[1]])
    assert [c.text for c in mixed] == [greedy, first[1]]  # greedy rows unaffected by sampled rows


@pytest.mark.realmodel
def test_stop_strings_and_json_end_cut_the_same_greedy_answer(fp32_model):
    msgs = chat('Give the booking as JSON with keys "people" and "time": a table for 4 at 7pm. '
                'Then explain it.')
    full = fp32_model.complete([Request(messages=msgs, max_tokens=60)])[0]
    as_json, stopped = fp32_model.complete([
        Request(messages=msgs, max_tokens=60, json_schema={"type": "object"}),
        Request(messages=msgs, max_tokens=60, stop=["4"])])
    assert full.text.startswith(as_json.text) and as_json.completion_tokens <= full.completion_tokens
    if json_end(full.text) is not None:  # the model wrote a JSON object: generation stopped after it
        assert json_end(as_json.text) == len(as_json.text)
        assert as_json.completion_tokens < full.completion_tokens
    assert "4" not in stopped.text and full.text.startswith(stopped.text)


@pytest.mark.realmodel
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT asks a deprecated question
def test_adapter_is_merged_and_changes_the_model(fp32_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(fp32_model.path, dtype=torch.float32)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    tuned = LocalModel(name="tuned", path=fp32_model.path, adapter=tmp_path / "adapter", precision="fp32")
    req = Request(messages=chat("Is 'free entry to win cash' spam or ham?"), labels=["ham", "spam"])
    a = fp32_model.complete([req])[0].meta["label_logprobs_raw"]
    b = tuned.complete([req])[0].meta["label_logprobs_raw"]
    assert abs(a["spam"] - b["spam"]) > 1e-3
    assert not any("lora" in name for name, _ in tuned.hf_model.named_parameters())  # merged
    assert tuned.fingerprint != fp32_model.fingerprint


@pytest.mark.realmodel
def test_bf16_scores_labels_close_to_fp32(fp32_model):
    model = LocalModel(precision="bf16")
    assert model.dtype.is_floating_point and str(model.dtype) == "torch.bfloat16"
    req = Request(messages=chat("Which emotion: 'I can't stop smiling today!'"),
                  labels=["anger", "joy", "optimism", "sadness"])
    got = model.complete([req])[0]
    want = fp32_model.complete([req])[0]
    assert got.text in req.labels
    for label in req.labels:
        assert got.label_logprobs[label] == pytest.approx(want.label_logprobs[label], abs=0.5)
