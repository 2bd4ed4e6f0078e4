"""An Airflow 3 DAG that runs a bulk plan as shards, on as many workers as Airflow has.

plan → run_shard, once per shard (dynamic task mapping) → finish. The plan's tables are dealt
into shards of about equal estimated size, a table larger than its share split into key
ranges; finish joins those, checks every table's manifest and file and writes the job report
(``copystream-report.json`` in the plan's output directory). Put it in your dags folder and
point it at a plan file (docs/bulk.md) whose output directory every worker sees (a shared
filesystem); the plan's ``dsn`` (or the workers' libpq environment: ``PGHOST``,
``PGPASSWORD``, ...) says where the tables come from. Airflow retries a failed shard task,
which resumes each of its tables from its checkpoint.

The values below can be changed through the environment (the tests do).
"""

from __future__ import annotations

import datetime as dt
import os

from copystream.airflow import sharded_bulk_dag

dag = sharded_bulk_dag(
    "copystream_sharded_bulk",
    plan=os.environ.get("COPYSTREAM_EXAMPLE_PLAN", "/shared/migration.toml"),
    shards=int(os.environ.get("COPYSTREAM_EXAMPLE_SHARDS", "4")),
    retries=int(os.environ.get("COPYSTREAM_EXAMPLE_RETRIES", "3")),
    retry_delay=dt.timedelta(seconds=float(os.environ.get("COPYSTREAM_EXAMPLE_RETRY_DELAY", "60"))),
)

if __name__ == "__main__":  # one local run of the whole DAG, in this process: dag.test()
    print("copystream example DAG run:", dag.test().state)
