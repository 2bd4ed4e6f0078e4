"""Running a bulk job: :func:`run_bulk` resolves and plans the tables on their servers (a few
catalog queries for all of them), takes the output directory's lock, skips the tables already
complete (local I/O only), holds the job's snapshot when asked, runs the others in the worker
pool ``jobs`` at a time, publishes the small tables' files in groups and records each outcome
(or, in a dry run, says what would happen)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .._atomic import locked, remove_stale_temporaries, temporary_target
from .._background import in_background
from ..checkpoint import checkpoint_path
from ..connection import Target, redact
from ..errors import CopystreamError, ExportFailed, SnapshotRequired, UsageError
from ..manifest import manifest_path
from ..pipeline import JOB_LOCK, SnapshotHolder, exclusive, lock_path
from ..pool import Event, Task, forks, run_tasks, started_ahead
from ..progress import Progress
from ..ranges import parts_path
from ..state import Complete, Fresh, Occupied, OnDisk, Resume, discover
from ..whole import Staged, is_small, publish
from .increments import watermark_step
from .outcome import (
    BulkProgress,
    BulkResult,
    JobSnapshot,
    TableOutcome,
    _from_manifest,
    _from_result,
    _key_source,
    _outcome,
    job_snapshot,
)
from .plan import BulkPlan, load_plan
from .report import _Report
from .resolve import (
    _resolve_on_servers,
    _select_only,
    _Task,
    order_largest_first,
    share_workers,
)
from .s3 import JobBucket, Listing, S3Path, export_s3_task, look, open_bucket
from .worker import TableDone, export_task

log = logging.getLogger("copystream")

#: A finished output up to this size is re-verified by the coordinator itself before any worker
#: starts (hashing is local I/O); a larger one by a worker, in parallel with the others.
VERIFY_HERE_BYTES = 64 * 1024 * 1024
#: Small tables' files are published in groups of up to this many, or once the oldest has
#: waited this long: one round of fsync per group (see :mod:`copystream.whole`).
PUBLISH_GROUP = 64
PUBLISH_DELAY = 0.3
#: The report is rewritten at most this often while the job runs (and always at its end).
REPORT_INTERVAL = 1.0
#: A table whose worker process died under it (killed, out of memory) is started again in a new
#: worker up to this many times, resuming from what it left (a table that kills every worker
#: it runs in then fails, and the job goes on without it), after this many seconds.
WORKER_RESTARTS = 2
RESTART_DELAY = 0.5


@contextlib.contextmanager
def _job_lock(directory: Path) -> Iterator[None]:
    """One bulk job per output directory at a time; and while it runs, the directory is the
    job's: ``copystream export`` refuses to write in it (see
    :func:`copystream.pipeline.exclusive`), so the job writes its outputs without their own
    locks (an output whose lock another process held when the job began excepted)."""
    busy = f"another copystream bulk job is running with output directory {directory}"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(directory / JOB_LOCK, busy))
        except OSError as e:
            why = f"cannot write in the output directory {directory}: {e.strerror}"
            raise UsageError(why) from e
        yield


# -- running ------------------------------------------------------------------------------------


def run_bulk(
    plan: BulkPlan | str | os.PathLike[str],
    *,
    jobs: int = 1,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[BulkProgress], None] | None = None,
    consistent: bool | None = None,
    require_snapshot: bool = False,
) -> BulkResult:
    """Export every table of ``plan`` (a :class:`BulkPlan` or the path of a plan file).

    Patterns are resolved and every table is planned on its server in a few catalog queries
    for all of them; the tables run largest first (by the planner's size estimates) in ``jobs``
    long-lived worker processes, each taking the next table when it is free. A small table is
    one COPY on the worker's open connection, written atomically; a large one goes through
    :func:`copystream.export_table`'s pipeline (a table larger than its share of the job gets
    key ranges, as with ``workers``). One table's failure does not stop the others. Calling it
    again resumes: finished tables that still verify are skipped without connecting for them,
    unfinished ones resume from their checkpoints, failed ones are tried again.
    ``copystream-report.json`` in the output directory is rewritten atomically as tables
    finish. An ``output_dir`` of ``s3://bucket/prefix`` writes every table, and the report, as
    objects under the prefix (:mod:`copystream.bulk.s3`); its bucket is checked first
    (:class:`UsageError` before anything is read from PostgreSQL).

    ``only``: names or patterns; just the plan's tables matching one of them run (a name that
    matches none raises :class:`UsageError`). ``dry_run``: resolve the plan and say, per table,
    its key and where it came from, its estimated size, its output and whether it would be
    refused; nothing is written. ``progress``: called with a :class:`BulkProgress` a few times a
    second and whenever a table starts or finishes. ``consistent``: every table and chunk reads
    one snapshot held by this process for the whole job (``None``: as the plan's
    ``consistent`` says); ``require_snapshot``: that, and refuse to go on
    (:class:`SnapshotRequired`) when tables of the job were exported before, under a snapshot
    that is gone.

    Raises :class:`PlanError` for an invalid plan and :class:`UsageError` when no server of the
    plan can be reached (nothing is written then). A job that ran before (its report is there)
    waits an outage out instead, as a resumed export does: past ``max_outage`` it raises
    :class:`RetriesExhausted` (exit 1), its files untouched. A failed table is reported in the
    result (``result.failed``, ``result.exit_code``), not raised.
    """
    started = time.monotonic()
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    bulk = plan if isinstance(plan, BulkPlan) else load_plan(plan)
    wanted = require_snapshot or (bulk.consistent if consistent is None else consistent)
    # The workers' interpreters start while the tables are planned (not for a dry run, nor for a
    # job whose last run finished every table: there is likely nothing for them to do).
    # S3: the bucket is checked before anything is read from PostgreSQL (exit 2 if unusable)
    bucket = open_bucket(bulk) if isinstance(bulk.output_dir, S3Path) else None
    ran_before: bool | None = None  # (None: the report file says)
    if bucket is not None:
        previous = bucket.report()
        ran_before, done = previous is not None, _says_finished(previous)
        preload: tuple[str, ...] = ("copystream.s3export", "boto3", "botocore.client")
    else:
        done, preload = _finished_before(bulk.report_path), (export_task.__module__,)
    # Forked workers are not started ahead: forked later, by the pool, they have their tasks
    # in memory already (handed by index, not pickled), and there is nothing for them to
    # import meanwhile (S3: boto3 is).
    ahead = 0 if dry_run or done or (bucket is None and forks()) else jobs
    with started_ahead(ahead, preload=preload):
        args = (jobs, only, dry_run, progress, wanted, require_snapshot, started)
        return _run_bulk(bulk, *args, bucket=bucket, ran_before=ran_before)


def _finished_before(report: Path) -> bool:
    """Whether the job report says its last run finished with every table exported."""
    try:
        return _says_finished(json.loads(report.read_bytes()))
    except (OSError, ValueError):
        return False


def _says_finished(doc: Any) -> bool:
    """Whether a job report (its JSON) says its run finished with every table exported."""
    try:
        totals = doc["totals"]
        return bool(doc["finished"]) and totals["done"] + totals["skipped"] == totals["tables"]
    except (KeyError, TypeError):
        return False


def _run_bulk(
    bulk: BulkPlan,
    jobs: int,
    only: Sequence[str] | None,
    dry_run: bool,
    progress: Callable[[BulkProgress], None] | None,
    wanted: bool,
    require_snapshot: bool,
    started: float,
    *,
    bucket: JobBucket | None = None,
    ran_before: bool | None = None,
) -> BulkResult:
    resolution = _resolve_on_servers(bulk, ran_before=ran_before)
    listed = bucket.listing() if bucket is not None else None  # once, for everything below
    names = listed.names if listed is not None else None
    tasks = [watermark_step(t, names) for t in resolution.tasks]  # which file of a chain
    selected = _select_only(tasks, only) if only else tasks
    shared = {id(t): s for t, s in zip(selected, share_workers(selected, jobs), strict=True)}
    tasks = [shared.get(id(t), t) for t in tasks]  # the same objects everywhere (the report)
    ordered = order_largest_first([shared[id(t)] for t in selected])
    warnings = tuple(redact(w, *bulk.secrets) for w in resolution.warnings)
    for w in warnings:
        log.warning("%s", w)
    if dry_run:
        found = look(ordered, bucket, listed) if bucket is not None and listed else None
        secrets = bulk.secrets  # (parsed from the plan's DSNs: once, not once a table)
        outcomes = [_dry_run(t, secrets, found) for t in ordered]
        seconds = time.monotonic() - started
        return BulkResult(bulk.path, tuple(outcomes), warnings, seconds, True, jobs, None)
    job = _Job(bulk, jobs, warnings, progress, started, consistent=wanted)
    if bucket is not None and listed is not None:
        return _run_in_bucket(bulk, bucket, listed, tasks, ordered, job, require_snapshot)
    try:
        bulk.output_dir.mkdir(parents=True, exist_ok=True)
        for directory in {t.output.parent for t in ordered if t.error is None}:
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory: {e}") from e
    with _job_lock(bulk.output_dir):
        remove_stale_temporaries(bulk.report_path)
        seen = _look(ordered)
        if require_snapshot:
            _refuse_without_snapshot(ordered, seen[0])
        with _snapshots(job, ordered, require_snapshot):
            report = _Report(bulk, tasks, ordered, jobs)  # (first written by _execute)
            outcomes, snapshot = _execute(ordered, seen, job, report)
            seconds = time.monotonic() - started
            report.write(finished=True, warnings=warnings, seconds=seconds, snapshot=snapshot)
    return BulkResult(
        bulk.path, tuple(outcomes), warnings, seconds, False, jobs, bulk.report_path, snapshot
    )


def _run_in_bucket(
    bulk: BulkPlan,
    bucket: JobBucket,
    listed: Listing,
    tasks: Sequence[_Task],
    ordered: Sequence[_Task],
    job: _Job,
    require_snapshot: bool,
) -> BulkResult:
    """:func:`_run_bulk`'s steps for a job writing to S3 (:mod:`.s3`): what the bucket holds
    read from one listing, the report an object; no lock, no directory, nothing to publish."""
    found = look(ordered, bucket, listed)
    if require_snapshot:
        _refuse_without_snapshot(ordered, found)
    with _snapshots(job, ordered, require_snapshot):
        report = _Report(bulk, tasks, ordered, job.jobs, bucket=bucket)  # (see _run_bulk)
        outcomes, snapshot = _execute(ordered, (found, set()), job, report)
        seconds = time.monotonic() - job.started
        report.write(finished=True, warnings=job.warnings, seconds=seconds, snapshot=snapshot)
    return BulkResult(
        bulk.path, tuple(outcomes), job.warnings, seconds, False, job.jobs, bulk.report_path,
        snapshot,
    )  # fmt: skip


@dataclass
class _Job:
    """What every step of a running job needs."""

    plan: BulkPlan
    jobs: int
    warnings: tuple[str, ...]
    progress: Callable[[BulkProgress], None] | None
    started: float
    consistent: bool  # one snapshot for the whole job
    snapshots: dict[str, SnapshotHolder] = field(default_factory=dict)  # by DSN

    def __post_init__(self) -> None:
        self.secrets = self.plan.secrets  # what no message may show

    def snapshot_of(self, task: _Task) -> SnapshotHolder | None:
        """The job's snapshot ``task`` reads (``None``: not a consistent job, or its entry
        says ``consistent = false``)."""
        e = task.entry
        if not self.consistent or ("consistent" in e.explicit and not e.run.consistent):
            return None
        return self.snapshots.get(e.dsn or "")

    def label(self, task: _Task) -> dict[str, str] | None:
        """The job snapshot ``task`` reads, as the report records it."""
        holder = self.snapshot_of(task)
        return None if holder is None else _label(task.entry.dsn or "", holder)

    def taken(self) -> list[dict[str, str]]:
        """The snapshots this run holds, as the report records them."""
        return [_label(dsn, holder) for dsn, holder in self.snapshots.items()]


def _label(dsn: str, holder: SnapshotHolder) -> dict[str, str]:
    server = Target(dsn).describe()
    return {"server": server, "id": holder.snapshot, "taken_at": holder.taken_at}


@contextlib.contextmanager
def _snapshots(job: _Job, tasks: Sequence[_Task], required: bool) -> Iterator[None]:
    """Hold one exported snapshot per server for a consistent job, until the job ends. One that
    cannot be exported is done without (its tables then say so), unless ``required``."""
    try:
        if job.consistent:
            for t in tasks:
                dsn = t.entry.dsn or ""
                if t.error is None and dsn not in job.snapshots:
                    target = Target(dsn)
                    try:
                        holder = SnapshotHolder(target, None, t.entry.run.io_timeout, "the job")
                    except Exception as e:
                        why = redact(str(e).strip().splitlines()[0], *job.secrets)
                        what = f"cannot export a snapshot of {target.describe()}: {why}"
                        if required:
                            raise ExportFailed(what) from e
                        log.warning("%s", what)
                        continue
                    job.snapshots[dsn] = holder
        yield
    finally:
        for holder in job.snapshots.values():
            holder.close()


def _look(tasks: Sequence[_Task]) -> tuple[dict[int, OnDisk | None], set[int]]:
    """What is on disk for each task that can run, read without the database: one scan per
    output directory (removing the temporary files of killed runs, and telling the outputs
    with nothing beside them), then the files of the others. ``None``: left to its worker (its
    output is large, or another process holds its lock). Also the tasks (``id``) whose output
    another process held the lock of when the job began: those are written under the lock."""
    by_dir: dict[Path, list[_Task]] = {}
    for t in tasks:
        if t.error is None:
            by_dir.setdefault(t.output.parent, []).append(t)
    found: dict[int, OnDisk | None] = {}
    contested: set[int] = set()
    for directory, members in by_dir.items():
        names, stale = _listing(directory)
        for t in members:
            name = t.output.name  # (the names beside it are this and a suffix)
            if name + _LOCK_SUFFIX in names:  # another export may be at it
                contested.add(id(t))
                found[id(t)] = None
            elif not stale and all(name + suffix not in names for suffix in _BESIDE):
                found[id(t)] = Fresh()  # nothing of it there: no file to look at
            else:
                found[id(t)] = _look_at(t, names, stale)
    return found, contested


#: The suffixes of what an export writes beside its output (the output itself, its manifest,
#: checkpoint and ranges), and of its lock: names a directory listing is searched for.
_BESIDE = ("", *(f(Path("x")).name[1:] for f in (manifest_path, checkpoint_path, parts_path)))
_LOCK_SUFFIX = lock_path(Path("x")).name[1:]


def _listing(directory: Path) -> tuple[set[str], dict[str, list[Path]]]:
    """The names in ``directory``, and its temporary files of interrupted writes by the name of
    the file each was for."""
    names: set[str] = set()
    stale: dict[str, list[Path]] = {}
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            names.add(entry.name)
            target = temporary_target(entry.name)
            if target is not None and entry.is_file(follow_symlinks=False):
                stale.setdefault(target, []).append(Path(entry.path))
    return names, stale


def _look_at(task: _Task, names: set[str], stale: dict[str, list[Path]]) -> OnDisk | None:
    out = task.output
    for name in (out.name, manifest_path(out).name):  # of killed runs: the directory is ours
        for path in stale.get(name, []):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    if all(out.name + suffix not in names for suffix in _BESIDE):
        return Fresh()
    if task.resolved is None or task.spec.options.format == "parquet":
        return None  # (a Parquet dataset's identity holds its column types: its worker reads them)
    with contextlib.suppress(FileNotFoundError):
        if out.stat().st_size > VERIFY_HERE_BYTES:
            return None
    t = task.resolved
    identity = task.spec.resolved(
        t.qualified, t.key, t.key_types, t.columns, output=task.output
    ).identity()
    try:
        return discover(out, identity)
    except (CopystreamError, OSError):
        return None  # refused: its worker says why


def _refuse_without_snapshot(tasks: Sequence[_Task], found: dict[int, OnDisk | None]) -> None:
    """Raise :class:`SnapshotRequired` when tables of the job were exported (wholly or in part)
    by an earlier run while others are still to do: they cannot share this run's snapshot."""
    earlier, todo = [], 0
    for t in tasks:
        if t.error is not None:
            continue
        state = found.get(id(t))
        if isinstance(state, Complete | Resume) or (state is None and _has_files(t.output)):
            earlier.append(t.table)
        if not isinstance(state, Complete):
            todo += 1
    if earlier and todo:
        more = f" and {len(earlier) - 3} more" if len(earlier) > 3 else ""
        names = ", ".join(earlier[:3]) + more
        raise SnapshotRequired(
            f"{len(earlier)} table(s) of this job ({names}) were exported by an earlier run, "
            "under a snapshot that ended with it: the others cannot be read at the same point "
            "in time"
        )


def _has_files(output: Path) -> bool:
    """Whether anything of an export is beside ``output`` (cheap: no file is read)."""
    if isinstance(output, S3Path):
        return True  # asked only of an output the listing showed something of
    names = (output, manifest_path(output), output.with_name(output.name + ".checkpoint.json"))
    parts = output.with_name(output.name + ".parts.json")
    return any(os.path.lexists(p) for p in (*names, parts))


def _short(t: _Task) -> bool:
    """Whether ``t`` is one COPY of a small table (its worker may be handed the next already)."""
    if isinstance(t.output, S3Path):
        return False  # an upload of its own
    return t.resolved is not None and is_small(t.resolved, t.spec, t.run)


def _task_args(t: _Task, job: _Job, found: OnDisk | None, contested: bool) -> tuple[Any, ...]:
    holder = job.snapshot_of(t)
    snapshot = holder.snapshot if holder is not None else None
    fresh = isinstance(found, Fresh)
    args = (t.entry.dsn or "", t.spec, str(t.output), t.run, t.resolved, snapshot)
    return (*args, fresh, contested)


class _Publisher:
    """Publishes groups of small tables' files (:func:`copystream.whole.publish`) in a thread of
    its own, one group at a time, while the coordinator goes on handing tables to workers."""

    def __init__(self, contested: set[int]) -> None:
        self.contested = contested  # tasks (ids) written under their output's lock
        self._ended: threading.Event | None = None  # set when the group in flight is published
        self._group: list[tuple[_Task, TableOutcome, Staged]] = []
        self._errors: list[CopystreamError | None] = []

    @property
    def busy(self) -> bool:
        """Whether a group is being published."""
        return self._ended is not None

    def start(self, group: list[tuple[_Task, TableOutcome, Staged]]) -> None:
        """Publish ``group`` (nothing else may be in flight)."""
        assert self._ended is None
        self._group = group
        self._ended = in_background(self._publish, "copystream-publish")

    def _publish(self) -> None:
        group = self._group
        errors: list[CopystreamError | None] = [None] * len(group)
        try:
            with contextlib.ExitStack() as locks:
                ready: list[int] = []
                for i, (task, _, _) in enumerate(group):
                    try:
                        if id(task) in self.contested:  # the others' directory is the job's
                            locks.enter_context(exclusive(task.output, job=True))
                        ready.append(i)
                    except CopystreamError as e:
                        errors[i] = e
                for i, error in zip(ready, publish([group[i][2] for i in ready]), strict=True):
                    errors[i] = error
        except Exception as e:  # a bug: each table of the group says so
            failed = ExportFailed(f"publishing the file failed: {type(e).__name__}: {e}")
            errors = [failed] * len(group)
        for (_, _, staged), error in zip(group, errors, strict=True):
            if error is not None:
                staged.discard()
        self._errors = errors

    def finished(self, *, wait: bool) -> list[tuple[_Task, TableOutcome, CopystreamError | None]]:
        """The group just published, with each table's error (if it failed); ``[]`` while it
        is under way (``wait``: wait for it) or when there is none."""
        if self._ended is None or not (wait or self._ended.is_set()):
            return []
        self._ended.wait()
        self._ended = None
        done = [(t, o, e) for (t, o, _), e in zip(self._group, self._errors, strict=True)]
        self._group, self._errors = [], []
        return done


class _Execution:
    """The tasks of a job running in the worker pool, and what is known of each so far."""

    def __init__(self, job: _Job, report: _Report) -> None:
        self.job, self.report = job, report
        self.outcomes: list[TableOutcome] = []
        self.live: dict[int, Progress] = {}  # index -> latest progress of a running table
        self.begun: dict[int, float] = {}
        self.todo_rows = 0  # estimated rows of the tables not started yet
        self.rows = self.bytes = 0  # of the finished tables (published or not)
        self.tables = 0
        self.base_rows = self.base_bytes = 0  # of finished tables: on disk before this run
        self.pending: list[tuple[_Task, TableOutcome, Staged]] = []  # to publish
        self.pending_since = 0.0
        self.contested: set[int] = set()
        self.publisher = _Publisher(self.contested)
        # The report is first written at the pool's first event, once the workers have their
        # first tables (making it, for a thousand tables, takes ~40 ms they need not wait for).
        self.dirty = True
        self.written_at = 0.0
        self.restarted: dict[int, int] = {}  # index -> times started again (its worker died)

    def record(self, task: _Task, outcome: TableOutcome) -> None:
        """Keep ``outcome`` (secrets masked, its snapshot named); the report follows."""
        if outcome.errors:
            masked = tuple(redact(e, *self.job.secrets) for e in outcome.errors)
            outcome = replace(outcome, errors=masked)
        if outcome.status == "done" and outcome.point_in_time:
            outcome = replace(outcome, snapshot=self.job.label(task))
        elif outcome.status == "skipped" and outcome.point_in_time:
            outcome = replace(outcome, snapshot=self.report.earlier_snapshot(task))
        self.outcomes.append(outcome)
        self.report.set(task, outcome)
        self.dirty = True
        self.rows += outcome.rows
        self.bytes += outcome.bytes
        if outcome.status == "skipped":
            self.base_rows += outcome.rows
            self.base_bytes += outcome.bytes
        if not outcome.ok:
            log.debug("%s failed: %s", task.table, "; ".join(outcome.errors))

    def ended(self, task: _Task, index: int, event: Event) -> None:
        """A table's worker reported its outcome (or died)."""
        last = self.live.pop(index, None)
        if event.kind == "done":
            done: TableDone = event.value
            outcome = _from_result(task, done.result)
            if index in self.restarted:  # each death of its worker counts as a retry
                outcome = replace(outcome, retries=outcome.retries + self.restarted[index])
            if outcome.status == "done" and last is not None:
                self.base_rows += last.start_rows
                self.base_bytes += last.start_bytes
            staged = done.staged(task.output)
            if staged is not None:  # a small table: recorded once published
                if not self.pending:
                    self.pending_since = time.monotonic()
                self.pending.append((task, outcome, staged))
                self.rows += outcome.rows  # counted now, taken back when recorded
                self.bytes += outcome.bytes
                return
        else:
            error = event.value
            why = error.worded("plan") if isinstance(error, CopystreamError) else str(error)
            if why.startswith("the worker process "):
                why = f"the worker process exporting it {why[len('the worker process ') :]}"
            seconds = time.monotonic() - self.begun.get(index, self.job.started)
            outcome = _outcome(task, "failed", errors=(why,), seconds=seconds)
        self.record(task, outcome)

    def publish(self, *, now: bool = False) -> None:
        """Record the group the publisher finished, and hand it the small tables waiting when
        there are enough or they waited long enough (``now``: publish everything, and wait)."""
        while True:
            for task, outcome, error in self.publisher.finished(wait=now):
                self.rows -= outcome.rows
                self.bytes -= outcome.bytes
                if error is not None:
                    why = (error.worded("plan"),)
                    outcome = replace(outcome, status="failed", errors=why, rows=0, bytes=0)
                self.record(task, outcome)
            if not self.pending or self.publisher.busy:
                if now and (self.pending or self.publisher.busy):
                    continue
                return
            due = time.monotonic() - self.pending_since >= PUBLISH_DELAY
            if not (now or due or len(self.pending) >= PUBLISH_GROUP):
                return
            group, self.pending = self.pending, []
            self.publisher.start(group)
            if not now:
                return

    def write_report(self, *, now: bool = False) -> None:
        """Rewrite the report if something changed and it was not rewritten just now."""
        if self.dirty and (now or time.monotonic() - self.written_at >= REPORT_INTERVAL):
            elapsed = time.monotonic() - self.job.started
            self.report.write(finished=False, warnings=self.job.warnings, seconds=elapsed)
            self.dirty, self.written_at = False, time.monotonic()

    def emit(self, done: bool = False) -> None:
        """Tell the caller's progress callback where the job stands."""
        if self.job.progress is None:
            return
        live = list(self.live.values())
        estimate = self.rows + sum(max(p.estimated_rows or 0, p.rows) for p in live)
        self.job.progress(
            BulkProgress(
                tables=self.tables,
                outcomes=tuple(self.outcomes),
                running=tuple(live),
                rows=self.rows + sum(p.rows for p in live),
                bytes=self.bytes + sum(p.bytes for p in live),
                start_rows=self.base_rows + sum(p.start_rows for p in live),
                start_bytes=self.base_bytes + sum(p.start_bytes for p in live),
                estimated_rows=(estimate + self.todo_rows) or None,
                elapsed=time.monotonic() - self.job.started,
                done=done,
            )
        )


def _execute(
    ordered: Sequence[_Task],
    seen: tuple[dict[int, OnDisk | None], set[int]],
    job: _Job,
    report: _Report,
) -> tuple[list[TableOutcome], JobSnapshot | None]:
    """Record the tables that need no worker, run the others in the pool ``jobs`` at a time,
    recording each outcome as it comes; the outcomes, and what the job's snapshot gave.
    ``seen``: what :func:`_look` found."""
    found, contested = seen
    ex = _Execution(job, report)
    ex.contested.update(contested)
    ex.tables = len(ordered)
    runnable = []
    for t in ordered:  # tables that cannot run (missing, no key, no server) take no worker
        state = found.get(id(t))
        if t.error is not None:
            ex.record(t, _outcome(t, "failed", errors=(t.error,)))
        elif isinstance(state, Complete) and not t.run.incremental:  # else: an increment
            ex.record(t, _from_manifest(t, state.manifest, 0.0))
        else:
            runnable.append(t)
    ex.todo_rows = sum(t.estimated_rows or 0 for t in runnable)
    try:
        _run(runnable, job, ex, found)
        ex.publish(now=True)
    except BaseException:
        with contextlib.suppress(Exception):
            ex.publish(now=True)  # finished tables need not be exported again
        for index in list(ex.live):
            task = runnable[index]
            report.set(task, _outcome(task, "failed", errors=("interrupted",)))
        with contextlib.suppress(Exception):
            ex.dirty = True
            ex.write_report(now=True)
        raise
    ex.emit(done=True)
    snapshot = job_snapshot(ex.outcomes, job.taken()) if job.consistent else None
    return ex.outcomes, snapshot


def _run(
    runnable: Sequence[_Task], job: _Job, ex: _Execution, found: dict[int, OnDisk | None]
) -> None:
    """The pool's events, as the job's outcomes, progress and report."""
    tasks = [
        Task(
            export_s3_task if isinstance(t.output, S3Path) else export_task,
            _task_args(t, job, found.get(id(t)), id(t) in ex.contested),
            short=_short(t),
        )
        for t in runnable
    ]
    last_emit = 0.0
    restarts = _Restarts(runnable)
    ex.restarted = restarts.count
    for event in run_tasks(tasks, job.jobs, restart=restarts):
        task = runnable[event.index] if event.index >= 0 else None
        if event.kind == "restarting" and task is not None:
            ex.live.pop(event.index, None)
            ex.todo_rows += task.estimated_rows or 0  # taken off again as it starts
        elif event.kind == "started" and task is not None:
            ex.todo_rows -= task.estimated_rows or 0
            ex.begun[event.index] = time.monotonic()
            ex.live[event.index] = Progress(task.table, 0, 0, task.estimated_rows, 0.0, 0)
            log.debug("%s: started in process %s", task.table, event.value)
        elif event.kind == "progress":
            ex.live[event.index] = event.value
        elif event.kind == "log":
            level, message = event.value
            log.log(level, "%s", redact(message, *job.secrets))
        elif event.kind in ("done", "failed") and task is not None:
            ex.ended(task, event.index, event)
        ex.publish()
        ex.write_report()
        if event.kind != "progress" or time.monotonic() - last_emit >= 0.25:
            last_emit = time.monotonic()
            ex.emit()


class _Restarts:
    """Whether to start a table again whose worker process died under it: the pool's
    ``restart`` decision (see :data:`WORKER_RESTARTS`). The tables handed to that worker ahead
    go to another worker by themselves."""

    def __init__(self, runnable: Sequence[_Task]) -> None:
        self.runnable = runnable
        self.count: dict[int, int] = {}

    def __call__(self, index: int, error: ExportFailed) -> float | None:
        done = self.count.get(index, 0)
        if done >= WORKER_RESTARTS:
            return None
        self.count[index] = done + 1
        task = self.runnable[index]
        # What it was writing is nobody's now: the new worker starts from its checkpoint, or
        # from the start (a small table's temporary file is written anew).
        if not isinstance(task.output, S3Path):  # an upload resumes from its checkpoint object
            for path in (task.output, checkpoint_path(task.output), manifest_path(task.output)):
                remove_stale_temporaries(path)
        log.warning("%s: %s; it is started again in a new worker", task.table, error.problem)
        return RESTART_DELAY


def _dry_run(
    t: _Task, secrets: Sequence[str], found: dict[int, OnDisk | None] | None = None
) -> TableOutcome:
    """What would happen to one table (planned already; no file is touched)."""
    if t.error is not None:
        return _outcome(t, "refused", errors=(redact(t.error, *secrets),))
    if t.resolved is None:
        return _outcome(t, "refused", errors=("not planned: see the warnings",))
    p = t.resolved
    if found is not None:  # in a bucket (:func:`.s3.look`)
        note, refused = _bucket_state(found.get(id(t))), False
    else:
        note, refused = _file_state(t.output, incremental=t.run.incremental)
    return replace(
        _outcome(t, "refused" if refused else "ready", errors=(note,) if refused else ()),
        key=p.key,
        key_source=_key_source(p.key_source),
        estimated_rows=p.estimated_rows,
        estimated_bytes=p.estimated_bytes,
        warnings=p.warnings,
        note=note,
    )


def _bucket_state(found: OnDisk | None) -> str:
    """What the objects of an S3 output say about its export."""
    if isinstance(found, Fresh):
        return "new"
    if isinstance(found, Complete):
        return "finished (skipped)"
    return "resumes, or is re-verified, from its objects"


def _file_state(output: Path, *, incremental: bool = False) -> tuple[str, bool]:
    """What the files beside ``output`` say about its export, and whether it would be refused
    (``incremental``: a finished one is appended to, not skipped)."""
    try:
        found = discover(output)
    except CopystreamError as e:
        return e.worded("plan"), True
    if isinstance(found, Resume):
        rows = found.checkpoint.rows if found.checkpoint is not None else 0
        return (f"resumes after {rows:,} rows" if rows else "resumes"), False
    if isinstance(found, Complete) and incremental:
        return "finished; the rows after its last key will be appended", False
    if isinstance(found, Complete):
        return "finished (re-verified; skipped if unchanged)", False
    if isinstance(found, Occupied):
        return f"{output} exists and has no checkpoint to resume from", True
    return "new", False
