"""The training loop: hand-written (no Trainer), because on a CPU every avoided cost shows.

What makes it fast: bf16 autocast where the CPU supports it (fp32 master weights); batches grouped
by length, so padding is barely computed; the prefix the rows of a batch share computed once
(`tunelab.finetune.fused`); the vocabulary projection applied only at the positions
that carry a loss (the completion tokens), not at every prompt position; a token budget per forward
pass with gradient accumulation, so memory stays bounded.

    model, tokenizer = load_for_training(base_dir, config)
    result = train(model, tokenizer, train_items, validator, config, run_dir)
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import UserError
from tunelab.finetune import checkpoint
from tunelab.finetune import distributed as dist  # data-parallel when started by `accelerate launch`
from tunelab.finetune.config import FineTuneConfig
from tunelab.finetune.data import IGNORE, Tokenized, collate, common_prefix, epoch_batches, micro_batches
from tunelab.finetune.distributed import device
from tunelab.finetune.fused import FusedLoraLlama

MATH_ATTENTION_MAX = 1024
LOSS_CHUNK_LOGITS = 1 << 24  # vocabulary logits computed at once by the chunked loss


def bf16_supported() -> bool:
    """Whether bf16 matmuls are fast here (CUDA with bf16, or a CPU with AVX512-BF16 / AMX)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and bf16_supported())


def autocast(bf16: bool):
    import torch

    return torch.autocast(device_type=device(), dtype=torch.bfloat16) if bf16 else nullcontext()


def load_for_training(base_dir: Path, config: FineTuneConfig):
    """The base model (fp32 master weights) ready to train: LoRA adapters added for `lora`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = os.environ.get("TUNELAB_THREADS")  # as the local backend: fewer threads on a busy machine
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" would clutter the job's own output
    # LoRA in bf16: the frozen linears end in bf16 anyway, so they load in bf16 (no fp32 copy of the
    # whole model on the way: ~0.3 GB less resident while training) and the rest comes back in fp32.
    frozen_bf16 = config.method == "lora" and use_bf16(config.precision)
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if frozen_bf16 and not restore_fp32(model, base_dir):  # a buffer it cannot restore exactly: as before
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), task_type="CAUSAL_LM")
        try:
            with warnings.catch_warnings():  # PEFT asks transformers a deprecated question; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = get_peft_model(model, lora)
        except ValueError as exc:

            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, torch.nn.Linear)})
            raise UserError(f"{exc} (linear modules of this model: {', '.join(names)})",
                            field="target_modules") from None
    if config.method == "lora" and use_bf16(config.precision):
        frozen_linears_to_bf16(model)
    if config.gradient_checkpointing:
        lm = causal_lm(model)
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5 names it so
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device())
    return model, tokenizer


def restore_fp32(model, base_dir: Path) -> bool:
    """Every parameter and buffer but the linear layers' weights back in fp32, exactly as a load in
    fp32 followed by `frozen_linears_to_bf16` has them: embeddings and norms read again from the
    safetensors files (not widened from bf16), a computed scale from the float it was made of
    (Gemma 3's `embed_scale` from `scalar_embed_scale`). False, with nothing changed, when a
    tensor cannot be restored exactly."""
    import torch
    from safetensors import safe_open

    embedding = model.get_input_embeddings().weight  # fp32, also where an output layer is tied to it
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {id(embedding)}
    wanted = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()]
              if id(t) not in linear and t.is_floating_point() and t.dtype != torch.float32}
    found: dict[str, Any] = {}
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in set(f.keys()) & set(wanted):
                found[key] = f.get_tensor(key).to(torch.float32)
    for name in set(wanted) - set(found):
        owner, _, attr = name.rpartition(".")
        scalar = getattr(model.get_submodule(owner), f"scalar_{attr}", None)
        if not isinstance(scalar, (int, float)) or wanted[name].dim() != 0:
            return False
        found[name] = torch.tensor(float(scalar), dtype=torch.float32)
    with torch.no_grad():
        for name, t in wanted.items():
            t.data = found[name]
    return True


def frozen_linears_to_bf16(model) -> int:
    """Store the frozen weights of linear layers in bf16 once, instead of autocast casting them
    again in every forward pass: the same values reach the matmuls, with half the memory and no
    copies. Embeddings (and an output layer tied to them) and norms stay fp32, so the residual
    stream is fp32 as under autocast; trainable weights stay fp32 (master weights)."""
    import torch

    embedding = model.get_input_embeddings().weight
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight is not None and not weight.requires_grad
                and weight is not embedding and weight.dtype == torch.float32):
            module.weight.data = weight.data.to(torch.bfloat16)
            count += 1
    return count


def causal_lm(model):
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_kernel(length: int):
    """On CPU, for sequences up to MATH_ATTENTION_MAX tokens, plain-matmul attention: its backward
    is faster there than the CPU flash kernel's (longer ones keep flash: its memory stays linear)."""
    if device() != "cpu" or not 0 < length <= MATH_ATTENTION_MAX:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def head_logits(lm, hidden):
    """The vocabulary logits of `hidden`: the output projection, then the model's final logit
    soft-capping where its config has one (Gemma 2)."""
    logits = lm.get_output_embeddings()(hidden)
    cap = getattr(lm.config, "final_logit_softcapping", None)
    return logits if not cap else (logits / cap).tanh() * cap


def loss_chunk_rows(vocab_size: int) -> int:
    """Completion positions per vocabulary projection: about 16M logits (64 MB in fp32) at a time."""
    return max(16, LOSS_CHUNK_LOGITS // max(1, vocab_size))


def cross_entropy_sum(logits, target, weight=None):
    """Summed cross-entropy of `logits` against `target`, each term times `weight` when given
    (class balance): the LM head's chunks and the classification head share it."""
    import torch.nn.functional as F

    if weight is None:
        return F.cross_entropy(logits, target, reduction="sum")
    return (F.cross_entropy(logits, target, reduction="none") * weight.to(logits.device)).sum()


def chunked_cross_entropy(lm, hidden, target, weight=None):
    """Summed cross-entropy of `hidden` (positions x hidden size) against `target` (each position's
    term times `weight`, when given: class balance), the vocabulary
    projection computed a chunk of positions at a time. While training, each chunk's logits are
    recomputed in the backward pass instead of kept (activation checkpointing of the head alone):
    with a 262k vocabulary (Gemma 3) the logits of a batch's completions would otherwise hold
    gigabytes."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def piece(h, t, w=None):
        return cross_entropy_sum(head_logits(lm, h).float(), t, w)

    rows = loss_chunk_rows(lm.config.get_text_config().vocab_size)
    if hidden.shape[0] <= rows:
        return piece(hidden, target, weight)
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, hidden.shape[0], rows):
        h, t = hidden[lo:lo + rows], target[lo:lo + rows]
        w = None if weight is None else weight[lo:lo + rows]
        total = total + (checkpoint(piece, h, t, w, use_reentrant=False) if torch.is_grad_enabled() else piece(h, t, w))
    return total


def fused_pass(model, bf16: bool):
    """The fused training pass for `model` (`tunelab.finetune.fused`), made once; None where it does
    not apply (then transformers' forward runs)."""
    cached = getattr(model, "_tunelab_fused", None)
    if cached is None or cached[0] != bf16:
        cached = (bf16, FusedLoraLlama.of(model, bf16))
        model._tunelab_fused = cached
    return cached[1]


def completion_hidden(model, batch: dict[str, Any], bf16: bool):
    """The last hidden states at the positions that predict a completion token, and those tokens.
    The decoder runs on every token (the fused pass: its last layer only where a loss is read); the
    vocabulary projection is left to the caller."""
    import torch

    lm = causal_lm(model)
    dev = device()
    ids = batch["input_ids"].to(dev)
    mask = batch["attention_mask"].to(dev)
    labels = batch["labels"].to(dev)
    target = labels[:, 1:]
    select = target != IGNORE
    fused = fused_pass(model, bf16)
    if fused is not None:
        keep = torch.cat([select, select.new_zeros((select.shape[0], 1))], dim=1)
        return fused(ids, mask, keep), target[select], select
    # recomputed activations must come from the same kernel: checkpointing keeps the default one
    checkpointing = (lm.is_activation_checkpointing if hasattr(lm, "is_activation_checkpointing")
                     else lm.is_gradient_checkpointing)
    with autocast(bf16), attention_kernel(0 if checkpointing else ids.shape[1]):
        hidden = lm.base_model(input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
                               use_cache=False).last_hidden_state
    return hidden[:, :-1][select], target[select], select


def completion_loss(model, batch: dict[str, Any], bf16: bool):
    """Summed cross-entropy over the completion tokens (each times its row's `weights`, when the
    batch has them: class balance) and their count. The vocabulary projection (49k columns for
    SmolLM2, 262k for Gemma 3) runs only on the positions that predict a completion token, a chunk
    of them at a time (`chunked_cross_entropy`)."""
    lm = causal_lm(model)
    hidden, target, select = completion_hidden(model, batch, bf16)
    weight = None
    if "weights" in batch:  # each completion token's weight: its row's
        weight = batch["weights"].to(select.device)[:, None].expand_as(select)[select]
    with autocast(bf16):
        loss = chunked_cross_entropy(lm, hidden, target, weight)
    return loss, int(target.numel())


def completion_token_logprobs(model, batch: dict[str, Any], bf16: bool):
    """The log-probability of every completion token (no gradients), and the (rows, positions)
    selection they come from."""
    import torch

    lm = causal_lm(model)
    hidden, target, select = completion_hidden(model, batch, bf16)
    rows = loss_chunk_rows(lm.config.get_text_config().vocab_size)
    out = []
    with autocast(bf16):
        for lo in range(0, hidden.shape[0], rows):
            logp = torch.log_softmax(head_logits(lm, hidden[lo:lo + rows]).float(), dim=-1)
            out.append(logp.gather(1, target[lo:lo + rows].unsqueeze(1)).squeeze(1))
    return (torch.cat(out) if out else hidden.new_zeros(0)), select


@dataclass
class TrainResult:
    state: dict[str, Any]
    best_weights: Path | None  # None when validation never ran


@dataclass
class Progress:
    """Mutable trainer state; what a checkpoint stores besides weights and optimizer."""

    epoch: int = 0
    step_in_epoch: int = 0
    step: int = 0
    tokens: int = 0  # non-padding tokens trained on (prompt + completion)
    loss_tokens: int = 0  # completion tokens (the ones with a loss)
    train_s: float = 0.0  # time in forward/backward/optimizer
    wall_s: float = 0.0  # wall time including validation and checkpoints
    train_curve: list[dict[str, Any]] = field(default_factory=list)
    eval_curve: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    finished: bool = False
    segments: int = 1  # 1 + the number of resumes

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def improved(new: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Better validation: a higher task metric, at a tie a lower loss (loss alone without metric)."""
    if best is None:
        return True
    if new.get("metric") is not None and best.get("metric") is not None:
        if new["metric"] != best["metric"]:
            return new["metric"] > best["metric"]
    return new["loss"] < best["loss"] - 1e-9


def make_optimizer(model, config: FineTuneConfig, total_steps: int):
    import torch

    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    warmup = int(round(config.warmup_ratio * total_steps))

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def plan_steps(n_train: int, config: FineTuneConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps)."""
    batches = math.ceil(n_train / config.batch_size)
    per_epoch = max(1, math.ceil(batches / config.grad_accum))
    total = per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    return per_epoch, total


def train(model, tokenizer, items: list[Tokenized], validate: Callable[[Any], dict[str, Any]],
          config: FineTuneConfig, run_dir: Path, *, resume: bool = False, progress: bool = True,
          log: Callable[[str], None] = lambda s: None,
          on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
          loss_fn: Callable[..., Any] | None = None,
          on_validation: Callable[[int, dict[str, Any], bool], None] | None = None) -> TrainResult:
    """Train `model` on `items`; validate with `validate(model) -> {loss, metric, ...}` each epoch
    (and every `eval_every_steps`); keep the best weights in `run_dir/best`; checkpoint to
    `run_dir/checkpoints/last`. With `resume`, continue from that checkpoint. `loss_fn(model, batch,
    bf16) -> (summed loss, terms)`: default the completion tokens' cross-entropy (a head fine-tune
    passes its own, `tunelab.finetune.head.head_loss`). `on_validation(k, result, last)` is called
    after the k-th validation (k from 0, counted across resumes; `last`: no training follows it, at
    the end of the steps or by early stopping) once its best weights are kept, and may raise to
    stop the run (a search's pruner)."""
    import torch

    loss_fn = loss_fn or completion_loss
    lengths = [len(it) for it in items]
    per_epoch, total_steps = plan_steps(len(items), config)
    bf16 = use_bf16(config.precision)
    pad_id = tokenizer.pad_token_id
    optimizer, scheduler = make_optimizer(model, config, total_steps)
    last_dir = run_dir / "checkpoints" / "last"
    best_dir = run_dir / "best"
    state = Progress()
    if resume:
        saved = checkpoint.load(last_dir, model, optimizer, scheduler)
        if saved is not None:
            state = Progress(**saved)
            state.segments += 1
            log(f"resuming at step {state.step}/{total_steps} (epoch {state.epoch + 1}, "
                f"{state.step_in_epoch} steps into it)")

    rank, world = dist.world()
    if world > 1:
        dist.broadcast_params(model)  # every replica starts from rank 0's weights
    started = time.perf_counter()
    wall_before = state.wall_s

    def save_checkpoint() -> None:
        state.wall_s = wall_before + time.perf_counter() - started
        if rank != 0:  # rank 0 alone writes
            return
        checkpoint.save(last_dir, model, optimizer, scheduler, state.to_dict())
        if on_checkpoint:
            on_checkpoint(state.to_dict())

    def run_validation() -> bool:
        """Validate, keep the best weights; True when training should stop (patience)."""
        rng = checkpoint.rng_state()  # validation must not change the training's random stream
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            result = validate(model) if rank == 0 else None
        if world > 1:
            result = dist.from_rank0(result)
        model.train()
        checkpoint.set_rng_state(rng)
        entry = {"step": state.step, "epoch": round(state.step / per_epoch, 3), **result,
                 "seconds": round(time.perf_counter() - t0, 2)}
        state.eval_curve.append(entry)
        msg = f"validation at step {state.step}: loss {result['loss']:.4f}"
        if result.get("metric") is not None:
            msg += f", {result.get('metric_name', 'metric')} {result['metric']:.4f}"
        if improved(result, state.best):
            if rank == 0:
                checkpoint.save_weights(best_dir, model, {"step": state.step})
            state.best = {"step": state.step, "epoch": entry["epoch"], "loss": result["loss"],
                          "metric": result.get("metric"), "metric_name": result.get("metric_name")}
            state.bad_evals = 0
            msg += " (best so far)"
        else:
            state.bad_evals += 1
            msg += f" (no improvement {state.bad_evals}/{config.patience or '-'})"
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            log(msg)
        stop = config.patience is not None and state.bad_evals >= config.patience
        if on_validation is not None and rank == 0:  # last: the steps are done, or patience ends the run here
            on_validation(len(state.eval_curve) - 1, result, stop or state.step >= total_steps)
        return stop

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=state.step, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or rank != 0, desc="fine-tuning")
    model.train()
    shares = fused_pass(model, bf16) is not None  # computes a batch's common prefix once: budget the rows it computes
    seg_tokens, seg_train_s = 0, 0.0
    try:
        while not state.finished and state.step < total_steps and state.epoch < config.epochs:
            batches = epoch_batches(lengths, config.batch_size, config.seed, state.epoch)
            groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
            stop = False
            while state.step_in_epoch < len(groups) and state.step < total_steps:
                t0 = time.perf_counter()
                group = groups[state.step_in_epoch]
                # global: the loss is a (weighted) mean over every rank's tokens
                n_loss = sum(items[i].n_completion * items[i].weight for b in group for i in b)
                shards = [dist.shard(b, rank, world) for b in group]
                pieces = [p for b in shards
                          for p in micro_batches(b, lengths, config.micro_batch_tokens,
                                                 common_prefix([items[i] for i in b]) if shares else 0)]
                loss_total, tokens = 0.0, 0
                for piece in pieces:
                    batch = collate([items[i] for i in piece], pad_id)
                    loss_sum, _ = loss_fn(model, batch, bf16)
                    (loss_sum / n_loss).backward()
                    loss_total += float(loss_sum.detach())
                    tokens += int(batch["attention_mask"].sum())
                if world > 1:
                    dist.sum_gradients(model)
                    loss_total, tokens = dist.sum_values(loss_total, tokens)
                    tokens = int(tokens)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                state.step += 1
                state.step_in_epoch += 1
                state.tokens += tokens
                state.loss_tokens += n_loss
                state.train_s += dt
                seg_tokens += tokens
                seg_train_s += dt
                loss = loss_total / max(1, n_loss)
                state.train_curve.append({"step": state.step, "epoch": round(state.step / per_epoch, 3),
                                          "loss": round(loss, 5), "lr": lr, "tokens": state.tokens})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{seg_tokens / max(seg_train_s, 1e-9):.0f}",
                                epoch=state.epoch + 1)
                end_of_epoch = state.step_in_epoch >= len(groups)
                if config.eval_every_steps and state.step % config.eval_every_steps == 0 and not end_of_epoch:
                    stop = run_validation()
                if stop:
                    break
                if (config.save_every_steps and state.step % config.save_every_steps == 0
                        and not end_of_epoch and state.step < total_steps):
                    save_checkpoint()
            if not stop:  # end of an epoch (or of the step budget)
                if not state.eval_curve or state.eval_curve[-1]["step"] != state.step:
                    stop = run_validation()
                state.epoch += 1
                state.step_in_epoch = 0
            if stop:
                state.stopped_early = True
                log(f"early stop: no improvement in {config.patience} validations")
                break
            if state.step < total_steps and state.epoch < config.epochs:
                save_checkpoint()
        state.finished = True
        state.wall_s = wall_before + time.perf_counter() - started
    finally:
        bar.close()
    return TrainResult(state.to_dict(), checkpoint.find(best_dir))
