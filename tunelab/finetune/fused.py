"""A fused training forward pass for LoRA on Llama-architecture models on the CPU (SmolLM2).

What made the evaluator fast, applied to the training step (`tunelab.models.local.fused` is the
inference twin). transformers + PEFT compute a layer as seven base matrix products and, for each
adapted module, a dropout copy of its input and two small LoRA products, each under autocast, which
casts its input to bf16 again for every product. `FusedLoraLlama` computes the same layer with

- q, k and v as one product with the joined frozen weights (stored once, in the training dtype),
  gate and up as one; the LoRA deltas of the joined modules as one product with their joined A
  matrices and one small product per B (so their input is cast and dropped out once: the modules
  of a joined product share one dropout mask, where PEFT draws one per module; the mask comes from
  uniform draws, as `bernoulli_` took 6% of a step);
- the rotary embedding applied in the products' dtype (bf16 under autocast-like training);
- the normed input cast to bf16 once per product, the residual stream kept in fp32 (as autocast
  keeps it);
- grouped-query attention as batched matrix products over the key/value heads, softmax in fp32,
  padding and the causal mask as one boolean mask;
- `keep`: the last layer runs the query, attention and MLP only for the positions whose output is
  read (those that predict a completion token), keys and values for all;
- the prefix every row of a micro-batch shares (a chat template's system turn, the instruction, fixed
  demos: 38 of an sms_spam example's 69 tokens) computed once, not once per row: the residual stream
  is a list of rows (the prefix's, then each row's own), every row's attention reads the prefix's
  keys and values. In exact arithmetic the loss and gradients are those of the rows computed apart
  (the fp32 test checks it); only LoRA dropout differs: one mask for the prefix's positions per
  micro-batch instead of one per row. It made a training step ~1.45x faster on sms_spam.

Autograd differentiates it as it is: the LoRA matrices are PEFT's own parameters, so optimizer,
checkpoints and saved adapters are unchanged. In fp32 with no dropout it agrees with transformers +
PEFT to float rounding (tests/test_finetune_fused.py checks the loss and the gradients).

`FusedLoraLlama.of(model)` returns None for anything it does not cover (another architecture,
biases, DoRA, a module outside q/k/v/o/gate/up/down, a model not on the CPU, gradient
checkpointing); training then runs transformers' forward. `TUNELAB_FUSED=0` turns it off.
"""

from __future__ import annotations

from typing import Any

from tunelab.models.local.fused import _attend as attend
from tunelab.models.local.fused import enabled

HEAD_MODULE = "label_head"  # a head fine-tune's linear head (`tunelab.finetune.head`): outside the body, read after it

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class _Product:
    """One joined product: the frozen weight W (the modules' rows stacked) plus the LoRA deltas of
    the adapted modules among them: y = x W^T + concat_i(scale_i * drop(x) A_i^T B_i^T)."""

    def __init__(self, modules: list[Any], dtype):
        import torch

        linears = [getattr(m, "base_layer", m) for m in modules]
        bases = [lin.weight.detach() for lin in linears]
        with torch.no_grad():
            self.weight = (torch.cat(bases) if len(bases) > 1 else bases[0]).to(dtype)
            start = 0
            for lin, w in zip(linears, bases):  # the modules' frozen weights become views: no memory added
                lin.weight.data = self.weight[start:start + w.shape[0]]
                start += w.shape[0]
        self.dtype = dtype
        self.parts = []  # per module: (rows, LoRA (A, B, scale) or None)
        self.dropout = None
        for m, w in zip(modules, bases):
            lora = None
            if hasattr(m, "lora_A"):
                name = m.active_adapters[0]
                lora = (m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name]))
                self.dropout = m.lora_dropout[name]
            self.parts.append((w.shape[0], lora))

    def __call__(self, x_low):
        """`x_low`: the input in the weight's dtype."""
        import torch
        import torch.nn.functional as F

        y = F.linear(x_low, self.weight)
        if self.dropout is None:
            return y
        loras = [lora for _, lora in self.parts if lora is not None]
        a = torch.cat([A for A, _, _ in loras]) if len(loras) > 1 else loras[0][0]
        p = self.dropout.p if self.dropout.training and isinstance(self.dropout, torch.nn.Dropout) else 0.0
        if p > 0:  # dropout on the already-cast input, its mask from uniform draws (bernoulli_ is slow on CPUs);
            # the 1/(1-p) rescaling is folded into the LoRA scale of the (small) deltas below
            x_low = x_low.masked_fill(torch.rand(x_low.shape, dtype=torch.float32, device=x_low.device) < p, 0)
        low = F.linear(x_low, a.to(self.dtype))  # (..., r x adapted modules)
        lows = iter(low.split([A.shape[0] for A, _, _ in loras], dim=-1) if len(loras) > 1 else [low])
        deltas = []
        for rows, lora in self.parts:
            if lora is None:
                deltas.append(y.new_zeros(y.shape[:-1] + (rows,)))
                continue
            _, B, scale = lora
            deltas.append(F.linear(next(lows), B.to(self.dtype)) * (scale / (1.0 - p)))
        return y + (torch.cat(deltas, dim=-1) if len(deltas) > 1 else deltas[0])


class FusedLoraLlama:
    """The body of a PEFT LoRA `LlamaForCausalLM` as one function: `fused(ids, mask, keep)` -> the
    final hidden states (fp32) of the positions `keep` selects. Build with `FusedLoraLlama.of(model)`."""

    def __init__(self, model: Any, bf16: bool):
        import torch

        lm = model.get_base_model()
        self.body = body = lm.model
        config = lm.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.low = torch.bfloat16 if bf16 else torch.float32
        self.layers = []
        for layer in body.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm_in": layer.input_layernorm, "norm_post": layer.post_attention_layernorm,
                "qkv": _Product([attn.q_proj, attn.k_proj, attn.v_proj], self.low),
                "n_q": self.heads * self.head_dim, "n_k": self.kv_heads * self.head_dim,
                "o": _Product([attn.o_proj], self.low), "scaling": float(attn.scaling),
                "gate_up": _Product([mlp.gate_proj, mlp.up_proj], self.low),
                "n_i": getattr(mlp.gate_proj, "base_layer", mlp.gate_proj).weight.shape[0],
                "down": _Product([mlp.down_proj], self.low)})

    @classmethod
    def of(cls, model: Any, bf16: bool) -> "FusedLoraLlama | None":
        if not enabled() or not hasattr(model, "get_base_model"):
            return None
        lm = model.get_base_model()
        config = getattr(lm, "config", None)
        body = getattr(lm, "model", None)
        if config is None or body is None or getattr(config, "model_type", None) != "llama":
            return None
        if (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
                or getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1
                or (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default") != "default"):
            return None
        if getattr(lm, "is_gradient_checkpointing", False) or getattr(lm, "is_activation_checkpointing", False):
            return None
        if next(model.parameters()).device.type != "cpu":
            return None
        trainable_elsewhere = [n for n, p in model.named_parameters()
                               if p.requires_grad and "lora_" not in n and not n.startswith(HEAD_MODULE + ".")]
        if trainable_elsewhere:
            return None  # modules_to_save, biases, ...: transformers' forward trains them
        for layer in body.layers:
            for name in MODULES:
                parent = layer.self_attn if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                m = getattr(parent, name, None)
                if m is None:
                    return None
                if hasattr(m, "lora_A"):
                    names = list(m.active_adapters)
                    if (len(names) != 1 or m.use_dora.get(names[0]) or m.merged
                            or getattr(m, "lora_bias", {}).get(names[0]) or m.base_layer.bias is not None):
                        return None
                elif type(m).__name__ != "Linear" or m.bias is not None:
                    return None
        return cls(model, bf16)

    def __call__(self, input_ids, attention_mask, keep):
        """Final hidden states (fp32) at `keep` (a bool (batch, tokens) mask of the positions read).
        `attention_mask`: (batch, tokens), 1 for real tokens (right padding).

        The tokens every row starts with (`shared_prefix`: a chat template's system turn, the
        instruction, fixed demos) are computed once, not once per row: the residual stream is a
        list of rows, the shared prefix's P followed by each row's remaining S tokens; attention
        reads the prefix's keys and values for every row. The same function, with fewer rows."""
        import torch
        import torch.nn.functional as F

        body = self.body
        B, T = input_ids.shape
        P = shared_prefix(input_ids, attention_mask, keep)
        S = T - P
        rows_ids = torch.cat([input_ids[0, :P], input_ids[:, P:].reshape(-1)])
        x = body.embed_tokens(rows_ids).float()  # (P + B*S, hidden)
        positions = torch.arange(T, device=x.device)[None]
        cos, sin = body.rotary_emb(x, positions)
        cos, sin = cos[0].to(self.low), sin[0].to(self.low)  # rotary in the products' dtype
        cos_rows = torch.cat([cos[:P], cos[P:].repeat(B, 1)])[:, None]  # (rows, 1, head_dim)
        sin_rows = torch.cat([sin[:P], sin[P:].repeat(B, 1)])[:, None]
        real = attention_mask.bool()
        allowed = torch.ones((T, T), dtype=torch.bool, device=x.device).tril()[None] & real[:, None, :]
        blocked = ~allowed[:, None, None, P:]  # (B, 1, 1, S, T): the suffix queries; same for every head of a group
        blocked_prefix = ~allowed[:1, None, None, :P, :P]  # (1, 1, 1, P, P): causal
        half = self.head_dim // 2

        def rope(t, c, s):
            return t * c + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * s

        read = keep.any(dim=0).nonzero().flatten() - P  # the last layer's query positions, in the suffix
        last = len(self.layers) - 1
        for i, L in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), L["norm_in"].weight, L["norm_in"].variance_epsilon)
            q, k, v = L["qkv"](h.to(self.low)).split([L["n_q"], L["n_k"], L["n_k"]], dim=-1)  # one backward (a cat)
            q, k, v = q.view(-1, self.heads, self.head_dim), k.view(-1, self.kv_heads, self.head_dim), \
                v.view(-1, self.kv_heads, self.head_dim)
            k = rope(k, cos_rows, sin_rows)
            keys = self._per_row(k, P, B)  # (B, T, kv heads, head dim)
            values = self._per_row(v, P, B)
            q_rest = q[P:].view(B, S, self.heads, self.head_dim)
            if i == last:  # only the positions read: no prefix, the suffix's `read` positions
                q_rest = rope(q_rest[:, read], cos[P:][read][:, None], sin[P:][read][:, None])
                o = self._attend(q_rest, keys, values, blocked[..., read, :], L["scaling"])
                x = x[P:].view(B, S, -1)[:, read]
            else:
                q_rest = rope(q_rest, cos[P:][:, None], sin[P:][:, None])
                o = self._attend(q_rest, keys, values, blocked, L["scaling"]).reshape(B * S, -1)
                if P:
                    q_pre = rope(q[:P], cos[:P][:, None], sin[:P][:, None])
                    o_pre = self._attend(q_pre[None], k[None, :P], v[None, :P], blocked_prefix, L["scaling"])
                    o = torch.cat([o_pre[0], o])
            x = x + L["o"](o)  # bf16 + fp32: the residual stream stays fp32
            h = F.rms_norm(x, (x.shape[-1],), L["norm_post"].weight, L["norm_post"].variance_epsilon)
            gate, up = L["gate_up"](h.to(self.low)).split(L["n_i"], dim=-1)
            x = x + L["down"](F.silu(gate) * up)
        x = F.rms_norm(x, (x.shape[-1],), body.norm.weight, body.norm.variance_epsilon)
        return x[keep[:, read + P]]

    @staticmethod
    def _per_row(t, P: int, B: int):
        """(rows, heads, dim) -> (B, T, heads, dim): the shared prefix's rows in front of each row's own."""
        import torch

        rest = t[P:].view(B, -1, *t.shape[1:])
        return torch.cat([t[None, :P].expand(B, -1, -1, -1), rest], dim=1) if P else rest

    def _attend(self, q, k, v, blocked, scaling: float):
        """Grouped-query attention (the evaluator's `_attend`, no prefix cache). q: (B, Tq, heads,
        dim); k, v: (B, Tk, kv heads, dim); blocked: (B, 1, 1, Tq, Tk). Returns (B, Tq, heads * dim)."""
        B, Tq, H, D = q.shape
        KVH = k.shape[2]
        q = q.transpose(1, 2).reshape(B, KVH, H // KVH * Tq, D)
        o = attend(q, k.transpose(1, 2), v.transpose(1, 2), blocked, scaling, None)
        return o.view(B, H, Tq, D).transpose(1, 2).reshape(B, Tq, H * D)

MIN_SHARED = 4  # a shorter common start is not worth the prefix's own attention pass


def shared_prefix(input_ids, attention_mask, keep) -> int:
    """How many tokens every row of the batch starts with (the same ids, all real), up to the first
    position whose output is read (those stay in each row's own part). 0 for a single row or a
    prefix shorter than MIN_SHARED."""
    B = input_ids.shape[0]
    if B < 2:
        return 0
    same = ((input_ids == input_ids[:1]) & attention_mask.bool()).all(dim=0)
    n = int(same.int().cumprod(dim=0).sum())
    read = keep.any(dim=0).nonzero()
    if len(read):
        n = min(n, int(read[0]))
    return n if n >= MIN_SHARED else 0
