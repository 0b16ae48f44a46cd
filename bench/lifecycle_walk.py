"""The walk of docs/lifecycle.md on the bundled support data and SmolLM2-135M, with what it measured.

A team has labelled the first `--labelled` tickets of examples/support's train split (the teacher's
demos come from them); the next `--traffic` train tickets arrive as calls. The steps:

0. `support-router` (the bundled prompt) is measured on support:test and tagged `production`; the
   teacher `support-teacher@v1` is the same prompt with the 4 nearest labelled tickets as demos.
1. the calls go through the official `openai` SDK to a real `tunelab serve` (8 at a time); a
   reviewer gives feedback on the first `--feedback` answers (the right team where the answer was
   wrong, a score of 1 where it was right).
2. `tunelab distill --from support-router@production --teacher support-teacher@v1 --name
   support-distilled --eval-data support:test --epochs E` (stopping first for personal data:
   `--pii drop` then).
3. `tunelab rollout shadow ... ft:support-distilled`, the validation tickets as calls,
   `tunelab compare --from-logs`.
4. `tunelab rollout canary ... --weight 0.5`, the test tickets as calls, `tunelab rollout show`,
   `tunelab promote` with the documented gate (0.95 over 500 calls), then with `--min-agreement`
   and `--min-calls` given on the command line (`--gate`).
5. `tunelab monitor` on the window of the shadow's calls (ordinary tickets), then on a window of
   questions of another kind (a general assistant's, SHIFTED).

Every command's output is printed, with the wall time of each step and the load averages (the
machine is shared: compare the times with care).

    python bench/lifecycle_walk.py                       # 200 calls, 1 epoch
    python bench/lifecycle_walk.py --traffic 100 --no-eval-data --threads 1

Slow on a busy CPU: every step runs SmolLM2. On 2 cores shared at load average 8–17 (--threads 1):
`tunelab eval` on the 83 test tickets 53–195 s, 200 calls 68 s, `tunelab distill` 63 min (teacher
labels with 4 demos 32 min, one epoch of fine-tuning 19 min); the shadow then answers at the lowest
priority, as the CPU allows. An idle machine is several times faster; `--traffic 60 --no-eval-data`
is a shorter walk.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from gateway_load import loads, shadow_rows, start_server, stop_server  # noqa: E402

DEP = "support-router@production"
STUDENT = "ft:support-distilled"
SHIFTED = ["what's the weather going to be like tomorrow in lisbon", "set an alarm for 6 am",
           "how many calories are in a banana", "tell me a joke about penguins", "what is the capital of australia",
           "play some jazz music", "how do i say thank you in japanese", "remind me to call mom at 5",
           "what's a good recipe for banana bread", "how tall is the eiffel tower", "convert 30 miles to kilometers",
           "who won the world cup in 2014", "what time is it in tokyo", "add eggs to my shopping list",
           "how long should i boil an egg", "what's the square root of 144", "recommend a good sci-fi novel",
           "how do i change a flat tire", "what movies are playing tonight", "spell necessary",
           "how far is the moon from earth", "turn off the living room lights", "what rhymes with orange",
           "how many ounces in a cup", "what's the best way to learn guitar", "roll a die for me",
           "flip a coin", "who wrote pride and prejudice", "what is the meaning of life",
           "how do i make cold brew coffee"]


THREADS: dict[str, str] = {}  # --threads: the environment that limits torch in every command and the server


def tunelab(ws_root: Path, *args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run `tunelab ARGS` in the workspace and print what it said."""
    env = {**os.environ, **THREADS, "TUNELAB_WORKSPACE": str(ws_root)}
    env.pop("TUNELAB_DATABASE_URL", None)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True)
    print(f"\n$ tunelab {' '.join(args)}   [{time.perf_counter() - t0:.0f} s, {loads()}, exit {res.returncode}]")
    out = res.stdout.strip()
    print(out if len(out) < 40000 else out[:20000] + "\n...\n" + out[-20000:])
    if res.returncode not in ok:
        print(res.stderr[-3000:])
        raise SystemExit(f"tunelab {args[0]} exited {res.returncode}")
    if res.returncode:
        print("  (stderr) " + res.stderr.strip()[-1500:])
    return res


def settle(ws, want: int, timeout: float = 3600.0) -> int:
    """The deployment's shadow rows once there are `want` of them (the shadow answers in the
    background: in the server's worker process, at the lowest priority, for a local model)."""
    deadline, count = time.time() + timeout, 0
    while time.time() < deadline:
        count = len(shadow_rows(ws, DEP))
        if count >= want:
            break
        time.sleep(1.0)
    return count


def step(title: str) -> float:
    print(f"\n## {title}   [{time.strftime('%H:%M:%S')}, {loads()}]")
    return time.perf_counter()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labelled", type=int, default=130, help="train tickets the team labelled (teacher demos)")
    parser.add_argument("--traffic", type=int, default=200, help="train tickets after them that arrive as calls")
    parser.add_argument("--feedback", type=int, default=40, help="calls a reviewer gives feedback on")
    parser.add_argument("--epochs", type=int, default=1, help="the student's fine-tuning epochs")
    parser.add_argument("--gate", default="0.8:80", help="the second promotion gate, MIN_AGREEMENT:MIN_CALLS")
    parser.add_argument("--no-eval-data", action="store_true", help="skip student vs teacher on support:test")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every command and the server")
    args = parser.parse_args()
    if args.threads:
        THREADS.update(TUNELAB_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                       MKL_NUM_THREADS=str(args.threads))
        os.environ.update(THREADS)  # the server (started with this environment) too

    import httpx
    import openai

    from tunelab.datasets import check_path, save_dataset
    from tunelab.files import write_atomic
    from tunelab.flow import examples_dir
    from tunelab.prompts import commit_prompt, tag_prompt
    from tunelab.server.auth import create_key
    from tunelab.workspace import Workspace

    started = time.perf_counter()
    os.environ.pop("TUNELAB_DATABASE_URL", None)
    with tempfile.TemporaryDirectory(prefix="tunelab-walk-") as tmp:
        t = step("0. a deployment and its measurement")
        ws = Workspace.init(Path(tmp) / "loop")
        _, splits = check_path(examples_dir())
        save_dataset(ws, "support", splits, source="examples/support")
        labelled = splits["train"][:args.labelled]
        save_dataset(ws, "support-labelled", {"train": labelled}, source=f"examples/support train[:{args.labelled}]")
        traffic = splits["train"][args.labelled:args.labelled + args.traffic]
        router = (examples_dir() / "support-router.prompt").read_text()
        write_atomic(ws.prompts_dir / "support-router.prompt", router)
        commit_prompt(ws, "support-router", "bundled")
        tag_prompt(ws, "support-router@current", "production")
        teacher = router.replace("output:", "demos: {dataset: support-labelled, split: train, k: 4, strategy: knn_tfidf}\n"
                                 "output:", 1)
        write_atomic(ws.prompts_dir / "support-teacher.prompt", teacher)
        commit_prompt(ws, "support-teacher", "4 nearest labelled tickets as demos")
        tag_prompt(ws, "support-teacher@current", "v1")
        tunelab(ws.root, "eval", DEP, "--data", "support:test")
        _, key = create_key(ws, "shop", "app", deployments=["support-router@*"])
        print(f"  ({time.perf_counter() - t:.0f} s)")

        proc, url = start_server(ws.root, args.threads)
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=600)

            def chat(text: str):
                return client.chat.completions.create(model=DEP, messages=[{"role": "user", "content": text}])

            def send(examples) -> list:
                with ThreadPoolExecutor(8) as pool:
                    return list(pool.map(chat, [ex.input for ex in examples]))

            t = step(f"1. {len(traffic)} calls and feedback on {args.feedback}")
            answers = send(traffic)
            right = [a.choices[0].message.content == ex.output for a, ex in zip(answers, traffic)]
            corrections = 0
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
                for a, ex, ok in list(zip(answers, traffic, right))[:args.feedback]:
                    body = {"call_id": a.id, "score": 1.0} if ok else {"call_id": a.id, "score": 0.0,
                                                                         "correction": ex.output}
                    r = http.post("/v1/feedback", json=body)
                    assert r.status_code == 200, r.text
                    corrections += not ok
            print(f"  {len(answers)} calls answered in {time.perf_counter() - t:.0f} s; the served prompt was right on "
                  f"{sum(right)}/{len(right)} ({sum(right) / len(right):.1%}); feedback on {args.feedback}: "
                  f"{corrections} corrections, {args.feedback - corrections} marked right")

            t = step("2. distill")
            distill = ["distill", "--from", DEP, "--teacher", "support-teacher@v1", "--name", "support-distilled",
                       "--epochs", str(args.epochs), *([] if args.no_eval_data else ["--eval-data", "support:test"])]
            res = tunelab(ws.root, *distill, ok=(0, 2))
            if res.returncode == 2:
                if "personal data" not in res.stderr:
                    raise SystemExit(res.stderr)
                tunelab(ws.root, *distill, "--pii", "drop")
            print(f"  ({time.perf_counter() - t:.0f} s)")

            t = step(f"3. shadow: {len(splits['validation'])} calls (the validation tickets)")
            tunelab(ws.root, "rollout", "shadow", DEP, STUDENT, "--share", "1")
            time.sleep(1.5)  # the server re-reads rollouts every second
            healthy_from = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            send(splits["validation"])
            healthy_until = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 1))
            print(f"  shadow answers logged: {settle(ws, len(splits['validation']))}")
            tunelab(ws.root, "compare", "--from-logs", DEP, "--shadow", STUDENT)
            print(f"  ({time.perf_counter() - t:.0f} s)")

            t = step(f"4. canary (weight 0.5): {len(splits['test'])} calls (the test tickets), promotion")
            tunelab(ws.root, "rollout", "canary", DEP, STUDENT, "--weight", "0.5")
            time.sleep(1.5)
            answers = send(splits["test"])
            arms = [a.model_extra["tunelab"]["arm"] for a in answers]
            # one background answer per call: the student's on the primary's calls, the primary's on the canary's
            print(f"  arms: primary {arms.count('primary')}, canary {arms.count('canary')}; "
                  f"shadow rows logged: {settle(ws, len(splits['validation']) + len(splits['test']))}")
            tunelab(ws.root, "rollout", "show", DEP)
            tunelab(ws.root, "promote", DEP, "--min-agreement", "0.95", "--min-calls", "500", ok=(0, 1))
            agreement, calls = args.gate.split(":")
            tunelab(ws.root, "promote", DEP, "--min-agreement", agreement, "--min-calls", calls, ok=(0, 1))
            tunelab(ws.root, "rollout", "history", DEP)
            print(f"  ({time.perf_counter() - t:.0f} s)")

            t = step(f"5. monitor: the shadow's window (ordinary tickets), then {len(SHIFTED)} questions of another kind")
            tunelab(ws.root, "monitor", DEP, "--since", healthy_from, "--until", healthy_until, ok=(0, 1))
            shifted_from = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(chat, SHIFTED))
            tunelab(ws.root, "monitor", DEP, "--since", shifted_from, ok=(0, 1))
            print(f"  ({time.perf_counter() - t:.0f} s)")
        finally:
            stop_server(proc)
    print(f"\nthe walk took {(time.perf_counter() - started) / 60:.1f} min [{loads()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
