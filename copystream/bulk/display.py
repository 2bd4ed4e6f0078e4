"""Showing a bulk job: the dry run and summary tables the command prints, and the progress
reporters (log lines for cron and Airflow, a live rich view on a terminal)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

from ..progress import _mb, _rich_bar
from .outcome import BulkProgress, BulkResult, TableOutcome, _totals

log = logging.getLogger("copystream")


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_dry_run(result: BulkResult) -> str:
    """The resolved plan, in the order the tables would run, as the command prints it."""
    ready = [t for t in result.tables if t.ok]
    head = (
        f"plan {result.plan}: {len(result.tables)} tables, {len(ready)} ready, "
        f"{len(result.failed)} refused; {result.jobs} at a time, largest first"
    )
    lines = [head]
    if ready:
        rows = [["TABLE", "KEY (FROM)", "EST. ROWS", "EST. SIZE", "OUTPUT", "STATE"]]
        for t in ready:
            rows.append(
                [
                    t.table,
                    f"{', '.join(t.key)} ({t.key_source})",
                    _num(t.estimated_rows),
                    _mb(t.estimated_bytes),
                    str(t.output),
                    t.note,
                ]
            )
        lines += _table(rows, {2, 3})
    if result.failed:
        lines.append("would be refused:")
        lines += [f"  {t.table} ({t.entry}): {'; '.join(t.errors)}" for t in result.failed]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def format_summary_table(result: BulkResult) -> str:
    """The table of outcomes and the totals line printed at the end of a job."""
    rows = [["TABLE", "STATUS", "ROWS", "SIZE", "SECONDS", "RETRIES", "OUTPUT"]]
    for t in result.tables:
        status = t.status + (" (resumed)" if t.resumed else "")
        rows.append(
            [
                t.table,
                status,
                _num(t.rows) if t.ok else "-",
                _mb(t.bytes) if t.ok else "-",
                f"{t.seconds:.1f}",
                str(t.retries),
                str(t.output) if t.ok else "",
            ]
        )
    lines = _table(rows, {2, 3, 4, 5}) if result.tables else []
    totals = _totals(result.tables)
    lines.append(
        f"{totals['tables']} tables: {totals['done']} done, {totals['skipped']} skipped, "
        f"{totals['failed']} failed; {totals['rows']:,} rows, {_mb(totals['bytes'])} "
        f"in {result.seconds:.1f}s"
        + (f"; report {result.report}" if result.report is not None else "")
    )
    if result.snapshot is not None:
        lines.append(f"snapshot: {result.snapshot.note}")
    return "\n".join(lines)


def _describe(o: TableOutcome) -> str:
    if o.status == "failed":
        return f"{o.table}: FAILED: {'; '.join(o.errors)}"
    how = "already complete, skipped" if o.status == "skipped" else "done"
    resumed = " (resumed)" if o.resumed else ""
    return f"{o.table}: {how}{resumed}, {o.rows:,} rows, {_mb(o.bytes)} in {o.seconds:.1f}s"


class BulkLogReporter:
    """Progress of a bulk job as log lines: one per table started or finished, and every
    ``interval`` seconds one for the whole job (for cron and Airflow task logs)."""

    def __init__(self, interval: float = 30.0, logger: logging.Logger | None = None) -> None:
        self.interval = interval
        self.logger = logger or log
        self._seen = 0
        self._running: set[str] = set()
        self._last = time.monotonic()

    def __call__(self, p: BulkProgress) -> None:
        """Receive one snapshot of the job."""
        for o in p.outcomes[self._seen :]:
            level = logging.WARNING if not o.ok else logging.INFO
            self.logger.log(level, "%s", _describe(o))
        self._seen = len(p.outcomes)
        names = {r.table for r in p.running}
        for name in sorted(names - self._running):
            self.logger.info("%s: started", name)
        self._running = names
        now = time.monotonic()
        if p.done or now - self._last >= self.interval:
            self._last = now
            eta = f", ETA {p.eta:.0f}s" if p.eta is not None and not p.done else ""
            running = "; ".join(f"{r.table} {r.rows:,} rows" for r in p.running)
            self.logger.info(
                "job: %d/%d tables finished (%d failed), %s rows, %s, %s/s%s%s",
                p.finished,
                p.tables,
                p.failed,
                f"{p.rows:,}",
                _mb(p.bytes),
                _mb(p.rate),
                eta,
                f"; running: {running}" if running else "",
            )


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.print(self.format(record), markup=False, highlight=False)


class BulkBarReporter:
    """One live view of a bulk job on a terminal (rich): a bar for the whole job (tables, rows,
    MB, MB/s, time left) and a line per running table. Use it as a context manager; log lines
    of the ``copystream`` logger are printed above the view meanwhile."""

    def __init__(self, file: IO[str] | None = None) -> None:
        self._bar = _rich_bar(
            file,
            "{task.description}",
            "{task.completed:>12,.0f} rows",
            "{task.fields[mb]:>12}",
            "{task.fields[rate]:>12}",
        )
        self._job: Any = None
        self._tasks: dict[str, Any] = {}
        self._handlers: list[logging.Handler] = []
        self._seen = 0

    def __enter__(self) -> BulkBarReporter:
        self._bar.start()
        self._handlers = log.handlers[:]
        handler = _ConsoleHandler(self._bar.console)
        if self._handlers and self._handlers[0].formatter is not None:
            handler.setFormatter(self._handlers[0].formatter)
        log.handlers[:] = [handler]
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()
        log.handlers[:] = self._handlers

    def __call__(self, p: BulkProgress) -> None:
        """Receive one snapshot of the job."""
        for o in p.outcomes[self._seen :]:
            self._bar.console.print(_describe(o), markup=False, highlight=False)
        self._seen = len(p.outcomes)
        desc = f"[bold]job {p.finished}/{p.tables} tables" + (
            f" [red]({p.failed} failed)" if p.failed else ""
        )
        total = max(p.estimated_rows or 0, p.rows) or None
        mb, rate = _mb(p.bytes), _mb(p.rate) + "/s"
        if self._job is None:
            self._job = self._bar.add_task(desc, total=total, mb=mb, rate=rate)
        self._bar.update(
            self._job, description=desc, completed=p.rows, total=total, mb=mb, rate=rate
        )
        names = {r.table for r in p.running}
        for name in list(self._tasks):
            if name not in names:
                self._bar.remove_task(self._tasks.pop(name))
        for r in p.running:
            t_total = max(r.estimated_rows or 0, r.rows) or None
            mb, rate = _mb(r.bytes), _mb(r.rate) + "/s"
            if r.table not in self._tasks:
                self._tasks[r.table] = self._bar.add_task(
                    f"  {r.table}", total=t_total, mb=mb, rate=rate
                )
            self._bar.update(
                self._tasks[r.table], completed=r.rows, total=t_total, mb=mb, rate=rate
            )
