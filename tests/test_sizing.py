"""Adaptive chunk sizing: the pure rules, then what a real export records.

``first_chunk_rows`` turns the planner's estimates into the first chunk's size (``0`` = one COPY
for a small table) and ``next_chunk_rows`` steers each next chunk towards
``TARGET_CHUNK_SECONDS``, by at most 4x per step, within ``MIN_CHUNK_ROWS``..``MAX_CHUNK_ROWS``.
The integration tests check the manifest of real exports: a table over the single-COPY threshold
is exported in chunks whose sizes follow these rules, a small one in exactly one chunk, and
``chunk_rows=0`` gives one chunk whatever the size.
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import read_manifest
from psycopg import sql

from copystream import export_table, verify_file
from copystream.catalog import introspect
from copystream.sizing import (
    AFTER_FAILED_COPY_ROWS,
    FIRST_CHUNK_BYTES,
    MAX_CHUNK_ROWS,
    MIN_CHUNK_ROWS,
    SMALL_TABLE_BYTES,
    TARGET_CHUNK_SECONDS,
    first_chunk_rows,
    next_chunk_rows,
)
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

# -- first_chunk_rows ---------------------------------------------------------------------------


def test_small_table_is_one_copy() -> None:
    for rows in (1, 10, 50_000, 10**7):
        for nbytes in (0, 8192, SMALL_TABLE_BYTES // 2, SMALL_TABLE_BYTES - 1):
            assert first_chunk_rows(rows, nbytes) == 0, (rows, nbytes)


def test_table_at_the_threshold_is_chunked() -> None:
    for rows in (1, 1000, 50_000, 10**7, 10**10):
        n = first_chunk_rows(rows, SMALL_TABLE_BYTES)
        assert MIN_CHUNK_ROWS <= n <= MAX_CHUNK_ROWS, rows


def test_first_chunk_is_about_first_chunk_bytes() -> None:
    for width in (20, 100, 1024, 4096, 16_000):
        rows = 10**9 // width  # a ~1 GB table
        n = first_chunk_rows(rows, rows * width)
        assert n == max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, FIRST_CHUNK_BYTES // width)), width
    # 1 KiB rows: exactly FIRST_CHUNK_BYTES worth
    assert first_chunk_rows(1_000_000, 1_000_000 * 1024) == FIRST_CHUNK_BYTES // 1024


def test_first_chunk_bounds() -> None:
    assert first_chunk_rows(10, 10**12) == MIN_CHUNK_ROWS  # 100 GB rows
    assert first_chunk_rows(10**10, SMALL_TABLE_BYTES) == MAX_CHUNK_ROWS  # width under a byte
    for rows, nbytes in itertools.product((1, 999, 10**5, 10**8, 10**11), (8 << 20, 10**9, 10**13)):
        assert MIN_CHUNK_ROWS <= first_chunk_rows(rows, nbytes) <= MAX_CHUNK_ROWS


def test_unknown_estimate_uses_the_default() -> None:
    default = first_chunk_rows(None, None)
    assert default == 100_000
    assert first_chunk_rows(None, 10**9) == default  # never analyzed: reltuples unknown
    assert first_chunk_rows(1_000_000, None) == default
    assert first_chunk_rows(0, 10**9) == default  # "0 rows" from stale statistics


# -- next_chunk_rows ----------------------------------------------------------------------------


def test_next_chunk_aims_at_the_target_duration() -> None:
    # 100k rows took the target time: keep; half of it: double; twice: halve
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS) == 100_000
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS / 2) == 200_000
    assert next_chunk_rows(100_000, 100_000, TARGET_CHUNK_SECONDS * 2) == 50_000
    # the rate is what counts, not the size asked for
    assert next_chunk_rows(100_000, 30_000, TARGET_CHUNK_SECONDS / 4) == 120_000


def test_next_chunk_changes_at_most_4x_per_step() -> None:
    assert next_chunk_rows(10_000, 10_000, 1e-6) == 40_000
    assert next_chunk_rows(100_000, 100_000, 1e6) == 25_000
    grid = itertools.product(
        (MIN_CHUNK_ROWS, 1_500, 10_000, 333_333, 1_000_000, MAX_CHUNK_ROWS),
        (1, 100, 10_000, 10**6),
        (1e-6, 0.01, 0.5, TARGET_CHUNK_SECONDS, 7.0, 3600.0),
    )
    for current, rows, seconds in grid:
        n = next_chunk_rows(current, rows, seconds)
        assert MIN_CHUNK_ROWS <= n <= MAX_CHUNK_ROWS
        # at most 4x either way, unless a bound forces more (never less) change
        assert n <= max(4 * current, MIN_CHUNK_ROWS), (current, rows, seconds, n)
        assert n >= min(math.ceil(current / 4), MAX_CHUNK_ROWS) - 1, (current, rows, seconds, n)


def test_next_chunk_bounds() -> None:
    assert next_chunk_rows(MIN_CHUNK_ROWS, MIN_CHUNK_ROWS, 1000.0) == MIN_CHUNK_ROWS
    assert next_chunk_rows(MAX_CHUNK_ROWS, MAX_CHUNK_ROWS, 0.001) == MAX_CHUNK_ROWS
    assert next_chunk_rows(1_900_000, 1_900_000, 0.5) == MAX_CHUNK_ROWS


def test_next_chunk_without_information_keeps_the_size() -> None:
    assert next_chunk_rows(0, 1000, 1.0) == 0  # single-COPY mode stays single
    assert next_chunk_rows(50_000, 0, 1.0) == 50_000  # an empty chunk says nothing
    assert next_chunk_rows(50_000, 50_000, 0.0) == 50_000  # nor does a zero duration
    assert next_chunk_rows(50_000, 50_000, -1.0) == 50_000


@pytest.mark.parametrize("rate", [3_000.0, 80_000.0, 2_000_000.0, 50_000_000.0])
def test_next_chunk_converges_on_a_steady_rate(rate: float) -> None:
    """At a constant rows/s, the size settles on rate * target within a few steps."""
    want = max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, int(rate * TARGET_CHUNK_SECONDS)))
    for start in (MIN_CHUNK_ROWS, 100_000, MAX_CHUNK_ROWS):
        n = start
        sizes = [n]
        for _ in range(12):
            n = next_chunk_rows(n, n, n / rate)
            sizes.append(n)
        assert abs(sizes[-1] - want) <= want * 0.001 + 1, (rate, start, sizes)
        steps = next(i for i, s in enumerate(sizes) if abs(s - want) <= want * 0.001 + 1)
        assert steps <= math.ceil(abs(math.log(want / start, 4))) + 1, (rate, start, sizes)
        for a, b in itertools.pairwise(sizes):
            assert b <= 4 * a and a <= 4 * b + 4


def test_a_failed_attempt_halves_the_next_one_down_to_the_floor() -> None:
    assert next_chunk_rows(400_000, 0, 0.0, failed=True) == 200_000
    assert next_chunk_rows(3_001, 0, 0.0, failed=True) == 1_500
    assert next_chunk_rows(MIN_CHUNK_ROWS + 1, 0, 0.0, failed=True) == MIN_CHUNK_ROWS
    assert next_chunk_rows(MIN_CHUNK_ROWS, 0, 0.0, failed=True) == MIN_CHUNK_ROWS
    # what the failed attempt had done so far is no input: only that it failed
    assert next_chunk_rows(400_000, 399_999, 1e-6, failed=True) == 200_000
    # a single COPY (0) that failed goes on in chunks
    assert next_chunk_rows(0, 0, 0.0, failed=True) == AFTER_FAILED_COPY_ROWS


def test_repeated_failures_reach_the_floor_in_log2_steps() -> None:
    n, steps = MAX_CHUNK_ROWS, 0
    while n > MIN_CHUNK_ROWS:
        n = next_chunk_rows(n, 0, 0.0, failed=True)
        steps += 1
    assert steps == math.ceil(math.log2(MAX_CHUNK_ROWS / MIN_CHUNK_ROWS))


def simulate_kills(kill_every: float, kills_for: float) -> tuple[list[int], list[int], int]:
    """Chunks of a 6M-row export at 200k rows/s (20 ms per attempt besides) whose work is
    killed every ``kill_every`` s for the first ``kills_for`` s: the sizes committed during
    the kills, the sizes after them, and the number of failed attempts."""
    rate, overhead = 200_000.0, 0.02
    now, next_kill = 0.0, kill_every
    during: list[int] = []
    after: list[int] = []
    size, failures, left = 400_000, 0, 6_000_000
    while left > 0:
        took = overhead + min(size, left) / rate
        if now < kills_for and now + took > next_kill:  # killed mid-chunk
            now, next_kill = next_kill, next_kill + kill_every
            failures += 1
            size = next_chunk_rows(size, 0, 0.0, failed=True)
            continue
        (during if now < kills_for else after).append(size)
        now += took
        left -= size
        size = next_chunk_rows(size, size, took)
    return during, after, failures


@pytest.mark.parametrize("kill_every", [0.3, 0.5, 0.7, 2.0])
def test_under_periodic_kills_chunks_shrink_until_they_fit_then_grow_back(
    kill_every: float,
) -> None:
    """A chunk of ~2 s never finishes between two kills: it shrinks until chunks do, the
    export keeps committing while the kills go on, and afterwards the size grows back to
    the target (2 s at 200k rows/s = 400k rows) within a few chunks."""
    during, after, failures = simulate_kills(kill_every, 10.0)
    assert failures >= 3, failures
    assert max(during) < 400_000  # smaller than the chunk that kept failing
    assert sum(during) >= 0.2 * 10.0 * 200_000, during  # progress under the kills
    assert max(after[:4]) >= 0.95 * 400_000, after[:8]  # 20 ms overhead: not quite 400k


# -- real exports -------------------------------------------------------------------------------

#: About 48 MB of heap: more than the single-COPY threshold and more than one first chunk
#: (FIRST_CHUNK_BYTES), but less than two, so the second chunk is the smaller remainder.
BIG_ROWS = 110_000
BIG_DDL = f"""
CREATE TABLE big (id bigint PRIMARY KEY, v text, n int);
INSERT INTO big SELECT g, repeat(md5(g::text), 12), g % 1000 FROM generate_series(1, {BIG_ROWS}) g;
ANALYZE big;
CREATE TABLE small (id int PRIMARY KEY, v text);
INSERT INTO small SELECT g, 'v' || g FROM generate_series(1, 5000) g;
ANALYZE small;
"""


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    name = f"sizing_{uuid.uuid4().hex[:12]}"
    dsn = pg.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BIG_DDL)
    yield dsn
    if pg.running:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


_REF: dict[str, bytes] = {}


@pytest.fixture
def big_ref(db: str, psql_csv: PsqlCsv) -> bytes:
    if db not in _REF:
        _REF[db] = psql_csv(db, "SELECT * FROM big ORDER BY id")
    return _REF[db]


def _estimates(dsn: str, table: str) -> tuple[int | None, int | None]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = introspect(conn, table)
    return plan.estimated_rows, plan.estimated_bytes


def test_adaptive_export_of_a_large_table(db: str, big_ref: bytes, tmp_path: Path) -> None:
    est_rows, est_bytes = _estimates(db, "big")
    assert est_bytes is not None and est_bytes >= SMALL_TABLE_BYTES
    first = first_chunk_rows(est_rows, est_bytes)
    assert BIG_ROWS // 2 < first < BIG_ROWS  # the table is between one and two first chunks

    out = tmp_path / "big.csv"
    r = export_table(db, "big", out)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    rows = [c["rows"] for c in m["chunks"]]
    assert sum(rows) == BIG_ROWS == r.rows
    assert len(rows) >= 2
    assert rows[0] == first  # the first chunk is sized from the estimates
    assert len(set(rows)) > 1  # the sizes vary
    # the second chunk was sized by next_chunk_rows from the first one's rate (or is the rest)
    assert rows[1] == BIG_ROWS - first or first // 4 <= rows[1] <= 4 * first
    assert MIN_CHUNK_ROWS <= m["chunk_rows"] <= MAX_CHUNK_ROWS  # chunked mode, not one COPY
    verify_file(out)


def test_adaptive_export_of_a_small_table_is_one_copy(
    db: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    est_rows, est_bytes = _estimates(db, "small")
    assert est_bytes is not None and est_bytes < SMALL_TABLE_BYTES and est_rows
    out = tmp_path / "small.csv"
    r = export_table(db, "small", out)
    assert out.read_bytes() == psql_csv(db, "SELECT * FROM small ORDER BY id")
    m = read_manifest(out)
    assert len(m["chunks"]) == 1 and len(r.chunks) == 1
    assert m["chunks"][0]["rows"] == 5000
    assert m["chunk_rows"] == 0  # single-COPY mode


def test_small_table_parallel_is_one_copy_per_range(
    db: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    out = tmp_path / "small2.csv"
    export_table(db, "small", out, workers=2)
    assert out.read_bytes() == psql_csv(db, "SELECT * FROM small ORDER BY id")
    m = read_manifest(out)
    assert m["workers"] == 2
    assert len(m["chunks"]) == 2  # one COPY per range
    assert m["chunk_rows"] == 0


def test_chunk_rows_zero_is_one_chunk_for_a_large_table(
    db: str, big_ref: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "one.csv"
    r = export_table(db, "big", out, chunk_rows=0)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert len(m["chunks"]) == 1 and len(r.chunks) == 1
    assert m["chunks"][0]["rows"] == BIG_ROWS
    assert m["chunks"][0]["bytes"] == len(big_ref)
    assert m["chunk_rows"] == 0


def test_fixed_chunk_rows_are_kept(db: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """An explicit chunk size is not adapted, even for a small table."""
    out = tmp_path / "fixed.csv"
    export_table(db, "small", out, chunk_rows=700)
    m = read_manifest(out)
    assert [c["rows"] for c in m["chunks"]] == [700] * 7 + [100]
    assert m["chunk_rows"] == 700
    assert out.read_bytes() == psql_csv(db, "SELECT * FROM small ORDER BY id")


def test_toasted_table_is_not_small(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    """~13 MB of values stored out of line (TOAST) in a heap of a few pages is not a small table.

    Its estimate must count the TOAST data, or it is exported in one unresumable COPY, and the
    first chunk of a larger such table would be sized from the heap's tiny row width.
    """
    run_sql(
        dsn,
        "CREATE TABLE doc (id int PRIMARY KEY, body text);"
        "INSERT INTO doc SELECT g, (SELECT string_agg(md5(random()::text || g || i), '')"
        "  FROM generate_series(1, 500) i) FROM generate_series(1, 800) g;"
        "ANALYZE doc",
    )
    size = run_sql(dsn, "SELECT pg_table_size('doc')")[0][0]
    assert size > SMALL_TABLE_BYTES
    est_rows, est_bytes = _estimates(dsn, "doc")
    assert est_rows == 800
    assert est_bytes is not None and est_bytes >= SMALL_TABLE_BYTES
    out = tmp_path / "doc.csv"
    export_table(dsn, "doc", out)
    m = read_manifest(out)
    assert m["chunk_rows"] != 0  # chunked (resumable) mode
    assert m["rows"] == 800
