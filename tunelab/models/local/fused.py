"""A fused forward pass for Llama-architecture models on the CPU (SmolLM2 is one).

transformers' `LlamaModel` computes a layer as q, k and v in three matrix products and the MLP's
gate and up in two more, attention with SDPA's flash kernel, and RMSNorm as half a dozen separate
element-wise operations. On a CPU, for the short rows of label scoring (a batch of 10 prompts of
35 tokens after a cached shared prefix), the matrix products of the layer run near the CPU's bf16
peak, and everything around them took 30% of the pass (the flash kernel alone 12%). `FusedLlama`
computes the same layer with

- q, k and v as one matrix product, gate and up as one (the model's own `Linear` weights become
  views into the joined matrices, so no memory is added and transformers' forward still works);
- grouped-query attention as two batched matrix products over the key/value heads (the keys and
  values are not repeated per query head), with the arithmetic of transformers' eager attention
  (products in the model's dtype, softmax in fp32);
- torch's fused `rms_norm`;
- `keep_from`: the last layer runs the query, attention and MLP only for the positions whose
  output is read (the prompt's last token and the label trie), and keys and values for all;
- `prefix`: the prompt prefix every row shares (instruction, label list, demos) stays one
  (1, kv heads, C, D) tensor per layer instead of a copy in every row's cache: its attention
  scores are one matrix product over all rows' queries (its keys read once), softmax joint with
  the row's own keys. Decoding 82 free answers over a 330-token prefix: the attention's products
  ran on a strided copy of every row's prefix before (9 ms a layer, 3x the contiguous product);
- `real`: the flat indices of a padded batch's real tokens (the label search's rows feed
  different numbers of trie nodes): only they go through the matrix products outside attention.

Measured on 2 CPU cores (AMD EPYC, AVX512-BF16), SmolLM2-135M in bf16, runs interleaved in one
process: a prompt pass of 10 x 35 tokens after a 45-token cached prefix, 1,220 vs 1,110 tokens/s
(median of 8); label scoring of 100 spam requests 1.06x; a decoding step, the same as transformers'.
Attention alone: 0.55 ms a layer for that prompt pass (SDPA 1.04 ms), 0.6 ms for a decoding step of
65 rows over 235 cached tokens (SDPA with that boolean mask 10 ms). `bench/eval_throughput.py`, label outputs,
with and without (`TUNELAB_FUSED=0`), alternating: 31.0 and 31.9 vs 29.7 and 28.2 examples/s. In
fp32 the fused pass agrees with transformers' to about 1e-5 (the tests check that greedy answers
and label scores match); in bf16 the two round differently, as two batch sizes do.

`FusedLlama.of(model)` returns None for anything it does not cover (another architecture, biases,
an activation other than SiLU, a model not on the CPU); `LocalModel` then runs transformers'
forward. `TUNELAB_FUSED=0` turns the fused pass off.
"""

from __future__ import annotations

import os
from typing import Any

SUPPORTED_TYPES = ("llama",)


def enabled() -> bool:
    return os.environ.get("TUNELAB_FUSED", "1").strip().lower() not in ("0", "false", "no", "off")


class FusedLlama:
    """The body of a `LlamaForCausalLM` as one fused function: `fused(ids, mask, positions, cache)`
    -> last hidden states. Build with `FusedLlama.of(model)`."""

    def __init__(self, model: Any):
        import torch

        body = model.model
        config = model.config
        self.body = body
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.layers = []
        with torch.no_grad():
            for layer in body.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                n_q, n_k = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
                attn.q_proj.weight.data = qkv[:n_q]
                attn.k_proj.weight.data = qkv[n_q:n_q + n_k]
                attn.v_proj.weight.data = qkv[n_q + n_k:]
                gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                n_i = mlp.gate_proj.weight.shape[0]
                mlp.gate_proj.weight.data = gate_up[:n_i]
                mlp.up_proj.weight.data = gate_up[n_i:]
                self.layers.append(_Layer(
                    norm_in=layer.input_layernorm.weight, eps_in=layer.input_layernorm.variance_epsilon,
                    qkv=qkv, n_q=n_q, n_k=n_k, o=attn.o_proj.weight, scaling=float(attn.scaling),
                    norm_post=layer.post_attention_layernorm.weight,
                    eps_post=layer.post_attention_layernorm.variance_epsilon,
                    gate_up=gate_up, n_i=n_i, down=mlp.down_proj.weight))

    @classmethod
    def of(cls, model: Any) -> "FusedLlama | None":
        """The fused pass for `model`, or None when it does not cover it."""
        if not enabled():
            return None
        config = getattr(model, "config", None)
        body = getattr(model, "model", None)
        if config is None or body is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
            return None
        if (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
                or getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1):
            return None
        if not all(hasattr(body, name) for name in ("layers", "embed_tokens", "rotary_emb", "norm")):
            return None
        try:
            param = next(model.parameters())
        except StopIteration:
            return None
        if param.device.type != "cpu":
            return None  # on a GPU transformers' SDPA kernels are the fast path
        for layer in body.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            needed = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            needed += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(type(m).__name__ != "Linear" or m.bias is not None for m in needed):
                return None  # adapters not merged, quantized layers, ...
        return cls(model)

    def __call__(self, input_ids, mask, position_ids, cache, keep_from: int = 0, prefix=None, real=None):
        """Last hidden states (after the final norm) of the positions from `keep_from` on.

        `mask`: bool (batch, 1, tokens, cache length + tokens), True where a position may attend;
        or, for one token per row (decoding), (batch, cache length + 1) with 1 for real tokens.
        `cache`: a transformers `Cache`; each layer's keys and values are appended to it.
        `prefix`: per layer (keys, values) of shape (1, kv heads, C, head dim), a prompt prefix
        every row shares and every position sees, kept once rather than per row (`cache` and
        `mask` then cover the positions after it only).
        `real`: the flat indices (into batch x tokens) of the real tokens of a padded batch: only
        they go through the matrix products outside attention (padding costs attention only), and
        their last hidden states come back, in that order, as (1, len(real), hidden)."""
        import torch
        import torch.nn.functional as F

        body = self.body
        B, T = input_ids.shape
        if real is not None:  # packed: (1, real tokens) outside attention
            if keep_from:
                raise ValueError("keep_from applies to a padded batch")
            input_ids, position_ids = input_ids.reshape(-1)[real][None], position_ids.reshape(-1)[real][None]
        x = body.embed_tokens(input_ids)
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        G = H // KVH
        cos, sin = body.rotary_emb(x, position_ids)
        cos, sin = cos[:, :, None], sin[:, :, None]  # (B, T, 1, D): heads are dim 2 before the transpose
        if mask.dim() == 2:
            if T != 1:
                raise ValueError("a 2D mask is for one token per row")
            blocked = ~mask.bool()[:, None, None, None, :]
        else:
            blocked = ~mask[:, :, None]  # (B, 1, 1, T, K): the same for every query head of a group
        half = D // 2

        def rope(t, c, s):
            return t * c + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * s

        def unpack(t):  # packed (1, real tokens, heads, D) -> (B, T, heads, D), zeros at the padding
            if real is None:
                return t
            full = t.new_zeros((B * T,) + t.shape[2:])
            full[real] = t[0]
            return full.view(B, T, *t.shape[2:])

        last = len(self.layers) - 1
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L.norm_in, L.eps_in)
            cut = keep_from if i == last else 0
            if cut:
                kv = F.linear(h, L.qkv[L.n_q:])
                q = rope(F.linear(h[:, cut:], L.qkv[:L.n_q]).view(B, T - cut, H, D), cos[:, cut:], sin[:, cut:])
                k = rope(kv[..., :L.n_k].view(B, T, KVH, D), cos, sin)
                v = kv[..., L.n_k:]
                x, q_blocked = x[:, cut:], blocked[..., cut:, :]
            else:  # rotate q and k in one go: their heads side by side
                p = F.linear(h, L.qkv)
                qk = rope(p[..., :L.n_q + L.n_k].view(*p.shape[:2], H + KVH, D), cos, sin)
                q, k = unpack(qk[:, :, :H]), unpack(qk[:, :, H:])
                v = unpack(p[..., L.n_q + L.n_k:].reshape(*p.shape[:2], KVH, D))
                q_blocked = blocked
            Tq = q.shape[1]
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.reshape(B, T, KVH, D).transpose(1, 2)
            k, v = cache.update(k, v, i)
            o = _attend(q.reshape(B, KVH, G * Tq, D), k, v, q_blocked, L.scaling, prefix[i] if prefix else None, real)
            if real is None:
                o = o.reshape(B, H, Tq, D).transpose(1, 2).reshape(B, Tq, H * D)
            x = x + F.linear(o, L.o)
            h = F.rms_norm(x, (x.shape[-1],), L.norm_post, L.eps_post)
            gu = F.linear(h, L.gate_up)
            x = x + F.linear(F.silu(gu[..., :L.n_i]) * gu[..., L.n_i:], L.down)
        return F.rms_norm(x, (x.shape[-1],), body.norm.weight, body.norm.variance_epsilon)


def _attend(q, k, v, blocked, scaling: float, prefix, real=None):
    """Grouped-query attention: q (B, kv heads, G*Tq, D), the G query heads of a key/value head as
    one matrix, over the row's keys/values k, v (B, kv heads, K, D) where `blocked` (B, 1, 1, Tq, K)
    is False, and over a shared `prefix` (keys, values) (1, kv heads, C, D) seen by every position.
    The prefix's products run as one matrix product over every row's queries (its keys read once,
    not once per row); scores and probabilities in the model's dtype, softmax in fp32 over the
    prefix and the row together (transformers' eager attention). Returns (B, kv heads, G*Tq, D), or
    with `real` (the flat indices of the real queries into B x Tq) theirs only, (1, len(real), H*D):
    the prefix's share is then computed for the real queries only."""
    import torch

    B, KVH, M, D = q.shape
    K = k.shape[2]
    Tq = blocked.shape[-2]
    G = M // Tq
    scores = torch.matmul(q, k.transpose(2, 3)).view(B, KVH, G, Tq, K)
    scores = scores.float().mul_(scaling).masked_fill_(blocked[..., :K], float("-inf"))
    if prefix is None:
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, KVH, M, K)
        out = torch.matmul(probs, v)
        if real is None:
            return out
        # the real queries' outputs, packed as the caller's matrix products take them
        return _real_queries(out, Tq, real).reshape(1, len(real), KVH * G * D)
    pk, pv = prefix[0][0], prefix[1][0]  # (kv heads, C, D)
    C = pk.shape[1]
    if real is not None:
        return _attend_packed(q, v, scores, scaling, pk, pv, real)
    rows = q.transpose(0, 1).reshape(KVH, B * M, D)  # every row's queries of a key/value head
    shared = torch.matmul(rows, pk.transpose(1, 2)).view(KVH, B, G, Tq, C).transpose(0, 1).float().mul_(scaling)
    probs = torch.softmax(torch.cat([shared, scores], dim=-1), dim=-1).to(v.dtype)
    on_prefix = probs[..., :C].transpose(0, 1).reshape(KVH, B * M, C)
    out = torch.matmul(on_prefix, pv).view(KVH, B, M, D).transpose(0, 1)
    return out.add_(torch.matmul(probs[..., C:].reshape(B, KVH, M, K), v))


def _attend_packed(q, v, scores, scaling: float, pk, pv, real):
    """`_attend` with a shared prefix for the real queries only: the prefix's products and the
    softmax run over them (the row's part of the scores, `scores`, was computed padded)."""
    import torch

    B, KVH, M, D = q.shape
    _, _, G, Tq, K = scores.shape
    C = pk.shape[1]
    N = real.shape[0]
    qr = _real_queries(q, Tq, real)  # (N, KVH, G, D)
    shared = torch.matmul(qr.transpose(0, 1).reshape(KVH, N * G, D), pk.transpose(1, 2))  # (KVH, N*G, C)
    shared = shared.view(KVH, N, G, C).transpose(0, 1).float().mul_(scaling)
    own = scores.permute(0, 3, 1, 2, 4).reshape(B * Tq, KVH, G, K)[real]
    probs = torch.softmax(torch.cat([shared, own], dim=-1), dim=-1).to(v.dtype)  # (N, KVH, G, C + K)
    out = torch.matmul(probs[..., :C].transpose(0, 1).reshape(KVH, N * G, C), pv).view(KVH, N, G, D).transpose(0, 1)
    padded = probs.new_zeros((B * Tq, KVH, G, K))
    padded[real] = probs[..., C:]
    padded = padded.view(B, Tq, KVH, G, K).permute(0, 2, 3, 1, 4).reshape(B, KVH, M, K)
    on_rows = _real_queries(torch.matmul(padded, v), Tq, real)
    return out.add_(on_rows).reshape(1, N, KVH * G * D)


def _real_queries(t, Tq: int, real):
    """(B, kv heads, G*Tq, D), the G query heads of a key/value head side by side -> the rows of the
    real queries (`real`: flat indices into B x Tq), (len(real), kv heads, G, D)."""
    B, KVH, M, D = t.shape
    G = M // Tq
    return t.view(B, KVH, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B * Tq, KVH, G, D)[real]


class _Layer:
    __slots__ = ("norm_in", "eps_in", "qkv", "n_q", "n_k", "o", "scaling", "norm_post", "eps_post",
                 "gate_up", "n_i", "down")

    def __init__(self, **values: Any):
        for key, value in values.items():
            setattr(self, key, value)
