"""The relation being exported, decided from what the catalog says. Pure: no I/O.

:func:`copystream.catalog.fetch_facts` reads a :class:`TableFacts`; :func:`resolve` turns it, with
the user's key, columns and filter, into the :class:`ResolvedTable` every chunk works from: the
columns that page the table (:func:`choose_key`), whether they are provably unique and supported
by an index, the estimates, and every warning.

One answer only the data can give: whether the key columns of a view, which cannot declare
NOT NULL, hold a NULL. :func:`next_null_check` says which column set to check next and
:func:`resolve` takes the answers, so every decision here runs without a server.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from .errors import KeyProblem, TableNotFound, UsageError
from .parquet_types import BinaryPlan

__all__ = [
    "IndexInfo",
    "ResolvedTable",
    "TableFacts",
    "check_readable",
    "choose_key",
    "next_null_check",
    "resolve",
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
class RelationId:
    """A relation as the catalog names it."""

    oid: int
    schema: str
    name: str
    qualified: str  # as PostgreSQL quotes it, e.g. public."Order Items"
    relkind: str

    def relation_id(self) -> dict[str, Any]:
        """These fields, to build another record about the same relation."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RelationId)}


@dataclass(frozen=True)
class TableFacts(RelationId):
    """What the catalog says about one relation: everything :func:`resolve` decides from."""

    reltuples: int  # the planner's row count; -1 when never vacuumed or analyzed
    relbytes: int | None
    can_select: bool
    attributes: tuple[tuple[str, str, bool], ...]  # (name, format_type, NOT NULL) in column order
    unique_indexes: tuple[IndexInfo, ...]  # primary key first, then fewest columns, then by name
    index_columns: tuple[tuple[str, ...], ...]  # key columns of every valid non-partial index
    has_children: bool  # inheritance children (or partitions) exist
    partition_rows: int | None = None  # sums over the leaf partitions (relkind 'p' only)
    partition_bytes: int | None = None

    @property
    def column_names(self) -> tuple[str, ...]:
        """The columns in table order."""
        return tuple(a[0] for a in self.attributes)

    @property
    def not_null(self) -> frozenset[str]:
        """The columns declared NOT NULL."""
        return frozenset(a[0] for a in self.attributes if a[2])


@dataclass(frozen=True)
class ResolvedTable(RelationId):
    """Everything a chunk needs to know about the relation being exported."""

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
    #: What the COPY selects in place of the bare columns (a Parquet export's typed forms).
    select: tuple[sql.Composable, ...] | None = None
    #: A Parquet export read through COPY BINARY (ADBC): its SELECT list, the key as text last
    #: (``parquet_types.BinaryPlan``); ``None``: the typed CSV of ``select``.
    binary: BinaryPlan | None = None

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
    explicit key is allowed: ties are kept together by the bound (see :mod:`copystream.queries`).
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
                "would be skipped"
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
        f"{table} has no primary key and no unique index over NOT NULL columns"
    )


def check_readable(facts: TableFacts) -> None:
    """Refuse a relation that cannot be exported.

    Raises :class:`TableNotFound` for a kind of relation that holds no rows to export (an index,
    a sequence...), :class:`UsageError` when the connecting role cannot SELECT from it.
    """
    if facts.relkind not in _RELKINDS:
        raise TableNotFound(f"{facts.qualified} is not a table, view or materialized view")
    if not facts.can_select:
        raise UsageError(
            f"permission denied: the connecting role cannot SELECT from {facts.qualified}"
        )


def next_null_check(
    facts: TableFacts, *, key: Sequence[str] | None, checked: Mapping[tuple[str, ...], bool]
) -> tuple[str, ...] | None:
    """The next column set whose data must be checked for NULLs, or ``None``: enough is known.

    ``checked`` maps every column set checked so far to whether it holds no NULL. Only a view,
    materialized view or foreign table asks: for the columns of an explicit ``key`` not declared
    NOT NULL, or (a materialized view without ``key``) for those of each usable unique index in
    turn, until one holds no NULL. Each check scans the relation, so none is asked for that the
    decision does not need. Raises :class:`KeyProblem` for a ``key`` naming no column.
    """
    for columns, _ in _undeclared_candidates(facts, _explicit_key(facts, key)):
        if not columns:
            return None  # declared NOT NULL: nothing to check
        if columns not in checked:
            return columns
        if checked[columns]:
            return None
    return None


def resolve(
    facts: TableFacts,
    *,
    key: Sequence[str] | None = None,
    columns: Sequence[str] | None = None,
    where: str | None = None,
    null_free_columns: Set[tuple[str, ...]] = frozenset(),
) -> ResolvedTable:
    """Decide how to export the relation ``facts`` describes. Pure.

    ``key`` and ``columns`` are names as the user typed them (unquoted names fold to lower case,
    as in psql); ``where`` is the filter, taken as it is. ``null_free_columns``: the column sets
    :func:`next_null_check` asked about that hold no NULL. Raises :class:`KeyProblem` or
    :class:`UsageError`.
    """
    check_readable(facts)
    explicit = _explicit_key(facts, key)
    not_null, warnings = _not_null_in_data(facts, explicit, null_free_columns)
    key_cols, source, unique, indexed = choose_key(
        table=facts.qualified,
        explicit=explicit,
        indexes=facts.unique_indexes,
        not_null=not_null | facts.not_null,
        existing=facts.column_names,
    )
    if unique and facts.relkind != "p" and facts.has_children:
        # The parent's primary key or unique index covers only its own rows, but a SELECT from
        # it returns its children's too, which may repeat a key: paged as unique (LIMIT n), a
        # chunk could end inside a tie and the next one skip the rest of it.
        unique = False
        warnings.append(
            f"{facts.qualified} has inheritance children, which its {source} does not cover: the "
            "key is paged as not unique (rows that tie on it are kept in one chunk)"
        )
    indexed = indexed or any(ix[: len(key_cols)] == key_cols for ix in facts.index_columns)
    warnings += _key_warnings(facts.qualified, key_cols, source, unique, indexed)
    estimated_rows, estimated_bytes = _estimates(facts)
    types = {a[0]: a[1] for a in facts.attributes}
    return ResolvedTable(
        **facts.relation_id(),
        columns=_export_columns(facts, columns),
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


def _undeclared_candidates(
    facts: TableFacts, explicit: Sequence[str] | None
) -> Iterator[tuple[tuple[str, ...], str]]:
    """The key candidates whose NOT NULL the data must vouch for, in order of preference.

    Each is ``(its columns not declared NOT NULL, the warning given when they hold no NULL)``;
    the first one that holds no NULL is used (an empty tuple: nothing to vouch for).
    """
    not_null = facts.not_null
    if explicit and facts.relkind in ("v", "m", "f"):
        # Views cannot declare NOT NULL: check the data instead (a NULL key would be skipped).
        unknown = tuple(c for c in explicit if c not in not_null)
        warning = (
            f"{facts.qualified} is a {_RELKINDS[facts.relkind]}: NOT NULL of key column(s) "
            f"{', '.join(unknown)} cannot be declared, but no NULL is there now"
        )
        yield unknown, warning
    if facts.relkind == "m" and not explicit:
        # Nor can a materialized view, but its unique index (the one REFRESH CONCURRENTLY needs)
        # pages it as well as a table's when no NULL is in the index's columns.
        for ix in facts.unique_indexes:
            if not ix.usable:
                continue
            warning = (
                f"{facts.qualified} is a materialized view: NOT NULL of the columns of its unique "
                f"index {ix.name} cannot be declared, but no NULL is there now"
            )
            yield tuple(c for c in ix.columns if c not in not_null), warning


def _not_null_in_data(
    facts: TableFacts, explicit: Sequence[str] | None, null_free: Set[tuple[str, ...]]
) -> tuple[set[str], list[str]]:
    """The columns a key may rely on as NOT NULL although undeclared, with the warnings."""
    for unknown, warning in _undeclared_candidates(facts, explicit):
        if not unknown:
            break
        if unknown in null_free:
            return set(unknown), [warning]
    return set(), []


def _key_warnings(
    qualified: str, key: tuple[str, ...], source: str, unique: bool, indexed: bool
) -> list[str]:
    warnings = []
    if not indexed:
        warnings.append(
            f"no index starts with the key ({', '.join(key)}) of {qualified}: every chunk "
            "will scan the table; create one or choose an indexed --key"
        )
    if source == "--key" and not unique:
        warnings.append(
            f"key ({', '.join(key)}) of {qualified} is not provably unique: rows that tie "
            "on it are kept in one chunk, but their order within the tie is not defined"
        )
    return warnings


def _explicit_key(facts: TableFacts, key: Sequence[str] | None) -> list[str] | None:
    if not key:
        return None
    return _resolve_names(key, facts.column_names, "key column", facts.qualified, KeyProblem)


def _export_columns(facts: TableFacts, columns: Sequence[str] | None) -> tuple[str, ...]:
    existing = facts.column_names
    cols = (
        tuple(_resolve_names(columns, existing, "column", facts.qualified)) if columns else existing
    )
    if not cols:
        raise UsageError(f"{facts.qualified} has no columns to export")
    return cols


def _estimates(facts: TableFacts) -> tuple[int | None, int | None]:
    if facts.relkind == "p":  # the parent holds no row: its leaf partitions do
        return facts.partition_rows, facts.partition_bytes
    return (facts.reltuples if facts.reltuples >= 0 else None), facts.relbytes


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
