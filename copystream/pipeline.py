"""The export pipeline: prepare → discover → start → run → finish.

* **prepare** (:func:`prepare`): connect and resolve the table on the server, with retries; take
  the output's lock.
* **discover** (:func:`copystream.state.discover`): what the files beside the output say —
  complete, resumable, occupied or fresh.
* **start** (:func:`start`): clear what ``restart``/``force`` discard, pin the session settings,
  hold the snapshot of a ``consistent`` export, split the key space for ``workers``; the result
  is a :class:`Run`: the jobs to run and how to put their outcomes together.
* **run** (:func:`execute`): one part in this process, or the key ranges in the worker pool.
* **finish** (:func:`finish`): join the ranges, write the manifest, remove the checkpoints.

A small table with nothing on disk yet (:func:`copies_whole`) skips start, run and finish: it is
one COPY on the planning connection, written atomically (:func:`copy_small`, then
:func:`copystream.whole.publish`).

:class:`ExportSession` is the one context manager that owns what must be released whatever
happens: the lock, the planning connection and the snapshot's session. It is also the seam for
drivers that plan many tables at once: it takes an already resolved table, a lent connection and
a snapshot the caller holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.metadata
import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import sql

from . import incremental, watermark
from ._atomic import lock_path, locked, remove_stale_temporaries
from .catalog import column_types, fetch_facts, introspect
from .checkpoint import (
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    remove_checkpoint,
)
from .chunk import SnapshotGone
from .connection import Target, connect, io_deadline
from .destinations import ChunkWritten, fresh_state
from .errors import CopystreamError, OutputExists, OutputProblem, PrefixMismatch, UsageError
from .failures import Phase, classify_connect, translate
from .manifest import Manifest, load_manifest, manifest_path, save_manifest
from .parquet_types import (
    binary_plan,
    driver_minimum,
    driver_refusal,
    parquet_settings,
    plan_columns,
    select_list,
)
from .progress import Progress
from .ranges import (
    KeyRanges,
    first_share,
    load_parts,
    new_parts,
    part_path,
    parts_path,
    remove_parts,
    run_parts,
    run_range,
    sample_boundaries,
    save_parts,
)
from .retry import Retrier, RetryPolicy
from .settings import PINNED_SETTINGS, read_settings_query
from .sizing import first_chunk_rows, many_chunks_warning
from .spec import ExportSpec, RunOptions
from .state import Fresh, Occupied, OnDisk, Resume, discover
from .table import ResolvedTable
from .whole import MakeManifest, Written, copy_once, is_small

if TYPE_CHECKING:  # (imported when a part runs: the one COPY of a small table needs neither)
    from .join import Follower
    from .part import PartJob, PartOutcome

__all__ = [
    "JOB_LOCK",
    "ExportSession",
    "Ran",
    "Run",
    "SnapshotHolder",
    "assemble",
    "check_output",
    "copies_whole",
    "copy_small",
    "copy_small_once",
    "discover_state",
    "exclusive",
    "execute",
    "finish",
    "lock_path",
    "manifest_of",
    "one_copy",
    "remove_export_files",
    "retrying",
    "sample_ranges",
    "start",
    "watermarked",
]

log = logging.getLogger("copystream")

T = TypeVar("T")

#: Retries of the very first connection: a wrong host or port is a usage error, reported fast
#: (:func:`~copystream.failures.classify_connect` counts even a refused connection).
FIRST_CONNECT = RetryPolicy(retries=2, base_delay=0.5, max_delay=2.0, budget=10.0)


def now_iso() -> str:
    """The current time as the manifest and checkpoints record it."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def check_output(output: Path, *, directory: bool = False) -> None:
    """Refuse an output path that cannot be written (a usage error: nothing is created).
    ``directory``: the output is a directory copystream makes (a Parquet dataset)."""
    if output.is_dir() and not directory:
        raise OutputProblem(f"output {output} is a directory; give a file name")
    parent = output.parent
    if not parent.is_dir():
        raise OutputProblem(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputProblem(f"output directory {parent} is not writable")


# -- prepare ----------------------------------------------------------------------------------


def resumable(output: Path, run: RunOptions) -> bool:
    """Whether a run finds an earlier one's checkpoint (or parts plan) to resume beside
    ``output``, so that its server was reachable before: its first connection then waits an
    outage out as a chunk does (exit 1 past ``max_outage``), instead of failing fast."""
    if run.restart:
        return False
    return checkpoint_path(output).exists() or parts_path(output).exists()


def first_connect(target: Target, sleep: Callable[[float], None]) -> psycopg.Connection[Any]:
    """The first connection of a run: a few quick retries, then a usage error (exit 2). A run
    with something to resume (:func:`resumable`) skips it: its first connection is retried as
    the policy says."""
    retrier = Retrier(FIRST_CONNECT, sleep=sleep, classifier=classify_connect)
    phase = Phase(target, "", "connecting", connecting=True)
    while True:
        try:
            return connect(target)
        except psycopg.Error as e:
            d = retrier.failed(e)
            if not d.retry:
                raise translate(e, phase, why=d.reason, transient=False) from e
            # debug only: a wrong host or port must end in one error line (exit 2), no more
            retrier.wait(d, "connecting", level=logging.DEBUG)


def retrying(
    target: Target,
    run: RunOptions,
    sleep: Callable[[float], None],
    doing: str,
    table: str,
    step: Callable[[psycopg.Connection[Any]], T],
    conn: psycopg.Connection[Any] | None,
    *,
    planning: bool,
) -> tuple[psycopg.Connection[Any], T]:
    """``step`` on ``conn`` (or a new connection), within the I/O timeout, with the retries of
    ``run``'s policy on fresh connections; the connection and what ``step`` returned."""
    retrier = Retrier(run.policy, sleep=sleep)
    while True:
        connecting = conn is None
        try:
            if conn is None:
                conn = connect(target)
            with io_deadline(conn, run.io_timeout, doing):
                value = step(conn)
            retrier.succeeded(doing)
            return conn, value
        except psycopg.Error as e:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            d = retrier.failed(e)
            if not d.retry:
                phase = Phase(target, table, doing, connecting=connecting, planning=planning)
                raise translate(e, phase, why=d.reason, transient=retrier.transient) from e
            retrier.wait(d, doing)
        except BaseException:
            if conn is not None:
                conn.close()
            raise


def watermarked(
    conn: psycopg.Connection[Any], spec: ExportSpec, table: ResolvedTable
) -> ResolvedTable:
    """The table paged by the watermark column, then its key (refused as a key would be)."""
    assert spec.watermark is not None
    key = watermark.watermark_key(spec.watermark, table.key)
    paged = introspect(conn, spec.table, key=key, columns=spec.columns, where=spec.where)
    watermark.check_type(paged)
    warning = watermark.index_warning(paged, fetch_facts(conn, spec.table).index_columns)
    return paged if warning is None else replace(paged, warnings=(*paged.warnings, warning))


#: The lock a bulk job holds on its output directory while it runs (see :mod:`copystream.bulk`).
JOB_LOCK = ".copystream-bulk.lock"


@contextlib.contextmanager
def exclusive(output: Path, *, job: bool = False) -> Iterator[None]:
    """Hold the output's lock (its file is removed on the way out, whatever happened).

    Also refuse an output inside the output directory of a bulk job that is running (the job
    writes its own outputs without their locks: the directory is the job's while it runs),
    unless ``job``: the caller is that job.
    """
    busy = f"another copystream process is exporting to {output} right now"
    with locked(lock_path(output), busy):
        if not job:
            _refuse_in_job(output.parent)
        yield


def _refuse_in_job(directory: Path) -> None:
    """Raise :class:`UsageError` if a running bulk job owns ``directory`` or one above it."""
    with contextlib.suppress(OSError):
        directory = directory.resolve()
    for d in (directory, *directory.parents):
        try:
            fd = os.open(d / JOB_LOCK, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # none there (or not readable: not a job's)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(f"a copystream bulk job is running with output directory {d}") from e
        except OSError:
            pass
        finally:
            os.close(fd)


class SnapshotHolder:
    """A session holding an exported snapshot open: for a ``consistent`` export, or for a whole
    bulk job (every table and chunk of it imports the snapshot, ``SET TRANSACTION SNAPSHOT``).

    ``snapshot`` is its id; ``taken_at`` when it was taken. It lives as long as this session:
    :meth:`close` (or the end of the process) ends it.
    """

    def __init__(
        self, target: Target, settings: dict[str, str] | None, io_timeout: float, what: str
    ) -> None:
        self.conn = connect(target, settings=settings)
        try:
            with io_deadline(self.conn, io_timeout, "exporting a snapshot"):
                # it idles in its transaction for as long as the export runs, on purpose
                self.conn.execute("SET idle_in_transaction_session_timeout = 0")
                self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                row = self.conn.execute("SELECT pg_export_snapshot()").fetchone()
        except BaseException:
            self.conn.close()
            raise
        assert row is not None
        self.snapshot = str(row[0])
        self.taken_at = now_iso()
        log.info("holding exported snapshot %s for %s", self.snapshot, what)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


@functools.lru_cache(maxsize=16)
def _target(conninfo: str) -> Target:
    """The parsed connection string (a bulk worker exports many tables of one server)."""
    return Target(conninfo)


class ExportSession:
    """One export's resources: the lock, the planning connection, the snapshot's session.

    Entering it prepares the export (connects, resolves the table with retries, takes the
    lock); leaving it releases everything that is still held, in every case.

    The seam for drivers that plan many tables at once (a bulk job): given ``table``, the
    export uses that resolved table instead of asking the server again (what is on disk is
    still checked against the spec it resolves to, by :func:`discover_state`), and connects only
    when it needs to (an output already complete is never connected for). Given ``conn``, an
    open autocommit connection lent by the caller, it uses that one and leaves it open (it
    closes it only when an error may have left it mid-protocol: the lender checks
    ``conn.closed``). Given ``snapshot``, the id of a snapshot the caller holds, every chunk
    reads from it instead of one this export would hold (``consistent``). With ``lock_late``,
    the output's lock is taken only when the export writes more than the temporary files of a
    small table (:meth:`lock`): for a caller that publishes them itself
    (:func:`copystream.whole.publish` checks that no other export began meanwhile). ``job``:
    the caller is the bulk job that owns the output's directory (:func:`exclusive`).
    """

    def __init__(
        self,
        conninfo: str | None,
        spec: ExportSpec,
        output: Path,
        run: RunOptions,
        sleep: Callable[[float], None],
        *,
        table: ResolvedTable | None = None,
        conn: psycopg.Connection[Any] | None = None,
        snapshot: str | None = None,
        lock_late: bool = False,
        job: bool = False,
    ) -> None:
        self.target = _target(conninfo or "")
        self.output = output
        self.run = run
        self.sleep = sleep
        self.requested = spec
        self._stack = contextlib.ExitStack()
        self.snapshot: SnapshotHolder | None = None
        self.given_table = table
        self.conn: psycopg.Connection[Any] | None = conn
        self.lent = conn is not None
        self.job_snapshot = snapshot
        if lock_late and run.restart:
            raise ValueError("restart removes files: it needs the lock from the start")
        self.locked = False
        self.lock_late = lock_late
        self.job = job

    def __enter__(self) -> ExportSession:
        if self.given_table is None:
            doing = f"planning the export of {self.requested.table}"
            first = self.conn
            if first is None and not resumable(self.output, self.run):
                first = first_connect(self.target, self.sleep)
            self.conn, table = retrying(
                self.target, self.run, self.sleep, doing, self.requested.table,
                self._introspect, first, planning=True,
            )  # fmt: skip
        else:
            table = self.given_table
        self._stack.callback(self.close_connection)
        self.table = table
        self.spec = self.requested.resolved(
            table.qualified, table.key, table.key_types, table.columns, output=self.output
        )
        if self.spec.options.format == "parquet":
            try:
                self._plan_parquet()
            except BaseException:
                self._stack.close()
                raise
        # Before any file beside the output is read, removed (restart) or made: a second
        # export to the same output must be refused without touching the first one's files.
        if not self.lock_late:
            try:
                self.lock()
            except BaseException:
                self._stack.close()
                raise
        for w in table.warnings:
            log.warning("%s", w)
        log.debug("%s: paging by %s (%s)", table.qualified, ", ".join(table.key), table.key_source)
        return self

    def lock(self) -> bool:
        """Take the output's lock unless it is held; whether it was taken now."""
        if self.locked:
            return False
        self._stack.enter_context(exclusive(self.output, job=self.job))
        self.locked = True
        return True

    def _introspect(self, conn: psycopg.Connection[Any]) -> ResolvedTable:
        spec = self.requested
        table = introspect(
            conn, spec.table, key=spec.key, columns=spec.columns, where=spec.where,
            options=spec.options,
        )  # fmt: skip
        return table if spec.watermark is None else watermarked(conn, spec, table)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
        self._stack.close()

    def _plan_parquet(self) -> None:
        """Map every column to its Parquet type (a type refused under ``strict_types`` is a
        usage error before anything is created) and type the chunks' SELECT list."""
        from .destinations.parquet import require_pyarrow

        require_pyarrow()  # a usage error before anything is created
        conn = self.connection()  # (the column types are part of the export's identity)
        with io_deadline(conn, self.run.io_timeout, "reading the column types"):
            types = column_types(conn, self.table)
        plans = plan_columns(
            types,
            strict=self.spec.strict_types,
            table=self.table.qualified,
            numeric_scale=self.spec.numeric_scale,
            interval=self.spec.interval_form or "text",
        )
        self.spec = replace(self.spec, parquet_columns=plans)
        policy = self.spec.out_of_range or "error"
        typed = select_list(plans, self.table.key, policy)
        binary = binary_plan(
            types, plans, typed, self.table.key, key_unique=self.table.key_unique, policy=policy
        )
        if not isinstance(binary, str) and (refused := _adbc_refusal()) is not None:
            binary = refused
        if isinstance(binary, str):  # read as typed CSV, parsed by Arrow
            log.debug("%s: typed CSV, not COPY BINARY: %s", self.table.qualified, binary)
        else:
            log.debug("%s: COPY BINARY, decoded by ADBC", self.table.qualified)
        self.table = replace(
            self.table, select=typed, binary=None if isinstance(binary, str) else binary
        )

    @property
    def phase(self) -> Phase:
        """Where errors of this export happen, for their messages."""
        q = self.table.qualified
        return Phase(self.target, q, f"exporting {q}", filtered=self.table.where is not None)

    def connection(self) -> psycopg.Connection[Any]:
        """The planning connection, opened now (with retries) if there is none."""
        if self.conn is None:
            doing = f"connecting to export {self.table.qualified}"
            self.conn, _ = retrying(
                self.target, self.run, self.sleep, doing, self.table.qualified,
                lambda conn: None, None, planning=False,
            )  # fmt: skip
            self.lent = False
        return self.conn

    def close_connection(self) -> None:
        """Let go of the planning connection (no longer needed once the jobs are set up); a
        lent one stays open for its lender."""
        if self.conn is not None and not self.lent:
            self.conn.close()
        self.conn = None

    def discard_connection(self) -> None:
        """Close the planning connection, lent or not: an error left it in an unknown state."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    def query(self, doing: str, query: sql.Composed) -> tuple[Any, ...]:
        """One row of ``query`` on the planning connection, within the I/O timeout."""
        conn = self.connection()
        with io_deadline(conn, self.run.io_timeout, doing):
            row = conn.execute(query).fetchone()
        assert row is not None
        return tuple(row)

    def hold_snapshot(self, settings: dict[str, str]) -> str | None:
        """The snapshot every chunk reads: the caller's, or (``consistent``) one exported and
        held now; ``None`` when there is none."""
        if self.job_snapshot is not None:
            return self.job_snapshot
        if not self.run.consistent:
            return None
        what = "a point-in-time export"
        self.snapshot = SnapshotHolder(self.target, settings, self.run.io_timeout, what)
        return self.snapshot.snapshot


# -- start ------------------------------------------------------------------------------------


def remove_export_files(output: Path) -> None:
    """Delete the output and every file copystream keeps beside it (``restart``)."""
    remove_parts(output, load_parts(output, strict=False))  # a damaged ranges file's parts too
    for p in (checkpoint_path(output), manifest_path(output), output):
        _remove(p)


@functools.cache
def _adbc_refusal() -> str | None:
    """Why this process cannot read COPY BINARY through ADBC's driver (then Parquet is read as
    typed CSV: the same values, more of the server's CPU), said once a process as a warning;
    or ``None``. The version is the installed package's (its module's ``__version__`` follows
    ``SETUPTOOLS_SCM_PRETEND_VERSION`` when that is set), else the module's."""
    try:
        import adbc_driver_postgresql  # type: ignore[import-untyped]  # (the path's own import)
    except ImportError as e:
        refused = driver_refusal(None, missing=str(e) or type(e).__name__)
    else:
        try:
            version = importlib.metadata.version("adbc-driver-postgresql")
        except importlib.metadata.PackageNotFoundError:  # vendored: no package metadata
            version = str(getattr(adbc_driver_postgresql, "__version__", ""))
        refused = driver_refusal(version)
    if refused is not None:
        log.warning(
            "%s: Parquet is read as typed CSV, not COPY BINARY (slower); "
            "pip install 'adbc-driver-postgresql>=%s'", refused, driver_minimum(),
        )  # fmt: skip
    return refused


def _remove(path: Path) -> None:
    """Delete a file, or a Parquet dataset's directory, if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@dataclass(frozen=True)
class Run:
    """A started export: the job of its one part (or the template of its key ranges' jobs)."""

    job: PartJob
    ranges: KeyRanges | None  # the key ranges of a ``workers`` export, else ``None``


def start(session: ExportSession, found: OnDisk, *, follows: bool = False) -> Run:
    """Clear what ``force`` overwrites, pin the settings, hold the snapshot, split the key space.

    ``found`` is what :func:`~copystream.state.discover` saw (never :class:`Complete`);
    ``follows``: the ranges run in this process's pool (:func:`execute`), where range 0's
    process follows the others of a compressed file, so it gets fewer rows (shards and S3
    uploads split evenly).
    """
    out, run = session.output, session.run
    if isinstance(found, Occupied):
        found = overwrite(session)
    try:
        if isinstance(found, Resume):
            settings, started_at = found.settings, found.started_at
        else:
            row = session.query("reading the session settings", read_settings_query())
            settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
            if session.spec.parquet is not None:  # typed output: fixed text forms
                settings = parquet_settings(settings)
            started_at = now_iso()
        single = isinstance(found, Resume) and found.checkpoint is not None
        if run.workers > 1 and single:
            log.info("%s: resuming a single-worker export; workers do not apply", out)
        snapshot = session.hold_snapshot(settings)
        ranges = found.ranges if isinstance(found, Resume) else None
        if ranges is None and run.workers > 1 and not single:
            ranges = _split(session, settings, started_at, snapshot, follows)
    except psycopg.Error as e:  # e.g. the connection lost while reading the settings
        raise translate(e, session.phase, why="preparing the export failed", transient=False) from e
    _warn_many_chunks(session, ranges)
    return Run(_job(session, settings, started_at, snapshot), ranges)


def overwrite(session: ExportSession) -> Fresh:
    """Clear an output that has no checkpoint, if ``force`` says so (else raise)."""
    out = session.output
    if not session.run.force:
        raise OutputExists(f"{out} exists and has no checkpoint to resume from")
    for p in (manifest_path(out), out):
        _remove(p)  # a file, or a Parquet dataset's directory
    remove_parts(out)  # part files an older, interrupted clean-up may have left
    return Fresh()


def _split(
    session: ExportSession,
    settings: dict[str, str],
    started_at: str,
    snapshot: str | None,
    follows: bool,
) -> KeyRanges:
    """Sample the key, record the ranges beside the output (OUTPUT.parts.json)."""
    from .join import compressed_file

    out = session.output
    workers = session.run.workers
    # range 0's process also decompresses the others' frames: it gets fewer rows (join.py)
    uneven = follows and compressed_file(session.spec.identity())
    first = first_share(workers) if uneven else None
    ranges = sample_ranges(session, workers, settings, started_at, snapshot, first=first)
    remove_parts(out)  # orphaned part files (no ranges file names them) must not be resumed
    with contextlib.suppress(FileNotFoundError):  # of an OUTPUT deleted by hand
        manifest_path(out).unlink()
    save_parts(out, ranges)
    return ranges


def sample_ranges(
    session: ExportSession,
    count: int,
    settings: dict[str, str],
    started_at: str,
    snapshot: str | None,
    after: tuple[str, ...] | None = None,
    *,
    first: float | None = None,
) -> KeyRanges:
    """Sample the key: the plan of ``count`` key ranges of about equal row counts (of the keys
    after ``after``, an increment's; ``first``: range 0's share of them)."""
    conn = session.connection()
    try:
        with io_deadline(conn, session.run.io_timeout, "sampling the key range"):
            bounds = sample_boundaries(
                conn, session.table, count, snapshot=snapshot, after=after, first=first
            )
    except psycopg.Error as e:
        # The filter first runs here: a writing or failing filter is a usage error.
        why = "sampling the key range failed"
        raise translate(e, session.phase, why=why, transient=False) from e
    return new_parts(session.spec.identity(), settings, started_at, bounds, after)


def _warn_many_chunks(session: ExportSession, ranges: KeyRanges | None) -> None:
    table = session.table
    count = len(ranges.ranges) if ranges is not None else 1
    many = many_chunks_warning(table.estimated_rows, session.run.chunk_rows, count)
    if many is not None:
        log.warning("%s: %s", table.qualified, many)


def _job(
    session: ExportSession, settings: dict[str, str], started_at: str, snapshot: str | None
) -> PartJob:
    from .part import PartJob

    table = session.table
    return PartJob(
        conninfo=session.target.conninfo,
        table=table,
        spec=session.spec,
        run=session.run,
        path=str(session.output),
        settings=settings,
        started_at=started_at,
        first_rows=first_chunk_rows(table.estimated_rows, table.estimated_bytes),
        snapshot=snapshot,
    )


# -- run and finish ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    """What running the jobs gave: each part's outcome, and the whole output's checkpoint."""

    outcomes: tuple[PartOutcome, ...]
    final: Checkpoint  # every chunk, with offsets in the output
    digest: str  # xxh3-128 of the whole output

    @property
    def resumed(self) -> bool:
        """Whether any part continued an interrupted export."""
        return any(o.resumed for o in self.outcomes)


def execute(
    session: ExportSession,
    run: Run,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
) -> Ran:
    """Run the export's part in this process, or its key ranges in the worker pool and join."""
    from .join import following, joined_outcomes
    from .part import run_part

    out = session.output
    if run.ranges is not None:
        if run.ranges.join is not None:  # the join began: its parts are being consumed
            return assemble(out, run.ranges, joined_outcomes(out, run.ranges))
        # a compressed output's ranges are decompressed in key order as they run (join.py)
        with following(out, run.ranges, session.run.workers) as followed:
            outcomes = _run_ranges(session, run, progress)
        return assemble(out, run.ranges, outcomes, followed)
    try:
        outcome = run_part(run.job, progress=progress, sleep=sleep)
    except PrefixMismatch as e:
        _undo_unverified_increment(out, e)
        raise
    return Ran((outcome,), outcome.checkpoint, outcome.digest)


def _run_ranges(
    session: ExportSession, run: Run, progress: Callable[[Progress], None] | None
) -> list[PartOutcome]:
    """Run the key ranges of ``run`` in the worker pool; an increment appended to a complete
    output that its first range found changed is undone, as with one worker."""
    from .join import follow_after_range, range0_follows

    out = session.output
    assert run.ranges is not None
    workers = session.run.workers
    first = follow_after_range if range0_follows(run.ranges, workers) else run_range
    try:
        return run_parts(out, run.ranges, run.job, workers, progress, first)
    except PrefixMismatch as e:
        _undo_unverified_increment(out, e, part_path(out, 0))
        raise


def assemble(
    out: Path,
    ranges: KeyRanges,
    outcomes: Sequence[PartOutcome],
    followed: Follower | None = None,
) -> Ran:
    """The whole output from its finished ranges, for ``workers`` and
    :func:`copystream.finish_shards` alike: the parts joined into OUTPUT in key order (each
    re-hashed against its checkpoint; ``followed``: what was decompressed while they ran), or,
    for a Parquet dataset, nothing to move (the ranges' part files are the dataset): one
    checkpoint of every chunk either way."""
    if ranges.export.get("parquet") is not None:
        from .destinations.parquet import combined

        r = ranges
        final = combined(r.export, r.settings, r.started_at, [o.checkpoint for o in outcomes])
        first = outcomes[0].checkpoint
        if first.increment is not None:  # it continues the dataset's export, started before
            final = replace(final, increment=first.increment, started_at=first.started_at)
        return Ran(tuple(outcomes), final, final.xxh3_128)
    from .join import join_parts

    final, digest = join_parts(out, ranges, outcomes, followed)
    return Ran(tuple(outcomes), final, digest)


def finish(session: ExportSession, run: Run, ran: Ran, started: float) -> Manifest:
    """Write the manifest, then remove the checkpoint and the ranges' files."""
    table, out = session.table, session.output
    snapshot_kept = run.job.snapshot is not None and not any(o.snapshot_lost for o in ran.outcomes)
    if run.job.snapshot is not None and ran.resumed:
        log.warning(
            "%s: resumed an interrupted export whose earlier rows came from another "
            "snapshot: this export is no longer point-in-time",
            table.qualified,
        )
    workers = len(run.ranges.ranges) if run.ranges is not None else 1
    manifest = manifest_of(
        table, ran.final, ran.digest, started,
        resumed=ran.resumed, workers=workers, point_in_time=snapshot_kept and not ran.resumed,
    )  # fmt: skip
    manifest = replace(manifest, **_increment_fields(out, ran.final, manifest))
    save_manifest(out, manifest)
    remove_checkpoint(out)
    if run.ranges is not None:
        remove_parts(out, run.ranges)
    return manifest


def manifest_of(
    table: ResolvedTable,
    final: Checkpoint,
    digest: str,
    started: float,
    *,
    resumed: bool,
    workers: int,
    point_in_time: bool,
) -> Manifest:
    """The manifest of an export whose last checkpoint is ``final``; ``digest`` the xxh3-128 of
    the whole output, ``started`` when this run began (``time.monotonic()``)."""
    parts = _parts_with_keys(final) if final.export.get("parquet") else ()
    return Manifest(
        table=table.qualified,
        key=table.key,
        key_types=table.key_types,
        key_source=table.key_source,
        columns=table.columns,
        where=table.where,
        options=final.export["options"],
        rows=final.rows,
        bytes=sum(p["bytes"] for p in parts) if final.export.get("parquet") else final.offset,
        xxh3_128=digest,
        chunks=final.chunks,
        chunk_rows=final.chunk_rows,
        settings=final.settings,
        started_at=final.started_at,
        finished_at=now_iso(),
        seconds=round(time.monotonic() - started, 3),
        resumed=resumed,
        workers=workers,
        point_in_time=point_in_time,
        compress=final.export.get("compress"),
        uncompressed_bytes=final.destination.get("uncompressed_bytes"),
        uncompressed_xxh3_128=final.destination.get("uncompressed_xxh3_128"),
        parquet=final.export.get("parquet"),
        parts=parts,
    )


def _parts_with_keys(cp: Checkpoint) -> tuple[dict[str, Any], ...]:
    """A Parquet dataset's parts, each with the last key it holds (of its last chunk)."""
    parts = []
    for p in cp.destination.get("parts", ()):
        last = cp.chunks[p["chunks"] - 1].last_key if p["chunks"] else None
        parts.append({**p, "last_key": list(last) if last is not None else None})
    return tuple(parts)


def discover_state(session: ExportSession) -> OnDisk:
    """Discard everything first if ``restart`` says so; then what is on disk for this export."""
    run = session.run
    if run.restart:
        remove_export_files(session.output)
    # An increment appended to a complete output hashes it as it opens it: not twice.
    appends = run.incremental and run.since is None and session.spec.watermark is None
    return discover(session.output, session.spec.identity(), verify=not appends)


# -- a small table: one COPY, written atomically ----------------------------------------------


def copies_whole(session: ExportSession, found: OnDisk) -> bool:
    """Whether this export is one COPY written atomically (:mod:`copystream.whole`)."""
    return one_copy(session.table, session.spec, session.run, found)


def one_copy(table: ResolvedTable, spec: ExportSpec, run: RunOptions, found: OnDisk) -> bool:
    """Whether an export of ``table`` is one COPY written atomically: a small table
    (:func:`~copystream.whole.is_small`) with nothing of it on disk yet, not an increment of
    another export. Pure: a bulk worker decides its direct path by it too."""
    fresh = isinstance(found, Fresh) and not incremental.continues(run, spec)
    return fresh and is_small(table, spec, run)


def copy_small(
    session: ExportSession,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
    started: float,
    *,
    tidy: bool = True,
) -> tuple[Written, int]:
    """Export the small table of ``session`` with one COPY into a temporary file; the result
    to :func:`~copystream.whole.publish`, and the retries it took.

    Transient failures are retried on a fresh connection as the policy says; a snapshot held by
    the caller that is gone is done without (the manifest says the export is then not
    point-in-time). ``tidy``: remove the stale temporary files of the output (and of its
    manifest) first.
    """
    out, table, run = session.output, session.table, session.run
    if tidy:
        remove_stale_temporaries(out)
        remove_stale_temporaries(manifest_path(out))
    retrier = Retrier(run.policy, sleep=sleep)
    snapshot, lost = session.job_snapshot, False
    while True:
        try:
            pit = (snapshot is not None or run.consistent) and not lost
            return copy_small_once(
                session.connection(), table, session.spec, run, out,
                snapshot=snapshot, point_in_time=pit, started=started,
                on_data=_reporter(table, progress, started),
            ), retrier.retries  # fmt: skip
        except psycopg.Error as e:
            session.discard_connection()  # it may be mid-protocol
            if snapshot is not None and isinstance(e, SnapshotGone):
                log.warning(
                    "%s: the exported snapshot is gone (its coordinator ended); exporting "
                    "without it: this table is not part of the point-in-time image",
                    table.qualified,
                )
                snapshot, lost = None, True
                continue
            d = retrier.failed(e)
            if not d.retry:
                raise translate(e, session.phase, why=d.reason, transient=retrier.transient) from e
            retrier.wait(d, f"exporting {table.qualified}")
        except BaseException:
            session.discard_connection()
            raise


def copy_small_once(
    conn: psycopg.Connection[Any],
    table: ResolvedTable,
    spec: ExportSpec,
    run: RunOptions,
    output: Path,
    *,
    snapshot: str | None,
    point_in_time: bool,
    started: float,
    on_data: Callable[[int, int], None] | None,
) -> Written:
    """One attempt at exporting the small ``table`` (``spec`` resolved) with one COPY on
    ``conn`` (autocommit, no transaction open) into a temporary file beside ``output``, with
    the manifest a chunked export of one chunk would write. Nothing else: no retry, no lock, no
    look at what is on disk (:func:`copy_small` does them; a bulk worker calls this on its open
    connection for a table its coordinator found fresh). On any error ``conn`` may be
    mid-protocol: the caller closes it."""
    settings = _settings_of(conn, run.io_timeout)
    manifest = _whole_manifest(table, spec, output, settings, now_iso(), started, point_in_time)
    return copy_once(
        conn, table, spec, run, output, snapshot=snapshot, on_data=on_data, manifest=manifest
    )


#: The pinned settings of each open connection, read when it first serves a small table: only
#: copystream uses these connections, and it never changes a pinned setting of a session.
_SETTINGS: weakref.WeakKeyDictionary[psycopg.Connection[Any], dict[str, str]] = (
    weakref.WeakKeyDictionary()
)


def _settings_of(conn: psycopg.Connection[Any], io_timeout: float) -> dict[str, str]:
    """The session settings that shape COPY's text, as ``conn`` has them."""
    settings = _SETTINGS.get(conn)
    if settings is None:
        with io_deadline(conn, io_timeout, "reading the session settings"):
            row = conn.execute(read_settings_query()).fetchone()
        assert row is not None
        settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
        _SETTINGS[conn] = settings
    return dict(settings)


def _reporter(
    table: ResolvedTable, progress: Callable[[Progress], None] | None, started: float
) -> Callable[[int, int], None] | None:
    if progress is None:
        return None

    def on_data(rows: int, nbytes: int) -> None:
        elapsed = time.monotonic() - started
        progress(Progress(table.qualified, rows, nbytes, table.estimated_rows, elapsed, 0))

    return on_data


def _whole_manifest(
    table: ResolvedTable,
    spec: ExportSpec,
    output: Path,
    settings: dict[str, str],
    started_at: str,
    started: float,
    pit: bool,
) -> MakeManifest:
    """What makes the manifest of a small export: the one a chunked export of one chunk (the
    table in one COPY) writes, from the same checkpoint transitions."""

    def manifest(
        rows: int, written: ChunkWritten, state: dict[str, Any], last_key: tuple[str, ...] | None
    ) -> Manifest:
        digest = written.xxh3_128
        final = new_checkpoint(
            export=spec.identity(), settings=settings, started_at=started_at,
            chunk_rows=0, estimated_rows=table.estimated_rows,
            destination=fresh_state(output, spec),
        ).advance(
            nbytes=written.bytes, rows=rows, digest=digest, prefix_digest=digest,
            last_key=last_key, finished=True, destination=state, raw=written.raw,
        )  # fmt: skip
        return manifest_of(
            table, final, digest, started, resumed=False, workers=1, point_in_time=pit
        )

    return manifest


# -- incremental exports (decisions: copystream.incremental; the stage: copystream.continuation)


def _undo_unverified_increment(
    output: Path, error: PrefixMismatch, state: Path | None = None
) -> None:
    """A complete output that an increment found changed as it opened it (before writing a
    byte): remove the increment's checkpoint (``state``: of its first key range, and the
    ranges), leaving the output and manifest as they were, and say so as a refusal of the
    increment."""
    try:
        cp = load_checkpoint(state or output)
    except CopystreamError:
        return
    if cp is not None and incremental.untouched_append(cp):
        remove_checkpoint(output)
        if state is not None:
            remove_parts(output)
        manifest = readable_manifest(output)
        raise incremental.refuse_append(output, manifest, cp.export) from error


def readable_manifest(output: Path) -> Manifest | None:
    """The manifest beside ``output``, or ``None`` when there is none or it is unreadable."""
    with contextlib.suppress(UsageError):
        return load_manifest(output)
    return None


def _increment_fields(output: Path, cp: Checkpoint, manifest: Manifest) -> dict[str, Any]:
    """The manifest fields of an increment (none for another export)."""
    old = readable_manifest(output) if cp.increment is not None else None
    return incremental.manifest_fields(
        cp, old, finished_at=manifest.finished_at, seconds=manifest.seconds
    )
