"""The incremental stage of the export pipeline, between discover and start: what an
incremental export continues (an append, an increment after another export, a watermark one),
read from disk and the server, and its checkpoint saved beside the output before anything is
written. The decisions are :mod:`copystream.incremental`'s and :mod:`copystream.watermark`'s."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg

from . import incremental, watermark
from .checkpoint import Checkpoint, checkpoint_path, load_checkpoint, save_checkpoint
from .destinations import fresh_state
from .errors import UsageError
from .failures import translate
from .manifest import Manifest, load_manifest
from .pipeline import ExportSession, now_iso, overwrite, readable_manifest, sample_ranges
from .ranges import part_path, remove_parts, save_parts
from .settings import PINNED_SETTINGS, apply_settings_query, read_settings_query
from .sizing import first_chunk_rows
from .state import Complete, Occupied, OnDisk, Resume

__all__ = ["checkpoint_sizes", "continued", "continuing", "watermark_checkpoint"]

log = logging.getLogger("copystream")


def continuing(session: ExportSession) -> bool:
    """Whether the export continues another one (an increment of any kind)."""
    return incremental.continues(session.run, session.spec)


def continued(session: ExportSession, found: OnDisk) -> OnDisk:
    """``found`` as an incremental export sees it: the checkpoint of the increment, saved
    beside the output before anything is written (an unfinished export resumes as it is).
    Any other export's ``found`` is returned as it is."""
    if not continuing(session):
        return found
    if session.spec.watermark is not None:
        if session.run.workers > 1 and not isinstance(found, Complete):
            log.warning(
                "%s: a watermark export runs with one worker (a row updated meanwhile could "
                "leave a key range not yet read for one already read)",
                session.table.qualified,
            )
        return _watermark_export(session, found, session.spec.watermark)
    if session.run.since is not None:
        return _since(session, found, session.run.since)
    out, identity = session.output, session.spec.identity()
    if isinstance(found, Resume):
        return found
    if not isinstance(found, Complete) or not _same_size(out, found.manifest):
        raise incremental.refuse_append(out, readable_manifest(out), identity)
    destination = fresh_state(out, session.spec)
    if found.manifest.parquet is not None:  # new parts added to the dataset's
        destination = incremental.dataset_state(out, found.manifest, destination)
    sizes = checkpoint_sizes(session)
    cp = incremental.append_checkpoint(found.manifest, identity, destination, **sizes)
    if found.manifest.parquet is None or session.run.workers <= 1:
        return _begin(session, cp)
    return _begin(session, cp, incremental.increment_stem(out, found.manifest))


def _begin(session: ExportSession, cp: Checkpoint, stem: str = "part-") -> Resume:
    """Save the checkpoint ``cp`` of a new increment before anything is written: beside the
    output, or with ``workers`` as the first of the key ranges the rows after its last key
    are split into (it writes the output in place; :mod:`copystream.ranges`), the plan saved
    after it, so that a kill in between leaves the output as it was. ``stem``: how the part
    files of a Parquet dataset's ranges begin (an increment's sort after the dataset's)."""
    out, run = session.output, session.run
    if run.workers <= 1:
        save_checkpoint(out, cp)
        return Resume(cp, None)
    started_at = (cp.increment or {}).get("started_at", cp.started_at)
    plan = sample_ranges(session, run.workers, cp.settings, started_at, None, cp.last_key)
    plan = replace(plan, stem=stem)
    remove_parts(out)  # a plan of an increment never begun (killed before its first range)
    lo, hi = plan.ranges[0]
    export = {**cp.export, "range": [list(lo) if lo else None, list(hi) if hi else None]}
    first = replace(cp, export=export)
    if cp.destination.get("kind") == "parquet":  # each range names its own part files
        first = replace(first, destination={**cp.destination, "stem": f"{stem}0000-"})
    save_checkpoint(part_path(out, 0), first)
    save_parts(out, plan)
    return Resume(None, plan)


def _since(session: ExportSession, found: OnDisk, since: str) -> OnDisk:
    """The increment after the export ``since`` names, to a new output."""
    out, identity = session.output, session.spec.identity()
    previous, after = _previous(session, since)
    if isinstance(found, Resume):
        _check_resume(out, found, after)
        return found
    if isinstance(found, Complete):
        incremental.check_complete_since(found.manifest, after, out)
        return found
    if isinstance(found, Occupied):
        overwrite(session)
    cp = incremental.since_checkpoint(
        previous, after, identity, fresh_state(out, session.spec), **checkpoint_sizes(session)
    )
    return _begin(session, cp)


def _check_resume(out: Path, found: Resume, after: dict[str, Any]) -> None:
    """Refuse to resume an increment that does not follow ``after`` (of one worker, or of
    key ranges: their first range's checkpoint records what the increment follows)."""
    state = out if found.checkpoint is not None else part_path(out, 0)
    cp = found.checkpoint if found.checkpoint is not None else load_checkpoint(state)
    if cp is not None:
        incremental.check_resume(cp, after, checkpoint_path(state))


def _previous(session: ExportSession, since: str) -> tuple[Manifest, dict[str, Any]]:
    """The manifest ``since`` names, and what an increment after it records of it."""
    path, previous_output = incremental.since_manifest(since)
    previous = load_manifest(previous_output)
    if previous is None:
        raise UsageError(f"{path} does not exist: no export for the increment to follow")
    return previous, incremental.follows(previous, path, session.spec.identity(), session.output)


def _watermark_export(session: ExportSession, found: OnDisk, column: str) -> OnDisk:
    """A watermark export (after the one ``since`` names, if any), to a new output."""
    out, run = session.output, session.run
    previous, after = _previous(session, run.since) if run.since is not None else (None, None)
    if previous is not None:
        watermark.previous_mark(previous, column, run.watermark_lag)  # refused before anything
    if isinstance(found, Resume):
        if found.checkpoint is not None:
            incremental.check_resume(found.checkpoint, after, checkpoint_path(out))
        return found
    if isinstance(found, Complete):
        if after is not None:
            incremental.check_complete_since(found.manifest, after, out)
        return found
    if isinstance(found, Occupied):
        overwrite(session)
    cp = watermark_checkpoint(session, column, previous, after, fresh_state(out, session.spec))
    save_checkpoint(out, cp)
    return Resume(cp, None)


def watermark_checkpoint(
    session: ExportSession,
    column: str,
    previous: Manifest | None,
    after: dict[str, Any] | None,
    destination: dict[str, Any],
) -> Checkpoint:
    """The checkpoint of a new watermark export (after ``previous``, whose ``since`` record is
    ``after``; ``None``: a first one) to ``destination``: the session settings pinned (the
    previous export's), the server's clock and open transactions read, and for an increment
    its lower bound, first key and overlap (any output kind; :mod:`copystream.s3increment`)."""
    begin = None
    if previous is not None:
        begin = watermark.previous_mark(previous, column, session.run.watermark_lag)
    try:
        if previous is not None:
            settings = dict(previous.settings)
            session.query("pinning the session settings", apply_settings_query(settings))
        else:
            row = session.query("reading the session settings", read_settings_query())
            settings = dict(zip(PINNED_SETTINGS, (str(v) for v in row), strict=True))
        mark = _mark(session, column, begin, after)
    except psycopg.Error as e:
        raise translate(e, session.phase, why="preparing the export failed", transient=False) from e
    return incremental.watermark_checkpoint(
        session.spec.identity(), settings, destination, mark, after, **checkpoint_sizes(session)
    )


def _mark(
    session: ExportSession,
    column: str,
    begin: tuple[str | None, float] | None,
    after: dict[str, Any] | None,
) -> dict[str, Any]:
    """Read the server's clock and oldest open transaction (before any chunk), and for an
    increment the key it starts after and its overlap with the previous export."""
    kind = watermark.kind(session.table.key_types[0]) or "timestamptz"
    q = watermark.measure_query(session.table)
    measured = session.query("reading the transactions in progress", q)
    _warn_unmeasured(session, kind, measured)
    if begin is None or after is None:
        return watermark.mark(column, measured, None, None, 0, kind_=kind)
    started, lag = begin
    lower = key = None  # a counter with no row before: every row
    if started is not None:
        q = watermark.lower_bound_query(kind, started, lag)
        lower = str(session.query("computing the lower bound", q)[0])
        key = session.query("finding the first row", watermark.after_query(session.table, lower))[0]
    overlap = 0
    if after["last_key"] is not None:
        q = watermark.overlap_query(session.table, key, after["last_key"])
        overlap = int(session.query("counting the overlap", q)[0])
    return watermark.mark(column, measured, lower, key, overlap, kind_=kind)


def _warn_unmeasured(session: ExportSession, kind: str, measured: Any) -> None:
    """Warn of open transactions the next increment's safety lag will not cover: those of
    sessions hidden from this role, and for a counter (no clock to take a lag from) any."""
    if session.run.watermark_lag is not None:
        return
    name = session.table.qualified
    if measured[2]:
        log.warning(
            "%s: %d sessions of other roles are hidden from this role in pg_stat_activity: "
            "their open transactions do not count in the safety lag of the next increment "
            "(grant pg_read_all_stats, or give the lag)", name, measured[2],
        )  # fmt: skip
    if kind in watermark.COUNTER and float(measured[1]) > 0:
        log.warning(
            "%s: a transaction was open for %.1fs as the export started: a counter watermark "
            "has no clock to measure a safety lag by, so a row it commits with a value below "
            "%s is in no increment unless the next one's lag (in the column's units) covers it",
            name, float(measured[1]), measured[3],
        )  # fmt: skip


def checkpoint_sizes(session: ExportSession) -> dict[str, Any]:
    """The start time, first chunk size and row estimate a new checkpoint records."""
    table, rows = session.table, session.run.chunk_rows
    first = first_chunk_rows(table.estimated_rows, table.estimated_bytes)
    return {
        "started_at": now_iso(),
        "chunk_rows": first if rows is None else rows,
        "estimated_rows": table.estimated_rows,
    }


def _same_size(output: Path, manifest: Manifest) -> bool:
    """Whether ``output`` has the size its manifest records (bytes past it would be cut); a
    Parquet dataset: whether each part has."""
    try:
        if manifest.parquet is not None:
            return all((output / p["file"]).stat().st_size == p["bytes"] for p in manifest.parts)
        return output.stat().st_size == manifest.bytes
    except OSError:
        return False
