"""What a bulk job's worker process runs for one table: :func:`export_task`.

A worker runs many tables in a row (see :mod:`copystream.pool`). It exports each table the job's
coordinator resolved already (no catalog query of its own), reading the job's snapshot when
there is one. A small table is exported with one COPY on the connection the worker keeps open
from one small table to the next (re-established when it was lost), into a temporary file that
the coordinator publishes together with others (:func:`copystream.whole.publish`); every other
table goes through the whole pipeline, as ``copystream export`` would run it.
"""

from __future__ import annotations

import atexit
import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from ..connection import Target, connect
from ..export import ExportResult, run_session
from ..pipeline import ExportSession, check_output
from ..spec import ExportSpec, RunOptions
from ..table import ResolvedTable
from ..whole import Written, is_small

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


@dataclass(frozen=True)
class TableDone:
    """A worker's outcome for one table: the result, and a small table's file for the
    coordinator to publish (``None``: the export is complete and in place)."""

    result: ExportResult
    written: Written | None = None


def export_task(
    conninfo: str,
    spec: ExportSpec,
    output: str,
    run: RunOptions,
    table: ResolvedTable | None = None,
    snapshot: str | None = None,
    *,
    progress: Any,
) -> TableDone:
    """Export one table of a bulk job (``table``: as the coordinator resolved it; ``snapshot``:
    the job's, to read from). A small table's file is left for the coordinator to publish."""
    started = time.monotonic()
    out = Path(output)
    check_output(out)
    small = table is not None and is_small(table, run)
    lent = _kept(conninfo) if small else None
    # The output's lock only if it is not a small table's temporary files: the coordinator
    # publishes those under the lock.
    with ExportSession(
        conninfo or None, spec, out, run, time.sleep,
        table=table, conn=lent, snapshot=snapshot, lock_late=small,
    ) as session:  # fmt: skip
        # The coordinator removed stale temporary files of the whole output directory at once.
        exported = run_session(
            session, progress=progress, sleep=time.sleep, started=started, tidy=False
        )
    # The chunk records stay in the manifest: a huge table's would only weigh on the pipe.
    return TableDone(replace(exported.result, chunks=()), exported.written)
