"""Unit tests of copystream.destinations.local: digests, rollback, reopen with prefix verification,
disk full; and of opening a destination at a checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash

from copystream.checkpoint import (
    Checkpoint,
    canonical_digest,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    save_checkpoint,
)
from copystream.destinations import (
    ChunkWritten,
    Destination,
    check_at_checkpoint,
    open_at_checkpoint,
)
from copystream.destinations.local import LocalFile, check_prefix, hash_range
from copystream.errors import CheckpointMismatch, DiskFull, PrefixMismatch, Remedy


def h(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.csv"


@pytest.fixture
def dest(out: Path) -> Iterator[LocalFile]:
    s = LocalFile.create(out)
    yield s
    s.close()


def write_chunk(s: LocalFile, *parts: bytes | bytearray | memoryview) -> tuple[int, int, str]:
    s.begin_chunk()
    for p in parts:
        s.write(p)
    return s.end_chunk()


CHUNK0 = b"1,alpha\n2,beta\n"
CHUNK1 = b'3,"gamma, with comma"\n' * 3
CHUNK2 = bytes(range(256)) * 40  # not text; crosses no special boundary


def make_file(out: Path) -> tuple[list[tuple[int, int, str]], str]:
    """A file of three committed chunks; returns their records and the prefix digest."""
    s = LocalFile.create(out)
    try:
        chunks = [write_chunk(s, CHUNK0), write_chunk(s, CHUNK1[:5], CHUNK1[5:]),
                  write_chunk(s, CHUNK2)]  # fmt: skip
        s.sync()
        return chunks, s.digest
    finally:
        s.close()


# -- writing and digests ------------------------------------------------------------------------


def test_create_refuses_an_existing_file(out: Path) -> None:
    out.write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        LocalFile.create(out)
    assert out.read_bytes() == b"keep me"


def test_chunk_and_file_digests_equal_xxh3_of_the_bytes(dest: LocalFile, out: Path) -> None:
    assert dest.digest == h(b"")
    assert write_chunk(dest, CHUNK0) == (0, len(CHUNK0), h(CHUNK0))
    # written in several pieces, including a memoryview and a bytearray
    rec = write_chunk(dest, CHUNK1[:1], memoryview(CHUNK1)[1:10], bytearray(CHUNK1[10:]))
    assert rec == (len(CHUNK0), len(CHUNK1), h(CHUNK1))
    assert dest.offset == len(CHUNK0) + len(CHUNK1)
    assert dest.digest == h(CHUNK0 + CHUNK1)
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_empty_chunk(dest: LocalFile) -> None:
    write_chunk(dest, CHUNK0)
    assert write_chunk(dest) == (len(CHUNK0), 0, h(b""))
    assert dest.digest == h(CHUNK0)


def test_rollback_truncates_and_rewinds_the_digest(dest: LocalFile, out: Path) -> None:
    write_chunk(dest, CHUNK0)
    dest.begin_chunk()
    dest.write(b"half a chunk that failed,")
    dest.write(b"\n" * 10_000)
    dest.rollback()
    assert dest.offset == len(CHUNK0)
    assert out.read_bytes() == CHUNK0
    assert dest.digest == h(CHUNK0)
    # the retried chunk writes different bytes: digests are those of the new content only
    assert write_chunk(dest, CHUNK1) == (len(CHUNK0), len(CHUNK1), h(CHUNK1))
    assert dest.digest == h(CHUNK0 + CHUNK1)
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_rollback_twice_and_rollback_of_first_chunk(dest: LocalFile, out: Path) -> None:
    dest.begin_chunk()
    dest.write(b"abc")
    dest.rollback()
    dest.rollback()
    assert out.read_bytes() == b""
    assert dest.digest == h(b"")
    assert write_chunk(dest, b"xyz") == (0, 3, h(b"xyz"))
    assert dest.digest == h(b"xyz")


def test_hash_range_feeds_every_state(out: Path) -> None:
    data = os.urandom(10_000)
    out.write_bytes(data)
    a, b = xxhash.xxh3_128(), xxhash.xxh3_128()
    fd = os.open(out, os.O_RDONLY)
    try:
        assert hash_range(fd, 100, 5000, a, b) == 5000
        assert hash_range(fd, 9_000, 5000) == 1000  # stops at the end of the file
    finally:
        os.close(fd)
    assert a.hexdigest() == b.hexdigest() == h(data[100:5100])


# -- reopen -------------------------------------------------------------------------------------


def test_reopen_of_an_exact_file(out: Path) -> None:
    chunks, prefix = make_file(out)
    s = LocalFile.reopen(out, chunks, prefix)
    try:
        assert s.offset == len(CHUNK0 + CHUNK1 + CHUNK2)
        assert s.digest == prefix
    finally:
        s.close()


def test_reopen_truncates_unrecorded_tail_then_appends_at_the_end(out: Path) -> None:
    chunks, prefix = make_file(out)
    good = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b"bytes of a chunk that never reached its checkpoint\n" * 100)
    s = LocalFile.reopen(out, chunks, prefix)
    try:
        assert out.read_bytes() == good
        assert s.offset == len(good)
        # regression: writes after reopen must append, not start again at offset 0
        rec = write_chunk(s, b"4,delta\n")
        assert rec == (len(good), 8, h(b"4,delta\n"))
        assert s.digest == h(good + b"4,delta\n")
    finally:
        s.close()
    assert out.read_bytes() == good + b"4,delta\n"


def test_reopen_then_rollback_keeps_the_verified_prefix(out: Path) -> None:
    chunks, prefix = make_file(out)
    good = out.read_bytes()
    s = LocalFile.reopen(out, chunks, prefix)
    try:
        s.begin_chunk()
        s.write(b"doomed")
        s.rollback()
        assert out.read_bytes() == good
        assert s.digest == prefix
    finally:
        s.close()


def test_reopen_of_a_prefix_of_the_chunks(out: Path) -> None:
    # The checkpoint recorded only the first two chunks: the third is an uncommitted tail.
    chunks, _ = make_file(out)
    s = LocalFile.reopen(out, chunks[:2], h(CHUNK0 + CHUNK1))
    try:
        assert s.offset == len(CHUNK0 + CHUNK1)
    finally:
        s.close()
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_reopen_of_an_empty_record(out: Path) -> None:
    out.write_bytes(b"partial first chunk")
    s = LocalFile.reopen(out, [], h(b""))
    try:
        assert s.offset == 0
        write_chunk(s, b"a")
    finally:
        s.close()
    assert out.read_bytes() == b"a"


@pytest.mark.parametrize("position", [0, len(CHUNK0) + 3, len(CHUNK0 + CHUNK1 + CHUNK2) - 1])
def test_reopen_refuses_a_modified_byte_and_leaves_the_file_alone(out: Path, position: int) -> None:
    chunks, prefix = make_file(out)
    data = bytearray(out.read_bytes() + b"uncommitted tail")
    data[position] ^= 0x01
    out.write_bytes(bytes(data))
    before = out.stat()
    with pytest.raises(PrefixMismatch) as ei:
        LocalFile.reopen(out, chunks, prefix)
    index = 0 if position < len(CHUNK0) else 1 if position < len(CHUNK0 + CHUNK1) else 2
    assert f"from chunk {index} " in str(ei.value)
    assert ei.value.remedy is Remedy.RESTART
    assert "--restart" in ei.value.worded("cli")
    assert ei.value.exit_code == 2
    assert out.read_bytes() == bytes(data)  # tail not cut, flipped byte still there
    assert out.stat().st_mtime_ns == before.st_mtime_ns


def test_reopen_refuses_a_shorter_file_and_leaves_it_alone(out: Path) -> None:
    chunks, prefix = make_file(out)
    short = out.read_bytes()[:-1]
    out.write_bytes(short)
    with pytest.raises(PrefixMismatch) as ei:
        LocalFile.reopen(out, chunks, prefix)
    assert "truncated" in str(ei.value)
    assert out.read_bytes() == short


def test_reopen_refuses_a_wrong_prefix_digest(out: Path) -> None:
    chunks, _ = make_file(out)
    good = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b"tail")
    with pytest.raises(PrefixMismatch):
        LocalFile.reopen(out, chunks, h(b"something else"))
    assert out.read_bytes() == good + b"tail"


def test_check_prefix_reads_only(out: Path) -> None:
    """check_prefix accepts what reopen accepts, refuses what it refuses, and never writes."""
    chunks, prefix = make_file(out)
    with open(out, "ab") as f:
        f.write(b"uncommitted tail")
    data = out.read_bytes()
    check_prefix(out, chunks, prefix)  # the tail is no reason to refuse
    assert out.read_bytes() == data  # and it is not cut either
    flipped = bytearray(data)
    flipped[len(CHUNK0) + 1] ^= 0x01
    out.write_bytes(bytes(flipped))
    with pytest.raises(PrefixMismatch, match="from chunk 1 "):
        check_prefix(out, chunks, prefix)
    assert out.read_bytes() == bytes(flipped)
    out.write_bytes(data[:5])
    with pytest.raises(PrefixMismatch, match="truncated"):
        check_prefix(out, chunks, prefix)
    out.unlink()
    with pytest.raises(PrefixMismatch, match="missing"):
        check_prefix(out, chunks, prefix)
    check_prefix(out, [], h(b""))  # nothing recorded, nothing there: fine
    assert not out.exists()


def test_reopen_refuses_swapped_chunks(out: Path) -> None:
    # Same bytes overall, but a record points at the wrong place.
    chunks, prefix = make_file(out)
    swapped = [chunks[1], chunks[0], chunks[2]]
    with pytest.raises(PrefixMismatch):
        LocalFile.reopen(out, swapped, prefix)


def test_reopen_closes_its_descriptor_on_refusal(out: Path) -> None:
    chunks, prefix = make_file(out)
    out.write_bytes(b"x")
    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(PrefixMismatch):
            LocalFile.reopen(out, chunks, prefix)
    assert set(os.listdir("/proc/self/fd")) <= fds


# -- disk full ----------------------------------------------------------------------------------

DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from copystream.errors import DiskFull
    from copystream.destinations.local import LocalFile

    limit = int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    s = LocalFile.create(Path(sys.argv[1]))
    s.begin_chunk()
    s.write(b"x" * (limit // 2))
    try:
        s.write(b"y" * limit)
    except DiskFull as e:
        print(type(e).__name__, e.exit_code, s.offset)
        print(e.worded("cli"))
        s.rollback()
        print(s.offset, s.digest)
        sys.exit(0)
    print("no error")
    sys.exit(3)
    """
)


def test_file_size_limit_raises_disk_full(out: Path) -> None:
    limit = 64 * 1024
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(out), str(limit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, message, after = proc.stdout.splitlines()
    assert first == f"DiskFull 1 {limit}"  # everything up to the limit was written
    assert str(out) in message
    assert "run the same command again to resume" in message
    # rollback after the failure restores an empty file and the empty digest
    assert after == f"0 {h(b'')}"
    assert out.stat().st_size == 0


def test_disk_full_is_a_resumable_export_failure() -> None:
    assert DiskFull("x").exit_code == 1
    assert DiskFull("x").remedy is Remedy.FREE_SPACE


# -- the destination interface, opened at a checkpoint ------------------------------------------


def new_cp() -> Checkpoint:
    return new_checkpoint(
        export={"table": "t"}, settings={}, started_at="now", chunk_rows=2, estimated_rows=None
    )


def commit(d: Destination, cp: Checkpoint, data: bytes, key: str) -> Checkpoint:
    """One chunk through the interface, as the chunk loop commits it."""
    d.begin_chunk()
    d.write(data)
    written = d.end_chunk()
    return cp.advance(
        nbytes=written.bytes,
        rows=data.count(b"\n"),
        digest=written.xxh3_128,
        prefix_digest=d.digest,
        last_key=(key,),
        finished=False,
        destination=d.state(),
    )


def committed_file(out: Path) -> Checkpoint:
    """A fresh destination opened at a new checkpoint, two chunks committed and saved."""
    cp = new_cp()
    save_checkpoint(out, cp)
    d = open_at_checkpoint(out, cp, recorded_in=checkpoint_path(out))
    try:
        cp = commit(d, cp, CHUNK0, "2")
        cp = commit(d, cp, CHUNK1, "3")
        d.sync()
    finally:
        d.close()
    save_checkpoint(out, cp)
    return cp


def test_begin_write_rollback_restores_the_digest(out: Path) -> None:
    cp = new_cp()
    d: Destination = open_at_checkpoint(out, cp, recorded_in=checkpoint_path(out))
    try:
        assert out.read_bytes() == b""  # created: the checkpoint is at position 0
        cp = commit(d, cp, CHUNK0, "2")
        before = d.digest
        d.begin_chunk()
        d.write(CHUNK1)
        d.write(b"half a row")
        assert d.digest != before
        d.rollback()
        assert d.digest == before == h(CHUNK0)
        d.begin_chunk()
        d.write(CHUNK2)
        written = d.end_chunk()
        assert written == ChunkWritten(offset=len(CHUNK0), bytes=len(CHUNK2), xxh3_128=h(CHUNK2))
        assert d.digest == h(CHUNK0 + CHUNK2)
    finally:
        d.close()
    assert out.read_bytes() == CHUNK0 + CHUNK2


def test_open_at_checkpoint_resumes_at_the_committed_position(out: Path) -> None:
    cp = committed_file(out)
    with open(out, "ab") as f:
        f.write(b"bytes of a killed chunk\n")
    d = open_at_checkpoint(out, cp, recorded_in=checkpoint_path(out))
    try:
        assert d.digest == cp.xxh3_128
        assert out.read_bytes() == CHUNK0 + CHUNK1  # the killed chunk's bytes are cut
        assert commit(d, cp, CHUNK2, "4").xxh3_128 == h(CHUNK0 + CHUNK1 + CHUNK2)
    finally:
        d.close()


@pytest.mark.parametrize("check_only", [False, True], ids=["open", "check"])
def test_a_modified_prefix_is_refused_and_the_file_left_untouched(
    out: Path, check_only: bool
) -> None:
    cp = committed_file(out)
    data = bytearray(out.read_bytes() + b"uncommitted tail")
    data[len(CHUNK0) + 2] ^= 0x01
    out.write_bytes(bytes(data))
    before = out.stat()
    with pytest.raises(PrefixMismatch) as ei:
        if check_only:
            check_at_checkpoint(out, cp, recorded_in=checkpoint_path(out))
        else:
            open_at_checkpoint(out, cp, recorded_in=checkpoint_path(out))
    assert "from chunk 1 " in str(ei.value)
    assert ei.value.remedy is Remedy.RESTART
    assert out.read_bytes() == bytes(data)  # neither repaired nor cut
    assert out.stat().st_mtime_ns == before.st_mtime_ns


def test_a_missing_file_with_committed_bytes_is_refused(out: Path) -> None:
    cp = committed_file(out)
    assert cp.offset == len(CHUNK0 + CHUNK1)
    out.unlink()
    missing = f"is missing but its checkpoint records {cp.offset} bytes"
    for check in (open_at_checkpoint, check_at_checkpoint):
        with pytest.raises(PrefixMismatch, match=missing):
            check(out, cp, recorded_in=checkpoint_path(out))
    assert not out.exists()


def test_the_destination_state_round_trips_through_a_checkpoint(out: Path) -> None:
    cp = committed_file(out)
    assert cp.destination == {"kind": "file"}
    on_disk = json.loads(checkpoint_path(out).read_bytes())
    assert on_disk["destination"] == {"kind": "file"}
    loaded = load_checkpoint(out)
    assert loaded == cp
    d = open_at_checkpoint(out, loaded, recorded_in=checkpoint_path(out))
    try:
        assert d.state() == loaded.destination
    finally:
        d.close()


def test_a_checkpoint_without_destination_loads_and_resumes(out: Path) -> None:
    """A checkpoint written before destinations existed has no "destination" key: it is a local
    file's, and the self-digest (over the body as written) still matches."""
    cp = committed_file(out)
    old = ("destination", "checkpoint_xxh3_128")
    body = {k: v for k, v in cp.to_json().items() if k not in old}
    body["checkpoint_xxh3_128"] = canonical_digest(body)
    checkpoint_path(out).write_text(json.dumps(body))
    loaded = load_checkpoint(out)
    assert loaded == cp
    assert loaded.destination == {"kind": "file"}
    d = open_at_checkpoint(out, loaded, recorded_in=checkpoint_path(out))
    try:
        assert commit(d, loaded, CHUNK2, "4").xxh3_128 == h(CHUNK0 + CHUNK1 + CHUNK2)
    finally:
        d.close()


def test_a_checkpoint_of_another_kind_of_destination_is_refused(out: Path) -> None:
    cp = replace(committed_file(out), destination={"kind": "s3", "upload_id": "x"})
    data = out.read_bytes()
    for check in (open_at_checkpoint, check_at_checkpoint):
        with pytest.raises(CheckpointMismatch) as ei:
            check(out, cp, recorded_in=checkpoint_path(out))
        shown = f"{checkpoint_path(out)} was made for another export"
        assert str(ei.value).startswith(f'{shown} (destination was "s3", now "file")')
        assert ei.value.remedy is Remedy.RESTART
    assert out.read_bytes() == data
