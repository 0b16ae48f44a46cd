"""Call logs: one row per gateway call, and logs turned into a dataset.

A row keeps the time, the key's name (never the key), the deployment and prompt version, the
messages and template variables, the output, tokens, latency, cost (from the workspace pricing) and
status. `logs_to_dataset` makes a dataset of successful calls (`input` = the variables' input or the
last user message, `output` = the answer) for the next evaluation or fine-tune; review the outputs
before training on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from tunelab.datasets import Example, save_dataset
from tunelab.errors import UserError
from tunelab.store.models import CallLogRow

if TYPE_CHECKING:
    from tunelab.workspace import Workspace


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
