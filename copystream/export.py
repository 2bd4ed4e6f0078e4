"""The export runner: plan → chunk → sink → checkpoint → manifest, with retries and resume.

:func:`export_table` is the library's main entry point (the ``copystream export`` command is a
thin layer over it); :func:`export_status` reports on an unfinished export.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from .checkpoint import (
    Checkpoint,
    ChunkRecord,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from .chunk import ChunkRunner
from .connection import Target, connect, connect_error, redact
from .errors import (
    CopystreamError,
    ExportFailed,
    InvalidFilter,
    OutputExists,
    OutputProblem,
    PrefixMismatch,
    RetriesExhausted,
    TableNotFound,
    UsageError,
)
from .manifest import Manifest, load_manifest, manifest_path, save_manifest, verify_file
from .plan import CopyOptions, TablePlan, first_chunk_rows, introspect, next_chunk_rows
from .progress import Progress
from .retry import RetryPolicy, RetryState, classify, decide
from .settings import PINNED_SETTINGS, read_settings_query
from .sink import Sink

__all__ = ["ExportResult", "ExportStatus", "export_status", "export_table"]

log = logging.getLogger("copystream")

#: A connection is replaced after this many chunks or seconds, so that server-side memory held by
#: a long-lived backend, or a connection pooler's limits, never build up over a long export.
RECYCLE_CHUNKS = 1_000
RECYCLE_SECONDS = 3_600.0
#: Retries of the very first connection: a wrong host or port is a usage error, reported fast.
FIRST_CONNECT = RetryPolicy(retries=2, base_delay=0.5, max_delay=2.0, budget=10.0)


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
        }


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_output(output: Path) -> None:
    if output.is_dir():
        raise OutputProblem(f"output {output} is a directory; give a file name")
    parent = output.parent
    if not parent.is_dir():
        raise OutputProblem(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputProblem(f"output directory {parent} is not writable")


class _Exporter:
    """One run of one export. Holds the mutable state; the decisions live in pure functions."""

    def __init__(
        self,
        target: Target,
        output: Path,
        *,
        policy: RetryPolicy,
        io_timeout: float,
        statement_timeout: float | None,
        progress: Callable[[Progress], None] | None,
        sleep: Callable[[float], None],
    ) -> None:
        self.target = target
        self.output = output
        self.policy = policy
        self.io_timeout = io_timeout
        self.statement_timeout = statement_timeout
        self.progress = progress
        self.sleep = sleep
        self.started = time.monotonic()
        self.retries = 0
        self.conn: psycopg.Connection[Any] | None = None
        self.conn_born = 0.0
        self._start_rows = self._start_bytes = 0  # where this run began (for rates)

    # -- connections --------------------------------------------------------------------------

    def first_connect(self) -> psycopg.Connection[Any]:
        state = RetryState()
        while True:
            try:
                return connect(self.target)
            except psycopg.Error as e:
                d = decide(FIRST_CONNECT, state, reason=_connect_reason(e), now=time.monotonic())
                if not d.retry:
                    raise connect_error(e, self.target) from e
                state = d.state
                log.warning("connecting failed (%s); retrying in %.1fs", d.reason, d.delay)
                self.sleep(d.delay)

    def open_runner(self, settings: dict[str, str]) -> ChunkRunner:
        self.close()
        conn = connect(self.target, settings=settings)
        if self.statement_timeout is not None:
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false)",
                [f"{int(self.statement_timeout * 1000)}ms"],
            )
        self.conn, self.conn_born = conn, time.monotonic()
        return ChunkRunner(conn, io_timeout=self.io_timeout)

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def _report(self, plan: TablePlan, base: Checkpoint, rows: int, nbytes: int) -> None:
        """Progress during a chunk: ``rows``/``nbytes`` received since ``base`` was saved."""
        if self.progress is not None:
            self.progress(
                Progress(
                    plan.qualified,
                    base.rows + rows,
                    base.offset + nbytes,
                    plan.estimated_rows,
                    time.monotonic() - self.started,
                    len(base.chunks),
                    start_bytes=self._start_bytes,
                    start_rows=self._start_rows,
                )
            )

    # -- the loop -----------------------------------------------------------------------------

    def run_chunks(
        self,
        plan: TablePlan,
        options: CopyOptions,
        cp: Checkpoint,
        sink: Sink,
        chunk_rows: int | None,
    ) -> Checkpoint:
        adaptive = chunk_rows is None
        rows_next = cp.chunk_rows
        state = RetryState()
        runner: ChunkRunner | None = None
        self._start_rows, self._start_bytes = cp.rows, cp.offset
        while not cp.finished:
            t0 = time.monotonic()
            sink.begin_chunk()
            try:
                if runner is None:
                    runner = self.open_runner(cp.settings)
                outcome = runner.run(
                    plan,
                    options,
                    after=cp.last_key,
                    rows=rows_next,
                    header=options.header and cp.offset == 0,
                    sink=sink,
                    on_data=functools.partial(self._report, plan, cp),
                )
            except Exception as e:
                sink.rollback()
                self.close()
                runner = None
                reason = classify(e, retry_statement_timeout=self.policy.retry_statement_timeout)
                d = decide(self.policy, state, reason=reason, now=time.monotonic())
                if not d.retry:
                    raise _chunk_error(e, d.reason, plan, self.target) from e
                state = d.state
                self.retries += 1
                log.warning(
                    "chunk %d of %s failed (%s); retry %d/%d in %.1fs",
                    len(cp.chunks),
                    plan.qualified,
                    reason,
                    d.state.attempts,
                    self.policy.retries,
                    d.delay,
                )
                self.sleep(d.delay)
                continue
            sink.sync()
            _, nbytes, digest = sink.end_chunk()
            cp = cp.advance(
                nbytes=nbytes,
                rows=outcome.rows,
                digest=digest,
                prefix_digest=sink.digest,
                last_key=outcome.last_key,
                finished=outcome.final,
            )
            if adaptive:
                rows_next = next_chunk_rows(rows_next, outcome.rows, time.monotonic() - t0)
            save_checkpoint(self.output, _with_rows(cp, rows_next))
            state = state.succeeded(time.monotonic())
            if runner.chunks_served >= RECYCLE_CHUNKS or (
                time.monotonic() - self.conn_born > RECYCLE_SECONDS
            ):
                self.close()
                runner = None
        self.close()
        return cp


def _with_rows(cp: Checkpoint, rows: int) -> Checkpoint:
    return replace(cp, chunk_rows=rows)


def _connect_reason(e: psycopg.Error) -> str | None:
    text = str(e)
    if (
        e.sqlstate in ("28P01", "28000", "3D000")
        or "does not exist" in text
        or ("authentication" in text)
    ):
        return None
    if "could not translate host name" in text:
        return None
    return classify(e) or "connection failed"


def _chunk_error(e: Exception, why: str, plan: TablePlan, target: Target) -> CopystreamError:
    """The user-facing error for a chunk that failed for good. The checkpoint is intact."""
    if isinstance(e, CopystreamError):
        return e
    msg = redact(
        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__, *target.secrets
    )
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        return InvalidFilter(
            f"the export of {plan.qualified} tried to write ({msg}); every export transaction "
            "is READ ONLY: remove writing functions from --where"
        )
    if isinstance(e, psycopg.errors.UndefinedTable):
        return TableNotFound(f"{plan.qualified} disappeared during the export: {msg}")
    if isinstance(e, psycopg.errors.UndefinedColumn | psycopg.errors.DatatypeMismatch):
        return UsageError(
            f"the definition of {plan.qualified} changed during the export ({msg}); "
            "pass --restart to export it again"
        )
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return UsageError(f"permission denied exporting {plan.qualified}: {msg}")
    if isinstance(
        e, psycopg.errors.SyntaxErrorOrAccessRuleViolation | psycopg.errors.DataException
    ):
        return InvalidFilter(f"exporting {plan.qualified} failed: {msg}")
    if isinstance(e, psycopg.Error):
        if e.sqlstate and e.sqlstate.startswith("28"):
            return connect_error(e, target)
        if isinstance(e, psycopg.OperationalError) and "connect" in msg and e.sqlstate is None:
            return RetriesExhausted(
                f"exporting {plan.qualified} stopped: {why}: {msg}; the checkpoint is intact, "
                "run the same command again to resume"
            )
    if classify(e) is not None:
        return RetriesExhausted(
            f"exporting {plan.qualified} stopped: {why}; last error: {msg}; the checkpoint is "
            "intact, run the same command again to resume"
        )
    return ExportFailed(
        f"exporting {plan.qualified} failed: {msg}; the checkpoint is intact, run the same "
        "command again to resume"
    )


def _export_identity(plan: TablePlan, options: CopyOptions) -> dict[str, Any]:
    return {
        "table": plan.qualified,
        "key": list(plan.key),
        "key_types": list(plan.key_types),
        "columns": list(plan.columns),
        "where": plan.where,
        "options": options.to_dict(),
    }


def _finish(
    output: Path, plan: TablePlan, cp: Checkpoint, digest: str, started: float, resumed: bool
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
        chunk_rows: rows per chunk; ``None`` adapts to ~2 s per chunk.
        header: write a CSV header line (shortcut for ``options=CopyOptions(header=True)``).
        options: COPY formatting options (:class:`CopyOptions`).
        restart: discard any checkpoint, manifest and output and start from zero.
        force: overwrite an existing output that has no checkpoint.
        progress: called with a :class:`Progress` about once per megabyte and per chunk.
        retries / retry_budget: per-chunk retries and total seconds spent retrying.
        retry_policy: a full :class:`RetryPolicy` (delays too), replacing the two above.
        io_timeout: seconds without a byte from the server before the chunk is retried.
        statement_timeout: per-statement server timeout (seconds); its cancellations are retried.

    Raises a :class:`~copystream.errors.UsageError` (exit code 2) for a request that cannot work
    and an :class:`~copystream.errors.ExportFailed` (exit code 1) when the export stopped with
    its checkpoint intact (run again to resume).
    """
    started = time.monotonic()
    out = Path(output)
    _check_output(out)
    target = Target(conninfo or "")
    if chunk_rows is not None and chunk_rows < 1:
        raise UsageError("chunk_rows must be a positive number of rows")
    opts = options or CopyOptions(header=header)
    if header and not opts.header:
        opts = CopyOptions(**{**opts.__dict__, "header": True})
    keys = [key] if isinstance(key, str) else key
    policy = retry_policy or RetryPolicy(
        retries=retries, budget=retry_budget, retry_statement_timeout=statement_timeout is not None
    )
    ex = _Exporter(
        target,
        out,
        policy=policy,
        io_timeout=io_timeout,
        statement_timeout=statement_timeout,
        progress=progress,
        sleep=sleep,
    )
    conn = ex.first_connect()
    try:
        try:
            plan = introspect(conn, table, key=keys, columns=columns, where=where)
        except psycopg.Error as e:
            raise UsageError(
                f"cannot plan the export of {table}: "
                f"{redact(str(e).splitlines()[0], *target.secrets)}"
            ) from e
        for w in plan.warnings:
            log.warning("%s", w)
        log.info("%s: paging by %s (%s)", plan.qualified, ", ".join(plan.key), plan.key_source)
        identity = _export_identity(plan, opts)

        if restart:
            for p in (checkpoint_path(out), manifest_path(out), out):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        cp = load_checkpoint(out)
        if cp is not None:
            cp.check_same_export(identity, out)
            if cp.offset > 0 and not out.exists():
                raise PrefixMismatch(
                    f"{out} is missing but its checkpoint records {cp.offset} bytes; pass "
                    "--restart to export it again from the start"
                )
        elif out.exists():
            done = _already_complete(out, identity, plan, started)
            if done is not None:
                return done
            if not force:
                raise OutputExists(
                    f"{out} exists and has no checkpoint to resume from; pass --restart or "
                    "--force to overwrite it"
                )
            for p in (manifest_path(out), out):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        fresh = cp is None
        if cp is None:
            row = conn.execute(read_settings_query()).fetchone()
            assert row is not None
            settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
            cp = new_checkpoint(
                export=identity,
                settings=settings,
                started_at=_now_iso(),
                chunk_rows=chunk_rows
                or first_chunk_rows(plan.estimated_rows, plan.estimated_bytes),
                estimated_rows=plan.estimated_rows,
            )
            save_checkpoint(out, cp)
        elif chunk_rows is not None:
            cp = _with_rows(cp, chunk_rows)
    finally:
        conn.close()

    resumed = not fresh
    if cp.offset == 0 and not out.exists():
        sink = Sink.create(out)
    else:
        sink = Sink.reopen(out, [(c.offset, c.bytes, c.xxh3_128) for c in cp.chunks], cp.xxh3_128)
        if resumed:
            log.info("%s: resuming at row %s, byte %s", plan.qualified, f"{cp.rows:,}", cp.offset)
    try:
        try:
            cp = ex.run_chunks(plan, opts, cp, sink, chunk_rows)
        except UsageError:
            if fresh and cp.offset == 0 and not load_checkpoint(out).chunks:  # type: ignore[union-attr]
                _discard(out)
            raise
        digest = sink.digest
    finally:
        sink.close()
        ex.close()
    manifest = _finish(out, plan, cp, digest, started, resumed)
    if progress is not None:
        progress(
            Progress(
                plan.qualified,
                cp.rows,
                cp.offset,
                plan.estimated_rows,
                time.monotonic() - started,
                len(cp.chunks),
                done=True,
            )
        )
    return ExportResult(
        output=out,
        table=plan.qualified,
        rows=manifest.rows,
        bytes=manifest.bytes,
        xxh3_128=manifest.xxh3_128,
        chunks=manifest.chunks,
        seconds=time.monotonic() - started,
        resumed=resumed,
        already_complete=False,
        retries=ex.retries,
        peak_rss=peak_rss(),
        key=plan.key,
        key_source=plan.key_source,
        warnings=plan.warnings,
    )


def _discard(out: Path) -> None:
    """Remove what a fresh export created before its first chunk failed for good."""
    for p in (checkpoint_path(out), out):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _already_complete(
    out: Path, identity: dict[str, Any], plan: TablePlan, started: float
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
    return ExportResult(
        output=out,
        table=plan.qualified,
        rows=manifest.rows,
        bytes=manifest.bytes,
        xxh3_128=manifest.xxh3_128,
        chunks=manifest.chunks,
        seconds=time.monotonic() - started,
        resumed=False,
        already_complete=True,
        retries=0,
        peak_rss=peak_rss(),
        key=plan.key,
        key_source=plan.key_source,
        warnings=plan.warnings,
    )


@dataclass(frozen=True)
class ExportStatus:
    """The state of an export, read from the files beside ``output``."""

    output: Path
    state: str  # "in progress", "complete" or "not started"
    table: str | None
    rows: int
    bytes: int
    last_key: tuple[str, ...] | None
    estimated_rows: int | None
    chunks: int

    @property
    def percent(self) -> float | None:
        """Rows done as a percentage of the table's estimated rows (may exceed 100 if stale)."""
        if self.state == "complete":
            return 100.0
        if not self.estimated_rows:
            return None
        return 100.0 * self.rows / self.estimated_rows


def export_status(output: str | os.PathLike[str]) -> ExportStatus:
    """Report how far the export to ``output`` got, from its checkpoint or manifest.

    Raises :class:`UsageError` if there is neither.
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
        )
    raise UsageError(f"no checkpoint or manifest beside {out}: no export to report on")
