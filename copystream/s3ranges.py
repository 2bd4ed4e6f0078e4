"""``workers`` (and shards) to ``s3://bucket/key``: key ranges uploading into one multipart upload.

The coordinator samples the key as a local ``workers`` export does
(:func:`~copystream.pipeline.sample_ranges`), starts one multipart upload and records both in
``KEY.parts.json`` (:class:`S3Ranges`). Each key range then runs in a worker process
(:func:`run_range`) with its own checkpoint ``KEY.part-NNNN.checkpoint.json`` in the bucket, and
uploads its parts into that one upload under the part numbers allotted to it: range ``i`` of
``n`` owns the block ``[i*B + 1, (i+1)*B]``, ``B = 10000 // n`` (:func:`numbers_of`); its parts
take the block's numbers from the second to the next to last, so its part size grows as the
range does (:func:`~copystream.destinations.s3.range_per`), and no range of an object S3 can
hold runs out of numbers.

Every part but the very last must be at least 5 MiB, a range's last part included, and a
range cannot know what the next one holds. So a range's first cut (its *head*, at least
5 MiB) and its last bytes (its *tail*, any size, maybe none) are not parts: they are stored as
the small objects ``KEY.part-NNNN.head`` and ``KEY.part-NNNN.tail``. When every range is done,
:func:`stitch` (pure) lays out the parts: between the parts of two ranges, one *seam* part
holds the tail of the first, whole ranges too small to have parts, and the head of the second
(so it is at least 5 MiB, being at least a head); the last seam, after the last range's parts,
may be small. A seam takes the first number of its range's block (the last seam: the last
number of the last block), so the numbers are in key order. Seams are copied once, through
this process (at most a few parts' worth per range: no join copy of the object); their numbers
and ETags are recorded in ``KEY.parts.json`` before the upload is completed, so a coordinator
killed there (or after the completion, before the manifest) finishes the same upload when run
again. The object is then read back once to compute its digests (as a resumed single-process
S3 export does) and the manifest is written; the ranges' objects are removed.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from . import s3url
from .checkpoint import Checkpoint, canonical_digest
from .destinations.s3 import (
    MAX_PARTS,
    PART_MIN,
    PIECE,
    Edges,
    S3Object,
    fresh_state,
    multipart_etag,
)
from .errors import CheckpointMismatch, CopystreamError, PrefixMismatch
from .join import _combined, combined_chunks
from .part import PartJob, PartOutcome, PartRunner
from .pipeline import ExportSession, sample_ranges, start
from .pool import Task
from .progress import Progress
from .ranges import KeyRanges, _run_in_pool
from .s3url import S3Url, classify
from .state import Fresh, Resume

__all__ = [
    "PLAN",
    "S3Ranges",
    "Seam",
    "load_plan",
    "numbers_of",
    "plan_ranges",
    "range_url",
    "remove_ranges",
    "run_range",
    "run_ranges",
    "stitch",
]

log = logging.getLogger("copystream")

#: The plan of a ``workers`` export to S3, beside the object.
PLAN = ".parts.json"
CHECKPOINT = ".checkpoint.json"


# -- pure decisions -----------------------------------------------------------------------------


def block(count: int) -> int:
    """Part numbers allotted to each of ``count`` ranges. Pure."""
    return MAX_PARTS // count


def numbers_of(index: int, count: int) -> tuple[int, int]:
    """The part numbers (first, last) range ``index`` of ``count`` uploads its parts under:
    its block without the first number (its seam's) and the last (the final seam's). Pure."""
    b = block(count)
    return index * b + 2, (index + 1) * b - 1


def range_url(url: S3Url, index: int) -> S3Url:
    """Where range ``index`` keeps its checkpoint, head and tail: ``KEY.part-NNNN...``."""
    return url.beside(f".part-{index:04d}")


class Seam(NamedTuple):
    """A part the end of the export uploads: the bytes of ``pieces`` (``(range, "head" or
    "tail", bytes)``) in order."""

    number: int
    pieces: tuple[tuple[int, str, int], ...]

    @property
    def bytes(self) -> int:
        """The part's size."""
        return sum(p[2] for p in self.pieces)


def stitch(states: Sequence[dict[str, Any]], count: int) -> list[Seam | dict[str, Any]]:
    """The parts of the object, in order, from the ranges' finished destination states: each a
    range's uploaded part (its record) or a :class:`Seam` (module docstring). Pure.

    Every part but the last is at least 5 MiB: a seam before a range's parts holds its head
    (at least 5 MiB); one after a range without parts is cut only once it is that large.
    """
    out: list[Seam | dict[str, Any]] = []
    pending: list[tuple[int, str, int]] = []
    for i, state in enumerate(states):
        edges = state["range"]
        if edges["tail"] is None:
            raise CheckpointMismatch(f"range {i} has not stored its last bytes: not finished")
        if edges["head"] is not None:
            pending.append((i, "head", int(edges["head"]["bytes"])))
        if state["parts"]:
            out.append(Seam(i * block(count) + 1, tuple(pending)))
            out.extend(state["parts"])
            pending = []
        if int(edges["tail"]["bytes"]):
            pending.append((i, "tail", int(edges["tail"]["bytes"])))
        large = sum(p[2] for p in pending) >= PART_MIN
        if not state["parts"] and large and i < count - 1:
            out.append(Seam(i * block(count) + 1, tuple(pending)))
            pending = []
    if pending or not out:
        out.append(Seam(count * block(count), tuple(pending)))
    return out


# -- the plan in the bucket -------------------------------------------------------------------


@dataclass(frozen=True)
class S3Ranges:
    """``KEY.parts.json``: the key ranges, the upload they share, and, once the end began,
    the parts it completes the upload with (``{"number", "etag", "bytes"}`` each)."""

    ranges: KeyRanges
    upload_id: str
    parts: tuple[dict[str, Any], ...] | None = None
    #: Of an increment to an object of its own: the export it follows (its manifest's
    #: ``since``; the first range begins after that export's last key).
    since: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form with a self-digest."""
        body: dict[str, Any] = {
            "kind": "copystream-s3-parts",
            "version": 1,
            "ranges": self.ranges.to_json(),
            "upload_id": self.upload_id,
            "parts": None if self.parts is None else list(self.parts),
        }
        if self.since is not None:  # absent otherwise: older plans keep their digest
            body["since"] = self.since
        return {**body, "plan_xxh3_128": canonical_digest(body)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> S3Ranges:
        """Inverse of :meth:`to_json`; ``ValueError`` on a damaged record."""
        body = {k: v for k, v in d.items() if k != "plan_xxh3_128"}
        if d.get("kind") != "copystream-s3-parts" or d.get("version") != 1:
            raise ValueError("not a copystream S3 parts plan of a known version")
        if canonical_digest(body) != d.get("plan_xxh3_128"):
            raise ValueError("its self-digest does not match (damaged or edited)")
        parts = d["parts"]
        since = dict(d["since"]) if d.get("since") is not None else None
        return cls(KeyRanges.from_json(d["ranges"]), str(d["upload_id"]),
                   None if parts is None else tuple(dict(p) for p in parts), since)  # fmt: skip


def load_plan(side: Any) -> S3Ranges | None:
    """The plan beside the object, or ``None``; a damaged one raises."""
    got = side.get(PLAN)
    if got is None:
        return None
    try:
        return S3Ranges.from_json(json.loads(got))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatch(f"{side.url}{PLAN} cannot be used: {e}") from e


def save_plan(side: Any, plan: S3Ranges) -> None:
    """Write the plan beside the object."""
    side.put(PLAN, json.dumps(plan.to_json(), indent=1).encode() + b"\n")


# -- one range, in a worker ---------------------------------------------------------------------


def run_range(
    output: str,
    upload_id: str,
    count: int,
    index: int,
    job: PartJob,
    *,
    progress: Callable[[Progress], None] | None = None,
) -> PartOutcome:
    """Export key range ``index`` of ``count`` into the upload ``upload_id`` of ``output``:
    create or resume its checkpoint in the bucket, run its chunks, store its tail. Idempotent
    (a finished range returns at once), from any machine."""
    from .s3export import Sidecars

    url = s3url.parse(output)
    side = Sidecars(s3url.client(job.run.policy), range_url(url, index))
    cp = side.load_checkpoint()
    resumed = cp is not None and bool(cp.chunks)
    if cp is not None:
        cp.check_same_export(job.identity, Path(f"{side.url}{CHECKPOINT}"))
        if cp.destination.get("upload_id") != upload_id:
            raise CheckpointMismatch(f"{side.url}{CHECKPOINT} belongs to another upload")
        if cp.finished and cp.destination["range"]["tail"] is not None:
            return PartOutcome(cp, cp.xxh3_128, 0, True, False)
        if job.run.chunk_rows is not None:
            cp = replace(cp, chunk_rows=job.run.chunk_rows)
        dest = S3Object.resume(side.client, url, cp.destination, cp.offset)
    else:
        edges = Edges(side.url.key, numbers_of(index, count))
        compress = job.spec.identity().get("compress")
        dest = S3Object(side.client, url, fresh_state(url, upload_id, compress, edges), 0)
        cp = job.first_checkpoint(dest.state())
        side.save_checkpoint(cp)
    runner = PartRunner(job, Path(side.url.key), progress=progress, sleep=time.sleep,
                        save=side.save_checkpoint)  # fmt: skip
    try:
        cp = runner.run_chunks(cp, dest)
        cp = replace(cp, destination=dest.flush())  # the tail
        side.save_checkpoint(cp)
    finally:
        dest.close()
        runner.close()
    return PartOutcome(cp, cp.xxh3_128, runner.retries, resumed, runner.snapshot_lost)


# -- the coordinator ----------------------------------------------------------------------------


def run_ranges(
    side: Any,
    session: ExportSession,
    found: Fresh | Resume,
    workers: int,
    progress: Callable[[Progress], None] | None,
    since: dict[str, Any] | None = None,
) -> tuple[Checkpoint, list[PartOutcome], bool]:
    """Run (or resume) every key range of the export to ``side.url`` with up to ``workers``
    processes and complete its upload. The whole object's checkpoint, the ranges' outcomes,
    and whether every chunk was read from the export's snapshot. ``since``: of an increment,
    the export it follows (its rows are those after that export's last key)."""
    plan, template = plan_ranges(side, session, found, workers, since)
    session.close_connection()
    outcomes = _run(side, plan, template, workers, progress)
    final = finish_upload(side, plan, outcomes)
    kept = template.snapshot is not None and not any(o.snapshot_lost for o in outcomes)
    return final, outcomes, kept


def plan_ranges(
    side: Any,
    session: ExportSession,
    found: Fresh | Resume,
    count: int,
    since: dict[str, Any] | None = None,
) -> tuple[S3Ranges, PartJob]:
    """The plan in the bucket (a new one when ``found`` is :class:`Fresh`: the key sampled into
    ``count`` ranges, after ``since``'s last key for an increment, the upload started, the
    plan saved) and the whole-range job."""
    plan = load_plan(side) if isinstance(found, Resume) else None
    if plan is not None and plan.since != since:
        raise CheckpointMismatch(
            f"{side.url}{PLAN} is of another export than the increment asked for"
        )
    begun = start(session, found if plan is None else Resume(None, plan.ranges))
    if plan is None:
        job = begun.job
        after = tuple(since["last_key"]) if since and since["last_key"] is not None else None
        ranges = sample_ranges(session, count, job.settings, job.started_at, job.snapshot, after)
        try:
            upload = side.client.create_multipart_upload(Bucket=side.url.bucket, Key=side.url.key)
        except Exception as e:
            raise classify(e, side.url, "starting the upload") from e
        plan = S3Ranges(ranges, str(upload["UploadId"]), since=since)
        save_plan(side, plan)
    return plan, begun.job


def range_jobs(template: PartJob, ranges: KeyRanges) -> list[PartJob]:
    """The job of each key range (its bounds; the first carries the header)."""
    return [
        replace(template, lower=lo, upper=hi, first=i == 0, ranged=True, state=None)
        for i, (lo, hi) in enumerate(ranges.ranges)
    ]


def _run(
    side: Any,
    plan: S3Ranges,
    template: PartJob,
    workers: int,
    progress: Callable[[Progress], None] | None,
) -> list[PartOutcome]:
    jobs = range_jobs(template, plan.ranges)
    count = len(jobs)
    tasks = [
        Task(functools.partial(run_range, str(side.url), plan.upload_id, count, i), (job,))
        for i, job in enumerate(jobs)
    ]
    table = template.table
    log.info("%s: %d key ranges into one upload to %s", table.qualified, count, side.url)
    chunks = functools.partial(_chunks_of, side)
    return _run_in_pool(
        jobs, tasks, workers, table.qualified, table.estimated_rows, progress, chunks
    )


def _chunks_of(side: Any, index: int) -> int:
    """The chunks range ``index``'s checkpoint in the bucket records (-1: it has none)."""
    from .s3export import Sidecars

    try:
        cp = Sidecars(side.client, range_url(side.url, index)).load_checkpoint()
    except CopystreamError:
        return 0
    return len(cp.chunks) if cp is not None else -1


def finish_upload(side: Any, plan: S3Ranges, outcomes: Sequence[PartOutcome]) -> Checkpoint:
    """Upload the seams, complete the upload (once), read the object back: its checkpoint."""
    if plan.parts is None:
        layout = stitch([o.checkpoint.destination for o in outcomes], len(outcomes))
        parts = tuple(
            _seam(side, plan.upload_id, p) if isinstance(p, Seam) else dict(p) for p in layout
        )
        plan = replace(plan, parts=parts)
        save_plan(side, plan)  # before the completion: a re-run completes these parts
    assert plan.parts is not None
    _complete(side, plan.upload_id, plan.parts)
    from .s3export import _read_back

    destination: dict[str, Any] = {
        "kind": "s3", "bucket": side.url.bucket, "key": side.url.key,
        "upload_id": plan.upload_id, "parts": list(plan.parts),
    }  # fmt: skip
    final = _combined(plan.ranges, outcomes, combined_chunks(outcomes), "", destination)
    digest, final = _read_back(side, final)  # the whole object's digests, every chunk checked
    return replace(final, xxh3_128=digest)


def _seam(side: Any, upload_id: str, seam: Seam) -> dict[str, Any]:
    """Upload one seam part (its pieces read from the ranges' head and tail objects)."""
    url: S3Url = side.url
    with tempfile.TemporaryFile(prefix="copystream-seam-") as f:
        for index, which, _ in seam.pieces:
            piece = S3Url(url.bucket, f"{range_url(url, index).key}.{which}")
            try:
                body = side.client.get_object(Bucket=piece.bucket, Key=piece.key)["Body"]
                with contextlib.closing(body):
                    while data := body.read(PIECE):
                        f.write(data)
            except Exception as e:
                raise classify(e, url, f"reading {piece}") from e
        if f.tell() != seam.bytes:
            raise PrefixMismatch(f"the head and tail objects of {url} are not the recorded size")
        f.seek(0)
        try:
            answer = side.client.upload_part(
                Bucket=url.bucket, Key=url.key, UploadId=upload_id,
                PartNumber=seam.number, Body=f, ContentLength=seam.bytes,
            )  # fmt: skip
        except Exception as e:
            raise classify(e, url, f"uploading part {seam.number}") from e
    return {"number": seam.number, "etag": str(answer["ETag"]), "bytes": seam.bytes}


def _complete(side: Any, upload_id: str, parts: Sequence[dict[str, Any]]) -> None:
    """Complete the upload; if it is gone, the object must be its completion (a re-run)."""
    from botocore.exceptions import ClientError

    url: S3Url = side.url
    listed = [{"PartNumber": int(p["number"]), "ETag": str(p["etag"])} for p in parts]
    t0 = time.monotonic()
    try:
        side.client.complete_multipart_upload(
            Bucket=url.bucket, Key=url.key, UploadId=upload_id,
            MultipartUpload={"Parts": listed},
        )  # fmt: skip
        log.info("%s: upload completed (%d parts) in %.2fs", url, len(parts),
                 time.monotonic() - t0)  # fmt: skip
        return
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") != "NoSuchUpload":
            raise classify(e, url, "completing the upload") from e
    except Exception as e:
        raise classify(e, url, "completing the upload") from e
    head = side.head()
    if head is None or head["ETag"] != multipart_etag([str(p["etag"]) for p in parts]):
        raise PrefixMismatch(f"the multipart upload to {url} is gone (aborted) before it completed")


def remove_ranges(side: Any) -> None:
    """Delete the plan and every range's objects (checkpoint, head, tail)."""
    side.delete(PLAN)
    for key in side.keys_under(".part-"):
        side.client.delete_object(Bucket=side.url.bucket, Key=key)
