"""Increments to S3: ``since`` writes the rows after another export's last key to a new object
(its manifest, beside it in the bucket, names that predecessor), the export it follows being an
S3 object or a local file. The decisions are :mod:`copystream.incremental`'s; this is the S3
stage between discover and start of :func:`copystream.s3export.run_s3_export`.

A watermark export is an object of its own too (the first, and each increment after the
previous one). With ``workers`` a ``since`` increment runs as key ranges after the previous
export's last key into one upload (:mod:`copystream.s3ranges`); a watermark one keeps one worker
(docs/cli.md, --workers).

An append to an existing object (``incremental`` without ``since``) is a new multipart upload
to the same key whose first bytes are the object's (``append_state`` of
:mod:`copystream.destinations.s3`: copied server-side, or read back when smaller than S3's
5 MiB part), the new chunks after them as parts; the object and its manifest stay as they
were until the upload is completed. It runs
with one worker (a warning says so when more are asked for).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import incremental, s3url, watermark
from .checkpoint import Checkpoint
from .errors import CopystreamError, UsageError
from .manifest import Manifest, load_manifest
from .spec import ExportSpec, RunOptions
from .state import Complete, Fresh, OnDisk, Resume

if TYPE_CHECKING:
    from .pipeline import ExportSession
    from .s3export import Sidecars

__all__ = ["abort_append", "begin_append", "begin_since", "check_s3_request", "load_any_manifest"]

MANIFEST = ".manifest.json"

log = logging.getLogger("copystream")


def check_s3_request(spec: ExportSpec, run: RunOptions, output: str) -> None:
    """Refuse the increments S3 does not take (before anything is read or written). An
    append's ``restart`` aborts only the unfinished append (the object stays)."""
    append = run.incremental and run.since is None and spec.watermark is None
    incremental.check_request(replace(run, restart=False) if append else run, spec.watermark)


def load_any_manifest(since: str) -> tuple[Manifest | None, str]:
    """The manifest ``since`` names (an output or its manifest, local or ``s3://``), or
    ``None`` when there is none; and where it is (a path or URL)."""
    if s3url.is_s3(since):
        from .s3export import Sidecars

        key = since[: -len(MANIFEST)] if since.endswith(MANIFEST) else since
        side = Sidecars(s3url.client(), s3url.parse(key))
        return side.load_manifest(), f"{side.url}{MANIFEST}"
    path, output = incremental.since_manifest(since)
    return load_manifest(output), str(path)


def begin_since(
    side: Sidecars, session: ExportSession, found: OnDisk, *, workers: int = 1
) -> tuple[dict[str, Any] | None, OnDisk]:
    """What the increment records of the export it follows (its ``since``; ``None`` for a first
    watermark export), and ``found`` as it continues: a fresh object gets the increment's
    checkpoint (a new upload; rows after that export's last key, or from the watermark's lower
    bound, under its pinned settings), saved before anything is uploaded; with ``workers``
    (not a watermark export's) it stays fresh: its key ranges begin after that last key
    (:mod:`copystream.s3ranges`, whose plan records what the increment follows)."""
    since, column = session.run.since, session.spec.watermark
    previous, follows = None, None
    if since is not None:
        previous, where = load_any_manifest(since)
        if previous is None:
            raise UsageError(f"{since} has no manifest: no export for the increment to follow")
        if s3url.is_s3(since) and s3url.parse(since.removesuffix(MANIFEST)) == side.url:
            raise UsageError(f"{since} is {side.url} itself; an increment goes to a new object")
        follows = incremental.follows_named(previous, where, session.spec.identity())
        if column is not None:
            watermark.previous_mark(previous, column, session.run.watermark_lag)  # or refused
    if isinstance(found, Resume):
        if found.checkpoint is not None:
            incremental.check_resume(found.checkpoint, follows, str(side.url))
        return follows, found
    if isinstance(found, Complete):
        if follows is not None:
            incremental.check_complete_since(found.manifest, follows, str(side.url))
        return follows, found
    if not isinstance(found, Fresh) or (workers > 1 and column is None):
        return follows, found  # an object nothing explains: refused or forced as any export
    if workers > 1:
        log.warning(
            "%s: a watermark export runs with one worker (a row updated meanwhile could "
            "leave a key range not yet read for one already read)", session.table.qualified,
        )  # fmt: skip
    return follows, Resume(_new_checkpoint(side, session, previous, follows), None)


def _new_checkpoint(
    side: Sidecars,
    session: ExportSession,
    previous: Manifest | None,
    follows: dict[str, Any] | None,
) -> Checkpoint:
    """The checkpoint of a new increment object (a new upload), saved in the bucket."""
    from .continuation import checkpoint_sizes, watermark_checkpoint
    from .destinations.s3 import S3Object

    identity = session.spec.identity()
    dest = S3Object.create(side.client, side.url, identity.get("compress"))
    if session.spec.watermark is not None:
        cp = watermark_checkpoint(session, session.spec.watermark, previous, follows, dest.state())
    else:
        assert previous is not None and follows is not None
        cp = incremental.since_checkpoint(
            previous, follows, identity, dest.state(), **checkpoint_sizes(session)
        )
    side.save_checkpoint(cp)
    return cp


def begin_append(
    side: Sidecars, session: ExportSession, found: OnDisk, *, workers: int = 1
) -> OnDisk:
    """``found`` as an append to the object continues: an unfinished append resumes as it
    is; a complete export that verifies gets the append's checkpoint (a new upload beginning
    with the object), saved before any new byte is uploaded; anything else is refused.
    ``workers`` above 1 are warned of: an append runs with one."""
    from .continuation import checkpoint_sizes
    from .destinations.s3 import append_state

    identity = session.spec.identity()
    if isinstance(found, Resume):
        return found
    head, url = side.head(), str(side.url)
    if not isinstance(found, Complete) or head is None:
        manifest = side.load_manifest()
        raise incremental.refuse_append(url, manifest, identity, f"{url}{MANIFEST}")
    if int(head["ContentLength"]) != found.manifest.bytes:  # replaced since it was verified
        raise incremental.refuse_append(url, found.manifest, identity, f"{url}{MANIFEST}")
    if workers > 1:
        log.warning(
            "%s: an append to an S3 object runs with one worker (its new bytes follow the "
            "object's in one upload)", session.table.qualified,
        )  # fmt: skip
    state = append_state(side.client, side.url, identity.get("compress"), head)
    sizes = checkpoint_sizes(session)
    cp = incremental.append_checkpoint(found.manifest, identity, state, **sizes)
    try:
        side.save_checkpoint(cp)  # the upload id is recorded before any new byte is uploaded
    except BaseException:  # (another run's checkpoint, say: its upload and checkpoint stay)
        with contextlib.suppress(CopystreamError):
            side._call("aborting the upload", "abort_multipart_upload", "",
                       UploadId=state["upload_id"])  # fmt: skip
        raise
    return Resume(cp, None)


def abort_append(side: Sidecars) -> None:
    """Abort an unfinished append to ``side.url`` (``restart``): its uploads and checkpoint go,
    the object and its manifest stay as they are."""
    from .s3export import CHECKPOINT

    aborted = side.abort_uploads()
    side.delete(CHECKPOINT)
    log.info("%s: unfinished append discarded (%d upload(s) aborted)", side.url, aborted)
