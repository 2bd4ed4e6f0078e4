"""The ``copystream`` command as a user meets it: exit codes, messages, verify, status, report.

Every case runs ``python -m copystream`` as a real subprocess against the real test server.
Exit codes: 0 done, 1 failed or does not verify, 2 bad usage (one ``copystream: error:`` line on
stderr, no traceback, no files created).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import (
    assert_ok,
    assert_one_error_line,
    cli,
    export_cmd,
    kill_export,
    read_checkpoint,
    read_manifest,
    run,
    scratch_database,
    snapshot,
    xxh,
)

from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]

ROWS = 20_000

SCHEMA = f"""
CREATE TABLE t (id int PRIMARY KEY, v text, n int NOT NULL, maybe int);
INSERT INTO t SELECT g, 'row ' || g || E',"\\n', g % 13, NULLIF(g % 5, 0)
    FROM generate_series(1, {ROWS}) g;
CREATE TABLE nokey (a int, b text);
INSERT INTO nokey VALUES (1, 'x'), (2, 'y');
CREATE TABLE nullable_unique (a int UNIQUE, b text);
ANALYZE;
"""


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def finished(db: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished export of ``t`` in 10 chunks (tests copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "t.csv"
    assert_ok(run(export_cmd(db, "t", out, "--chunk-rows", "2000")))
    return out


def copy_finished(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "t.csv"
    for src in (finished, finished.with_name("t.csv.manifest.json")):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    return out


# -- help -------------------------------------------------------------------------------------


def test_help_lists_the_commands() -> None:
    proc = run(cli("--help"))
    assert_ok(proc)
    for command in ("export", "verify", "status"):
        assert re.search(rf"^\s+{command}\s", proc.stdout, re.MULTILINE), proc.stdout
    proc = run(cli("export", "--help"))
    assert_ok(proc)
    for option in ("--dsn", "--key", "--chunk-rows", "--restart", "--force", "--report"):
        assert option in proc.stdout


# -- export: success output -------------------------------------------------------------------


def test_summary_line_and_report(db: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    report = tmp_path / "report.json"
    proc = run(export_cmd(db, "t", out, "--chunk-rows", "3000", "--report", str(report)))
    assert_ok(proc)
    data = out.read_bytes()
    assert data == psql_csv(db, "SELECT * FROM t ORDER BY id")

    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    summary = re.fullmatch(
        r"public\.t: 20,000 rows, ([\d.,]+) MB in ([\d.]+)s \(([\d.,]+) MB/s\), "
        r"peak memory (\d+) MB",
        lines[0],
    )
    assert summary, lines[0]
    assert float(summary.group(1)) == pytest.approx(len(data) / 1e6, abs=0.051)
    assert 0 < int(summary.group(4)) < 1000

    r = json.loads(report.read_text())
    assert r["rows"] == ROWS
    assert r["bytes"] == len(data)
    assert r["xxh3_128"] == xxh(data)
    assert isinstance(r["seconds"], float | int) and r["seconds"] >= 0
    assert r["chunks"] == 7
    assert r["resumed"] is False and r["already_complete"] is False
    assert r["table"] == "public.t"
    assert r["output"] == str(out)
    assert r["peak_rss_bytes"] > 0
    m = read_manifest(out)
    assert (m["rows"], m["bytes"], m["xxh3_128"]) == (r["rows"], r["bytes"], r["xxh3_128"])
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [
        "report.json",
        "t.csv",
        "t.csv.manifest.json",
    ]


# -- export: bad input ------------------------------------------------------------------------


def assert_nothing_created(directory: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == [], list(directory.iterdir())


def test_missing_table(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "no_such_table", tmp_path / "x.csv"))
    assert_one_error_line(proc, 2, "no_such_table", "does not exist")
    assert_nothing_created(tmp_path)


def test_missing_schema(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "nope.t", tmp_path / "x.csv"))
    assert_one_error_line(proc, 2, "nope.t")
    assert_nothing_created(tmp_path)


@pytest.mark.parametrize("table", ["nokey", "nullable_unique"])
def test_table_without_usable_key(db: str, tmp_path: Path, table: str) -> None:
    proc = run(export_cmd(db, table, tmp_path / "x.csv"))
    assert_one_error_line(proc, 2, f"public.{table}", "--key")
    assert_nothing_created(tmp_path)


def test_key_with_missing_column(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "t", tmp_path / "x.csv", "--key", "nosuch"))
    assert_one_error_line(proc, 2, "nosuch", "does not exist")
    assert_nothing_created(tmp_path)


def test_key_with_nullable_column(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "t", tmp_path / "x.csv", "--key", "maybe"))
    assert_one_error_line(proc, 2, "maybe", "nullable")
    assert_nothing_created(tmp_path)


def test_explicit_composite_key(db: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """--key pages by the named columns, in that order."""
    out = tmp_path / "t.csv"
    proc = run(export_cmd(db, "t", out, "--key", "n,id", "--chunk-rows", "999"))
    assert_ok(proc)
    assert out.read_bytes() == psql_csv(db, "SELECT * FROM t ORDER BY n, id")
    assert read_manifest(out)["key_source"] == "--key"


def test_bad_where(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "t", tmp_path / "x.csv", "--where", "nosuch_col > 1"))
    assert_one_error_line(proc, 2, "nosuch_col")
    assert_nothing_created(tmp_path)


def test_output_directory_missing(db: str, tmp_path: Path) -> None:
    proc = run(export_cmd(db, "t", tmp_path / "no" / "dir" / "x.csv"))
    assert_one_error_line(proc, 2, "does not exist")
    assert_nothing_created(tmp_path)


# -- verify -----------------------------------------------------------------------------------


def test_verify_good_file(finished: Path, tmp_path: Path) -> None:
    out = copy_finished(finished, tmp_path)
    proc = run(cli("verify", str(out)))
    assert_ok(proc)
    m = read_manifest(out)
    assert "OK" in proc.stdout
    assert f"{ROWS:,} rows" in proc.stdout
    assert m["xxh3_128"] in proc.stdout


@pytest.mark.parametrize("chunk", [0, 4, 9])
def test_verify_flipped_byte_names_the_chunk(finished: Path, tmp_path: Path, chunk: int) -> None:
    out = copy_finished(finished, tmp_path)
    c = read_manifest(out)["chunks"][chunk]
    data = bytearray(out.read_bytes())
    data[c["offset"] + c["bytes"] - 2] ^= 0x04  # inside the chunk, near its end
    out.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    proc = run(cli("verify", str(out)))
    line = assert_one_error_line(proc, 1, f"chunk {chunk} ", "differs")
    assert f"bytes {c['offset']}-{c['offset'] + c['bytes']}" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("change", ["truncated", "emptied", "appended"])
def test_verify_wrong_size(finished: Path, tmp_path: Path, change: str) -> None:
    out = copy_finished(finished, tmp_path)
    size = out.stat().st_size
    if change == "truncated":
        os.truncate(out, size - 1)
    elif change == "emptied":
        os.truncate(out, 0)
    else:
        with out.open("ab") as f:
            f.write(b"1,extra,0,\n")
    proc = run(cli("verify", str(out)))
    assert_one_error_line(proc, 1, str(out))


def test_verify_without_manifest(tmp_path: Path) -> None:
    out = tmp_path / "x.csv"
    out.write_bytes(b"1,2\n")
    proc = run(cli("verify", str(out)))
    assert_one_error_line(proc, 2, "manifest")


# -- status -----------------------------------------------------------------------------------


def test_status_of_unfinished_export(db: str, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    k = kill_export(export_cmd(db, "t", out, "--chunk-rows", "100"), out, min_chunks=5)
    assert k.returncode == -9
    cp = read_checkpoint(out)
    assert cp is not None and not cp["finished"]
    rows, nbytes, last = cp["rows"], cp["offset"], cp["last_key"]
    assert rows >= 500 and last == [str(rows)]

    proc = run(cli("status", str(out)))
    assert_ok(proc)
    text = proc.stdout
    assert "in progress" in text
    assert "public.t" in text
    assert f"{rows:,} rows" in text
    assert f"{nbytes:,} bytes" in text
    assert f"{len(cp['chunks'])} chunks" in text
    assert f"last key {last[0]}" in text
    assert f"{100 * rows / ROWS:.1f}%" in text
    assert f"~{ROWS:,} estimated rows" in text

    proc = run(cli("status", str(out), "--json"))
    assert_ok(proc)
    s = json.loads(proc.stdout)
    assert s["state"] == "in progress"
    assert s["table"] == "public.t"
    assert s["rows"] == rows
    assert s["bytes"] == nbytes
    assert s["last_key"] == last
    assert s["chunks"] == len(cp["chunks"])
    assert s["estimated_rows"] == ROWS
    assert s["percent"] == pytest.approx(100 * rows / ROWS)
    assert s["output"] == str(out)
    assert read_checkpoint(out) == cp  # status only reads


def test_status_of_finished_export(finished: Path, tmp_path: Path) -> None:
    out = copy_finished(finished, tmp_path)
    m = read_manifest(out)
    proc = run(cli("status", str(out)))
    assert_ok(proc)
    assert "complete" in proc.stdout and "in progress" not in proc.stdout
    assert f"{ROWS:,} rows" in proc.stdout
    assert f"last key {ROWS}" in proc.stdout

    proc = run(cli("status", str(out), "--json"))
    assert_ok(proc)
    s = json.loads(proc.stdout)
    assert s["state"] == "complete"
    assert s["rows"] == ROWS
    assert s["bytes"] == m["bytes"] == out.stat().st_size
    assert s["percent"] == 100.0
    assert s["chunks"] == len(m["chunks"]) == 10


def test_warning_for_a_fixed_chunk_size_that_makes_many_chunks(
    db: str, tmp_path: Path, run_sql: Callable[[str, str], object]
) -> None:
    """The planner believes the table has 10 million rows (its statistics are stale): with
    --chunk-rows 100 that is 100,000 chunks, and a warning says what it costs."""
    run_sql(
        db,
        "CREATE TABLE stale (id int PRIMARY KEY) WITH (autovacuum_enabled = false);"
        "INSERT INTO stale SELECT generate_series(1, 300); ANALYZE stale;"
        "UPDATE pg_class SET reltuples = 10000000 WHERE oid = 'stale'::regclass",
    )
    try:
        out = tmp_path / "stale.csv"
        proc = run(export_cmd(db, "stale", out, "--chunk-rows", "100"))
        assert_ok(proc)
        assert "--chunk-rows 100 makes about 100,000 chunks" in proc.stderr, proc.stderr
        assert read_manifest(out)["rows"] == 300  # a warning, nothing else changes
        quiet = run(export_cmd(db, "stale", tmp_path / "adaptive.csv"))
        assert_ok(quiet)
        assert "chunks" not in quiet.stderr  # adaptive chunk sizes never warn
    finally:
        run_sql(db, "DROP TABLE stale")


def test_status_of_nothing(tmp_path: Path) -> None:
    proc = run(cli("status", str(tmp_path / "never.csv")))
    assert_one_error_line(proc, 2, "never.csv")
    assert_nothing_created(tmp_path)


#: Run in an interpreter of its own: the command's end (``copystream.cli.run``) with a main that
#: leaves output unflushed, an exit handler, a thread still working and an object whose
#: finalizer would run at the interpreter's teardown.
ENDING = """
import atexit, concurrent.futures, os, sys, threading, time
import copystream.cli as c

class Teardown:
    def __init__(self, path, touch=open):
        self.path, self.touch = path, touch

    def __del__(self):
        self.touch(self.path, "w").close()

kept = Teardown(sys.argv[1] + ".teardown")
atexit.register(lambda: open(sys.argv[1] + ".atexit", "w").close())
idle = concurrent.futures.ThreadPoolExecutor(1)  # never shut down: its thread waits for work
idle.submit(print, end="")

def main():
    def late():
        time.sleep(0.3)
        open(sys.argv[1] + ".thread", "w").close()
    threading.Thread(target=late).start()
    sys.stdout.write("x" * 200_000)  # more than a pipe's buffer: not written yet
    sys.stdout.write("end")  # and buffered still, unless flushed at the end
    if sys.argv[2] == "full":
        os.dup2(os.open("/dev/full", os.O_WRONLY), 1)  # the output cannot be written
        sys.exit(0)
    sys.exit(3)

c.main = main
c.run()
"""


def test_the_command_ends_as_the_interpreter_would_but_without_its_teardown(
    tmp_path: Path,
) -> None:
    """``copystream`` ends with its exit code, its output written whole, other threads waited
    for (an executor left running let go) and exit handlers run, as a normal exit; but not the
    teardown of every object (a tenth of a small export's CPU), so a finalizer left to it does
    not run."""
    import subprocess
    import sys

    mark = str(tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (stdout buffered)
    command = [sys.executable, "-c", ENDING, mark]
    proc = subprocess.run([*command, "-"], capture_output=True, timeout=30, env=env, check=False)
    assert proc.returncode == 3, proc.stderr.decode()
    assert proc.stdout == b"x" * 200_000 + b"end"
    assert Path(mark + ".thread").exists() and Path(mark + ".atexit").exists()
    assert not Path(mark + ".teardown").exists()
    # an output that cannot be written: said, and exit status 120, as the interpreter does
    full = subprocess.run([*command, "full"], capture_output=True, timeout=30, env=env)
    assert full.returncode == 120
    assert b"copystream: error: writing the output failed" in full.stderr
