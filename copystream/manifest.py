"""The manifest: what a finished export wrote, and :func:`verify_file` to prove it still holds.

``OUTPUT.manifest.json`` is written atomically (0600) when the last chunk is durable; the
checkpoint is removed after it. JSON form (version 1)::

    {"version": 1, "kind": "copystream-manifest",
     "table": "public.orders", "key": ["id"], "key_types": ["bigint"], "key_source": "primary key",
     "columns": [...], "where": null, "options": {"format": "csv", "header": false, ...},
     "rows": N, "bytes": N, "xxh3_128": "<hex digest of the whole file>",
     "chunks": [{"index": 0, "offset": 0, "bytes": N, "rows": N, "xxh3_128": hex,
                 "last_key": ["..."]}, ...],
     "chunk_rows": N, "settings": {"TimeZone": ..., ...},
     "started_at": ISO, "finished_at": ISO, "seconds": float, "resumed": bool,
     "workers": N, "point_in_time": bool}
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ._atomic import atomic_write, remove_stale_temporaries
from .checkpoint import ChunkRecord
from .destinations.local import hash_range
from .errors import UsageError, VerificationFailed

__all__ = [
    "MANIFEST_VERSION",
    "Manifest",
    "VerifyResult",
    "load_manifest",
    "manifest_path",
    "save_manifest",
    "verify_file",
]

MANIFEST_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    """The record of a finished export."""

    table: str
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    key_source: str
    columns: tuple[str, ...]
    where: str | None
    options: dict[str, Any]
    rows: int
    bytes: int
    xxh3_128: str
    chunks: tuple[ChunkRecord, ...]
    chunk_rows: int
    settings: dict[str, str]
    started_at: str
    finished_at: str
    seconds: float
    resumed: bool
    workers: int = 1
    point_in_time: bool = False

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "version": MANIFEST_VERSION,
            "kind": "copystream-manifest",
            "table": self.table,
            "key": list(self.key),
            "key_types": list(self.key_types),
            "key_source": self.key_source,
            "columns": list(self.columns),
            "where": self.where,
            "options": self.options,
            "rows": self.rows,
            "bytes": self.bytes,
            "xxh3_128": self.xxh3_128,
            "chunks": [c.to_json() for c in self.chunks],
            "chunk_rows": self.chunk_rows,
            "settings": self.settings,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": self.seconds,
            "resumed": self.resumed,
            "workers": self.workers,
            "point_in_time": self.point_in_time,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        """Inverse of :meth:`to_json`."""
        if (
            not isinstance(d, dict)
            or d.get("kind") != "copystream-manifest"
            or d.get("version") != MANIFEST_VERSION
        ):
            raise ValueError("not a copystream manifest of a known version")
        return cls(
            table=str(d["table"]),
            key=tuple(d["key"]),
            key_types=tuple(d["key_types"]),
            key_source=str(d["key_source"]),
            columns=tuple(d["columns"]),
            where=d["where"],
            options=dict(d["options"]),
            rows=int(d["rows"]),
            bytes=int(d["bytes"]),
            xxh3_128=str(d["xxh3_128"]),
            chunks=tuple(ChunkRecord.from_json(c) for c in d["chunks"]),
            chunk_rows=int(d["chunk_rows"]),
            settings=dict(d["settings"]),
            started_at=str(d["started_at"]),
            finished_at=str(d["finished_at"]),
            seconds=float(d["seconds"]),
            resumed=bool(d["resumed"]),
            workers=int(d.get("workers", 1)),
            point_in_time=bool(d.get("point_in_time", False)),
        )


def manifest_path(output: Path) -> Path:
    """Where the manifest of ``output`` lives: ``OUTPUT.manifest.json`` beside it."""
    return output.with_name(output.name + ".manifest.json")


def save_manifest(output: Path, manifest: Manifest) -> None:
    """Write the manifest atomically and durably, owner-only (0600).

    Temporary files of earlier writes that were killed mid-way are removed (the caller holds the
    export's lock).
    """
    data = json.dumps(manifest.to_json(), indent=1, ensure_ascii=False).encode() + b"\n"
    atomic_write(manifest_path(output), data)
    remove_stale_temporaries(manifest_path(output))


def load_manifest(output: Path) -> Manifest | None:
    """The manifest beside ``output``, or ``None``; a damaged one raises :class:`UsageError`."""
    path = manifest_path(output)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path} is not a readable copystream manifest: {e}") from e


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of a successful :func:`verify_file`."""

    path: Path
    rows: int
    bytes: int
    chunks: int
    xxh3_128: str


def verify_file(output: str | os.PathLike[str]) -> VerifyResult:
    """Re-hash ``output`` against its manifest.

    Returns a :class:`VerifyResult` when every chunk and the whole file match. Raises
    :class:`VerificationFailed` naming the first chunk that differs (or a size mismatch), and
    :class:`UsageError` when there is no manifest or no file.

    Example::

        >>> copystream.verify_file("orders.csv")
        VerifyResult(path=PosixPath('orders.csv'), rows=5000000, bytes=1061234567, ...)
    """
    path = Path(output)
    manifest = load_manifest(path)
    if manifest is None:
        raise UsageError(f"{manifest_path(path)} does not exist: nothing to verify against")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise UsageError(f"{path} does not exist") from e
    except IsADirectoryError as e:
        raise UsageError(f"{path} is a directory") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):  # Linux opens a directory O_RDONLY without complaint
            raise UsageError(f"{path} is a directory")
        size = st.st_size
        whole = xxhash.xxh3_128()
        for c in manifest.chunks:
            part = xxhash.xxh3_128()
            got = hash_range(fd, c.offset, c.bytes, whole, part)
            if got != c.bytes or part.hexdigest() != c.xxh3_128:
                raise VerificationFailed(
                    f"{path}: chunk {c.index} (bytes {c.offset}-{c.offset + c.bytes}, "
                    f"rows after key {_key_before(manifest, c.index)}) differs from the manifest"
                )
        if size != manifest.bytes:
            raise VerificationFailed(
                f"{path} is {size} bytes but the manifest records {manifest.bytes}"
            )
        if whole.hexdigest() != manifest.xxh3_128:
            raise VerificationFailed(f"{path}: whole-file digest differs from the manifest")
    finally:
        os.close(fd)
    return VerifyResult(
        path, manifest.rows, manifest.bytes, len(manifest.chunks), whole.hexdigest()
    )


def _key_before(manifest: Manifest, index: int) -> str:
    if index == 0 or manifest.chunks[index - 1].last_key is None:
        return "(start)"
    return ", ".join(manifest.chunks[index - 1].last_key or ())
