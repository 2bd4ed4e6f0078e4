"""The background commit of chunks (copystream.part._Committer): fsync, then the checkpoint.

The export loop hands each committed chunk's checkpoint to a thread that makes the file durable
and then writes the checkpoint, while the next chunk streams. What resuming relies on must hold:
a checkpoint on disk never records bytes that were not synced before it, at most one commit is in
flight, and a commit that fails is raised in the export's thread with the file cut back to the
checkpoint still on disk. End-to-end crash and disk-full behaviour is in test_faults and
test_kill_points; these tests pin the mechanism on real files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import xxhash

from copystream.checkpoint import (
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
)
from copystream.destinations.local import LocalFile
from copystream.errors import DiskFull
from copystream.part import _Committer


def chunk(dest: LocalFile, cp: Checkpoint, data: bytes, key: str) -> Checkpoint:
    dest.begin_chunk()
    dest.write(data)
    _, nbytes, digest = dest.end_chunk()
    return cp.advance(
        nbytes=nbytes,
        rows=data.count(b"\n"),
        digest=digest,
        prefix_digest=dest.digest,
        last_key=(key,),
        finished=False,
    )


def start(out: Path) -> tuple[LocalFile, Checkpoint]:
    cp = new_checkpoint(
        export={"table": "t"}, settings={}, started_at="now", chunk_rows=2, estimated_rows=None
    )
    return LocalFile.create(out), cp


def test_each_commit_is_on_disk_after_wait(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    dest, cp = start(out)
    save_checkpoint(out, cp)  # as run_part does before the first chunk
    committer = _Committer(dest, out, cp)
    try:
        for i in range(5):
            cp = chunk(dest, cp, f"{i},a\n{i},b\n".encode(), str(i))
            committer.submit(cp)  # waits for the previous commit first
            on_disk = load_checkpoint(out)
            assert on_disk is not None and on_disk.rows in (cp.rows - 2, cp.rows)
        committer.wait()
        assert load_checkpoint(out) == cp == committer.durable
        assert out.read_bytes()[: cp.offset] == b"".join(
            f"{i},a\n{i},b\n".encode() for i in range(5)
        )
        assert xxhash.xxh3_128(out.read_bytes()).hexdigest() == cp.xxh3_128
    finally:
        dest.close()


def test_a_failed_commit_is_raised_and_a_resume_cuts_the_file_back(tmp_path: Path) -> None:
    """The checkpoint cannot be written (its directory is gone): the error reaches the caller
    at its next wait. The file is left as it is (an error other than a full disk may come after
    the new checkpoint replaced the old one), and resuming from the checkpoint on disk cuts it
    back."""
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "o.csv"
    dest, cp = start(out)
    state = work / "o.csv"  # the checkpoint lives here
    committer = _Committer(dest, state, cp)
    try:
        cp1 = chunk(dest, cp, b"1,a\n", "1")
        committer.submit(cp1)
        committer.wait()
        assert load_checkpoint(state) == cp1
        saved = checkpoint_path(state).read_bytes()
        checkpoint_path(state).unlink()
        work.rmdir()  # the next checkpoint cannot be written
        cp2 = chunk(dest, cp1, b"2,b\n", "2")
        committer.submit(cp2)  # runs in the background: nothing raised yet
        dest.begin_chunk()
        dest.write(b"3,c\n")  # the next chunk streams meanwhile
        with pytest.raises(FileNotFoundError):  # check() never blocks: poll it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                committer.check()
                time.sleep(0.001)
        assert committer.durable == cp1
        assert out.read_bytes() == b"1,a\n2,b\n3,c\n"  # not cut: the resume decides
        committer.wait()  # the error is raised once
    finally:
        dest.close()
    work.mkdir()
    checkpoint_path(state).write_bytes(saved)
    on_disk = load_checkpoint(state)
    assert on_disk == cp1
    resumed = LocalFile.reopen(
        out, [(c.offset, c.bytes, c.xxh3_128) for c in on_disk.chunks], cp1.xxh3_128
    )
    resumed.close()
    assert out.read_bytes() == b"1,a\n"


def test_a_full_disk_at_the_checkpoint_cuts_the_file_back(tmp_path: Path) -> None:
    """A real full filesystem (a 1 MB tmpfs) when the checkpoint is written: DiskFull, raised
    before the new checkpoint replaced the old one, so the file is cut back to the checkpoint on
    disk and its space given back."""
    where = tmp_path / "small"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(where)]
    if subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here (CI runs as root and mounts it)")
    try:
        out = where / "o.csv"
        dest, cp = start(out)
        save_checkpoint(out, cp)
        committer = _Committer(dest, out, cp)
        try:
            cp1 = chunk(dest, cp, b"1," + b"a" * 100_000 + b"\n", "1")
            committer.submit(cp1)
            committer.wait()
            cp2 = chunk(dest, cp1, b"2," + b"b" * 100_000 + b"\n", "2")
            # take every block that is left
            with open(where / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
            committer.submit(cp2)
            with pytest.raises(DiskFull):
                committer.wait()
            assert committer.durable == cp1
            assert out.stat().st_size == cp1.offset  # cut back: the space is free again
            assert load_checkpoint(out) == cp1
        finally:
            dest.close()
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_commit_syncs_before_it_writes_the_checkpoint(tmp_path: Path) -> None:
    """The order is fsync, then checkpoint: seen through the calls the thread makes."""
    out = tmp_path / "o.csv"
    dest, cp = start(out)
    calls: list[str] = []
    real_sync = dest.sync

    def sync() -> None:
        calls.append("sync")
        real_sync()
        calls.append(f"checkpoint on disk: {os.path.exists(checkpoint_path(out))}")

    dest.sync = sync  # type: ignore[method-assign]
    committer = _Committer(dest, out, cp)
    try:
        committer.submit(chunk(dest, cp, b"1,a\n", "1"))
        committer.wait()
    finally:
        dest.close()
    assert calls == ["sync", "checkpoint on disk: False"]
    assert load_checkpoint(out) is not None


class _SlowSync:
    """A destination whose sync lasts until ``release`` is set."""

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def sync(self) -> None:
        assert self.release.wait(30)

    def cut(self, offset: int) -> None:
        raise AssertionError("nothing to cut")


def test_a_ctrl_c_while_a_commit_runs_still_waits_for_it() -> None:
    """Ctrl-C while the main thread waits for the commit in flight: ``settle`` still waits for
    that commit to end (its checkpoint saved) before the export goes on failing. (With
    ``Thread.join``, CPython 3.11 marks the interrupted thread ended and the next join returns
    at once: the process then exited under the commit, two chunks past its checkpoint.)"""
    release, saved = threading.Event(), []
    before, after = object(), object()
    committer = _Committer(_SlowSync(release), saved.append, before)  # type: ignore[arg-type]
    committer.submit(after)  # type: ignore[arg-type]
    main = threading.main_thread().ident
    assert main is not None
    ctrl_c = threading.Timer(0.2, signal.pthread_kill, [main, signal.SIGINT])
    ctrl_c.start()
    threading.Timer(0.6, release.set).start()
    with pytest.raises(KeyboardInterrupt):
        committer.wait()
    assert not release.is_set() and saved == []  # interrupted while the commit ran
    assert committer.settle() is None
    assert saved == [after] and committer.durable is after
