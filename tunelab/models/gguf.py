"""GGUF files for llama.cpp, written with the `gguf` package: no llama.cpp checkout needed.

    convert_model("path/to/hf-folder", "model.gguf", outtype="f16")      # a whole model
    convert_lora("path/to/adapter", "path/to/base-folder", "lora.gguf")   # a PEFT LoRA adapter
    to_gguf(base_dir, "ft.gguf", adapter_dir=adapter)    # base + adapter merged, any architecture
    lora_to_gguf(adapter, base_dir, "ft-lora.gguf")      # the adapter, any architecture

Covers Llama-architecture models (`LlamaForCausalLM`: SmolLM2, Llama 2/3, TinyLlama, ...) with a
byte-level BPE tokenizer (`tokenizer.json`), which is what tunelab fine-tunes by default. It does
what llama.cpp's `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py` do for that architecture:

- hyperparameters under `llama.*`, the tokenizer as `gpt2` BPE (tokens, token types, merges,
  special token ids, the chat template) with the pre-tokenizer recognised by the same hash of a
  probe text that llama.cpp's converter uses;
- tensors under llama.cpp's names (`blk.N.attn_q.weight`, ...); tied embeddings are written once
  (`token_embd.weight`; llama.cpp reuses it as the output projection);
- the rows of the q and k projections permuted from Hugging Face's rotary layout (halves) to
  llama.cpp's (interleaved pairs); for a LoRA adapter the same permutation applies to `lora_b`'s
  rows, since `B @ A` then equals the permuted delta.

Other architectures raise `Unsupported`; `to_gguf` and `lora_to_gguf` then fall back to
llama.cpp's own converters (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py`), found through
`TUNELAB_LLAMA_CPP` (a llama.cpp checkout or the script itself), on PATH, or inside an installed
`llama_cpp` package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

from tunelab.errors import UserError

OUTTYPES = ("f16", "f32")
ARCHITECTURES = ("LlamaForCausalLM", "LLaMAForCausalLM")

# The probe text and the hashes of its token ids for the byte-level BPE pre-tokenizers of common
# Llama-architecture models, from llama.cpp's convert_hf_to_gguf (get_vocab_base_pre).
PROBE = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
         '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
         '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
         '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
}


class Unsupported(UserError):
    """The model or adapter is outside what this converter covers (another architecture, a
    SentencePiece tokenizer, rope scaling, adapted embeddings)."""


# -- pure helpers ---------------------------------------------------------------------------------

def permute_qk(weight, n_head: int):
    """Rows of a q/k projection from Hugging Face's rotary layout to llama.cpp's (as
    convert_hf_to_gguf's LlamaModel.permute; for k, `n_head` is the number of KV heads).
    Works on numpy arrays and torch tensors of shape (out, ...)."""
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UserError("not a Hugging Face model folder (no config.json)", path=model_dir)
    config = json.loads(path.read_text())
    config.update(config.get("text_config") or {})
    return config


def check_supported(config: dict[str, Any], model_dir: Path) -> None:
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise Unsupported(f"tunelab's GGUF converter covers Llama-architecture models; this one is {arch}",
                          path=model_dir)
    scaling = config.get("rope_scaling") or {}
    params = config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if kind not in ("default", "linear"):
        raise Unsupported(f"rope scaling '{kind}' is not covered by tunelab's GGUF converter", path=model_dir)


def _rope(config: dict[str, Any]) -> tuple[float, float | None]:
    """(rope theta, linear scaling factor or None)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    factor = scaling.get("factor") if (scaling.get("rope_type") or scaling.get("type")) == "linear" else None
    return float(theta), (float(factor) if factor else None)


def _writer(path: Path, outtype: str):
    import gguf

    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF type '{outtype}' (expected one of: {', '.join(OUTTYPES)})", field="outtype")
    return gguf.GGUFWriter(str(path), "llama")


def _finish(writer, partial: Path, target: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, target)  # atomic: a half-written file is never taken for a model
    return target


def _partial(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.{os.getpid()}.partial")  # concurrent writers: last rename wins


def _array(tensor, outtype: str):
    """A numpy array to write: f16 for matrices when asked, 1-D tensors (norms, biases) in f32."""
    import numpy as np

    arr = tensor.detach().float().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor, np.float32)
    if outtype == "f16" and arr.ndim > 1:
        return arr.astype(np.float16)
    return arr.astype(np.float32)


# -- the tokenizer ----------------------------------------------------------------------------------

def add_tokenizer(writer, model_dir: Path, vocab_size: int) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer, as convert_hf_to_gguf's _set_vocab_gpt2."""
    import gguf
    from transformers import AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file():
        raise Unsupported("tunelab's GGUF converter needs a byte-level BPE tokenizer.json", path=model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    digest = hashlib.sha256(str(tok.encode(PROBE)).encode()).hexdigest()
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        raise Unsupported("this tokenizer's pre-tokenizer is not one tunelab's GGUF converter knows "
                          f"(probe hash {digest[:12]})", path=model_dir)
    vocab = tok.get_vocab()
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    reverse = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            special = decoder[i].special or (token.startswith(("<|", "<")) and token.endswith(("|>", ">")))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True)
    special.add_to_gguf(writer)
    # Whether a BOS token starts every text: as the Hugging Face tokenizer does it.
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))


# -- a whole model ----------------------------------------------------------------------------------

def _tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise Unsupported("tunelab's GGUF converter reads safetensors weights; none found", path=model_dir)
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def convert_model(model_dir: str | Path, out: str | Path, outtype: str = "f16", *, name: str | None = None) -> Path:
    """Write the Hugging Face Llama model in `model_dir` as a GGUF file at `out`."""
    import gguf

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_supported(config, model_dir)
    target = Path(out)
    partial = _partial(target)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    n_layer = int(config["num_hidden_layers"])
    hidden = int(config["hidden_size"])
    vocab_size = int(config["vocab_size"])
    theta, factor = _rope(config)
    writer = _writer(partial, outtype)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or config.get("_name_or_path") or model_dir.name)
        writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(hidden)
        writer.add_block_count(n_layer)
        writer.add_feed_forward_length(int(config["intermediate_size"]))
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        writer.add_rope_freq_base(theta)
        if factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(int(config.get("head_dim") or hidden // n_head))
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, model_dir, vocab_size)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
        tied = bool(config.get("tie_word_embeddings"))
        for hf_name, tensor in _tensors(model_dir):
            if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                continue
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                tensor = permute_qk(tensor, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                tensor = permute_qk(tensor, n_kv)
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise Unsupported(f"no llama.cpp name for tensor '{hf_name}'", path=model_dir)
            writer.add_tensor(gguf_name, _array(tensor, outtype))
        return _finish(writer, partial, target)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


# -- a LoRA adapter ---------------------------------------------------------------------------------

def _lora_tensors(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_model.safetensors"
    if path.is_file():
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    path = adapter_dir / "adapter_model.bin"
    if path.is_file():
        import torch

        return torch.load(str(path), map_location="cpu", weights_only=True)
    raise UserError("not a PEFT adapter folder (no adapter_model.safetensors)", path=adapter_dir)


def convert_lora(adapter_dir: str | Path, base_dir: str | Path, out: str | Path, outtype: str = "f32") -> Path:
    """Write the PEFT LoRA adapter in `adapter_dir` (trained on the model in `base_dir`) as a
    llama.cpp LoRA adapter GGUF at `out`. Load it over the base model's GGUF (any quantization)."""
    import gguf

    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise UserError("not a PEFT adapter folder (no adapter_config.json)", path=adapter_dir)
    lora = json.loads(cfg_path.read_text())
    if lora.get("peft_type", "LORA") != "LORA":
        raise Unsupported(f"a {lora.get('peft_type')} adapter is not a LoRA adapter", path=adapter_dir)
    if lora.get("rank_pattern") or lora.get("alpha_pattern"):
        raise Unsupported("per-module LoRA ranks or alphas (rank_pattern/alpha_pattern) are not covered",
                          path=adapter_dir)
    config = read_config(base_dir)
    check_supported(config, base_dir)
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    n_layer = int(config["num_hidden_layers"])
    rank = int(lora["r"])
    alpha = float(lora["lora_alpha"])
    if lora.get("use_rslora"):
        alpha *= math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r)
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in _lora_tensors(adapter_dir).items():
        base = key.replace("base_model.model.", "", 1)
        if ".lora_A." in base or ".lora_B." in base:
            part = "a" if ".lora_A." in base else "b"
            base = base.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
            pairs.setdefault(base, {})[part] = tensor
        else:
            raise Unsupported(f"adapter tensor '{key}' is not a LoRA A/B matrix (adapted embeddings or "
                              "extra trained modules are not covered)", path=adapter_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer)
    target = Path(out)
    partial = _partial(target)
    writer = _writer(partial, outtype)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for base, ab in sorted(pairs.items()):
            if set(ab) != {"a", "b"}:
                raise UserError(f"adapter tensor '{base}' lacks its lora_{'B' if 'a' in ab else 'A'}",
                                path=adapter_dir)
            if base in ("lm_head.weight", "model.embed_tokens.weight"):
                raise Unsupported(f"a LoRA on '{base}' is not covered (llama.cpp ties it to the embeddings)",
                                  path=adapter_dir)
            a, b = ab["a"], ab["b"]
            if base.endswith("q_proj.weight"):
                b = permute_qk(b, n_head)
            elif base.endswith("k_proj.weight"):
                b = permute_qk(b, n_kv)
            gguf_name = names.get_name(base, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise Unsupported(f"no llama.cpp name for adapted module '{base}'", path=adapter_dir)
            # lora_a: (r, in) and lora_b: (out, r) as in PEFT; small, so kept as asked (default f32)
            writer.add_tensor(f"{gguf_name}.lora_a", _array(a, outtype))
            writer.add_tensor(f"{gguf_name}.lora_b", _array(b, outtype))
        return _finish(writer, partial, target)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


# -- any architecture: merge, then tunelab's converter or llama.cpp's -------------------------------
CONVERTER = "convert_hf_to_gguf.py"
LORA_CONVERTER = "convert_lora_to_gguf.py"


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, target: str | Path) -> Path:
    """A standalone Hugging Face folder at `target`: the base model with the PEFT adapter merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)
    return target


def to_gguf(model_dir: str | Path, target: str | Path, outtype: str = "f16", *, name: str | None = None,
            adapter_dir: str | Path | None = None) -> Path:
    """`model_dir` (with `adapter_dir` merged into it, when given) as one GGUF file: tunelab's
    converter for Llama-architecture models, llama.cpp's for others."""
    target = Path(target)
    try:  # another architecture (Gemma 3) without llama.cpp's converter: say so before merging anything
        check_supported(read_config(Path(model_dir)), Path(model_dir))
    except Unsupported as exc:
        if find_converter(CONVERTER) is None:
            _external(CONVERTER, exc, [], target, outtype)
    with tempfile.TemporaryDirectory(prefix=".tunelab-gguf-") as tmp:
        folder = merge_adapter(model_dir, adapter_dir, Path(tmp) / "merged") if adapter_dir else Path(model_dir)
        try:
            return convert_model(folder, target, outtype, name=name)
        except Unsupported as exc:
            return _external(CONVERTER, exc, [str(folder)], target, outtype)


def lora_to_gguf(adapter_dir: str | Path, base_dir: str | Path, target: str | Path, outtype: str = "f32") -> Path:
    """A PEFT LoRA adapter as a llama.cpp adapter GGUF (loaded over the base model's GGUF)."""
    try:
        return convert_lora(adapter_dir, base_dir, target, outtype)
    except Unsupported as exc:
        return _external(LORA_CONVERTER, exc, [str(adapter_dir), "--base", str(base_dir)], Path(target), outtype)


def find_converter(script: str = CONVERTER) -> Path | None:
    """llama.cpp's HF-to-GGUF (or, with `script`=LORA_CONVERTER, LoRA-to-GGUF) converter script,
    if it can be found."""
    candidates: list[Path] = []
    env = os.environ.get("TUNELAB_LLAMA_CPP")
    if env:
        p = Path(env).expanduser()
        candidates += [p.with_name(script) if p.is_file() else p / script]
    for name in (script, script.replace("_", "-"), script.removesuffix(".py")):
        found = shutil.which(name)
        if found:
            candidates.append(Path(found))
    try:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is not None and spec.submodule_search_locations:
            root = Path(list(spec.submodule_search_locations)[0])
            candidates += [root / script, root / "vendor" / "llama.cpp" / script,
                           root.parent / "vendor" / "llama.cpp" / script]
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if c.is_file()), None)


def _external(script: str, why: Exception, args: list[str], target: Path, outtype: str) -> Path:
    """Run llama.cpp's own converter `script` (for what tunelab's converter does not cover)."""
    converter = find_converter(script)
    if converter is None:
        raise UserError(f"{why}; for other models GGUF export needs llama.cpp's {script}: install the "
                        "extra with pip install 'tunelab[llamacpp]' and set TUNELAB_LLAMA_CPP to a "
                        f"llama.cpp checkout (or put {script} on PATH)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.tmp")
    proc = subprocess.run([sys.executable, str(converter), *args, "--outfile", str(partial), "--outtype", outtype],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"llama.cpp's converter failed: {tail[0]}", path=converter)
    os.replace(partial, target)
    return target
