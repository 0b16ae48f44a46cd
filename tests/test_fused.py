"""The fused Llama forward pass against transformers' own, on a tiny random Llama (fast) and on the
bundled SmolLM2 (realmodel)."""

from __future__ import annotations

import json

import pytest

from tunelab.models.base import Request
from tunelab.models.local.fused import FusedLlama
from tunelab.models.local.kv import cache_kwarg, returned_cache
from tunelab.models.local import LocalModel


def tiny_llama(**overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         **overrides)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def prefix_cache(model, prefix_ids, batch: int):
    """transformers' cache for a shared prefix, expanded over the batch (as LocalModel does)."""
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = returned_cache(model(input_ids=torch.tensor([prefix_ids]), use_cache=True))
    return DynamicCache(ddp_cache_data=[(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))
                                        for layer in cache.layers])


def tree_batch(C: int, B: int = 3, T: int = 9):
    """Ids, positions and a bool mask like a label-scoring pass: left padding, a causal prompt after
    a shared prefix of C tokens, and two trie nodes that see the prompt but not each other."""
    import torch

    ids = torch.randint(0, 101, (B, T))
    pos = torch.zeros((B, T), dtype=torch.long)
    allow = torch.zeros((B, T, C + T), dtype=torch.bool)
    allow[:, :, :C] = True
    S = T - 2  # prompt columns; the last two are trie nodes
    for b in range(B):
        pad = b  # row b has b padding tokens
        pos[b, pad:S] = torch.arange(C, C + S - pad)
        allow[b, :S, C:C + S] = torch.ones((S, S), dtype=torch.bool).tril()
        allow[b, :, C:C + pad] = False
        pos[b, S:] = C + S - pad  # both nodes sit at depth 1 after the prompt's last token
        allow[b, S:, C + pad:C + S] = True
        allow[b, torch.arange(T), C + torch.arange(T)] = True  # everything sees itself
    return ids, pos, allow[:, None]


def test_fused_pass_equals_transformers_with_prefix_cache_and_tree_mask():
    import torch

    model = tiny_llama()
    fused = FusedLlama.of(model)
    assert fused is not None
    C = 5
    ids, pos, mask = tree_batch(C)
    with torch.inference_mode():
        want = model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=True, **cache_kwarg(model, prefix_cache(model, list(range(1, C + 1)), 3)))
        cache = prefix_cache(model, list(range(1, C + 1)), 3)
        got = fused(ids, mask, pos, cache)
        cut = fused(ids, mask, pos, prefix_cache(model, list(range(1, C + 1)), 3), keep_from=6)
    torch.testing.assert_close(got, want.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cut, want.last_hidden_state[:, 6:], atol=1e-5, rtol=1e-4)
    # the fused pass fills the cache as transformers does
    for mine, theirs in zip(cache.layers, returned_cache(want).layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-4)


def test_fused_pass_with_the_prefix_kept_apart_and_the_padding_packed_equals_transformers():
    """The shared prefix once for all rows (`prefix`), and only the real tokens through the matrix
    products (`real`, as the label search feeds them): the same hidden states and row caches."""
    import torch
    from transformers import DynamicCache

    model = tiny_llama()
    fused = FusedLlama.of(model)
    C = 5
    ids, pos, mask = tree_batch(C)
    with torch.inference_mode():
        want = model.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                           use_cache=True, **cache_kwarg(model, prefix_cache(model, list(range(1, C + 1)), 3)))
        alone = prefix_cache(model, list(range(1, C + 1)), 1)
        prefix = [(layer.keys, layer.values) for layer in alone.layers]
        cache = DynamicCache()
        got = fused(ids, mask[..., C:], pos, cache, prefix=prefix)
        real = torch.tensor([b * ids.shape[1] + t for b in range(3) for t in range(b, ids.shape[1])])  # no padding
        packed = fused(ids, mask[..., C:], pos, DynamicCache(), prefix=prefix, real=real)
    torch.testing.assert_close(got, want.last_hidden_state, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed[0], want.last_hidden_state.reshape(-1, 64)[real], atol=1e-5, rtol=1e-4)
    for mine, theirs in zip(cache.layers, returned_cache(want).layers):  # the rows' own columns only
        torch.testing.assert_close(mine.keys, theirs.keys[:, :, C:], atol=1e-5, rtol=1e-4)


def test_fused_decoding_step_equals_transformers_and_the_model_still_works():
    import torch

    model = tiny_llama()
    prompt = torch.randint(0, 101, (2, 7))
    attn = torch.ones((2, 7), dtype=torch.long)
    attn[1, :3] = 0  # the second row is left-padded
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        before = model(input_ids=prompt, attention_mask=attn, position_ids=pos).logits
        fused = FusedLlama.of(model)  # the model's weights become views: transformers' forward is unchanged
        after = model(input_ids=prompt, attention_mask=attn, position_ids=pos, use_cache=True)
        torch.testing.assert_close(after.logits, before, atol=0, rtol=0)
        step = torch.tensor([[5], [9]])
        attn2 = torch.cat([attn, attn.new_ones((2, 1))], dim=1)
        next_pos = pos[:, -1:] + 1
        cache = prefix_cache_copy(returned_cache(after))
        want = model(input_ids=step, attention_mask=attn2, position_ids=next_pos, use_cache=True,
                     **cache_kwarg(model, returned_cache(after))).logits[:, -1]
        got = model.lm_head(fused(step, attn2, next_pos, cache)[:, -1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError):
        fused(prompt, attn, pos, cache)  # a 2D mask is for one token per row


def prefix_cache_copy(cache):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])


def test_fused_pass_declines_what_it_does_not_cover(monkeypatch):
    assert FusedLlama.of(tiny_llama(attention_bias=True)) is None
    assert FusedLlama.of(tiny_llama(mlp_bias=True)) is None
    assert FusedLlama.of(tiny_llama(hidden_act="gelu")) is None
    monkeypatch.setenv("TUNELAB_FUSED", "0")
    assert FusedLlama.of(tiny_llama()) is None


@pytest.mark.realmodel
def test_local_model_answers_the_same_with_and_without_the_fused_pass(bundled_model_dir, shared_data):
    lines = (shared_data / "sms_spam" / "test.jsonl").read_text().splitlines()[:10]
    requests = [Request(messages=[{"role": "user", "content": "Spam or ham? " + json.loads(line)["input"]}],
                        labels=["ham", "spam"], free_text=True, max_tokens=10) for line in lines]
    requests += [Request(messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8)]
    fused, plain = LocalModel(precision="fp32"), LocalModel(precision="fp32")
    plain.fused_pass = False
    try:
        a, b = fused.complete(requests), plain.complete(requests)
        assert fused.fused() is not None and plain.fused() is None
    finally:
        fused.close()
        plain.close()
    assert [c.text for c in a] == [c.text for c in b]
    assert [c.free_text for c in a] == [c.free_text for c in b]
    for x, y in zip(a[:-1], b[:-1]):
        assert x.meta["label_logprobs_raw"] == pytest.approx(y.meta["label_logprobs_raw"], abs=1e-3)
