"""Crash and resume: SIGKILL a real ``copystream export`` process, run it again, compare with psql.

The kill comes at a point of progress read from the outside (the checkpoint's chunk count or the
output's size), never after a fixed delay, except in the random-time tests. After every kill the
same command is run again: the file must be byte for byte psql's output, the second run must
continue from the checkpoint (its chunks kept as they were, at most two chunks of work redone:
the one whose commit was in flight and the one streamed meanwhile),
and the manifest must say it resumed.

Then the refusals: a damaged or truncated output, a checkpoint made for another export, an
existing output without a checkpoint. Each exits 2 with one line naming the problem and leaves
every file byte for byte as it was.
"""

from __future__ import annotations

import os
import random
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import (
    Killed,
    assert_ok,
    assert_one_error_line,
    checkpoint_file,
    export_cmd,
    kill_export,
    manifest_file,
    read_manifest,
    run,
    scratch_database,
    snapshot,
)

import copystream
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]

BIG_ROWS = 300_000
#: The small table of the refusal tests: 200 chunks of 100 rows.
SMALL_ROWS = 20_000

SCHEMA = f"""
CREATE TABLE big (id bigint PRIMARY KEY, name text, ts timestamptz, d date, amount numeric(12,2),
                  flag bool, note text);
INSERT INTO big SELECT g, 'name ' || g,
        timestamptz '2020-01-01 00:00:00+00' + g * interval '37.123 seconds',
        date '2000-01-01' + (g % 9000), (g * 7.31)::numeric(12,2), g % 3 = 0,
        CASE WHEN g % 10 = 0 THEN NULL WHEN g % 10 = 1 THEN '' ELSE E'line\\n"q",' || g END
    FROM generate_series(1, {BIG_ROWS}) g;
CREATE TABLE t (id int PRIMARY KEY, code text NOT NULL UNIQUE, v text, n int);
INSERT INTO t SELECT g, 'c' || (g * 7919 % {SMALL_ROWS}), E'v,"' || g || E'"\\n', g % 97
    FROM generate_series(1, {SMALL_ROWS}) g;
CREATE TABLE t2 (id int PRIMARY KEY, v text);
INSERT INTO t2 SELECT g, 'other' FROM generate_series(1, 100) g;
ANALYZE;
"""

BIG_QUERY = "SELECT * FROM big ORDER BY id"
T_QUERY = "SELECT * FROM t ORDER BY id"


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    """One database with the tables of this module (they are only read)."""
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


_REFERENCE: dict[tuple[Any, ...], bytes] = {}


@pytest.fixture
def reference(psql_csv: PsqlCsv) -> Callable[..., bytes]:
    """``psql_csv`` with its answers cached for the module's read-only tables."""

    def get(
        dsn: str, query: str, options: str = "FORMAT csv", env: dict[str, str] | None = None
    ) -> bytes:
        k = (dsn, query, options, tuple(sorted((env or {}).items())))
        if k not in _REFERENCE:
            _REFERENCE[k] = psql_csv(dsn, query, options, env=env)
        return _REFERENCE[k]

    return get


# -- helpers ----------------------------------------------------------------------------------


def check_killed(k: Killed, expected: bytes, data: bytes, *, min_chunks: int = 0) -> dict[str, Any]:
    """The killed export left a valid checkpoint and a file whose committed prefix is right."""
    assert k.returncode == -9, k.stderr
    cp = k.checkpoint
    assert cp is not None, "no checkpoint after the kill"
    assert not cp["finished"], "the export finished before the kill"
    assert len(cp["chunks"]) >= min_chunks
    offset = cp["offset"]
    assert offset == sum(c["bytes"] for c in cp["chunks"])
    assert cp["rows"] == sum(c["rows"] for c in cp["chunks"])
    assert len(data) == k.size >= offset
    assert data[:offset] == expected[:offset]  # everything committed is final
    # beyond the checkpoint: at most the beginning of the next chunk, never anything else
    assert data[offset:] == expected[offset : len(data)]
    return cp


def check_resumed(
    out: Path,
    proc_stdout: str,
    proc_stderr: str,
    cp: dict[str, Any],
    size_at_kill: int,
    expected: bytes,
    rows: int,
) -> dict[str, Any]:
    """The re-run continued from ``cp``: same committed chunks, two chunks of rework at most."""
    assert out.read_bytes() == expected
    assert not checkpoint_file(out).exists()
    m = read_manifest(out)
    assert m["resumed"] is True
    assert m["rows"] == rows
    assert "(resumed)" in proc_stdout
    assert f"resuming at row {cp['rows']:,}, byte {cp['offset']}" in proc_stderr
    n = len(cp["chunks"])
    assert m["chunks"][:n] == cp["chunks"]  # committed chunks were kept, not redone
    assert m["settings"] == cp["settings"]
    assert m["started_at"] == cp["started_at"]
    if n < len(m["chunks"]):
        nxt = m["chunks"][n]
        assert nxt["offset"] == cp["offset"]
        # bytes written after the last checkpoint, thrown away and redone: within two chunks,
        # the one whose commit was in flight (its fsync, then the checkpoint) and the next one,
        # which streams meanwhile and then waits for that commit before its own
        assert size_at_kill - cp["offset"] <= sum(c["bytes"] for c in m["chunks"][n : n + 2])
    copystream.verify_file(out)
    assert_no_litter(out)
    return m


def assert_no_litter(out: Path) -> None:
    """Only the output and its manifest remain (no checkpoint, no temporary files)."""
    mine = [n for n in snapshot(out.parent) if out.name in n]
    assert sorted(mine) == [out.name, manifest_file(out).name]


def count_rows(dsn: str, query: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM ({query}) q").fetchone()
    assert row is not None
    return int(row[0])


def kill_and_resume(
    dsn: str,
    out: Path,
    expected: bytes,
    extra: list[str],
    *,
    min_chunks: int | None = None,
    min_bytes: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    cmd = export_cmd(dsn, "big", out, *extra)
    k = kill_export(cmd, out, min_chunks=min_chunks, min_bytes=min_bytes)
    data = out.read_bytes()
    cp = check_killed(k, expected, data, min_chunks=min_chunks or 0)
    proc = run(cmd)
    assert_ok(proc)
    m = check_resumed(out, proc.stdout, proc.stderr, cp, k.size, expected, BIG_ROWS)
    return cp, m


# -- SIGKILL and resume -----------------------------------------------------------------------


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
@pytest.mark.parametrize("chunks", [1, 3, 60], ids=lambda n: f"after-{n}-chunks")
def test_sigkill_after_chunks_then_resume(
    db: str, reference: Callable[..., bytes], tmp_path: Path, chunks: int
) -> None:
    expected = reference(db, BIG_QUERY)
    out = tmp_path / "big.csv"
    cp, m = kill_and_resume(db, out, expected, ["--chunk-rows", "2000"], min_chunks=chunks)
    assert len(m["chunks"]) == BIG_ROWS // 2000
    assert all(c["rows"] == 2000 for c in m["chunks"])
    assert cp["rows"] == 2000 * len(cp["chunks"])
    assert cp["last_key"] == [str(cp["rows"])]


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_sigkill_inside_first_chunk_then_resume(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    """Killed with megabytes of an uncommitted first chunk on disk: they are cut and redone."""
    expected = reference(db, BIG_QUERY)
    out = tmp_path / "big.csv"
    cp, m = kill_and_resume(
        db, out, expected, ["--chunk-rows", "100000"], min_bytes=3 * 1024 * 1024
    )
    assert cp["chunks"] == [] and cp["offset"] == 0
    assert len(m["chunks"]) == 3


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_sigkill_mid_chunk_by_size_then_resume(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    """Killed when the file reaches a size that is in the middle of the third chunk."""
    expected = reference(db, BIG_QUERY)
    out = tmp_path / "big.csv"
    per_chunk = len(expected) // 6  # six chunks of 50,000 rows: roughly this many bytes each
    cp, _ = kill_and_resume(
        db, out, expected, ["--chunk-rows", "50000"], min_bytes=2 * per_chunk + per_chunk // 2
    )
    assert len(cp["chunks"]) in (2, 3)


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_sigkill_at_random_times(db: str, reference: Callable[..., bytes], tmp_path: Path) -> None:
    """Killed at any moment (even before the first checkpoint, or while finishing)."""
    expected = reference(db, BIG_QUERY)
    rng = random.Random(20240229)
    for attempt in range(2):
        out = tmp_path / f"big{attempt}.csv"
        random_kill_and_resume(db, out, expected, rng.uniform(0.0, 1.5), ["--chunk-rows", "2000"])


def random_kill_and_resume(
    dsn: str, out: Path, expected: bytes, delay: float, extra: list[str]
) -> None:
    cmd = export_cmd(dsn, "big", out, *extra)
    k = kill_export(cmd, out, after_seconds=delay)
    cp = k.checkpoint
    if k.returncode == 0:  # finished before the kill: a re-run has nothing to do
        proc = run(cmd)
        assert_ok(proc)
        assert "already complete" in proc.stdout
        assert out.read_bytes() == expected
        return
    assert k.returncode == -9
    if cp is not None and not cp["finished"]:
        check_killed(k, expected, out.read_bytes())
    proc = run(cmd)
    assert_ok(proc)
    assert out.read_bytes() == expected, f"killed after {delay:.3f}s"
    assert not checkpoint_file(out).exists()
    m = read_manifest(out)
    if cp is None:  # killed before the export began: the re-run is a fresh start
        assert m["resumed"] is False
    else:
        assert m["resumed"] is True
        assert m["chunks"][: len(cp["chunks"])] == cp["chunks"]
        assert m["settings"] == cp["settings"]
    copystream.verify_file(out)
    assert_no_litter(out)


@pytest.mark.slow
def test_sigkill_at_many_random_times(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    expected = reference(db, BIG_QUERY)
    rng = random.Random(7)
    for attempt in range(12):
        out = tmp_path / f"big{attempt}.csv"
        extra = ["--chunk-rows", str(rng.choice([700, 2000, 7000, 60000]))]
        random_kill_and_resume(db, out, expected, rng.uniform(0.0, 3.0), extra)


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_repeated_kills_one_file(db: str, reference: Callable[..., bytes], tmp_path: Path) -> None:
    """Killed again and again while resuming (with a new chunk size each time), then finished."""
    expected = reference(db, BIG_QUERY)
    out = tmp_path / "big.csv"
    kept: list[dict[str, Any]] = []  # the chunks committed so far
    started_at = None
    for rows in ["1000", "1500", "3000"]:
        cmd = export_cmd(db, "big", out, "--chunk-rows", rows)
        k = kill_export(cmd, out, min_chunks=len(kept) + 5)
        cp = check_killed(k, expected, out.read_bytes(), min_chunks=len(kept) + 5)
        assert cp["chunks"][: len(kept)] == kept
        assert all(c["rows"] == int(rows) for c in cp["chunks"][len(kept) :])
        assert started_at in (None, cp["started_at"])  # still the first run's export
        started_at = cp["started_at"]
        kept = cp["chunks"]
    proc = run(export_cmd(db, "big", out, "--chunk-rows", "5000"))
    assert_ok(proc)
    check_resumed(out, proc.stdout, proc.stderr, cp, k.size, expected, BIG_ROWS)


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_sigint_exits_1_and_resumes(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    """Ctrl-C: exit 1, a one-line hint to run again, no traceback; the re-run resumes."""
    expected = reference(db, T_QUERY)
    out = tmp_path / "t.csv"
    # 200 chunks: far more left after the kill point than a descheduled test runner can miss
    cmd = export_cmd(db, "t", out, "--chunk-rows", "100")
    k = kill_export(cmd, out, min_chunks=3, sig=signal.SIGINT)
    assert k.returncode == 1, k.stderr
    assert "Traceback" not in k.stderr
    last = k.stderr.strip().splitlines()[-1]
    assert last.startswith("copystream: error: ") and "run the same command again" in last
    cp = k.checkpoint
    assert cp is not None and len(cp["chunks"]) >= 3 and not cp["finished"]
    data = out.read_bytes()
    assert data[: cp["offset"]] == expected[: cp["offset"]]
    proc = run(cmd)
    assert_ok(proc)
    m = check_resumed(out, proc.stdout, proc.stderr, cp, k.size, expected, SMALL_ROWS)
    # Ctrl-C waits for the commit in flight: past the checkpoint, only the chunk it stopped
    n = len(cp["chunks"])
    assert k.size - cp["offset"] <= m["chunks"][n]["bytes"]


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_resume_in_another_environment_keeps_first_settings(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    """The first run's TimeZone and DateStyle are pinned: one file never mixes formats."""
    first = {"PGTZ": "UTC", "PGDATESTYLE": "ISO"}
    second = {"PGTZ": "Asia/Tokyo", "PGDATESTYLE": "SQL, DMY"}
    expected = reference(db, BIG_QUERY, env=first)
    assert expected != reference(db, BIG_QUERY, env=second)  # the environment matters
    out = tmp_path / "big.csv"
    cmd = export_cmd(db, "big", out, "--chunk-rows", "2000")
    k = kill_export(cmd, out, min_chunks=5, env=first)
    cp = check_killed(k, expected, out.read_bytes(), min_chunks=5)
    assert cp["settings"]["TimeZone"] == "UTC"
    assert cp["settings"]["DateStyle"].startswith("ISO")
    proc = run(cmd, env=second)
    assert_ok(proc)
    m = check_resumed(out, proc.stdout, proc.stderr, cp, k.size, expected, BIG_ROWS)
    assert m["settings"]["TimeZone"] == "UTC"


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
@pytest.mark.parametrize(
    ("extra", "query", "options"),
    [
        (["--header"], T_QUERY, "FORMAT csv, HEADER true"),
        (["--where", "n > 10", "--columns", "v,id"], "SELECT v, id FROM t WHERE n > 10 ORDER BY id",
         "FORMAT csv"),
        (["--format", "text", "--null", "<NULL>"], T_QUERY, "FORMAT text, NULL '<NULL>'"),
    ],
    ids=["header", "where-columns", "text-format"],
)  # fmt: skip
def test_sigkill_then_resume_with_options(
    db: str,
    reference: Callable[..., bytes],
    tmp_path: Path,
    extra: list[str],
    query: str,
    options: str,
) -> None:
    """The header is written once, the filter and column list hold across the resume."""
    expected = reference(db, query, options)
    out = tmp_path / "t.csv"
    cmd = export_cmd(db, "t", out, "--chunk-rows", "500", *extra)
    k = kill_export(cmd, out, min_chunks=3)
    cp = check_killed(k, expected, out.read_bytes(), min_chunks=3)
    proc = run(cmd)
    assert_ok(proc)
    check_resumed(
        out,
        proc.stdout,
        proc.stderr,
        cp,
        k.size,
        expected,
        rows=count_rows(db, query),
    )


def test_resume_removes_stale_temporary_files(db: str, tmp_path: Path) -> None:
    """A SIGKILL inside the checkpoint's atomic write leaves its temporary file behind (about
    one random kill in five did); the next run must not leave it there for ever."""
    out = tmp_path / "t.csv"
    interrupted(db, out)
    # what a process killed between mkstemp and rename leaves: a half-written temporary file
    (tmp_path / ".t.csv.checkpoint.json.k3x9a1_q.tmp").write_bytes(b'{"version": 1, "ki')
    assert_ok(run(export_cmd(db, "t", out, "--chunk-rows", "5000")))
    assert sorted(snapshot(tmp_path)) == ["t.csv", "t.csv.manifest.json"]


# -- refusals ---------------------------------------------------------------------------------


def interrupted(dsn: str, out: Path, *extra: str, table: str = "t") -> dict[str, Any]:
    """An export of ``table`` SIGKILLed after at least 3 committed chunks of 100 rows."""
    k = kill_export(export_cmd(dsn, table, out, "--chunk-rows", "100", *extra), out, min_chunks=3)
    assert k.returncode == -9
    assert k.checkpoint is not None and len(k.checkpoint["chunks"]) >= 3
    return k.checkpoint


def test_corrupted_prefix_is_refused_then_restart(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    out = tmp_path / "t.csv"
    cp = interrupted(db, out)
    c1 = cp["chunks"][1]
    data = bytearray(out.read_bytes())
    pos = c1["offset"] + c1["bytes"] // 2
    data[pos] ^= 0x01
    out.write_bytes(bytes(data))
    # a temporary checkpoint file as a kill mid-write leaves it: not cleaned by a refused run
    (tmp_path / ".t.csv.checkpoint.json.k1ll3d_0.tmp").write_bytes(b'{"version":1,')
    before = snapshot(tmp_path)

    cmd = export_cmd(db, "t", out, "--chunk-rows", "100")
    proc = run(cmd)
    assert_one_error_line(proc, 2, str(out), "chunk 1", "modified", "--restart")
    assert snapshot(tmp_path) == before  # nothing changed, not even the tail

    proc = run([*cmd, "--restart", "--chunk-rows", "5000"])
    assert_ok(proc)
    assert out.read_bytes() == reference(db, T_QUERY)
    assert read_manifest(out)["resumed"] is False
    assert not checkpoint_file(out).exists()


@pytest.mark.parametrize("cut", ["inside-committed", "to-nothing"])
def test_truncated_output_is_refused(
    db: str, reference: Callable[..., bytes], tmp_path: Path, cut: str
) -> None:
    out = tmp_path / "t.csv"
    cp = interrupted(db, out)
    size = cp["chunks"][2]["offset"] + 5 if cut == "inside-committed" else 0
    os.truncate(out, size)
    before = snapshot(tmp_path)
    cmd = export_cmd(db, "t", out, "--chunk-rows", "100")
    proc = run(cmd)
    assert_one_error_line(proc, 2, str(out), "truncated", "--restart")
    assert snapshot(tmp_path) == before
    assert_ok(run([*cmd, "--restart", "--chunk-rows", "5000"]))
    assert out.read_bytes() == reference(db, T_QUERY)


def test_missing_output_with_checkpoint_is_refused(db: str, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    interrupted(db, out)
    out.unlink()
    before = snapshot(tmp_path)
    proc = run(export_cmd(db, "t", out))
    assert_one_error_line(proc, 2, str(out), "missing", "--restart")
    assert snapshot(tmp_path) == before


def test_damaged_checkpoint_is_refused(db: str, tmp_path: Path) -> None:
    out = tmp_path / "t.csv"
    interrupted(db, out)
    cpf = checkpoint_file(out)
    raw = cpf.read_bytes()
    damaged = re.sub(rb'("rows":\s*)(\d)', rb"\g<1>1\2", raw, count=1)  # rows N -> 1N
    assert damaged != raw
    cpf.write_bytes(damaged)
    before = snapshot(tmp_path)
    proc = run(export_cmd(db, "t", out))
    assert_one_error_line(proc, 2, str(cpf), "--restart")
    assert snapshot(tmp_path) == before


@pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)
def test_uncommitted_tail_is_cut_on_resume(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    """Bytes after the checkpoint's offset (a chunk that never committed) are discarded.

    The resumed run also uses a bigger chunk size: only the export's identity must match.
    """
    out = tmp_path / "t.csv"
    cp = interrupted(db, out)
    with out.open("r+b") as f:
        f.truncate(cp["offset"])
        f.seek(0, os.SEEK_END)
        f.write(b'999999,junk,"half a ro')
    proc = run(export_cmd(db, "t", out, "--chunk-rows", "5000"))
    assert_ok(proc)
    assert out.read_bytes() == reference(db, T_QUERY)
    m = read_manifest(out)
    n = len(cp["chunks"])
    assert m["chunks"][:n] == cp["chunks"]
    assert m["chunks"][n]["offset"] == cp["offset"]
    assert m["chunks"][n]["rows"] == 5000


MISMATCHES = {
    "table": (["t2"], "table", "SELECT * FROM t2 ORDER BY id"),
    "where": (["t", "--where", "n > 10"], "where", "SELECT * FROM t WHERE n > 10 ORDER BY id"),
    "columns": (["t", "--columns", "id,v"], "columns", "SELECT id, v FROM t ORDER BY id"),
    "key": (["t", "--key", "code"], "key", "SELECT * FROM t ORDER BY code"),
    "header": (["t", "--header"], "options", None),
}


@pytest.mark.parametrize("what", list(MISMATCHES))
def test_checkpoint_for_another_export_is_refused(
    db: str, reference: Callable[..., bytes], tmp_path: Path, what: str
) -> None:
    args, field, query = MISMATCHES[what]
    out = tmp_path / "t.csv"
    interrupted(db, out)
    before = snapshot(tmp_path)
    table, *extra = args
    cmd = export_cmd(db, table, out, "--chunk-rows", "100", *extra)
    proc = run(cmd)
    line = assert_one_error_line(proc, 2, "another export", f"({field} was", "--restart")
    assert str(checkpoint_file(out)) in line
    assert snapshot(tmp_path) == before

    proc = run([*cmd, "--restart", "--chunk-rows", "5000"])
    assert_ok(proc)
    if query is None:
        expected = reference(db, T_QUERY, "FORMAT csv, HEADER true")
    else:
        expected = reference(db, query)
    assert out.read_bytes() == expected
    assert read_manifest(out)["resumed"] is False


def test_existing_output_without_checkpoint(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    out = tmp_path / "t.csv"
    out.write_bytes(b"precious data\n")
    before = snapshot(tmp_path)
    cmd = export_cmd(db, "t", out)
    proc = run(cmd)
    assert_one_error_line(proc, 2, str(out), "exists", "--force")
    assert snapshot(tmp_path) == before

    proc = run([*cmd, "--force"])
    assert_ok(proc)
    assert out.read_bytes() == reference(db, T_QUERY)
    assert read_manifest(out)["rows"] == SMALL_ROWS

    # a finished export is not overwritten by a *different* one either
    before = snapshot(tmp_path)
    proc = run(export_cmd(db, "t", out, "--where", "n = 1"))
    assert_one_error_line(proc, 2, str(out), "--force")
    assert snapshot(tmp_path) == before


def test_rerun_of_completed_export_is_a_no_op(
    db: str, reference: Callable[..., bytes], tmp_path: Path
) -> None:
    out = tmp_path / "t.csv"
    cmd = export_cmd(db, "t", out, "--chunk-rows", "5000")
    assert_ok(run(cmd))
    assert out.read_bytes() == reference(db, T_QUERY)
    before = snapshot(tmp_path)
    times = {p: os.stat(p).st_mtime_ns for p in (out, manifest_file(out))}

    proc = run(cmd)
    assert_ok(proc)
    assert "already complete" in proc.stdout
    assert f"{SMALL_ROWS:,} rows" in proc.stdout
    assert snapshot(tmp_path) == before
    assert {p: os.stat(p).st_mtime_ns for p in times} == times
    assert not checkpoint_file(out).exists()

    # the library says so too
    result = copystream.export_table(db, "t", out, chunk_rows=5000)
    assert result.already_complete and not result.resumed
    assert result.rows == SMALL_ROWS
    assert snapshot(tmp_path) == before


def test_rerun_after_output_was_edited_is_refused(db: str, tmp_path: Path) -> None:
    """A finished file that no longer verifies is not silently overwritten."""
    out = tmp_path / "t.csv"
    cmd = export_cmd(db, "t", out, "--chunk-rows", "5000")
    assert_ok(run(cmd))
    data = bytearray(out.read_bytes())
    data[10] ^= 0x20
    out.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    proc = run(cmd)
    assert_one_error_line(proc, 2, str(out), "--force")
    assert snapshot(tmp_path) == before
