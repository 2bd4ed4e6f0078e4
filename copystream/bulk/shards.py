"""A bulk plan as shards: its tables in groups balanced by size, any engine running the groups.

The same three calls as one table's shards (:mod:`copystream.shards`), given a bulk plan::

    plan = copystream.plan_bulk_shards("migration.toml", shards=8)
    results = [copystream.run_shard(plan, i) for i in range(plan.shards)]   # map them anywhere
    copystream.finish_shards(plan)

:func:`plan_bulk_shards` resolves the plan's tables on their servers as :func:`run_bulk` does,
splits each table larger than its share of the job (the job's estimated bytes over
``shards``) into key ranges (:func:`copystream.shards.plan_ranges`, the ranges file of
``workers``), and deals the tables and ranges into ``shards`` groups of about equal estimated
size (:func:`balance`). The plan is kept beside the job report as ``copystream-shards.json``;
it names the plan file and holds no connection string (each shard reads the plan file, with
its DSNs, itself). :func:`run_bulk_shard` exports one group: a whole table as a bulk job's
worker does (:func:`~copystream.bulk.worker.export_task`), a range as
:func:`copystream.run_shard` does; each resumes from its checkpoint and a finished one
returns at once. :func:`finish_bulk_shards` joins the split tables, checks every table's
manifest and file, and writes the job report (``copystream-report.json``).

A ``consistent`` job cannot be sharded (no snapshot outlives the planning task): refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .._atomic import atomic_write, fsync_dir, remove_stale_temporaries
from ..errors import CopystreamError, ExportFailed, Opt, UsageError
from ..manifest import load_manifest, manifest_path, verify_file
from ..progress import Progress
from ..shards import finish_planned_ranges, plan_ranges, read_plan_file, run_planned_range
from ..whole import publish
from .outcome import BulkResult, TableOutcome, _from_manifest
from .plan import BulkPlan, load_plan
from .report import _Report
from .resolve import _resolve_on_servers, _Task
from .s3 import S3Path
from .worker import export_task

__all__ = [
    "BulkShardPlan",
    "BulkShardResult",
    "balance",
    "finish_bulk_shards",
    "plan_bulk_shards",
    "run_bulk_shard",
    "split_counts",
]

log = logging.getLogger("copystream")

KIND = "copystream-bulk-shards"
VERSION = 1
#: The plan's file, beside the job report in the output directory.
SHARDS_NAME = "copystream-shards.json"


@dataclass(frozen=True)
class Unit:
    """A whole table of the job (``range`` ``None``) or one of the key ranges of a table split
    into ``ranges`` (planned at ``started_at``); ``weight``: its estimated bytes."""

    table: str
    output: str
    weight: int
    range: int | None = None
    ranges: int = 1
    started_at: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "table": self.table, "output": self.output, "weight": self.weight,
            "range": self.range, "ranges": self.ranges, "started_at": self.started_at,
        }  # fmt: skip


@dataclass(frozen=True)
class BulkShardPlan:
    """The shards of a bulk plan: ``groups[i]`` is what shard ``i`` exports."""

    plan: str  # the bulk plan's file (absolute)
    groups: tuple[tuple[Unit, ...], ...]
    version: int = VERSION

    @property
    def shards(self) -> int:
        """How many shards (groups) there are."""
        return len(self.groups)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``copystream-shards.json``, what an engine passes between tasks)."""
        return {
            "kind": KIND, "version": self.version, "plan": self.plan, "shards": self.shards,
            "groups": [[u.to_json() for u in g] for g in self.groups],
        }  # fmt: skip

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BulkShardPlan:
        """Inverse of :meth:`to_json`; :class:`UsageError` when ``d`` is not one."""
        if d.get("kind") != KIND or d.get("version") != VERSION:
            raise UsageError("not a copystream bulk shard plan of a known version")
        try:
            groups = tuple(tuple(Unit(**u) for u in g) for g in d["groups"])
            return cls(plan=str(d["plan"]), groups=groups)
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"a damaged copystream bulk shard plan: {e}") from e

    @classmethod
    def of(cls, plan: BulkShardPlan | Mapping[str, Any] | str | os.PathLike[str]) -> BulkShardPlan:
        """``plan`` itself, its JSON form, or the plan kept in the file ``plan``."""
        if isinstance(plan, BulkShardPlan):
            return plan
        return cls.from_json(plan if isinstance(plan, Mapping) else read_plan_file(plan))


def is_bulk_shard_plan(plan: object) -> bool:
    """Whether ``plan`` (an object, its JSON, or a file) is a bulk plan's shards."""
    if isinstance(plan, BulkShardPlan):
        return True
    if isinstance(plan, Mapping):
        return plan.get("kind") == KIND
    if isinstance(plan, str | os.PathLike):
        try:
            return bool(read_plan_file(plan).get("kind") == KIND)
        except (UsageError, AttributeError):
            return False  # (run_shard then says why it cannot read it)
    return False


@dataclass(frozen=True)
class BulkShardResult:
    """What :func:`run_bulk_shard` did: one entry per table or range of the shard."""

    index: int
    shards: int
    tables: tuple[dict[str, Any], ...]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (what lands in an XCom)."""
        return {"index": self.index, "shards": self.shards, "tables": list(self.tables),
                "seconds": round(self.seconds, 3)}  # fmt: skip


# -- planning: pure -----------------------------------------------------------------------------


def split_counts(weights: Sequence[int], shards: int) -> list[int]:
    """Into how many key ranges each table is split: a table larger than its share of the job
    (the total over ``shards``) gets as many as shares it would fill, up to ``shards``. Pure."""
    share = sum(weights) / shards if shards else 0
    if share <= 0:
        return [1] * len(weights)
    return [min(shards, math.ceil(w / share)) if w > share else 1 for w in weights]


def balance(weights: Sequence[int], shards: int) -> list[list[int]]:
    """The indexes of ``weights`` dealt into up to ``shards`` groups of about equal total: the
    heaviest first, each to the lightest group so far (ties: the lower index). Empty groups
    are left out. Pure and deterministic."""
    groups: list[list[int]] = [[] for _ in range(shards)]
    loads = [0] * shards
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        g = min(range(shards), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += weights[i]
    return [g for g in groups if g]


# -- plan ---------------------------------------------------------------------------------------


def _tasks(bulk: BulkPlan) -> list[_Task]:
    """The plan's tables resolved on their servers; a table that cannot be exported (missing,
    no key, no server) is refused here, as nothing could run it."""
    resolution = _resolve_on_servers(bulk)
    failed = [f"{t.table}: {t.error}" for t in resolution.tasks if t.error is not None]
    if failed:
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise UsageError(f"cannot shard the bulk plan {bulk.path}: {failed[0]}{more}")
    return list(resolution.tasks)


def plan_bulk_shards(
    plan: BulkPlan | str | os.PathLike[str],
    *,
    shards: int,
    sleep: Callable[[float], None] = time.sleep,
) -> BulkShardPlan:
    """Deal the tables of the bulk ``plan`` (its file, or the :class:`BulkPlan` loaded from
    one) into ``shards`` groups balanced by estimated size, the tables larger than their share
    split into key ranges; keep the plan beside the job report (``copystream-shards.json``)
    and return it. Planning again an unfinished job keeps the ranges first planned."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise UsageError(f"shards: expected an integer >= 1, got {shards!r}")
    bulk = plan if isinstance(plan, BulkPlan) else load_plan(plan)
    if isinstance(bulk.output_dir, S3Path):
        raise UsageError(f"a bulk job's shards cannot write to S3 yet ({bulk.output_dir})")
    if bulk.consistent or any(e.run.consistent for e in bulk.entries):
        raise UsageError(
            [Opt("consistent"), " cannot hold one snapshot across shards that run as separate "
             "tasks; run the job with ", Opt("jobs"), " in one process instead"]
        )  # fmt: skip
    tasks = _tasks(bulk)
    try:
        bulk.output_dir.mkdir(parents=True, exist_ok=True)
        for t in tasks:
            t.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory: {e}") from e
    weights = [t.estimated_bytes or 0 for t in tasks]
    units: list[Unit] = []
    for t, w, k in zip(tasks, weights, split_counts(weights, shards), strict=True):
        if k == 1:
            units.append(Unit(t.table, str(t.output), w))
            continue
        run = replace(t.run, workers=k, restart=False, force=False)
        _, count, started_at = plan_ranges(t.entry.dsn, t.spec, run, t.output, sleep)
        units += [Unit(t.table, str(t.output), w // count, i, count, started_at)
                  for i in range(count)]  # fmt: skip
    groups = balance([u.weight for u in units], shards)
    dealt = tuple(tuple(units[i] for i in g) for g in groups)
    shard_plan = BulkShardPlan(str(bulk.path.resolve()), dealt)
    path = bulk.output_dir / SHARDS_NAME
    atomic_write(path, json.dumps(shard_plan.to_json(), indent=1).encode() + b"\n")
    log.info("%s: %d tables in %d shards (%s)", bulk.path, len(tasks), shard_plan.shards, path)
    return shard_plan


# -- run ----------------------------------------------------------------------------------------


def _by_table(p: BulkShardPlan) -> tuple[BulkPlan, dict[str, _Task]]:
    bulk = load_plan(p.plan)
    return bulk, {t.table: t for t in _tasks(bulk)}


def run_bulk_shard(
    plan: BulkShardPlan | Mapping[str, Any] | str | os.PathLike[str],
    index: int,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> BulkShardResult:
    """Export the tables and ranges of shard ``index`` of a bulk plan's shards. Each resumes
    from its checkpoint; a finished one only re-verifies. One table's failure does not stop
    the others: the first is raised once the rest have run (run the shard again)."""
    p = BulkShardPlan.of(plan)
    if not 0 <= index < p.shards:
        raise UsageError(f"shard {index} does not exist: the plan has shards 0 to {p.shards - 1}")
    started = time.monotonic()
    _, tasks = _by_table(p)
    done: list[dict[str, Any]] = []
    failures: list[CopystreamError] = []
    for u in p.groups[index]:
        t = tasks.get(u.table)
        if t is None:
            raise UsageError(f"{u.table} is no longer in the bulk plan {p.plan}")
        try:
            done.append(_run_unit(t, u, progress))
        except CopystreamError as e:
            log.error("%s: %s", u.table, e)
            failures.append(e)
    if failures:
        raise failures[0]
    return BulkShardResult(index, p.shards, tuple(done), time.monotonic() - started)


def _run_unit(t: _Task, u: Unit, progress: Callable[[Progress], None] | None) -> dict[str, Any]:
    """Export one unit: a whole table as a bulk job's worker does, or one range of a table."""
    if u.range is not None:
        assert u.started_at is not None
        r = run_planned_range(t.entry.dsn, t.spec, t.run, u.output, u.started_at,
                              (u.range, u.ranges), progress=progress)  # fmt: skip
        return {"table": u.table, "range": u.range, "rows": r.rows, "bytes": r.bytes,
                "already_complete": r.already_complete, "resumed": r.resumed}  # fmt: skip
    run = replace(t.run, workers=1) if t.run.workers > 1 else t.run
    # what a bulk job's coordinator does for its workers (the table is this shard's alone):
    # the temporary files of a run killed while writing a small table's file go first
    for path in (Path(u.output), manifest_path(Path(u.output))):
        remove_stale_temporaries(path)
    done = export_task(t.entry.dsn or "", t.spec, u.output, run, t.resolved, progress=progress)
    staged = done.staged(Path(u.output))
    if staged is not None:  # a small table's file, for its caller to publish
        failed = publish([staged])[0]
        if failed is not None:
            raise failed
    e = done.result
    return {"table": u.table, "range": None, "rows": e.rows, "bytes": e.bytes,
            "already_complete": e.already_complete, "resumed": e.resumed}  # fmt: skip


# -- finish -------------------------------------------------------------------------------------


def finish_bulk_shards(
    plan: BulkShardPlan | Mapping[str, Any] | str | os.PathLike[str],
) -> BulkResult:
    """Join the split tables, check every table's manifest and file, write the job report
    (``copystream-report.json``) and return the job's result. Raises :class:`ExportFailed`
    naming the tables not finished yet (run their shards first). Idempotent."""
    p = BulkShardPlan.of(plan)
    started = time.monotonic()
    bulk, tasks = _by_table(p)
    units = [u for g in p.groups for u in g]
    for u in units:
        if u.range == 0 and u.started_at is not None:
            t = tasks[u.table]
            finish_planned_ranges(t.entry.dsn, t.spec, t.run, u.output, u.started_at)
    names = list(dict.fromkeys(u.table for u in units))
    outcomes, unfinished = [], []
    for name in names:
        t = tasks[name]
        manifest = load_manifest(t.output)
        if manifest is None:
            unfinished.append(name)
            continue
        verify_file(t.output)  # raises for a file that no longer matches its manifest
        outcome = _from_manifest(t, manifest, manifest.seconds)
        outcomes.append(replace(outcome, status="done", resumed=manifest.resumed))
    if unfinished:
        some = ", ".join(unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
        raise ExportFailed(
            f"{len(unfinished)} table(s) of {bulk.path} are not finished ({some}): every shard "
            "must be run before the job is finished",
            remedy=None,
        )
    return _reported(bulk, p, [tasks[n] for n in names], outcomes, started)


def _reported(
    bulk: BulkPlan,
    p: BulkShardPlan,
    tasks: Sequence[_Task],
    outcomes: Sequence[TableOutcome],
    started: float,
) -> BulkResult:
    """Write the job report of the finished shards; the job's result."""
    report = _Report(bulk, tasks, tasks, p.shards)
    for t, o in zip(tasks, outcomes, strict=True):
        report.set(t, o)
    seconds = time.monotonic() - started
    report.write(finished=True, warnings=(), seconds=seconds)
    with contextlib.suppress(FileNotFoundError):
        (bulk.output_dir / SHARDS_NAME).unlink()
        fsync_dir(bulk.output_dir)
    return BulkResult(bulk.path, tuple(outcomes), (), seconds, False, p.shards, bulk.report_path)
