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

:class:`ExportSession` is the one context manager that owns what must be released whatever
happens: the lock, the planning connection and the snapshot's session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

from ._atomic import locked
from .catalog import column_types, introspect
from .checkpoint import Checkpoint, checkpoint_path, remove_checkpoint
from .connection import Target, connect, io_deadline
from .errors import OutputExists, OutputProblem
from .failures import Phase, classify_connect, translate
from .join import join_parts, joined_outcomes
from .manifest import Manifest, manifest_path, save_manifest
from .parquet_types import parquet_settings, plan_columns, select_list
from .part import PartJob, PartOutcome, run_part
from .progress import Progress
from .ranges import (
    KeyRanges,
    load_parts,
    new_parts,
    remove_parts,
    run_parts,
    sample_boundaries,
    save_parts,
)
from .retry import Retrier, RetryPolicy
from .settings import PINNED_SETTINGS, read_settings_query
from .sizing import first_chunk_rows, many_chunks_warning
from .spec import ExportSpec, RunOptions
from .state import Fresh, Occupied, OnDisk, Resume, discover
from .table import ResolvedTable

__all__ = [
    "ExportSession",
    "Ran",
    "Run",
    "check_output",
    "discover_state",
    "execute",
    "finish",
    "lock_path",
    "remove_export_files",
    "start",
]

log = logging.getLogger("copystream")

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


def first_connect(target: Target, sleep: Callable[[float], None]) -> psycopg.Connection[Any]:
    """The first connection of a run: a few quick retries, then a usage error (exit 2)."""
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


def plan_export(
    target: Target, spec: ExportSpec, run: RunOptions, sleep: Callable[[float], None]
) -> tuple[psycopg.Connection[Any], ResolvedTable]:
    """Connect and resolve the table; return the open connection and the resolved table.

    A transient failure while planning (the connection dropped, the server restarting) is
    retried on a fresh connection as the policy says, like a chunk: it is not a usage error.
    Planning that gets no answer within the I/O timeout (a hung server or proxy) is one too.
    """
    retrier = Retrier(run.policy, sleep=sleep)
    doing = f"planning the export of {spec.table}"
    conn: psycopg.Connection[Any] | None = first_connect(target, sleep)
    while True:
        connecting = conn is None
        try:
            if conn is None:
                conn = connect(target)
            with io_deadline(conn, run.io_timeout, "planning the export"):
                table = introspect(
                    conn, spec.table, key=spec.key, columns=spec.columns, where=spec.where,
                    options=spec.options,
                )  # fmt: skip
            retrier.succeeded(doing)
            return conn, table
        except psycopg.Error as e:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            conn = None
            d = retrier.failed(e)
            if not d.retry:
                phase = Phase(target, spec.table, doing, connecting=connecting, planning=True)
                raise translate(e, phase, why=d.reason, transient=retrier.transient) from e
            retrier.wait(d, doing)
        except BaseException:
            if conn is not None:
                conn.close()
            raise


def lock_path(output: Path) -> Path:
    """The lock file that keeps two exports from writing the same output at once."""
    return output.with_name(output.name + ".lock")


def exclusive(output: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the output's lock (its file is removed on the way out, whatever happened)."""
    busy = f"another copystream process is exporting to {output} right now"
    return locked(lock_path(output), busy)


class _SnapshotHolder:
    """A session holding an exported snapshot open for a ``consistent`` export."""

    def __init__(self, target: Target, settings: dict[str, str], io_timeout: float) -> None:
        self.conn = connect(target, settings=settings)
        try:
            with io_deadline(self.conn, io_timeout, "exporting a snapshot"):
                self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                row = self.conn.execute("SELECT pg_export_snapshot()").fetchone()
        except BaseException:
            self.conn.close()
            raise
        assert row is not None
        self.snapshot = str(row[0])
        log.info("holding exported snapshot %s for a point-in-time export", self.snapshot)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


class ExportSession:
    """One export's resources: the lock, the planning connection, the snapshot's session.

    Entering it prepares the export (connects, resolves the table with retries, takes the
    lock); leaving it releases everything that is still held, in every case.
    """

    def __init__(
        self,
        conninfo: str | None,
        spec: ExportSpec,
        output: Path,
        run: RunOptions,
        sleep: Callable[[float], None],
    ) -> None:
        self.target = Target(conninfo or "")
        self.output = output
        self.run = run
        self.sleep = sleep
        self.requested = spec
        self._stack = contextlib.ExitStack()
        self.snapshot: _SnapshotHolder | None = None

    def __enter__(self) -> ExportSession:
        conn, table = plan_export(self.target, self.requested, self.run, self.sleep)
        self.conn: psycopg.Connection[Any] | None = conn
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
        try:
            self._stack.enter_context(exclusive(self.output))
        except BaseException:
            self._stack.close()
            raise
        for w in table.warnings:
            log.warning("%s", w)
        log.debug("%s: paging by %s (%s)", table.qualified, ", ".join(table.key), table.key_source)
        return self

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
        assert self.conn is not None
        with io_deadline(self.conn, self.run.io_timeout, "reading the column types"):
            types = column_types(self.conn, self.table)
        plans = plan_columns(types, strict=self.spec.strict_types, table=self.table.qualified)
        self.spec = replace(self.spec, parquet_columns=plans)
        policy = self.spec.out_of_range or "error"
        self.table = replace(self.table, select=select_list(plans, self.table.key, policy))

    @property
    def phase(self) -> Phase:
        """Where errors of this export happen, for their messages."""
        q = self.table.qualified
        return Phase(self.target, q, f"exporting {q}", filtered=self.table.where is not None)

    def close_connection(self) -> None:
        """Close the planning connection (no longer needed once the jobs are set up)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def query(self, doing: str, query: sql.Composed) -> tuple[Any, ...]:
        """One row of ``query`` on the planning connection, within the I/O timeout."""
        assert self.conn is not None
        with io_deadline(self.conn, self.run.io_timeout, doing):
            row = self.conn.execute(query).fetchone()
        assert row is not None
        return tuple(row)

    def hold_snapshot(self, settings: dict[str, str]) -> str | None:
        """Export and hold a snapshot (``consistent``); its id, or ``None``."""
        if not self.run.consistent:
            return None
        self.snapshot = _SnapshotHolder(self.target, settings, self.run.io_timeout)
        return self.snapshot.snapshot


# -- start ------------------------------------------------------------------------------------


def remove_export_files(output: Path) -> None:
    """Delete the output and every file copystream keeps beside it (``restart``)."""
    remove_parts(output, load_parts(output, strict=False))  # a damaged ranges file's parts too
    for p in (checkpoint_path(output), manifest_path(output), output):
        _remove(p)


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


def start(session: ExportSession, found: OnDisk) -> Run:
    """Clear what ``force`` overwrites, pin the settings, hold the snapshot, split the key space.

    ``found`` is what :func:`~copystream.state.discover` saw (never :class:`Complete`).
    """
    out, run = session.output, session.run
    if isinstance(found, Occupied):
        if not run.force:
            raise OutputExists(f"{out} exists and has no checkpoint to resume from")
        for p in (manifest_path(out), out):
            _remove(p)
        remove_parts(out)  # part files an older, interrupted clean-up may have left
        found = Fresh()
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
            ranges = _split(session, settings, started_at, snapshot)
    except psycopg.Error as e:  # e.g. the connection lost while reading the settings
        raise translate(e, session.phase, why="preparing the export failed", transient=False) from e
    _warn_many_chunks(session, ranges)
    return Run(_job(session, settings, started_at, snapshot), ranges)


def _split(
    session: ExportSession, settings: dict[str, str], started_at: str, snapshot: str | None
) -> KeyRanges:
    """Sample the key, record the ranges beside the output (OUTPUT.parts.json)."""
    out = session.output
    assert session.conn is not None
    try:
        with io_deadline(session.conn, session.run.io_timeout, "sampling the key range"):
            bounds = sample_boundaries(
                session.conn, session.table, session.run.workers, snapshot=snapshot
            )
    except psycopg.Error as e:
        # The filter first runs here: a writing or failing filter is a usage error.
        why = "sampling the key range failed"
        raise translate(e, session.phase, why=why, transient=False) from e
    ranges = new_parts(session.spec.identity(), settings, started_at, bounds)
    remove_parts(out)  # orphaned part files (no ranges file names them) must not be resumed
    with contextlib.suppress(FileNotFoundError):  # of an OUTPUT deleted by hand
        manifest_path(out).unlink()
    save_parts(out, ranges)
    return ranges


def _warn_many_chunks(session: ExportSession, ranges: KeyRanges | None) -> None:
    table = session.table
    count = len(ranges.ranges) if ranges is not None else 1
    many = many_chunks_warning(table.estimated_rows, session.run.chunk_rows, count)
    if many is not None:
        log.warning("%s: %s", table.qualified, many)


def _job(
    session: ExportSession, settings: dict[str, str], started_at: str, snapshot: str | None
) -> PartJob:
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
    out = session.output
    if run.ranges is not None:
        if run.ranges.join is not None:  # the join began: its parts are being consumed
            outcomes = joined_outcomes(out, run.ranges)
        else:
            outcomes = run_parts(out, run.ranges, run.job, session.run.workers, progress)
        if run.ranges.export.get("parquet") is not None:  # the ranges' parts are the dataset
            from .destinations.parquet import combined

            r = run.ranges
            final = combined(r.export, r.settings, r.started_at, [o.checkpoint for o in outcomes])
            return Ran(tuple(outcomes), final, final.xxh3_128)
        final, digest = join_parts(out, run.ranges, outcomes)
        return Ran(tuple(outcomes), final, digest)
    outcome = run_part(run.job, progress=progress, sleep=sleep)
    return Ran((outcome,), outcome.checkpoint, outcome.digest)


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
    cp = ran.final
    parts = _parts_with_keys(cp)
    manifest = Manifest(
        table=table.qualified,
        key=table.key,
        key_types=table.key_types,
        key_source=table.key_source,
        columns=table.columns,
        where=table.where,
        options=cp.export["options"],
        rows=cp.rows,
        bytes=sum(p["bytes"] for p in parts) if cp.export.get("parquet") else cp.offset,
        xxh3_128=ran.digest,
        chunks=cp.chunks,
        chunk_rows=cp.chunk_rows,
        settings=cp.settings,
        started_at=cp.started_at,
        finished_at=now_iso(),
        seconds=round(time.monotonic() - started, 3),
        resumed=ran.resumed,
        workers=len(run.ranges.ranges) if run.ranges is not None else 1,
        point_in_time=snapshot_kept and not ran.resumed,
        compress=cp.export.get("compress"),
        uncompressed_bytes=cp.destination.get("uncompressed_bytes"),
        uncompressed_xxh3_128=cp.destination.get("uncompressed_xxh3_128"),
        parquet=cp.export.get("parquet"),
        parts=parts,
    )
    save_manifest(out, manifest)
    remove_checkpoint(out)
    if run.ranges is not None:
        remove_parts(out, run.ranges)
    return manifest


def _parts_with_keys(cp: Checkpoint) -> tuple[dict[str, Any], ...]:
    """A Parquet dataset's parts, each with the last key it holds (of its last chunk)."""
    parts = []
    for p in cp.destination.get("parts", ()):
        last = cp.chunks[p["chunks"] - 1].last_key if p["chunks"] else None
        parts.append({**p, "last_key": list(last) if last is not None else None})
    return tuple(parts)


def discover_state(session: ExportSession) -> OnDisk:
    """Discard everything first if ``restart`` says so; then what is on disk for this export."""
    if session.run.restart:
        remove_export_files(session.output)
    return discover(session.output, session.spec.identity())
