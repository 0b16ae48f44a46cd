"""The whole tunelab flow on a labelled dataset of `../shared/data`: the comparison JSON issue 6 asks for.

The same steps as `tunelab demo` (tunelab.flow.run_flow): import and check the data, a zero-shot
baseline prompt, prompt optimization on validation, a LoRA fine-tune of SmolLM2-135M on the FULL
train split with a short prompt, the hybrid, and the comparison on the full test split — baseline,
optimized prompt, the short prompt zero-shot (the prompt the fine-tuned model runs with, i.e. the
fine-tune's own zero-shot starting point), the fine-tuned model and the hybrid — then the advice.

    python bench/full_flow.py sms_spam            --dir /tmp/flow-spam
    python bench/full_flow.py tweeteval_emotion   --dir /tmp/flow-emotion --epochs 1
    python bench/full_flow.py sms_spam --quick    # a tiny version (a few examples, a few steps)

    python bench/full_flow.py tweeteval_emotion --bases smollm2-135m,gemma3-270m --search 8

Every step is reused or resumed when run again in the same --dir, so an interrupted run continues.
Memory: the peak resident set of each step (VmHWM, reset at every step through
/proc/self/clear_refs), the resident set as each step starts (what the earlier steps left) and the
whole run's peak are printed at the end.
Prints the comparison table and the wall time of each step; writes the comparison JSON and the
HTML report into --dir (the paths are printed). Shared data: TUNELAB_SHARED_DATA, else
../shared/data next to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# What each task asks, in the words a user would write in the baseline prompt.
TASKS = {
    "sms_spam": ("Is this SMS message spam (unsolicited advertising, prizes, scams) or ham (a normal "
                 "personal message)?", "Message"),
    "tweeteval_emotion": ("Which emotion does this tweet express most: anger, joy, optimism or sadness?", "Tweet"),
    "legal_unfair_tos": ("Which kind of potentially unfair clause is this sentence from terms of service?", "Sentence"),
}


def shared_data() -> Path:
    return Path(os.environ.get("TUNELAB_SHARED_DATA") or REPO.parent / "shared" / "data")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", nargs="?", default="sms_spam", help="a folder name under the shared data")
    ap.add_argument("--dir", default=None, help="workspace folder (default /tmp/tunelab-flow-DATASET)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="fine-tuning epochs over the full train split (default: tunelab flow's, flow_epochs)")
    ap.add_argument("--budget", type=int, default=8, help="prompt optimization: candidates to evaluate")
    ap.add_argument("--limit-validation", type=int, default=150,
                    help="prompt optimization: score candidates on the first N validation examples")
    ap.add_argument("--volume", type=float, default=100_000, help="requests per month for the cost comparison")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (TUNELAB_THREADS)")
    ap.add_argument("--quick", action="store_true", help="a tiny version: a few examples, a few steps")
    ap.add_argument("--bases", default="smollm2-135m", help="base models side by side (flow --bases)")
    ap.add_argument("--search", type=int, default=None, help="fine-tune by a search of N trials (flow --search)")
    ap.add_argument("--metric", default=None, help="what the flow judges by (flow --metric; default: the type's, "
                                                   "macro_f1 for skewed labels)")
    ap.add_argument("--minutes", type=float, default=None,
                    help="the flow's time budget (flow --minutes; default 10): the learning curves fill what is left")
    ap.add_argument("--no-short", action="store_true",
                    help="leave out the short prompt's zero-shot row: exactly the candidates of 'tunelab flow'")
    ap.add_argument("--max-train", type=int, default=None,
                    help="fine-tune on a seeded sample of this many training examples (default: all)")
    args = ap.parse_args()
    if args.threads:
        os.environ["TUNELAB_THREADS"] = str(args.threads)

    from tunelab.flow import flow_for, run_flow

    src = shared_data() / args.dataset
    labels = [x.strip() for x in (src / "labels.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
    task, field = TASKS.get(args.dataset, (None, None))
    stem = args.dataset.split("_")[-1]
    flow = flow_for(src, name=stem, task=task, field=field, epochs=args.epochs, budget=args.budget,
                    limit_validation=args.limit_validation, extra_candidates=[] if args.no_short else ["{short}"],
                    labels=labels,
                    origin="bench/full_flow.py", bases=args.bases.split(","), search=args.search,
                    metric=args.metric)
    if args.max_train:
        flow.finetune_settings["max_examples"] = args.max_train
    directory = Path(args.dir or f"/tmp/tunelab-flow-{args.dataset}")
    memory = PeakMemory()
    out = run_flow(directory, flow, quick=args.quick, volume=args.volume, workspace_name=f"flow-{stem}",
                   log=memory.log, minutes=args.minutes)
    memory.step("")
    path = directory / "comparison.json"
    path.write_text(json.dumps(out.comparison.to_json(), indent=2, default=str), encoding="utf-8")
    print(f"\ncomparison JSON: {path}\nreport: {out.report}")
    print("times: " + json.dumps({k: round(v, 1) for k, v in out.times.items()}) + f"; wall {out.wall_s:.0f} s")
    print("peak RSS per step (MiB): " + json.dumps({k: round(v) for k, v in memory.peaks.items()})
          + f"; whole flow {max(memory.peaks.values()):,.0f} MiB; load average {os.getloadavg()[0]:.1f}")
    print("RSS as each step starts (MiB): " + json.dumps({k: round(v) for k, v in memory.starts.items()}))
    return 0


class PeakMemory:
    """The process's peak resident set per flow step: the flow logs "[k/n] title" as a step starts."""

    def __init__(self):
        self.peaks: dict[str, float] = {}
        self.starts: dict[str, float] = {}  # the resident set as each step starts: what earlier steps left
        self.current = "start"
        self._reset()

    @staticmethod
    def _reset() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    @staticmethod
    def _peak_mib(field: str = "VmHWM") -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return 0.0

    def step(self, name: str) -> None:
        self.peaks[self.current] = max(self.peaks.get(self.current, 0.0), self._peak_mib())
        self.current = name
        self.starts.setdefault(name, self._peak_mib("VmRSS"))
        self._reset()

    def log(self, line: str) -> None:
        stripped = line.strip()
        if stripped.startswith("[") and "/" in stripped.split("]", 1)[0]:
            self.step(stripped.split("]", 1)[1].split(":")[0].split("(")[0].strip()[:40])
        print(line, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
