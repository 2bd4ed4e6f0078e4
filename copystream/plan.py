"""Plan an export: resolve the table, choose the key, compose every query a chunk runs.

Two halves. :func:`introspect` asks the server (one connection, read-only queries) what the table
looks like. Everything else here is pure: :func:`choose_key` decides which columns page the table,
and the ``*_query`` functions compose the SQL of a chunk with :mod:`psycopg.sql` only.

Keyset pagination: chunk *i* covers the rows whose key is greater than the last key of chunk
*i-1* and at most the chunk's *bound* — the key of its *n*-th row, found in the chunk's own
snapshot before the COPY. Because the COPY is bounded by ``key <= bound`` (not only by ``LIMIT``),
rows that tie on a non-unique key all fall in the same chunk and none is lost or repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .errors import InvalidFilter, KeyProblem, TableNotFound, UsageError
from .retry import classify
from .spec import CopyOptions

__all__ = [
    "IndexInfo",
    "ResolvedTable",
    "bound_query",
    "choose_key",
    "copy_query",
    "introspect",
    "last_key_query",
]

#: Relation kinds that can be exported, with the word used in messages.
_RELKINDS = {
    "r": "table",
    "p": "partitioned table",
    "v": "view",
    "m": "materialized view",
    "f": "foreign table",
}


@dataclass(frozen=True)
class IndexInfo:
    """A unique index as introspection sees it (pure data, for :func:`choose_key`)."""

    name: str
    columns: tuple[str, ...]
    primary: bool
    usable: bool  # valid, not partial, no expression columns


@dataclass(frozen=True)
class ResolvedTable:
    """Everything a chunk needs to know about the relation being exported."""

    oid: int
    schema: str
    name: str
    qualified: str  # as PostgreSQL quotes it, e.g. public."Order Items"
    relkind: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    key_types: tuple[str, ...]
    key_source: str  # "primary key", "unique index <name>", "--key"
    key_unique: bool  # provably unique and NOT NULL: COPY may also carry LIMIT n
    key_indexed: bool
    where: str | None
    estimated_rows: int | None
    estimated_bytes: int | None
    warnings: tuple[str, ...] = field(default=())

    @property
    def table_ident(self) -> sql.Identifier:
        """The relation as a schema-qualified identifier."""
        return sql.Identifier(self.schema, self.name)


def choose_key(
    *,
    table: str,
    explicit: Sequence[str] | None,
    indexes: Sequence[IndexInfo],
    not_null: set[str],
    existing: Sequence[str],
) -> tuple[tuple[str, ...], str, bool, bool]:
    """Decide the key that pages the table. Pure.

    Returns ``(key columns, where it came from, provably unique, index-supported)``.

    Without ``explicit``: the primary key, else the first usable unique index whose columns are
    all NOT NULL, else :class:`KeyProblem` naming the table and suggesting ``--key``.
    With ``explicit``: those columns, which must exist and be NOT NULL (a NULL key would never
    compare greater than the last key, so its rows would be silently skipped). A non-unique
    explicit key is allowed: ties are kept together by the bound (see module docstring).
    """
    if explicit:
        key = tuple(explicit)
        missing = [c for c in key if c not in existing]
        if missing:
            raise KeyProblem(
                f"key column {missing[0]!r} does not exist in {table}; "
                f"columns are: {', '.join(existing)}"
            )
        if len(set(key)) != len(key):
            raise KeyProblem(f"key {', '.join(key)} names a column twice")
        nullable = [c for c in key if c not in not_null]
        if nullable:
            raise KeyProblem(
                f"key column {nullable[0]!r} of {table} is nullable; rows with a NULL key "
                "would be skipped. Choose NOT NULL columns for --key"
            )
        unique = any(ix.usable and set(ix.columns) <= set(key) for ix in indexes)
        indexed = any(ix.usable and ix.columns[: len(key)] == key for ix in indexes)
        return key, "--key", unique, indexed or unique
    for ix in indexes:
        if ix.primary and ix.usable:
            return ix.columns, "primary key", True, True
    for ix in indexes:
        if ix.usable and all(c in not_null for c in ix.columns):
            return ix.columns, f"unique index {ix.name}", True, True
    raise KeyProblem(
        f"{table} has no primary key and no unique index over NOT NULL columns; "
        "name the column(s) to page by with --key"
    )


# -- queries (pure) ---------------------------------------------------------------------------


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


def where_clause(plan: ResolvedTable) -> sql.Composable:
    """`` WHERE (filter)`` or nothing."""
    return _conditions(plan, None, None)


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
    # The text cast happens outside: "ORDER BY id" next to "id::text" would sort by the text.
    return sql.SQL(
        "SELECT {keys} FROM (SELECT {cols} FROM {table}{where} ORDER BY {order} "
        "OFFSET {skip} LIMIT 1) AS bound"
    ).format(
        keys=_key_text(plan),
        cols=_key_list(plan, bare=True),
        table=plan.table_ident,
        where=_conditions(plan, after, until),
        order=_key_list(plan),
        skip=sql.Literal(rows - 1),
    )


def last_key_query(
    plan: ResolvedTable, after: Sequence[str] | None, until: Sequence[str] | None = None
) -> sql.Composed:
    """The greatest key (as text) after ``after`` and at most ``until``: the final chunk's last."""
    return sql.SQL(
        "SELECT {keys} FROM (SELECT {cols} FROM {table}{where} ORDER BY {order} LIMIT 1) AS last"
    ).format(
        keys=_key_text(plan),
        cols=_key_list(plan, bare=True),
        table=plan.table_ident,
        where=_conditions(plan, after, until),
        order=_key_list(plan, desc=True),
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
        cols=sql.SQL(", ").join(sql.Identifier(c) for c in plan.columns),
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


# -- introspection (I/O) ----------------------------------------------------------------------


def _resolve_names(
    names: Sequence[str],
    existing: Sequence[str],
    what: str,
    table: str,
    error: type[UsageError] = UsageError,
) -> list[str]:
    out = []
    for name in names:
        name = name.strip()
        if len(name) >= 2 and name.startswith('"') and name.endswith('"'):
            name = name[1:-1].replace('""', '"')
        elif name not in existing and name.lower() in existing:
            name = name.lower()  # unquoted names fold to lower case, as in psql
        if name not in existing:
            raise error(
                f"{what} {name!r} does not exist in {table}; columns are: {', '.join(existing)}"
            )
        out.append(name)
    return out


def introspect(
    conn: psycopg.Connection[tuple[object, ...]],
    table: str,
    *,
    key: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    options: CopyOptions | None = None,
) -> ResolvedTable:
    """Resolve ``table`` on the server (as psql would, honouring ``search_path``) and plan it.

    Raises :class:`TableNotFound`, :class:`KeyProblem`, :class:`InvalidFilter` or
    :class:`UsageError`. Runs only catalog reads, an ``EXPLAIN`` of the filter and, given
    ``options``, a ``COPY`` of no row with them.
    """
    try:
        row = conn.execute("SELECT to_regclass(%s)::oid", [table]).fetchone()
    except psycopg.errors.Error as e:  # e.g. a malformed name: too many dots, bad quoting
        conn.rollback()
        raise TableNotFound(f"{table!r} is not a valid table name: {e.diag.message_primary}") from e
    oid = row[0] if row else None
    if oid is None:
        raise TableNotFound(
            f"table {table} does not exist (or is not visible with the current search_path)"
        )
    info = conn.execute(
        """SELECT n.nspname, c.relname, format('%%I.%%I', n.nspname, c.relname), c.relkind,
                  c.reltuples::bigint, pg_table_size(c.oid),
                  has_table_privilege(c.oid, 'SELECT')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s""",
        [oid],
    ).fetchone()
    assert info is not None
    schema, name, qualified, relkind, reltuples, relbytes, can_select = info
    assert isinstance(schema, str) and isinstance(name, str) and isinstance(qualified, str)
    assert isinstance(relkind, str)
    if relkind not in _RELKINDS:
        raise TableNotFound(f"{qualified} is not a table, view or materialized view")
    if not can_select:
        raise UsageError(f"permission denied: the connecting role cannot SELECT from {qualified}")

    attrs = conn.execute(
        """SELECT attname, format_type(atttypid, atttypmod), attnotnull FROM pg_attribute
           WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum""",
        [oid],
    ).fetchall()
    existing = [str(a[0]) for a in attrs]
    types = {str(a[0]): str(a[1]) for a in attrs}
    not_null = {str(a[0]) for a in attrs if a[2]}

    indexes = [
        IndexInfo(str(r[0]), tuple(str(c) for c in r[1]), bool(r[2]), bool(r[3]))  # type: ignore[attr-defined]
        for r in conn.execute(
            """SELECT ic.relname,
                      ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                            LEFT JOIN pg_attribute a
                              ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                            WHERE k.ord <= i.indnkeyatts ORDER BY k.ord),
                      i.indisprimary,
                      i.indisvalid AND i.indpred IS NULL AND NOT (0 = ANY(i.indkey::int2[]))
               FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
               WHERE i.indrelid = %s AND i.indisunique
               ORDER BY NOT i.indisprimary, array_length(i.indkey::int2[], 1), ic.relname""",
            [oid],
        ).fetchall()
    ]
    all_indexes = [
        tuple(str(c) for c in r[0])  # type: ignore[attr-defined]
        for r in conn.execute(
            """SELECT ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
                            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                            WHERE k.ord <= i.indnkeyatts ORDER BY k.ord)
               FROM pg_index i WHERE i.indrelid = %s AND i.indisvalid AND i.indpred IS NULL""",
            [oid],
        ).fetchall()
    ]

    explicit = _resolve_names(key, existing, "key column", qualified, KeyProblem) if key else None
    warnings = []
    if explicit and relkind in ("v", "m", "f"):
        # Views cannot declare NOT NULL: check the data instead (a NULL key would be skipped).
        unknown = [c for c in explicit if c not in not_null]
        if unknown and not _has_null_keys(conn, sql.Identifier(schema, name), unknown):
            not_null |= set(unknown)
            warnings.append(
                f"{qualified} is a {_RELKINDS[relkind]}: NOT NULL of key column(s) "
                f"{', '.join(unknown)} cannot be declared, but no NULL is there now"
            )
    if relkind == "m" and not explicit:
        # Nor can a materialized view, but its unique index (the one REFRESH CONCURRENTLY needs)
        # pages it as well as a table's when no NULL is in the index's columns.
        for ix in indexes:
            unknown = [c for c in ix.columns if c not in not_null]
            if not ix.usable or (
                unknown and _has_null_keys(conn, sql.Identifier(schema, name), unknown)
            ):
                continue
            if unknown:
                not_null |= set(unknown)
                warnings.append(
                    f"{qualified} is a materialized view: NOT NULL of the columns of its unique "
                    f"index {ix.name} cannot be declared, but no NULL is there now"
                )
            break
    key_cols, source, unique, indexed = choose_key(
        table=qualified, explicit=explicit, indexes=indexes, not_null=not_null, existing=existing
    )
    if unique and relkind != "p" and _has_inheritance_children(conn, oid):
        # The parent's primary key or unique index covers only its own rows, but a SELECT from
        # it returns its children's too, which may repeat a key: paged as unique (LIMIT n), a
        # chunk could end inside a tie and the next one skip the rest of it.
        unique = False
        warnings.append(
            f"{qualified} has inheritance children, which its {source} does not cover: the key "
            "is paged as not unique (rows that tie on it are kept in one chunk)"
        )
    indexed = indexed or any(ix[: len(key_cols)] == key_cols for ix in all_indexes)
    if not indexed:
        warnings.append(
            f"no index starts with the key ({', '.join(key_cols)}) of {qualified}: every chunk "
            "will scan the table; create one or choose an indexed --key"
        )
    if source == "--key" and not unique:
        warnings.append(
            f"key ({', '.join(key_cols)}) of {qualified} is not provably unique: rows that tie "
            "on it are kept in one chunk, but their order within the tie is not defined"
        )
    cols = (
        tuple(_resolve_names(columns, existing, "column", qualified))
        if columns
        else tuple(existing)
    )
    if not cols:
        raise UsageError(f"{qualified} has no columns to export")

    estimated_rows = int(reltuples) if isinstance(reltuples, int) and reltuples >= 0 else None
    estimated_bytes = int(relbytes) if isinstance(relbytes, int) else None
    if relkind == "p":
        estimated_rows, estimated_bytes = _partition_estimates(conn, oid)

    plan = ResolvedTable(
        oid=int(str(oid)),
        schema=schema,
        name=name,
        qualified=qualified,
        relkind=relkind,
        columns=cols,
        key=key_cols,
        key_types=tuple(types[c] for c in key_cols),
        key_source=source,
        key_unique=unique,
        key_indexed=indexed,
        where=where,
        estimated_rows=estimated_rows,
        estimated_bytes=estimated_bytes,
        warnings=tuple(warnings),
    )
    if where is not None:
        _check_filter(conn, plan)
    if options is not None:
        _check_options(conn, plan, options)
    return plan


def _check_options(
    conn: psycopg.Connection[tuple[object, ...]], plan: ResolvedTable, options: CopyOptions
) -> None:
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


def _has_null_keys(
    conn: psycopg.Connection[tuple[object, ...]], table: sql.Identifier, columns: Sequence[str]
) -> bool:
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {})").format(
        table,
        sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in columns),
    )
    with conn.transaction():
        conn.execute("SET TRANSACTION READ ONLY")
        row = conn.execute(query).fetchone()
    return bool(row and row[0])


def _has_inheritance_children(conn: psycopg.Connection[tuple[object, ...]], oid: object) -> bool:
    row = conn.execute("SELECT EXISTS (SELECT 1 FROM pg_inherits WHERE inhparent = %s)", [oid])
    found = row.fetchone()
    return bool(found and found[0])


def _partition_estimates(
    conn: psycopg.Connection[tuple[object, ...]], oid: object
) -> tuple[int | None, int | None]:
    row = conn.execute(
        """SELECT sum(GREATEST(c.reltuples, 0))::bigint, sum(pg_table_size(c.oid))::bigint
           FROM pg_partition_tree(%s::regclass) t JOIN pg_class c ON c.oid = t.relid
           WHERE t.isleaf""",
        [oid],
    ).fetchone()
    if row is None or row[0] is None:
        return None, None
    return int(str(row[0])), int(str(row[1]))


def _check_filter(conn: psycopg.Connection[tuple[object, ...]], plan: ResolvedTable) -> None:
    """Reject a filter that is not valid SQL for this table (EXPLAIN only; nothing runs).

    The EXPLAIN goes through the extended query protocol, which refuses more than one
    statement, so a filter cannot smuggle a second command in (``true); COMMIT; DROP ...``).
    psycopg uses the simple protocol, which runs any number of statements, for a query without
    parameters unless binary results are asked for: hence ``binary=True``.
    """
    query = sql.SQL("EXPLAIN SELECT 1 FROM {}{}").format(
        plan.table_ident, _conditions(plan, None, None)
    )
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
        raise InvalidFilter(f"invalid --where filter {plan.where!r}: {msg}") from e


# -- chunk sizing (pure) ----------------------------------------------------------------------

#: Bounds of an adaptive chunk. Below ~1,000 rows the per-chunk round trips (BEGIN, bound query,
#: COPY, COMMIT, fsync, checkpoint) start to show; above ~2,000,000 a resume redoes too much.
MIN_CHUNK_ROWS = 1_000
MAX_CHUNK_ROWS = 2_000_000
#: Target duration of one chunk: per-chunk overhead (a few ms) stays well under 2%, and a
#: crash costs at most a couple of seconds of redone work.
TARGET_CHUNK_SECONDS = 2.0
#: Size of the first chunk when only the planner's estimate is known.
FIRST_CHUNK_BYTES = 32 * 1024 * 1024
#: A table estimated below this is exported in a single chunk (one COPY).
SMALL_TABLE_BYTES = 8 * 1024 * 1024


def first_chunk_rows(estimated_rows: int | None, estimated_bytes: int | None) -> int:
    """Rows in the first adaptive chunk, from the planner's row count and table size. Pure.

    A small table (by estimate) gets ``0``: the whole table in a single COPY.
    """
    if estimated_rows is not None and estimated_bytes is not None and estimated_rows > 0:
        if estimated_bytes < SMALL_TABLE_BYTES:
            return 0
        width = max(estimated_bytes / estimated_rows, 1.0)
        return _clamp(int(FIRST_CHUNK_BYTES / width))
    return 100_000


def next_chunk_rows(current: int, rows: int, seconds: float) -> int:
    """Rows in the next adaptive chunk, given the last chunk took ``seconds`` for ``rows``. Pure.

    Aims at :data:`TARGET_CHUNK_SECONDS`, changes by at most 4x per step (one slow chunk does not
    collapse the size), and stays within the bounds.
    """
    if current <= 0 or rows <= 0 or seconds <= 0:
        return current
    ideal = rows / seconds * TARGET_CHUNK_SECONDS
    return _clamp(int(min(max(ideal, current / 4), current * 4)))


def _clamp(rows: int) -> int:
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


#: Beyond this many chunks per range, a fixed ``--chunk-rows`` costs noticeably: the checkpoint
#: records every chunk and is rewritten after each one (about 200 bytes per chunk).
MANY_CHUNKS = 10_000


def many_chunks_warning(
    estimated_rows: int | None, chunk_rows: int | None, ranges: int = 1
) -> str | None:
    """A warning when a fixed chunk size would make a very long checkpoint, else ``None``. Pure.

    ``ranges``: the key ranges of a ``--workers`` export (each has its own checkpoint).
    """
    if not chunk_rows or not estimated_rows or ranges < 1:
        return None
    chunks = estimated_rows // (chunk_rows * ranges)
    if chunks <= MANY_CHUNKS:
        return None
    return (
        f"--chunk-rows {chunk_rows:,} makes about {chunks:,} chunks"
        + (" per range" if ranges > 1 else "")
        + "; every checkpoint records all chunks so far, so writing them grows with each chunk: "
        "omit --chunk-rows (chunks adapt to ~2 s each) or give a larger number"
    )
