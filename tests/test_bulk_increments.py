"""Increments in bulk jobs (issue 16): ``watermark = "column"`` in a plan entry makes each run of
the job write the next increment of a chain of files beside the table's output, after the
previous one; ``incremental = true`` appends (tests/test_incremental.py). The pure naming and
the choice of the next file, then a real job run four times against the server."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_ok, cli, kill_export, read_manifest, run, upserted

import copystream
from copystream.bulk.increments import increment_name, increment_number, next_increment

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]


def test_increment_names_keep_the_suffix_and_are_found_again() -> None:
    assert increment_name("public.w.csv", 1) == "public.w.inc-00001.csv"
    assert increment_name("public.w.csv.zst", 12) == "public.w.inc-00012.csv.zst"
    assert increment_name("w", 3) == "w.inc-00003"
    for base in ("public.w.csv", "public.w.csv.zst", "w", "a.b.txt.gz"):
        assert increment_number(base, increment_name(base, 7)) == 7
        assert increment_number(base, base) is None
    assert increment_number("public.w.csv", "public.w.inc-00001.csv.manifest.json") is None
    assert increment_number("public.w.csv", "public.ww.inc-00001.csv") is None


def test_the_next_increment_resumes_an_unfinished_one_and_follows_a_finished_one() -> None:
    assert next_increment(False, {}) == 0  # the first export, until it is complete
    assert next_increment(False, {1: True}) == 0
    assert next_increment(True, {}) == 1
    assert next_increment(True, {1: True, 2: True}) == 3
    assert next_increment(True, {1: True, 2: False}) == 2  # interrupted: resumed


@pytest.mark.all_versions
@pytest.mark.parametrize("chunk_rows", ["chunk_rows = 64\n", ""], ids=["chunked", "small"])
def test_bulk_reruns_write_a_chain_that_upserts_to_the_table(
    chunk_rows: str, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """Run 1 exports the table in full (paged by updated_at, id); after updates and inserts,
    runs 2 and 3 each write the next increment file (none is skipped as complete), and the
    chain verifies; upserting the files by key in order gives psql's export of the table. A
    table without a watermark in the same plan is skipped as complete. Chunked, or small (one
    COPY: a bulk worker's table found fresh, as each increment's file is)."""
    run_sql(
        dsn,
        "CREATE TABLE w (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT "
        "clock_timestamp(), v text); CREATE INDEX ON w (updated_at, id); "
        "INSERT INTO w (id, v) SELECT g, 'a' FROM generate_series(1, 500) g; "
        "CREATE TABLE other (id int PRIMARY KEY); INSERT INTO other VALUES (1); ANALYZE",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f"[defaults]\ndsn = {json.dumps(dsn)}\noutput_dir = \"out\"\n{chunk_rows}\n"
        '[[tables]]\nname = "public.w"\nwatermark = "updated_at"\nwatermark_lag = 0.5\n\n'
        '[[tables]]\nname = "public.other"\n'
    )
    out = tmp_path / "out"
    files = [out / "public.w.csv", out / "public.w.inc-00001.csv", out / "public.w.inc-00002.csv"]
    for round_ in range(3):
        if round_:
            run_sql(dsn, f"UPDATE w SET v = 'r{round_}', updated_at = clock_timestamp() "
                         f"WHERE id % {3 + round_} = 0")  # fmt: skip
            first = 500 + 100 * round_
            run_sql(dsn, f"INSERT INTO w (id, v) SELECT g, 'n' FROM generate_series({first}, "
                         f"{first + 99}) g")  # fmt: skip
            dry = copystream.run_bulk(plan, dry_run=True)
            assert {t.table: t.output for t in dry.tables}["public.w"] == files[round_]
        result = copystream.run_bulk(plan)
        assert result.ok, [t.errors for t in result.failed]
        status = {t.table: t.status for t in result.tables}
        assert status == {"public.w": "done", "public.other": "skipped" if round_ else "done"}
        assert {t.table: t.output for t in result.tables}["public.w"] == files[round_]
        assert sorted(p.name for p in out.glob("public.w*.csv")) == sorted(
            f.name for f in files[: round_ + 1]
        )
        table = psql_csv(dsn, "SELECT * FROM w ORDER BY id").decode()
        assert upserted(*files[: round_ + 1]) == {
            r[0]: r for r in csv.reader(io.StringIO(table))
        }
        m = read_manifest(files[round_])
        assert m["key"] == ["updated_at", "id"]
        if round_:
            assert m["since"]["manifest"] == files[round_ - 1].name + ".manifest.json"
            assert m["watermark"]["lag_seconds"] >= 0 and m["watermark"]["from"] is not None
    assert_ok(run(cli("verify", "--chain", *map(str, files))))


def test_a_killed_bulk_increment_is_resumed_not_begun_again(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """SIGKILL the job in the middle of a table's first increment: the next run resumes that
    increment (the same file, from its checkpoint) instead of starting a second one, and the
    chain upserts to the table."""
    run_sql(
        dsn,
        "CREATE TABLE w (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT "
        "clock_timestamp(), v text); CREATE INDEX ON w (updated_at, id); "
        "INSERT INTO w (id, v) SELECT g, 'a' FROM generate_series(1, 100) g",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f"[defaults]\ndsn = {json.dumps(dsn)}\noutput_dir = \"out\"\nchunk_rows = 500\n\n"
        '[[tables]]\nname = "public.w"\nwatermark = "updated_at"\n'
    )
    assert copystream.run_bulk(plan).ok
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, repeat('b', 200) FROM generate_series(101, "
                 "60000) g")  # fmt: skip
    out = tmp_path / "out"
    inc = out / "public.w.inc-00001.csv"
    killed = kill_export(cli("bulk", str(plan), "--no-progress"), inc, min_chunks=5)
    assert killed.returncode == -9 and killed.checkpoint is not None
    result = copystream.run_bulk(plan)
    assert result.ok and result.tables[0].resumed and result.tables[0].output == inc
    assert sorted(p.name for p in out.glob("public.w*.csv")) == ["public.w.csv", inc.name]
    table = psql_csv(dsn, "SELECT * FROM w ORDER BY id").decode()
    assert upserted(out / "public.w.csv", inc) == {r[0]: r for r in csv.reader(io.StringIO(table))}
    assert_ok(run(cli("verify", "--chain", str(out / "public.w.csv"), str(inc))))
