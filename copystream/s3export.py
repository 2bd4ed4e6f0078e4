"""Export to ``s3://bucket/key``: the pipeline of :mod:`copystream.pipeline`, kept in the bucket.

The chunk loop is the same (:class:`~copystream.part.PartRunner`), writing to an
:class:`~copystream.destinations.s3.S3Object`; what a local export keeps beside its file is kept
beside the object instead, so that a resume from another machine finds it: the checkpoint
``KEY.checkpoint.json`` (rewritten after each uploaded part) and the manifest
``KEY.manifest.json``. No lock file guards an S3 output: every checkpoint write is conditional
on the checkpoint being the one this run last read or wrote (``If-Match``, or ``If-None-Match``
for the first), so of two runs writing one object the second to write is refused, and S3
refuses to complete an upload whose parts were overwritten by another run (their ETags differ).

:func:`run_s3_export`, :func:`s3_status` and :func:`verify_s3` are what
:func:`~copystream.export.run_export`, :func:`~copystream.export.export_status` and
:func:`~copystream.manifest.verify_file` do for an ``s3://`` output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import s3url
from .checkpoint import Checkpoint
from .destinations.s3 import Hashed, S3Object, hash_object, head_object
from .errors import (
    CheckpointMismatch,
    CopystreamError,
    OutputExists,
    OutputProblem,
    UsageError,
    VerificationFailed,
)
from .export import ExportResult, ExportStatus, _result
from .incremental import manifest_fields
from .manifest import Manifest, VerifyResult
from .part import PartJob, PartOutcome, PartRunner
from .pipeline import ExportSession, manifest_of, start
from .pool import started_ahead
from .progress import Progress
from .ranges import KeyRanges
from .retry import RetryPolicy
from .s3increment import abort_append, begin_append, begin_since, check_s3_request
from .s3ranges import PLAN, load_plan, range_url, remove_ranges, run_ranges
from .s3url import S3Url, classify
from .spec import ExportSpec, RunOptions, identity_mismatch, require_same
from .state import Complete, Fresh, Occupied, OnDisk, Resume, manifest_identity
from .table import ResolvedTable

__all__ = [
    "S3Session",
    "Sidecars",
    "discover",
    "open_output",
    "publish_ranges",
    "restart",
    "run_s3_export",
    "s3_status",
    "verify_s3",
]

log = logging.getLogger("copystream")

CHECKPOINT, MANIFEST = ".checkpoint.json", ".manifest.json"


class Sidecars:
    """The checkpoint and manifest objects beside an S3 output, and the output's own answers.

    Checkpoint writes are conditional on the ETag this object last read or wrote, so a second
    writer is refused (:class:`OutputProblem`) instead of overwriting the first one's record.
    """

    def __init__(self, client: Any, url: S3Url) -> None:
        self.client, self.url = client, url
        self.etag: str | None = None  # of the checkpoint as this run last saw it

    def _get(self, suffix: str) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        where = self.url.beside(suffix)
        try:
            got = self.client.get_object(Bucket=where.bucket, Key=where.key)
            return got["Body"].read(), str(got["ETag"])
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise classify(e, self.url, f"reading {where}") from e
        except Exception as e:
            raise classify(e, self.url, f"reading {where}") from e

    def get(self, suffix: str) -> bytes | None:
        """The object beside the output with ``suffix``, or ``None`` when there is none."""
        got = self._get(suffix)
        return None if got is None else got[0]

    def put(self, suffix: str, data: bytes) -> None:
        """Write the object beside the output with ``suffix``."""
        self._call(f"writing {self.url}{suffix}", "put_object", suffix, Body=data)

    def keys_under(self, suffix: str) -> list[str]:
        """The keys of the objects whose key starts with the output's and ``suffix``."""
        keys, kw = [], dict[str, Any]()
        prefix = self.url.key + suffix
        while True:
            try:
                page = self.client.list_objects_v2(Bucket=self.url.bucket, Prefix=prefix, **kw)
            except Exception as e:
                raise classify(e, self.url, f"listing the objects beside {self.url}") from e
            keys += [str(o["Key"]) for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return keys
            kw = {"ContinuationToken": page["NextContinuationToken"]}

    def load_checkpoint(self) -> Checkpoint | None:
        """The checkpoint beside the object, or ``None``; a damaged one raises."""
        got = self._get(CHECKPOINT)
        if got is None:
            return None
        self.etag = got[1]
        try:
            return Checkpoint.from_json(json.loads(got[0]))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatch(f"{self.url}{CHECKPOINT} cannot be used: {e}") from e

    def save_checkpoint(self, cp: Checkpoint) -> None:
        """Replace the checkpoint, unless another run replaced it since this one saw it."""
        from botocore.exceptions import ClientError

        data = json.dumps(cp.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
        where = self.url.beside(CHECKPOINT)
        cond = {"IfMatch": self.etag} if self.etag else {"IfNoneMatch": "*"}
        try:
            put = self.client.put_object(
                Bucket=where.bucket, Key=where.key, Body=data + b"\n", **cond
            )
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
                raise OutputProblem(
                    f"{where} was changed by another process: two exports are writing {self.url}"
                ) from e
            raise classify(e, self.url, f"writing {where}") from e
        except Exception as e:
            raise classify(e, self.url, f"writing {where}") from e
        self.etag = str(put["ETag"])

    def load_manifest(self) -> Manifest | None:
        """The manifest beside the object, or ``None``; a damaged one raises."""
        got = self._get(MANIFEST)
        if got is None:
            return None
        try:
            return Manifest.from_json(json.loads(got[0]))
        except (ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{self.url}{MANIFEST} is not a readable manifest: {e}") from e

    def save_manifest(self, manifest: Manifest) -> None:
        """Write the manifest beside the object."""
        data = json.dumps(manifest.to_json(), indent=1, ensure_ascii=False).encode() + b"\n"
        self._call("writing the manifest", "put_object", MANIFEST, Body=data)

    def delete(self, suffix: str = "") -> None:
        """Delete the object (``""``) or the one beside it with ``suffix``."""
        self._call(f"deleting {self.url}{suffix}", "delete_object", suffix)
        if suffix == CHECKPOINT:
            self.etag = None

    def _call(self, doing: str, method: str, suffix: str, **kw: Any) -> Any:
        where = self.url.beside(suffix)
        try:
            return getattr(self.client, method)(Bucket=where.bucket, Key=where.key, **kw)
        except Exception as e:
            raise classify(e, self.url, doing) from e

    def head(self) -> dict[str, Any] | None:
        """The output object's ``HeadObject`` answer, or ``None`` when there is none."""
        return head_object(self.client, self.url)

    def read_back(self, chunks: Any, compress: dict[str, Any] | None, *, deep: bool) -> Hashed:
        """Stream the object and hash it chunk by chunk (``ValueError``: the chunk that differs)."""
        body = self._call(f"reading {self.url}", "get_object", "")["Body"]
        try:
            return hash_object(body.read, chunks, compress, deep=deep)
        finally:
            body.close()

    def abort_uploads(self) -> int:
        """Abort every unfinished multipart upload to the object's key; how many there were."""
        aborted, kw = 0, dict[str, Any]()
        while True:
            try:
                page = self.client.list_multipart_uploads(
                    Bucket=self.url.bucket, Prefix=self.url.key, **kw
                )
            except Exception as e:
                raise classify(e, self.url, "listing the unfinished uploads") from e
            for u in page.get("Uploads", []):
                if u["Key"] == self.url.key:
                    self._call(
                        "aborting a stale upload", "abort_multipart_upload", "",
                        UploadId=u["UploadId"],
                    )  # fmt: skip
                    aborted += 1
            if not page.get("IsTruncated"):
                return aborted
            kw = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}


def _open(output: str, policy: RetryPolicy | None = None) -> Sidecars:
    """The client for ``output``, after checking that its bucket can be reached (a usage error,
    exit 2, when it is missing, the credentials are, or they may not read it: at once, with
    botocore's few retries only, as a wrong database address is)."""
    url = s3url.parse(output)
    side = Sidecars(s3url.client(policy), url)
    try:
        side.client.raw.head_bucket(Bucket=url.bucket)
    except Exception as e:
        error = classify(e, url, "checking the bucket")
        if not isinstance(error, UsageError):
            error = OutputProblem(f"cannot reach {output}: {error.problem}")
        raise error from e
    return side


class S3Session(ExportSession):
    """An export session without a lock file: the checkpoint's conditional writes guard."""

    def lock(self) -> bool:
        return False


def run_s3_export(
    conninfo: str | None,
    spec: ExportSpec,
    output: str,
    run: RunOptions | None = None,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    table: ResolvedTable | None = None,
    snapshot: str | None = None,
) -> ExportResult:
    """:func:`~copystream.export.run_export` to ``s3://bucket/key`` (``table``: planned
    already, as a bulk job's coordinator does; ``snapshot``: an exported one to read, a bulk
    job's)."""
    started = time.monotonic()
    run = run or RunOptions()
    side = open_output(output, spec, run)  # before anything is read from PostgreSQL
    # the key ranges of ``workers`` are split and recorded here, in the bucket (s3ranges)
    one = replace(run, workers=1)
    with S3Session(
        conninfo, spec, Path(side.url.key), one, sleep, table=table, snapshot=snapshot
    ) as session:
        append = run.incremental and run.since is None and spec.watermark is None
        if run.restart and append:
            abort_append(side)  # the object and its manifest stay
        elif run.restart:
            restart(side)
        found = discover(side, session.spec.identity())
        increment = run.since is not None or spec.watermark is not None
        follows = None
        if increment:  # after another export, or a watermark one: to a new object
            follows, found = begin_since(side, session, found, workers=run.workers)
        elif append:  # to the object itself: a new upload that begins with it
            found = begin_append(side, session, found, workers=run.workers)
        if isinstance(found, Complete):
            log.info("%s: %s is already complete and verifies; nothing to do", spec.table, output)
            m = found.manifest
            return _result(output, session.table, m, started, already=True, pit=m.point_in_time)
        if isinstance(found, Occupied):  # an object no checkpoint or manifest explains
            if not run.force:
                raise OutputExists(f"{output} exists and has no checkpoint to resume from")
            side.delete(MANIFEST)
            found = Fresh()
        if (isinstance(found, Fresh) and run.workers > 1) or (
            isinstance(found, Resume) and found.ranges is not None
        ):
            return _run_workers(side, session, found, run.workers, progress, started, follows)
        begun = start(session, found)
        session.close_connection()
        cp, digest, retries, lost = _run_part(side, begun.job, found, progress, sleep)
        resumed = isinstance(found, Resume)
        pit = begun.job.snapshot is not None and not lost and not resumed
        manifest = manifest_of(
            session.table, cp, digest, started, resumed=resumed, workers=1, point_in_time=pit
        )
        if increment or append:  # what it follows, its watermark; an append's history
            old = side.load_manifest() if append else None  # the object's until rewritten
            fields = manifest_fields(
                cp, old, finished_at=manifest.finished_at, seconds=manifest.seconds
            )
            manifest = replace(manifest, **fields)
        side.save_manifest(manifest)
        side.delete(CHECKPOINT)
    return _result(
        output, session.table, manifest, started, resumed=resumed, retries=retries, pit=pit
    )


def open_output(output: str, spec: ExportSpec, run: RunOptions) -> Sidecars:
    """The sidecars of ``output`` once the export is known to be one S3 can take and the
    bucket reachable (else a usage error, before anything is read from PostgreSQL)."""
    if spec.options.format == "parquet":
        raise UsageError(f"a Parquet dataset cannot be written to S3 yet ({output})")
    check_s3_request(spec, run, output)  # increments: copystream.s3increment
    return _open(output, run.policy)


def restart(side: Sidecars) -> None:
    """Discard everything of an export to ``side.url``: unfinished uploads, the object, its
    checkpoint, manifest and key ranges."""
    aborted = side.abort_uploads()
    for suffix in (CHECKPOINT, MANIFEST, ""):
        side.delete(suffix)
    remove_ranges(side)
    log.info("%s: restarting (%d unfinished upload(s) aborted)", side.url, aborted)


def publish_ranges(
    side: Sidecars,
    table: ResolvedTable,
    cp: Checkpoint,
    outcomes: Sequence[PartOutcome],
    started: float,
    *,
    pit: bool,
    since: dict[str, Any] | None = None,
) -> Manifest:
    """Write the manifest of a completed key-range upload (``since``: of an increment, the
    export it follows); remove the ranges' objects."""
    manifest = manifest_of(
        table, cp, cp.xxh3_128, started, resumed=any(o.resumed for o in outcomes),
        workers=len(outcomes), point_in_time=pit,
    )  # fmt: skip
    if since is not None:
        manifest = replace(manifest, since=since)
    side.save_manifest(manifest)
    remove_ranges(side)
    return manifest


def _run_workers(
    side: Sidecars,
    session: ExportSession,
    found: Fresh | Resume,
    workers: int,
    progress: Callable[[Progress], None] | None,
    started: float,
    since: dict[str, Any] | None = None,
) -> ExportResult:
    """Run the export's key ranges in worker processes into one upload (:mod:`.s3ranges`);
    ``since``: of an increment, the export it follows."""
    # the workers' interpreters start (and import boto3) while the key is sampled
    preload = ("copystream.s3ranges", "boto3", "botocore.client")
    with started_ahead(max(1, workers), preload=preload):
        cp, outcomes, kept = run_ranges(side, session, found, workers, progress, since)
    resumed = any(o.resumed for o in outcomes)
    pit = kept and not resumed
    manifest = publish_ranges(side, session.table, cp, outcomes, started, pit=pit, since=since)
    retries = sum(o.retries for o in outcomes)
    return _result(
        str(side.url), session.table, manifest, started, resumed=resumed, retries=retries, pit=pit
    )


def discover(side: Sidecars, expected: dict[str, Any]) -> OnDisk:
    """What the bucket holds of the export ``expected``: as :func:`copystream.state.discover`."""
    cp = side.load_checkpoint()
    if cp is not None:
        require_same(cp.export, expected, f"{side.url}{CHECKPOINT}")
        return Resume(cp, None)
    plan = load_plan(side)
    if plan is not None:  # a ``workers`` export's key ranges
        require_same(plan.ranges.export, expected, f"{side.url}{PLAN}")
        return Resume(None, plan.ranges)
    head = side.head()
    if head is None:
        return Fresh()
    manifest = side.load_manifest()
    if manifest is None or identity_mismatch(manifest_identity(manifest), expected) is not None:
        return Occupied()
    try:
        _verify(side, manifest, head, deep=False)
    except CopystreamError:
        return Occupied()
    return Complete(manifest)


class _Occupied:
    """The object exists and nothing in the bucket says it is this export's."""


def _run_part(
    side: Sidecars,
    job: PartJob,
    found: OnDisk,
    progress: Callable[[Progress], None] | None,
    sleep: Callable[[float], None],
) -> tuple[Checkpoint, str, int, bool]:
    """Run the export's one part into the upload; complete it. The final checkpoint, the
    object's digest, the retries taken, and whether the snapshot was lost."""
    cp, dest = _open_part(side, job, found)
    runner = PartRunner(job, Path(side.url.key), progress=progress, sleep=sleep,
                        save=side.save_checkpoint)  # fmt: skip
    try:
        try:
            cp = runner.run_chunks(cp, dest)
        except UsageError:
            if isinstance(found, Fresh) and not dest.state()["parts"]:
                _discard(side, dest)  # a bad filter, say: nothing is left behind
            raise
        if not dest.completed:
            cp = replace(cp, destination=dest.flush())
            side.save_checkpoint(cp)  # every part recorded before the upload is completed
            dest.complete()
        digest = dest.digest
        if dest.hashed_from:  # resumed: the whole object's digests need its first bytes too
            digest, cp = _read_back(side, cp)
    finally:
        dest.close()
        runner.close()
    return cp, digest, runner.retries, runner.snapshot_lost


def _open_part(side: Sidecars, job: PartJob, found: OnDisk) -> tuple[Checkpoint, S3Object]:
    """The checkpoint and destination to continue (a resume) or begin (a new upload)."""
    if isinstance(found, Resume) and found.checkpoint is not None:
        cp = found.checkpoint
        state = cp.destination
        if state.get("kind") != "s3" or (state.get("bucket"), state.get("key")) != tuple(side.url):
            raise CheckpointMismatch(f"{side.url}{CHECKPOINT} was made for another output")
        if job.run.chunk_rows is not None:
            cp = replace(cp, chunk_rows=job.run.chunk_rows)
        log.info("%s: resuming at row %s, byte %s", side.url, f"{cp.rows:,}", cp.offset)
        return cp, S3Object.resume(side.client, side.url, state, cp.offset)
    dest = S3Object.create(side.client, side.url, job.spec.identity().get("compress"))
    cp = job.first_checkpoint(dest.state())  # job.lower: None (one range, from the start)
    try:
        side.save_checkpoint(cp)  # the upload id is recorded before anything is uploaded
    except BaseException:
        _discard(side, dest)
        raise
    return cp, dest


def _discard(side: Sidecars, dest: S3Object) -> None:
    """Abort a fresh export's upload and remove its checkpoint."""
    with contextlib.suppress(CopystreamError):
        side._call("aborting the upload", "abort_multipart_upload", "", UploadId=dest.upload_id)
        side.delete(CHECKPOINT)


def _read_back(side: Sidecars, cp: Checkpoint) -> tuple[str, Checkpoint]:
    """The completed object's digest (and uncompressed size and digest), read back."""
    compress = cp.export.get("compress")
    try:
        hashed = side.read_back(cp.chunks, compress, deep=compress is not None)
    except ValueError as e:
        raise VerificationFailed(
            f"{side.url}: chunk {e.args[0]} differs from its checkpoint after the upload"
        ) from e
    if hashed.raw is not None:
        raw = {"uncompressed_bytes": hashed.raw[0], "uncompressed_xxh3_128": hashed.raw[1]}
        cp = replace(cp, destination={**cp.destination, **raw})
    return hashed.xxh3_128, cp


def s3_status(output: str) -> ExportStatus:
    """:func:`~copystream.export.export_status` of ``s3://bucket/key``: from the checkpoint or
    manifest object beside it."""
    side = _open(output)
    cp = side.load_checkpoint()
    if cp is not None:
        return ExportStatus(
            output, "in progress", str(cp.export.get("table")), cp.rows, cp.offset, cp.last_key,
            cp.estimated_rows, len(cp.chunks), ranges_finished=int(cp.finished),
        )  # fmt: skip
    plan = load_plan(side)
    if plan is not None:  # a ``workers`` export (or shards): its ranges' checkpoints, summed
        return _ranges_status(side, plan.ranges)
    m = side.load_manifest()
    if m is not None:
        last = m.chunks[-1].last_key if m.chunks else None
        return ExportStatus(
            output, "complete", m.table, m.rows, m.bytes, last, m.rows, len(m.chunks),
            ranges=m.workers, ranges_finished=m.workers,
        )  # fmt: skip
    raise UsageError(f"no checkpoint or manifest beside {output}: no export to report on")


def s3_range_checkpoints(output: str) -> list[Checkpoint | None]:
    """Each key range's checkpoint of an unfinished ``workers`` export (or shards) to
    ``s3://bucket/key``, in key order (``None``: not begun); none for any other export."""
    side = _open(output)
    plan = load_plan(side)
    if plan is None or side.load_checkpoint() is not None:
        return []
    return _range_checkpoints(side, plan.ranges)


def _range_checkpoints(side: Sidecars, ranges: KeyRanges) -> list[Checkpoint | None]:
    return [Sidecars(side.client, range_url(side.url, i)).load_checkpoint()
            for i in range(len(ranges.ranges))]  # fmt: skip


def _ranges_status(side: Sidecars, ranges: KeyRanges) -> ExportStatus:
    cps = _range_checkpoints(side, ranges)
    done = [cp for cp in cps if cp is not None]
    return ExportStatus(
        str(side.url), "in progress", str(ranges.export.get("table")),
        sum(cp.rows for cp in done), sum(cp.offset for cp in done), None,
        next((cp.estimated_rows for cp in done), None), sum(len(cp.chunks) for cp in done),
        ranges=len(cps), ranges_finished=sum(cp.finished for cp in done),
    )  # fmt: skip


def verify_s3(output: str, *, deep: bool = False) -> VerifyResult:
    """:func:`~copystream.manifest.verify_file` of ``s3://bucket/key``: stream the object and
    re-hash it against the manifest beside it (``deep``: decompressed too)."""
    side = _open(output)
    manifest = side.load_manifest()
    if manifest is None:
        raise UsageError(f"{output}{MANIFEST} does not exist: nothing to verify against")
    head = side.head()
    if head is None:
        raise UsageError(f"{output} does not exist")
    deep = deep and manifest.compress is not None
    hashed = _verify(side, manifest, head, deep=deep)
    return VerifyResult(
        output, manifest.rows, manifest.bytes, len(manifest.chunks), hashed.xxh3_128,
        manifest.uncompressed_bytes, manifest.uncompressed_xxh3_128, deep,
    )  # fmt: skip


def _verify(side: Sidecars, manifest: Manifest, head: dict[str, Any], *, deep: bool) -> Hashed:
    url = side.url
    if int(head["ContentLength"]) != manifest.bytes:
        raise VerificationFailed(
            f"{url} is {head['ContentLength']} bytes but the manifest records {manifest.bytes}"
        )
    try:
        hashed = side.read_back(manifest.chunks, manifest.compress, deep=deep)
    except ValueError as e:
        c = manifest.chunks[e.args[0]]
        raise VerificationFailed(
            f"{url}: chunk {c.index} (bytes {c.offset}-{c.offset + c.bytes}) differs from the "
            "manifest"
        ) from e
    if hashed.bytes != manifest.bytes or hashed.xxh3_128 != manifest.xxh3_128:
        raise VerificationFailed(f"{url}: whole-object digest differs from the manifest")
    if deep and hashed.raw != (manifest.uncompressed_bytes, manifest.uncompressed_xxh3_128):
        raise VerificationFailed(f"{url}: the uncompressed digest differs from the manifest")
    return hashed
