"""Coverage: every COPY formatting option of the command line, alone and combined, with filters
and column lists, is byte-identical to psql given the same options.

Each case runs the real ``copystream export`` command and compares its file with psql's
``\\copy (SELECT <cols> FROM t [WHERE <filter>] ORDER BY id) TO STDOUT WITH (<options>)``, at
chunk sizes small enough that chunk boundaries fall between rows the filter keeps and drops.
Options the server refuses are refused up front: exit 2, one line, no file left behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import copystream
from copystream import CopyOptions, Progress, export_table

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

#: Values chosen to collide with every option below: delimiters, quotes, escapes, NULL markers,
#: line breaks, backslash sequences of the text format. All representable in LATIN1.
TEXTS = [
    "NULL", "", "\\N", "a|b", "tab\there", "semi;colon", "it's", 'say "hi"', "line\nbreak",
    "cr\rx", "crlf\r\n", "back\\slash", "\\.", " spaces ", "x", "comma,here", "ü é ß © ¿",
    "<null>", "'quoted'", "\\", "a\\'b",
]  # fmt: skip


def _literal(s: str) -> str:
    return (
        "E'"
        + s.replace("\\", "\\\\")
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
        + "'"
    )


TABLE = f"""
CREATE TABLE t (id int PRIMARY KEY, a int NOT NULL, b text, c text, d date, n numeric, f float8);
INSERT INTO t SELECT g, g % 4,
    CASE WHEN g % 7 = 0 THEN NULL ELSE (ARRAY[{", ".join(_literal(s) for s in TEXTS)}])
        [1 + g % {len(TEXTS)}] END,
    CASE WHEN g % 5 = 0 THEN NULL ELSE 'c' || g || (ARRAY['', ',', '"', '|', ';'])[1 + g % 5] END,
    date '2024-02-27' + g, g / 3.0, g * 0.1
    FROM generate_series(1, 40) g;
"""


@pytest.fixture
def table(dsn: str, run_sql: RunSql) -> str:
    run_sql(dsn, TABLE)
    return dsn


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]  # command-line options
    options: str  # the same options as psql's \copy ... WITH (...)
    columns: str = "*"
    where: str | None = None
    chunk_sizes: tuple[str, ...] = ("3",)


CASES = [
    Case("header", ("--header",), "FORMAT csv, HEADER true"),
    Case("delimiter-pipe", ("--delimiter", "|"), "FORMAT csv, DELIMITER '|'"),
    Case("delimiter-tab", ("--delimiter", "\t"), "FORMAT csv, DELIMITER E'\\t'"),
    Case("delimiter-semicolon-header", ("--delimiter", ";", "--header"),
         "FORMAT csv, DELIMITER ';', HEADER true"),
    Case("null-word", ("--null", "NULL"), "FORMAT csv, NULL 'NULL'"),
    Case("null-marker", ("--null", "<null>"), "FORMAT csv, NULL '<null>'"),
    Case("quote-single", ("--quote", "'"), "FORMAT csv, QUOTE ''''"),
    Case("escape-backslash", ("--escape", "\\"), "FORMAT csv, ESCAPE '\\'"),
    Case("quote-and-escape", ("--quote", "'", "--escape", "\\"),
         "FORMAT csv, QUOTE '''', ESCAPE '\\'"),
    Case("force-quote-columns", ("--force-quote", "a,b"), "FORMAT csv, FORCE_QUOTE (a, b)"),
    Case("force-quote-all", ("--force-quote", "*"), "FORMAT csv, FORCE_QUOTE *"),
    Case("force-quote-all-header", ("--force-quote", "*", "--header"),
         "FORMAT csv, FORCE_QUOTE *, HEADER true"),
    Case("encoding-latin1", ("--encoding", "LATIN1"), "FORMAT csv, ENCODING 'LATIN1'"),
    Case("encoding-latin1-header", ("--encoding", "LATIN1", "--header", "--columns", "b,c"),
         "FORMAT csv, ENCODING 'LATIN1', HEADER true", columns="b, c"),
    Case("text", ("--format", "text"), "FORMAT text"),
    Case("text-header", ("--format", "text", "--header"), "FORMAT text, HEADER true"),
    Case("text-delimiter-null", ("--format", "text", "--delimiter", "|", "--null", ""),
         "FORMAT text, DELIMITER '|', NULL ''"),
    Case("text-comma-null-word", ("--format", "text", "--delimiter", ",", "--null", "NULL"),
         "FORMAT text, DELIMITER ',', NULL 'NULL'"),
    Case("everything-csv",
         ("--header", "--delimiter", ";", "--force-quote", "*", "--null", "<null>",
          "--quote", "'", "--escape", "\\", "--columns", "c,b,n", "--where", "a <> 2"),
         "FORMAT csv, HEADER true, DELIMITER ';', FORCE_QUOTE *, NULL '<null>', "
         "QUOTE '''', ESCAPE '\\'", columns="c, b, n", where="a <> 2",
         chunk_sizes=("1", "4")),
    Case("columns-without-key", ("--columns", "c,a"), "FORMAT csv", columns="c, a",
         chunk_sizes=("1", "4")),
    Case("columns-header-force-quote", ("--columns", "b,n", "--header", "--force-quote", "n"),
         "FORMAT csv, HEADER true, FORCE_QUOTE (n)", columns="b, n"),
    Case("where-or", ("--where", "a = 1 OR b = 'x'"), "FORMAT csv", where="a = 1 OR b = 'x'",
         chunk_sizes=("1", "2", "5")),
    Case("where-parenthesised", ("--where", "(a > 1) AND (n < 8)"), "FORMAT csv",
         where="(a > 1) AND (n < 8)", chunk_sizes=("1", "4")),
    Case("where-or-on-the-key", ("--where", "id % 3 = 0 OR id > 35 OR id < 2"), "FORMAT csv",
         where="id % 3 = 0 OR id > 35 OR id < 2", chunk_sizes=("2", "7")),
    Case("where-nothing", ("--where", "false OR a > 100", "--header"),
         "FORMAT csv, HEADER true", where="false OR a > 100", chunk_sizes=("1",)),
    Case("where-columns-text-header",
         ("--where", "b IS NULL OR a = 3", "--columns", "b,id", "--format", "text", "--header"),
         "FORMAT text, HEADER true", columns="b, id", where="b IS NULL OR a = 3",
         chunk_sizes=("2",)),
]  # fmt: skip


def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "copystream", *args], capture_output=True, timeout=120
    )


def _manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads(out.with_name(out.name + ".manifest.json").read_bytes()))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_option_byte_identical_to_psql(
    table: str, psql_csv: PsqlCsv, run_sql: RunSql, tmp_path: Path, case: Case,
    server_version: int,
) -> None:
    if "FORMAT text" in case.options and "HEADER" in case.options and server_version < 150000:
        pytest.skip("HEADER in text format is new in PostgreSQL 15 (test_versions: refused)")
    where = f" WHERE {case.where}" if case.where else ""
    query = f"SELECT {case.columns} FROM t{where} ORDER BY id"
    expected = psql_csv(table, query, case.options)
    kept = int(run_sql(table, f"SELECT count(*) FROM t{where}")[0][0])
    if case.where != "false OR a > 100":
        assert expected.count(b"\n") >= 5
    for chunk_rows in case.chunk_sizes:
        out = tmp_path / f"out-{chunk_rows}.csv"
        proc = _cli(
            "export", "t", str(out), "--dsn", table, "--no-progress", "--chunk-rows", chunk_rows,
            *case.args,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        assert out.read_bytes() == expected, f"chunk_rows={chunk_rows}"
        m = _manifest(out)
        assert m["where"] == case.where
        assert m["columns"] == (
            [c.strip() for c in case.columns.split(",")]
            if case.columns != "*"
            else ["id", "a", "b", "c", "d", "n", "f"]
        )
        assert m["key"] == ["id"]
        assert m["rows"] == kept
        if chunk_rows == "1":  # one chunk per row the filter kept
            assert len([c for c in m["chunks"] if c["rows"]]) == kept
        assert copystream.verify_file(out).bytes == len(expected)
    # what the manifest records matches the command line
    opts = _manifest(tmp_path / f"out-{case.chunk_sizes[-1]}.csv")["options"]
    assert opts["format"] == ("text" if "FORMAT text" in case.options else "csv")
    assert opts["header"] == ("HEADER" in case.options)
    for flag, name in (("--delimiter", "delimiter"), ("--null", "null"), ("--quote", "quote"),
                       ("--escape", "escape"), ("--encoding", "encoding")):  # fmt: skip
        if flag in case.args:
            assert opts[name] == case.args[case.args.index(flag) + 1]
        else:
            assert opts[name] is None


def test_encoding_really_converts(table: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    out = tmp_path / "l1.csv"
    proc = _cli("export", "t", str(out), "--dsn", table, "--no-progress", "--encoding", "LATIN1")
    assert proc.returncode == 0, proc.stderr.decode()
    data = out.read_bytes()
    assert "ü é ß © ¿".encode("latin-1") in data
    assert "ü".encode() not in data
    utf8 = psql_csv(table, "SELECT * FROM t ORDER BY id")
    assert data.decode("latin-1") == utf8.decode("utf-8")


def test_filter_interrupted_and_resumed(table: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """An OR filter stays inside its parentheses across a resume: the key condition holds."""
    where = "a = 1 OR b = 'x' OR id > 30"
    expected = psql_csv(table, f"SELECT * FROM t WHERE {where} ORDER BY id", "FORMAT csv, HEADER")
    out = tmp_path / "w.csv"

    def stop_after_two(p: Progress) -> None:
        if p.chunks >= 2 and not p.done:
            raise KeyboardInterrupt

    opts = CopyOptions(header=True, delimiter="|", force_quote=("b",))
    with pytest.raises(KeyboardInterrupt):
        export_table(table, "t", out, where=where, chunk_rows=2, progress=stop_after_two,
                     options=CopyOptions(header=True))  # fmt: skip
    cp = json.loads(out.with_name(out.name + ".checkpoint.json").read_bytes())
    assert cp["export"]["where"] == where and cp["rows"] == 4
    result = export_table(table, "t", out, where=where, chunk_rows=2, header=True)
    assert result.resumed
    assert out.read_bytes() == expected
    assert _manifest(out)["where"] == where
    # the same filter with other options, in one go
    out2 = tmp_path / "w2.csv"
    export_table(table, "t", out2, where=where, chunk_rows=3, options=opts)
    assert out2.read_bytes() == psql_csv(
        table,
        f"SELECT * FROM t WHERE {where} ORDER BY id",
        "FORMAT csv, HEADER, DELIMITER '|', FORCE_QUOTE (b)",
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--format", "text", "--quote", "'"), "quote"),
        (("--format", "text", "--force-quote", "a"), "force quote"),
        (("--format", "text", "--escape", "\\"), "escape"),
        (("--delimiter", "||"), "delimiter"),
        (("--escape", "ab"), "escape"),
        (("--quote", ","), "delimiter and quote"),
        (("--null", "x,y"), "NULL"),
        (("--encoding", "NO_SUCH_ENCODING"), "encoding"),
        (("--force-quote", "nosuchcol"), "nosuchcol"),
        (("--columns", "id,a", "--force-quote", "b"), '"b"'),
    ],
    ids=[
        "text-quote", "text-force-quote", "text-escape", "two-byte-delimiter", "two-byte-escape",
        "quote-is-delimiter", "null-holds-delimiter", "unknown-encoding",
        "force-quote-unknown-column", "force-quote-column-not-exported",
    ],
)  # fmt: skip
def test_options_the_server_refuses_are_usage_errors(
    table: str, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    """Refused before any file exists: not a resumable failure (exit 1) with a checkpoint."""
    out = tmp_path / "o.csv"
    proc = _cli("export", "t", str(out), "--dsn", table, "--no-progress", *args)
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("copystream: error: "), stderr
    # PostgreSQL 15: "COPY force quote available only in CSV mode"; from 17: "COPY FORCE_QUOTE
    # requires CSV mode"
    assert needle.lower() in lines[0].lower().replace("_", " "), stderr
    assert "resume" not in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_unrepresentable_characters_are_a_usage_error(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, "CREATE TABLE u (id int PRIMARY KEY, v text); "
                 "INSERT INTO u VALUES (1, 'fine é'), (2, '日本'), (3, 'more')")  # fmt: skip
    out = tmp_path / "u.csv"
    proc = _cli("export", "u", str(out), "--dsn", dsn, "--no-progress", "--encoding", "LATIN1")
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and "LATIN1" in lines[0] and "Traceback" not in stderr, stderr
    assert list(tmp_path.iterdir()) == []
