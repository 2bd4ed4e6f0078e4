"""A local file as a destination: bytes written at explicit offsets, hashed on the way.

A :class:`LocalFile` owns the output file descriptor and two xxh3-128 states: one over the whole
file and one over the current chunk. Data arrives in buffers of about a megabyte (the chunk runner
gathers rows), so hashing and writing cost a few calls per megabyte, not per row.

A chunk is a small transaction on the file: :meth:`~LocalFile.begin_chunk` remembers the offset
and a copy of the whole-file hash state; :meth:`~LocalFile.end_chunk` returns the chunk's place,
size and digest; :meth:`~LocalFile.rollback` truncates the file back and restores the hash state,
so a failed chunk leaves no trace. The committed position is a byte offset: the file's first
``offset`` bytes are the chunks the checkpoint records, and nothing else is kept on a resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import xxhash

from .._atomic import raise_if_full
from ..errors import PrefixMismatch
from . import ChunkWritten

__all__ = ["HASH_BLOCK", "KIND", "LocalFile", "check_prefix", "hash_range"]

#: The ``kind`` of a local file's state in a checkpoint.
KIND = "file"

#: Read size when re-hashing a file prefix: one reused buffer, large enough for memory speed.
HASH_BLOCK = 1024 * 1024

#: The errors of a write (or of an fsync, which NFS uses to report them late) that mean the
#: disk, a quota or the file size limit is full: the user frees space and resumes.


Chunks = list[tuple[int, int, str]]  # (offset, bytes, xxh3_128 hex) of each recorded chunk


def hash_range(fd: int, start: int, length: int, *states: xxhash.xxh3_128) -> int:
    """Feed ``length`` bytes of ``fd`` from ``start`` into every hash state; return bytes read."""
    buf = bytearray(min(HASH_BLOCK, max(length, 1)))
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[: min(len(buf), length - done)]], start + done)
        if not n:
            break
        for st in states:
            st.update(view[:n])
        done += n
    return done


def _missing(path: Path, size: int) -> NoReturn:
    raise PrefixMismatch(f"{path} is missing but its checkpoint records {size} bytes")


def check_prefix(path: Path, chunks: Chunks, prefix_digest: str) -> None:
    """Raise :class:`PrefixMismatch` unless ``path`` starts with the recorded chunks.

    The read-only check of :meth:`LocalFile.reopen`, for a coordinator that must refuse a
    damaged part before any worker starts. A missing file passes only if nothing is recorded.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if size := sum(c[1] for c in chunks):
            _missing(path, size)
        return
    try:
        _verify_prefix(fd, path, chunks, prefix_digest)
    finally:
        os.close(fd)


def _verify_prefix(fd: int, path: Path, chunks: Chunks, prefix_digest: str) -> xxhash.xxh3_128:
    """Hash ``fd``'s recorded chunks, comparing each; return the whole prefix's hash state."""
    size = sum(c[1] for c in chunks)
    actual = os.fstat(fd).st_size
    if actual < size:
        raise PrefixMismatch(
            f"{path} is {actual} bytes but its checkpoint records {size}: the file was "
            "truncated or replaced"
        )
    file_hash = xxhash.xxh3_128()
    for i, (offset, nbytes, digest) in enumerate(chunks):
        chunk_hash = xxhash.xxh3_128()
        hash_range(fd, offset, nbytes, file_hash, chunk_hash)
        if chunk_hash.hexdigest() != digest:
            raise PrefixMismatch(
                f"{path} does not match its checkpoint from chunk {i} (bytes {offset}-"
                f"{offset + nbytes}): the file was modified"
            )
    if file_hash.hexdigest() != prefix_digest:
        raise PrefixMismatch(f"{path} does not match its checkpoint's digest")
    return file_hash


class LocalFile:
    """The output file, written at the end, with a rolling whole-file digest.

    A :class:`~copystream.destinations.Destination`. Create it with :meth:`create` (a new, empty
    file) or :meth:`reopen` (an existing file whose prefix is verified against recorded chunk
    digests before anything is truncated). ``offset`` is the end of what is written so far.
    """

    def __init__(self, fd: int, path: Path, offset: int, file_hash: xxhash.xxh3_128) -> None:
        self._fd = fd
        self.path = path
        self.offset = offset
        self._file_hash = file_hash
        self._chunk_hash = xxhash.xxh3_128()
        self._chunk_start = offset
        self._saved_hash = file_hash.copy()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path) -> LocalFile:
        """Create ``path`` (which must not exist) as an empty output file."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return cls(fd, path, 0, xxhash.xxh3_128())

    @classmethod
    def reopen(cls, path: Path, chunks: Chunks, prefix_digest: str) -> LocalFile:
        """Open an existing output, verify its first ``sum(bytes)`` bytes, then cut the rest.

        ``chunks`` are ``(offset, bytes, xxh3_128 hex)`` records in file order and
        ``prefix_digest`` the digest of the whole prefix. The file is read before it is changed:
        on any mismatch :class:`PrefixMismatch` is raised and the file is left untouched.
        """
        size = sum(c[1] for c in chunks)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            _missing(path, size)
        try:
            file_hash = _verify_prefix(fd, path, chunks, prefix_digest)
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)  # bytes of a chunk that never reached its checkpoint
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, size, file_hash)

    # -- writing ------------------------------------------------------------------------------

    def begin_chunk(self) -> None:
        """Mark the start of a chunk: the point :meth:`rollback` returns to."""
        self._chunk_start = self.offset
        self._chunk_hash = xxhash.xxh3_128()
        self._saved_hash = self._file_hash.copy()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data`` to the file and to both digests."""
        self._chunk_hash.update(data)
        self._file_hash.update(data)
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, self.offset)  # explicit offset: no seek state
                view = view[n:]
                self.offset += n
        except OSError as e:
            raise_if_full(e, f"cannot write {self.path}")
            raise

    def end_chunk(self) -> ChunkWritten:
        """Close the current chunk: where it starts, its size and the digest of its bytes."""
        return ChunkWritten(
            self._chunk_start, self.offset - self._chunk_start, self._chunk_hash.hexdigest()
        )

    def rollback(self) -> None:
        """Forget everything written since :meth:`begin_chunk`: truncate and rewind the digest."""
        os.ftruncate(self._fd, self._chunk_start)
        self.offset = self._chunk_start
        self._file_hash = self._saved_hash.copy()
        self._chunk_hash = xxhash.xxh3_128()

    def cut(self, position: int) -> None:
        """Truncate the file to ``position`` (an earlier chunk's end) after a failed commit.

        The digests are not rewound: the file is closed after this, and resumed from its
        checkpoint.
        """
        os.ftruncate(self._fd, position)
        self.offset = min(self.offset, position)

    def sync(self) -> None:
        """Make every byte written so far durable (called before each checkpoint)."""
        try:
            os.fsync(self._fd)
        except OSError as e:  # e.g. NFS reports a full disk only now
            raise_if_full(e, f"cannot write {self.path}")
            raise

    @property
    def digest(self) -> str:
        """xxh3-128 hex digest of the file's bytes so far."""
        return self._file_hash.hexdigest()

    def state(self) -> dict[str, Any]:
        """What the checkpoint records of a local file: its kind (the offset says the rest)."""
        return {"kind": KIND}

    def close(self) -> None:
        """Close the file descriptor (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
