"""Destinations: where an export's bytes are stored, behind one small interface.

The chunk loop (:mod:`copystream.part`) writes every chunk to a :class:`Destination` and never
names a file: a local file (:mod:`.local`) is one implementation; a compressed file, an S3
multipart upload and a Parquet dataset are others, each in its own module and each owning its
notion of a durable position; :func:`fresh_state` chooses the kind an export's spec asks for
(:mod:`.compressed` for ``compress``). :func:`open_at_checkpoint` gives the loop the destination a
checkpoint describes (a fresh one, or an existing one reopened at its committed position);
:func:`check_at_checkpoint` is the same verification without opening anything for writing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol, runtime_checkable

import xxhash

from ..checkpoint import Checkpoint, ChunkRecord
from ..errors import CheckpointMismatch
from ..spec import ExportSpec

__all__ = [
    "ChunkWritten",
    "Destination",
    "Parted",
    "Synced",
    "check_at_checkpoint",
    "create",
    "fresh_state",
    "open_at_checkpoint",
    "rehash",
    "resume_point",
]


class _Stored(NamedTuple):
    offset: int
    bytes: int
    xxh3_128: str  # hex digest of the chunk's stored bytes


class ChunkWritten(_Stored):
    """One ended chunk: where its stored bytes start, how many there are, and their xxh3-128.

    A tuple of those three, so it unpacks as ``offset, nbytes, digest`` (and compares as one).
    A destination that stores other bytes than it is given (a compressed file) also says what
    it was given: ``raw``, the size and xxh3-128 hex digest of the chunk's uncompressed bytes
    (``None`` when they are the bytes stored).
    """

    raw: tuple[int, str] | None

    def __new__(
        cls, offset: int, bytes: int, xxh3_128: str, raw: tuple[int, str] | None = None
    ) -> ChunkWritten:
        written = super().__new__(cls, offset, bytes, xxh3_128)
        written.raw = raw
        return written


class Synced(NamedTuple):
    """What :meth:`Destination.sync` returns for a destination whose durable position may lag
    its ended chunks (an S3 upload: bytes are durable once they are in an uploaded part).

    ``durable``: the chunks ended so far are durable, so the checkpoint may record them (when
    false, the checkpoint on disk stays where it is and a resume redoes those chunks).
    ``state``: entries of the destination's state that are known only now (the ETag of the part
    just uploaded); the checkpoint records them over those :meth:`Destination.state` gave.
    """

    durable: bool
    state: dict[str, Any]


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
        """Store ``data`` after what is stored (raises ``DiskFull`` when there is no room).

        ``data`` may be stored later, on another thread, up to :meth:`end_chunk`: the caller
        must not change it after the call (so an error may be raised by a later call too).
        """

    def end_chunk(self) -> ChunkWritten:
        """End the current chunk and say where its bytes are and what they hash to."""

    def rollback(self) -> None:
        """Forget every byte written since :meth:`begin_chunk`, digests included."""

    def sync(self) -> Synced | None:
        """Make every ended chunk durable (on the commit thread, before each checkpoint).

        ``None``: they are, and the state recorded with the chunk stands (a local file). A
        :class:`Synced` says whether they are, and what the checkpoint records besides. It is
        called once for each :meth:`end_chunk`, in the same order.
        """

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


@runtime_checkable
class Parted(Protocol):
    """A destination that stores whole parts (a Parquet dataset): the chunk loop tells it when
    the last chunk has ended, before that chunk's checkpoint, so that the last part is sealed
    with it."""

    def end_parts(self) -> None:
        """Seal the part in flight: no chunk follows."""


def resume_point(cp: Checkpoint) -> Checkpoint:
    """Where a resume continues: ``cp`` itself, or, for a destination that keeps only whole
    parts, ``cp`` cut back to the chunks of its sealed parts."""
    if cp.destination.get("kind") != "parquet":
        return cp
    from .parquet import resume_point as parts_resume_point

    return parts_resume_point(cp)


def _wanted(path: Path, export: Mapping[str, Any], stem: str = "part-") -> dict[str, Any]:
    """The fresh state of the destination an export (its identity) asks for at ``path``
    (``stem``: how a Parquet dataset's part files of this range are named)."""
    if export.get("parquet") is not None:
        from .parquet import fresh_state as parquet_state

        return parquet_state(dict(export), stem)
    compress = export.get("compress")
    if compress is None:
        return {"kind": "file"}
    from .compressed import fresh_state as compressed_state

    return compressed_state(compress["codec"], int(compress["level"]))


def fresh_state(
    path: Path, spec: ExportSpec | None = None, *, stem: str = "part-"
) -> dict[str, Any]:
    """The destination state a new checkpoint records for ``spec`` written to ``path``, before
    anything is stored: this is where the kind of destination is chosen (``None``: a file).
    ``stem`` names the part files of a Parquet dataset's key range."""
    return _wanted(path, spec.identity() if spec is not None else {}, stem)


def _check_kind(path: Path, cp: Checkpoint, recorded_in: Path) -> dict[str, Any]:
    """The destination the checkpoint's export asks for, if the checkpoint's state is of it."""
    wanted = _wanted(path, cp.export)
    recorded, kind = cp.destination.get("kind"), wanted["kind"]
    same = recorded == kind and all(cp.destination.get(k) == wanted.get(k) for k in _FIXED)
    if not same:
        raise CheckpointMismatch(
            f"{recorded_in} was made for another export (destination was "
            f"{json.dumps(recorded, ensure_ascii=False)}, now {json.dumps(kind)})"
        )
    return wanted


#: The parts of a destination's state that say what it is (not how far it got).
_FIXED = ("codec", "level")


def _chunks(cp: Checkpoint) -> list[tuple[int, int, str]]:
    return [(c.offset, c.bytes, c.xxh3_128) for c in cp.chunks]


def create(path: Path, state: Mapping[str, Any]) -> Destination:
    """A new, empty destination at ``path`` (which must not exist: ``FileExistsError``) of the
    kind ``state`` (from :func:`fresh_state`) says."""
    if state["kind"] != "file":
        from .compressed import CompressedFile  # each kind's module is imported when used

        return CompressedFile.create(path, state)
    from .local import LocalFile

    return LocalFile.create(path)


def open_at_checkpoint(path: Path, cp: Checkpoint, *, recorded_in: Path) -> Destination:
    """The destination ``cp`` describes, open at its committed position.

    The kind of destination is the one the checkpoint's export asks for (a local file, or a
    compressed one). A checkpoint at position 0 whose destination does not exist yet gets a
    fresh one. Otherwise the existing destination is verified against the checkpoint's chunks
    first (raising ``PrefixMismatch`` and changing nothing when it does not match), then what a
    killed chunk left past the committed position is cut. A checkpoint whose state is of another
    kind raises ``CheckpointMismatch``. ``recorded_in`` is the checkpoint's file, for messages.
    """
    wanted = _check_kind(path, cp, recorded_in)
    if wanted["kind"] == "parquet":
        from .parquet import ParquetDataset

        if cp.offset == 0 and not cp.destination.get("parts") and not path.exists():
            return ParquetDataset.create(path, cp.export, cp.destination)
        return ParquetDataset.reopen(path, cp)
    if cp.offset == 0 and not path.exists():
        return create(path, wanted)
    if wanted["kind"] != "file":
        from .compressed import CompressedFile

        return CompressedFile.reopen(path, cp.chunks, cp.xxh3_128, cp.destination)
    from .local import LocalFile

    return LocalFile.reopen(path, _chunks(cp), cp.xxh3_128)


def check_at_checkpoint(path: Path, cp: Checkpoint, *, recorded_in: Path) -> None:
    """Raise as :func:`open_at_checkpoint` would, but only read: for a coordinator that refuses
    a damaged part before any worker starts. What lies past the committed position is kept."""
    wanted = _check_kind(path, cp, recorded_in)
    if wanted["kind"] == "parquet":
        from .parquet import check_parts

        check_parts(path, cp.destination.get("parts", []))
        return
    from .local import check_prefix

    check_prefix(path, _chunks(cp), cp.xxh3_128)


def rehash(
    fd: int,
    chunks: Sequence[ChunkRecord],
    export: Mapping[str, Any],
    uncompressed: tuple[int, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Re-hash the recorded ``chunks`` of the file ``fd`` (the join of a ``workers`` export):
    the whole file's digest and the destination state it ends in (for a compressed file, its
    uncompressed size and digest, so the chunks are decompressed too, unless ``uncompressed``
    gives them: chunks already decompressed and checked as they are stored now). Raises
    ``ValueError`` with the index of the first chunk that differs from its record."""
    from .local import hash_range

    wanted = _wanted(Path(), export)
    whole, raw = xxhash.xxh3_128(), xxhash.xxh3_128()
    if wanted["kind"] == "file" or uncompressed is not None:
        for c in chunks:
            h = xxhash.xxh3_128()
            hash_range(fd, c.offset, c.bytes, whole, h)
            if h.hexdigest() != c.xxh3_128:
                raise ValueError(c.index)
        if uncompressed is None:
            return whole.hexdigest(), wanted
        size, digest = uncompressed
        return whole.hexdigest(), {
            **wanted,
            "uncompressed_bytes": size,
            "uncompressed_xxh3_128": digest,
        }
    from .compressed import CorruptFrame, codec, hash_chunk

    cdc, size = codec(wanted["codec"], wanted["level"]), 0
    for c in chunks:
        h, r = xxhash.xxh3_128(), xxhash.xxh3_128()
        try:
            n = hash_chunk(fd, c.offset, c.bytes, cdc, (whole, h), (raw, r))
        except CorruptFrame:
            raise ValueError(c.index) from None
        if h.hexdigest() != c.xxh3_128 or (n, r.hexdigest()) != c.raw:
            raise ValueError(c.index)
        size += n
    state = {**wanted, "uncompressed_bytes": size, "uncompressed_xxh3_128": raw.hexdigest()}
    return whole.hexdigest(), state
