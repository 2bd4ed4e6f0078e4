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

The column's type decides what the bound is (:func:`kind`, :func:`lower_bound_query`):

* ``timestamptz``: the server's clock less the lag, as above.
* ``timestamp`` (without time zone): the same instant, as the local time of the ``TimeZone`` the
  first export pinned (what ``localtimestamp`` said in that session): the column must hold local
  times of that zone (``DEFAULT localtimestamp``, or ``now()`` under the same ``TimeZone``).
* ``date``: the day of that local time: every row of that day is exported again.
* an integer or ``numeric`` counter (a ``version`` bumped from a sequence): no clock; the export
  records the column's greatest value as it starts (``started``), and the next increment takes
  the rows whose value is at least that less the lag, *counted in the column's own units*
  (default 0: a transaction open at the start that commits a smaller value later is missed
  unless the lag covers the values handed out meanwhile; the export warns when one was open).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from psycopg import sql

from .errors import KeyProblem, UsageError
from .manifest import Manifest
from .table import ResolvedTable

__all__ = [
    "COUNTER",
    "TYPES",
    "after_query",
    "check_type",
    "index_warning",
    "kind",
    "lower_bound_query",
    "mark",
    "measure_query",
    "overlap_query",
    "previous_mark",
    "watermark_key",
]

#: The kinds of watermark column, by the type ``format_type`` names (:func:`kind`): a point in
#: time, read against the server's clock, or a counter, read against its own greatest value.
TYPES = {
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "date": "date",
    "smallint": "integer",
    "integer": "integer",
    "bigint": "integer",
    "numeric": "numeric",
}

#: The kinds whose bound is a value of the column, not the server's clock.
COUNTER = frozenset({"integer", "numeric"})


def kind(type_name: str) -> str | None:
    """The kind of watermark a column of type ``type_name`` is (``None``: it cannot be one);
    ``numeric(12,2)`` is a ``numeric``, ``timestamp(3) with time zone`` a ``timestamptz``."""
    base = re.sub(r"\(\d+(,\d+)?\)", "", type_name)
    return TYPES.get(base)


def watermark_key(column: str, key: Sequence[str]) -> tuple[str, ...]:
    """The columns that page a watermark export: the watermark, then the table's key."""
    return (column, *(c for c in key if c != column))


def check_type(table: ResolvedTable) -> None:
    """Refuse a watermark column that is neither a point in time nor a counter."""
    if kind(table.key_types[0]) is None:
        raise KeyProblem(
            f"watermark column {table.key[0]!r} of {table.qualified} is "
            f"{table.key_types[0]}; it must be a timestamp with time zone (timestamptz), a "
            "timestamp, a date, an integer or a numeric"
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


def previous_mark(
    previous: Manifest, column: str, lag: float | None
) -> tuple[str | None, float]:
    """Where the increment after ``previous`` starts from: rows whose watermark is at least
    ``started - lag``. ``started`` is the server's time (a counter's: its greatest value then,
    ``None`` when the table had no row); ``lag`` replaces the measured one (seconds; a
    counter's: in its own units, 0 by default)."""
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
    if mark.get("kind", "timestamptz") in COUNTER:
        started = mark["started"]
        return (None if started is None else str(started)), float(lag or 0)
    return str(mark["started"]), float(mark["lag_seconds"] if lag is None else lag)


def measure_query(plan: ResolvedTable) -> sql.Composed:
    """The server's clock (ISO 8601, UTC), the age in seconds of the oldest transaction open in
    this database by another session, how many sessions' transactions this role may not see
    (``pg_stat_activity`` hides them without ``pg_read_all_stats``), and for a counter
    watermark its greatest value (as text; NULL for a point in time, or no row)."""
    greatest: sql.Composable = sql.SQL("NULL::text")
    if kind(plan.key_types[0]) in COUNTER:
        greatest = sql.SQL("(SELECT max({wm})::text FROM {table} WHERE true{filter})").format(
            wm=sql.Identifier(plan.key[0]), table=plan.table_ident, filter=_filter(plan)
        )
    return sql.SQL(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', "
        "'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00\"'), "
        "coalesce(extract(epoch FROM clock_timestamp() - min(xact_start)), 0)::float8, "
        "count(*) FILTER (WHERE query = '<insufficient privilege>'), {greatest} "
        "FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
    ).format(greatest=greatest)


#: The bound of each kind, from ``{started}`` and ``{lag}``: a time as the local time of the
#: session's (pinned) TimeZone for a column without one; a counter's rounded up for integers
#: (``n >= 94.5`` is ``n >= 95``, and 95 is a value the column's type reads).
_BOUNDS = {
    "timestamptz": "({started}::timestamptz - make_interval(secs => {lag}))",
    "timestamp": "(({started}::timestamptz - make_interval(secs => {lag})) AT TIME ZONE "
    "current_setting('TimeZone'))",
    "date": "(({started}::timestamptz - make_interval(secs => {lag})) AT TIME ZONE "
    "current_setting('TimeZone'))::date",
    "integer": "ceil({started}::numeric - {lag})",
    "numeric": "({started}::numeric - {lag})",
}


def lower_bound_query(kind_: str, started: str, lag: float) -> sql.Composed:
    """``started - lag`` as the server's text of a value of the watermark's kind (under the
    pinned settings): the least watermark the increment exports."""
    bound = sql.SQL(_BOUNDS[kind_]).format(started=sql.Literal(started), lag=sql.Literal(lag))
    return sql.SQL("SELECT {}::text").format(bound)


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
    overlap: int, *, kind_: str = "timestamptz",
) -> dict[str, Any]:  # fmt: skip
    """What a watermark export records (``watermark`` in its checkpoint and manifest): for a
    counter, ``started`` is its greatest value as the export started (``None``: no row)."""
    clock, lag, hidden = measured[:3]
    started = measured[3] if kind_ in COUNTER else clock
    return {
        "column": column,
        "kind": kind_,
        "started": None if started is None else str(started),
        "lag_seconds": round(float(lag), 6),
        "hidden_sessions": int(hidden),
        "from": lower,
        "after": list(after) if after is not None else None,
        "overlap_rows": overlap,
    }
