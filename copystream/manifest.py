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
     "workers": N, "point_in_time": bool, "compress": null}

A Parquet dataset (OUTPUT a directory) also records ``"parquet"`` (compression, part and row
group sizes, the ``out_of_range`` policy, and each column as ``[name, PostgreSQL type, Arrow
type, form in the COPY]``) and ``"parts"`` (each part's file, rows, bytes, xxh3_128, row groups,
chunk count and last key); ``bytes`` is then the dataset's size, ``xxh3_128`` the digest of its
parts' records, and the chunks those of the typed COPY the parts were decoded from.

A compressed output records ``"compress": {"codec": "zstd", "level": 3}``; ``bytes``,
``xxh3_128`` and the chunks' digests are then those of the compressed bytes (``verify`` needs no
decompression), and ``uncompressed_bytes`` and ``uncompressed_xxh3_128``, of the whole file and
of each chunk, those of the CSV itself (what psql would write; ``verify --deep`` checks them).
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
    compress: dict[str, Any] | None = None  # {"codec": ..., "level": ...}; None: uncompressed
    uncompressed_bytes: int | None = None  # of a compressed output: the CSV's size and digest
    uncompressed_xxh3_128: str | None = None
    #: Of an output grown by incremental exports: each export that wrote it, in order.
    increments: tuple[dict[str, Any], ...] | None = None
    #: Of an increment written to a file of its own: the export it follows and the key after
    #: which its rows begin (:mod:`copystream.incremental`).
    since: dict[str, Any] | None = None
    #: Of a watermark export: its column, the server's clock and safety lag as it started, and
    #: the lower bound and overlap of an increment (:mod:`copystream.watermark`).
    watermark: dict[str, Any] | None = None
    #: Of a Parquet dataset: its settings and column mapping, and its parts (file, rows,
    #: bytes, xxh3_128, row_groups, chunks, last_key), in key order.
    parquet: dict[str, Any] | None = None
    parts: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form."""
        d = self._body()
        if self.compress is not None:
            d["uncompressed_bytes"] = self.uncompressed_bytes
            d["uncompressed_xxh3_128"] = self.uncompressed_xxh3_128
        if self.increments is not None:
            d["increments"] = list(self.increments)
        if self.since is not None:
            d["since"] = self.since
        if self.watermark is not None:
            d["watermark"] = self.watermark
        if self.parquet is not None:
            d["parquet"] = self.parquet
            d["parts"] = list(self.parts)
        return d

    def _body(self) -> dict[str, Any]:
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
            "compress": self.compress,
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
            compress=dict(d["compress"]) if d.get("compress") is not None else None,
            uncompressed_bytes=d.get("uncompressed_bytes"),
            uncompressed_xxh3_128=d.get("uncompressed_xxh3_128"),
            increments=tuple(dict(i) for i in d["increments"]) if "increments" in d else None,
            since=dict(d["since"]) if d.get("since") is not None else None,
            watermark=dict(d["watermark"]) if d.get("watermark") is not None else None,
            parquet=dict(d["parquet"]) if d.get("parquet") is not None else None,
            parts=tuple(dict(p) for p in d.get("parts", ())),
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

    path: Path | str  # str: the s3:// URL of an S3 object
    rows: int
    bytes: int
    chunks: int
    xxh3_128: str
    #: Of a compressed output: the uncompressed size and digest (checked by ``deep``).
    uncompressed_bytes: int | None = None
    uncompressed_xxh3_128: str | None = None
    deep: bool = False  # the output was decompressed and checked too


def verify_file(output: str | os.PathLike[str], *, deep: bool = False) -> VerifyResult:
    """Re-hash ``output`` against its manifest.

    Returns a :class:`VerifyResult` when every chunk and the whole file match. Raises
    :class:`VerificationFailed` naming the first chunk that differs (or a size mismatch), and
    :class:`UsageError` when there is no manifest or no file. A compressed output is checked
    as stored, without decompressing; ``deep=True`` also decompresses it and checks every chunk
    and the whole against the uncompressed digests (nothing more for an uncompressed output).

    Example::

        >>> copystream.verify_file("orders.csv")
        VerifyResult(path=PosixPath('orders.csv'), rows=5000000, bytes=1061234567, ...)
    """
    if isinstance(output, str) and output.startswith("s3://"):
        from .s3export import verify_s3

        return verify_s3(output, deep=deep)
    path = Path(output)
    manifest = load_manifest(path)
    if manifest is None:
        raise UsageError(f"{manifest_path(path)} does not exist: nothing to verify against")
    if manifest.parquet is not None:
        return _verify_dataset(path, manifest)
    fd = _open(path)
    try:
        size = os.fstat(fd).st_size
        deep = deep and manifest.compress is not None
        whole, raw = _hash_chunks(fd, path, manifest, deep)
        if size != manifest.bytes:
            raise VerificationFailed(
                f"{path} is {size} bytes but the manifest records {manifest.bytes}"
            )
        if whole.hexdigest() != manifest.xxh3_128:
            raise VerificationFailed(f"{path}: whole-file digest differs from the manifest")
        if deep and (raw[0], raw[1].hexdigest()) != (
            manifest.uncompressed_bytes,
            manifest.uncompressed_xxh3_128,
        ):
            raise VerificationFailed(f"{path}: the uncompressed digest differs from the manifest")
    finally:
        os.close(fd)
    return VerifyResult(
        path, manifest.rows, manifest.bytes, len(manifest.chunks), whole.hexdigest(),
        manifest.uncompressed_bytes, manifest.uncompressed_xxh3_128, deep,
    )  # fmt: skip


def _verify_dataset(path: Path, manifest: Manifest) -> VerifyResult:
    """:func:`verify_file` of a Parquet dataset: every part's digest and row count."""
    from .destinations.parquet import verify_dataset

    if not path.is_dir():
        raise UsageError(f"{path} is not a Parquet dataset directory")
    rows = verify_dataset(path, manifest.parts, manifest.xxh3_128)
    if rows != manifest.rows:
        raise VerificationFailed(f"{path} holds {rows} rows, the manifest records {manifest.rows}")
    return VerifyResult(path, rows, manifest.bytes, len(manifest.chunks), manifest.xxh3_128)


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise UsageError(f"{path} does not exist") from e
    except IsADirectoryError as e:
        raise UsageError(f"{path} is a directory") from e
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # Linux opens a directory O_RDONLY without complaint
        os.close(fd)
        raise UsageError(f"{path} is a directory")
    return fd


def _hash_chunks(
    fd: int, path: Path, manifest: Manifest, deep: bool
) -> tuple[Any, tuple[int, Any]]:
    """Hash every chunk (``deep``: decompressed too) against the manifest; return the whole
    file's hash state and the uncompressed size and hash state (``deep`` only)."""
    cdc = None
    if deep:
        from .destinations.compressed import CorruptFrame, codec, hash_chunk

        assert manifest.compress is not None
        cdc = codec(str(manifest.compress["codec"]), int(manifest.compress["level"]))
    whole, raw_whole, raw_size = xxhash.xxh3_128(), xxhash.xxh3_128(), 0
    for c in manifest.chunks:
        part, raw_part = xxhash.xxh3_128(), xxhash.xxh3_128()
        differs = f"{path}: chunk {c.index} (bytes {c.offset}-{c.offset + c.bytes}, " + (
            f"rows after key {_key_before(manifest, c.index)}) differs from the manifest"
        )
        if cdc is None:
            got = hash_range(fd, c.offset, c.bytes, whole, part)
            ok = got == c.bytes
        else:
            try:
                n = hash_chunk(fd, c.offset, c.bytes, cdc, (whole, part), (raw_whole, raw_part))
            except CorruptFrame as e:
                raise VerificationFailed(f"{differs} (it does not decompress)") from e
            raw_size += n
            ok = (n, raw_part.hexdigest()) == c.raw
        if not ok or part.hexdigest() != c.xxh3_128:
            raise VerificationFailed(differs)
    return whole, (raw_size, raw_whole)


def _key_before(manifest: Manifest, index: int) -> str:
    if index == 0 or manifest.chunks[index - 1].last_key is None:
        return "(start)"
    return ", ".join(manifest.chunks[index - 1].last_key or ())
