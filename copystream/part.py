"""Run one part of an export: chunks in a loop, with retries, into one file and checkpoint.

A *part* is a contiguous key range written to one file with its own checkpoint. A single-worker
export is one part (the whole key space, written to OUTPUT itself); ``--workers N`` runs N parts
in worker processes (:mod:`copystream.ranges`). :func:`run_part` is the loop that both use:
open or resume the part's checkpoint and file, run :class:`~copystream.chunk.ChunkRunner` chunk
after chunk, make each chunk durable, then checkpoint it; on a failure roll the file back,
classify the error, and retry on a fresh connection as :func:`copystream.retry.decide` says.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from ._atomic import remove_stale_temporaries
from .checkpoint import (
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
)
from .chunk import ChunkRunner, SnapshotGone
from .connection import Target, connect, connect_error, redact
from .errors import (
    CopystreamError,
    DiskFull,
    ExportFailed,
    InvalidFilter,
    OutputExists,
    PrefixMismatch,
    RetriesExhausted,
    TableNotFound,
    UsageError,
)
from .plan import ResolvedTable, next_chunk_rows
from .progress import Progress
from .retry import RetryPolicy, RetryState, classify, decide
from .sink import Sink
from .spec import CopyOptions

__all__ = ["PartJob", "PartOutcome", "run_part"]

log = logging.getLogger("copystream")

RECYCLE_CHUNKS = 1_000
RECYCLE_SECONDS = 3_600.0


class _Committer:
    """Makes committed chunks durable in a background thread: ``fsync``, then the checkpoint.

    The fsync of a ~2 s chunk takes tens of milliseconds of writeback during which the server
    would otherwise sit idle; here it overlaps the next chunk's COPY. The order that resuming
    relies on is kept: a checkpoint is written only after every byte it records is durable,
    and at most one commit is in flight, so the checkpoint on disk lags the file by at most one
    chunk (which a resume cuts off and redoes, as after any crash).
    """

    def __init__(self, sink: Sink, state: Path, durable: Checkpoint) -> None:
        self._sink = sink
        self._state = state
        self.durable = durable  # the checkpoint on disk
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, cp: Checkpoint) -> None:
        """Wait for the commit in flight (raising its error), then start committing ``cp``."""
        self.wait()
        self._thread = threading.Thread(
            target=self._commit, args=(cp,), name="copystream-commit", daemon=True
        )
        self._thread.start()

    def _commit(self, cp: Checkpoint) -> None:
        try:
            self._sink.sync()
            save_checkpoint(self._state, cp)
        except BaseException as e:  # handed to the main thread by wait()
            self._error = e
        else:
            self.durable = cp

    def check(self) -> None:
        """Raise the error of a commit that has already failed; never blocks."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Wait until the commit in flight is on disk, and raise its error if it failed.

        After a full disk the file is cut back to the checkpoint on disk, giving the space back
        (``DiskFull`` is raised before the new checkpoint replaces the old one). Any other
        error may come after the replacement (a failed directory fsync), so the file is left
        as it is: a resume cuts it to whichever checkpoint is on disk.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, DiskFull):
                self._sink.cut(self.durable.offset)
            raise e

    def settle(self) -> BaseException | None:
        """Wait for the commit in flight while another error is being raised; return its own
        error instead of raising it. A second Ctrl-C does not cut this wait short: the file
        must not be closed under the thread's fsync."""
        while True:
            try:
                self.wait()
            except KeyboardInterrupt:
                if self._thread is not None:
                    continue  # interrupted inside join(): the thread still runs
                return None
            except BaseException as e:
                return e
            return None


class PartRunner:
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
        self.conns: list[psycopg.Connection[Any]] = []
        self.conn_born = 0.0
        self._start_rows = self._start_bytes = 0  # where this run began (for rates)
        self.snapshot: str | None = None  # exported snapshot every chunk reads (--consistent)
        self.snapshot_lost = False

    # -- connections --------------------------------------------------------------------------

    def open_runner(self, settings: dict[str, str], *, side: bool) -> ChunkRunner:
        """Fresh connection(s) with the pinned settings; ``side`` adds the bound-finding sibling."""
        self.close()
        for _ in range(2 if side else 1):
            conn = connect(self.target, settings=settings)
            self.conns.append(conn)
            if self.statement_timeout is not None:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    [f"{int(self.statement_timeout * 1000)}ms"],
                )
        self.conn_born = time.monotonic()
        return ChunkRunner(
            self.conns[0], io_timeout=self.io_timeout, side=self.conns[1] if side else None
        )

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.conns = []

    def _report(self, plan: ResolvedTable, base: Checkpoint, rows: int, nbytes: int) -> None:
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
        plan: ResolvedTable,
        options: CopyOptions,
        cp: Checkpoint,
        sink: Sink,
        chunk_rows: int | None,
        *,
        until: tuple[str, ...] | None = None,
        first: bool = True,
    ) -> Checkpoint:
        """Run chunks until the range is exhausted; return the final checkpoint, on disk."""
        self._start_rows, self._start_bytes = cp.rows, cp.offset
        committer = _Committer(sink, self.output, cp)
        try:
            cp = self._loop(plan, options, cp, sink, chunk_rows, committer, until, first)
            committer.wait()
        except BaseException as e:
            failed = committer.settle()
            if failed is not None and isinstance(e, Exception) and failed is not e:
                # the commit's failure (a full disk, say) is the cause the user must act on
                raise failed from e
            raise
        finally:
            self.close()
        return cp

    def _loop(
        self,
        plan: ResolvedTable,
        options: CopyOptions,
        cp: Checkpoint,
        sink: Sink,
        chunk_rows: int | None,
        committer: _Committer,
        until: tuple[str, ...] | None,
        first: bool,
    ) -> Checkpoint:
        adaptive = chunk_rows is None
        rows_next = cp.chunk_rows
        state = RetryState()
        runner: ChunkRunner | None = None
        while not cp.finished:
            committer.check()  # a failed commit stops the export, also while retrying
            t0 = time.monotonic()
            sink.begin_chunk()
            try:
                if runner is None:
                    # the sibling pays off only when chunks are paged by a unique key
                    runner = self.open_runner(cp.settings, side=plan.key_unique and rows_next > 0)
                outcome = runner.run(
                    plan,
                    options,
                    after=cp.last_key,
                    rows=rows_next,
                    header=first and options.header and cp.offset == 0,
                    sink=sink,
                    until=until,
                    snapshot=self.snapshot,
                    on_data=functools.partial(self._report, plan, cp),
                )
            except Exception as e:
                sink.rollback()
                self.close()
                runner = None
                if self.snapshot is not None and _snapshot_gone(e):
                    log.warning(
                        "%s: the exported snapshot is gone (its coordinator ended); continuing "
                        "without it: this export is no longer point-in-time",
                        plan.qualified,
                    )
                    self.snapshot, self.snapshot_lost = None, True
                    continue
                reason = classify(e, retry_statement_timeout=self.policy.retry_statement_timeout)
                d = decide(self.policy, state, reason=reason, now=time.monotonic())
                if not d.retry:
                    raise _chunk_error(
                        e, d.reason, plan, self.target, transient=reason is not None
                    ) from e
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
            if not outcome.final and outcome.last_key == cp.last_key:
                # A key whose text does not read back as itself would page the same rows again
                # and again: stop rather than grow the file forever.
                sink.rollback()
                raise ExportFailed(
                    f"paging {plan.qualified} by {', '.join(plan.key)} made no progress after key "
                    f"{cp.last_key}: its text form does not read back exactly; choose another "
                    "--key"
                )
            _, nbytes, digest = sink.end_chunk()
            advanced = cp.advance(
                nbytes=nbytes,
                rows=outcome.rows,
                digest=digest,
                prefix_digest=sink.digest,
                last_key=outcome.last_key,
                finished=outcome.final,
            )
            if adaptive:
                rows_next = next_chunk_rows(rows_next, outcome.rows, time.monotonic() - t0)
                advanced = _with_rows(advanced, rows_next)
            # fsync and checkpoint in the background while the next chunk streams (a failed
            # commit, e.g. a full disk, is raised here at the next chunk's end, or at the end)
            committer.submit(advanced)
            cp = advanced
            log.debug(
                "%s: chunk %d committed: %s rows, %s bytes in %.2fs, last key %s",
                self.output.name,
                len(cp.chunks) - 1,
                f"{outcome.rows:,}",
                f"{nbytes:,}",
                time.monotonic() - t0,
                outcome.last_key,
            )
            state = state.succeeded(time.monotonic())
            if runner.chunks_served >= RECYCLE_CHUNKS or (
                time.monotonic() - self.conn_born > RECYCLE_SECONDS
            ):
                self.close()
                runner = None
        return cp


def _with_rows(cp: Checkpoint, rows: int) -> Checkpoint:
    return replace(cp, chunk_rows=rows)


def _snapshot_gone(e: BaseException) -> bool:
    """Whether ``e`` says the exported snapshot can no longer be imported.

    The chunk's ``SET TRANSACTION SNAPSHOT`` raises :class:`~copystream.chunk.SnapshotGone`
    for both ways PostgreSQL refuses it (22023: its file is gone with the exporting
    transaction; 55000: the file was still there but that transaction had just ended). Any
    other error, a 22023 from a --where filter too, is not about the snapshot.
    """
    return isinstance(e, SnapshotGone)


@dataclass(frozen=True)
class PartJob:
    """One contiguous key range exported to one file with its own checkpoint.

    The single-process export is one part covering the whole key space and writing OUTPUT
    itself; a parallel export runs one part per range in worker processes (so this is picklable).
    """

    conninfo: str
    plan: ResolvedTable
    options: CopyOptions
    path: str
    identity: dict[str, Any]
    settings: dict[str, str]
    started_at: str
    lower: tuple[str, ...] | None  # exclusive
    upper: tuple[str, ...] | None  # inclusive
    first: bool  # this part starts the output (it carries the header)
    chunk_rows: int | None
    first_rows: int
    policy: RetryPolicy
    io_timeout: float
    statement_timeout: float | None
    snapshot: str | None
    #: Where the part's checkpoint lives, as ``checkpoint_path(state)``; ``None``: beside
    #: ``path``. The first part of a parallel export writes OUTPUT itself but keeps its own
    #: checkpoint (``OUTPUT.part-0000.checkpoint.json``), distinct from a single-worker one.
    state: str | None = None


@dataclass(frozen=True)
class PartOutcome:
    """What :func:`run_part` left behind: a finished checkpoint and the part file's digest."""

    checkpoint: Checkpoint
    digest: str
    retries: int
    resumed: bool
    snapshot_lost: bool


def run_part(
    job: PartJob,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PartOutcome:
    """Export one part: create or resume its checkpoint and file, run chunks to the end.

    The file must not exist without a checkpoint (the caller decides about overwriting).
    A usage error before the first committed chunk of a fresh part removes what it created.
    """
    path = Path(job.path)
    state = Path(job.state) if job.state is not None else path
    ex = PartRunner(
        Target(job.conninfo),
        state,
        policy=job.policy,
        io_timeout=job.io_timeout,
        statement_timeout=job.statement_timeout,
        progress=progress,
        sleep=sleep,
    )
    ex.snapshot = job.snapshot
    cp = load_checkpoint(state)
    fresh = cp is None
    if cp is None:
        if path.exists():
            raise OutputExists(f"{path} exists and has no checkpoint to resume from")
        cp = new_checkpoint(
            export=job.identity,
            settings=job.settings,
            started_at=job.started_at,
            chunk_rows=job.first_rows if job.chunk_rows is None else job.chunk_rows,
            estimated_rows=job.plan.estimated_rows,
            last_key=job.lower,
        )
        save_checkpoint(state, cp)
    else:
        cp.check_same_export(job.identity, state)
        if job.chunk_rows is not None:
            cp = _with_rows(cp, job.chunk_rows)
    if cp.offset == 0 and not path.exists():
        sink = Sink.create(path)
    elif not path.exists():
        raise PrefixMismatch(
            f"{path} is missing but its checkpoint records {cp.offset} bytes; pass "
            "--restart to export it again from the start"
        )
    else:
        sink = Sink.reopen(path, [(c.offset, c.bytes, c.xxh3_128) for c in cp.chunks], cp.xxh3_128)
        if not fresh and not cp.finished:
            log.info("%s: resuming at row %s, byte %s", state.name, f"{cp.rows:,}", cp.offset)
    # Temporary checkpoint files of runs that were killed mid-write: removed only now, so that a
    # refused resume (a foreign checkpoint, an edited file) leaves every file as it was.
    remove_stale_temporaries(checkpoint_path(state))
    try:
        try:
            cp = ex.run_chunks(
                job.plan, job.options, cp, sink, job.chunk_rows, until=job.upper, first=job.first
            )
        except UsageError:
            if fresh and not _committed_chunks(state):
                sink.close()
                _discard(path, state)
            raise
        digest = sink.digest
    finally:
        sink.close()
        ex.close()
    return PartOutcome(cp, digest, ex.retries, not fresh, ex.snapshot_lost)


def _chunk_error(
    e: Exception, why: str, plan: ResolvedTable, target: Target, *, transient: bool = False
) -> CopystreamError:
    """The user-facing error for a chunk that failed for good. The checkpoint is intact.

    ``transient``: the policy retried ``e`` (until its retries or budget ran out).
    """
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
    if isinstance(e, psycopg.Error) and (e.sqlstate or "")[:2] in ("42", "22", "21"):
        # By SQLSTATE class: psycopg's exception for one SQLSTATE (SyntaxError, DivisionByZero,
        # ...) does not inherit from its class's (SyntaxErrorOrAccessRuleViolation, ...).
        # Syntax, data and cardinality errors come from the request (in practice the --where
        # filter): running it again fails again, so it is a usage error.
        hint = "; check the --where filter" if plan.where else ""
        return InvalidFilter(f"exporting {plan.qualified} failed: {msg}{hint}")
    if isinstance(e, psycopg.Error):
        if e.sqlstate and e.sqlstate.startswith("28"):
            return connect_error(e, target)
        if isinstance(e, psycopg.OperationalError) and "connect" in msg and e.sqlstate is None:
            return RetriesExhausted(
                f"exporting {plan.qualified} stopped: {why}: {msg}; the checkpoint is intact, "
                "run the same command again to resume"
            )
    if transient or classify(e) is not None:
        return RetriesExhausted(
            f"exporting {plan.qualified} stopped: {why}; last error: {msg}; the checkpoint is "
            "intact, run the same command again to resume"
        )
    return ExportFailed(
        f"exporting {plan.qualified} failed: {msg}; the checkpoint is intact, run the same "
        "command again to resume"
    )


def _committed_chunks(state: Path) -> bool:
    """Whether the checkpoint on disk records any chunk (a damaged one counts as yes: keep)."""
    try:
        cp = load_checkpoint(state)
    except CopystreamError:
        return True
    return cp is not None and bool(cp.chunks)


def _discard(out: Path, state: Path) -> None:
    """Remove what a fresh export created before its first chunk failed for good.

    The file first: a kill in between leaves a checkpoint at offset 0 without a file, which
    resumes; the other order would leave a file without a checkpoint, which is refused.
    """
    for p in (out, checkpoint_path(state)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
