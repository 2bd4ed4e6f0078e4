"""The SQL a chunk runs, composed with :mod:`psycopg.sql` only. Pure: no I/O.

Every function takes the :class:`~copystream.table.ResolvedTable` and returns a composed
statement; the key values travel as literals, identifiers as quoted identifiers, and the user's
``--where`` filter (already checked by :func:`copystream.catalog.check_filter`) in parentheses.

Keyset pagination: chunk *i* covers the rows whose key is greater than the last key of chunk
*i-1* and at most the chunk's *bound* — the key of its *n*-th row, found in the chunk's own
snapshot before the COPY. Because the COPY is bounded by ``key <= bound`` (not only by ``LIMIT``),
rows that tie on a non-unique key all fall in the same chunk and none is lost or repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql

from .spec import CopyOptions
from .table import ResolvedTable

__all__ = [
    "binary_query",
    "bound_query",
    "copy_query",
    "key_columns",
    "key_text",
    "last_key_query",
    "single_copy_query",
    "where_clause",
]


def _key_list(plan: ResolvedTable, *, desc: bool = False, bare: bool = False) -> sql.Composed:
    if bare:
        return sql.SQL(", ").join(sql.Identifier(c) for c in plan.key)
    suffix = sql.SQL(" DESC") if desc else sql.SQL("")
    return sql.SQL(", ").join(sql.Composed([sql.Identifier(c), suffix]) for c in plan.key)


def _key_row(plan: ResolvedTable) -> sql.Composable:
    if len(plan.key) == 1:
        return sql.Identifier(plan.key[0])
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Identifier(c) for c in plan.key))


def _value_row(values: Sequence[str]) -> sql.Composable:
    # Key values travel as PostgreSQL's own text form in untyped literals; the server coerces
    # them to the key columns' types, so nothing is rounded, shifted or normalised on the way.
    if len(values) == 1:
        return sql.Literal(values[0])
    return sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(v) for v in values))


def _conditions(
    plan: ResolvedTable, after: Sequence[str] | None, upto: Sequence[str] | None
) -> sql.Composable:
    conds: list[sql.Composable] = []
    if after is not None:
        conds.append(sql.SQL("{} > {}").format(_key_row(plan), _value_row(after)))
    if upto is not None:
        conds.append(sql.SQL("{} <= {}").format(_key_row(plan), _value_row(upto)))
    if plan.where is not None:
        conds.append(sql.SQL("({})").format(sql.SQL(plan.where)))  # the user's own SQL filter
    if not conds:
        return sql.SQL("")
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)


def key_columns(plan: ResolvedTable) -> sql.Composed:
    """The key columns as a comma-separated identifier list."""
    return _key_list(plan, bare=True)


def where_clause(plan: ResolvedTable, after: Sequence[str] | None = None) -> sql.Composable:
    """`` WHERE (filter)`` (and the key after ``after``) or nothing."""
    return _conditions(plan, after, None)


def key_text(plan: ResolvedTable) -> sql.Composed:
    """The key columns cast to text (their exact PostgreSQL text form)."""
    return _key_text(plan)


def _key_text(plan: ResolvedTable) -> sql.Composed:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in plan.key)


def bound_query(
    plan: ResolvedTable, after: Sequence[str] | None, rows: int, until: Sequence[str] | None = None
) -> sql.Composed:
    """The key (as text) of the ``rows``-th row after ``after`` (and at most ``until``).

    No row comes back when fewer rows remain: the chunk is the last of its range.
    """
    skip = sql.SQL(" OFFSET {} LIMIT 1) AS bound").format(sql.Literal(rows - 1))
    return _one_key(plan, after, until, desc=False, tail=skip)


def last_key_query(
    plan: ResolvedTable, after: Sequence[str] | None, until: Sequence[str] | None = None
) -> sql.Composed:
    """The greatest key (as text) after ``after`` and at most ``until``: the final chunk's last."""
    return _one_key(plan, after, until, desc=True, tail=sql.SQL(" LIMIT 1) AS last"))


def _one_key(
    plan: ResolvedTable,
    after: Sequence[str] | None,
    until: Sequence[str] | None,
    *,
    desc: bool,
    tail: sql.Composable,
) -> sql.Composed:
    """``SELECT <key as text> FROM (SELECT <key> ... ORDER BY <key> [DESC]<tail>``."""
    # The text cast happens outside: "ORDER BY id" next to "id::text" would sort by the text.
    query = "SELECT {keys} FROM (SELECT {cols} FROM {table}{where} ORDER BY {order}{tail}"
    return sql.SQL(query).format(
        keys=_key_text(plan),
        cols=_key_list(plan, bare=True),
        table=plan.table_ident,
        where=_conditions(plan, after, until),
        order=_key_list(plan, desc=desc),
        tail=tail,
    )


def copy_query(
    plan: ResolvedTable,
    options: CopyOptions,
    *,
    after: Sequence[str] | None,
    upto: Sequence[str] | None,
    limit: int | None,
    header: bool,
) -> sql.Composed:
    """The chunk's COPY statement.

    ``COPY (SELECT cols FROM t WHERE key > after AND key <= upto ORDER BY key [LIMIT n]) TO STDOUT``
    """
    select = sql.SQL("SELECT {cols} FROM {table}{where} ORDER BY {order}").format(
        cols=sql.SQL(", ").join(plan.select or [sql.Identifier(c) for c in plan.columns]),
        table=plan.table_ident,
        where=_conditions(plan, after, upto),
        order=_key_list(plan),
    )
    if limit is not None and plan.key_unique:
        # Redundant with the bound, but it steers the planner to the key's index scan.
        select = select + sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    return sql.SQL("COPY ({}) TO STDOUT {}").format(select, options.compose(header=header))


def single_copy_query(plan: ResolvedTable, options: CopyOptions) -> sql.Composed:
    """The whole table in key order, in one COPY (what ``psql \\copy`` would run)."""
    return copy_query(plan, options, after=None, upto=None, limit=None, header=options.header)


def binary_query(
    plan: ResolvedTable,
    *,
    after: Sequence[str] | None,
    upto: Sequence[str] | None,
    limit: int | None,
) -> sql.Composed:
    """The chunk's SELECT on the binary path (a Parquet export read by ADBC, which runs it as
    ``COPY (…) TO STDOUT (FORMAT binary)``): ``plan.binary``'s list, the key as text last.

    ``SELECT cols, key::text FROM t WHERE key > after AND key <= upto ORDER BY key [LIMIT n]``
    """
    assert plan.binary is not None
    select = sql.SQL("SELECT {cols} FROM {table}{where} ORDER BY {order}").format(
        cols=sql.SQL(", ").join(plan.binary.select),
        table=plan.table_ident,
        where=_conditions(plan, after, upto),
        # qualified: the key's text column shares its name, and ORDER BY reads a bare name as
        # an output column's first
        order=sql.SQL(", ").join(sql.Identifier(plan.schema, plan.name, c) for c in plan.key),
    )
    if limit is not None:
        select = select + sql.SQL(" LIMIT {}").format(sql.Literal(limit))
    return select
