"""What copystream needs of the PostgreSQL server, and what differs between versions. Pure.

The version is the server's ``server_version_num``, which libpq receives when the connection
starts (psycopg's ``conn.info.server_version``): asking costs no query, and nothing is guessed
from error texts. Every decision that depends on the version is made here, by number:

* :data:`MIN_VERSION`: PostgreSQL 12. The catalog read that plans every export sizes
  partitioned tables with ``pg_partition_tree()`` (new in 12) and reads ``pg_index.indnkeyatts``
  (new in 11); an older server is refused by :func:`require_supported` (a usage error, exit 2).
* :func:`name_errors_are_soft`: from PostgreSQL 16 ``to_regclass()`` returns NULL for a
  malformed name too (before, it raised "invalid name syntax"); ``pg_input_error_info()`` (new in
  16) then tells a malformed name from a missing table.
* :func:`snapshot_gone_errors`: from PostgreSQL 17 importing a snapshot whose exporting
  transaction has ended fails with 42704 "snapshot … does not exist"; before, with 22023
  "invalid snapshot identifier".
* :func:`not_null_sql`: from PostgreSQL 18 a NOT NULL constraint can be ``NOT VALID``;
  ``pg_attribute.attnotnull`` is then true although the column may still hold NULLs, which a key
  must never do (a row whose key is NULL would be skipped silently).
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from .errors import UsageError

__all__ = [
    "MIN_VERSION",
    "name_errors_are_soft",
    "not_null_sql",
    "require_supported",
    "snapshot_gone_errors",
    "version_text",
]

#: The oldest server copystream works with (``server_version_num``).
MIN_VERSION = 120000

#: From this version ``to_regclass()`` reports a malformed name softly (NULL), as a missing one.
SOFT_NAME_ERRORS = 160000

#: From this version a vanished exported snapshot is 42704 "does not exist" (before: 22023).
SNAPSHOT_DOES_NOT_EXIST = 170000

#: From this version a NOT NULL constraint may be NOT VALID (``pg_constraint.contype = 'n'``).
NOT_VALID_NOT_NULL = 180000


def version_text(num: int) -> str:
    """``server_version_num`` as people write it: 180006 → ``18.6``, 90624 → ``9.6.24``."""
    if num >= 100000:
        return f"{num // 10000}.{num % 10000}"
    return f"{num // 10000}.{num // 100 % 100}.{num % 100}"


def require_supported(num: int, where: str) -> None:
    """Raise :class:`UsageError` when the server ``where`` (version ``num``) is too old."""
    if num < MIN_VERSION:
        raise UsageError(
            f"the server at {where} runs PostgreSQL {version_text(num)}; copystream needs "
            f"PostgreSQL {version_text(MIN_VERSION).split('.')[0]} or later (its catalog read "
            "uses pg_partition_tree(), which older versions lack)"
        )


def not_null_sql(num: int) -> sql.SQL:
    """The SQL for "column ``a`` (a ``pg_attribute`` row) can hold no NULL" on version ``num``.

    Up to PostgreSQL 17 that is ``attnotnull``. From 18 ``attnotnull`` is also true for a NOT
    NULL constraint added ``NOT VALID``, which rows older than it need not satisfy: such a
    column counts as nullable until the constraint is validated.
    """
    if num < NOT_VALID_NOT_NULL:
        return sql.SQL("a.attnotnull")
    return sql.SQL(
        "(a.attnotnull AND NOT EXISTS (SELECT 1 FROM pg_constraint nn WHERE nn.conrelid = "
        "a.attrelid AND nn.contype = 'n' AND NOT nn.convalidated AND nn.conkey[1] = a.attnum))"
    )


def name_errors_are_soft(num: int) -> bool:
    """Whether ``to_regclass()`` on version ``num`` returns NULL for a malformed name as well
    as for a missing relation (then ``pg_input_error_info()`` says which)."""
    return num >= SOFT_NAME_ERRORS


def snapshot_gone_errors(num: int) -> tuple[type[psycopg.Error], ...]:
    """What ``SET TRANSACTION SNAPSHOT`` raises on version ``num`` when the transaction that
    exported the snapshot has ended: its file is gone (22023 up to 16, 42704 from 17), or it
    was still there but the transaction had just ended (55000 "could not import the requested
    snapshot"). Caught around that one statement only: a filter's 22023 or 42704 is not this.
    """
    missing: type[psycopg.Error] = (
        psycopg.errors.UndefinedObject
        if num >= SNAPSHOT_DOES_NOT_EXIST
        else psycopg.errors.InvalidParameterValue
    )
    return (missing, psycopg.errors.ObjectNotInPrerequisiteState)
