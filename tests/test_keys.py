"""Coverage: every kind of key pages the table exactly, at every chunk boundary, and resumes.

Each key type is exported at chunk sizes 1 to 7 (a boundary after every row, and every
remainder), in one COPY and adaptively; the reference is psql's ``ORDER BY key`` output under
the same session settings. An export interrupted after its second chunk checkpoints a
``last_key`` that must parse back to exactly the row it came from, and the resumed file must
still be byte-identical. Non-unique keys (``--key`` with ties) lose and repeat nothing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import copystream
from copystream import KeyProblem, Progress, export_table

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

CHUNK_SIZES: tuple[int | None, ...] = (1, 2, 3, 4, 5, 6, 7, 0, None)


@dataclass(frozen=True)
class KeyCase:
    id: str
    type: str  # SQL type of the key column
    values: tuple[str, ...]  # SQL literals (duplicates under the type's equality are dropped)
    pgoptions: str | None = None  # session settings of the export and of psql
    ddl: str = ""  # run first (types, collations)


def _series(expr: str, n: int) -> tuple[str, ...]:
    return tuple(expr.format(g=g) for g in range(1, n + 1))


# fmt: off
KEY_CASES = [
    KeyCase("smallint", "smallint", ("-32768", "32767", "0", "-1", "1", *_series("{g}0", 12))),
    KeyCase(
        "bigint",
        "bigint",
        ("-9223372036854775808", "9223372036854775807", "0", *_series("{g}000000007", 12)),
    ),
    KeyCase(
        "numeric",
        "numeric",
        (
            "1.10", "1.1001", "2.200", "0.000001", "-0.5", "1e-20", "'1e20'", "'NaN'",
            "'Infinity'", "'-Infinity'", "3", "3.000000001", "'-0.000'", "'" + "9" * 300 + "'",
            "'0." + "0" * 500 + "1'", "1.1",  # equal to 1.10: dropped
        ),
    ),
    KeyCase(
        "text-C",
        'text COLLATE "C"',
        (
            "'a'", "'B'", "'b'", "'A'", "'é'", "'e'", "'z'", "'Z'", "'10'", "'9'", "'~'",
            "' '", "''", "'a b'", "'ab'", "E'a\\nb'", "'😀'", "'日本'",
        ),
    ),
    KeyCase(
        "text-icu-numeric",
        'text COLLATE "en-u-kn-x-icu"',
        ("'a10'", "'a9'", "'a100'", "'A9'", "'b1'", "'é'", "'e'", "'E'", "'z'", "'-1'", "'1'"),
        ddl="CREATE COLLATION \"en-u-kn-x-icu\" (provider = icu, locale = 'en-u-kn');",
    ),
    KeyCase(
        "text-icu-nondeterministic",
        "text COLLATE ci",
        (
            "'a'", "'B'", "'c'", "'D'", "'é'", "'e'", "'Z'", "'y'", "'A'", "'b'", "'Ä'",
            "'10'", "'9'", "' x'",
        ),  # 'A' and 'b' equal 'a' and 'B' under ci: dropped
        ddl="CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', "
        "deterministic = false);",
    ),
    KeyCase("varchar", "varchar(12)", ("'b'", "'a,b'", "'a\"b'", "'A'", "''", "'  '", "'zz'")),
    KeyCase(
        "uuid",
        "uuid",
        ("'00000000-0000-0000-0000-000000000000'", "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
         *_series("md5('{g}')::uuid", 10)),
    ),
    KeyCase(
        "date",
        "date",
        ("'infinity'", "'-infinity'", "'4713-01-01 BC'", "'0001-12-31 BC'", "'2000-02-29'",
         *_series("date '2024-01-01' + {g} * 37", 10)),
        pgoptions="-c DateStyle=SQL,DMY",
    ),
    KeyCase(
        "timestamp",
        "timestamp",
        (
            "'infinity'", "'-infinity'", "'0044-03-15 12:00:00 BC'",
            "'2024-10-27 01:30:00'", "'2024-10-27 01:30:00.000001'",
            "'2024-10-27 01:30:00.000002'", "'2024-10-27 01:29:59.999999'",
            *_series("timestamp '2024-03-31 00:00' + {g} * interval '17 min 0.000003 s'", 8),
        ),
        pgoptions="-c DateStyle=Postgres,DMY",
    ),
    KeyCase(
        "timestamptz-dublin",
        "timestamptz",
        (
            "'infinity'", "'-infinity'", "'0044-03-15 12:00:00+00 BC'",
            "'1916-10-01 02:25:20+00'", "'2024-10-27 00:59:59.999999+00'",
            "'2024-10-27 01:00:00+00'", "'2024-10-27 01:00:00.000001+00'",
            "'2024-10-27 01:30:00+01'", "'2024-10-27 01:30:00+00'",
            *_series("timestamptz '2024-10-26 23:50+00' + {g} * interval '7 min 0.000001 s'", 14),
            *_series("timestamptz '2024-03-31 00:50+00' + {g} * interval '9 min'", 5),
        ),
        # Summer time in Dublin is "IST", which PostgreSQL reads as Israel time (+02).
        pgoptions="-c TimeZone=Europe/Dublin -c DateStyle=SQL,DMY",
    ),
    KeyCase(
        "timestamptz-havana",
        "timestamptz",
        (
            *_series("timestamptz '2024-11-03 03:30+00' + {g} * interval '11 min 0.000001 s'", 14),
            *_series("timestamptz '2024-03-10 04:30+00' + {g} * interval '13 min'", 6),
        ),
        # Cuba's "CST"/"CDT" are read as US Central (-06/-05); the fall-back hour repeats.
        pgoptions="-c TimeZone=America/Havana -c DateStyle=Postgres,MDY",
    ),
    KeyCase(
        "interval",
        "interval",
        ("'-1 days +02:00'", "'1 day -02:00'", "'1 mon'", "'30 days'", "'-00:00:00.000001'",
         "'178000000 years'", "'0'", "'1 year -1 mon'", "'25:00'", "'1 day 1 hour'"),
        pgoptions="-c IntervalStyle=sql_standard",
    ),
    KeyCase(
        "bytea",
        "bytea",
        ("''", "'\\x00'", "'\\x0000'", "'\\x5c'", "'\\xff'", "'\\x7f'", "'abc'",
         "'\\x0a0d2c22'", "'\\x5c7830'", "'\\x0001'"),
    ),
    KeyCase(
        "bytea-escape",
        "bytea",
        ("''", "'\\x00'", "'\\x0000'", "'\\x5c'", "'\\xff'", "'\\x5c5c'", "'abc'", "'\\x5c783030'"),
        pgoptions="-c bytea_output=escape",
    ),
    KeyCase(
        "float8",
        "float8",
        (
            "0.1", "1.0 / 3", "1e-300", "5e-324", "-5e-324", "0.1::float8 + 0.2::float8", "0.3",
            "'NaN'", "'Infinity'", "'-Infinity'", "1.7976931348623157e308", "2.0 ^ 53",
            "2.0 ^ 53 + 1", "1.0 / 7", "'-0'", "'0'", "1e15 + 0.3",
        ),
        pgoptions="-c extra_float_digits=0",  # 15 digits: 0.1 + 0.2 would print as 0.3
    ),
    KeyCase(
        "real",
        "real",
        ("0.1", "1.0 / 3", "'1.4e-45'", "'NaN'", "16777216", "16777217", "'3.4028235e38'",
         "0.3", "0.1::real + 0.2::real", "1.0 / 7"),
        pgoptions="-c extra_float_digits=-2",
    ),
    KeyCase(
        "enum",
        "ord",
        ("'zeta'", "'alpha'", "'Mid'", "'q\"uote,d'", "'back\\slash'", "'first'", "' '"),
        ddl="CREATE TYPE ord AS ENUM "
        "('first', 'zeta', 'q\"uote,d', 'alpha', ' ', 'Mid', 'back\\slash');",
    ),
    KeyCase(
        "inet",
        "inet",
        ("'10.0.0.1'", "'10.0.0.1/8'", "'10.0.0.0/8'", "'::1'", "'192.168.0.1/32'", "'0.0.0.0/0'"),
    ),
    KeyCase(
        "money",
        "money",
        ("'1234.5'", "'-0.01'", "'0'", "'-92233720368547758.08'", "'7'", "'1,000,000.99'"),
    ),
    KeyCase(
        "domain-timestamptz",
        "tsd",
        _series("timestamptz '2024-03-30 22:00:00.5+00' + {g} * interval '23 min 7.000001 s'", 20),
        pgoptions="-c TimeZone=Asia/Kolkata -c DateStyle=SQL,DMY",
        ddl="CREATE DOMAIN tsd AS timestamptz CHECK (VALUE > '2000-01-01');",
    ),
    KeyCase(
        "domain-float8",
        "f8d",
        ("0.1::float8 + 0.2::float8", "0.3", *_series("1.0 / {g}", 12)),
        pgoptions="-c extra_float_digits=0",
        ddl="CREATE DOMAIN f8d AS float8 NOT NULL;",
    ),
    KeyCase(
        "tstzrange",
        "tstzrange",
        ("'empty'", "'(,)'", "'[2024-10-27 00:30+00,2024-10-27 01:30+00)'",
         "'[2024-10-27 00:30+00,2024-10-27 01:30:00.000001+00)'",
         "'[2024-06-01 00:30+00,)'", "'(2024-01-01 00:00+00,2024-01-02 00:00+00]'",
         "'[-infinity,infinity]'", "'[2024-10-27 00:30+00,2024-10-27 01:30:00.000002+00)'"),
        pgoptions="-c TimeZone=Europe/Dublin -c DateStyle=SQL,DMY",
    ),
]
# fmt: on


def _pgoptions_env(case: KeyCase) -> dict[str, str]:
    return {"PGOPTIONS": case.pgoptions} if case.pgoptions else {}


def _conninfo(dsn: str, pgoptions: str | None) -> str:
    return f"{dsn} options='{pgoptions}'" if pgoptions else dsn


class RunawayExport(BaseException):
    """The export wrote far more than psql: it is repeating chunks (a key that does not
    round-trip pages from the same place again and again). Fails the test instead of hanging."""


def _guard(expected: bytes, stop_after: int | None = None) -> Callable[[Progress], None]:
    """A progress callback that stops a runaway export, and interrupts one after
    ``stop_after`` committed chunks if given."""
    limit = 2 * len(expected) + 4096

    def cb(p: Progress) -> None:
        if p.bytes > limit:
            raise RunawayExport(f"{p.bytes} bytes written; psql wrote {len(expected)}")
        if stop_after is not None and p.chunks >= stop_after and not p.done:
            raise KeyboardInterrupt

    return cb


def _checkpoint(out: Path) -> dict[str, Any]:
    return dict(json.loads(out.with_name(out.name + ".checkpoint.json").read_bytes()))


def _manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads(out.with_name(out.name + ".manifest.json").read_bytes()))


def _key_row_count(
    conninfo: str, table: str, key: tuple[str, ...], last_key: list[str], op: str
) -> int:
    """Rows whose key compares ``op`` to the checkpoint's ``last_key`` text, parsed back."""
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in key)
    lits = sql.SQL(", ").join(sql.Literal(v) for v in last_key)
    query = sql.SQL("SELECT count(*) FROM {} WHERE ROW({}) {} ROW({})").format(
        sql.Identifier(table), cols, sql.SQL(op), lits
    )
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return int(row[0])


def _interrupt_and_resume(
    conninfo: str,
    table: str,
    out: Path,
    expected: bytes,
    *,
    chunk_rows: int,
    key: tuple[str, ...],
    explicit_key: bool = False,
    unique: bool = True,
) -> dict[str, Any]:
    """Interrupt after two chunks, check the checkpoint's last_key, resume, compare."""
    kw: dict[str, Any] = {"key": list(key)} if explicit_key else {}
    with pytest.raises(KeyboardInterrupt):
        export_table(
            conninfo, table, out, chunk_rows=chunk_rows, progress=_guard(expected, 2), **kw
        )
    cp = _checkpoint(out)
    assert len(cp["chunks"]) == 2 and not cp["finished"]
    assert json.loads(json.dumps(cp["last_key"])) == cp["last_key"]
    # The key text parses back to exactly the boundary: every row written so far is <= it,
    # and (for a unique key) exactly one row equals it.
    assert _key_row_count(conninfo, table, key, cp["last_key"], "<=") == cp["rows"]
    if unique:
        assert cp["rows"] == 2 * chunk_rows
        assert _key_row_count(conninfo, table, key, cp["last_key"], "=") == 1
    assert out.stat().st_size > cp["offset"]  # the third chunk's uncommitted bytes: cut on resume
    result = export_table(
        conninfo, table, out, chunk_rows=chunk_rows, progress=_guard(expected), **kw
    )
    assert result.resumed
    assert out.read_bytes() == expected
    copystream.verify_file(out)
    return cp


# -- single-column keys of every type ---------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, id=c.id, marks=[pytest.mark.needs_icu] if "icu" in c.id else [])
     for c in KEY_CASES],
)  # fmt: skip
def test_key_type_pages_exactly(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, case: KeyCase,
    server_version: int,
) -> None:
    literals = [v for v in case.values  # numeric infinity exists from PostgreSQL 14
                if not (case.type == "numeric" and "Infinity" in v and server_version < 140000)]
    values = ", ".join(f"(({v})::{case.type}, {i})" for i, v in enumerate(literals))
    run_sql(
        dsn,
        f"""{case.ddl}
            CREATE TABLE t (k {case.type} PRIMARY KEY, n int NOT NULL, v text);
            INSERT INTO t (k, n) VALUES {values} ON CONFLICT DO NOTHING;
            UPDATE t SET v = 'row ' || n || ', "' || k::text || '"';""",
    )
    rows = int(run_sql(dsn, "SELECT count(*) FROM t")[0][0])
    assert rows >= 6
    env = _pgoptions_env(case)
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY k", env=env)
    assert expected.count(b"\n") >= rows
    conninfo = _conninfo(dsn, case.pgoptions)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        # the key's text as copystream pages by it: ISO dates, every float digit
        conn.execute("SET DateStyle = ISO")
        conn.execute("SET extra_float_digits = 3")
        key_texts = [str(r[0]) for r in conn.execute("SELECT k::text FROM t ORDER BY t.k")]
    for chunk_rows in CHUNK_SIZES:
        out = tmp_path / f"t-{chunk_rows}.csv"
        result = export_table(conninfo, "t", out, chunk_rows=chunk_rows, progress=_guard(expected))
        assert out.read_bytes() == expected, f"chunk_rows={chunk_rows}"
        assert result.rows == rows
        m = _manifest(out)
        assert m["key"] == ["k"] and m["key_source"] == "primary key"
        if chunk_rows:
            done = 0
            for c in m["chunks"]:
                done += c["rows"]
                assert c["last_key"] == [key_texts[done - 1]], (chunk_rows, c)
            assert len(m["chunks"]) == -(-rows // chunk_rows)
    _interrupt_and_resume(
        conninfo, "t", tmp_path / "resumed.csv", expected, chunk_rows=2, key=("k",)
    )


# -- composite keys ---------------------------------------------------------------------------

COMPOSITE_TABLES = {
    "pair": """
        CREATE TABLE pair (a text, b int, v text, PRIMARY KEY (a, b));
        INSERT INTO pair SELECT chr(65 + g % 3 * 32) || CASE WHEN g % 4 = 0 THEN ',"q"' ELSE ''
                                END, g % 5 - 2, 'v' || g
            FROM generate_series(1, 40) g ON CONFLICT DO NOTHING;""",
    "triple": """
        CREATE TABLE triple (region text COLLATE "und-x-icu", day date, seq bigint,
                             amount numeric, PRIMARY KEY (day, region, seq));
        INSERT INTO triple SELECT (ARRAY['b', 'B', 'a', 'é', 'e'])[1 + g % 5],
                                  date '2024-01-30' + g % 3, g % 4 - 9223372036854775807,
                                  g / 3.0
            FROM generate_series(1, 60) g ON CONFLICT DO NOTHING;""",
    "mixed": """
        CREATE TABLE mixed (x numeric, t timestamptz, f float8, v text, PRIMARY KEY (x, t, f));
        INSERT INTO mixed SELECT (g % 3) / 10.0, timestamptz '2024-10-27 00:59:59.999998+00'
                                     + (g % 4) * interval '0.000001 s',
                                 (g % 2) * 0.1 + 0.2, 'v' || g
            FROM generate_series(1, 50) g ON CONFLICT DO NOTHING;""",
}


@pytest.mark.parametrize(
    ("table", "key", "pgoptions"),
    [
        ("pair", ("a", "b"), None),
        pytest.param("triple", ("day", "region", "seq"), "-c DateStyle=German",
                     marks=pytest.mark.needs_icu),
        ("mixed", ("x", "t", "f"), "-c TimeZone=Europe/Dublin -c DateStyle=SQL,DMY "
                                   "-c extra_float_digits=0"),
    ],
)  # fmt: skip
def test_composite_primary_key_every_boundary(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    table: str,
    key: tuple[str, ...],
    pgoptions: str | None,
) -> None:
    run_sql(dsn, COMPOSITE_TABLES[table])
    rows = int(run_sql(dsn, f"SELECT count(*) FROM {table}")[0][0])
    assert rows >= 10
    env = {"PGOPTIONS": pgoptions} if pgoptions else {}
    expected = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY {', '.join(key)}", env=env)
    conninfo = _conninfo(dsn, pgoptions)
    for chunk_rows in CHUNK_SIZES:
        out = tmp_path / f"{table}-{chunk_rows}.csv"
        result = export_table(
            conninfo, table, out, chunk_rows=chunk_rows, progress=_guard(expected)
        )
        assert out.read_bytes() == expected, f"chunk_rows={chunk_rows}"
        assert result.key == key and result.rows == rows
    _interrupt_and_resume(conninfo, table, tmp_path / "resumed.csv", expected, chunk_rows=3,
                          key=key)  # fmt: skip


# -- non-unique keys --------------------------------------------------------------------------


def _sorted_lines(data: bytes) -> Counter[bytes]:
    return Counter(data.splitlines(keepends=True))


@pytest.mark.parametrize(
    ("ktype", "kexpr"),
    [
        ("int", "g % 10"),
        ("numeric", "(ARRAY[1.1, 1.10, 1.100, 2, 2.0, 0.5, 0.50, 3, 3.000, 10])[1 + g % 10]"),
        pytest.param("text COLLATE ci",
                     "(ARRAY['a','A','b','B','é','É','x','X','Y','z'])[1 + g % 10]",
                     marks=pytest.mark.needs_icu),
        ("timestamptz", "timestamptz '2024-10-27 00:30+00' + (g % 10) * interval '20 min'"),
    ],
    ids=["int", "numeric-equal-but-different-text", "text-nondeterministic", "timestamptz"],
)  # fmt: skip
def test_non_unique_key_with_ties_loses_and_repeats_nothing(
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    ktype: str,
    kexpr: str,
) -> None:
    """1000 rows over 10 key values, chunk size 7: every chunk boundary falls inside a tie."""
    if "COLLATE ci" in ktype:
        run_sql(dsn, "CREATE COLLATION ci (provider = icu, locale = 'und-u-ks-level2', "
                     "deterministic = false)")  # fmt: skip
    run_sql(
        dsn,
        f"""CREATE TABLE t (id int PRIMARY KEY, k {ktype} NOT NULL, v text);
            CREATE INDEX t_k ON t (k);
            INSERT INTO t SELECT g, {kexpr}, md5(g::text) FROM generate_series(1, 1000) g;""",
    )
    pgoptions = "-c TimeZone=Europe/Dublin -c DateStyle=SQL,DMY"
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY k", env={"PGOPTIONS": pgoptions})
    conninfo = _conninfo(dsn, pgoptions)
    rank = dict(run_sql(dsn, "SELECT id, dense_rank() OVER (ORDER BY k) FROM t"))
    distinct = max(rank.values())
    assert distinct <= 10
    caplog.set_level(logging.WARNING, logger="copystream")
    for chunk_rows in (7, 1, None):
        out = tmp_path / f"t-{chunk_rows}.csv"
        result = export_table(
            conninfo, "t", out, key="k", chunk_rows=chunk_rows, progress=_guard(expected)
        )
        data = out.read_bytes()
        assert _sorted_lines(data) == _sorted_lines(expected), f"chunk_rows={chunk_rows}"
        assert result.rows == 1000 and result.key_source == "--key"
        assert any("not provably unique" in w for w in result.warnings)
        if chunk_rows:
            # a tie is never split: one chunk per distinct key value
            m = _manifest(out)
            assert len(m["chunks"]) == distinct
            assert len({tuple(c["last_key"]) for c in m["chunks"]}) == distinct
        # rows appear in key order (ties in any order): the key's rank never goes down
        ranks = [rank[int(line.split(b",", 1)[0])] for line in data.splitlines()]
        assert ranks == sorted(ranks)
    assert any("not provably unique" in r.getMessage() for r in caplog.records)
    # interrupted inside the ties and resumed: still every row exactly once
    out = tmp_path / "resumed.csv"
    with pytest.raises(KeyboardInterrupt):
        export_table(conninfo, "t", out, key="k", chunk_rows=7, progress=_guard(expected, 2))
    cp = _checkpoint(out)
    assert _key_row_count(conninfo, "t", ("k",), cp["last_key"], "<=") == cp["rows"]
    result = export_table(conninfo, "t", out, key="k", chunk_rows=7, progress=_guard(expected))
    assert result.resumed
    assert _sorted_lines(out.read_bytes()) == _sorted_lines(expected)
    copystream.verify_file(out)


# -- how the key is found ---------------------------------------------------------------------


def test_unique_index_chosen_when_no_primary_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """Partial, expression and nullable unique indexes cannot page; INCLUDE columns are no key."""
    run_sql(
        dsn,
        """CREATE TABLE t (a text NOT NULL, b int NOT NULL, c text, d int);
           CREATE UNIQUE INDEX aa_partial ON t (a) WHERE b > 0;
           CREATE UNIQUE INDEX ab_expr ON t (lower(a));
           CREATE UNIQUE INDEX ac_nullable ON t (d);
           CREATE UNIQUE INDEX zz_covering ON t (b, a) INCLUDE (c);
           INSERT INTO t SELECT 'name ' || g, g % 7, 'c' || g, NULLIF(g % 5, 0) * 100 + g
               FROM generate_series(1, 30) g;""",
    )
    expected = psql_csv(dsn, "SELECT * FROM t ORDER BY b, a")
    for chunk_rows in (1, 4, 7, None):
        out = tmp_path / f"t-{chunk_rows}.csv"
        result = export_table(dsn, "t", out, chunk_rows=chunk_rows)
        assert out.read_bytes() == expected
        assert result.key == ("b", "a")
        m = _manifest(out)
        assert m["key_source"] == "unique index zz_covering"
        assert m["key"] == ["b", "a"]
    _interrupt_and_resume(dsn, "t", tmp_path / "r.csv", expected, chunk_rows=3, key=("b", "a"))


def test_unique_constraint_chosen_when_no_primary_key(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (v text, code varchar(8) NOT NULL CONSTRAINT t_code_key UNIQUE);
           INSERT INTO t SELECT 'v' || g, to_hex(g * 7919) FROM generate_series(1, 20) g;""",
    )
    out = tmp_path / "t.csv"
    export_table(dsn, "t", out, chunk_rows=3)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY code")
    assert _manifest(out)["key_source"] == "unique index t_code_key"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "copystream", *args], capture_output=True, text=True, timeout=120
    )


def _assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    detail = f"exit {proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, detail
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("copystream: error: "), detail
    for needle in needles:
        assert needle in lines[0], f"{needle!r} missing\n{detail}"


def test_unusable_keys_are_refused(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    run_sql(
        dsn,
        """CREATE SCHEMA "Sales";
           CREATE TABLE "Sales"."Order Lines" (a int NOT NULL, b int, c text);
           CREATE UNIQUE INDEX ol_partial ON "Sales"."Order Lines" (a) WHERE a > 0;
           CREATE UNIQUE INDEX ol_nullable ON "Sales"."Order Lines" (a, b);
           CREATE UNIQUE INDEX ol_expr ON "Sales"."Order Lines" ((a + 0));
           INSERT INTO "Sales"."Order Lines" VALUES (1, NULL, 'x'), (2, 2, 'y');""",
    )
    table = '"Sales"."Order Lines"'
    out = tmp_path / "o.csv"
    # no usable key: the table is named and --key suggested
    proc = _cli("export", table, str(out), "--dsn", dsn, "--no-progress")
    _assert_refused(proc, '"Sales"."Order Lines"', "--key")
    # a nullable column anywhere in a composite key
    proc = _cli("export", table, str(out), "--dsn", dsn, "--key", "a,b", "--no-progress")
    _assert_refused(proc, "'b'", "nullable")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(KeyProblem, match="nullable"):
        export_table(dsn, table, out, key=["a", "b"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_warning_when_the_key_has_no_index(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_sql(
        dsn,
        """CREATE TABLE t (id int PRIMARY KEY, k text NOT NULL, j int NOT NULL);
           CREATE INDEX t_j_k ON t (j, k);  -- does not start with k: no help
           INSERT INTO t SELECT g, 'k' || (g * 13 % 50), g FROM generate_series(1, 50) g;""",
    )
    caplog.set_level(logging.WARNING, logger="copystream")
    out = tmp_path / "t.csv"
    result = export_table(dsn, "t", out, key="k", chunk_rows=9)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY k")
    no_index = [r for r in caplog.records if "no index starts with the key" in r.getMessage()]
    assert len(no_index) == 1 and no_index[0].levelno == logging.WARNING
    assert "public.t" in no_index[0].getMessage()
    assert any("no index" in w for w in result.warnings)
    # an indexed key warns about nothing
    caplog.clear()
    export_table(dsn, "t", tmp_path / "t2.csv", key=["j", "k"], chunk_rows=9)
    assert not [r for r in caplog.records if "no index" in r.getMessage()]


def test_an_index_that_cannot_order_rows_does_not_count_for_the_key(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """Only a B-tree hands rows over in key order: a hash or BRIN index on the key, or a B-tree
    whose first column is an expression, still leaves every chunk scanning the table (warned).
    A B-tree whose plain columns lead does count."""
    run_sql(
        dsn,
        """CREATE TABLE hashed (id int PRIMARY KEY, k int NOT NULL, name text NOT NULL);
           CREATE INDEX hashed_k ON hashed USING hash (k);
           CREATE INDEX hashed_brin ON hashed USING brin (k);
           CREATE INDEX hashed_expr ON hashed ((lower(name)), k);
           CREATE INDEX hashed_name ON hashed (name, (lower(name)));
           INSERT INTO hashed SELECT g, g % 7, 'n' || g FROM generate_series(1, 30) g;""",
    )
    for key, indexed in (("k", False), ("name", True)):
        result = export_table(dsn, "hashed", tmp_path / f"{key}.csv", key=key, chunk_rows=9)
        warned = any("no index starts with the key" in w for w in result.warnings)
        assert warned is not indexed, (key, result.warnings)
