"""SIGKILL at random points: the export command is killed again and again, and every re-run of
the same command resumes; in the end the file is byte-identical to psql's output.

The kill points are random but reproducible (the seed is printed). Most are placed by progress:
the output file reaching a random byte offset, plus a few milliseconds of jitter, so they land
anywhere in the chunk cycle (COPY, write, fsync, checkpoint replace, the next chunk). Some are
placed by time right after the start (interpreter start, connecting, planning, the first
checkpoint). After every kill the state on disk must be consistent: the checkpoint loads, and the
bytes it vouches for are exactly psql's.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import xxhash

from copystream import verify_file
from copystream.checkpoint import checkpoint_path, load_checkpoint
from copystream.manifest import manifest_path

QUERY = "SELECT * FROM t ORDER BY id"
ROWS = 200_000
CHUNK_ROWS = 500  # ~34 kB chunks: 400 chunk cycles to land in


def make_table(run_sql: Any, dsn: str) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE t (id bigint PRIMARY KEY, name text NOT NULL, amount numeric(12,2),
                           ts timestamptz, note text);
            INSERT INTO t
            SELECT g, 'name ' || g, (g * 1.37)::numeric(12,2),
                   timestamptz '2020-01-01 00:00:00+00' + g * interval '1 minute',
                   CASE WHEN g % 5 = 0 THEN NULL WHEN g % 3 = 0 THEN 'has "quote", comma'
                        ELSE repeat('x', g % 41) END
            FROM generate_series(1, {ROWS}) g;
            ANALYZE t""",
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _check_after_kill(out: Path, expected: bytes) -> str:
    """The state a kill left: consistent, and what the checkpoint vouches for is psql's bytes.

    Returns a word for the stage the kill hit, for the summary.
    """
    if manifest_path(out).exists() and not checkpoint_path(out).exists():
        return "finished"  # killed after the export completed (while exiting)
    cp = load_checkpoint(out)  # must load: never half-written, never a bad self-digest
    if cp is None:
        assert _size(out) == 0, "output without a checkpoint after a kill"
        return "before the first checkpoint"
    data = out.read_bytes() if out.exists() else b""
    assert len(data) >= cp.offset, f"file ({len(data)}) shorter than its checkpoint ({cp.offset})"
    prefix = data[: cp.offset]
    if prefix != expected[: cp.offset]:
        pytest.fail(f"the checkpointed prefix ({cp.offset} bytes) differs from psql's output")
    assert xxhash.xxh3_128(prefix).hexdigest() == cp.xxh3_128
    if cp.offset == 0:
        return "before the first chunk"
    return "mid-chunk" if len(data) > cp.offset else "between chunks"


def run_kill_points(
    dsn: str, expected: bytes, out: Path, points: int, seed: int
) -> tuple[int, Counter[str]]:
    """Kill the export ``points`` times; returns (kills that landed, stages they hit)."""
    print(f"kill points: {points}, seed: {seed}")
    rng = random.Random(seed)
    cmd = [
        sys.executable,
        "-m",
        "copystream",
        "export",
        "t",
        str(out),
        "--dsn",
        dsn,
        "--chunk-rows",
        str(CHUNK_ROWS),
        "--no-progress",
    ]
    total = len(expected)
    targets = sorted(rng.uniform(0.0, 0.9 * total) for _ in range(points))
    landed = 0
    stages: Counter[str] = Counter()
    for i, target in enumerate(targets):
        cp = load_checkpoint(out)
        # The first kill always hits the start of a fresh export.
        early = i == 0 or ((cp is None or cp.offset < total // 2) and rng.random() < 0.3)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            if early:  # by time: interpreter start, connecting, planning, first checkpoint
                time.sleep(rng.uniform(0.0, 0.4))
            else:  # by progress: the output reaching the target offset, plus jitter
                while _size(out) < target and proc.poll() is None:
                    if time.monotonic() > deadline:
                        pytest.fail("the export made no progress for 30 s")
                    time.sleep(0.001)
                time.sleep(rng.uniform(0.0, 0.01))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            assert proc.stderr is not None
            stderr = proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
        if rc == -signal.SIGKILL:
            landed += 1
            stage = _check_after_kill(out, expected)
            stages[f"{stage} (by time)" if early else stage] += 1
        else:
            assert rc == 0, f"the export failed on its own (exit {rc}): {stderr}"
            stages["completed before the kill"] += 1
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    print(f"kills landed: {landed}; stages: {dict(stages)}")
    return landed, stages


def assert_finished(out: Path, expected: bytes) -> None:
    data = out.read_bytes()
    if data != expected:
        i = next(
            (n for n, (a, b) in enumerate(zip(data, expected, strict=False)) if a != b),
            min(len(data), len(expected)),
        )
        pytest.fail(
            f"output differs from psql's at byte {i} ({len(data)} vs {len(expected)} bytes): "
            f"{data[max(0, i - 60) : i + 60]!r} vs {expected[max(0, i - 60) : i + 60]!r}"
        )
    manifest = json.loads(manifest_path(out).read_bytes())
    assert manifest["bytes"] == len(data)
    assert manifest["rows"] == ROWS
    assert manifest["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert verify_file(out).rows == ROWS
    assert not checkpoint_path(out).exists()
    others = sorted(
        p.name for p in out.parent.iterdir() if p.name not in (out.name, manifest_path(out).name)
    )
    assert not others, f"files left beside the output: {others}"


def _seed() -> int:
    env = os.environ.get("COPYSTREAM_KILL_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def test_sigkill_at_random_points(dsn: str, run_sql: Any, psql_csv: Any, tmp_path: Path) -> None:
    make_table(run_sql, dsn)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "out" / "t.csv"
    out.parent.mkdir()
    landed, _ = run_kill_points(dsn, expected, out, points=22, seed=_seed())
    assert landed >= 20
    assert_finished(out, expected)


@pytest.mark.slow
def test_sigkill_at_100_random_points(
    dsn: str, run_sql: Any, psql_csv: Any, tmp_path: Path
) -> None:
    make_table(run_sql, dsn)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "out" / "t.csv"
    out.parent.mkdir()
    landed, _ = run_kill_points(dsn, expected, out, points=105, seed=_seed())
    assert landed >= 100
    assert_finished(out, expected)
