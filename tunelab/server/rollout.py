"""The gateway's side of rollouts (`tunelab.lifecycle.rollouts`): which arm answers a call, and the
shadow queue that answers in the background.

- `Rollouts`: each deployment's rollout, re-read from the store at most every `REFRESH_S` seconds;
  when its generation moved (a canary set, a promotion), the deployment is resolved again.
- `ShadowQueue`: the calls a shadow (or, on a canary's calls, the primary) must answer too. The
  caller never waits for them: `submit` puts a job on a bounded queue without blocking, and a job
  that does not fit is dropped and logged as `dropped` (counted, never silently lost). Where a job
  is answered depends on its candidate:
  - one that runs a model on this machine (SmolLM2, a fine-tune, llama.cpp) is answered in a worker
    process of its own, at the lowest OS priority, on one thread, with its own copy of the model
    (`tunelab.server.shadows.ShadowProcess`, its own bounded queue): its compute never holds the
    gateway's interpreter or takes a CPU a caller wants;
  - the others (a remote API, the fake model) in one worker thread of the gateway, in small
    batches, only in a pause: no call being answered (`serving()` marks the gateway busy) for
    `QUIET_S` seconds; a gateway busy without a pause fills the queue and drops instead.
  Both answer through the same `answer_jobs` (the deployment's candidate, as measured). Answers
  are logged as `shadow_calls` rows in bulk (the thread's at most `WRITE_AFTER_S` after they were
  answered and only in a pause, so a caller's own log write never queues behind them; the worker
  process writes its own). On shutdown, what is left is logged as dropped and the worker process
  stops with the gateway.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable

from tunelab.errors import UserError
from tunelab.lifecycle.calls import ShadowAnswer
from tunelab.lifecycle.rollouts import REFRESH_S, Rollout, get_rollout
from tunelab.server.shadows import STOPPED, ShadowJob, ShadowProcess, answer_jobs, runs_locally, tally

__all__ = ["Rollouts", "ShadowJob", "ShadowQueue", "SHADOW_CAPACITY", "SHADOW_WORKERS"]

if TYPE_CHECKING:
    from tunelab.server.deployments import Deployments
    from tunelab.workspace import Workspace

SHADOW_CAPACITY = 1000  # jobs waiting at most (in each queue); more are dropped (and logged as dropped)
SHADOW_WORKERS = ("auto", "process", "thread")  # where shadow jobs are answered (ShadowQueue's `worker`)
SHADOW_BATCH = 4  # jobs answered together by one candidate (small: a caller never waits long for the CPU)
QUIET_S = 0.02  # the shadow works only once no call has been answered for this long
WRITE_EVERY = 64  # shadow answers written in one transaction, at most
WRITE_AFTER_S = 1.0  # and at the latest this long after the first of them was answered
MAX_DROPS_KEPT = 100_000  # drop rows waiting to be written; beyond, only counted


class Rollouts:
    """Each deployment's rollout, cached for `REFRESH_S` seconds (a deployment without one is a
    default, empty rollout). A changed generation drops the deployment's resolved candidate."""

    def __init__(self, ws: "Workspace", deployments: "Deployments", refresh_s: float = REFRESH_S):
        self.ws, self.deployments, self.refresh_s = ws, deployments, refresh_s
        self._seen: dict[str, tuple[float, Rollout]] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Rollout:
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(name)
        if hit is not None and now - hit[0] < self.refresh_s:
            return hit[1]
        rollout = get_rollout(self.ws, name)
        with self._lock:
            old = self._seen.get(name)
            self._seen[name] = (now, rollout)
        if old is not None and old[1].generation != rollout.generation:
            self.deployments.drop(name)  # a label may point elsewhere now (a promotion)
        return rollout


class ShadowQueue:
    """The background answers of shadows and baselines (see the module's docstring).

    `worker`: where jobs are answered. "auto": a candidate that runs a model on this machine in
    the worker process (`tunelab.server.shadows.ShadowProcess`), the others (a remote API, the
    fake model) in this process's worker thread; "process" or "thread": all of them there."""

    def __init__(self, deployments: "Deployments", write: Callable[[list[ShadowAnswer]], None], *,
                 capacity: int = SHADOW_CAPACITY, batch: int = SHADOW_BATCH, quiet_s: float = QUIET_S,
                 worker: str = "auto"):
        if worker not in SHADOW_WORKERS:
            raise UserError(f"--shadow-worker takes {', '.join(SHADOW_WORKERS)}, not '{worker}'")
        self.deployments, self.write, self.batch, self.quiet_s = deployments, write, batch, quiet_s
        self.worker = worker
        self._idle_since = time.monotonic()
        self._jobs: queue.Queue = queue.Queue(maxsize=capacity)
        self._drops: list[ShadowAnswer] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._stop = False
        self.counts = {"submitted": 0, "answered": 0, "errors": 0, "dropped": 0}
        self.process = ShadowProcess(deployments.workspace.root, write, self._count, lambda: deployments.generation,
                                     capacity=capacity)
        self._routes: dict[str, tuple[int, bool]] = {}  # candidate -> (generation, answered by the process)
        self._thread = threading.Thread(target=self._run, daemon=True, name="tunelab-shadow")
        self._thread.start()

    @contextmanager
    def serving(self):
        """Mark the gateway busy answering a caller for the duration of the block."""
        with self._cond:
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                if self._busy == 0:
                    self._idle_since = time.monotonic()
                    self._cond.notify_all()

    def submit(self, job: ShadowJob) -> bool:
        """Queue `job` without waiting; False when the queue is full (the job is logged as dropped)."""
        route = self._routes.get(job.candidate)
        if route is not None and route[1] and route[0] == self.deployments.generation and self.process.running:
            with self._cond:
                self.counts["submitted"] += 1
            return self._to_process(job)
        with self._cond:  # callers submit from many threads: count under the lock
            self.counts["submitted"] += 1
            try:
                self._jobs.put_nowait(job)
                return True
            except queue.Full:
                self._dropped(job, "the shadow queue was full")
                return False

    def _dropped(self, job: ShadowJob, why: str) -> None:
        """Count `job` as dropped and keep its row for the next write (under `_cond`)."""
        self.counts["dropped"] += 1
        if len(self._drops) < MAX_DROPS_KEPT:
            self._drops.append(job.dropped(why))

    def _count(self, name: str, n: int) -> None:
        with self._cond:
            self.counts[name] += n

    def pending(self) -> int:
        return self._jobs.qsize() + self.process.pending()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued job is answered and logged (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                done = self._jobs.unfinished_tasks == 0 and not self._drops
            if done and self.process.pending() == 0:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop the worker thread and the worker process; jobs not answered yet are logged as dropped."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        left = []
        while True:
            try:
                left.append(self._jobs.get_nowait().dropped(STOPPED))
                self._jobs.task_done()
            except queue.Empty:
                break
        self._count("dropped", len(left))
        self._flush_drops(left)
        self.process.close()

    # -- the worker thread -----------------------------------------------------------------------
    def _flush_drops(self, extra: list[ShadowAnswer] | None = None) -> None:
        with self._cond:
            drops, self._drops = self._drops + list(extra or []), []
        self._write(drops)

    def _write(self, answers: list[ShadowAnswer]) -> None:
        if answers:
            try:
                self.write(answers)
            except Exception:  # noqa: BLE001 - the writer failed: these rows are lost, count them
                self._count("errors", len(answers))

    def _in_process(self, job: ShadowJob) -> bool:
        """Whether the worker process answers `job` (see `worker`); remembered per candidate until
        the deployments move, so that `submit` hands such jobs to the process directly."""
        generation = self.deployments.generation
        if self.worker != "auto":
            local = self.worker == "process"
        else:
            try:
                local = runs_locally(self.deployments.get(job.candidate))
            except Exception:  # noqa: BLE001 - an unknown candidate: the thread logs its error
                return False
        self._routes[job.candidate] = (generation, local)
        return local

    def _to_process(self, job: ShadowJob) -> bool:
        why = self.process.submit(job)
        if why is not None:
            with self._cond:
                self._dropped(job, why)
        return why is None

    def _forward(self, jobs: list[ShadowJob]) -> list[ShadowJob]:
        """Hand the worker process its jobs (a refused one is dropped); the rest are this thread's."""
        mine = []
        for job in jobs:
            if self._in_process(job):
                self._to_process(job)
                self._jobs.task_done()
            else:
                mine.append(job)
        return mine

    def _run(self) -> None:
        pending: list[ShadowAnswer] = []  # answered, written together in a pause
        done, since = 0, time.monotonic()

        def write_pending() -> None:
            nonlocal pending, done
            self._write(pending)
            pending = []
            for _ in range(done):
                self._jobs.task_done()
            done = 0

        while True:
            if self._drops and self._pause():
                self._flush_drops()
            if pending and (len(pending) >= WRITE_EVERY or time.monotonic() - since > WRITE_AFTER_S) \
                    and self._pause():
                write_pending()
            try:
                first = self._jobs.get(timeout=0.05 if pending or self._drops else 0.2)
            except queue.Empty:
                if self._stop:
                    write_pending()
                    return
                continue
            jobs = [first]
            while len(jobs) < self.batch:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            jobs = self._forward(jobs)
            if not jobs:
                continue
            self._pause(wait=True)  # never alongside a caller
            if self._stop:
                write_pending()
                self._count("dropped", len(jobs))
                self._flush_drops([j.dropped(STOPPED) for j in jobs])
                for _ in jobs:
                    self._jobs.task_done()
                return
            if not pending:
                since = time.monotonic()
            answers = answer_jobs(self.deployments, jobs)
            counts = tally(answers)
            self._count("answered", counts["answered"])
            self._count("errors", counts["errors"])
            pending += answers
            done += len(jobs)

    def _pause(self, wait: bool = False) -> bool:
        """Whether the gateway is in a pause: no call answered for `quiet_s` (`wait`: until it is,
        or until stopped)."""
        with self._cond:
            while True:
                quiet = self._busy == 0 and time.monotonic() - self._idle_since >= self.quiet_s
                if quiet or self._stop or not wait:
                    return quiet or self._stop
                self._cond.wait(self.quiet_s if self._busy == 0 else 0.05)
