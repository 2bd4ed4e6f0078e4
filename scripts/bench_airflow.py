#!/usr/bin/env python3
"""Time a sharded export through the example Airflow DAG against ``psql \\copy``, same run.

Starts a throwaway PostgreSQL (or uses ``--dsn``), creates scripts/bench.py's ``bench_orders``
table (``--rows``), then per round: ``psql \\copy (SELECT * FROM bench_orders ORDER BY id) TO
file CSV``, and ``python examples/airflow_sharded_export.py`` (``dag.test()``: plan → the
shards, one mapped task each → finish) in an Airflow home of its own with a SQLite metadata
database, writing plain CSV. Checks that both files are byte-identical and prints, as JSON:
the DAG run's wall time (Airflow's start-up included), the export's own seconds (from the
plan task's start to the finish task's end, by the task logs), each shard's seconds, and the
ratios to psql. ``dag.test()`` runs the tasks one after the other in one process: the shards
do not overlap here, as they do on a real deployment with several workers.

    .venv/bin/python scripts/bench_airflow.py --rows 5000000 --shards 4 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import xxhash
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench import ensure_table  # noqa: E402

from copystream.testing import EphemeralPostgres  # noqa: E402

EXAMPLE = ROOT / "examples" / "airflow_sharded_export.py"
TABLE = "bench_orders"


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[tuple[str, str]]:
    if dsn:
        yield dsn, shutil.which("psql") or "psql"
        return
    pg = EphemeralPostgres()
    try:
        pg.start()
        yield pg.create_database("bench"), pg.psql_bin
    finally:
        pg.cleanup()


def airflow_env(home: Path, dsn: str) -> dict[str, str]:
    p = conninfo_to_dict(dsn)
    conn = {"conn_type": "postgres", "host": p.get("host"), "port": int(p.get("port", 5432)),
            "login": p.get("user"), "schema": p.get("dbname"), "password": p.get("password")}
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE.parent),
           "AIRFLOW_CONN_COPYSTREAM_SOURCE": json.dumps({k: v for k, v in conn.items() if v})}
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], env=env,
                   check=True, capture_output=True)
    return env


def _stamp(line: str) -> float:
    return datetime.fromisoformat(line[:26].rstrip("Z")).timestamp()


def dag_round(env: dict[str, str], out: Path, shards: int) -> dict[str, Any]:
    run_env = {**env, "COPYSTREAM_EXAMPLE_TABLE": TABLE, "COPYSTREAM_EXAMPLE_OUTPUT": str(out),
               "COPYSTREAM_EXAMPLE_SHARDS": str(shards), "COPYSTREAM_EXAMPLE_RETRIES": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXAMPLE)], env=run_env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or "DAG run: success" not in log:
        raise SystemExit(f"the DAG run failed:\n{log[-4000:]}")
    per = re.search(r"seconds per shard: ([\d., ]+)", log)
    lines = log.splitlines()
    plan_start = next(ln for ln in lines if "[DAG TEST] running task" in ln and ".plan " in ln)
    finish_end = [ln for ln in lines if "new_state=success" in ln][-1]
    return {
        "dag_wall_s": round(wall, 2),
        "export_s": round(_stamp(finish_end) - _stamp(plan_start), 2),
        "shard_s": [float(x) for x in per.group(1).split(", ")] if per else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--dsn", help="use this server instead of a throwaway one")
    args = ap.parse_args()
    with server(args.dsn) as (dsn, psql), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        info = ensure_table(dsn, TABLE, args.rows)
        env = airflow_env(work / "airflow-home", dsn)
        rounds = []
        for r in range(args.rounds):
            ref, out = work / "psql.csv", work / "dag.csv"
            t0 = time.perf_counter()
            subprocess.run([psql, "-X", "-q", "-d", dsn, "-c",
                            f"\\copy (SELECT * FROM {TABLE} ORDER BY id) TO '{ref}' CSV"],
                           check=True)
            psql_s = time.perf_counter() - t0
            got = dag_round(env, out, args.shards)
            same = digest(ref) == digest(out)
            got.update(round=r + 1, psql_s=round(psql_s, 2), identical=same,
                       bytes=out.stat().st_size,
                       export_vs_psql=round(got["export_s"] / psql_s, 2),
                       dag_wall_vs_psql=round(got["dag_wall_s"] / psql_s, 2))
            print(json.dumps(got), flush=True)
            rounds.append(got)
            if not same:
                raise SystemExit("the DAG's output differs from psql's")
            for p in work.glob("dag.csv*"):
                p.unlink()
            ref.unlink()
        print(json.dumps({"rows": info["rows"], "shards": args.shards, "rounds": rounds}))


if __name__ == "__main__":
    main()
