"""The store: one database per workspace, migrated by Alembic on first use.

SQLite in WAL mode at `.tunelab/tunelab.db` by default; `TUNELAB_DATABASE_URL` selects another
database (PostgreSQL goes through the same code).

    store = workspace.store
    with store.session() as s:      # commits on success, rolls back on error
        s.add(...)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from tunelab.store import models  # noqa: F401  (the tables)
from tunelab.store.models import Base  # noqa: F401

MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0004"  # the newest migration; a test checks it against Alembic's head

_migrate_lock = threading.Lock()


class Store:
    def __init__(self, url: str, migrate: bool = True):
        self.url = url
        self.engine: Engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    def __repr__(self) -> str:
        return f"Store({self.engine.url.render_as_string(hide_password=True)!r})"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits when the block ends and rolls back if it raises."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema up to `revision`; cheap when it is already there."""
        if revision == "head" and self.current_revision() == SCHEMA_HEAD:
            return
        from alembic import command

        with _migrate_lock, self.engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)


def alembic_config():
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def insert_ignore(session, table):
    """INSERT ... ON CONFLICT DO NOTHING for SQLite and PostgreSQL (`session.execute(stmt, rows)`)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing()
