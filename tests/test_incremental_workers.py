"""Incremental exports with ``--workers`` (issue 16), against the real server and psql.

* an increment appended by key is split into key ranges after the output's last key, run in
  worker processes and joined: the file is psql's full export after each round, byte for byte
  (plain with a header, and zstd), its manifest's history adds up, it verifies;
* an increment to a file of its own (``--since``) is a parallel export of the keys after its
  predecessor's: psql's export of those rows;
* a worker SIGKILLed mid-increment is restarted from its range's checkpoint, and a coordinator
  SIGKILLed mid-increment resumes on the next run: the same bytes as an uninterrupted one,
  recorded once;
* a watermark export stays with one worker, and says so.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    assert_ok,
    cli,
    export_cmd,
    manifest_file,
    read_manifest,
    run,
)
from test_incremental import DDL, PsqlCsv, RunSql, full_csv, insert, stored
from test_parallel import kill_coordinator, started, wait_until, worker_processes

import copystream
from copystream.checkpoint import load_checkpoint
from copystream.ranges import part_path

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)


def range_chunks(out: Path, n: int) -> int:
    """Chunks the key ranges' checkpoints record now (0 for a range without one)."""
    cps = [load_checkpoint(part_path(out, i)) for i in range(n)]
    return sum(len(cp.chunks) for cp in cps if cp is not None)


def range_counts(out: Path, n: int) -> list[int]:
    """The chunks each key range's checkpoint records now (0 for a range without one)."""
    cps = [load_checkpoint(part_path(out, i)) for i in range(n)]
    return [0 if cp is None else len(cp.chunks) for cp in cps]


def leftovers(out: Path) -> list[str]:
    """Files of an unfinished export beside ``out``."""
    names = (p.name for p in out.parent.iterdir() if p.name.startswith(out.name))
    return sorted(n for n in names if ".part" in n or "checkpoint" in n)


@pytest.mark.parametrize(("name", "header"), [("ev.csv", True), ("ev.csv.zst", False)])
def test_parallel_increments_equal_a_full_export(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, name: str, header: bool
) -> None:
    """A full export, then three rounds of inserts and ``incremental`` with two workers: the
    file is psql's full export each time, every increment ran as two key ranges, and the
    manifest's history adds up to the file."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out = tmp_path / name
    opts: dict[str, Any] = {"chunk_rows": 400, "header": header}
    copystream.export_table(dsn, "ev", out, workers=2, **opts)
    for round_, (lo, hi) in enumerate([(3001, 5000), (5001, 5001), (5002, 9000)], start=1):
        insert(run_sql, dsn, lo, hi)
        r = copystream.export_table(dsn, "ev", out, incremental=True, workers=2, **opts)
        assert stored(out) == full_csv(psql_csv, dsn, header=header), f"round {round_}"
        assert r.increment is not None and r.increment["rows"] == hi - lo + 1
        assert r.increment["after"] == [str(lo - 1)] and r.increment["last_key"] == [str(hi)]
        m = read_manifest(out)
        assert m["workers"] == (1 if lo == hi else 2)  # one new row: one range
        history = m["increments"]
        assert len(history) == round_ + 1
        assert sum(h["rows"] for h in history) == m["rows"] == hi
        assert sum(h["bytes"] for h in history) == m["bytes"] == out.stat().st_size
        assert m["started_at"] == history[0]["started_at"]  # the first export's
        assert copystream.verify_file(out, deep=True).rows == hi
        assert leftovers(out) == []


def test_a_parallel_since_increment_is_the_rows_after(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """``--since`` with two workers writes the rows after the previous export's last key,
    as psql exports them; the chain verifies."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    d0, d1 = tmp_path / "d0.csv", tmp_path / "d1.csv"
    assert_ok(run(export_cmd(dsn, "ev", d0, "--chunk-rows", "300")))
    insert(run_sql, dsn, 2001, 8000)
    cmd = export_cmd(dsn, "ev", d1, "--since", str(manifest_file(d0)), "--workers", "2",
                     "--chunk-rows", "300")  # fmt: skip
    proc = run(cmd)
    assert_ok(proc)
    assert "one worker" not in proc.stderr
    assert d1.read_bytes() == psql_csv(dsn, "SELECT * FROM ev WHERE id > 2000 ORDER BY id")
    m = read_manifest(d1)
    assert m["workers"] == 2 and m["since"]["last_key"] == ["2000"] and m["rows"] == 6000
    assert_ok(run(cli("verify", "--chain", str(d0), str(d1))))
    again = run(cmd)
    assert_ok(again)
    assert "already complete" in again.stdout


def test_killed_workers_and_coordinator_resume_an_increment_identically(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """An increment with two workers: one worker SIGKILLed (restarted from its range's
    checkpoint), then the coordinator SIGKILLed (its workers die with it); the same command
    again resumes every range: psql's full export, the increment recorded once."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    out = tmp_path / "ev.csv"
    assert_ok(run(export_cmd(dsn, "ev", out, "--chunk-rows", "500")))
    base = out.read_bytes()
    insert(run_sql, dsn, 2001, 80_000)
    cmd = export_cmd(dsn, "ev", out, "--incremental", "--workers", "2", "--chunk-rows", "300")

    def both_at_work() -> bool:
        first, second = range_counts(out, 2)
        return first >= 4 + 3 and second >= 3

    with started(cmd) as s:
        # both ranges at work (the first range's checkpoint starts with the 4 chunks of the
        # output it continues): a worker killed before it began its range dies unnoticed, its
        # range handed to another
        assert wait_until(s, both_at_work), s.stderr()
        victim = max(worker_processes(s.proc.pid), key=lambda p: p.create_time())
        done = range_chunks(out, 2)
        os.kill(victim.pid, signal.SIGKILL)
        # (the coordinator says so once it sees the death; other ranges may advance before)
        assert wait_until(
            s, lambda: range_chunks(out, 2) >= done + 4 and "was killed by SIGKILL" in s.stderr()
        ), s.stderr()
        kill_coordinator(s, out)
        err = s.stderr()
    assert s.proc.returncode == -signal.SIGKILL
    assert "was killed by SIGKILL" in err
    assert out.read_bytes()[: len(base)] == base  # the first range appends in place
    assert read_manifest(out)["rows"] == 2000  # the old manifest stays until the end
    again = run(cmd)
    assert_ok(again)
    assert "resuming at row" in again.stderr
    assert out.read_bytes() == full_csv(psql_csv, dsn)
    history = read_manifest(out)["increments"]
    assert [h["rows"] for h in history] == [2000, 78_000]
    assert_ok(run(cli("verify", str(out))))
    assert leftovers(out) == []


def test_a_watermark_export_runs_with_one_worker(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    """Splitting (watermark, key) is not sound while rows are updated: one worker, said."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 500)
    run_sql(dsn, "ALTER TABLE ev ALTER at SET NOT NULL; CREATE INDEX ON ev (at, id)")
    out = tmp_path / "w.csv"
    proc = run(export_cmd(dsn, "ev", out, "--watermark", "at", "--workers", "2"))
    assert_ok(proc)
    assert "a watermark export runs with one worker" in proc.stderr
    assert read_manifest(out)["workers"] == 1


def test_kills_at_random_times_resume_a_parallel_increment(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The increment's process group SIGKILLed again and again at random times (while it
    plans and saves its ranges, runs them, joins); every re-run of the same command resumes,
    and the last one ends with psql's full export, the increment recorded once, the old
    manifest valid until then."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out = tmp_path / "ev.csv"
    assert_ok(run(export_cmd(dsn, "ev", out, "--chunk-rows", "500")))
    insert(run_sql, dsn, 3001, 60_000)
    cmd = export_cmd(dsn, "ev", out, "--incremental", "--workers", "2", "--chunk-rows", "300")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for _ in range(5):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=rng.uniform(0.3, 3.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
            proc.wait(timeout=30)
        m = read_manifest(out)  # always a manifest: the old one, or the finished increment's
        assert m["rows"] in (3000, 60_000), f"seed {seed}"
    assert_ok(run(cmd))
    assert out.read_bytes() == full_csv(psql_csv, dsn), f"seed {seed}"
    # the increment recorded once; a run after it had finished adds an empty one (as always)
    rows = [h["rows"] for h in read_manifest(out)["increments"]]
    assert rows[:2] == [3000, 57_000] and not any(rows[2:]), f"seed {seed}: {rows}"
    assert_ok(run(cli("verify", str(out))))
    assert leftovers(out) == []


def test_an_edited_output_is_not_appended_to_by_workers(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """An output changed since its export (same size) is refused by a parallel increment as
    by a one-worker one: exit 2, the file, its manifest and the directory as they were."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    out = tmp_path / "ev.csv"
    assert_ok(run(export_cmd(dsn, "ev", out, "--chunk-rows", "500")))
    data = bytearray(out.read_bytes())
    data[100] ^= 1
    out.write_bytes(bytes(data))
    insert(run_sql, dsn, 2001, 9000)
    before = sorted(p.name for p in tmp_path.iterdir()), manifest_file(out).read_bytes()
    proc = run(export_cmd(dsn, "ev", out, "--incremental", "--workers", "2",
                          "--chunk-rows", "500"))  # fmt: skip
    # found as range 0 re-hashes the file, after the ranges were planned (an info line)
    errors = [x for x in proc.stderr.splitlines() if x.startswith("copystream: error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and "does not match its manifest" in errors[0], proc.stderr
    assert (sorted(p.name for p in tmp_path.iterdir()), manifest_file(out).read_bytes()) == before
    assert out.read_bytes() == bytes(data)
