"""Background jobs: evaluations, optimizations and fine-tunes queued in the database.

    job = enqueue_job(ws, "eval", {"candidate": "support-router", "data": "support:test", "limit": 50})
    Worker(ws).run_once()          # or `tunelab worker`, or the thread `tunelab serve` starts

A worker claims a queued job atomically (a compare-and-set UPDATE ... WHERE status='queued': of
two workers only one sees its row change), runs it through the library, and heartbeats its
progress. A job whose worker died (no heartbeat for `stale_s`) is put back in the queue when any
worker starts or polls, so jobs survive a server restart. Arguments (`args`):

    eval:      candidate, data, [limit, repeat, metrics]        -> tunelab.evaluate.evaluate
    optimize:  prompt, data, [budget, limit_validation, model]  -> tunelab.optimize.optimize
    finetune:  every FineTuneConfig field (name, data, prompt, ...) -> tunelab.finetune.finetune
"""

from __future__ import annotations

import os
import socket
import threading
import traceback
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from tunelab.errors import NotFound, UserError, pydantic_message
from tunelab.evaluate import evaluate, resolve_candidate
from tunelab.finetune import FineTuneConfig, run
from tunelab.optimize import optimize
from tunelab.store.models import JobRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

KINDS = ("eval", "optimize", "finetune")
STALE_S = 60.0
HEARTBEAT_S = 5.0


def enqueue_job(ws: "Workspace", kind: str, args: dict[str, Any], created_by: str = ""):
    """Queue a job; its arguments are checked now so a typo fails here, not in the worker."""

    if kind not in KINDS:
        raise UserError(f"unknown job kind '{kind}': expected one of {', '.join(KINDS)}", field="kind")
    _check_args(kind, args)
    row = JobRow(id=uuid.uuid4().hex[:16], kind=kind, args=dict(args), status="queued", progress={},
                 created_by=created_by)
    with ws.store.session() as s:
        s.add(row)
    return row


def _check_args(kind: str, args: dict[str, Any]) -> None:
    allowed = {"eval": {"candidate", "data", "limit", "repeat", "metrics"},
               "optimize": {"prompt", "data", "budget", "limit_validation", "limit_test", "model", "seed"}}
    if kind == "finetune":
        from pydantic import ValidationError

        try:
            FineTuneConfig.model_validate(args)
        except ValidationError as exc:
            raise UserError(pydantic_message(exc, FineTuneConfig), field="args") from None
        return
    unknown = set(args) - allowed[kind]
    if unknown:
        raise UserError(f"unknown argument(s) for a {kind} job: {', '.join(sorted(unknown))} "
                        f"(expected: {', '.join(sorted(allowed[kind]))})", field="args")
    needed = {"eval": ("candidate", "data"), "optimize": ("prompt", "data")}[kind]
    missing = [k for k in needed if not args.get(k)]
    if missing:
        raise UserError(f"a {kind} job needs {', '.join(missing)}", field="args")


def get_job(ws: "Workspace", job_id: str):

    with ws.store.session() as s:
        row = s.get(JobRow, job_id)
    if row is None:
        raise NotFound(f"unknown job '{job_id}'")
    return row


def list_jobs(ws: "Workspace", limit: int = 100) -> list:

    with ws.store.session() as s:
        return list(s.scalars(select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id).limit(limit)))


def job_dict(row) -> dict[str, Any]:
    def t(v):
        return v.isoformat(timespec="seconds") if v else None

    return {"id": row.id, "kind": row.kind, "args": row.args, "status": row.status, "progress": row.progress,
            "result": row.result, "error": row.error, "created_by": row.created_by, "created_at": t(row.created_at),
            "started_at": t(row.started_at), "finished_at": t(row.finished_at), "heartbeat_at": t(row.heartbeat_at),
            "worker": row.worker, "attempts": row.attempts}


def requeue_stale(ws: "Workspace", stale_s: float = STALE_S) -> int:
    """Put running jobs whose worker stopped heartbeating back in the queue; returns how many."""

    cutoff = utcnow() - timedelta(seconds=stale_s)
    with ws.store.session() as s:
        result = s.execute(update(JobRow).where(JobRow.status == "running", JobRow.heartbeat_at < cutoff)
                           .values(status="queued", worker=None, progress={"requeued": True}))
        return result.rowcount or 0


def claim_job(ws: "Workspace", worker_id: str):
    """Claim the oldest queued job for `worker_id`, or None. Safe with many workers."""

    for _ in range(5):
        with ws.store.session() as s:
            q = select(JobRow.id).where(JobRow.status == "queued").order_by(JobRow.created_at, JobRow.id).limit(1)
            if s.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)
            job_id = s.scalar(q)
            if job_id is None:
                return None
            now = utcnow()
            changed = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                                .values(status="running", worker=worker_id, started_at=now, heartbeat_at=now,
                                        attempts=JobRow.attempts + 1)).rowcount
        if changed == 1:
            return get_job(ws, job_id)
    return None


def _update(ws: "Workspace", job_id: str, worker_id: str, **values: Any) -> bool:
    """Write `values` if the job is still ours (a requeued job belongs to its new worker)."""

    with ws.store.session() as s:
        return (s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker_id)
                          .values(**values)).rowcount or 0) == 1


def run_job(ws: "Workspace", job) -> dict[str, Any]:
    """Run one claimed job through the library; returns its result (raises on failure)."""

    progress = lambda **p: _update(ws, job.id, job.worker, progress=p, heartbeat_at=utcnow())  # noqa: E731
    args = dict(job.args)
    if job.kind == "eval":

        result = evaluate(ws, resolve_candidate(ws, args["candidate"], data=args["data"]), args["data"], limit=args.get("limit"), repeat=args.get("repeat", 1),
                          metrics=args.get("metrics"), progress=False,
                          on_batch=lambda done, total: progress(done=done, total=total))
        return {"run": result.id, "metrics": {k: v.get("value") for k, v in (result.metrics or {}).items()}}
    if job.kind == "optimize":

        progress(stage="searching")
        result = optimize(ws, args["prompt"], args["data"], budget=args.get("budget", 8),
                          limit_validation=args.get("limit_validation"), limit_test=args.get("limit_test"),
                          model=args.get("model"), seed=args.get("seed", 0), progress=False)
        return {"optimization": result.id, "improved": result.improved, "version": result.version,
                "message": result.message}
    if job.kind == "finetune":

        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            progress(log=lines[-20:])

        result = run(ws, FineTuneConfig.model_validate(args), resume=job.attempts > 1, progress=False, log=log)
        return {"name": args.get("name"), "result": getattr(result, "to_dict", lambda: {"status": "done"})()}
    raise UserError(f"unknown job kind '{job.kind}'")


class Worker:
    """Claims and runs jobs one at a time; heartbeats while a job runs. `start()` runs it in a thread."""

    def __init__(self, ws: "Workspace", poll_s: float = 1.0, stale_s: float = STALE_S,
                 heartbeat_s: float = HEARTBEAT_S):
        self.ws, self.poll_s, self.stale_s, self.heartbeat_s = ws, poll_s, stale_s, heartbeat_s
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> str | None:
        """Requeue stale jobs, claim one and run it; returns its id (None when the queue is empty)."""

        requeue_stale(self.ws, self.stale_s)
        job = claim_job(self.ws, self.id)
        if job is None:
            return None
        beating = threading.Event()

        def heartbeat():
            while not beating.wait(self.heartbeat_s):
                _update(self.ws, job.id, self.id, heartbeat_at=utcnow())

        beat = threading.Thread(target=heartbeat, daemon=True, name=f"tunelab-heartbeat-{job.id}")
        beat.start()
        try:
            result = run_job(self.ws, job)
        except Exception as exc:  # noqa: BLE001 - a failed job is recorded, the worker goes on
            message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
            _update(self.ws, job.id, self.id, status="failed", error=message, finished_at=utcnow(),
                    result={"traceback": traceback.format_exc(limit=5)} if not isinstance(exc, UserError) else None)
        else:
            _update(self.ws, job.id, self.id, status="done", result=_plain(result), finished_at=utcnow())
        finally:
            beating.set()
            beat.join(timeout=5)
        return job.id

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the worker thread
                traceback.print_exc()
                ran = None
            if ran is None:
                self._stop.wait(self.poll_s)

    def start(self) -> "Worker":
        self._thread = threading.Thread(target=self.run_forever, daemon=True, name="tunelab-worker")
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)


def _plain(data: Any) -> Any:
    import json

    return json.loads(json.dumps(data, default=str))
