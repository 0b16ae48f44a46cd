"""The store on a real PostgreSQL server: a throwaway cluster (Debian's `postgresql` binaries,
`initdb` + `pg_ctl` on a loopback port) started once per test session; each test gets a fresh
database. Skips with the reason when the binaries are absent (`make postgres` installs them)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

from tests.servers import free_port


def _pg_bin() -> Path | None:
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).parent if found and shutil.which("pg_ctl") else None


@pytest.fixture(scope="session")
def postgres_server():
    """(host, port, user) of a running throwaway PostgreSQL cluster."""
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql, or make postgres)")
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    data, sock, log = root / "data", root / "sock", root / "server.log"
    sock.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:  # postgres refuses to run as root: run it as the postgres user
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser; cannot start PostgreSQL as another user")
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        os.chmod(root, 0o755)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    user = "tunelab"

    def run(*cmd: str) -> None:
        subprocess.run([*prefix, *cmd], check=True, capture_output=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "--no-sync", "-E", "UTF8")
    try:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-k {sock} -p {port} -h 127.0.0.1 -c fsync=off -c full_page_writes=off", "start")
    except subprocess.CalledProcessError:
        text = log.read_text() if log.exists() else ""
        pytest.fail(f"PostgreSQL did not start:\n{text[-2000:]}")
    try:
        yield "127.0.0.1", port, user
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(postgres_server):
    import psycopg

    host, port, user = postgres_server
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://{user}@{host}:{port}/{name}"


@pytest.fixture
def pg_workspace(pg_url, tmp_path, monkeypatch):
    from tunelab.workspace import Workspace

    monkeypatch.delenv("TUNELAB_WORKSPACE", raising=False)
    monkeypatch.setenv("TUNELAB_DATABASE_URL", pg_url)
    ws = Workspace.init(tmp_path / "ws")
    monkeypatch.chdir(ws.root)
    return ws


def test_migrating_an_empty_postgres_database_makes_the_models_schema(pg_url):
    from sqlalchemy import inspect

    from tunelab.store import SCHEMA_HEAD, Store
    from tunelab.store.models import Base

    store = Store(pg_url)
    assert store.engine.dialect.name == "postgresql"
    insp = inspect(store.engine)
    tables = set(insp.get_table_names())
    assert set(Base.metadata.tables) | {"alembic_version"} == tables
    for name, table in Base.metadata.tables.items():
        columns = {c["name"]: c for c in insp.get_columns(name)}
        assert set(columns) == {c.name for c in table.columns}, name
        for col in table.columns:
            assert columns[col.name]["nullable"] == col.nullable, (name, col.name)
    assert store.current_revision() == SCHEMA_HEAD
    Store(pg_url)  # a second open migrates nothing
    assert Store(pg_url).current_revision() == SCHEMA_HEAD
    # Alembic sees no difference between the models and the migrated database
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_datasets_prompts_runs_and_logs_round_trip_on_postgres(pg_workspace):
    from tunelab.datasets import Example, get_dataset, save_dataset
    from tunelab.evaluate import evaluate, resolve_candidate, run_rows
    from tunelab.files import write_atomic
    from tunelab.prompts import commit_prompt, load_prompt, prompt_log, tag_prompt
    from tunelab.server.auth import authenticate, create_key
    from tunelab.lifecycle.calls import list_calls, log_call

    ws = pg_workspace
    assert ws.store.engine.dialect.name == "postgresql"
    examples = [Example(input=t, output=t, meta={"n": i, "text": "ünïcode ✓"}) for i, t in
                enumerate(["spam", "ham", "spam", "ham"])]
    ds = save_dataset(ws, "sms", {"train": examples, "test": examples})
    back = get_dataset(ws, "sms")
    assert back.version == ds.version and back.split("test") == examples and back.labels == ["ham", "spam"]

    write_atomic(ws.prompts_dir / "sms.prompt",
                      "---\nmodel: fake\noutput: {type: label, labels: [spam, ham]}\n---\n{{ input }}\n")
    v1 = commit_prompt(ws, "sms", "first")
    tag_prompt(ws, "sms@current", "production")
    assert load_prompt(ws, "sms@production").version == v1
    assert [c.message for c in prompt_log(ws, "sms")] == ["first"]

    result = evaluate(ws, resolve_candidate(ws, "sms@production"), "sms:test", progress=False)
    rows = run_rows(ws, result.id)
    assert len(rows) == 4 and all(r.scores for r in rows)
    assert result.metrics["accuracy"]["value"] == pytest.approx(1.0)
    again = evaluate(ws, resolve_candidate(ws, "sms@production"), "sms:test", progress=False)  # resumed/cached, not duplicated
    assert again.id == result.id and len(run_rows(ws, again.id)) == 4

    _, secret = create_key(ws, "pg-key", "editor")
    assert authenticate(ws, secret).name == "pg-key"
    log_call(ws, key_name="pg-key", deployment="sms@production", messages=[{"role": "user", "content": "x"}],
             variables={"input": "x"}, output="spam")
    assert list_calls(ws)[0].variables == {"input": "x"}


def test_job_claims_are_exclusive_on_postgres(pg_workspace):
    from tunelab.server.jobs import claim_job, enqueue_job

    ws = pg_workspace
    jobs = {enqueue_job(ws, "eval", {"candidate": "x", "data": "y"}).id for _ in range(8)}
    claimed: list[str] = []
    lock = threading.Lock()

    def grab(n):
        while (job := claim_job(ws, f"w{n}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=grab, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(jobs)
