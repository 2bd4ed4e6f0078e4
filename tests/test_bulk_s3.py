"""A bulk job whose ``output_dir`` is ``s3://bucket/prefix``, against moto's S3 server.

The claims: every table lands at ``prefix/<the name a local job gives its file>`` with its
manifest object beside it, byte for byte psql's CSV (decompressed); the report is an object in
the bucket with no secret in it; a job killed (the coordinator, or a worker) resumes, also from
another working directory, to the same objects; a re-run of a finished job skips every table
from one listing of the prefix, exporting nothing again; a bad bucket is one line, exit 2,
before PostgreSQL is read; what S3 cannot take of a plan is refused with the plan's problems;
``incremental = true`` puts each table in full, then appends to its object in place.
"""

from __future__ import annotations

import csv as csv_module
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import test_s3
from conftest import run_sql
from helpers import (
    assert_ok,
    assert_one_error_line,
    cli,
    psql_copy,
    run,
    scratch_database,
    upserted,
)
from test_s3 import BUCKET, SECRET, get, keys, uploads

from copystream.bulk import PlanError, parse_plan, plan_bulk_shards, run_bulk
from copystream.errors import UsageError
from copystream.testing import EphemeralPostgres

PREFIX = "exports/2026-11-30"
SCHEMA = """
CREATE TABLE big (id bigint PRIMARY KEY, name text, note text);
INSERT INTO big SELECT g, 'name ' || g, md5(g::text) || md5((g + 1)::text) || E'\\n"q",'
    FROM generate_series(1, 300000) g;
CREATE TABLE ranged (id bigint PRIMARY KEY, v text);
INSERT INTO ranged SELECT g, repeat(md5(g::text), 2) FROM generate_series(1, 120000) g;
CREATE TABLE small1 (id int PRIMARY KEY, v text);
INSERT INTO small1 SELECT g, 'v' || g FROM generate_series(1, 500) g;
CREATE TABLE small2 (id int PRIMARY KEY, at timestamptz, n numeric);
INSERT INTO small2 SELECT g, '2026-01-01'::timestamptz + g * interval '1 hour', g / 7.0
    FROM generate_series(1, 300) g;
CREATE TABLE empty (id int PRIMARY KEY);
ANALYZE;
"""
TABLES = {  # table -> (object name, decompress)
    "big": ("public.big.csv", False),
    "ranged": ("public.ranged.csv", False),
    "small1": ("public.small1.csv.zst", True),
    "small2": ("public.small2.csv", False),
    "empty": ("public.empty.csv", False),
}
PLAN = """
[defaults]
output_dir = "s3://{bucket}/{prefix}"
dsn = "{dsn}"
[[tables]]
name = "public.big"
chunk_rows = 3000
[[tables]]
name = "public.ranged"
workers = 2
chunk_rows = 3000
[[tables]]
name = "public.small1"
compress = "zstd"
[[tables]]
name = "public.small2"
[[tables]]
name = "public.empty"
"""


#: test_s3's fixtures (pytest knows them by their own names): moto's server, a fresh bucket.
endpoint, bucket = test_s3.endpoint, test_s3.s3


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Any:
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


@pytest.fixture(scope="module")
def csv(db: str, pg: EphemeralPostgres) -> dict[str, bytes]:
    return {t: psql_copy(pg, db, f"SELECT * FROM {t} ORDER BY id") for t in TABLES}


def write_plan(path: Path, dsn: str, bucket: str = BUCKET, *, consistent: bool = False) -> Path:
    text = PLAN.format(bucket=bucket, prefix=PREFIX, dsn=dsn)
    if consistent:
        text = text.replace("[defaults]\n", "[defaults]\nconsistent = true\n")
    path.write_text(text)
    return path


def bulk(plan: Path, *extra: str) -> list[str]:
    return cli("bulk", str(plan), "--no-progress", "--jobs", "2", *extra)


def report(bucket: Any) -> dict[str, Any]:
    return dict(json.loads(get(bucket, f"{PREFIX}/copystream-report.json")))


def unzstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout


def assert_objects_are_psqls_csv(bucket: Any, csv: dict[str, bytes]) -> None:
    for table, (name, zst) in TABLES.items():
        data = get(bucket, f"{PREFIX}/{name}")
        assert (unzstd(data) if zst else data) == csv[table], table
        manifest = json.loads(get(bucket, f"{PREFIX}/{name}.manifest.json"))
        assert manifest["bytes"] == len(data)
    names = {f"{PREFIX}/{n}" for n, _ in TABLES.values()}
    beside = {f"{n}.manifest.json" for n in names}
    assert keys(bucket) == names | beside | {f"{PREFIX}/copystream-report.json"}
    assert uploads(bucket) == []


def test_a_plan_for_s3_keeps_the_local_names_and_refuses_what_s3_cannot_take() -> None:
    plan = parse_plan('[defaults]\noutput_dir = "s3://b/p/q/"\n[[tables]]\nname = "s.t"\n')
    assert str(plan.output_dir) == "s3://b/p/q"
    assert str(plan.report_path) == "s3://b/p/q/copystream-report.json"
    bad = (
        '[defaults]\noutput_dir = "s3://b/p"\n[[tables]]\nname = "t"\noutput = "s3://b/t.csv"\n'
        '[[tables]]\nname = "u"\nformat = "parquet"\n'
        '[[tables]]\nname = "w"\nwatermark = "at"\nworkers = 2\n'
    )
    with pytest.raises(PlanError) as info:
        parse_plan(bad, source="p.toml")
    assert info.value.problems == (
        "p.toml:5: tables[0].output: expected a path relative to output_dir (not a directory, "
        "nor an s3:// URL), got 's3://b/t.csv'",
        "p.toml:8: tables[1].format: a Parquet dataset cannot be written to S3 yet",
        "p.toml:12: tables[2].workers: above 1 cannot write an increment to S3 yet",
    )
    with pytest.raises(UsageError, match="shards cannot write to S3 yet"):
        plan_bulk_shards(plan, shards=2)
    with pytest.raises(PlanError, match="output_dir: expected a local directory path or s3://"):
        parse_plan('[defaults]\noutput_dir = "s3://"\n[[tables]]\nname = "t"\n')


@pytest.mark.parametrize(
    ("env", "where", "needle"),
    [
        ({}, "no-such-bucket", "bucket no-such-bucket does not exist"),
        ({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, BUCKET, "no AWS credentials"),
    ],
)
def test_bucket_mistakes_are_one_line_before_postgresql(
    bucket: Any, tmp_path: Path, env: dict[str, str], where: str, needle: str
) -> None:
    """No server listens at the plan's DSN: the bucket's error must come first, alone."""
    env = {**env, "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE":
           str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
    nowhere = "host=127.0.0.1 port=9 dbname=x user=nobody connect_timeout=2"
    plan = write_plan(tmp_path / "plan.toml", nowhere, bucket=where)
    line = assert_one_error_line(run(bulk(plan), env=env), 2, needle)
    assert "127.0.0.1" not in line and "connect" not in line  # PostgreSQL was not tried
    assert keys(bucket) == set() and [p.name for p in tmp_path.iterdir()] == ["plan.toml"]


def _uploaded(bucket: Any) -> int:
    """How many parts (and ranges' heads) the checkpoints in the bucket record."""
    n = 0
    for k in keys(bucket):
        if k.endswith(".checkpoint.json"):
            try:
                d = json.loads(get(bucket, k))["destination"]
            except Exception:
                continue
            n += len(d.get("parts", [])) + bool(d.get("range", {}).get("head"))
    return n


def _kill_job(cmd: list[str], cwd: Path, bucket: Any, *, worker: bool = False) -> None:
    """Start the job in ``cwd``; once its checkpoints record one part more than when it
    started, SIGKILL a worker (``worker``) or the coordinator (its workers die with it)."""
    cwd.mkdir()
    parts = _uploaded(bucket) + 1
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while _uploaded(bucket) < parts:
            assert proc.poll() is None, "the job ended before the kill point"
            assert time.monotonic() < deadline, "no part was uploaded"
            time.sleep(0.01)
        if worker:
            children = psutil.Process(proc.pid).children()
            os.kill(children[0].pid, signal.SIGKILL)
            proc.communicate(timeout=180)
            assert proc.returncode in (0, 1)
        else:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            assert proc.returncode == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_jobs_resume_from_another_directory_to_psqls_csv(
    db: str, bucket: Any, csv: dict[str, bytes], tmp_path: Path
) -> None:
    """The coordinator killed once a part is uploaded, then once one more is, a worker killed
    in a third run; each run in a working directory of its own (nothing is kept locally). A last
    run finishes: every object is psql's CSV, every upload completed, the report says so."""
    plan = write_plan(tmp_path / "plan.toml", db)
    cmd = bulk(plan)
    _kill_job(cmd, tmp_path / "m1", bucket)
    assert report(bucket)["finished"] is False
    status = run(cli("status", f"s3://{BUCKET}/{PREFIX}"))  # from the bucket alone
    assert_ok(status)
    head = status.stdout.splitlines()[0]
    assert head.startswith(f"{plan}: running; 5 tables: ") and ": in progress, " in status.stdout
    _kill_job(cmd, tmp_path / "m2", bucket)
    _kill_job(cmd, tmp_path / "m3", bucket, worker=True)
    # m3 resumed what m2's kill left (a killed worker's table is started again within m3)
    resumed = {t["table"] for t in report(bucket)["tables"] if t["resumed"]}
    (tmp_path / "m4").mkdir()
    proc = subprocess.run(cmd, cwd=tmp_path / "m4", capture_output=True, text=True, timeout=300)
    assert_ok(proc)
    assert_objects_are_psqls_csv(bucket, csv)
    doc = report(bucket)
    assert doc["finished"] is True and doc["output_dir"] == f"s3://{BUCKET}/{PREFIX}"
    rows = {t["table"]: t for t in doc["tables"]}
    assert {t["status"] for t in rows.values()} <= {"done", "skipped"}
    assert resumed | {t for t, r in rows.items() if r["resumed"]}, "nothing was resumed"
    assert rows["public.big"]["output"] == f"s3://{BUCKET}/{PREFIX}/public.big.csv"
    assert rows["public.big"]["rows"] == 300_000 and rows["public.empty"]["rows"] == 0
    text = get(bucket, f"{PREFIX}/copystream-report.json").decode()
    assert db not in text and SECRET not in text
    for m in ("m1", "m2", "m3", "m4"):
        assert list((tmp_path / m).iterdir()) == []
    for name, _ in TABLES.values():
        assert_ok(run(cli("verify", "--deep", f"s3://{BUCKET}/{PREFIX}/{name}")))
    for where in (str(plan), f"s3://{BUCKET}/{PREFIX}/copystream-report.json"):
        status = run(cli("status", "--json", where))
        assert_ok(status)
        assert json.loads(status.stdout) == report(bucket)


def test_a_finished_job_run_again_exports_nothing(
    db: str, bucket: Any, csv: dict[str, bytes], tmp_path: Path
) -> None:
    """A job with ``consistent = true`` reads one snapshot (every manifest says so; the small
    tables are one PutObject each, the others multipart uploads). A second run skips every
    table (rows added meanwhile are not exported, no object is written again) from the
    bucket's listing. A small table's manifest without its object is exported again; an
    object newer than its manifest is re-verified by its worker, then skipped."""
    import copystream.bulk

    plan = write_plan(tmp_path / "plan.toml", db, consistent=True)
    result = copystream.bulk.run_bulk(plan, jobs=2)
    assert result.exit_code == 0 and {o.status for o in result.tables} == {"done"}
    assert result.snapshot is not None and result.snapshot.point_in_time
    assert report(bucket)["snapshot"]["point_in_time"] is True
    assert_objects_are_psqls_csv(bucket, csv)
    for table, (name, _) in TABLES.items():
        manifest = json.loads(get(bucket, f"{PREFIX}/{name}.manifest.json"))
        assert manifest["point_in_time"] is True, table
        etag = bucket.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}")["ETag"]
        assert ("-" in etag) == (table in ("big", "ranged")), table  # multipart or one put
    before = {k: bucket.head_object(Bucket=BUCKET, Key=k)["ETag"] for k in keys(bucket)}
    modified = {k: bucket.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in keys(bucket)}
    run_sql(db, "INSERT INTO small2 VALUES (100000, now(), 1)")
    try:
        time.sleep(1.1)  # S3 times have a second's resolution
        again = copystream.bulk.run_bulk(plan, jobs=2)
        assert {o.status for o in again.tables} == {"skipped"}
        for k in before:
            if not k.endswith("copystream-report.json"):
                assert bucket.head_object(Bucket=BUCKET, Key=k)["LastModified"] == modified[k], k
                assert bucket.head_object(Bucket=BUCKET, Key=k)["ETag"] == before[k], k
        assert report(bucket)["totals"]["skipped"] == len(TABLES)
        dry = run(bulk(plan, "--dry-run"))
        assert_ok(dry)
        assert dry.stdout.count("finished (skipped)") == len(TABLES)
    finally:
        run_sql(db, "DELETE FROM small2 WHERE id = 100000")
    # as if killed between a small table's first manifest and its object (small2), and before
    # its second manifest (small1's object put again: newer than its manifest)
    time.sleep(1.1)
    bucket.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/public.small2.csv")
    key = f"{PREFIX}/public.small1.csv.zst"
    bucket.put_object(Bucket=BUCKET, Key=key, Body=get(bucket, key))
    third = copystream.bulk.run_bulk(plan, jobs=2)
    status = {o.table: o.status for o in third.tables}
    assert status["public.small2"] == "done" and status["public.small1"] == "skipped"
    assert_objects_are_psqls_csv(bucket, csv)


def test_watermark_runs_write_a_chain_of_objects_that_upserts_to_the_table(
    db: str, bucket: Any, tmp_path: Path, pg: EphemeralPostgres
) -> None:
    """``watermark`` to S3: run 1 puts the table in full, runs 2 and 3 the next increment
    objects (``--since`` the object before, in the bucket); the chain verifies, and upserting
    the objects by key in order gives psql's export of the table."""
    run_sql(
        db,
        "CREATE TABLE w (id int PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT "
        "clock_timestamp(), v text); CREATE INDEX ON w (updated_at, id); "
        "INSERT INTO w (id, v) SELECT g, 'a' FROM generate_series(1, 500) g",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\ndsn = {json.dumps(db)}\noutput_dir = "s3://{BUCKET}/chain"\n'
        'chunk_rows = 64\n[[tables]]\nname = "public.w"\nwatermark = "updated_at"\n'
        "watermark_lag = 0.5\n"
    )
    names = ["public.w.csv", "public.w.inc-00001.csv", "public.w.inc-00002.csv"]
    try:
        for round_ in range(3):
            if round_:
                run_sql(db, f"UPDATE w SET v = 'r{round_}', updated_at = clock_timestamp() "
                            f"WHERE id % {3 + round_} = 0")  # fmt: skip
                first = 500 + 100 * round_
                run_sql(db, f"INSERT INTO w (id, v) SELECT g, 'n' FROM generate_series({first}, "
                            f"{first + 99}) g")  # fmt: skip
            result = run_bulk(plan)
            assert result.ok, [t.errors for t in result.failed]
            (outcome,) = result.tables
            assert str(outcome.output) == f"s3://{BUCKET}/chain/{names[round_]}"
            files = []
            for name in names[: round_ + 1]:
                files.append(tmp_path / name)
                files[-1].write_bytes(get(bucket, f"chain/{name}"))
            table = psql_copy(pg, db, "SELECT * FROM w ORDER BY id").decode()
            assert upserted(*files) == {r[0]: r for r in csv_rows(table)}
            if round_:
                m = json.loads(get(bucket, f"chain/{names[round_]}.manifest.json"))
                assert m["since"]["manifest"].endswith(f"{names[round_ - 1]}.manifest.json")
        chain = [f"s3://{BUCKET}/chain/{n}" for n in names]
        assert_ok(run(cli("verify", "--chain", *chain)))
    finally:
        run_sql(db, "DROP TABLE w")


def csv_rows(text: str) -> list[list[str]]:
    return list(csv_module.reader(io.StringIO(text)))


def test_incremental_runs_append_to_each_object_in_place(
    db: str, bucket: Any, tmp_path: Path, pg: EphemeralPostgres
) -> None:
    """``incremental = true`` to S3: run 1 puts each table in full (a small one in one put, a
    larger one as an upload), runs 2 and 3 append the rows inserted meanwhile to the same
    objects: each is psql's export of its table, verifies, and records every increment once."""
    run_sql(
        db,
        "CREATE TABLE ia (id int PRIMARY KEY, v text);"
        "CREATE TABLE ib (id int PRIMARY KEY, v text);"
        "INSERT INTO ia SELECT g, md5(g::text) FROM generate_series(1, 300) g;"
        "INSERT INTO ib SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 60000) g;"
        "ANALYZE ia, ib",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\ndsn = {json.dumps(db)}\noutput_dir = "s3://{BUCKET}/inc"\n'
        "chunk_rows = 5000\nincremental = true\n"
        '[[tables]]\nname = "public.ia"\n[[tables]]\nname = "public.ib"\ncompress = "zstd"\n'
    )
    objects = {"ia": ("public.ia.csv", False), "ib": ("public.ib.csv.zst", True)}
    base = {"ia": 300, "ib": 60000}
    try:
        for round_ in range(3):
            if round_:
                for t, n in (("ia", 300), ("ib", 60000)):
                    first = n + 1000 * round_
                    run_sql(db, f"INSERT INTO {t} SELECT g, 'r{round_}' FROM "
                                f"generate_series({first}, {first + 999}) g")  # fmt: skip
            result = run_bulk(plan, jobs=2)
            assert result.ok, [t.errors for t in result.failed]
            assert {o.status for o in result.tables} == {"done"}
            for t, (name, zst) in objects.items():
                data = get(bucket, f"inc/{name}")
                want = psql_copy(pg, db, f"SELECT * FROM {t} ORDER BY id")
                assert (unzstd(data) if zst else data) == want, (t, round_)
                m = json.loads(get(bucket, f"inc/{name}.manifest.json"))
                history = [i["rows"] for i in m.get("increments", [])]
                assert history == ([base[t]] + [1000] * round_ if round_ else []), (t, round_)
                assert_ok(run(cli("verify", f"s3://{BUCKET}/inc/{name}", "--deep")))
        assert uploads(bucket) == []
    finally:
        run_sql(db, "DROP TABLE ia, ib")
