"""Ask the server about the relation to export: the I/O half of planning.

:func:`fetch_facts` reads what the catalog says about a relation into a
:class:`~copystream.table.TableFacts` (the name, then its relation, columns and indexes);
:func:`fetch_facts_many` the same for any number of relations in as many queries;
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
from .spec import CopyOptions, ExportSpec
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
    "fetch_facts_many",
    "introspect",
    "introspect_many",
    "missing_table_problem",
]

_Conn = psycopg.Connection[tuple[object, ...]]

#: The relations themselves, one row each. ``@SIZE@`` and ``@TREE@`` (the sums over a partitioned
#: table's leaves, computed for relkind 'p' only) are filled in by the two variants below.
_RELATIONS = """
SELECT c.oid::bigint, n.nspname, c.relname, format('%I.%I', n.nspname, c.relname), c.relkind,
       c.reltuples::bigint, @SIZE@, has_table_privilege(c.oid, 'SELECT'),
       EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = c.oid), tree.n_rows, tree.n_bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_class toast ON toast.oid = c.reltoastrelid
CROSS JOIN LATERAL (@TREE@) AS tree
WHERE c.oid = ANY({oids})
"""

#: Sized from the files (``pg_table_size``, ``pg_partition_tree``): exact, but each relation is
#: locked for the statement. For the one relation of a single export.
_RELATIONS_EXACT = _RELATIONS.replace("@SIZE@", "pg_table_size(c.oid)").replace(
    "@TREE@",
    """
    SELECT sum(GREATEST(p.reltuples, 0))::bigint AS n_rows,
           sum(pg_table_size(p.oid))::bigint AS n_bytes
    FROM pg_partition_tree(c.oid::regclass) t JOIN pg_class p ON p.oid = t.relid
    WHERE t.isleaf AND c.relkind = 'p'""",
)

#: Sized by the planner's page counts (heap and TOAST) instead: no lock taken, so thousands of
#: tables neither exhaust the lock table nor wait behind one under ALTER TABLE. For bulk jobs.
_RELATIONS_ESTIMATED = _RELATIONS.replace(
    "@SIZE@",
    "(c.relpages::bigint + COALESCE(toast.relpages, 0)) * current_setting('block_size')::bigint",
).replace(
    "@TREE@",
    """
    WITH RECURSIVE t(relid) AS (
        SELECT c.oid
        UNION ALL
        SELECT i.inhrelid FROM t JOIN pg_inherits i ON i.inhparent = t.relid)
    SELECT sum(GREATEST(p.reltuples, 0))::bigint AS n_rows,
           (sum(p.relpages::bigint + COALESCE(pt.relpages, 0))
               * current_setting('block_size')::bigint)::bigint AS n_bytes
    FROM t JOIN pg_class p ON p.oid = t.relid LEFT JOIN pg_class pt ON pt.oid = p.reltoastrelid
    WHERE p.relkind <> 'p' AND c.relkind = 'p'""",
)

#: Their columns, in table order. ``{not_null}`` is what NOT NULL means on the server's version
#: (:func:`~copystream.server.not_null_sql`).
_ATTRIBUTES = """
SELECT a.attrelid::bigint, a.attname, format_type(a.atttypid, a.atttypmod), {not_null}
FROM pg_attribute a
WHERE a.attrelid = ANY({oids}) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

#: Their indexes: name, key column names (an expression column has none: null), unique,
#: primary, valid and not partial, has an expression column, number of columns (INCLUDE too),
#: a B-tree (the only kind that hands rows over in key order: GIN, GiST, BRIN or hash cannot
#: serve ``ORDER BY key LIMIT n``).
_INDEXES = """
SELECT i.indrelid::bigint, ic.relname,
       ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
             LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.ord <= i.indnkeyatts ORDER BY k.ord),
       i.indisunique, i.indisprimary, i.indisvalid AND i.indpred IS NULL,
       0 = ANY(i.indkey::int2[]), array_length(i.indkey::int2[], 1), am.amname = 'btree'
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
WHERE i.indrelid = ANY({oids})
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
    an ``EXPLAIN`` of the filter and, given ``options`` other than plain CSV, a ``COPY`` of no
    row with them.
    """
    facts = fetch_facts(conn, table)
    null_free = _null_free_columns(conn, facts, key)
    plan = resolve(facts, key=key, columns=columns, where=where, null_free_columns=null_free)
    if where is not None:
        check_filter(conn, plan)
    if options is not None and options != CopyOptions():  # plain CSV: nothing to refuse
        check_options(conn, plan, options)
    return plan


def introspect_many(
    conn: _Conn, wanted: Sequence[tuple[int, ExportSpec]]
) -> list[ResolvedTable | UsageError]:
    """:func:`introspect` for many relations (by oid) at once: each one's plan, or why not.

    One query reads the facts of all of them (:func:`fetch_facts_many`: no lock, the planner's
    sizes); the pure :func:`~copystream.table.resolve` decides each. Only what needs a server
    answer of its own runs per table: the NULL checks of a view's key, the ``EXPLAIN`` of a
    filter, and the check of non-default COPY options (once per distinct options, unless they
    name columns). A table's usage error is its own entry in the result; a psycopg error (the
    connection lost) is raised.
    """
    facts = fetch_facts_many(conn, [oid for oid, _ in wanted])
    out: list[ResolvedTable | UsageError] = []
    for oid, spec in wanted:
        f = facts.get(oid)
        if f is None:
            out.append(TableNotFound(f"table {spec.table} does not exist any more"))
            continue
        try:
            null_free = _null_free_columns(conn, f, spec.key)
            plan = resolve(
                f, key=spec.key, columns=spec.columns, where=spec.where, null_free_columns=null_free
            )
            if plan.where is not None:
                check_filter(conn, plan)
        except UsageError as e:
            out.append(e)
            continue
        out.append(plan)
    return _check_options_once(conn, out, [spec.options for _, spec in wanted])


def _check_options_once(
    conn: _Conn, plans: list[ResolvedTable | UsageError], options: Sequence[CopyOptions]
) -> list[ResolvedTable | UsageError]:
    """:func:`check_options` for each plan, run once per distinct options: whether the server
    takes them depends on the table only through the columns ``force_quote`` names. PostgreSQL's
    plain CSV (the default) needs no check."""
    verdicts: dict[CopyOptions, psycopg.Error | None] = {}
    out = list(plans)
    for i, (plan, opts) in enumerate(zip(plans, options, strict=True)):
        if isinstance(plan, UsageError) or opts == CopyOptions():
            continue
        shared = isinstance(opts.force_quote, bool) or not opts.force_quote
        if not shared or opts not in verdicts:
            verdict = _options_refusal(conn, plan, opts)
            if shared:
                verdicts[opts] = verdict
        else:
            verdict = verdicts[opts]
        if verdict is not None:
            why = f"invalid output options for {plan.qualified}: {_primary(verdict)}"
            out[i] = UsageError(why)
    return out


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
    facts = _fetch(conn, [int(str(oid))], _RELATIONS_EXACT)
    if not facts:  # dropped just now
        raise TableNotFound(f"table {table} does not exist")
    found = next(iter(facts.values()))
    check_readable(found)
    return found


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


def fetch_facts_many(conn: _Conn, oids: Sequence[int]) -> dict[int, TableFacts]:
    """What the catalog says about each relation of ``oids``: three queries however many there
    are (relations, columns, indexes), and no lock taken.

    The sizes are the planner's (pages counted by the last VACUUM or ANALYZE), not the files'.
    A relation that no longer exists is left out; one that cannot be exported is not refused
    here (:func:`~copystream.table.resolve` refuses it).
    """
    return _fetch(conn, oids, _RELATIONS_ESTIMATED)


def _fetch(conn: _Conn, oids: Sequence[int], relations: str) -> dict[int, TableFacts]:
    """The facts of ``oids``, their relations read by the query ``relations``."""
    ids = sql.SQL("{}::oid[]").format(sql.Literal([int(o) for o in oids]))
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        # Costed as big queries, catalog joins over thousands of tables would be JIT-compiled
        # first: far slower than running them.
        conn.execute("SET LOCAL jit = off")
        rels = conn.execute(sql.SQL(relations).format(oids=ids)).fetchall()
        never_null = not_null_sql(conn.info.server_version)
        attrs = conn.execute(sql.SQL(_ATTRIBUTES).format(oids=ids, not_null=never_null)).fetchall()
        indexes = conn.execute(sql.SQL(_INDEXES).format(oids=ids)).fetchall()
    columns: dict[int, list[tuple[str, str, bool]]] = {}
    for relid, name, type_, not_null in attrs:
        columns.setdefault(int(str(relid)), []).append((str(name), str(type_), bool(not_null)))
    by_rel: dict[int, list[tuple[object, ...]]] = {}
    for row in indexes:
        by_rel.setdefault(int(str(row[0])), []).append(row[1:])
    return {
        int(str(r[0])): _facts_of_row(
            r, columns.get(int(str(r[0])), []), by_rel.get(int(str(r[0])), [])
        )
        for r in rels
    }


def _facts_of_row(
    row: tuple[object, ...],
    attributes: list[tuple[str, str, bool]],
    indexes: list[tuple[object, ...]],
) -> TableFacts:
    oid, schema, name, qualified, relkind, reltuples, relbytes, can_select = row[:8]
    has_children, tree_rows, tree_bytes = row[8:]
    assert isinstance(schema, str) and isinstance(name, str) and isinstance(qualified, str)
    assert isinstance(relkind, str) and isinstance(reltuples, int)
    return TableFacts(
        oid=int(str(oid)),
        schema=schema,
        name=name,
        qualified=qualified,
        relkind=relkind,
        reltuples=reltuples,
        relbytes=relbytes if isinstance(relbytes, int) else None,
        can_select=bool(can_select),
        attributes=tuple(attributes),
        unique_indexes=_unique_indexes(indexes),
        index_columns=tuple(
            _leading_columns(cols)
            for _, cols, _, _, usable, _, _, btree in _rows(indexes)
            if usable and btree
        ),
        has_children=bool(has_children),
        partition_rows=None if tree_rows is None else int(str(tree_rows)),
        partition_bytes=None if tree_rows is None else int(str(tree_bytes)),
    )


def _leading_columns(columns: list[object]) -> tuple[str, ...]:
    """An index's key columns up to its first expression column (``None``): the ones it orders
    rows by as plain columns. Pure."""
    leading: list[str] = []
    for c in columns:
        if c is None:
            break
        leading.append(str(c))
    return tuple(leading)


def _rows(
    indexes: list[tuple[object, ...]],
) -> list[tuple[str, list[object], bool, bool, bool, bool, int, bool]]:
    """The index rows of :data:`_INDEXES`, typed."""
    return [
        (
            str(n),
            list(c) if isinstance(c, list) else [],
            bool(u),
            bool(p),
            bool(v),
            bool(x),
            int(str(k)),
            bool(b),
        )
        for n, c, u, p, v, x, k, b in indexes
    ]


def _unique_indexes(indexes: list[tuple[object, ...]]) -> tuple[IndexInfo, ...]:
    """The unique indexes, primary key first, then by number of columns, then by name: the order
    :func:`~copystream.table.choose_key` prefers them in. One with an expression column is not
    usable."""
    unique = sorted((r for r in _rows(indexes) if r[2]), key=lambda r: (not r[3], r[6], r[0]))
    return tuple(
        IndexInfo(name, tuple(str(c) for c in cols), primary, valid and not expression)
        for name, cols, _, primary, valid, expression, _, _ in unique
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
    refusal = _options_refusal(conn, plan, options)
    if refusal is not None:
        raise UsageError(
            f"invalid output options for {plan.qualified}: {_primary(refusal)}"
        ) from refusal


def _primary(e: psycopg.Error) -> str:
    return e.diag.message_primary or str(e).splitlines()[0]


def _options_refusal(
    conn: _Conn, plan: ResolvedTable, options: CopyOptions
) -> psycopg.Error | None:
    """The server's refusal of ``options`` for ``plan`` (``None``: it takes them)."""
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
        return e
    return None


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
