"""Connections with the hygiene a long export needs, and errors a user can act on.

Every connection gets TCP keepalives and ``tcp_user_timeout`` (a dead network is noticed in
seconds, not hours), ``application_name=copystream`` unless the DSN names one, and autocommit
(each chunk opens its own transaction). Connection errors become :class:`ConnectionFailed` or
:class:`AuthenticationFailed` with the password, if any, scrubbed from the message.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from .errors import AuthenticationFailed, ConnectionFailed, UsageError
from .retry import StallTimeout
from .server import require_supported
from .settings import apply_settings_query

__all__ = ["Target", "connect", "connect_error", "describe_target", "io_deadline", "redact"]

#: libpq parameters added unless the DSN sets them. keepalives: first probe after 10 s idle, then
#: every 5 s, 3 misses = dead (about 25 s). tcp_user_timeout: unacknowledged data for 30 s = dead.
HYGIENE: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,
    "connect_timeout": 10,
    "application_name": "copystream",
}

_AUTH_PATTERNS = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r"role \".*\" does not exist|pg_hba\.conf rejects|SCRAM|password is required",
    re.IGNORECASE,
)


class Target:
    """A parsed connection string: what to connect to, and how to talk about it safely."""

    def __init__(self, conninfo: str) -> None:
        try:
            self.params: dict[str, Any] = conninfo_to_dict(conninfo)
        except psycopg.ProgrammingError as e:
            detail = redact(_scrub_quoted(str(e).strip(), _raw_passwords(conninfo)), conninfo)
            raise UsageError(f"invalid connection string: {detail}") from e
        self.conninfo = conninfo

    @property
    def secrets(self) -> list[str]:
        """Values that must never appear in output: the password and the raw DSN."""
        out = [str(self.params["password"])] if self.params.get("password") else []
        if self.conninfo:
            out.append(self.conninfo)
        return out

    def describe(self) -> str:
        """``host:port/dbname`` as far as the DSN tells, never the password."""
        return describe_target(self.params)


def describe_target(params: dict[str, Any]) -> str:
    """A password-free description of connection parameters."""
    host = params.get("host") or params.get("hostaddr") or "(default host)"
    port = params.get("port") or ""
    db = params.get("dbname") or "(default database)"
    return f"{host}{':' + str(port) if port else ''}/{db}"


def redact(message: str, *secrets: str) -> str:
    """``message`` with every non-empty secret replaced by ``***``."""
    for s in secrets:
        if s:
            message = message.replace(s, "***")
    message = _KEYWORD_PASSWORD.sub(r"\1***", message)
    return _URI_PASSWORD.sub(r"\1***@", message)


#: ``password=value`` (a quoted value may hold spaces) and ``scheme://user:password@`` in text.
_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE)
_URI_PASSWORD = re.compile(r"(\b[a-z][\w+.-]*://[^\s:/?#@]*:)\S*@", re.IGNORECASE)


def _raw_passwords(conninfo: str) -> list[str]:
    """Text of ``conninfo`` that may be (part of) a password, even if libpq cannot parse it."""
    out: list[str] = []
    uri = re.match(r"\s*[a-z][\w+.-]*://([^\s:/?#@]*):(\S*)@", conninfo, re.IGNORECASE)
    if uri and uri.group(2):
        out.append(uri.group(2))
    for m in re.finditer(
        r"(?:^|[\s?&])password\s*=\s*(.*?)(?=\s+\w+\s*=|&|$)", conninfo, re.IGNORECASE
    ):
        value = m.group(1).strip()
        out += [value, value.strip("'")]
        out.extend(w.strip("'") for w in value.split())
    return [v for v in out if v]


def _scrub_quoted(message: str, fragments: list[str]) -> str:
    """Mask every ``"quoted"`` token of a libpq message that overlaps one of ``fragments``.

    libpq quotes the offending token when it cannot parse a connection string, and that token
    can be a piece of the password (``invalid percent-encoded token: "pa%ss"``).
    """

    def mask(m: re.Match[str]) -> str:
        text = m.group(1)
        hit = any(f in text or text in f for f in fragments) if text else False
        return '"***"' if hit else m.group(0)

    return re.sub(r'"([^"]*)"', mask, message)


def connect(target: Target, *, settings: dict[str, str] | None = None) -> psycopg.Connection[Any]:
    """Open an autocommit connection with keepalives, then pin ``settings`` if given.

    Raises the psycopg error on failure; :func:`connect_error` turns it into a user-facing one.
    A server older than copystream supports is refused (:class:`UsageError`, connection closed).
    """
    params = dict(HYGIENE)
    params.update(target.params)
    conn: psycopg.Connection[Any] = psycopg.Connection.connect(**params, autocommit=True)
    try:
        require_supported(conn.info.server_version, target.describe())
    except UsageError:
        conn.close()
        raise
    if settings:
        conn.execute(apply_settings_query(settings))
    return conn


def connect_error(e: psycopg.Error, target: Target) -> UsageError:
    """The user-facing error for a connection attempt that failed for good."""
    text = redact(str(e).strip(), *target.secrets)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # libpq follows "... failed: Connection refused" with a hint line; the reason comes first.
    hints = [ln for ln in lines if ln.startswith("Is the server running")]
    reasons = [ln for ln in lines if ln not in hints]
    detail = reasons[-1] if reasons else "connection failed"
    # "connection to server at ... failed: FATAL: ..." -> keep the useful tail
    detail = re.sub(r"^(?:connection failed:\s*)?connection to server .*? failed:\s*", "", detail)
    if hints:
        detail += "; " + hints[-1][0].lower() + hints[-1][1:]
    where = target.describe()
    if e.sqlstate in ("28P01", "28000") or _AUTH_PATTERNS.search(text):
        return AuthenticationFailed(f"authentication failed connecting to {where}: {detail}")
    return ConnectionFailed(f"cannot connect to {where}: {detail}")


@contextlib.contextmanager
def io_deadline(conn: psycopg.Connection[Any], seconds: float, doing: str) -> Iterator[None]:
    """Bound a block of ordinary (blocking) psycopg calls on ``conn`` to ``seconds``.

    Keepalives and ``tcp_user_timeout`` notice a dead network, but not a peer that stops
    answering while its kernel still acknowledges (a hung server process, a stuck proxy or
    pooler): a blocking query would then wait forever. If the block is still running after
    ``seconds``, the connection's socket is shut down, which ends the blocked call with an
    error; it is raised as :class:`~copystream.retry.StallTimeout` (transient: retried).
    """
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def fire() -> None:
        with lock:
            if state["done"]:
                return
            state["fired"] = True
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
            try:
                sock.shutdown(socket.SHUT_RDWR)  # acts on the connection's own socket
            finally:
                sock.close()

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except psycopg.Error as e:
        if state["fired"]:
            raise StallTimeout(
                f"no response from the server for {seconds:g}s while {doing} (stalled? if "
                "it is only slow, raise the I/O timeout)"
            ) from e
        raise
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
