"""One chunk: one READ ONLY, REPEATABLE READ transaction and one COPY, streamed to the destination.

The chunk's last key always comes from the same snapshot as its rows: from a query beside the
COPY, or, in one narrow case, from the COPY's own last row.

* With a unique key of one integer column (``smallint``, ``integer``, ``bigint``) that the COPY
  exports, in csv or text format, the COPY is ``COPY (SELECT … WHERE key > after ORDER BY key
  LIMIT n) TO STDOUT`` and the last key is read from its last CopyData message
  (:func:`copy_key_index`, :func:`key_from_row`). That is exact, not a guess at CSV: PostgreSQL
  sends one CopyData message per row, always, so the last message is the last row, of this very
  COPY and snapshot; an integer's output is plain ASCII digits with an optional ``-``, the same
  text as ``key::text`` under every setting; and the fields before it are split by COPY's own
  quoting rules (a csv field holding the delimiter, quote or a newline is quoted, a quote or
  escape inside doubled or escaped; a text field's delimiter is backslash-escaped), on the record
  decoded from the connection's encoding. ``final``: COPY reported fewer rows than asked. No
  sibling connection, no snapshot export, no bound query (~7% of the COPY's server time).
* With any other unique key (composite, not an integer, not exported, a Parquet export's typed
  CSV) the COPY is the same, and while it streams, a *sibling* connection that imported the
  chunk's snapshot (``pg_export_snapshot`` / ``SET TRANSACTION SNAPSHOT``) finds the key of the
  n-th row (or, when fewer rows remain, the greatest key: the final chunk). The bound query
  costs the server about 7% of the COPY's time; on its own backend it runs alongside the COPY
  instead of before it.
* With a key not provably unique the bound is found first, then the COPY runs with
  ``key > after AND key <= bound``, so rows that tie on the bound stay in one chunk.
* With ``rows == 0`` (single-COPY mode) there is no bound: the COPY takes the rest of the range.

The COPY read loop is the hot path: PostgreSQL sends one CopyData message per row, so it runs
directly on :mod:`psycopg.pq` — ``get_copy_data(1)`` until it returns 0, then wait on the socket
and ``consume_input()`` — gathering rows into a ~1 MiB buffer before each write and hash. Every
wait has a timeout (:class:`StallTimeout`), so a black-holed network cannot hang an export. All
statements go through the extended query protocol, which runs exactly one statement each.
"""

from __future__ import annotations

import functools
import re
import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import pq, sql
from psycopg.errors import error_from_result

from .destinations import Destination
from .queries import bound_query, copy_query, last_key_query
from .retry import StallTimeout
from .server import snapshot_gone_errors
from .spec import CopyOptions
from .table import ResolvedTable

__all__ = [
    "WRITE_BUFFER",
    "Chunk",
    "ChunkOutcome",
    "ChunkRunner",
    "copy_key_index",
    "key_from_row",
]

#: Rows are gathered until this many bytes, then written and hashed in one call each. Per-row
#: writes cost ~1.5x the time; beyond ~1 MiB nothing more is gained and memory grows.
WRITE_BUFFER = 1 << 20

#: Key types whose text is the same under every setting that shapes output (DateStyle,
#: extra_float_digits, ...), so it always parses back to exactly the same value.
_PLAIN_TYPES = frozenset(
    {
        "smallint", "integer", "bigint", "numeric", "text", "character varying", "character",
        "uuid", "bytea", "boolean", "oid", "name", "bit", "bit varying", "inet", "cidr",
        "macaddr", "macaddr8", "money", "pg_lsn", '"char"',
    }
)  # fmt: skip
_TYPMOD = re.compile(r"\(\d+(?:,\d+)?\)")


def key_text_settings(key_types: Sequence[str]) -> dict[str, str]:
    """Settings under which the key's text form parses back to exactly the same value. Pure.

    Floats need every digit: with fewer, 0.1 + 0.2 prints as 0.3, and paging from that text
    repeats the same chunk forever. Date/time keys need ISO output: the SQL, Postgres and German
    DateStyles print a time zone *abbreviation*, which may parse back to another offset (under
    ``TimeZone=Asia/Kolkata`` "IST" is read as Israel time), and keys would be skipped.
    ISO input is read the same way under every DateStyle, so the COPY's literal is safe.

    ``key_types`` are ``format_type`` names, which name a domain, range, composite or enum type
    by its own name and hide the float or timestamp inside; so every type not known to print the
    same way under all settings gets both settings (harmless for types that need neither).
    """
    plain = all(_TYPMOD.sub("", t).removesuffix("[]") in _PLAIN_TYPES for t in key_types)
    return {} if plain else {"extra_float_digits": "3", "DateStyle": "ISO"}


#: Key types COPY prints as plain ASCII digits with an optional '-' (never quoted unless forced,
#: the same text as ``key::text`` under every setting): the last key is read from the COPY's row.
_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})
_INTEGER = re.compile(r"-?[0-9]+")
_FORMATS = frozenset({"csv", "text"})


def copy_key_index(table: ResolvedTable, options: CopyOptions) -> int | None:
    """Where the key is among the COPY's fields when each chunk's last key can be read, exactly,
    from the COPY's own last row (see the module's docstring); ``None``: a query finds it. Pure.

    A unique key of one ``smallint``/``integer``/``bigint`` column, among the exported columns of
    a csv or text COPY of the bare columns. After the first field, a record is decoded with the
    connection's encoding, so an ``ENCODING`` of its own keeps the key first; a text COPY whose
    NULL string holds a backslash (which that field does not escape) too.
    """
    if not (table.key_unique and len(table.key) == 1 and table.key_types[0] in _INTEGER_TYPES):
        return None
    if table.select is not None or table.binary is not None or options.format not in _FORMATS:
        return None
    if table.key[0] not in table.columns:
        return None
    index = table.columns.index(table.key[0])
    odd_null = options.format == "text" and "\\" in (options.null or "")
    if index > 0 and (options.encoding is not None or odd_null):
        return None
    return index


def key_from_row(row: bytes, index: int, options: CopyOptions, encoding: str) -> tuple[str]:
    """The key (as ``key::text`` prints it) in field ``index`` of one COPY row. Pure.

    ``row`` is one CopyData message of a COPY that :func:`copy_key_index` found ``index`` for;
    ``encoding`` is the connection's (Python codec name). Raises :class:`ChunkMismatch` when
    the field is not an integer: the COPY is not the one this was asked about.
    """
    # The first field is ASCII (digits), whatever the encoding: latin-1 reads any byte as one.
    text = row.decode(encoding if index else "latin-1", "surrogateescape").removesuffix("\n")
    csv = options.format == "csv"
    delim = options.delimiter or ("," if csv else "\t")
    quote = (options.quote or '"') if csv else ""
    escape = (options.escape or quote) if csv else "\\"
    start = 0
    try:
        for _ in range(index):
            start = _field_end(text, start, delim, quote, escape) + 1
        field = text[start : _field_end(text, start, delim, quote, escape)]
    except IndexError:
        field = ""
    if not csv:  # a backslash escapes the next character ("\\-" under DELIMITER '-')
        field = re.sub(r"\\(.)", r"\1", field, flags=re.S)
    elif field.startswith(quote):  # FORCE_QUOTE, or digits holding the delimiter or quote
        field = re.sub(re.escape(escape) + "(.)", r"\1", field[1:-1], flags=re.S)
    if not _INTEGER.fullmatch(field):
        raise ChunkMismatch(f"the COPY's last row has no integer key in field {index + 1}")
    return (field,)


def _field_end(text: str, start: int, delim: str, quote: str, escape: str) -> int:
    """Where the field of a COPY record that starts at ``start`` ends (its delimiter, or the
    record's end). Pure. csv (``quote`` set): a field starting with the quote runs to the quote
    that is not escaped (a quote or an escape inside is preceded by ``escape``); any other field
    holds no delimiter. text (``quote`` empty): a backslash escapes the character after it.
    """
    if quote and text.startswith(quote, start):
        i = start + 1
        while True:
            c = text[i]  # IndexError: no closing quote
            if c == escape and text[i + 1 : i + 2] in (quote, escape):
                i += 2
            elif c == quote:
                return i + 1
            else:
                i += 1
    if quote:
        end = text.find(delim, start)
        return len(text) if end < 0 else end
    i = start
    while i < len(text) and text[i] != delim:
        i += 2 if text[i] == escape else 1
    return min(i, len(text))


@dataclass(frozen=True)
class ChunkOutcome:
    """What one committed chunk produced."""

    rows: int
    last_key: tuple[str, ...] | None  # None only when the chunk found no rows
    final: bool  # fewer rows than asked for remained: the export is complete


@dataclass(frozen=True)
class Chunk:
    """The chunk to run: the next ``rows`` rows of ``table`` after key ``after``.

    ``rows == 0`` exports everything after ``after`` in one chunk (single-COPY mode). ``until``
    closes the range (inclusive) for a parallel worker; ``final`` then means the range is
    exhausted. ``header``: this chunk starts the file and carries the header line.
    ``snapshot``: an exported snapshot id to read from (point-in-time export).
    """

    table: ResolvedTable
    options: CopyOptions
    after: Sequence[str] | None
    rows: int
    header: bool = False
    until: Sequence[str] | None = None
    snapshot: str | None = None


#: SQLSTATEs of ``SET TRANSACTION SNAPSHOT`` refusing a snapshot whose exporter has ended.
_GONE = frozenset({b"22023", b"55000"})


class ChunkMismatch(psycopg.OperationalError):
    """The COPY and the bound query disagree on the chunk's rows (they share one snapshot)."""


class SnapshotGone(psycopg.OperationalError):
    """``SET TRANSACTION SNAPSHOT`` refused the exported snapshot: the transaction that
    exported it has ended (22023 "invalid snapshot identifier" up to PostgreSQL 16, 42704
    "snapshot … does not exist" from 17, or 55000 "could not import the requested snapshot" when
    its file outlived it by a moment), whatever the server's language
    (:func:`copystream.server.snapshot_gone_errors`).
    """


class _Session:
    """Protocol steps on one connection: every wait has the I/O timeout."""

    def __init__(self, conn: psycopg.Connection[Any], io_timeout: float) -> None:
        self.conn = conn
        self.pgconn = conn.pgconn
        self.io_timeout = io_timeout
        self.encoding = conn.info.encoding
        #: The last CopyData message of the COPY streamed last (its last row, or its header).
        self.last_row: bytes | memoryview = b""

    def wait(self, *, write: bool = False) -> None:
        sock = self.pgconn.socket
        r, w, _ = select.select(
            [] if write else [sock], [sock] if write else [], [], self.io_timeout
        )
        if not (r or w):
            raise StallTimeout(
                f"no response from the server for {self.io_timeout:g}s (network stalled?)"
            )

    def wait_with(self, sibling: _Sibling) -> None:
        """Wait for data on this connection, meanwhile moving ``sibling``'s queries on."""
        while not sibling.done:
            r, _, _ = select.select(
                [self.pgconn.socket, sibling.s.pgconn.socket], [], [], self.io_timeout
            )
            if not r:
                raise StallTimeout(
                    f"no response from the server for {self.io_timeout:g}s (network stalled?)"
                )
            if sibling.s.pgconn.socket in r:
                sibling.poll()
            if self.pgconn.socket in r:
                return
        self.wait()

    def send(self, query: sql.Composable) -> None:
        self.pgconn.send_query_params(query.as_bytes(self.conn), None)
        while self.pgconn.flush():
            self.wait(write=True)

    def result(self) -> pq.abc.PGresult | None:
        pgconn = self.pgconn
        while pgconn.is_busy():
            self.wait()
            pgconn.consume_input()
        return pgconn.get_result()

    def fail(self, res: pq.abc.PGresult) -> None:
        err = error_from_result(res, encoding=self.encoding)
        while self.result() is not None:  # drain so the error is the whole story
            pass
        raise err

    def collect(self) -> list[tuple[str, ...]]:
        """The rows (as text) of the statement sent last; an empty list for a command."""
        rows: list[tuple[str, ...]] = []
        while (res := self.result()) is not None:
            if res.status == pq.ExecStatus.FATAL_ERROR:
                self.fail(res)
            if res.status == pq.ExecStatus.TUPLES_OK:
                rows += self.text_rows(res)
        return rows

    def text_rows(self, res: pq.abc.PGresult) -> list[tuple[str, ...]]:
        """The rows of ``res``, as text."""
        return [
            tuple((res.get_value(i, j) or b"").decode(self.encoding) for j in range(res.nfields))
            for i in range(res.ntuples)
        ]

    def execute(self, query: sql.Composable) -> list[tuple[str, ...]]:
        """Run one statement; return its rows as text (an empty list for a command)."""
        self.send(query)
        return self.collect()

    def set_local(self, values: Mapping[str, str | None]) -> dict[str, str]:
        """Set each setting for this transaction (``None``: keep it); return the values before."""
        row = self.execute(
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

    def begin(self, snapshot: str | None) -> None:
        self.execute(sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY"))
        if snapshot is not None:
            try:
                self.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            except snapshot_gone_errors(self.conn.info.server_version) as e:
                raise SnapshotGone(str(e)) from e

    def copy(
        self,
        query: sql.Composable,
        dest: Destination,
        on_data: Callable[[int, int], None] | None,
        *,
        header: bool = False,
        sibling: _Sibling | None = None,
    ) -> int:
        """Stream a ``COPY … TO STDOUT`` into ``dest``; return the rows COPY reported.

        ``on_data(rows, bytes)`` gets rows so far, not counting a ``header`` line. While the
        COPY waits for data, a ``sibling``'s queries are moved on as their answers arrive.
        """
        self.send(query)
        pgconn = self.pgconn
        wait = self.wait if sibling is None else functools.partial(self.wait_with, sibling)
        while pgconn.is_busy():  # the COPY may first wait for its lock: keep the sibling going
            wait()
            pgconn.consume_input()
        res = pgconn.get_result()
        if res is None or res.status != pq.ExecStatus.COPY_OUT:
            if res is not None and res.status == pq.ExecStatus.FATAL_ERROR:
                self.fail(res)
            raise psycopg.OperationalError("COPY did not start")
        copied = self.stream(dest, on_data, header=header, wait=wait)
        while self.result() is not None:
            pass
        return copied

    def stream(
        self,
        dest: Destination,
        on_data: Callable[[int, int], None] | None,
        *,
        header: bool,
        wait: Callable[[], None],
    ) -> int:
        """The rows of a COPY whose ``COPY_OUT`` result was taken, into ``dest``; its end
        taken too, the rows COPY reported; its last message in :attr:`last_row`. (The
        statements after it, if any, are not.)"""
        pgconn = self.pgconn
        get = pgconn.get_copy_data
        consume = pgconn.consume_input
        buf = bytearray()
        size = written = 0
        messages = -1 if header else 0  # one message per row, plus the header line
        last: bytes | memoryview = b""
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                last = data
                buf += data
                size += nbytes
                messages += 1
                if size >= WRITE_BUFFER:
                    dest.write(buf)
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
            dest.write(buf)
            written += size
        self.last_row = last
        res = self.result()
        if res is None:
            raise psycopg.OperationalError("COPY ended without a result")
        if res.status == pq.ExecStatus.FATAL_ERROR:
            self.fail(res)
        if on_data is not None:
            on_data(max(messages, 0), written)
        return int(res.command_tuples or 0)


class _Sibling:
    """The sibling's queries for one chunk: the bound, maybe the last key, then ROLLBACK.

    Moved on whenever its socket is readable (also while the COPY streams), so that its
    transaction, and the table lock it holds, ends as soon as its answer is in. Otherwise a
    statement wanting an exclusive lock (ALTER TABLE, TRUNCATE) that queued between the sibling's
    lock and the COPY's would wait for the sibling, the COPY would wait behind it, and the
    sibling would wait for the COPY to end: a deadlock PostgreSQL cannot see.
    """

    def __init__(
        self,
        s: _Session,
        plan: ResolvedTable,
        after: Sequence[str] | None,
        rows: int,
        until: Sequence[str] | None,
    ) -> None:
        self.s, self.plan, self.after, self.until = s, plan, after, until
        self.stage = "bound"
        self.rows: list[tuple[str, ...]] = []
        self.last_key: tuple[str, ...] | None = None
        self.final = False
        self.done = False
        self.error: BaseException | None = None
        s.send(bound_query(plan, after, rows, until))

    def poll(self) -> None:
        """Take whatever answers have arrived and send the next query; never blocks."""
        pg = self.s.pgconn
        pg.consume_input()
        while not self.done and not pg.is_busy():
            res = pg.get_result()
            if res is None:
                self._next()
            elif res.status == pq.ExecStatus.FATAL_ERROR and self.error is None:
                self.error = error_from_result(res, encoding=self.s.encoding)
            elif res.status == pq.ExecStatus.TUPLES_OK:
                self.rows.extend(
                    tuple(
                        (res.get_value(i, j) or b"").decode(self.s.encoding)
                        for j in range(res.nfields)
                    )
                    for i in range(res.ntuples)
                )

    def _next(self) -> None:
        if self.error is not None:  # the statement failed: its transaction is aborted
            if self.stage == "rollback":
                self.done = True
            else:
                self.stage = "rollback"
                self.s.send(sql.SQL("ROLLBACK"))
            return
        if self.stage == "bound":
            if self.rows:
                self.last_key, self.final = self.rows[0], False
                self.stage = "rollback"
                self.s.send(sql.SQL("ROLLBACK"))
            else:
                self.stage = "last"
                self.s.send(last_key_query(self.plan, self.after, self.until))
        elif self.stage == "last":
            self.last_key, self.final = (self.rows[0] if self.rows else None), True
            self.stage = "rollback"
            self.s.send(sql.SQL("ROLLBACK"))
        else:
            self.done = True
        self.rows = []

    def finish(self) -> tuple[tuple[str, ...] | None, bool]:
        """Wait for the remaining answers; ``(last key, final)``."""
        while not self.done:
            if self.s.pgconn.is_busy():
                self.s.wait()
            self.poll()
        if self.error is not None:
            raise self.error
        return self.last_key, self.final


class ChunkRunner:
    """Runs chunks on open connections (autocommit, settings already pinned).

    ``side`` is an optional second connection that finds each chunk's last key while the main
    one streams the COPY. After any exception both connections must be discarded: the runner
    leaves them mid-protocol.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        *,
        io_timeout: float,
        side: psycopg.Connection[Any] | None = None,
    ) -> None:
        self.main = _Session(conn, io_timeout)
        self.side = _Session(side, io_timeout) if side is not None else None
        self.chunks_served = 0

    def run(
        self,
        chunk: Chunk,
        dest: Destination,
        on_data: Callable[[int, int], None] | None = None,
    ) -> ChunkOutcome:
        """Export ``chunk`` into ``dest``, committed.

        ``on_data(rows, bytes)`` is called after each buffer write with the chunk's totals so far.
        """
        index = copy_key_index(chunk.table, chunk.options) if chunk.rows > 0 else None
        if index is not None:
            outcome = self._run_keyed(chunk, dest, on_data, index)
        elif self.side is not None and chunk.table.key_unique and chunk.rows > 0:
            outcome = self._run_overlapped(chunk, dest, on_data)
        else:
            outcome = self._run_serial(chunk, dest, on_data)
        self.chunks_served += 1
        return outcome

    def run_whole(
        self,
        c: Chunk,
        dest: Destination,
        on_data: Callable[[int, int], None] | None = None,
    ) -> ChunkOutcome:
        """Export the whole table of ``c`` into ``dest`` in one round trip, committed.

        The transaction's statements (begin, import the snapshot, find the last key, COPY,
        commit) go as one query, as psql sends a script: for a small table the round trips,
        not the rows, are the cost. A key that :func:`copy_key_index` finds among the COPY's
        fields is read from its last row instead of queried (the query costs the server more
        than a small table's COPY). That is the simple query protocol, which runs any number
        of statements: so only for a chunk whose statements hold no SQL of the user's (no
        filter; everything else is composed of quoted identifiers and literals), of the whole
        table. (A ``statement_timeout`` set inside such a query does not hold for it: set one
        on the session first.)
        """
        m = self.main
        query, count, imported, last = _whole_query(c, m.conn)
        m.pgconn.send_query(query)
        while m.pgconn.flush():
            m.wait(write=True)
        last_key: tuple[str, ...] | None = None
        copied = 0
        for i in range(count):
            res = m.result()
            if res is None:
                raise psycopg.OperationalError("the server answered fewer statements than sent")
            if res.status == pq.ExecStatus.FATAL_ERROR:
                if i == imported and res.error_field(pq.DiagnosticField.SQLSTATE) in _GONE:
                    gone = error_from_result(res, encoding=m.encoding)
                    while m.result() is not None:
                        pass
                    raise SnapshotGone(str(gone)) from gone
                m.fail(res)
            if i == last:
                found = m.text_rows(res)
                last_key = found[0] if found else None
            if res.status == pq.ExecStatus.COPY_OUT:
                copied = m.stream(dest, on_data, header=c.header, wait=m.wait)
        while m.result() is not None:
            pass
        if last < 0 and copied:  # the key is a field of the COPY's rows
            index = copy_key_index(c.table, c.options)
            assert index is not None
            last_key = key_from_row(bytes(m.last_row), index, c.options, m.encoding)
        self.chunks_served += 1
        return ChunkOutcome(rows=copied, last_key=last_key, final=True)

    def _find_last(self, s: _Session, c: Chunk) -> tuple[tuple[str, ...] | None, bool]:
        """``(last key, final)`` in ``s``'s open transaction."""
        s.send(bound_query(c.table, c.after, c.rows, c.until))
        found = s.collect()
        if found:
            return found[0], False
        found = s.execute(last_key_query(c.table, c.after, c.until))
        return (found[0] if found else None), True

    def _run_serial(
        self, c: Chunk, dest: Destination, on_data: Callable[[int, int], None] | None
    ) -> ChunkOutcome:
        m = self.main
        m.begin(c.snapshot)
        local = key_text_settings(c.table.key_types)
        if local:  # key text must round-trip exactly whatever settings are pinned
            saved = m.set_local({n: None for n in local})
            m.set_local(local)
        if c.rows > 0:
            last_key, final = self._find_last(m, c)
        else:  # the whole (rest of the) range in this one COPY
            found = m.execute(last_key_query(c.table, c.after, c.until))
            last_key, final = (found[0] if found else None), True
        if local:  # the COPY itself runs under the pinned settings
            m.set_local(saved)
        query = copy_query(
            c.table,
            c.options,
            after=c.after,
            upto=c.until if final else last_key,
            limit=None if final else c.rows,
            header=c.header,
        )
        copied = m.copy(query, dest, on_data, header=c.header)
        m.execute(sql.SQL("COMMIT"))
        return ChunkOutcome(rows=copied, last_key=last_key, final=final)

    def _run_keyed(
        self,
        c: Chunk,
        dest: Destination,
        on_data: Callable[[int, int], None] | None,
        index: int,
    ) -> ChunkOutcome:
        """The chunk's COPY alone: its last key is field ``index`` of its last row
        (:func:`copy_key_index`); ``final`` when it returned fewer rows than asked."""
        m = self.main
        m.begin(c.snapshot)
        query = copy_query(
            c.table, c.options, after=c.after, upto=c.until, limit=c.rows, header=c.header
        )
        copied = m.copy(query, dest, on_data, header=c.header)
        m.execute(sql.SQL("COMMIT"))
        last_key = key_from_row(bytes(m.last_row), index, c.options, m.encoding) if copied else None
        return ChunkOutcome(rows=copied, last_key=last_key, final=copied < c.rows)

    def _run_overlapped(
        self, c: Chunk, dest: Destination, on_data: Callable[[int, int], None] | None
    ) -> ChunkOutcome:
        m, s = self.main, self.side
        assert s is not None
        m.begin(c.snapshot)
        snapshot = c.snapshot
        if snapshot is None:
            snapshot = m.execute(sql.SQL("SELECT pg_export_snapshot()"))[0][0]
        try:
            s.begin(snapshot)  # the sibling now sees exactly what the COPY will see
        except SnapshotGone as e:
            if c.snapshot is not None:
                raise
            # The main transaction that exported the snapshot is gone (its backend was
            # terminated, just before or while the sibling imported it): a lost connection,
            # not a bad request.
            raise psycopg.OperationalError(
                f"the chunk's connection was lost while its snapshot was being shared ({e})"
            ) from e
        local = key_text_settings(c.table.key_types)
        if local:
            s.set_local(local)
        sibling = _Sibling(s, c.table, c.after, c.rows, c.until)  # runs while the COPY streams
        query = copy_query(
            c.table, c.options, after=c.after, upto=c.until, limit=c.rows, header=c.header
        )
        copied = m.copy(query, dest, on_data, header=c.header, sibling=sibling)
        # End the COPY's transaction before waiting for the sibling: the sibling may be queued
        # behind an exclusive lock that waits for this transaction. Its imported snapshot
        # outlives the transaction that exported it.
        m.execute(sql.SQL("COMMIT"))
        last_key, final = sibling.finish()
        if (copied == c.rows) == final:
            raise ChunkMismatch(
                f"COPY returned {copied} rows but the bound query says the chunk "
                f"{'ends the range' if final else 'is full'} (asked for {c.rows})"
            )
        return ChunkOutcome(rows=copied, last_key=last_key, final=final)


#: :func:`_whole_query`'s queries by the shape of their table (all but its name), as bytes
#: around the places of the name: a job of many tables alike composes one, not one each
#: (composing with ``psycopg.sql`` costs more than a small table's COPY takes on the client).
_SHAPES: dict[tuple[Any, ...], tuple[list[bytes], int, int, int]] = {}
_SHAPES_KEPT = 256
#: The name a shape is composed with, replaced by the table's own (quoted as every identifier).
_SHAPE_NAME = ("copystream shape 6d1f", "of a table")


def _whole_query(c: Chunk, conn: psycopg.Connection[Any]) -> tuple[bytes, int, int, int]:
    """:func:`_whole_statements` of ``c`` as one query, ``;``-separated, as ``conn`` encodes
    it; with the number of statements, the index of the snapshot's import and of the last
    key's query. Composed once per shape of table (see :data:`_SHAPES`)."""
    t = c.table
    if t.select is not None:  # (Parquet: typed forms; not hashable, never a small table)
        statements, imported, last = _whole_statements(c)
        return b"; ".join(q.as_bytes(conn) for q in statements), len(statements), imported, last
    shape = (
        t.columns, t.key, t.key_types, t.key_unique, t.key_indexed, t.relkind,
        c.options, c.header, c.snapshot, conn.info.encoding,
    )  # fmt: skip
    known = _SHAPES.get(shape)
    if known is None:
        stand_in = replace(t, schema=_SHAPE_NAME[0], name=_SHAPE_NAME[1])
        statements, imported, last = _whole_statements(replace(c, table=stand_in))
        whole = b"; ".join(q.as_bytes(conn) for q in statements)
        known = (whole.split(stand_in.table_ident.as_bytes(conn)), len(statements), imported, last)
        if len(_SHAPES) >= _SHAPES_KEPT:
            _SHAPES.clear()
        _SHAPES[shape] = known
    parts, count, imported, last = known
    return t.table_ident.as_bytes(conn).join(parts), count, imported, last


def _whole_statements(c: Chunk) -> tuple[list[sql.Composable], int, int]:
    """The statements of :meth:`ChunkRunner.run_whole`, the index of the snapshot's import
    (-1: none) and of the last key's query (-1: none, the key is read from the COPY's last
    row: :func:`copy_key_index`). Pure."""
    t = c.table
    if not (c.rows == 0 and c.after is None and c.until is None and t.where is None):
        raise ValueError("run_whole exports a whole table without a filter")
    statements: list[sql.Composable] = [sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")]
    imported = -1
    if c.snapshot is not None:
        imported = len(statements)
        statements.append(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(c.snapshot)))
    local = key_text_settings(t.key_types)
    if local:  # key text must round-trip exactly; the savepoint's rollback undoes the settings
        statements.append(sql.SQL("SAVEPOINT copystream_key"))
        statements += [
            sql.SQL("SELECT set_config({}, {}, true)").format(sql.Literal(n), sql.Literal(v))
            for n, v in local.items()
        ]
    last = -1
    if copy_key_index(t, c.options) is None:
        last = len(statements)
        statements.append(last_key_query(t, None, None))
    if local:
        statements.append(sql.SQL("ROLLBACK TO SAVEPOINT copystream_key"))
    copy = copy_query(t, c.options, after=None, upto=None, limit=None, header=c.header)
    statements += [copy, sql.SQL("COMMIT")]
    return statements, imported, last
