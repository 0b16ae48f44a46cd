"""Evaluation at volume: the same split evaluated through the `openai` backend at concurrency 1, 4
and 16 against tunelab's own OpenAI-compatible gateway on loopback.

Two deployments are served by `tunelab.server.app.create_app(ws, auth=False)` under uvicorn:

1. `slow` (tunelab.yaml: backend fake): the fake model with a simulated latency per request (default 50 ms), standing in
   for a remote server whose time is spent waiting (vLLM on another machine, a hosted API);
2. `smollm2-135m`: the real bundled model, whose concurrent calls the gateway micro-batches.

For each, the evaluator runs the split (`evaluate(..., rerun=True, use_cache=False)`) with the
candidate's model an `OpenAIModel(base_url=gateway, concurrency=C)`; the evaluator hands each
batch of 64 examples to `Model.complete`, which sends them concurrently up to C at a time.
Prints examples/s and the ratio to concurrency 1 (same process, same server, same split).

    python bench/remote_eval.py                       # 96 fake examples at 50 ms, 8 real ones
    python bench/remote_eval.py --n 200 --latency 0.1 --real-n 0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAKE_PROMPT = """---
output: {type: text}
max_tokens: 16
---
user:
{{ input }}
"""

REAL_PROMPT = """---
output: {type: label, labels: [billing, shipping, other]}
max_tokens: 4
---
user:
Which team should answer this message: billing, shipping or other? Answer with one word.
Message: {{ input }}
"""

MESSAGES = [("where is my parcel?", "shipping"), ("I was charged twice", "billing"),
            ("the app crashes on login", "other"), ("refund please", "billing"),
            ("change my delivery address", "shipping"), ("what are your opening hours?", "other")]


def run(ws, url: str, prompt: str, deployment: str, data: str, concurrency: int) -> tuple[float, float, object]:
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.models.openai import OpenAIModel

    model = OpenAIModel(name=deployment, model=deployment, base_url=f"{url}/v1", concurrency=concurrency,
                        timeout_s=300)
    start = time.perf_counter()
    result = evaluate(ws, resolve_candidate(ws, prompt, model), data, rerun=True, use_cache=False, progress=False)
    wall = time.perf_counter() - start
    return wall, result.n_examples / wall if hasattr(result, "n_examples") else 0.0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=96, help="examples for the simulated-latency deployment")
    parser.add_argument("--latency", type=float, default=0.05, help="simulated seconds per request")
    parser.add_argument("--real-n", type=int, default=8, help="examples for the real SmolLM2 deployment (0: skip)")
    parser.add_argument("--levels", default="1,4,16", help="concurrency levels")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    from tests.servers import serve_app
    from tunelab.datasets import Example, save_dataset
    from tunelab.models import load_model
    from tunelab.server.app import create_app
    from tunelab.workspace import Workspace

    with tempfile.TemporaryDirectory(prefix="tunelab-remote-eval-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        with open(ws.root / "tunelab.yaml", "a", encoding="utf-8") as f:
            f.write("models:\n  slow: {backend: fake}\n")  # a deployment the gateway serves by name
        ws = Workspace(ws.root)
        fake = [Example(f"{MESSAGES[i % 6][0]} (ticket {i})", MESSAGES[i % 6][1]) for i in range(args.n)]
        real = [Example(f"{MESSAGES[i % 6][0]} (ticket {i})", MESSAGES[i % 6][1]) for i in range(args.real_n)]
        save_dataset(ws, "tickets", {"test": fake})
        if real:
            save_dataset(ws, "tickets-real", {"test": real})
        (ws.prompts_dir / "echo.prompt").write_text(FAKE_PROMPT)
        (ws.prompts_dir / "route.prompt").write_text(REAL_PROMPT)
        slow = load_model("slow", ws)  # the gateway loads the same (cached) instance
        slow.latency_s = args.latency
        rows = []
        with serve_app(create_app(ws, auth=False)) as url:
            cases = [("slow", "echo", "tickets:test", args.n, f"fake model, {args.latency * 1000:.0f} ms/request")]
            if real:
                load_model("smollm2-135m", ws).complete([])  # load the weights before timing
                cases.append(("smollm2-135m", "route", "tickets-real:test", args.real_n, "SmolLM2-135M (label, CPU)"))
            for deployment, prompt, data, n, label in cases:
                if deployment == "smollm2-135m":  # warm-up: the first forward passes are slow
                    run(ws, url, prompt, deployment, data, 4)
                base = None
                for c in levels:
                    wall, _, result = run(ws, url, prompt, deployment, data, c)
                    rate = n / wall
                    base = base or rate
                    metric = result.primary_metric if hasattr(result, "primary_metric") else None
                    value = result.metrics.get(metric, {}).get("value") if metric else None
                    rows.append((label, c, n, wall, rate, rate / base, value))
                    print(f"{label:32s} concurrency {c:3d}: {n} examples in {wall:6.2f} s = {rate:7.1f} examples/s "
                          f"(x{rate / base:.2f} vs concurrency 1)" + (f", {metric} {value:.3f}" if value is not None else ""),
                          flush=True)
        print("\nsummary (same server, same split, same process):")
        for label, c, n, wall, rate, ratio, _ in rows:
            print(f"  {label:32s} c={c:<3d} {rate:7.1f} ex/s  x{ratio:.2f}")


if __name__ == "__main__":
    main()
