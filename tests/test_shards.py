"""The shard API: plan_shards → run_shard (anywhere, any order, again) → finish_shards.

Each shard here runs as an engine would run it: in a process of its own that knows only the
plan's JSON file (``OUTPUT.shards.json``) and gets the password from the environment. The
result must be byte for byte psql's, a killed shard must resume from its checkpoint, and every
call must be idempotent. The shard API shares its files with ``workers``: an export planned as
shards is finished by ``export_table(workers=...)`` too.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import read_manifest, shard_process

import copystream
from copystream import ShardPlan, UsageError, finish_shards, plan_shards, run_shard
from copystream.errors import ExportFailed

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

ROWS = 30_000
SECRET = "n0t-a-real-Passw0rd"
QUERY = "SELECT * FROM t ORDER BY id"


def make_table(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE t (id int PRIMARY KEY, v text, d date);
            INSERT INTO t SELECT g, md5(g::text), date '2020-01-01' + g % 1000
            FROM generate_series(1, {ROWS}) g;""",
    )


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_three_shards_in_their_own_processes_equal_psql(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    plan = plan_shards(f"{dsn} password={SECRET}", "t", out, shards=3, chunk_rows=2_000)
    plan_file = out.with_name("t.csv.shards.json")
    kept = plan_file.read_text()
    assert SECRET not in kept and "password" not in kept
    assert ShardPlan.of(json.loads(kept)) == plan == ShardPlan.of(plan_file)
    assert plan.shards == 3 and plan.table == "public.t"
    assert (tmp_path / "t.csv.parts.json").exists()  # the same plan of ranges as --workers
    # shard 1 killed after two chunks, then run again: it resumes from its checkpoint
    assert shard_process(plan_file, 1, kill_after_chunks=2) == -signal.SIGKILL
    cp = json.loads((tmp_path / "t.csv.part-0001.checkpoint.json").read_text())
    assert len(cp["chunks"]) >= 1 and not cp["finished"]
    assert shard_process(plan_file, 2) == 0
    assert shard_process(plan_file, 0) == 0
    with pytest.raises(ExportFailed, match=r"shard\(s\) 1 of 3 .* not finished"):
        finish_shards(plan)
    resumed = run_shard(plan.to_json(), 1)
    assert resumed.resumed and not resumed.already_complete and resumed.rows > 0
    again = run_shard(plan, 1)  # idempotent: finished, nothing to do
    assert again.already_complete and again.rows == resumed.rows
    result = finish_shards(plan)
    assert out.read_bytes() == psql_csv(dsn, QUERY)
    assert result.rows == ROWS and result.xxh3_128 == read_manifest(out)["xxh3_128"]
    assert read_manifest(out)["workers"] == 3
    copystream.verify_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv", "t.csv.manifest.json"]
    # after the end, every call returns at once
    assert run_shard(plan, 2).already_complete
    assert finish_shards(plan).already_complete


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_finish_names_the_shards_not_run(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    plan = plan_shards(dsn, "t", out, shards=3)
    run_shard(plan, 1)
    with pytest.raises(ExportFailed, match=r"shard\(s\) 0, 2 of 3 of .* are not finished"):
        finish_shards(plan)
    assert not (tmp_path / "t.csv.manifest.json").exists()


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_a_shard_plan_is_finished_by_workers_too(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """One mechanism: the ranges a shard plan recorded are what --workers resumes."""
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    plan = plan_shards(dsn, "t", out, shards=2, chunk_rows=5_000)
    run_shard(plan, 0)
    result = copystream.export_table(dsn, "t", out, chunk_rows=5_000, workers=2)
    assert result.resumed and result.rows == ROWS
    assert out.read_bytes() == psql_csv(dsn, QUERY)


def test_planning_again_returns_the_same_plan(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    first = plan_shards(dsn, "t", out, shards=4, header=True)
    parts = (tmp_path / "t.csv.parts.json").read_bytes()
    assert plan_shards(dsn, "t", out, shards=4, header=True) == first
    assert (tmp_path / "t.csv.parts.json").read_bytes() == parts
    assert first.options == {"header": True}
    fresh = plan_shards(dsn, "t", out, shards=1, header=True, restart=True)
    assert fresh.shards == 1 and fresh.started_at != first.started_at
    assert "restart" not in fresh.options
    with pytest.raises(copystream.CheckpointMismatch, match="planned again"):
        run_shard(first, 0)
    run_shard(fresh, 0)
    assert finish_shards(fresh).rows == ROWS


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"consistent": True}, "cannot hold one snapshot across shards"),
        ({"workers": 2}, "workers does not apply to a shard plan"),
        ({"shards": 0}, "shards: expected an integer >= 1"),
        ({"metrics_file": "m.prom"}, "metrics_file would be written by every shard"),
    ],
)
def test_refused_before_anything_is_written(
    dsn: str, run_sql: RunSql, tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    make_table(dsn, run_sql)
    kwargs = {"shards": 2, **options}
    with pytest.raises(UsageError, match=message):
        plan_shards(dsn, "t", tmp_path / "t.csv", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_a_shard_that_does_not_exist(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    make_table(dsn, run_sql)
    plan = plan_shards(dsn, "t", tmp_path / "t.csv", shards=2)
    with pytest.raises(UsageError, match="shard 2 does not exist"):
        run_shard(plan, 2)


def test_status_watch_follows_the_shards_until_the_end(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """``copystream status PLAN --watch`` reads the checkpoints: a frame per interval, a line
    per shard, and it ends by itself when the export is complete."""
    from copystream.watch import range_states

    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    plan = plan_shards(dsn, "t", out, shards=3, chunk_rows=3_000)
    run_shard(plan, 1)
    status, states = range_states(tmp_path / "t.csv.shards.json")
    assert status.state == "in progress" and status.ranges == 3
    assert [s.state for s in states] == ["not started", "finished", "not started"]
    assert states[1].rows == status.rows > 0 and states[1].chunks >= 3
    watcher = subprocess.Popen(
        [sys.executable, "-m", "copystream", "status", str(tmp_path / "t.csv.shards.json"),
         "--watch", "--interval", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()  # the first frame is drawn before the shards go on
        assert first.startswith(f"{out}: in progress; public.t; "), first
        run_shard(plan, 0)
        run_shard(plan, 2)
        finish_shards(plan)
        # read through the same buffer as the first line (communicate() would skip what
        # readline() already buffered: the rest of the first frame)
        stdout = watcher.stdout.read()
        watcher.wait(timeout=60)
        stderr = watcher.stderr.read() if watcher.stderr is not None else ""
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr
    frames = (first + stdout).split(f"{out}: ")
    assert "shard  state" in stdout and "    1  finished" in stdout, (first, stdout)
    assert frames[-1].startswith(f"complete; public.t; {ROWS:,} rows (100%)")


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_workers_run_their_ranges_through_the_shards_entry_point(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """One mechanism: ``workers`` runs each range as ``run_shard`` does (``ranges.run_range``,
    under the range's own lock). A range whose lock another process holds (here: this test,
    as a shard would) is refused in the pool and the other range still runs; once free, the
    shard API and ``workers`` finish the same export."""
    make_table(dsn, run_sql)
    out = tmp_path / "t.csv"
    plan = plan_shards(dsn, "t", out, shards=2, chunk_rows=5_000)
    fd = os.open(tmp_path / "t.csv.part-0001.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=r"another copystream process .*t\.csv\.part-0001"):
            copystream.export_table(dsn, "t", out, chunk_rows=5_000, workers=2)
        with pytest.raises(UsageError, match=r"another copystream process .*t\.csv\.part-0001"):
            run_shard(plan, 1)
    finally:
        os.close(fd)
    assert run_shard(plan, 0).already_complete  # the pool ran it: its checkpoint is finished
    assert not run_shard(plan, 1).already_complete
    assert finish_shards(plan).rows == ROWS
    assert out.read_bytes() == psql_csv(dsn, QUERY)


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_parquet_shards_have_the_values_of_a_single_worker_export(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """Shards to a Parquet dataset: each shard is a range writing its own part files
    (``part-RRRR-NNNNN.parquet``, as ``workers`` does); a killed shard resumes; finishing
    moves nothing and writes the manifest. The values equal a one-worker export's."""
    import pyarrow.dataset as ds

    make_table(dsn, run_sql)
    single = tmp_path / "single.parquet"
    copystream.export_table(dsn, "t", single, format="parquet")
    out = tmp_path / "t.parquet"
    plan = plan_shards(dsn, "t", out, shards=3, format="parquet", chunk_rows=2_000)
    plan_file = tmp_path / "t.parquet.shards.json"
    assert plan.options == {"format": "parquet", "chunk_rows": 2_000}
    assert shard_process(plan_file, 2, kill_after_chunks=2) == -signal.SIGKILL
    for i in range(3):
        assert shard_process(plan_file, i) == 0
    result = finish_shards(plan)
    assert result.rows == ROWS and finish_shards(plan).already_complete
    m = read_manifest(out)
    names = [p["file"] for p in m["parts"]]
    assert m["workers"] == 3 and names == sorted(os.listdir(out))
    assert {n[: len("part-0000")] for n in names} == {"part-0000", "part-0001", "part-0002"}
    assert ds.dataset(out).to_table().equals(ds.dataset(single).to_table())
    copystream.verify_file(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "single.parquet", "single.parquet.manifest.json", "t.parquet", "t.parquet.manifest.json"
    ]  # fmt: skip
