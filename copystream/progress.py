"""Progress of a running export: the event the engine emits, and two ways to show it.

The engine calls ``progress(Progress(...))`` after every buffer written (about once a megabyte)
and after every chunk. :class:`BarReporter` draws a live bar on a terminal (rich);
:class:`LogReporter` writes a ``logging`` line at intervals for cron and Airflow task logs. Both
are callables, so ``export_table(..., progress=LogReporter())`` works from Python too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress as RichProgress

__all__ = ["BarReporter", "LogReporter", "Progress"]

log = logging.getLogger("copystream")


class _Pace:
    """The pace of a snapshot (one export's, or a bulk job's): its ``rate`` and ``eta``."""

    rows: int
    bytes: int
    start_rows: int  # rows and bytes already on disk when this run started
    start_bytes: int
    estimated_rows: int | None
    elapsed: float  # seconds since this run started

    @property
    def rate(self) -> float:
        """Bytes per second written by this run."""
        return _per_second(self.bytes - self.start_bytes, self.elapsed)

    @property
    def eta(self) -> float | None:
        """Seconds left by the estimated row count, or ``None`` when unknown."""
        done_here = self.rows - self.start_rows
        if not self.estimated_rows or done_here <= 0 or self.elapsed <= 0:
            return None
        return max(self.estimated_rows - self.rows, 0) * self.elapsed / done_here


@dataclass(frozen=True)
class Progress(_Pace):
    """A snapshot of an export's progress."""

    table: str
    rows: int  # rows written so far (during a chunk, rows received so far)
    bytes: int  # bytes of COPY output so far (for a compressed output: before compression)
    estimated_rows: int | None  # the planner's estimate of the table's rows (may be stale)
    elapsed: float  # seconds since this run started
    chunks: int  # chunks committed
    done: bool = False
    start_bytes: int = 0  # bytes already in the file when this run started (resume)
    start_rows: int = 0  # rows already in the file when this run started (resume)
    retries: tuple[tuple[str, int], ...] = ()  # retries of this run so far, by reason
    outage_seconds: float = 0.0  # seconds this run waited out an unreachable server


def _per_second(amount: float, seconds: float) -> float:
    """``amount`` per second (0 before any time has passed)."""
    return amount / seconds if seconds > 0 else 0.0


def _mb(n: float | None) -> str:
    """``n`` bytes in MB, as every report shows them (``-`` when unknown)."""
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _rich_bar(
    file: IO[str] | None, description: str, rows: str, mb: str, rate: str
) -> RichProgress:
    """A live rich view on ``file`` (stderr when None): ``description``, a bar, ``rows``,
    ``mb``, ``rate`` (rich text formats of a task) and the time left. Rich is imported only
    when a bar is shown."""
    from rich.console import Console
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress

    return RichProgress(
        TextColumn(description),
        BarColumn(),
        TextColumn(rows),
        TextColumn(mb),
        TextColumn(rate),
        TimeRemainingColumn(),
        console=Console(file=file, stderr=file is None),
        transient=False,
    )


class LogReporter:
    """Log one line at most every ``interval`` seconds, plus one at the end."""

    def __init__(self, interval: float = 30.0, logger: logging.Logger | None = None) -> None:
        self.interval = interval
        self.logger = logger or log
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        """Receive one progress event."""
        now = time.monotonic()
        if not p.done and now - self._last < self.interval:
            return
        self._last = now
        pct = (
            f" ({100 * p.rows / p.estimated_rows:.0f}% of ~{p.estimated_rows:,})"
            if (p.estimated_rows)
            else ""
        )
        eta = f", ETA {p.eta:.0f}s" if p.eta is not None and not p.done else ""
        self.logger.info(
            "%s: %s rows%s, %s, %s/s%s",
            p.table,
            f"{p.rows:,}",
            pct,
            _mb(p.bytes),
            _mb(p.rate),
            eta,
        )


class BarReporter:
    """A live progress bar on a terminal (stderr): rows, MB, MB/s, ETA."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self._bar = _rich_bar(
            file,
            "[bold]{task.description}",
            "{task.completed:,.0f} rows",
            "{task.fields[mb]}",
            "{task.fields[rate]}/s",
        )
        self._task: Any = None

    def __enter__(self) -> BarReporter:
        self._bar.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()

    def __call__(self, p: Progress) -> None:
        """Receive one progress event."""
        total = max(p.estimated_rows or 0, p.rows) or None
        if self._task is None:
            self._task = self._bar.add_task(p.table, total=total, mb="", rate="")
        if p.done:
            total = p.rows
        self._bar.update(
            self._task, completed=p.rows, total=total, mb=_mb(p.bytes), rate=_mb(p.rate)
        )
