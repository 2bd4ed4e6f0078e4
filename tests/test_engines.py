"""The README's shard snippets for Dask and Kubernetes, run as written.

Each test takes its snippet out of README.md (so the README cannot drift from what works),
points its shared path at a temporary directory and its table at a test table, and runs it:
the Dask one on a real ``distributed.LocalCluster`` of worker processes; the Kubernetes one by
running the three container commands of the plan Job, the Indexed Job (once per index, with
``JOB_COMPLETION_INDEX`` set as Kubernetes sets it) and the finish Job. That is the pods'
commands on one machine, not a cluster: what a cluster adds (scheduling, a shared volume,
``backoffLimitPerIndex``) is not tested here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zstandard
from distributed import Client, LocalCluster  # the test extra: dask[distributed]
from psycopg.conninfo import conninfo_to_dict

import copystream

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

ROWS = 20_000
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first fenced code block after the paragraph starting with ``heading``."""
    text = README.read_text()
    at = text.index(f"\n{heading}")
    found = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, at)
    assert found is not None, heading
    return found.group(1)


def localized(code: str, tmp_path: Path) -> str:
    """``code`` with the README's shared path and table replaced by the test's."""
    return code.replace("/shared/", f"{tmp_path}/").replace("public.orders", "public.t")


def make_table(dsn: str, run_sql: RunSql) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE t (id int PRIMARY KEY, v text);
            INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) g;""",
    )


def unzstd(path: Path) -> bytes:
    with path.open("rb") as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def test_the_readme_dask_snippet_on_a_local_cluster(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    make_table(dsn, run_sql)
    code = localized(readme_block("**Dask**"), tmp_path)
    assert "client.map(copystream.run_shard" in code
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        namespace = {"copystream": copystream, "client": client, "dsn": dsn}
        exec(code, namespace)  # the README's own snippet
        results = [f.result() for f in namespace["futures"]]
    plan = namespace["plan"]
    assert plan.shards > 1 and [r.index for r in results] == list(range(plan.shards))
    out = tmp_path / "orders.csv.zst"
    assert unzstd(out) == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert copystream.verify_file(out).rows == ROWS


def test_the_readme_kubernetes_commands_per_index(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """Not a cluster: each pod's exact command, run here with the environment it would get."""
    make_table(dsn, run_sql)
    lines = localized(readme_block("**Kubernetes**"), tmp_path).strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("python -c ") for line in lines)
    plan_cmd, shard_cmd, finish_cmd = (sys.executable + line[len("python"):] for line in lines)
    params = conninfo_to_dict(dsn)  # as a pod gets them: libpq's environment variables
    env = {**os.environ, "PGHOST": str(params["host"]), "PGPORT": str(params["port"]),
           "PGUSER": str(params["user"]), "PGDATABASE": str(params["dbname"])}  # fmt: skip

    def pod(command: str, **more: str) -> None:
        done = subprocess.run(["sh", "-c", command], env={**env, **more}, timeout=120,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr

    pod(plan_cmd)
    plan = copystream.ShardPlan.of(tmp_path / "orders.csv.zst.shards.json")
    assert plan.shards == 8
    for index in reversed(range(plan.shards)):  # any order
        pod(shard_cmd, JOB_COMPLETION_INDEX=str(index))
    pod(shard_cmd, JOB_COMPLETION_INDEX="3")  # a retried index: done already, returns at once
    pod(finish_cmd)
    out = tmp_path / "orders.csv.zst"
    assert unzstd(out) == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert copystream.verify_file(out).rows == ROWS
