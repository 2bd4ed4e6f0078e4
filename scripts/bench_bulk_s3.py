"""A bulk job of many small tables to S3 (moto's server on localhost) against the same job to a
local directory, in alternating rounds on one throwaway PostgreSQL; then each job run again
(every table finished: skipped). Prints each round and the median ratios S3 / local.

    .venv/bin/python scripts/bench_bulk_s3.py --tables 200 --rows 1000 --rounds 3 --jobs 2

moto answers in Python, in this machine's cores: the figures bound what copystream adds per
table (a listing, a PutObject of the object and two of its manifest), not what S3 would take.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import psycopg
from moto.server import ThreadedMotoServer
from psycopg import sql

from copystream.testing import EphemeralPostgres

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_tables(dsn: str, count: int, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA many")
        for i in range(1, count + 1):
            name = sql.Identifier("many", f"t{i:05d}")
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id int PRIMARY KEY, name text, amount numeric(12,2), "
                    "created timestamptz)"
                ).format(name)
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g, md5(g::text), (g * 37 % 10000) / 100.0, "
                    "timestamptz '2024-01-01' + g * interval '17 min' "
                    "FROM generate_series(1, {}) g"
                ).format(name, sql.Literal(rows))
            )
        conn.execute("ANALYZE")


def run_job(plan: Path, jobs: int) -> tuple[float, float, int]:
    """Wall seconds and the job's CPU seconds (coordinator and workers) of one bulk run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "copystream", "bulk", str(plan), "--jobs", str(jobs),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"bulk failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, cpu, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=200)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket=BUCKET)
    work = Path(tempfile.mkdtemp(prefix="bench-bulk-s3-"))
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        with EphemeralPostgres() as pg:
            dsn = pg.dsn
            create_tables(dsn, args.tables, args.rows)
            for rnd in range(args.rounds):
                for name in ("local", "s3"):
                    where = str(work / f"out{rnd}") if name == "local" else (
                        f"s3://{BUCKET}/r{rnd}")  # fmt: skip
                    plan = work / f"{name}{rnd}.toml"
                    plan.write_text(f'[defaults]\noutput_dir = "{where}"\ndsn = "{dsn}"\n'
                                    '[[tables]]\npattern = "many.*"\n')  # fmt: skip
                    first = run_job(plan, args.jobs)
                    again = run_job(plan, args.jobs)
                    results.setdefault(name, []).append(first[:2])
                    results.setdefault(name + "-rerun", []).append(again[:2])
                    line = (f"round {rnd + 1} {name}: {first[0]:.2f}s wall, {first[1]:.2f}s "
                            f"CPU; re-run {again[0]:.2f}s wall, {again[1]:.2f}s CPU")  # fmt: skip
                    print(line, flush=True)
    finally:
        moto.stop()
        shutil.rmtree(work, ignore_errors=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in results.items()}  # fmt: skip
    summary = {
        k: {"wall_s": round(w, 2), "cpu_s": round(c, 2)} for k, (w, c) in med.items()
    }
    summary["ratio_s3_to_local"] = {
        "first_wall": round(med["s3"][0] / med["local"][0], 2),
        "first_cpu": round(med["s3"][1] / med["local"][1], 2),
        "rerun_wall": round(med["s3-rerun"][0] / med["local-rerun"][0], 2),
    }
    print(json.dumps({"tables": args.tables, "rows": args.rows, "jobs": args.jobs, **summary}))


if __name__ == "__main__":
    main()
