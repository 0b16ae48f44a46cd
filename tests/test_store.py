"""The store: migrations make the schema the models describe."""

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect

from tunelab.store import SCHEMA_HEAD, Store, alembic_config
from tunelab.store.models import Base


def test_migrating_an_empty_database_makes_every_table_and_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    store = Store(url)
    insp = inspect(create_engine(url))
    tables = set(insp.get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    for name, table in Base.metadata.tables.items():
        columns = {c["name"] for c in insp.get_columns(name)}
        assert columns == {c.name for c in table.columns}, name
    assert store.current_revision() == SCHEMA_HEAD


def test_schema_head_constant_matches_the_newest_migration():
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_current_head() == SCHEMA_HEAD


def test_migrate_is_idempotent_and_sqlite_uses_wal(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    Store(url)
    store = Store(url)  # second open: nothing to do
    with store.engine.connect() as conn:
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    assert mode.lower() == "wal"


def test_unique_run_rows_guard_against_duplicates(tmp_path):
    import pytest
    from sqlalchemy.exc import IntegrityError

    from tunelab.store.models import RunExampleRow, RunRow

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.session() as s:
        s.add(RunRow(id="r1", key="k", candidate="p", kind="prompt", model="fake", dataset="d",
                     dataset_version="v", split="test"))
        s.flush()
        s.add(RunExampleRow(run_id="r1", example_index=0, repeat_index=0))
    with pytest.raises(IntegrityError):
        with store.session() as s:
            s.add(RunExampleRow(run_id="r1", example_index=0, repeat_index=0))
