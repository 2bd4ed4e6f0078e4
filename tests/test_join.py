"""The pieces of the constant-space join that need no server: the block size rule (pure), hole
punching on a real file, and the parts plan's join record. The join itself, on a real
size-limited filesystem and killed at its records, is tested in test_parallel.py."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from copystream.checkpoint import canonical_digest
from copystream.errors import CheckpointMismatch
from copystream.join import (
    MAX_JOIN_BLOCK,
    MIN_JOIN_BLOCK,
    join_block,
    punch_hole,
    range0_follows,
)
from copystream.ranges import KeyRanges, load_parts, new_parts, parts_path, save_parts

MiB = 1 << 20


def test_the_block_is_half_the_free_space_within_bounds() -> None:
    assert join_block(free=10 * MiB, left=100 * MiB) == 5 * MiB
    assert join_block(free=3 * MiB, left=100 * MiB) == 3 * MiB // 2
    assert join_block(free=10 * 1024 * MiB, left=10 * 1024 * MiB) == MAX_JOIN_BLOCK
    # less free space than a minimal block: the minimal block is tried (and fails: disk full)
    assert join_block(free=100_000, left=100 * MiB) == MIN_JOIN_BLOCK
    assert join_block(free=0, left=100 * MiB) == MIN_JOIN_BLOCK
    # never more than what is left of the part
    assert join_block(free=10 * MiB, left=12_345) == 12_345
    assert join_block(free=10 * MiB, left=0) == 0


def test_blocks_are_aligned_so_a_punch_frees_whole_filesystem_blocks() -> None:
    for free in (2 * MiB + 1, 3 * MiB + 12_345, 77 * MiB + 4095, 255 * MiB):
        n = join_block(free, 1 << 40)
        assert n % 65536 == 0
        assert MIN_JOIN_BLOCK <= n <= min(MAX_JOIN_BLOCK, max(free // 2, MIN_JOIN_BLOCK))


def test_punching_frees_the_range_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "part"
    data = os.urandom(8 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        before = os.fstat(fd).st_blocks
        assert punch_hole(fd, 2 * MiB + 100, 4 * MiB), "this filesystem cannot punch holes"
        assert punch_hole(fd, 0, 0)  # nothing to do
        after = os.fstat(fd).st_blocks
    finally:
        os.close(fd)
    assert path.stat().st_size == len(data)  # KEEP_SIZE
    assert (before - after) * 512 >= 4 * MiB - 8192  # whole blocks inside the range are gone
    got = path.read_bytes()
    assert got[: 2 * MiB + 100] == data[: 2 * MiB + 100]
    assert got[2 * MiB + 100 : 6 * MiB + 100] == bytes(4 * MiB)
    assert got[6 * MiB + 100 :] == data[6 * MiB + 100 :]


def plan() -> KeyRanges:
    return new_parts({"table": "public.t"}, {"TimeZone": "UTC"}, "2026-01-01T00:00:00", [("5",)])


def test_a_join_record_makes_the_plan_version_3_and_round_trips(tmp_path: Path) -> None:
    out = tmp_path / "o.csv"
    save_parts(out, plan())
    assert json.loads(parts_path(out).read_bytes())["version"] == 2
    joining = replace(plan(), join=(1, 2 * MiB))
    save_parts(out, joining)
    raw = json.loads(parts_path(out).read_bytes())
    assert raw["version"] == 3 and raw["join"] == {"part": 1, "copied": 2 * MiB}
    loaded = load_parts(out)
    assert loaded is not None and loaded.join == (1, 2 * MiB) and loaded.ranges == plan().ranges


@pytest.mark.parametrize("edit", ["drop the record", "record in version 2"])
def test_a_join_record_that_does_not_match_its_version_is_refused(
    tmp_path: Path, edit: str
) -> None:
    out = tmp_path / "o.csv"
    raw = replace(plan(), join=(1, 0)).to_json()
    if edit == "drop the record":
        del raw["join"]
    else:
        raw["version"] = 2
    body = {k: v for k, v in raw.items() if k != "parts_xxh3_128"}
    raw["parts_xxh3_128"] = canonical_digest(body)  # a consistent digest: only the form is wrong
    parts_path(out).write_text(json.dumps(raw))
    with pytest.raises(CheckpointMismatch, match="join record does not match its version"):
        load_parts(out)


def test_range_0_follows_the_others_only_when_every_range_runs_at_once() -> None:
    """Range 0's process follows the later ranges of a compressed file only when they all run
    at once (with fewer workers one of them could be waiting for range 0's worker), and not
    once the join has begun (its ranges are not run again)."""
    zstd = {"compress": {"codec": "zstd", "level": 3}, "parquet": None}
    plan = new_parts(zstd, {}, "2026-01-01T00:00:00+00:00", [("10",), ("20",)])
    assert range0_follows(plan, 3) and range0_follows(plan, 8)
    assert not range0_follows(plan, 2)
    assert not range0_follows(replace(plan, join=(1, 0)), 3)
    assert not range0_follows(replace(plan, export={"compress": None}), 3)
    parquet = {"compress": None, "parquet": {"compression": "zstd"}}
    assert not range0_follows(replace(plan, export=parquet), 3)
    single = new_parts(zstd, {}, "2026-01-01T00:00:00+00:00", [])
    assert not range0_follows(single, 2)
