"""Answering shadow jobs: the one answering function, and the worker process that runs it for
shadows on a local model.

- `ShadowJob`: a call a shadow (or, on a canary's call, the primary) must answer too.
- `answer_jobs`: the answers, through the gateway's own `Deployments` (`resolve_candidate`, then
  `Candidate.predict`, or `Deployment.answer` where the request's settings apply): exactly what the
  evaluator measured and what the gateway would have served.
- `ShadowProcess`: a worker process of its own for shadows whose candidate runs a model on this
  machine (SmolLM2, a fine-tune, llama.cpp). A model's compute in the gateway's process holds the
  CPU and the interpreter while a caller waits (+165 ms at p95 for a SmolLM2 shadow beside a fast
  primary, docs/results.md); in its own process, at the lowest OS priority (`os.nice(19)`) and on
  one torch thread, it uses only what the callers leave. The process is spawned on the first job,
  loads its own copy of the model, takes jobs from a bounded queue (`submit` never waits: a job
  that does not fit is refused, and the caller of `submit` logs it as dropped), writes its
  answers to the store itself (`write_shadow_answers`, one transaction per batch) and reports each
  batch back. What it took but never reported (it crashed, or was stopped) is logged here as an
  error or as dropped: every job is answered or counted. It exits when asked (`close`: what is
  still queued is logged as dropped), and on its own when the gateway's process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tunelab.evaluate import example_for, request_cost
from tunelab.lifecycle.calls import ShadowAnswer, answer_confidence, write_shadow_answers
from tunelab.server.deployments import UNBATCHED_BACKENDS, Deployment, Deployments
from tunelab.workspace import Workspace

if TYPE_CHECKING:
    from tunelab.models import Model

SHADOW_NICE = 19  # the worker process's OS priority: the lowest (it runs on what callers leave)
SHADOW_THREADS = 1  # torch threads of the worker process
WORKER_BATCH = 8  # jobs the worker process answers together
RESTART_AFTER_S = 10.0  # a worker process that died is started again at most this often
STOPPED = "the server stopped before the shadow answered"


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
    generation: int = 0  # the gateway's `Deployments.generation` when it was queued

    @property
    def key(self) -> tuple[str, str, str]:
        return self.call_id, self.candidate, self.role

    def dropped(self, why: str) -> ShadowAnswer:
        return ShadowAnswer(self.call_id, self.deployment, self.candidate, self.role, status="dropped", error=why)

    def failed(self, why: str) -> ShadowAnswer:
        return ShadowAnswer(self.call_id, self.deployment, self.candidate, self.role, status="error", error=why[:2000])


def answer_jobs(deployments: Deployments, jobs: list[ShadowJob]) -> list[ShadowAnswer]:
    """Each job's answer (status ok), or its error (status error): never raises."""
    out: list[ShadowAnswer] = []
    groups: dict[tuple[str, int], list[ShadowJob]] = {}
    for job in jobs:
        groups.setdefault((job.candidate, job.seed), []).append(job)
    for (spec, seed), group in groups.items():
        try:
            dep = deployments.get(spec)
            applied = [dep.settings(job.asked)[0] for job in group]
            if dep.candidate is not None and not any(applied):
                comps = dep.candidate.predict([example_for(j.messages, j.variables) for j in group], seed)
            else:
                comps = [dep.answer(j.messages, j.variables, seed, a, {}) for j, a in zip(group, applied)]
        except Exception as exc:  # noqa: BLE001 - a failing shadow is logged, never raised
            out += [j.failed(f"{type(exc).__name__}: {exc}") for j in group]
            continue
        for job, comp in zip(group, comps):
            meta = {k: v for k, v in (comp.meta or {}).items() if k.startswith("route") or k == "margin"}
            if (confidence := answer_confidence(comp)) is not None:
                meta["confidence"] = confidence
            out.append(ShadowAnswer(job.call_id, job.deployment, spec, job.role, output=comp.text,
                                    prompt_tokens=comp.prompt_tokens, completion_tokens=comp.completion_tokens,
                                    latency_s=comp.latency_s, cost=request_cost(dep.pricing, comp), meta=meta))
    return out


def runs_locally(dep: Deployment) -> bool:
    """Whether answering with `dep` computes on this machine (a local or llama.cpp model; a remote
    API and the fake model do not)."""
    backends: list[str] = []

    def seen(model: "Model") -> "Model":
        backends.append(model.backend)
        return model

    if dep.candidate is not None:
        dep.candidate.map_models(seen)
    elif dep.model is not None:
        backends.append(dep.model.backend)
    return any(b not in UNBATCHED_BACKENDS for b in backends)


def tally(answers: list[ShadowAnswer]) -> dict[str, int]:
    """{answered, errors, dropped} of `answers`."""
    names = {"ok": "answered", "error": "errors", "dropped": "dropped"}
    out = dict.fromkeys(names.values(), 0)
    for a in answers:
        out[names[a.status]] += 1
    return out


class ShadowProcess:
    """Shadow jobs answered in a worker process of its own (see the module's docstring).

    `write` logs the rows this side makes (drops, and what a dead worker never answered); `count`
    adds to the owner's counts (`answered`, `errors`, `dropped`); `generation` is the gateway's
    `Deployments.generation`: when it moved, the worker resolves its deployments again."""

    def __init__(self, root: Path, write: Callable[[list[ShadowAnswer]], None],
                 count: Callable[[str, int], None], generation: Callable[[], int], *, capacity: int,
                 batch: int = WORKER_BATCH, threads: int = SHADOW_THREADS, nice: int = SHADOW_NICE):
        self.root, self.write, self.count, self.generation = Path(root), write, count, generation
        self.capacity, self.batch, self.threads, self.nice = capacity, batch, threads, nice
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process with threads and torch
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str, str], ShadowJob] = {}
        self._proc: Any = None
        self._jobs: Any = None
        self._results: Any = None
        self._stop: Any = None
        self._watcher: threading.Thread | None = None
        self._closed = False
        self._retry_at = 0.0
        self.started = 0  # worker processes started (tests)

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.is_alive() else None

    @property
    def running(self) -> bool:
        """Whether the worker process was started and not found dead (a job submitted now is taken
        without starting one)."""
        return self._proc is not None

    def pending(self) -> int:
        """Jobs accepted and not yet reported answered, failed or dropped."""
        with self._lock:
            return len(self._in_flight)

    def submit(self, job: ShadowJob) -> str | None:
        """Queue `job` without waiting: None when queued, else why not (the caller logs it as dropped)."""
        with self._lock:
            if self._closed:
                return STOPPED
            if self._proc is None:
                if time.monotonic() < self._retry_at:
                    return "the shadow worker process is restarting"
                try:
                    self._start()
                except Exception as exc:  # noqa: BLE001 - no process, no answer: the job is dropped
                    self._proc, self._retry_at = None, time.monotonic() + RESTART_AFTER_S
                    return f"the shadow worker process could not start: {type(exc).__name__}: {exc}"
            self._in_flight[job.key] = job
            job.generation = self.generation()
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                del self._in_flight[job.key]
                return "the shadow queue was full"
            return None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker process: it logs what is still queued as dropped and exits after its
        batch; after `timeout` seconds it is terminated. Anything it never reported is logged as
        dropped here. Never leaves the process behind."""
        with self._lock:
            self._closed = True
            proc, jobs, results, stop, watcher = self._proc, self._jobs, self._results, self._stop, self._watcher
        if proc is None:
            return
        stop.set()
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if watcher is not None:
            watcher.join(10)
        self._drain(results)
        with self._lock:
            left, self._in_flight = list(self._in_flight.values()), {}
            self._proc = None
        self._log([job.dropped(STOPPED) for job in left], "dropped")
        for q in (jobs, results):
            q.cancel_join_thread()  # nothing reads them any more: never block on a feeder thread
            q.close()

    # -- the parent's side -----------------------------------------------------------------------
    def _start(self) -> None:
        """Spawn the worker process and its watcher (under the lock)."""
        self._jobs = self._ctx.Queue(maxsize=self.capacity)
        self._results = self._ctx.Queue()
        self._stop = self._ctx.Event()
        self._proc = self._ctx.Process(target=serve_jobs, name="tunelab-shadow-worker", daemon=True,
                                       args=(str(self.root), self._jobs, self._results, self._stop, self.batch,
                                             self.threads, self.nice))
        self._proc.start()
        _lower_priority(self._proc.pid, self.nice)  # at once: its imports and model loading too
        self.started += 1
        self._watcher = threading.Thread(target=self._watch, args=(self._proc, self._results), daemon=True,
                                         name="tunelab-shadow-watch")
        self._watcher.start()

    def _watch(self, proc, results) -> None:
        """Read the worker's reports; when it died unasked, log what it never answered as errors."""
        while True:
            try:
                self._report(results.get(timeout=0.2))
                continue
            except queue.Empty:
                pass
            except (EOFError, OSError, ValueError):  # the queue was closed: the owner is closing
                return
            if proc.is_alive():
                continue
            with self._lock:
                if self._closed or self._proc is not proc:
                    return
            self._drain(results)
            with self._lock:
                left, self._in_flight = list(self._in_flight.values()), {}
                jobs, self._proc, self._jobs, self._results = self._jobs, None, None, None
                self._retry_at = time.monotonic() + RESTART_AFTER_S
            for q in (jobs, results):
                q.cancel_join_thread()
                q.close()
            why = f"the shadow worker process exited (exit code {proc.exitcode}) before it answered"
            self._log([job.failed(why) for job in left], "errors")
            return

    def _drain(self, results) -> None:
        while True:
            try:
                self._report(results.get(timeout=0.1))
            except (queue.Empty, EOFError, OSError, ValueError):
                return

    def _report(self, message: tuple[list[tuple[str, str, str]], dict[str, int]]) -> None:
        keys, counts = message
        with self._lock:
            for key in keys:
                self._in_flight.pop(tuple(key), None)
        for name, n in counts.items():
            if n:
                self.count(name, n)

    def _log(self, answers: list[ShadowAnswer], counted_as: str) -> None:
        if not answers:
            return
        self.count(counted_as, len(answers))
        try:
            self.write(answers)
        except Exception:  # noqa: BLE001 - the store failed: the rows are lost, but counted
            pass


# -- the worker process ----------------------------------------------------------------------------
def _lower_priority(pid: int, nice: int) -> None:
    """Set process `pid`'s (0: this one's) niceness to `nice` (where the OS lets us)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(nice, os.getpriority(os.PRIO_PROCESS, pid)))
    except (OSError, AttributeError):
        pass


def serve_jobs(root: str, jobs, results, stop, batch: int, threads: int, nice: int) -> None:
    """The worker process's loop: answer jobs in batches, write the answers, report them; on `stop`,
    log what is still queued as dropped; exit when the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the gateway stops us
    _lower_priority(0, nice)
    for name in ("TUNELAB_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # the local backend reads TUNELAB_THREADS when it loads
    ws = Workspace(Path(root))
    deployments = Deployments(ws)
    parent, generation = os.getppid(), 0

    def finish(group: list[ShadowJob], answers: list[ShadowAnswer]) -> None:
        try:
            write_shadow_answers(ws, answers)
            counts = tally(answers)
        except Exception:  # noqa: BLE001 - the store failed: these rows are lost, count them
            counts = {"errors": len(group)}
        results.put(([job.key for job in group], counts))

    try:
        while os.getppid() == parent:
            try:
                group = [jobs.get(timeout=0.2)]
            except queue.Empty:
                if stop.is_set():
                    break
                continue
            while len(group) < batch:
                try:
                    group.append(jobs.get_nowait())
                except queue.Empty:
                    break
            if stop.is_set():
                finish(group, [job.dropped(STOPPED) for job in group])
                continue
            if max(job.generation for job in group) != generation:  # the gateway re-resolved: so do we
                deployments.forget()
                generation = max(job.generation for job in group)
            finish(group, answer_jobs(deployments, group))
    finally:
        deployments.forget()
