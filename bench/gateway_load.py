"""Gateway load: concurrent /v1/chat/completions calls on loopback against `tunelab serve`.

1. 200 concurrent requests (one asyncio.gather, httpx.AsyncClient) against a prompt deployment
   on the fake model: asserts 0 errors and 200 rows in the call logs; prints p50/p95 latency
   and requests/s.
2. A smaller run against a prompt deployment on the real bundled SmolLM2-135M (label output,
   so each call is one batched scoring pass): prints requests/s and p50/p95.

The server is a real `tunelab serve` subprocess (its own process, rate limit off, no worker) on
a fresh temporary workspace, authenticated with an API key, exactly as an application calls it.

    python bench/gateway_load.py                    # 200 fake + 16 real (concurrency 8)
    python bench/gateway_load.py --n 500 --real-n 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAKE_PROMPT = """---
model: fake
output: {type: text}
---
system:
Answer the customer.
user:
{{ input }}
"""

REAL_PROMPT = """---
model: smollm2-135m
output: {type: label, labels: [billing, shipping, other]}
---
user:
Which team should answer this message: billing, shipping or other?
Message: {{ input }}
Team:
"""

MESSAGES = ["where is my parcel?", "I was charged twice", "the app crashes on login", "refund please",
            "change my delivery address", "what are your opening hours?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_server(ws_root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNELAB_WORKSPACE": str(ws_root)}
    env.pop("TUNELAB_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--rate", "0",
                             "--no-worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"{url}/v1/models", timeout=1)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 60 s")


async def load(url: str, key: str, model: str, n: int, concurrency: int) -> tuple[list[float], list[str], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300,
                                 limits=limits) as client:
        async def one(i: int) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": f"{MESSAGES[i % len(MESSAGES)]} #{i}"}]}
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return latencies, errors, wall


def report(title: str, n: int, latencies: list[float], errors: list[str], wall: float, logged: int) -> None:
    print(f"{title}: {n} requests in {wall:.2f} s = {n / wall:.1f} req/s; "
          f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
          f"mean {statistics.mean(latencies) * 1000:.0f} ms; errors {len(errors)}; logged {logged}")
    for e in errors[:5]:
        print("   ", e)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="requests against the fake-model deployment")
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight at once (fake model)")
    parser.add_argument("--real-n", type=int, default=16, help="requests against the real-model deployment (0: skip)")
    parser.add_argument("--real-concurrency", type=int, default=8, help="requests in flight at once (real model)")
    args = parser.parse_args()

    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt, tag_prompt
    from tunelab.server.auth import create_key
    from tunelab.server.logs import count_calls
    from tunelab.workspace import Workspace

    os.environ.pop("TUNELAB_DATABASE_URL", None)
    with tempfile.TemporaryDirectory(prefix="tunelab-gw-bench-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        for name, text in (("support", FAKE_PROMPT), ("support-real", REAL_PROMPT)):
            write_atomic(ws.prompts_dir / f"{name}.prompt", text)
            commit_prompt(ws, name, "bench")
            tag_prompt(ws, f"{name}@current", "production")
        _, key = create_key(ws, "bench", "app", deployments=["support@*", "support-real@*"])
        proc, url = start_server(ws.root)
        ok = True
        try:
            asyncio.run(load(url, key, "support@production", 10, 10))  # warm up (not logged in the figures)
            before = count_calls(ws, "support@production")
            lat, errors, wall = asyncio.run(load(url, key, "support@production", args.n, args.concurrency))
            logged = count_calls(ws, "support@production") - before
            report(f"fake model, concurrency {args.concurrency}", args.n, lat, errors, wall, logged)
            ok = not errors and logged == args.n
            if args.real_n:
                asyncio.run(load(url, key, "support-real@production", 2, 1))  # load the weights
                lat, errors, wall = asyncio.run(load(url, key, "support-real@production", args.real_n,
                                                     args.real_concurrency))
                logged = count_calls(ws, "support-real@production") - 2
                report(f"SmolLM2-135M label deployment, concurrency {args.real_concurrency}", args.real_n, lat,
                       errors, wall, logged)
                ok = ok and not errors and logged == args.real_n
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("PASS" if ok else "FAIL: errors or missing call logs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
