"""What the files beside an output say about its export: complete, resumable, occupied or fresh.

:func:`discover` reads (never writes) the output, its manifest, its checkpoint and its ranges
file, and returns one of :class:`Complete`, :class:`Resume`, :class:`Occupied` or :class:`Fresh`.
The export pipeline, ``copystream status`` and a bulk job's dry run all read the disk through it.
Given the export it expects, it also checks that what is there was made for that export, and
that a complete output still verifies against its manifest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, checkpoint_path, load_checkpoint
from .errors import CopystreamError, UsageError
from .manifest import Manifest, load_manifest, verify_file
from .ranges import KeyRanges, load_parts, parts_path
from .spec import identity_mismatch, require_same

__all__ = ["Complete", "Fresh", "Occupied", "OnDisk", "Resume", "discover", "manifest_identity"]

log = logging.getLogger("copystream")


@dataclass(frozen=True)
class Complete:
    """A finished export: its manifest (verified against the file when an export was given)."""

    manifest: Manifest


@dataclass(frozen=True)
class Resume:
    """An unfinished export: a single-worker checkpoint, or the key ranges of a ``workers`` one."""

    checkpoint: Checkpoint | None
    ranges: KeyRanges | None

    @property
    def settings(self) -> dict[str, str]:
        """The session settings pinned when the export started."""
        if self.checkpoint is not None:
            return self.checkpoint.settings
        assert self.ranges is not None
        return self.ranges.settings

    @property
    def started_at(self) -> str:
        """When the interrupted export started."""
        if self.checkpoint is not None:
            return self.checkpoint.started_at
        assert self.ranges is not None
        return self.ranges.started_at


@dataclass(frozen=True)
class Occupied:
    """The output exists but nothing copystream keeps says what it is (or it does not verify)."""


@dataclass(frozen=True)
class Fresh:
    """Nothing there yet."""


OnDisk = Complete | Resume | Occupied | Fresh


def manifest_identity(manifest: Manifest) -> dict[str, Any]:
    """The identity (as :meth:`ExportSpec.identity` gives it) a manifest records."""
    return {
        "table": manifest.table,
        "key": list(manifest.key),
        "key_types": list(manifest.key_types),
        "columns": list(manifest.columns),
        "where": manifest.where,
        "options": manifest.options,
        "compress": manifest.compress,
        "parquet": manifest.parquet,
    }


def discover(
    output: Path, expected: dict[str, Any] | None = None, *, verify: bool = True
) -> OnDisk:
    """The state of the export to ``output``, read from the files beside it.

    With ``expected`` (an export's identity), a checkpoint or ranges file made for another
    export raises :class:`CheckpointMismatch`, and an output counts as complete only when its
    manifest records that export and the file still verifies. Without it, nothing is checked
    and nothing is hashed (what ``copystream status`` needs). ``verify=False`` leaves the
    hashing of a complete output to the caller (an increment appended to it re-hashes it anyway).
    """
    ranges = load_parts(output)
    checkpoint = load_checkpoint(output) if ranges is None else None
    if ranges is not None:
        _same(ranges.export, expected, parts_path(output))
        manifest = _manifest(output)
        if manifest is not None and manifest.started_at == ranges.started_at:
            # killed after this export's manifest was written, before the ranges were removed:
            # complete (if OUTPUT verifies), not to be taken apart and joined again
            done = _complete(output, manifest, expected)
            if done is not None:
                return done
        return Resume(None, ranges)
    if checkpoint is not None:
        _same(checkpoint.export, expected, checkpoint_path(output))
        return Resume(checkpoint, None)
    # A manifest without its output (whole, or torn: a kill while a small export published
    # it) is no export. A dangling symlink counts as there: never write through it.
    if not os.path.lexists(output):
        return Fresh()
    manifest = _manifest(output, strict=expected is None)
    if expected is None and manifest is not None:
        return Complete(manifest)  # as far as the files beside it tell (nothing is hashed)
    done = _complete(output, manifest, expected, verify) if manifest is not None else None
    return done if done is not None else Occupied()


def _same(recorded: dict[str, Any], expected: dict[str, Any] | None, path: Path) -> None:
    if expected is not None:
        require_same(recorded, {**expected, "range": recorded.get("range")}, path)


def _manifest(output: Path, *, strict: bool = False) -> Manifest | None:
    try:
        return load_manifest(output)
    except UsageError:
        if strict:
            raise
        return None  # unreadable: the output is not known to be complete


def _complete(
    output: Path, manifest: Manifest, expected: dict[str, Any] | None, verify: bool = True
) -> Complete | None:
    if expected is None:
        return Complete(manifest)
    if identity_mismatch(manifest_identity(manifest), {**expected, "range": None}) is not None:
        return None
    if not verify:
        return Complete(manifest)
    try:
        verify_file(output)
    except CopystreamError:
        return None
    return Complete(manifest)
