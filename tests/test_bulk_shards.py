"""A bulk plan as shards: plan_bulk_shards → run_shard (anywhere, any order, again) → finish.

The tables are dealt into groups balanced by estimated size, the large one split into its key
ranges; each shard runs in a process of its own that knows only the shard plan's file, one of
them is killed mid-way and run again; every table's file must equal psql's and the job report
must say every table is done.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import shard_process

import copystream
from copystream.bulk.shards import BulkShardPlan, balance, split_counts
from copystream.errors import ExportFailed, UsageError

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

BIG = 60_000
SMALL = (3_000, 2_000, 1_000, 500, 10)


def test_split_counts_and_balance() -> None:
    """Pure: a table larger than its share is split into as many ranges as shares it fills;
    the groups are dealt heaviest first to the lightest group, deterministically."""
    assert split_counts([900, 50, 50], 4) == [4, 1, 1]
    assert split_counts([300, 300, 300, 100], 4) == [2, 2, 2, 1]
    assert split_counts([0, 0], 3) == [1, 1]
    assert split_counts([10, 10], 1) == [1, 1]
    assert balance([5, 3, 3, 2, 1], 2) == [[0, 3], [1, 2, 4]]
    assert balance([1, 1], 4) == [[0], [1]]  # no empty group
    assert balance([], 3) == []


def make_tables(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE big (id int PRIMARY KEY, v text);
            INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {BIG}) g;
            ANALYZE big;"""
        + "".join(
            f"""CREATE TABLE s{i} (id int PRIMARY KEY, v text);
                INSERT INTO s{i} SELECT g, md5(g::text) FROM generate_series(1, {n}) g;
                ANALYZE s{i};"""
            for i, n in enumerate(SMALL)
        ),
    )


def write_plan(dsn: str, tmp_path: Path) -> Path:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\ndsn = "{dsn}"\noutput_dir = "out"\nchunk_rows = 4000\n\n'
        '[[tables]]\npattern = "public.*"\n'
    )
    return plan


@pytest.mark.all_versions  # quick: also on PostgreSQL 18 (.ci/run)
def test_bulk_shards_equal_psql_and_resume(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    make_tables(dsn, run_sql)
    plan = copystream.plan_bulk_shards(write_plan(dsn, tmp_path), shards=3)
    out = tmp_path / "out"
    plan_file = out / "copystream-shards.json"
    assert BulkShardPlan.of(plan_file) == plan == BulkShardPlan.of(plan.to_json())
    assert dsn not in plan_file.read_text()  # the plan file has the DSNs, not the shard plan
    units = [u for g in plan.groups for u in g]
    assert plan.shards == 3 and {u.table for u in units} == {"public.big"} | {
        f"public.s{i}" for i in range(len(SMALL))
    }
    split = [u for u in units if u.table == "public.big"]
    assert len(split) == 3 and sorted(u.range for u in split) == [0, 1, 2]  # type: ignore[type-var]
    assert len({frozenset(u.range for u in g if u.table == "public.big") for g in plan.groups}) == 3
    assert (out / "public.big.csv.parts.json").exists()  # the ranges file of --workers
    with_big = next(i for i, g in enumerate(plan.groups) if any(u.range is not None for u in g))
    assert shard_process(plan_file, with_big, kill_after_chunks=2) == -signal.SIGKILL
    (killed,) = [u.range for u in plan.groups[with_big] if u.range is not None]
    cp = json.loads((out / f"public.big.csv.part-{killed:04d}.checkpoint.json").read_text())
    assert cp["chunks"] and not cp["finished"]  # resumed from here below
    with pytest.raises(ExportFailed, match="not finished"):
        copystream.finish_shards(plan)
    for i in range(plan.shards):
        assert shard_process(plan_file, i) == 0
    again = copystream.run_shard(plan, with_big)  # idempotent: all there, nothing to do
    assert all(t["already_complete"] for t in again.to_json()["tables"])
    result = copystream.finish_shards(plan)
    assert isinstance(result, copystream.BulkResult) and result.ok
    assert len(result.tables) == 1 + len(SMALL)
    for name in ["big"] + [f"s{i}" for i in range(len(SMALL))]:
        path = out / f"public.{name}.csv"
        assert path.read_bytes() == psql_csv(dsn, f"SELECT * FROM {name} ORDER BY id"), name
        copystream.verify_file(path)
    assert json.loads((out / "public.big.csv.manifest.json").read_text())["workers"] == 3
    report = json.loads((out / "copystream-report.json").read_text())
    assert report["finished"] and report["totals"]["done"] == 1 + len(SMALL)
    assert {t["status"] for t in report["tables"]} == {"done"}
    assert not plan_file.exists()
    assert copystream.finish_shards(plan.to_json()).ok  # again: every table checks


def test_a_consistent_bulk_plan_is_refused(dsn: str, tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\nconsistent = true\ndsn = "{dsn}"\noutput_dir = "out"\n\n'
        '[[tables]]\npattern = "public.*"\n'
    )
    with pytest.raises(UsageError, match="consistent cannot hold one snapshot"):
        copystream.plan_bulk_shards(plan, shards=2)
    assert not (tmp_path / "out").exists()
