"""Export to S3 (``OUTPUT`` = ``s3://bucket/key``), against a real S3 protocol endpoint.

The endpoint is moto's server mode (:class:`moto.server.ThreadedMotoServer`) on a free port of
localhost, started here: real HTTP, real multipart semantics (5 MiB minimum part, ETags checked
on completion, conditional writes); boto3 is never patched. The exporting processes find it
through ``AWS_ENDPOINT_URL`` and take fake credentials from the environment, as a user's would.

The claims: the object is byte for byte psql's CSV (and, compressed, decompresses to it); a
SIGKILL at several points of the upload resumes, also from another working directory, to the
same bytes; ``--restart`` aborts the stale upload; a missing bucket or missing credentials are
one error line (exit 2) before PostgreSQL is read; ``verify`` finds an overwritten object;
``status`` reads the checkpoint object; no secret reaches any record or log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    assert_ok,
    assert_one_error_line,
    cli,
    psql_copy,
    run,
    scratch_database,
    xxh,
)
from s3_fault_proxy import Rule, S3FaultProxy

import copystream
from copystream.destinations.s3 import PART_MIN, multipart_etag, part_target
from copystream.testing import EphemeralPostgres

SECRET = "s3cr3t-Do-Not-Leak-0123456789abcdefXYZ"
ACCESS = "AKIACOPYSTREAMTEST01"
BUCKET = "exports"
ROWS = 200_000  # ~17 MB of CSV: three parts of 5 MiB and more, and a short last one
QUERY = "SELECT * FROM t ORDER BY id"
SCHEMA = f"""
CREATE TABLE t (id bigint PRIMARY KEY, name text, amount numeric(12,2), note text);
INSERT INTO t SELECT g, 'name ' || g, (g * 7.31)::numeric(12,2),
        CASE WHEN g % 10 = 0 THEN NULL ELSE E'line\\n"q",' || md5(g::text) || md5(g::text) END
    FROM generate_series(1, {ROWS}) g;
ANALYZE t;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto's S3 server on localhost, with the environment pointing every client at it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", url)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        yield url
    server.stop()


@pytest.fixture
def s3(endpoint: str) -> Any:
    """A boto3 client of the endpoint, with a fresh, empty bucket ``exports``."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    if not _has(client):
        client.create_bucket(Bucket=BUCKET)
    for key in keys(client):
        client.delete_object(Bucket=BUCKET, Key=key)
    for u in uploads(client):
        client.abort_multipart_upload(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
    return client


def _has(client: Any) -> bool:
    return BUCKET in {b["Name"] for b in client.list_buckets().get("Buckets", [])}


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def expected(db: str, pg: EphemeralPostgres) -> bytes:
    return psql_copy(pg, db, QUERY)


def get(s3: Any, key: str) -> bytes:
    return bytes(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def keys(s3: Any) -> set[str]:
    return {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def uploads(s3: Any) -> list[dict[str, Any]]:
    return list(s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", []))


def s3_export(dsn: str, key: str, *extra: str, cwd: Path | None = None) -> list[str]:
    return cli("export", "t", f"s3://{BUCKET}/{key}", "--dsn", dsn, "--no-progress", *extra)


# -- pure decisions -------------------------------------------------------------------------


def test_part_target_keeps_every_object_within_10000_parts() -> None:
    assert part_target(0) == PART_MIN
    stored, parts = 0, 0
    while stored < 5 * 10**12:  # S3's largest object
        stored += part_target(stored)
        parts += 1
    assert parts < 10_000


def test_multipart_etag_is_what_s3_computes(s3: Any) -> None:
    up = s3.create_multipart_upload(Bucket=BUCKET, Key="e")
    etags = []
    for n, data in enumerate((b"a" * PART_MIN, b"tail"), start=1):
        r = s3.upload_part(Bucket=BUCKET, Key="e", UploadId=up["UploadId"], PartNumber=n, Body=data)
        etags.append(r["ETag"])
    parts = [{"PartNumber": i + 1, "ETag": e} for i, e in enumerate(etags)]
    s3.complete_multipart_upload(
        Bucket=BUCKET, Key="e", UploadId=up["UploadId"], MultipartUpload={"Parts": parts}
    )
    assert s3.head_object(Bucket=BUCKET, Key="e")["ETag"] == multipart_etag(etags)


# -- exports --------------------------------------------------------------------------------


def test_export_to_s3_is_psqls_csv(db: str, s3: Any, expected: bytes) -> None:
    proc = run(s3_export(db, "t.csv", "--chunk-rows", "10000"))
    assert_ok(proc)
    assert get(s3, "t.csv") == expected
    assert keys(s3) == {"t.csv", "t.csv.manifest.json"}  # the checkpoint is gone
    assert uploads(s3) == []
    manifest = json.loads(get(s3, "t.csv.manifest.json"))
    assert manifest["bytes"] == len(expected) and manifest["rows"] == ROWS
    etag = s3.head_object(Bucket=BUCKET, Key="t.csv")["ETag"]
    assert int(etag.strip('"').split("-")[1]) == len(expected) // PART_MIN + 1, etag
    # the same command again: complete and verified, nothing done
    again = run(s3_export(db, "t.csv"))
    assert_ok(again)
    assert "already complete" in again.stdout
    ok = run(cli("verify", f"s3://{BUCKET}/t.csv"))
    assert_ok(ok)
    assert f"s3://{BUCKET}/t.csv: OK, {ROWS:,} rows" in ok.stdout


def test_compressed_export_to_s3_decompresses_to_psqls_csv(
    db: str, s3: Any, expected: bytes
) -> None:
    proc = run(s3_export(db, "t.csv.zst", "--chunk-rows", "20000"))
    assert_ok(proc)
    data = get(s3, "t.csv.zst")
    unzstd = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True)
    assert unzstd.stdout == expected
    manifest = json.loads(get(s3, "t.csv.zst.manifest.json"))
    assert manifest["compress"] == {"codec": "zstd", "level": 3}
    assert manifest["bytes"] == len(data) and manifest["uncompressed_bytes"] == len(expected)
    deep = run(cli("verify", "--deep", f"s3://{BUCKET}/t.csv.zst"))
    assert_ok(deep)
    assert f"decompressed: {len(expected):,} bytes" in deep.stdout


def _checkpoint(s3: Any, key: str) -> dict[str, Any] | None:
    try:
        return dict(json.loads(get(s3, key + ".checkpoint.json")))
    except s3.exceptions.NoSuchKey:
        return None


def _kill_at(cmd: list[str], s3: Any, key: str, parts: int, cwd: Path) -> dict[str, Any] | None:
    """Run ``cmd`` in ``cwd`` and SIGKILL it once its checkpoint records ``parts`` parts (or
    at once, for 0); return the checkpoint it left."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while proc.poll() is None:
            cp = _checkpoint(s3, key)
            if cp is not None and len(cp["destination"]["parts"]) >= parts:
                break
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -9, f"the export ended first: {err.decode()}"
    return _checkpoint(s3, key)


@pytest.mark.parametrize(("key", "points"), [("k.csv", (0, 1, 2)), ("k.csv.zst", (0, 1))])
def test_sigkill_mid_upload_resumes_from_another_directory(
    db: str, s3: Any, expected: bytes, tmp_path: Path, key: str, points: tuple[int, ...]
) -> None:
    """Killed at once, then with 1 and 2 parts uploaded (the compressed object has only two
    parts in all: killed there, its upload may be completed already, its manifest not yet
    written), each run resumed in a new working directory (another machine: nothing is kept
    locally; a stray part that no checkpoint records is overwritten); the object is psql's CSV
    (decompressed), its upload continued, never restarted."""
    cmd = s3_export(db, key, "--chunk-rows", "4000")
    seen = []
    for n, parts in enumerate(points):
        cwd = tmp_path / f"machine{n}"
        cwd.mkdir()
        cp = _kill_at(cmd, s3, key, parts, cwd)
        assert cp is not None and len(cp["destination"]["parts"]) >= parts
        assert cp["offset"] == sum(p["bytes"] for p in cp["destination"]["parts"])
        seen.append(cp["destination"]["upload_id"])
        if n == 1 and uploads(s3):  # as if killed between uploading a part and recording it
            stray = {"Bucket": BUCKET, "Key": key, "UploadId": seen[0]}
            number = len(cp["destination"]["parts"]) + 1
            s3.upload_part(**stray, PartNumber=number, Body=b"stray" * PART_MIN)
        assert {u["UploadId"] for u in uploads(s3)} <= {seen[0]} == set(seen)  # continued
    last = tmp_path / "last"
    last.mkdir()
    proc = subprocess.run(cmd, cwd=last, capture_output=True, text=True, timeout=120)
    assert_ok(proc)
    assert "(resumed)" in proc.stdout
    data = get(s3, key)
    if key.endswith(".zst"):
        data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True).stdout
    assert data == expected
    assert uploads(s3) == [] and key + ".checkpoint.json" not in keys(s3)
    manifest = json.loads(get(s3, key + ".manifest.json"))
    assert manifest["resumed"] is True
    assert_ok(run(cli("verify", "--deep", f"s3://{BUCKET}/{key}")))
    for n in range(len(points)):  # nothing written locally
        assert list((tmp_path / f"machine{n}").iterdir()) == []


def test_restart_aborts_the_stale_upload(db: str, s3: Any, tmp_path: Path, expected: bytes) -> None:
    cmd = s3_export(db, "r.csv", "--chunk-rows", "4000")
    cp = _kill_at(cmd, s3, "r.csv", 1, tmp_path)
    assert cp is not None
    stale = cp["destination"]["upload_id"]
    assert [u["UploadId"] for u in uploads(s3)] == [stale]
    proc = run([*cmd, "--restart"])
    assert_ok(proc)
    assert "(resumed)" not in proc.stdout
    assert uploads(s3) == []  # the stale upload is gone, not left to cost storage
    assert get(s3, "r.csv") == expected


def test_status_reads_the_checkpoint_object(db: str, s3: Any, tmp_path: Path) -> None:
    cp = _kill_at(s3_export(db, "s.csv", "--chunk-rows", "4000"), s3, "s.csv", 1, tmp_path)
    assert cp is not None
    proc = run(cli("status", "--json", f"s3://{BUCKET}/s.csv"))
    assert_ok(proc)
    st = json.loads(proc.stdout)
    assert st["state"] == "in progress" and st["output"] == f"s3://{BUCKET}/s.csv"
    assert st["rows"] == cp["rows"] > 0 and st["bytes"] == cp["offset"]
    assert_ok(run(s3_export(db, "s.csv")))
    done = run(cli("status", f"s3://{BUCKET}/s.csv"))
    assert_ok(done)
    assert done.stdout.startswith(f"s3://{BUCKET}/s.csv: complete; table public.t; {ROWS:,} rows")


def test_verify_finds_an_overwritten_object(db: str, s3: Any, expected: bytes) -> None:
    assert_ok(run(s3_export(db, "v.csv")))
    changed = bytearray(expected)
    changed[len(changed) // 2] ^= 1
    s3.put_object(Bucket=BUCKET, Key="v.csv", Body=bytes(changed))
    proc = run(cli("verify", f"s3://{BUCKET}/v.csv"))
    assert_one_error_line(proc, 1, f"s3://{BUCKET}/v.csv: chunk", "differs from the manifest")
    # and an export to it again refuses to overwrite what it cannot vouch for
    again = run(s3_export(db, "v.csv"))
    assert_one_error_line(again, 2, f"s3://{BUCKET}/v.csv exists", "--force")


@pytest.mark.parametrize(
    ("env", "output", "needle"),
    [
        ({}, "s3://no-such-bucket/t.csv", "bucket no-such-bucket does not exist"),
        ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, f"s3://{BUCKET}/t.csv",
         "no AWS credentials found"),
        ({}, "s3://only-a-bucket", "not an S3 object"),
    ],
)  # fmt: skip
def test_s3_mistakes_are_one_line_before_postgresql_is_read(
    s3: Any, env: dict[str, str], output: str, needle: str, tmp_path: Path
) -> None:
    """The DSN names a server that does not exist: the S3 error comes first, alone."""
    env = {**env, "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE":
           str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    dsn = "host=127.0.0.1 port=1 dbname=x connect_timeout=1"
    cmd = cli("export", "t", output, "--dsn", dsn, "--no-progress")
    line = assert_one_error_line(run(cmd, env=env), 2, needle)
    assert "127.0.0.1" not in line and "connect" not in line  # PostgreSQL was not tried
    assert keys(s3) == set() and uploads(s3) == []


def test_no_secret_in_any_record_or_log_line(
    db: str, s3: Any, tmp_path: Path, expected: bytes
) -> None:
    key = "sec.csv"
    _kill_at(s3_export(db, key, "--chunk-rows", "4000"), s3, key, 1, tmp_path)
    checkpoint = get(s3, key + ".checkpoint.json")
    proc = run([*s3_export(db, key, "-v", "--report", str(tmp_path / "r.json"))])
    assert_ok(proc)
    status = run(cli("status", "--json", f"s3://{BUCKET}/{key}"))
    verify = run(cli("verify", f"s3://{BUCKET}/{key}"))
    texts = [checkpoint, get(s3, key + ".manifest.json"), (tmp_path / "r.json").read_bytes()]
    texts += [p.encode() for q in (proc, status, verify) for p in (q.stdout, q.stderr)]
    assert b"resuming at row" in b"".join(texts)  # the logs were there to be searched
    for text in texts:
        assert SECRET.encode() not in text and ACCESS.encode() not in text


def test_library_api_exports_to_s3(db: str, s3: Any, expected: bytes) -> None:
    result = copystream.export_table(
        db, "t", f"s3://{BUCKET}/api.csv", chunk_rows=50_000, consistent=True
    )
    assert result.output == f"s3://{BUCKET}/api.csv" and result.rows == ROWS
    assert result.point_in_time  # one exported snapshot for every chunk, as for a file
    assert result.bytes == len(expected) and get(s3, "api.csv") == expected
    v = copystream.verify_file(f"s3://{BUCKET}/api.csv")
    assert v.xxh3_128 == result.xxh3_128
    st = copystream.export_status(f"s3://{BUCKET}/api.csv")
    assert st.state == "complete" and st.rows == ROWS


# -- the destination itself, without PostgreSQL ----------------------------------------------


def test_s3_object_holds_the_checkpoint_back_until_a_part_is_uploaded(s3: Any) -> None:
    """Chunks below the part size are not durable (``Synced(False)``); the chunk that fills a
    part makes it so, with the part's ETag; a rolled-back chunk leaves no byte; the last part
    may be short; resume checks the parts against the bucket."""
    from copystream.destinations.s3 import S3Object
    from copystream.errors import PrefixMismatch
    from copystream.s3url import S3Url

    url = S3Url(BUCKET, "d.csv")
    dest = S3Object.create(s3, url, None)
    small, big = b"x" * 1000, os.urandom(PART_MIN)
    dest.begin_chunk()
    dest.write(small)
    assert dest.end_chunk() == (0, 1000, xxh(small))
    assert dest.sync() == (False, {})
    dest.begin_chunk()
    dest.write(b"rolled back")
    dest.rollback()
    dest.write(big)
    assert dest.end_chunk() == (1000, PART_MIN, xxh(big))
    synced = dest.sync()
    assert synced.durable and [p["bytes"] for p in synced.state["parts"]] == [1000 + PART_MIN]
    state = dest.state()
    dest.begin_chunk()
    dest.write(b"tail")
    dest.end_chunk()
    assert not dest.sync().durable
    dest.close()
    # resumed where the parts end: what was buffered is gone and is exported again
    again = S3Object.resume(s3, url, state, 1000 + PART_MIN)
    again.begin_chunk()
    again.write(b"tail")
    again.end_chunk()
    again.sync()
    again.flush()
    again.complete()
    again.close()
    assert get(s3, "d.csv") == small + big + b"tail"
    other = {**state, "parts": [{**state["parts"][0], "etag": '"' + "0" * 32 + '"'}]}
    with pytest.raises(PrefixMismatch, match="gone"):  # completed, but not into those parts
        S3Object.resume(s3, url, other, 1000 + PART_MIN)


def test_a_second_writer_is_refused_at_its_next_checkpoint(s3: Any) -> None:
    """Checkpoint writes are conditional on the ETag this run last saw: when another process
    replaced the checkpoint object meanwhile, the write is refused (exit 2) and theirs stays."""
    from copystream.checkpoint import new_checkpoint
    from copystream.errors import OutputProblem
    from copystream.s3export import Sidecars
    from copystream.s3url import S3Url

    cp = new_checkpoint(
        export={"table": "public.t"}, settings={}, started_at="now", chunk_rows=1,
        estimated_rows=None,
    )  # fmt: skip
    mine, theirs = Sidecars(s3, S3Url(BUCKET, "w.csv")), Sidecars(s3, S3Url(BUCKET, "w.csv"))
    mine.save_checkpoint(cp)  # the first: If-None-Match
    with pytest.raises(OutputProblem, match="changed by another process"):
        theirs.save_checkpoint(cp)  # a second run that never read it
    assert theirs.load_checkpoint() == cp
    theirs.save_checkpoint(dataclasses.replace(cp, rows=5))  # it read it: If-Match, accepted
    with pytest.raises(OutputProblem, match=r"two exports are writing s3://exports/w\.csv"):
        mine.save_checkpoint(cp)  # the first run's next write: refused


# -- workers: key ranges uploading into one multipart upload -------------------------------


def _range_state(head: int, parts: list[int], tail: int, first: int) -> dict[str, Any]:
    recs = [{"number": first + n, "etag": '"e"', "bytes": b} for n, b in enumerate(parts)]
    return {
        "parts": recs,
        "range": {
            "head": {"bytes": head, "etag": '"h"'} if head else None,
            "tail": {"bytes": tail, "etag": '"t"'},
        },
    }


@pytest.mark.parametrize(
    "ranges",
    [
        [(0, [], 100)],  # one tiny range: one short part
        [(0, [], 0), (0, [], 0)],  # an empty table
        [(0, [], 10), (PART_MIN, [PART_MIN], 3), (0, [], 0), (0, [], 7)],
        [(PART_MIN, [PART_MIN, PART_MIN], 1), (0, [], 2), (PART_MIN, [], 4), (0, [], 0)],
        [(0, [], PART_MIN - 1), (0, [], PART_MIN - 1), (0, [], 5), (PART_MIN + 9, [PART_MIN], 0)],
    ],
)
def test_stitch_keeps_every_part_but_the_last_at_least_5_mib(
    ranges: list[tuple[int, list[int], int]],
) -> None:
    """Small tails, empty ranges and ranges too small for a part: the parts the upload is
    completed with are in key order, hold every byte once, and all but the last are >= 5 MiB."""
    from copystream.s3ranges import Seam, numbers_of, stitch

    n = len(ranges)
    states = [_range_state(h, p, t, numbers_of(i, n)[0]) for i, (h, p, t) in enumerate(ranges)]
    layout = stitch(states, n)
    sizes = [p.bytes if isinstance(p, Seam) else p["bytes"] for p in layout]
    numbers = [p.number if isinstance(p, Seam) else p["number"] for p in layout]
    assert all(s >= PART_MIN for s in sizes[:-1]), sizes
    assert numbers == sorted(set(numbers)) and numbers[0] >= 1 and numbers[-1] <= 10_000
    assert sum(sizes) == sum(h + sum(p) + t for h, p, t in ranges)
    pieces = [x[:2] for p in layout if isinstance(p, Seam) for x in p.pieces]
    assert pieces == sorted(pieces, key=lambda x: (x[0], x[1] == "tail"))  # in key order


@pytest.mark.parametrize("count", [2, 4, 16, 100])
def test_a_range_of_5_tb_fits_in_its_block_of_part_numbers(count: int) -> None:
    from copystream.destinations.s3 import range_per
    from copystream.s3ranges import numbers_of

    first, last = numbers_of(count - 1, count)
    assert numbers_of(count - 2, count)[1] < first - 1  # the seam's number lies between
    stored, parts = PART_MIN, 0  # the head
    while stored < 5 * 10**12:
        stored += part_target(stored, range_per(last - first + 1))
        parts += 1
    assert parts <= last - first + 1


def _zstd_d(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize(("key", "workers"), [("w.csv", "3"), ("w.csv.zst", "2")])
def test_workers_upload_one_object_that_is_psqls_csv(
    db: str, s3: Any, expected: bytes, key: str, workers: str
) -> None:
    """3 ranges of ~5.7 MB (a head each, short tails: seams between them); compressed, 2
    ranges too small for a part of their own. No join copy: the object is one upload."""
    proc = run(s3_export(db, key, "--workers", workers, "--chunk-rows", "4000"))
    assert_ok(proc)
    data = get(s3, key)
    assert (_zstd_d(data) if key.endswith(".zst") else data) == expected
    assert keys(s3) == {key, key + ".manifest.json"} and uploads(s3) == []
    manifest = json.loads(get(s3, key + ".manifest.json"))
    assert manifest["workers"] == int(workers) and manifest["bytes"] == len(data)
    assert manifest["xxh3_128"] == xxh(data) and manifest["rows"] == ROWS
    assert_ok(run(cli("verify", "--deep", f"s3://{BUCKET}/{key}")))
    one = run(s3_export(db, "one-" + key, "--chunk-rows", "4000"))  # the 1-worker export
    assert_ok(one)
    single = get(s3, "one-" + key)
    if key.endswith(".zst"):  # the frames differ where the ranges begin; what they hold does not
        assert _zstd_d(single) == _zstd_d(data)
    else:
        assert single == data


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _range_checkpoints(s3: Any, key: str) -> list[dict[str, Any]]:
    found = []
    for k in sorted(keys(s3)):
        if k.startswith(key + ".part-") and k.endswith(".checkpoint.json"):
            with contextlib.suppress(Exception):
                found.append(json.loads(get(s3, k)))
    return found


@pytest.mark.parametrize("key", ["k.csv", "k.csv.zst"])
def test_sigkill_a_worker_then_the_coordinator_resumes_from_another_directory(
    db: str, s3: Any, expected: bytes, tmp_path: Path, key: str
) -> None:
    """A worker is killed once its range has stored its head (the pool starts it again from
    the range's checkpoint); then the coordinator, with the workers, once both ranges have
    stored theirs (compressed, the ranges are too small for a head: a worker is killed once
    its checkpoint exists, the coordinator once a range has finished); the run again from a
    new working directory finishes the same upload."""
    cmd = s3_export(db, key, "--workers", "2", "--chunk-rows", "2000")
    zst = key.endswith(".zst")
    (tmp_path / "a").mkdir()
    proc = subprocess.Popen(cmd, cwd=tmp_path / "a", stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)  # fmt: skip
    killed_worker = False
    try:
        while proc.poll() is None:
            edges = [c["destination"]["range"] for c in _range_checkpoints(s3, key)]
            if zst:  # ~3 MB a range: no head, its checkpoint records nothing until its tail
                first, then = bool(edges), any(e["tail"] for e in edges)
            else:
                first = any(e["head"] for e in edges)
                then = sum(bool(e["head"]) for e in edges) == 2
            if first and not killed_worker:
                os.kill(_children(proc.pid)[0], 9)
                killed_worker = True
            elif killed_worker and then:
                break
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_worker and proc.returncode == -9, err.decode()
    plan = json.loads(get(s3, key + ".parts.json"))
    status = run(cli("status", "--json", f"s3://{BUCKET}/{key}"))  # from the bucket alone
    assert_ok(status)
    st = json.loads(status.stdout)
    assert st["state"] == "in progress" and st["ranges"] == 2 and st["ranges_finished"] < 2
    (tmp_path / "b").mkdir()
    again = subprocess.run(cmd, cwd=tmp_path / "b", capture_output=True, text=True, timeout=180)
    assert_ok(again)
    assert "(resumed)" in again.stdout
    data = get(s3, key)
    assert (_zstd_d(data) if key.endswith(".zst") else data) == expected
    assert uploads(s3) == [] and keys(s3) == {key, key + ".manifest.json"}
    assert plan["upload_id"] not in {u["UploadId"] for u in uploads(s3)}  # completed
    assert "-" in s3.head_object(Bucket=BUCKET, Key=key)["ETag"]  # a multipart upload
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []


TINY = """
CREATE TABLE tiny (id int PRIMARY KEY, v text);
INSERT INTO tiny SELECT g, 'v' || g FROM generate_series(1, 40) g;
"""


def test_a_tiny_table_with_an_empty_range(
    pg: EphemeralPostgres, s3: Any, tmp_path: Path
) -> None:
    """4 ranges of 10 rows with 3-row chunks: every range's bytes are a short tail. The
    coordinator is killed once the plan is in the bucket; the rows of range 2 are deleted
    meanwhile, so it is empty when the run again exports it; the object is psql's CSV."""
    with scratch_database(pg, TINY) as dsn:
        key, url = "tiny.csv", f"s3://{BUCKET}/tiny.csv"
        cmd = cli("export", "tiny", url, "--dsn", dsn, "--no-progress", "--workers", "4",
                  "--chunk-rows", "3", "--header")  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while proc.poll() is None and key + ".parts.json" not in keys(s3):
                pass
            proc.kill()
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        plan = json.loads(get(s3, key + ".parts.json"))
        lo, hi = plan["ranges"]["ranges"][2]
        for cp in _range_checkpoints(s3, key):
            assert cp["rows"] == 0 or cp["export"]["range"] != [lo, hi]
        delete = f"DELETE FROM tiny WHERE id > {lo[0]} AND id <= {hi[0]}"
        subprocess.run([pg.psql_bin, "-X", "-q", dsn, "-c", delete], check=True)
        assert_ok(run(cmd))
        want = psql_copy(pg, dsn, "SELECT * FROM tiny ORDER BY id", "FORMAT csv, HEADER")
        assert get(s3, key) == want and len(want.splitlines()) < 41
        manifest = json.loads(get(s3, key + ".manifest.json"))
        assert manifest["workers"] == 4


# -- shards to S3 ------------------------------------------------------------------------------


def _shard(index: int, cwd: Path, *, call: str = "run_shard") -> subprocess.Popen[bytes]:
    """``copystream.run_shard(plan, index)`` in a process of its own in ``cwd`` (another
    machine: nothing local), the plan read from the bucket."""
    plan = f"s3://{BUCKET}/sh.csv.shards.json"
    code = (f"import json, copystream; r = copystream.{call}({plan!r}, {index}); "
            "print(json.dumps(r.to_json()))")  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip


def test_shards_to_s3_run_anywhere_and_finish_into_one_upload(
    db: str, s3: Any, expected: bytes, tmp_path: Path
) -> None:
    """plan → run_shard (each in a new directory; shard 0 killed once it stored its head and run
    again: resumed; shard 1 run twice: the second returns at once) → finish_shards while a
    shard's checkpoint is missing is refused, naming the shard; once it ran again, the object is
    psql's CSV, the plan and the ranges' objects are gone, and finishing again does nothing."""
    plan = copystream.plan_shards(db, "t", f"s3://{BUCKET}/sh.csv", shards=2, chunk_rows=2000)
    assert plan.shards == 2 and "sh.csv.shards.json" in keys(s3) and len(uploads(s3)) == 1
    again = copystream.plan_shards(db, "t", f"s3://{BUCKET}/sh.csv", shards=2, chunk_rows=2000)
    assert again == plan  # planned again while unfinished: the same plan
    dirs = [tmp_path / f"m{i}" for i in range(5)]
    for d in dirs:
        d.mkdir()
    first = _shard(0, dirs[0])
    while first.poll() is None and not any(c["destination"]["range"]["head"]
                                           for c in _range_checkpoints(s3, "sh.csv")):
        pass  # fmt: skip
    first.kill()
    first.communicate()
    assert first.returncode == -9
    results = []
    for i, d in ((0, dirs[1]), (1, dirs[2]), (1, dirs[3])):
        proc = _shard(i, d)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        results.append(json.loads(out))
    assert results[0]["resumed"] and not results[1]["already_complete"], results
    assert results[2]["already_complete"] and results[2]["rows"] == results[1]["rows"]
    from copystream.errors import ExportFailed

    s3.delete_object(Bucket=BUCKET, Key="sh.csv.part-0001.checkpoint.json")  # as if never run
    with pytest.raises(ExportFailed, match=r"shard\(s\) 1 of 2"):
        copystream.finish_shards(plan)
    proc = _shard(1, dirs[4])
    assert proc.wait(timeout=120) == 0
    result = copystream.finish_shards(f"s3://{BUCKET}/sh.csv.shards.json")
    assert result.rows == ROWS and get(s3, "sh.csv") == expected
    assert keys(s3) == {"sh.csv", "sh.csv.manifest.json"} and uploads(s3) == []
    assert json.loads(get(s3, "sh.csv.manifest.json"))["workers"] == 2
    assert copystream.finish_shards(plan).already_complete
    assert copystream.run_shard(plan, 1).already_complete
    assert all(list(d.iterdir()) == [] for d in dirs)


def test_status_watch_of_shards_in_the_bucket(
    db: str, s3: Any, expected: bytes, tmp_path: Path
) -> None:
    """``copystream status s3://…/KEY.shards.json --watch`` reads the plan and the ranges'
    checkpoints from the bucket (from a directory with nothing in it): a line per shard, and it
    ends by itself once the shards are finished."""
    from copystream.watch import range_states

    plan = copystream.plan_shards(db, "t", f"s3://{BUCKET}/sh.csv", shards=2, chunk_rows=20_000)
    url = f"s3://{BUCKET}/sh.csv.shards.json"
    status, states = range_states(url)
    assert status.state == "in progress" and [s.state for s in states] == ["not started"] * 2
    copystream.run_shard(plan, 1)
    status, states = range_states(url)
    assert [s.state for s in states] == ["not started", "finished"]
    assert states[1].rows == status.rows > 0 and states[1].chunks >= 1
    watcher = subprocess.Popen(
        [sys.executable, "-m", "copystream", "status", url, "--watch", "--interval", "0.2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert watcher.stdout is not None
        first = watcher.stdout.readline()
        assert first.startswith(f"s3://{BUCKET}/sh.csv: in progress; public.t; "), first
        copystream.run_shard(plan, 0)
        copystream.finish_shards(plan)
        stdout = watcher.stdout.read()
        watcher.wait(timeout=60)
        stderr = watcher.stderr.read() if watcher.stderr is not None else ""
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr
    assert "shard  state" in first + stdout and "    1  finished" in first + stdout
    last = (first + stdout).split(f"s3://{BUCKET}/sh.csv: ")[-1]
    assert last.startswith(f"complete; public.t; {ROWS:,} rows"), last
    assert get(s3, "sh.csv") == expected and list(tmp_path.iterdir()) == []


# -- faults of the S3 endpoint: a real HTTP proxy in front of it --------------------------------


@pytest.fixture
def proxy(endpoint: str, s3: Any) -> Iterator[S3FaultProxy]:
    """The fault-injection proxy in front of moto; the exports' endpoint is the proxy."""
    with S3FaultProxy(endpoint) as p, pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def test_503s_and_resets_during_parts_and_completion_are_retried(
    db: str, proxy: S3FaultProxy, s3: Any, expected: bytes
) -> None:
    """A part answered 503 SlowDown four times in a row (more than botocore's 3 attempts: the
    export's own retry takes over, and logs it), one whose connection is reset before its body
    is read, one whose answer is cut off after the part was stored, and the completion answered
    503 and then cut off after it took effect: the object is psql's CSV."""
    rules = [
        proxy.add(Rule("PUT", "partNumber=", "503", times=4, skip=1)),
        proxy.add(Rule("PUT", "partNumber=", "reset-request", skip=1)),
        proxy.add(Rule("PUT", "partNumber=", "reset-response", skip=1)),
        proxy.add(Rule("POST", "uploadId=", "503", times=2)),
        proxy.add(Rule("POST", "uploadId=", "reset-response")),
    ]
    proc = run(s3_export(db, "f.csv", "--chunk-rows", "10000"))
    assert_ok(proc)
    assert [r.hits for r in rules] == [4, 1, 1, 2, 1], proxy.log
    assert get(s3, "f.csv") == expected and uploads(s3) == []
    assert "S3 upload_part of f.csv failed (S3 answered SlowDown)" in proc.stderr, proc.stderr
    assert_ok(run(cli("verify", f"s3://{BUCKET}/f.csv")))


def test_an_endpoint_failing_past_the_outage_limit_stops_resumably(
    db: str, proxy: S3FaultProxy, s3: Any, expected: bytes
) -> None:
    """Every part after the first answered 503 for longer than --max-outage: exit 1, one error
    line, the checkpoint in the bucket intact; once the endpoint is well, the same command
    resumes and finishes."""
    proxy.add(Rule("PUT", "partNumber=", "503", times=None, skip=1))
    cmd = s3_export(db, "o.csv", "--chunk-rows", "10000", "--max-outage", "3")
    proc = run(cmd)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("copystream: error:")]
    assert len(errors) == 1 and "SlowDown" in errors[0] and "Traceback" not in proc.stderr
    assert "up to 3s for an outage" in proc.stderr  # the export's own retries, logged
    cp = _checkpoint(s3, "o.csv")
    assert cp is not None and len(cp["destination"]["parts"]) == 1
    proxy.clear()
    again = run(cmd)
    assert_ok(again)
    assert "(resumed)" in again.stdout and get(s3, "o.csv") == expected
