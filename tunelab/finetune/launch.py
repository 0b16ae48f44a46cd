"""Scale-out training through `accelerate launch`: the same job, in N processes.

    tunelab finetune --launcher accelerate --num-processes 2 ...      # 2 CPU workers (gloo) or 2 GPUs (nccl)
    tunelab finetune --launcher accelerate --num-processes 16 --accelerate-config cluster.yaml ...

`launch()` runs `accelerate launch --num_processes N ... -m tunelab.finetune.worker PAYLOAD.json`
and streams its output. Every process runs the job of `tunelab.finetune.job`; the training loop
(`train.train`) is data-parallel when `WORLD_SIZE > 1`: each global batch (`batch_size` examples)
is split across the ranks, the completion-token loss is normalized by the global token count and
the gradients of the trainable weights are summed across ranks, so N processes take the very steps
one process would (up to float rounding). Rank 0 alone validates (the others receive its result),
writes checkpoints, artifacts and the store row. What the loop calls inside the workers (the
collectives) is `tunelab.finetune.distributed`.

Delegation, not invention: process placement, rendezvous and multi-node settings come from
accelerate (and its config file); tunelab keeps one full replica of the model per process (DDP
semantics), which is what LoRA on small and mid-sized models needs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tunelab.errors import UserError
from tunelab.finetune.config import FineTuneConfig
from tunelab.finetune.job import FineTuneResult, finetune, get_row

if TYPE_CHECKING:
    from tunelab.finetune.config import FineTuneConfig
    from tunelab.finetune.job import FineTuneResult
    from tunelab.workspace import Workspace


# -- the launcher ----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: "FineTuneConfig", payload: Path, *, port: int | None = None) -> list[str]:
    """The `accelerate launch` command line for `config` (launcher settings) and the worker's payload."""
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise UserError("--launcher accelerate needs the accelerate package: pip install accelerate",
                        field="launcher")
    n = config.num_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
    if config.accelerate_config:
        path = Path(config.accelerate_config).expanduser()
        if not path.is_file():
            raise UserError("accelerate config file not found", path=path, field="accelerate_config")
        cmd += ["--config_file", str(path.resolve())]
    else:
        # no config file: one machine; several processes are torchrun workers (gloo on CPU, nccl on GPUs)
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if n > 1:
            cmd += ["--multi_gpu", "--main_process_port", str(port or free_port())]
    return cmd + ["-m", "tunelab.finetune.worker", str(payload)]


def _stored_config(ws: "Workspace", config: "FineTuneConfig", resume: bool) -> tuple["FineTuneConfig", bool]:
    """The configuration every rank trains with, and whether it continues a checkpoint: resuming an
    interrupted fine-tune uses its stored configuration (as `job.finetune` does), with the launcher
    settings given now."""

    row = get_row(ws, config.name) if config.name else None
    if row is None or row.status == "done" or not resume:
        return config, False  # rank 0's job reports "already exists" / "pass --resume" itself
    stored = FineTuneConfig.model_validate({k: v for k, v in (row.config or {}).items()
                                            if k in FineTuneConfig.model_fields})
    stored = stored.model_copy(update={
        "data": f"{row.dataset}@{row.dataset_version}", "prompt": f"{row.prompt}@{row.prompt_version}",
        "launcher": config.launcher, "num_processes": config.num_processes,
        "accelerate_config": config.accelerate_config})
    return stored, True


def launch(ws: "Workspace", config: "FineTuneConfig", *, resume: bool = False, progress: bool = True,
           log: Callable[[str], None] | None = None, env: dict[str, str] | None = None) -> "FineTuneResult":
    """Run the fine-tune `config` in `config.num_processes` processes through `accelerate launch`;
    their output is streamed to `log`. Returns the stored result, as `finetune()` does."""

    log = log or (lambda s: None)
    if not config.name:
        raise UserError("missing name: pass --name NAME", field="name")
    config, continuing = _stored_config(ws, config, resume)
    with tempfile.TemporaryDirectory(prefix="tunelab-launch-") as tmp:
        payload = Path(tmp) / "payload.json"
        payload.write_text(json.dumps({
            "workspace": str(ws.root), "config": config.model_dump(mode="json"), "resume": resume,
            "continuing": continuing, "progress": progress, "error_dir": tmp}), encoding="utf-8")
        cmd = command(config, payload)
        child_env = {**os.environ, **(env or {})}
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        if config.num_processes > 1 and "OMP_NUM_THREADS" not in child_env:
            try:
                import torch

                gpu = torch.cuda.is_available()
            except ImportError:
                gpu = False
            if not gpu:  # CPU workers share the cores
                threads = max(1, (os.cpu_count() or 1) // config.num_processes)
                child_env["OMP_NUM_THREADS"] = str(threads)
                child_env.setdefault("TUNELAB_THREADS", str(threads))
        log("launching: " + " ".join(cmd[1:3]).replace("-m accelerate.commands.launch", "accelerate launch")
            + " " + " ".join(cmd[3:]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env,
                                cwd=str(ws.root), text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        errors = sorted(Path(tmp).glob("error-*.json"))
        if code != 0:
            if errors:
                raise UserError(json.loads(errors[0].read_text(encoding="utf-8"))["message"])
            raise UserError(f"accelerate launch failed with exit status {code} (its output is above); "
                            f"command: {' '.join(cmd)}", field="launcher")
    row = get_row(ws, config.name)
    if row is None or row.status != "done":
        raise UserError(f"the workers ended but ft:{config.name} is not done "
                        f"(status {None if row is None else row.status})", field="launcher")
    from dataclasses import fields

    names = {f.name for f in fields(FineTuneResult)}
    return FineTuneResult(**{k: v for k, v in row.result.items() if k in names})


def run(ws: "Workspace", config: "FineTuneConfig", *, resume: bool = False, progress: bool = True,
        log: Callable[[str], None] | None = None) -> "FineTuneResult":
    """Train as `config.launcher` says: in this process (`local`) or through `accelerate launch`.
    The one entry point of the CLI and the server's job worker."""
    if config.num_processes > 1 and config.launcher == "local":
        raise UserError(f"--num-processes {config.num_processes} needs --launcher accelerate", field="num_processes")
    if config.launcher == "accelerate" and config.head != "none":
        raise UserError(f"--head {config.head} trains in this process: use --launcher local", field="launcher")
    if config.launcher == "accelerate":
        return launch(ws, config, resume=resume, progress=progress, log=log)

    return finetune(ws, config, resume=resume, progress=progress, log=log)
