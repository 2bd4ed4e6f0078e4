"""The example Airflow DAG (examples/airflow_sharded_export.py), run for real with ``dag.test()``.

Airflow 3 (the ``airflow`` extra, which ``scripts/test.sh`` installs; missing, the test fails
saying so) gets a home of its own in a temporary directory with a SQLite metadata database
(``airflow db migrate``), the connection ``copystream_source`` from the environment, and the
example DAG's directory as its dags folder. The DAG (plan → run_shard mapped over 3 shards →
finish) exports a table to a zstd file through the connection:

1. the first ``dag.test()`` process is SIGKILLed while a shard is half done;
2. a second ``dag.test()`` finds the same plan and resumes that shard from its checkpoint;
   there the backends of a shard half done in this run are terminated, with copystream's own
   waiting for the server turned off (``max_outage=0``), so the shard task fails and
   Airflow's retry resumes it from its checkpoint;
3. the file, decompressed, is byte for byte psql's.

Each chunk is slowed down on the server (a ``pg_sleep`` every 1,000 rows, in a filter true for
every row) so that the kills land mid-shard on any machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import zstandard
from helpers import read_manifest
from psycopg.conninfo import conninfo_to_dict

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "airflow_sharded_export.py"
ROWS = 60_000
SHARDS = 3
SLOW = "id % 1000 <> 0 OR pg_sleep(0.05) IS NOT NULL"  # true for every row


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of an Airflow with its own home and migrated SQLite database."""
    if importlib.util.find_spec("airflow") is None:
        pytest.fail(
            "apache-airflow is not installed: pip install -e '.[airflow]' (scripts/test.sh does)",
            pytrace=False,
        )
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE.parent),
    }
    migrate = subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert (home / "airflow.db").exists()
    return env


def _checkpoint(out: Path, shard: int) -> dict[str, Any] | None:
    path = out.with_name(f"{out.name}.part-{shard:04d}.checkpoint.json")
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError):
        return None


def _half_done(out: Path, proc: subprocess.Popen[bytes], since: dict[int, int]) -> int:
    """Wait until some shard, not finished, has committed two chunks in this run (beyond the
    ``since`` it had at the start); return its index. (``dag.test()`` runs the mapped shards
    one at a time, in an order of its own.)"""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for shard in range(SHARDS):
            cp = _checkpoint(out, shard)
            done = cp is None or cp["finished"]
            if not done and len(cp["chunks"]) >= since.get(shard, 0) + 2:  # type: ignore[index]
                return shard
        assert proc.poll() is None, "the DAG run ended before a shard was half done"
        time.sleep(0.02)
    pytest.fail("no shard got half done")


def _chunks(out: Path) -> dict[int, int]:
    """Chunks each shard's checkpoint records now."""
    return {i: len(cp["chunks"]) for i in range(SHARDS) if (cp := _checkpoint(out, i))}


def _terminate_backends(dsn: str) -> None:
    """Terminate the client backends of the test's database (the running shard's)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        ).fetchone()
    assert killed is not None and killed[0] >= 1


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return _start_example(EXAMPLE, env, log)


def _start_example(example: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, str(example)], env=env, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def test_example_dag_killed_and_retried_shards_resume(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, airflow_env: dict[str, str]
) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE t (id int PRIMARY KEY, v text, n numeric);
            INSERT INTO t SELECT g, md5(g::text), g / 7.0 FROM generate_series(1, {ROWS}) g;""",
    )
    params = conninfo_to_dict(dsn)
    out = tmp_path / "t.csv.zst"
    connection = {
        "conn_type": "postgres", "host": params["host"], "port": int(params["port"]),
        "login": params["user"], "schema": params["dbname"],
    }  # fmt: skip
    env = {
        **airflow_env,
        "AIRFLOW_CONN_COPYSTREAM_SOURCE": json.dumps(connection),
        "COPYSTREAM_EXAMPLE_TABLE": "t",
        "COPYSTREAM_EXAMPLE_OUTPUT": str(out),
        "COPYSTREAM_EXAMPLE_SHARDS": str(SHARDS),
        "COPYSTREAM_EXAMPLE_RETRIES": "2",
        "COPYSTREAM_EXAMPLE_RETRY_DELAY": "0",
        "COPYSTREAM_EXAMPLE_OPTIONS": json.dumps(
            {"chunk_rows": 1000, "max_outage": 0, "where": SLOW}
        ),
    }
    # 1. the whole DAG run killed while a shard is half done
    first = _start(env, tmp_path / "first.log")
    try:
        killed_shard = _half_done(out, first, {})
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not _checkpoint(out, killed_shard)["finished"]  # type: ignore[index]
    # 2. run again; a shard's backends terminated half way: Airflow retries its task
    second = _start(env, tmp_path / "second.log")
    try:
        retried_shard = _half_done(out, second, _chunks(out))
        _terminate_backends(dsn)
        second.wait(timeout=600)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    log = (tmp_path / "second.log").read_text(errors="replace")
    assert second.returncode == 0 and "copystream example DAG run: success" in log, log[-5000:]
    assert "up_for_retry" in log  # the terminated shard's first try failed; Airflow retried it
    resumed = re.findall(r"t\.csv\.zst\.part-(\d{4}): resuming at row", log)
    expected = sorted([killed_shard, retried_shard])
    assert sorted(int(i) for i in resumed) == expected, (resumed, expected)
    # 3. the file is psql's
    with out.open("rb") as f:
        csv = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    assert csv == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    m = read_manifest(out)
    assert m["rows"] == ROWS and m["workers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("t.csv")) == [
        "t.csv.zst", "t.csv.zst.manifest.json",
    ]  # fmt: skip


BULK_EXAMPLE = ROOT / "examples" / "airflow_sharded_bulk.py"


def test_example_bulk_dag_retried_shard_resumes(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, airflow_env: dict[str, str]
) -> None:
    """The bulk plan's example DAG: a large table split into 2 key ranges and small tables,
    dealt into 2 shards; a shard's backends terminated half way (``max_outage = 0``: no
    waiting for the server), Airflow retries the task and it resumes; every file is psql's
    and the job report says every table is done."""
    run_sql(
        dsn,
        f"""CREATE TABLE big (id int PRIMARY KEY, v text);
            INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;
            CREATE TABLE s1 (id int PRIMARY KEY, v text);
            INSERT INTO s1 SELECT g, md5(g::text) FROM generate_series(1, 100) g;
            CREATE TABLE s2 (id int PRIMARY KEY, v text);
            INSERT INTO s2 SELECT g, md5(g::text) FROM generate_series(1, 50) g;
            ANALYZE;""",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\ndsn = "{dsn}"\noutput_dir = "out"\nchunk_rows = 1000\nmax_outage = 0\n\n'
        f'[[tables]]\nname = "public.big"\nwhere = "{SLOW}"\n\n'
        '[[tables]]\npattern = "public.s*"\n'
    )
    out = tmp_path / "out"
    big = out / "public.big.csv"
    env = {
        **airflow_env,
        "COPYSTREAM_EXAMPLE_PLAN": str(plan),
        "COPYSTREAM_EXAMPLE_SHARDS": "2",
        "COPYSTREAM_EXAMPLE_RETRIES": "2",
        "COPYSTREAM_EXAMPLE_RETRY_DELAY": "0",
    }
    run = _start_example(BULK_EXAMPLE, env, tmp_path / "bulk.log")
    try:
        _half_done(big, run, {})
        _terminate_backends(dsn)
        run.wait(timeout=600)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    log = (tmp_path / "bulk.log").read_text(errors="replace")
    assert run.returncode == 0 and "copystream example DAG run: success" in log, log[-5000:]
    assert "up_for_retry" in log  # the terminated shard's first try failed; Airflow retried it
    assert re.search(r"public\.big\.csv\.part-\d{4}: resuming at row", log), log[-5000:]
    for name in ("big", "s1", "s2"):
        assert (out / f"public.{name}.csv").read_bytes() == psql_csv(
            dsn, f"SELECT * FROM {name} ORDER BY id"
        ), name
    assert read_manifest(big)["workers"] == 2
    report = json.loads((out / "copystream-report.json").read_text())
    assert report["finished"] and [t["status"] for t in report["tables"]] == ["done"] * 3
