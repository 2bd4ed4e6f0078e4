"""Ask the server about the relation to export: the I/O half of planning.

:func:`fetch_facts` reads what the catalog says about a relation into a
:class:`~copystream.table.TableFacts` (two queries: the name, then everything else);
:func:`introspect` runs the whole sequence — facts, the NULL checks the decisions ask for,
:func:`copystream.table.resolve`, then the checks of the filter and the COPY options that only the
server can make. Every query here is read-only and none reads more than it must: a NULL check
scans a view, so it runs only when :func:`~copystream.table.next_null_check` asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from .errors import InvalidFilter, Opt, TableNotFound, UsageError
from .parquet_types import ColumnType
from .queries import where_clause
from .retry import classify
from .server import name_errors_are_soft, not_null_sql
from .spec import CopyOptions
from .table import (
    IndexInfo,
    ResolvedTable,
    TableFacts,
    check_readable,
    next_null_check,
    resolve,
)

__all__ = [
    "check_filter",
    "check_options",
    "column_types",
    "fetch_facts",
    "introspect",
    "missing_table_problem",
]

_Conn = psycopg.Connection[tuple[object, ...]]

#: Everything about one relation (by oid) in one row. The lists come as JSON: PostgreSQL arrays
#: cannot hold rows, nor arrays of different lengths. Unique indexes are ordered primary key
#: first, then by number of columns, then by name: the order :func:`choose_key` prefers them in.
#: An expression column of a unique index has no name (null), which makes the index unusable; of
#: another index it is left out. The partition-tree sums are only computed for relkind 'p'.
#: ``{not_null}`` is what NOT NULL means on the server's version (:func:`~.server.not_null_sql`).
_FACTS_QUERY = """
SELECT n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname), c.relkind,
       c.reltuples::bigint, pg_table_size(c.oid), has_table_privilege(c.oid, 'SELECT'),
       (SELECT coalesce(json_agg(json_build_array(
                   a.attname, format_type(a.atttypid, a.atttypmod), {not_null})
                 ORDER BY a.attnum), '[]')
          FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
       (SELECT coalesce(json_agg(json_build_array(
                   ic.relname,
                   ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                         LEFT JOIN pg_attribute a
                           ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         WHERE k.ord <= i.indnkeyatts ORDER BY k.ord),
                   i.indisprimary,
                   i.indisvalid AND i.indpred IS NULL AND NOT (0 = ANY(i.indkey::int2[])))
                 ORDER BY NOT i.indisprimary, array_length(i.indkey::int2[], 1), ic.relname),
                 '[]')
          FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
          WHERE i.indrelid = c.oid AND i.indisunique),
       (SELECT coalesce(json_agg(
                   ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)), '[]')
          FROM pg_index i WHERE i.indrelid = c.oid AND i.indisvalid AND i.indpred IS NULL),
       EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = c.oid),
       tree.n_rows, tree.n_bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL (
    SELECT sum(GREATEST(p.reltuples, 0))::bigint AS n_rows,
           sum(pg_table_size(p.oid))::bigint AS n_bytes
    FROM pg_partition_tree(c.oid::regclass) t JOIN pg_class p ON p.oid = t.relid
    WHERE t.isleaf AND c.relkind = 'p') AS tree
WHERE c.oid = %s
"""


def introspect(
    conn: _Conn,
    table: str,
    *,
    key: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    options: CopyOptions | None = None,
) -> ResolvedTable:
    """Resolve ``table`` on the server (as psql would, honouring ``search_path``) and plan it.

    Raises :class:`TableNotFound`, :class:`KeyProblem`, :class:`InvalidFilter` or
    :class:`UsageError`. Runs only catalog reads, a check for NULLs in the key columns of a view,
    an ``EXPLAIN`` of the filter and, given ``options``, a ``COPY`` of no row with them.
    """
    facts = fetch_facts(conn, table)
    null_free = _null_free_columns(conn, facts, key)
    plan = resolve(facts, key=key, columns=columns, where=where, null_free_columns=null_free)
    if where is not None:
        check_filter(conn, plan)
    if options is not None:
        check_options(conn, plan, options)
    return plan


def fetch_facts(conn: _Conn, table: str) -> TableFacts:
    """What the catalog says about ``table`` (a name as psql takes it, honouring ``search_path``).

    Raises :class:`TableNotFound` for a malformed or unknown name or a relation that cannot be
    exported, :class:`UsageError` when the connecting role cannot SELECT from it.
    """
    try:
        row = conn.execute("SELECT to_regclass(%s)::oid", [table]).fetchone()
    except psycopg.errors.Error as e:  # e.g. a malformed name: too many dots, bad quoting
        conn.rollback()
        raise TableNotFound(f"{table!r} is not a valid table name: {e.diag.message_primary}") from e
    oid = row[0] if row else None
    if oid is None:
        raise TableNotFound(missing_table_problem(conn, table))
    query = sql.SQL(_FACTS_QUERY).format(not_null=not_null_sql(conn.info.server_version))
    info = conn.execute(query, [oid]).fetchone()
    assert info is not None
    facts = _facts_of_row(int(str(oid)), info)
    check_readable(facts)
    return facts


def missing_table_problem(conn: _Conn, table: str) -> str:
    """Why ``to_regclass(table)`` found nothing: a malformed name, or no such table.

    Up to PostgreSQL 15 a malformed name (``"unclosed``) makes ``to_regclass`` raise; from 16 it
    returns NULL as for a missing table, and ``pg_input_error_info`` tells the two apart.
    """
    if name_errors_are_soft(conn.info.server_version):
        row = conn.execute(
            "SELECT message, sql_error_code FROM pg_input_error_info(%s, 'regclass')", [table]
        ).fetchone()
        if row is not None and row[1] in ("42601", "42602"):  # syntax error, invalid name
            return f"{table!r} is not a valid table name: {row[0]}"
    return f"table {table} does not exist (or is not visible with the current search_path)"


def _facts_of_row(oid: int, row: tuple[object, ...]) -> TableFacts:
    schema, name, qualified, relkind, reltuples, relbytes, can_select = row[:7]
    attrs, uniques, indexes, has_children, tree_rows, tree_bytes = row[7:]
    assert isinstance(schema, str) and isinstance(name, str) and isinstance(qualified, str)
    assert isinstance(relkind, str) and isinstance(reltuples, int)
    assert isinstance(attrs, list) and isinstance(uniques, list) and isinstance(indexes, list)
    return TableFacts(
        oid=oid,
        schema=schema,
        name=name,
        qualified=qualified,
        relkind=relkind,
        reltuples=reltuples,
        relbytes=relbytes if isinstance(relbytes, int) else None,
        can_select=bool(can_select),
        attributes=tuple((str(a[0]), str(a[1]), bool(a[2])) for a in attrs),
        unique_indexes=tuple(
            IndexInfo(str(r[0]), tuple(str(c) for c in r[1]), bool(r[2]), bool(r[3]))
            for r in uniques
        ),
        index_columns=tuple(tuple(str(c) for c in r) for r in indexes),
        has_children=bool(has_children),
        partition_rows=None if tree_rows is None else int(str(tree_rows)),
        partition_bytes=None if tree_rows is None else int(str(tree_bytes)),
    )


def _null_free_columns(
    conn: _Conn, facts: TableFacts, key: Sequence[str] | None
) -> set[tuple[str, ...]]:
    """Run the NULL checks :func:`next_null_check` asks for; the column sets that hold none."""
    table = sql.Identifier(facts.schema, facts.name)
    checked: dict[tuple[str, ...], bool] = {}
    while (columns := next_null_check(facts, key=key, checked=checked)) is not None:
        checked[columns] = not _has_null_keys(conn, table, columns)
    return {c for c, free in checked.items() if free}


def _has_null_keys(conn: _Conn, table: sql.Identifier, columns: Sequence[str]) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
        table,
        sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in columns),
    )
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        row = conn.execute(query).fetchone()
    return bool(row and row[0])


def check_filter(conn: _Conn, plan: ResolvedTable) -> None:
    """Reject a filter that is not valid SQL for this table (EXPLAIN only; nothing runs).

    The EXPLAIN goes through the extended query protocol, which refuses more than one
    statement, so a filter cannot smuggle a second command in (``true); COMMIT; DROP ...``).
    psycopg uses the simple protocol, which runs any number of statements, for a query without
    parameters unless binary results are asked for: hence ``binary=True``.
    """
    query = sql.SQL("EXPLAIN SELECT 1 FROM {}{}").format(plan.table_ident, where_clause(plan))
    # The chunks wrap the filter in parentheses and AND it with the key range. A filter that
    # closes them itself ("a = 1) OR (a > 0") would OR the key range away and export the same
    # rows forever; here, with no parentheses around it, such a filter is a syntax error.
    bare = sql.SQL("EXPLAIN SELECT 1 FROM {} WHERE CASE WHEN {} THEN true END").format(
        plan.table_ident, sql.SQL(plan.where or "true")
    )
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute(query, binary=True)
            conn.execute(bare, binary=True)
    except psycopg.errors.Error as e:
        if classify(e) is not None:
            raise  # a lost connection, not a bad filter: the caller retries
        msg = e.diag.message_primary or str(e).splitlines()[0]
        raise InvalidFilter(["invalid ", Opt("where"), f" filter {plan.where!r}: {msg}"]) from e


def check_options(conn: _Conn, plan: ResolvedTable, options: CopyOptions) -> None:
    """Reject COPY options the server refuses before any file exists (``LIMIT 0``: no row read).

    A two-byte delimiter, a quote in text format, a FORCE_QUOTE column that is not exported or
    an unknown encoding would otherwise fail the first chunk as if it were resumable.
    """
    query = sql.SQL("COPY (SELECT {} FROM {} LIMIT 0) TO STDOUT {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in plan.columns),
        plan.table_ident,
        options.compose(header=options.header),
    )
    try:
        with conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            with conn.cursor().copy(query) as copy:
                for _ in copy:
                    pass
    except psycopg.Error as e:
        if classify(e) is not None:
            raise  # a lost connection, not a bad option: the caller retries
        msg = e.diag.message_primary or str(e).splitlines()[0]
        raise UsageError(f"invalid output options for {plan.qualified}: {msg}") from e


#: The type of each column, a domain's resolved to its base type (one level: a domain over a
#: domain is written by the outer domain's base, the commonest case by far).
_TYPES_QUERY = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), b.typname, b.typcategory,
       CASE WHEN t.typtype = 'd' THEN t.typtypmod ELSE a.atttypmod END, e.typname
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_type b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
LEFT JOIN pg_type e ON e.oid = b.typelem AND b.typcategory = 'A'
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
"""


def column_types(conn: _Conn, table: ResolvedTable) -> list[ColumnType]:
    """What the catalog says of the type of each exported column, in the export's order."""
    found = {
        str(r[0]): ColumnType(str(r[0]), str(r[1]), str(r[2]), str(r[3]), int(str(r[4])),
                              None if r[5] is None else str(r[5]))
        for r in conn.execute(_TYPES_QUERY, [table.oid]).fetchall()
    }  # fmt: skip
    return [found[c] for c in table.columns]
