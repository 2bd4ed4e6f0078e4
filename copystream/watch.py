"""A live view of an export's ranges or shards, read from the files beside its output.

:func:`range_states` reads (never writes) the parts plan and every range's checkpoint — the
files that ``workers`` and :func:`copystream.run_shard` keep — so a person can watch a job that
runs on other machines from any machine that sees the output's directory. :func:`watch_status`
redraws a table of them (state, rows, MB, rate, ETA) until the export is complete.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .checkpoint import load_checkpoint
from .errors import CopystreamError, UsageError
from .export import ExportStatus, export_status
from .progress import _mb
from .ranges import load_parts, part_path
from .s3url import is_s3
from .shards import ShardPlan

__all__ = ["RangeState", "range_states", "watch_status"]


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


def output_of(path: str | os.PathLike[str]) -> Path:
    """The output a path names: itself, or the output of a shard plan file (``*.shards.json``)."""
    p = Path(path)
    if p.name.endswith(".shards.json"):
        return Path(ShardPlan.of(p).output)
    return p


def range_states(output: str | os.PathLike[str]) -> tuple[ExportStatus, list[RangeState]]:
    """The export's status and each of its ranges' (none once complete, or for a
    single-process export)."""
    out = output_of(output)
    status = export_status(out)
    parts = load_parts(out, strict=False) if status.state != "complete" else None
    if parts is None:
        return status, []
    states = []
    for i in range(len(parts.ranges)):
        state = part_path(out, i)
        try:
            cp = load_checkpoint(state)
        except CopystreamError:
            cp = None
        if cp is None:
            states.append(RangeState(i, "not started", 0, 0, 0))
            continue
        word = "finished" if cp.finished else "in progress"
        states.append(RangeState(i, word, cp.rows, cp.offset, len(cp.chunks)))
    return status, states


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
    if is_s3(output):
        raise UsageError(
            f"cannot watch {output}: the live view reads the checkpoints of a local output "
            "(the status of an S3 output can be read once)"
        )
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(file=file)
    out = output_of(output)  # once: the plan's file goes when the shards are joined
    before: tuple[float, int] | None = None
    with contextlib.ExitStack() as stack:
        live = stack.enter_context(Live(console=console, auto_refresh=False)) if (
            console.is_terminal) else None  # fmt: skip
        while True:
            status, states = range_states(out)
            at = time.monotonic()
            frame = render(status, states, _rate(status, before, at))
            if live is not None:
                live.update(Text(frame), refresh=True)
            else:  # a log file or a pipe: one frame after the other, never wrapped
                print(frame, file=file or sys.stdout, flush=True)
            if status.state == "complete":
                return status
            before = (at, status.rows)
            sleep(interval)
