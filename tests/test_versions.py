"""What differs between PostgreSQL versions, on the server the session runs (15 or 18 in CI).

* The version comes from the server (``server_version_num``): one older than copystream needs is
  refused with one line, exit 2, nothing created. Proven through a proxy in front of the real
  server that tells the client an older ``server_version``, as an old server would.
* PostgreSQL 18 made ``pg_attribute.attnotnull`` true for a NOT NULL constraint added NOT VALID:
  such a key column may still hold NULLs, and copystream must refuse it until it is validated.
* New in 18 and exported byte for byte like the same server's psql: virtual generated columns,
  a temporal primary key (``WITHOUT OVERLAPS``), which is a GiST index that is unique.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import psycopg
import pytest
from conftest import PsqlCsv, RunSql
from psycopg.conninfo import conninfo_to_dict

import copystream
from copystream.errors import KeyProblem, TableNotFound, UsageError
from copystream.server import MIN_VERSION, not_null_sql, require_supported, version_text
from copystream.testing import EphemeralPostgres

pytestmark = pytest.mark.all_versions


# -- pure: the decisions by version number ----------------------------------------------------


@pytest.mark.parametrize(
    ("num", "text"), [(180006, "18.6"), (150014, "15.14"), (120000, "12.0"), (90624, "9.6.24")]
)
def test_version_text(num: int, text: str) -> None:
    assert version_text(num) == text


def test_versions_older_than_12_are_refused_without_a_remedy() -> None:
    require_supported(MIN_VERSION, "h:5432/db")
    require_supported(180006, "h:5432/db")
    with pytest.raises(UsageError) as info:
        require_supported(110022, "h:5432/db")
    assert info.value.exit_code == 2 and info.value.remedy is None
    assert str(info.value) == (
        "the server at h:5432/db runs PostgreSQL 11.22; copystream needs PostgreSQL 12 or later "
        "(its catalog read uses pg_partition_tree(), which older versions lack)"
    )


def test_not_null_means_a_validated_constraint_from_18() -> None:
    for num in (120000, 150014, 170006):
        assert not_null_sql(num).as_string() == "a.attnotnull"
    assert "NOT nn.convalidated" in not_null_sql(180000).as_string()


def test_the_server_version_copystream_sees_is_the_servers(
    dsn: str, run_sql: RunSql, server_version: int
) -> None:
    with psycopg.connect(dsn) as conn:
        assert conn.info.server_version == server_version
    assert server_version >= MIN_VERSION


# -- an older server, as the client sees it ---------------------------------------------------


class VersionProxy:
    """A loopback proxy to a real server that reports ``version`` as its ``server_version``.

    Clients must connect without SSL and GSS encryption (the startup is then in the clear).
    The server's startup messages are rewritten until the first ReadyForQuery; everything
    else passes through untouched.
    """

    def __init__(self, target: tuple[str, int], version: str) -> None:
        self.target = target
        self.version = version.encode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> VersionProxy:
        self.thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.closing.set()
        self.listener.close()
        self.thread.join(5)

    def _accept(self) -> None:
        self.listener.settimeout(0.05)
        while not self.closing.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _rewrite(self, kind: bytes, body: bytes) -> bytes:
        if kind == b"S" and body.startswith(b"server_version\0"):
            body = b"server_version\0" + self.version + b"\0"
        return kind + struct.pack("!I", len(body) + 4) + body

    def _serve(self, client: socket.socket) -> None:
        server = socket.create_connection(self.target)
        pending, started = b"", False
        with client, server, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, server)
            sel.register(server, selectors.EVENT_READ, client)
            while not self.closing.is_set():
                for key, _ in sel.select(0.05):
                    src, dst = key.fileobj, key.data
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data:
                        return
                    if src is server and not started:
                        pending += data
                        data = b""
                        while len(pending) >= 5:
                            size = struct.unpack("!I", pending[1:5])[0]
                            if len(pending) < size + 1:
                                break
                            kind, body = pending[:1], pending[5 : size + 1]
                            pending = pending[size + 1 :]
                            data += self._rewrite(kind, body)
                            started = started or kind == b"Z"
                        data, pending = (data + pending, b"") if started else (data, pending)
                    dst.sendall(data)


@pytest.fixture
def old_server_dsn(pg: EphemeralPostgres, dsn: str) -> Iterator[str]:
    """A dsn of the test database through a proxy that says the server is PostgreSQL 11.22."""
    with VersionProxy((pg.host, pg.port), "11.22") as proxy:
        yield dsn.replace(f"port={pg.port}", f"port={proxy.port}") + (
            " sslmode=disable gssencmode=disable"
        )


def test_the_proxy_changes_only_the_version(old_server_dsn: str) -> None:
    with psycopg.connect(old_server_dsn) as conn:
        assert conn.info.server_version == 110022
        assert conn.execute("SELECT 6 * 7").fetchone() == (42,)


def test_an_old_server_is_refused_with_one_line_and_nothing_created(
    old_server_dsn: str, run_sql: RunSql, dsn: str, tmp_path: Path
) -> None:
    run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
    env = {k: v for k, v in os.environ.items() if k != "COPYSTREAM_DSN"}
    proc = subprocess.run(
        [sys.executable, "-m", "copystream", "export", "t", str(tmp_path / "t.csv"),
         "--dsn", old_server_dsn],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    params = conninfo_to_dict(old_server_dsn)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"copystream: error: the server at {params['host']}:{params['port']}/{params['dbname']} "
        "runs PostgreSQL 11.22; copystream needs PostgreSQL 12 or later (its catalog read uses "
        "pg_partition_tree(), which older versions lack)"
    ]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match=r"runs PostgreSQL 11\.22"):
        copystream.export_table(old_server_dsn, "t", tmp_path / "t.csv")
    assert list(tmp_path.iterdir()) == []


# -- what the server answers differently ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ('"unclosed', "'\"unclosed' is not a valid table name: invalid name syntax"),
        ("a b", "'a b' is not a valid table name: invalid name syntax"),
        ("nosuch.t", "table nosuch.t does not exist"),
        ("nosuch_table", "table nosuch_table does not exist"),
    ],
)
def test_a_malformed_name_is_told_from_a_missing_table(
    dsn: str, tmp_path: Path, name: str, problem: str
) -> None:
    """Up to 15 ``to_regclass`` raises for a malformed name; from 16 it returns NULL, as for a
    missing table, and copystream asks ``pg_input_error_info`` which it was."""
    with pytest.raises(TableNotFound) as info:
        copystream.export_table(dsn, name, tmp_path / "t.csv")
    assert info.value.problem.startswith(problem)
    assert list(tmp_path.iterdir()) == []


def test_a_header_in_text_format_is_asked_of_the_server(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, server_version: int
) -> None:
    """COPY accepts HEADER in text format from PostgreSQL 15; before, it refuses it, and so does
    copystream, by asking the server (a COPY of no row) before anything is created."""
    run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a\tb')")
    out = tmp_path / "t.txt"
    if server_version >= 150000:
        copystream.export_table(dsn, "t", out, format="text", header=True)
        expected = psql_csv(dsn, "SELECT * FROM t ORDER BY id", "FORMAT text, HEADER")
        assert out.read_bytes() == expected == b"id\tv\n1\ta\\tb\n"
    else:
        with pytest.raises(UsageError, match="HEADER available only in CSV mode"):
            copystream.export_table(dsn, "t", out, format="text", header=True)
        assert list(tmp_path.iterdir()) == []


# -- PostgreSQL 18: what is new in the catalog -------------------------------------------------


def _needs_18(server_version: int) -> None:
    if server_version < 180000:
        pytest.skip(f"new in PostgreSQL 18; this server is {version_text(server_version)}")


def test_a_not_valid_not_null_key_is_refused_until_validated(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, server_version: int
) -> None:
    """attnotnull is true, yet a row has a NULL id: paging by id would skip it silently."""
    _needs_18(server_version)
    run_sql(
        dsn,
        """CREATE TABLE t (id int, v text);
           INSERT INTO t VALUES (1, 'a'), (NULL, 'lost'), (3, 'c');
           ALTER TABLE t ADD CONSTRAINT id_nn NOT NULL id NOT VALID;
           CREATE UNIQUE INDEX t_id ON t (id);""",
    )
    assert run_sql(dsn, "SELECT attnotnull FROM pg_attribute WHERE attrelid = 't'::regclass "
                        "AND attname = 'id'") == [(True,)]  # fmt: skip
    out = tmp_path / "t.csv"
    with pytest.raises(KeyProblem, match=r"key column 'id' of public\.t is nullable"):
        copystream.export_table(dsn, "t", out, key="id")
    with pytest.raises(KeyProblem, match="no primary key and no unique index over NOT NULL"):
        copystream.export_table(dsn, "t", out)
    assert list(tmp_path.iterdir()) == []
    run_sql(dsn, "DELETE FROM t WHERE id IS NULL; ALTER TABLE t VALIDATE CONSTRAINT id_nn")
    result = copystream.export_table(dsn, "t", out, chunk_rows=1)
    assert result.rows == 2 and result.key == ("id",)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")


def test_virtual_generated_columns_are_exported_like_psql(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, server_version: int
) -> None:
    _needs_18(server_version)
    run_sql(
        dsn,
        """CREATE TABLE t (id int PRIMARY KEY, price numeric,
                           gross numeric GENERATED ALWAYS AS (price * 1.2) VIRTUAL,
                           label text GENERATED ALWAYS AS ('#' || id) VIRTUAL);
           INSERT INTO t (id, price) SELECT g, g / 7.0 FROM generate_series(1, 50) g;""",
    )
    out = tmp_path / "t.csv"
    copystream.export_table(dsn, "t", out, chunk_rows=7, workers=2, consistent=True)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert b",#50\n" in out.read_bytes()


def test_a_temporal_primary_key_pages_the_table_like_psql(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, server_version: int
) -> None:
    """``PRIMARY KEY (id, valid WITHOUT OVERLAPS)`` is a unique GiST index: (id, valid) is
    unique, so it pages the table; ranges sort by their btree order."""
    _needs_18(server_version)
    run_sql(
        dsn,
        """CREATE EXTENSION btree_gist;
           CREATE TABLE t (id int, valid daterange, v text,
                           PRIMARY KEY (id, valid WITHOUT OVERLAPS));
           INSERT INTO t SELECT g % 5, daterange('2024-01-01'::date + g, '2024-01-01'::date
                                                  + g + 1), md5(g::text)
           FROM generate_series(1, 60) g;""",
    )
    out = tmp_path / "t.csv"
    result = copystream.export_table(dsn, "t", out, chunk_rows=9)
    assert result.key == ("id", "valid") and result.rows == 60
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id, valid")
