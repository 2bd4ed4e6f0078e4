"""Running a bulk job: :func:`run_bulk` resolves the plan, takes the output directory's lock,
runs the tables in worker processes ``jobs`` at a time and records each outcome (or, in a dry
run, says what would happen)."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from .._atomic import remove_stale_temporaries
from ..checkpoint import checkpoint_path
from ..connection import Target, connect, connect_error, redact
from ..errors import CopystreamError, UsageError
from ..manifest import manifest_path
from ..plan import introspect
from .outcome import (
    BulkProgress,
    BulkResult,
    TableOutcome,
    _from_result,
    _in_plan_terms,
    _key_source,
    _outcome,
)
from .plan import BulkPlan, load_plan
from .report import _Report
from .resolve import _resolve_on_servers, _select_only, _Task, order_largest_first
from .worker import _died, _Running, _stop

log = logging.getLogger("copystream")

_LOCK_NAME = ".copystream-bulk.lock"


@contextlib.contextmanager
def _job_lock(directory: Path) -> Iterator[None]:
    """One bulk job per output directory at a time."""
    path = directory / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise UsageError(f"cannot write in the output directory {directory}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(
                f"another copystream bulk job is running with output directory {directory}"
            ) from e
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


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


def _execute(
    ordered: Sequence[_Task],
    jobs: int,
    report: _Report,
    warnings: Sequence[str],
    secrets: Sequence[str],
    progress: Callable[[BulkProgress], None] | None,
    started: float,
) -> list[TableOutcome]:
    """Run the tasks, ``jobs`` processes at a time; record each outcome as it comes."""
    events: queue.Queue[tuple[int, str]] = queue.Queue()
    counter = itertools.count()
    # Tables that cannot run (missing, no server) are reported first: they take no worker.
    todo = [t for t in ordered if t.error is not None] + [t for t in ordered if t.error is None]
    running: dict[int, _Running] = {}
    outcomes: list[TableOutcome] = []
    base_rows = base_bytes = 0  # of finished tables: what was on disk before this run
    last_report = 0.0

    def finish(task: _Task, outcome: TableOutcome) -> None:
        outcome = replace(
            outcome,
            errors=tuple(_in_plan_terms(redact(e, *secrets)) for e in outcome.errors),
            warnings=tuple(_in_plan_terms(w) for w in outcome.warnings),
        )
        outcomes.append(outcome)
        report.set(task, outcome)
        report.write(finished=False, warnings=warnings, seconds=time.monotonic() - started)
        if not outcome.ok:
            log.debug("%s failed: %s", task.table, "; ".join(outcome.errors))

    def emit(done: bool = False) -> None:
        if progress is None:
            return
        finished_rows = sum(o.rows for o in outcomes)
        finished_bytes = sum(o.bytes for o in outcomes)
        live = [r.progress for r in running.values()]
        estimate = finished_rows + sum(max(p.estimated_rows or 0, p.rows) for p in live)
        estimate += sum(t.estimated_rows or 0 for t in todo)
        progress(
            BulkProgress(
                tables=len(ordered),
                outcomes=tuple(outcomes),
                running=tuple(live),
                rows=finished_rows + sum(p.rows for p in live),
                bytes=finished_bytes + sum(p.bytes for p in live),
                start_rows=base_rows + sum(p.start_rows for p in live),
                start_bytes=base_bytes + sum(p.start_bytes for p in live),
                estimated_rows=estimate or None,
                elapsed=time.monotonic() - started,
                done=done,
            )
        )

    try:
        while todo or running:
            changed = False
            while todo and len(running) < jobs:
                task = todo.pop(0)
                changed = True
                if task.error is not None:
                    finish(task, _outcome(task, "failed", errors=(task.error,)))
                    continue
                index = next(counter)
                running[index] = _Running(task, index, events)
            if changed:
                emit()
            try:
                index, line = events.get(timeout=0.25)
            except queue.Empty:
                index, line = -1, ""
            while index in running:
                r = running[index]
                if line != "EOF":
                    r.handle(line, secrets)
                else:
                    code = r.proc.wait()
                    del running[index]
                    if r.result is not None:
                        outcome = _from_result(r.task, r.result)
                        if outcome.status == "skipped":
                            base_rows += outcome.rows
                            base_bytes += outcome.bytes
                        else:
                            base_rows += r.progress.start_rows
                            base_bytes += r.progress.start_bytes
                    else:
                        outcome = _outcome(
                            r.task,
                            "failed",
                            errors=(r.error or _died(code),),
                            seconds=time.monotonic() - r.started,
                        )
                    finish(r.task, outcome)
                    changed = True
                try:
                    index, line = events.get_nowait()
                except queue.Empty:
                    break
            now = time.monotonic()
            if changed or now - last_report >= 0.25:
                last_report = now
                emit()
    except BaseException:
        _stop(list(running.values()))
        for r in running.values():
            report.set(r.task, _outcome(r.task, "failed", errors=("interrupted",)))
        with contextlib.suppress(Exception):
            report.write(finished=False, warnings=warnings, seconds=time.monotonic() - started)
        raise
    emit(done=True)
    return outcomes


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
                p = introspect(
                    conn,
                    t.table,
                    key=list(t.entry.key) if t.entry.key else None,
                    columns=list(t.entry.columns) if t.entry.columns else None,
                    where=t.entry.where,
                )
            except (CopystreamError, psycopg.Error) as e:
                why = _in_plan_terms(redact(str(e).strip().split("\n")[0], *secrets))
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
                    warnings=tuple(_in_plan_terms(w) for w in p.warnings),
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
    cp = checkpoint_path(output)
    parts = output.with_name(output.name + ".parts.json")
    if cp.exists() or parts.exists():
        try:
            rows = int(json.loads(cp.read_bytes()).get("rows", 0)) if cp.exists() else 0
        except (OSError, ValueError, TypeError, AttributeError):
            rows = 0
        return (f"resumes after {rows:,} rows" if rows else "resumes"), False
    if manifest_path(output).exists():
        return "finished (re-verified; skipped if unchanged)", False
    if os.path.lexists(output):
        return f"{output} exists and has no checkpoint to resume from", True
    return "new", False
