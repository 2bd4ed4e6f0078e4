"""Compressed output (``--compress zstd|gzip``): one frame (member) per chunk, resumable.

The claims, each against the real tools: the decompressed file is byte for byte psql's CSV
(``zstd -dc``, ``gzip -dc``); the file cut at every checkpoint is a valid ``.zst`` / ``.gz``
(``zstd -t``, ``gzip -t``), so a SIGKILL anywhere resumes by cut-and-append; the manifest
records the compressed digests (``verify`` reads no uncompressed byte) and the CSV's digest
(``verify --deep`` decompresses and checks it); ``--workers`` joins the parts' frames; DuckDB
and Python's gzip read the result. The destination itself (:mod:`copystream.destinations
.compressed`) is tested without a server first.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
import xxhash
from helpers import (
    assert_ok,
    assert_one_error_line,
    checkpoint_file,
    cli,
    export_cmd,
    kill_export,
    manifest_file,
    psql_copy,
    read_manifest,
    run,
    scratch_database,
    snapshot,
)

import copystream
from copystream import join
from copystream._atomic import locked
from copystream.checkpoint import ChunkRecord, load_checkpoint, save_checkpoint
from copystream.destinations import ChunkWritten
from copystream.destinations.compressed import (
    CompressedFile,
    CorruptFrame,
    codec,
    fresh_state,
    hash_chunk,
)
from copystream.errors import PrefixMismatch, UsageError, VerificationFailed
from copystream.join import Follower, followed_stream, join_parts
from copystream.part import Followed, PartOutcome
from copystream.ranges import load_parts, part_data_path, part_lock_path, part_path
from copystream.spec import Compression, ExportSpec, build
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]

ROWS = 60_000
QUERY = "SELECT * FROM t ORDER BY id"
SCHEMA = f"""
CREATE TABLE t (id bigint PRIMARY KEY, name text, ts timestamptz, amount numeric(12,2),
                note text);
INSERT INTO t SELECT g, 'name ' || g,
        timestamptz '2020-01-01 00:00:00+00' + g * interval '37.123 seconds',
        (g * 7.31)::numeric(12,2),
        CASE WHEN g % 10 = 0 THEN NULL ELSE E'line\\n"q",' || md5(g::text) END
    FROM generate_series(1, {ROWS}) g;
ANALYZE t;
"""
TOOLS = {"zstd": ".csv.zst", "gzip": ".csv.gz"}


def xxh(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    """The real tools the claims are checked with: a failure, never a skip, when missing."""
    for tool in ("zstd", "gzip"):
        if shutil.which(tool) is None:
            pytest.fail(f"the {tool} command is needed by these tests: apt-get install {tool}")


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def expected(db: str, pg: EphemeralPostgres) -> bytes:
    """psql's CSV of the table: what every decompressed export must equal."""
    return psql_copy(pg, db, QUERY)


def decompressed(tool: str, data: bytes) -> bytes:
    """``data`` decompressed by the real ``zstd`` or ``gzip`` command."""
    proc = subprocess.run([tool, "-dc"], input=data, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout


def tool_accepts(tool: str, path: Path) -> bool:
    """Whether the real ``zstd -t`` / ``gzip -t`` finds ``path`` a valid, complete file."""
    return subprocess.run([tool, "-t", "-q", str(path)], capture_output=True).returncode == 0


# -- the option -------------------------------------------------------------------------------


def test_compress_values_parse_and_suffixes_infer() -> None:
    assert Compression.parse("zstd") == Compression("zstd", 3)
    assert Compression.parse("gzip") == Compression("gzip", 6)
    assert Compression.parse("ZSTD:19") == Compression("zstd", 19)
    assert Compression.parse("none") == Compression("none")
    for bad, why in [
        ("lz4", "unknown compression"),
        ("zstd:0", "from 1 to 22"),
        ("gzip:10", "from 1 to 9"),
        ("gzip:fast", "not a whole number"),
        ("none:3", "takes no level"),
    ]:
        with pytest.raises(ValueError, match=why):
            Compression.parse(bad)
    assert Compression.for_output("x/orders.csv.zst") == Compression("zstd", 3)
    assert Compression.for_output("orders.CSV.GZ") == Compression("gzip", 6)
    assert Compression.for_output("orders.csv") == Compression("none")
    # inference happens when the spec is resolved; an explicit value wins over the suffix
    spec = ExportSpec("t")
    assert spec.resolved("public.t", ["id"], ["int"], ["id"], output="a.gz").compress == (
        Compression("gzip", 6)
    )
    explicit, _ = build("t", compress="none")
    resolved = explicit.resolved("public.t", ["id"], ["int"], ["id"], output="a.csv.zst")
    assert resolved.compress == Compression("none")
    assert resolved.identity()["compress"] is None
    zstd9, _ = build("t", compress="zstd:9")
    assert zstd9.identity()["compress"] == {"codec": "zstd", "level": 9}
    with pytest.raises(UsageError, match="compress: expected a compression"):
        build("t", compress="zstd:99")


# -- the destination, without a server ----------------------------------------------------------


def write_chunk(dest: CompressedFile, *pieces: bytes) -> ChunkWritten:
    dest.begin_chunk()
    for p in pieces:
        dest.write(p)
    return dest.end_chunk()


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_each_chunk_is_one_frame_and_a_rollback_leaves_no_trace(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"x{TOOLS[name]}"
    dest = CompressedFile.create(out, fresh_state(name, 1))
    try:
        a = write_chunk(dest, b"id,v\n", b"1,a\n" * 5000)
        dest.begin_chunk()
        dest.write(b"never kept\n" * 1000)
        dest.rollback()
        b = write_chunk(dest, b"2,b\n" * 7000)
        empty = write_chunk(dest)  # the last chunk of a range may find no rows
        dest.sync()
        state = dest.state()
    finally:
        dest.close()
    data = out.read_bytes()
    raw = b"id,v\n" + b"1,a\n" * 5000 + b"2,b\n" * 7000
    assert decompressed(name, data) == raw
    assert (a.offset, b.offset, a.bytes + b.bytes) == (0, a.bytes, len(data))
    assert a.xxh3_128 == xxh(data[: a.bytes]) and b.xxh3_128 == xxh(data[a.bytes :])
    assert a.raw == (5 + 20_000, xxh(raw[:20_005])) and b.raw == (28_000, xxh(raw[20_005:]))
    assert empty == (len(data), 0, xxh(b"")), "an empty chunk stores no frame"
    assert (state["uncompressed_bytes"], state["uncompressed_xxh3_128"]) == (len(raw), xxh(raw))
    assert tool_accepts(name, out)
    # every chunk is a whole frame on its own
    assert decompressed(name, data[: a.bytes]) == raw[:20_005]


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_an_empty_export_is_one_empty_frame(name: str, tmp_path: Path) -> None:
    """An empty file is not a valid .zst or .gz: the first chunk always stores a frame."""
    out = tmp_path / f"empty{TOOLS[name]}"
    dest = CompressedFile.create(out, fresh_state(name, 3))
    try:
        first = write_chunk(dest)
    finally:
        dest.close()
    assert first.bytes > 0 and first.raw == (0, xxh(b""))
    assert tool_accepts(name, out) and decompressed(name, out.read_bytes()) == b""


def _records(chunks: list[ChunkWritten]) -> list[ChunkRecord]:
    return [
        ChunkRecord(i, c.offset, c.bytes, 1, c.xxh3_128, (str(i),), c.raw)
        for i, c in enumerate(chunks)
    ]


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_reopen_verifies_both_digests_then_cuts_the_torn_frame(name: str, tmp_path: Path) -> None:
    out = tmp_path / f"r{TOOLS[name]}"
    dest = CompressedFile.create(out, fresh_state(name, 3))
    chunks = [write_chunk(dest, b"%d,row\n" % i * 3000) for i in range(3)]
    state, digest = dest.state(), dest.digest
    dest.close()
    size = out.stat().st_size
    with out.open("ab") as f:
        f.write(b"\x28\xb5\x2f\xfd half a frame")  # a chunk killed mid-write
    again = CompressedFile.reopen(out, _records(chunks), digest, state)
    try:
        assert out.stat().st_size == size  # the torn frame is gone
        assert again.state() == state  # the uncompressed digest state was rebuilt
        more = write_chunk(again, b"9,last\n")
        assert more.offset == size
    finally:
        again.close()
    assert decompressed(name, out.read_bytes()).endswith(b"2,row\n9,last\n")
    # a changed byte inside the committed prefix: refused, the file untouched
    data = bytearray(out.read_bytes())
    data[chunks[1].offset + 5] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(PrefixMismatch, match="from chunk 1"):
        CompressedFile.reopen(out, _records(chunks), digest, state)
    assert out.read_bytes() == bytes(data)


def test_decoding_refuses_torn_and_foreign_bytes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    for name in ("zstd", "gzip"):
        frame = codec(name, 3).frame()
        data = frame.compress(b"abc\n" * 10_000) + frame.flush()
        path.write_bytes(data + data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert hash_chunk(fd, 0, 2 * len(data), codec(name, 3)) == 80_000  # across frames
            for start, length in [(0, len(data) - 1), (1, len(data) - 1)]:
                with pytest.raises(CorruptFrame):
                    hash_chunk(fd, start, length, codec(name, 3))
        finally:
            os.close(fd)


def test_compression_runs_on_its_own_thread(tmp_path: Path) -> None:
    """``write`` only queues: the frame is compressed, hashed and written by another thread
    (so the chunk loop keeps reading from the server while zstd works)."""
    seen: list[str] = []
    cdc = codec("zstd", 3)
    real = cdc.frame

    class Spy:
        def __init__(self) -> None:
            self.inner = real()

        def compress(self, data: bytes) -> bytes:
            seen.append(threading.current_thread().name)
            return self.inner.compress(data)

        def flush(self) -> bytes:
            return self.inner.flush()

    cdc.frame = Spy  # type: ignore[method-assign]
    fd = os.open(tmp_path / "t.zst", os.O_WRONLY | os.O_CREAT, 0o644)
    dest = CompressedFile(fd, tmp_path / "t.zst", cdc, 0, xxhash.xxh3_128(), (0, xxhash.xxh3_128()))
    try:
        write_chunk(dest, b"x" * 100, b"y" * 100)
    finally:
        dest.close()
    assert seen == ["copystream-compress"] * 2
    assert threading.current_thread().name not in seen


# -- exports end to end -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_export_decompresses_to_psqls_csv_and_is_valid_at_every_checkpoint(
    name: str, db: str, expected: bytes, tmp_path: Path
) -> None:
    out = tmp_path / f"t{TOOLS[name]}"  # the codec comes from the suffix
    assert_ok(run(export_cmd(db, "t", out, "--chunk-rows", "4000")))
    data = out.read_bytes()
    assert decompressed(name, data) == expected
    m = read_manifest(out)
    assert m["compress"] == {"codec": name, "level": Compression.parse(name).level}
    assert (m["bytes"], m["xxh3_128"]) == (len(data), xxh(data))
    assert (m["uncompressed_bytes"], m["uncompressed_xxh3_128"]) == (len(expected), xxh(expected))
    assert len(data) < len(expected) / 2
    assert len(m["chunks"]) == ROWS // 4000
    raw_at = 0
    for c in m["chunks"]:
        frame = data[c["offset"] : c["offset"] + c["bytes"]]
        assert c["xxh3_128"] == xxh(frame)
        raw = expected[raw_at : raw_at + c["uncompressed_bytes"]]
        assert decompressed(name, frame) == raw and c["uncompressed_xxh3_128"] == xxh(raw)
        raw_at += len(raw)
        # the file as a checkpoint at this chunk's end leaves it: valid for the real tool
        cut = tmp_path / f"cut{TOOLS[name]}"
        cut.write_bytes(data[: c["offset"] + c["bytes"]])
        assert tool_accepts(name, cut), f"{name} -t refuses the file cut after chunk {c['index']}"
    cut.write_bytes(data[: m["chunks"][3]["offset"] + 7])  # mid-frame: the tools notice
    assert not tool_accepts(name, cut)
    for deep in ([], ["--deep"]):
        proc = run(cli("verify", str(out), *deep))
        assert_ok(proc)
        assert ("decompressed:" in proc.stdout) == bool(deep)


def test_readable_by_duckdb_and_pythons_gzip(db: str, expected: bytes, tmp_path: Path) -> None:
    import duckdb  # the test extra installs it

    zst, gz = tmp_path / "t.csv.zst", tmp_path / "t.csv.gz"
    copystream.export_table(db, "t", zst, chunk_rows=5000, header=True)
    copystream.export_table(db, "t", gz, chunk_rows=5000, header=True)
    with gzip.open(gz, "rb") as f:
        assert f.read().split(b"\n", 1)[1] == expected  # all members, not only the first
    for path in (zst, gz):
        rows = duckdb.sql(
            f"SELECT count(*), sum(id), count(note), max(ts) FROM read_csv('{path}', header=true)"
        ).fetchall()
        assert rows == [(ROWS, ROWS * (ROWS + 1) // 2, ROWS - ROWS // 10, rows[0][3])]
        assert str(rows[0][3]).startswith("2020-01-26")


def test_the_library_reports_both_sizes(db: str, expected: bytes, tmp_path: Path) -> None:
    out = tmp_path / "lib.csv"
    r = copystream.export_table(db, "t", out, compress="gzip:1", chunk_rows=20_000)
    assert r.compress == {"codec": "gzip", "level": 1} and r.uncompressed_bytes == len(expected)
    assert r.bytes == out.stat().st_size and "uncompressed" in r.summary()
    assert r.to_json()["uncompressed_bytes"] == len(expected)
    v = copystream.verify_file(out, deep=True)
    assert (v.deep, v.uncompressed_bytes, v.uncompressed_xxh3_128) == (
        True,
        len(expected),
        xxh(expected),
    )
    assert copystream.verify_file(out).deep is False
    # the same call again: complete, nothing done; another level is another export
    assert copystream.export_table(db, "t", out, compress="gzip:1").already_complete
    with pytest.raises(copystream.OutputExists):
        copystream.export_table(db, "t", out, compress="gzip:2")


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_sigkill_at_several_points_then_resume(
    name: str, db: str, expected: bytes, tmp_path: Path
) -> None:
    """Killed three times mid-export: each time the file cut at its checkpoint is a valid file
    holding exactly psql's first bytes; the last run finishes byte-identical after
    decompression."""
    out = tmp_path / f"k{TOOLS[name]}"
    cmd = export_cmd(db, "t", out, "--chunk-rows", "500")
    for chunks in (3, 40, 90):
        killed = kill_export(cmd, out, min_chunks=chunks)
        assert killed.returncode == -9, killed.stderr
        cp = killed.checkpoint
        assert cp is not None and cp["destination"]["kind"] == "compressed-file"
        prefix = out.read_bytes()[: cp["offset"]]
        cut = tmp_path / f"prefix{TOOLS[name]}"
        cut.write_bytes(prefix)
        assert tool_accepts(name, cut)
        raw = decompressed(name, prefix)
        assert raw == expected[: len(raw)]
        state = cp["destination"]
        assert (state["uncompressed_bytes"], state["uncompressed_xxh3_128"]) == (len(raw), xxh(raw))
    assert_ok(run(cmd))
    m = read_manifest(out)
    assert m["resumed"] and decompressed(name, out.read_bytes()) == expected
    assert m["uncompressed_xxh3_128"] == xxh(expected)
    copystream.verify_file(out, deep=True)


@pytest.mark.parametrize("name", ["zstd", "gzip"])
def test_workers_join_the_parts_frames(name: str, db: str, expected: bytes, tmp_path: Path) -> None:
    out = tmp_path / f"w{TOOLS[name]}"
    cmd = export_cmd(db, "t", out, "--workers", "3", "--chunk-rows", "3000")
    killed = kill_export(cmd, out, min_bytes=1)  # the first range writes OUTPUT in place
    assert killed.returncode in (-9, 0)
    assert_ok(run(cmd))
    data = out.read_bytes()
    assert decompressed(name, data) == expected and tool_accepts(name, out)
    m = read_manifest(out)
    assert m["workers"] == 3 and m["uncompressed_xxh3_128"] == xxh(expected)
    assert sum(c["uncompressed_bytes"] for c in m["chunks"]) == len(expected)
    assert not list(tmp_path.glob("*.part-*"))
    copystream.verify_file(out, deep=True)


def test_the_join_decompresses_only_what_the_follower_did_not(
    db: str, expected: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the ranges run, the coordinator decompresses their committed frames in key order,
    so the join does not decompress the file again, and the manifest's CSV digest is psql's."""
    caplog.set_level(logging.DEBUG, logger="copystream")
    out = tmp_path / "f.csv.zst"
    copystream.export_table(db, "t", out, workers=3, chunk_rows=2000)
    assert decompressed("zstd", out.read_bytes()) == expected
    m = read_manifest(out)
    assert (m["uncompressed_bytes"], m["uncompressed_xxh3_128"]) == (len(expected), xxh(expected))
    assert "joined:" in caplog.text and "decompresses every range" not in caplog.text


def test_a_follower_gives_up_on_what_it_cannot_vouch_for(
    db: str, expected: bytes, tmp_path: Path
) -> None:
    """Finished ranges (shards) followed after the fact: the whole CSV's size and digest; a
    range whose chunks differ from what was followed, or a damaged frame: no result (the join
    then decompresses everything itself, and refuses the damaged frame)."""
    out = tmp_path / "s.csv.zst"
    plan = copystream.plan_shards(db, "t", out, shards=3, chunk_rows=2000)
    for i in range(3):
        copystream.run_shard(plan, i)
    parts = load_parts(out)
    assert parts is not None
    outcomes = [
        PartOutcome(cp, cp.xxh3_128, 0, False, False)
        for cp in (load_checkpoint(part_path(out, i)) for i in range(3))
        if cp is not None
    ]
    follower = Follower(out, parts)
    follower.start()
    follower.finish()
    assert follower.result(outcomes) == (len(expected), xxh(expected))
    other = [outcomes[0], replace(outcomes[1], checkpoint=outcomes[2].checkpoint), outcomes[2]]
    assert follower.result(other) is None
    data = part_data_path(out, 2)
    with data.open("r+b") as f:  # a flipped byte inside range 2's first frame
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0xFF]))
    follower = Follower(out, parts)
    follower.start()
    follower.finish()
    assert follower.result(outcomes) is None and follower.gave_up


def _shard_outcomes(db: str, out: Path, shards: int, run: int) -> tuple[Any, list[PartOutcome]]:
    """Shards of a compressed export planned, the first ``run`` of them run (a finished range
    each); the plan, and the outcomes of those ranges, from their checkpoints."""
    plan = copystream.plan_shards(db, "t", out, shards=shards, chunk_rows=2000)
    for i in range(run):
        copystream.run_shard(plan, i)
    return plan, [
        PartOutcome(cp, cp.xxh3_128, 0, False, False)
        for cp in (load_checkpoint(part_path(out, i)) for i in range(run))
        if cp is not None
    ]


def test_range_0_follows_the_later_ranges_so_the_join_decompresses_nothing(
    db: str, expected: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With every range running at once, range 0's process, once its own range is done,
    decompresses the later ranges from its own state: the join decompresses nothing, and the
    manifest's CSV size and digest are those the join's own decompression gives (shards,
    finished without any follower) and psql's."""
    caplog.set_level(logging.DEBUG, logger="copystream")
    out = tmp_path / "f.csv.zst"
    copystream.export_table(db, "t", out, workers=2, chunk_rows=2000)
    assert "the first range followed the others for" in caplog.text
    assert "gave up" not in caplog.text and "decompresses every range" not in caplog.text
    assert "split into 2 ranges from" in caplog.text and "the first gets 44.4% of" in caplog.text
    m = read_manifest(out)
    caplog.clear()
    joined = tmp_path / "s.csv.zst"
    plan, _ = _shard_outcomes(db, joined, 2, 2)
    copystream.finish_shards(plan)
    assert "decompresses every range (not followed)" in caplog.text
    m2 = read_manifest(joined)
    assert (m["uncompressed_bytes"], m["uncompressed_xxh3_128"]) == (
        m2["uncompressed_bytes"], m2["uncompressed_xxh3_128"]
    ) == (len(expected), xxh(expected))  # fmt: skip
    assert decompressed("zstd", out.read_bytes()) == expected
    assert m["chunks"][0]["last_key"] < m2["chunks"][len(m2["chunks"]) // 2]["last_key"]
    copystream.verify_file(out, deep=True)


def test_a_resumed_range_0_follows_from_its_rebuilt_state_and_fewer_workers_fall_back(
    db: str, expected: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Range 0 killed mid-range and resumed: its process rebuilt the CSV's hash state from the
    verified prefix (every frame decompressed and checked against its record), so it follows
    the others all the same, and the manifest is psql's CSV. Resumed with fewer workers than
    ranges, range 0 does not follow (a later range could wait for its worker): the coordinator
    follows them, as before."""
    caplog.set_level(logging.DEBUG, logger="copystream")
    for workers in (3, 2):
        out = tmp_path / f"r{workers}.csv.zst"
        cmd = export_cmd(db, "t", out, "--workers", "3", "--chunk-rows", "1000")
        killed = kill_export(cmd, part_path(out, 0), min_chunks=4)
        assert killed.returncode == -9, killed.stderr
        caplog.clear()
        copystream.export_table(db, "t", out, workers=workers, chunk_rows=1000)
        assert ("the first range followed the others" in caplog.text) == (workers == 3)
        assert "resuming at row" in caplog.text and "decompresses every range" not in caplog.text
        m = read_manifest(out)
        assert m["resumed"] and m["workers"] == 3
        csv = (m["uncompressed_bytes"], m["uncompressed_xxh3_128"])
        assert csv == (len(expected), xxh(expected))
        assert decompressed("zstd", out.read_bytes()) == expected


def test_killed_while_range_0_follows_then_resumed(
    db: str, expected: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGKILL once the first range is finished, while its process follows the second range
    (still running): the re-run re-verifies the first range, whose process follows the second
    again from its rebuilt state, and the manifest is psql's CSV."""
    out = tmp_path / "k.csv.zst"
    cmd = export_cmd(db, "t", out, "--workers", "2", "--chunk-rows", "300")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while (cp := load_checkpoint(part_path(out, 0))) is None or not cp.finished:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        second = load_checkpoint(part_path(out, 1))
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, 9)
    finally:
        proc.kill()
        proc.wait()
    psutil.wait_procs(workers, timeout=30)  # they die with it, a moment later
    assert second is not None and not second.finished  # it was following the second range
    caplog.set_level(logging.DEBUG, logger="copystream")
    copystream.export_table(db, "t", out, workers=2, chunk_rows=300)
    assert "the first range followed the others" in caplog.text
    assert "decompresses every range" not in caplog.text
    m = read_manifest(out)
    assert m["resumed"] and (m["uncompressed_bytes"], m["uncompressed_xxh3_128"]) == (
        len(expected), xxh(expected)
    )  # fmt: skip
    assert decompressed("zstd", out.read_bytes()) == expected
    copystream.verify_file(out, deep=True)


def _first_ranges_worker(proc: subprocess.Popen[bytes], out: Path) -> psutil.Process | None:
    """The worker of the first range, once it is finished: the export's worker that does not
    hold the second range's lock while the other does (``None``: the export ended first)."""
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            holds = {
                c: f"{out.name}.part-0001.lock" in {Path(f.path).name for f in c.open_files()}
                for c in psutil.Process(proc.pid).children()
            }
            if len(holds) == 2 and sum(holds.values()) == 1:
                return next(c for c, second in holds.items() if not second)
        time.sleep(0.01)
    return None


def _kill_the_following_worker(db: str, out: Path, log: Path) -> bool:
    """Run a 2-worker export of ``t`` to ``out`` and SIGKILL the first range's worker once its
    range is finished and the second's is not; ``False`` if the export ended first."""
    cmd = export_cmd(db, "t", out, "--workers", "2", "--chunk-rows", "300", "-v", "-v")
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while (cp := load_checkpoint(part_path(out, 0))) is None or not cp.finished:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            second = load_checkpoint(part_path(out, 1))
            worker = _first_ranges_worker(proc, out)
            if worker is not None and second is not None and not second.finished:
                worker.kill()
            assert proc.wait(timeout=120) == 0, log.read_text()
        finally:
            proc.kill()
            proc.wait()
    return "its new worker resumes from the checkpoint" in log.read_text()


def test_the_first_ranges_worker_killed_while_it_follows_is_started_again(
    db: str, expected: bytes, tmp_path: Path
) -> None:
    """SIGKILL of the first range's worker alone, once its range is finished and it follows the
    second: the pool starts it again, it re-verifies its range, follows the second again, and
    the manifest is psql's CSV. (Tried up to five times: the second range may end first.)"""
    for attempt in range(5):
        out, log = tmp_path / f"w{attempt}.csv.zst", tmp_path / f"log{attempt}"
        if _kill_the_following_worker(db, out, log):
            break
    else:
        pytest.fail("the second range ended before the first range's worker could be killed")
    text = log.read_text()
    assert "the first range followed the others" in text and "gave up" not in text
    assert "decompresses every range" not in text
    m = read_manifest(out)
    csv = (m["uncompressed_bytes"], m["uncompressed_xxh3_128"])
    assert csv == (len(expected), xxh(expected))
    assert decompressed("zstd", out.read_bytes()) == expected


def test_what_range_0_followed_is_trusted_only_for_the_ranges_final_chunks(
    db: str, expected: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream range 0's process reports counts only if the chunks it covered are exactly
    those of every range's final checkpoint: a range rewritten after it followed (here: its
    last chunk's record differs) is detected, and the join decompresses every range itself,
    so the manifest holds psql's CSV digest and not the stale one."""
    out = tmp_path / "t.csv.zst"
    _, outcomes = _shard_outcomes(db, out, 2, 2)
    parts = load_parts(out)
    assert parts is not None
    chunks = tuple(o.checkpoint.chunks for o in outcomes)
    stale = Followed(chunks, 12345, xxh(b"a stale stream"))
    trusted = [replace(outcomes[0], followed=stale), outcomes[1]]
    assert followed_stream(trusted) == (12345, xxh(b"a stale stream"))  # the same chunks: used
    last = chunks[1][-1]
    rewritten = (chunks[0], (*chunks[1][:-1], replace(last, rows=last.rows - 1)))
    stale = Followed(rewritten, 12345, xxh(b"a stale stream"))
    first = replace(outcomes[0], followed=stale)
    assert followed_stream([first, outcomes[1]]) is None
    assert followed_stream([replace(first, followed=None), outcomes[1]]) is None
    caplog.set_level(logging.DEBUG, logger="copystream")
    final, _ = join_parts(out, parts, [first, outcomes[1]])
    assert "decompresses every range (the ranges' chunks changed after" in caplog.text
    state = final.destination
    assert (state["uncompressed_bytes"], state["uncompressed_xxh3_128"]) == (
        len(expected), xxh(expected)
    )  # fmt: skip
    assert decompressed("zstd", out.read_bytes()) == expected


def _follower_of_range_1(
    db: str, out: Path, run: int = 1
) -> tuple[join.Follower, Path, Path]:
    """A follower of ``out``'s range 1 (planned, never run; ``run=2``: run to its end) from range
    0's finished state, as range 0's process makes it; the range's lock file and part file."""
    _, (first, *_) = _shard_outcomes(db, out, 2, run)
    parts = load_parts(out)
    assert parts is not None
    raw = xxhash.xxh3_128()
    fd = os.open(out, os.O_RDONLY)
    try:
        n = sum(hash_chunk(fd, c.offset, c.bytes, codec("zstd", 3), (), (raw,))
                for c in first.checkpoint.chunks)  # fmt: skip
    finally:
        os.close(fd)
    running = functools.partial(join._range_running, out)
    follower = join.Follower(out, parts, (first.checkpoint.chunks, n, raw), running)
    lock = part_lock_path(out, 1)
    return follower, lock, part_data_path(out, 1, first_in_place=parts.first_in_place)


def test_range_0_stops_following_a_range_no_process_is_exporting(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A later range that is not finished: range 0's process goes on following it while some
    process holds its lock (read from the kernel's lock table, never taken), and gives up once
    none has for the grace period, rather than wait for ever (a range that failed for good)."""
    monkeypatch.setattr(join, "NOT_RUNNING_GRACE", 1.0)
    out = tmp_path / "g.csv.zst"
    follower, lock, _ = _follower_of_range_1(db, out)
    running = functools.partial(join._range_running, out)
    assert not running(1)
    with locked(lock, "busy"):
        assert running(1)
        thread = threading.Thread(target=follower.follow)
        t0 = time.monotonic()
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive() and follower.gave_up is None  # still following: it runs
    thread.join(timeout=10)
    assert not thread.is_alive() and _followed_for(follower.gave_up, "is not running") >= 2.5
    assert time.monotonic() - t0 >= 2.5  # the grace period after the lock went
    assert str(follower.gave_up).endswith("its files present: none)")  # the lock went too


def _followed_for(gave_up: str | None, why: str) -> float:
    """The seconds range 0's process followed range 1 before it gave up for ``why``, from its
    message (which also says which of the range's files it found)."""
    found = re.fullmatch(
        rf"range 1 {re.escape(why)} \(after (\d+\.\d)s; its files present: [a-z, ]+\)",
        gave_up or "",
    )
    assert found, gave_up
    return float(found.group(1))


def test_range_0_sees_a_range_finish_when_only_its_checkpoint_changes(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A range's last commit writes its checkpoint after its bytes: range 0's process that
    looked in between sees the checkpoint become finished, though the part file does not change
    again, and does not give up once the range's lock is gone (it watched the part file twice
    over, not the checkpoint, and gave up in CI: "range 1 is not running (after 5.0s; …)")."""
    monkeypatch.setattr(join, "NOT_RUNNING_GRACE", 2.0)
    out = tmp_path / "c.csv.zst"
    follower, lock, data = _follower_of_range_1(db, out, run=2)
    assert not lock.exists()  # its process is gone: only its files can tell
    finished = load_checkpoint(part_path(out, 1))
    assert finished is not None and finished.finished
    save_checkpoint(part_path(out, 1), replace(finished, finished=False))
    before = data.stat().st_mtime_ns
    thread = threading.Thread(target=follower.follow)
    thread.start()
    time.sleep(0.8)  # it has read the unfinished checkpoint and every chunk
    assert thread.is_alive() and follower.gave_up is None
    save_checkpoint(part_path(out, 1), finished)  # the last commit: the checkpoint alone
    thread.join(timeout=10)
    assert not thread.is_alive() and follower.gave_up is None, follower.gave_up
    assert follower.done[1] == finished.chunks and data.stat().st_mtime_ns == before


def test_range_0_gives_up_on_a_range_whose_files_never_change_whatever_its_lock_says(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock that looks held (a misread of the kernel's table) does not keep range 0's process
    following for ever: with the range's checkpoint and part file unchanged for
    ``STALLED_GRACE`` it gives up (and the join decompresses instead)."""
    monkeypatch.setattr(join, "STALLED_GRACE", 1.5)
    follower, lock, _ = _follower_of_range_1(db, tmp_path / "s.csv.zst")
    with locked(lock, "busy"):
        t0 = time.monotonic()
        follower.follow()
        waited = time.monotonic() - t0
    followed = _followed_for(follower.gave_up, "has not changed for 1.5s")  # (to 0.1 s)
    assert 1.5 <= followed <= waited + 0.05 and waited < 5


def test_range_0_goes_on_following_a_range_whose_part_file_grows_without_a_visible_lock(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel's lock table cannot tell (no ``/proc/locks``, another device number),
    a range whose part file grows is taken as running: range 0's process goes on following it
    past ``NOT_RUNNING_GRACE``, and gives up once it stops changing."""
    monkeypatch.setattr(join, "NOT_RUNNING_GRACE", 1.0)
    monkeypatch.setattr(join, "_range_running", lambda output, i: False)
    follower, _, data = _follower_of_range_1(db, tmp_path / "p.csv.zst")
    thread = threading.Thread(target=follower.follow)
    thread.start()
    with open(data, "ab") as f:  # bytes past the committed chunks, as a COPY in flight writes
        for _ in range(12):
            f.write(b"x" * 100)
            f.flush()
            time.sleep(0.25)
            assert follower.gave_up is None
    stopped = time.monotonic()
    thread.join(timeout=10)
    assert not thread.is_alive() and _followed_for(follower.gave_up, "is not running") >= 3.5
    assert time.monotonic() - stopped >= 0.7


@pytest.mark.parametrize(
    ("ended", "now", "seen", "moved", "why"),
    [
        (True, 100.0, 100.0, 100.0, "ended unfinished"),
        (False, 100.0, 99.0, 10.0, None),  # held, files unchanged for 90 s: go on
        (False, 100.0, 94.0, 94.0, "is not running"),
        (False, 1000.0, 1000.0, 399.0, "has not changed for 600s"),
        (False, 1000.0, 1000.0, 401.0, None),
    ],
)
def test_why_range_0_gives_up_following(
    ended: bool, now: float, seen: float, moved: float, why: str | None
) -> None:
    assert join._why_give_up(ended, now, seen, moved) == why


def test_shards_of_a_compressed_file_are_split_evenly(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a ``workers`` export's range 0 follows the others (its process runs them all), so
    only it gets the smaller share: the shards of a compressed file split evenly."""
    caplog.set_level(logging.INFO, logger="copystream")
    out = tmp_path / "e.csv.zst"
    _, outcomes = _shard_outcomes(db, out, 2, 2)
    assert "split into 2 ranges from" in caplog.text and "the first gets" not in caplog.text
    rows = [o.checkpoint.rows for o in outcomes]
    assert rows[0] >= 0.48 * sum(rows), rows  # 44.4% with the smaller share


def test_verify_and_verify_deep_find_what_differs(db: str, tmp_path: Path) -> None:
    out = tmp_path / "v.csv.zst"
    copystream.export_table(db, "t", out, chunk_rows=10_000)
    m = read_manifest(out)
    # a manifest whose CSV digest is wrong: the stored bytes still verify, --deep does not
    edited = {**m, "uncompressed_xxh3_128": "0" * 32}
    manifest_file(out).write_text(json.dumps(edited))
    assert_ok(run(cli("verify", str(out))))
    assert_one_error_line(run(cli("verify", "--deep", str(out))), 1, "uncompressed digest differs")
    # a chunk's CSV digest is wrong: --deep names the chunk
    chunks = [dict(c) for c in m["chunks"]]
    chunks[2]["uncompressed_xxh3_128"] = "0" * 32
    manifest_file(out).write_text(json.dumps({**m, "chunks": chunks}))
    with pytest.raises(VerificationFailed, match="chunk 2 "):
        copystream.verify_file(out, deep=True)
    # a damaged frame: both name its chunk
    manifest_file(out).write_text(json.dumps(m))
    data = bytearray(out.read_bytes())
    data[m["chunks"][4]["offset"] + 20] ^= 0x55
    out.write_bytes(bytes(data))
    for deep in (False, True):
        with pytest.raises(VerificationFailed, match="chunk 4 "):
            copystream.verify_file(out, deep=deep)


def test_resuming_with_another_compression_is_refused(db: str, tmp_path: Path) -> None:
    out = tmp_path / "o.csv.zst"
    killed = kill_export(export_cmd(db, "t", out, "--chunk-rows", "500"), out, min_chunks=5)
    assert killed.returncode == -9
    before = snapshot(tmp_path)
    proc = run(export_cmd(db, "t", out, "--compress", "zstd:9"))
    assert_one_error_line(proc, 2, "compress was", "--restart")
    assert snapshot(tmp_path) == before
    assert_ok(run(export_cmd(db, "t", out, "--compress", "zstd:9", "--restart")))
    assert read_manifest(out)["compress"] == {"codec": "zstd", "level": 9}


@pytest.mark.parametrize("value", ["lz4", "zstd:23", "none:1", "gzip:"])
def test_a_bad_compress_value_is_one_error_line(value: str, db: str, tmp_path: Path) -> None:
    out = tmp_path / "bad.csv"
    assert_one_error_line(run(export_cmd(db, "t", out, "--compress", value)), 2, "--compress")
    assert not list(tmp_path.iterdir())


def test_bulk_names_compressed_outputs_by_their_codec(
    db: str, expected: bytes, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(
        "[defaults]\n"
        f"dsn = {json.dumps(db)}\n"
        'output_dir = "out"\ncompress = "zstd:5"\n'
        '[[tables]]\nname = "public.t"\n'
    )
    result = copystream.run_bulk(copystream.load_plan(plan))
    assert result.exit_code == 0, result.to_json()
    out = tmp_path / "out" / "public.t.csv.zst"
    assert decompressed("zstd", out.read_bytes()) == expected
    assert read_manifest(out)["compress"] == {"codec": "zstd", "level": 5}


def test_checkpoint_records_the_codec_and_the_csv_digest_so_far(db: str, tmp_path: Path) -> None:
    out = tmp_path / "c.csv.gz"
    killed = kill_export(export_cmd(db, "t", out, "--chunk-rows", "500"), out, min_chunks=4)
    cp: dict[str, Any] | None = json.loads(checkpoint_file(out).read_text())
    assert killed.returncode == -9 and cp is not None
    assert {k: cp["destination"][k] for k in ("kind", "codec", "level")} == {
        "kind": "compressed-file",
        "codec": "gzip",
        "level": 6,
    }
    assert cp["export"]["compress"] == {"codec": "gzip", "level": 6}
    assert all("uncompressed_xxh3_128" in c for c in cp["chunks"])


def test_progress_counts_the_csv_bytes(db: str, expected: bytes, tmp_path: Path) -> None:
    """Progress reports COPY's bytes, not the compressed ones: they only grow, and end at the
    CSV's size (the committed compressed offset plus a chunk in flight would jump back)."""
    seen: list[copystream.Progress] = []
    copystream.export_table(db, "t", tmp_path / "p.csv.zst", chunk_rows=2000, progress=seen.append)
    sizes = [p.bytes for p in seen]
    assert sizes == sorted(sizes) and seen[-1].done and sizes[-1] == len(expected)
