"""Shards of an export to ``s3://bucket/key``: :mod:`copystream.shards`' three calls, in the bucket.

The shards are the key ranges of a ``workers`` export to S3 (:mod:`copystream.s3ranges`), so
the three calls are thin: :func:`plan_s3_shards` samples the key, starts the one multipart
upload and records both in ``KEY.parts.json``, and the :class:`~copystream.shards.ShardPlan`
in ``KEY.shards.json``; :func:`run_s3_shard` runs range *i* (:func:`~copystream.s3ranges.run_range`,
what a ``workers`` export runs in its pool) from its checkpoint in the bucket, so it needs
nothing local and resumes on any machine; :func:`finish_s3_shards` checks that every range is
finished, uploads the seams, completes the upload, reads the object back and writes the
manifest. An export begun with ``workers`` can be finished through shards and the other way
round, as for a local output.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import s3url
from .errors import CheckpointMismatch, CopystreamError, OutputExists, UsageError
from .export import ExportResult, _result
from .metrics import export_metrics
from .part import PartOutcome
from .progress import Progress
from .s3export import S3Session, Sidecars, discover, open_output, publish_ranges, restart
from .s3ranges import S3Ranges, load_plan, plan_ranges, range_jobs, range_url, run_range
from .shards import (
    ShardPlan,
    ShardResult,
    _kept,
    _template,
    _without_password,
    finished_outcomes,
)
from .spec import build
from .state import Complete, Fresh, Occupied, Resume

__all__ = ["SHARDS", "finish_s3_shards", "load_shard_plan", "plan_s3_shards", "run_s3_shard"]

#: The shard plan's object, beside the output object.
SHARDS = ".shards.json"


def plan_s3_shards(
    conninfo: str | None,
    table: str,
    output: str,
    *,
    shards: int,
    sleep: Callable[[float], None],
    **options: Any,
) -> ShardPlan:
    """:func:`~copystream.shards.plan_shards` for an ``s3://`` output."""
    kept = _kept(options)
    spec, run = build(table, **options)
    side = open_output(output, spec, run)
    with S3Session(conninfo, spec, Path(side.url.key), replace(run, workers=1), sleep) as s:
        if run.restart:
            restart(side)
            side.delete(SHARDS)
        found = discover(side, s.spec.identity())
        if isinstance(found, Complete):
            count, started_at = found.manifest.workers, found.manifest.started_at
        elif isinstance(found, Resume) and found.checkpoint is not None:
            raise CheckpointMismatch(f"{output} has an unfinished single-process export")
        else:
            if isinstance(found, Occupied):
                if not run.force:
                    raise OutputExists(f"{output} exists and has no checkpoint to resume from")
                found = Fresh()
            plan, _ = plan_ranges(side, s, found, shards)
            count, started_at = len(plan.ranges.ranges), plan.ranges.started_at
    shard_plan = ShardPlan(output, s.table.qualified, count, _without_password(conninfo), kept,
                           started_at)  # fmt: skip
    side.put(SHARDS, json.dumps(shard_plan.to_json(), indent=1).encode() + b"\n")
    return shard_plan


def load_shard_plan(url: str) -> ShardPlan:
    """The shard plan kept in the bucket at ``url`` (``s3://bucket/KEY.shards.json``)."""
    where = s3url.parse(url)
    if not where.key.endswith(SHARDS):
        raise UsageError(f"{url} is not a shard plan (KEY{SHARDS})")
    side = Sidecars(s3url.client(), s3url.S3Url(where.bucket, where.key[: -len(SHARDS)]))
    data = side.get(SHARDS)
    if data is None:
        raise UsageError(f"cannot read the shard plan {url}: it does not exist")
    try:
        return ShardPlan.from_json(json.loads(data))
    except ValueError as e:
        raise UsageError(f"cannot read the shard plan {url}: {e}") from e


def _plan_of(side: Sidecars, p: ShardPlan) -> S3Ranges | None:
    """The key ranges of ``p`` in the bucket, or ``None`` when its export is finished."""
    plan = load_plan(side)
    if plan is None:
        manifest = side.load_manifest()
        if manifest is not None and manifest.started_at == p.started_at:
            return None
        raise UsageError(f"no key ranges of a shard plan beside {side.url}: none, or removed")
    if plan.ranges.started_at != p.started_at:
        raise CheckpointMismatch(
            f"{side.url} was planned again since this shard plan was made "
            f"({plan.ranges.started_at}, not {p.started_at})"
        )
    return plan


def run_s3_shard(
    p: ShardPlan,
    index: int,
    *,
    conninfo: str | None,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
) -> ShardResult:
    """:func:`~copystream.shards.run_shard` for an ``s3://`` output."""
    started = time.monotonic()
    spec, run = build(p.table, **p.options)
    side = open_output(p.output, spec, run)
    plan = _plan_of(side, p)
    range_side = Sidecars(side.client, range_url(side.url, index))
    before = range_side.load_checkpoint()
    if plan is None or plan.parts is not None:  # finished, or being finished: nothing to run
        return _result_of(p, index, before, started, already=True)
    dsn = p.conninfo if conninfo is None else conninfo
    with S3Session(dsn, spec, Path(side.url.key), run, sleep, lock_late=True) as session:
        table = session.table
        template = _template(session, plan.ranges)
    job = range_jobs(template, plan.ranges)[index]
    already = before is not None and before.finished and before.destination["range"]["tail"]
    with export_metrics(run, table.qualified, progress, shard=str(index)) as (watch, metrics):
        outcome = run_range(p.output, plan.upload_id, p.shards, index, job, progress=watch)
        cp = outcome.checkpoint
        if metrics is not None:
            raw = cp.raw_bytes if cp.export.get("compress") else None
            metrics.succeeded(cp.rows, len(cp.chunks), cp.offset, raw, ran=not already)
    result = _result_of(p, index, cp, started, already=bool(already))
    return replace(result, resumed=outcome.resumed and not already, retries=outcome.retries)


def _result_of(p: ShardPlan, index: int, cp: Any, started: float, *, already: bool) -> ShardResult:
    rows, size, chunks, digest = (0, 0, 0, "") if cp is None else (
        cp.rows, cp.offset, len(cp.chunks), cp.xxh3_128)  # fmt: skip
    return ShardResult(index, p.shards, p.output, p.table, rows, size, chunks, digest,
                       time.monotonic() - started, False, already, 0)  # fmt: skip


def finish_s3_shards(
    p: ShardPlan, *, conninfo: str | None, sleep: Callable[[float], None]
) -> ExportResult:
    """:func:`~copystream.shards.finish_shards` for an ``s3://`` output."""
    from .s3ranges import finish_upload

    started = time.monotonic()
    spec, run = build(p.table, **p.options)
    side = open_output(p.output, spec, run)
    dsn = p.conninfo if conninfo is None else conninfo
    with S3Session(dsn, spec, Path(side.url.key), run, sleep) as s:
        found = discover(side, s.spec.identity())
        if isinstance(found, Complete):
            m = found.manifest
            return _result(p.output, s.table, m, started, already=True, pit=m.point_in_time)
        plan = _plan_of(side, p)
        if plan is None or not isinstance(found, Resume) or found.ranges is None:
            raise UsageError(f"no unfinished shard plan beside {p.output}")
        outcomes = _outcomes(side, len(plan.ranges.ranges))
        final = finish_upload(side, plan, outcomes)
        manifest = publish_ranges(side, s.table, final, outcomes, started, pit=False)
    with contextlib.suppress(CopystreamError):
        side.delete(SHARDS)
    return _result(p.output, s.table, manifest, started, pit=False)


def _outcomes(side: Sidecars, count: int) -> list[PartOutcome]:
    """Every shard's outcome from its finished checkpoint in the bucket (with its tail
    stored: a range is finished only then)."""
    cps = [Sidecars(side.client, range_url(side.url, i)).load_checkpoint() for i in range(count)]
    done = [cp if cp is not None and cp.destination["range"]["tail"] is not None else None
            for cp in cps]  # fmt: skip
    return finished_outcomes(done, side.url, "the upload is completed")
