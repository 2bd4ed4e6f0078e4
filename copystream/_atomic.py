"""Durable, atomic replacement of small files (checkpoints, manifests, reports)."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from .errors import DiskFull

__all__ = ["atomic_write", "fsync_dir", "remove_stale_temporaries"]


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename or unlink inside it is durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
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
        _raise_if_full(path, e)
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
            _raise_if_full(path, e)
        raise
    fsync_dir(directory)


def _raise_if_full(path: Path, e: OSError) -> None:
    """Raise :class:`DiskFull` from ``e`` when it says the disk (or quota) is full."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise DiskFull(
            f"cannot write {path}: {os.strerror(e.errno)}; free some space and run the same "
            "command again to resume"
        ) from e


#: The characters of the random part of a ``mkstemp`` name (8 of them).
_TEMP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def remove_stale_temporaries(path: Path) -> int:
    """Delete the temporary files that interrupted :func:`atomic_write` calls of ``path`` left.

    A process killed between creating its ``.NAME.XXXXXXXX.tmp`` and renaming it leaves that
    file behind, and every kill adds one. Call this only while no other process can be writing
    ``path`` (under the export's lock). Returns how many were removed.
    """
    prefix, removed = f".{path.name}.", 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        name = entry.name
        middle = name[len(prefix) : -len(".tmp")]
        if (
            name.startswith(prefix)
            and name.endswith(".tmp")
            and len(middle) == 8
            and set(middle) <= _TEMP_CHARS
            and entry.is_file(follow_symlinks=False)
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed
