"""The gateway's side of rollouts (`tunelab.lifecycle.rollouts`): which arm answers a call, and the
shadow queue that answers in the background.

- `Rollouts`: each deployment's rollout, re-read from the store at most every `REFRESH_S` seconds;
  when its generation moved (a canary set, a promotion), the deployment is resolved again.
- `ShadowQueue`: the calls a shadow (or, on a canary's calls, the primary) must answer too. The
  caller never waits for them: `submit` puts a job on a bounded queue without blocking, and a job
  that does not fit is dropped and logged as `dropped` (counted, never silently lost). One worker
  thread answers the jobs, in small batches, only in a pause: no call being answered (`serving()`
  marks the gateway busy) for `QUIET_S` seconds, so a shadow on the same CPU or model rarely
  competes with a caller (a call arriving during a shadow's batch still shares the CPU with it);
  a gateway busy without a pause fills the queue and drops instead. Answers are logged as
  `shadow_calls` rows in bulk, at most `WRITE_AFTER_S` after they were answered and also only in a
  pause (so a caller's own log write never queues behind them). On shutdown, what is left is
  logged as dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from tunelab.evaluate import example_for, request_cost
from tunelab.lifecycle.calls import ShadowAnswer, answer_confidence
from tunelab.lifecycle.rollouts import REFRESH_S, Rollout, get_rollout

if TYPE_CHECKING:
    from tunelab.server.deployments import Deployments
    from tunelab.workspace import Workspace

SHADOW_CAPACITY = 1000  # jobs waiting at most; more are dropped (and logged as dropped)
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


@dataclass
class ShadowJob:
    call_id: str
    deployment: str
    candidate: str
    role: str  # shadow | baseline
    messages: list[dict]
    variables: dict[str, Any]
    seed: int
    asked: dict[str, Any] = field(default_factory=dict)

    def dropped(self, why: str) -> ShadowAnswer:
        return ShadowAnswer(self.call_id, self.deployment, self.candidate, self.role, status="dropped", error=why)


class ShadowQueue:
    """The background answers of shadows and baselines (see the module's docstring)."""

    def __init__(self, deployments: "Deployments", write: Callable[[list[ShadowAnswer]], None], *,
                 capacity: int = SHADOW_CAPACITY, batch: int = SHADOW_BATCH, quiet_s: float = QUIET_S):
        self.deployments, self.write, self.batch, self.quiet_s = deployments, write, batch, quiet_s
        self._idle_since = time.monotonic()
        self._jobs: queue.Queue = queue.Queue(maxsize=capacity)
        self._drops: list[ShadowAnswer] = []
        self._busy = 0
        self._cond = threading.Condition()
        self._stop = False
        self.counts = {"submitted": 0, "answered": 0, "errors": 0, "dropped": 0}
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
        with self._cond:  # callers submit from many threads: count under the lock
            self.counts["submitted"] += 1
            try:
                self._jobs.put_nowait(job)
                return True
            except queue.Full:
                self.counts["dropped"] += 1
                if len(self._drops) < MAX_DROPS_KEPT:
                    self._drops.append(job.dropped("the shadow queue was full"))
                return False

    def _count(self, name: str, n: int) -> None:
        with self._cond:
            self.counts[name] += n

    def pending(self) -> int:
        return self._jobs.qsize()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every queued job is answered and logged (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cond:
                done = self._jobs.unfinished_tasks == 0 and not self._drops
            if done:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        """Stop the worker; jobs not answered yet are logged as dropped."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        left = []
        while True:
            try:
                left.append(self._jobs.get_nowait().dropped("the server stopped before the shadow answered"))
                self._jobs.task_done()
            except queue.Empty:
                break
        self._count("dropped", len(left))
        self._flush_drops(left)

    # -- the worker ------------------------------------------------------------------------------
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
                first = self._jobs.get(timeout=0.05 if pending else 0.2)
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
            self._pause(wait=True)  # never alongside a caller
            if self._stop:
                write_pending()
                self._count("dropped", len(jobs))
                self._flush_drops([j.dropped("the server stopped before the shadow answered") for j in jobs])
                for _ in jobs:
                    self._jobs.task_done()
                return
            if not pending:
                since = time.monotonic()
            pending += self._answer(jobs)
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

    def _answer(self, jobs: list[ShadowJob]) -> list[ShadowAnswer]:
        out: list[ShadowAnswer] = []
        groups: dict[tuple[str, int], list[ShadowJob]] = {}
        for job in jobs:
            groups.setdefault((job.candidate, job.seed), []).append(job)
        for (spec, seed), group in groups.items():
            try:
                dep = self.deployments.get(spec)
                applied = [dep.settings(job.asked)[0] for job in group]
                if dep.candidate is not None and not any(applied):
                    comps = dep.candidate.predict([example_for(j.messages, j.variables) for j in group], seed)
                else:
                    comps = [dep.answer(j.messages, j.variables, seed, a, {}) for j, a in zip(group, applied)]
            except Exception as exc:  # noqa: BLE001 - a failing shadow is logged, never raised
                self._count("errors", len(group))
                out += [ShadowAnswer(j.call_id, j.deployment, spec, j.role, status="error",
                                     error=f"{type(exc).__name__}: {exc}"[:2000]) for j in group]
                continue
            self._count("answered", len(group))
            for job, comp in zip(group, comps):
                meta = {k: v for k, v in (comp.meta or {}).items() if k.startswith("route") or k == "margin"}
                if (confidence := answer_confidence(comp)) is not None:
                    meta["confidence"] = confidence
                out.append(ShadowAnswer(job.call_id, job.deployment, spec, job.role, output=comp.text,
                                        prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                                        latency_s=comp.latency_s, cost=request_cost(dep.pricing, comp), meta=meta))
        return out
