"""One process of a fine-tune started by `accelerate launch` (see `tunelab.finetune.launch`).

    python -m tunelab.finetune.worker PAYLOAD.json

Rank 0 runs the whole job (`job.finetune`: checks, the store row, validation, checkpoints,
artifacts); the other ranks load the same plan and model and take part in the training steps only.
A UserError is written to `error-RANK.json` in the payload's `error_dir` for the launcher to report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tunelab.errors import UserError
from tunelab.files import write_json
from tunelab.finetune import train as tr
from tunelab.finetune.config import FineTuneConfig
from tunelab.finetune.distributed import init_distributed
from tunelab.finetune.job import finetune, plan, run_dir
from tunelab.workspace import Workspace


def main(payload_path: str) -> int:
    payload = json.loads(Path(payload_path).read_text(encoding="utf-8"))

    rank, size = init_distributed()
    try:
        run(payload, rank)
    except UserError as exc:
        write_json(Path(payload["error_dir"]) / f"error-{rank}.json", {"rank": rank, "message": str(exc)})
        print(f"error (rank {rank}): {exc}", file=sys.stderr, flush=True)
        return 2
    finally:
        if size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def run(payload: dict, rank: int) -> None:

    ws = Workspace(Path(payload["workspace"]))
    config = FineTuneConfig.model_validate(payload["config"])
    if rank == 0:

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        finetune(ws, config, resume=payload["resume"], progress=payload["progress"], log=log)
        return

    p = plan(ws, config)
    model, _ = tr.load_for_training(p.base_dir, p.config)
    tr.train(model, p.tokenizer, p.train_items, _no_validation, p.config, run_dir(ws, p.config.name),
             resume=payload["continuing"], progress=False)


def _no_validation(model):  # only rank 0 validates; the others receive its result
    raise AssertionError("validation runs on rank 0")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
