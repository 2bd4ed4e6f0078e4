"""A small table in one COPY, written atomically: an export without per-chunk machinery.

A table the planner sizes as small (:func:`is_small`: under
:data:`~copystream.sizing.SMALL_TABLE_BYTES` by estimate, chunk size adaptive, one worker) is
exported with one COPY in one ``REPEATABLE READ, READ ONLY`` transaction (the chunk runner's
single-COPY mode, importing a bulk job's snapshot if there is one) into a temporary file beside
the output (compressed as the export asks: one zstd frame or gzip member): :func:`copy_once`.
No checkpoint is written meanwhile (one COPY can only be redone
from the start), so a small export costs one connection and a few round trips. The manifest
(the same record a chunked export of one chunk writes, so ``verify`` and ``status`` read it alike;
on one line) travels with it as JSON: a bulk worker creates one file per table, as pg_dump does.

:func:`publish` then makes the result durable and visible: it fsyncs the file, writes the
manifest in place (a new file, fsynced), fsyncs the directory, and only then links the file to
its name (never over an existing file) and fsyncs the directory again. Killed before the
manifest is written, an export leaves only a temporary file (``.NAME.XXXXXXXX.tmp``, removed by
the next run); after, a manifest (whole or torn) without its output, which the next run takes
for a fresh start. :func:`publish` takes any number of results at once: a bulk job's
coordinator publishes its workers' small tables in groups, the files of a group all fsynced
together (several at once, so that the filesystem commits them in a few journal commits, not
one each) before any is linked, then one directory fsync per step for the whole group.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from ._atomic import fsync_dir, fsync_path, raise_if_full
from .checkpoint import checkpoint_path
from .chunk import Chunk, ChunkOutcome, ChunkRunner
from .destinations import ChunkWritten, Destination, create, fresh_state
from .errors import CopystreamError, ExportFailed, OutputExists
from .manifest import Manifest, manifest_path
from .ranges import parts_path
from .sizing import SMALL_TABLE_BYTES, first_chunk_rows
from .spec import ExportSpec, RunOptions
from .table import ResolvedTable

__all__ = [
    "MakeManifest",
    "Staged",
    "Written",
    "copy_once",
    "is_small",
    "publish",
    "temporary_path",
]


def is_small(table: ResolvedTable, spec: ExportSpec, run: RunOptions) -> bool:
    """Whether ``table`` is exported in one COPY written atomically. Pure.

    Only when the chunk size is left to copystream (an explicit ``chunk_rows`` asks for chunks),
    one worker is asked for, the output is not a Parquet dataset (written through its
    destination, part by part), and the planner's estimates say the table is small (unknown
    estimates, of a table never vacuumed or analyzed, do not).
    """
    if run.chunk_rows is not None or run.workers != 1:
        return False
    if spec.options.format == "parquet":
        return False
    if table.estimated_rows is None or table.estimated_bytes is None:
        return False
    # what a chunked export would do in one COPY anyway, and a table known to be empty
    rows, nbytes = table.estimated_rows, table.estimated_bytes
    return first_chunk_rows(rows, nbytes) == 0 or (rows == 0 and nbytes < SMALL_TABLE_BYTES)


@dataclass(frozen=True)
class Staged:
    """A small export's bytes in a temporary file beside where they go, and its manifest (the
    JSON, written by :func:`publish`): not yet durable nor visible."""

    output: Path
    temporary: Path  # the file's bytes, beside ``output``
    manifest: bytes  # its manifest's JSON

    def discard(self) -> None:
        """Remove the temporary file."""
        with contextlib.suppress(FileNotFoundError):
            self.temporary.unlink()


@dataclass(frozen=True)
class Written:
    """What :func:`copy_once` wrote: the staged files, and the manifest they hold."""

    staged: Staged
    manifest: Manifest


def temporary_path(output: Path) -> Path:
    """A new temporary name beside ``output``, ``.NAME.XXXXXXXX.tmp`` (what
    :func:`~copystream._atomic.remove_stale_temporaries` removes after a crash)."""
    return output.with_name(f".{output.name}.{os.urandom(4).hex()}.tmp")


#: What makes a small export's manifest from its rows, the chunk written, the destination's
#: state after it (a compressed file's: the CSV's size and digest) and the last key.
MakeManifest = Callable[[int, ChunkWritten, dict[str, Any], tuple[str, ...] | None], Manifest]


def _create_temporary(output: Path, spec: ExportSpec) -> tuple[Path, Destination]:
    """A new temporary file beside ``output``, as the destination ``spec`` asks for (plain or
    compressed); its name and the destination."""
    state = fresh_state(output, spec)
    while True:
        path = temporary_path(output)
        try:
            return path, create(path, state)  # O_EXCL: never through a planted symlink
        except FileExistsError:
            continue
        except OSError as e:
            raise_if_full(e, f"cannot write {path}")
            raise


def copy_once(
    conn: psycopg.Connection[Any],
    table: ResolvedTable,
    spec: ExportSpec,
    run: RunOptions,
    output: Path,
    *,
    snapshot: str | None,
    on_data: Callable[[int, int], None] | None,
    manifest: MakeManifest,
) -> Written:
    """Export all of ``table`` with one COPY on ``conn`` into a temporary file beside ``output``.

    ``spec`` is the resolved spec; ``snapshot`` an exported snapshot to read from;
    ``on_data(rows, bytes)`` is called as the rows arrive; ``manifest`` makes the manifest
    (:data:`MakeManifest`). A compressed output is one frame (member). Any error leaves no
    file behind, and ``conn`` in an unknown state (the caller closes it). ``conn`` must be in
    autocommit mode with no transaction open.
    """
    path, dest = _create_temporary(output, spec)
    try:
        runner = ChunkRunner(conn, io_timeout=run.io_timeout)
        chunk = Chunk(
            table, spec.options, after=None, rows=0, header=spec.options.header, snapshot=snapshot
        )
        dest.begin_chunk()
        if table.where is None:  # one round trip (no SQL of the user's in it)
            outcome = _with_timeout(conn, run, lambda: runner.run_whole(chunk, dest, on_data))
        else:
            outcome = _with_timeout(conn, run, lambda: runner.run(chunk, dest, on_data))
        written = dest.end_chunk()
        state = dest.state()
    except BaseException:
        dest.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    dest.close()
    try:
        record = manifest(outcome.rows, written, state, outcome.last_key)
        data = _manifest_json(record)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return Written(Staged(output, path, data), record)


def _manifest_json(record: Manifest) -> bytes:
    """A small export's manifest as JSON: on one line, as json's C encoder writes it (what
    ``indent`` would add costs a bulk worker more than the rest of the manifest's making)."""
    return json.dumps(record.to_json(), ensure_ascii=False, separators=(",", ": ")).encode() + b"\n"


def _with_timeout(
    conn: psycopg.Connection[Any], run: RunOptions, do: Callable[[], ChunkOutcome]
) -> ChunkOutcome:
    """``do()`` under ``run``'s statement timeout, which the connection does not keep after
    (it may serve another table next)."""
    if run.statement_timeout is None:
        return do()
    timeout = f"{int(run.statement_timeout * 1000)}ms"
    conn.execute("SELECT set_config('statement_timeout', %s, false)", [timeout])
    outcome = do()
    conn.execute("RESET statement_timeout")
    return outcome


# -- publishing ------------------------------------------------------------------------------------

#: How many files :func:`publish` fsyncs at once (see :meth:`_Step.sync_files`).
SYNC_THREADS = 8


def _write_in_place(path: Path, data: bytes) -> None:
    """``data`` in a new file ``path`` (0600, never through a symlink; fsynced), in place of one
    a killed run left there. Not atomic, and it need not be: a manifest is written before its
    output is linked, and a manifest without its output, whole or torn, is a fresh start to the
    next run (:func:`~copystream.state.discover`). A temporary file and a rename would cost a
    small table's publishing a third more (an inode, a rename, a directory entry)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def _vacant(output: Path) -> None:
    """Raise :class:`OutputExists` if another export wrote to ``output`` meanwhile (its file,
    checkpoint or key ranges are there): the caller holds the lock (or is the bulk job that
    owns the directory), so none can begin now."""
    for path in (output, checkpoint_path(output), parts_path(output)):
        if os.path.lexists(path):
            raise OutputExists(f"{path} appeared while {output.name} was being exported")


def _link(temporary: Path, output: Path) -> None:
    """Give ``temporary`` the name ``output``, never replacing a file of that name."""
    try:
        if not _rename_noreplace(temporary, output):  # no renameat2: a link, then an unlink
            try:
                os.link(temporary, output)
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                    raise
                # Neither: the caller holds the output's lock, so a check before the rename is
                # as good.
                if os.path.lexists(output):
                    raise FileExistsError(errno.EEXIST, "exists", str(output)) from e
                os.replace(temporary, output)
                return
            os.unlink(temporary)
    except FileExistsError as e:
        # Not ours: the manifest just written describes no file that is there.
        with contextlib.suppress(FileNotFoundError):
            manifest_path(output).unlink()
        raise OutputExists(f"{output} appeared while it was being exported") from e


_RENAMEAT2: list[Callable[..., int] | None] = []  # found on first use


def _rename_noreplace(source: Path, target: Path) -> bool:
    """Rename ``source`` to ``target`` unless ``target`` exists (``renameat2`` with
    ``RENAME_NOREPLACE``: one atomic step); ``False`` when the system or filesystem cannot."""
    if not _RENAMEAT2:
        _RENAMEAT2.append(None)
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                import ctypes

                _RENAMEAT2[0] = ctypes.CDLL(None, use_errno=True).renameat2
    rename = _RENAMEAT2[0]
    if rename is None:
        return False
    import ctypes

    at_fdcwd, noreplace = -100, 1
    if rename(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), noreplace) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(target))
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(source))


class _Step:
    """One stage of :func:`publish` applied to every item still in the running."""

    def __init__(self, items: Sequence[Staged], errors: list[CopystreamError | None]) -> None:
        self.items, self.errors = items, errors
        self.written = [False] * len(items)  # whether its manifest was written
        self.unexpected: list[BaseException] = []  # what a thread of sync_files raised

    def each(self, action: Callable[[int, Staged], None]) -> None:
        for i, item in enumerate(self.items):
            if self.errors[i] is not None:
                continue
            try:
                action(i, item)
            except CopystreamError as e:
                self.errors[i] = e
            except OSError as e:
                self.errors[i] = _failed_write(e, item.output)

    def sync_files(self) -> None:
        """fsync the file of every item still in the running and write its manifest (fsynced
        too), up to :data:`SYNC_THREADS` items at once: a filesystem commits the fsyncs that
        arrive together in one journal commit, where fsyncs one after another each wait for a
        commit of their own (on a virtual disk, a few milliseconds per file). Each file is
        still fsynced itself."""
        work = [i for i in range(len(self.items)) if self.errors[i] is None]
        started: list[threading.Thread] = []
        try:
            for k in range(1, min(SYNC_THREADS, len(work))):
                thread = threading.Thread(target=self._sync_each, args=(work[k::SYNC_THREADS],))
                thread.start()
                started.append(thread)
            self._sync_each(work[::SYNC_THREADS])  # a share of them in this thread
        finally:
            for thread in started:
                thread.join()
        if self.unexpected:  # a bug: every item fails (and is discarded), the caller says why
            for i in work:
                if self.errors[i] is None:
                    self.errors[i] = ExportFailed(f"publishing {self.items[i].output} failed")
            raise self.unexpected[0]

    def _sync_each(self, indices: Sequence[int]) -> None:
        try:
            for i in indices:
                self.errors[i] = self._sync(i)
        except BaseException as e:
            self.unexpected.append(e)

    def _sync(self, i: int) -> CopystreamError | None:
        """fsync item ``i``'s file and write its manifest in place (:func:`_write_in_place`)."""
        item = self.items[i]
        try:
            fsync_path(item.temporary)
            _write_in_place(manifest_path(item.output), item.manifest)
            self.written[i] = True
        except CopystreamError as e:
            return e
        except OSError as e:
            return _failed_write(e, item.output)
        return None

    def discard(self) -> None:
        """Remove the temporary file of every item that failed, and the manifest written for
        it unless its output is there: linked before a later step failed, the two stay
        together (the next run finds the export complete if the file verifies)."""
        for i, (item, error) in enumerate(zip(self.items, self.errors, strict=True)):
            if error is not None:
                item.discard()
                if self.written[i] and not os.path.lexists(item.output):
                    with contextlib.suppress(FileNotFoundError):
                        manifest_path(item.output).unlink()

    def sync_directories(self) -> None:
        """fsync the directory of every item still in the running (each directory once)."""
        directories: dict[Path, list[int]] = {}
        for i, item in enumerate(self.items):
            if self.errors[i] is None:
                directories.setdefault(item.output.parent, []).append(i)
        for directory, members in directories.items():
            try:
                fsync_dir(directory)
            except OSError as e:
                for i in members:
                    self.errors[i] = _failed_write(e, self.items[i].output)


def _failed_write(e: OSError, output: Path) -> CopystreamError:
    """The error of a write that failed while ``output`` was published."""
    try:
        raise_if_full(e, f"cannot write {output}")
    except CopystreamError as full:
        return full
    failed = ExportFailed(f"cannot write {output}: {e.strerror or e}")
    failed.__cause__ = e
    return failed


def publish(items: Sequence[Staged]) -> list[CopystreamError | None]:
    """Make each export of ``items`` durable and visible; per item, ``None`` or its error.

    The caller holds each output's lock, or is the bulk job that owns their directory. Each
    file is fsynced and its manifest written in place (fsynced too; several items at once),
    then the directory is fsynced, then the files are linked to their names and the directory
    fsynced again. An item that fails leaves no file of its own behind (its temporary file and
    its manifest are removed); the others are not held up by it.
    """
    errors: list[CopystreamError | None] = [None] * len(items)
    step = _Step(items, errors)
    try:
        step.each(lambda i, item: _vacant(item.output))
        # All the files first (together), then all the links: one journal commit serves
        # many files.
        step.sync_files()
        step.sync_directories()
        step.each(lambda i, item: _link(item.temporary, item.output))
        step.sync_directories()
    finally:
        step.discard()
    return errors
