"""Parallel export (``--workers N``) and point-in-time export (``--consistent``).

A parallel export splits the key space at sampled quantiles, exports every range in its own
worker process (the first into OUTPUT itself, the others into ``OUTPUT.part-NNNN``, each with its
own checkpoint) and appends the later parts in key order. Whatever the split, the joined file
must be byte for byte what psql's ``\\copy (SELECT ... ORDER BY key)`` writes and what a
single-worker export writes, with a manifest of the same form. The tests here check that for
every kind of key, with a header, a filter that leaves ranges empty and more workers than rows;
that the ranges are balanced on skewed keys; that killing the coordinator kills its workers and
a re-run resumes every range (also with another ``--workers``, also when the kill hits the
join); that an edited OUTPUT is refused; that a second export to the same output is refused;
and that ``--consistent`` reads exactly the table as it was when the export started
(and says so only when it did). Long variants (a million rows, the real block sample) are slow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from helpers import (
    KillAtOpen,
    alive,
    assert_ok,
    assert_one_error_line,
    cli,
    env_with,
    export_cmd,
    kill_export,
    read_manifest,
    run,
    xxh,
)
from psycopg import sql

from copystream import CopyOptions, export_status, export_table, verify_file
from copystream import ranges as parallel
from copystream.catalog import introspect
from copystream.chunk import SnapshotGone, _Session
from copystream.errors import ExportFailed
from copystream.part import _snapshot_gone
from copystream.ranges import (
    FOLLOW_COST,
    first_share,
    new_parts,
    pick_boundaries,
    sample_boundaries,
    save_parts,
)
from copystream.settings import PINNED_SETTINGS, read_settings_query
from copystream.spec import ExportSpec
from copystream.table import ResolvedTable
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]
Ranges = Sequence[tuple[Sequence[str] | None, Sequence[str] | None]]

ROWS = 100_000

# -- helpers ------------------------------------------------------------------------------------


def part_file(out: Path, i: int) -> Path:
    """The file part ``i`` writes: the first part writes OUTPUT itself."""
    return out if i == 0 else out.with_name(f"{out.name}.part-{i:04d}")


def part_checkpoint(out: Path, i: int) -> Path:
    return out.with_name(f"{out.name}.part-{i:04d}.checkpoint.json")


def parts_json(out: Path) -> Path:
    return out.with_name(out.name + ".parts.json")


def lock_file(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file written atomically by copystream, or ``None`` when it is not there."""
    try:
        return dict(json.loads(path.read_bytes()))
    except FileNotFoundError:
        return None


def part_checkpoints(out: Path, n: int) -> list[dict[str, Any] | None]:
    return [read_json(part_checkpoint(out, i)) for i in range(n)]


def leftovers(out: Path) -> list[str]:
    """Files beside ``out`` other than the output and its manifest (parts, lock, checkpoints)."""
    keep = {out.name, out.name + ".manifest.json"}
    return sorted(
        p.name for p in out.parent.iterdir() if p.name.startswith(out.name) and p.name not in keep
    )


def assert_manifest_tiles(out: Path, m: dict[str, Any]) -> None:
    """The manifest's chunks cover the final file exactly, in order, each with its digest."""
    data = out.read_bytes()
    assert m["bytes"] == len(data)
    assert m["xxh3_128"] == xxh(data)
    offset = rows = 0
    for i, c in enumerate(m["chunks"]):
        assert c["index"] == i
        assert c["offset"] == offset, f"chunk {i} starts at {c['offset']}, expected {offset}"
        assert c["xxh3_128"] == xxh(data[offset : offset + c["bytes"]]), f"chunk {i} digest"
        offset += c["bytes"]
        rows += c["rows"]
    assert offset == len(data)
    assert rows == m["rows"]
    verify_file(out)


def assert_same_manifest_form(single: dict[str, Any], parallel: dict[str, Any]) -> None:
    """Same fields, same chunk record fields, same content description as the 1-worker export."""
    assert set(parallel) == set(single)
    assert parallel["chunks"] and single["chunks"]
    assert {frozenset(c) for c in parallel["chunks"]} == {frozenset(single["chunks"][0])}
    for name in (
        "version", "kind", "table", "key", "key_types", "key_source", "columns", "where",
        "options", "rows", "bytes", "xxh3_128", "settings", "resumed", "point_in_time",
    ):  # fmt: skip
        assert parallel[name] == single[name], name


def range_counts(dsn: str, table: str, key: Sequence[str], ranges: Ranges) -> list[int]:
    """Rows of ``table`` in each key range ``(lo, hi]`` (``None``: open), counted by SQL."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in key)
    out = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for lo, hi in ranges:
            conds: list[sql.Composable] = [sql.SQL("true")]
            if lo is not None:
                conds.append(
                    sql.SQL("ROW({}) > ROW({})").format(
                        cols, sql.SQL(", ").join(sql.Literal(v) for v in lo)
                    )
                )
            if hi is not None:
                conds.append(
                    sql.SQL("ROW({}) <= ROW({})").format(
                        cols, sql.SQL(", ").join(sql.Literal(v) for v in hi)
                    )
                )
            q = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                sql.Identifier(table), sql.SQL(" AND ").join(conds)
            )
            row = conn.execute(q).fetchone()
            assert row is not None
            out.append(int(row[0]))
    return out


def assert_balanced(counts: Sequence[int], tolerance: float = 0.20) -> None:
    mean = sum(counts) / len(counts)
    for c in counts:
        assert abs(c - mean) <= tolerance * mean, f"unbalanced ranges {counts} (mean {mean:.0f})"


def first_column_ints(data: bytes) -> list[int]:
    return [int(line.split(b",", 1)[0]) for line in data.splitlines()]


def ranges_of_bounds(bounds: Sequence[tuple[str, ...]]) -> Ranges:
    edges: list[tuple[str, ...] | None] = [None, *bounds, None]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


@dataclass
class Started:
    """A ``copystream export`` started in the background (its stderr goes to a temp file)."""

    proc: subprocess.Popen[bytes]
    err: Any

    def stderr(self) -> str:
        self.err.seek(0)
        return str(self.err.read().decode(errors="replace"))


@contextlib.contextmanager
def started(cmd: list[str]) -> Iterator[Started]:
    """Run ``cmd`` in the background; on the way out, kill whatever of it is still running."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, env=env_with(), start_new_session=True
        )
        helpers: list[psutil.Process] = []
        try:
            yield Started(proc, err)
        finally:
            with contextlib.suppress(psutil.Error):
                helpers = psutil.Process(proc.pid).children(recursive=True)
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            for p in helpers:  # only descendants of the process this test started
                with contextlib.suppress(psutil.Error):
                    p.kill()


def worker_processes(pid: int) -> list[psutil.Process]:
    """The worker processes of the coordinator ``pid``: its children (``python -m
    copystream._worker``, or forked from the ``copystream export`` command: its command line)."""
    with contextlib.suppress(psutil.Error):
        return list(psutil.Process(pid).children())
    return []


def wait_until(
    s: Started, cond: Callable[[], bool], *, timeout: float = 120.0, what: str = "kill point"
) -> bool:
    """Poll ``cond`` every millisecond while ``s`` runs; ``False`` if it ended first."""
    deadline = time.monotonic() + timeout
    while not cond():
        if s.proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"the {what} was never reached"
        time.sleep(0.001)
    return True


def progress_in_every_part(out: Path, n: int, chunks: int = 1) -> Callable[[], bool]:
    def cond() -> bool:
        cps = part_checkpoints(out, n)
        return all(cp is not None and len(cp["chunks"]) >= chunks for cp in cps)

    return cond


def rows_done(out: Path, n: int) -> list[int]:
    return [cp["rows"] if cp else 0 for cp in part_checkpoints(out, n)]


def _size_and_tail(path: Path) -> tuple[int, bytes] | None:
    try:
        return path.stat().st_size, path.read_bytes()[-64:]
    except FileNotFoundError:
        return None


def kill_coordinator(s: Started, out: Path) -> list[psutil.Process]:
    """SIGKILL the coordinator only; assert its workers die too and stop writing."""
    workers = worker_processes(s.proc.pid)
    assert workers, "no worker process found under the coordinator"
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while any(alive(p) for p in workers):
        assert time.monotonic() < deadline, "worker processes outlived their coordinator"
        time.sleep(0.01)
    # nothing keeps writing: the part files and their checkpoints stay as they are (OUTPUT,
    # range 0's file, may not be there yet: the later ranges can reach the kill point first)
    files = [out, *sorted(out.parent.glob(out.name + ".part-*"))]
    before = {p: _size_and_tail(p) for p in files}
    time.sleep(1.0)
    after = {p: _size_and_tail(p) for p in files}
    assert before == after, "part files changed after the coordinator was killed"
    orphans = [
        p
        for p in psutil.process_iter(["ppid"])
        if p.info["ppid"] == s.proc.pid
    ]
    assert not orphans
    return workers


# -- fixtures -----------------------------------------------------------------------------------

#: The tables every kind-of-key test exports: (DDL and rows, ORDER BY of the reference, dsn extra).
KEYED: dict[str, tuple[str, str, str]] = {
    "int": (
        f"""CREATE TABLE t (id int PRIMARY KEY, v text, n numeric);
        INSERT INTO t SELECT g,
            CASE WHEN g % 97 = 0 THEN NULL WHEN g % 89 = 0 THEN E'line\\nbreak, "q"'
                 WHEN g % 83 = 0 THEN '' ELSE md5(g::text) END,
            g / 7.0
        FROM generate_series(1, {ROWS}) g""",
        "id",
        "",
    ),
    "text": (
        f"""CREATE TABLE t (k text PRIMARY KEY, v int);
        INSERT INTO t SELECT CASE g % 5 WHEN 0 THEN upper(md5(g::text)) WHEN 1 THEN md5(g::text)
                WHEN 2 THEN 'Ünïcode ' || g WHEN 3 THEN ' space, ' || g ELSE 'a"b' || g END, g
        FROM generate_series(1, {ROWS}) g""",
        "k",
        "",
    ),
    "uuid": (
        f"""CREATE TABLE t (u uuid PRIMARY KEY, v int);
        INSERT INTO t SELECT md5(g::text)::uuid, g FROM generate_series(1, {ROWS}) g""",
        "u",
        "",
    ),
    "timestamptz": (
        f"""CREATE TABLE t (ts timestamptz PRIMARY KEY, v int);
        INSERT INTO t SELECT timestamptz '1999-12-31 23:00:00+00'
                + g * interval '1 hour 3.123457 seconds', g
        FROM generate_series(1, {ROWS}) g""",
        "ts",
        # a zone with daylight saving time: ISO key text must carry the offset to round-trip
        " options='-c TimeZone=Europe/Berlin'",
    ),
    "composite": (
        f"""CREATE TABLE t (a int, b text, v int, PRIMARY KEY (a, b));
        INSERT INTO t SELECT g % 37, md5(g::text), g FROM generate_series(1, {ROWS}) g""",
        "a, b",
        "",
    ),
}


#: (workers, chunk_rows) of the parallel exports compared for each kind of key (0: one COPY per
#: range); chunk sizes that do not divide the ranges put chunk ends everywhere.
CONFIGS: dict[str, tuple[tuple[int, int], ...]] = {
    "int": ((3, 7919), (2, 0)),
    "text": ((2, 7919),),
    "uuid": ((3, 4999),),
    "timestamptz": ((3, 7919),),
    "composite": ((2, 4999), (3, 0)),
}


@pytest.fixture(scope="module")
def big(pg: EphemeralPostgres) -> Iterator[str]:
    """A database with a 100k-row table ``t`` that the kill/resume tests only read."""
    name = f"par_{uuid.uuid4().hex[:12]}"
    dsn = pg.create_database(name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"""CREATE TABLE t (id int PRIMARY KEY, v text, note text);
            INSERT INTO t SELECT g * 3, md5(g::text),
                CASE WHEN g % 10 = 0 THEN NULL ELSE E'x,"y"\\n' || g END
            FROM generate_series(1, {ROWS}) g;
            ANALYZE t"""
        )
    yield dsn
    if pg.running:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


_REF: dict[str, bytes] = {}


@pytest.fixture
def big_ref(big: str, psql_csv: PsqlCsv) -> bytes:
    if big not in _REF:
        _REF[big] = psql_csv(big, "SELECT * FROM t ORDER BY id")
    return _REF[big]


# -- byte identity ------------------------------------------------------------------------------


@pytest.mark.all_versions
@pytest.mark.parametrize("kind", sorted(KEYED))
def test_parallel_is_byte_identical_for_every_key_kind(
    kind: str, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    ddl, order, extra = KEYED[kind]
    run_sql(dsn, ddl)
    if kind != "uuid":  # one table keeps no planner statistics: the estimate is unknown
        run_sql(dsn, "ANALYZE t")
    conninfo = dsn + extra
    ref = psql_csv(conninfo, f"SELECT * FROM t ORDER BY {order}")
    assert ref.count(b"\n") >= ROWS

    single = tmp_path / "w1.csv"
    r1 = export_table(conninfo, "t", single, chunk_rows=7919)
    assert single.read_bytes() == ref
    m1 = read_manifest(single)
    assert m1["workers"] == 1
    assert_manifest_tiles(single, m1)

    for workers, chunk_rows in CONFIGS[kind]:
        out = tmp_path / f"w{workers}-{chunk_rows}.csv"
        r = export_table(conninfo, "t", out, chunk_rows=chunk_rows, workers=workers)
        assert out.read_bytes() == ref, f"workers={workers} chunk_rows={chunk_rows}"
        assert (r.rows, r.bytes, r.xxh3_128) == (r1.rows, r1.bytes, r1.xxh3_128)
        assert not r.resumed and not r.point_in_time
        m = read_manifest(out)
        assert m["workers"] == workers  # 100k distinct keys: every range is used
        assert_manifest_tiles(out, m)
        if chunk_rows:
            assert_same_manifest_form(m1, m)
            assert len(m["chunks"]) >= len(m1["chunks"])  # each range ends in a partial chunk
        else:  # one COPY per range
            assert len(m["chunks"]) == workers
        assert leftovers(out) == []


@pytest.mark.all_versions
def test_header_appears_once(big: str, psql_csv: PsqlCsv, big_ref: bytes, tmp_path: Path) -> None:
    ref = psql_csv(big, "SELECT * FROM t ORDER BY id", "FORMAT csv, HEADER")
    assert ref.startswith(b"id,v,note\n")
    out = tmp_path / "h.csv"
    export_table(big, "t", out, header=True, workers=3, chunk_rows=9000)
    data = out.read_bytes()
    assert data == ref
    assert data.count(b"id,v,note\n") == 1
    assert_manifest_tiles(out, read_manifest(out))

    text_ref = psql_csv(big, "SELECT * FROM t ORDER BY id", "FORMAT text")
    out2 = tmp_path / "t.txt"
    export_table(big, "t", out2, options=CopyOptions(format="text"), workers=2, chunk_rows=9000)
    assert out2.read_bytes() == text_ref
    assert leftovers(out) == [] and leftovers(out2) == []


@pytest.mark.all_versions
def test_filter_with_empty_ranges(big: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """Recorded ranges that hold no row of the filter (also the first, with the header)."""
    def _identity(t: ResolvedTable, opts: CopyOptions) -> dict[str, object]:
        spec = ExportSpec("t", where=t.where, options=opts)
        return spec.resolved(t.qualified, t.key, t.key_types, t.columns).identity()

    where = "id % 10 = 0 AND id < 2000"
    ref = psql_csv(big, f"SELECT * FROM t WHERE {where} ORDER BY id", "FORMAT csv, HEADER")
    out = tmp_path / "f.csv"
    opts = CopyOptions(header=True)
    with psycopg.connect(big, autocommit=True) as conn:
        plan = introspect(conn, "t", where=where)
        row = conn.execute(read_settings_query()).fetchone()
        assert row is not None
    settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
    # (-inf,1] (1,5] (5,7] hold no row of the filter; (7,100] some; (100,99999] the rest;
    # (99999,10^6] and (10^6,+inf) none again
    bounds = [("1",), ("5",), ("7",), ("100",), ("99999",), ("1000000",)]
    save_parts(
        out,
        new_parts(_identity(plan, opts), settings, "2020-01-01T00:00:00.000+00:00", bounds),
    )
    r = export_table(big, "t", out, where=where, options=opts, workers=3, chunk_rows=4)
    assert out.read_bytes() == ref
    assert r.rows == 66 and ref.count(b"\n") == 67  # multiples of 30 below 2000
    m = read_manifest(out)
    assert m["workers"] == len(bounds) + 1
    assert m["where"] == where
    assert_manifest_tiles(out, m)
    assert leftovers(out) == []

    # and a natural split of a filter that keeps few rows at the end of a large table
    where2 = "id > 299970"
    ref2 = psql_csv(big, f"SELECT * FROM t WHERE {where2} ORDER BY id")
    out2 = tmp_path / "f2.csv"
    r2 = export_table(big, "t", out2, where=where2, workers=3, chunk_rows=2)
    assert out2.read_bytes() == ref2 and r2.rows == 10
    assert_manifest_tiles(out2, read_manifest(out2))
    assert leftovers(out2) == []


@pytest.mark.all_versions
@pytest.mark.parametrize(("rows", "chunk_rows"), [(0, None), (1, None), (5, None), (0, 1), (5, 1)])
def test_more_workers_than_rows(
    rows: int,
    chunk_rows: int | None,
    dsn: str,
    run_sql: RunSql,
    psql_csv: PsqlCsv,
    tmp_path: Path,
) -> None:
    run_sql(
        dsn,
        "CREATE TABLE t (id int PRIMARY KEY, v text);"
        f"INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, {rows}) g; ANALYZE t",
    )
    ref = psql_csv(dsn, "SELECT * FROM t ORDER BY id", "FORMAT csv, HEADER")
    out = tmp_path / "o.csv"
    r = export_table(dsn, "t", out, workers=4, chunk_rows=chunk_rows, header=True)
    assert out.read_bytes() == ref
    assert r.rows == rows
    m = read_manifest(out)
    assert 1 <= m["workers"] <= 4
    if rows == 5:
        assert m["workers"] == 4  # five rows are enough for four non-empty ranges
    assert_manifest_tiles(out, m)
    assert leftovers(out) == []


# -- balance ------------------------------------------------------------------------------------


def _sizes(sample: Sequence[tuple[str, ...]], bounds: Sequence[tuple[str, ...]]) -> list[int]:
    """How many sample keys each range gets (sample and bounds in the same order)."""
    sizes = [0] * (len(bounds) + 1)
    for k in sample:
        sizes[sum(1 for b in bounds if k > b)] += 1
    return sizes


def _keys(values: Sequence[int]) -> list[tuple[str, ...]]:
    return [(f"{v:08d}",) for v in values]  # zero-padded: string order is number order


def test_pick_boundaries_even_quantiles() -> None:
    for n in (2, 3, 5, 10, 99, 100, 101, 1000, 30_000):
        sample = _keys(range(n))
        for parts in range(2, 9):
            bounds = pick_boundaries(sample, parts)
            assert bounds == sorted(set(bounds)), "strictly increasing"
            assert all(b in sample for b in bounds)
            assert len(bounds) == min(parts, n) - 1, (n, parts, bounds)
            sizes = _sizes(sample, bounds)
            assert max(sizes) - min(sizes) <= 1, (n, parts, sizes)
    assert pick_boundaries(_keys(range(100)), 4) == _keys([24, 49, 74])


def test_range_0_gets_a_smaller_share_when_it_follows_the_others() -> None:
    """Compressed ``workers`` exports: range 0's process also decompresses the later ranges, of
    which only range 1 while it runs, so range 0 gets fewer rows (``s + cost * t = t``, ``t``
    each other range's equal share of the rest): never an even split's worth more for the
    others than following range 1 costs."""
    assert first_share(1) == 1.0
    assert first_share(2, 0.0) == pytest.approx(0.5) and first_share(3, 0.0) == pytest.approx(1 / 3)
    assert first_share(2, 0.1) == pytest.approx(0.9 / 1.9)
    assert first_share(4, 0.2) == pytest.approx(0.8 / 3.8)
    for parts in range(2, 20):
        s = first_share(parts, FOLLOW_COST)
        other = (1 - s) / (parts - 1)
        assert s < 1 / parts < other
        assert s + FOLLOW_COST * other == pytest.approx(other)
        assert other * parts <= 1 / (1 - FOLLOW_COST / 2) + 1e-9  # at most 11% above even
    sample = _keys(range(1000))
    bounds = pick_boundaries(sample, 2, first_share(2))
    assert bounds == _keys([443]) and _sizes(sample, bounds) == [444, 556]
    sizes = _sizes(sample, pick_boundaries(sample, 4, 0.1))
    assert sizes[0] == 100 and max(sizes[1:]) - min(sizes[1:]) <= 1
    assert pick_boundaries(sample, 3, None) == pick_boundaries(sample, 3)
    assert pick_boundaries(_keys(range(3)), 2, 0.1) == []  # a share below one key: no boundary


def test_pick_boundaries_duplicates_empty_and_one_part() -> None:
    assert pick_boundaries([], 4) == []
    assert pick_boundaries(_keys(range(100)), 1) == []
    assert pick_boundaries(_keys(range(100)), 0) == []
    # one key repeated: nothing to split
    assert pick_boundaries(_keys([7] * 50), 4) == []
    # two keys, half each: one boundary, two equal ranges
    half = _keys([1] * 50 + [2] * 50)
    assert pick_boundaries(half, 4) == _keys([1])
    # a heavy key in the middle: boundaries are distinct and none is the last key
    skew = _keys([1] * 10 + [2] * 80 + list(range(3, 13)))
    b = pick_boundaries(skew, 5)
    assert b == sorted(set(b)) and skew[-1] not in b and b
    assert _sizes(skew, b)[-1] > 0
    # composite keys compare as tuples
    comp = [(a, c) for a in ("a", "b") for c in ("x", "y", "z")]
    assert pick_boundaries(comp, 2) == [("a", "z")]


def _sampled_counts(dsn: str, table: str, parts: int) -> tuple[list[tuple[str, ...]], list[int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = introspect(conn, table)
        bounds = sample_boundaries(conn, plan, parts)
    return bounds, range_counts(dsn, table, plan.key, ranges_of_bounds(bounds))


@pytest.mark.all_versions
@pytest.mark.parametrize(
    "ddl",
    [
        # sparse integers: ten small keys, then 100,001 keys above a billion
        f"""CREATE TABLE skew (id bigint PRIMARY KEY, v text);
        INSERT INTO skew SELECT g, 'small' FROM generate_series(1, 10) g;
        INSERT INTO skew SELECT 1000000000 + g, md5(g::text) FROM generate_series(0, {ROWS}) g""",
        # text keys, 90% of them sharing a long prefix
        f"""CREATE TABLE skew (id text PRIMARY KEY, v int);
        INSERT INTO skew SELECT CASE WHEN g % 10 = 0 THEN md5(g::text)
                ELSE 'customer/region-7/account-' || lpad(g::text, 8, '0') END, g
        FROM generate_series(1, {ROWS}) g""",
        # a composite key whose first column has only three values
        f"""CREATE TABLE skew (a int, b int, v text, PRIMARY KEY (a, b));
        INSERT INTO skew SELECT CASE WHEN g % 10 < 8 THEN 2 ELSE g % 10 END, g, 'x'
        FROM generate_series(1, {ROWS}) g""",
    ],
    ids=["sparse-int", "text-prefix", "composite"],
)
def test_ranges_are_balanced_on_skewed_keys(ddl: str, dsn: str, run_sql: RunSql) -> None:
    run_sql(dsn, ddl + "; ANALYZE skew")
    for parts in (2, 4):
        bounds, counts = _sampled_counts(dsn, "skew", parts)
        assert len(bounds) == parts - 1
        assert sum(counts) == run_sql(dsn, "SELECT count(*) FROM skew")[0][0]
        assert_balanced(counts)


def test_balanced_without_statistics_and_with_a_filter(dsn: str, run_sql: RunSql) -> None:
    """No ANALYZE (no estimate: the sample is the whole key column), and a filter."""
    run_sql(
        dsn,
        "CREATE TABLE s (id int PRIMARY KEY, grp int);"
        "INSERT INTO s SELECT g, g % 4 FROM generate_series(1, 40000) g",
    )
    _, counts = _sampled_counts(dsn, "s", 3)
    assert_balanced(counts, 0.05)
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = introspect(conn, "s", where="grp = 1 AND id > 30000")
        bounds = sample_boundaries(conn, plan, 4)
    with psycopg.connect(dsn, autocommit=True) as conn:
        filtered = [
            str(r[0])
            for r in conn.execute("SELECT id FROM s WHERE grp = 1 AND id > 30000 ORDER BY id")
        ]
    sizes = _sizes([(f"{int(k):08d}",) for k in filtered], [(f"{int(b[0]):08d}",) for b in bounds])
    assert len(sizes) == 4
    assert_balanced(sizes, 0.05)


@pytest.mark.all_versions
def test_block_sample_of_a_large_table(
    dsn: str, run_sql: RunSql, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The TABLESAMPLE path (made to apply to a small table): thinned on the server, balanced."""
    run_sql(
        dsn,
        "CREATE TABLE b (id bigint PRIMARY KEY, v text);"
        f"INSERT INTO b SELECT g * 7, md5(g::text) FROM generate_series(1, {ROWS}) g; ANALYZE b",
    )
    pages = run_sql(dsn, "SELECT relpages FROM pg_class WHERE relname = 'b'")[0][0]
    monkeypatch.setattr(parallel, "SAMPLE_BLOCKS", pages // 2 - 10)  # about half the blocks
    monkeypatch.setattr(parallel, "SAMPLE_ROWS", 1000)
    with caplog.at_level(logging.INFO, logger="copystream"):
        bounds, counts = _sampled_counts(dsn, "b", 2)
    assert len(bounds) == 1
    assert sum(counts) == ROWS
    assert_balanced(counts)
    # about half of the table was sampled (~50k keys), thinned on the server before sending
    msg = next(r.getMessage() for r in caplog.records if "sampled keys" in r.getMessage())
    sent = int(msg.split(" from ")[1].split(" ")[0].replace(",", ""))
    assert 100 <= sent <= 2 * parallel.SAMPLE_ROWS, msg


@pytest.mark.slow
def test_block_sample_balance_on_a_large_table(dsn: str, run_sql: RunSql) -> None:
    """A table over twice SAMPLE_BLOCKS, with the real constants: eight ranges within ±20%."""
    run_sql(
        dsn,
        "CREATE TABLE big (id bigint PRIMARY KEY, v text);"
        "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1500000) g; ANALYZE big",
    )
    pages = run_sql(dsn, "SELECT relpages FROM pg_class WHERE relname = 'big'")[0][0]
    assert pages > 2 * parallel.SAMPLE_BLOCKS  # the sample is really a sample
    for parts in (2, 8):
        bounds, counts = _sampled_counts(dsn, "big", parts)
        assert len(bounds) == parts - 1
        assert sum(counts) == 1_500_000
        assert_balanced(counts)


# -- kill and resume ----------------------------------------------------------------------------


@pytest.mark.all_versions
def test_kill_coordinator_kills_workers_then_resume(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "k.csv"
    report = tmp_path / "report.json"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "600", "--report",
                     str(report))  # fmt: skip
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2, chunks=2))
        workers = kill_coordinator(s, out)
    assert len(workers) == 2
    assert s.proc.returncode == -signal.SIGKILL
    # OUTPUT holds the first range's rows so far (it writes in place); the rest come at the join
    head = out.read_bytes()
    assert 0 < len(head) < len(big_ref) and big_ref.startswith(head)
    plan = json.loads(parts_json(out).read_bytes())
    assert len(plan["ranges"]) == 2
    # the sampled ranges hold about the same number of rows
    assert_balanced(range_counts(big, "t", ["id"], plan["ranges"]))
    before = part_checkpoints(out, 2)
    assert all(cp is not None for cp in before)
    # (a descheduled test runner may see one range finish before the kill, never both)
    assert not all(cp is not None and cp["finished"] for cp in before)

    # status reads the ranges' checkpoints: their sums, and how many ranges are done
    rows = sum(cp["rows"] for cp in before if cp is not None)
    nbytes = sum(cp["offset"] for cp in before if cp is not None)
    finished = sum(bool(cp["finished"]) for cp in before if cp is not None)
    st = export_status(out)
    assert (st.state, st.table, st.rows, st.bytes, st.last_key) == (
        "in progress", "public.t", rows, nbytes, None
    )  # fmt: skip
    assert (st.ranges, st.ranges_finished) == (2, finished)
    assert st.chunks == sum(len(cp["chunks"]) for cp in before if cp is not None)
    shown = run(cli("status", str(out)))
    assert_ok(shown)
    assert f"in progress; table public.t; {rows:,} rows" in shown.stdout
    assert f"{finished} of 2 key ranges finished" in shown.stdout
    as_json = json.loads(run(cli("status", str(out), "--json")).stdout)
    assert (as_json["rows"], as_json["ranges"], as_json["ranges_finished"]) == (rows, 2, finished)
    assert part_checkpoints(out, 2) == before  # status only reads

    proc = run(cmd)
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is True and m["workers"] == 2
    assert json.loads(report.read_bytes())["resumed"] is True
    st = export_status(out)
    assert (st.state, st.rows, st.ranges, st.ranges_finished) == ("complete", m["rows"], 2, 2)
    assert_manifest_tiles(out, m)
    # every unfinished range continued where the killed run had checkpointed it
    for i, cp in enumerate(before):
        assert cp is not None
        if not cp["finished"]:
            assert f"{out.name}.part-{i:04d}: resuming at row {cp['rows']:,}," in proc.stderr, (
                proc.stderr
            )
    assert leftovers(out) == []


def test_a_killed_worker_is_restarted_from_its_checkpoint(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    """What the OOM killer does: one worker process of ``--workers 2`` SIGKILLed, then the
    worker started in its place SIGKILLed too. Each time the coordinator starts a new worker
    for that range, which resumes from the range's checkpoint; the export finishes (exit 0,
    byte-identical), each restart logged and counted in the report's retries."""
    out = tmp_path / "w.csv"
    report = tmp_path / "w.json"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "300", "--report",
                     str(report))  # fmt: skip
    killed: list[int] = []
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2, chunks=3))
        for _ in range(2):
            seen = {p.pid for p in worker_processes(s.proc.pid)}
            # the newest worker (after the first kill: the one started in place of the victim)
            victim = max(worker_processes(s.proc.pid), key=lambda p: p.create_time())
            done = sum(len(cp["chunks"]) for cp in part_checkpoints(out, 2) if cp is not None)
            os.kill(victim.pid, signal.SIGKILL)
            killed.append(victim.pid)

            def replaced(seen: set[int] = seen, done: int = done, k: int = len(killed)) -> bool:
                new = {p.pid for p in worker_processes(s.proc.pid)} - seen
                now = sum(len(cp["chunks"]) for cp in part_checkpoints(out, 2) if cp)
                resumed = s.stderr().count("resuming at row") >= k  # it began the range
                return bool(new) and resumed and now >= done + 2  # and it got somewhere

            assert wait_until(s, replaced, what="restarted worker"), s.stderr()
        s.proc.wait(timeout=120)
        err = s.stderr()
    assert s.proc.returncode == 0, err
    assert "Traceback" not in err
    deaths = [x for x in err.splitlines() if "was killed by SIGKILL" in x]
    assert len(deaths) == 2, err
    assert all("its new worker resumes from the checkpoint" in x for x in deaths), deaths
    assert "resuming at row" in err  # the new worker carried on from the range's checkpoint
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is False and m["workers"] == 2
    assert_manifest_tiles(out, m)
    assert json.loads(report.read_bytes())["retries"] >= 2
    assert leftovers(out) == []


def test_a_killed_worker_beyond_the_retries_stops_the_export_resumably(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    """With ``--retries 0`` a dead worker is not restarted: the export stops with exit 1 and one
    line saying why, the other range still runs to its end, and a re-run finishes."""
    out = tmp_path / "r0.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "300")
    with started([*cmd, "--retries", "0"]) as s:
        assert wait_until(s, progress_in_every_part(out, 2, chunks=3))
        victim = worker_processes(s.proc.pid)[0]
        os.kill(victim.pid, signal.SIGKILL)
        s.proc.wait(timeout=120)
        err = s.stderr()
    errors = [x for x in err.splitlines() if x.startswith("copystream: error:")]
    assert s.proc.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "0 retries used up (the worker process was killed by SIGKILL" in errors[0]
    assert "run the same command again to resume" in errors[0]
    cps = part_checkpoints(out, 2)
    assert sum(bool(cp and cp["finished"]) for cp in cps) == 1  # the other range finished
    proc = run(cmd)
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    assert read_manifest(out)["resumed"] is True
    assert leftovers(out) == []


def test_several_kills_with_changing_workers(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """Three ranges recorded by --workers 3 are resumed by --workers 2, then by --workers 1."""
    out = tmp_path / "c.csv"
    base = export_cmd(big, "t", out, "--chunk-rows", "1000")
    with started([*base, "--workers", "3"]) as s:
        assert wait_until(s, progress_in_every_part(out, 3))
        kill_coordinator(s, out)
    ranges = json.loads(parts_json(out).read_bytes())["ranges"]
    assert len(ranges) == 3
    done1 = rows_done(out, 3)

    with started([*base, "--workers", "2"]) as s:
        # the next kill comes when the resumed run has made progress of its own
        assert wait_until(s, lambda: sum(rows_done(out, 3)) >= sum(done1) + 6000)
        kill_coordinator(s, out)
    assert json.loads(parts_json(out).read_bytes())["ranges"] == ranges  # same ranges
    done2 = rows_done(out, 3)
    assert all(b >= a for a, b in zip(done1, done2, strict=True)), (done1, done2)

    proc = run([*base, "--workers", "1"])
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is True
    assert m["workers"] == 3  # the export was split into three ranges
    assert_manifest_tiles(out, m)
    assert leftovers(out) == []


def test_single_worker_checkpoint_is_resumed_single(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    """--workers on a re-run of an interrupted single-worker export does not split it."""
    out = tmp_path / "s.csv"
    base = export_cmd(big, "t", out, "--chunk-rows", "3000")
    k = kill_export(base, out, min_chunks=2)
    assert k.returncode == -signal.SIGKILL and k.checkpoint is not None
    proc = run([*base, "--workers", "3"])
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is True and m["workers"] == 1
    assert leftovers(out) == []


@pytest.mark.slow
def test_many_kills_of_a_large_parallel_export(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A million rows, four workers, killed at six points of progress, then finished."""
    run_sql(
        dsn,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, d date);"
        "INSERT INTO t SELECT g, md5(g::text), date '2000-01-01' + g % 5000"
        "  FROM generate_series(1, 1000000) g; ANALYZE t",
    )
    ref = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    out = tmp_path / "many.csv"
    cmd = export_cmd(dsn, "t", out, "--workers", "4", "--chunk-rows", "5000")
    done = 0
    for step in range(6):
        # the ranges are split by the first run; the resuming runs use other worker counts
        extra = [] if step == 0 else ["--workers", str(1 + step % 3)]
        goal = done + 60_000
        with started([*cmd, *extra]) as s:
            assert wait_until(s, lambda goal=goal: sum(rows_done(out, 4)) >= goal)
            kill_coordinator(s, out)
        now = sum(rows_done(out, 4))
        assert now >= goal
        done = now
    proc = run(cmd, timeout=600)
    assert_ok(proc)
    assert out.read_bytes() == ref
    m = read_manifest(out)
    assert m["resumed"] is True and m["workers"] == 4
    assert_manifest_tiles(out, m)
    assert leftovers(out) == []


def test_kill_during_the_join(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """Killed once every part is finished (before or inside the join): the next run joins, or
    resumes the join from its record, past a torn block at the end of OUTPUT."""
    out = tmp_path / "j.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "20000")

    def all_finished() -> bool:
        cps = part_checkpoints(out, 2)
        return all(cp is not None and cp["finished"] for cp in cps)

    caught = False
    for _ in range(5):
        with started([*cmd, "--restart"]) as s:
            if wait_until(s, all_finished):
                os.kill(s.proc.pid, signal.SIGKILL)
                s.proc.wait(timeout=30)
                caught = s.proc.returncode == -signal.SIGKILL
        if caught and parts_json(out).exists():
            break
        caught = False
    assert caught, "could not stop the export between its parts and the end of the join"
    # OUTPUT is the first part's file and whatever the join had appended; simulate the worst:
    # a torn block of wrong bytes after it
    first = part_checkpoints(out, 2)[0]
    assert first is not None
    head = big_ref[: first["offset"]]
    assert out.read_bytes()[: len(head)] == head
    with out.open("ab") as f:
        f.write(b"garbage" * 1000)
    proc = run(cmd)
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is True
    assert_manifest_tiles(out, m)
    assert leftovers(out) == []


def test_part_files_left_by_an_interrupted_clean_up_are_removed(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    """The plan is removed first after the join: stray part files later mean nothing but
    litter, and the next run (already complete) clears them without touching OUTPUT."""
    out = tmp_path / "cu.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2")
    assert_ok(run(cmd))
    part_file(out, 1).write_bytes(b"stale part")
    part_checkpoint(out, 1).write_bytes(b"{}")
    plan_temp = tmp_path / ".cu.csv.parts.json.k1ll3d_0.tmp"  # a save_parts killed mid-write
    plan_temp.write_bytes(b'{"version":')
    proc = run(cmd)
    assert_ok(proc)
    assert "already complete" in proc.stderr
    assert out.read_bytes() == big_ref
    assert leftovers(out) == []
    assert not plan_temp.exists()


def killed_two_worker_export(big: str, out: Path) -> list[str]:
    """A 2-worker export of ``t`` SIGKILLed once both ranges have checkpointed; its command."""
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "1000")
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2, chunks=2))
        kill_coordinator(s, out)
    lock_file(out).unlink()  # left by the killed coordinator
    return cmd


def as_version_1(out: Path) -> None:
    """Turn an unfinished export's files into what copystream 0.1.0 left: the first range in
    OUTPUT.part-0000 (not OUTPUT), and a parts plan of version 1."""
    plan = parallel.load_parts(out)
    assert plan is not None and plan.version == 2
    out.rename(part_file(out, 0).with_name(f"{out.name}.part-0000"))
    old = parallel.KeyRanges(plan.export, plan.settings, plan.started_at, plan.ranges, version=1)
    parts_json(out).write_text(json.dumps(old.to_json()))
    assert json.loads(parts_json(out).read_bytes())["version"] == 1


def test_an_unfinished_export_of_version_0_1_0_is_resumed(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "v1.csv"
    cmd = killed_two_worker_export(big, out)
    as_version_1(out)
    proc = run(cmd)
    assert_ok(proc)
    assert "v1.csv.part-0000: resuming at row" in proc.stderr
    assert out.read_bytes() == big_ref
    assert_manifest_tiles(out, read_manifest(out))
    assert leftovers(out) == []


@pytest.mark.parametrize("version", [1, 2])
def test_killed_after_the_manifest_is_complete_not_joined_again(
    big: str, big_ref: bytes, tmp_path: Path, version: int
) -> None:
    """Killed between writing the manifest and removing the parts (0.1.0 removed the plan last,
    so its part-0000 checkpoint may be gone too): the next run finds a complete export that
    verifies, clears the parts and touches neither OUTPUT nor its manifest."""
    out = tmp_path / "mk.csv"
    cmd = killed_two_worker_export(big, out)
    if version == 1:
        as_version_1(out)
    plan = parts_json(out).read_bytes()
    part1 = (part_file(out, 1).read_bytes(), part_checkpoint(out, 1).read_bytes())
    assert_ok(run(cmd))  # finishes; the plan and part files are removed
    assert out.read_bytes() == big_ref
    # put back what the kill in that window leaves
    parts_json(out).write_bytes(plan)
    part_file(out, 1).write_bytes(part1[0])
    part_checkpoint(out, 1).write_bytes(part1[1])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out, manifest_of(out))}
    proc = run(cmd)
    assert_ok(proc)
    assert "already complete" in proc.stderr
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out, manifest_of(out))} == before
    assert leftovers(out) == []


def test_output_without_its_first_range_checkpoint_is_not_removed(big: str, tmp_path: Path) -> None:
    """A parts plan whose first range never checkpointed, and a file at OUTPUT that is not
    that range's: refused (exit 2, one line), never deleted."""
    out = tmp_path / "nr.csv"
    cmd = killed_two_worker_export(big, out)
    part_checkpoint(out, 0).unlink()
    out.write_bytes(b"someone else's file\n")
    files = {x.name: x.read_bytes() for x in tmp_path.iterdir()}
    proc = run(cmd)
    assert_one_error_line(proc, 2, "nr.csv", "--restart")
    assert {x.name: x.read_bytes() for x in tmp_path.iterdir()} == files


def manifest_of(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def test_damaged_first_part_is_refused(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """OUTPUT holds the first part while the export runs: an edit there is refused, not
    appended to, until --restart."""
    out = tmp_path / "d0.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "1000")
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2, chunks=2))
        kill_coordinator(s, out)
    lock_file(out).unlink()  # left by the killed coordinator
    data = bytearray(out.read_bytes())
    data[10] ^= 1
    out.write_bytes(bytes(data))
    files = {x.name: x.read_bytes() for x in tmp_path.iterdir()}
    proc = run(cmd)
    assert_one_error_line(proc, 2, "d0.csv", "--restart")
    assert {x.name: x.read_bytes() for x in tmp_path.iterdir()} == files  # nothing touched
    assert_ok(run([*cmd, "--restart"]))
    assert out.read_bytes() == big_ref
    assert leftovers(out) == []


def test_restart_discards_parts(big: str, big_ref: bytes, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    base = export_cmd(big, "t", out, "--chunk-rows", "1000")
    with started([*base, "--workers", "3"]) as s:
        assert wait_until(s, progress_in_every_part(out, 3))
        kill_coordinator(s, out)
    assert part_file(out, 2).exists()
    proc = run([*base, "--workers", "2", "--restart", "--chunk-rows", "20000"])
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is False and m["workers"] == 2
    assert leftovers(out) == []  # part 2 of the discarded plan is gone too


def test_damaged_parts_plan_refused_then_restart(big: str, big_ref: bytes, tmp_path: Path) -> None:
    out = tmp_path / "d.csv"
    base = export_cmd(big, "t", out, "--chunk-rows", "1000", "--workers", "3")
    with started(base) as s:
        assert wait_until(s, progress_in_every_part(out, 3))
        kill_coordinator(s, out)
    p = parts_json(out)
    p.write_bytes(p.read_bytes().replace(b'"started_at": "', b'"started_at": "1'))
    lock_file(out).unlink()  # left by the killed coordinator
    files = {x.name: x.read_bytes() for x in tmp_path.iterdir()}
    proc = run(base)
    assert_one_error_line(proc, 2, "parts.json", "--restart")
    assert {x.name: x.read_bytes() for x in tmp_path.iterdir()} == files  # nothing touched
    proc = run([*base, "--restart"])
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    assert read_manifest(out)["resumed"] is False
    assert leftovers(out) == []


def test_damaged_part_checkpoint_refused_before_any_work(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "dp.csv"
    base = export_cmd(big, "t", out, "--chunk-rows", "1000", "--workers", "2")
    with started(base) as s:
        assert wait_until(s, progress_in_every_part(out, 2))
        kill_coordinator(s, out)
    lock_file(out).unlink()  # left by the killed coordinator
    cp = part_checkpoint(out, 1)
    cp.write_bytes(cp.read_bytes().replace(b'"rows":', b'"rows": 1', 1))
    files = {x.name: x.read_bytes() for x in tmp_path.iterdir()}
    proc = run(base)
    assert_one_error_line(proc, 2, "dp.csv.part-0001.checkpoint.json", "--restart")
    assert {x.name: x.read_bytes() for x in tmp_path.iterdir()} == files  # no range moved on
    assert_ok(run([*base, "--restart"]))
    assert out.read_bytes() == big_ref
    assert leftovers(out) == []


@pytest.mark.all_versions
def test_filter_failing_while_sampling(big: str, tmp_path: Path) -> None:
    """The filter first runs in the sampling query: its error is the user's (exit 2)."""
    out = tmp_path / "fe.csv"
    proc = run(export_cmd(big, "t", out, "--workers", "2", "--where", "1 / (id - 150000) > 0"))
    assert_one_error_line(proc, 2, "division by zero")
    assert not out.exists() and leftovers(out) == []


def test_concurrent_export_to_same_output_is_refused(
    big: str, big_ref: bytes, tmp_path: Path
) -> None:
    out = tmp_path / "x.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "700")
    with started(cmd) as first:
        assert wait_until(first, progress_in_every_part(out, 2))
        assert lock_file(out).exists()
        # hold the first export still while others try: its workers are stopped, the
        # coordinator (which holds the lock) runs on
        workers = worker_processes(first.proc.pid)
        assert len(workers) == 2
        for w in workers:
            w.suspend()
        try:
            time.sleep(0.2)
            files_before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
            for extra in (["--restart"], [], ["--workers", "3"], ["--force"]):
                second = run([*cmd, *extra])
                assert_one_error_line(second, 2, "another copystream process")
                assert first.proc.poll() is None
                # the refused run left the running export's files alone
                files_after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
                assert files_after == files_before
        finally:
            for w in workers:
                w.resume()
        assert first.proc.wait(timeout=120) == 0, first.stderr()
    assert out.read_bytes() == big_ref
    assert read_manifest(out)["resumed"] is False
    assert leftovers(out) == []  # the lock file too


# -- --consistent -------------------------------------------------------------------------------

CONSISTENT_DDL = f"""
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g * 200, md5(g::text) FROM generate_series(1, {ROWS}) g;
ANALYZE t
"""


class Writer:
    """Modifies ``t`` all over its key range from another connection until stopped."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.seed = seed
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def batch(self, conn: psycopg.Connection[Any], i: int) -> None:
        # keys not multiple of 200 are new; every region of the key space gets some
        step = 200 * 97
        conn.execute(
            "INSERT INTO t SELECT g * %s + %s, 'inserted' FROM generate_series(0, %s) g "
            "ON CONFLICT DO NOTHING",
            [step, self.seed + i, ROWS * 200 // step],
        )
        conn.execute(
            "UPDATE t SET v = 'updated ' || %s WHERE id %% %s = %s", [i, step, 200 * (i % 97 + 1)]
        )
        conn.execute("DELETE FROM t WHERE id %% %s = %s", [step, 200 * ((i + 50) % 97 + 1)])

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                i = 1
                while not self.stop.is_set():
                    with conn.transaction():
                        self.batch(conn, i)
                    self.commits += 1
                    i += 1
                    time.sleep(0.02)
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Writer:
        with psycopg.connect(self.dsn, autocommit=True) as conn, conn.transaction():
            self.batch(conn, 0)  # one batch surely lands while the export runs
        self.commits += 1
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.error is None, self.error


@pytest.mark.all_versions
@pytest.mark.parametrize("consistent", [True, False], ids=["consistent", "not-consistent"])
def test_consistent_export_sees_the_table_as_it_was(
    consistent: bool, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, CONSISTENT_DDL)
    before = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    out = tmp_path / "p.csv"
    report = tmp_path / "report.json"
    cmd = export_cmd(dsn, "t", out, "--workers", "2", "--chunk-rows", "500", "--report",
                     str(report), *(["--consistent"] if consistent else []))  # fmt: skip
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2))
        with Writer(dsn, seed=1 if consistent else 3) as w:
            cps = part_checkpoints(out, 2)
            # the first batch committed while both ranges still had rows to export
            assert all(cp is not None and not cp["finished"] for cp in cps)
            assert s.proc.wait(timeout=120) == 0, s.stderr()
        assert w.commits >= 1
    data = out.read_bytes()
    m = read_manifest(out)
    assert_manifest_tiles(out, m)
    keys = first_column_ints(data)
    assert keys == sorted(set(keys)), "a key twice or out of order"
    after = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert after != before  # the table did change during the export
    if consistent:
        assert data == before
        assert m["point_in_time"] is True
        assert json.loads(report.read_bytes())["point_in_time"] is True
    else:
        assert data != before
        assert m["point_in_time"] is False
    assert leftovers(out) == []


@pytest.mark.all_versions
def test_consistent_single_worker(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, CONSISTENT_DDL)
    before = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    out = tmp_path / "p1.csv"
    cmd = export_cmd(dsn, "t", out, "--chunk-rows", "2000", "--consistent")
    with started(cmd) as s:
        assert wait_until(s, lambda: (read_json(out.with_name(out.name + ".checkpoint.json"))
                                      or {"chunks": []})["chunks"] != [])  # fmt: skip
        with Writer(dsn, seed=5):
            assert s.proc.wait(timeout=120) == 0, s.stderr()
    assert out.read_bytes() == before
    m = read_manifest(out)
    assert m["point_in_time"] is True and m["workers"] == 1


@pytest.mark.all_versions
def test_consistent_resumed_is_not_point_in_time(big: str, big_ref: bytes, tmp_path: Path) -> None:
    out = tmp_path / "cr.csv"
    cmd = export_cmd(big, "t", out, "--workers", "2", "--chunk-rows", "1500", "--consistent")
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2))
        kill_coordinator(s, out)
    proc = run(cmd)
    assert_ok(proc)
    assert out.read_bytes() == big_ref
    m = read_manifest(out)
    assert m["resumed"] is True
    assert m["point_in_time"] is False
    assert "no longer point-in-time" in proc.stderr, proc.stderr
    assert leftovers(out) == []


@pytest.mark.all_versions
def test_snapshot_lost_midway(dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """The session holding the snapshot is terminated: the export goes on without it."""
    run_sql(dsn, CONSISTENT_DDL)
    ref = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    out = tmp_path / "lost.csv"
    cmd = export_cmd(dsn, "t", out, "--workers", "2", "--chunk-rows", "700", "--consistent")
    with started(cmd) as s:
        assert wait_until(s, progress_in_every_part(out, 2))
        killed = run_sql(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'idle in transaction' AND query ILIKE '%pg_export_snapshot%' "
            "ORDER BY xact_start LIMIT 1",  # the holder began before any chunk
        )
        assert killed == [(True,)]
        assert s.proc.wait(timeout=120) == 0, s.stderr()
        stderr = s.stderr()
    assert out.read_bytes() == ref
    m = read_manifest(out)
    assert m["point_in_time"] is False
    assert "no longer point-in-time" in stderr
    assert leftovers(out) == []


# -- deadlines and a vanished snapshot ----------------------------------------------------------


def test_sampling_has_an_io_deadline(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """A server that stops answering while the key is sampled (here: the sampling query waits
    for an exclusive lock taken right after planning) ends the export after --io-timeout with
    a resumable failure, instead of hanging as long as the lock is held."""
    out = tmp_path / "sd.csv"
    locker = psycopg.connect(big, autocommit=True)
    held = threading.Event()

    class LockAfterPlanning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "paging by" in record.getMessage() and not held.is_set():
                locker.execute("BEGIN")
                locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
                held.set()

    def release() -> None:  # without a deadline the export would wait until here, then finish
        with psycopg.connect(big, autocommit=True) as c:
            c.execute("SELECT pg_terminate_backend(%s)", [locker.info.backend_pid])

    releaser = threading.Timer(20, release)
    releaser.start()
    handler = LockAfterPlanning(level=logging.DEBUG)
    logger = logging.getLogger("copystream")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    started_at = time.monotonic()
    try:
        with pytest.raises(ExportFailed) as info:
            export_table(big, "t", out, workers=2, io_timeout=1.0)
        elapsed = time.monotonic() - started_at
    finally:
        releaser.cancel()
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        locker.close()  # ends the lock
    assert held.is_set(), "the lock was never taken"
    assert "sampling the key range" in str(info.value)
    assert info.value.exit_code == 1
    assert elapsed < 30, f"the stalled sampling took {elapsed:.1f}s to be noticed"
    assert not out.exists() and not parts_json(out).exists()
    assert_ok(run(export_cmd(big, "t", out, "--workers", "2")))  # and it works once answered
    assert out.read_bytes() == big_ref


@pytest.mark.all_versions
def test_a_vanished_snapshot_is_recognised(big: str) -> None:
    """The chunk's snapshot import turns PostgreSQL's refusal into SnapshotGone, which the
    runner takes as "snapshot gone" (the export continues without it); nothing else is. The
    refusal changed in PostgreSQL 17: 42704 "does not exist" instead of 22023."""
    with psycopg.connect(big, autocommit=True) as conn:
        session = _Session(conn, 10.0)
        with pytest.raises(SnapshotGone) as gone:  # a snapshot id whose file does not exist
            session.begin("00000003-0000001B-1")
        conn.execute("ROLLBACK")
        if conn.info.server_version >= 170000:
            assert isinstance(gone.value.__cause__, psycopg.errors.UndefinedObject)
            assert 'snapshot "00000003-0000001B-1" does not exist' in str(gone.value)
        else:
            assert isinstance(gone.value.__cause__, psycopg.errors.InvalidParameterValue)
            assert "invalid snapshot identifier" in str(gone.value)
        with pytest.raises(psycopg.Error) as raw:  # the same refusal, not through a chunk
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'")
        conn.execute("ROLLBACK")
    assert type(raw.value) is type(gone.value.__cause__)
    assert _snapshot_gone(gone.value)
    assert not _snapshot_gone(raw.value)  # the same error not from the chunk's import
    # 55000 means "snapshot gone" only when the import raised it (then it is SnapshotGone)
    assert _snapshot_gone(SnapshotGone("could not import the requested snapshot"))
    assert not _snapshot_gone(
        psycopg.errors.ObjectNotInPrerequisiteState("cannot update a table during recovery")
    )
    assert not _snapshot_gone(psycopg.errors.SyntaxError("syntax error at or near"))


@pytest.mark.all_versions
def test_a_failing_filter_under_consistent_is_not_a_lost_snapshot(big: str, tmp_path: Path) -> None:
    """A --where that fails with 22023 (the SQLSTATE of "invalid snapshot identifier" too)
    is the user's error: one line, exit 2, no "snapshot is gone" warning, no second try."""
    out = tmp_path / "fw.csv"
    where = "regexp_match(v, 'a', 'z') IS NOT NULL"  # invalid regexp option: 22023
    proc = run(export_cmd(big, "t", out, "--consistent", "--where", where))
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("copystream: error:")]
    assert len(errors) == 1 and "regular expression" in errors[0], proc.stderr
    assert "WARNING" not in proc.stderr and "snapshot is gone" not in proc.stderr, proc.stderr
    assert not out.exists() and leftovers(out) == []


@contextlib.contextmanager
def tmpfs(where: Path, size: int) -> Iterator[Path]:
    """A real filesystem of ``size`` bytes mounted at ``where`` (a tmpfs), unmounted after.

    Mounting needs root, as CI has: anywhere else the test fails saying so, never skips.
    """
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
    proc = subprocess.run(mount, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(
            f"cannot mount a {size}-byte tmpfs at {where} ({proc.stderr.strip()}): this test "
            "needs root (CI runs as root); run the suite as root"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def test_a_full_disk_during_the_join_then_resume(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """The parts fit, but not one block of the join does (a real tmpfs): exit 1 with one line,
    OUTPUT cut back to what the join recorded, and once there is room for a block (less than a
    part) the same command finishes the join."""
    slack = 256 * 1024  # the checkpoints, the plan: less than one join block (1 MiB)
    with tmpfs(tmp_path / "small", len(big_ref) + slack) as where:
        out = where / "j.csv"
        cmd = export_cmd(big, "t", out, "--workers", "2")
        proc = run(cmd)
        assert proc.returncode == 1, proc.stderr
        errors = [x for x in proc.stderr.splitlines() if x.startswith("copystream: error:")]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "cannot join the parts" in errors[0] and "No space left" in errors[0]
        assert "free some space and run the same command again" in errors[0]
        first, second = part_checkpoints(out, 2)
        assert first is not None and first["finished"] and second is not None
        plan = json.loads(parts_json(out).read_bytes())
        assert plan["version"] == 3 and plan["join"] == {"part": 1, "copied": 0}
        assert out.stat().st_size == first["offset"]  # the torn block is cut off again
        # room for a couple of join blocks, but less than the part the old join copied whole
        room = len(big_ref) + 2 * 1024 * 1024
        subprocess.run(["mount", "-o", f"remount,size={room}", str(where)], check=True)
        assert free_bytes(where) < second["offset"]
        again = run(cmd)
        assert_ok(again)
        assert "resuming the join at part 1, byte 0" in again.stderr
        assert out.read_bytes() == big_ref
        assert leftovers(out) == []


def test_workers_on_a_disk_sized_for_the_output(big: str, big_ref: bytes, tmp_path: Path) -> None:
    """``--workers 2`` on a filesystem that holds the output plus 2 MiB, less than the later
    part the join appends: the join frees each block of the part as OUTPUT takes it. SIGKILLed
    right after join records (held at the open of the next one), it resumes each time from
    the record, and ends byte-identical."""
    slack = 2 * 1024 * 1024
    with tmpfs(tmp_path / "sized", len(big_ref) + slack) as where:
        out = where / "o.csv"
        cmd = export_cmd(big, "t", out, "--workers", "2")
        assert_ok(run(cmd))
        assert out.read_bytes() == big_ref
        assert leftovers(out) == []
        out.unlink(), manifest_of(out).unlink()

        kills, records = 0, 3  # the split plan, the join's start, its first block
        temporary = re.escape(f".{parts_json(out).name}.") + r".{8}\.tmp"
        for _ in range(10):
            # killed as it opens the next record: right after the last one, held there
            gate = KillAtOpen(where, temporary, records + 1)
            try:
                with started(cmd) as s:
                    gate.watch(s.proc.pid)
                    s.proc.wait(timeout=60)
                    err = s.stderr()
            finally:
                gate.close()
            if s.proc.returncode == 0:
                break
            assert s.proc.returncode == -signal.SIGKILL, err
            kills += 1
            lock_file(out).unlink(missing_ok=True)
            plan = json.loads(parts_json(out).read_bytes())
            assert plan["version"] == 3, "killed outside the join"
            part, copied = plan["join"]["part"], plan["join"]["copied"]
            first, second = part_checkpoints(out, 2)
            assert first is not None and second is not None and part == 1
            assert second["offset"] > slack  # the old join (the part whole) could not fit
            print(f"killed in the join: part {part}, {copied:,} of {second['offset']:,} bytes")
            assert out.stat().st_size >= first["offset"] + copied  # recorded = durable
            assert big_ref.startswith(out.read_bytes()[: first["offset"] + copied])
            records = 1  # from now on: right after the next record of the resumed join
        assert kills >= 2, "the join finished before it could be killed twice"
        assert "resuming the join at part 1" in err
        assert out.read_bytes() == big_ref
        m = read_manifest(out)
        assert m["resumed"] is True
        assert_manifest_tiles(out, m)
        assert leftovers(out) == []
