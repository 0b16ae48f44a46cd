"""Fine-tuning throughput: TRL's SFTTrainer against tunelab's loop, in one process.

    .venv/bin/python bench/finetune_throughput.py [--steps 20] [--batch-size 8] [--max-length 256] [--rounds 1]
        [--threads 1] [--base smollm2-135m|gemma3-270m|both]

Three trainers alternate in each round: TRL, tunelab (its fused LoRA pass on Llama models:
`tunelab.finetune.fused`), and tunelab with `TUNELAB_FUSED=0` (transformers' forward under
tunelab's loop), so the fused pass's own gain is measured in the same process. `--base both`
prints the ratios for SmolLM2 and for Gemma 3 270M (no fused pass: Gemma goes through transformers, so
its `tunelab-unfused` run would repeat the `tunelab` one and is skipped).

Both train the base (SmolLM2-135M-Instruct by default) with the same LoRA (r=8, alpha=16, dropout
0.05, q/k/v/o_proj), the same learning rate, batch size, maximum length and number of steps, on the
same sms_spam training examples rendered by the same chat template as prompt/completion pairs (for a
base model without one, Gemma 3 270M, the plain-text prompt tunelab renders), with the loss on the
completion only. TRL is configured to run on CPU (`use_cpu=True`, no gradient checkpointing, bf16
where the CPU supports it, `save_strategy="no"`). Trained tokens are counted the same way for both:
the non-padding tokens of every batch the model was trained on (prompt + completion), over the
time spent training (model loading excluded). tunelab's fused pass computes the prefix the rows of a
micro-batch share (the chat template's system turn and the instruction: 38 of an example's ~69
tokens here) once per micro-batch; its tokens still count once per example, as for TRL, because
every example was trained on them: the figure is the user's (examples trained per second x their
length), not the number of rows the matrix products saw. Peak memory: the process's peak resident set during
each run (reset in between through /proc/self/clear_refs; memory the first run leaves with the
allocator still counts for the second, so `--only trl` / `--only tunelab` give clean figures).

The machine may be shared: the load average is printed; run it twice and trust figures that agree.
Each run's process CPU time is measured too (tokens per CPU second): with `--threads 1` on a loaded
machine it is the steadier figure, as it does not count the time the process waited for a core.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(os.environ.get("TUNELAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
INSTRUCTION = "Is this SMS spam or ham? Answer with one word.\n\n"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
LR = 2e-4


def examples(n: int) -> list[dict]:
    lines = (DATA / "sms_spam" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def messages(row: dict) -> list[dict[str, str]]:
    return [{"role": "user", "content": INSTRUCTION + row["input"]}]


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_trl(rows: list[dict], args, bf16: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tunelab.models.chat import PLAIN_END, has_template, plain_text
    from tunelab.models.weights import bundled_model_dir

    base = bundled_model_dir(args.base)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if has_template(tok):
        pairs = [{"prompt": messages(r), "completion": [{"role": "assistant", "content": r["output"]}]} for r in rows]
    else:  # a base model (Gemma 3 270M): tunelab's plain-text prompts; TRL's tokenizer adds the bos token
        pairs = [{"prompt": plain_text(messages(r)), "completion": r["output"] + PLAIN_END} for r in rows]
    data = Dataset.from_list(pairs)
    config = SFTConfig(output_dir=str(Path(args.tmp) / "trl"), use_cpu=True, gradient_checkpointing=False,
                       bf16=bf16, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
                       max_steps=args.steps, max_length=args.max_length, learning_rate=LR, warmup_steps=0,
                       lr_scheduler_type="linear", completion_only_loss=True, packing=False, save_strategy="no",
                       report_to="none", logging_steps=max(1, args.steps), seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA))
    counted = {"tokens": 0, "loss_tokens": 0, "batches": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        counted["loss_tokens"] += int((batch["labels"] != -100).sum())
        counted["batches"] += 1
        return batch

    trainer.data_collator = counting
    trainer.train_dataset  # (tokenized at construction, before the clock starts)
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs on stdout
        trainer.train()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"tokens": counted["tokens"], "loss_tokens": counted["loss_tokens"], "seconds": seconds,
            "tokens_per_s": counted["tokens"] / seconds, "cpu_s": cpu, "tokens_per_cpu_s": counted["tokens"] / cpu,
            "peak_mib": peak_mib(), "steps": args.steps}


def run_tunelab(rows: list[dict], args, bf16: bool) -> dict:
    from tunelab.datasets import Example
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.data import render_examples, truncate
    from tunelab.finetune.train import load_for_training, train
    from tunelab.models.weights import bundled_model_dir

    config = FineTuneConfig(lr=LR, batch_size=args.batch_size, epochs=1, max_steps=args.steps, lora_r=LORA["r"],
                            lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                            target_modules=LORA["target_modules"], max_length=args.max_length, warmup_ratio=0.0,
                            precision="bf16" if bf16 else "fp32", patience=None, max_grad_norm=1.0)
    model, tok = load_for_training(bundled_model_dir(args.base), config)
    items = render_examples([Example(r["input"], r["output"]) for r in rows], messages_of, tok)
    items = [truncate(it, args.max_length) for it in items]
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    result = train(model, tok, items, lambda m: {"loss": 0.0}, config, Path(args.tmp) / "tunelab",
                   progress=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    state = result.state
    return {"tokens": state["tokens"], "loss_tokens": state["loss_tokens"], "seconds": state["train_s"],
            "tokens_per_s": state["tokens"] / state["train_s"], "cpu_s": cpu, "tokens_per_cpu_s": state["tokens"] / cpu,
            "peak_mib": peak_mib(), "steps": state["step"], "wall_with_validation_s": seconds}


def messages_of(example) -> list[dict[str, str]]:
    return messages({"input": example.input})


def run_tunelab_plain(rows: list[dict], args, bf16: bool) -> dict:
    """tunelab's loop with transformers' forward (the fused pass off)."""
    os.environ["TUNELAB_FUSED"] = "0"
    try:
        return run_tunelab(rows, args, bf16)
    finally:
        os.environ.pop("TUNELAB_FUSED", None)


TRAINERS = (("trl", run_trl), ("tunelab", run_tunelab), ("tunelab-unfused", run_tunelab_plain))


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps for each trainer")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the trainers this many times")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (one on a shared machine)")
    parser.add_argument("--base", default="smollm2-135m", help="smollm2-135m, gemma3-270m or both")
    parser.add_argument("--only", choices=[n for n, _ in TRAINERS], help="run one trainer (a clean peak-memory figure)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["TUNELAB_THREADS"] = str(args.threads)
    from tunelab.finetune.train import bf16_supported

    bf16 = bf16_supported()
    rows = examples(args.steps * args.batch_size)
    bases = ["smollm2-135m", "gemma3-270m"] if args.base == "both" else [args.base]
    summaries = {}
    for base in bases:
        args.base = base
        print(f"# {base}: {len(rows)} sms_spam examples, {args.steps} steps of batch {args.batch_size}, max length "
              f"{args.max_length}, LoRA r=8 alpha=16 q/k/v/o, {'bf16' if bf16 else 'fp32'}, torch threads "
              f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
              file=sys.stderr)
        from tunelab.models.weights import bundled_model_dir

        config = json.loads((bundled_model_dir(base) / "config.json").read_text())
        trainers = [(n, fn) for n, fn in TRAINERS if n != "tunelab-unfused" or config.get("model_type") == "llama"]
        figures: dict[str, list[dict]] = {name: [] for name, _ in trainers}
        with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
            args.tmp = tmp
            for _ in range(args.rounds):
                for name, fn in trainers:
                    if args.only and name != args.only:
                        continue
                    r = fn(rows, args, bf16)
                    gc.collect()
                    r["load_average"] = round(os.getloadavg()[0], 1)
                    figures[name].append(r)
                    print(f"{name:15s} {r['tokens']:>7,} tokens in {r['seconds']:7.1f} s = {r['tokens_per_s']:7.1f} "
                          f"tokens/s ({r['tokens_per_cpu_s']:.1f} per CPU second); peak RSS {r['peak_mib']:,.0f} MiB; load {r['load_average']}", file=sys.stderr)
        if args.only:
            print(json.dumps(figures[args.only], indent=2) if args.json else "")
            return
        best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in figures.items()}
        best.setdefault("tunelab-unfused", best["tunelab"])  # no fused pass on this architecture
        trl = best["trl"]["tokens_per_s"]
        summary = {"trl_tokens_per_s": round(trl, 1),
                   "tunelab_tokens_per_s": round(best["tunelab"]["tokens_per_s"], 1),
                   "tunelab_unfused_tokens_per_s": round(best["tunelab-unfused"]["tokens_per_s"], 1),
                   "ratio": round(best["tunelab"]["tokens_per_s"] / trl, 2),
                   "ratio_unfused": round(best["tunelab-unfused"]["tokens_per_s"] / trl, 2),
                   "ratio_cpu": round(max(r["tokens_per_cpu_s"] for r in figures["tunelab"])
                                      / max(r["tokens_per_cpu_s"] for r in figures["trl"]), 2),
                   "trl_peak_mib": round(best["trl"]["peak_mib"]), "tunelab_peak_mib": round(best["tunelab"]["peak_mib"]),
                   "runs": figures}
        summaries[base] = summary
        unfused = (f"without the fused pass {summary['tunelab_unfused_tokens_per_s']:.1f} = "
                   f"{summary['ratio_unfused']:.2f}x" if figures.get("tunelab-unfused") else "no fused pass here")
        print(f"{base}: TRL SFTTrainer {summary['trl_tokens_per_s']:.1f} tokens/s; tunelab "
              f"{summary['tunelab_tokens_per_s']:.1f} tokens/s = {summary['ratio']:.2f}x ({unfused}); peak RSS TRL "
              f"{summary['trl_peak_mib']} MiB, tunelab {summary['tunelab_peak_mib']} MiB; per CPU second "
              f"{summary['ratio_cpu']:.2f}x")
    if args.json:
        print(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
