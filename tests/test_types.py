"""Coverage: every built-in type a user meets exports byte for byte as the real psql writes it.

One corpus table holds a column per type, each with its edge values (extremes, NaN, infinities,
negative zero, BC dates, 24:00, CSV-special text, NULL elements, empty ranges, ...). It is
exported at chunk sizes that put a boundary after every row and at none, with and without a
header, and under non-default session settings (DateStyle, IntervalStyle, TimeZone,
extra_float_digits, bytea_output) given through the dsn ``options`` or ``PGOPTIONS``; the
reference is always psql's ``\\copy (SELECT * FROM t ORDER BY id) TO STDOUT`` under the same
settings. TOAST-sized values (several MB in one field) are exported on their own.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

import copystream
from copystream import Progress, export_table

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'a "quoted", label', 'with\\backslash');
CREATE TYPE comp AS (a int, b text, c float8[]);
CREATE DOMAIN code AS text CHECK (VALUE ~ '^[A-Z]');
"""

#: (column, type, SQL literals): row i of the corpus holds literal i (NULL past the end).
# fmt: off
COLUMNS: list[tuple[str, str, list[str]]] = [
    ("i2", "smallint", ["-32768", "32767", "0", "-1"]),
    ("i4", "integer", ["-2147483648", "2147483647", "0"]),
    ("i8", "bigint", ["-9223372036854775808", "9223372036854775807", "0"]),
    (
        "num",
        "numeric",
        [
            "'NaN'",
            "'-0'",
            "'-0.000'",
            "'Infinity'",
            "'-Infinity'",
            "'1e-1000'",
            "'" + "9" * 1000 + "'",
            "'-" + "1234567890" * 50 + "." + "0987654321" * 50 + "'",
            "1.10",
            "'123456789012345678901234567890.000000000000000000001'",
        ],
    ),
    (
        "f4",
        "real",
        [
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "'-0'",
            "'1.4e-45'",
            "'3.4028235e38'",
            "'1.17549435e-38'",
            "0.1",
            "'1e-10'",
            "123456789",
        ],
    ),
    (
        "f8",
        "double precision",
        [
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "'-0'",
            "'1e-308'",
            "'1.7976931348623157e308'",
            "'5e-324'",
            "0.1",
            "'0.30000000000000004'",
            "'2.2250738585072014e-308'",
            "1e15",
            "1e16",
        ],
    ),
    (
        "txt",
        "text",
        [
            "''",
            "' '",
            "'\"'",
            "'say \"hi\", please'",
            "'a,b,c'",
            "E'\\r'",
            "E'\\n'",
            "E'\\r\\n'",
            "E'cr\\rlf\\ncrlf\\r\\nend'",
            "'\\'",
            "'\\\\'",
            "'\\.'",
            "E'\\\\.\\n'",
            "E'before\\n\\\\.\\nafter'",
            "'\\N'",
            "'NULL'",
            "'  leading and trailing  '",
            "E'\\ttab'",
            "'héllo wörld — ß ﬁ'",
            "'日本語'",
            "'😀🎉 👩‍👩‍👧'",
            "E'e\\u0301 é'",
            "E'\\u00a0nbsp\\u2028ls\\ufeffbom'",
            "'''single'''",
            "E'\\x01\\x1f\\x7f'",
        ],
    ),
    ("ch", "char(10)", ["'ab'", "''", "' x '", "'0123456789'", "'é'", "'a,b'"]),
    ("vc", "varchar(20)", ["''", "'x'", "'a\"b'", "E'l\\nf'", "'trailing  '"]),
    ("ba", "bytea", ["''", "'\\x00'", "'\\x5c222c0a0d'", "'\\xdeadbeef'", "'abc\\\\def'"]),
    ("bo", "boolean", ["true", "false"]),
    (
        "d",
        "date",
        [
            "'infinity'",
            "'-infinity'",
            "'4713-01-01 BC'",
            "'5874897-12-31'",
            "'2000-02-29'",
            "'0001-01-01'",
            "'0001-12-31 BC'",
        ],
    ),
    ("tm", "time", ["'24:00:00'", "'00:00:00'", "'23:59:59.999999'", "'12:34:56.5'"]),
    ("ttz", "timetz", ["'24:00:00-15:59'", "'00:00:00+15:59'", "'12:34:56.789+05:30'"]),
    (
        "ts",
        "timestamp",
        [
            "'infinity'",
            "'-infinity'",
            "'4713-01-01 00:00:00 BC'",
            "'294276-12-31 23:59:59.999999'",
            "'2000-01-01 12:00:00.000001'",
            "'0044-03-15 12:00:00 BC'",
            "'2024-10-27 01:30:00'",
        ],
    ),
    (
        "tstz",
        "timestamptz",
        [
            "'infinity'",
            "'-infinity'",
            "'4713-01-01 00:00:00+00 BC'",
            "'294276-12-31 23:59:59.999999+00'",
            "'2000-01-01 12:00:00.000001+00'",
            "'1850-06-01 00:00:00+00'",
            "'2024-10-27 00:30:00+00'",
            "'2024-03-31 01:30:00+00'",
        ],
    ),
    (
        "iv",
        "interval",
        [
            "'178000000 years'",
            "'-178000000 years'",
            "'1 mon -1 day 00:00:00.000001'",
            "'0'",
            "'-1 days +02:03:04'",
            "'1 year 2 mons 3 days 04:05:06.789'",
            "'-00:00:00.5'",
            "'P1Y2M3DT4H5M6S'",
        ],
    ),
    (
        "u",
        "uuid",
        [
            "'00000000-0000-0000-0000-000000000000'",
            "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
            "'{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}'",
        ],
    ),
    (
        "js",
        "json",
        [
            '\'{"a": [1, 2.50, {"b": null}], "k\\u00fc": "\\u00e9\\n\\"q\\""}\'',
            '\' { "spaces" :  1 ,"dup":1,"dup":2} \'',
            "'\"\\ud83d\\ude00 \\u0000\"'",
            "'[]'",
            "'null'",
            "'\"a,b\"'",
            'E\'{"nl":\\n"x"}\'',
        ],
    ),
    (
        "jb",
        "jsonb",
        [
            '\'{"a": [1, 2.50, {"b": null}], "k\\u00fc": "\\u00e9\\n\\"q\\""}\'',
            '\' { "spaces" :  1 ,"dup":1,"dup":2} \'',
            "'\"\\ud83d\\ude00\"'",
            "'{}'",
            "'null'",
            "'1e400'",
            '\'["\\\\N", "\\\\."]\'',
        ],
    ),
    (
        "ai",
        "int[]",
        ["'{1,NULL,3}'", "'{}'", "'[0:2]={7,8,9}'", "'{{1,2},{3,4}}'", "'{NULL}'"],
    ),
    (
        "at",
        "text[]",
        [
            '\'{{"a,b","c\\"d"},{"NULL",NULL}}\'',
            '\'{""," "}\'',
            "ARRAY[E'x\\ny', 'back\\slash', ' sp ', '\\N', 'null', '{', '}']",
            "'{}'",
        ],
    ),
    (
        "atz",
        "timestamptz[]",
        ["ARRAY['2024-06-01 12:00+00'::timestamptz, 'infinity', NULL]", "'{}'"],
    ),
    ("en", "mood", ["'sad'", "'happy'", "'a \"quoted\", label'", "'with\\backslash'"]),
    (
        "co",
        "comp",
        ["ROW(1, 'x,y \"q\"', ARRAY[1.5, NULL])", "ROW(NULL, NULL, NULL)", "ROW(0, '', '{}')"],
    ),
    ("dm", "code", ["'A'", "'Zeta, \"q\"'", "E'X\\n'"]),
    ("ip", "inet", ["'192.168.0.1'", "'::1/128'", "'10.0.0.0/8'", "'2001:db8::1/64'"]),
    ("ci", "cidr", ["'10.0.0.0/8'", "'2001:db8::/32'", "'192.168.1.0/24'"]),
    ("ma", "macaddr", ["'08:00:2b:01:02:03'", "'FF-FF-FF-FF-FF-FF'"]),
    ("m8", "macaddr8", ["'08:00:2b:01:02:03:04:05'", "'08002b010203'"]),
    ("pt", "point", ["'(1.5,-2)'", "'(0.1,1e-300)'", "'(NaN,Infinity)'"]),
    ("ln", "line", ["'{1,-1,0}'", "'[(0,0),(1,2)]'"]),
    ("ls", "lseg", ["'[(0,0),(1,1)]'", "'[(0.1,0.2),(-3,4e10)]'"]),
    ("bx", "box", ["'(1,1),(0,0)'", "'((-1,-1),(2.5,3))'"]),
    ("pa", "path", ["'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"]),
    ("pg", "polygon", ["'((0,0),(1,1),(1,0))'", "'((0.1,0.2))'"]),
    ("cr", "circle", ["'<(0,0),1.5>'", "'((1,2),0.1)'"]),
    ("r4", "int4range", ["'empty'", "'[1,10)'", "'(,5]'", "'[3,)'", "'(,)'", "'[1,1]'"]),
    (
        "rtz",
        "tstzrange",
        [
            "'empty'",
            "'[2020-01-01 00:00+00, infinity)'",
            "'(,)'",
            "'[2024-10-27 00:30+00,2024-10-27 01:30+00]'",
        ],
    ),
    ("rn", "numrange", ["'[1.10,2.2]'", "'empty'", "'(,0)'", "'(-Infinity,Infinity)'"]),
    ("rd", "daterange", ["'[2000-01-01,infinity)'", "'[2000-01-01,2000-01-01]'"]),
    ("mr", "int4multirange", ["'{}'", "'{[1,3), [5,7)}'", "'{(,2), [4,)}'", "'{empty}'"]),
    (
        "tv",
        "tsvector",
        ["'a fat cat:1A,2 sat:3B'", "$$'it''s' 'a b':1 '\\\\':2$$", "''", "'ü 日本'"],
    ),
    ("tq", "tsquery", ["'fat & (rat | !cat)'", "$$'a b' <-> c:*$$", "$$'it''s' <2> x:AB$$"]),
    ("b8", "bit(8)", ["B'10101010'", "B'00000000'", "B'11111111'"]),
    ("vb", "varbit", ["B''", "B'1'", "B'1010101010101'"]),
    (
        "mo",
        "money",
        ["'1234.56'", "'-92233720368547758.08'", "'92233720368547758.07'", "'0'", "'-0.01'"],
    ),
    ("o", "oid", ["0", "4294967295", "'1259'"]),
    ("lsn", "pg_lsn", ["'0/0'", "'FFFFFFFF/FFFFFFFF'", "'16/B374D848'"]),
    ("nm", "name", ["'pg_class'", "'Mixed Case, \"q\"'"]),
    ("c1", '"char"', ["'a'", "','", "'\"'"]),
]
# fmt: on


N_ROWS = max(len(values) for _, _, values in COLUMNS)
#: Row holding the 1 MB random bytea (and the all-NULL row after the corpus).
BLOB_ROW = N_ROWS + 1
NULL_ROW = N_ROWS + 2


def _corpus_sql() -> str:
    cols = ",\n    ".join(f"{name} {typ}" for name, typ, _ in COLUMNS)
    stmts = [TYPES_DDL, f"CREATE TABLE corpus (\n    id int PRIMARY KEY,\n    {cols}\n);"]
    stmts.append(f"INSERT INTO corpus (id) SELECT generate_series(1, {NULL_ROW});")
    for name, _, values in COLUMNS:
        for i, value in enumerate(values, start=1):
            stmts.append(f"UPDATE corpus SET {name} = {value} WHERE id = {i};")
    return "\n".join(stmts)


@pytest.fixture
def corpus(dsn: str, run_sql: RunSql) -> str:
    """The corpus table in a fresh database (its dsn); row BLOB_ROW holds a 1 MB random blob."""
    run_sql(dsn, _corpus_sql())
    blob = random.Random(20240601).randbytes(1 << 20)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE corpus SET ba = %s, txt = %s WHERE id = %s",
            [blob, "x" * 70_000 + "\n\\.\n" + "y" * 1000, BLOB_ROW],
        )
    # every literal above landed (a typo in one would have raised) and nothing is NULL by mistake
    filled = run_sql(dsn, "SELECT count(*) FROM corpus WHERE ba IS NOT NULL")[0][0]
    assert filled == 6
    return dsn


def _options(header: bool, extra: str = "") -> str:
    return "FORMAT csv" + (", HEADER true" if header else "") + extra


def _check_manifest(out: Path, result: copystream.ExportResult, rows: int) -> dict[str, Any]:
    verified = copystream.verify_file(out)
    assert verified.rows == result.rows == rows
    assert verified.xxh3_128 == result.xxh3_128
    manifest: dict[str, Any] = json.loads(out.with_name(out.name + ".manifest.json").read_bytes())
    assert manifest["rows"] == rows
    assert manifest["bytes"] == out.stat().st_size
    return manifest


# -- the corpus at every chunk size ----------------------------------------------------------


@pytest.mark.parametrize("header", [False, True], ids=["plain", "header"])
def test_corpus_byte_identical_at_every_chunk_size(
    corpus: str, psql_csv: PsqlCsv, run_sql: RunSql, tmp_path: Path, header: bool
) -> None:
    expected = psql_csv(corpus, "SELECT * FROM corpus ORDER BY id", _options(header))
    # The reference really holds the edge values (not a corpus that failed to load).
    for needle in (
        b"NaN", b"-Infinity", b"4713-01-01 BC", b"24:00:00", b"-0,", b",\\.,", b",\\N,",
        b'"\r\n"', b"$92,233,720,368,547,758.07", b"FFFFFFFF/FFFFFFFF", b"{[1,3),[5,7)}",
        b"[0:2]={7,8,9}", "😀".encode(), b"9" * 1000,
    ):  # fmt: skip
        assert needle in expected, needle
    assert len(expected) > 2 << 20  # the 1 MB blob, hex-encoded
    rows = N_ROWS + 2
    for chunk_rows in (1, 2, 3, 1000, 0, None):
        out = tmp_path / f"corpus-{chunk_rows}.csv"
        result = export_table(corpus, "corpus", out, chunk_rows=chunk_rows, header=header)
        assert out.read_bytes() == expected, f"chunk_rows={chunk_rows}"
        manifest = _check_manifest(out, result, rows)
        if chunk_rows in (1, 2, 3):
            n_chunks = -(-rows // chunk_rows)
            assert len(manifest["chunks"]) == n_chunks, chunk_rows
            last_keys = [c["last_key"] for c in manifest["chunks"]]
            assert last_keys[0] == [str(chunk_rows)]
            assert last_keys[-1] == [str(rows)]
        else:
            assert len(manifest["chunks"]) == 1, chunk_rows


#: Non-default values of every setting that shapes COPY's text of these types.
SQL_DMY_KOLKATA = (
    "-c DateStyle=SQL,DMY -c IntervalStyle=sql_standard -c TimeZone=Asia/Kolkata "
    "-c extra_float_digits=0 -c bytea_output=escape"
)
POSTGRES_CHATHAM = (
    "-c DateStyle=Postgres,YMD -c IntervalStyle=postgres_verbose -c TimeZone=Pacific/Chatham "
    "-c extra_float_digits=-5 -c bytea_output=hex"
)
GERMAN_ISO8601 = (
    "-c DateStyle=German -c IntervalStyle=iso_8601 -c TimeZone=America/St_Johns "
    "-c extra_float_digits=2"
)


@pytest.mark.parametrize(
    ("pgoptions", "via"),
    [
        pytest.param(SQL_DMY_KOLKATA, "dsn", id="sql-dmy-kolkata-escape-dsn"),
        pytest.param(POSTGRES_CHATHAM, "env", id="postgres-chatham-verbose-env"),
        pytest.param(GERMAN_ISO8601, "dsn", id="german-stjohns-iso8601-dsn"),
    ],
)
def test_corpus_under_non_default_settings(
    corpus: str,
    psql_csv: PsqlCsv,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pgoptions: str,
    via: str,
) -> None:
    """Settings given by the user (dsn ``options`` or ``PGOPTIONS``) shape every chunk."""
    env = {"PGOPTIONS": pgoptions}
    expected = {h: psql_csv(corpus, "SELECT * FROM corpus ORDER BY id", _options(h), env=env)
                for h in (False, True)}  # fmt: skip
    default = psql_csv(corpus, "SELECT * FROM corpus ORDER BY id")
    assert expected[False] != default  # the settings do change the bytes
    if via == "dsn":
        conninfo = f"{corpus} options='{pgoptions}'"
    else:
        conninfo = corpus
        monkeypatch.setenv("PGOPTIONS", pgoptions)
    for chunk_rows, header in ((1, False), (3, True), (0, True), (None, False)):
        out = tmp_path / f"corpus-{chunk_rows}-{header}.csv"
        result = export_table(conninfo, "corpus", out, chunk_rows=chunk_rows, header=header)
        assert out.read_bytes() == expected[header], f"chunk_rows={chunk_rows} header={header}"
        manifest = _check_manifest(out, result, N_ROWS + 2)
        for setting in pgoptions.split("-c ")[1:]:
            name, value = setting.strip().split("=")
            recorded = manifest["settings"][name]
            assert recorded.replace(" ", "") == value or (name, recorded) in (
                ("DateStyle", "SQL, DMY"),
                ("DateStyle", "Postgres, YMD"),
                ("DateStyle", "German, DMY"),
            ), (name, recorded)


def test_corpus_resumed_without_the_settings_keeps_them(
    corpus: str, psql_csv: PsqlCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted under PGOPTIONS, resumed without: the file never mixes two formats."""
    env = {"PGOPTIONS": SQL_DMY_KOLKATA}
    expected = psql_csv(corpus, "SELECT * FROM corpus ORDER BY id", env=env)
    monkeypatch.setenv("PGOPTIONS", SQL_DMY_KOLKATA)
    out = tmp_path / "corpus.csv"

    def stop_after_two(p: Progress) -> None:
        if p.chunks >= 2 and not p.done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_table(corpus, "corpus", out, chunk_rows=2, progress=stop_after_two)
    cp = json.loads(out.with_name(out.name + ".checkpoint.json").read_bytes())
    assert cp["last_key"] == ["4"]
    assert cp["settings"]["TimeZone"] == "Asia/Kolkata"
    monkeypatch.delenv("PGOPTIONS")
    result = export_table(corpus, "corpus", out, chunk_rows=2)
    assert result.resumed
    assert out.read_bytes() == expected
    _check_manifest(out, result, N_ROWS + 2)


# -- xml ---------------------------------------------------------------------------------------


#: xml needs a server built with libxml: its values get a test of their own (needs_xml).
XML_VALUES = [
    '\'<a x="1">t &amp; "q"</a>\'',
    "E'<r>\\n  <c/>\\n</r>'",
    "'plain text content'",
    "'<?xml version=\"1.0\"?><doc/>'",
    "'<![CDATA[a,b\"c]]>'",
]


@pytest.mark.needs_xml
def test_xml_values_byte_identical(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    values = ", ".join(f"({i}, {v})" for i, v in enumerate(XML_VALUES, start=1))
    run_sql(dsn, f"CREATE TABLE x (id int PRIMARY KEY, x xml); INSERT INTO x VALUES {values}, "
                 f"({len(XML_VALUES) + 1}, NULL)")  # fmt: skip
    expected = psql_csv(dsn, "SELECT * FROM x ORDER BY id")
    assert b'"<![CDATA[a,b""c]]>"' in expected and b'"<r>\n  <c/>\n</r>"' in expected
    for chunk_rows in (1, 2, None):
        out = tmp_path / f"x-{chunk_rows}.csv"
        result = export_table(dsn, "x", out, chunk_rows=chunk_rows)
        assert out.read_bytes() == expected, f"chunk_rows={chunk_rows}"
        _check_manifest(out, result, len(XML_VALUES) + 1)


# -- TOAST-sized values ----------------------------------------------------------------------


def test_toast_sized_values(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several MB in one text field and in one bytea: one COPY message far above the buffer."""
    rnd = random.Random(7)
    big_text = "".join(rnd.choice('ab,"\r\n\\. é😀') for _ in range(100_000)) * 30
    big_blob = rnd.randbytes(3 << 20)
    run_sql(dsn, "CREATE TABLE big (id int PRIMARY KEY, t text, b bytea)")
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO big VALUES (%s, %s, %s)",
            [(1, "small", b"\x00"), (2, big_text, big_blob), (3, None, big_blob[:10])],
        )
        cur.execute("INSERT INTO big VALUES (4, repeat('\\.' || chr(10), 1000000), NULL)")
    toast = run_sql(
        dsn, "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'big'"
    )[0][0]
    assert toast > 3 << 20  # the values really live out of line, in TOAST
    for pgoptions, chunk_sizes in ((None, (1, 0, None)), ("-c bytea_output=escape", (1,))):
        env = {"PGOPTIONS": pgoptions} if pgoptions else {}
        if pgoptions:
            monkeypatch.setenv("PGOPTIONS", pgoptions)
        expected = psql_csv(dsn, "SELECT * FROM big ORDER BY id", env=env)
        assert len(expected) > 10 << 20
        for chunk_rows in chunk_sizes:
            out = tmp_path / f"big-{chunk_rows}-{bool(pgoptions)}.csv"
            result = export_table(dsn, "big", out, chunk_rows=chunk_rows)
            assert out.read_bytes() == expected, f"chunk_rows={chunk_rows} {pgoptions}"
            _check_manifest(out, result, 4)


def test_reg_types_resumed_under_another_search_path(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_sql(
        dsn,
        """CREATE SCHEMA app; CREATE TABLE app.thing (id int);
           CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1';
           CREATE TABLE regs (id int PRIMARY KEY, rc regclass, rt regtype, rp regproc);
           INSERT INTO regs SELECT g, 'app.thing', 'int4', 'app.f'
               FROM generate_series(1, 10) g;""",
    )
    pgoptions = "-c search_path=app,public"
    expected = psql_csv(dsn, "SELECT * FROM public.regs ORDER BY id", env={"PGOPTIONS": pgoptions})
    assert b",thing,integer,f\n" in expected  # unqualified: app is on the search_path
    monkeypatch.setenv("PGOPTIONS", pgoptions)
    out = tmp_path / "regs.csv"

    def stop_after_two(p: Progress) -> None:
        if p.chunks >= 2 and not p.done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_table(dsn, "public.regs", out, chunk_rows=2, progress=stop_after_two)
    monkeypatch.delenv("PGOPTIONS")
    export_table(dsn, "public.regs", out, chunk_rows=2)
    assert out.read_bytes() == expected
