"""Gateway load: concurrent /v1/chat/completions calls on loopback against `tunelab serve`.

1. 200 concurrent requests (one asyncio.gather, httpx.AsyncClient) against a prompt deployment
   on the fake model: asserts 0 errors and 200 rows in the call logs; prints p50/p95 latency
   and requests/s.
2. The same 200 with a canary (20% of calls) and a shadow (half of the calls) active: asserts 0
   errors, 200 calls logged with their arm, and every shadow answer the calls asked for logged as
   answered or as dropped (nothing lost).
3. Shadow overhead: rounds of calls at a fixed concurrency, alternately without and with a shadow
   mirroring every call (the same server, the rollout switched between rounds); prints p50/p95
   with and without, their ratio and difference. `--shadow-real` puts the bundled SmolLM2 in the
   shadow: answered in the server's shadow worker process (at the lowest priority, one thread), or
   with `--shadow-worker thread` in a thread of the server, in the pauses between calls.
4. A smaller run against a prompt deployment on the real bundled SmolLM2-135M (label output,
   so each call is one batched scoring pass): prints requests/s and p50/p95.

The server is a real `tunelab serve` subprocess (its own process, rate limit off, no worker) on
a fresh temporary workspace, authenticated with an API key, exactly as an application calls it.
Load averages are printed with each figure (other work on the machine moves them).

    python bench/gateway_load.py                    # all four (16 real calls at concurrency 8)
    python bench/gateway_load.py --n 500 --real-n 0 --rounds 0
    python bench/gateway_load.py --real-n 0 --rounds 8 --round-n 100 --shadow-real --threads 1
    python bench/gateway_load.py --real-n 0 --rounds 8 --round-n 100 --shadow-real --threads 1 --shadow-worker thread
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

NEXT_PROMPT = FAKE_PROMPT.replace("Answer the customer.", "Answer the customer briefly.")

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


def start_server(ws_root: Path, threads: int | None = None, shadow_worker: str = "auto") -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNELAB_WORKSPACE": str(ws_root)}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.pop("TUNELAB_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--rate", "0",
                             "--no-worker", "--shadow-worker", shadow_worker], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
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


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


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


def loads() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def report(title: str, n: int, latencies: list[float], errors: list[str], wall: float, logged: int) -> None:
    print(f"[{loads()}] {title}: {n} requests in {wall:.2f} s = {n / wall:.1f} req/s; "
          f"latency p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p95 {percentile(latencies, 0.95) * 1000:.0f} ms, "
          f"mean {statistics.mean(latencies) * 1000:.0f} ms; errors {len(errors)}; logged {logged}")
    for e in errors[:5]:
        print("   ", e)


def shadow_rows(ws, deployment: str) -> list:
    from tunelab.lifecycle.calls import shadow_rows as rows

    return rows(ws, deployment)


def wait_for_shadows(ws, deployment: str, want: int, timeout: float = 120.0) -> int:
    """Poll the store until `want` shadow rows of `deployment` are there (the server writes them)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        have = len(shadow_rows(ws, deployment))
        if have >= want:
            return have
        time.sleep(0.2)
    return len(shadow_rows(ws, deployment))


def with_rollout(ws, url: str, key: str, n: int, concurrency: int) -> bool:
    """200 concurrent calls with a canary and a shadow active: every call logged with its arm, every
    shadow answer asked for logged as answered or dropped."""
    from tunelab.lifecycle.calls import list_calls
    from tunelab.lifecycle.rollouts import get_rollout, set_canary, set_shadow

    dep = "support@production"
    set_canary(ws, dep, "support@next", 0.2)
    set_shadow(ws, dep, "support-shadow@production", 0.5)
    time.sleep(1.2)  # the server re-reads rollouts every second
    before = {c.call_id for c in list_calls(ws, dep, limit=None)}
    shadows_before = len(shadow_rows(ws, dep))
    lat, errors, wall = asyncio.run(load(url, key, dep, n, concurrency))
    calls = [c for c in list_calls(ws, dep, limit=None) if c.call_id not in before]
    rollout = get_rollout(ws, dep)
    wanted = sum(c.arm == "canary" for c in calls) + sum(rollout.mirrors(c.call_id) for c in calls)
    have = wait_for_shadows(ws, dep, shadows_before + wanted) - shadows_before
    rows = shadow_rows(ws, dep)[shadows_before:]
    dropped = sum(r.status == "dropped" for r in rows)
    report(f"fake model with a canary (20%) and a shadow (50%), concurrency {concurrency}", n, lat, errors, wall,
           len(calls))
    arms = {a: sum(c.arm == a for c in calls) for a in ("primary", "canary")}
    print(f"    arms {arms}; shadow answers asked for {wanted}: {have - dropped} answered, {dropped} dropped")
    return not errors and len(calls) == n and all(c.arm for c in calls) and have == wanted


def shadow_overhead(ws, url: str, key: str, rounds: int, n: int, concurrency: int, real: bool) -> tuple[bool, int]:
    """p95 latency of the caller with and without a shadow, alternating rounds on one server; (no
    errors, how many calls were mirrored)."""
    from tunelab.lifecycle.rollouts import set_shadow, stop_rollout

    dep, shadow = "plain@production", "shadow-real@production" if real else "support-shadow@production"
    asyncio.run(load(url, key, dep, 20, concurrency))  # warm up
    got: dict[bool, list[float]] = {False: [], True: []}
    errors: list[str] = []
    for r in range(rounds):
        on = r % 2 == 1
        if on:
            set_shadow(ws, dep, shadow, 1.0)
        elif r:
            stop_rollout(ws, dep, "shadow")
        time.sleep(1.2)  # the server re-reads rollouts every second
        lat, errs, _ = asyncio.run(load(url, key, dep, n, concurrency))
        got[on] += lat
        errors += errs
        time.sleep(0.5 if not real else 3.0)  # let a real shadow drain between rounds
    if not got[True] or not got[False]:
        return not errors, 0
    mirrored = (rounds // 2) * n
    rows = shadow_rows(ws, dep)
    for _ in range(900):  # the last answers are written in the next pause (a real shadow takes a while)
        if len(rows) >= mirrored:
            break
        time.sleep(0.2)
        rows = shadow_rows(ws, dep)
    p = {on: (percentile(v, 0.5) * 1000, percentile(v, 0.95) * 1000) for on, v in got.items()}
    print(f"[{loads()}] shadow overhead ({'SmolLM2' if real else 'fake'} shadow on every call, concurrency "
          f"{concurrency}, {rounds} alternating rounds of {n}): p50 {p[False][0]:.1f} -> {p[True][0]:.1f} ms, "
          f"p95 {p[False][1]:.1f} -> {p[True][1]:.1f} ms; p95 ratio {p[True][1] / p[False][1]:.2f}, "
          f"p95 difference {p[True][1] - p[False][1]:+.1f} ms; errors {len(errors)}")
    shadow_outcome(ws, dep, mirrored, "by 3 minutes after the last round")
    return not errors, mirrored


def shadow_outcome(ws, dep: str, mirrored: int, when: str) -> bool:
    """Print what became of the mirrored calls' shadow answers; True when each one is logged."""
    rows = shadow_rows(ws, dep)
    answered, dropped = sum(r.status == "ok" for r in rows), sum(r.status == "dropped" for r in rows)
    failed = [r.error for r in rows if r.status == "error"]
    print(f"    shadow answers {when}: {answered} answered, {dropped} dropped, {len(failed)} failed, of "
          f"{mirrored} mirrored calls" + (f"; first failure: {failed[0]}" if failed else ""))
    return answered + dropped + len(failed) == mirrored


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="requests against the fake-model deployment")
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight at once (fake model)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds without/with a shadow (0: skip)")
    parser.add_argument("--round-n", type=int, default=100, help="requests per round")
    parser.add_argument("--round-concurrency", type=int, default=4, help="requests in flight at once in a round")
    parser.add_argument("--shadow-real", action="store_true", help="the shadow runs on the bundled SmolLM2")
    parser.add_argument("--real-n", type=int, default=16, help="requests against the real-model deployment (0: skip)")
    parser.add_argument("--real-concurrency", type=int, default=8, help="requests in flight at once (real model)")
    parser.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads of the server")
    parser.add_argument("--shadow-worker", default="auto", choices=["auto", "process", "thread"],
                        help="where the server's shadows answer (auto: a local model's in a worker process)")
    args = parser.parse_args()

    from tunelab.files import write_atomic
    from tunelab.lifecycle.calls import count_calls
    from tunelab.prompts import commit_prompt, tag_prompt
    from tunelab.server.auth import create_key
    from tunelab.workspace import Workspace

    os.environ.pop("TUNELAB_DATABASE_URL", None)
    with tempfile.TemporaryDirectory(prefix="tunelab-gw-bench-") as tmp:
        ws = Workspace.init(Path(tmp) / "ws")
        prompts = (("support", FAKE_PROMPT), ("plain", FAKE_PROMPT), ("support-real", REAL_PROMPT),
                   ("support-shadow", NEXT_PROMPT), ("shadow-real", REAL_PROMPT))
        for name, text in prompts:
            write_atomic(ws.prompts_dir / f"{name}.prompt", text)
            commit_prompt(ws, name, "bench")
            tag_prompt(ws, f"{name}@current", "production")
        write_atomic(ws.prompts_dir / "support.prompt", NEXT_PROMPT)
        commit_prompt(ws, "support", "the canary")
        tag_prompt(ws, "support@current", "next")
        _, key = create_key(ws, "bench", "app", deployments=["support@*", "support-real@*", "plain@*"])
        proc, url = start_server(ws.root, args.threads, args.shadow_worker)
        ok, mirrored = True, 0
        try:
            asyncio.run(load(url, key, "support@production", 10, 10))  # warm up (not logged in the figures)
            before = count_calls(ws, "support@production")
            lat, errors, wall = asyncio.run(load(url, key, "support@production", args.n, args.concurrency))
            logged = count_calls(ws, "support@production") - before
            report(f"fake model, concurrency {args.concurrency}", args.n, lat, errors, wall, logged)
            ok = not errors and logged == args.n
            ok = with_rollout(ws, url, key, args.n, args.concurrency) and ok
            if args.rounds:
                fine, mirrored = shadow_overhead(ws, url, key, args.rounds, args.round_n, args.round_concurrency,
                                                 args.shadow_real)
                ok = fine and ok
            if args.real_n:
                asyncio.run(load(url, key, "support-real@production", 2, 1))  # load the weights
                lat, errors, wall = asyncio.run(load(url, key, "support-real@production", args.real_n,
                                                     args.real_concurrency))
                logged = count_calls(ws, "support-real@production") - 2
                report(f"SmolLM2-135M label deployment, concurrency {args.real_concurrency}", args.real_n, lat,
                       errors, wall, logged)
                ok = ok and not errors and logged == args.real_n
        finally:
            stop_server(proc)
        if mirrored:  # the server logs what its shadow did not answer yet as dropped when it stops
            ok = shadow_outcome(ws, "plain@production", mirrored, "after the server stopped") and ok
    print("PASS" if ok else "FAIL: errors, missing call logs or lost shadow answers")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
