"""Model selection on a labelled dataset of `../shared/data`: the default fine-tuning recipe, a
hyperparameter search, and the other bundled base, each evaluated on the full test split (the rows of
docs/results.md, "Model selection").

    python bench/recipes.py tweeteval_emotion --max-examples 400 --search 8 --threads 1

Three fine-tunes of the short prompt (`tunelab.flow.flow_prompts`), all on the same train subset
(`--max-examples`, a seeded stratified sample) and validated on the same validation split:

- default: the flow's recipe on smollm2-135m (LoRA r 16, alpha 32, lr 1e-3, 1 epoch, batch 8);
- search: `finetune --search N` on smollm2-135m (the default space; epochs 1 to 2);
- other base: the default recipe on gemma3-270m.

Prints one markdown row per recipe: test metric with its 95% interval, training wall time, tokens.
Finished fine-tunes and runs are reused when run again in the same --dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--max-examples", type=int, default=400)
    ap.add_argument("--max-val-examples", type=int, default=150)
    ap.add_argument("--search", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma-separated: default,search,gemma")
    args = ap.parse_args()
    os.environ["TUNELAB_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from tunelab.datasets import get_dataset, import_dataset
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.finetune import FineTuneConfig, finetune, get_row
    from tunelab.finetune.search import SearchSpace, search
    from tunelab.flow import _ensure_prompt, flow_prompts
    from tunelab.workspace import Workspace

    data = Path(os.environ.get("TUNELAB_SHARED_DATA") or REPO.parent / "shared" / "data") / args.dataset
    ws = Workspace.init(args.dir or f"/tmp/tunelab-recipes-{args.dataset}", name="recipes")
    try:
        ds = get_dataset(ws, args.dataset)
    except Exception:
        ds, _ = import_dataset(ws, data, args.dataset)
    labels = sorted({ex.output for ex in ds.splits["train"]})
    _, short = flow_prompts(args.dataset, labels)
    prompt = _ensure_prompt(ws, "short", short)
    common = dict(data=args.dataset, prompt=prompt.split("@")[0], max_examples=args.max_examples,
                  max_val_examples=args.max_val_examples, method="lora", batch_size=8, patience=None)
    default = dict(lora_r=16, lora_alpha=32.0, lr=1e-3, epochs=1)
    load = os.getloadavg()[0]
    print(f"# {args.dataset}: {args.max_examples} train examples, {args.max_val_examples} validation, "
          f"threads {args.threads}, load average {load:.1f}", file=sys.stderr)
    rows = []
    plan = [("default", "smollm2-135m"), ("search", "smollm2-135m"), ("gemma", "gemma3-270m")]
    only = set((args.only or "default,search,gemma").split(","))
    for recipe, base in plan:
        if recipe not in only:
            continue
        name = f"{recipe}"
        start = time.perf_counter()
        row = get_row(ws, name)
        if row is None or row.status != "done":
            config = FineTuneConfig(name=name, base=base, **common, **default)
            if recipe == "search":
                search(ws, config, trials=args.search, space=SearchSpace(epochs=(1, 2)), progress=False,
                       log=lambda s: print(s, file=sys.stderr))
            else:
                finetune(ws, config, resume=row is not None, progress=False, log=lambda s: print(s, file=sys.stderr))
        row = get_row(ws, name)
        run = evaluate(ws, resolve_candidate(ws, f"ft:{name}"), f"{args.dataset}:test", progress=False)
        m = run.metrics[run.primary_metric]
        line = (f"| {args.dataset} | {recipe} ({base}) | {run.primary_metric} {m['value']:.3f} "
                f"[{m['lo']:.3f}, {m['hi']:.3f}] | {row.wall_s:.0f} s | {row.tokens_trained:,} | "
                f"{(row.config or {}).get('lr', 0):.2g} / {(row.config or {}).get('epochs')} / "
                f"r {(row.config or {}).get('lora_r')} |")
        rows.append(line)
        print(line, flush=True)
        print(f"# {recipe}: {time.perf_counter() - start:.0f} s with evaluation; load {os.getloadavg()[0]:.1f}",
              file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
