"""Shards: one export cut into key ranges that any engine runs, on any machines.

Three calls, made in this order, each from wherever the engine runs it::

    plan = copystream.plan_shards(dsn, "public.orders", "/shared/orders.csv", shards=8)
    results = [copystream.run_shard(plan, i) for i in range(plan.shards)]   # map them anywhere
    copystream.finish_shards(plan)

This is a thin public layer over the machinery of ``workers`` (:mod:`copystream.ranges`), not
a second one: :func:`plan_shards` splits the key space as ``workers`` does and records the
ranges in the same ``OUTPUT.parts.json``; :func:`run_shard` runs range *i* as the job
:func:`~copystream.ranges.range_job` makes (the one ``workers`` runs in its pool), with the
same part file and checkpoint (``OUTPUT.part-NNNN``), so it resumes from that checkpoint after
any failure, on any machine that sees the same directory; :func:`finish_shards` joins the parts
as ``workers`` does (:func:`~copystream.join.join_parts`) and writes the same manifest. The
result is byte-identical to a single-process export. The files being the same, an export
begun with ``workers`` can be finished through shards and the other way round.

The plan (:class:`ShardPlan`) is JSON (what an engine passes between tasks: an Airflow XCom, a
Dask argument, a file in a Kubernetes volume) and is kept beside the output as
``OUTPUT.shards.json``. It holds the connection string without its password: each shard's
process gets the password as libpq does (``PGPASSWORD``, ``~/.pgpass``, a service file), or
is given a whole ``conninfo``.

A ``consistent`` (point-in-time) export cannot be sharded: its snapshot lives as long as the
session that exported it, and shards run as separate tasks, possibly on other machines, after
the planning task has ended. :func:`plan_shards` refuses it rather than produce an export that
is not point-in-time; ``workers`` in one process holds the snapshot for the whole run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from psycopg.conninfo import make_conninfo

from ._atomic import atomic_write, fsync_dir
from .checkpoint import Checkpoint, load_checkpoint
from .connection import Target
from .errors import CheckpointMismatch, ExportFailed, Opt, UsageError
from .export import ExportResult, _result
from .join import joined_outcomes
from .manifest import load_manifest
from .metrics import export_metrics
from .part import PartJob, PartOutcome
from .pipeline import (
    ExportSession,
    Run,
    assemble,
    check_output,
    discover_state,
    finish,
    start,
)
from .progress import Progress
from .ranges import (
    KeyRanges,
    load_parts,
    new_parts,
    part_path,
    range_job,
    remove_parts,
    run_range,
    save_parts,
)
from .s3url import is_s3
from .sizing import first_chunk_rows
from .spec import Compression, CopyOptions, ExportSpec, RunOptions, build, require_same
from .state import Complete, Resume

if TYPE_CHECKING:
    from .bulk.outcome import BulkResult
    from .bulk.shards import BulkShardPlan, BulkShardResult

#: What the shard calls take: a plan (one table's or a bulk plan's), its JSON, or its file.
AnyPlan = Union["ShardPlan", "BulkShardPlan", Mapping[str, Any], str, "os.PathLike[str]"]

__all__ = ["ShardPlan", "ShardResult", "finish_shards", "plan_shards", "run_shard", "shards_path"]

log = logging.getLogger("copystream")

SHARDS_VERSION = 1
#: Options a plan does not keep: they act once, when planning (``restart``, ``force``), or are
#: refused (``workers``: ``shards`` says how many ranges; ``consistent``: see the module).
_PLANNING_ONLY = ("restart", "force")


def shards_path(output: str | os.PathLike[str]) -> Path:
    """Where the shard plan of ``output`` is kept: ``OUTPUT.shards.json``."""
    out = Path(output)
    return out.with_name(out.name + ".shards.json")


@dataclass(frozen=True)
class ShardPlan:
    """A sharded export, as :func:`plan_shards` made it: JSON-serializable and deterministic.

    ``shards`` is the number of key ranges (fewer than asked when the table has fewer distinct
    keys); ``options`` are the export's keyword arguments; ``conninfo`` has no password;
    ``started_at`` ties the plan to its ranges (``OUTPUT.parts.json``).
    """

    output: str
    table: str
    shards: int
    conninfo: str
    options: dict[str, Any]
    started_at: str
    version: int = SHARDS_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON form (what ``OUTPUT.shards.json`` holds and an engine passes around)."""
        return {
            "kind": "copystream-shards",
            "version": self.version,
            "output": self.output,
            "table": self.table,
            "shards": self.shards,
            "conninfo": self.conninfo,
            "options": self.options,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ShardPlan:
        """Inverse of :meth:`to_json`; :class:`UsageError` when ``d`` is not a shard plan."""
        if d.get("kind") != "copystream-shards" or d.get("version") != SHARDS_VERSION:
            raise UsageError("not a copystream shard plan of a known version")
        try:
            return cls(
                output=str(d["output"]), table=str(d["table"]), shards=int(d["shards"]),
                conninfo=str(d["conninfo"]), options=dict(d["options"]),
                started_at=str(d["started_at"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"a damaged copystream shard plan: {e}") from e

    @classmethod
    def of(cls, plan: ShardPlan | Mapping[str, Any] | str | os.PathLike[str]) -> ShardPlan:
        """``plan`` itself, its JSON form, or the plan kept in the file ``plan``."""
        if isinstance(plan, ShardPlan):
            return plan
        if isinstance(plan, Mapping):
            return cls.from_json(plan)
        if is_s3(plan):  # s3://bucket/KEY.shards.json
            from .s3shards import load_shard_plan

            return load_shard_plan(str(plan))
        return cls.from_json(read_plan_file(plan))


def read_plan_file(path: str | os.PathLike[str]) -> Any:
    """The JSON in the shard plan file ``path`` (:class:`UsageError` when it cannot be read)."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read the shard plan {path}: {e}") from e


@dataclass(frozen=True)
class ShardResult:
    """What :func:`run_shard` did for one shard (its :meth:`to_json` goes into an XCom)."""

    index: int
    shards: int
    output: str
    table: str
    rows: int
    bytes: int
    chunks: int
    xxh3_128: str
    seconds: float
    resumed: bool  # this run continued the shard from its checkpoint
    already_complete: bool  # nothing to do: the shard (or the whole export) was finished
    retries: int

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "index": self.index, "shards": self.shards, "output": self.output,
            "table": self.table, "rows": self.rows, "bytes": self.bytes, "chunks": self.chunks,
            "xxh3_128": self.xxh3_128, "seconds": round(self.seconds, 3),
            "resumed": self.resumed, "already_complete": self.already_complete,
            "retries": self.retries,
        }  # fmt: skip


# -- plan ---------------------------------------------------------------------------------------


def _kept(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as the plan keeps them (JSON values). Raises for those a plan cannot take."""
    if options.get("consistent"):
        raise UsageError(
            [Opt("consistent"), " cannot hold one snapshot across shards that run as separate "
             "tasks (the snapshot ends with the session that planned them); export with ",
             Opt("workers"), " in one process for a point-in-time export"]
        )  # fmt: skip
    if options.get("metrics_file") is not None:
        raise UsageError(
            [Opt("metrics_file"), " would be written by every shard at once; push the shards' "
             "metrics to a Pushgateway instead (", Opt("pushgateway"), ")"]
        )  # fmt: skip
    if "workers" in options:
        raise UsageError([Opt("workers"), " does not apply to a shard plan (shards= does)"])
    kept: dict[str, Any] = {}
    for name, value in options.items():
        if name in _PLANNING_ONLY or value is None:
            continue
        if isinstance(value, Compression):
            value = str(value)
        elif isinstance(value, CopyOptions):
            kept.update({k: v for k, v in value.to_dict().items() if v not in (None, (), [])})
            continue
        elif isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            raise UsageError(f"{name}: a shard plan keeps JSON values, not {value!r}") from None
        kept[name] = value
    return kept


def _without_password(conninfo: str | None) -> str:
    params = Target(conninfo or "").params
    secret = ("password", "sslpassword")
    return make_conninfo(**{k: v for k, v in params.items() if k not in secret})


def plan_shards(
    conninfo: str | None,
    table: str,
    output: str | os.PathLike[str],
    *,
    shards: int,
    sleep: Callable[[float], None] = time.sleep,
    **options: Any,
) -> ShardPlan:
    """Split the export of ``table`` to ``output`` into ``shards`` key ranges balanced by
    sampled row counts (as ``workers`` does), record them beside the output
    (``OUTPUT.parts.json``, ``OUTPUT.shards.json``) and return the plan.

    ``options`` are :func:`export_table`'s (``workers`` and ``consistent`` excepted; see the
    module). Planning again the same export returns the same plan while it is unfinished (the
    ranges stay as first planned); ``restart=True`` discards it and plans anew.
    """
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise UsageError(f"shards: expected an integer >= 1, got {shards!r}")
    if is_s3(output):  # the same calls, in the bucket
        from .s3shards import plan_s3_shards

        return plan_s3_shards(conninfo, table, str(output), shards=shards, sleep=sleep, **options)
    kept = _kept(options)
    spec, run = build(table, **options, workers=shards)
    out = Path(output)
    qualified, count, started_at = plan_ranges(conninfo, spec, run, output, sleep)
    plan = ShardPlan(str(out), qualified, count, _without_password(conninfo), kept, started_at)
    atomic_write(shards_path(out), json.dumps(plan.to_json(), indent=1).encode() + b"\n")
    log.info("%s: %d shards planned in %s", plan.table, count, shards_path(out).name)
    return plan


def plan_ranges(
    conninfo: str | None,
    spec: ExportSpec,
    run: RunOptions,
    output: str | os.PathLike[str],
    sleep: Callable[[float], None],
) -> tuple[str, int, str]:
    """Split the export into ``run.workers`` key ranges recorded in ``OUTPUT.parts.json``
    (the ranges first planned, while they are unfinished); the table as the server names it,
    the number of ranges and their ``started_at``. For :func:`plan_shards` and the shards of a
    bulk plan (:mod:`copystream.bulk.shards`)."""
    if is_s3(output) or run.incremental:
        what = "an S3 output" if is_s3(output) else "an increment"
        raise UsageError(f"shards write a local file or Parquet dataset, not {what} (yet)")
    out = Path(output)
    check_output(out, directory=spec.options.format == "parquet")
    with ExportSession(conninfo, spec, out, run, sleep) as session:
        found = discover_state(session)
        if isinstance(found, Complete):
            return session.table.qualified, found.manifest.workers, found.manifest.started_at
        if isinstance(found, Resume) and found.checkpoint is not None:
            raise CheckpointMismatch(f"{out} has an unfinished single-process export")
        begun = start(session, found)
        ranges = begun.ranges
        if ranges is None:  # one range: start() does not split
            job = begun.job
            ranges = new_parts(session.spec.identity(), job.settings, job.started_at, [])
            remove_parts(out)
            save_parts(out, ranges)
    return session.table.qualified, len(ranges.ranges), ranges.started_at


# -- run ----------------------------------------------------------------------------------------


def _template(session: ExportSession, ranges: KeyRanges) -> PartJob:
    """The whole-range job the shards' jobs are made from (as ``workers`` makes it), from the
    export as ``session`` resolved it (the table, and a Parquet dataset's column types)."""
    out, table = session.output, session.table
    identity = {**session.spec.identity(), "range": None}
    require_same(ranges.export, identity, out.name + ".parts.json")
    return PartJob(
        conninfo=session.target.conninfo, table=table, spec=session.spec, run=session.run,
        path=str(out), settings=ranges.settings, started_at=ranges.started_at,
        first_rows=first_chunk_rows(table.estimated_rows, table.estimated_bytes),
    )  # fmt: skip


def _ranges(started_at: str, out: Path) -> KeyRanges | None:
    """The ranges planned at ``started_at`` on disk, or ``None`` when their export is
    finished."""
    ranges = load_parts(out)
    if ranges is None:
        manifest = load_manifest(out)
        if manifest is not None and manifest.started_at == started_at:
            return None
        raise UsageError(f"no ranges of a shard plan beside {out}: it was never planned or removed")
    if ranges.started_at != started_at:
        raise CheckpointMismatch(
            f"{out} was planned again since this shard plan was made ({ranges.started_at}, "
            f"not {started_at})"
        )
    return ranges


def run_shard(
    plan: AnyPlan,
    index: int,
    *,
    conninfo: str | None = None,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ShardResult | BulkShardResult:
    """Export shard ``index`` of ``plan`` (a :class:`ShardPlan`, its JSON, or its file).

    Idempotent: after any failure, here or on another machine, it resumes from the shard's
    checkpoint; after success it returns at once (``already_complete``), having re-hashed the
    shard's file against its checkpoint. ``conninfo`` replaces the plan's (which has no
    password). Raises like :func:`export_table`. Given a bulk plan's shards
    (:func:`copystream.plan_bulk_shards`), it runs :func:`~copystream.bulk.shards.run_bulk_shard`.
    """
    from .bulk.shards import is_bulk_shard_plan, run_bulk_shard

    if is_bulk_shard_plan(plan):
        _no_conninfo(conninfo)
        return run_bulk_shard(plan, index, progress=progress)  # type: ignore[arg-type]
    p = ShardPlan.of(plan)  # type: ignore[arg-type]
    if not 0 <= index < p.shards:
        raise UsageError(f"shard {index} does not exist: the plan has shards 0 to {p.shards - 1}")
    if is_s3(p.output):
        from .s3shards import run_s3_shard

        return run_s3_shard(p, index, conninfo=conninfo, progress=progress, sleep=sleep)
    spec, run = build(p.table, **p.options)
    dsn = p.conninfo if conninfo is None else conninfo
    return run_planned_range(dsn, spec, run, p.output, p.started_at, (index, p.shards),
                             progress=progress, sleep=sleep)  # fmt: skip


def run_planned_range(
    dsn: str | None,
    spec: ExportSpec,
    run: RunOptions,
    output: str,
    started_at: str,
    which: tuple[int, int],
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ShardResult:
    """Run range ``which[0]`` (of ``which[1]``) of the ranges planned at ``started_at`` beside
    ``output`` (:func:`plan_ranges`): :func:`run_shard` once its plan is read."""
    index, count = which
    out, started = Path(output), time.monotonic()
    ranges = _ranges(started_at, out)
    if ranges is None or ranges.join is not None:  # finished, or being joined: nothing to run
        return _finished(index, count, out, spec.table, started)
    # the table as the server resolves it now; never the output's lock (the shards run at once)
    with ExportSession(dsn, spec, out, run, sleep, lock_late=True) as session:
        table = session.table
    template = _template(session, ranges)
    done = load_checkpoint(part_path(out, index))
    already = done is not None and done.finished
    with export_metrics(run, table.qualified, progress, shard=str(index)) as (watch, metrics):
        # the range's entry point, as a ``workers`` pool runs it
        outcome = run_range(out, ranges, template, index, progress=watch, sleep=sleep)
        cp = outcome.checkpoint
        if metrics is not None:
            raw = cp.raw_bytes if cp.export.get("compress") else None
            metrics.succeeded(cp.rows, len(cp.chunks), cp.offset, raw, ran=not already)
    return ShardResult(
        index, count, output, table.qualified, cp.rows, cp.offset, len(cp.chunks),
        outcome.digest, time.monotonic() - started, outcome.resumed and not already, already,
        outcome.retries,
    )  # fmt: skip


def _finished(index: int, count: int, out: Path, table: str, started: float) -> ShardResult:
    """The result of a shard whose export is joined, or being joined (from its checkpoint,
    or, once the export is finished, from nothing: its figures are in the manifest)."""
    cp = load_checkpoint(part_path(out, index))
    rows, size, chunks, digest = (0, 0, 0, "") if cp is None else (
        cp.rows, cp.offset, len(cp.chunks), cp.xxh3_128)  # fmt: skip
    return ShardResult(index, count, str(out), table, rows, size, chunks, digest,
                       time.monotonic() - started, False, True, 0)  # fmt: skip


# -- finish -------------------------------------------------------------------------------------


def finish_shards(
    plan: AnyPlan,
    *,
    conninfo: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult | BulkResult:
    """Check every shard against its digests, join them into the output and write the
    manifest: the output is byte-identical to a single-process export, its manifest that of a
    ``workers`` export. Raises :class:`ExportFailed` naming the shards not finished yet (run
    them first). Idempotent: a finished export is reported ``already_complete``. Given a bulk
    plan's shards, it runs :func:`~copystream.bulk.shards.finish_bulk_shards`.
    """
    from .bulk.shards import finish_bulk_shards, is_bulk_shard_plan

    if is_bulk_shard_plan(plan):
        _no_conninfo(conninfo)
        return finish_bulk_shards(plan)  # type: ignore[arg-type]
    p = ShardPlan.of(plan)  # type: ignore[arg-type]
    if is_s3(p.output):
        from .s3shards import finish_s3_shards

        return finish_s3_shards(p, conninfo=conninfo, sleep=sleep)
    spec, run = build(p.table, **p.options)
    dsn = p.conninfo if conninfo is None else conninfo
    result = finish_planned_ranges(dsn, spec, run, p.output, p.started_at, sleep=sleep)
    with contextlib.suppress(FileNotFoundError):
        shards_path(Path(p.output)).unlink()
        fsync_dir(Path(p.output).parent)
    return result


def finish_planned_ranges(
    dsn: str | None,
    spec: ExportSpec,
    run: RunOptions,
    output: str,
    started_at: str,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult:
    """Join the ranges planned at ``started_at`` beside ``output`` and write the manifest
    (:func:`finish_shards` once its plan is read); a finished export: ``already_complete``."""
    out, started = Path(output), time.monotonic()
    with ExportSession(dsn, spec, out, run, sleep) as s:
        found = discover_state(s)
        if isinstance(found, Complete):
            m = found.manifest
            return _result(out, s.table, m, started, already=True, pit=m.point_in_time)
        ranges = _ranges(started_at, out)
        if not isinstance(found, Resume) or ranges is None or found.ranges != ranges:
            raise UsageError(f"no unfinished shard plan beside {out}")
        template = _template(s, ranges)
        # what ``workers`` does once its pool has run every range
        ran = assemble(out, ranges, _outcomes(out, ranges, template))
        manifest = finish(s, Run(template, ranges), ran, started)
    return _result(out, s.table, manifest, started, pit=False)


def _no_conninfo(conninfo: str | None) -> None:
    if conninfo is not None:
        raise UsageError("conninfo does not apply to a bulk plan's shards: the plan has its DSNs")


def _outcomes(out: Path, ranges: KeyRanges, template: PartJob) -> list[PartOutcome]:
    """Every shard's outcome from its finished checkpoint, its file re-hashed against it."""
    if ranges.join is not None:  # the join began: part files are being consumed
        return joined_outcomes(out, ranges)
    cps = []
    for i in range(len(ranges.ranges)):
        range_job(out, ranges, template, i)  # a foreign, damaged or edited part is refused
        cps.append(load_checkpoint(part_path(out, i)))
    return finished_outcomes(cps, out, "the shards are joined")


def finished_outcomes(
    cps: Sequence[Checkpoint | None], where: object, then: str
) -> list[PartOutcome]:
    """The shards' outcomes from their checkpoints ``cps`` (in shard order), once every one is
    finished; else :class:`ExportFailed` naming the shards of ``where`` that are not, and what
    has to wait for them (``then``)."""
    unfinished = [str(i) for i, cp in enumerate(cps) if cp is None or not cp.finished]
    if unfinished:
        raise ExportFailed(
            f"shard(s) {', '.join(unfinished)} of {len(cps)} of {where} are not finished: "
            f"every shard must be run before {then}",
            remedy=None,
        )
    return [PartOutcome(cp, cp.xxh3_128, 0, False, False) for cp in cps if cp is not None]
