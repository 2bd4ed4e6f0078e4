"""The checkpoint: durable progress of an unfinished export, beside the output file.

``OUTPUT.checkpoint.json`` is rewritten atomically after every chunk, once that chunk's bytes are
fsynced. It records what the export is (table, key, columns, filter, COPY options, pinned session
settings) and how far it got (byte offset, rows, last key, digest of the prefix, one record per
chunk). A digest of its own canonical JSON detects a damaged or hand-edited checkpoint.

The transitions are pure: :func:`new_checkpoint` and :meth:`Checkpoint.advance` build records;
only :func:`save_checkpoint` and :func:`load_checkpoint` touch the disk.

JSON form (version 1)::

    {"version": 1, "kind": "copystream-checkpoint",
     "export": {"table": ..., "key": [...], "key_types": [...], "columns": [...], "where": ...,
                "options": {...}},
     "settings": {"TimeZone": ..., ...}, "started_at": "<ISO 8601>", "chunk_rows": N,
     "estimated_rows": N|null, "destination": {"kind": "file", ...},
     "offset": N, "rows": N, "last_key": [text, ...]|null,
     "xxh3_128": "<digest of bytes [0, offset)>", "finished": false,
     "chunks": [{"index": i, "offset": N, "bytes": N, "rows": N, "xxh3_128": hex,
                 "last_key": [text, ...]|null}, ...],
     "checkpoint_xxh3_128": "<digest of this object without this field>"}

``destination`` is the state of what the bytes are written to (its ``kind``, and whatever else
that kind needs to resume: :meth:`copystream.destinations.Destination.state`). A checkpoint
without it (written by copystream 0.1.0) is a local file's, ``{"kind": "file"}``. The chunks of
a compressed output also record ``uncompressed_bytes`` and ``uncompressed_xxh3_128``.

Key values are stored as PostgreSQL's own text form of each key column, so they round-trip
exactly (no float rounding, no time-zone shift, no normalisation).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import xxhash

from ._atomic import atomic_write, fsync_dir
from .errors import CheckpointMismatch
from .spec import require_same

__all__ = [
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "ChunkRecord",
    "canonical_digest",
    "checkpoint_path",
    "load_checkpoint",
    "new_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
]

CHECKPOINT_VERSION = 1

#: The destination of a checkpoint that records none (copystream 0.1.0's): a local file.
_FILE_DESTINATION: dict[str, Any] = {"kind": "file"}


@dataclass(frozen=True)
class ChunkRecord:
    """One committed chunk: where its bytes are in the file and what they hash to."""

    index: int
    offset: int
    bytes: int
    rows: int
    xxh3_128: str
    last_key: tuple[str, ...] | None
    #: Of a compressed output: the chunk's size and xxh3-128 before compression (``bytes`` and
    #: ``xxh3_128`` are those of its frame as stored). ``None`` for an uncompressed output.
    raw: tuple[int, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form (``uncompressed_*`` only for a compressed output)."""
        d: dict[str, Any] = {
            "index": self.index,
            "offset": self.offset,
            "bytes": self.bytes,
            "rows": self.rows,
            "xxh3_128": self.xxh3_128,
            "last_key": list(self.last_key) if self.last_key is not None else None,
        }
        if self.raw is not None:
            d["uncompressed_bytes"], d["uncompressed_xxh3_128"] = self.raw
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ChunkRecord:
        """Inverse of :meth:`to_json`."""
        lk = d["last_key"]
        raw = d.get("uncompressed_bytes")
        return cls(
            index=int(d["index"]),
            offset=int(d["offset"]),
            bytes=int(d["bytes"]),
            rows=int(d["rows"]),
            xxh3_128=str(d["xxh3_128"]),
            last_key=tuple(str(v) for v in lk) if lk is not None else None,
            raw=(int(raw), str(d["uncompressed_xxh3_128"])) if raw is not None else None,
        )


@dataclass(frozen=True)
class Checkpoint:
    """Durable progress of one export. Immutable: each chunk makes a new one."""

    export: dict[str, Any]  # identity: table, key, key_types, columns, where, options
    settings: dict[str, str]
    started_at: str
    chunk_rows: int
    estimated_rows: int | None
    offset: int = 0
    rows: int = 0
    last_key: tuple[str, ...] | None = None
    xxh3_128: str = xxhash.xxh3_128().hexdigest()
    finished: bool = False
    chunks: tuple[ChunkRecord, ...] = field(default=())
    #: The destination's own state (``Destination.state()``), at least its ``kind``.
    destination: dict[str, Any] = field(default_factory=lambda: dict(_FILE_DESTINATION))
    #: Of an incremental export: what it continues (:mod:`copystream.incremental`); else None.
    increment: dict[str, Any] | None = None

    @property
    def raw_bytes(self) -> int:
        """Bytes exported so far as COPY wrote them: ``offset``, or for a compressed output the
        uncompressed size its destination state records (what progress reports count)."""
        return int(self.destination.get("uncompressed_bytes", self.offset))

    def advance(
        self,
        *,
        nbytes: int,
        rows: int,
        digest: str,
        prefix_digest: str,
        last_key: tuple[str, ...] | None,
        finished: bool,
        destination: dict[str, Any] | None = None,
        raw: tuple[int, str] | None = None,
    ) -> Checkpoint:
        """The checkpoint after one more committed chunk. Pure.

        An empty chunk (no bytes) adds no record: it only marks the export finished.
        ``destination`` is the destination's state after the chunk (``None``: unchanged);
        ``raw`` the chunk's uncompressed size and digest (a compressed output's).
        """
        chunks = self.chunks
        if nbytes or rows:
            chunks = (
                *chunks,
                ChunkRecord(len(chunks), self.offset, nbytes, rows, digest, last_key, raw),
            )
        return replace(
            self,
            offset=self.offset + nbytes,
            rows=self.rows + rows,
            last_key=last_key if last_key is not None else self.last_key,
            xxh3_128=prefix_digest,
            finished=finished,
            chunks=chunks,
            destination=self.destination if destination is None else dict(destination),
        )

    def check_same_export(self, export: dict[str, Any], output: Path) -> None:
        """Raise :class:`CheckpointMismatch` unless ``export`` is what this checkpoint is for."""
        require_same(self.export, export, checkpoint_path(output))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form including the self-digest."""
        body: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "kind": "copystream-checkpoint",
            "export": self.export,
            "settings": self.settings,
            "started_at": self.started_at,
            "chunk_rows": self.chunk_rows,
            "estimated_rows": self.estimated_rows,
            "destination": self.destination,
            "offset": self.offset,
            "rows": self.rows,
            "last_key": list(self.last_key) if self.last_key is not None else None,
            "xxh3_128": self.xxh3_128,
            "finished": self.finished,
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.increment is not None:  # absent otherwise: older checkpoints keep their digest
            body["increment"] = self.increment
        body["checkpoint_xxh3_128"] = _self_digest(body)
        return body

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Checkpoint:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a damaged record."""
        if (
            not isinstance(d, dict)
            or d.get("kind") != "copystream-checkpoint"
            or d.get("version") != CHECKPOINT_VERSION
        ):
            raise ValueError("not a copystream checkpoint of a known version")
        body = {k: v for k, v in d.items() if k != "checkpoint_xxh3_128"}
        if _self_digest(body) != d.get("checkpoint_xxh3_128"):
            raise ValueError("its self-digest does not match (damaged or edited)")
        lk = d["last_key"]
        return cls(
            export=dict(d["export"]),
            settings={str(k): str(v) for k, v in d["settings"].items()},
            started_at=str(d["started_at"]),
            chunk_rows=int(d["chunk_rows"]),
            estimated_rows=d["estimated_rows"],
            # absent from copystream 0.1.0's checkpoints; the self-digest covers the body as
            # written, so reading it with a default is all an old checkpoint needs
            destination=dict(d.get("destination", _FILE_DESTINATION)),
            offset=int(d["offset"]),
            rows=int(d["rows"]),
            last_key=tuple(str(v) for v in lk) if lk is not None else None,
            xxh3_128=str(d["xxh3_128"]),
            finished=bool(d["finished"]),
            chunks=tuple(ChunkRecord.from_json(c) for c in d["chunks"]),
            increment=dict(d["increment"]) if d.get("increment") is not None else None,
        )


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_digest(body: dict[str, Any]) -> str:
    """xxh3-128 of the canonical JSON of ``body``: the self-digest of sidecar records."""
    return xxhash.xxh3_128(_canonical(body)).hexdigest()


_self_digest = canonical_digest


def new_checkpoint(
    *,
    export: dict[str, Any],
    settings: dict[str, str],
    started_at: str,
    chunk_rows: int,
    estimated_rows: int | None,
    last_key: tuple[str, ...] | None = None,
    destination: dict[str, Any] | None = None,
) -> Checkpoint:
    """The checkpoint of an export that has not written a byte yet. Pure.

    ``last_key`` is the (exclusive) lower bound of a parallel worker's key range;
    ``destination`` the state of the destination about to be created (default: a local file).
    """
    return Checkpoint(
        export=export,
        settings=dict(settings),
        started_at=started_at,
        chunk_rows=chunk_rows,
        estimated_rows=estimated_rows,
        last_key=last_key,
        destination=dict(destination if destination is not None else _FILE_DESTINATION),
    )


def checkpoint_path(output: Path) -> Path:
    """Where the checkpoint of ``output`` lives: ``OUTPUT.checkpoint.json`` beside it."""
    return output.with_name(output.name + ".checkpoint.json")


def save_checkpoint(output: Path, cp: Checkpoint) -> None:
    """Write the checkpoint atomically and durably, owner-only (0600)."""
    # Compact: the checkpoint is rewritten after every chunk and grows by a record per chunk.
    data = json.dumps(cp.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    atomic_write(checkpoint_path(output), data + b"\n")


def load_checkpoint(output: Path) -> Checkpoint | None:
    """The checkpoint beside ``output``, or ``None`` if there is none.

    A checkpoint that cannot be read or fails its self-digest raises :class:`CheckpointMismatch`.
    """
    path = checkpoint_path(output)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointMismatch(
            f"{path} cannot be used: {e}"
        ) from e


def remove_checkpoint(output: Path) -> None:
    """Delete the checkpoint (after the manifest is durable)."""
    path = checkpoint_path(output)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
        fsync_dir(path.parent)
