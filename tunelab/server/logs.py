"""Call logs: one row per gateway call, and logs turned into a dataset.

A row keeps the time, the key's name (never the key), the deployment and prompt version, the
messages and template variables, the output, tokens, latency, cost (from the workspace pricing) and
status. Logged texts are clipped (`clip_call`: each message, variable and the output at
LOG_TEXT_CHARS, at most LOG_MESSAGES messages) and the full sizes kept in `meta["sizes"]`, so a
huge request never makes a huge log. `find_calls` pages and filters them (deployment, key, status,
time, text); `call_stats` sums them per deployment and hour for the console's charts. `logs_to_dataset` makes a dataset of successful calls (`input` = the variables' input or the
last user message, `output` = the answer) for the next evaluation or fine-tune; review the outputs
before training on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, func, or_, select

from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.store.models import CallLogRow

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


def log_call(ws: "Workspace", **fields: Any) -> int:

    with ws.store.session() as s:
        row = CallLogRow(**fields)
        s.add(row)
        s.flush()
        return row.id


def list_calls(ws: "Workspace", deployment: str | None = None, limit: int | None = 200,
               status: str | None = None) -> list:
    """The newest calls first."""

    q = select(CallLogRow).order_by(CallLogRow.id.desc())
    if deployment:
        q = q.where(CallLogRow.deployment == deployment)
    if status:
        q = q.where(CallLogRow.status == status)
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


def get_call(ws: "Workspace", call_id: int):

    with ws.store.session() as s:
        return s.get(CallLogRow, call_id)


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


def call_input(row) -> str:
    variables = row.variables or {}
    if variables.get("input") is not None:
        return str(variables["input"])
    for m in reversed(row.messages or []):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def logs_to_dataset(ws: "Workspace", name: str, deployment: str | None = None, limit: int | None = None):
    """Save the successful calls (of `deployment`, or all) as dataset `name` (split `train`)."""

    rows = list(reversed(list_calls(ws, deployment, limit=limit, status="ok")))
    if not rows:
        what = f" of deployment '{deployment}'" if deployment else ""
        raise UserError(f"no successful calls{what} to export")
    examples = []
    for r in rows:
        meta = {k: v for k, v in (r.variables or {}).items() if k != "input"}
        meta.update({"deployment": r.deployment, "call_id": r.id})
        if r.prompt_version:
            meta["prompt_version"] = r.prompt_version
        examples.append(Example(input=call_input(r), output=r.output, meta=meta))
    source = f"call logs{' of ' + deployment if deployment else ''} ({len(examples)} calls)"
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
