"""One chunk of a Parquet export on the binary path: COPY BINARY decoded to Arrow by ADBC.

A table whose :class:`~copystream.parquet_types.BinaryPlan` exists (``ResolvedTable.binary``)
is read through ADBC's PostgreSQL driver (``adbc_driver_postgresql``, C++ over libpq), which
runs each SELECT as ``COPY (…) TO STDOUT (FORMAT binary)`` and decodes it into Arrow record
batches: the server formats no value as text (half its CPU of the typed CSV), the client parses
none. The engine is the chunk runner's (:mod:`copystream.chunk`): each chunk is one REPEATABLE
READ, READ ONLY transaction (checked), importing the export's snapshot when there is one, under
the pinned settings, ``WHERE key > after ORDER BY key LIMIT n``; the chunk's last key is the
last row's key as text (the key is unique: the binary path is only taken then), and a chunk
of fewer rows than asked for ends the range.

ADBC's errors become psycopg's (by SQLSTATE; none: ``OperationalError``, a lost connection),
with the server's message only (not the query) and the connection's secrets masked, so that
:mod:`copystream.retry` and :mod:`copystream.failures` treat them as a psycopg chunk's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
import psycopg.errors
from psycopg import sql
from psycopg.conninfo import make_conninfo

from .chunk import Chunk, ChunkOutcome, SnapshotGone
from .connection import HYGIENE, Target, redact
from .destinations import Destination
from .destinations.parquet import ParquetDataset
from .queries import binary_query
from .retry import StallTimeout
from .server import snapshot_gone_errors
from .settings import apply_settings_query

__all__ = ["BATCH_BYTES", "ArrowChunkRunner", "adbc_error", "connect_adbc"]

#: ADBC's record batches are about this large (its default, 16 MB, is held several times over
#: between the driver, the queue and the decoding thread: on 1,000,000 rows of the bench table
#: the peak RSS was 161 MB with 4 MiB batches, 140 MB with 1 MiB, for the same CPU).
BATCH_BYTES = 1024 * 1024


def adbc_error(e: BaseException, secrets: Sequence[str]) -> psycopg.Error:
    """The psycopg error an ADBC error stands for: of its SQLSTATE's class (none: a lost
    connection, ``OperationalError``), its message the server's (``ERROR:  …``) line, not the
    query after it, with ``secrets`` masked. Pure."""
    text = str(e)
    at = text.find("ERROR:  ")
    line = text[at + len("ERROR:  ") :] if at >= 0 else text.strip()
    message = redact(line.split("\n", 1)[0].strip() or type(e).__name__, *secrets)
    state = getattr(e, "sqlstate", None)
    if not state:
        return psycopg.OperationalError(message)
    try:
        cls = psycopg.errors.lookup(state)
    except KeyError:
        return psycopg.DatabaseError(message)
    error: psycopg.Error = cls(message)
    return error


def _adbc() -> Any:
    import adbc_driver_manager
    import adbc_driver_postgresql.dbapi  # type: ignore[import-untyped]

    return adbc_driver_postgresql.dbapi, adbc_driver_manager.Error


def connect_adbc(
    target: Target, settings: dict[str, str], statement_timeout: float | None
) -> tuple[Any, int | None]:
    """An autocommit ADBC connection with the connection hygiene, the pinned ``settings``
    (and ``statement_timeout``), and its socket's descriptor (``None``: not found). Raises
    psycopg's errors (:func:`adbc_error`)."""
    dbapi, error = _adbc()
    params = {**HYGIENE, **target.params}
    before = _sockets()
    try:
        conn = dbapi.connect(make_conninfo(**{k: str(v) for k, v in params.items()}))
    except error as e:
        raise adbc_error(e, target.secrets) from None
    port = str(target.params.get("port") or "5432").split(",")[0]
    opened = {fd for fd in _sockets() - before if _peer_port(fd) == port}
    try:
        conn.adbc_connection.set_autocommit(True)
        pinned = dict(settings)
        if statement_timeout is not None:
            pinned["statement_timeout"] = f"{int(statement_timeout * 1000)}ms"
        with conn.cursor() as cur:
            cur.execute(apply_settings_query(pinned).as_string(None))
            cur.fetchall()
    except error as e:
        conn.close()
        raise adbc_error(e, target.secrets) from None
    return conn, (opened.pop() if len(opened) == 1 else None)


def _peer_port(fd: int) -> str | None:
    """The port (or Unix socket's ``.s.PGSQL.PORT`` suffix) that socket ``fd`` is connected
    to, or ``None``."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            peer = sock.getpeername()
    except OSError:
        return None
    if isinstance(peer, tuple):
        return str(peer[1])
    text = peer.decode() if isinstance(peer, bytes) else str(peer)
    return text.rsplit(".", 1)[-1] if ".s.PGSQL." in text else None


def _sockets() -> set[int]:
    """This process's open socket descriptors (libpq's, inside ADBC, is not exposed: it is the
    one a connection adds; the chunk loop's thread opens connections one at a time)."""
    found = set()
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                    found.add(int(name))
    return found


def _reader(cursor: Any) -> Any:
    """The statement's record batches. ADBC's own reader, whose errors are ADBC's with their
    SQLSTATE: the public ``fetch_record_batch()`` returns pyarrow's inside it, whose failed
    stream is a bare ``OSError`` (a refused value would look like a lost connection)."""
    reader = getattr(getattr(cursor, "_results", None), "reader", None)
    return reader if reader is not None else cursor.fetch_record_batch()


class _Watchdog:
    """Ends the running statement when no batch arrived for ``seconds`` (ADBC blocks in
    libpq, where no select() timeout reaches): it shuts the connection's socket down, as
    :func:`~copystream.connection.io_deadline` does (a cancel request would go through the
    same stalled network), else cancels; the chunk then fails as a stall."""

    def __init__(self, cursor: Any, sock: int | None, seconds: float) -> None:
        self.cursor, self.sock, self.seconds, self.fired = cursor, sock, seconds, False
        self._timer: threading.Timer | None = None

    def pet(self) -> None:
        self.stop()
        self._timer = threading.Timer(self.seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(Exception):  # the stall is reported by the chunk either way
            if self.sock is None:
                self.cursor.adbc_cancel()
                return
            sock = socket.socket(fileno=os.dup(self.sock))
            try:
                sock.shutdown(socket.SHUT_RDWR)  # acts on the connection's own socket
            finally:
                sock.close()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class ArrowChunkRunner:
    """Runs chunks of a Parquet export on the binary path, on one open ADBC connection
    (:func:`connect_adbc`). Same interface as :class:`~copystream.chunk.ChunkRunner`; after any
    exception the connection must be discarded."""

    def __init__(
        self, conn: Any, target: Target, *, io_timeout: float, sock: int | None = None
    ) -> None:
        self.conn = conn
        self.sock = sock
        self.secrets = target.secrets
        self.io_timeout = io_timeout
        self.chunks_served = 0
        self._error = _adbc()[1]
        self._cursor = conn.cursor()
        self._cursor.adbc_statement.set_options(
            **{"adbc.postgresql.batch_size_hint_bytes": str(BATCH_BYTES)}
        )
        try:
            found = self._execute(sql.SQL("SELECT current_setting('server_version_num')::int"))
        except self._error as e:
            raise adbc_error(e, self.secrets) from None
        self.server_version = int(found[0][0])

    def run(
        self,
        chunk: Chunk,
        dest: Destination,
        on_data: Callable[[int, int], None] | None = None,
    ) -> ChunkOutcome:
        """Export ``chunk`` into ``dest`` (which takes Arrow batches), committed."""
        watchdog = _Watchdog(self._cursor, self.sock, self.io_timeout)
        try:
            outcome = self._run(chunk, dest, on_data, watchdog)
        except self._error as e:
            if watchdog.fired:
                raise StallTimeout(
                    f"no data from the server for {self.io_timeout:g}s (network stalled?)"
                ) from None
            raise adbc_error(e, self.secrets) from None
        finally:
            watchdog.stop()
        self.chunks_served += 1
        return outcome

    def _execute(self, query: sql.Composable) -> list[tuple[Any, ...]]:
        cur = self._cursor
        cur.execute(query.as_string(None))
        return list(cur.fetchall()) if cur.description else []

    def _begin(self, snapshot: str | None) -> None:
        self._execute(sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        if snapshot is not None:
            try:
                self._execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            except self._error as e:
                error = adbc_error(e, self.secrets)
                if isinstance(error, snapshot_gone_errors(self.server_version)):
                    raise SnapshotGone(str(error)) from None
                raise error from None
        found = self._execute(
            sql.SQL(
                "SELECT current_setting('transaction_read_only'), "
                "current_setting('transaction_isolation')"
            )
        )
        if tuple(found[0]) != ("on", "repeatable read"):  # every export transaction is
            raise psycopg.errors.InternalError_(f"the chunk's transaction is {found[0]}")

    def _run(
        self,
        c: Chunk,
        dest: Destination,
        on_data: Callable[[int, int], None] | None,
        watchdog: _Watchdog,
    ) -> ChunkOutcome:
        plan = c.table.binary
        assert plan is not None and isinstance(dest, ParquetDataset)
        watchdog.pet()
        self._begin(c.snapshot)
        limit = c.rows if c.rows > 0 else None
        cur = self._cursor
        cur.execute(binary_query(c.table, after=c.after, upto=c.until, limit=limit).as_string(None))
        reader = _reader(cur)
        rows = nbytes = 0
        last_key: tuple[str, ...] | None = None
        width = len(reader.schema) - plan.key_columns
        for batch in reader:
            watchdog.pet()
            if batch.num_rows == 0:
                continue
            last_key = tuple(
                str(batch.column(i)[-1].as_py()) for i in range(width, width + plan.key_columns)
            )
            values = batch.select(range(width))
            dest.write_arrow(values)
            rows += batch.num_rows
            nbytes += values.nbytes
            if on_data is not None:
                on_data(rows, nbytes)
        self._execute(sql.SQL("COMMIT"))
        return ChunkOutcome(rows=rows, last_key=last_key, final=limit is None or rows < limit)
