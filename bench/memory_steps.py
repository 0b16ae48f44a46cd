"""Where a flow's memory goes, step by step, in one process: the resident set (RSS) and its peak
(VmHWM) after importing torch/transformers/PEFT, loading SmolLM2 for evaluation, scoring labels for
a batch of requests, decoding free answers, `release_memory()`, the MiniLM embedder, loading the
model for LoRA training, and training steps of 8 sequences of growing length.

    .venv/bin/python bench/memory_steps.py [--threads 1] [--lengths 60,100]

Timing-free: the figures do not depend on the machine's load. `bench/full_flow.py` prints the peak
of each step of a real flow; this shows what each piece adds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss(tag: str) -> None:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    mib = {k: int(status[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    print(f"{tag:45s} RSS {mib['VmRSS']:7,.0f} MiB  peak {mib['VmHWM']:7,.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lengths", default="60,100", help="tokens per sequence of each training step (batch 8)")
    args = ap.parse_args()
    if args.threads:
        os.environ["TUNELAB_THREADS"] = str(args.threads)
    rss("start")
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    rss("imported torch, transformers, peft")
    from tunelab.demos import embed
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.data import Tokenized, collate
    from tunelab.finetune.train import completion_loss, load_for_training, make_optimizer, use_bf16
    from tunelab.models import load_model, release_memory
    from tunelab.models.base import Request
    from tunelab.models.weights import bundled_model_dir

    model = load_model("smollm2-135m")
    rss("load_model smollm2-135m")
    messages = [[{"role": "user", "content": f"Which emotion: anger, joy, optimism or sadness? Tweet {i}: "
                  + "word " * 40}] for i in range(64)]
    model.complete([Request(messages=m, labels=["anger", "joy", "optimism", "sadness"]) for m in messages])
    rss("64 label scores")
    model.complete([Request(messages=m, max_tokens=8) for m in messages[:32]])
    rss("32 free answers (8 tokens)")
    del model
    release_memory()
    rss("release_memory()")
    embed(["a tweet about the weather"] * 200)
    rss("MiniLM embeddings of 200 texts")
    config = FineTuneConfig(lora_r=16, lora_alpha=32, precision="auto", lr=1e-3)
    lm, tok = load_for_training(bundled_model_dir("smollm2-135m"), config)
    rss("load_for_training (LoRA r 16, q/k/v/o)")
    optimizer, _ = make_optimizer(lm, config, 10)
    lm.train()
    bf16 = use_bf16(config.precision)
    for length in (int(x) for x in args.lengths.split(",")):
        batch = collate([Tokenized(list(range(100, 100 + length)), 4) for _ in range(8)], tok.pad_token_id)
        loss, n = completion_loss(lm, batch, bf16)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rss(f"training step, 8 x {length} tokens")


if __name__ == "__main__":
    main()
