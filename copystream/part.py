"""Run one part of an export: chunks in a loop, with retries, into one destination and checkpoint.

A *part* is a contiguous key range written to one destination with its own checkpoint. A
single-worker export is one part (the whole key space, written to OUTPUT itself); ``workers``
runs one part per key range in worker processes (:mod:`copystream.ranges`). :func:`run_part` is
the loop that both use: open or resume the part's checkpoint and destination
(:mod:`copystream.destinations`), run :class:`~copystream.chunk.ChunkRunner` chunk after chunk,
make each chunk durable, then checkpoint it; on a failure roll the chunk back and retry on a
fresh connection as the :class:`~copystream.retry.Retrier` decides, or give up with the error
:func:`~copystream.failures.translate` words.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._atomic import remove_stale_temporaries
from ._background import in_background
from .checkpoint import (
    Checkpoint,
    ChunkRecord,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
)
from .chunk import Chunk, ChunkOutcome, ChunkRunner, SnapshotGone, copy_key_index
from .connection import Target, connect
from .destinations import Destination, Parted, fresh_state, open_at_checkpoint, resume_point
from .errors import (
    CopystreamError,
    DiskFull,
    ExportFailed,
    OutputExists,
    Remedy,
    UsageError,
)
from .failures import Phase, translate
from .progress import Progress
from .retry import Retrier
from .sizing import next_chunk_rows
from .spec import ExportSpec, RunOptions
from .table import ResolvedTable

if TYPE_CHECKING:  # imported on first use: only a Parquet export's binary path needs it
    from .arrowchunk import ArrowChunkRunner

__all__ = ["Followed", "PartJob", "PartOutcome", "run_part"]

log = logging.getLogger("copystream")

#: A connection is replaced after this many chunks or seconds, so that server-side memory held by
#: a long-lived backend, or a connection pooler's limits, never build up over a long export.
RECYCLE_CHUNKS = 1_000
RECYCLE_SECONDS = 3_600.0


class _Committer:
    """Makes committed chunks durable in a background thread: ``sync``, then the checkpoint.

    The sync (an fsync, for a file) of a ~2 s chunk takes tens of milliseconds of writeback
    during which the server would otherwise sit idle; here it overlaps the next chunk's COPY. The
    order that resuming relies on is kept: a checkpoint is written only after every byte it
    records is durable, and at most one commit is in flight, so the checkpoint on disk lags the
    destination by at most two chunks: the one being committed and the next, streamed meanwhile
    (a resume cuts them off and redoes them, as after any crash).
    A destination whose ``sync`` says the chunk is not durable yet (an S3 part still filling:
    :class:`~copystream.destinations.Synced`) keeps the checkpoint where it is until one is.
    """

    def __init__(
        self, dest: Destination, save: Path | Callable[[Checkpoint], None], durable: Checkpoint
    ) -> None:
        self._dest = dest
        # where checkpoints go: beside a path, or what a callable does with them (an S3 object)
        self._save = functools.partial(save_checkpoint, save) if isinstance(save, Path) else save
        self.durable = durable  # the checkpoint on disk
        self._ended: threading.Event | None = None  # set when the commit in flight has ended
        self._error: BaseException | None = None

    def submit(self, cp: Checkpoint) -> None:
        """Wait for the commit in flight (raising its error), then start committing ``cp``."""
        self.wait()
        # (assigned once started: a Ctrl-C before never waits for a commit that never began)
        self._ended = in_background(functools.partial(self._commit, cp), "copystream-commit")

    def _commit(self, cp: Checkpoint) -> None:
        try:
            synced = self._dest.sync()
            if synced is not None:
                if not synced.durable:
                    return  # not durable yet (an S3 part still filling): the checkpoint waits
                cp = replace(cp, destination={**cp.destination, **synced.state})
            self._save(cp)
        except BaseException as e:  # handed to the main thread by wait()
            self._error = e
        else:
            self.durable = cp

    def check(self) -> None:
        """Raise the error of a commit that has already failed; never blocks."""
        if self._ended is not None and self._ended.is_set():
            self.wait()

    def wait(self) -> None:
        """Wait until the commit in flight is on disk, and raise its error if it failed.

        After a full disk the destination is cut back to the checkpoint on disk, giving the
        space back (``DiskFull`` is raised before the new checkpoint replaces the old one). Any
        other error may come after the replacement (a failed directory fsync), so the
        destination is left as it is: a resume cuts it to whichever checkpoint is on disk.
        """
        if self._ended is not None:
            self._ended.wait()
            self._ended = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, DiskFull):
                self._dest.cut(self.durable.offset)
            raise e

    def settle(self) -> BaseException | None:
        """Wait for the commit in flight while another error is being raised; return its own
        error instead of raising it. A second Ctrl-C does not cut this wait short: the
        destination must not be closed under the thread's sync."""
        while True:
            try:
                self.wait()
            except KeyboardInterrupt:
                if self._ended is not None:
                    continue  # interrupted while waiting: the commit still runs
                return None
            except BaseException as e:
                return e
            return None


@dataclass(frozen=True)
class PartJob:
    """One contiguous key range exported to one destination with its own checkpoint.

    The single-process export is one part covering the whole key space and writing OUTPUT
    itself; a parallel export runs one part per range in worker processes (so this is
    picklable). ``spec`` is resolved (it is the export's identity); ``run`` says how to run it
    (chunk size, retry policy, timeouts).
    """

    conninfo: str
    table: ResolvedTable
    spec: ExportSpec
    run: RunOptions
    path: str
    settings: dict[str, str]
    started_at: str
    first_rows: int  # rows of the first chunk when chunks are sized adaptively
    lower: tuple[str, ...] | None = None  # exclusive
    upper: tuple[str, ...] | None = None  # inclusive
    first: bool = True  # this part starts the output (it carries the header)
    ranged: bool = False  # one of the key ranges of a parallel export
    snapshot: str | None = None  # exported snapshot every chunk reads (point-in-time export)
    #: Where the part's checkpoint lives, as ``checkpoint_path(state)``; ``None``: beside
    #: ``path``. The first part of a parallel export writes OUTPUT itself but keeps its own
    #: checkpoint (``OUTPUT.part-0000.checkpoint.json``), distinct from a single-worker one.
    state: str | None = None
    #: How the part files of a Parquet dataset written by this job are named (each key range
    #: of a ``workers`` export has its own: ``part-0001-00000.parquet``, ...).
    part_stem: str = "part-"

    @property
    def identity(self) -> dict[str, Any]:
        """What the part's checkpoint records as ``export``: the spec's identity, and the key
        range (``[lower, upper]``, ``null`` = unbounded) of a parallel export's part."""
        identity = self.spec.identity()
        if self.ranged:
            identity["range"] = [
                list(self.lower) if self.lower else None,
                list(self.upper) if self.upper else None,
            ]
        return identity

    def first_checkpoint(self, destination: dict[str, Any]) -> Checkpoint:
        """The checkpoint before the job's first chunk, its destination fresh (``destination``:
        that destination's state): the one way every destination's job begins."""
        return new_checkpoint(
            export=self.identity,
            settings=self.settings,
            started_at=self.started_at,
            chunk_rows=self.first_rows if self.run.chunk_rows is None else self.run.chunk_rows,
            estimated_rows=self.table.estimated_rows,
            last_key=self.lower,
            destination=destination,
        )


@dataclass(frozen=True)
class Followed:
    """The uncompressed stream of every range of a compressed ``workers`` export, as range 0's
    process hashed it once its own range was finished (:func:`copystream.join.
    follow_after_range`): the chunks of each range it covered, in key order, and the whole
    stream's size and xxh3-128 hex digest."""

    chunks: tuple[tuple[ChunkRecord, ...], ...]
    raw_bytes: int
    raw_xxh3_128: str


@dataclass(frozen=True)
class PartOutcome:
    """What :func:`run_part` left behind: a finished checkpoint and the part's digest
    (``followed``: range 0's, see :class:`Followed`)."""

    checkpoint: Checkpoint
    digest: str
    retries: int
    resumed: bool
    snapshot_lost: bool
    followed: Followed | None = None


class PartRunner:
    """One run of one part. Holds the mutable state; the decisions live in pure functions."""

    def __init__(
        self,
        job: PartJob,
        state: Path,
        *,
        progress: Callable[[Progress], None] | None,
        sleep: Callable[[float], None],
        save: Callable[[Checkpoint], None] | None = None,
    ) -> None:
        self.job = job
        self.target = Target(job.conninfo)
        self.output = state  # the checkpoint is checkpoint_path(state)
        #: Writes a checkpoint (default: beside ``state``; an S3 export's goes to its bucket).
        self.save = save if save is not None else functools.partial(save_checkpoint, state)
        self.progress = progress
        self.retrier = Retrier(job.run.policy, sleep=sleep)
        table = job.table
        # where a chunk's error happened, for translate()
        self.phase = Phase(
            self.target,
            table.qualified,
            f"exporting {table.qualified}",
            filtered=table.where is not None,
        )
        self.started = time.monotonic()
        self.conns: list[Any] = []  # psycopg's, or ADBC's on the binary path
        #: on self.conns; None: open before the next chunk
        self.runner: ChunkRunner | ArrowChunkRunner | None = None
        self.conn_born = 0.0
        self._start_rows = self._start_bytes = 0  # where this run began (for rates)
        self.snapshot = job.snapshot  # None once it is gone (then snapshot_lost)
        self.snapshot_lost = False
        self.rows_next = 0  # rows of the next attempt (0: the rest of the range in one COPY)

    @property
    def retries(self) -> int:
        """Retries taken so far."""
        return self.retrier.retries

    # -- connections --------------------------------------------------------------------------

    def open_runner(
        self, settings: dict[str, str], *, side: bool
    ) -> ChunkRunner | ArrowChunkRunner:
        """Fresh connection(s) with the pinned settings; ``side`` adds the bound-finding sibling.
        A Parquet export on the binary path gets one ADBC connection instead."""
        self.close()
        timeout = self.job.run.statement_timeout
        if self.job.table.binary is not None:
            from .arrowchunk import ArrowChunkRunner, connect_adbc

            link = connect_adbc(self.target, settings, timeout)
            self.conns.append(link)
            self.conn_born = time.monotonic()
            self.runner = ArrowChunkRunner(link, self.target, io_timeout=self.job.run.io_timeout)
            return self.runner
        for _ in range(2 if side else 1):
            conn = connect(self.target, settings=settings)
            self.conns.append(conn)
            if timeout is not None:
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    [f"{int(timeout * 1000)}ms"],
                )
        self.conn_born = time.monotonic()
        self.runner = ChunkRunner(
            self.conns[0], io_timeout=self.job.run.io_timeout, side=self.conns[1] if side else None
        )
        return self.runner

    def close(self) -> None:
        """Close the connections (the runner on them goes too)."""
        self.runner = None
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.conns = []

    def _recycle(self) -> None:
        """Close the connections when they have served long enough (see ``RECYCLE_CHUNKS``)."""
        if self.runner is not None and (
            self.runner.chunks_served >= RECYCLE_CHUNKS
            or time.monotonic() - self.conn_born > RECYCLE_SECONDS
        ):
            self.close()

    def _report(self, base: Checkpoint, rows: int, nbytes: int) -> None:
        """Progress during a chunk: ``rows``/``nbytes`` received since ``base`` was saved."""
        if self.progress is not None:
            self.progress(
                Progress(
                    self.job.table.qualified,
                    base.rows + rows,
                    base.raw_bytes + nbytes,
                    self.job.table.estimated_rows,
                    time.monotonic() - self.started,
                    len(base.chunks),
                    start_bytes=self._start_bytes,
                    start_rows=self._start_rows,
                    retries=tuple(self.retrier.by_reason.items()),
                    outage_seconds=self.retrier.outage_seconds,
                )
            )

    # -- the loop -----------------------------------------------------------------------------

    def run_chunks(self, cp: Checkpoint, dest: Destination) -> Checkpoint:
        """Run chunks until the range is exhausted; return the final checkpoint, on disk."""
        self._start_rows, self._start_bytes = cp.rows, cp.raw_bytes
        committer = _Committer(dest, self.save, cp)
        try:
            cp = self._loop(cp, dest, committer)
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

    def _loop(self, cp: Checkpoint, dest: Destination, committer: _Committer) -> Checkpoint:
        self.rows_next = cp.chunk_rows
        while not cp.finished:
            committer.check()  # a failed commit stops the export, also while retrying
            t0 = time.monotonic()
            outcome = self._attempt(cp, dest)
            if outcome is None:
                continue  # failed, and worth another attempt: the retry waited already
            cp = self._commit(cp, dest, committer, outcome, t0)
            self.retrier.succeeded(f"chunk {len(cp.chunks) - 1} of {self.job.table.qualified}")
            self._recycle()
        return cp

    def _attempt(self, cp: Checkpoint, dest: Destination) -> ChunkOutcome | None:
        """One attempt at the chunk after ``cp``: its outcome, or ``None`` when it failed in a
        way worth another attempt (rolled back, connections closed). Raises when it is not."""
        job = self.job
        dest.begin_chunk()
        connected = False
        try:
            runner = self.runner
            if runner is None:
                # the sibling pays off only when chunks are paged by a unique key, and is not
                # needed when the COPY's own last row gives the last key
                side = (
                    job.table.key_unique
                    and self.rows_next > 0
                    and copy_key_index(job.table, job.spec.options) is None
                )
                runner = self.open_runner(cp.settings, side=side)
            connected = True
            chunk = Chunk(
                job.table,
                job.spec.options,
                after=cp.last_key,
                rows=self.rows_next,
                header=job.first and job.spec.options.header and cp.offset == 0,
                until=job.upper,
                snapshot=self.snapshot,
            )
            return runner.run(chunk, dest, functools.partial(self._report, cp))
        except Exception as e:
            dest.rollback()
            self.close()
            self._failed(e, len(cp.chunks), ran=connected)
            return None

    def _failed(self, e: Exception, index: int, *, ran: bool) -> None:
        """Deal with the failure ``e`` of chunk ``index``: continue without a snapshot that is
        gone, wait before a retry (with fewer rows when the chunk had begun: ``ran``), or raise
        the error for good."""
        qualified = self.job.table.qualified
        if self.snapshot is not None and _snapshot_gone(e):
            log.warning(
                "%s: the exported snapshot is gone (its coordinator ended); continuing "
                "without it: this export is no longer point-in-time",
                qualified,
            )
            self.snapshot, self.snapshot_lost = None, True
            return
        d = self.retrier.failed(e)
        if not d.retry:
            raise translate(e, self.phase, why=d.reason, transient=self.retrier.transient) from e
        then = ""
        if ran and self.job.run.chunk_rows is None:  # adaptive: a smaller chunk next time
            smaller = next_chunk_rows(self.rows_next, 0, 0.0, failed=True)
            if smaller != self.rows_next:
                then = f", with {smaller:,} rows instead of {_rows(self.rows_next)}"
            self.rows_next = smaller
        self.retrier.wait(d, f"chunk {index} of {qualified}", then=then)

    def _commit(
        self,
        cp: Checkpoint,
        dest: Destination,
        committer: _Committer,
        outcome: ChunkOutcome,
        t0: float,
    ) -> Checkpoint:
        """End the chunk that produced ``outcome`` and hand its checkpoint to the committer;
        return that checkpoint (which records the row count of the next chunk)."""
        table = self.job.table
        if not outcome.final and outcome.last_key == cp.last_key:
            # A key whose text does not read back as itself would page the same rows again
            # and again: stop rather than grow the output forever.
            dest.rollback()
            raise ExportFailed(
                f"paging {table.qualified} by {', '.join(table.key)} made no progress after key "
                f"{cp.last_key}: its text form does not read back exactly",
                remedy=Remedy.CHOOSE_KEY,
            )
        written = dest.end_chunk()
        if outcome.final and isinstance(dest, Parted):
            dest.end_parts()  # the last part is sealed with the final checkpoint
        advanced = cp.advance(
            nbytes=written.bytes,
            rows=outcome.rows,
            digest=written.xxh3_128,
            prefix_digest=dest.digest,
            last_key=outcome.last_key,
            finished=outcome.final,
            destination=dest.state(),
            raw=written.raw,
        )
        if self.job.run.chunk_rows is None:  # adaptive
            self.rows_next = next_chunk_rows(self.rows_next, outcome.rows, time.monotonic() - t0)
            advanced = _with_rows(advanced, self.rows_next)
        # sync and checkpoint in the background while the next chunk streams (a failed
        # commit, e.g. a full disk, is raised here at the next chunk's end, or at the end)
        committer.submit(advanced)
        log.debug(
            "%s: chunk %d committed: %s rows, %s bytes in %.2fs, last key %s",
            self.output.name,
            len(advanced.chunks) - 1,
            f"{outcome.rows:,}",
            f"{written.bytes:,}",
            time.monotonic() - t0,
            outcome.last_key,
        )
        return advanced


def _rows(n: int) -> str:
    """A chunk's row count for a log line (``0``: a single COPY of the rest)."""
    return f"{n:,}" if n > 0 else "the whole range"


def _with_rows(cp: Checkpoint, rows: int) -> Checkpoint:
    return replace(cp, chunk_rows=rows)


def _snapshot_gone(e: BaseException) -> bool:
    """Whether ``e`` says the exported snapshot can no longer be imported.

    The chunk's ``SET TRANSACTION SNAPSHOT`` raises :class:`~copystream.chunk.SnapshotGone`
    for both ways PostgreSQL refuses it (22023, from PostgreSQL 17 42704: its file is gone with
    the exporting transaction; 55000: the file was still there but that transaction had just
    ended). Any other error, a 22023 or 42704 from a filter too, is not about the snapshot.
    """
    return isinstance(e, SnapshotGone)


def run_part(
    job: PartJob,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    finished: Callable[[Destination], None] | None = None,
) -> PartOutcome:
    """Export one part: create or resume its checkpoint and destination, run chunks to the end.

    The output must not exist without a checkpoint (the caller decides about overwriting).
    A usage error before the first committed chunk of a fresh part removes what it created.
    ``finished`` is given the destination once every chunk is committed, before it is closed.
    """
    path = Path(job.path)
    state = Path(job.state) if job.state is not None else path
    cp, fresh = _checkpoint(job, path, state)
    resumed = not fresh and _begun(cp)
    resuming = resumed and not cp.finished and path.exists()
    dest = open_at_checkpoint(path, cp, recorded_in=checkpoint_path(state))
    if resuming:
        log.info("%s: resuming at row %s, byte %s", state.name, f"{cp.rows:,}", cp.offset)
    # Temporary checkpoint files of runs that were killed mid-write: removed only now, so that a
    # refused resume (a foreign checkpoint, an edited file) leaves every file as it was.
    remove_stale_temporaries(checkpoint_path(state))
    ex = PartRunner(job, state, progress=progress, sleep=sleep)
    try:
        try:
            cp = ex.run_chunks(cp, dest)
        except UsageError:
            if fresh and not _committed_chunks(state):
                dest.close()
                _discard(path, state, shared=job.ranged)
            raise
        digest = dest.digest
        if finished is not None:
            finished(dest)
    finally:
        dest.close()
        ex.close()
    return PartOutcome(cp, digest, ex.retries, resumed, ex.snapshot_lost)


def _begun(cp: Checkpoint) -> bool:
    """Whether a checkpoint on disk records a chunk of its own export: an incremental export's
    starts with the chunks it continues, and is not resumed before it adds one."""
    return cp.increment is None or len(cp.chunks) > int(cp.increment.get("base_chunks", 0))


def _checkpoint(job: PartJob, path: Path, state: Path) -> tuple[Checkpoint, bool]:
    """The part's checkpoint, and whether it is new: the one on disk if it is for this export
    (else :class:`CheckpointMismatch`), or a new one, saved before the destination exists."""
    cp = load_checkpoint(state)
    if cp is not None:
        cp.check_same_export(job.identity, state)
        cp = resume_point(cp)  # a Parquet dataset resumes after its last whole part
        if job.run.chunk_rows is not None:
            cp = _with_rows(cp, job.run.chunk_rows)
        return cp, False
    shared = job.ranged and job.spec.parquet is not None  # the dataset all ranges write to
    if path.exists() and not shared:
        raise OutputExists(f"{path} exists and has no checkpoint to resume from")
    cp = job.first_checkpoint(fresh_state(path, job.spec, stem=job.part_stem))
    save_checkpoint(state, cp)
    return cp, True


def _committed_chunks(state: Path) -> bool:
    """Whether the checkpoint on disk records any chunk (a damaged one counts as yes: keep)."""
    try:
        cp = load_checkpoint(state)
    except CopystreamError:
        return True
    return cp is not None and bool(cp.chunks)


def _discard(out: Path, state: Path, *, shared: bool = False) -> None:
    """Remove what a fresh export created before its first chunk failed for good.

    The file first: a kill in between leaves a checkpoint at offset 0 without a file, which
    resumes; the other order would leave a file without a checkpoint, which is refused.
    """
    paths = [out, checkpoint_path(state)]
    if out.is_dir() and not out.is_symlink():  # a Parquet dataset
        if not shared:  # (other key ranges write to it too: theirs to keep)
            shutil.rmtree(out)
        paths = paths[1:]
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
