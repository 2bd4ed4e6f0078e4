"""A live view of an export's ranges or shards, read from the files beside its output.

:func:`range_states` reads (never writes) the parts plan and every range's checkpoint — the
files that ``workers`` and :func:`copystream.run_shard` keep — so a person can watch a job that
runs on other machines from any machine that sees the output's directory (or, for an
``s3://`` output, its bucket). :func:`watch_status`
redraws a table of them (state, rows, MB, rate, ETA) until the export is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .bulk.plan import REPORT_NAME
from .checkpoint import Checkpoint, load_checkpoint
from .errors import CopystreamError, UsageError
from .export import ExportStatus, export_status
from .progress import _mb
from .ranges import load_parts, part_path
from .s3url import is_s3
from .shards import ShardPlan

__all__ = [
    "RangeState",
    "job_frame",
    "job_report",
    "job_report_path",
    "range_states",
    "watch_job",
    "watch_status",
]


@dataclass(frozen=True)
class RangeState:
    """One key range (a shard) as its checkpoint tells: ``state`` is ``"not started"``,
    ``"in progress"`` (begun, running or interrupted: the files cannot tell) or
    ``"finished"``."""

    index: int
    state: str
    rows: int
    bytes: int
    chunks: int


def output_of(path: str | os.PathLike[str]) -> Path | str:
    """The output a path names: itself, or the output of a shard plan file (``*.shards.json``,
    local or ``s3://``); an ``s3://`` output as its URL (text)."""
    name = str(path)
    if name.endswith(".shards.json"):
        output = ShardPlan.of(path).output
        return output if is_s3(output) else Path(output)
    return name if is_s3(name) else Path(path)


def range_states(output: str | os.PathLike[str]) -> tuple[ExportStatus, list[RangeState]]:
    """The export's status and each of its ranges' (none once complete, or for a
    single-process export), read from the checkpoints wherever they are: beside a local
    output, or in the bucket beside an ``s3://`` one."""
    out = output_of(output)
    status = export_status(out)
    if status.state == "complete":
        return status, []
    if isinstance(out, str):  # s3://bucket/key: the plan and checkpoints are objects
        from .s3export import s3_range_checkpoints

        cps = s3_range_checkpoints(out)
    else:
        parts = load_parts(out, strict=False)
        count = 0 if parts is None else len(parts.ranges)
        cps = [_checkpoint(part_path(out, i)) for i in range(count)]
    return status, [_state(i, cp) for i, cp in enumerate(cps)]


def _checkpoint(path: Path) -> Checkpoint | None:
    try:
        return load_checkpoint(path)
    except CopystreamError:  # being replaced, or torn: shown as not started this frame
        return None


def _state(index: int, cp: Checkpoint | None) -> RangeState:
    if cp is None:
        return RangeState(index, "not started", 0, 0, 0)
    word = "finished" if cp.finished else "in progress"
    return RangeState(index, word, cp.rows, cp.offset, len(cp.chunks))


def _rate(now: ExportStatus, before: tuple[float, int] | None, at: float) -> float | None:
    if before is None or at <= before[0]:
        return None
    return max(now.rows - before[1], 0) / (at - before[0])


def render(status: ExportStatus, states: list[RangeState], rate: float | None) -> str:
    """The text of one frame: a line for the export, then one per range."""
    eta = ""
    if rate and status.estimated_rows and status.state != "complete":
        eta = f", ETA {max(status.estimated_rows - status.rows, 0) / rate:.0f}s"
    pct = f" ({status.percent:.0f}%)" if status.percent is not None else ""
    speed = f", {rate:,.0f} rows/s" if rate else ""
    lines = [
        f"{status.output}: {status.state}; {status.table}; {status.rows:,} rows{pct}, "
        f"{_mb(status.bytes)}{speed}{eta}"
    ]
    if states:
        lines.append(f"{'shard':>5}  {'state':<11}  {'rows':>12}  {'MB':>10}  {'chunks':>6}")
        for s in states:
            lines.append(
                f"{s.index:>5}  {s.state:<11}  {s.rows:>12,}  {s.bytes / 1e6:>10,.1f}  "
                f"{s.chunks:>6}"
            )
    return "\n".join(lines)


def watch_status(
    output: str | os.PathLike[str],
    *,
    interval: float = 2.0,
    file: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportStatus:
    """Redraw the export's status every ``interval`` seconds until it is complete; return the
    last status. On a terminal the frame is redrawn in place (rich), elsewhere appended."""
    out = output_of(output)  # once: the plan's file goes when the shards are joined
    before: tuple[float, int] | None = None
    last: list[ExportStatus] = []

    def frame() -> tuple[str, bool]:
        nonlocal before
        status, states = range_states(out)
        at = time.monotonic()
        text = render(status, states, _rate(status, before, at))
        before = (at, status.rows)
        last[:] = [status]
        return text, status.state == "complete"

    _redraw(frame, interval, file, sleep)
    return last[0]


def _redraw(
    frame: Callable[[], tuple[str, bool]],
    interval: float,
    file: IO[str] | None,
    sleep: Callable[[float], None],
) -> None:
    """Draw ``frame()`` every ``interval`` seconds until it says it is the last."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(file=file)
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(Live(console=console, auto_refresh=False)) if (
            console.is_terminal) else None  # fmt: skip
        while True:
            text, done = frame()
            if live is not None:
                live.update(Text(text), refresh=True)
            else:  # a log file or a pipe: one frame after the other, never wrapped
                print(text, file=file or sys.stdout, flush=True)
            if done:
                return
            sleep(interval)


# -- a bulk job ---------------------------------------------------------------------------------


def job_report_path(path: str | os.PathLike[str]) -> Path | None:
    """The bulk job report a path names: a plan file (``*.toml``), the job's output directory,
    or the report itself; ``None`` for anything else (an export's output)."""
    if is_s3(str(path)):  # an S3 job's prefix, or its report object
        from .bulk.s3 import job_report_url

        return job_report_url(str(path))
    p = Path(path)
    if p.suffix == ".toml":
        from .bulk.plan import load_plan

        return load_plan(p).report_path
    if p.name == REPORT_NAME:
        return p
    if p.is_dir() and (p / REPORT_NAME).is_file():
        return p / REPORT_NAME
    return None


def job_report(report: Path) -> str:
    """The text of the job report ``report`` (:class:`UsageError` if there is none)."""
    try:
        text = _read(report)
        json.loads(text)
    except FileNotFoundError as e:
        raise UsageError(f"no job report at {report}: the job has not started") from e
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the job report {report}: {e}") from e
    return text.rstrip("\n")


def _read(report: Path) -> str:
    from .bulk.s3 import S3Path, read_report

    if not isinstance(report, S3Path):
        return report.read_text(encoding="utf-8")
    data = read_report(report)
    if data is None:
        raise FileNotFoundError(str(report))
    return data.decode()


def job_frame(report: Path) -> tuple[str, bool]:
    """One frame of a bulk job, from its report (rewritten as tables finish) and the
    checkpoints of the tables it has not finished (for their rows so far); and whether the job
    has finished. A line for the job, then one per table not done yet or failed."""
    data = json.loads(job_report(report))
    totals, lines = data["totals"], []
    rows, size = int(totals["rows"]), int(totals["bytes"])
    for t in data["tables"]:
        if t["status"] == "pending":
            now = _table_status(t["output"])
            got = (now.rows, now.bytes) if now is not None else (0, 0)
            rows, size = rows + got[0], size + got[1]
            state = "in progress" if now is not None else "waiting"
            lines.append(f"  {t['table']}: {state}, {got[0]:,} rows, {_mb(got[1])}")
        elif t["status"] == "failed":
            lines.append(f"  {t['table']}: failed: {(t['errors'] or ['?'])[-1]}")
    counts = ", ".join(f"{totals[k]} {k}" for k in ("done", "skipped", "failed", "pending"))
    state = "finished" if data["finished"] else "running"
    tables = f"{totals['tables']} tables: {counts}"
    head = f"{data['plan']}: {state}; {tables}; {rows:,} rows, {_mb(size)}"
    return "\n".join([head, *lines]), bool(data["finished"])


def _table_status(output: str) -> ExportStatus | None:
    try:
        return export_status(output)
    except CopystreamError:  # nothing of it on disk yet
        return None


def watch_job(
    path: str | os.PathLike[str],
    *,
    interval: float = 2.0,
    file: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Redraw a bulk job's frame (:func:`job_frame`) every ``interval`` seconds until its
    report says it finished. ``path``: the plan file, the output directory or the report."""
    report = job_report_path(path)
    if report is None:
        raise UsageError(f"{path} is not a bulk plan, a job's output directory or its report")
    _redraw(lambda: job_frame(report), interval, file, sleep)
