# longer than 600 lines: one batch's passes (prompts, label search hand-off, decoding) share the private row state of _Job, _Pass and _Prefilled
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
   A trie of more than `TRIE_PASS_NODES` nodes (many labels: 151 intents make 424) is not laid
   out: the pass runs the prompts only, and `labels.search_passes` then feeds each row's most
   promising trie nodes, a few per pass and the rows of all prompt passes together, until the best
   label is settled (the same argmax as full scoring). With the fused pass the shared prefix's KV
   cache is kept apart, once, and attended to by every row's queries in one matrix product
   (rather than copied into every row's cache), in prompt passes, the label search and decoding.
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

4. Shards: on a CPU with two threads or more, a call of `MIN_SHARD_REQUESTS` requests or more (an
   evaluation's batch) runs as two shards at once, every other request to each, each shard's passes
   on its own thread with one thread of torch's (`TUNELAB_SHARDS`, default 2; 1 turns it off). The
   Python between the torch operations (the label search's bookkeeping, masks, decoding's stop
   checks) runs on one core at a time: with one call on two threads the second core waits through
   it, with two shards the other shard's matrix products fill it. Measured on the 2-core machine,
   the two ways alternating in one process (`bench/eval_throughput.py`'s cases): 77 labels 1.16x,
   two labels 1.07x. Not for streaming or grammar-constrained calls (llguidance's matchers stay on
   one thread). A request's latency is its share of its shard's time divided by the shards.

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
from tunelab.models.local.kv import cache_kwarg, growing_layer, returned_cache
from tunelab.models.local.labels import LABEL_TOLERANCE, LOGIT_ROWS, logprob_rows
from tunelab.models.local.labels import search_passes
from tunelab.models.local.layout import (LabelTrie, TrieSearch, build_trie, common_prefix_len, find_stop, greedy_label,
                                         json_end, make_batches, trim_output)

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
TRIE_PASS_NODES = 64  # a label trie of up to this many nodes is laid out after every prompt; bigger ones are searched
MIN_SHARED_PREFIX = 8  # tokens all prompts of a call share (system prompt, instruction, demos)
# A call of at least this many requests runs as `call_shards()` shards at once, one thread each
# (`Engine._run_sharded`).
MIN_SHARD_REQUESTS = 16


def call_shards() -> int:
    """Shards a big call runs as on the CPU (`TUNELAB_SHARDS`, default 2; 1 turns sharding off)."""
    import os

    value = os.environ.get("TUNELAB_SHARDS", "").strip()
    try:
        return max(1, int(value)) if value else 2
    except ValueError:
        raise UserError(f"TUNELAB_SHARDS={value!r}: expected a whole number of shards (1 turns sharding off)") from None


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
            shards = self._shards(jobs, on_tokens)
            if len(shards) == 1:
                self._run_jobs(jobs, prefix)
            else:
                self._run_sharded(shards, prefix)
            for job in jobs:
                job.latency += prefix_share
            return [self._completion(job, requests[job.index], C) for job in jobs]

    def _run_jobs(self, jobs: list["_Job"], prefix) -> None:
        """The prompt passes, label searches and decoding of `jobs` (after the shared prefix).
        Prompt passes cost per token, plus a fixed cost per pass. The label searches (many labels)
        of several prompt passes run as one, as long as their caches fit the decoding budget.
        Decoding steps gain from wide batches: the generating rows of several prompt passes decode
        together."""
        C = prefix[0] if prefix else 0
        lengths = [len(j.prompt) - C + (len(j.trie.tokens) if j.trie and len(j.trie.tokens) <= TRIE_PASS_NODES else 0)
                   for j in jobs]
        pending: list[_Prefilled] = []
        searching: list[_Pass] = []

        def finish(passes: list[_Pass]) -> None:
            nonlocal pending
            self._search(passes)
            for state in filter(None, map(self._finish, passes)):
                if pending and not self._fits(pending + [state]):
                    self._decode_merged(pending)
                    pending = []
                pending.append(state)

        for batch in make_batches(lengths, SCORE_TOKEN_BUDGET, self.lm.max_batch, PASS_OVERHEAD_TOKENS):
            rows = [jobs[b] for b in batch]
            start = time.perf_counter()
            done = self._prefill(rows, prefix)
            share = (time.perf_counter() - start) / len(rows)
            for job in rows:
                job.latency += share
                job.batch_size = len(rows)
            if not done.searches:
                finish([done])
                continue
            if searching and sum(len(p.jobs) * p.width for p in searching + [done]) * 4 > self._kv_slots():
                finish(searching)  # the searched caches grow by about the prompts' length and more
                searching = []
            searching.append(done)
        finish(searching)
        if pending:
            self._decode_merged(pending)

    def _shards(self, jobs: list["_Job"], on_tokens) -> list[list["_Job"]]:
        """`jobs` split for `_run_sharded`, or [jobs]. A call is sharded on a CPU with two threads
        or more, when it has at least `MIN_SHARD_REQUESTS` requests, none streams and none decodes
        under a grammar (llguidance's matchers stay on one thread). Every other request to each
        shard: their lengths and kinds spread evenly."""
        import torch

        n = call_shards()
        if (n < 2 or len(jobs) < MIN_SHARD_REQUESTS or on_tokens or self.lm.device != "cpu"
                or torch.get_num_threads() < n or any(j.grammar is not None for j in jobs)):
            return [jobs]
        return [jobs[i::n] for i in range(n)]

    def _run_sharded(self, shards: list[list["_Job"]], prefix) -> None:
        """`_run_jobs` for each shard at once, each on its own thread with an even share of torch's
        threads (why: the module doc, item 4). A request's latency is its share of its shard's wall
        time divided by the number of shards, so its cost stays its share of the machine's time."""
        import threading

        import torch

        total = torch.get_num_threads()
        per = max(1, total // len(shards))
        self._fused()  # built once, before the threads share it
        errors: list[BaseException] = []

        def work(part: list[_Job]) -> None:
            try:
                torch.set_num_threads(per)  # this thread's OpenMP team
                with torch.inference_mode():
                    self._run_jobs(part, prefix)
            except BaseException as exc:  # re-raised on the caller's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(part,), name=f"tunelab-shard-{i}", daemon=True)
                   for i, part in enumerate(shards)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            torch.set_num_threads(total)  # the threads' setting also became the default for new threads
        if errors:
            raise errors[0]
        for part in shards:
            for job in part:
                job.latency /= len(shards)
                job.shards = len(shards)

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
        self._decode(jobs, logits, cache, attn, pos, states[0].prefix)
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
        if job.shards > 1:
            meta["shards"] = job.shards
        text = job.text or ""
        if job.sums is not None:
            best = max(range(len(job.sums)), key=lambda k: job.sums[k])
            meta["label_logprobs_raw"] = dict(zip(req.labels, job.sums))
            if job.nodes_fed is not None:
                meta["labels_cut"], meta["trie_nodes_fed"] = job.labels_cut, job.nodes_fed
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
        prefix. The last one is kept, since consecutive calls of an evaluation share it: a call
        whose prefix shares at least MIN_SHARED_PREFIX tokens with it (the instruction and label
        list, where its examples happen to share a first word too, or a prompt with one more demo)
        runs only the tokens after those."""
        import torch

        key = tuple(prefix)
        start, past = 0, None
        cached = self._last_prefix
        if cached is not None:
            if cached[0] == key:
                return cached[1]
            start = common_prefix_len([list(cached[0]), prefix])
            if start >= MIN_SHARED_PREFIX:
                past = [(k[:, :, :start], v[:, :, :start]) for k, v in cached[1][1]]
                if start == len(prefix):
                    return start, past
            else:
                start = 0
        from transformers import DynamicCache

        ids = torch.tensor([prefix[start:]], dtype=torch.long, device=self.lm.device)
        # full layers (no sliding-window layers that drop old keys): the prefix is expanded over batches
        hf = self.lm.hf_model
        cache = returned_cache(hf(input_ids=ids, use_cache=True, logits_to_keep=1,
                                  **cache_kwarg(hf, DynamicCache(ddp_cache_data=past) if past else DynamicCache())))
        layers = getattr(cache, "layers", None)
        if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
            return None  # an unusual cache: run without sharing the prefix
        value = (len(prefix), [(layer.keys, layer.values) for layer in layers])
        self._last_prefix = (key, value)
        return value

    def _prefill(self, jobs: list["_Job"], prefix) -> "_Pass":
        """One forward pass over the batch's prompts (minus the shared prefix, already cached) and
        the label tries laid out after them. Scores the labels laid out; the searched tries have
        their first tokens scored, the rest is `_search`'s. `_finish` then gives what decoding needs.

        Row layout: [left padding | rest of prompt | trie nodes | right padding]; all prompts end in
        the same column S-1. The 4D attention mask is causal over the prompts and tree-shaped over
        the tries (a node sees the prompt, its ancestors and itself)."""
        import torch
        from transformers import DynamicCache

        model = self.lm.hf_model
        pad = self.lm.tokenizer.pad_token_id
        C = prefix[0] if prefix else 0
        rests = [j.prompt[C:] for j in jobs]
        B = len(jobs)
        S = max(len(r) for r in rests)
        head = model.get_output_embeddings()
        # many labels: the tries are searched after the prompt pass (labels.search), not laid out
        searching = head is not None and any(j.trie and len(j.trie.tokens) > TRIE_PASS_NODES for j in jobs)
        N = 0 if searching else max((len(j.trie.tokens) for j in jobs if j.trie), default=0)
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
            n = len(job.trie.tokens) if job.trie and not searching else 0
            if n:
                ids[b, S:S + n] = torch.tensor(job.trie.tokens, dtype=torch.long)
                pos[b, S:S + n] = L - 1 + torch.tensor(job.trie.depths, dtype=torch.long)
                allow[b, S:S + n, C + n_pad:C + S] = True
                allow[b, S:S + n, C + S:C + S + n] = job.trie.sees
            allow[b, idx, C + idx] = True  # padding sees itself (no all-masked rows)
        key_pos = torch.cat([torch.arange(C).expand(B, C), pos], dim=1)
        # the fused pass keeps the shared prefix apart (once, not once per row): the cache, the mask
        # and the key positions then cover the rows' own positions only
        shared = prefix[1] if prefix and self._fused() is not None else None
        if shared is not None:
            allow, key_pos, C = allow[:, :, C:], key_pos[:, C:], 0
        kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix[1]] if prefix and shared is None else None
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        hidden, project = self._forward(ids, allow, pos, key_pos, cache, keep_from=S - 1, logits_to_keep=N + 1,
                                        prefix=shared)
        # label scores, a few rows at a time (logits are rows x nodes x vocabulary; `logprob_rows`
        # turns a few of them at a time into float log-probabilities)
        scored = [b for b, j in enumerate(jobs) if j.trie]
        step = max(1, (1 << 24) // ((N + 1) * max(1, self.lm.hf_model.config.vocab_size)))
        stop_ids = set(self.lm.stop_token_ids())
        searches: dict[int, TrieSearch] = {}
        for lo in range(0, len(scored), step):
            chunk = scored[lo:lo + step]
            h = hidden[chunk]
            for first, logprobs in logprob_rows(project(h) if project else h, max(1, LOGIT_ROWS // (N + 1))):
                for row, b in enumerate(chunk[first:first + len(logprobs)]):
                    job = jobs[b]
                    trie = job.trie
                    if searching:
                        big = len(trie.tokens) > TRIE_PASS_NODES
                        searches[b] = TrieSearch(trie, LABEL_TOLERANCE if big else 0.0)
                        wanted = searches[b].wanted(-1)
                        searches[b].feed(-1, logprobs[row, 0, wanted].tolist(), int(logprobs[row, 0].argmax()))
                        continue
                    job.sums = [float(logprobs[row, torch.tensor([p + 1 for p in path]), torch.tensor(target)].sum())
                                for path, target in zip(trie.paths, trie.targets)]
                    top = logprobs[row, :len(trie.tokens) + 1].argmax(dim=-1).tolist()
                    self._greedy_from_scoring(job, top, stop_ids)
        sel = torch.tensor(list(searches), dtype=torch.long)
        # what a searched prompt's last token sees (the prefix unless kept apart, and its prompt)
        return _Pass(jobs, hidden, project, cache, N, C, [S - len(r) for r in rests], C + S, searches,
                     allow[sel, S - 1, :C + S].clone(), key_pos[sel, :C + S], pos[sel, S - 1], shared)

    def _search(self, passes: list["_Pass"]) -> None:
        """One label search over the searched rows of several prompt passes (`labels.search_passes`)."""
        rows = [(p, b) for p in passes for b in p.searches]
        if not rows:
            return
        start = time.perf_counter()
        shared = passes[0].shared

        def forward(new_ids, new_allow, new_pos, new_keys, on, real):
            return self._forward(new_ids, new_allow, new_pos, new_keys, on, keep_from=0, prefix=shared,
                                 real=real)[0][0]

        search_passes(passes, forward, self.lm.tokenizer.pad_token_id, self.lm.device)
        stop_ids = set(self.lm.stop_token_ids())
        share = (time.perf_counter() - start) / len(rows)
        for p, b in rows:
            job, found = p.jobs[b], p.searches[b]
            job.sums, job.labels_cut = found.scores()
            job.nodes_fed = sum(found.fed)
            job.latency += share
            self._greedy_from_scoring(job, found.top, stop_ids)

    def _finish(self, p: "_Pass") -> "_Prefilled | None":
        """What decoding needs of a prompt pass (its label scores done): the rows that generate,
        their first-token logits and KV cache, without the trie; None when no row generates."""
        import torch

        jobs, dev = p.jobs, self.lm.device
        gen = [b for b, j in enumerate(jobs) if j.max_new and not j.from_scoring]
        if not gen:
            return None
        first = p.hidden[gen, 0]
        first = (p.project(first) if p.project else first).float()
        cache = p.cache
        if p.trie_nodes:
            cache.crop(-p.trie_nodes)  # drop the trie nodes: decoding continues right after the prompts
        if len(gen) < len(jobs):
            cache.batch_select_indices(torch.tensor(gen, device=dev))
        attn = torch.ones((len(gen), p.width), dtype=torch.long)
        for row, b in enumerate(gen):  # the left padding (after the shared prefix, when it is in the cache)
            attn[row, p.prefix_columns:p.prefix_columns + p.pads[b]] = 0
        return _Prefilled([jobs[b] for b in gen], first, cache, attn.to(dev),
                          torch.tensor([len(jobs[b].prompt) for b in gen], device=dev), p.shared)

    def _fused(self):
        """The fused pass (`tunelab.models.local.fused`), or None: transformers' forward."""
        return self.lm.fused() if self.lm.hf_model.get_output_embeddings() is not None else None

    def _forward(self, ids, allow, pos, key_pos, cache, keep_from: int, logits_to_keep: int = 1, prefix=None,
                 real=None):
        """One pass over `ids` (rows, tokens) after `cache`, each position seeing the cached and new
        positions `allow` (rows, tokens, cache + tokens) says (and all of `prefix`, the shared
        prefix's keys and values, fused pass only). Returns (the last hidden states from
        `keep_from` on, the vocabulary projection to apply to them), or, for a model without a
        separate head, (the last `logits_to_keep` positions' logits, None). With `real` (flat indices
        of the real tokens into rows x tokens, `keep_from` 0): the hidden states of those tokens only,
        as (1, len(real), hidden) (the fused pass skips the padding outside attention)."""
        model, dev = self.lm.hf_model, self.lm.device
        body = getattr(model, "model", None)
        head = model.get_output_embeddings()
        fused = self._fused()
        if fused is not None:  # the fused pass computes the last layer for the positions needed only
            return fused(ids.to(dev), allow[:, None].to(dev), pos.to(dev), cache, keep_from=keep_from,
                         prefix=prefix, real=None if real is None else real.to(dev)), head
        mask = self._mask(allow, pos, key_pos)
        if body is not None and head is not None:  # run the body; project only the positions needed
            hidden = body(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                          use_cache=True, **cache_kwarg(body, cache)).last_hidden_state[:, keep_from:]
            return (hidden if real is None else hidden.reshape(-1, hidden.shape[-1])[real.to(dev)][None]), head
        return model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev),
                     use_cache=True, logits_to_keep=logits_to_keep, **cache_kwarg(model, cache)).logits, None

    def _greedy_from_scoring(self, job: "_Job", top: list[int], stop_ids: set[int]) -> None:
        """The free answer read off the scoring pass when greedy decoding would write a label."""
        if job.max_new and job.temperature <= 0 and self.lm.reuse_greedy:
            found = greedy_label(job.trie, job.label_lengths, top, stop_ids, job.max_new)
            if found is not None:
                self._finish_text(job, found[1])
                job.from_scoring = True

    def _mask(self, allow, pos, key_pos):
        """The 4D attention mask for `allow` (B, T, K) (`key_pos`: the positions of the K keys) in the form the model's attention takes: a
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
        near = (pos[:, :, None] - key_pos[:, None, :]) < window
        return {"full_attention": form(allow), "sliding_attention": form(allow & near)}

    def _decode(self, jobs: list["_Job"], logits, cache, attn, next_pos, prefix=None) -> None:
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
                logits = head(fused(choice[:, None], attn, next_pos[:, None], cache, prefix=prefix)[:, -1]).float()
            else:
                out = model(input_ids=choice[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                            use_cache=True, logits_to_keep=1, **cache_kwarg(model, cache))
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
    labels_cut: int = 0  # labels whose score is a bound (many labels: `labels.search`)
    nodes_fed: int | None = None  # trie nodes the search fed (None: the trie was laid out whole)
    tokens: list[int] | None = None
    text: str | None = None
    n_generated: int = 0
    cut: bool = False
    latency: float = 0.0
    batch_size: int = 0  # rows of its prompt pass
    decode_batch_size: int = 0  # rows it was decoded with
    shards: int = 1  # shards its call ran as (`Engine._run_sharded`)
    from_scoring: bool = False  # the free answer was read off the label-scoring pass
    on_tokens: Any = None  # called with the tokens so far after each decoding step (streaming)
    grammar: Any = None  # an llguidance matcher: the answer is decoded under its grammar (Request.constrained)
    logprobs: list[float] | None = None  # the log-probability of each generated token

    @property
    def generates(self) -> bool:
        return self.max_new > 0


@dataclass
class _Pass:
    """A prompt pass whose label searches (many labels) are still to run (`Engine._search`)."""

    jobs: list[_Job]
    hidden: Any  # the last hidden states from each prompt's last position on (or logits, see `_forward`)
    project: Any  # the vocabulary projection for `hidden`, or None
    cache: Any  # over [shared prefix unless kept apart | padding | rest of prompt | laid-out trie]
    trie_nodes: int  # trie columns laid out after the prompts (0 when searched)
    prefix_columns: int  # columns of the shared prefix in `cache` (0: kept apart, `shared`)
    pads: list[int]  # each row's left padding
    width: int  # cache columns up to the prompts' end
    searches: dict[int, TrieSearch]  # row -> its search, the prompt's last position fed
    visible: Any  # (searched rows, width): what each searched prompt's last token sees
    key_pos: Any  # (searched rows, width): the positions of those columns
    last_pos: Any  # (searched rows,): the position of each searched prompt's last token
    shared: Any  # the shared prefix's per-layer (keys, values) when kept apart from `cache`, else None


@dataclass
class _Prefilled:
    """Rows of one prompt pass that go on to decoding."""

    jobs: list[_Job]
    logits: Any  # (rows, vocabulary): the first generated token's logits
    cache: Any  # DynamicCache over [shared prefix | padding | rest of prompt]
    attn: Any  # (rows, cache length): 1 for real tokens, 0 for padding
    next_pos: Any  # (rows,): the position of the next token
    prefix: Any = None  # the shared prefix's per-layer (keys, values) when kept apart (fused pass): not in `cache`


def _log_softmax(values: list[float]) -> list[float]:
    import math

    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]
