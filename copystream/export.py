"""The library's entry points: :func:`export_table`, :func:`run_export`, :func:`export_status`.

An export is the pipeline of :mod:`copystream.pipeline`: prepare → discover → start → run →
finish. :func:`export_table` takes the options as keyword arguments and builds the
:class:`~copystream.spec.ExportSpec` and :class:`~copystream.spec.RunOptions` they declare;
:func:`run_export` takes those two whole (what bulk jobs and other drivers use).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import ChunkRecord, load_checkpoint
from .continuation import continued
from .errors import UsageError
from .incremental import check_request
from .manifest import Manifest
from .metrics import export_metrics
from .pipeline import (
    ExportSession,
    check_output,
    copies_whole,
    copy_small,
    discover_state,
    execute,
    finish,
    start,
)
from .progress import Progress, _mb, _per_second
from .ranges import part_path, remove_parts
from .spec import ExportSpec, RunOptions, build
from .state import Complete, Fresh, OnDisk, Resume, discover
from .table import ResolvedTable
from .whole import Written, publish

__all__ = [
    "ExportResult",
    "ExportStatus",
    "Exported",
    "export_status",
    "export_table",
    "run_export",
    "run_session",
]

log = logging.getLogger("copystream")


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_table` did."""

    output: Path | str  # str: the s3:// URL of an S3 export
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
    #: A compressed output's codec and level (``{"codec": "zstd", "level": 3}``) and the size
    #: of its uncompressed CSV (``bytes`` is the compressed size); ``None`` when uncompressed.
    compress: dict[str, Any] | None = None
    uncompressed_bytes: int | None = None
    #: Of an incremental export appended to OUTPUT: its entry in the manifest's ``increments``
    #: (rows, bytes, key range); of one to a file of its own, ``{"since": ...}``: the export
    #: it follows. ``None`` for any other export, and when nothing was done.
    increment: dict[str, Any] | None = None

    def summary(self) -> str:
        """The one line ``copystream export`` prints at the end."""
        rate = _per_second(self.bytes, self.seconds)
        size = _mb(self.bytes)
        if self.compress is not None and self.uncompressed_bytes is not None:
            size += f" {self.compress['codec']} ({_mb(self.uncompressed_bytes)} uncompressed)"
        line = (
            f"{self.table}: {self.rows:,} rows, {size} in {self.seconds:.1f}s "
            f"({_mb(rate)}/s), peak memory {self.peak_rss / 1e6:.0f} MB"
        )
        line += _increment_words(self.increment)
        if self.resumed:
            line += " (resumed)"
        if self.already_complete:
            line += " — already complete, nothing done"
        return line

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
            "compress": self.compress,
            "uncompressed_bytes": self.uncompressed_bytes,
            "increment": self.increment,
        }


def _increment_words(increment: dict[str, Any] | None) -> str:
    """What the summary line says of an incremental export."""
    if increment is None:
        return ""
    since = increment.get("since")
    if since is None:
        return f", of which {increment['rows']:,} rows appended" if "rows" in increment else ""
    words = f" after {since['manifest']}"
    if "watermark" in increment:
        words += f", {increment['watermark']['overlap_rows']:,} of them in the overlap"
    return words


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    Linux's ``VmHWM``: ``ru_maxrss`` also counts the memory of the process that started this
    one (a large Airflow worker would make a small export look large).
    """
    try:  # one read, no text layer: a bulk worker asks once per table
        fd = os.open("/proc/self/status", os.O_RDONLY)
        try:
            status = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
        at = status.index(b"\nVmHWM:") + 7
        return int(status[at : status.index(b"kB", at)]) * 1024
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def export_table(
    conninfo: str | None,
    table: str,
    output: str | os.PathLike[str],
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    **options: Any,
) -> ExportResult:
    """Export ``table`` to the file ``output``, resumably, and return what was done.

    ``conninfo`` is a libpq connection string or URI; ``None`` or ``""`` uses the libpq
    environment (``PG*`` variables, service file, ``.pgpass``). ``table`` is a SQL name as typed
    in psql (``orders``, ``sales."Order Items"``), resolved by the server with its search_path.

    The file's bytes equal ``COPY (SELECT <columns> FROM <table> [WHERE <where>] ORDER BY <key>)
    TO STDOUT (FORMAT csv)`` under the session settings in force at the first chunk. If a
    checkpoint for the same export exists beside ``output``, the export resumes from it; a
    finished export with a verifying manifest is not redone (``already_complete``).

    Options (each declared once in :mod:`copystream.spec`; an unknown name is a
    :class:`UsageError`):
        key: column name(s) to page by; default the primary key, else a unique NOT NULL index.
        columns: a subset (and order) of columns; default all.
        where: a SQL filter applied inside every chunk.
        chunk_rows: rows per chunk; ``None`` adapts to ~2 s per chunk (and exports a table
            estimated under 8 MB in one COPY); ``0`` forces a single COPY (resumable only
            from the start).
        header: write a CSV header line (shortcut for ``options=CopyOptions(header=True)``).
        format, delimiter, null, quote, escape, force_quote, encoding: the COPY options of
            :class:`CopyOptions` by name (``format="text"``, ``force_quote="*"``).
        options: a whole :class:`CopyOptions`, which the COPY options by name amend.
        restart: discard any checkpoint, manifest and output and start from zero.
        force: overwrite an existing output that has no checkpoint.
        max_outage: seconds a chunk waits out a server that cannot be reached (a restart, a
            failover: connection refused or lost, shutdowns, too many connections); 300.
        retries: retries of a chunk whose error repeats on a live server (serialization
            failure, deadlock, lock or statement timeout, a stalled stream); 5.
        retry_budget: total seconds the export may spend failing and waiting; 900.
        retry_policy: a full :class:`RetryPolicy` (delays too), replacing the three above.
        io_timeout: seconds without a byte from the server before the chunk is retried.
        statement_timeout: per-statement server timeout (seconds); its cancellations are retried.
        workers: worker processes; the key space is split into this many ranges balanced by
            sampled row counts, exported in parallel to part files and joined in key order (the
            result is byte-identical to a single-worker export).
        compress: ``"zstd"``, ``"gzip"`` or ``"none"``, optionally with ``":LEVEL"`` (or a
            :class:`~copystream.spec.Compression`); default: what ``output``'s suffix says
            (``.zst``: zstd level 3, ``.gz``: gzip level 6, else none). Every chunk is one
            zstd frame or gzip member, so the file is valid at every checkpoint; ``bytes`` and
            the digests are those of the compressed file, ``uncompressed_bytes`` the CSV's.
        incremental: append only the rows after the last key of ``output``'s complete export
            (the manifest covers the whole file, with its ``increments``). since: the manifest
            of the previous export: those rows to a new ``output`` (:func:`verify_chain`).
            watermark: a time or counter column to page by (then the key), for increments of
            changed rows less a safety lag (watermark_lag; default measured): the loader
            must upsert by key. Increments see no deletes (docs/cli.md, --incremental).
        format="parquet": ``output`` is a directory of typed Parquet parts (needs
            ``copystream[parquet]``; :mod:`copystream.parquet_types`), with parquet_compression,
            part_size, row_group_size, out_of_range, strict_types, numeric_scale and
            interval_form (docs/cli.md).
        consistent: read every chunk from one exported snapshot, held by this process for the
            whole export (a point-in-time export; it holds back VACUUM meanwhile). If the export
            is interrupted, the snapshot is gone: the resumed export is not point-in-time, and
            the manifest says so (``point_in_time``).
        metrics_file: keep Prometheus metrics of the export in this file (node_exporter's
            textfile collector format), rewritten atomically (:mod:`copystream.metrics`).
        pushgateway: push the same metrics to this Prometheus Pushgateway URL, grouped by
            job, table and shard.
        metrics_interval: seconds between two writes or pushes of the metrics (5).

    ``progress`` is called with a :class:`Progress` about once per megabyte and per chunk.

    Raises a :class:`~copystream.errors.UsageError` (exit code 2) for a request that cannot work
    and an :class:`~copystream.errors.ExportFailed` (exit code 1) when the export stopped with
    its checkpoint intact (run again to resume).
    """
    spec, run = build(table, **options)
    return run_export(conninfo, spec, output, run, progress=progress, sleep=sleep)


def run_export(
    conninfo: str | None,
    spec: ExportSpec,
    output: str | os.PathLike[str],
    run: RunOptions | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult:
    """Export ``spec`` to ``output`` as ``run`` says: :func:`export_table` with the spec whole."""
    if isinstance(output, str) and output.startswith("s3://"):
        from .s3export import run_s3_export

        return run_s3_export(conninfo, spec, output, run, progress=progress, sleep=sleep)
    started = time.monotonic()
    out = Path(output)
    check_output(out, directory=spec.options.format == "parquet")
    run = run or RunOptions()
    # before connecting: a contradiction, exit 2
    check_request(run, spec.watermark, parquet=spec.options.format == "parquet")
    with ExportSession(conninfo, spec, out, run, sleep) as session:
        exported = run_session(session, progress=progress, sleep=sleep, started=started)
        if exported.written is not None:
            failed = publish([exported.written.staged])[0]
            if failed is not None:
                raise failed
    exported.report_done(progress, started, session.table.estimated_rows)
    return exported.result


@dataclass(frozen=True)
class Exported:
    """What :func:`run_session` did: the result, and a small table's file still to publish
    (:func:`copystream.whole.publish`; ``None`` when everything is in place)."""

    result: ExportResult
    written: Written | None = None

    def report_done(
        self, progress: Callable[[Progress], None] | None, started: float, estimate: int | None
    ) -> None:
        """The last progress event of an export that ran (none for one already complete)."""
        r = self.result
        if progress is None or r.already_complete:
            return
        elapsed = time.monotonic() - started
        raw = r.bytes if r.uncompressed_bytes is None else r.uncompressed_bytes
        progress(Progress(r.table, r.rows, raw, estimate, elapsed, len(r.chunks), done=True))


def run_session(
    session: ExportSession,
    *,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
    started: float,
    tidy: bool = True,
    known: OnDisk | None = None,
) -> Exported:
    """Discover, then export (or not) the export ``session`` prepared: the pipeline after
    prepare. A small table is left in a temporary file for the caller to publish. ``tidy``:
    remove the temporary files killed runs left beside the output first (a caller that did it
    for a whole directory at once passes ``False``). ``known``: what the caller found on disk,
    acted on without reading it again when it is a small table's fresh start (the caller
    publishes under the lock and checks then); anything else is read again. With
    ``metrics_file`` or ``pushgateway`` in the run options, the export's metrics are written
    meanwhile and once more at the end (:mod:`copystream.metrics`)."""
    with export_metrics(session.run, session.table.qualified, progress) as (watched, metrics):
        exported = _run_session(
            session, progress=watched, sleep=sleep, started=started, tidy=tidy, known=known
        )
        if metrics is not None:
            r = exported.result
            metrics.succeeded(
                r.rows, len(r.chunks), r.bytes, r.uncompressed_bytes, ran=not r.already_complete
            )
    return exported


def _run_session(
    session: ExportSession,
    *,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
    started: float,
    tidy: bool,
    known: OnDisk | None,
) -> Exported:
    out = session.output
    found = known if isinstance(known, Fresh) else discover_state(session)
    small = copies_whole(session, found)
    if not small and session.lock():  # read again, now that no other export can change it
        found = discover_state(session)
    found = continued(session, found)  # an increment's checkpoint: under the lock
    if isinstance(found, Complete):
        q = session.table.qualified
        log.info("%s: %s is already complete and verifies; nothing to do", q, out)
        remove_parts(out)  # part files an interrupted clean-up after the join may have left
        m = found.manifest
        return Exported(_result(out, session.table, m, started, already=True, pit=m.point_in_time))
    if small:
        written, retries = copy_small(session, progress, sleep, started, tidy=tidy)
        m = written.manifest
        result = _result(out, session.table, m, started, retries=retries, pit=m.point_in_time)
        return Exported(result, written)
    with _workers_ahead(session, found):
        begun = start(session, found, follows=True)
        session.close_connection()
        ran = execute(session, begun, progress, sleep)
    manifest = finish(session, begun, ran, started)
    retries = sum(o.retries for o in ran.outcomes)
    result = _result(
        out, session.table, manifest, started, resumed=ran.resumed, retries=retries,
        pit=manifest.point_in_time,
    )  # fmt: skip
    return Exported(result)


def _workers_ahead(session: ExportSession, found: OnDisk) -> AbstractContextManager[None]:
    """The worker processes of a ``workers`` export, started now: their interpreters start
    (and import what a range needs) while the key is sampled, instead of after (measured: the
    first COPY of 2 workers began ~1 s after the split; the work of ~0.5 s of CPU per worker).
    Nothing for an export that runs in this process."""
    single = isinstance(found, Resume) and found.checkpoint is not None
    if session.run.workers < 2 or single or isinstance(found, Complete):
        return nullcontext()
    from .pool import started_ahead  # (only now: an export in this process needs no pool)

    preload = ["copystream.ranges"]
    if (compress := session.spec.compress) is not None and compress.codec != "none":
        preload += ["copystream.destinations.compressed", "zstandard"]
    return started_ahead(session.run.workers, preload=preload)


def _result(
    out: Path | str,
    table: ResolvedTable,
    manifest: Manifest,
    started: float,
    *,
    resumed: bool = False,
    already: bool = False,
    retries: int = 0,
    pit: bool,
) -> ExportResult:
    return ExportResult(
        output=out,
        table=table.qualified,
        rows=manifest.rows,
        bytes=manifest.bytes,
        xxh3_128=manifest.xxh3_128,
        chunks=manifest.chunks,
        seconds=time.monotonic() - started,
        resumed=resumed,
        already_complete=already,
        retries=retries,
        peak_rss=peak_rss(),
        key=table.key,
        key_source=table.key_source,
        warnings=table.warnings,
        point_in_time=pit,
        compress=manifest.compress,
        uncompressed_bytes=manifest.uncompressed_bytes,
        increment=None if already else _increment(manifest),
    )


def _increment(manifest: Manifest) -> dict[str, Any] | None:
    if manifest.watermark is not None:
        return {"watermark": manifest.watermark, "since": manifest.since}
    if manifest.since is not None:
        return {"since": manifest.since}
    return manifest.increments[-1] if manifest.increments else None


@dataclass(frozen=True)
class ExportStatus:
    """The state of an export, read from the files beside ``output``."""

    output: Path | str  # str: the s3:// URL of an S3 export
    state: str  # "in progress", "complete" or "not started"
    table: str | None
    rows: int
    bytes: int
    last_key: tuple[str, ...] | None  # None for an unfinished --workers export (one per range)
    estimated_rows: int | None
    chunks: int
    ranges: int = 1  # key ranges of a --workers export (1: a single-worker export)
    ranges_finished: int = 0  # of which are exported (all once the export is complete)
    #: Of a Parquet dataset: the complete part files (``bytes`` is then their size); else None.
    parts: int | None = None

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

    An unfinished ``workers`` export is read from its ranges file and every range's
    checkpoint: rows, bytes and chunks are their sums. Only reads files. Raises
    :class:`UsageError` if there is no checkpoint, ranges file or manifest.
    """
    if isinstance(output, str) and output.startswith("s3://"):
        from .s3export import s3_status

        return s3_status(output)
    out = Path(output)
    found = discover(out)
    if isinstance(found, Resume) and found.checkpoint is not None:
        cp = found.checkpoint
        parts = cp.destination.get("parts") if cp.destination.get("kind") == "parquet" else None
        size = cp.offset if parts is None else sum(int(p["bytes"]) for p in parts)
        return ExportStatus(
            out, "in progress", str(cp.export.get("table")), cp.rows, size, cp.last_key,
            cp.estimated_rows, len(cp.chunks), ranges_finished=int(cp.finished),
            parts=None if parts is None else len(parts),
        )  # fmt: skip
    if isinstance(found, Resume) and found.ranges is not None:
        return _ranges_status(out, found)
    if isinstance(found, Complete):
        m = found.manifest
        last = m.chunks[-1].last_key if m.chunks else None
        return ExportStatus(
            out, "complete", m.table, m.rows, m.bytes, last, m.rows, len(m.chunks),
            ranges=m.workers, ranges_finished=m.workers,
            parts=len(m.parts) if m.parquet is not None else None,
        )  # fmt: skip
    raise UsageError(
        f"no export to report on at {out}: no checkpoint beside it, nor an output with its manifest"
    )


def _ranges_status(out: Path, found: Resume) -> ExportStatus:
    assert found.ranges is not None
    count = len(found.ranges.ranges)
    cps = [load_checkpoint(part_path(out, i)) for i in range(count)]
    started = [c for c in cps if c is not None]
    parts = None  # of a Parquet dataset: every range's complete part files
    if found.ranges.export.get("parquet") is not None:
        parts = [p for c in started for p in c.destination.get("parts", [])]
    return ExportStatus(
        out,
        "in progress",
        str(found.ranges.export.get("table")),
        sum(c.rows for c in started),
        sum(c.offset for c in started) if parts is None else sum(int(p["bytes"]) for p in parts),
        None,
        next((c.estimated_rows for c in started), None),
        sum(len(c.chunks) for c in started),
        ranges=count,
        ranges_finished=sum(c.finished for c in started),
        parts=None if parts is None else len(parts),
    )
