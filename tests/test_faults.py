"""Fault tests: every fault is REAL — killed backends, restarted servers, cut and stalled TCP
connections, a full filesystem, concurrent writers, statement timeouts.

Every export that is expected to finish is checked the same way: the file is byte-identical to
psql's ``\\copy (SELECT * FROM t ORDER BY id) TO STDOUT (FORMAT csv)``, the manifest records the
file's rows, bytes and xxh3-128, ``verify_file`` accepts it and no checkpoint is left. Exports
that are expected to stop are checked for exit code 1, a single error line, an intact checkpoint
whose prefix is byte-identical to psql's output, and a re-run that resumes and finishes.

Nothing here waits for the export by sleeping: the faults are triggered from the export's own
progress (a callback, a log record, the checkpoint on disk), every background thread stops by
itself, and every export runs under a watchdog so that a hang fails the test instead of the suite.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
import xxhash
from helpers import wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from copystream import RetriesExhausted, RetryPolicy, export_table, verify_file
from copystream.checkpoint import checkpoint_path, load_checkpoint
from copystream.export import ExportResult
from copystream.manifest import manifest_path
from copystream.testing import EphemeralPostgres

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

try:
    from fix_proxy import Proxy
except ImportError:  # tests/ imported as a package
    from tests.fix_proxy import Proxy  # type: ignore[no-redef, import-not-found, unused-ignore]

PsqlCsv = Callable[..., bytes]
T = TypeVar("T")

QUERY = "SELECT * FROM t ORDER BY id"
#: Backoff fast enough for tests; enough attempts to ride out every fault injected here.
FAST = RetryPolicy(retries=10, base_delay=0.05, max_delay=0.2)
#: A server restart takes a second or two: many short waits.
PATIENT = RetryPolicy(retries=60, base_delay=0.05, max_delay=0.25)
WATCHDOG = 60.0  # seconds any single export may take before the test fails as hung


# -- helpers ----------------------------------------------------------------------------------


def make_table(dsn: str, rows: int, *, step: int = 1) -> None:
    """``t(id bigint PK, name, amount, ts, note)`` with ``rows`` rows, ids ``step, 2*step, ...``.

    The values exercise CSV quoting (commas, double quotes), NULLs and empty strings.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2),"
            " ts timestamptz, note text)"
        )
        conn.execute(
            """INSERT INTO t
               SELECT g * %(step)s, 'orig ' || g, (g * 1.37)::numeric(12,2),
                      timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute',
                      CASE WHEN g %% 5 = 0 THEN NULL
                           WHEN g %% 3 = 0 THEN 'has "quote", comma'
                           ELSE repeat('x', g %% 41) END
               FROM generate_series(1, %(rows)s) g""",
            {"rows": rows, "step": step},
        )
        conn.execute("ANALYZE t")


def assert_same_bytes(got: bytes, expected: bytes, what: str = "output") -> None:
    """Byte equality with a short report (pytest's diff of megabytes is useless)."""
    if got == expected:
        return
    i = next((n for n, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    if i is None:
        i = min(len(got), len(expected))
    pytest.fail(
        f"{what} differs from psql's output at byte {i} (got {len(got)} bytes, expected "
        f"{len(expected)}): got {got[max(0, i - 60) : i + 60]!r}, "
        f"expected {expected[max(0, i - 60) : i + 60]!r}"
    )


def count_records(data: bytes) -> int:
    return sum(1 for _ in csv.reader(io.StringIO(data.decode())))


def assert_finished(out: Path, expected: bytes) -> dict[str, Any]:
    """The export to ``out`` is complete and correct; returns the manifest."""
    data = out.read_bytes()
    assert_same_bytes(data, expected)
    assert not checkpoint_path(out).exists(), "a finished export left its checkpoint behind"
    manifest: dict[str, Any] = json.loads(manifest_path(out).read_bytes())
    assert manifest["bytes"] == len(data)
    assert manifest["rows"] == count_records(data)
    assert manifest["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert sum(c["bytes"] for c in manifest["chunks"]) == len(data)
    assert sum(c["rows"] for c in manifest["chunks"]) == manifest["rows"]
    verified = verify_file(out)
    assert (verified.rows, verified.bytes) == (manifest["rows"], len(data))
    return manifest


def assert_checkpoint_intact(out: Path, expected: bytes) -> int:
    """An interrupted export: the checkpoint loads and the file is exactly its verified prefix.

    Returns the checkpointed offset.
    """
    cp = load_checkpoint(out)
    assert cp is not None, "the checkpoint is missing after a resumable failure"
    assert not cp.finished
    data = out.read_bytes()
    assert len(data) == cp.offset, (
        f"the output ({len(data)} bytes) was not cut back to the checkpoint ({cp.offset} bytes)"
    )
    assert_same_bytes(data, expected[: cp.offset], "the checkpointed prefix")
    assert xxhash.xxh3_128(data).hexdigest() == cp.xxh3_128
    assert cp.rows == count_records(data)
    return cp.offset


def run_guarded(
    fn: Callable[[], T], *, timeout: float = WATCHDOG, unblock: Callable[[], None] | None = None
) -> T:
    """Run ``fn`` in a worker thread; fail the test (after ``unblock()``) if it hangs."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    worker = threading.Thread(target=target, name="guarded-export", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        if unblock is not None:
            unblock()
        worker.join(10)
        pytest.fail(f"the export hung: still running after {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["result"]  # type: ignore[no-any-return]


def via_proxy(dsn: str, port: int) -> str:
    params = conninfo_to_dict(dsn)
    params.update(host="127.0.0.1", port=str(port))
    return make_conninfo("", **params)


def cli(*args: str, timeout: float = WATCHDOG, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m copystream ARGS`` as a real process; a hang fails the test."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "copystream", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"copystream {' '.join(args[:2])} hung for more than {timeout:g}s")


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [ln for ln in stderr.splitlines() if ln.startswith("copystream: error:")]


class Rows:
    """Progress callback that records how many rows the export has written so far."""

    def __init__(self) -> None:
        self.rows = 0

    def __call__(self, p: Any) -> None:
        self.rows = p.rows


class LogWatch:
    """The copystream log records matching a predicate; ``seen`` is set at each one."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.seen = threading.Event()


@contextlib.contextmanager
def watch_log(predicate: Callable[[str], bool]) -> Iterator[LogWatch]:
    """Collect the messages of copystream log records (WARNING and up) matching ``predicate``."""
    watch = LogWatch()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if predicate(msg):
                watch.messages.append(msg)
                watch.seen.set()

    logger = logging.getLogger("copystream")
    handler = Handler(logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield watch
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# -- 1. backends terminated ---------------------------------------------------------------------


class BackendKiller(threading.Thread):
    """Terminates the export's backend each time its progress passes one of ``thresholds``."""

    def __init__(self, dsn: str, progress: Rows, thresholds: list[int]) -> None:
        super().__init__(name="backend-killer", daemon=True)
        self.dsn = dsn
        self.progress = progress
        self.thresholds = thresholds
        self.stop = threading.Event()
        self.killed: list[int] = []  # pids terminated (pg_terminate_backend returned true)
        self.killed_active = 0  # of which were running a statement at the time
        self.killed_copy = 0  # of which were running the export's COPY
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="fault-killer") as c:
                for threshold in self.thresholds:
                    if not wait_for(self._passed(threshold), 30, self.stop):
                        return
                    self._kill_one(c)
        except BaseException as e:
            self.error = e

    def _passed(self, threshold: int) -> Callable[[], bool]:
        return lambda: self.progress.rows >= threshold

    def _kill_one(self, conn: psycopg.Connection[Any]) -> None:
        # Prefer the backend in the middle of the COPY (waiting up to 0.5 s for one: a busy
        # machine stretches the gaps between COPYs), then any statement (the sibling's bound
        # query, usually), then an idle one.
        deadline = time.monotonic() + 0.5
        while not self.stop.is_set():
            found = conn.execute(
                "SELECT pid, state, query LIKE 'COPY %%' FROM pg_stat_activity"
                " WHERE application_name = 'copystream'"
                " AND datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchall()
            fresh = [(pid, state, copy) for pid, state, copy in found if pid not in self.killed]
            copying = [pid for pid, state, copy in fresh if state == "active" and copy]
            active = [pid for pid, state, _ in fresh if state == "active"]
            if copying or (fresh and time.monotonic() > deadline):
                pid = (copying or active or [fresh[0][0]])[0]
                ok = conn.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()
                if ok and ok[0]:
                    self.killed.append(pid)
                    self.killed_active += bool(active)
                    self.killed_copy += bool(copying)
                return
            if time.monotonic() > deadline + 5:
                return
            time.sleep(0.001)


def test_backend_terminated_repeatedly(dsn: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    n = 200_000
    make_table(dsn, n)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    progress = Rows()
    # A termination every 5% of the way, from 5% to 85%: 17 of them, hitting whichever of the
    # export's backends (the COPY's, or its bound-finding sibling's) is busy at the time.
    thresholds = [n * k // 20 for k in range(1, 18)]
    killer = BackendKiller(dsn, progress, thresholds)
    killer.start()
    try:
        result = run_guarded(
            lambda: export_table(
                dsn, "t", out, chunk_rows=500, retry_policy=FAST, progress=progress
            )
        )
    finally:
        killer.stop.set()
        killer.join(10)
    assert killer.error is None, killer.error
    print(
        f"backends terminated: {len(killer.killed)} ({killer.killed_active} mid-statement, "
        f"{killer.killed_copy} in the COPY), "
        f"retries: {result.retries}"
    )
    assert len(killer.killed) == len(thresholds), "the killer missed the export's backend"
    # Every COPY killed fails its chunk. Under load a kill can also land on a backend the
    # export has already abandoned (a sibling still listed while it exits after the previous
    # failure), which fails nothing: so nearly every kill, not every one, shows as a retry.
    assert killer.killed_copy >= 1, "no kill hit a COPY"
    assert result.retries >= max(killer.killed_copy, len(thresholds) - 2)
    assert result.rows == n
    assert_finished(out, expected)


# -- 2. server restarted --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EphemeralPostgres]:
    """A server of this module's own: restarting the session server would disturb other tests."""
    server = EphemeralPostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_restarted_mid_export(
    own_pg: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path, mode: str
) -> None:
    own_pg.start()  # in case an earlier case left it stopped
    dsn = own_pg.create_database(f"restart_{mode}_{uuid.uuid4().hex[:8]}")
    n = 100_000
    make_table(dsn, n)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    progress = Rows()
    stop = threading.Event()
    events: list[str] = []

    def restarter() -> None:
        if not wait_for(lambda: progress.rows >= n // 5, 30, stop):
            return
        own_pg.stop(mode)
        events.append(f"stopped ({mode}) at row {progress.rows}")
        time.sleep(1.0)
        own_pg.start()
        events.append("started")

    thread = threading.Thread(target=restarter, name="restarter", daemon=True)
    thread.start()
    try:
        result = run_guarded(
            lambda: export_table(
                dsn, "t", out, chunk_rows=500, retry_policy=PATIENT, progress=progress
            ),
            timeout=120,
        )
    finally:
        stop.set()
        thread.join(150)
        own_pg.start()
    print(f"{events}; retries: {result.retries}")
    assert events == [f"stopped ({mode}) at row {events[0].split()[-1]}", "started"]
    assert result.retries >= 1
    assert result.rows == n
    assert_finished(out, expected)


# -- 3. network faults through a proxy --------------------------------------------------------


@pytest.fixture
def proxy(pg: EphemeralPostgres) -> Iterator[Proxy]:
    with Proxy(pg.host, pg.port) as p:
        yield p


def test_connection_cut_repeatedly(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path, proxy: Proxy
) -> None:
    make_table(dsn, 100_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    # Every connection that carries more than 200 kB is cut (planning takes a few kB), until
    # four were: then the network heals.
    proxy.cut_after(200_000)
    stop = threading.Event()

    def healer() -> None:
        if wait_for(lambda: proxy.cuts >= 4, 30, stop):
            proxy.reset()

    thread = threading.Thread(target=healer, name="healer", daemon=True)
    thread.start()
    try:
        result = run_guarded(
            lambda: export_table(
                via_proxy(dsn, proxy.port), "t", out, chunk_rows=1000, retry_policy=FAST
            ),
            unblock=proxy.cut_all,
        )
    finally:
        stop.set()
        thread.join(10)
    print(f"connections: {proxy.connections}, cuts: {proxy.cuts}, retries: {result.retries}")
    assert proxy.cuts >= 4
    assert result.retries >= proxy.cuts
    assert_finished(out, expected)


def test_connection_cut_while_planning(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path, proxy: Proxy
) -> None:
    """A network cut during the planning queries is transient too: not a usage error."""
    make_table(dsn, 20_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    proxy.cut_after(1_000, times=1)  # the first connection dies in the catalog queries
    result = run_guarded(
        lambda: export_table(
            via_proxy(dsn, proxy.port), "t", out, chunk_rows=5000, retry_policy=FAST
        ),
        unblock=proxy.cut_all,
    )
    assert proxy.cuts == 1
    assert_finished(out, expected)
    assert result.rows == 20_000


def test_connection_cut_at_every_point_of_planning(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The first connection cut after 0, 150, 300, ... bytes: inside the handshake, each catalog
    query, the --where check, the settings read, then the first chunk. Every cut must end in the
    right file, or in exit code 1 (never a usage error, never "unexpected"), after which a
    re-run finishes it."""
    make_table(dsn, 3_000)
    expected = psql_csv(dsn, QUERY)
    outcomes: dict[str, list[int]] = {}
    for nbytes in range(0, 4_000, 150):
        out = tmp_path / f"t{nbytes}.csv"
        with Proxy("127.0.0.1", int(conninfo_to_dict(dsn)["port"] or 5432)) as proxy:
            proxy.cut_after(nbytes, times=1)
            conninfo = via_proxy(dsn, proxy.port)

            def export(conninfo: str = conninfo, out: Path = out) -> ExportResult:
                return export_table(conninfo, "t", out, where="id > 0", retry_policy=FAST)

            try:
                run_guarded(export, unblock=proxy.cut_all)
                outcome = "finished"
            except Exception as e:
                assert getattr(e, "exit_code", None) == 1, f"cut after {nbytes} bytes: {e!r}"
                outcome = type(e).__name__
                export_table(dsn, "t", out, where="id > 0")
        outcomes.setdefault(outcome, []).append(nbytes)
        assert_finished(out, expected)
    print({k: f"{len(v)} cuts ({v[0]}..{v[-1]})" for k, v in outcomes.items()})


def test_stalled_network_is_detected_and_retried(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path, proxy: Proxy
) -> None:
    make_table(dsn, 100_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    stalled_at: list[float] = []

    def progress(p: Any) -> None:  # runs in the export: stall once, a third of the way in
        if not stalled_at and p.rows >= 30_000:
            proxy.stall()
            stalled_at.append(time.monotonic())

    stop = threading.Event()
    with watch_log(lambda m: "I/O timeout" in m) as stalls:

        def unstaller() -> None:  # the network comes back once the stall has been noticed
            if stalls.seen.wait(30) and not stop.is_set():
                time.sleep(0.2)
                proxy.unstall()

        thread = threading.Thread(target=unstaller, name="unstaller", daemon=True)
        thread.start()
        try:
            result = run_guarded(
                lambda: export_table(
                    via_proxy(dsn, proxy.port),
                    "t",
                    out,
                    chunk_rows=2000,
                    retry_policy=FAST,
                    io_timeout=1.0,
                    progress=progress,
                ),
                unblock=proxy.reset,
            )
        finally:
            stop.set()
            thread.join(10)
            proxy.reset()
    print(
        f"stall detections: {len(stalls.messages)}, retries: {result.retries}, "
        f"connections: {proxy.connections}"
    )
    assert stalled_at, "the stall was never injected"
    assert stalls.messages, "the stall was not detected by the I/O timeout"
    assert result.retries >= 1
    assert proxy.connections >= 3  # planning, the stalled one, and a fresh one
    assert_finished(out, expected)


def test_planning_that_never_answers_is_retried(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A query of the planning phase that hangs on the server (here: behind a lock) is given up
    after the I/O timeout and retried, as a chunk would be; the export must not hang."""
    make_table(dsn, 20_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    locker = psycopg.connect(dsn, application_name="fault-locker")
    locker.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")  # until rollback
    released = threading.Lock()

    def release() -> None:
        with released:
            if not locker.closed:
                locker.rollback()
                locker.close()

    stop = threading.Event()
    with watch_log(lambda m: "planning the export" in m and "I/O timeout" in m) as hangs:

        def releaser() -> None:  # the lock goes away once the hang has been noticed
            if hangs.seen.wait(30) and not stop.is_set():
                release()

        thread = threading.Thread(target=releaser, name="releaser", daemon=True)
        thread.start()
        try:
            result = run_guarded(
                lambda: export_table(
                    dsn, "t", out, where="id > 0", retry_policy=FAST, io_timeout=1.0
                ),
                unblock=release,
            )
        finally:
            stop.set()
            thread.join(10)
            release()
    print(f"planning timeouts: {len(hangs.messages)}, retries: {result.retries}")
    assert hangs.messages
    assert_finished(out, expected)


def test_stall_without_retries_then_resume(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path, proxy: Proxy
) -> None:
    make_table(dsn, 100_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    stop = threading.Event()

    def staller() -> None:  # stall once the export has checkpointed some chunks
        def progressed() -> bool:
            try:
                cp = load_checkpoint(out)
            except Exception:  # mid-replace: try again
                return False
            return cp is not None and cp.rows >= 20_000

        if wait_for(progressed, 30, stop):
            proxy.stall()

    thread = threading.Thread(target=staller, name="staller", daemon=True)
    thread.start()
    args = ["export", "t", str(out), "--chunk-rows", "2000", "--no-progress"]
    try:
        proc = cli(
            *args, "--dsn", via_proxy(dsn, proxy.port), "--retries", "0", "--io-timeout", "1"
        )
    finally:
        stop.set()
        thread.join(10)
        proxy.reset()
    assert proc.returncode == 1, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert "no data from the server within the I/O timeout" in errors[0]
    assert "run the same command again to resume" in errors[0]
    offset = assert_checkpoint_intact(out, expected)
    assert 0 < offset < len(expected)

    again = cli(*args, "--dsn", dsn)
    assert again.returncode == 0, again.stderr
    manifest = assert_finished(out, expected)
    assert manifest["resumed"] is True


def test_stall_without_retries_raises_retries_exhausted(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path, proxy: Proxy
) -> None:
    """The library form of the same fault: RetriesExhausted, exit code 1."""
    make_table(dsn, 50_000)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"

    def progress(p: Any) -> None:
        if p.rows >= 10_000:
            proxy.stall()

    with pytest.raises(RetriesExhausted) as info:
        run_guarded(
            lambda: export_table(
                via_proxy(dsn, proxy.port),
                "t",
                out,
                chunk_rows=2000,
                retries=0,
                io_timeout=1.0,
                progress=progress,
            ),
            unblock=proxy.reset,
        )
    proxy.reset()
    assert info.value.exit_code == 1
    assert_checkpoint_intact(out, expected)
    result = export_table(dsn, "t", out, chunk_rows=2000)
    assert result.resumed
    assert_finished(out, expected)


# -- 5. the client's disk fills up ------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``where``; yields False when mounting is not permitted.

    An empty ``size`` mounts nothing (``where`` is a plain directory).
    """
    where.mkdir()
    mounted = bool(size) and (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _limit_file_size(nbytes: int) -> Callable[[], None]:
    def preexec() -> None:  # in the child: writes past the limit fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return preexec


def _assert_disk_full_then_resume(
    dsn: str,
    expected: bytes,
    out: Path,
    args: list[str],
    first: subprocess.CompletedProcess[str],
    make_room: Callable[[], None],
    *,
    progressed: bool = True,
) -> None:
    assert first.returncode == 1, first.stderr
    errors = error_lines(first.stderr)
    assert len(errors) == 1, first.stderr
    assert "free some space" in errors[0] and "run the same command again" in errors[0]
    offset = assert_checkpoint_intact(out, expected)
    assert (0 < offset < len(expected)) if progressed else offset == 0
    make_room()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    manifest = assert_finished(out, expected)
    assert manifest["resumed"] is True


@pytest.mark.parametrize("limit", ["tmpfs", "rlimit_fsize"])
def test_disk_full(dsn: str, psql_csv: PsqlCsv, tmp_path: Path, limit: str) -> None:
    make_table(dsn, 100_000)  # ~6.7 MB of CSV
    expected = psql_csv(dsn, QUERY)
    assert len(expected) > 6_000_000
    with small_filesystem(tmp_path / "small", "4m" if limit == "tmpfs" else "") as mounted:
        directory = tmp_path / "small"
        out = directory / "t.csv"
        args = ["export", "t", str(out), "--dsn", dsn, "--chunk-rows", "2000", "--no-progress"]
        if limit == "tmpfs" and mounted:
            first = cli(*args)

            def make_room() -> None:
                subprocess.run(["mount", "-o", "remount,size=64m", str(directory)], check=True)

        else:
            # No permission to mount (or the rlimit case): a real per-process file size limit.
            size = 2_500_000 if limit == "tmpfs" else 3_000_000
            first = cli(*args, preexec_fn=_limit_file_size(size))

            def make_room() -> None:
                pass

        print(f"{limit} (mounted: {mounted}): {error_lines(first.stderr)}")
        _assert_disk_full_then_resume(dsn, expected, out, args, first, make_room)


def test_disk_full_while_saving_the_checkpoint(dsn: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """The data of a chunk fits, its checkpoint does not: still "free space and re-run"."""
    make_table(dsn, 20_000)
    expected = psql_csv(dsn, QUERY)
    with small_filesystem(tmp_path / "small", "3m") as mounted:
        if not mounted:  # no permission to mount: a per-process file size limit instead
            print("tmpfs not permitted: RLIMIT_FSIZE instead (the data write hits it)")
            out = tmp_path / "t.csv"
            args = ["export", "t", str(out), "--dsn", dsn, "--chunk-rows", "1000", "--no-progress"]
            first = cli(*args, preexec_fn=_limit_file_size(500_000))
            _assert_disk_full_then_resume(dsn, expected, out, args, first, lambda: None)
            return
        directory = tmp_path / "small"
        out = directory / "t.csv"
        # Leave exactly room for the first chunk's data (rounded up to whole pages) and not
        # one page more, so that the chunk is written and fsynced but its checkpoint is not.
        first_chunk = len(b"".join(expected.splitlines(keepends=True)[:1000]))
        st = os.statvfs(directory)
        page = st.f_frsize
        room = -(-first_chunk // page) * page
        # The initial checkpoint takes one page; the temporary file that would replace it
        # after the first chunk finds none left.
        filler = st.f_bavail * page - room - page
        with open(directory / "filler", "wb") as f:
            f.write(b"\0" * filler)
        args = ["export", "t", str(out), "--dsn", dsn, "--chunk-rows", "1000", "--no-progress"]
        first = cli(*args)
        print(f"error: {error_lines(first.stderr)}")
        leftovers = [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
        assert not leftovers, f"temporary files left behind: {leftovers}"

        def make_room() -> None:
            (directory / "filler").unlink()

        # The first chunk's data was written, but its checkpoint could not be: it was cut off.
        _assert_disk_full_then_resume(dsn, expected, out, args, first, make_room, progressed=False)


# -- 6. concurrent modifications ---------------------------------------------------------------


def test_concurrent_modifications(dsn: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """Keyset paging under concurrent writes: no key twice, nothing untouched lost or altered.

    Original ids are multiples of 10. The writer updates (non-key columns only) ids divisible by
    7, deletes ids divisible by 11 and inserts ids that are not multiples of 10, all over the key
    range, so both ahead of and behind the export's position. Each chunk reads its own snapshot,
    so the file equals no single psql export: it is checked row by row against the table as it
    was before, and against its manifest.
    """
    n = 50_000
    make_table(dsn, n, step=10)
    before = {int(rec[0]): rec for rec in csv.reader(io.StringIO(psql_csv(dsn, QUERY).decode()))}
    out = tmp_path / "t.csv"
    rng = random.Random(20240611)
    stop = threading.Event()
    stats = {"update": 0, "delete": 0, "insert": 0}
    inserted: set[int] = set()
    deleted: set[int] = set()
    errors: list[BaseException] = []
    started = threading.Event()

    def writer() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True, application_name="fault-writer") as c:
                for i in range(20_000):  # bounded, and stopped as soon as the export ends
                    if stop.is_set():
                        return
                    k = rng.randrange(1, n + 1)
                    op = ("update", "delete", "insert")[i % 3]
                    if op == "update":
                        key = 70 * max(1, k // 7)
                        c.execute(
                            "UPDATE t SET name = %s, amount = amount + 1, note = NULL"
                            " WHERE id = %s",
                            [f"upd {key} #{i}", key],
                        )
                    elif op == "delete":
                        key = 110 * max(1, k // 11)
                        c.execute("DELETE FROM t WHERE id = %s", [key])
                        deleted.add(key)
                    else:
                        key = 10 * rng.randrange(0, n + 200) + rng.randrange(1, 10)
                        c.execute(
                            "INSERT INTO t VALUES (%s, %s, 1.00, now(), 'new') "
                            "ON CONFLICT (id) DO NOTHING",
                            [key, f"new {key}"],
                        )
                        inserted.add(key)
                    stats[op] += 1
                    if i == 30:
                        started.set()
        except BaseException as e:
            errors.append(e)
        finally:
            started.set()

    thread = threading.Thread(target=writer, name="writer", daemon=True)
    thread.start()
    assert started.wait(30)
    counts_at_start = sum(stats.values())
    try:
        result = run_guarded(lambda: export_table(dsn, "t", out, chunk_rows=250, retry_policy=FAST))
    finally:
        counts_at_end = sum(stats.values())
        stop.set()
        thread.join(30)
    assert not errors, errors
    during = counts_at_end - counts_at_start
    print(f"writes during the export: {during} ({stats}); chunks: {len(result.chunks)}")
    assert during >= 100, "the writer hardly ran during the export"

    data = out.read_bytes()
    records = list(csv.reader(io.StringIO(data.decode())))
    ids = [int(r[0]) for r in records]
    assert len(ids) == len(set(ids)), "a key appears twice in the output"
    assert ids == sorted(ids), "the output is not in key order"
    got = dict(zip(ids, records, strict=True))
    for key, rec in before.items():
        if key % 11 == 0 and key in deleted:
            continue  # deleted during the export: there once at most (checked above)
        assert key in got, f"row {key} existed throughout the export but is missing"
        if key % 7 == 0:
            assert got[key] == rec or got[key][1].startswith(f"upd {key} #"), got[key]
        else:
            assert got[key] == rec, f"untouched row {key} changed: {got[key]} != {rec}"
    new = [k for k in ids if k not in before]
    assert set(new) <= inserted, "rows that nobody inserted appeared"
    for k in new:
        assert got[k][1:3] == [f"new {k}", "1.00"]
    # Rows inserted ahead of the export's position are exported, those behind are not.
    print(f"inserted: {len(inserted)}, of which exported: {len(new)}")
    assert 0 < len(new) < len(inserted)
    manifest = json.loads(manifest_path(out).read_bytes())
    assert manifest["rows"] == len(records) == result.rows
    assert manifest["bytes"] == len(data)
    assert manifest["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    verify_file(out)
    assert not checkpoint_path(out).exists()


# -- 7. statement timeout ----------------------------------------------------------------------

GATE = """
CREATE TABLE gate (slow boolean NOT NULL);
INSERT INTO gate VALUES (true);
CREATE FUNCTION gate_ok(i bigint) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF i = 30000 AND (SELECT slow FROM gate) THEN
        PERFORM pg_sleep(3);
    END IF;
    RETURN true;
END $$;
"""


def _open_gate(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE gate SET slow = false")


def test_statement_timeout_is_retried(dsn: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """A chunk slower than statement_timeout is cancelled and retried; it passes once fast."""
    make_table(dsn, 50_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(GATE)
    out = tmp_path / "t.csv"
    stop = threading.Event()
    policy = RetryPolicy(retries=10, base_delay=0.05, max_delay=0.2, retry_statement_timeout=True)
    with watch_log(lambda m: "failed (statement timeout)" in m) as timeouts:

        def opener() -> None:  # make the slow row fast again after two cancelled attempts
            if wait_for(lambda: len(timeouts.messages) >= 2, 30, stop):
                _open_gate(dsn)

        thread = threading.Thread(target=opener, name="gate-opener", daemon=True)
        thread.start()
        try:
            result = run_guarded(
                lambda: export_table(
                    dsn,
                    "t",
                    out,
                    chunk_rows=2000,
                    where="gate_ok(id)",
                    statement_timeout=0.3,
                    retry_policy=policy,
                ),
            )
        finally:
            stop.set()
            thread.join(10)
    print(f"statement timeouts: {len(timeouts.messages)}, retries: {result.retries}")
    assert len(timeouts.messages) >= 2
    assert result.retries >= 2
    assert_finished(out, psql_csv(dsn, QUERY))


def test_statement_timeout_always_hit(dsn: str, psql_csv: PsqlCsv, tmp_path: Path) -> None:
    """A chunk that always times out: retried, then exit 1 with the checkpoint intact."""
    make_table(dsn, 50_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(GATE)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    args = [
        "export",
        "t",
        str(out),
        "--dsn",
        dsn,
        "--chunk-rows",
        "2000",
        "--where",
        "gate_ok(id)",
        "--no-progress",
    ]
    proc = cli(*args, "--statement-timeout", "0.3", "--retries", "2")
    assert proc.returncode == 1, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 1, proc.stderr
    assert "statement timeout" in errors[0] and "2 retries used up" in errors[0], errors[0]
    assert "run the same command again to resume" in errors[0]
    retried = [ln for ln in proc.stderr.splitlines() if "failed (statement timeout)" in ln]
    assert len(retried) == 2, proc.stderr
    offset = assert_checkpoint_intact(out, expected)
    assert offset == len(b"".join(expected.splitlines(keepends=True)[:28_000]))

    _open_gate(dsn)
    again = cli(*args, "--statement-timeout", "0.3", "--retries", "2")
    assert again.returncode == 0, again.stderr
    manifest = assert_finished(out, expected)
    assert manifest["resumed"] is True


def test_statement_timeout_with_a_custom_retry_policy(
    dsn: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """``statement_timeout`` promises retries even when the caller brings its own policy."""
    make_table(dsn, 50_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(GATE)
    out = tmp_path / "t.csv"
    with pytest.raises(RetriesExhausted) as info:
        run_guarded(
            lambda: export_table(
                dsn,
                "t",
                out,
                chunk_rows=2000,
                where="gate_ok(id)",
                statement_timeout=0.3,
                retry_policy=RetryPolicy(retries=2, base_delay=0.05),
            ),
        )
    assert "statement timeout" in str(info.value)
    _open_gate(dsn)
    export_table(dsn, "t", out, chunk_rows=2000, where="gate_ok(id)")
    assert_finished(out, psql_csv(dsn, QUERY))


def test_a_session_the_server_ended_for_its_idle_timeout_is_retried(dsn: str) -> None:
    """A connection kept idle between tables (a bulk worker's) past the server's
    ``idle_session_timeout`` is ended by the server (57P05): the next statement's failure is
    one to retry on a fresh connection, not a permanent error that fails the table."""
    from copystream.retry import classify

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET idle_session_timeout = '100ms'")
        time.sleep(0.6)
        with pytest.raises(psycopg.OperationalError) as caught:
            conn.execute("SELECT 1")
    failure = classify(caught.value)
    assert failure is not None, f"{caught.value.sqlstate}: {caught.value}"
    print(f"{caught.value.sqlstate}: {failure.reason}")


def test_parquet_binary_path_stall_is_detected_and_retried(
    dsn: str, tmp_path: Path, proxy: Proxy
) -> None:
    """A Parquet export reads through ADBC, which blocks inside libpq: a network that stops
    answering mid-COPY is still noticed after the I/O timeout and retried on a fresh
    connection; the dataset has every row once."""
    make_table(dsn, 100_000)
    out = tmp_path / "t.parquet"
    stalled_at: list[float] = []

    def progress(p: Any) -> None:
        if not stalled_at and p.rows >= 30_000:
            proxy.stall()
            stalled_at.append(time.monotonic())

    stop = threading.Event()
    with watch_log(lambda m: "I/O timeout" in m or "no data from the server" in m) as stalls:

        def unstaller() -> None:
            if stalls.seen.wait(30) and not stop.is_set():
                time.sleep(0.2)
                proxy.unstall()

        thread = threading.Thread(target=unstaller, name="unstaller", daemon=True)
        thread.start()
        try:
            result = run_guarded(
                lambda: export_table(
                    via_proxy(dsn, proxy.port), "t", out, format="parquet", chunk_rows=2000,
                    retry_policy=FAST, io_timeout=1.0, progress=progress,
                ),
                unblock=proxy.reset,
            )  # fmt: skip
        finally:
            stop.set()
            thread.join(10)
            proxy.reset()
    assert stalled_at and stalls.messages and result.retries >= 1
    import pyarrow.dataset as ds

    ids = ds.dataset(out, format="parquet").to_table().column("id").to_pylist()
    assert ids == list(range(1, 100_001))
