"""What a bulk job reports: each table's :class:`TableOutcome`, the job's :class:`BulkResult`,
the live :class:`BulkProgress` snapshots, and export messages put in a plan's terms."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..export import ExportResult
from ..manifest import Manifest
from ..progress import Progress, _Pace
from .resolve import _Task


@dataclass(frozen=True)
class TableOutcome:
    """What happened to one table of a bulk job (or, in a dry run, what would).

    ``status`` is ``"done"`` (exported in this run, from zero or resumed), ``"skipped"`` (already
    complete and still verifying), ``"failed"`` (``errors`` says why), ``"pending"`` (not run
    yet: only in a report written while the job runs), or in a dry run ``"ready"`` or
    ``"refused"``.
    """

    table: str
    entry: str  # "tables[N]": the plan entry that selected it
    output: Path
    status: str
    rows: int = 0
    bytes: int = 0
    xxh3_128: str | None = None
    seconds: float = 0.0
    retries: int = 0
    errors: tuple[str, ...] = ()
    resumed: bool = False
    key: tuple[str, ...] = ()
    key_source: str = ""
    estimated_rows: int | None = None
    estimated_bytes: int | None = None
    warnings: tuple[str, ...] = ()
    note: str = ""  # dry run: what the files beside the output say (new, resumes, finished)
    point_in_time: bool = False  # every row read from one snapshot (its manifest says so)
    #: the job snapshot every row was read from (``{"server", "id", "taken_at"}``), when it was
    #: exported by a job with one (this run's, or an earlier run's); else ``None``
    snapshot: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        """Whether the table is exported (done or skipped) or, in a dry run, would be."""
        return self.status in ("done", "skipped", "ready")

    def to_json(self) -> dict[str, Any]:
        """The table's entry in the job report."""
        return {
            "table": self.table,
            "entry": self.entry,
            "output": str(self.output),
            "status": self.status,
            "rows": self.rows,
            "bytes": self.bytes,
            "xxh3_128": self.xxh3_128,
            "seconds": round(self.seconds, 3),
            "retries": self.retries,
            "errors": list(self.errors),
            "resumed": self.resumed,
            "key": list(self.key),
            "key_source": self.key_source,
            "estimated_rows": self.estimated_rows,
            "estimated_bytes": self.estimated_bytes,
            "warnings": list(self.warnings),
            "point_in_time": self.point_in_time,
            "snapshot": self.snapshot,
        }


@dataclass(frozen=True)
class JobSnapshot:
    """What a job that reads one snapshot (``consistent``) got.

    ``taken`` lists the snapshots this run held (one per server: ``{"server", "id",
    "taken_at"}``); ``point_in_time`` says whether every table of the job was read from one
    of them (one per server), the job being then one point-in-time image; ``note`` says why
    not when it is not (a resumed job: tables exported under an earlier run's snapshot, which
    ended with that run).
    """

    taken: tuple[dict[str, str], ...]
    point_in_time: bool
    note: str

    def to_json(self) -> dict[str, Any]:
        """The job report's ``snapshot``."""
        return {
            "point_in_time": self.point_in_time,
            "taken": list(self.taken),
            "note": self.note,
        }


def job_snapshot(
    tables: Sequence[TableOutcome], taken: Sequence[dict[str, str]]
) -> JobSnapshot:
    """Whether the ``tables`` of a ``consistent`` job make one point-in-time image, given the
    snapshots this run ``taken``. Pure."""
    ok = [t for t in tables if t.status in ("done", "skipped")]
    current = {(s["server"], s["id"], s["taken_at"]) for s in taken}
    this_run = [t for t in ok if t.snapshot is not None and _key(t.snapshot) in current]
    earlier = [t for t in ok if t.snapshot is not None and _key(t.snapshot) not in current]
    mixed = [t for t in ok if t.snapshot is None and t.resumed]
    without = [t for t in ok if t.snapshot is None and not t.resumed]
    servers: dict[str, set[tuple[str, str, str]]] = {}
    for t in ok:
        if t.snapshot is not None:
            servers.setdefault(t.snapshot["server"], set()).add(_key(t.snapshot))
    failed = len(tables) - len(ok)
    whole = not (without or mixed or failed) and all(len(k) == 1 for k in servers.values())
    parts = []
    if this_run:
        parts.append(f"{len(this_run)} read from this run's snapshot")
    if earlier:
        when = sorted({t.snapshot["taken_at"] for t in earlier if t.snapshot is not None})
        parts.append(
            f"{len(earlier)} from an earlier run's (taken at {', '.join(when)}), which ended "
            "with that run"
        )
    if mixed:
        parts.append(f"{len(mixed)} resumed from an earlier run (read from two snapshots)")
    if without:
        parts.append(f"{len(without)} exported without the job's snapshot")
    if failed:
        parts.append(f"{failed} not exported")
    if whole:
        when = sorted({t.snapshot["taken_at"] for t in ok if t.snapshot is not None})
        note = f"one point in time: all {len(ok)} tables read from the snapshot taken at "
        return JobSnapshot(tuple(taken), True, note + ", ".join(when))
    return JobSnapshot(tuple(taken), False, "not one point in time: " + "; ".join(parts))


def _key(snapshot: dict[str, str]) -> tuple[str, str, str]:
    return snapshot["server"], snapshot["id"], snapshot["taken_at"]


@dataclass(frozen=True)
class BulkResult:
    """What :func:`run_bulk` did: one :class:`TableOutcome` per table, in the order they ran."""

    plan: Path
    tables: tuple[TableOutcome, ...]
    warnings: tuple[str, ...]
    seconds: float
    dry_run: bool
    jobs: int
    report: Path | None  # the job report written (None in a dry run)
    snapshot: JobSnapshot | None = None  # of a job that reads one snapshot (``consistent``)

    @property
    def failed(self) -> tuple[TableOutcome, ...]:
        """The tables that failed (or, in a dry run, would be refused)."""
        return tuple(t for t in self.tables if not t.ok)

    @property
    def ok(self) -> bool:
        """Whether every table succeeded (or, in a dry run, would be exported)."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """What the command exits with: 0 if every table succeeded, else 1."""
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form: the job report's totals and tables."""
        return {
            "plan": str(self.plan),
            "dry_run": self.dry_run,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "totals": _totals(self.tables),
            "warnings": list(self.warnings),
            "snapshot": self.snapshot.to_json() if self.snapshot is not None else None,
            "tables": [t.to_json() for t in self.tables],
        }


#: The statuses the totals always count (0 if no table has them), in the report's key order.
_STATUSES = ("done", "skipped", "failed", "pending")


def _totals(tables: Sequence[TableOutcome]) -> dict[str, int]:
    return _tally([(t.status, t.rows, t.bytes) for t in tables], _STATUSES)


def _tally(tables: Sequence[tuple[str, int, int]], statuses: Sequence[str]) -> dict[str, int]:
    """The totals of tables given as ``(status, rows, bytes)``: tables, rows and bytes, then the
    tables of each status (each of ``statuses`` first)."""
    out = {"tables": len(tables), "rows": 0, "bytes": 0, **dict.fromkeys(statuses, 0)}
    for status, rows, nbytes in tables:
        out[status] = out.get(status, 0) + 1
        out["rows"] += rows
        out["bytes"] += nbytes
    return out


@dataclass(frozen=True)
class BulkProgress(_Pace):
    """A snapshot of a running bulk job, passed to ``run_bulk(progress=...)``.

    ``running`` holds the latest :class:`~copystream.Progress` of each table being exported;
    ``outcomes`` every table finished so far, in finishing order. ``rows`` and ``bytes`` count
    the finished and running tables; ``start_rows``/``start_bytes`` the part of them that was
    already on disk when this run started (skipped tables, resumed prefixes).
    """

    tables: int
    outcomes: tuple[TableOutcome, ...]
    running: tuple[Progress, ...]
    rows: int
    bytes: int
    start_rows: int
    start_bytes: int
    estimated_rows: int | None  # of all the job's tables (finished ones: their actual rows)
    elapsed: float
    done: bool = False

    @property
    def finished(self) -> int:
        """Tables finished (done, skipped or failed)."""
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        """Tables that failed so far."""
        return sum(1 for o in self.outcomes if not o.ok)


def _outcome(task: _Task, status: str, **kw: Any) -> TableOutcome:
    return TableOutcome(
        table=task.table,
        entry=task.entry.label,
        output=task.output,
        status=status,
        estimated_rows=task.estimated_rows,
        estimated_bytes=task.estimated_bytes,
        **kw,
    )


def _from_result(task: _Task, r: ExportResult) -> TableOutcome:
    return _outcome(
        task,
        "skipped" if r.already_complete else "done",
        rows=r.rows,
        bytes=r.bytes,
        xxh3_128=r.xxh3_128,
        seconds=r.seconds,
        retries=r.retries,
        resumed=r.resumed,
        key=r.key,
        key_source=_key_source(r.key_source),
        warnings=r.warnings,
        point_in_time=r.point_in_time,
    )


def _from_manifest(task: _Task, m: Manifest, seconds: float) -> TableOutcome:
    """A table found complete (and verifying) before any worker ran: skipped."""
    return _outcome(
        task,
        "skipped",
        rows=m.rows,
        bytes=m.bytes,
        xxh3_128=m.xxh3_128,
        seconds=seconds,
        key=m.key,
        key_source=_key_source(m.key_source),
        warnings=task.resolved.warnings if task.resolved is not None else (),
        point_in_time=m.point_in_time,
    )


def _key_source(source: str) -> str:
    return "the plan's key" if source == "--key" else source
