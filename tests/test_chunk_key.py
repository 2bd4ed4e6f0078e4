"""A chunk's last key read from the COPY's own last row (a unique key of one integer column).

The path must give exactly what the sibling's bound query gives: the same rows per chunk, the
same last keys, the same ``final``, the same bytes (and those psql's). Both paths run here on the
same chunks of the same table, the sibling's by presenting the same table with a key type the
row is not read for (``numeric``: same text, same order, so the same chunks).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

import copystream
from copystream.catalog import introspect
from copystream.chunk import (
    Chunk,
    ChunkMismatch,
    ChunkRunner,
    _whole_statements,
    copy_key_index,
    key_from_row,
)
from copystream.progress import Progress
from copystream.spec import CopyOptions
from copystream.table import ResolvedTable

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

#: The key not first, negative keys, the int64 extremes, NULLs elsewhere, text holding newlines,
#: quotes, backslashes and every delimiter tried below.
TABLE = f"""
CREATE TABLE t (note text, id bigint PRIMARY KEY, v text, n int);
INSERT INTO t
SELECT CASE g % 7 WHEN 0 THEN NULL WHEN 1 THEN 'a,b' WHEN 2 THEN E'line\\nbreak "q"'
                  WHEN 3 THEN E'back\\\\slash|pipe-dash' WHEN 4 THEN ''
                  WHEN 5 THEN '"' ELSE 'x' END,
       g * 7919 - 500000,
       CASE WHEN g % 5 = 0 THEN NULL ELSE repeat('v', g % 13) || E'\\t;' END,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g END
FROM generate_series(1, 150) g;
INSERT INTO t VALUES ('min', {INT64_MIN}, 'lo', -1), (NULL, {INT64_MAX}, 'hi', 1),
                     ('zero', 0, NULL, NULL), (E'"\\n', -1, '-', -1);
ANALYZE t
"""

OPTIONS = {
    "csv": CopyOptions(),
    "csv force_quote *": CopyOptions(force_quote=True),
    "csv force_quote id, header": CopyOptions(force_quote=("id",), header=True),
    "csv | ' \\ null": CopyOptions(delimiter="|", quote="'", escape="\\", null="NULL"),
    "csv delimiter -": CopyOptions(delimiter="-"),  # negative keys are quoted
    "csv delimiter 1, escape 2, force_quote *": CopyOptions(
        delimiter="1", escape="2", force_quote=True
    ),
    "text": CopyOptions(format="text"),
    "text delimiter -": CopyOptions(format="text", delimiter="-"),  # "\-5"
    "text | null": CopyOptions(format="text", delimiter="|", null="<null>"),
}


class Collect:
    """A destination that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data


def _chunks(
    runner: ChunkRunner, table: ResolvedTable, options: CopyOptions, rows: int, until: Any = None
) -> tuple[list[tuple[int, Any, bool]], bytes]:
    dest = Collect()
    outcomes: list[tuple[int, Any, bool]] = []
    after = None
    while True:
        chunk = Chunk(table, options, after, rows, header=after is None and options.header)
        chunk = dataclasses.replace(chunk, until=until)
        out = runner.run(chunk, dest)  # type: ignore[arg-type]
        outcomes.append((out.rows, out.last_key, out.final))
        if out.final:
            return outcomes, bytes(dest.data)
        after = out.last_key


@pytest.mark.parametrize("name", list(OPTIONS))
def test_last_keys_and_bytes_match_the_sibling(
    name: str, dsn: str, run_sql: Any, psql_csv: Any
) -> None:
    run_sql(dsn, TABLE)
    options = OPTIONS[name]
    with (
        psycopg.connect(dsn, autocommit=True) as main,
        psycopg.connect(dsn, autocommit=True) as side,
    ):
        table = introspect(main, "t", options=options)
        assert copy_key_index(table, options) == 1  # the key is the second column
        by_sibling = dataclasses.replace(table, key_types=("numeric",))
        assert copy_key_index(by_sibling, options) is None
        runner = ChunkRunner(main, io_timeout=30, side=side)
        sql_options = options.compose(header=options.header).as_string(main)[1:-1]
        expected = psql_csv(dsn, "SELECT * FROM t ORDER BY id", sql_options)
        for rows in (1, 13, 154, 200):  # 154 rows in all: one chunk exactly full, then none
            keyed, data = _chunks(runner, table, options, rows)
            assert (keyed, data) == _chunks(runner, by_sibling, options, rows)
            assert len(keyed) == 154 // rows + 1
            assert data == expected
            if rows == 1:  # the first and the last chunk's keys: the int64 extremes
                assert keyed[0][1] == (str(INT64_MIN),) and keyed[-2][1] == (str(INT64_MAX),)
        # a parallel worker's range: it ends at ``until``, inclusive
        ranged = _chunks(runner, table, options, 10, until=("-1",))
        assert ranged == _chunks(runner, by_sibling, options, 10, until=("-1",))
        assert ranged[0][-1][1] == ("-1",) and ranged[0][-1][2]
        # the whole table in one round trip (a small table's export): read from the last row,
        # with no query for it
        whole = Chunk(table, options, None, 0, header=options.header)
        assert _whole_statements(whole)[2] == -1
        assert _whole_statements(dataclasses.replace(whole, table=by_sibling))[2] >= 0
        assert _whole(runner, table, options) == _whole(runner, by_sibling, options)
        assert _whole(runner, table, options) == (154, (str(INT64_MAX),), expected)
        run_sql(dsn, "DELETE FROM t")  # no rows (a header, maybe): no key
        assert _whole(runner, table, options)[:2] == (0, None)


def _whole(
    runner: ChunkRunner, table: ResolvedTable, options: CopyOptions
) -> tuple[int, Any, bytes]:
    dest = Collect()
    chunk = Chunk(table, options, None, 0, header=options.header)
    out = runner.run_whole(chunk, dest)  # type: ignore[arg-type]
    assert out.final
    return out.rows, out.last_key, bytes(dest.data)


def test_small_keys_of_every_integer_type(dsn: str, run_sql: Any, psql_csv: Any) -> None:
    run_sql(
        dsn,
        "CREATE TABLE s (id smallint PRIMARY KEY, v text);"
        "INSERT INTO s SELECT g, g::text FROM generate_series(-32768, 32767, 97) g;"
        "CREATE TABLE i (v text, id integer PRIMARY KEY);"
        "INSERT INTO i SELECT g::text, g FROM generate_series(-2147483648, 2147483647, 9999991) g",
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        runner = ChunkRunner(conn, io_timeout=30)
        for name in ("s", "i"):
            table = introspect(conn, name)
            assert copy_key_index(table, CopyOptions()) is not None
            outcomes, data = _chunks(runner, table, CopyOptions(), 50)
            assert data == psql_csv(dsn, f"SELECT * FROM {name} ORDER BY id")
            total = len(data.splitlines())
            assert [r for r, _, _ in outcomes] == [50] * (total // 50) + [total % 50]
            last_row = data.splitlines()[-1].split(b",")
            assert outcomes[-1][1] == (last_row[0 if name == "s" else 1].decode(),)


def test_which_keys_are_read_from_the_row(dsn: str, run_sql: Any) -> None:
    run_sql(
        dsn,
        "CREATE DOMAIN posint AS int CHECK (VALUE > 0);"
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id numeric PRIMARY KEY);"
        "CREATE TABLE c (x int, y int, PRIMARY KEY (x, y)); CREATE TABLE d (id text PRIMARY KEY);"
        "CREATE TABLE e (id posint PRIMARY KEY); CREATE TABLE f (id int NOT NULL, v text)",
    )
    with psycopg.connect(dsn) as conn:
        a = introspect(conn, "a")
        assert copy_key_index(a, CopyOptions()) == 0
        assert copy_key_index(a, CopyOptions(format="text")) == 0
        assert copy_key_index(a, CopyOptions(format="parquet")) is None
        assert copy_key_index(introspect(conn, "a", columns=["v"]), CopyOptions()) is None
        assert copy_key_index(introspect(conn, "a", columns=["v", "id"]), CopyOptions()) == 1
        # a record is decoded with the connection's encoding: another ENCODING keeps the key first
        assert copy_key_index(a, CopyOptions(encoding="LATIN1")) == 0
        va = introspect(conn, "a", columns=["v", "id"])
        assert copy_key_index(va, CopyOptions(encoding="LATIN1")) is None
        assert copy_key_index(va, CopyOptions(format="text", null="\\x")) is None
        for name in "bcde":
            assert copy_key_index(introspect(conn, name), CopyOptions()) is None, name
        f = introspect(conn, "f", key=["id"])  # not provably unique
        assert copy_key_index(f, CopyOptions()) is None


def test_key_from_row() -> None:
    csv, text = CopyOptions(), CopyOptions(format="text")
    assert key_from_row(b"-42,x\n", 0, csv, "utf-8") == ("-42",)
    assert key_from_row(b'"a,""b\n",,"7"\n', 2, csv, "utf-8") == ("7",)
    assert key_from_row(b'"\\"",9\n', 1, CopyOptions(escape="\\"), "utf-8") == ("9",)
    assert key_from_row(b"a\\tb\t\\N\t12\n", 2, text, "utf-8") == ("12",)
    assert key_from_row(b"\\-12-x\n", 0, CopyOptions(format="text", delimiter="-"), "utf-8") == (
        "-12",
    )
    assert key_from_row("é,5\n".encode(), 1, csv, "utf-8") == ("5",)
    for bad in (b"1.5,x\n", b'"abc\n', b"x\n", b""):
        with pytest.raises(ChunkMismatch):
            key_from_row(bad, 0, csv, "utf-8")


def _copystream_backends(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'copystream' "
            "AND datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


@pytest.mark.parametrize(("key_type", "backends"), [("bigint", 1), ("text", 2)])
def test_sibling_only_for_keys_not_read_from_the_row(
    key_type: str, backends: int, dsn: str, run_sql: Any, psql_csv: Any, tmp_path: Path
) -> None:
    run_sql(
        dsn,
        f"CREATE TABLE t (id {key_type} PRIMARY KEY, v text);"
        "INSERT INTO t SELECT lpad(g::text, 6, '0')::" + key_type + ", repeat(md5(g::text), 3) "
        "FROM generate_series(1, 40000) g; ANALYZE t",
    )
    seen: list[int] = []

    def look(p: Progress) -> None:  # about once per MiB, from inside a chunk's COPY
        if not p.done and len(seen) < 3:
            seen.append(_copystream_backends(dsn))
            time.sleep(0.01)

    out = tmp_path / "t.csv"
    copystream.export_table(dsn, "t", out, chunk_rows=20000, progress=look)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert seen and set(seen) == {backends}, seen
