"""Durable, atomic replacement of small files (checkpoints, manifests, reports), and the lock
files that keep two processes from writing the same files at once."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskFull, UsageError

__all__ = [
    "NO_SPACE",
    "atomic_write",
    "fsync_dir",
    "fsync_path",
    "lock_path",
    "locked",
    "raise_if_full",
    "remove_stale_temporaries",
    "stale_temporaries",
    "temporary_target",
]


def lock_path(output: Path) -> Path:
    """The lock file that keeps two processes from writing ``output`` (an export's file, or
    the state of one of its key ranges) at once."""
    return output.with_name(output.name + ".lock")


@contextlib.contextmanager
def locked(path: Path, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created 0600, never through a symlink).

    Raises :class:`UsageError` with ``busy`` when another process holds it. The lock file is
    removed on the way out, whatever happened, so none is left behind.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(busy) from e
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename or unlink inside it is durable."""
    fsync_path(directory, os.O_DIRECTORY)


def fsync_path(path: Path, flags: int = 0) -> None:
    """fsync the file (or, with ``os.O_DIRECTORY``, the directory) at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    The temporary file is created with ``O_EXCL`` (``mkstemp``) in the same directory, so it can
    never follow a planted symlink; it is written, fsynced, given ``mode``, renamed over ``path``,
    and the directory is fsynced.

    Lack of space (or quota) raises :class:`DiskFull`; ``path`` is then unchanged.
    """
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise_if_full(e, f"cannot write {path}")
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise_if_full(e, f"cannot write {path}")
        raise
    fsync_dir(directory)


#: What the kernel says when there is no room: the disk is full, the quota used up, the file
#: larger than the filesystem allows.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def raise_if_full(e: OSError, doing: str) -> None:
    """Raise :class:`DiskFull` ("``doing``: reason") from ``e`` when it says there is no room;
    else return (the caller re-raises ``e``). The one place the errno mapping lives."""
    if e.errno in NO_SPACE:
        raise DiskFull(f"{doing}: {os.strerror(e.errno)}") from e


#: The characters of the random part of a ``mkstemp`` name (8 of them).
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def temporary_target(name: str) -> str | None:
    """The name of the file an interrupted atomic write's temporary ``name`` was for
    (``.TARGET.XXXXXXXX.tmp``, as :func:`atomic_write` makes them), else ``None``."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    target, dot, middle = name[1 : -len(".tmp")].rpartition(".")
    if not (dot and target and len(middle) == 8 and set(middle) <= _TEMP_CHARS):
        return None
    return target


def stale_temporaries(directory: Path) -> dict[str, list[Path]]:
    """Every temporary file of an interrupted atomic write in ``directory``, by the name of the
    file it was for: one scan of the directory, however many files it holds."""
    found: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        target = temporary_target(entry.name)
        if target is not None and entry.is_file(follow_symlinks=False):
            found.setdefault(target, []).append(Path(entry.path))
    return found


def remove_stale_temporaries(path: Path) -> int:
    """Delete the temporary files that interrupted :func:`atomic_write` calls of ``path`` left.

    A process killed between creating its ``.NAME.XXXXXXXX.tmp`` and renaming it leaves that
    file behind, and every kill adds one. Call this only while no other process can be writing
    ``path`` (under the export's lock). Returns how many were removed.
    """
    removed = 0
    for stale in stale_temporaries(path.parent).get(path.name, []):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
            removed += 1
    return removed
