"""One chunk of a Parquet export on the binary path: COPY BINARY decoded to Arrow by ADBC.

A table whose :class:`~copystream.parquet_types.BinaryPlan` exists (``ResolvedTable.binary``)
is read through ADBC's PostgreSQL driver (``adbc_driver_postgresql``, C++ over libpq), which
runs each SELECT as ``COPY (…) TO STDOUT (FORMAT binary)`` and decodes it into Arrow record
batches: the server formats as text only what is written as text (on the bench table ~40% less
of its CPU than the typed CSV), the client parses no text but for arrays and struct intervals.
ADBC blocks inside libpq: a watchdog shuts the connection's socket down after the I/O timeout
without a batch (:class:`_Watchdog`).

The engine is the chunk runner's (:mod:`copystream.chunk`): each chunk is one REPEATABLE READ,
READ ONLY transaction (checked), importing the export's snapshot when there is one, under
the pinned settings, ``WHERE key > after ORDER BY key LIMIT n``; the chunk's last key is the
last row's key (its exported integer column, or its text; the key is unique: the binary path
is only taken then), and a chunk of fewer rows than asked for ends the range. Each batch's
dates, timestamps and small decimals are checked for what Parquet cannot hold
(:func:`checked`) before the destination takes it.

ADBC's errors become psycopg's (by SQLSTATE; none: ``OperationalError``, a lost connection),
with the server's message only (not the query) and the connection's secrets masked, so that
:mod:`copystream.retry` and :mod:`copystream.failures` treat them as a psycopg chunk's.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
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
from .parquet_types import BinaryPlan, record_text, refusal, refused_wire
from .queries import binary_query
from .retry import StallTimeout
from .server import snapshot_gone_errors
from .settings import apply_settings_query

__all__ = [
    "BATCH_BYTES", "AdbcLink", "ArrowChunkRunner", "adbc_error", "checked", "connect_adbc"
]  # fmt: skip

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


def _adbc() -> tuple[Any, Any, Any]:
    """The driver, ADBC's driver manager and its reader module. Its low-level API, not its
    DB-API: that one imports pyarrow.dataset and pyarrow.compute (~13 MB of every process)."""
    import adbc_driver_manager
    import adbc_driver_postgresql  # type: ignore[import-untyped]
    from adbc_driver_manager import _reader

    return adbc_driver_postgresql, adbc_driver_manager, _reader


class AdbcLink:
    """One ADBC connection (autocommit, as ADBC's connections start), and the statement it
    runs. ``sock``: its socket's descriptor (``None``: not found)."""

    def __init__(self, database: Any, connection: Any, sock: int | None) -> None:
        _, self.manager, self.reader = _adbc()
        self.error = self.manager.Error
        self.database, self.connection, self.sock = database, connection, sock
        self.statement: Any = None

    def _statement(self, query: sql.Composable) -> Any:
        self._end_statement()
        self.statement = self.manager.AdbcStatement(self.connection)
        self.statement.set_options(**{"adbc.postgresql.batch_size_hint_bytes": str(BATCH_BYTES)})
        self.statement.set_sql_query(query.as_string(None))
        return self.statement

    def _end_statement(self) -> None:
        statement, self.statement = self.statement, None
        if statement is not None:
            with contextlib.suppress(Exception):
                statement.close()

    def command(self, query: sql.Composable) -> None:
        """Run a statement that returns no rows."""
        self._statement(query).execute_update()
        self._end_statement()

    def stream(self, query: sql.Composable) -> Any:
        """The record batches of ``query``: ADBC's own reader, whose errors are ADBC's with
        their SQLSTATE (pyarrow's, inside it, raises a bare ``OSError``)."""
        handle, _ = self._statement(query).execute_query()
        return self.reader.AdbcRecordBatchReader._import_from_c(handle.address)

    def rows(self, query: sql.Composable) -> list[tuple[Any, ...]]:
        """The rows of ``query``."""
        table = self.stream(query).read_all()
        self._end_statement()
        return list(zip(*(column.to_pylist() for column in table.columns), strict=True))

    def cancel(self) -> None:
        """Cancel the running statement (from another thread)."""
        if self.statement is not None:
            self.statement.cancel()

    def close(self) -> None:
        """Close the statement, the connection and its database handle."""
        self._end_statement()
        for handle in (self.connection, self.database):
            with contextlib.suppress(Exception):
                handle.close()


def connect_adbc(
    target: Target, settings: dict[str, str], statement_timeout: float | None
) -> AdbcLink:
    """An ADBC connection with the connection hygiene, the pinned ``settings`` (and
    ``statement_timeout``). Raises psycopg's errors (:func:`adbc_error`)."""
    driver, manager, _ = _adbc()
    params = {**HYGIENE, **target.params}
    before = _sockets()
    database = connection = None
    try:
        database = driver.connect(make_conninfo(**{k: str(v) for k, v in params.items()}))
        connection = manager.AdbcConnection(database)
    except manager.Error as e:
        if database is not None:
            database.close()
        raise adbc_error(e, target.secrets) from None
    port = str(target.params.get("port") or "5432").split(",")[0]
    opened = {fd for fd in _sockets() - before if _peer_port(fd) == port}
    link = AdbcLink(database, connection, opened.pop() if len(opened) == 1 else None)
    try:
        pinned = dict(settings)
        if statement_timeout is not None:
            pinned["statement_timeout"] = f"{int(statement_timeout * 1000)}ms"
        link.rows(apply_settings_query(pinned))
    except manager.Error as e:
        link.close()
        raise adbc_error(e, target.secrets) from None
    return link


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


class _Watchdog:
    """Ends the running statement when no batch arrived for ``seconds`` (ADBC blocks in
    libpq, where no select() timeout reaches): it shuts the connection's socket down, as
    :func:`~copystream.connection.io_deadline` does (a cancel request would go through the
    same stalled network), else cancels; the chunk then fails as a stall.

    One thread per chunk watches a deadline that :meth:`pet` moves (a store: a timer thread
    started per batch cost ~10% of the chunk loop's time on 1 MiB batches)."""

    def __init__(self, link: AdbcLink, seconds: float) -> None:
        self.link, self.sock, self.seconds, self.fired = link, link.sock, seconds, False
        self._deadline = time.monotonic() + seconds
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def pet(self) -> None:
        self._deadline = time.monotonic() + self.seconds
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="copystream-watchdog", daemon=True
            )
            self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(max(self._deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= self._deadline:
                self._fire()
                return

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(Exception):  # the stall is reported by the chunk either way
            if self.sock is None:
                self.link.cancel()
                return
            sock = socket.socket(fileno=os.dup(self.sock))
            try:
                sock.shutdown(socket.SHUT_RDWR)  # acts on the connection's own socket
            finally:
                sock.close()

    def stop(self) -> None:
        self._done.set()


class ArrowChunkRunner:
    """Runs chunks of a Parquet export on the binary path, on one open ADBC connection
    (:func:`connect_adbc`). Same interface as :class:`~copystream.chunk.ChunkRunner`; after any
    exception the connection must be discarded."""

    def __init__(self, link: AdbcLink, target: Target, *, io_timeout: float) -> None:
        self.link = link
        self.secrets = target.secrets
        self.io_timeout = io_timeout
        self.chunks_served = 0
        self._error = link.error
        try:
            found = link.rows(sql.SQL("SELECT current_setting('server_version_num')::int"))
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
        watchdog = _Watchdog(self.link, self.io_timeout)
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

    def _begin(self, snapshot: str | None) -> None:
        self.link.command(sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        if snapshot is not None:
            try:
                query = sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot))
                self.link.command(query)
            except self._error as e:
                error = adbc_error(e, self.secrets)
                if isinstance(error, snapshot_gone_errors(self.server_version)):
                    raise SnapshotGone(str(error)) from None
                raise error from None
        found = self.link.rows(
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
        reader = self.link.stream(binary_query(c.table, after=c.after, upto=c.until, limit=limit))
        rows = nbytes = 0
        last_key: tuple[str, ...] | None = None
        width = len(reader.schema) - plan.key_columns
        for batch in reader:
            watchdog.pet()
            if batch.num_rows == 0:
                continue
            last_key = _key(batch, plan, batch.num_rows - 1)
            values = checked(batch, plan)  # (the key's text columns name a refused row)
            if plan.key_columns:
                values = values.select(range(width))
            dest.write_arrow(values)
            rows += batch.num_rows
            nbytes += values.nbytes
            if on_data is not None:
                on_data(rows, nbytes)
        self.link.command(sql.SQL("COMMIT"))
        return ChunkOutcome(rows=rows, last_key=last_key, final=limit is None or rows < limit)


# -- the values the client checks ---------------------------------------------------------------


def _key(batch: Any, plan: BinaryPlan, row: int) -> tuple[str, ...]:
    """The key of ``row`` of ``batch``, each column's text as PostgreSQL prints it."""
    return tuple(str(batch.column(i)[row].as_py()) for i in plan.key_at)


#: The bytes a value's highest byte is not when :func:`~copystream.parquet_types.refused_wire`
#: may refuse it (its two highest bits ``10``: see ``REFUSED_BELOW``).
_UNSUSPECTED = bytes(b for b in range(256) if b >> 6 != 0b10)


def _suspect(arr: Any, kind: str) -> bool:
    """Whether ``arr`` may hold a value below ``REFUSED_BELOW[kind]`` (a NULL's slot too: at
    worst a false alarm): the highest byte of each value taken in one strided
    copy, the unsuspected ones deleted; C loops only (Python's ``min`` over the values cost
    ~0.25 s of CPU per million rows and column)."""
    size = 4 if kind == "date" else 8
    data = memoryview(arr.buffers()[1])[arr.offset * size : (arr.offset + len(arr)) * size]
    highest = size - 1 if sys.byteorder == "little" else 0
    return bool(data[highest::size].tobytes().translate(None, _UNSUSPECTED))


def checked(batch: Any, plan: BinaryPlan) -> Any:
    """``batch`` with the values of ``plan.checks`` that PostgreSQL holds but Parquet does not
    (``infinity``, timestamps past its range, NaN decimals: :func:`refused_wire`) treated by
    ``plan.policy``, as the typed CSV's guards treat them on the server: ``"error"`` raises
    the error the server raises for the first such row (by key, then column), naming the
    column, the value and the key; ``"null"`` writes NULL; ``"clamp"`` the extreme value (a
    NaN is an error). One C pass over each column when there are none (the common case)."""
    flagged = [c for c in plan.checks if batch.num_rows and _suspect(batch.column(c[0]), c[2])]
    if not flagged:
        return batch
    import pyarrow as pa

    found: list[tuple[int, int, str, str, str]] = []  # row, column, name, kind, text
    for i, name, kind in flagged:
        arr = batch.column(i)
        storage = pa.int32() if kind == "date" else pa.int64()
        values = arr.view(storage).to_pylist()
        for row, v in enumerate(values):
            refused = None if v is None else refused_wire(v, kind)
            if refused is None:
                continue
            text, clamp = refused
            if plan.policy == "error" or (clamp is None and plan.policy == "clamp"):
                found.append((row, i, name, kind, text))
                break
            values[row] = None if plan.policy == "null" else clamp
        fixed = pa.array(values, storage).view(arr.type)
        batch = batch.set_column(i, batch.schema.field(i), fixed)
    if found:
        row, _, name, kind, text = min(found)
        key = _key(batch, plan, row)
        what = "NaN" if kind == "nan" else "a value outside Parquet's range"
        raise psycopg.errors.InvalidTextRepresentation(
            refusal(name, what, text, key[0] if len(key) == 1 else record_text(key))
        )
    return batch
