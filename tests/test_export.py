"""End to end: the exported file is byte for byte what the real psql ``\\copy`` writes.

Every test exports from the real test server and compares with ``psql_csv`` (psql's own
``\\copy (SELECT ... ORDER BY key) TO STDOUT WITH (FORMAT csv)``), at chunk sizes small enough
that chunk boundaries fall everywhere, and checks the result, the manifest and the files left
beside the output.
"""

from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import checkpoint_file, manifest_file, read_manifest, xxh

import copystream
from copystream import Progress, export_table

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

PINNED = {
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "extra_float_digits",
    "bytea_output",
    "client_encoding",
    "search_path",
}

# -- the awkward table ------------------------------------------------------------------------

AWKWARD_DDL = """
CREATE TABLE t (
    id int PRIMARY KEY,
    txt text, vc varchar(30), ch char(4),
    ba bytea, js json, jb jsonb,
    ai int[], at text[],
    tstz timestamptz, ts timestamp, d date, iv interval, tm time,
    num numeric, f8 float8, f4 real,
    b bool, u uuid, big bigint
);
"""

#: (column, SQL literal): one row each, every other column NULL.
AWKWARD_VALUES: list[tuple[str, str]] = [
    ("txt", "NULL"),
    ("txt", "''"),
    ("txt", "' '"),
    ("txt", "'\"'"),
    ("txt", "'say \"hi\", please'"),
    ("txt", "'a,b,c'"),
    ("txt", "E'cr\\rinside'"),
    ("txt", "E'lf\\ninside'"),
    ("txt", "E'crlf\\r\\ninside'"),
    ("txt", "E'\\r'"),
    ("txt", "E'\\n'"),
    ("txt", "E'trailing\\n'"),
    ("txt", "'back\\slash'"),
    ("txt", "'\\'"),
    ("txt", "'\\.'"),
    ("txt", "E'\\\\.\\n'"),
    ("txt", "'\\N'"),
    ("txt", "'NULL'"),
    ("txt", "E'tab\\there'"),
    ("txt", "'  leading and trailing  '"),
    ("txt", "'héllo wörld — ﬁ ß'"),
    ("txt", "'日本語のテキスト'"),
    ("txt", "'emoji 😀🎉 👩‍👩‍👧 zwj'"),
    ("txt", "E'\\u00e9 vs e\\u0301'"),
    ("txt", "'#;=@!$%^&*(){}[]|<>?/~`'"),
    ("vc", "'\"\"'"),
    ("vc", "','"),
    ("ch", "'a'"),
    ("ch", "''"),
    ("ba", "''::bytea"),
    ("ba", "'\\x00'::bytea"),
    ("ba", "'\\xdeadbeef00ff0a0d2c22'::bytea"),
    ("ba", "convert_to('x,\"y\"', 'UTF8')"),
    ("js", '\'{"a": [1, 2, "x,y"],   "b" : "q\\"uote"}\''),
    ("js", "'\"just a string\"'"),
    ("js", "'null'"),
    ("jb", '\'{"b": 1, "a": "\\u00e9\\n", "c": [null, true, 1.50]}\''),
    ("jb", "'[]'"),
    ("ai", "'{1,NULL,3}'"),
    ("ai", "'{}'"),
    ("ai", "'{{1,2},{3,NULL}}'"),
    ("at", "ARRAY['a,b', NULL, 'NULL', '', 'quo\"te', E'new\\nline', 'back\\slash']"),
    ("tstz", "'2024-02-29 12:34:56.789012+05:30'"),
    ("tstz", "'infinity'"),
    ("tstz", "'-infinity'"),
    ("tstz", "'0044-03-15 12:00:00+00 BC'"),
    ("tstz", "'1900-01-01 00:00:00 Europe/Amsterdam'"),
    ("ts", "'1999-12-31 23:59:59.999999'"),
    ("ts", "'infinity'"),
    ("d", "'infinity'"),
    ("d", "'-infinity'"),
    ("d", "'2000-02-29'"),
    ("d", "'4713-01-01 BC'"),
    ("iv", "'1 year 2 mons 3 days 04:05:06.789'"),
    ("iv", "'-1 day +02:00'"),
    ("iv", "'0'"),
    ("tm", "'24:00:00'"),
    ("num", "'NaN'"),
    ("num", "'12345678901234567890123456789012345678901234567890.0000000000000000000000000001'"),
    ("num", "'-0.00000000000000000000000000000000000001'"),
    ("num", "'1e300'::numeric"),
    ("num", "'0.10'"),
    ("f8", "'NaN'"),
    ("f8", "'Infinity'"),
    ("f8", "'-Infinity'"),
    ("f8", "'-0'"),
    ("f8", "1.0/3"),
    ("f8", "'4.9e-324'"),
    ("f8", "'1.7976931348623157e308'"),
    ("f8", "0.1"),
    ("f4", "'-0'"),
    ("f4", "'NaN'"),
    ("f4", "'3.4028235e38'"),
    ("f4", "'1.1'"),
    ("b", "true"),
    ("b", "false"),
    ("u", "'00000000-0000-0000-0000-000000000000'"),
    ("u", "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'"),
    ("big", "-9223372036854775808"),
    ("big", "9223372036854775807"),
]


def make_awkward_table(dsn: str, run_sql: RunSql) -> int:
    """Create ``t``: one row per awkward value, a row of all NULLs, a full row and a 1.5 MB row.

    Returns the number of rows. Ids have gaps and are inserted out of order.
    """
    server = int(run_sql(dsn, "SHOW server_version_num")[0][0])
    values = list(AWKWARD_VALUES)
    if server >= 140000:  # numeric infinity exists from PostgreSQL 14
        values += [("num", "'Infinity'"), ("num", "'-Infinity'")]
    if server >= 170000:  # interval infinity exists from PostgreSQL 17
        values += [("iv", "'infinity'"), ("iv", "'-infinity'")]
    stmts = [AWKWARD_DDL]
    ids = [1000 - 7 * i for i in range(len(values))]  # descending, gaps: insertion order != key
    for i, (col, lit) in enumerate(values):
        stmts.append(f"INSERT INTO t (id, {col}) VALUES ({ids[i]}, {lit});")
    stmts.append("INSERT INTO t (id) VALUES (-5);")  # every column NULL
    stmts.append(
        """INSERT INTO t VALUES (0, E'all,\\n"cols"', 'v', 'abcd', '\\x0102', '[1]',
           '{"k": "v"}', '{7}', '{"x y"}', '2001-02-03 04:05:06+07', '2001-02-03 04:05:06',
           '2001-02-03', '1 second', '12:00', 3.14, 2.5, 1.5, true,
           'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', 42);"""
    )
    # one row longer than the runner's 1 MiB write buffer, with quotes and newlines to escape
    stmts.append("INSERT INTO t (id, txt) VALUES (5000, repeat(E'x,\"y\"\\r\\n', 150000));")
    stmts.append("ANALYZE t;")
    run_sql(dsn, "\n".join(stmts))
    return len(values) + 3


def check_result_and_manifest(
    out: Path,
    result: copystream.ExportResult,
    *,
    rows: int,
    table: str = "public.t",
    key: list[str] | None = None,
    key_text: list[tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """The result and the manifest describe the file exactly; no checkpoint is left.

    ``key_text``: every row's key as PostgreSQL's text form, in key order, to check each chunk's
    last_key.
    """
    data = out.read_bytes()
    digest = xxh(data)
    assert result.rows == rows
    assert result.bytes == len(data)
    assert result.xxh3_128 == digest
    assert sum(c.rows for c in result.chunks) == rows
    assert sum(c.bytes for c in result.chunks) == len(data)
    assert not result.already_complete
    assert not checkpoint_file(out).exists()
    assert stat.S_IMODE(manifest_file(out).stat().st_mode) == 0o600

    m = read_manifest(out)
    assert m["version"] == 1
    assert m["kind"] == "copystream-manifest"
    assert m["table"] == table
    if key is not None:
        assert m["key"] == key
    assert m["where"] is None
    assert m["rows"] == rows
    assert m["bytes"] == len(data)
    assert m["xxh3_128"] == digest
    assert set(m["settings"]) == PINNED
    assert all(isinstance(v, str) and v for v in m["settings"].values())
    started = datetime.fromisoformat(m["started_at"])
    finished = datetime.fromisoformat(m["finished_at"])
    assert started.tzinfo is not None
    assert started <= finished
    assert m["seconds"] >= 0
    assert m["resumed"] is False

    offset = done = 0
    for i, c in enumerate(m["chunks"]):
        assert c["index"] == i
        assert c["offset"] == offset
        assert c["xxh3_128"] == xxh(data[offset : offset + c["bytes"]])
        offset += c["bytes"]
        done += c["rows"]
        if key_text is not None and c["rows"]:
            assert tuple(c["last_key"]) == key_text[done - 1], f"chunk {i}"
    assert offset == len(data)
    assert done == rows
    assert [c.to_json() for c in result.chunks] == m["chunks"]
    return m


def key_texts(dsn: str, run_sql: RunSql, keys: str, table: str = "t") -> list[tuple[str, ...]]:
    cols = ", ".join(f"{k}::text AS k{i}" for i, k in enumerate(keys.split(", ")))
    return [tuple(r) for r in run_sql(dsn, f"SELECT {cols} FROM {table} ORDER BY {keys}")]


# -- byte identity ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_rows", [1, 2, 7, 1000, None], ids=lambda n: f"chunk={n}")
def test_awkward_values_byte_identical(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, chunk_rows: int | None
) -> None:
    rows = make_awkward_table(dsn, run_sql)
    keys = key_texts(dsn, run_sql, "id")
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert expected.count(b"\n") > rows  # the reference really has embedded newlines
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=chunk_rows)
    assert out.read_bytes() == expected
    m = check_result_and_manifest(out, result, rows=rows, key=["id"], key_text=keys)
    if chunk_rows is not None:
        assert len(m["chunks"]) == -(-rows // chunk_rows)
        assert all(c["rows"] <= chunk_rows for c in m["chunks"])
    assert m["columns"] == [
        "id", "txt", "vc", "ch", "ba", "js", "jb", "ai", "at", "tstz", "ts", "d", "iv", "tm",
        "num", "f8", "f4", "b", "u", "big",
    ]  # fmt: skip

    expected_h = psql_csv(dsn, "SELECT * FROM t ORDER BY id", "FORMAT csv, HEADER true")
    out_h = tmp_path / "t_header.csv"
    result_h = export_table(dsn, "t", out_h, chunk_rows=chunk_rows, header=True)
    assert out_h.read_bytes() == expected_h
    assert expected_h.startswith(b"id,txt,vc,ch,ba,")
    m_h = check_result_and_manifest(out_h, result_h, rows=rows, key=["id"], key_text=keys)
    assert m_h["options"]["header"] is True


def test_cli_export_byte_identical(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The command writes psql's bytes too."""
    make_awkward_table(dsn, run_sql)
    out = tmp_path / "cli.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "copystream", "export", "t", str(out), "--dsn", dsn,
         "--chunk-rows", "3", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")


# -- keys other than an integer ---------------------------------------------------------------

TEXT_KEYS = [
    "", " ", "a", "A", "aa", "a b", "a,b", 'quo"te', "new\nline", "cr\rx", "\\N", "\\.", "é",
    "e\u0301", "😀", "Z", "z", "10", "9", "~", "tab\tx", "日本",
]  # fmt: skip


def _sql_text(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


@pytest.mark.parametrize("chunk_rows", [1, 2, 5])
def test_text_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, chunk_rows: int
) -> None:
    values = ", ".join(f"({_sql_text(k)}, {i})" for i, k in enumerate(TEXT_KEYS))
    run_sql(dsn, f"CREATE TABLE t (k text PRIMARY KEY, n int); INSERT INTO t VALUES {values};")
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=chunk_rows)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY k")
    check_result_and_manifest(
        out, result, rows=len(TEXT_KEYS), key=["k"], key_text=key_texts(dsn, run_sql, "k")
    )


@pytest.mark.needs_icu
def test_text_key_with_icu_collation(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A linguistic collation orders keys differently from bytes; paging must follow it."""
    values = ", ".join(f"({_sql_text(k)}, {i})" for i, k in enumerate(TEXT_KEYS))
    run_sql(
        dsn,
        f"""CREATE TABLE t (k text COLLATE "und-x-icu" PRIMARY KEY, n int);
            INSERT INTO t VALUES {values};""",
    )
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY k")
    assert expected != psql_csv(dsn, 'SELECT * FROM t ORDER BY k COLLATE "C"')
    out = tmp_path / "t.csv"
    export_table(dsn, "t", out, chunk_rows=2)
    assert out.read_bytes() == expected


@pytest.mark.parametrize("chunk_rows", [1, 3])
def test_uuid_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, chunk_rows: int
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (u uuid PRIMARY KEY, n int);
           INSERT INTO t SELECT md5(g::text)::uuid, g FROM generate_series(1, 40) g;
           INSERT INTO t VALUES ('00000000-0000-0000-0000-000000000000', 0),
                                ('ffffffff-ffff-ffff-ffff-ffffffffffff', -1);""",
    )
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=chunk_rows)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY u")
    check_result_and_manifest(out, result, rows=42, key_text=key_texts(dsn, run_sql, "u"))


TSTZ_TABLE = """
CREATE TABLE t (k timestamptz PRIMARY KEY, n int);
INSERT INTO t SELECT timestamptz '2024-03-30 22:00:00.5+00' + g * interval '23 min 7.000001 s', g
    FROM generate_series(1, 40) g;  -- crosses the European DST change, microseconds
INSERT INTO t VALUES ('infinity', -1), ('-infinity', -2), ('0044-03-15 10:00:00+00 BC', -3),
    ('1900-01-01 00:00:00+00', -4), ('2024-10-27 00:30:00+00', -5), ('2024-10-27 01:30:00+00', -6);
"""


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"PGTZ": "Asia/Kolkata", "PGDATESTYLE": "SQL, DMY"},
        {"PGTZ": "Europe/London", "PGDATESTYLE": "Postgres, MDY"},
        {"PGTZ": "America/Sao_Paulo", "PGDATESTYLE": "German"},
    ],
    ids=["default", "kolkata-sql", "london-postgres", "saopaulo-german"],
)
def test_timestamptz_key(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
) -> None:
    """Key text must page exactly whatever the DateStyle and time zone.

    Under DateStyle SQL with TimeZone Asia/Kolkata the key's text ends in "IST", which
    PostgreSQL reads back as Israel time: paging by that text skipped rows.
    """
    run_sql(dsn, TSTZ_TABLE)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=1)
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY k", env=env)
    assert out.read_bytes() == expected
    check_result_and_manifest(out, result, rows=46)
    if env:
        assert read_manifest(out)["settings"]["TimeZone"] == env["PGTZ"]
        assert expected != psql_csv(dsn, "SELECT * FROM t ORDER BY k", env={"PGTZ": "UTC"})


@pytest.mark.parametrize("chunk_rows", [1, 2, 3])
def test_composite_primary_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, chunk_rows: int
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (a text, b int, v text, PRIMARY KEY (a, b));
           INSERT INTO t SELECT chr(97 + g % 4) || CASE WHEN g % 5 = 0 THEN ',x' ELSE '' END,
                                g % 7 - 3, 'v' || g
               FROM generate_series(1, 60) g ON CONFLICT DO NOTHING;""",
    )
    n = int(run_sql(dsn, "SELECT count(*) FROM t")[0][0])
    assert n > 20
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=chunk_rows)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY a, b")
    check_result_and_manifest(
        out, result, rows=n, key=["a", "b"], key_text=key_texts(dsn, run_sql, "a, b")
    )


@pytest.mark.parametrize("chunk_rows", [1, 4])
def test_other_key_types(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, chunk_rows: int
) -> None:
    """float8, numeric, date and timestamp keys (text forms that must round-trip)."""
    run_sql(
        dsn,
        """CREATE TABLE f (k float8 PRIMARY KEY, n int);
           INSERT INTO f SELECT 1.0 / g, g FROM generate_series(1, 30) g;
           INSERT INTO f VALUES ('NaN', 0), ('Infinity', -1), ('-Infinity', -2), (5e-324, -3),
                                (0.1::float8 + 0.2::float8, -4), (0.3, -5);
           CREATE TABLE nm (k numeric PRIMARY KEY, n int);
           INSERT INTO nm SELECT g / 7.0, g FROM generate_series(-10, 20) g;
           INSERT INTO nm VALUES ('NaN', 100), (1e-40, 101), (1e40, 102);
           CREATE TABLE dt (k date PRIMARY KEY, n int);
           INSERT INTO dt SELECT date '2000-01-01' + g * 17, g FROM generate_series(1, 30) g;
           INSERT INTO dt VALUES ('infinity', -1), ('-infinity', -2), ('0001-01-01 BC', -3);
           CREATE TABLE ts (k timestamp(3) PRIMARY KEY, n int);
           INSERT INTO ts SELECT timestamp '2000-01-01' + g * interval '1.001 s', g
               FROM generate_series(1, 30) g;""",
    )
    for table in ("f", "nm", "dt", "ts"):
        out = tmp_path / f"{table}.csv"
        export_table(dsn, table, out, chunk_rows=chunk_rows)
        assert out.read_bytes() == psql_csv(dsn, f"SELECT * FROM {table} ORDER BY k"), table


def test_unique_not_null_index_used_without_primary_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (v text, code text NOT NULL, maybe int);
           CREATE UNIQUE INDEX t_a_maybe ON t (maybe);  -- sorts first, but nullable
           CREATE UNIQUE INDEX t_code ON t (code);
           INSERT INTO t SELECT 'v' || g, lpad((g * 37 % 101)::text, 3, '0'), NULLIF(g % 9, 0)
               FROM generate_series(1, 8) g;""",
    )
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=3)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY code")
    m = check_result_and_manifest(out, result, rows=8, key=["code"])
    assert m["key_source"] == "unique index t_code"
    assert result.key == ("code",)


def test_quoted_names_and_header(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    table = '"My Schema"."Odd, Table"'
    run_sql(
        dsn,
        f"""CREATE SCHEMA "My Schema";
            CREATE TABLE {table} ("Key ""Q"" " int PRIMARY KEY, "a,b" text, "Ünï" text);
            INSERT INTO {table} SELECT g, 'x' || g, 'ü' FROM generate_series(1, 9) g;""",
    )
    out = tmp_path / "odd.csv"
    result = export_table(dsn, table, out, chunk_rows=2, header=True)
    expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY 1", "FORMAT csv, HEADER")
    assert expected.startswith(b'"Key ""Q"" ","a,b",\xc3\x9cn\xc3\xaf\n1,x1,')
    assert out.read_bytes() == expected
    check_result_and_manifest(out, result, rows=9, table=table)


# -- tiny tables ------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [False, True], ids=["plain", "header"])
@pytest.mark.parametrize("chunk_rows", [1, None], ids=["chunk=1", "adaptive"])
def test_empty_and_single_row_tables(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    header: bool,
    chunk_rows: int | None,
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE empty (id int PRIMARY KEY, v text);
           CREATE TABLE one (id int PRIMARY KEY, v text);
           INSERT INTO one VALUES (7, E'only\\nrow');""",
    )
    options = "FORMAT csv, HEADER true" if header else "FORMAT csv"
    for table, rows in (("empty", 0), ("one", 1)):
        out = tmp_path / f"{table}.csv"
        result = export_table(dsn, table, out, chunk_rows=chunk_rows, header=header)
        expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY id", options)
        assert out.read_bytes() == expected
        if not header and rows == 0:
            assert expected == b""
        m = check_result_and_manifest(out, result, rows=rows, table=f"public.{table}")
        if rows == 1:
            assert [c["last_key"] for c in m["chunks"] if c["rows"]] == [["7"]]


def test_result_report_json_and_summary_fields(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    """ExportResult.to_json (the --report file) agrees with the manifest."""
    make_awkward_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=10)
    report = json.loads(json.dumps(result.to_json()))
    m = read_manifest(out)
    assert report["rows"] == m["rows"] == result.rows
    assert report["bytes"] == m["bytes"] == os.path.getsize(out)
    assert report["xxh3_128"] == m["xxh3_128"]
    assert report["chunks"] == len(m["chunks"])
    assert report["key"] == ["id"] and report["key_source"] == "primary key"
    assert report["resumed"] is False and report["already_complete"] is False
    assert result.peak_rss > 0


# -- progress callback ------------------------------------------------------------------------


def test_progress_callback(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (id int PRIMARY KEY, v text);
           INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g;
           ANALYZE t;""",
    )
    events: list[Progress] = []
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, chunk_rows=3000, progress=events.append)
    assert len(events) >= 7  # at least one per chunk, and the final one
    assert [e.done for e in events].count(True) == 1
    final = events[-1]
    assert final.done
    assert final.rows == result.rows == 20000
    assert final.bytes == result.bytes == out.stat().st_size
    assert final.chunks == len(result.chunks) == 7
    assert final.table == "public.t"
    assert final.estimated_rows == 20000
    for before, after in itertools.pairwise(events):
        assert after.rows >= before.rows
        assert after.bytes >= before.bytes
        assert after.chunks >= before.chunks
        assert after.elapsed >= before.elapsed
    assert len({e.rows for e in events}) >= 7  # it really moves
    assert all(0 < e.bytes <= result.bytes for e in events)
