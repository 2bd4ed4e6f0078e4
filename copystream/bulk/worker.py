"""What a bulk job's worker process runs for one table: :func:`export_task`.

A worker runs many tables in a row (see :mod:`copystream.pool`). It exports each table the job's
coordinator resolved already (no catalog query of its own), reading the job's snapshot when
there is one. A small table is exported with one COPY on the connection the worker keeps open
from one small table to the next (re-established when it was lost), into a temporary file that
the coordinator publishes together with others (:func:`copystream.whole.publish`); every other
table goes through the whole pipeline, as ``copystream export`` would run it.

A small table the coordinator found fresh (nothing of it on disk, no other process at its
output; not an increment, nor measured for metrics) takes a direct path: one attempt on the
open connection (:func:`copystream.pipeline.copy_small_once`), without the pipeline's session
machinery around it (~7% of a worker's instructions on a schema of small tables). Should that
attempt fail, the table goes through the whole pipeline, with its retries (the attempt counts
as one).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from ..chunk import SnapshotGone
from ..connection import Target, connect
from ..export import ExportResult, _result, run_session
from ..pipeline import ExportSession, check_output, copy_small_once, one_copy
from ..spec import ExportSpec, RunOptions
from ..state import Fresh
from ..table import ResolvedTable
from ..whole import Staged, is_small

log = logging.getLogger("copystream")

__all__ = ["TableDone", "export_task"]

#: The connections this worker keeps open, by connection string (see :func:`_kept`).
_KEPT: dict[str, psycopg.Connection[Any]] = {}


@atexit.register
def _close_kept() -> None:
    for conn in _KEPT.values():
        with contextlib.suppress(Exception):
            conn.close()
    _KEPT.clear()


def _kept(conninfo: str) -> psycopg.Connection[Any] | None:
    """The connection this worker keeps for ``conninfo``: the last one if it is still usable,
    else a new one; ``None`` when none can be opened now (the export then connects itself,
    with its retries)."""
    conn = _KEPT.get(conninfo)
    if conn is not None and not conn.closed and not conn.broken:
        return conn
    try:
        conn = connect(Target(conninfo))
    except psycopg.Error:
        _KEPT.pop(conninfo, None)
        return None
    _KEPT[conninfo] = conn
    return conn


def _drop_kept(conninfo: str) -> None:
    """Close the connection kept for ``conninfo``: an error may have left it mid-protocol."""
    conn = _KEPT.pop(conninfo, None)
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()


@dataclass(frozen=True)
class TableDone:
    """A worker's outcome for one table, compact on the pipe (no path: the coordinator knows
    the output): the result (``output`` as text, no chunk records), and a small table's staged
    file for the coordinator to publish (:meth:`staged`; ``None``: the export is complete and in
    place), as its temporary file's name beside the output and its manifest's JSON."""

    result: ExportResult
    temporary: str | None = None
    manifest: bytes = b""

    def staged(self, output: Path) -> Staged | None:
        """The small table's file to publish, ``output`` being the task's."""
        if self.temporary is None:
            return None
        return Staged(output, output.with_name(self.temporary), self.manifest)


def export_task(
    conninfo: str,
    spec: ExportSpec,
    output: str,
    run: RunOptions,
    table: ResolvedTable | None = None,
    snapshot: str | None = None,
    fresh: bool = False,
    contested: bool = False,
    *,
    progress: Any,
) -> TableDone:
    """Export one table of a bulk job (``table``: as the coordinator resolved it; ``snapshot``:
    the job's, to read from; ``fresh``: the coordinator found nothing of it on disk;
    ``contested``: another process held its output's lock when the job began). A small table's
    file is left for the coordinator to publish. A table with ``incremental = true`` found fresh
    is exported in full; found complete, by an increment appended to it."""
    started = time.monotonic()
    out = Path(output)
    check_output(out, directory=spec.options.format == "parquet")
    if run.incremental and fresh:  # ``incremental = true``: in full the first time
        run = replace(run, incremental=False)
    small = table is not None and is_small(table, spec, run)
    tried = 0  # the direct path's failed attempt, counted as a retry
    direct = fresh and not contested and not _measured(run)
    direct = direct and table is not None and one_copy(table, spec, run, Fresh())
    conn = _kept(conninfo) if direct else None
    if conn is not None and table is not None:
        try:
            return _small_direct(conn, spec, out, run, table, snapshot, started)
        except psycopg.Error as e:
            _drop_kept(conninfo)
            tried = 0 if isinstance(e, SnapshotGone) else 1  # the pipeline goes on without it
        except BaseException:
            _drop_kept(conninfo)
            raise
    lent = _kept(conninfo) if small else None
    # The output's lock only when more than a small table's temporary files are written (the
    # job owns the directory; the coordinator publishes them), or another process had it.
    with ExportSession(
        conninfo or None, spec, out, run, time.sleep,
        table=table, conn=lent, snapshot=snapshot, lock_late=small and not contested, job=True,
    ) as session:  # fmt: skip
        # The coordinator removed stale temporary files of the whole output directory at once.
        # A small table found fresh is not looked at again: only its temporary files are
        # written, and the coordinator publishes them only if nothing appeared meanwhile.
        known = Fresh() if fresh and small and not contested else None
        exported = run_session(
            session, progress=progress, sleep=time.sleep, started=started, tidy=False,
            known=known,
        )  # fmt: skip
    result = exported.result
    if tried:
        result = replace(result, retries=result.retries + tried)
    return _done(result, exported.written.staged if exported.written is not None else None)


def _measured(run: RunOptions) -> bool:
    """Whether the run writes metrics for each table (the pipeline's session does that)."""
    return run.metrics_file is not None or run.pushgateway is not None


def _small_direct(
    conn: psycopg.Connection[Any],
    spec: ExportSpec,
    out: Path,
    run: RunOptions,
    table: ResolvedTable,
    snapshot: str | None,
    started: float,
) -> TableDone:
    """A small table found fresh, in one attempt on the worker's open connection (see the
    module's docstring): what the pipeline would return for it, had it run it."""
    spec = spec.resolved(table.qualified, table.key, table.key_types, table.columns, output=out)
    pit = snapshot is not None or run.consistent
    written = copy_small_once(
        conn, table, spec, run, out,
        snapshot=snapshot, point_in_time=pit, started=started, on_data=None,
    )  # fmt: skip
    for w in table.warnings:  # (once: should the attempt fail, the pipeline says them)
        log.warning("%s", w)
    m = written.manifest
    result = _result(out, table, m, started, pit=m.point_in_time)
    return _done(result, written.staged)


def _done(result: ExportResult, staged: Staged | None) -> TableDone:
    """What goes back to the coordinator: the chunk records stay in the manifest (a huge
    table's would only weigh on the pipe); a small table's staged file, by name."""
    result = replace(result, chunks=(), output=str(result.output))
    if staged is None:
        return TableDone(result)
    return TableDone(result, staged.temporary.name, staged.manifest)
