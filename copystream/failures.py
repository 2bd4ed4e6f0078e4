"""From a psycopg error to the copystream error a user can act on: one translation, every phase.

Connecting, planning, sampling the key range and running chunks all end the same way when an
error is not worth (another) retry: :func:`translate` turns it into a :class:`CopystreamError`
with a remedy. :func:`classify_connect` is the classifier of the first connection attempts,
where a refused password or a host that does not resolve is not worth a retry, and a server that
cannot be reached is more likely a wrong host or port than an outage.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from .connection import Target, connect_error, redact
from .errors import (
    CopystreamError,
    ExportFailed,
    InvalidFilter,
    Remedy,
    RetriesExhausted,
    TableNotFound,
    UsageError,
)
from .parquet_types import refused_value
from .retry import Failure, classify

__all__ = ["Phase", "classify_connect", "first_line", "translate"]

#: Connection failures no retry can cure: a host name that does not resolve (libpq's and
#: psycopg's wording), a malformed port or option.
_PERMANENT_CONNECT = (
    "could not translate host name",
    "failed to resolve host",
    "invalid integer value",
    "invalid connection option",
)


@dataclass(frozen=True)
class Phase:
    """Where an error happened, for its message: what was being done, to which table."""

    target: Target
    table: str  # as PostgreSQL quotes it once resolved, else as the user named it
    doing: str  # "exporting public.t", "planning the export of t", ...
    filtered: bool = False  # the export has a filter (a data error then points at it)
    connecting: bool = False  # the error came from opening a connection
    planning: bool = False  # before the table was resolved: a permanent error is a usage error


def classify_connect(e: BaseException) -> Failure | None:
    """Why a failed first connection attempt is worth another (``None``: it is not).

    Never an outage: before anything has worked, a server that cannot be reached is counted
    against a few quick attempts (a person must fix a wrong host or port, exit 2); once the
    export has connected, the same error is an outage and waited out.
    """
    text = str(e)
    if isinstance(e, psycopg.Error) and (
        e.sqlstate in ("28P01", "28000", "3D000")
        or "does not exist" in text
        or "authentication" in text
    ):
        return None
    if any(m in text for m in _PERMANENT_CONNECT):
        return None
    failure = classify(e)
    return Failure(failure.reason if failure is not None else "connection failed")


def first_line(e: BaseException, *secrets: str) -> str:
    """The first line of ``e``'s message (its class name if it has none), secrets masked."""
    text = str(e).strip()
    return redact(text.splitlines()[0] if text else type(e).__name__, *secrets)


def translate(e: BaseException, phase: Phase, *, why: str, transient: bool) -> CopystreamError:
    """The user-facing error for ``e``, which failed for good (``transient``: it was retried
    until the policy said stop, for ``why``). Checkpoints are intact whatever it is."""
    if isinstance(e, CopystreamError):
        return e
    msg = first_line(e, *phase.target.secrets)
    if isinstance(e, psycopg.Error):
        if phase.connecting and not transient:
            return connect_error(e, phase.target)
        if phase.planning and not transient:
            return UsageError(f"cannot plan the export of {phase.table}: {msg}")
        if (e.sqlstate or "").startswith("28"):
            return connect_error(e, phase.target)
        request = _request_error(e, msg, phase)
        if request is not None:
            return request
        if isinstance(e, psycopg.OperationalError) and "connect" in msg and e.sqlstate is None:
            return RetriesExhausted(f"{phase.doing} stopped: {why}: {msg}")
    if transient or classify(e) is not None:
        return RetriesExhausted(f"{phase.doing} stopped: {why}; last error: {msg}")
    return ExportFailed(f"{phase.doing} failed: {msg}")


def _request_error(e: psycopg.Error, msg: str, phase: Phase) -> CopystreamError | None:
    """The usage error for a psycopg error the request caused, or ``None``."""
    table = phase.table
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        return InvalidFilter(
            f"the export of {table} tried to write ({msg}); every export transaction is READ "
            "ONLY: remove writing functions from the filter",
            remedy=Remedy.FIX_FILTER,
        )
    if isinstance(e, psycopg.errors.UndefinedTable):
        return TableNotFound(f"{table} disappeared during the export: {msg}")
    if isinstance(e, psycopg.errors.UndefinedColumn | psycopg.errors.DatatypeMismatch):
        return UsageError(
            f"the definition of {table} changed during the export ({msg})", remedy=Remedy.RESTART
        )
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return UsageError(f"permission denied exporting {table}: {msg}")
    refused = refused_value(msg, table)  # a value a Parquet export's policy refuses
    if refused is not None:
        return refused
    if (e.sqlstate or "")[:2] in ("42", "22", "21"):
        # By SQLSTATE class: psycopg's exception for one SQLSTATE (SyntaxError, DivisionByZero,
        # ...) does not inherit from its class's (SyntaxErrorOrAccessRuleViolation, ...).
        # Syntax, data and cardinality errors come from the request (in practice the filter):
        # running it again fails again, so it is a usage error.
        return InvalidFilter(
            f"exporting {table} failed: {msg}",
            remedy=Remedy.FIX_FILTER if phase.filtered else None,
        )
    return None
