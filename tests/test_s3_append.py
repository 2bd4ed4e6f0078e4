"""Appends to an S3 object in place (issue 16): ``--incremental`` onto ``s3://bucket/key``
whose manifest is complete, against moto's S3 server on localhost (the fixtures of
tests/test_s3.py). The append is a new multipart upload to the same key beginning with the
object (copied server-side from 5 MiB, read back below); each round equals psql's full export,
``verify`` passes, and the manifest keeps the history of increments. A SIGKILLed append leaves
the object and its manifest as they were and resumes from another working directory (also one
killed before its first part, which reads the object back again); ``--restart`` aborts only the
append; an object that no longer matches its manifest is refused with nothing changed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import assert_ok, assert_one_error_line, cli, env_with, run
from test_parallel import started, wait_until
from test_s3 import BUCKET, endpoint, get, keys, s3, uploads

from copystream.destinations.s3 import PART_MIN

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

__all__ = ["endpoint", "s3"]  # the fixtures, used by name

DDL = "CREATE TABLE ev (id bigint PRIMARY KEY, payload text)"


def insert(run_sql: RunSql, dsn: str, first: int, last: int) -> None:
    """Rows of random hex (little for zstd to squeeze), with quotes and newlines."""
    run_sql(
        dsn,
        "INSERT INTO ev SELECT g, md5(random()::text) || E',\"\\n' || md5(random()::text) "
        f"FROM generate_series({first}, {last}) g",
    )


def body(s3: Any, key: str) -> bytes:
    data = get(s3, key)
    if not key.endswith(".zst"):
        return data
    with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as r:
        return bytes(r.read())


def export(dsn: str, out: str, *extra: str) -> list[str]:
    return cli("export", "ev", out, "--dsn", dsn, "--no-progress", *extra)


@pytest.mark.parametrize(
    ("name", "rows"),
    [("small.csv", 2000), ("small.csv.zst", 2000), ("big.csv", 90_000), ("big.csv.zst", 140_000)],
)
def test_three_appends_to_an_object_are_psqls_full_export(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, name: str, rows: int
) -> None:
    """A full export, then three rounds of rows inserted and appended in place: after each
    the object decompresses to psql's full export, ``verify --deep`` passes, and the manifest
    records every increment once; the first bytes were copied (>= 5 MiB) or read back."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, rows)
    out = f"s3://{BUCKET}/ap/{name}"
    assert_ok(run(export(dsn, out)))
    size = int(s3.head_object(Bucket=BUCKET, Key=f"ap/{name}")["ContentLength"])
    assert (size >= PART_MIN) == name.startswith("big")
    total = rows
    for n in range(1, 4):
        insert(run_sql, dsn, total + 1, total + 500 * n)
        total += 500 * n
        workers = ["--workers", "2"] if n == 3 else []  # one worker all the same, said
        proc = run(export(dsn, out, "--incremental", "--chunk-rows", "400", *workers))
        assert_ok(proc)
        assert f"{500 * n:,} rows appended" in proc.stdout
        assert ("append to an S3 object runs with one worker" in proc.stderr) == bool(workers)
        assert body(s3, f"ap/{name}") == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
        m = json.loads(get(s3, f"ap/{name}.manifest.json"))
        assert m["rows"] == total and len(m["increments"]) == n + 1
        assert [i["rows"] for i in m["increments"]] == [rows] + [500 * k for k in range(1, n + 1)]
        assert_ok(run(cli("verify", out, "--deep")))
    left = {k for k in keys(s3) if k.startswith("ap/")}
    assert left == {f"ap/{name}", f"ap/{name}.manifest.json"}
    assert uploads(s3) == []
    again = run(export(dsn, out, "--incremental"))  # nothing new: the same rows, verified
    assert_ok(again)
    assert body(s3, f"ap/{name}") == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")


def test_a_killed_append_resumes_from_another_directory(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """An append SIGKILLed once it has uploaded a part: the object and its manifest are the
    old ones (``verify`` passes); the same command from a fresh working directory resumes the
    upload the checkpoint records and completes it: psql's full export, one increment more."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out = f"s3://{BUCKET}/k/ev.csv"
    assert_ok(run(export(dsn, out)))
    old = get(s3, "k/ev.csv")
    old_manifest = get(s3, "k/ev.csv.manifest.json")
    insert(run_sql, dsn, 3001, 250_000)
    cmd = export(dsn, out, "--incremental", "--chunk-rows", "2000")

    def parts() -> int:
        if "k/ev.csv.checkpoint.json" not in keys(s3):
            return 0
        return len(json.loads(get(s3, "k/ev.csv.checkpoint.json"))["destination"]["parts"])

    with started(cmd) as s:
        assert wait_until(s, lambda: parts() >= 2), s.stderr()
        s.proc.kill()
        s.proc.wait(timeout=30)
    assert get(s3, "k/ev.csv") == old and get(s3, "k/ev.csv.manifest.json") == old_manifest
    assert_ok(run(cli("verify", out)))
    assert len(uploads(s3)) == 1
    fresh = tmp_path / "elsewhere"
    fresh.mkdir()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env_with(), cwd=fresh,
                           timeout=300)  # fmt: skip
    assert_ok(again)
    assert "resuming" in again.stderr or "resum" in again.stdout
    assert get(s3, "k/ev.csv") == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
    m = json.loads(get(s3, "k/ev.csv.manifest.json"))
    assert [i["rows"] for i in m["increments"]] == [3000, 247_000]
    assert_ok(run(cli("verify", out)))
    assert uploads(s3) == [] and list(fresh.iterdir()) == []


def test_an_append_killed_before_its_first_part_resumes(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv
) -> None:
    """Killed once its checkpoint is saved but before its first part (a small object's bytes
    and the first new chunks) is uploaded, an append resumes by reading the object back into
    its first part again: psql's full export, the increment recorded once."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 100)
    out = f"s3://{BUCKET}/p/ev.csv.zst"
    assert_ok(run(export(dsn, out)))
    insert(run_sql, dsn, 101, 200_000)
    cmd = export(dsn, out, "--incremental", "--chunk-rows", "2000")

    def begun() -> bool:
        if "p/ev.csv.zst.checkpoint.json" not in keys(s3):
            return False
        return not json.loads(get(s3, "p/ev.csv.zst.checkpoint.json"))["destination"]["parts"]

    with started(cmd) as s:
        assert wait_until(s, begun), s.stderr()
        s.proc.kill()
        s.proc.wait(timeout=30)
    cp = json.loads(get(s3, "p/ev.csv.zst.checkpoint.json"))["destination"]
    assert cp["parts"] == [] and cp["prefix"]["bytes"] < PART_MIN
    assert_ok(run(cmd))
    assert body(s3, "p/ev.csv.zst") == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
    m = json.loads(get(s3, "p/ev.csv.zst.manifest.json"))
    assert [i["rows"] for i in m["increments"]] == [100, 199_900]
    assert_ok(run(cli("verify", out, "--deep")))
    assert uploads(s3) == []


def test_restart_aborts_an_unfinished_append(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv
) -> None:
    """``--restart`` on an unfinished append aborts its upload and drops its checkpoint; the
    object and manifest stay, and the append begins again from them."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 100)
    out = f"s3://{BUCKET}/r/ev.csv"
    assert_ok(run(export(dsn, out)))
    insert(run_sql, dsn, 101, 200_000)
    cmd = export(dsn, out, "--incremental", "--chunk-rows", "2000")
    with started(cmd) as s:
        assert wait_until(s, lambda: "r/ev.csv.checkpoint.json" in keys(s3)), s.stderr()
        s.proc.kill()
        s.proc.wait(timeout=30)
    assert len(uploads(s3)) == 1
    assert_ok(run([*cmd, "--restart"]))
    assert get(s3, "r/ev.csv") == psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
    m = json.loads(get(s3, "r/ev.csv.manifest.json"))
    assert [i["rows"] for i in m["increments"]] == [100, 199_900]
    assert uploads(s3) == []


def test_an_append_to_a_changed_object_is_refused(
    s3: Any, dsn: str, run_sql: RunSql
) -> None:
    """An object edited after its export (same size, other bytes), or without a manifest:
    exit 2 with one error line, no upload begun, nothing in the bucket changed."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 50)
    out = f"s3://{BUCKET}/t/ev.csv"
    assert_ok(run(export(dsn, out)))
    data = bytearray(get(s3, "t/ev.csv"))
    data[10:12] = b"xx" if data[10:12] != b"xx" else b"yy"
    s3.put_object(Bucket=BUCKET, Key="t/ev.csv", Body=bytes(data))
    insert(run_sql, dsn, 51, 60)
    before = {k: get(s3, k) for k in keys(s3)}
    proc = run(export(dsn, out, "--incremental"))
    assert_one_error_line(proc, 2, "does not match its manifest")
    assert {k: get(s3, k) for k in keys(s3)} == before and uploads(s3) == []
    s3.delete_object(Bucket=BUCKET, Key="t/ev.csv.manifest.json")
    proc = run(export(dsn, out, "--incremental"))
    assert_one_error_line(proc, 2, "no complete export to continue")
    assert uploads(s3) == []


# A real process killed at one exact point: right after the append's upload is completed, before
# its manifest is written (the object is new, its manifest still the old one).
KILLED_AFTER_COMPLETE = """
import os, signal, sys
from copystream.destinations import s3
complete = s3.S3Object.complete
def complete_then_die(self):
    complete(self)
    os.kill(os.getpid(), signal.SIGKILL)
s3.S3Object.complete = complete_then_die
from copystream.cli import main
sys.argv[0] = "copystream"
main()
"""


@pytest.mark.parametrize("name", ["small.csv", "big.csv.zst"])
def test_an_append_killed_between_completing_and_its_manifest_finishes_once(
    s3: Any, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, name: str
) -> None:
    """SIGKILLed once S3 holds the appended object but before its manifest says so: the old
    manifest no longer matches (``verify`` fails, never passes on a stale manifest); the same
    command again recognises the completed upload from its checkpoint, writes the manifest
    with the increment once, and appends nothing twice: psql's full export."""
    rows = 100 if name.startswith("small") else 140_000
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, rows)
    out = f"s3://{BUCKET}/c/{name}"
    assert_ok(run(export(dsn, out)))
    old_manifest = get(s3, f"c/{name}.manifest.json")
    insert(run_sql, dsn, rows + 1, rows + 20_000)
    cmd = export(dsn, out, "--incremental", "--chunk-rows", "4000")
    killed = subprocess.run([cmd[0], "-c", KILLED_AFTER_COMPLETE, *cmd[3:]], env=env_with(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    expected = psql_csv(dsn, "SELECT * FROM ev ORDER BY id")
    assert body(s3, f"c/{name}") == expected and uploads(s3) == []  # completed
    assert get(s3, f"c/{name}.manifest.json") == old_manifest
    assert f"c/{name}.checkpoint.json" in keys(s3)
    assert run(cli("verify", out)).returncode == 1
    again = run(cmd)
    assert_ok(again)
    assert body(s3, f"c/{name}") == expected
    m = json.loads(get(s3, f"c/{name}.manifest.json"))
    assert [i["rows"] for i in m["increments"]] == [rows, 20_000] and m["rows"] == rows + 20_000
    assert {k for k in keys(s3) if k.startswith("c/")} == {f"c/{name}", f"c/{name}.manifest.json"}
    assert_ok(run(cli("verify", out, "--deep")))
    last = run(export(dsn, out, "--incremental"))  # nothing new since: nothing appended
    assert_ok(last)
    assert body(s3, f"c/{name}") == expected
