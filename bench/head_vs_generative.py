"""The generative fine-tune against the classification-head fine-tune (`--head classify`) on a slice
of clinc150 with few examples per label (the rows of docs/results.md, "Generative or a head").

    python bench/head_vs_generative.py --labels 30 --epochs 5 --threads 1

The slice: the first `--labels` intents of clinc150 in alphabetical order with every train (~13 each),
validation and test example of theirs. One short prompt (the instruction and the input; the labels
are in its front matter, not its text: the label trie constrains a generative answer, a head has a
row per label) is fine-tuned both ways with the same LoRA recipe (r 16, alpha 32, lr 1e-3, batch
8, `--epochs`, early stopping on validation accuracy), once with LoRA on the attention projections
(q,k,v,o: the default) and once on every linear module (`--modules`). Each is evaluated by the
evaluator on the slice's test split.

Prints one markdown row per fine-tune: test accuracy with its 95% interval, best validation accuracy,
epochs run, training wall time. Finished fine-tunes and runs are reused when run again in the same --dir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PROMPT = """---
model: smollm2-135m
temperature: 0
output:
  type: label
  labels: {labels}
---
user:
Classify the intent of this message.

Message: {{{{ input }}}}
"""


def write_slice(src: Path, out: Path, n_labels: int) -> list[str]:
    """The first `n_labels` intents (alphabetical, `oos` aside) with all their examples of each split."""
    labels = sorted({json.loads(line)["output"] for line in (src / "train.jsonl").read_text().splitlines()}
                    - {"oos"})[:n_labels]
    keep = set(labels)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        rows = [line for line in (src / f"{split}.jsonl").read_text().splitlines()
                if json.loads(line)["output"] in keep]
        (out / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/tunelab-head-vs-gen")
    ap.add_argument("--labels", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="gen,head,head-all,gen-all",
                    help="comma-separated fine-tunes: gen, head (attention LoRA), gen-all, head-all (all linear)")
    args = ap.parse_args()
    os.environ["TUNELAB_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from tunelab.datasets import get_dataset, import_dataset
    from tunelab.evaluate import evaluate, resolve_candidate
    from tunelab.finetune import FineTuneConfig, finetune, get_row
    from tunelab.flow import _ensure_prompt
    from tunelab.workspace import Workspace

    src = Path(os.environ.get("TUNELAB_SHARED_DATA") or REPO.parent / "shared" / "data") / "clinc150"
    root = Path(args.dir)
    labels = write_slice(src, root / "slice", args.labels)
    ws = Workspace.init(root / "ws", name="head-vs-gen")
    name = f"clinc{args.labels}"
    try:
        ds = get_dataset(ws, name)
    except Exception:
        ds, _ = import_dataset(ws, root / "slice", name)
    sizes = {k: len(v) for k, v in ds.splits.items()}
    print(f"slice: {args.labels} labels, {sizes}; load average {os.getloadavg()}", flush=True)
    prompt = _ensure_prompt(ws, "intent", PROMPT.format(labels=json.dumps(labels))).split("@")[0]
    recipes = {"gen": ("none", ATTENTION), "head": ("classify", ATTENTION), "gen-all": ("none", ALL_LINEAR),
               "head-all": ("classify", ALL_LINEAR)}
    rows = []
    for key in args.only.split(","):
        head, modules = recipes[key]
        ft_name = f"{name}-{key}"
        row = get_row(ws, ft_name)
        if row is None or row.status != "done":
            t0 = time.time()
            finetune(ws, FineTuneConfig(data=name, prompt=prompt, name=ft_name, head=head, target_modules=modules,
                                        method="lora", lora_r=16, lora_alpha=32.0, lr=1e-3, batch_size=8,
                                        epochs=args.epochs), resume=row is not None, progress=False, log=print)
            print(f"{ft_name}: trained in {time.time() - t0:.0f} s; load average {os.getloadavg()}", flush=True)
            row = get_row(ws, ft_name)
        result = evaluate(ws, resolve_candidate(ws, f"ft:{ft_name}"), f"{name}:test", progress=False)
        m = result.metrics["accuracy"]
        best = (row.result or {}).get("validation") or {}
        epochs = (row.result or {}).get("epochs_run")
        line = (f"| `{key}` | {'head' if head == 'classify' else 'generative'} | "
                f"{'all linear' if modules == ALL_LINEAR else 'q,k,v,o'} | {m['value']:.3f} [{m['lo']:.3f}, {m['hi']:.3f}] | "
                f"{(best.get('metrics') or {}).get('accuracy', float('nan')):.3f} | {epochs:g} | "
                f"{row.wall_s / 60:.1f} min |")
        print(line, flush=True)
        rows.append(line)
    print("\n| fine-tune | kind | LoRA modules | test accuracy [95% CI] | best validation accuracy | epochs run | "
          "training wall time |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
