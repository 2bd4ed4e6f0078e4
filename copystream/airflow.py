"""Sharded exports in Airflow 3: TaskFlow tasks and a small DAG factory.

The three calls of :mod:`copystream.shards` as Airflow tasks: plan → one mapped task per shard
(dynamic task mapping, ``.expand``) → finish. The plan travels in XCom (it holds no password);
each shard's result lands in XCom; a shard task that fails, or whose worker is killed, is
retried by Airflow's own retries and resumes from its checkpoint::

    from copystream.airflow import sharded_export_dag

    dag = sharded_export_dag(
        "export_orders", table="public.orders", output="/shared/exports/orders.csv",
        shards=8, conn_id="warehouse",
    )

or inside a DAG of your own, ``export_shards(table, output, shards=8, conn_id=...)``. A bulk
plan runs the same way, its tables dealt into shards balanced by size::

    dag = sharded_bulk_dag("migrate", plan="/shared/migration.toml", shards=8)

The connection comes from an Airflow connection id (the Postgres provider's conventions:
host, port, login, password, ``schema`` as the database name, libpq parameters such as
``sslmode`` in the extras) or a DSN, resolved inside each task, never stored in XCom.

Needs ``pip install 'copystream[airflow]'`` (``apache-airflow>=3``); importing this module
imports Airflow.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from psycopg.conninfo import make_conninfo

from .bulk.shards import plan_bulk_shards
from .errors import UsageError
from .shards import finish_shards, plan_shards, run_shard

try:
    from airflow.sdk import DAG, Connection, task
except ImportError as e:  # pragma: no cover - the extra is what makes this module usable
    raise ImportError(
        "copystream.airflow needs Airflow 3: pip install 'copystream[airflow]'"
    ) from e

__all__ = [
    "conninfo_for",
    "export_bulk_shards",
    "export_shards",
    "sharded_bulk_dag",
    "sharded_export_dag",
]

log = logging.getLogger("copystream")

#: libpq parameters an Airflow connection's extras may carry (the Postgres provider passes
#: its extras to the driver the same way); anything else in the extras is not libpq's.
_LIBPQ_EXTRAS = (
    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslcrl", "application_name",
    "connect_timeout", "options", "keepalives", "keepalives_idle", "target_session_attrs",
    "service", "sslpassword",
)  # fmt: skip


def conninfo_for(conn_id: str | None = None, dsn: str | None = None) -> str:
    """The libpq connection string of the Airflow connection ``conn_id``, or ``dsn`` itself.

    Exactly one of the two; ``dsn=""`` means the libpq environment of the worker.
    """
    if (conn_id is None) == (dsn is None):
        raise UsageError("give either an Airflow connection id or a DSN, not both or neither")
    if dsn is not None:
        return dsn
    c = Connection.get(conn_id)
    params: dict[str, Any] = {
        "host": c.host, "port": c.port, "dbname": c.schema, "user": c.login,
        "password": c.password,
    }  # fmt: skip
    extras = c.extra_dejson or {}
    params.update({k: extras[k] for k in _LIBPQ_EXTRAS if k in extras})
    return make_conninfo(**{k: v for k, v in params.items() if v not in (None, "")})


def export_shards(
    table: str,
    output: str,
    *,
    shards: int,
    conn_id: str | None = None,
    dsn: str | None = None,
    **options: Any,
) -> Any:
    """Add the tasks of a sharded export to the DAG being defined: ``plan`` →
    ``run_shard`` mapped over the shards → ``finish``. Returns the finish task's XComArg
    (the :class:`~copystream.ExportResult` as JSON). ``options`` are
    :func:`copystream.plan_shards`'s (JSON values)."""
    if (conn_id is None) == (dsn is None):  # found when the DAG is parsed, not when it runs
        raise UsageError("give either an Airflow connection id or a DSN, not both or neither")

    @task(task_id="plan")
    def plan() -> dict[str, Any]:
        conninfo = conninfo_for(conn_id, dsn)
        return plan_shards(conninfo, table, output, shards=shards, **options).to_json()

    @task(task_id="shards")
    def indexes(plan: dict[str, Any]) -> list[int]:
        return list(range(int(plan["shards"])))

    @task(task_id="run_shard")
    def run(plan: dict[str, Any], index: int) -> dict[str, Any]:
        return run_shard(plan, index, conninfo=conninfo_for(conn_id, dsn)).to_json()

    @task(task_id="finish")
    def finish(plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
        done = finish_shards(plan, conninfo=conninfo_for(conn_id, dsn)).to_json()
        done["shards"] = shards_done = list(results)
        log.info(
            "%s: %s rows in %d shards; seconds per shard: %s",
            done["table"], f"{done['rows']:,}", len(shards_done),
            ", ".join(f"{r['seconds']:.1f}" for r in shards_done),
        )  # fmt: skip
        return done

    planned = plan()
    results = run.partial(plan=planned).expand(index=indexes(planned))
    return finish(planned, results)


def sharded_export_dag(
    dag_id: str,
    *,
    table: str,
    output: str,
    shards: int,
    conn_id: str | None = None,
    dsn: str | None = None,
    retries: int = 3,
    retry_delay: dt.timedelta = dt.timedelta(minutes=1),
    schedule: Any = None,
    start_date: dt.datetime | None = None,
    **options: Any,
) -> Any:
    """A DAG that exports ``table`` to ``output`` in ``shards`` mapped tasks
    (:func:`export_shards`); every task retried ``retries`` times, ``retry_delay`` apart."""
    with _dag(dag_id, retries, retry_delay, schedule, start_date) as dag:
        export_shards(table, output, shards=shards, conn_id=conn_id, dsn=dsn, **options)
    return dag


def export_bulk_shards(plan: str, *, shards: int) -> Any:
    """Add the tasks of a bulk plan run as shards to the DAG being defined: ``plan``
    (:func:`copystream.plan_bulk_shards`: the tables in ``shards`` groups balanced by size,
    the large ones split into key ranges) → ``run_shard`` mapped over the groups → ``finish``
    (every table checked, the job report written). ``plan`` is the plan file's path, which
    every worker reads (it holds the DSNs; an Airflow connection id does not apply). Returns
    the finish task's XComArg (the :class:`~copystream.BulkResult` as JSON)."""

    @task(task_id="plan")
    def plan_task() -> dict[str, Any]:
        return plan_bulk_shards(plan, shards=shards).to_json()

    @task(task_id="shards")
    def indexes(planned: dict[str, Any]) -> list[int]:
        return list(range(int(planned["shards"])))

    @task(task_id="run_shard")
    def run(planned: dict[str, Any], index: int) -> dict[str, Any]:
        return run_shard(planned, index).to_json()

    @task(task_id="finish")
    def finish(planned: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
        done = finish_shards(planned).to_json()
        done["shards"] = shards_done = list(results)
        log.info(
            "%s: %d tables in %d shards; seconds per shard: %s", plan, len(done["tables"]),
            len(shards_done), ", ".join(f"{r['seconds']:.1f}" for r in shards_done),
        )  # fmt: skip
        return done

    planned = plan_task()
    results = run.partial(planned=planned).expand(index=indexes(planned))
    return finish(planned, results)


def sharded_bulk_dag(
    dag_id: str,
    *,
    plan: str,
    shards: int,
    retries: int = 3,
    retry_delay: dt.timedelta = dt.timedelta(minutes=1),
    schedule: Any = None,
    start_date: dt.datetime | None = None,
) -> Any:
    """A DAG that runs the bulk plan ``plan`` as ``shards`` mapped tasks
    (:func:`export_bulk_shards`); every task retried ``retries`` times, ``retry_delay`` apart."""
    with _dag(dag_id, retries, retry_delay, schedule, start_date) as dag:
        export_bulk_shards(plan, shards=shards)
    return dag


def _dag(
    dag_id: str,
    retries: int,
    retry_delay: dt.timedelta,
    schedule: Any,
    start_date: dt.datetime | None,
) -> Any:
    return DAG(
        dag_id,
        schedule=schedule,
        start_date=start_date or dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        default_args={"retries": retries, "retry_delay": retry_delay},
        tags=["copystream"],
    )
