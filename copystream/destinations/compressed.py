"""A compressed local file as a destination: every chunk is one zstd frame or one gzip member.

A concatenation of zstd frames is a valid ``.zst`` file and one of gzip members a valid ``.gz``
file, so the file is valid at every committed position, and resuming is still cut-and-append,
as for an uncompressed file (:mod:`.local`). Positions, offsets and the chunk digests that the
checkpoint and manifest record are those of the *stored* (compressed) bytes, so ``verify`` needs
no decompression. Each chunk also records the size and xxh3-128 of its uncompressed bytes, and
the state (:meth:`CompressedFile.state`) the size and digest of the whole uncompressed stream so
far, which equals psql's output. An xxh3 state cannot be saved, so a resume decompresses the
committed prefix once to rebuild it (checking every chunk's uncompressed digest on the way).

Compression runs off the streaming thread: :meth:`CompressedFile.write` hands each ~1 MiB buffer
to a thread of its own that compresses (zstd in :data:`ZSTD_THREADS` native worker threads of
its own; zlib in that thread, releasing the GIL while it works), hashes and writes it, so the
chunk loop goes on reading from the server meanwhile. At most :data:`QUEUE_BUFFERS` buffers wait
for that thread (the streaming thread waits when it falls behind), so memory stays bounded.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

import xxhash

from .._atomic import raise_if_full
from ..checkpoint import ChunkRecord
from ..errors import PrefixMismatch
from . import ChunkWritten

__all__ = [
    "KIND",
    "QUEUE_BUFFERS",
    "CompressedFile",
    "CorruptFrame",
    "codec",
    "fresh_state",
    "hash_chunk",
]

#: The ``kind`` of a compressed file's state in a checkpoint.
KIND = "compressed-file"

#: Buffers (of ~1 MiB, the chunk runner's write size) that may wait for the compressing thread.
#: Whichever side is slower keeps the queue full or empty whatever its length, so it only has to
#: smooth out bursts; each buffer more costs ~1 MB of peak memory (a 1M-row export: 59 MB of
#: peak RSS with 8, 52 MB with 2, the same wall time; a 5M-row one, in process: 53.0-53.8 MB
#: with 2, 51.5-52.6 MB with 1; the waits at the chunks' ends, for the frame's flush, were
#: 0.14-0.74 s per export with 2 and 0.18-0.41 s with 1, within the noise).
QUEUE_BUFFERS = 1

#: zstd worker threads per compressed output, and the input each compresses at a time. In
#: zstd's own (GIL-free) threads the compression never holds up the streaming thread, and on
#: cores shared with other work it still gets its share, as `zstd -T0` does. Measured on 2
#: busy cores, 1M rows (208 MB of CSV): one thread 17.6-19.5 s, two 13.2-14.0 s. Job size and
#: peak RSS of a 5M-row export: zstd's default (8 MiB) 100-109 MB, 1 MiB 62 MB, 512 KiB 55 MB,
#: with the output 1% smaller than a single thread's, not larger.
ZSTD_THREADS = 2
ZSTD_JOB_SIZE = 512 * 1024

_EMPTY = xxhash.xxh3_128().hexdigest()


class CorruptFrame(ValueError):
    """Stored bytes that do not decompress (a damaged or truncated frame or member)."""


class _Frame(Protocol):
    def compress(self, data: bytes | bytearray | memoryview, /) -> bytes: ...

    def flush(self) -> bytes: ...


class Codec:
    """One compression format at one level: frames to write, and a decoder across frames."""

    def __init__(self, name: str, level: int) -> None:
        self.name = name
        self.level = level
        #: What decompressing bytes that are not frames of this codec raises.
        self.errors: tuple[type[Exception], ...] = (zlib.error,)
        if name == "zstd":
            import zstandard  # imported where it is used: ``copystream --help`` stays fast

            # zstd's own worker threads do the compressing (as `zstd -T0` does), in 1 MiB jobs
            # to keep memory small; a checksum in every frame, as the zstd CLI writes by
            # default (`zstd -t` checks it).
            params = zstandard.ZstdCompressionParameters.from_level(
                level,
                threads=min(ZSTD_THREADS, os.cpu_count() or 1),
                job_size=ZSTD_JOB_SIZE,
                write_checksum=1,
            )
            self._zstd = zstandard
            self._cctx = zstandard.ZstdCompressor(compression_params=params)
            self.errors = (zstandard.ZstdError,)
        elif name != "gzip":
            raise ValueError(f"unknown codec {name!r}")

    def frame(self) -> _Frame:
        """A compressor for one new frame (zstd) or member (gzip); ``flush()`` ends it."""
        if self.name == "zstd":
            return self._cctx.compressobj()
        return zlib.compressobj(self.level, zlib.DEFLATED, 31)  # 31: a gzip header and trailer

    def _decompressor(self) -> Any:
        if self.name == "zstd":
            return self._zstd.ZstdDecompressor().decompressobj()
        return zlib.decompressobj(31)

    def decode(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """The decompressed bytes of the frames (members) that ``pieces`` hold, one after
        another. (python-zstandard's ``decompress()`` would stop after the first frame.)
        Raises :class:`CorruptFrame` for bytes that are not whole frames of this codec."""
        d = None
        try:
            for data in pieces:
                while data:
                    if d is None:
                        d = self._decompressor()
                    if out := d.decompress(data):
                        yield out
                    data, d = (d.unused_data, None) if d.eof else (b"", d)
        except self.errors as e:
            raise CorruptFrame(f"not a valid {self.name} stream ({e})") from e
        if d is not None:
            raise CorruptFrame(f"the {self.name} stream ends inside a frame")


def codec(name: str, level: int) -> Codec:
    """The :class:`Codec` for ``name`` (``"zstd"`` or ``"gzip"``) at ``level``."""
    return Codec(name, level)


def fresh_state(name: str, level: int) -> dict[str, Any]:
    """A compressed file's state before anything is stored."""
    return {
        "kind": KIND,
        "codec": name,
        "level": level,
        "uncompressed_bytes": 0,
        "uncompressed_xxh3_128": _EMPTY,
    }


#: Stored bytes decompressed at a time: a chunk is decompressed piece by piece, never whole (a
#: 64 KiB piece of CSV expands to a few hundred kilobytes; the formats cap it near 1000:1).
PIECE = 64 * 1024


def _pieces(fd: int, start: int, length: int, states: Sequence[Any]) -> Iterator[bytes]:
    """``length`` bytes of ``fd`` from ``start``, in pieces; each piece also feeds ``states``."""
    end = start + length
    while start < end:
        data = os.pread(fd, min(PIECE, end - start), start)
        if not data:
            return
        for st in states:
            st.update(data)
        start += len(data)
        yield data


def hash_chunk(
    fd: int,
    offset: int,
    nbytes: int,
    codec: Codec,
    stored: Sequence[Any] = (),
    raw: Sequence[Any] = (),
) -> int:
    """Feed the chunk's stored bytes to the ``stored`` hash states and its decompressed bytes to
    the ``raw`` ones; return its uncompressed size. Memory stays at a few buffers whatever the
    ratio. Raises :class:`CorruptFrame` when the bytes are not whole frames."""
    total = 0
    try:
        for block in codec.decode(_pieces(fd, offset, nbytes, stored)):
            for st in raw:
                st.update(block)
            total += len(block)
    except CorruptFrame as e:
        raise CorruptFrame(f"bytes {offset}-{offset + nbytes}: {e}") from e
    return total


def _mismatch(path: Path, what: str) -> NoReturn:
    raise PrefixMismatch(f"{path} does not match its checkpoint {what}: the file was modified")


def _verify(
    fd: int, path: Path, chunks: Sequence[ChunkRecord], digest: str, state: Mapping[str, Any]
) -> tuple[Any, Any, int]:
    """Check the committed prefix (stored and uncompressed digests of every chunk, and of the
    whole); return the stored and uncompressed hash states and the uncompressed size."""
    size = sum(c.bytes for c in chunks)
    if (actual := os.fstat(fd).st_size) < size:
        raise PrefixMismatch(
            f"{path} is {actual} bytes but its checkpoint records {size}: the file was "
            "truncated or replaced"
        )
    cdc = codec(str(state["codec"]), int(state["level"]))
    file_hash, raw_hash, raw_bytes = xxhash.xxh3_128(), xxhash.xxh3_128(), 0
    for c in chunks:
        chunk_hash, raw_chunk = xxhash.xxh3_128(), xxhash.xxh3_128()
        place = f"from chunk {c.index} (bytes {c.offset}-{c.offset + c.bytes})"
        try:
            n = hash_chunk(
                fd, c.offset, c.bytes, cdc, (file_hash, chunk_hash), (raw_hash, raw_chunk)
            )
        except CorruptFrame:
            _mismatch(path, place)
        if chunk_hash.hexdigest() != c.xxh3_128 or (n, raw_chunk.hexdigest()) != c.raw:
            _mismatch(path, place)
        raw_bytes += n
    if file_hash.hexdigest() != digest or (raw_bytes, raw_hash.hexdigest()) != (
        state.get("uncompressed_bytes"),
        state.get("uncompressed_xxh3_128"),
    ):
        _mismatch(path, "digest")
    return file_hash, raw_hash, raw_bytes


_END = object()  # ends the current frame
_STOP = object()  # ends the compressing thread


class CompressedFile:
    """A compressed output file, written at the end, one frame (member) per chunk.

    A :class:`~copystream.destinations.Destination`. Create it with :meth:`create` or
    :meth:`reopen` (the committed prefix is verified, stored and uncompressed, before anything
    is cut). ``offset`` is the end of the stored bytes, ``raw_bytes`` the uncompressed size.
    """

    def __init__(
        self, fd: int, path: Path, cdc: Codec, offset: int, file_hash: Any, raw: tuple[int, Any]
    ) -> None:
        self._fd, self.path, self._codec = fd, path, cdc
        self.offset = self._chunk_start = offset
        self.raw_bytes = self._raw_start = raw[0]
        self._file_hash, self._raw_hash = file_hash, raw[1]
        self._chunk_hash, self._raw_chunk = xxhash.xxh3_128(), xxhash.xxh3_128()
        self._saved = (file_hash.copy(), raw[1].copy())
        self._frame: _Frame | None = None
        self._error: BaseException | None = None
        self._discard = False
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_BUFFERS)
        self._thread = threading.Thread(target=self._work, name="copystream-compress", daemon=True)
        self._thread.start()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, state: Mapping[str, Any]) -> CompressedFile:
        """Create ``path`` (which must not exist) as an empty compressed output."""
        cdc = codec(str(state["codec"]), int(state["level"]))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        return cls(fd, path, cdc, 0, xxhash.xxh3_128(), (0, xxhash.xxh3_128()))

    @classmethod
    def reopen(
        cls, path: Path, chunks: Sequence[ChunkRecord], digest: str, state: Mapping[str, Any]
    ) -> CompressedFile:
        """Open an existing output, verify its committed prefix, then cut what lies past it.

        On any mismatch :class:`PrefixMismatch` is raised and the file is left untouched.
        """
        size = sum(c.bytes for c in chunks)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PrefixMismatch(
                f"{path} is missing but its checkpoint records {size} bytes"
            ) from None
        try:
            file_hash, raw_hash, raw_bytes = _verify(fd, path, chunks, digest, state)
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)  # a frame that never reached its checkpoint
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        cdc = codec(str(state["codec"]), int(state["level"]))
        return cls(fd, path, cdc, size, file_hash, (raw_bytes, raw_hash))

    # -- the compressing thread ---------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None and not self._discard:
                    self._take(item)
            except BaseException as e:  # raised on the loop's thread by its next call
                self._error = e
            finally:
                self._queue.task_done()

    def _take(self, item: object) -> None:
        if item is _END:
            frame = self._frame
            if frame is None and self.offset == 0:
                frame = self._codec.frame()  # an empty file is no valid .zst/.gz: an empty frame
            if frame is not None:
                self._store(frame.flush())
            self._frame = None
            return
        assert isinstance(item, bytes | bytearray | memoryview)
        if self._frame is None:
            self._frame = self._codec.frame()
        self._raw_hash.update(item)
        self._raw_chunk.update(item)
        self.raw_bytes += len(item)
        self._store(self._frame.compress(item))

    def _store(self, data: bytes) -> None:
        self._chunk_hash.update(data)
        self._file_hash.update(data)
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, self.offset)
                view = view[n:]
                self.offset += n
        except OSError as e:
            raise_if_full(e, f"cannot write {self.path}")
            raise

    def _settle(self, *, discard: bool) -> None:
        """Wait until the thread has taken every queued item (``discard``: without storing)."""
        self._discard = discard
        try:
            self._queue.join()
        finally:
            self._discard = False

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    # -- the Destination interface --------------------------------------------------------------

    def begin_chunk(self) -> None:
        """Start a chunk (the frame itself starts with its first byte)."""
        self._settle(discard=True)
        self._chunk_start, self._raw_start = self.offset, self.raw_bytes
        self._chunk_hash, self._raw_chunk = xxhash.xxh3_128(), xxhash.xxh3_128()
        self._saved = (self._file_hash.copy(), self._raw_hash.copy())
        self._frame = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the compressing thread (waits while the queue is full)."""
        self._raise()
        self._queue.put(data)

    def end_chunk(self) -> ChunkWritten:
        """End the chunk's frame, wait until it is written, and say where it is."""
        self._queue.put(_END)
        self._settle(discard=False)
        self._raise()
        return ChunkWritten(
            self._chunk_start,
            self.offset - self._chunk_start,
            self._chunk_hash.hexdigest(),
            raw=(self.raw_bytes - self._raw_start, self._raw_chunk.hexdigest()),
        )

    def rollback(self) -> None:
        """Forget the chunk: drop what is queued, truncate, rewind both digests."""
        self._settle(discard=True)
        self._error, self._frame = None, None
        os.ftruncate(self._fd, self._chunk_start)
        self.offset, self.raw_bytes = self._chunk_start, self._raw_start
        self._file_hash, self._raw_hash = self._saved[0].copy(), self._saved[1].copy()
        self._chunk_hash, self._raw_chunk = xxhash.xxh3_128(), xxhash.xxh3_128()

    def cut(self, position: int) -> None:
        """Truncate to ``position`` after a failed commit (the file is resumed afterwards)."""
        self._settle(discard=True)
        self._frame = None
        os.ftruncate(self._fd, position)
        self.offset = min(self.offset, position)

    def sync(self) -> None:
        """Make every ended chunk durable (on the commit thread, while the next one streams)."""
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise_if_full(e, f"cannot write {self.path}")
            raise

    def raw_stream(self) -> tuple[int, Any]:
        """The uncompressed size so far and a copy of its xxh3-128 state, which a caller may
        go on feeding (the join's follower, from range 0's process)."""
        self._settle(discard=False)
        return self.raw_bytes, self._raw_hash.copy()

    @property
    def digest(self) -> str:
        """xxh3-128 hex digest of the stored (compressed) bytes so far."""
        return str(self._file_hash.hexdigest())

    def state(self) -> dict[str, Any]:
        """The codec and level, and the uncompressed stream's size and digest so far."""
        return {
            **fresh_state(self._codec.name, self._codec.level),
            "uncompressed_bytes": self.raw_bytes,
            "uncompressed_xxh3_128": self._raw_hash.hexdigest(),
        }

    def close(self) -> None:
        """Stop the compressing thread and close the file (idempotent)."""
        if self._thread.is_alive():
            self._discard = True
            self._queue.put(_STOP)
            self._thread.join()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
