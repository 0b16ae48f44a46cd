"""Drift and health of a deployment: its live traffic in a window against the split it was
evaluated on, and alarms that say what to do.

    report = monitor(ws, "support@production", since=datetime.utcnow() - timedelta(hours=24))
    report.alarms          # [Alarm(metric, value, threshold, message, action)], empty when healthy
    report.current, report.baseline, report.series     # the window, the split, the window in buckets
                                                       # (from its first call to its end)

The reference is the newest finished run of the candidate the deployment answers with (its inputs
and the candidate's own answers on them: the split it was measured on), or a split named with
`reference=` (its inputs and expected outputs). Measured per window (and per bucket, for plots):

- **inputs**: the cosine distance between the mean sentence embeddings of the window's inputs and
  the reference's (the bundled all-MiniLM-L6-v2, `tunelab.demos.embed`); the out-of-distribution
  share: inputs whose highest similarity to any reference input is below the 5th percentile of
  the reference inputs' own nearest-neighbour similarities (so about 5% when nothing changed);
  the mean length in characters (and a two-sample Kolmogorov-Smirnov p-value, scipy);
- **outputs**: the label shares (their total variation distance from the reference's), the share
  of answers that parse as JSON (`tunelab.metrics.parse_json`), a hybrid's fallback share;
- **confidence**: the mean confidence of the answers as the gateway logs it
  (`tunelab.lifecycle.calls.answer_confidence`): the label margin (best minus second-best label
  probability) for labels, the geometric-mean probability of the generated tokens
  (`Completion.confidence`) for JSON and text; the reference's from its run rows (`row_confidence`).

An alarm is raised when a threshold (`Thresholds`) is crossed in a window with at least
`min_calls` calls, and says what to do for this kind of deployment: re-optimize the prompt,
retrain on the new window (`tunelab distill`), or widen the hybrid's fallback.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tunelab.datasets import get_split
from tunelab.demos import embed
from tunelab.errors import UserError
from tunelab.evaluate import list_runs, read_hybrid, run_rows
from tunelab.lifecycle.calls import call_input, list_calls, row_confidence
from tunelab.lifecycle.rollouts import get_rollout
from tunelab.metrics import parse_json
from tunelab.models.finetuned import read_finetuned
from tunelab.prompts import OutputSpec, load_prompt

if TYPE_CHECKING:
    from tunelab.workspace import Workspace

MAX_WINDOW_INPUTS = 2000  # window inputs embedded at most (an even sample of the window)
MAX_REFERENCE_INPUTS = 1000
OOD_PERCENTILE = 5.0


class Thresholds(BaseModel):
    """When a window raises an alarm."""

    model_config = ConfigDict(extra="forbid")
    max_distance: float = Field(0.15, ge=0, le=2, description="cosine distance of the mean input embeddings")
    max_ood_share: float = Field(0.25, ge=0, le=1, description="share of inputs unlike every reference input (about 0.05 when nothing changed)")
    max_length_ratio: float = Field(1.6, ge=1, description="mean input length against the reference's, either way")
    max_label_shift: float = Field(0.25, ge=0, le=1, description="total variation distance of the label shares")
    min_json_valid: float = Field(0.9, ge=0, le=1, description="share of answers that parse as JSON (JSON outputs)")
    max_fallback_rise: float = Field(0.15, ge=0, le=1, description="a hybrid's fallback share above the measured one")
    max_confidence_drop: float = Field(0.15, ge=0, le=1, description="mean confidence (label margin, or token probability) below the measured one")
    min_calls: int = Field(20, ge=1, description="calls a window needs before it can raise an alarm")


@dataclass
class Stats:
    """One window (or the reference): what its inputs and answers look like."""

    start: datetime | None
    end: datetime | None
    calls: int
    distance: float | None = None
    ood_share: float | None = None
    mean_length: float | None = None
    label_shares: dict[str, float] | None = None
    label_shift: float | None = None
    json_valid: float | None = None
    fallback_share: float | None = None
    confidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for k in ("start", "end"):
            out[k] = out[k].isoformat(timespec="seconds") if out[k] else None
        return out


@dataclass
class Alarm:
    metric: str
    value: float
    threshold: float
    message: str  # what happened, in words
    action: str  # what to do

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriftReport:
    deployment: str
    candidate: str  # what the deployment answers with
    kind: str  # prompt | ft | hybrid
    output_type: str
    reference: str  # where the reference comes from, in words
    current: Stats
    baseline: Stats  # the reference's own figures
    series: list[Stats] = field(default_factory=list)
    alarms: list[Alarm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    length_p: float | None = None  # Kolmogorov-Smirnov p-value of the input lengths

    @property
    def healthy(self) -> bool:
        return not self.alarms

    @property
    def confidence_measure(self) -> str:
        """What `confidence` is for this deployment's answers, in words."""
        return "label margin" if self.output_type == "label" else "token probability"

    def to_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "candidate": self.candidate, "kind": self.kind,
                "output_type": self.output_type, "reference": self.reference,
                "confidence_measure": self.confidence_measure, "current": self.current.to_dict(),
                "baseline": self.baseline.to_dict(), "series": [s.to_dict() for s in self.series],
                "alarms": [a.to_dict() for a in self.alarms], "notes": self.notes, "length_p": self.length_p,
                "healthy": self.healthy}


# -- the reference ----------------------------------------------------------------------------------
@dataclass
class Reference:
    name: str
    inputs: list[str]
    outputs: list[str]
    margins: list[float]
    routes: list[str]


def _kind(spec: str) -> str:
    return "ft" if spec.startswith("ft:") else "hybrid" if spec.startswith("hybrid:") else "prompt"


def output_of(ws: "Workspace", spec: str) -> OutputSpec:
    """The output spec of the candidate `spec`, without loading a model."""
    if spec.startswith("ft:"):
        return load_prompt(ws, read_finetuned(ws, spec[3:]).prompt).output
    if spec.startswith("hybrid:"):
        return output_of(ws, read_hybrid(ws, spec[7:]).fallback)
    return load_prompt(ws, spec).output


def find_reference(ws: "Workspace", candidate: str, data: str | None = None) -> Reference:
    """The split `candidate` was measured on (its newest finished run), or the split `data`."""
    if data:
        ds, split, examples = get_split(ws, data)
        examples = examples[:MAX_REFERENCE_INPUTS]
        return Reference(f"{ds.name}@{ds.version}:{split} (inputs and expected outputs)", [e.input for e in examples],
                         [e.output for e in examples], [], [])
    names = {candidate}
    if _kind(candidate) == "prompt":
        names.add(load_prompt(ws, candidate).ref)
    run = next((r for r in list_runs(ws) if r.candidate in names and r.status == "done"), None)
    if run is None:
        raise UserError(f"'{candidate}' has no finished evaluation to compare its traffic with: evaluate it "
                        f"(tunelab eval {candidate} --data DATASET:SPLIT) or pass --reference DATASET:SPLIT")
    rows = [r for r in run_rows(ws, run.id) if r.repeat_index == 0][:MAX_REFERENCE_INPUTS]
    margins = [m for m in (row_confidence(r.extra) for r in rows) if m is not None]
    routes = [str(((r.extra or {}).get("meta") or {}).get("route")) for r in rows
              if ((r.extra or {}).get("meta") or {}).get("route")]
    return Reference(f"run {run.id} of {run.candidate} on {run.dataset}@{run.dataset_version}:{run.split}",
                     [r.input for r in rows], [r.prediction for r in rows], margins, routes)


_INDEX: dict[str, tuple[np.ndarray, float]] = {}  # reference inputs' embeddings and OOD threshold
_VECTORS: "OrderedDict[str, np.ndarray]" = OrderedDict()  # input text -> embedding (a window seen again is free)
_LOCK = threading.Lock()
MAX_VECTORS = 20_000


def embed_inputs(texts: list[str]) -> np.ndarray:
    """MiniLM embeddings of `texts`, remembered per text (the monitor re-reads overlapping windows)."""
    with _LOCK:
        todo = list(dict.fromkeys(t for t in texts if t not in _VECTORS))
    if todo:
        fresh = embed(todo)
        with _LOCK:
            for t, v in zip(todo, fresh):
                _VECTORS[t] = v
            while len(_VECTORS) > MAX_VECTORS:
                _VECTORS.popitem(last=False)
    with _LOCK:
        missing = [t for t in texts if t not in _VECTORS]
        known = {t: _VECTORS[t] for t in texts if t in _VECTORS}
    if missing:  # evicted meanwhile by another thread's window
        known.update(zip(missing, embed(missing)))
    return np.stack([known[t] for t in texts]) if texts else np.zeros((0, 384), dtype=np.float32)


def _reference_index(inputs: list[str]) -> tuple[np.ndarray, float]:
    key = hashlib.sha256("\0".join(inputs).encode("utf-8")).hexdigest()
    with _LOCK:
        if key in _INDEX:
            return _INDEX[key]
    vecs = embed_inputs(inputs)
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, -1.0)
    nearest = sims.max(axis=1) if len(inputs) > 1 else np.ones(1)
    threshold = float(np.percentile(nearest, OOD_PERCENTILE))
    with _LOCK:
        if len(_INDEX) >= 8:
            _INDEX.pop(next(iter(_INDEX)))
        _INDEX[key] = (vecs, threshold)
    return vecs, threshold


# -- the window -------------------------------------------------------------------------------------
def _shares(outputs: list[str]) -> dict[str, float]:
    counts = Counter(o.strip() for o in outputs)
    n = sum(counts.values()) or 1
    return {k: v / n for k, v in counts.most_common()}


def _tv(a: dict[str, float], b: dict[str, float]) -> float:
    return 0.5 * sum(abs(a.get(k, 0.0) - b.get(k, 0.0)) for k in set(a) | set(b))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _stats(calls: list, vecs: np.ndarray, nearest: np.ndarray, ref_mean: np.ndarray, ood_cut: float,
           output: OutputSpec, ref_shares: dict[str, float], start, end) -> Stats:
    st = Stats(start, end, len(calls))
    if not calls:
        return st
    mean = vecs.mean(axis=0)
    norm = float(np.linalg.norm(mean) * np.linalg.norm(ref_mean)) or 1.0
    st.distance = float(1.0 - mean @ ref_mean / norm)
    st.ood_share = float(np.mean(nearest < ood_cut))
    st.mean_length = float(np.mean([len(call_input(c)) for c in calls]))
    outputs = [c.output for c in calls]
    if output.type == "label":
        st.label_shares = _shares(outputs)
        st.label_shift = _tv(st.label_shares, ref_shares)
    if output.type == "json":
        st.json_valid = float(np.mean([parse_json(o)[0] for o in outputs]))
    routes = [(c.meta or {}).get("route") for c in calls]
    if any(routes):
        st.fallback_share = float(np.mean([r == "fallback" for r in routes]))
    st.confidence = _mean([float(c.meta["confidence"]) for c in calls if (c.meta or {}).get("confidence") is not None])
    return st


def _sample(items: list, n: int) -> list:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def monitor(ws: "Workspace", deployment: str, *, since: datetime | None = None, until: datetime | None = None,
            reference: str | None = None, thresholds: Thresholds | None = None, buckets: int = 12,
            max_inputs: int = MAX_WINDOW_INPUTS) -> DriftReport:
    """The window [since, until) of `deployment` (default: the last 24 hours) against its reference;
    at most `max_inputs` of its calls (an even sample) are embedded."""
    th = thresholds or Thresholds()
    until = until or datetime.utcnow()
    since = since or until - timedelta(hours=24)
    if since >= until:
        raise UserError(f"the window is empty: --since {since:%Y-%m-%d %H:%M} is not before --until {until:%Y-%m-%d %H:%M}")
    candidate = get_rollout(ws, deployment).answering
    output = output_of(ws, candidate)
    ref = find_reference(ws, candidate, reference)
    if not ref.inputs:
        raise UserError(f"the reference ({ref.name}) has no inputs")
    ref_vecs, ood_cut = _reference_index(ref.inputs)
    ref_mean = ref_vecs.mean(axis=0)
    ref_shares = _shares(ref.outputs) if output.type == "label" else {}
    baseline = Stats(None, None, len(ref.inputs), distance=0.0, ood_share=OOD_PERCENTILE / 100,
                     mean_length=float(np.mean([len(t) for t in ref.inputs])),
                     label_shares=ref_shares or None, label_shift=0.0 if ref_shares else None,
                     json_valid=float(np.mean([parse_json(o)[0] for o in ref.outputs])) if output.type == "json" else None,
                     fallback_share=float(np.mean([r == "fallback" for r in ref.routes])) if ref.routes else None,
                     confidence=_mean(ref.margins))
    if baseline.fallback_share is None and candidate.startswith("hybrid:"):
        baseline.fallback_share = read_hybrid(ws, candidate[7:]).tuning.get("fallback_share")
    calls = list(reversed(list_calls(ws, deployment, limit=200_000, status="ok", since=since, until=until)))
    calls = _sample(calls, max_inputs)  # oldest first
    vecs = embed_inputs([call_input(c) for c in calls]) if calls else np.zeros((0, ref_vecs.shape[1]), dtype=np.float32)
    nearest = (vecs @ ref_vecs.T).max(axis=1) if calls else np.zeros(0)
    report = DriftReport(deployment, candidate, _kind(candidate), output.type, ref.name,
                         _stats(calls, vecs, nearest, ref_mean, ood_cut, output, ref_shares, since, until), baseline)
    first = max(since, calls[0].created_at) if calls else since  # the buckets span the window's calls
    step = (until - first) / max(1, buckets)
    for b in range(max(1, buckets)):
        lo, hi = first + b * step, (first + (b + 1) * step) if b < buckets - 1 else until
        idx = [i for i, c in enumerate(calls) if lo <= c.created_at < hi]
        report.series.append(_stats([calls[i] for i in idx], vecs[idx], nearest[idx], ref_mean, ood_cut, output,
                                    ref_shares, lo, hi))
    if calls:
        from scipy.stats import ks_2samp

        report.length_p = float(ks_2samp([len(call_input(c)) for c in calls], [len(t) for t in ref.inputs]).pvalue)
    if len(calls) < th.min_calls:
        report.notes.append(f"{len(calls)} calls in the window: at least {th.min_calls} are needed for an alarm")
        return report
    report.alarms = alarms(report, th)
    return report


# -- alarms -----------------------------------------------------------------------------------------
def _todo(report: DriftReport, problem: str) -> str:
    """What to do about `problem` (inputs | outputs | json | fallback | confidence) on this deployment."""
    d, c = report.deployment, report.candidate
    since = (report.current.start or datetime.utcnow()).strftime("%Y-%m-%dT%H:%M")
    retrain = (f"retrain on the new window: tunelab distill --from {d} --teacher TEACHER --since {since} "
               f"--name NEW-NAME, then shadow and promote it")
    reoptimize = (f"re-optimize the prompt on recent calls: give feedback on a sample of them (corrections), "
                  f"tunelab logs export --deployment {d} --to-dataset recent, tunelab data split recent, "
                  f"then tunelab optimize {c} --data recent")
    widen = (f"widen the hybrid's fallback until then: tunelab hybrid create {c[7:]}-wide --model PRIMARY --fallback "
             f"FALLBACK --threshold HIGHER (a higher {report.confidence_measure} threshold sends more inputs to the "
             "prompt)") \
        if report.kind == "hybrid" else ""
    if problem == "json":
        return ("re-optimize the prompt's format instructions (tunelab optimize) or serve it on a backend that "
                "constrains JSON; look at the failing answers in the call log")
    if problem == "fallback":
        return (f"the fine-tuned side hands more inputs to the fallback than when it was measured (unsure, or "
                f"unlike its training data), which costs a second call each: {retrain}")
    if problem == "confidence":
        return widen + "; " + retrain if widen else (retrain if report.kind == "ft" else reoptimize)
    if report.kind == "prompt":
        return reoptimize
    return (widen + "; " + retrain) if widen else retrain


def alarms(report: DriftReport, th: Thresholds) -> list[Alarm]:
    """The thresholds `report.current` crosses, each with what to do."""
    cur, ref, out = report.current, report.baseline, []
    if cur.distance is not None and cur.distance > th.max_distance:
        out.append(Alarm("input_distance", cur.distance, th.max_distance,
                         f"the inputs moved away from the evaluation split: embedding distance {cur.distance:.3f} "
                         f"> {th.max_distance}", _todo(report, "inputs")))
    if cur.ood_share is not None and cur.ood_share > th.max_ood_share:
        out.append(Alarm("ood_share", cur.ood_share, th.max_ood_share,
                         f"{cur.ood_share:.0%} of the inputs are unlike every input of the evaluation split "
                         f"(about {OOD_PERCENTILE:.0f}% when nothing changed; alarm above {th.max_ood_share:.0%})",
                         _todo(report, "inputs")))
    if cur.mean_length and ref.mean_length:
        ratio = cur.mean_length / ref.mean_length
        if max(ratio, 1 / ratio) > th.max_length_ratio:
            out.append(Alarm("input_length", ratio, th.max_length_ratio,
                             f"inputs are {ratio:.2f}x as long as in the evaluation split ({cur.mean_length:.0f} vs "
                             f"{ref.mean_length:.0f} characters)", _todo(report, "inputs")))
    if cur.label_shift is not None and cur.label_shift > th.max_label_shift:
        top = ", ".join(f"{k} {v:.0%}" for k, v in list((cur.label_shares or {}).items())[:3])
        out.append(Alarm("label_shift", cur.label_shift, th.max_label_shift,
                         f"the answers' label mix moved by {cur.label_shift:.0%} (total variation; now {top})",
                         _todo(report, "outputs")))
    if cur.json_valid is not None and cur.json_valid < th.min_json_valid:
        out.append(Alarm("json_valid", cur.json_valid, th.min_json_valid,
                         f"only {cur.json_valid:.0%} of the answers parse as JSON (alarm below {th.min_json_valid:.0%})",
                         _todo(report, "json")))
    if cur.fallback_share is not None and ref.fallback_share is not None \
            and cur.fallback_share - ref.fallback_share > th.max_fallback_rise:
        out.append(Alarm("fallback_share", cur.fallback_share, ref.fallback_share + th.max_fallback_rise,
                         f"the hybrid's fallback answers {cur.fallback_share:.0%} of calls (measured: "
                         f"{ref.fallback_share:.0%})", _todo(report, "fallback")))
    if cur.confidence is not None and ref.confidence is not None \
            and ref.confidence - cur.confidence > th.max_confidence_drop:
        out.append(Alarm("confidence", cur.confidence, ref.confidence - th.max_confidence_drop,
                         f"answers are less sure: mean {report.confidence_measure} {cur.confidence:.2f} "
                         f"(measured: {ref.confidence:.2f})",
                         _todo(report, "confidence")))
    return out
