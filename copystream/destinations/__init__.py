"""Destinations: where an export's bytes are stored, behind one small interface.

The chunk loop (:mod:`copystream.part`) writes every chunk to a :class:`Destination` and never
names a file: a local file (:mod:`.local`) is one implementation; a compressed file, an S3
multipart upload and a Parquet dataset are others, each in its own module and each owning its
notion of a durable position. :func:`open_at_checkpoint` gives the loop the destination a
checkpoint describes (a fresh one, or an existing one reopened at its committed position);
:func:`check_at_checkpoint` is the same verification without opening anything for writing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from ..checkpoint import Checkpoint
from ..errors import CheckpointMismatch

__all__ = [
    "ChunkWritten",
    "Destination",
    "check_at_checkpoint",
    "fresh_state",
    "open_at_checkpoint",
]


class ChunkWritten(NamedTuple):
    """One ended chunk: where its stored bytes start, how many there are, and their xxh3-128.

    A tuple, so it unpacks as ``offset, nbytes, digest``.
    """

    offset: int
    bytes: int
    xxh3_128: str  # hex digest of the chunk's stored bytes


class Destination(Protocol):
    """Where one part's bytes are stored, chunk by chunk, hashed as they are stored.

    A chunk is a transaction: :meth:`begin_chunk`, any number of :meth:`write` calls, then
    :meth:`end_chunk` (the chunk is kept) or :meth:`rollback` (it leaves no trace). Positions are
    counts of stored bytes from the start of the destination.

    The *committed position* is the end of the last chunk recorded by the checkpoint on disk
    (its ``offset``). Everything before it is durable: the checkpoint is written only after
    :meth:`sync` returned. Everything after it may be lost in a crash, so resuming reopens the
    destination at the committed position (verifying what lies before it against the checkpoint's
    chunk digests) and drops the rest. What else a destination needs to resume (an upload id, the
    parts already uploaded) is its :meth:`state`, which the checkpoint records beside the offset.

    Threads: every method runs on the chunk loop's thread, except :meth:`sync`, which runs on the
    background commit thread while the loop begins, writes and ends the next chunk: it must make
    every *ended* chunk durable without disturbing the chunk in progress. :meth:`cut` runs on
    the loop's thread, after the commit thread has finished.
    """

    def begin_chunk(self) -> None:
        """Start a chunk: the point :meth:`rollback` returns to."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` after what is stored (raises ``DiskFull`` when there is no room)."""

    def end_chunk(self) -> ChunkWritten:
        """End the current chunk and say where its bytes are and what they hash to."""

    def rollback(self) -> None:
        """Forget every byte written since :meth:`begin_chunk`, digests included."""

    def sync(self) -> None:
        """Make every ended chunk durable (on the commit thread, before each checkpoint)."""

    def cut(self, position: int) -> None:
        """Give back what lies past the durable ``position`` after a failed commit (a full
        disk, say). The destination is closed afterwards and resumed from its checkpoint."""

    @property
    def digest(self) -> str:
        """xxh3-128 hex digest of every byte stored so far."""

    def state(self) -> dict[str, Any]:
        """The destination's own position state, JSON-safe, recorded in each checkpoint.

        Always has a ``kind`` (``"file"`` for a local file), which a resume must match.
        """

    def close(self) -> None:
        """Release what the destination holds (idempotent); stored chunks stay."""


def _kind(path: Path) -> str:
    """The kind of destination ``path`` names. Every path is a local file so far."""
    return "file"


def fresh_state(path: Path) -> dict[str, Any]:
    """The destination state a new checkpoint records for ``path``, before anything is stored."""
    return {"kind": _kind(path)}


def _check_kind(path: Path, cp: Checkpoint, recorded_in: Path) -> None:
    recorded, kind = cp.destination.get("kind"), _kind(path)
    if recorded != kind:
        raise CheckpointMismatch(
            f"{recorded_in} was made for another export (destination was "
            f"{json.dumps(recorded, ensure_ascii=False)}, now {json.dumps(kind)})"
        )


def _chunks(cp: Checkpoint) -> list[tuple[int, int, str]]:
    return [(c.offset, c.bytes, c.xxh3_128) for c in cp.chunks]


def open_at_checkpoint(path: Path, cp: Checkpoint, *, recorded_in: Path) -> Destination:
    """The destination ``cp`` describes, open at its committed position.

    A checkpoint at position 0 whose destination does not exist yet gets a fresh one. Otherwise
    the existing destination is verified against the checkpoint's chunks first (raising
    ``PrefixMismatch`` and changing nothing when it does not match), then what a killed chunk
    left past the committed position is cut. A checkpoint made for another kind of destination
    raises ``CheckpointMismatch``. ``recorded_in`` is the checkpoint's file, for messages.
    """
    _check_kind(path, cp, recorded_in)
    from .local import LocalFile  # each kind's module is imported when it is used

    if cp.offset == 0 and not path.exists():
        return LocalFile.create(path)
    return LocalFile.reopen(path, _chunks(cp), cp.xxh3_128)


def check_at_checkpoint(path: Path, cp: Checkpoint, *, recorded_in: Path) -> None:
    """Raise as :func:`open_at_checkpoint` would, but only read: for a coordinator that refuses
    a damaged part before any worker starts. What lies past the committed position is kept."""
    _check_kind(path, cp, recorded_in)
    from .local import check_prefix

    check_prefix(path, _chunks(cp), cp.xxh3_128)
