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

When every range runs at once (as many workers as ranges), range 0 needs no decompressing at
all: its process hashed its uncompressed bytes as it streamed them (a resumed range 0 rebuilt
that state from its verified prefix). So *that* process, once its range is finished, goes on
following the later ranges in key order (:func:`follow_after_range`: the same :class:`Follower`,
started from range 0's own state, on that process's calling thread), and reports the whole
stream's size and digest with the chunks it covered (:class:`~copystream.part.Followed`); range
0 gets a smaller share of the keys (:func:`~copystream.ranges.first_share`), so that it follows
range 1 while range 1 still runs. The join trusts that result only when the chunks it covers are
exactly those of every range's final checkpoint (:func:`followed_stream`); otherwise, or if
range 0's process gave up (a later range not running, a frame that does not match its record),
the join decompresses every range itself. A process following a range that no process is
exporting (failed for good, or dead and not yet started again) gives up after
:data:`NOT_RUNNING_GRACE` seconds rather than wait for ever: whether one is, it reads from the
kernel's table of file locks (each range's process holds ``OUTPUT.part-NNNN.lock``), without
taking the lock, or, where that table cannot tell, from the range's checkpoint and part file
changing; and whatever the table says, it gives up on a range whose files have not changed for
:data:`STALLED_GRACE`. The range's checkpoint is read again only when it was replaced or the
part file grew.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import xxhash

from ._atomic import NO_SPACE, fsync_dir, raise_if_full
from .checkpoint import Checkpoint, ChunkRecord, checkpoint_path, load_checkpoint
from .destinations import rehash
from .errors import CheckpointMismatch, DiskFull, ExportFailed, PrefixMismatch, Remedy
from .part import Followed, PartJob, PartOutcome
from .progress import Progress
from .ranges import (
    KeyRanges,
    part_data_path,
    part_lock_path,
    part_path,
    run_range,
    save_parts,
)

__all__ = [
    "FOLLOW_POLL",
    "MAX_JOIN_BLOCK",
    "MIN_JOIN_BLOCK",
    "NOT_RUNNING_GRACE",
    "STALLED_GRACE",
    "Follower",
    "compressed_file",
    "follow_after_range",
    "followed_stream",
    "following",
    "join_block",
    "join_parts",
    "joined_outcomes",
    "punch_hole",
    "range0_follows",
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
    raw, t0, why = None, time.monotonic(), "not followed"
    if followed is not None:
        followed.finish()  # before the join punches the part files it reads
        raw, why = followed.result(outcomes), str(followed.gave_up)
    elif outcomes and outcomes[0].followed is not None:  # range 0's process followed the rest
        raw, why = followed_stream(outcomes), "the ranges' chunks changed after range 0 followed"
    if raw is None and parts.export.get("compress") is not None:
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
#: Seconds that range 0's process keeps following a later range that is not finished while no
#: process is exporting it (its worker starting, or started again after it died) before it
#: gives up (the join then decompresses instead): what a range that failed for good delays the
#: end of the export by.
NOT_RUNNING_GRACE = 5.0
#: Seconds after which range 0's process gives up on a later range whose checkpoint and part file
#: have not changed at all, even while its lock looks held (a lock misread: the kernel's table
#: names files by device and inode, which some filesystems report differently to ``stat``).
STALLED_GRACE = 600.0


class Follower:
    """Decompresses a compressed ``workers`` export's committed chunks in key order while the
    ranges run (module docstring): the uncompressed stream's size and digest so far, and the
    chunks done. In a thread of the coordinator (:meth:`start`; :meth:`finish` waits until it
    has done every chunk of the ranges' finished checkpoints, or given up), or on the calling
    thread of range 0's process (:meth:`follow`), ``first`` then giving range 0's chunks and
    its uncompressed size and hash state, and ``running(i)`` whether a process is exporting
    range ``i`` (without it, the follower waits for :meth:`finish`)."""

    def __init__(
        self,
        output: Path,
        parts: KeyRanges,
        first: tuple[tuple[ChunkRecord, ...], int, Any] | None = None,
        running: Callable[[int], bool] | None = None,
    ) -> None:
        from .destinations.compressed import codec

        compress = parts.export["compress"]
        self._codec = codec(str(compress["codec"]), int(compress["level"]))
        self.output, self.parts = output, parts
        self.raw_hash, self.raw_bytes = xxhash.xxh3_128(), 0
        self.done: list[tuple[ChunkRecord, ...]] = []  # the chunks of each range, once all done
        if first is not None:
            self.done, self.raw_bytes, self.raw_hash = [first[0]], first[1], first[2]
        self.gave_up: str | None = None
        self._running = running
        self._ended = threading.Event()  # the ranges ended: their checkpoints are final
        self._stopped = False
        self._thread = threading.Thread(target=self.follow, name="copystream-follow", daemon=True)

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

    def follow(self) -> None:
        """Follow every range not done yet, in key order, to its finished checkpoint."""
        try:
            for i in range(len(self.done), len(self.parts.ranges)):
                if not self._range(i):
                    return
        except Exception as e:  # an optimisation only: the join does it all instead
            self.gave_up = f"{type(e).__name__}: {e}"

    def _range(self, i: int) -> bool:
        """Follow range ``i`` to its finished checkpoint; ``False`` if stopped or given up."""
        data = part_data_path(self.output, i, first_in_place=self.parts.first_in_place)
        done: list[ChunkRecord] = []
        fd = -1
        # when it began following, a process was last seen on it, its files last changed
        began = seen = moved = time.monotonic()
        files: tuple[tuple[int, ...], ...] | None = None
        try:
            while not self._stopped:
                ended = self._ended.is_set()  # then this look is the last
                now_files = _signature(checkpoint_path(part_path(self.output, i)), data)
                if now_files != files or ended:  # the checkpoint is read only when it changed
                    files, moved = now_files, time.monotonic()
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
                seen = max(self._seen(i, seen), moved)
                why = _why_give_up(ended, time.monotonic(), seen, moved)
                if why is not None:
                    seen_of = _evidence(self.output, i, data, began)
                    self.gave_up = f"range {i} {why} ({seen_of})"
                    return False
                self._ended.wait(FOLLOW_POLL)
            return False
        finally:
            if fd >= 0:
                os.close(fd)

    def _seen(self, i: int, seen: float) -> float:
        """When a process was last seen exporting range ``i`` (``seen``: before this look);
        without ``running``, always now: the coordinator calls :meth:`finish` instead."""
        if self._running is None or self._running(i):
            return time.monotonic()
        return seen

    def _chunk(self, fd: int, c: ChunkRecord) -> None:
        from .destinations.compressed import hash_chunk

        stored, raw = xxhash.xxh3_128(), xxhash.xxh3_128()
        n = hash_chunk(fd, c.offset, c.bytes, self._codec, (stored,), (raw, self.raw_hash))
        if stored.hexdigest() != c.xxh3_128 or (n, raw.hexdigest()) != c.raw:
            raise ValueError(f"chunk {c.index} differs from its record")
        self.raw_bytes += n


def compressed_file(export: dict[str, Any]) -> bool:
    """Whether an export (its identity) writes a compressed file, whose join needs the
    uncompressed stream's digest. Pure."""
    return export.get("compress") is not None and export.get("parquet") is None


def range0_follows(parts: KeyRanges, workers: int) -> bool:
    """Whether range 0's process follows the later ranges of a ``workers`` export once its
    own is finished (module docstring): a compressed file's ranges, all running at once (with
    fewer workers a later range could wait for range 0's worker), the join not begun. Pure."""
    many = 1 < len(parts.ranges) <= workers
    return compressed_file(parts.export) and many and parts.join is None


def followed_stream(outcomes: Sequence[PartOutcome]) -> tuple[int, str] | None:
    """The uncompressed size and digest of the whole stream that range 0's process reported
    (:func:`follow_after_range`), if the chunks it covered are exactly those of every range's
    final checkpoint in ``outcomes`` (no range rewritten since it followed); else ``None``.
    Pure."""
    followed = outcomes[0].followed if outcomes else None
    if followed is None or followed.chunks != tuple(o.checkpoint.chunks for o in outcomes):
        return None
    return followed.raw_bytes, followed.raw_xxh3_128


def follow_after_range(
    output: Path,
    parts: KeyRanges,
    template: PartJob,
    i: int,
    checked: bool = False,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> PartOutcome:
    """Range 0's task when :func:`range0_follows`: :func:`~copystream.ranges.run_range`, then,
    from the range's own uncompressed hash state, follow the later ranges in key order; the
    outcome carries the whole stream's size and digest (``followed``) unless it gave up."""
    from .destinations.compressed import CompressedFile

    kept: list[tuple[int, Any]] = []

    def keep(dest: object) -> None:
        if isinstance(dest, CompressedFile):
            kept.append(dest.raw_stream())

    outcome = run_range(
        output, parts, template, i, checked, progress=progress, sleep=sleep, finished=keep
    )
    state = outcome.checkpoint.destination
    if i != 0 or not kept or kept[0][0] != state.get("uncompressed_bytes") or (
        kept[0][1].hexdigest() != state.get("uncompressed_xxh3_128")
    ):  # fmt: skip
        log.debug("%s: range %d does not follow the others (no live state)", output.name, i + 1)
        return outcome
    t0, cpu = time.monotonic(), time.process_time()
    running = functools.partial(_range_running, output)
    follower = Follower(output, parts, (outcome.checkpoint.chunks, *kept[0]), running)
    follower.follow()
    log.debug("%s: the first range followed the others for %.2fs (%.2fs of CPU)%s", output.name,
              time.monotonic() - t0, time.process_time() - cpu,
              f"; gave up: {follower.gave_up}" if follower.gave_up else "")  # fmt: skip
    if follower.gave_up is not None:
        return outcome
    done = Followed(tuple(follower.done), follower.raw_bytes, follower.raw_hash.hexdigest())
    return replace(outcome, followed=done)


def _range_running(output: Path, i: int) -> bool:
    """Whether a process holds range ``i``'s lock (:func:`~copystream.ranges.run_range`), read
    from the kernel's table of file locks (``/proc/locks``, Linux) without taking it: taking it,
    even for a moment, could refuse a worker starting the range. ``False`` when unknown (the
    follower then goes by whether the range's files change).

    The table names a file ``MAJOR:MINOR:INODE``; only the inode is compared, because btrfs
    and some overlay filesystems report another device number to ``stat`` than the table's. A
    file of another filesystem with the same inode number could be taken for it: then the
    follower waits up to :data:`STALLED_GRACE` for nothing, never longer."""
    try:
        inode = str(os.stat(part_lock_path(output, i)).st_ino)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            table = f.read()
    except OSError:
        return False
    return any(
        w.count(":") == 2 and w.rsplit(":", 1)[1] == inode
        for line in table.splitlines()
        for w in line.split()
    )


def _evidence(output: Path, i: int, data: Path, began: float) -> str:
    """What the follower saw of range ``i`` when it gave up, for the log: how long it followed,
    and which of the range's files (its checkpoint, its lock, ``data``) existed."""
    state = checkpoint_path(part_path(output, i))
    files = {"checkpoint": state, "lock": part_lock_path(output, i), "data": data}
    present = ", ".join(name for name, f in files.items() if f.exists()) or "none"
    return f"after {time.monotonic() - began:.1f}s; its files present: {present}"


def _signature(*paths: Path) -> tuple[tuple[int, ...], ...]:
    """What changes when a range commits a chunk or writes bytes: each file's inode,
    modification time and size (``()`` for a missing one). The checkpoint is replaced whole
    (a new inode) at every commit."""
    out: list[tuple[int, ...]] = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            out.append(())
            continue
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _why_give_up(ended: bool, now: float, seen: float, moved: float) -> str | None:
    """Why to stop following a range not finished yet (``None``: go on): the ranges ended,
    no process seen on it and its files unchanged for :data:`NOT_RUNNING_GRACE`, or its files
    unchanged for :data:`STALLED_GRACE` whatever its lock says. Pure."""
    if ended:
        return "ended unfinished"
    if now - seen > NOT_RUNNING_GRACE:
        return "is not running"
    if now - moved > STALLED_GRACE:
        return f"has not changed for {STALLED_GRACE:g}s"
    return None


@contextlib.contextmanager
def following(output: Path, parts: KeyRanges, workers: int = 1) -> Iterator[Follower | None]:
    """A started :class:`Follower` of a compressed export's ranges run by ``workers`` processes
    (``None`` for any other output, whose join decompresses nothing, and when range 0's process
    follows them: :func:`range0_follows`); stopped on the way out if the ranges failed."""
    if not compressed_file(parts.export) or range0_follows(parts, workers):
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
