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
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ._atomic import NO_SPACE, fsync_dir, raise_if_full
from .checkpoint import Checkpoint, ChunkRecord, load_checkpoint
from .destinations import rehash
from .errors import CheckpointMismatch, DiskFull, ExportFailed, PrefixMismatch, Remedy
from .part import PartOutcome
from .ranges import KeyRanges, part_path, save_parts

__all__ = [
    "MAX_JOIN_BLOCK",
    "MIN_JOIN_BLOCK",
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
    output: Path, parts: KeyRanges, outcomes: Sequence[PartOutcome]
) -> tuple[Checkpoint, str]:
    """Append the finished later parts to ``output`` in constant free space (module docstring),
    or finish a join that was interrupted; re-hash the result against every chunk's digest.

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
    join = _Join(output, parts, [o.checkpoint.offset for o in outcomes])
    try:
        join.append()
        chunks, digest, destination = _verify(output, join.fd, outcomes, parts.export)
    finally:
        os.close(join.fd)
    fsync_dir(output.parent)
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
    output: Path, fd: int, outcomes: Sequence[PartOutcome], export: dict[str, Any]
) -> tuple[list[ChunkRecord], str, dict[str, Any]]:
    """Re-hash the joined file chunk by chunk against the parts' records (a compressed file's
    chunks are decompressed too); the chunks, the file's digest and its destination state."""
    chunks = combined_chunks(outcomes)
    offset = sum(o.checkpoint.offset for o in outcomes)
    if os.fstat(fd).st_size != offset:
        raise ExportFailed(f"joining the parts of {output} left it at the wrong size")
    try:
        digest, destination = rehash(fd, chunks, export)
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
