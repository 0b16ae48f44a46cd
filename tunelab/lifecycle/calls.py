"""Call logs: one row per gateway call, the answers the caller never saw (shadows), and logs
turned into a dataset.

A row keeps the time, the key's name (never the key), the deployment and prompt version, the
public call id the response carried (`call_id`: the response's `id`, also in the header
`X-Tunelab-Call-Id`), the arm that answered (`primary` or `canary`) and the candidate it resolved
to, the messages and template variables, the output, tokens, latency, cost (from the workspace
pricing) and status. People say what they think of a call with `add_feedback` (a score in [0, 1]
and/or the correct output, and a note; the latest feedback of a call counts, `feedback_for`). A shadow's answer to a call (and, on a canary's calls, the primary's) is a
`shadow_calls` row with the same call id (`ShadowAnswer`); a call the full shadow queue could not
mirror is one too, with status `dropped`, so nothing is lost silently. Logged texts are clipped (`clip_call`: each message, variable and the output at
LOG_TEXT_CHARS, at most LOG_MESSAGES messages) and the full sizes kept in `meta["sizes"]`, so a
huge request never makes a huge log. `find_calls` pages and filters them (deployment, key, status,
time, text); `call_stats` sums them per deployment and hour for the console's charts.
`logs_to_dataset` makes a dataset of successful calls (`input` = the variables' input or the last
user message, `output` = the answer, or the correct output its feedback gave; an answer whose
feedback called it wrong without a correction is left out) for the next evaluation or fine-tune;
review the outputs before training on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, func, insert, or_, select

from tunelab.datasets import Example, save_dataset
from tunelab.errors import NotFound, UserError
from tunelab.store.models import CallLogRow, FeedbackRow, ShadowCallRow, utcnow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


LOG_TEXT_CHARS = 20_000
LOG_MESSAGES = 50


def _clip(text: Any) -> tuple[Any, bool]:
    if isinstance(text, str) and len(text) > LOG_TEXT_CHARS:
        return text[:LOG_TEXT_CHARS] + f"… [{len(text) - LOG_TEXT_CHARS:,} more characters]", True
    return text, False


def clip_call(record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A call's log fields with long texts clipped; `meta["sizes"]` keeps the full sizes."""
    out = {**record, **fields}
    messages = list(out.get("messages") or [])
    sizes = {"messages": len(messages), "message_chars": sum(len(str(m.get("content", ""))) for m in messages),
             "output_chars": len(out.get("output") or "")}
    clipped = len(messages) > LOG_MESSAGES
    kept = []
    for m in messages[-LOG_MESSAGES:]:
        content, cut = _clip(m.get("content", ""))
        clipped |= cut
        kept.append({**m, "content": content})
    out["messages"] = kept
    variables = {}
    for i, (k, v) in enumerate((out.get("variables") or {}).items()):
        if i >= LOG_MESSAGES:
            clipped = True
            break
        v, cut = _clip(v if isinstance(v, str) else v)
        clipped |= cut
        variables[str(k)[:200]] = v
    out["variables"] = variables
    for name in ("output", "error"):
        if out.get(name) is not None:
            out[name], cut = _clip(out[name])
            clipped |= cut
    out["meta"] = {**(out.get("meta") or {}), "sizes": sizes, **({"clipped": True} if clipped else {})}
    return out


AGO = {"m": 60, "h": 3600, "d": 86400}


def parse_time(text: str | None, name: str = "since") -> datetime | None:
    """A time (UTC) given as ISO 8601 (2025-01-31T14:00) or as an age: 90m, 24h, 7d ago."""
    if not text:
        return None
    text = text.strip()
    if len(text) > 1 and text[-1] in AGO and text[:-1].isdigit():
        return datetime.utcnow() - timedelta(seconds=int(text[:-1]) * AGO[text[-1]])
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--{name} takes a time like 2025-01-31T14:00 (UTC) or an age like 24h, 7d, 90m "
                        f"(got {text!r})", field=name) from None
    return when.replace(tzinfo=None) - (when.utcoffset() or timedelta(0)) if when.tzinfo else when


def log_call(ws: "Workspace", **fields: Any) -> int:

    with ws.store.session() as s:
        row = CallLogRow(**fields)
        s.add(row)
        s.flush()
        return row.id


def list_calls(ws: "Workspace", deployment: str | None = None, limit: int | None = 200,
               status: str | None = None, since: datetime | None = None, until: datetime | None = None) -> list:
    """The newest calls first (of `deployment`, with `status`, from `since` until before `until`)."""

    q = CallFilter(deployment=deployment, status=status, since=since, until=until).apply(
        select(CallLogRow)).order_by(CallLogRow.id.desc())
    if limit:
        q = q.limit(limit)
    with ws.store.session() as s:
        return list(s.scalars(q))


def count_calls(ws: "Workspace", deployment: str | None = None) -> int:

    q = select(func.count(CallLogRow.id))
    if deployment:
        q = q.where(CallLogRow.deployment == deployment)
    with ws.store.session() as s:
        return int(s.scalar(q) or 0)


@dataclass
class CallFilter:
    """Which calls to show: every field optional; `text` is searched in the messages, the
    variables and the output."""

    deployment: str | None = None
    key: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    text: str | None = None

    def apply(self, q):
        if self.deployment:
            q = q.where(CallLogRow.deployment == self.deployment)
        if self.key:
            q = q.where(CallLogRow.key_name == self.key)
        if self.status:
            q = q.where(CallLogRow.status == self.status)
        if self.since:
            q = q.where(CallLogRow.created_at >= self.since)
        if self.until:
            q = q.where(CallLogRow.created_at < self.until)
        if self.text:
            pattern = "%" + self.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            q = q.where(or_(CallLogRow.output.ilike(pattern, escape="\\"),
                            cast(CallLogRow.messages, String).ilike(pattern, escape="\\"),
                            cast(CallLogRow.variables, String).ilike(pattern, escape="\\")))
        return q


def find_calls(ws: "Workspace", where: CallFilter, page: int = 1, per_page: int = 50) -> tuple[list, int]:
    """(the calls of page `page`, newest first, the number of calls matching)."""
    with ws.store.session() as s:
        total = int(s.scalar(where.apply(select(func.count(CallLogRow.id)))) or 0)
        q = where.apply(select(CallLogRow)).order_by(CallLogRow.id.desc())
        rows = list(s.scalars(q.offset(max(0, page - 1) * per_page).limit(per_page)))
    return rows, total


def get_call(ws: "Workspace", call_id: int | str):
    """The call with row id `call_id`, or with the public id (`chatcmpl-...`) `call_id`; None: none."""
    with ws.store.session() as s:
        if isinstance(call_id, int):
            return s.get(CallLogRow, call_id)
        return s.scalar(select(CallLogRow).where(CallLogRow.call_id == call_id))


def call_dict(r, feedback=None) -> dict[str, Any]:
    """A call as JSON (the API, `logs list --json`), with its latest feedback when given."""
    out = {"id": r.id, "call_id": r.call_id, "created_at": r.created_at.isoformat(timespec="seconds"),
           "key_name": r.key_name, "deployment": r.deployment, "arm": r.arm, "candidate": r.candidate,
           "kind": r.kind, "prompt_version": r.prompt_version, "messages": r.messages, "variables": r.variables,
           "output": r.output, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
           "latency_s": r.latency_s, "cost": r.cost, "status": r.status, "error": r.error}
    if feedback is not None:
        out["feedback"] = feedback.to_dict()
    return out


def calls_with_feedback(ws: "Workspace", rows: list) -> list[dict[str, Any]]:
    """`call_dict` of each row, with its latest feedback."""
    fb = feedback_for(ws, [r.call_id for r in rows if r.call_id])
    return [call_dict(r, fb.get(r.call_id)) for r in rows]


# -- feedback ----------------------------------------------------------------------------------------
GOOD = 0.5  # a score at or above this says the answer was right
MAX_NOTE = 2000


@dataclass
class Feedback:
    """The latest feedback on a call."""

    call_id: str
    score: float | None
    correction: str | None
    note: str
    author: str
    created_at: datetime

    @property
    def good(self) -> bool | None:
        """Whether the answer was right by its score (None: no score)."""
        return None if self.score is None else self.score >= GOOD

    def to_dict(self, brief: bool = False) -> dict[str, Any]:
        out = {"score": self.score, "correction": self.correction, "note": self.note}
        if brief:
            return {k: v for k, v in out.items() if v not in (None, "")}
        return {**out, "author": self.author, "created_at": self.created_at.isoformat(timespec="seconds")}


def add_feedback(ws: "Workspace", call_id: str, *, score: float | None = None, correction: str | None = None,
                 note: str = "", author: str = "") -> Feedback:
    """Store feedback on the call `call_id` (its public id): a score in [0, 1] (1: right), the
    correct output, or both, and a note. The newest feedback of a call is the one that counts."""
    if score is None and correction is None:
        raise UserError("feedback needs a score (0 to 1) or the correct output (correction), or both")
    if score is not None and (not isinstance(score, (int, float)) or isinstance(score, bool) or math.isnan(score)
                              or not 0 <= score <= 1):
        raise UserError(f"a score is a number from 0 (wrong) to 1 (right), got {score!r}", field="score")
    if correction is not None and len(correction) > LOG_TEXT_CHARS:
        raise UserError(f"a correction has at most {LOG_TEXT_CHARS:,} characters", field="correction")
    if len(note or "") > MAX_NOTE:
        raise UserError(f"a note has at most {MAX_NOTE} characters", field="note")
    if get_call(ws, call_id) is None:
        raise NotFound(f"no call '{call_id}' (the id is the response's id, also sent as X-Tunelab-Call-Id)")
    row = FeedbackRow(call_id=call_id, score=None if score is None else float(score), correction=correction,
                      note=(note or "").strip(), author=author)
    with ws.store.session() as s:
        s.add(row)
    return Feedback(call_id, row.score, correction, row.note, author, row.created_at)


def feedback_for(ws: "Workspace", call_ids: list[str]) -> dict[str, Feedback]:
    """The latest feedback of each call that has some, by public call id."""
    out: dict[str, Feedback] = {}
    ids = sorted(set(c for c in call_ids if c))
    with ws.store.session() as s:
        for start in range(0, len(ids), 500):
            q = select(FeedbackRow).where(FeedbackRow.call_id.in_(ids[start:start + 500])).order_by(FeedbackRow.id)
            for r in s.scalars(q):
                out[r.call_id] = Feedback(r.call_id, r.score, r.correction, r.note, r.author, r.created_at)
    return out


def feedback_history(ws: "Workspace", call_id: str) -> list[Feedback]:
    """Every feedback of a call, newest first."""
    with ws.store.session() as s:
        q = select(FeedbackRow).where(FeedbackRow.call_id == call_id).order_by(FeedbackRow.id.desc())
        return [Feedback(r.call_id, r.score, r.correction, r.note, r.author, r.created_at) for r in s.scalars(q)]


# -- the answers the caller never saw ----------------------------------------------------------------
@dataclass
class ShadowAnswer:
    """One `shadow_calls` row to write: a candidate's answer to a logged call (or a drop)."""

    call_id: str
    deployment: str
    candidate: str
    role: str = "shadow"  # shadow | baseline (the primary's answer to a canary call)
    status: str = "ok"  # ok | error | dropped
    output: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cost: float = 0.0
    error: str | None = None
    meta: dict = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The row's columns (the output clipped like a call's)."""
        out = dict(self.__dict__)
        if out["output"]:
            out["output"], _ = _clip(out["output"])
        return {**out, "created_at": utcnow()}


def write_shadow_answers(ws: "Workspace", answers: list[ShadowAnswer]) -> None:
    """Insert shadow answers in one transaction (a bulk insert: the gateway's shadow queue writes
    them while no caller is being answered)."""
    if answers:
        with ws.store.session() as s:
            s.execute(insert(ShadowCallRow), [a.fields() for a in answers])


def shadow_rows(ws: "Workspace", deployment: str, since: datetime | None = None, until: datetime | None = None,
                candidate: str | None = None, limit: int = 200_000) -> list:
    """The newest `limit` shadow answers of `deployment` (of `candidate`), oldest first."""
    q = select(ShadowCallRow).where(ShadowCallRow.deployment == deployment)
    if candidate:
        q = q.where(ShadowCallRow.candidate == candidate)
    if since:
        q = q.where(ShadowCallRow.created_at >= since)
    if until:
        q = q.where(ShadowCallRow.created_at < until)
    with ws.store.session() as s:
        return list(reversed(list(s.scalars(q.order_by(ShadowCallRow.id.desc()).limit(limit)))))


def call_facets(ws: "Workspace") -> dict[str, list[str]]:
    """The deployments and key names that appear in the logs (for the filters' choices)."""
    with ws.store.session() as s:
        deployments = [d for (d,) in s.execute(select(CallLogRow.deployment).distinct().order_by(CallLogRow.deployment))]
        keys = [k for (k,) in s.execute(select(CallLogRow.key_name).distinct().order_by(CallLogRow.key_name))]
    return {"deployments": deployments, "keys": keys}


def call_stats(ws: "Workspace", where: CallFilter, hours: int = 48) -> dict[str, dict[str, Any]]:
    """Per deployment: calls, errors, cost, latency p50/p95, and calls/cost/p50 latency per hour
    over the last `hours` hours (of the filter's window, else up to now)."""
    end = (where.until or datetime.utcnow()).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    start = max(where.since or datetime.min, end - timedelta(hours=hours))
    window = CallFilter(**{**where.__dict__, "since": start, "until": end})
    cols = (CallLogRow.deployment, CallLogRow.created_at, CallLogRow.latency_s, CallLogRow.cost, CallLogRow.status)
    with ws.store.session() as s:
        rows = s.execute(window.apply(select(*cols)).order_by(CallLogRow.id.desc()).limit(200_000)).all()
    n_hours = max(1, int((end - start).total_seconds() // 3600))
    stats: dict[str, dict[str, Any]] = {}
    for dep, at, latency, cost, status in rows:
        st = stats.setdefault(dep, {"calls": 0, "errors": 0, "cost": 0.0, "latencies": [],
                                    "hours": [[0, 0.0, []] for _ in range(n_hours)]})
        st["calls"] += 1
        st["errors"] += status != "ok"
        st["cost"] += cost or 0.0
        st["latencies"].append(latency or 0.0)
        h = min(n_hours - 1, max(0, int((at - start).total_seconds() // 3600)))
        st["hours"][h][0] += 1
        st["hours"][h][1] += cost or 0.0
        st["hours"][h][2].append(latency or 0.0)
    for st in stats.values():
        lat = sorted(st.pop("latencies"))
        st["p50"] = lat[len(lat) // 2] if lat else 0.0
        st["p95"] = lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else 0.0
        st["volume"] = [h[0] for h in st["hours"]]
        st["cost_per_hour"] = [h[1] for h in st["hours"]]
        st["latency_p50"] = [sorted(h[2])[len(h[2]) // 2] if h[2] else 0.0 for h in st["hours"]]
        del st["hours"]
    return {"start": start, "end": end, "hours": n_hours, "deployments": stats}


def answer_confidence(comp) -> float | None:
    """How sure the model was of an answer (a `Completion`), logged with the call as
    `meta["confidence"]` for the drift monitor and used by distillation: the label margin (best minus
    second-best label probability) for a label, else the geometric-mean probability of the generated
    tokens (`Completion.confidence["mean"]`, JSON and text); None when the backend reports neither."""
    if comp.label_margin is not None:
        return round(comp.label_margin, 4)
    conf = comp.confidence
    return round(conf["mean"], 4) if conf else None


def row_confidence(extra: dict[str, Any] | None) -> float | None:
    """The same figure from a stored evaluation row's `extra` (its `margin`, else `confidence.mean`)."""
    extra = extra or {}
    if extra.get("margin") is not None:
        return float(extra["margin"])
    conf = extra.get("confidence")
    return float(conf["mean"]) if isinstance(conf, dict) and conf.get("mean") is not None else None


def call_input(row) -> str:
    variables = row.variables or {}
    if variables.get("input") is not None:
        return str(variables["input"])
    for m in reversed(row.messages or []):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def logs_to_dataset(ws: "Workspace", name: str, deployment: str | None = None, limit: int | None = None):
    """Save the successful calls (of `deployment`, or all) as dataset `name` (split `train`): the
    output is the correct output from the call's feedback when one was given, else the answer; an
    answer the feedback called wrong (score below 0.5) with no correction is left out."""

    rows = list(reversed(list_calls(ws, deployment, limit=limit, status="ok")))
    if not rows:
        what = f" of deployment '{deployment}'" if deployment else ""
        raise UserError(f"no successful calls{what} to export")
    fb = feedback_for(ws, [r.call_id for r in rows if r.call_id])
    examples, wrong = [], 0
    for r in rows:
        meta = {k: v for k, v in (r.variables or {}).items() if k != "input"}
        meta.update({"deployment": r.deployment, "call_id": r.id})
        if r.prompt_version:
            meta["prompt_version"] = r.prompt_version
        output, f = r.output, fb.get(r.call_id)
        if f is not None:
            meta["feedback"] = f.to_dict(brief=True)
            if f.correction is not None:
                output = f.correction
            elif f.score is not None and f.score < GOOD:
                wrong += 1
                continue
        examples.append(Example(input=call_input(r), output=output, meta=meta))
    if not examples:
        raise UserError(f"every call to export was marked wrong by its feedback ({wrong}) with no correct output")
    source = (f"call logs{' of ' + deployment if deployment else ''} ({len(examples)} calls"
              + (f"; {wrong} answers marked wrong left out" if wrong else "") + ")")
    return save_dataset(ws, name, {"train": examples}, source=source)


class LogWriter:
    """Group commit for call logs: concurrent callers hand their rows to one writer thread, which
    inserts everything pending in one transaction and then releases them. A call returns only once
    its row is committed (nothing is lost if the server dies), but 200 concurrent calls cost a few
    transactions instead of 200 competing SQLite writers."""

    def __init__(self, ws: "Workspace"):
        import queue
        import threading

        self.ws = ws
        self._queue: "queue.Queue" = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tunelab-log-writer")
        self._thread.start()

    def write(self, **fields: Any) -> None:
        """Log one call (a `call_logs` row's fields); returns once it is committed."""
        import threading

        item = {"fields": fields, "done": threading.Event(), "error": None}
        self._queue.put(item)
        if not item["done"].wait(60):
            raise TimeoutError("the call log writer did not answer in 60 s")
        if item["error"] is not None:
            raise item["error"]

    def _run(self) -> None:
        import queue

        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                with self.ws.store.session() as s:
                    s.add_all([CallLogRow(**item["fields"]) for item in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting caller gets the error
                for item in batch:
                    item["error"] = exc
            for item in batch:
                item["done"].set()
