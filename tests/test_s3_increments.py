"""Increments to S3 (issue 16), against moto's S3 server on localhost (the fixtures of
tests/test_s3.py): ``--since`` writes the rows after the previous export's last key to a new
object, the previous one being a local file or an object; the objects of the chain concatenate
to psql's export and ``verify --chain`` checks them; a watermark append to an object is refused
(exit 2), nothing written (an append by key: tests/test_s3_append.py). With ``--workers`` a
``--since`` increment runs as key ranges after the previous export's last key
(:mod:`copystream.s3ranges`)."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import assert_ok, assert_one_error_line, cli, run, upserted
from test_parallel import started, wait_until
from test_s3 import BUCKET, endpoint, get, keys, s3

import copystream

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

__all__ = ["endpoint", "s3"]  # the fixtures, used by name

DDL = "CREATE TABLE ev (id bigint PRIMARY KEY, payload text, n numeric)"


def insert(run_sql: RunSql, dsn: str, first: int, last: int) -> None:
    run_sql(
        dsn,
        f"INSERT INTO ev SELECT g, repeat(md5(g::text), 1 + g % 3) || E',\"\\n', g / 7.0 "
        f"FROM generate_series({first}, {last}) g",
    )


@pytest.mark.all_versions  # also on PostgreSQL 18: settings pinned by the first export
def test_since_to_new_objects_chains_to_psqls_export(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    d0 = tmp_path / "d0.csv"
    copystream.export_table(dsn, "ev", d0, chunk_rows=700)
    insert(run_sql, dsn, 3001, 4000)
    d1, d2 = f"s3://{BUCKET}/inc/d1.csv", f"s3://{BUCKET}/inc/d2.csv.zst"
    r1 = copystream.export_table(dsn, "ev", d1, since=str(d0), chunk_rows=300)
    assert r1.rows == 1000 and r1.increment is not None
    assert r1.increment["since"]["manifest"] == "d0.csv.manifest.json"
    insert(run_sql, dsn, 4001, 4500)
    proc = run(cli("export", "ev", d2, "--dsn", dsn, "--no-progress", "--since", d1))
    assert_ok(proc)
    assert "after d1.csv.manifest.json" in proc.stdout
    again = copystream.export_table(dsn, "ev", d2, since=d1)
    assert again.already_complete
    body = d0.read_bytes() + get(s3, "inc/d1.csv")
    with zstandard.ZstdDecompressor().stream_reader(
        get(s3, "inc/d2.csv.zst"), read_across_frames=True
    ) as r:
        body += r.read()
    assert body == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
    assert_ok(run(cli("verify", "--chain", str(d0), d1, d2)))
    assert copystream.verify_chain([d0, d1, d2]).rows == 4500
    # a chain with its middle object missing is refused
    broken = run(cli("verify", "--chain", str(d0), d2))
    assert broken.returncode == 1 and "d2.csv.zst" in broken.stderr


def test_a_parallel_since_increment_to_s3_is_the_rows_after(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """``--since`` with two workers to S3: the key ranges after the previous export's last key
    upload into one object, psql's export of those rows; its manifest names what it follows;
    the chain verifies, and the same command again has nothing to do."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    d0 = tmp_path / "d0.csv"
    copystream.export_table(dsn, "ev", d0, chunk_rows=700)
    insert(run_sql, dsn, 2001, 9000)
    d1 = f"s3://{BUCKET}/par/d1.csv"
    cmd = cli("export", "ev", d1, "--dsn", dsn, "--no-progress", "--since", str(d0),
              "--workers", "2", "--chunk-rows", "500")  # fmt: skip
    assert_ok(run(cmd))
    assert get(s3, "par/d1.csv") == psql_csv(dsn, "SELECT * FROM ev WHERE id > 2000 ORDER BY id")
    m = json.loads(get(s3, "par/d1.csv.manifest.json"))
    assert m["workers"] == 2 and m["rows"] == 7000 and m["since"]["last_key"] == ["2000"]
    left = {k for k in keys(s3) if k.startswith("par/")}
    assert left == {"par/d1.csv", "par/d1.csv.manifest.json"}  # no range's objects
    assert_ok(run(cli("verify", "--chain", str(d0), d1)))
    again = run(cmd)
    assert_ok(again)
    assert "already complete" in again.stdout


@pytest.mark.all_versions  # also on PostgreSQL 18: pg_stat_activity, the server clock
def test_a_killed_parallel_since_increment_to_s3_resumes(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The coordinator and workers of a ``--since --workers 2`` upload SIGKILLed once both
    ranges have checkpointed chunks; the same command again resumes the ranges into the same
    upload: psql's export of the rows after, nothing of the ranges left in the bucket."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 1000)
    d0 = tmp_path / "d0.csv"
    copystream.export_table(dsn, "ev", d0)
    insert(run_sql, dsn, 1001, 40_000)
    d1 = f"s3://{BUCKET}/kill/d1.csv"
    cmd = cli("export", "ev", d1, "--dsn", dsn, "--no-progress", "--since", str(d0),
              "--workers", "2", "--chunk-rows", "300")  # fmt: skip

    def chunks(i: int) -> int:
        key = f"kill/d1.csv.part-{i:04d}.checkpoint.json"
        return len(json.loads(get(s3, key))["chunks"]) if key in keys(s3) else 0

    with started(cmd) as s:
        assert wait_until(s, lambda: chunks(0) >= 3 and chunks(1) >= 3), s.stderr()
        os.killpg(s.proc.pid, signal.SIGKILL)  # the process group this test started
        s.proc.wait(timeout=30)
    assert "kill/d1.csv.parts.json" in keys(s3) and "kill/d1.csv" not in keys(s3)
    again = run(cmd)
    assert_ok(again)
    m = json.loads(get(s3, "kill/d1.csv.manifest.json"))
    assert m["resumed"] is True and m["since"]["last_key"] == ["1000"]
    assert get(s3, "kill/d1.csv") == psql_csv(dsn, "SELECT * FROM ev WHERE id > 1000 ORDER BY id")
    assert {k for k in keys(s3) if k.startswith("kill/")} == {
        "kill/d1.csv", "kill/d1.csv.manifest.json"
    }  # fmt: skip
    assert_ok(run(cli("verify", "--chain", str(d0), d1)))


def test_watermark_objects_upsert_to_the_table(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A watermark export to an object, rows changed and added, the increment after it to
    another object: psql's rows from the recorded bound,
    and the two upserted by id are the table."""
    run_sql(dsn, DDL + "; ALTER TABLE ev ADD at timestamptz NOT NULL DEFAULT clock_timestamp(); "
                 "CREATE INDEX ON ev (at, id)")  # fmt: skip
    insert(run_sql, dsn, 1, 2000)
    w0, w1 = f"s3://{BUCKET}/w/w0.csv", f"s3://{BUCKET}/w/w1.csv"
    first = copystream.export_table(dsn, "ev", w0, watermark="at", chunk_rows=500)
    assert first.increment is not None and first.increment["since"] is None
    run_sql(dsn, "UPDATE ev SET payload = 'changed', at = clock_timestamp() WHERE id % 4 = 0")
    insert(run_sql, dsn, 2001, 90000)
    cmd = cli("export", "ev", w1, "--dsn", dsn, "--no-progress", "--watermark", "at",
              "--since", w0, "--chunk-rows", "2000")  # fmt: skip
    assert_ok(run(cmd))
    m = json.loads(get(s3, "w/w1.csv.manifest.json"))
    assert m["since"]["manifest"] == "w0.csv.manifest.json" and m["key"] == ["at", "id"]
    lower = m["watermark"]["from"]
    assert get(s3, "w/w1.csv") == psql_csv(
        dsn, f"SELECT id, payload, n, at FROM ev WHERE at >= '{lower}' ORDER BY at, id"
    )
    files = [tmp_path / "w0.csv", tmp_path / "w1.csv"]
    for f, key in zip(files, ("w/w0.csv", "w/w1.csv"), strict=True):
        f.write_bytes(get(s3, key))
    table = psql_csv(dsn, "SELECT id, payload, n, at FROM ev ORDER BY id").decode()
    assert upserted(*files) == {r[0]: r for r in csv.reader(io.StringIO(table))}
    assert_ok(run(cli("verify", "--chain", w0, w1)))


def test_a_watermark_append_or_an_increment_onto_itself_is_refused(
    s3: Any, dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """(An append by key to an object: tests/test_s3_append.py.)"""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 10)
    out = f"s3://{BUCKET}/ev.csv"
    assert_ok(run(cli("export", "ev", out, "--dsn", dsn, "--no-progress")))
    before = keys(s3)
    extra = ["--watermark", "n", "--incremental"]
    proc = run(cli("export", "ev", out, "--dsn", dsn, "--no-progress", *extra))
    assert_one_error_line(proc, 2, "name the previous export with --since")
    assert keys(s3) == before
    itself = run(cli("export", "ev", out, "--dsn", dsn, "--no-progress", "--since", out))
    assert_one_error_line(itself, 2, "an increment goes to a new object")
    assert keys(s3) == before
