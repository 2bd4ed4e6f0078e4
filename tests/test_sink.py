"""Unit tests of copystream.sink: digests, rollback, reopen with prefix verification, disk full."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from copystream.errors import DiskFull, PrefixMismatch
from copystream.sink import Sink, check_prefix, hash_range


def h(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.csv"


@pytest.fixture
def sink(out: Path) -> Iterator[Sink]:
    s = Sink.create(out)
    yield s
    s.close()


def write_chunk(s: Sink, *parts: bytes | bytearray | memoryview) -> tuple[int, int, str]:
    s.begin_chunk()
    for p in parts:
        s.write(p)
    return s.end_chunk()


CHUNK0 = b"1,alpha\n2,beta\n"
CHUNK1 = b'3,"gamma, with comma"\n' * 3
CHUNK2 = bytes(range(256)) * 40  # not text; crosses no special boundary


def make_file(out: Path) -> tuple[list[tuple[int, int, str]], str]:
    """A file of three committed chunks; returns their records and the prefix digest."""
    s = Sink.create(out)
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
        Sink.create(out)
    assert out.read_bytes() == b"keep me"


def test_chunk_and_file_digests_equal_xxh3_of_the_bytes(sink: Sink, out: Path) -> None:
    assert sink.digest == h(b"")
    assert write_chunk(sink, CHUNK0) == (0, len(CHUNK0), h(CHUNK0))
    # written in several pieces, including a memoryview and a bytearray
    rec = write_chunk(sink, CHUNK1[:1], memoryview(CHUNK1)[1:10], bytearray(CHUNK1[10:]))
    assert rec == (len(CHUNK0), len(CHUNK1), h(CHUNK1))
    assert sink.offset == len(CHUNK0) + len(CHUNK1)
    assert sink.digest == h(CHUNK0 + CHUNK1)
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_empty_chunk(sink: Sink) -> None:
    write_chunk(sink, CHUNK0)
    assert write_chunk(sink) == (len(CHUNK0), 0, h(b""))
    assert sink.digest == h(CHUNK0)


def test_rollback_truncates_and_rewinds_the_digest(sink: Sink, out: Path) -> None:
    write_chunk(sink, CHUNK0)
    sink.begin_chunk()
    sink.write(b"half a chunk that failed,")
    sink.write(b"\n" * 10_000)
    sink.rollback()
    assert sink.offset == len(CHUNK0)
    assert out.read_bytes() == CHUNK0
    assert sink.digest == h(CHUNK0)
    # the retried chunk writes different bytes: digests are those of the new content only
    assert write_chunk(sink, CHUNK1) == (len(CHUNK0), len(CHUNK1), h(CHUNK1))
    assert sink.digest == h(CHUNK0 + CHUNK1)
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_rollback_twice_and_rollback_of_first_chunk(sink: Sink, out: Path) -> None:
    sink.begin_chunk()
    sink.write(b"abc")
    sink.rollback()
    sink.rollback()
    assert out.read_bytes() == b""
    assert sink.digest == h(b"")
    assert write_chunk(sink, b"xyz") == (0, 3, h(b"xyz"))
    assert sink.digest == h(b"xyz")


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
    s = Sink.reopen(out, chunks, prefix)
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
    s = Sink.reopen(out, chunks, prefix)
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
    s = Sink.reopen(out, chunks, prefix)
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
    s = Sink.reopen(out, chunks[:2], h(CHUNK0 + CHUNK1))
    try:
        assert s.offset == len(CHUNK0 + CHUNK1)
    finally:
        s.close()
    assert out.read_bytes() == CHUNK0 + CHUNK1


def test_reopen_of_an_empty_record(out: Path) -> None:
    out.write_bytes(b"partial first chunk")
    s = Sink.reopen(out, [], h(b""))
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
        Sink.reopen(out, chunks, prefix)
    index = 0 if position < len(CHUNK0) else 1 if position < len(CHUNK0 + CHUNK1) else 2
    assert f"from chunk {index} " in str(ei.value)
    assert "--restart" in str(ei.value)
    assert ei.value.exit_code == 2
    assert out.read_bytes() == bytes(data)  # tail not cut, flipped byte still there
    assert out.stat().st_mtime_ns == before.st_mtime_ns


def test_reopen_refuses_a_shorter_file_and_leaves_it_alone(out: Path) -> None:
    chunks, prefix = make_file(out)
    short = out.read_bytes()[:-1]
    out.write_bytes(short)
    with pytest.raises(PrefixMismatch) as ei:
        Sink.reopen(out, chunks, prefix)
    assert "truncated" in str(ei.value)
    assert out.read_bytes() == short


def test_reopen_refuses_a_wrong_prefix_digest(out: Path) -> None:
    chunks, _ = make_file(out)
    good = out.read_bytes()
    with open(out, "ab") as f:
        f.write(b"tail")
    with pytest.raises(PrefixMismatch):
        Sink.reopen(out, chunks, h(b"something else"))
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
        Sink.reopen(out, swapped, prefix)


def test_reopen_closes_its_descriptor_on_refusal(out: Path) -> None:
    chunks, prefix = make_file(out)
    out.write_bytes(b"x")
    fds = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(PrefixMismatch):
            Sink.reopen(out, chunks, prefix)
    assert set(os.listdir("/proc/self/fd")) <= fds


# -- disk full ----------------------------------------------------------------------------------

DISK_FULL = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    from copystream.errors import DiskFull
    from copystream.sink import Sink

    limit = int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    s = Sink.create(Path(sys.argv[1]))
    s.begin_chunk()
    s.write(b"x" * (limit // 2))
    try:
        s.write(b"y" * limit)
    except DiskFull as e:
        print(type(e).__name__, e.exit_code, s.offset)
        print(e)
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
