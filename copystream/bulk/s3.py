"""A bulk job whose ``output_dir`` is ``s3://bucket/prefix``: what differs from a local one.

Every table is an S3 export of its own (:func:`copystream.s3export.run_s3_export`, run by the
job's workers with the table as the coordinator planned it, and the job's snapshot), to
``prefix/<the file name a local job would use>``, with its checkpoint and manifest objects
beside it; a table with ``workers = N`` takes the key-range upload. The job report is the
object ``prefix/copystream-report.json``, rewritten as a local one is. What a re-run finds is
read from one listing of the prefix (``ListObjectsV2``, a page per 1,000 objects): a table
whose object and manifest are there, and nothing else of it, is skipped after one ``GetObject``
of its manifest (the same export, the object's size the manifest's, the object not newer than
its manifest: S3 objects are replaced whole, never edited; ``copystream verify`` re-hashes one);
the others are left to their workers, which resume from their checkpoint objects.

The bucket is checked (missing, no credentials, access denied: :class:`UsageError`, exit 2)
before anything is read from PostgreSQL. There is no lock: the checkpoints' conditional writes
refuse a second writer of a table, as for a single export.

A table with ``watermark`` keeps its chain of increment objects under the prefix, as a local
job keeps files (:mod:`.increments`, reading the same listing): each run of the job puts the
next increment object, ``--since`` the one before. A table with ``incremental = true`` is put
in full the first time; each later run appends the rows after its last key to the object in
place (:mod:`copystream.s3increment`). What S3 does not take of a plan is checked with the plan
(:func:`s3_entry_problems`): Parquet, ``watermark`` with ``workers`` above 1.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PosixPath
from typing import TYPE_CHECKING, Any, BinaryIO

from .. import s3url
from ..errors import CopystreamError, OutputProblem, UsageError
from ..spec import ExportSpec, RunOptions, identity_mismatch
from ..state import Complete, Fresh, OnDisk

if TYPE_CHECKING:
    from ..export import ExportResult
    from ..table import ResolvedTable
    from .plan import BulkPlan
    from .resolve import _Task

__all__ = [
    "JobBucket",
    "S3Path",
    "export_s3_task",
    "job_report_url",
    "look",
    "open_bucket",
    "read_report",
    "s3_entry_problems",
    "s3_prefix_problem",
]

_MANIFEST = ".manifest.json"
#: What else an unfinished export keeps beside its object: its checkpoint, a ``workers``
#: export's plan and its ranges' objects (``KEY.part-NNNN.…``).
_UNFINISHED = (".checkpoint.json", ".parts.json", ".part-")


#: How many manifest objects a re-run reads at once (boto3's clients are thread-safe; its
#: connection pool holds 10).
READERS = 8


class S3Path(PosixPath):
    """``s3://bucket/prefix/name`` with a path's ``/``, ``name``, ``parent`` and ``with_name``
    (what a bulk job does with its outputs' names), printed as the URL it is. Never opened:
    a job with one writes through :mod:`copystream.s3export`."""

    def __str__(self) -> str:
        text = super().__str__()
        return s3url.PREFIX + text[len("s3:/") :] if text.startswith("s3:/") else text

    @property
    def url(self) -> s3url.S3Url:
        """The bucket and the key (``""`` for a bucket's top)."""
        bucket, _, key = str(self)[len(s3url.PREFIX) :].partition("/")
        return s3url.S3Url(bucket, key)

    def resolve(self, strict: bool = False) -> S3Path:
        return self


def s3_prefix_problem(where: str) -> str | None:
    """Why ``where`` is not ``s3://bucket[/prefix]`` (``None``: it is). Pure."""
    bucket = where[len(s3url.PREFIX) :].partition("/")[0]
    return None if bucket else "expected s3://BUCKET/PREFIX"


def s3_entry_problems(spec: ExportSpec, run: RunOptions) -> list[tuple[str, str]]:
    """What a plan entry asks that a job writing to S3 does not do: ``(key, why)``. Pure."""
    problems = []
    if spec.options.format == "parquet":
        problems.append(("format", "a Parquet dataset cannot be written to S3 yet"))
    if spec.watermark is not None and run.workers > 1:
        problems.append(("workers", "above 1 cannot write an increment to S3 yet"))
    return problems


@dataclass(frozen=True)
class Listed:
    """An object of the job's prefix as ``ListObjectsV2`` gives it."""

    size: int
    modified: datetime


class Listing(dict[str, Listed]):
    """The objects of a job's prefix, by key."""

    def names(self, directory: Path) -> set[str]:
        """The names of the objects directly under ``directory`` (an :class:`S3Path`), as a
        directory listing gives them (what :func:`.increments.watermark_step` reads)."""
        assert isinstance(directory, S3Path)
        top = directory.url.key + "/" if directory.url.key else ""
        return {k[len(top) :] for k in self if k.startswith(top) and "/" not in k[len(top) :]}


class JobBucket:
    """The job's prefix in its bucket: its listing, and its report object."""

    def __init__(self, client: Any, prefix: S3Path) -> None:
        self.client, self.prefix = client, prefix
        self.url = prefix.url

    def _fail(self, e: BaseException, doing: str) -> CopystreamError:
        return s3url.classify(e, self.url, doing)

    def listing(self) -> Listing:
        """Every object under the prefix, by key."""
        out = Listing()
        kw: dict[str, Any] = {}
        prefix = self.url.key + "/" if self.url.key else ""
        while True:
            try:
                page = self.client.list_objects_v2(Bucket=self.url.bucket, Prefix=prefix, **kw)
            except Exception as e:
                raise self._fail(e, f"listing {self.prefix}") from e
            for o in page.get("Contents", []):
                out[str(o["Key"])] = Listed(int(o["Size"]), o["LastModified"])
            if not page.get("IsTruncated"):
                return out
            kw = {"ContinuationToken": page["NextContinuationToken"]}

    def get(self, key: str) -> bytes | None:
        """The object ``key`` of the bucket, or ``None`` when there is none."""
        from botocore.exceptions import ClientError

        try:
            return bytes(self.client.get_object(Bucket=self.url.bucket, Key=key)["Body"].read())
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("NoSuchKey", "404"):
                return None
            raise self._fail(e, f"reading s3://{self.url.bucket}/{key}") from e
        except Exception as e:
            raise self._fail(e, f"reading s3://{self.url.bucket}/{key}") from e

    def report(self) -> Any:
        """The job report's JSON in the bucket (``None``: there is none, or it is unreadable)."""
        from .plan import REPORT_NAME

        try:
            data = self.get((self.prefix / REPORT_NAME).url.key)
            return None if data is None else json.loads(data)
        except ValueError:
            return None

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        """Write the object ``key`` (replaced whole: a reader sees the old one or this one)."""
        try:
            self.client.put_object(Bucket=self.url.bucket, Key=key, Body=data)
        except Exception as e:
            raise self._fail(e, f"writing s3://{self.url.bucket}/{key}") from e


def open_bucket(plan: BulkPlan) -> JobBucket:
    """The job's bucket, once it is known to be there and readable with the credentials the
    AWS chain gives (else a usage error, exit 2: before anything is read from PostgreSQL)."""
    prefix = plan.output_dir
    assert isinstance(prefix, S3Path)
    policy = plan.entries[0].run.policy if plan.entries else None
    bucket = JobBucket(s3url.client(policy), prefix)
    try:
        bucket.client.raw.head_bucket(Bucket=bucket.url.bucket)
    except Exception as e:
        error = s3url.classify(e, bucket.url, "checking the bucket")
        if not isinstance(error, UsageError):
            error = OutputProblem(f"cannot reach {prefix}: {error.problem}")
        raise error from e
    return bucket


def look(tasks: Sequence[_Task], bucket: JobBucket, listed: Listing) -> dict[int, OnDisk | None]:
    """What the bucket holds of each task that can run, from one listing of the prefix:
    :class:`Fresh` (nothing of it), :class:`Complete` (its object and manifest only, the
    manifest the same export's, the object its size and not newer than it: skipped), or
    ``None`` (left to its worker: a checkpoint to resume, key ranges, anything else)."""
    from concurrent.futures import ThreadPoolExecutor

    runnable = [t for t in tasks if t.error is None]
    # the manifests are read side by side: a re-run of a thousand finished tables waits for
    # about a thousand / READERS round trips, not a thousand
    with ThreadPoolExecutor(READERS, thread_name_prefix="copystream-look") as pool:
        states = pool.map(lambda t: _look_at(t, listed, bucket), runnable)
        return {id(t): state for t, state in zip(runnable, states, strict=True)}


def _look_at(task: _Task, listed: Listing, bucket: JobBucket) -> OnDisk | None:
    assert isinstance(task.output, S3Path)
    key = task.output.url.key
    unfinished = any(_any_under(listed, key + suffix) for suffix in _UNFINISHED)
    if key not in listed and not unfinished:
        return Fresh()  # (a manifest alone: a small table killed before its object was put)
    if unfinished or key + _MANIFEST not in listed:
        return None
    if task.resolved is None:
        return None
    from ..manifest import Manifest
    from ..state import manifest_identity

    try:
        manifest = Manifest.from_json(json.loads(bucket.get(key + _MANIFEST) or b""))
    except (CopystreamError, ValueError, KeyError, TypeError):
        return None  # its worker says what is wrong
    r = task.resolved
    expected = task.spec.resolved(r.qualified, r.key, r.key_types, r.columns, output=task.output)
    if identity_mismatch(manifest_identity(manifest), expected.identity()) is not None:
        return None
    obj, record = listed[key], listed[key + _MANIFEST]
    if obj.size != manifest.bytes or obj.modified > record.modified:
        return None  # replaced since: its worker re-verifies it and says so
    return Complete(manifest)


def _any_under(listed: Listing, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in listed)


def export_s3_task(
    conninfo: str,
    spec: ExportSpec,
    output: str,
    run: RunOptions,
    table: ResolvedTable | None = None,
    snapshot: str | None = None,
    fresh: bool = False,
    contested: bool = False,
    *,
    progress: Any,
) -> Any:
    """:func:`copystream.bulk.worker.export_task` for an ``s3://`` output: a small table found
    fresh in one COPY put whole (:func:`_put_small`), any other exported (or resumed) as
    ``copystream export TABLE s3://…`` would, with the coordinator's plan of it and the job's
    snapshot (``incremental = true``: in full when fresh, else appended to)."""
    from ..s3export import run_s3_export
    from ..whole import is_small
    from .worker import TableDone

    del contested  # the bucket has no lock files; conditional writes guard instead
    if run.incremental and fresh:  # ``incremental = true``: in full the first time
        run = replace(run, incremental=False)
    if spec.watermark is not None:  # a chain's export: one worker (the job may have said more)
        run = replace(run, workers=1)
    if fresh and table is not None and spec.watermark is None and is_small(table, spec, run):
        result = _put_small(conninfo, spec, output, run, table, snapshot, progress)
    else:
        result = run_s3_export(
            conninfo or None, spec, output, run, progress=progress, sleep=time.sleep,
            table=table, snapshot=snapshot,
        )  # fmt: skip
    return TableDone(replace(result, chunks=(), output=str(result.output)))


#: This worker process's S3 client, made once (boto3 takes tens of milliseconds per client).
_CLIENT: dict[str, Any] = {}


def _put_small(
    conninfo: str,
    spec: ExportSpec,
    output: str,
    run: RunOptions,
    table: ResolvedTable,
    snapshot: str | None,
    progress: Any,
) -> ExportResult:
    """A small table in one COPY (:mod:`copystream.whole`, on the connection the worker keeps)
    into a temporary file, then three ``PutObject``: its manifest, the object, the manifest
    again. Killed before the object is written, the manifest alone is a fresh start for the
    next run (an export with no object); killed before the second manifest, the object is newer
    than its manifest and the next run's worker re-verifies it before skipping it."""
    import tempfile

    from ..export import run_session
    from ..pipeline import ExportSession
    from .worker import _kept

    started = time.monotonic()
    url = s3url.parse(output)
    client = _CLIENT.get("s3") or _CLIENT.setdefault("s3", s3url.client(run.policy))
    with tempfile.TemporaryDirectory(prefix="copystream-") as tmp:
        local = Path(tmp) / url.key.rpartition("/")[2]
        with ExportSession(
            conninfo or None, spec, local, run, time.sleep, table=table, conn=_kept(conninfo),
            snapshot=snapshot, lock_late=True, job=True,
        ) as session:  # fmt: skip
            exported = run_session(
                session, progress=progress, sleep=time.sleep, started=started, tidy=False,
                known=Fresh(),
            )  # fmt: skip
        assert exported.written is not None  # a small table's fresh start
        staged = exported.written.staged
        manifest = url.beside(_MANIFEST)
        bucket = JobBucket(client, S3Path(output))
        bucket.put(manifest.key, staged.manifest)
        with staged.temporary.open("rb") as f:
            bucket.put(url.key, f)
        bucket.put(manifest.key, staged.manifest)
    return replace(exported.result, output=output)


def job_report_url(where: str) -> S3Path | None:
    """The job report ``s3://…`` names: the report object, or the one in a job's prefix
    (``None``: neither, say an export's object)."""
    from .plan import REPORT_NAME

    p = S3Path(where)
    if p.name == REPORT_NAME:
        return p
    report = p / REPORT_NAME
    return report if read_report(report) is not None else None


def read_report(report: S3Path) -> bytes | None:
    """The job report object ``report`` (``None``: there is none)."""
    return JobBucket(s3url.client(), report.parent).get(report.url.key)


def output_text(path: Path) -> str:
    """How the report names an output directory: an S3 prefix as its URL, else absolute."""
    return str(path) if isinstance(path, S3Path) else str(path.resolve())
