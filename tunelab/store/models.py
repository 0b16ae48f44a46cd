"""The store's tables (SQLAlchemy 2). The schema itself is made by the Alembic migrations in
`migrations/versions/`; a test checks that the two agree.

One database per workspace: rows need no workspace column.
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, Boolean, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON}


class DatasetRow(Base):
    """One imported version of a dataset; its examples live in files under the artifacts folder."""

    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    source: Mapped[str] = mapped_column(Text, default="")
    path: Mapped[str] = mapped_column(Text)  # folder relative to the artifacts folder
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    splits: Mapped[dict] = mapped_column(JSON, default=dict)  # {split: count}
    labels: Mapped[list | None] = mapped_column(JSON, nullable=True)
    check: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)


class PromptVersionRow(Base):
    """The content of a prompt version; `version` is the sha256 of its canonical content."""

    __tablename__ = "prompt_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(64))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PromptCommitRow(Base):
    """One entry of a prompt's history: which version became current, from which parent, why."""

    __tablename__ = "prompt_commits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    version: Mapped[str] = mapped_column(String(64))
    parent: Mapped[str | None] = mapped_column(String(64), nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)  # provenance (optimizer, scores, ...)


class PromptLabelRow(Base):
    """A label (e.g. `production`) pointing at a version of a prompt."""

    __tablename__ = "prompt_labels"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    label: Mapped[str] = mapped_column(String(100), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    note: Mapped[str] = mapped_column(Text, default="", server_default="")  # the last deploy's note
    author: Mapped[str] = mapped_column(String(200), default="", server_default="")
    # the request parameters a client may override when calling NAME@LABEL (migration 0003)
    overrides: Mapped[list] = mapped_column(JSON, default=list, server_default="[]")


class PromptDeployRow(Base):
    """One deploy: a label moved to a version (from `previous`), with a note (migration 0003)."""

    __tablename__ = "prompt_deploys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    label: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(64))
    previous: Mapped[str | None] = mapped_column(String(64), nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(200), default="")
    overrides: Mapped[list] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunRow(Base):
    """One candidate evaluated on one split. `key` identifies its configuration, for resuming."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    candidate: Mapped[str] = mapped_column(String(300))
    kind: Mapped[str] = mapped_column(String(20))  # prompt | ft | hybrid
    model: Mapped[str] = mapped_column(String(300))
    dataset: Mapped[str] = mapped_column(String(200))
    dataset_version: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(50))
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    repeat: Mapped[int] = mapped_column(Integer, default=1)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    wall_s: Mapped[float] = mapped_column(Float, default=0.0)
    summary: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunExampleRow(Base):
    """One example (one repeat) of a run, stored as soon as it finishes."""

    __tablename__ = "run_rows"
    __table_args__ = (UniqueConstraint("run_id", "example_index", "repeat_index"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    example_index: Mapped[int] = mapped_column(Integer)
    repeat_index: Mapped[int] = mapped_column(Integer, default=0)
    input: Mapped[str] = mapped_column(Text, default="")
    expected: Mapped[str] = mapped_column(Text, default="")
    prediction: Mapped[str] = mapped_column(Text, default="")
    scores: Mapped[dict] = mapped_column(JSON, default=dict)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    extra: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CacheRow(Base):
    """The response cache: sha256 of (model, messages, parameters, repeat index) -> completion."""

    __tablename__ = "cache"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class FineTuneRow(Base):
    """A training job and the model `ft:NAME` it makes."""

    __tablename__ = "finetunes"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(20), default="running")  # running | done | failed
    base: Mapped[str] = mapped_column(String(300))
    method: Mapped[str] = mapped_column(String(20))  # lora | full
    dataset: Mapped[str] = mapped_column(String(200))
    dataset_version: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(String(200))
    prompt_version: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict] = mapped_column(JSON, default=dict)  # curves, best epoch, metrics
    path: Mapped[str] = mapped_column(Text, default="")  # folder relative to the artifacts folder
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    wall_s: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_trained: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)


class OptimizationRow(Base):
    """A prompt optimization: every candidate tried, the winner, and what the search cost."""

    __tablename__ = "optimizations"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    prompt: Mapped[str] = mapped_column(String(200))
    dataset: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20), default="running")
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    candidates: Mapped[list] = mapped_column(JSON, default=list)
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    wall_s: Mapped[float] = mapped_column(Float, default=0.0)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)


class ComparisonRow(Base):
    """Candidates side by side on one split, with the report's JSON twin."""

    __tablename__ = "comparisons"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200))
    split: Mapped[str] = mapped_column(String(50))
    candidates: Mapped[list] = mapped_column(JSON, default=list)
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    report_path: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# -- the team server (migration 0002) -----------------------------------------------------------
class ApiKeyRow(Base):
    """An API key of the team server: only its sha256 is stored; the key is shown once."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the first characters, to recognise a key
    role: Mapped[str] = mapped_column(String(20))  # viewer | editor | admin
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)


class UserRow(Base):
    """A person who logs into the web UI with a password (scrypt hash; never the password)."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    password_hash: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(20))  # viewer | editor | admin
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(nullable=True)
    disabled_at: Mapped[datetime | None] = mapped_column(nullable=True)


class UiSessionRow(Base):
    """A web UI login (by API key or by user): the cookie holds a random token whose sha256 is `id`."""

    __tablename__ = "ui_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True,
                                               nullable=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True,
                                                nullable=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column()


class CallLogRow(Base):
    """One gateway call: who (key name, never the key), which deployment, what went in and out."""

    __tablename__ = "call_logs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    key_name: Mapped[str] = mapped_column(String(200), default="")
    deployment: Mapped[str] = mapped_column(String(300), index=True)
    kind: Mapped[str] = mapped_column(String(20), default="")  # prompt | model | hybrid
    prompt_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    messages: Mapped[list] = mapped_column(JSON, default=list)
    variables: Mapped[dict] = mapped_column(JSON, default=dict)
    output: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    status: Mapped[str] = mapped_column(String(20), default="ok")  # ok | error
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    # migration 0004: the public id the response carried (`chatcmpl-...`, header X-Tunelab-Call-Id),
    # the arm that answered (primary | canary) and the candidate it resolved to
    call_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True, index=True)
    arm: Mapped[str | None] = mapped_column(String(20), nullable=True)
    candidate: Mapped[str | None] = mapped_column(String(300), nullable=True)


# -- the lifecycle (migration 0004) --------------------------------------------------------------
class FeedbackRow(Base):
    """Feedback on one call: a score in [0, 1] and/or the correct output, and a note."""

    __tablename__ = "call_feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_id: Mapped[str] = mapped_column(String(64), index=True)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    author: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ShadowCallRow(Base):
    """A second candidate's answer to a logged call, never returned to the caller: a shadow's
    (`role` shadow), or the primary's answer to a call the canary answered (`role` baseline).
    `status` dropped: the shadow queue was full and the call was not mirrored (counted, not lost)."""

    __tablename__ = "shadow_calls"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call_id: Mapped[str] = mapped_column(String(64), index=True)
    deployment: Mapped[str] = mapped_column(String(300), index=True)
    candidate: Mapped[str] = mapped_column(String(300))
    role: Mapped[str] = mapped_column(String(20), default="shadow")  # shadow | baseline
    status: Mapped[str] = mapped_column(String(20), default="ok")  # ok | error | dropped
    output: Mapped[str] = mapped_column(Text, default="")
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_s: Mapped[float] = mapped_column(Float, default=0.0)
    cost: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class RolloutRow(Base):
    """How a deployment name answers beyond its own candidate: the candidate it was promoted to
    (`primary`), a canary taking `canary_weight` of the calls (sticky per caller or not), a shadow
    mirroring `shadow_share` of them."""

    __tablename__ = "rollouts"
    deployment: Mapped[str] = mapped_column(String(300), primary_key=True)
    primary: Mapped[str | None] = mapped_column(String(300), nullable=True)
    canary: Mapped[str | None] = mapped_column(String(300), nullable=True)
    canary_weight: Mapped[float] = mapped_column(Float, default=0.0)
    sticky: Mapped[bool] = mapped_column(Boolean, default=False)
    shadow: Mapped[str | None] = mapped_column(String(300), nullable=True)
    shadow_share: Mapped[float] = mapped_column(Float, default=0.0)
    author: Mapped[str] = mapped_column(String(200), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    generation: Mapped[int] = mapped_column(Integer, default=0)  # bumped on every change (servers re-read)


class PromotionRow(Base):
    """One promotion, rollback or refused promotion of a deployment: who, when, the gate, the evidence."""

    __tablename__ = "promotions"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment: Mapped[str] = mapped_column(String(300), index=True)
    action: Mapped[str] = mapped_column(String(20))  # promote | rollback | refused
    from_candidate: Mapped[str] = mapped_column(String(300))
    to_candidate: Mapped[str] = mapped_column(String(300))
    gate: Mapped[dict] = mapped_column(JSON, default=dict)
    evidence: Mapped[dict] = mapped_column(JSON, default=dict)
    author: Mapped[str] = mapped_column(String(200), default="")
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobRow(Base):
    """A background job (eval | optimize | finetune) queued in the database for a worker."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    args: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)  # queued|running|done|failed
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
