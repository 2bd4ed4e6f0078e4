"""Watermark increments on each kind of column, against the real server: ``timestamp`` (local
times of a TimeZone west of UTC, so a bound taken in UTC would skip the changed rows), ``date``,
a ``bigint`` counter fed by a sequence, a ``numeric`` one. Each time: a first export, rows
changed and added, an increment after it; the increment is psql's rows from its recorded lower
bound, and the first file upserted by key with the increment holds the table as it is now."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import assert_ok, cli, export_cmd, read_manifest, run, upserted

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

#: type, its default (a fresh value), what an update sets it to, the first rows' values.
KINDS = {
    "timestamp": (
        "timestamp", "localtimestamp", "localtimestamp",
        "localtimestamp - g * interval '1 minute'",
    ),
    "date": ("date", "current_date", "current_date", "current_date - g % 30"),
    "bigint": ("bigint", "nextval('ver')", "nextval('ver')", "nextval('ver')"),
    "numeric": ("numeric(12,2)", "9999.99", "wm + 1000.25", "g / 4.0"),
}  # fmt: skip


def table_rows(psql_csv: PsqlCsv, dsn: str) -> dict[str, list[str]]:
    text = psql_csv(dsn, "SELECT * FROM w ORDER BY id").decode()
    return {row[0]: row for row in csv.reader(io.StringIO(text))}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_increment_of_each_kind_upserts_to_the_table(
    kind: str, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    type_, default, bump, first = KINDS[kind]
    db = run_sql(dsn, "SELECT current_database()")[0][0]
    run_sql(dsn, f"ALTER DATABASE \"{db}\" SET TimeZone = 'America/New_York'")
    run_sql(
        dsn,
        f"CREATE SEQUENCE ver; CREATE TABLE w (id int PRIMARY KEY, wm {type_} NOT NULL "
        f"DEFAULT {default}, v text); CREATE INDEX ON w (wm, id); "
        f"INSERT INTO w SELECT g, {first}, 'a' FROM generate_series(1, 300) g",
    )
    d0, d1 = tmp_path / "d0.csv", tmp_path / "d1.csv"
    assert_ok(run(export_cmd(dsn, "w", d0, "--watermark", "wm", "--chunk-rows", "50")))
    run_sql(dsn, f"UPDATE w SET wm = {bump}, v = 'changed' WHERE id % 10 = 0")
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'new' FROM generate_series(301, 320) g")
    cmd = export_cmd(dsn, "w", d1, "--watermark", "wm", "--since", str(d0), "--chunk-rows", "7")
    assert_ok(run(cmd))
    mark = read_manifest(d1)["watermark"]
    assert mark["kind"] == {"bigint": "integer"}.get(kind, kind)
    lower = mark["from"]
    assert d1.read_bytes() == psql_csv(
        dsn, f"SELECT * FROM w WHERE wm >= '{lower}' ORDER BY wm, id"
    )
    ids = {int(r) for r in upserted(d1)}
    assert {*range(10, 301, 10), *range(301, 321)} <= ids  # every changed and new row
    assert upserted(d0, d1) == table_rows(psql_csv, dsn)
    assert_ok(run(cli("verify", "--chain", str(d0), str(d1))))


def test_a_counter_late_commit_needs_a_lag_in_its_own_units(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """A transaction takes a counter value, stays open while the first export runs (warned
    about: a counter has no clock to take a lag from), and commits: the increment with the
    default lag 0 misses its row; one with a lag of 5 values has it."""
    run_sql(
        dsn,
        "CREATE SEQUENCE ver; CREATE TABLE w (id int PRIMARY KEY, wm bigint NOT NULL DEFAULT "
        "nextval('ver'), v text); CREATE INDEX ON w (wm, id); "
        "INSERT INTO w (id, v) SELECT g, 'a' FROM generate_series(1, 50) g",
    )
    d0 = tmp_path / "d0.csv"
    with psycopg.connect(dsn) as late:
        late.execute("INSERT INTO w (id, v) VALUES (1000, 'late')")  # value 51, not committed
        run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'b' FROM generate_series(51, 52) g")
        first = run(export_cmd(dsn, "w", d0, "--watermark", "wm"))
        late.commit()
    assert_ok(first)
    assert "a counter watermark has no clock" in first.stderr
    assert read_manifest(d0)["watermark"]["started"] == "53"
    for name, lag, has_late in [("d1.csv", [], False), ("d1-lag.csv", ["--watermark-lag", "5"],
                                                        True)]:  # fmt: skip
        out = tmp_path / name
        assert_ok(run(export_cmd(dsn, "w", out, "--watermark", "wm", "--since", str(d0), *lag)))
        assert ("1000" in upserted(out)) is has_late, name
