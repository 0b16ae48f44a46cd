"""The local backend's engine: how one `complete()` call turns requests into few, full passes.

1. Every prompt is rendered and tokenized. The prefix all prompts of the call share (system
   prompt, instruction, few-shot demos) runs once; its KV cache is kept for the next call and
   expanded over every batch.
2. Prompt passes: requests sorted by length and grouped so that padding and the passes' fixed
   cost (every weight read once per pass) add up to the least (`make_batches`). Layout of a row:
   [left padding | rest of the prompt | label trie]. Label requests (`Request.labels`) are scored
   in this same pass: the labels' tokens form a trie laid out after the prompt, and a tree-shaped
   4D attention mask lets each trie node see the prompt and its own ancestors only, so the prompt
   and shared label prefixes ("Unilateral change" / "Unilateral termination") are computed once,
   and only the prompt's last position and the trie nodes go through the vocabulary projection.
   A label request's free answer (`free_text=True`, temperature 0) is read off this same pass
   when greedy decoding would write one of the labels and stop: the argmax after the prompt and
   after each trie node is already computed, so `greedy_label` follows it (then
   `meta["free_text_from_scoring"]`); only the other rows decode.
3. Decoding: the rows that generate (free text, JSON, and label requests with `free_text=True`)
   of several prompt passes are merged into one wide batch (their KV caches left-padded, with the
   trie dropped) and decoded one token per step into preallocated KV buffers; a row leaves the
   batch when it ends (end of turn / eos, `max_tokens`, a `stop` string, or for JSON requests the
   end of the first balanced JSON value). A request with `constrained=True` decodes under the
   grammar of its JSON schema (`Grammars`: llguidance computes each step's allowed tokens, a
   bitmask applied to its row's logits), so its answer parses and matches the schema.
   Every generated token's log-probability (under the model, before the grammar's mask) is kept:
   `Completion.token_logprobs`, the confidence a hybrid routes generated answers on.

A label's score is the sum of the log-probabilities of its tokens (tokenized without a leading
space) followed by the end-of-turn token (`<|im_end|>` for SmolLM2, `tunelab.models.chat`): the
probability that the model's whole answer is exactly that label. The end-of-turn token settles
labels that are prefixes of one another ("spam" vs "spammy"). `Completion.label_logprobs` holds the
scores renormalized over the labels (log-softmax), `meta["label_logprobs_raw"]` the raw sums;
`completion_tokens` is the chosen label's token count. `latency_s` is the request's share of its
prompt pass, its decoding batch and the shared prefix.

Free generation is greedy at temperature 0; at temperature > 0 each request samples with its own
`torch.Generator` seeded from `Request.seed` (None counts as 0), so an answer does not depend on
the batch it ran in and repeats with different seeds are independent. `completion_tokens` counts
the generated tokens without the end-of-turn token; the text is decoded without special tokens,
cut at a stop string (or after the JSON value) and stripped.

The pure helpers at the top (batching, tries, stops) need no torch and are tested on their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Request
from tunelab.models.local.grammar import CLOSE_MARGIN, Grammars
from tunelab.models.local.layout import (LabelTrie, build_trie, common_prefix_len, find_stop, greedy_label, json_end,
                                         make_batches, trim_output)

if TYPE_CHECKING:
    from tunelab.models.local.model import LocalModel

# Prompt passes: at most this many padded tokens. A pass's fixed cost, in tokens, against which
# padding is weighed: measured on 2 CPU cores with SmolLM2-135M (bf16, fused pass), a prompt pass took
# 36 ms + 0.71 ms per token (54 passes of 11 to 957 tokens, least squares), i.e. ~50 tokens.
SCORE_TOKEN_BUDGET = 4096
PASS_OVERHEAD_TOKENS = 50
# Decoding batches: their KV cache (rows x (cache length + max_tokens) slots) within this many bytes.
# SmolLM2-135M keeps 23 KiB per slot in bf16 (30 layers x keys and values x 3 heads x 64), so about
# 34,000 slots: the free answers of 100 label requests with prompts of up to 300 tokens decode as one.
GENERATE_KV_BYTES = 768 << 20
MAX_DECODE_ROWS = 128  # rows of a decoding batch: a step costs ~35 ms + ~1 ms a row (2 cores, SmolLM2-135M)
MIN_SHARED_PREFIX = 8  # tokens all prompts of a call share (system prompt, instruction, demos)


class Engine:
    """Batched label scoring and generation for one `LocalModel` (see the module doc). It keeps
    the label tries it built and the last shared prefix's KV cache between calls."""

    def __init__(self, model: "LocalModel"):
        self.lm = model
        self._tries: dict[str, tuple[LabelTrie, list[int]]] = {}
        self._last_prefix: tuple | None = None
        self.grammars = Grammars(model)

    def _prompt_ids(self, requests: list[Request]) -> list[list[int]]:
        texts = [self.lm.render(r.messages) for r in requests]
        return self.lm.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _check_length(self, n: int, index: int) -> None:
        limit = self.lm.context_length
        if limit and n > limit:
            raise UserError(f"request {index}: {n} tokens do not fit the model's context of {limit} tokens",
                            field="messages")

    def run(self, requests: list[Request], on_tokens: dict[int, Any] | None = None) -> list[Completion]:
        """Answer `requests`; `on_tokens[i]`, when given, is called with request i's generated
        tokens after every decoding step (streaming)."""
        import torch

        if not requests:
            return []
        with self.lm.lock, torch.inference_mode():
            prompt_ids = self._prompt_ids(requests)
            jobs = [self._job(i, r, prompt_ids[i]) for i, r in enumerate(requests)]
            for i, callback in (on_tokens or {}).items():
                jobs[i].on_tokens = callback
            start = time.perf_counter()
            # The prefix every prompt shares (system prompt, instruction, demos) runs once.
            shared = common_prefix_len(prompt_ids)
            shared = min(shared, min(len(p) for p in prompt_ids) - 1)
            prefix = self._prefix_cache(prompt_ids[0][:shared]) if shared >= MIN_SHARED_PREFIX else None
            C = prefix[0] if prefix else 0
            prefix_share = (time.perf_counter() - start) / len(requests)
            # Prompt passes cost per token, plus a fixed cost per pass. Decoding steps gain from wide
            # batches: the generating rows of several prompt passes decode together.
            lengths = [len(j.prompt) - C + (len(j.trie.tokens) if j.trie else 0) for j in jobs]
            pending: list[_Prefilled] = []
            for batch in make_batches(lengths, SCORE_TOKEN_BUDGET, self.lm.max_batch, PASS_OVERHEAD_TOKENS):
                rows = [jobs[b] for b in batch]
                start = time.perf_counter()
                state = self._prefill(rows, prefix)
                share = (time.perf_counter() - start) / len(rows)
                for job in rows:
                    job.latency += share + prefix_share
                    job.batch_size = len(rows)
                if state is None:
                    continue
                if pending and not self._fits(pending + [state]):
                    self._decode_merged(pending)
                    pending = []
                pending.append(state)
            if pending:
                self._decode_merged(pending)
            return [self._completion(job, requests[job.index], C) for job in jobs]

    def _fits(self, states: list["_Prefilled"]) -> bool:
        rows = sum(len(s.jobs) for s in states)
        width = max(s.attn.shape[1] for s in states) + max(j.max_new for s in states for j in s.jobs)
        return rows <= self.lm.max_decode_rows and rows * width <= self._kv_slots()

    def _kv_slots(self) -> int:
        """How many KV cache slots (one token of one row) a decoding batch may hold."""
        config = self.lm.hf_model.config
        try:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            per_slot = config.num_hidden_layers * 2 * heads * head_dim * self.lm.dtype.itemsize
        except (AttributeError, TypeError):  # a config without the usual names: assume 64 KiB a slot
            per_slot = 64 << 10
        return max(1, GENERATE_KV_BYTES // per_slot)

    def _decode_merged(self, states: list["_Prefilled"]) -> None:
        """Decode the generating rows of several prompt passes as one batch: their KV caches are
        left-padded to one length (padding masked out) and stacked."""
        import torch
        from transformers import DynamicCache

        start = time.perf_counter()
        width = max(s.attn.shape[1] for s in states)

        def padded(t, dim):
            missing = width - t.shape[dim]
            if not missing:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        extra = max(j.max_new for s in states for j in s.jobs)
        layers = []
        for li in range(len(states[0].cache.layers)):
            keys = [s.cache.layers[li].keys for s in states]
            values = [s.cache.layers[li].values for s in states]
            layers.append(growing_layer(keys, values, width, extra))
        cache = DynamicCache()
        cache.layers = layers
        jobs = [j for s in states for j in s.jobs]
        logits = torch.cat([s.logits for s in states])
        attn = torch.cat([padded(s.attn, 1) for s in states])
        pos = torch.cat([s.next_pos for s in states])
        self._decode(jobs, logits, cache, attn, pos)
        share = (time.perf_counter() - start) / len(jobs)
        for job in jobs:
            job.latency += share
            job.decode_batch_size = len(jobs)

    def _job(self, index: int, req: Request, prompt: list[int]) -> "_Job":
        trie = label_lengths = None
        if req.labels:
            trie, label_lengths = self._label_trie(req.labels)
        generates = not req.labels or req.free_text
        limit = self.lm.context_length or 10**9
        self._check_length(len(prompt) + (len(trie.tokens) if trie else 0) + 1, index)
        max_new = max(1, min(req.max_tokens, limit - len(prompt))) if generates else 0
        grammar = self.grammars.matcher(req.json_schema) if (req.constrained and generates and not req.labels) else None
        return _Job(index=index, prompt=prompt, trie=trie, label_lengths=label_lengths, max_new=max_new,
                    temperature=req.temperature, seed=req.seed, stop=(list(req.stop or []) + self.lm.answer_stops()) or None,
                    json=req.json_schema is not None or grammar is not None, grammar=grammar)

    def _completion(self, job: "_Job", req: Request, shared: int) -> Completion:
        share = job.latency
        meta: dict[str, Any] = {"precision": self.lm.precision, "batch_size": job.batch_size,
                                "shared_prefix_tokens": shared}
        text = job.text or ""
        if job.sums is not None:
            best = max(range(len(job.sums)), key=lambda k: job.sums[k])
            meta["label_logprobs_raw"] = dict(zip(req.labels, job.sums))
            comp = Completion(text=req.labels[best], prompt_tokens=len(job.prompt),
                              completion_tokens=job.label_lengths[best], latency_s=share,
                              label_logprobs=dict(zip(req.labels, _log_softmax(job.sums))), meta=meta)
            if job.max_new:
                comp.free_text = text
                meta["free_text_tokens"] = job.n_generated
                if job.from_scoring:
                    meta["free_text_from_scoring"] = True
                else:
                    meta["decode_batch_size"] = job.decode_batch_size
            return comp
        if job.cut:
            meta["stopped"] = True
        if job.grammar is not None:
            meta["constrained"] = "json_schema"
            if job.grammar.is_error():
                meta["grammar_error"] = job.grammar.get_error()[:200]
        meta["decode_batch_size"] = job.decode_batch_size
        return Completion(text=text, prompt_tokens=len(job.prompt), completion_tokens=job.n_generated,
                          latency_s=share, token_logprobs=job.logprobs, meta=meta)

    def _label_trie(self, labels: list[str]) -> tuple[LabelTrie, list[int]]:
        key = "\x00".join(labels)
        cache = self._tries
        if key not in cache:
            import torch

            eot = self.lm.end_of_turn_ids()
            seqs = [ids + eot for ids in self.lm.tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
            trie = build_trie(seqs)
            trie.sees = torch.tensor(trie.ancestry(), dtype=torch.bool)
            cache[key] = (trie, [len(s) - len(eot) for s in seqs])
        return cache[key]

    def _prefix_cache(self, prefix: list[int]):
        """(length, per-layer (key, value) of shape (1, heads, length, dim)) for a shared prompt
        prefix; the last one is kept, since consecutive calls of an evaluation share it."""
        import torch

        key = tuple(prefix)
        cached = self._last_prefix
        if cached is not None and cached[0] == key:
            return cached[1]
        from transformers import DynamicCache

        ids = torch.tensor([prefix], dtype=torch.long, device=self.lm.device)
        # full layers (no sliding-window layers that drop old keys): the prefix is expanded over batches
        cache = self.lm.hf_model(input_ids=ids, past_key_values=DynamicCache(), use_cache=True,
                                 logits_to_keep=1).past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
            return None  # an unusual cache: run without sharing the prefix
        value = (len(prefix), [(layer.keys, layer.values) for layer in layers])
        self._last_prefix = (key, value)
        return value

    def _prefill(self, jobs: list["_Job"], prefix) -> "_Prefilled | None":
        """One forward pass over the batch's prompts (minus the shared prefix, already cached) and
        the label tries laid out after them. Scores the labels; returns what decoding needs for
        the rows that generate (their first-token logits and KV cache), or None.

        Row layout: [left padding | rest of prompt | trie nodes | right padding]; all prompts end in
        the same column S-1. The 4D attention mask is causal over the prompts and tree-shaped over
        the tries (a node sees the prompt, its ancestors and itself)."""
        import torch
        from transformers import DynamicCache

        model, dev = self.lm.hf_model, self.lm.device
        pad = self.lm.tokenizer.pad_token_id
        C = prefix[0] if prefix else 0
        rests = [j.prompt[C:] for j in jobs]
        B = len(jobs)
        S = max(len(r) for r in rests)
        N = max((len(j.trie.tokens) for j in jobs if j.trie), default=0)
        T = S + N
        ids = torch.full((B, T), pad, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        allow = torch.zeros((B, T, C + T), dtype=torch.bool)
        allow[:, :, :C] = True  # everything sees the shared prefix
        causal = torch.ones((S, S), dtype=torch.bool).tril()
        idx = torch.arange(T)
        for b, (rest, job) in enumerate(zip(rests, jobs)):
            n_pad, L = S - len(rest), C + len(rest)
            ids[b, n_pad:S] = torch.tensor(rest, dtype=torch.long)
            pos[b, n_pad:S] = torch.arange(C, L)
            allow[b, :S, C:C + S] = causal
            allow[b, :, C:C + n_pad] = False
            n = len(job.trie.tokens) if job.trie else 0
            if n:
                ids[b, S:S + n] = torch.tensor(job.trie.tokens, dtype=torch.long)
                pos[b, S:S + n] = L - 1 + torch.tensor(job.trie.depths, dtype=torch.long)
                allow[b, S:S + n, C + n_pad:C + S] = True
                allow[b, S:S + n, C + S:C + S + n] = job.trie.sees
            allow[b, idx, C + idx] = True  # padding sees itself (no all-masked rows)
        mask = self._mask(allow, pos, C)
        kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix[1]] if prefix else None
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        body = getattr(model, "model", None)
        head = model.get_output_embeddings()
        fused = self.lm.fused() if head is not None else None
        if fused is not None:  # the fused pass computes the last layer for the positions needed only
            hidden = fused(ids.to(dev), allow[:, None].to(dev), pos.to(dev), cache, keep_from=S - 1)
            project = head
        elif body is not None and head is not None:  # run the body; project only the positions needed
            hidden = body(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                          past_key_values=cache, use_cache=True).last_hidden_state[:, S - 1:]
            project = head
        else:
            hidden = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                           past_key_values=cache, use_cache=True, logits_to_keep=N + 1).logits
            project = None
        # label scores, a few rows at a time (logits are rows x nodes x vocabulary)
        scored = [b for b, j in enumerate(jobs) if j.trie]
        step = max(1, (1 << 24) // ((N + 1) * max(1, self.lm.hf_model.config.vocab_size)))
        stop_ids = set(self.lm.stop_token_ids())
        for lo in range(0, len(scored), step):
            chunk = scored[lo:lo + step]
            h = hidden[chunk]
            logprobs = torch.log_softmax((project(h) if project else h).float(), dim=-1).cpu()
            for row, b in enumerate(chunk):
                job = jobs[b]
                trie = job.trie
                job.sums = [float(logprobs[row, torch.tensor([p + 1 for p in path]), torch.tensor(target)].sum())
                            for path, target in zip(trie.paths, trie.targets)]
                if job.max_new and job.temperature <= 0 and self.lm.reuse_greedy:
                    # the free answer is a label followed by a stop token: no generation needed
                    top = logprobs[row, :len(trie.tokens) + 1].argmax(dim=-1).tolist()
                    found = greedy_label(trie, job.label_lengths, top, stop_ids, job.max_new)
                    if found is not None:
                        self._finish_text(job, found[1])
                        job.from_scoring = True
        gen = [b for b, j in enumerate(jobs) if j.max_new and not j.from_scoring]
        if not gen:
            return None
        first = hidden[gen, 0]
        first = (project(first) if project else first).float()
        if N:
            cache.crop(-N)  # drop the trie nodes: decoding continues right after the prompts
        if len(gen) < B:
            cache.batch_select_indices(torch.tensor(gen, device=dev))
        attn = torch.ones((len(gen), C + S), dtype=torch.long)
        for row, b in enumerate(gen):
            attn[row, C:C + S - len(rests[b])] = 0
        return _Prefilled([jobs[b] for b in gen], first, cache, attn.to(dev),
                          torch.tensor([len(jobs[b].prompt) for b in gen], device=dev))

    def _mask(self, allow, pos, C: int):
        """The 4D attention mask for `allow` (B, T, C + T) in the form the model's attention takes: a
        bool mask for SDPA, an additive one for eager attention; for a model with sliding-window
        layers (Gemma 3) a mask per layer type, the sliding one also hiding keys `sliding_window` or
        more positions back."""
        import torch

        config = self.lm.hf_model.config

        def form(a):
            if getattr(config, "_attn_implementation", None) == "sdpa":
                return a[:, None].to(self.lm.device)  # SDPA on CPU is faster with a boolean mask, same numbers
            mask = torch.zeros(a[:, None].shape, dtype=self.lm.dtype)  # eager attention adds the mask
            return mask.masked_fill_(~a[:, None], torch.finfo(self.lm.dtype).min).to(self.lm.device)

        window = getattr(config, "sliding_window", None)
        if not window or "sliding_attention" not in (getattr(config, "layer_types", None) or []):
            return form(allow)
        keys = torch.cat([torch.arange(C).expand(pos.shape[0], C), pos], dim=1)
        near = (pos[:, :, None] - keys[:, None, :]) < window
        return {"full_attention": form(allow), "sliding_attention": form(allow & near)}

    def _decode(self, jobs: list["_Job"], logits, cache, attn, next_pos) -> None:
        """Greedy (temperature 0) or per-row seeded sampling, one token per step for every row
        still running; finished rows leave the batch."""
        import torch

        model, dev = self.lm.hf_model, self.lm.device
        tok = self.lm.tokenizer
        fused, head = self.lm.fused(), model.get_output_embeddings()
        stop_ids = torch.tensor(self.lm.stop_token_ids(), device=dev)
        gens = {}
        for job in jobs:
            job.tokens = []
            job.logprobs = []
            if job.temperature > 0:
                g = torch.Generator(device=dev)
                g.manual_seed(int(job.seed or 0))
                gens[id(job)] = g
        live = list(range(len(jobs)))
        constrained = any(job.grammar is not None for job in jobs)
        step = 0
        while True:
            # the model's own log-probability of each chosen token (before any grammar mask): the
            # confidence a hybrid routes on
            raw, norm = logits, torch.logsumexp(logits, dim=-1)
            if constrained:
                left = [jobs[j].max_new - len(jobs[j].tokens) for j in live]
                texts = [tok.decode(jobs[j].tokens, skip_special_tokens=True)
                         if jobs[j].grammar is not None and n <= CLOSE_MARGIN else "" for j, n in zip(live, left)]
                logits = self.grammars.mask([jobs[j].grammar for j in live], logits.clone(), left, texts)
            choice = logits.argmax(dim=-1)
            for row, j in enumerate(live):
                job = jobs[j]
                if job.temperature > 0:
                    probs = torch.softmax(logits[row] / job.temperature, dim=-1)
                    choice[row] = torch.multinomial(probs, 1, generator=gens[id(job)])[0]
            chosen_lp = (raw.gather(1, choice[:, None])[:, 0] - norm).tolist()
            finished = torch.isin(choice, stop_ids).tolist()
            keep = []
            for row, j in enumerate(live):
                job = jobs[j]
                if finished[row]:
                    continue
                token = int(choice[row])
                job.tokens.append(token)
                job.logprobs.append(round(float(chosen_lp[row]), 4))
                if job.grammar is not None:
                    job.grammar.consume_token(token)
                if job.on_tokens is not None:
                    job.on_tokens(job.tokens)
                done = len(job.tokens) >= job.max_new or (job.grammar is not None and job.grammar.is_stopped())
                if not done and (job.stop or job.json):
                    text = tok.decode(job.tokens, skip_special_tokens=True)
                    done = find_stop(text, job.stop) is not None or (job.json and json_end(text) is not None)
                if not done:
                    keep.append(row)
            step += 1
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                attn, next_pos, choice = attn[sel], next_pos[sel], choice[sel]
                live = [live[r] for r in keep]
            attn = torch.cat([attn, attn.new_ones((len(live), 1))], dim=1)
            if fused is not None and head is not None:
                logits = head(fused(choice[:, None], attn, next_pos[:, None], cache)[:, -1]).float()
            else:
                out = model(input_ids=choice[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                            past_key_values=cache, use_cache=True, logits_to_keep=1)
                logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
        for job in jobs:
            self._finish_text(job, job.tokens)

    def _finish_text(self, job: "_Job", tokens: list[int]) -> None:
        """A generated answer's text: decoded without special tokens, cut at a stop string (or
        after the JSON value) and stripped."""
        job.tokens = list(tokens)
        text = self.lm.tokenizer.decode(job.tokens, skip_special_tokens=True)
        text, job.cut = trim_output(text, job.stop, job.json)
        job.text = text.strip()
        job.n_generated = len(job.tokens)


@dataclass
class _Job:
    """One request on its way through a batch."""

    index: int
    prompt: list[int]
    trie: LabelTrie | None
    label_lengths: list[int] | None
    max_new: int  # 0: no generation (label scoring only)
    temperature: float
    seed: int | None
    stop: list[str] | None
    json: bool
    sums: list[float] | None = None
    tokens: list[int] | None = None
    text: str | None = None
    n_generated: int = 0
    cut: bool = False
    latency: float = 0.0
    batch_size: int = 0  # rows of its prompt pass
    decode_batch_size: int = 0  # rows it was decoded with
    from_scoring: bool = False  # the free answer was read off the label-scoring pass
    on_tokens: Any = None  # called with the tokens so far after each decoding step (streaming)
    grammar: Any = None  # an llguidance matcher: the answer is decoded under its grammar (Request.constrained)
    logprobs: list[float] | None = None  # the log-probability of each generated token

    @property
    def generates(self) -> bool:
        return self.max_new > 0


def _growing_layer_class():
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """A KV cache layer that writes into a preallocated buffer instead of concatenating (which
        copies the whole cache at every decoding step)."""

        @classmethod
        def of(cls, keys: list, values: list, n: int, extra: int) -> "GrowingLayer":
            import torch

            layer = cls()
            rows = sum(k.shape[0] for k in keys)
            shape = (rows, keys[0].shape[1], n + extra, keys[0].shape[3])
            layer._kbuf = torch.empty(shape, dtype=keys[0].dtype, device=keys[0].device)
            layer._vbuf = torch.empty(shape, dtype=values[0].dtype, device=values[0].device)
            row = 0
            for k, v in zip(keys, values):  # right-aligned, the padding on the left zeroed
                b, pad = k.shape[0], n - k.shape[2]
                for buf, t in ((layer._kbuf, k), (layer._vbuf, v)):
                    if pad:
                        buf[row:row + b, :, :pad].zero_()
                    buf[row:row + b, :, pad:n] = t
                row += b
            layer.dtype, layer.device = keys[0].dtype, keys[0].device
            layer.is_initialized = True
            layer._set(n)
            return layer

        def _set(self, n: int) -> None:
            self.n = n
            self.keys = self._kbuf[:, :, :n]
            self.values = self._vbuf[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            q = key_states.shape[2]
            if self.n + q > self._kbuf.shape[2]:  # out of room: grow (rare)
                grow = max(q, self._kbuf.shape[2] // 2)
                pad = list(self._kbuf.shape)
                pad[2] = grow
                self._kbuf = torch.cat([self._kbuf, self._kbuf.new_zeros(pad)], dim=2)
                self._vbuf = torch.cat([self._vbuf, self._vbuf.new_zeros(pad)], dim=2)
            self._kbuf[:, :, self.n:self.n + q] = key_states
            self._vbuf[:, :, self.n:self.n + q] = value_states
            self._set(self.n + q)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            self._set(self.n - abs(tokens_to_remove))

        def batch_select_indices(self, indices) -> None:
            self._kbuf = self._kbuf[indices]
            self._vbuf = self._vbuf[indices]
            self._set(self.n)

    return GrowingLayer


_growing_layer: Any = None


def growing_layer(keys: list, values: list, n: int, extra: int):
    """A cache layer holding `keys`/`values` stacked over the batch, each left-padded with zeros to
    `n` tokens, with room for `extra` more (the class is made on first use: transformers is imported
    lazily)."""
    global _growing_layer
    if _growing_layer is None:
        _growing_layer = _growing_layer_class()
    return _growing_layer.of(keys, values, n, extra)


@dataclass
class _Prefilled:
    """Rows of one prompt pass that go on to decoding."""

    jobs: list[_Job]
    logits: Any  # (rows, vocabulary): the first generated token's logits
    cache: Any  # DynamicCache over [shared prefix | padding | rest of prompt]
    attn: Any  # (rows, cache length): 1 for real tokens, 0 for padding
    next_pos: Any  # (rows,): the position of the next token


def _log_softmax(values: list[float]) -> list[float]:
    import math

    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]
