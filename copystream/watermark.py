"""Watermark increments (``watermark``): the decisions and the SQL, composed with
:mod:`psycopg.sql` only. Pure: no I/O.

A watermark export pages the table by ``(watermark, key)`` — the change-tracking column first,
so rows that tie on it are ordered by the key and never lost at a chunk boundary — and records
two things read from the server as it starts, before its first chunk: the server's clock
(``started``) and the age of the oldest transaction open in the database (``lag_seconds``). A
transaction that commits after the export read past its rows carries a watermark no older than
its own start (when the watermark is set from the server's ``now()``), and it either was open at
``started`` (so it started at most ``lag_seconds`` before) or started after. So the next
increment exports every row whose watermark is at least ``started - lag_seconds``: the rows of
late commits are in it, and rows already exported may be again (the *overlap*, counted and
reported: the loader must upsert by key). Rows deleted are never seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import sql

from .errors import KeyProblem, UsageError
from .manifest import Manifest
from .table import ResolvedTable

__all__ = [
    "TYPES",
    "after_query",
    "check_type",
    "index_warning",
    "lower_bound_query",
    "mark",
    "measure_query",
    "overlap_query",
    "previous_mark",
    "watermark_key",
]

#: Types a watermark column may have: a point in time, comparable with the server's clock.
TYPES = ("timestamp with time zone",)


def watermark_key(column: str, key: Sequence[str]) -> tuple[str, ...]:
    """The columns that page a watermark export: the watermark, then the table's key."""
    return (column, *(c for c in key if c != column))


def check_type(table: ResolvedTable) -> None:
    """Refuse a watermark column that is not a point in time."""
    if table.key_types[0] not in TYPES:
        raise KeyProblem(
            f"watermark column {table.key[0]!r} of {table.qualified} is "
            f"{table.key_types[0]}; it must be a timestamp with time zone (timestamptz)"
        )


def index_warning(table: ResolvedTable, indexes: Sequence[Sequence[str]]) -> str | None:
    """The warning for a watermark column that no index starts with (every chunk of every
    increment would scan the table), as for a key."""
    if any(ix and ix[0] == table.key[0] for ix in indexes):
        return None
    return (
        f"no index starts with the key ({', '.join(table.key)}) of {table.qualified}: every "
        f"chunk will scan the table; create an index on ({', '.join(table.key)})"
    )


def previous_mark(previous: Manifest, column: str, lag: float | None) -> tuple[str, float]:
    """The server time and safety lag the increment after ``previous`` starts from: rows whose
    watermark is at least ``started - lag``. ``lag`` (seconds) replaces the measured one."""
    mark = previous.watermark
    if mark is None:
        raise UsageError(
            f"the export after which the increment comes was not a watermark export (of "
            f"{column})"
        )
    if mark["column"] != column:
        raise UsageError(
            f"the export after which the increment comes tracked {mark['column']!r}, not "
            f"{column!r}"
        )
    return str(mark["started"]), float(mark["lag_seconds"] if lag is None else lag)


def measure_query() -> sql.Composed:
    """The server's clock (ISO 8601, UTC), the age in seconds of the oldest transaction open in
    this database by another session, and how many sessions' transactions this role may not
    see (``pg_stat_activity`` hides them without ``pg_read_all_stats``)."""
    return sql.SQL(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00\"'), "
        "coalesce(extract(epoch FROM clock_timestamp() - min(xact_start)), 0)::float8, "
        "count(*) FILTER (WHERE query = '<insufficient privilege>') "
        "FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).format()


def lower_bound_query(started: str, lag: float) -> sql.Composed:
    """``started - lag`` as the server's text of a timestamptz (under the pinned settings)."""
    return sql.SQL("SELECT ({}::timestamptz - make_interval(secs => {}))::text").format(
        sql.Literal(started), sql.Literal(lag)
    )


def _key_row(plan: ResolvedTable) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in plan.key))


def _filter(plan: ResolvedTable) -> sql.Composable:
    if plan.where is None:
        return sql.SQL("")
    return sql.SQL(" AND ({})").format(sql.SQL(plan.where))  # the user's own SQL filter


def after_query(plan: ResolvedTable, lower: str) -> sql.Composed:
    """The greatest ``(watermark, key)`` (as text) whose watermark is before ``lower``: the rows
    after it are those whose watermark is at least ``lower``. NULL when there is none."""
    keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in plan.key)
    order = sql.SQL(", ").join(sql.SQL("{} DESC").format(sql.Identifier(c)) for c in plan.key)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in plan.key)
    return sql.SQL(
        "SELECT (SELECT ARRAY[{keys}] FROM (SELECT {cols} FROM {table} WHERE {wm} < {lower}"
        "{filter} ORDER BY {order} LIMIT 1) AS s)"
    ).format(
        keys=keys, cols=cols, table=plan.table_ident, wm=sql.Identifier(plan.key[0]),
        lower=sql.Literal(lower), filter=_filter(plan), order=order,
    )  # fmt: skip


def _values(values: Sequence[str]) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in values))


def overlap_query(
    plan: ResolvedTable, after: Sequence[str] | None, upto: Sequence[str]
) -> sql.Composed:
    """How many rows after ``after`` (exclusive) are at most ``upto``: the rows of the increment
    that the previous export's key range already covered."""
    conds: list[sql.Composable] = [sql.SQL("{} <= {}").format(_key_row(plan), _values(upto))]
    if after is not None:
        conds.append(sql.SQL("{} > {}").format(_key_row(plan), _values(after)))
    return sql.SQL("SELECT count(*) FROM {table} WHERE {conds}{filter}").format(
        table=plan.table_ident, conds=sql.SQL(" AND ").join(conds), filter=_filter(plan)
    )


def mark(
    column: str, measured: Sequence[Any], lower: str | None, after: Sequence[str] | None,
    overlap: int,
) -> dict[str, Any]:  # fmt: skip
    """What a watermark export records (``watermark`` in its checkpoint and manifest)."""
    started, lag, hidden = measured
    return {
        "column": column,
        "started": str(started),
        "lag_seconds": round(float(lag), 6),
        "hidden_sessions": int(hidden),
        "from": lower,
        "after": list(after) if after is not None else None,
        "overlap_rows": overlap,
    }
