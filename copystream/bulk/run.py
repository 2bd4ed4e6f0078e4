"""Running a bulk job: :func:`run_bulk` resolves the plan, takes the output directory's lock,
runs the tables in worker processes ``jobs`` at a time and records each outcome (or, in a dry
run, says what would happen)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from .._atomic import locked, remove_stale_temporaries
from ..catalog import introspect
from ..checkpoint import checkpoint_path
from ..connection import Target, connect, connect_error, redact
from ..errors import CopystreamError, UsageError
from ..export import ExportResult, run_export
from ..manifest import manifest_path
from ..pool import Event, Task, run_tasks
from ..progress import Progress
from ..ranges import parts_path
from ..spec import ExportSpec, RunOptions
from ..state import Complete, Occupied, Resume, discover
from .outcome import (
    BulkProgress,
    BulkResult,
    TableOutcome,
    _from_result,
    _key_source,
    _outcome,
)
from .plan import BulkPlan, load_plan
from .report import _Report
from .resolve import _resolve_on_servers, _select_only, _Task, order_largest_first

log = logging.getLogger("copystream")

_LOCK_NAME = ".copystream-bulk.lock"


@contextlib.contextmanager
def _job_lock(directory: Path) -> Iterator[None]:
    """One bulk job per output directory at a time."""
    busy = f"another copystream bulk job is running with output directory {directory}"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(locked(directory / _LOCK_NAME, busy))
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
) -> BulkResult:
    """Export every table of ``plan`` (a :class:`BulkPlan` or the path of a plan file).

    Patterns are resolved on the server, the tables ordered largest first (by the planner's
    size estimates), and each exported by :func:`copystream.export_table` in a worker process of
    its own, ``jobs`` at a time. One table's failure does not stop the others. Calling it again
    resumes: finished tables that still verify are skipped, unfinished ones resume from their
    checkpoints, failed ones are tried again. ``copystream-report.json`` in the output directory
    is rewritten atomically as each table finishes.

    ``only``: names or patterns; just the plan's tables matching one of them run (a name that
    matches none raises :class:`UsageError`). ``dry_run``: resolve the plan and say, per table,
    its key and where it came from, its estimated size, its output and whether it would be
    refused; nothing is written. ``progress``: called with a :class:`BulkProgress` a few times a
    second and whenever a table starts or finishes.

    Raises :class:`PlanError` for an invalid plan and :class:`UsageError` when no server of the
    plan can be reached (nothing is written then); a failed table is reported in the result
    (``result.failed``, ``result.exit_code``), not raised.
    """
    started = time.monotonic()
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    bulk = plan if isinstance(plan, BulkPlan) else load_plan(plan)
    secrets = bulk.secrets
    resolution = _resolve_on_servers(bulk)
    tasks = list(resolution.tasks)
    selected = _select_only(tasks, only) if only else tasks
    ordered = order_largest_first(selected)
    warnings = tuple(redact(w, *secrets) for w in resolution.warnings)
    for w in warnings:
        log.warning("%s", w)
    if dry_run:
        outcomes = _dry_run(ordered, secrets)
        return BulkResult(
            bulk.path, tuple(outcomes), warnings, time.monotonic() - started, True, jobs, None
        )
    try:
        bulk.output_dir.mkdir(parents=True, exist_ok=True)
        for t in ordered:
            if t.error is None:
                t.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory: {e}") from e
    with _job_lock(bulk.output_dir):
        remove_stale_temporaries(bulk.report_path)
        report = _Report(bulk, tasks, ordered, jobs)
        report.write(finished=False, warnings=warnings, seconds=0.0)
        outcomes = _execute(ordered, jobs, report, warnings, secrets, progress, started)
        report.write(finished=True, warnings=warnings, seconds=time.monotonic() - started)
    return BulkResult(
        bulk.path,
        tuple(outcomes),
        warnings,
        time.monotonic() - started,
        False,
        jobs,
        bulk.report_path,
    )


def export_task(
    conninfo: str, spec: ExportSpec, output: str, run: RunOptions, *, progress: Any
) -> ExportResult:
    """One table of a bulk job, as a worker process runs it (see :mod:`copystream.pool`).

    A table with ``incremental = true`` is exported in full the first time (nothing is beside
    its output yet), and by increments appended to it on every later run."""
    if run.incremental and not _begun(Path(output)):
        run = replace(run, incremental=False)
    result = run_export(conninfo or None, spec, output, run, progress=progress)
    # The chunk records stay in the manifest: a huge table's would only weigh on the pipe.
    return replace(result, chunks=())


def _begun(output: Path) -> bool:
    """Whether an export to ``output`` has begun or finished (anything copystream keeps)."""
    kept = (manifest_path(output), checkpoint_path(output), parts_path(output), output)
    return any(os.path.lexists(p) for p in kept)


def _task_args(t: _Task) -> tuple[Any, ...]:
    return (t.entry.dsn or "", t.entry.spec_for(t.table), str(t.output), t.entry.run)


class _Execution:
    """The tasks of a job running in the worker pool, and what is known of each so far."""

    def __init__(
        self,
        report: _Report,
        warnings: Sequence[str],
        secrets: Sequence[str],
        progress: Callable[[BulkProgress], None] | None,
        started: float,
    ) -> None:
        self.report, self.warnings, self.secrets = report, warnings, secrets
        self.progress, self.started = progress, started
        self.outcomes: list[TableOutcome] = []
        self.live: dict[int, Progress] = {}  # index -> latest progress of a running table
        self.begun: dict[int, float] = {}
        self.todo: list[_Task] = []
        self.tables = 0
        self.base_rows = self.base_bytes = 0  # of finished tables: on disk before this run

    def record(self, task: _Task, outcome: TableOutcome) -> None:
        """Keep ``outcome`` (secrets masked) and rewrite the report."""
        outcome = replace(outcome, errors=tuple(redact(e, *self.secrets) for e in outcome.errors))
        self.outcomes.append(outcome)
        self.report.set(task, outcome)
        elapsed = time.monotonic() - self.started
        self.report.write(finished=False, warnings=self.warnings, seconds=elapsed)
        if not outcome.ok:
            log.debug("%s failed: %s", task.table, "; ".join(outcome.errors))

    def ended(self, task: _Task, index: int, event: Event) -> None:
        """A table's worker reported its outcome (or died)."""
        last = self.live.pop(index, None)
        if event.kind == "done":
            outcome = _from_result(task, event.value)
            if outcome.status == "skipped":
                self.base_rows += outcome.rows
                self.base_bytes += outcome.bytes
            elif last is not None:
                self.base_rows += last.start_rows
                self.base_bytes += last.start_bytes
        else:
            error = event.value
            why = error.worded("plan") if isinstance(error, CopystreamError) else str(error)
            if why.startswith("the worker process "):
                why = f"the worker process exporting it {why[len('the worker process '):]}"
            seconds = time.monotonic() - self.begun.get(index, self.started)
            outcome = _outcome(task, "failed", errors=(why,), seconds=seconds)
        self.record(task, outcome)

    def emit(self, done: bool = False) -> None:
        """Tell the caller's progress callback where the job stands."""
        if self.progress is None:
            return
        rows = sum(o.rows for o in self.outcomes)
        nbytes = sum(o.bytes for o in self.outcomes)
        live = list(self.live.values())
        estimate = rows + sum(max(p.estimated_rows or 0, p.rows) for p in live)
        estimate += sum(t.estimated_rows or 0 for t in self.todo)
        self.progress(
            BulkProgress(
                tables=self.tables,
                outcomes=tuple(self.outcomes),
                running=tuple(live),
                rows=rows + sum(p.rows for p in live),
                bytes=nbytes + sum(p.bytes for p in live),
                start_rows=self.base_rows + sum(p.start_rows for p in live),
                start_bytes=self.base_bytes + sum(p.start_bytes for p in live),
                estimated_rows=estimate or None,
                elapsed=time.monotonic() - self.started,
                done=done,
            )
        )


def _execute(
    ordered: Sequence[_Task],
    jobs: int,
    report: _Report,
    warnings: Sequence[str],
    secrets: Sequence[str],
    progress: Callable[[BulkProgress], None] | None,
    started: float,
) -> list[TableOutcome]:
    """Run the tasks in the worker pool, ``jobs`` at a time; record each outcome as it comes."""
    ex = _Execution(report, warnings, secrets, progress, started)
    ex.tables = len(ordered)
    for t in ordered:  # tables that cannot run (missing, no server) take no worker
        if t.error is not None:
            ex.record(t, _outcome(t, "failed", errors=(t.error,)))
    runnable = [t for t in ordered if t.error is None]
    ex.todo = list(runnable)
    tasks = [Task(export_task, _task_args(t)) for t in runnable]
    last_emit = 0.0
    try:
        for event in run_tasks(tasks, jobs):
            task = runnable[event.index] if event.index >= 0 else None
            if event.kind == "started" and task is not None:
                ex.todo.remove(task)
                ex.begun[event.index] = time.monotonic()
                ex.live[event.index] = Progress(task.table, 0, 0, task.estimated_rows, 0.0, 0)
                log.debug("%s: started in process %s", task.table, event.value)
            elif event.kind == "progress":
                ex.live[event.index] = event.value
            elif event.kind == "log":
                level, message = event.value
                log.log(level, "%s", redact(message, *secrets))
            elif event.kind in ("done", "failed") and task is not None:
                ex.ended(task, event.index, event)
            if event.kind != "progress" or time.monotonic() - last_emit >= 0.25:
                last_emit = time.monotonic()
                ex.emit()
    except BaseException:
        for index in list(ex.live):
            task = runnable[index]
            report.set(task, _outcome(task, "failed", errors=("interrupted",)))
        with contextlib.suppress(Exception):
            report.write(finished=False, warnings=warnings, seconds=time.monotonic() - started)
        raise
    ex.emit(done=True)
    return ex.outcomes


def _dry_run(tasks: Sequence[_Task], secrets: Sequence[str]) -> list[TableOutcome]:
    """Plan each table on its server (no file is touched) and say what would happen."""
    conns: dict[str, psycopg.Connection[Any] | str] = {}
    out: list[TableOutcome] = []
    try:
        for t in tasks:
            if t.error is not None:
                out.append(_outcome(t, "refused", errors=(redact(t.error, *secrets),)))
                continue
            dsn = t.entry.dsn or ""
            conn = conns.get(dsn)
            if conn is None:
                target = Target(dsn)
                try:
                    conn = connect(target)
                except psycopg.Error as e:
                    conn = redact(str(connect_error(e, target)), *secrets)
                conns[dsn] = conn
            if isinstance(conn, str):
                out.append(_outcome(t, "refused", errors=(conn,)))
                continue
            try:
                spec = t.entry.spec
                p = introspect(conn, t.table, key=spec.key, columns=spec.columns, where=spec.where)
            except (CopystreamError, psycopg.Error) as e:
                text = e.worded("plan") if isinstance(e, CopystreamError) else str(e)
                why = redact(text.strip().split("\n")[0], *secrets)
                out.append(_outcome(t, "refused", errors=(why,)))
                continue
            note, refused = _file_state(t.output)
            out.append(
                replace(
                    _outcome(
                        t, "refused" if refused else "ready", errors=(note,) if refused else ()
                    ),
                    key=p.key,
                    key_source=_key_source(p.key_source),
                    estimated_rows=p.estimated_rows,
                    estimated_bytes=p.estimated_bytes,
                    warnings=p.warnings,
                    note=note,
                )
            )
    finally:
        for c in conns.values():
            if not isinstance(c, str):
                c.close()
    return out


def _file_state(output: Path) -> tuple[str, bool]:
    """What the files beside ``output`` say about its export, and whether it would be refused."""
    try:
        found = discover(output)
    except CopystreamError as e:
        return e.worded("plan"), True
    if isinstance(found, Resume):
        rows = found.checkpoint.rows if found.checkpoint is not None else 0
        return (f"resumes after {rows:,} rows" if rows else "resumes"), False
    if isinstance(found, Complete):
        return "finished (re-verified; skipped if unchanged)", False
    if isinstance(found, Occupied):
        return f"{output} exists and has no checkpoint to resume from", True
    return "new", False
