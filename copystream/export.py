"""The export runner: plan → chunk → sink → checkpoint → manifest, with retries and resume.

:func:`export_table` is the library's main entry point (the ``copystream export`` command is a
thin layer over it); :func:`export_status` reports on an unfinished export.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from .checkpoint import Checkpoint, ChunkRecord, checkpoint_path, load_checkpoint, remove_checkpoint
from .connection import Target, connect, connect_error, io_deadline, redact
from .errors import CopystreamError, OutputExists, OutputProblem, RetriesExhausted, UsageError
from .manifest import Manifest, load_manifest, manifest_path, save_manifest, verify_file
from .part import PartJob, _chunk_error, run_part
from .plan import ResolvedTable, first_chunk_rows, introspect, many_chunks_warning
from .progress import Progress
from .ranges import (
    join_parts,
    load_parts,
    new_parts,
    part_path,
    remove_parts,
    run_parts,
    sample_boundaries,
    save_parts,
)
from .retry import RetryPolicy, RetryState, classify, decide
from .settings import PINNED_SETTINGS, read_settings_query
from .spec import CopyOptions

__all__ = ["ExportResult", "ExportStatus", "export_status", "export_table"]

log = logging.getLogger("copystream")

#: Retries of the very first connection: a wrong host or port is a usage error, reported fast.
FIRST_CONNECT = RetryPolicy(retries=2, base_delay=0.5, max_delay=2.0, budget=10.0)

#: A connection is replaced after this many chunks or seconds, so that server-side memory held by
#: a long-lived backend, or a connection pooler's limits, never build up over a long export.


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_table` did."""

    output: Path
    table: str
    rows: int
    bytes: int
    xxh3_128: str
    chunks: tuple[ChunkRecord, ...]
    seconds: float
    resumed: bool  # this run continued an interrupted export
    already_complete: bool  # nothing to do: a verified, matching export was already there
    retries: int
    peak_rss: int  # bytes, peak resident memory of this process
    key: tuple[str, ...] = ()
    key_source: str = ""
    warnings: tuple[str, ...] = field(default=())
    point_in_time: bool = False  # every row read from one snapshot (--consistent, no resume)

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (the ``--report`` file)."""
        return {
            "output": str(self.output),
            "table": self.table,
            "rows": self.rows,
            "bytes": self.bytes,
            "xxh3_128": self.xxh3_128,
            "chunks": len(self.chunks),
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.bytes / self.seconds / 1e6, 2) if self.seconds > 0 else None,
            "resumed": self.resumed,
            "already_complete": self.already_complete,
            "retries": self.retries,
            "peak_rss_bytes": self.peak_rss,
            "key": list(self.key),
            "key_source": self.key_source,
            "warnings": list(self.warnings),
            "point_in_time": self.point_in_time,
        }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    Linux's ``VmHWM``: ``ru_maxrss`` also counts the memory of the process that started this
    one (a large Airflow worker would make a small export look large).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_output(output: Path) -> None:
    if output.is_dir():
        raise OutputProblem(f"output {output} is a directory; give a file name")
    parent = output.parent
    if not parent.is_dir():
        raise OutputProblem(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputProblem(f"output directory {parent} is not writable")


def first_connect(target: Target, sleep: Callable[[float], None]) -> psycopg.Connection[Any]:
    """The first connection of a run: a few quick retries, then a usage error (exit 2)."""
    state = RetryState()
    while True:
        try:
            return connect(target)
        except psycopg.Error as e:
            d = decide(FIRST_CONNECT, state, reason=_connect_reason(e), now=time.monotonic())
            if not d.retry:
                raise connect_error(e, target) from e
            state = d.state
            # debug only: a wrong host or port must end in one error line (exit 2), no more
            log.debug("connecting failed (%s); retrying in %.1fs", d.reason, d.delay)
            sleep(d.delay)


def _connect_and_plan(
    target: Target,
    table: str,
    *,
    keys: Sequence[str] | None,
    columns: Sequence[str] | None,
    where: str | None,
    options: CopyOptions | None,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    io_timeout: float = 300.0,
) -> tuple[psycopg.Connection[Any], ResolvedTable]:
    """Connect and plan the export; return the open connection and the plan.

    A transient failure while planning (the connection dropped, the server restarting) is
    retried on a fresh connection as ``policy`` says, like a chunk: it is not a usage error.
    Planning that gets no answer within ``io_timeout`` (a hung server or proxy) is one too.
    """
    state = RetryState()
    conn: psycopg.Connection[Any] | None = first_connect(target, sleep)
    while True:
        connecting = conn is None
        try:
            if conn is None:
                conn = connect(target)
            with io_deadline(conn, io_timeout, "planning the export"):
                plan = introspect(
                    conn, table, key=keys, columns=columns, where=where, options=options
                )
            return conn, plan
        except psycopg.Error as e:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
                conn = None
            msg = redact(
                str(e).strip().splitlines()[0] if str(e).strip() else repr(e), *target.secrets
            )
            reason = classify(e)
            d = decide(policy, state, reason=reason, now=time.monotonic())
            if not d.retry:
                if reason is None and connecting:
                    raise connect_error(e, target) from e
                if reason is None:
                    raise UsageError(f"cannot plan the export of {table}: {msg}") from e
                raise RetriesExhausted(
                    f"planning the export of {table} stopped: {d.reason}; last error: {msg}; "
                    "run the same command again"
                ) from e
            state = d.state
            log.warning(
                "planning the export of %s failed (%s); retry %d/%d in %.1fs",
                table,
                reason,
                d.state.attempts,
                policy.retries,
                d.delay,
            )
            sleep(d.delay)
        except BaseException:
            if conn is not None:
                conn.close()
            raise


class _SnapshotHolder:
    """A session holding an exported snapshot open for ``--consistent`` exports."""

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


def lock_path(output: Path) -> Path:
    """The lock file that keeps two exports from writing the same output at once."""
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    path = lock_path(output)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(
                f"another copystream process is exporting to {output} right now"
            ) from e
        try:
            yield
        finally:  # after a failure too: a lock file must not be left behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def remove_export_files(output: Path) -> None:
    """Delete the output and every file copystream keeps beside it (``--restart``)."""
    remove_parts(output, load_parts(output, strict=False))  # a damaged plan's parts too
    for p in (checkpoint_path(output), manifest_path(output), output):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


#: Connection failures no retry can cure: a host name that does not resolve (libpq's and
#: psycopg's wording), a malformed port or option.
_PERMANENT_CONNECT = (
    "could not translate host name",
    "failed to resolve host",
    "invalid integer value",
    "invalid connection option",
)


def _connect_reason(e: psycopg.Error) -> str | None:
    text = str(e)
    if (
        e.sqlstate in ("28P01", "28000", "3D000")
        or "does not exist" in text
        or ("authentication" in text)
    ):
        return None
    if any(m in text for m in _PERMANENT_CONNECT):
        return None
    return classify(e) or "connection failed"


def _export_identity(plan: ResolvedTable, options: CopyOptions) -> dict[str, Any]:
    return {
        "table": plan.qualified,
        "key": list(plan.key),
        "key_types": list(plan.key_types),
        "columns": list(plan.columns),
        "where": plan.where,
        "options": options.to_dict(),
    }


def _finish(
    output: Path,
    plan: ResolvedTable,
    cp: Checkpoint,
    digest: str,
    started: float,
    resumed: bool,
    *,
    workers: int,
    point_in_time: bool,
) -> Manifest:
    manifest = Manifest(
        table=plan.qualified,
        key=plan.key,
        key_types=plan.key_types,
        key_source=plan.key_source,
        columns=plan.columns,
        where=plan.where,
        options=cp.export["options"],
        rows=cp.rows,
        bytes=cp.offset,
        xxh3_128=digest,
        chunks=cp.chunks,
        chunk_rows=cp.chunk_rows,
        settings=cp.settings,
        started_at=cp.started_at,
        finished_at=_now_iso(),
        seconds=round(time.monotonic() - started, 3),
        resumed=resumed,
        workers=workers,
        point_in_time=point_in_time,
    )
    save_manifest(output, manifest)
    remove_checkpoint(output)
    return manifest


def export_table(
    conninfo: str | None,
    table: str,
    output: str | os.PathLike[str],
    *,
    key: Sequence[str] | str | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    chunk_rows: int | None = None,
    header: bool = False,
    options: CopyOptions | None = None,
    restart: bool = False,
    force: bool = False,
    progress: Callable[[Progress], None] | None = None,
    retries: int = 5,
    retry_budget: float = 900.0,
    retry_policy: RetryPolicy | None = None,
    io_timeout: float = 300.0,
    statement_timeout: float | None = None,
    workers: int = 1,
    consistent: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult:
    """Export ``table`` to the file ``output``, resumably, and return what was done.

    ``conninfo`` is a libpq connection string or URI; ``None`` or ``""`` uses the libpq
    environment (``PG*`` variables, service file, ``.pgpass``). ``table`` is a SQL name as typed
    in psql (``orders``, ``sales."Order Items"``), resolved by the server with its search_path.

    The file's bytes equal ``COPY (SELECT <columns> FROM <table> [WHERE <where>] ORDER BY <key>)
    TO STDOUT (FORMAT csv)`` under the session settings in force at the first chunk. If a
    checkpoint for the same export exists beside ``output``, the export resumes from it; a
    finished export with a verifying manifest is not redone (``already_complete``).

    Options:
        key: column name(s) to page by; default the primary key, else a unique NOT NULL index.
        columns: a subset (and order) of columns; default all.
        where: a SQL filter applied inside every chunk.
        chunk_rows: rows per chunk; ``None`` adapts to ~2 s per chunk (and exports a table
            estimated under 8 MB in one COPY); ``0`` forces a single COPY (resumable only
            from the start).
        header: write a CSV header line (shortcut for ``options=CopyOptions(header=True)``).
        options: COPY formatting options (:class:`CopyOptions`).
        restart: discard any checkpoint, manifest and output and start from zero.
        force: overwrite an existing output that has no checkpoint.
        progress: called with a :class:`Progress` about once per megabyte and per chunk.
        retries / retry_budget: per-chunk retries and total seconds spent retrying.
        retry_policy: a full :class:`RetryPolicy` (delays too), replacing the two above.
        io_timeout: seconds without a byte from the server before the chunk is retried.
        statement_timeout: per-statement server timeout (seconds); its cancellations are retried.
        workers: worker processes; the key space is split into this many ranges balanced by
            sampled row counts, exported in parallel to part files and joined in key order (the
            result is byte-identical to a single-worker export).
        consistent: read every chunk from one exported snapshot, held by this process for the
            whole export (a point-in-time export; it holds back VACUUM meanwhile). If the export
            is interrupted, the snapshot is gone: the resumed export is not point-in-time, and
            the manifest says so (``point_in_time``).

    Raises a :class:`~copystream.errors.UsageError` (exit code 2) for a request that cannot work
    and an :class:`~copystream.errors.ExportFailed` (exit code 1) when the export stopped with
    its checkpoint intact (run again to resume).
    """
    started = time.monotonic()
    out = Path(output)
    _check_output(out)
    target = Target(conninfo or "")
    if chunk_rows is not None and chunk_rows < 0:
        raise UsageError("chunk_rows must be 0 (one COPY) or a positive number of rows")
    if workers < 1:
        raise UsageError("workers must be at least 1")
    opts = options or CopyOptions(header=header)
    if header and not opts.header:
        opts = replace(opts, header=True)
    keys = [key] if isinstance(key, str) else key
    policy = retry_policy or RetryPolicy(
        retries=retries, budget=retry_budget, retry_statement_timeout=statement_timeout is not None
    )
    if statement_timeout is not None and not policy.retry_statement_timeout:
        # As documented: the cancellations of the timeout asked for here are retried, whatever
        # the policy's own default.
        policy = replace(policy, retry_statement_timeout=True)
    conn, plan = _connect_and_plan(
        target,
        table,
        keys=keys,
        columns=columns,
        where=where,
        options=opts,
        policy=policy,
        sleep=sleep,
        io_timeout=io_timeout,
    )
    snap: _SnapshotHolder | None = None
    lock = contextlib.ExitStack()
    try:
        # Before any file beside the output is read, removed (--restart) or made: a second
        # export to the same output must be refused without touching the first one's files.
        lock.enter_context(_exclusive(out))
        for w in plan.warnings:
            log.warning("%s", w)
        log.debug("%s: paging by %s (%s)", plan.qualified, ", ".join(plan.key), plan.key_source)
        identity = _export_identity(plan, opts)

        if restart:
            remove_export_files(out)
        parts = load_parts(out)
        cp = load_checkpoint(out)
        if parts is not None:
            parts.check_same_export(identity, out)
            if _manifest_started_at(out) == parts.started_at:
                # killed after this export's manifest was written, before the parts were
                # removed: complete (if OUTPUT verifies), not to be taken apart and joined again
                done = _already_complete(out, identity, plan, started)
                if done is not None:
                    lock.close()
                    return done
        elif cp is not None:
            cp.check_same_export(identity, out)
        elif os.path.lexists(out):  # a dangling symlink too: never create through it
            done = _already_complete(out, identity, plan, started)
            if done is not None:
                lock.close()
                return done
            if not force:
                raise OutputExists(
                    f"{out} exists and has no checkpoint to resume from; pass --restart or "
                    "--force to overwrite it"
                )
            for p in (manifest_path(out), out):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            remove_parts(out)  # part files an older, interrupted clean-up may have left
        if cp is not None:
            settings, started_at = cp.settings, cp.started_at
        elif parts is not None:
            settings, started_at = parts.settings, parts.started_at
        else:
            with io_deadline(conn, io_timeout, "reading the session settings"):
                row = conn.execute(read_settings_query()).fetchone()
            assert row is not None
            settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
            started_at = _now_iso()
        parallel = parts is not None or (cp is None and workers > 1)
        if workers > 1 and cp is not None:
            log.info("%s: resuming a single-worker export; --workers does not apply", out)
        if consistent:
            snap = _SnapshotHolder(target, settings, io_timeout)
        if parallel and parts is None:
            try:
                with io_deadline(conn, io_timeout, "sampling the key range"):
                    boundaries = sample_boundaries(
                        conn, plan, workers, snapshot=snap.snapshot if snap is not None else None
                    )
            except psycopg.Error as e:
                # The filter first runs here: a writing or failing --where is a usage error.
                raise _chunk_error(e, "sampling the key range failed", plan, target) from e
            parts = new_parts(identity, settings, started_at, boundaries)
            remove_parts(out)  # orphaned part files (no plan names them) must not be resumed
            with contextlib.suppress(FileNotFoundError):  # of an OUTPUT deleted by hand
                manifest_path(out).unlink()
            save_parts(out, parts)
        many = many_chunks_warning(
            plan.estimated_rows, chunk_rows, len(parts.ranges) if parts is not None else 1
        )
        if many is not None:
            log.warning("%s: %s", plan.qualified, many)
    except BaseException as e:
        lock.close()
        if snap is not None:
            snap.close()
        if isinstance(e, psycopg.Error):  # e.g. the connection lost while reading the settings
            raise _chunk_error(e, "preparing the export failed", plan, target) from e
        raise
    finally:
        conn.close()

    template = PartJob(
        conninfo=conninfo or "",
        plan=plan,
        options=opts,
        path=str(out),
        identity=identity,
        settings=settings,
        started_at=started_at,
        lower=None,
        upper=None,
        first=True,
        chunk_rows=chunk_rows,
        first_rows=first_chunk_rows(plan.estimated_rows, plan.estimated_bytes),
        policy=policy,
        io_timeout=io_timeout,
        statement_timeout=statement_timeout,
        snapshot=snap.snapshot if snap is not None else None,
    )
    try:
        with lock:
            if parts is not None:
                outcomes = run_parts(out, parts, template, workers, progress)
                final, digest = join_parts(out, parts, outcomes)
                resumed = any(o.resumed for o in outcomes)
            else:
                outcome = run_part(template, progress=progress, sleep=sleep)
                outcomes = [outcome]
                final, digest, resumed = outcome.checkpoint, outcome.digest, outcome.resumed
            point_in_time = (
                snap is not None and not resumed and not any(o.snapshot_lost for o in outcomes)
            )
            if snap is not None and resumed:
                log.warning(
                    "%s: resumed an interrupted export whose earlier rows came from another "
                    "snapshot: this export is no longer point-in-time",
                    plan.qualified,
                )
            manifest = _finish(
                out,
                plan,
                final,
                digest,
                started,
                resumed,
                workers=len(parts.ranges) if parts is not None else 1,
                point_in_time=point_in_time,
            )
            if parts is not None:
                remove_parts(out, parts)
    finally:
        if snap is not None:
            snap.close()
    if progress is not None:
        progress(
            Progress(
                plan.qualified,
                final.rows,
                final.offset,
                plan.estimated_rows,
                time.monotonic() - started,
                len(final.chunks),
                done=True,
            )
        )
    return _result(
        out,
        plan,
        manifest,
        started,
        resumed=resumed,
        already_complete=False,
        retries=sum(o.retries for o in outcomes),
        point_in_time=point_in_time,
    )


def _result(
    out: Path,
    plan: ResolvedTable,
    manifest: Manifest,
    started: float,
    *,
    resumed: bool,
    already_complete: bool,
    retries: int,
    point_in_time: bool,
) -> ExportResult:
    return ExportResult(
        output=out,
        table=plan.qualified,
        rows=manifest.rows,
        bytes=manifest.bytes,
        xxh3_128=manifest.xxh3_128,
        chunks=manifest.chunks,
        seconds=time.monotonic() - started,
        resumed=resumed,
        already_complete=already_complete,
        retries=retries,
        peak_rss=peak_rss(),
        key=plan.key,
        key_source=plan.key_source,
        warnings=plan.warnings,
        point_in_time=point_in_time,
    )


def _manifest_started_at(out: Path) -> str | None:
    """When the export that wrote ``out``'s manifest started; ``None`` without a usable one."""
    try:
        manifest = load_manifest(out)
    except UsageError:
        return None
    return manifest.started_at if manifest is not None else None


def _already_complete(
    out: Path, identity: dict[str, Any], plan: ResolvedTable, started: float
) -> ExportResult | None:
    """A result for an export that already finished and still verifies, else ``None``."""
    try:
        manifest = load_manifest(out)
    except UsageError:
        return None
    if manifest is None:
        return None
    same = (
        manifest.table == identity["table"]
        and list(manifest.key) == identity["key"]
        and list(manifest.columns) == identity["columns"]
        and manifest.where == identity["where"]
        and manifest.options == identity["options"]
    )
    if not same:
        return None
    try:
        verify_file(out)
    except CopystreamError:
        return None
    log.info("%s: %s is already complete and verifies; nothing to do", plan.qualified, out)
    remove_parts(out)  # part files an interrupted clean-up after the join may have left
    return _result(
        out,
        plan,
        manifest,
        started,
        resumed=False,
        already_complete=True,
        retries=0,
        point_in_time=manifest.point_in_time,
    )


@dataclass(frozen=True)
class ExportStatus:
    """The state of an export, read from the files beside ``output``."""

    output: Path
    state: str  # "in progress", "complete" or "not started"
    table: str | None
    rows: int
    bytes: int
    last_key: tuple[str, ...] | None  # None for an unfinished --workers export (one per range)
    estimated_rows: int | None
    chunks: int
    ranges: int = 1  # key ranges of a --workers export (1: a single-worker export)
    ranges_finished: int = 0  # of which are exported (all once the export is complete)

    @property
    def percent(self) -> float | None:
        """Rows done as a percentage of the table's estimated rows (may exceed 100 if stale)."""
        if self.state == "complete":
            return 100.0
        if not self.estimated_rows:
            return None
        return 100.0 * self.rows / self.estimated_rows


def export_status(output: str | os.PathLike[str]) -> ExportStatus:
    """Report how far the export to ``output`` got, from its checkpoint(s) or manifest.

    An unfinished ``--workers`` export is read from its parts plan and every range's
    checkpoint: rows, bytes and chunks are their sums. Only reads files. Raises
    :class:`UsageError` if there is no checkpoint, parts plan or manifest.
    """
    out = Path(output)
    cp = load_checkpoint(out)
    if cp is not None:
        return ExportStatus(
            out,
            "in progress",
            str(cp.export.get("table")),
            cp.rows,
            cp.offset,
            cp.last_key,
            cp.estimated_rows,
            len(cp.chunks),
            ranges_finished=int(cp.finished),
        )
    parts = load_parts(out)
    if parts is not None:
        cps = [load_checkpoint(part_path(out, i)) for i in range(len(parts.ranges))]
        started = [c for c in cps if c is not None]
        return ExportStatus(
            out,
            "in progress",
            str(parts.export.get("table")),
            sum(c.rows for c in started),
            sum(c.offset for c in started),
            None,
            next((c.estimated_rows for c in started), None),
            sum(len(c.chunks) for c in started),
            ranges=len(parts.ranges),
            ranges_finished=sum(c.finished for c in started),
        )
    manifest = load_manifest(out)
    if manifest is not None:
        last = manifest.chunks[-1].last_key if manifest.chunks else None
        return ExportStatus(
            out,
            "complete",
            manifest.table,
            manifest.rows,
            manifest.bytes,
            last,
            manifest.rows,
            len(manifest.chunks),
            ranges=manifest.workers,
            ranges_finished=manifest.workers,
        )
    raise UsageError(f"no checkpoint or manifest beside {out}: no export to report on")
