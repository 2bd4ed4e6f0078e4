"""The join of a parallel export: the later parts appended to OUTPUT in constant free space.

When every range of a ``workers`` export is finished, OUTPUT holds the first part (written in
place) and ``OUTPUT.part-NNNN`` the others. :func:`join_parts` appends them to OUTPUT in key
order, block by block, and gives each block's space back as soon as OUTPUT holds it durably:

1. copy the next block of part *i* to OUTPUT's end (``copy_file_range``, in the kernel);
2. fsync OUTPUT;
3. record in the parts plan (``OUTPUT.parts.json``, atomically replaced) that OUTPUT now holds
   part *i* up to the block's end;
4. punch the block out of the part file (``fallocate(FALLOC_FL_PUNCH_HOLE)``), freeing it.

So the join needs one block of free space, not a part's worth, and the block's size follows the
free space (:func:`join_block`): large on a roomy disk, small on a disk sized for the result.
Every byte of the result is always durable in exactly one place the plan names. A crash at any
point resumes from the record: OUTPUT is cut back to what the record vouches for (a block
copied after it is copied again), and the part files are never read before the recorded
position, where they are intact. Once a join has begun the ranges are never run again (their
part files are being consumed): the plan's ``version`` becomes 3 and the outcomes of the ranges
are read from their checkpoints. At the end the whole of OUTPUT is re-hashed against every
chunk's digest.

On a filesystem that cannot punch holes, a part's space comes back when the part has been
copied whole and its file is removed: the join then needs the largest part's size free.

A compressed output's manifest records the digest of the whole *uncompressed* stream, which
only decompressing every range in key order gives (an xxh3 state cannot be combined or saved).
Done after the ranges, that was ~1.9 s of one core per GB of CSV with the rest of the machine
idle. So while the ranges run a :class:`Follower` (:func:`following`) decompresses each range's
committed chunks in key order, as their checkpoints record them, checking every chunk's two
digests: range 0's chunks as they are committed, a later range's once the ones before it are
done. The join then decompresses only what it did not get to, and still re-hashes the joined
file's stored bytes against every chunk's digest. Anything unexpected (a range rewritten by a
resume, an unreadable chunk) makes the follower give up, and the join decompresses it all.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from ._atomic import NO_SPACE, fsync_dir, raise_if_full
from .checkpoint import Checkpoint, ChunkRecord, load_checkpoint
from .destinations import rehash
from .errors import CheckpointMismatch, DiskFull, ExportFailed, PrefixMismatch, Remedy
from .part import PartOutcome
from .ranges import KeyRanges, part_data_path, part_path, save_parts

__all__ = [
    "FOLLOW_POLL",
    "MAX_JOIN_BLOCK",
    "MIN_JOIN_BLOCK",
    "Follower",
    "following",
    "join_block",
    "join_parts",
    "joined_outcomes",
    "punch_hole",
]

log = logging.getLogger("copystream")

#: The smallest block the join copies: below it the per-block fsync and plan record would cost
#: more than the copy. A disk with less free space than this cannot join (exit 1, free space).
MIN_JOIN_BLOCK = 1 << 20
#: The largest block: bounds what a crash makes the join copy again (a second or two of work).
#: On a roomy disk a part goes in a few blocks, so the fsyncs and plan records cost nothing
#: measurable next to one copy of the whole part.
MAX_JOIN_BLOCK = 1024 << 20

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


#: Blocks are whole multiples of this (except a part's last), so that punching one frees
#: whole filesystem blocks.
_ALIGN = 64 << 10


def join_block(free: int, left: int) -> int:
    """Bytes to copy in the next block: half the free space (the plan's record and whatever
    else runs need some too), within the bounds, aligned, and no more than is ``left``. Pure."""
    block = min(MAX_JOIN_BLOCK, max(MIN_JOIN_BLOCK, free // 2 // _ALIGN * _ALIGN))
    return max(0, min(left, block))


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):  # not glibc/musl on Linux
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fallocate.restype = ctypes.c_int
    return libc


_LIBC = _libc()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free ``length`` bytes of ``fd`` from ``offset`` (they read as zeros; the size stays).

    Returns ``False`` when the filesystem (or the platform) cannot; other errors raise.
    """
    if length <= 0:
        return True
    if _LIBC is None:
        return False
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _LIBC.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def _copy_range(src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> None:
    """Copy ``count`` bytes between explicit offsets, in the kernel where it can."""
    done = 0
    kernel = True
    while done < count:
        if kernel:
            try:
                n = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
            except OSError as e:
                if e.errno in NO_SPACE:
                    raise
                kernel = False  # a filesystem without it: read and write
                continue
        else:
            data = os.pread(src, min(count - done, MIN_JOIN_BLOCK), src_offset + done)
            n = os.pwrite(dst, data, dst_offset + done) if data else 0
        if n == 0:
            raise ExportFailed(
                f"a part file is shorter than its checkpoint ({count - done} bytes missing)",
                remedy=Remedy.RESTART,
            )
        done += n


def joined_outcomes(output: Path, parts: KeyRanges) -> list[PartOutcome]:
    """The outcomes of the ranges of a plan whose join has begun, from their checkpoints."""
    outcomes = []
    for i in range(len(parts.ranges)):
        state = part_path(output, i)
        cp = load_checkpoint(state)
        if cp is None or not cp.finished:
            raise CheckpointMismatch(
                f"the join of {output} has begun but range {i} has no finished checkpoint"
            )
        outcomes.append(PartOutcome(cp, cp.xxh3_128, 0, True, False))
    log.info(
        "%s: every range is exported; resuming the join at part %d, byte %s",
        output.name,
        parts.join[0] if parts.join else 0,
        f"{parts.join[1]:,}" if parts.join else 0,
    )
    return outcomes


def join_parts(
    output: Path,
    parts: KeyRanges,
    outcomes: Sequence[PartOutcome],
    followed: Follower | None = None,
) -> tuple[Checkpoint, str]:
    """Append the finished later parts to ``output`` in constant free space (module docstring),
    or finish a join that was interrupted; re-hash the result against every chunk's digest
    (``followed``: what a :class:`Follower` decompressed already is not decompressed again).

    Returns the combined checkpoint (chunk offsets in the final file) and the file's digest.
    Raises :class:`DiskFull` when not even one block fits (the join resumes once there is room).
    """
    if parts.join is None:
        start = 1 if parts.first_in_place else 0
        if start == 0:  # a 0.1.0 plan: OUTPUT is at most the torn join of an older run
            with contextlib.suppress(FileNotFoundError):
                output.unlink()
        parts = replace(parts, join=(start, 0))
        save_parts(output, parts)
    raw, t0 = None, time.monotonic()
    if followed is not None:
        followed.finish()  # before the join punches the part files it reads
        raw = followed.result(outcomes)
    if raw is None and parts.export.get("compress") is not None:
        why = followed.gave_up if followed is not None else "not followed"
        log.debug("%s: the join decompresses every range (%s)", output.name, why)
    join = _Join(output, parts, [o.checkpoint.offset for o in outcomes])
    try:
        t1 = time.monotonic()
        join.append()
        t2 = time.monotonic()
        chunks, digest, destination = _verify(output, join.fd, outcomes, parts.export, raw)
    finally:
        os.close(join.fd)
    fsync_dir(output.parent)
    log.debug("%s: joined: %.2fs decompressing what was left, %.2fs appending, %.2fs "
              "re-hashing", output.name, t1 - t0, t2 - t1, time.monotonic() - t2)  # fmt: skip
    return _combined(parts, outcomes, chunks, digest, destination), digest


class _Join:
    """One run of the join: OUTPUT open, and the plan as last recorded."""

    def __init__(self, output: Path, parts: KeyRanges, sizes: Sequence[int]) -> None:
        self.output = output
        self.parts = parts  # as on disk: its join record vouches for OUTPUT's first bytes
        self.sizes = sizes
        self.fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            recorded, actual = self.recorded, os.fstat(self.fd).st_size
            if actual < recorded:
                raise PrefixMismatch(
                    f"{output} is {actual} bytes but the join of its parts recorded {recorded}: "
                    "the file was truncated or replaced"
                )
            if actual > recorded:  # a block copied after the last record: it is copied again
                os.ftruncate(self.fd, recorded)
                os.fsync(self.fd)
        except BaseException:
            os.close(self.fd)
            raise

    @property
    def recorded(self) -> int:
        """The length of OUTPUT the join record vouches for."""
        assert self.parts.join is not None
        part, copied = self.parts.join
        return sum(self.sizes[:part]) + copied

    def append(self) -> None:
        """Copy what the join record does not cover yet, part by part, block by block."""
        assert self.parts.join is not None
        first, copied = self.parts.join
        try:
            for i in range(first, len(self.sizes)):
                done = copied if i == first else 0
                if done < self.sizes[i]:
                    self._append_part(i, done)
                with contextlib.suppress(FileNotFoundError):  # every byte of it is in OUTPUT
                    part_path(self.output, i).unlink()
        except (OSError, DiskFull) as e:
            os.ftruncate(self.fd, self.recorded)  # the unrecorded block's space, back
            doing = f"cannot join the parts into {self.output}"
            if isinstance(e, OSError):
                raise_if_full(e, doing)
                raise
            raise DiskFull(f"{doing}: {e.problem}") from e

    def _append_part(self, i: int, done: int) -> None:
        """Append part ``i`` from its byte ``done`` (steps 1-4 of the module docstring)."""
        base, size = sum(self.sizes[:i]), self.sizes[i]
        src = os.open(part_path(self.output, i), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            punches = self._punch(src, 0, done)  # what a kill before the last punch left
            while done < size:
                n = join_block(_free(self.output.parent), size - done)
                _copy_range(src, done, self.fd, base + done, n)
                os.fsync(self.fd)
                done += n
                parts = replace(self.parts, join=(i, done))
                save_parts(self.output, parts)
                self.parts = parts
                punches = punches and self._punch(src, done - n, n)
        finally:
            os.close(src)

    def _punch(self, src: int, offset: int, length: int) -> bool:
        """Free a copied range of a part file; ``False`` (said once) if the filesystem cannot."""
        if punch_hole(src, offset, length):
            return True
        log.info(
            "%s: this filesystem cannot free a part while it is copied: the join needs room "
            "for a whole part", self.output.name,
        )  # fmt: skip
        return False


def _free(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


# -- following the ranges while they run --------------------------------------------------------

#: Seconds between the follower's looks at a range's checkpoint (a chunk takes ~2 s).
FOLLOW_POLL = 0.25


class Follower:
    """Decompresses a compressed ``workers`` export's committed chunks in key order while the
    ranges run, in a thread of the coordinator (module docstring): the uncompressed stream's
    size and digest so far, and the chunks done. Start with :meth:`start`; :meth:`finish`
    waits until it has done every chunk of the ranges' finished checkpoints (or given up)."""

    def __init__(self, output: Path, parts: KeyRanges) -> None:
        from .destinations.compressed import codec

        compress = parts.export["compress"]
        self._codec = codec(str(compress["codec"]), int(compress["level"]))
        self.output, self.parts = output, parts
        self.raw_hash, self.raw_bytes = xxhash.xxh3_128(), 0
        self.done: list[tuple[ChunkRecord, ...]] = []  # the chunks of each range, once all done
        self.gave_up: str | None = None
        self._ended = threading.Event()  # the ranges ended: their checkpoints are final
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="copystream-follow", daemon=True)

    def start(self) -> None:
        """Start following (the ranges' checkpoints may not exist yet)."""
        self._thread.start()

    def finish(self, *, stop: bool = False) -> None:
        """Tell the thread that the ranges ended and wait until it has done every chunk of
        their checkpoints (``stop``: until it stops, at its next look)."""
        self._stopped = self._stopped or stop
        self._ended.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self, outcomes: Sequence[PartOutcome]) -> tuple[int, str] | None:
        """The uncompressed size and digest of the whole stream, if every chunk of the ranges'
        ``outcomes`` was followed (the same chunks: no range rewritten since); else ``None``."""
        if self.gave_up is None and self.done != [o.checkpoint.chunks for o in outcomes]:
            self.gave_up = "the ranges' chunks changed"
        if self.gave_up is not None:
            return None
        return self.raw_bytes, self.raw_hash.hexdigest()

    def _run(self) -> None:
        try:
            for i in range(len(self.parts.ranges)):
                if not self._range(i):
                    return
        except Exception as e:  # an optimisation only: the join does it all instead
            self.gave_up = f"{type(e).__name__}: {e}"

    def _range(self, i: int) -> bool:
        """Follow range ``i`` to its finished checkpoint; ``False`` if stopped or given up."""
        data = part_data_path(self.output, i, first_in_place=self.parts.first_in_place)
        done: list[ChunkRecord] = []
        fd = -1
        try:
            while not self._stopped:
                ended = self._ended.is_set()  # then this look is the last
                cp = load_checkpoint(part_path(self.output, i))
                chunks = cp.chunks if cp is not None else ()
                if chunks[: len(done)] != tuple(done):
                    self.gave_up = f"range {i} was rewritten"
                    return False
                for c in chunks[len(done) :]:
                    if fd < 0:
                        fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
                    self._chunk(fd, c)
                    done.append(c)
                if cp is not None and cp.finished:
                    self.done.append(tuple(done))
                    return True
                if ended:
                    self.gave_up = f"range {i} ended unfinished"
                    return False
                self._ended.wait(FOLLOW_POLL)
            return False
        finally:
            if fd >= 0:
                os.close(fd)

    def _chunk(self, fd: int, c: ChunkRecord) -> None:
        from .destinations.compressed import hash_chunk

        stored, raw = xxhash.xxh3_128(), xxhash.xxh3_128()
        n = hash_chunk(fd, c.offset, c.bytes, self._codec, (stored,), (raw, self.raw_hash))
        if stored.hexdigest() != c.xxh3_128 or (n, raw.hexdigest()) != c.raw:
            raise ValueError(f"chunk {c.index} differs from its record")
        self.raw_bytes += n


@contextlib.contextmanager
def following(output: Path, parts: KeyRanges) -> Iterator[Follower | None]:
    """A started :class:`Follower` of a compressed export's ranges (``None`` for any other
    output: its join decompresses nothing); stopped on the way out if the ranges failed."""
    if parts.export.get("compress") is None or parts.export.get("parquet") is not None:
        yield None
        return
    follower = Follower(output, parts)
    follower.start()
    try:
        yield follower
    except BaseException:
        follower.finish(stop=True)
        raise


def combined_chunks(outcomes: Sequence[PartOutcome]) -> list[ChunkRecord]:
    """Every range's chunks, numbered and placed in the whole output (a joined file, or an S3
    object of ranges). Pure."""
    chunks: list[ChunkRecord] = []
    offset = 0
    for o in outcomes:
        for c in o.checkpoint.chunks:
            chunks.append(replace(c, index=len(chunks), offset=offset + c.offset))
        offset += o.checkpoint.offset
    return chunks


def _verify(
    output: Path,
    fd: int,
    outcomes: Sequence[PartOutcome],
    export: dict[str, Any],
    raw: tuple[int, str] | None = None,
) -> tuple[list[ChunkRecord], str, dict[str, Any]]:
    """Re-hash the joined file chunk by chunk against the parts' records (a compressed file's
    chunks are decompressed too, unless ``raw`` gives the uncompressed stream's size and digest,
    from a :class:`Follower`); the chunks, the file's digest and its destination state."""
    chunks = combined_chunks(outcomes)
    offset = sum(o.checkpoint.offset for o in outcomes)
    if os.fstat(fd).st_size != offset:
        raise ExportFailed(f"joining the parts of {output} left it at the wrong size")
    try:
        digest, destination = rehash(fd, chunks, export, raw)
    except ValueError as e:
        raise ExportFailed(
            f"joining the parts of {output} produced wrong bytes in chunk {e.args[0]}",
            remedy=Remedy.RESTART,
        ) from None
    return chunks, digest, destination


def _combined(
    parts: KeyRanges,
    outcomes: Sequence[PartOutcome],
    chunks: list[ChunkRecord],
    digest: str,
    destination: dict[str, Any],
) -> Checkpoint:
    """The checkpoint of the whole joined file, as a single-worker export would have it (an
    increment's is its first range's: it continues the output's export, started before)."""
    first = outcomes[0].checkpoint
    last_key = next(
        (o.checkpoint.last_key for o in reversed(outcomes) if o.checkpoint.chunks), None
    )
    return Checkpoint(
        export=parts.export,
        settings=parts.settings,
        started_at=parts.started_at if first.increment is None else first.started_at,
        chunk_rows=first.chunk_rows,
        estimated_rows=first.estimated_rows,
        offset=sum(o.checkpoint.offset for o in outcomes),
        rows=sum(o.checkpoint.rows for o in outcomes),
        last_key=last_key,
        xxh3_128=digest,
        finished=True,
        chunks=tuple(chunks),
        destination=destination,
        increment=first.increment,
    )
