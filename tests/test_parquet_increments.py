"""Increments to Parquet datasets (issue 16): ``since`` writes the rows after the previous
dataset's last key to a new dataset (its manifest names the one it follows), and ``watermark``
increments too; read together, the datasets hold the values of a full Parquet export."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from helpers import (
    assert_ok,
    cli,
    export_cmd,
    kill_export,
    read_manifest,
    run,
)
from test_incremental_workers import range_counts
from test_parallel import started, wait_until

import copystream

RunSql = Callable[[str, str], list[tuple[Any, ...]]]

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

DDL = (
    "CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), "
    "n numeric(12,3), d date, tags text[], v text); CREATE INDEX ON ev (at, id)"
)


def insert(run_sql: RunSql, dsn: str, first: int, last: int) -> None:
    run_sql(
        dsn,
        f"INSERT INTO ev (id, n, d, tags, v) SELECT g, g / 7.0, DATE '2026-01-01' + g % 400, "
        f"ARRAY['a' || g, NULL], CASE WHEN g % 5 = 0 THEN NULL ELSE md5(g::text) END "
        f"FROM generate_series({first}, {last}) g",
    )


def read(*paths: Path) -> pa.Table:
    return pa.concat_tables([ds.dataset(p, format="parquet").to_table() for p in paths])


def test_since_increments_to_new_datasets_equal_a_full_export(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    paths = [tmp_path / f"d{i}.parquet" for i in range(3)]
    opts: dict[str, Any] = {"format": "parquet", "chunk_rows": 500}
    first = copystream.export_table(dsn, "ev", paths[0], **opts)
    assert first.rows == 3000
    for i, (lo, hi) in enumerate([(3001, 4000), (4001, 4500)], start=1):
        insert(run_sql, dsn, lo, hi)
        r = copystream.export_table(dsn, "ev", paths[i], since=str(paths[i - 1]), **opts)
        assert r.rows == hi - lo + 1
        assert read_manifest(paths[i])["since"]["manifest"] == paths[i - 1].name + ".manifest.json"
    full = tmp_path / "full.parquet"
    copystream.export_table(dsn, "ev", full, **opts)
    assert read(*paths).equals(read(full))
    assert_ok(run(cli("verify", "--chain", *map(str, paths))))
    again = copystream.export_table(dsn, "ev", paths[2], since=str(paths[1]), **opts)
    assert again.already_complete
    # with two workers: the keys after the last one split into ranges, each its own parts
    insert(run_sql, dsn, 4501, 9000)
    par = tmp_path / "d3.parquet"
    r = copystream.export_table(dsn, "ev", par, since=str(paths[2]), workers=2, **opts)
    assert r.rows == 4500 and read_manifest(par)["workers"] == 2
    names = [p["file"] for p in read_manifest(par)["parts"]]
    assert names == sorted(os.listdir(par)) and names[-1].startswith("part-0001-")
    copystream.export_table(dsn, "ev", full, restart=True, **opts)
    assert read(*paths, par).equals(read(full))
    assert_ok(run(cli("verify", "--chain", *map(str, paths), str(par))))


def test_watermark_increments_to_parquet_upsert_to_the_table(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """A watermark dataset, rows changed and added, the increment after it (killed once in
    the middle, resumed): upserted by id, the two datasets hold a full export's values."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    d0, d1, full = (tmp_path / n for n in ("d0.parquet", "d1.parquet", "full.parquet"))
    opts: dict[str, Any] = {"format": "parquet", "watermark": "at", "part_size": 1 << 20}
    copystream.export_table(dsn, "ev", d0, chunk_rows=300, **opts)
    run_sql(dsn, "UPDATE ev SET v = 'changed', at = clock_timestamp() WHERE id % 3 = 0")
    insert(run_sql, dsn, 2001, 30000)
    cmd = export_cmd(dsn, "ev", d1, "--format", "parquet", "--watermark", "at", "--since",
                     str(d0), "--chunk-rows", "500", "--part-size", "1MiB",
                     "--watermark-lag", "3600")  # fmt: skip
    killed = kill_export(cmd, d1, min_chunks=8)
    assert killed.returncode == -9
    assert_ok(run(cmd))
    assert read_manifest(d1)["watermark"]["overlap_rows"] == 2000 - 666  # not updated
    copystream.export_table(dsn, "ev", full, format="parquet")
    rows: dict[int, dict[str, Any]] = {}
    for path in (d0, d1):
        for r in read(path).to_pylist():
            rows[r["id"]] = r
    assert sorted(rows.values(), key=lambda r: r["id"]) == read(full).to_pylist()
    assert_ok(run(cli("verify", "--chain", str(d0), str(d1))))


def test_appended_parts_equal_a_full_export_and_a_killed_append_resumes(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """``incremental=True`` on a dataset adds parts after its last one (numbered on, so they
    sort in key order) and extends the manifest (``increments``); after two rounds, one of them
    killed mid-way and resumed, the dataset equals a full Parquet export of the table and
    verifies. A dataset written by key ranges is refused (exit 2), unchanged."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out, full = tmp_path / "ev.parquet", tmp_path / "full.parquet"
    opts: dict[str, Any] = {"format": "parquet", "chunk_rows": 500, "part_size": 1 << 20}
    copystream.export_table(dsn, "ev", out, **opts)
    before = sorted(p.name for p in out.iterdir())
    insert(run_sql, dsn, 3001, 4000)
    r = copystream.export_table(dsn, "ev", out, incremental=True, **opts)
    assert r.rows == 4000 and r.increment is not None and r.increment["rows"] == 1000
    insert(run_sql, dsn, 4001, 40000)
    cmd = export_cmd(dsn, "ev", out, "--format", "parquet", "--incremental", "--chunk-rows",
                     "500", "--part-size", "1MiB")  # fmt: skip
    assert kill_export(cmd, out, min_chunks=20).returncode == -9
    assert_ok(run(cmd))
    m = read_manifest(out)
    assert [h["rows"] for h in m["increments"]] == [3000, 1000, 36000]
    assert sum(h["bytes"] for h in m["increments"]) == m["bytes"]  # the parts' bytes
    names = [p["file"] for p in m["parts"]]
    assert names[: len(before)] == before and names == sorted(os.listdir(out))
    assert names == [f"part-{i:05d}.parquet" for i in range(len(names))]
    copystream.export_table(dsn, "ev", full, format="parquet")
    assert read(out).equals(read(full))
    copystream.verify_file(out)


def psycopg_rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id, at, n, d, tags, v FROM ev ORDER BY id").fetchall()


def test_increments_to_a_dataset_of_key_ranges_keep_it_in_key_order(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """A dataset written by ``--workers 2`` (parts ``part-RRRR-NNNNN``), then an increment
    with one worker and one with two: the new parts (``part-iKKKK-...``) sort after the
    existing ones, the manifest lists every part in name order, and the dataset read back
    in that order is the table, value for value as psycopg reads it, in key order."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 6000)
    out = tmp_path / "ev.parquet"
    opts: dict[str, Any] = {"format": "parquet", "chunk_rows": 700}
    copystream.export_table(dsn, "ev", out, workers=2, **opts)
    assert read_manifest(out)["workers"] == 2
    for round_, ((lo, hi), workers) in enumerate([((6001, 7000), 1), ((7001, 12000), 2)]):
        insert(run_sql, dsn, lo, hi)
        before = sorted(os.listdir(out))
        r = copystream.export_table(dsn, "ev", out, incremental=True, workers=workers, **opts)
        assert r.increment is not None and r.increment["rows"] == hi - lo + 1
        m = read_manifest(out)
        names = [p["file"] for p in m["parts"]]
        assert names == sorted(os.listdir(out)) and names[: len(before)] == before
        assert all(n.startswith(f"part-i{round_ + 1:04d}-") for n in names[len(before) :])
        assert m["workers"] == workers and m["rows"] == hi
        assert read(out).to_pylist() == [
            dict(zip(("id", "at", "n", "d", "tags", "v"), row, strict=True))
            for row in psycopg_rows(dsn)
        ]
        copystream.verify_file(out)
    assert not list(tmp_path.glob("ev.parquet.*checkpoint*"))


def test_a_killed_parallel_increment_to_a_dataset_resumes_identically(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """An increment with ``--workers 2`` to a dataset, its coordinator and workers SIGKILLed
    once both key ranges have written chunks: the old manifest stays; the same command again
    resumes the ranges, and the dataset equals one whose increment ran uninterrupted, value by
    value, in key order, the increment recorded once."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out, ref = tmp_path / "ev.parquet", tmp_path / "ref.parquet"
    opts: dict[str, Any] = {"format": "parquet", "chunk_rows": 500}
    copystream.export_table(dsn, "ev", out, **opts)
    copystream.export_table(dsn, "ev", ref, **opts)
    base = len(read_manifest(out)["chunks"])
    insert(run_sql, dsn, 3001, 60_000)
    cmd = export_cmd(dsn, "ev", out, "--format", "parquet", "--incremental", "--workers", "2",
                     "--chunk-rows", "500")  # fmt: skip

    def both_at_work() -> bool:
        first, second = range_counts(out, 2)  # the first range's starts with the dataset's
        return first >= base + 3 and second >= 3

    with started(cmd) as s:
        assert wait_until(s, both_at_work), s.stderr()
        os.killpg(s.proc.pid, signal.SIGKILL)  # the process group this test started
        s.proc.wait(timeout=30)
    assert read_manifest(out)["rows"] == 3000  # the old manifest stays until the end
    again = run(cmd)
    assert_ok(again)
    assert "resuming" in again.stderr
    copystream.export_table(dsn, "ev", ref, incremental=True, workers=2, **opts)
    got = read(out).to_pylist()
    assert got == read(ref).to_pylist()
    assert got == [
        dict(zip(("id", "at", "n", "d", "tags", "v"), row, strict=True))
        for row in psycopg_rows(dsn)
    ]  # key order
    m = read_manifest(out)
    assert [h["rows"] for h in m["increments"]] == [3000, 57_000]
    # (the uninterrupted one's too: a dataset's key ranges once dropped the full export's entry)
    assert [h["rows"] for h in read_manifest(ref)["increments"]] == [3000, 57_000]
    assert [p["file"] for p in m["parts"]] == sorted(os.listdir(out))
    copystream.verify_file(out)
    assert not list(tmp_path.glob("ev.parquet.*checkpoint*"))
    assert not list(tmp_path.glob("ev.parquet.part*"))
