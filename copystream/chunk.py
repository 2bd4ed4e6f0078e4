"""One chunk: one READ ONLY, REPEATABLE READ transaction and one COPY, streamed to the sink.

Inside the chunk's snapshot the runner first finds the chunk's *bound* (the key of its n-th row),
or, when fewer rows remain, the greatest key (this is the final chunk). Then it runs
``COPY (SELECT … WHERE key > after AND key <= bound ORDER BY key LIMIT n) TO STDOUT`` and commits.
The last key therefore comes from the same snapshot as the rows, never from parsing CSV.

The COPY read loop is the hot path: PostgreSQL sends one CopyData message per row, so it runs
directly on :mod:`psycopg.pq` — ``get_copy_data(1)`` until it returns 0, then wait on the socket
and ``consume_input()`` — gathering rows into a ~1 MiB buffer before each write and hash. Every
wait has a timeout (:class:`StallTimeout`), so a black-holed network cannot hang an export. All
statements go through the extended query protocol, which runs exactly one statement each.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result

from .plan import CopyOptions, TablePlan, bound_query, copy_query, last_key_query
from .retry import StallTimeout
from .sink import Sink

__all__ = ["WRITE_BUFFER", "ChunkOutcome", "ChunkRunner"]

#: Rows are gathered until this many bytes, then written and hashed in one call each. Per-row
#: writes cost ~1.5x the time; beyond ~1 MiB nothing more is gained and memory grows.
WRITE_BUFFER = 1 << 20

_FLOAT_TYPES = ("real", "double precision", "float")
_DATETIME_TYPES = ("timestamp", "date", "time")


def key_text_settings(key_types: Sequence[str]) -> dict[str, str]:
    """Settings under which the key's text form parses back to exactly the same value. Pure.

    Floats need every digit. Date/time keys need ISO output: the SQL, Postgres and German
    DateStyles print a time zone *abbreviation*, which may parse back to another offset (under
    ``TimeZone=Asia/Kolkata`` "IST" is read as Israel time), and keys would be skipped.
    ISO input is read the same way under every DateStyle, so the COPY's literal is safe.
    """
    out: dict[str, str] = {}
    if any(t.startswith(_FLOAT_TYPES) for t in key_types):
        out["extra_float_digits"] = "3"
    if any(t.startswith(_DATETIME_TYPES) for t in key_types):
        out["DateStyle"] = "ISO"
    return out


@dataclass(frozen=True)
class ChunkOutcome:
    """What one committed chunk produced."""

    rows: int
    last_key: tuple[str, ...] | None  # None only when the chunk found no rows
    final: bool  # fewer rows than asked for remained: the export is complete


class ChunkRunner:
    """Runs chunks on one open connection (autocommit, settings already pinned).

    After any exception the connection must be discarded: the runner leaves it mid-protocol.
    """

    def __init__(self, conn: psycopg.Connection[Any], *, io_timeout: float) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.io_timeout = io_timeout
        self.encoding = conn.info.encoding
        self.chunks_served = 0

    # -- protocol helpers -------------------------------------------------------------------

    def _wait(self, *, write: bool = False) -> None:
        sock = self.pgconn.socket
        r, w, _ = select.select(
            [] if write else [sock], [sock] if write else [], [], self.io_timeout
        )
        if not (r or w):
            raise StallTimeout(
                f"no response from the server for {self.io_timeout:g}s (network stalled?)"
            )

    def _send(self, query: sql.Composable) -> None:
        self.pgconn.send_query_params(query.as_bytes(self.conn), None)
        while self.pgconn.flush():
            self._wait(write=True)

    def _result(self) -> pq.abc.PGresult | None:
        pgconn = self.pgconn
        while pgconn.is_busy():
            self._wait()
            pgconn.consume_input()
        return pgconn.get_result()

    def _raise(self, res: pq.abc.PGresult) -> None:
        err = error_from_result(res, encoding=self.encoding)
        while self._result() is not None:  # drain so the error is the whole story
            pass
        raise err

    def _execute(self, query: sql.Composable) -> list[tuple[str, ...]]:
        """Run one statement; return its rows as text (an empty list for a command)."""
        self._send(query)
        rows: list[tuple[str, ...]] = []
        while (res := self._result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                self._raise(res)
            if res.status == pq.ExecStatus.TUPLES_OK:
                for i in range(res.ntuples):
                    rows.append(
                        tuple(
                            (res.get_value(i, j) or b"").decode(self.encoding)
                            for j in range(res.nfields)
                        )
                    )
        return rows

    def _set_local(self, values: Mapping[str, str | None]) -> dict[str, str]:
        """Set each setting for this transaction (``None``: keep it); return the values before."""
        row = self._execute(
            sql.SQL("SELECT {}").format(
                sql.SQL(", ").join(
                    sql.SQL("current_setting({})").format(sql.Literal(n))
                    if v is None
                    else sql.SQL("set_config({}, {}, true)").format(sql.Literal(n), sql.Literal(v))
                    for n, v in values.items()
                )
            )
        )[0]
        return dict(zip(values, row, strict=True))

    # -- the chunk ----------------------------------------------------------------------------

    def run(
        self,
        plan: TablePlan,
        options: CopyOptions,
        *,
        after: Sequence[str] | None,
        rows: int,
        header: bool,
        sink: Sink,
        until: Sequence[str] | None = None,
        snapshot: str | None = None,
        on_data: Callable[[int, int], None] | None = None,
    ) -> ChunkOutcome:
        """Export the next ``rows`` rows after key ``after`` into ``sink``, committed.

        ``rows == 0`` exports everything after ``after`` in this one chunk (single-COPY mode).

        ``until`` closes the range (inclusive) for a parallel worker; ``final`` then means the
        range is exhausted. ``snapshot`` is an exported snapshot id to read from (point-in-time
        export). ``on_data(rows, bytes)`` is called after each buffer write with the chunk's
        totals so far.
        """
        self._execute(sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        if snapshot is not None:
            self._execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        local = key_text_settings(plan.key_types)
        if local:  # key text must round-trip exactly whatever settings are pinned
            saved = self._set_local({n: None for n in local})
            self._set_local(local)
        # rows == 0: the whole (rest of the) range in this one COPY
        found = self._execute(bound_query(plan, after, rows, until)) if rows > 0 else []
        final = not found
        if final:
            found = self._execute(last_key_query(plan, after, until))
        if local:  # the COPY itself runs under the pinned settings
            self._set_local(saved)
        last_key = found[0] if found else None
        copied = self._copy(
            copy_query(
                plan,
                options,
                after=after,
                upto=until if final else last_key,
                limit=None if final else rows,
                header=header,
            ),
            sink,
            on_data,
        )
        self._execute(sql.SQL("COMMIT"))
        self.chunks_served += 1
        return ChunkOutcome(rows=copied, last_key=last_key, final=final)

    def _copy(
        self, query: sql.Composable, sink: Sink, on_data: Callable[[int, int], None] | None
    ) -> int:
        self._send(query)
        res = self._result()
        if res is None or res.status != pq.ExecStatus.COPY_OUT:
            if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
                self._raise(res)
            raise psycopg.OperationalError("COPY did not start")
        pgconn = self.pgconn
        get = pgconn.get_copy_data
        wait = self._wait
        consume = pgconn.consume_input
        buf = bytearray()
        size = messages = written = 0
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                buf += data
                size += nbytes
                messages += 1
                if size >= WRITE_BUFFER:
                    sink.write(buf)
                    written += size
                    buf = bytearray()
                    size = 0
                    if on_data is not None:
                        on_data(messages, written)
            elif nbytes == 0:
                wait()
                consume()
            elif nbytes == -1:
                break
            else:  # -2 raises inside psycopg; anything else is a protocol surprise
                raise psycopg.OperationalError(f"unexpected COPY state {nbytes}")
        if buf:
            sink.write(buf)
            written += size
        res = self._result()
        if res is None:
            raise psycopg.OperationalError("COPY ended without a result")
        if res.status == pq.ExecStatus.FATAL_ERROR:
            self._raise(res)
        copied = int(res.command_tuples or 0)
        while self._result() is not None:
            pass
        if on_data is not None:
            on_data(messages, written)
        return copied
