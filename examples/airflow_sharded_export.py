"""An Airflow 3 DAG that exports one large table in shards, on as many workers as Airflow has.

plan → run_shard, once per shard (dynamic task mapping) → finish. Put it in your dags folder,
create the connection ``copystream_source`` (Admin → Connections, or the environment variable
AIRFLOW_CONN_COPYSTREAM_SOURCE=postgresql://user@host/db) and point the output at a directory
every worker sees (a shared filesystem). Airflow retries a failed shard task, which resumes
from its checkpoint; the finished file is byte-identical to psql's
``\\copy (SELECT * FROM public.orders ORDER BY id) TO file CSV`` (compressed with zstd here).

The values below can be changed through the environment (the tests do).
"""

from __future__ import annotations

import datetime as dt
import json
import os

from copystream.airflow import sharded_export_dag

dag = sharded_export_dag(
    "copystream_sharded_export",
    table=os.environ.get("COPYSTREAM_EXAMPLE_TABLE", "public.orders"),
    output=os.environ.get("COPYSTREAM_EXAMPLE_OUTPUT", "/shared/exports/orders.csv.zst"),
    shards=int(os.environ.get("COPYSTREAM_EXAMPLE_SHARDS", "4")),
    conn_id="copystream_source",
    retries=int(os.environ.get("COPYSTREAM_EXAMPLE_RETRIES", "3")),
    retry_delay=dt.timedelta(seconds=float(os.environ.get("COPYSTREAM_EXAMPLE_RETRY_DELAY", "60"))),
    # any export option (JSON values): chunk_rows, where, columns, compress, pushgateway, ...
    **json.loads(os.environ.get("COPYSTREAM_EXAMPLE_OPTIONS", "{}")),
)

if __name__ == "__main__":  # one local run of the whole DAG, in this process: dag.test()
    print("copystream example DAG run:", dag.test().state)
