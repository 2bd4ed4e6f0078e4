"""Increments to S3: ``since`` writes the rows after another export's last key to a new object
(its manifest, beside it in the bucket, names that predecessor), the export it follows being an
S3 object or a local file. The decisions are :mod:`copystream.incremental`'s; this is the S3
stage between discover and start of :func:`copystream.s3export.run_s3_export`.

A watermark export is an object of its own too (the first, and each increment after the
previous one). With ``workers`` a ``since`` increment runs as key ranges after the previous
export's last key into one upload (:mod:`copystream.s3ranges`); a watermark one keeps one worker
(docs/cli.md, --workers).

An append to an existing object (``incremental`` without ``since``) is refused
(exit 2): it would need a new multipart upload whose first part copies the old object
(``UploadPartCopy``, for an object of at least 5 MiB) and a re-read of the object to continue
its digest; not built yet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from . import incremental, s3url, watermark
from .checkpoint import Checkpoint
from .errors import UsageError
from .manifest import Manifest, load_manifest
from .spec import ExportSpec, RunOptions
from .state import Complete, Fresh, OnDisk, Resume

if TYPE_CHECKING:
    from .pipeline import ExportSession
    from .s3export import Sidecars

__all__ = ["begin_since", "check_s3_request", "load_any_manifest"]

MANIFEST = ".manifest.json"

log = logging.getLogger("copystream")


def check_s3_request(spec: ExportSpec, run: RunOptions, output: str) -> None:
    """Refuse the increments S3 does not take (before anything is read or written)."""
    incremental.check_request(run, spec.watermark)
    if run.incremental and run.since is None:
        raise UsageError(f"an increment cannot be appended to an S3 object yet ({output})")


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
