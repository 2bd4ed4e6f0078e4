"""Prometheus metrics of a running export, fed from its progress events.

A scheduler's dashboard watches a long export the way Prometheus watches any batch job: the
job pushes (``pushgateway``) or leaves a file for node_exporter's textfile collector
(``metrics_file``). :class:`ExportMetrics` is a progress callback like
:class:`~copystream.progress.LogReporter`: it reads the :class:`~copystream.progress.Progress`
events the engine already emits (rows, bytes, chunks, retries by reason, outage seconds), so
the chunk loop knows nothing about Prometheus. A background thread rewrites the file
atomically (``prometheus_client.write_to_textfile``: a temporary file renamed into place) and
pushes to the Pushgateway every ``metrics_interval`` seconds, and once more at the end.

Metrics (all labelled ``table`` and ``shard``; ``shard`` is ``"all"`` for a whole export):
``copystream_rows``, ``copystream_bytes{kind="raw"|"stored"}`` (``raw``: COPY output before
compression, ``stored``: the file's bytes, known at the end), ``copystream_chunks``,
``copystream_chunk_duration_seconds`` (a histogram of the time between two committed chunks,
as the progress events tell it: a few a second, so chunks committed between two events share
the time evenly),
``copystream_retries{reason}``, ``copystream_outage_seconds``, ``copystream_peak_rss_bytes``,
``copystream_last_chunk_timestamp_seconds``, ``copystream_snapshot_age_seconds`` (a
``consistent`` export only), ``copystream_last_success_timestamp_seconds``. The labels hold
table and shard names only: never a connection string.

``prometheus_client`` is an optional dependency (``pip install 'copystream[metrics]'``),
imported only when metrics are asked for.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Opt, UsageError
from .progress import Progress

if TYPE_CHECKING:
    from .spec import RunOptions

__all__ = ["JOB", "ExportMetrics", "export_metrics"]

log = logging.getLogger("copystream")

#: The Pushgateway's ``job`` label of every push (the grouping key adds table and shard).
JOB = "copystream"
#: Chunk durations: adaptive chunks aim at ~2 s, so the buckets are dense around it.
CHUNK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def _peak_rss() -> int:
    from .export import peak_rss  # export imports this module lazily: no cycle

    return peak_rss()


def _shown(url: str) -> str:
    """``url`` without user information (a password in a Pushgateway URL is never logged)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class ExportMetrics:
    """A progress callback that keeps Prometheus metrics of one export (or one shard of it)
    and writes them out: to ``metrics_file``, to the Pushgateway at ``pushgateway``, or both.

    Use it as a context manager: entering starts the thread that writes every ``interval``
    seconds; leaving writes a last time and stops it. :meth:`succeeded` records the finished
    export's manifest (its stored size and the success timestamp).
    """

    def __init__(
        self,
        table: str,
        *,
        shard: str = "all",
        metrics_file: str | None = None,
        pushgateway: str | None = None,
        interval: float = 5.0,
        consistent: bool = False,
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as e:
            option = Opt("metrics_file" if metrics_file else "pushgateway")
            raise UsageError(
                [option, " needs prometheus_client: pip install 'copystream[metrics]'"]
            ) from e
        if metrics_file is not None and not Path(metrics_file).parent.is_dir():
            raise UsageError(
                [Opt("metrics_file"), f": directory {Path(metrics_file).parent} does not exist"]
            )
        self._prom = prom
        self.table, self.shard = table, shard
        self.metrics_file, self.pushgateway, self.interval = metrics_file, pushgateway, interval
        self.consistent = consistent
        self.registry = prom.CollectorRegistry()
        self._started = time.time()
        self._chunks = 0
        self._created = time.monotonic()
        self._chunk_at: float | None = None  # when the chunk count last changed (monotonic)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._declare(prom)

    def _declare(self, prom: Any) -> None:
        labels = ("table", "shard")
        r = self.registry
        self.rows = prom.Gauge("copystream_rows", "Rows exported so far.", labels, registry=r)
        self.bytes = prom.Gauge(
            "copystream_bytes",
            "Bytes so far: raw (COPY output, before compression), stored (the output's size).",
            (*labels, "kind"),
            registry=r,
        )
        self.chunks = prom.Gauge("copystream_chunks", "Chunks committed.", labels, registry=r)
        self.chunk_seconds = prom.Histogram(
            "copystream_chunk_duration_seconds",
            "Seconds between two committed chunks.",
            labels,
            buckets=CHUNK_BUCKETS,
            registry=r,
        )
        self.retries = prom.Gauge(
            "copystream_retries", "Retries so far, by reason.", (*labels, "reason"), registry=r
        )
        self.outage = prom.Gauge(
            "copystream_outage_seconds",
            "Seconds spent waiting out a server that could not be reached.",
            labels,
            registry=r,
        )
        self.rss = prom.Gauge(
            "copystream_peak_rss_bytes", "Peak resident memory of the process.", labels, registry=r
        )
        self.last_chunk = prom.Gauge(
            "copystream_last_chunk_timestamp_seconds",
            "When the last chunk was committed (its checkpoint follows it to disk at once).",
            labels,
            registry=r,
        )
        self.snapshot_age = prom.Gauge(
            "copystream_snapshot_age_seconds",
            "Age of the exported snapshot a consistent export reads.",
            labels,
            registry=r,
        )
        self.success = prom.Gauge(
            "copystream_last_success_timestamp_seconds",
            "When the export finished successfully.",
            labels,
            registry=r,
        )

    def _labels(self) -> dict[str, str]:
        return {"table": self.table, "shard": self.shard}

    # -- the progress callback ----------------------------------------------------------------

    def __call__(self, p: Progress) -> None:
        """Receive one progress event."""
        lb = self._labels()
        with self._lock:
            self.rows.labels(**lb).set(p.rows)
            self.bytes.labels(**lb, kind="raw").set(p.bytes)
            if self._chunk_at is None:  # the first event of this run
                self._chunk_at = self._created
                if p.start_rows:  # a resume: the chunks on disk are not this run's
                    self._chunks = p.chunks
                    self.chunks.labels(**lb).set(p.chunks)
            if p.chunks > self._chunks:  # a chunk (or several, between two events) committed
                self._committed(p.chunks)
            for reason, count in p.retries:
                self.retries.labels(**lb, reason=reason).set(count)
            self.outage.labels(**lb).set(p.outage_seconds)

    def _committed(self, chunks: int) -> None:
        """The chunk count grew to ``chunks``: time them (evenly, when several committed
        between two events) from the last change, and note when."""
        lb = self._labels()
        now = time.monotonic()
        start = self._chunk_at if self._chunk_at is not None else self._created
        per_chunk = (now - start) / (chunks - self._chunks)
        for _ in range(chunks - self._chunks):
            self.chunk_seconds.labels(**lb).observe(max(per_chunk, 0.0))
        self._chunks, self._chunk_at = chunks, now
        self.chunks.labels(**lb).set(chunks)
        self.last_chunk.labels(**lb).set(time.time())

    def succeeded(
        self, rows: int, chunks: int, stored: int, raw: int | None, *, ran: bool = True
    ) -> None:
        """The export (or shard) finished: its final figures (``raw``: the bytes before
        compression, ``None`` when not compressed), and the success time. ``ran``: this run
        exported the chunks not seen in progress events yet (not an output already complete)."""
        lb = self._labels()
        with self._lock:
            if ran and chunks > self._chunks:
                self._committed(chunks)
            self.rows.labels(**lb).set(rows)
            self.bytes.labels(**lb, kind="raw").set(stored if raw is None else raw)
            self.bytes.labels(**lb, kind="stored").set(stored)
            self.chunks.labels(**lb).set(chunks)
            self.success.labels(**lb).set(time.time())

    # -- writing out ---------------------------------------------------------------------------

    def write(self) -> None:
        """Write the file and push, now. A failure is logged, never raised: metrics must not
        stop an export."""
        lb = self._labels()
        with self._lock:
            self.rss.labels(**lb).set(_peak_rss())
            if self.consistent:
                self.snapshot_age.labels(**lb).set(time.time() - self._started)
        if self.metrics_file is not None:
            try:
                self._prom.write_to_textfile(self.metrics_file, self.registry)
            except OSError as e:
                log.warning("could not write the metrics file %s: %s", self.metrics_file, e)
        if self.pushgateway is not None:
            try:
                self._prom.push_to_gateway(
                    self.pushgateway, job=JOB, registry=self.registry, grouping_key=lb, timeout=10
                )
            except Exception as e:  # urllib's errors: the gateway down, refusing, ...
                log.warning("could not push metrics to %s: %s", _shown(self.pushgateway), e)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.write()

    def __enter__(self) -> ExportMetrics:
        self.write()
        self._thread = threading.Thread(target=self._loop, name="copystream-metrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.write()


def _chain(
    first: Callable[[Progress], None] | None, second: Callable[[Progress], None]
) -> Callable[[Progress], None]:
    if first is None:
        return second

    def both(p: Progress) -> None:
        first(p)
        second(p)

    return both


@contextlib.contextmanager
def export_metrics(
    run: RunOptions,
    table: str,
    progress: Callable[[Progress], None] | None,
    *,
    shard: str = "all",
) -> Iterator[tuple[Callable[[Progress], None] | None, ExportMetrics | None]]:
    """The progress callback to use (``progress`` and the metrics' own, when ``run`` asks for
    metrics) and the :class:`ExportMetrics`, or ``progress`` and ``None``."""
    if run.metrics_file is None and run.pushgateway is None:
        yield progress, None
        return
    with ExportMetrics(
        table,
        shard=shard,
        metrics_file=run.metrics_file,
        pushgateway=run.pushgateway,
        interval=run.metrics_interval,
        consistent=run.consistent,
    ) as metrics:
        yield _chain(progress, metrics), metrics
