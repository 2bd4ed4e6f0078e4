"""A Parquet dataset as a destination: typed CSV chunks decoded to Arrow, written as part files.

OUTPUT is a directory (the Hive/Spark/DuckDB convention) of ``part-00000.parquet``,
``part-00001.parquet``, ... in key order. The chunk loop streams each chunk's COPY (the typed CSV
of :mod:`copystream.parquet_types`) into :meth:`ParquetDataset.write` in buffers of whole rows
(the chunk runner gathers whole COPY messages, one per row); every ~4 MiB is parsed by Arrow's
CSV reader with explicit column types (:class:`Decoder`), and every ``row_group_size`` bytes of
Arrow data, and the end of every chunk, becomes one row group of the part in flight. So memory
holds at most one row group, whatever the table's size. Parsing and writing run on a thread of
their own (:class:`_Decoding`, at most two blocks queued), overlapping the COPY's reading.

A part is written to a hidden temporary file (``.part-00003.parquet.tmp``, which readers skip);
once it holds ``part_size`` bytes or ``part_rows`` rows (or the last chunk has ended) it is
closed, hashed (xxh3-128), and in the commit thread fsynced, renamed to its name and its
directory fsynced, before the checkpoint that records it is written. A part is therefore
complete or absent.

Resuming is by part (:func:`resume_point`): the checkpoint records every chunk, but only the
chunks inside *sealed* parts count; a resume deletes the part in flight (and a part renamed just
before a kill, that no checkpoint records) and continues after the last sealed part's last key.
A chunk that fails after some of its row groups were written is rolled back by rewriting the
part in flight without them (row groups end at chunk ends, so they are whole).
"""

from __future__ import annotations

import array
import contextlib
import decimal
import json
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import xxhash

from .._atomic import fsync_dir, raise_if_full
from ..checkpoint import Checkpoint
from ..errors import ExportFailed, PrefixMismatch, UsageError, VerificationFailed
from ..parquet_types import INTERVAL_STRUCT
from . import ChunkWritten
from .local import hash_range

__all__ = [
    "KIND",
    "Decoder",
    "ParquetDataset",
    "combined",
    "dataset_digest",
    "fresh_state",
    "require_pyarrow",
    "resume_point",
    "verify_dataset",
]

#: The ``kind`` of a Parquet dataset's state in a checkpoint.
KIND = "parquet"

#: CSV bytes parsed at a time: large enough for Arrow's parser to run at full speed, small
#: next to a row group.
PARSE_BYTES = 2 * 1024 * 1024

#: zstd's level (Arrow's default is 1; zstd's own, DuckDB's and Spark's, 3): on the bench table
#: 0.7% larger files than 3 for ~8% less CPU in the decoding thread (1 was no cheaper here
#: and 5.5% larger).
ZSTD_LEVEL = 2

#: What the decoding thread parses: whole rows of typed CSV, or (the binary path) an Arrow
#: record batch as ADBC decoded it, to fix (:meth:`Decoder.from_batch`).
Block = bytes | bytearray | memoryview | Any

#: The decoding thread's marker of a chunk's end: write its last rows as a row group.
END_OF_CHUNK: Block = bytearray()

#: How long mimalloc (pyarrow's allocator when the environment chooses it, see
#: :data:`MEMORY_POOL`) keeps freed memory before returning it to the system, in ms (its
#: default: 10). Each block's parsed columns are freed a moment after they are allocated, by
#: another thread; kept, they added ~20 MB to the peak RSS of an export.
MIMALLOC_PURGE_DELAY = "0"

#: pyarrow's allocator unless the environment names one (``ARROW_DEFAULT_MEMORY_POOL``): the
#: C library's malloc (glibc's), which keeps freed memory in its heap for the next row group.
#: mimalloc, returning freed pages at once, had every row group's buffers (the writer's pages
#: and compression buffers: the writer allocates from the default pool whatever pool it is
#: given) faulted in and zeroed again: on 1,000,000 rows of the bench table ~83,000 page
#: faults against ~27,000, and the decoding thread's CPU 1.40-1.61 s against 0.97-1.00 s;
#: peak RSS the same on the binary path (~130 MB), ~5-10 MB more on the typed CSV's (~140 MB).
MEMORY_POOL = "system"

#: Blocks waiting for the decoding thread: enough to keep it busy while the chunk loop reads
#: the next one, few enough to bound memory (2 x PARSE_BYTES).
QUEUED_BLOCKS = 2


def require_pyarrow() -> Any:
    """The ``pyarrow`` module (with its csv and parquet modules), or a :class:`UsageError`
    saying how to install it."""
    if "pyarrow" not in sys.modules:  # read once, when pyarrow's allocator starts
        os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", MEMORY_POOL)
        os.environ.setdefault("MIMALLOC_PURGE_DELAY", MIMALLOC_PURGE_DELAY)
    try:
        import pyarrow
        import pyarrow.csv
        import pyarrow.parquet
    except ImportError as e:
        raise UsageError(
            "Parquet output needs pyarrow: pip install 'copystream[parquet]'"
        ) from e
    return pyarrow


# -- decoding ---------------------------------------------------------------------------------


def _arrow_type(pa: Any, name: str) -> Any:
    """The Arrow type a :class:`~copystream.parquet_types.ColumnPlan` names."""
    if name.startswith("decimal128("):
        p, s = name[len("decimal128(") : -1].split(",")
        return pa.decimal128(int(p), int(s))
    if name.startswith("list<"):
        return pa.list_(_arrow_type(pa, name[len("list<") : -1]))
    if name == INTERVAL_STRUCT:
        fields = [("months", pa.int32()), ("days", pa.int32()), ("microseconds", pa.int64())]
        return pa.struct(fields)
    simple = {
        "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(), "uint32": pa.uint32(),
        "float32": pa.float32(), "float64": pa.float64(), "bool": pa.bool_(),
        "string": pa.string(), "binary": pa.binary(), "date32": pa.date32(),
        "timestamp[us]": pa.timestamp("us"), "timestamp[us, UTC]": pa.timestamp("us", "UTC"),
        "time64[us]": pa.time64("us"), "uuid": pa.uuid(), "json": pa.json_(),
    }  # fmt: skip
    return simple[name]


def _wire_type(pa: Any, arrow: str, wire: str) -> Any:
    """The type Arrow's CSV reader parses a column of ``wire`` form into."""
    if wire == "micros":
        return pa.int64()
    if wire == "days":
        return pa.int32()
    if wire != "text" or arrow == "json":
        return pa.string()
    return _arrow_type(pa, arrow)


class Decoder:
    """Typed CSV of whole rows → an Arrow table of the export's schema.

    ``columns`` are the ``[name, pg_type, arrow, wire]`` records of the export's identity.
    """

    def __init__(self, columns: Sequence[Sequence[str]]) -> None:
        pa = require_pyarrow()
        self.pa = pa
        self.columns = [tuple(c) for c in columns]
        names = [c[0] for c in self.columns]
        self.schema = pa.schema(
            [pa.field(c[0], _arrow_type(pa, c[2]), metadata={"postgresql_type": c[1]})
             for c in self.columns]
        )  # fmt: skip
        # Column names in the CSV are positions: a table's names may repeat case-insensitively
        # or be empty-ish for Arrow, positions never are.
        self._names = [f"c{i}" for i in range(len(names))]
        self._convert = pa.csv.ConvertOptions(
            column_types={
                n: _wire_type(pa, c[2], c[3])
                for n, c in zip(self._names, self.columns, strict=True)
            },
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,  # "" is an empty string, nothing is NULL
            true_values=["t"],
            false_values=["f"],
        )
        # An empty line is a row: the NULL of a one-column table.
        self._parse = pa.csv.ParseOptions(newlines_in_values=True, ignore_empty_lines=False)
        #: Columns dictionary-encoded: text ones, where values repeat. Numbers, instants,
        #: uuids and JSON documents are mostly distinct: a dictionary would be built up to its
        #: limit and dropped (ids were 2.6x larger that way than plain, as DuckDB writes them;
        #: the bench table's jsonb, 75% distinct, took ~15% of the writer's CPU that way, for a
        #: file 1.7% larger than plain).
        self.dictionary_columns = [
            c[0] for c in self.columns if c[2] in ("string", "binary", "list<string>")
        ]

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """The rows of ``data`` (typed CSV, whole rows) as a ``pyarrow.Table``."""
        pa = self.pa
        buf = pa.py_buffer(data)
        read = pa.csv.ReadOptions(
            column_names=self._names, use_threads=False, block_size=max(buf.size + 1, 1 << 20)
        )
        raw = pa.csv.read_csv(
            pa.BufferReader(buf),
            read_options=read,
            parse_options=self._parse,
            convert_options=self._convert,
        )
        arrays = [
            self._finish(c, raw.column(i).combine_chunks()) for i, c in enumerate(self.columns)
        ]
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def from_batch(self, batch: Any) -> Any:
        """An Arrow record batch as ADBC decoded the binary path's SELECT
        (:class:`~copystream.parquet_types.BinaryPlan`) as a ``pyarrow.Table`` of the export's
        schema: the same values the typed CSV gives, column by column (:meth:`_fix`)."""
        arrays = [self._fix(c, batch.column(i)) for i, c in enumerate(self.columns)]
        return self.pa.Table.from_arrays(arrays, schema=self.schema)

    def _fix(self, column: tuple[str, ...], arr: Any) -> Any:
        """One column of ADBC's batch as the export's type: integer forms viewed as instants,
        text forms (arrays, struct intervals) parsed as the CSV path parses them, numeric's
        text (an opaque extension) cast to its decimal exactly, oid's int32 seen as uint32,
        and an extension type (uuid, json) rewrapped as Arrow's own."""
        pa = self.pa
        _, _, arrow, wire = column
        if wire in ("micros", "days", "json", "interval"):
            return self._finish(column, arr)
        target = _arrow_type(pa, arrow)
        if arr.type == target:
            return arr
        if isinstance(arr.type, pa.BaseExtensionType):  # e.g. ADBC 1.11-1.12's opaque uuid
            arr = arr.storage
        if arrow == "uuid" and arr.type != target.storage_type:
            arr = _fixed16(pa, arr)
        if arrow.startswith("decimal128("):
            return _decimals(pa, arr, target)
        if arrow == "uint32":  # an oid's 32 bits, as ADBC read them into an int32
            return pa.Array.from_buffers(
                target, len(arr), arr.buffers(), arr.null_count, arr.offset
            )
        if isinstance(target, pa.BaseExtensionType):
            return pa.ExtensionArray.from_storage(target, arr)
        return arr

    def _finish(self, column: tuple[str, ...], arr: Any) -> Any:
        pa = self.pa
        _, _, arrow, wire = column
        if wire in ("micros", "days"):  # the integers are the type's storage: a view, no copy
            return pa.Array.from_buffers(
                _arrow_type(pa, arrow), len(arr), arr.buffers(), arr.null_count, arr.offset
            )
        if wire == "uuid":
            return pa.ExtensionArray.from_storage(pa.uuid(), _unhex_uuid(pa, arr))
        if wire == "hex":
            return _unhex_bytea(pa, arr)
        if wire == "json":
            return _lists(pa, arr, _arrow_type(pa, arrow))
        if wire == "interval":
            return _intervals(pa, arr, _arrow_type(pa, arrow))
        if arrow == "json":
            return pa.ExtensionArray.from_storage(pa.json_(), arr)
        return arr


# The hex columns are decoded by one ``bytes.fromhex`` over the whole column's text (no Python
# step per value, and no pyarrow.compute: importing it costs ~9 MB of memory per process).


def _text(pa: Any, arr: Any) -> tuple[Any, memoryview, bytes]:
    """``arr`` (a string array) unsliced, its offsets and the bytes of its values."""
    if arr.offset:  # a slice: a copy whose buffers start at its first value
        arr = pa.concat_arrays([arr])
    _, offsets_buf, data_buf = arr.buffers()
    offsets = memoryview(offsets_buf).cast("i")[: len(arr) + 1]
    values = memoryview(data_buf)[offsets[0] : offsets[len(arr)]] if len(arr) else b""
    return arr, offsets, bytes(values)


def _unhex_uuid(pa: Any, arr: Any) -> Any:
    """A uuid's text (``8-4-4-4-12`` hex digits; a NULL has none) as 16-byte binary."""
    arr, offsets, text = _text(pa, arr)
    data = bytes.fromhex(text.replace(b"-", b"").decode("ascii"))
    if arr.null_count:  # a NULL's 16 bytes (hidden by the validity bitmap) are zeros
        values = iter(range(0, len(data), 16))
        zero = bytes(16)
        data = b"".join(
            zero if offsets[i + 1] == offsets[i] else data[(at := next(values)) : at + 16]
            for i in range(len(arr))
        )
    validity = arr.buffers()[0] if arr.null_count else None
    return pa.Array.from_buffers(
        pa.binary(16), len(arr), [validity, pa.py_buffer(data)], arr.null_count
    )


def _unhex_bytea(pa: Any, arr: Any) -> Any:
    """bytea's hex form (``\\x``, then two digits a byte; a NULL has none) as binary."""
    arr, offsets, text = _text(pa, arr)
    data = bytes.fromhex(text.replace(b"\\x", b"").decode("ascii"))
    start, prefixes = offsets[0], 0
    halves = array.array("i", bytes(4 * (len(arr) + 1)))
    for i in range(len(arr)):
        halves[i] = (offsets[i] - start - prefixes) >> 1
        if offsets[i + 1] != offsets[i]:  # not NULL: a value, with its two-byte prefix
            prefixes += 2
    halves[len(arr)] = len(data)
    validity = arr.buffers()[0] if arr.null_count else None
    return pa.Array.from_buffers(
        pa.binary(), len(arr), [validity, pa.py_buffer(halves), pa.py_buffer(data)],
        arr.null_count,
    )  # fmt: skip


#: A byte's sign bit spread over the byte: 0x00 or 0xFF (-1 as a signed byte).
_SIGNS = bytes(0 if b < 0x80 else 0xFF for b in range(256))


def _fixed16(pa: Any, arr: Any) -> Any:
    """Variable-length binary values of 16 bytes each (ADBC 1.11 and 1.12 give uuid as an
    opaque extension of ``binary``) as ``binary(16)``, without ``pyarrow.compute``: the values'
    own bytes when none is NULL and the offsets step by 16 (one comparison in C), else value by
    value (slower: a batch with a NULL uuid, on those drivers only). A value of another length
    raises."""
    kind, n = pa.binary(16), len(arr)
    if pa.types.is_binary(arr.type) and arr.null_count == 0 and n:
        offsets = memoryview(arr.buffers()[1]).cast("i")[arr.offset : arr.offset + n + 1]
        first = offsets[0]
        if offsets.tobytes() == array.array("i", range(first, first + 16 * n + 1, 16)).tobytes():
            data = arr.buffers()[2].slice(first, 16 * n)
            return pa.Array.from_buffers(kind, n, [None, data])
    return pa.array(arr.to_pylist(), kind)


def _decimals(pa: Any, arr: Any, kind: Any) -> Any:
    """A numeric column on the binary path as ``kind`` (decimal128): from its unscaled int8
    (precision up to 18: the integer is the decimal's low 64 bits, its sign the high ones), or
    from its text (ADBC's numeric), each value exactly (``decimal.Decimal``; never rounded)."""
    if pa.types.is_int64(arr.type):
        if arr.offset:
            arr = pa.concat_arrays([arr])
        low = memoryview(arr.buffers()[1])[: 8 * len(arr)]
        words = bytearray(16 * len(arr))
        memoryview(words).cast("q")[0::2] = low.cast("q")
        # the sign of each value, from its highest byte (little-endian, as decimal128's words
        # are laid out here), spread over the high word's 8 bytes: strided byte copies in C (a
        # shift per value in Python cost ~7x as much, an int8 array widened to int64 ~2.7x)
        signs = low.cast("B")[7::8].tobytes().translate(_SIGNS)
        for byte in range(8, 16):
            words[byte::16] = signs
        validity = arr.buffers()[0] if arr.null_count else None
        return pa.Array.from_buffers(
            kind, len(arr), [validity, pa.py_buffer(words)], arr.null_count
        )
    return pa.array([None if v is None else decimal.Decimal(v) for v in arr.to_pylist()], kind)


def _intervals(pa: Any, arr: Any, kind: Any) -> Any:
    """``months days microseconds`` texts (:func:`~copystream.parquet_types._interval_fields`)
    as :data:`~copystream.parquet_types.INTERVAL_STRUCT` values."""
    fields: list[list[int]] = [[], [], []]
    for v in arr.to_pylist():
        for field, number in zip(fields, (0, 0, 0) if v is None else v.split(" "), strict=True):
            field.append(int(number))
    children = [pa.array(f, kind.field(i).type) for i, f in enumerate(fields)]
    nulls = pa.array([v is None for v in arr.to_pylist()]) if arr.null_count else None
    return pa.StructArray.from_arrays(children, fields=list(kind), mask=nulls)


def _lists(pa: Any, arr: Any, kind: Any) -> Any:
    """JSON arrays (``array_to_json``) as Arrow lists. PostgreSQL writes a float's NaN and
    ±Infinity as JSON strings ("NaN", "Infinity") and -0 as "-0": read back as floats."""
    floats = pa.types.is_floating(kind.value_type)
    number = float if floats else int  # "-0" is a float's negative zero
    values = [None if v is None else json.loads(v, parse_int=number) for v in arr.to_pylist()]
    if floats:
        values = [
            None if v is None else [float(x) if isinstance(x, str) else x for x in v]
            for v in values
        ]
    return pa.array(values, type=kind)


# -- the parts --------------------------------------------------------------------------------


def part_name(number: int, stem: str = "part-") -> str:
    """The file name of part ``number``."""
    return f"{stem}{number:05d}.parquet"


def _temporary(path: Path, name: str) -> Path:
    return path / f".{name}.tmp"


def dataset_digest(parts: Sequence[dict[str, Any]]) -> str:
    """xxh3-128 of the dataset: of its parts' names, rows, sizes and digests, in order."""
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(f"{p['file']} {p['rows']} {p['bytes']} {p['xxh3_128']}\n".encode())
    return h.hexdigest()


def hash_file(path: Path) -> tuple[int, str]:
    """Size and xxh3-128 of a file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        h = xxhash.xxh3_128()
        size = hash_range(fd, 0, os.fstat(fd).st_size, h)
    finally:
        os.close(fd)
    return size, h.hexdigest()


class _Decoding:
    """The thread that parses blocks and writes row groups while the chunk loop reads the next
    block from the server (Arrow's CSV reader and Parquet writer release the GIL). Its error is
    handed back at the next :meth:`put` or :meth:`drain`."""

    def __init__(self, work: Callable[[Block], None]) -> None:
        self._work = work
        self._queue: queue.Queue[Block | None] = queue.Queue(maxsize=QUEUED_BLOCKS)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="copystream-parquet", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            block = self._queue.get()
            try:
                if block is None:
                    return
                if self._error is None:  # after an error, blocks are dropped until drained
                    self._work(block)
            except BaseException as e:  # handed to the chunk loop's thread
                self._error = e
            finally:
                self._queue.task_done()

    def put(self, block: Block) -> None:
        """Queue ``block`` (waits while ``QUEUED_BLOCKS`` wait already); raise the error of an
        earlier block, if any."""
        if self._error is not None:
            raise self._error
        self._queue.put(block)

    def drain(self) -> BaseException | None:
        """Wait until every queued block is done; the error of one, if any (kept until
        :meth:`clear`: every block after it was dropped)."""
        self._queue.join()
        return self._error

    def clear(self) -> None:
        """Forget the error (its blocks are accounted for)."""
        self._error = None

    def stop(self) -> None:
        """End the thread (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


@dataclass
class _Part:
    """The part in flight: its writer, rows and row groups so far."""

    number: int
    name: str
    tmp: Path
    writer: Any
    rows: int = 0
    groups: int = 0
    kept: int = 0  # row groups of ended chunks (the rest are the chunk in progress's)
    kept_rows: int = 0
    chunks: int = 0  # chunk records of the checkpoint once this part is sealed


def fresh_state(export: dict[str, Any], stem: str = "part-") -> dict[str, Any]:
    """The destination state of a new Parquet export: no part yet."""
    return {"kind": KIND, "stem": stem, "parts": []}


class ParquetDataset:
    """The dataset directory, written part after part. A
    :class:`~copystream.destinations.Destination`; see the module's docstring."""

    def __init__(
        self, path: Path, export: dict[str, Any], state: dict[str, Any], offset: int, chunks: int
    ) -> None:
        conf = export["parquet"]
        self.path = path
        self.decoder = Decoder(conf["columns"])
        self.pq = self.decoder.pa.parquet
        self.compression = conf["compression"]
        self.part_size = conf.get("part_size")  # bytes, or None: ...
        self.part_rows = conf.get("part_rows")  # ... rows
        self.row_group_size = int(conf["row_group_size"])
        self.stem = str(state.get("stem", "part-"))
        self.parts: list[dict[str, Any]] = [dict(p) for p in state.get("parts", [])]
        self._sealing: list[tuple[Path, Path]] = []  # (temporary, final) to fsync and rename
        self._lock = threading.Lock()
        self._current: _Part | None = None
        self._offset = offset  # CSV bytes of every chunk ended so far
        self._chunks = chunks  # chunk records so far
        self._tables: list[Any] = []  # parsed, not yet written (the decoding thread's)
        self._table_bytes = 0
        self._broken: str | None = None  # why the part in flight was lost (a failed write)
        self._begin_chunk()
        self._decoding = _Decoding(self._decode)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, export: dict[str, Any], state: dict[str, Any]) -> ParquetDataset:
        """Create the dataset directory (which must not exist)."""
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:  # made by another key range of the same export
            if not path.is_dir() or path.is_symlink():
                raise
        fsync_dir(path.parent)
        return cls(path, export, state, 0, 0)

    @classmethod
    def reopen(cls, path: Path, cp: Checkpoint) -> ParquetDataset:
        """Open the dataset of ``cp`` (as :func:`resume_point` cut it back): check every part it
        records, then delete what a killed run left (the part in flight, a part renamed but not
        recorded). On a mismatch :class:`PrefixMismatch` is raised and nothing is changed."""
        check_parts(path, cp.destination.get("parts", []))
        recorded = {p["file"] for p in cp.destination.get("parts", [])}
        for entry in os.listdir(path):
            leftover = entry.endswith((".parquet.tmp", ".parquet.tmp.old")) or (
                entry.endswith(".parquet") and entry not in recorded
            )
            if leftover and entry.lstrip(".").startswith(str(cp.destination.get("stem"))):
                (path / entry).unlink()
        fsync_dir(path)
        return cls(path, cp.export, cp.destination, cp.offset, len(cp.chunks))

    # -- writing ------------------------------------------------------------------------------

    def _begin_chunk(self) -> None:
        # the chunk loop's side; the decoding thread's (parsed tables) is reset by _decode
        self._pending: list[Block] = []  # whole rows not yet queued, as the chunk loop gave them
        self._pending_bytes = 0
        self._chunk_bytes = 0
        self._chunk_hash = xxhash.xxh3_128()

    def begin_chunk(self) -> None:
        """Start a chunk: what :meth:`rollback` returns to."""
        self._check_intact()
        self._begin_chunk()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take ``data``, whole rows of typed CSV; parse every ``PARSE_BYTES``."""
        self._chunk_hash.update(data)
        self._chunk_bytes += len(data)
        self._pending.append(data)  # kept, not copied: the caller leaves it as it is
        self._pending_bytes += len(data)
        if self._pending_bytes >= PARSE_BYTES:
            self._decoding.put(self._take_pending())

    def write_arrow(self, batch: Any) -> None:
        """Take ``batch``, rows as ADBC decoded them (the binary path): fixed and written on
        the decoding thread. The chunk's size and digest are of its Arrow data's size and row
        count (there is no CSV: parts carry the digests that ``verify`` checks)."""
        self._chunk_hash.update(b"%d %d\n" % (batch.num_rows, batch.nbytes))
        self._chunk_bytes += batch.nbytes
        self._decoding.put(batch)

    def _take_pending(self) -> Block:
        """The rows given since the last block, as one block (the one buffer the chunk loop
        gave, when it is one: no copy)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        return pending[0] if len(pending) == 1 else b"".join(pending)

    def _decode(self, block: Block) -> None:
        """Parse ``block``; write a row group when ``row_group_size`` bytes are parsed; at
        :data:`END_OF_CHUNK` write the rest (on the decoding thread)."""
        if block is END_OF_CHUNK:
            self._flush()
            part = self._current
            if part is not None:
                part.kept, part.kept_rows = part.groups, part.rows
            return
        if isinstance(block, bytes | bytearray | memoryview):
            table = self.decoder.decode(block)
        else:
            table = self.decoder.from_batch(block)
        self._tables.append(table)
        self._table_bytes += table.nbytes
        if self._table_bytes >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        """Write the parsed rows as one row group of the part in flight."""
        if not self._tables:
            return
        pa = self.decoder.pa
        table = pa.concat_tables(self._tables)
        self._tables, self._table_bytes = [], 0
        if table.num_rows == 0:
            return
        part = self._current or self._open_part()
        try:
            part.writer.write_table(table, row_group_size=table.num_rows)
        except OSError as e:
            raise_if_full(e, f"cannot write {part.tmp}")
            raise
        part.rows += table.num_rows
        part.groups += 1

    def _open_part(self) -> _Part:
        with self._lock:
            number = len(self.parts)
        name = part_name(number, self.stem)
        tmp = _temporary(self.path, name)
        writer = self.pq.ParquetWriter(
            str(tmp),
            self.decoder.schema,
            compression=self.compression,
            compression_level=ZSTD_LEVEL if self.compression == "zstd" else None,
            use_dictionary=self.decoder.dictionary_columns,
            write_statistics=True,
            store_schema=True,
            store_decimal_as_integer=True,  # int32/int64 for precision <= 18, as DuckDB writes
        )
        self._current = _Part(number, name, tmp, writer)
        return self._current

    def end_chunk(self) -> ChunkWritten:
        """End the chunk: its rows become the part's last row group(s), written by the
        decoding thread while the next chunk streams. When the part in flight has reached
        ``part_size`` (as far as it is written), that is waited for and the part is sealed
        with this chunk. Returns the chunk's place and digest in the COPY stream (its CSV)."""
        self._check_intact()
        if self._pending:
            self._decoding.put(self._take_pending())
        self._decoding.put(END_OF_CHUNK)
        written = ChunkWritten(self._offset, self._chunk_bytes, self._chunk_hash.hexdigest())
        self._offset += self._chunk_bytes
        if self._chunk_bytes:
            self._chunks += 1
        part = self._current
        if part is not None and self._full(part):
            self.end_parts()
        self._begin_chunk()
        return written

    def _full(self, part: _Part) -> bool:
        """Whether ``part`` holds ``part_rows`` rows (waiting for the decoding thread: the
        count is exact), or ``part_size`` bytes as far as written (the decoding thread may be
        a block or two behind, so a part may hold a chunk more)."""
        if self.part_rows is not None:
            self._settle()
            return part.rows >= int(self.part_rows)
        return part.tmp.stat().st_size >= int(self.part_size or 0)

    def end_parts(self) -> None:
        """Wait until every ended chunk is written, then seal the part in flight (after the
        last chunk: with the checkpoint that follows, the dataset is complete)."""
        self._settle()
        if self._current is not None:
            self._current.chunks = self._chunks
            self._seal(self._current)

    def _settle(self) -> None:
        """Wait for the decoding thread; its error means the part in flight is lost."""
        error = self._decoding.drain()
        if error is not None:
            self._lose(error)
            raise error

    def _lose(self, error: BaseException) -> None:
        """The part in flight cannot be trusted (a write failed): drop it; every later call
        raises, so that the export stops and resumes from the last sealed part."""
        self._broken = f"writing the part in flight failed ({error})"
        self._decoding.clear()
        self._tables, self._table_bytes = [], 0
        self._drop_current()

    def _check_intact(self) -> None:
        if self._broken is not None:
            raise ExportFailed(self._broken)

    def _seal(self, part: _Part) -> None:
        """Close the part (its footer is written) and hash it; the commit thread makes it
        durable under its name before the checkpoint that records it."""
        try:
            part.writer.close()
        except OSError as e:
            raise_if_full(e, f"cannot write {part.tmp}")
            raise
        size, digest = hash_file(part.tmp)
        self._current = None
        with self._lock:
            self._sealing.append((part.tmp, self.path / part.name))
            self.parts.append(
                {"file": part.name, "rows": part.rows, "bytes": size, "xxh3_128": digest,
                 "row_groups": part.groups, "chunks": part.chunks}
            )  # fmt: skip

    def rollback(self) -> None:
        """Forget the chunk: its parsed rows, and the row groups it wrote (the part in flight
        is rewritten without them). A failed write of an ended chunk cannot be forgotten:
        the part in flight is dropped and the export stops (see :meth:`_lose`); so does a
        failed parse, which may have been an ended chunk's."""
        error = self._decoding.drain()
        self._begin_chunk()
        if error is not None:  # it may have hit an ended chunk's rows: they are lost
            self._lose(error)
            return
        self._tables, self._table_bytes = [], 0
        part = self._current
        if part is not None and part.groups > part.kept:
            self._rewrite(part, part.kept)

    def _rewrite(self, part: _Part, keep: int) -> None:
        part.writer.close()
        old = part.tmp.with_name(part.tmp.name + ".old")
        os.replace(part.tmp, old)
        self._current = None
        source = self.pq.ParquetFile(str(old))
        if keep:
            fresh = self._open_part()
            for i in range(keep):
                fresh.writer.write_table(source.read_row_group(i))
            fresh.groups = fresh.kept = keep
            fresh.rows = fresh.kept_rows = part.kept_rows
        source.close()
        old.unlink()

    def sync(self) -> None:
        """Make the sealed parts durable under their names (on the commit thread)."""
        with self._lock:
            sealing, self._sealing = self._sealing, []
        if not sealing:
            return
        try:
            for tmp, final in sealing:
                fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, final)
            fsync_dir(self.path)
        except OSError as e:
            raise_if_full(e, f"cannot write {self.path}")
            raise

    def cut(self, position: int) -> None:
        """After a failed commit: drop the part in flight (a resume redoes it)."""
        self._decoding.drain()
        self._drop_current()

    def _drop_current(self) -> None:
        part, self._current = self._current, None
        if part is not None:
            with contextlib.suppress(Exception):
                part.writer.close()
            with contextlib.suppress(FileNotFoundError):
                part.tmp.unlink()

    @property
    def digest(self) -> str:
        """xxh3-128 of the sealed parts (:func:`dataset_digest`)."""
        with self._lock:
            return dataset_digest(self.parts)

    def state(self) -> dict[str, Any]:
        """The sealed parts: what the checkpoint records (and a resume keeps)."""
        with self._lock:
            return {"kind": KIND, "stem": self.stem, "parts": [dict(p) for p in self.parts]}

    def close(self) -> None:
        """Close the part in flight without sealing it (a resume deletes it)."""
        self._decoding.stop()
        self._drop_current()


# -- resuming and verifying -------------------------------------------------------------------


def resume_point(cp: Checkpoint) -> Checkpoint:
    """``cp`` cut back to the chunks of its sealed parts: where a resume continues. Pure.

    A checkpoint records every chunk, but the rows of the part in flight are lost with it.
    """
    parts = cp.destination.get("parts", [])
    count = int(parts[-1]["chunks"]) if parts else 0
    if count == len(cp.chunks) and (cp.finished or not cp.chunks):
        return cp
    chunks = cp.chunks[:count]
    first_lower = cp.export.get("range", [None])[0] if cp.export.get("range") else None
    last = chunks[-1] if chunks else None
    return replace(
        cp,
        offset=(last.offset + last.bytes) if last else 0,
        rows=sum(c.rows for c in chunks),
        last_key=last.last_key if last else (tuple(first_lower) if first_lower else None),
        xxh3_128=dataset_digest(parts),
        finished=False,
        chunks=chunks,
    )


def combined(
    export: dict[str, Any], settings: dict[str, str], started_at: str, cps: Sequence[Checkpoint]
) -> Checkpoint:
    """The checkpoint of a dataset whose key ranges (``cps``, in key order) wrote their own
    parts: their chunks and parts one after the other, as one export would record them. Pure:
    nothing is joined, the parts stay where they are."""
    chunks: list[Any] = []
    parts: list[dict[str, Any]] = []
    offset = 0
    for cp in cps:
        base = len(chunks)
        for c in cp.chunks:
            chunks.append(replace(c, index=len(chunks), offset=offset))
            offset += c.bytes
        parts += [{**p, "chunks": base + int(p["chunks"])} for p in cp.destination["parts"]]
    last = next((cp.last_key for cp in reversed(cps) if cp.chunks), None)
    return Checkpoint(
        export=export,
        settings=settings,
        started_at=started_at,
        chunk_rows=cps[0].chunk_rows,
        estimated_rows=cps[0].estimated_rows,
        offset=offset,
        rows=sum(cp.rows for cp in cps),
        last_key=last,
        xxh3_128=dataset_digest(parts),
        finished=True,
        chunks=tuple(chunks),
        destination={"kind": KIND, "stem": "part-", "parts": parts},
    )


def check_parts(path: Path, parts: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`PrefixMismatch` unless every recorded part is there, as recorded."""
    for p in parts:
        file = path / p["file"]
        try:
            found = hash_file(file)
        except FileNotFoundError:
            raise PrefixMismatch(f"{file} is missing but its checkpoint records it") from None
        if found != (p["bytes"], p["xxh3_128"]):
            raise PrefixMismatch(f"{file} does not match its checkpoint: the part was modified")


def verify_dataset(path: Path, parts: Sequence[dict[str, Any]], digest: str) -> int:
    """Check each part's size, digest and row count (its footer) against ``parts``, and the
    whole dataset's digest; return the rows. Raises :class:`VerificationFailed`."""
    pq = require_pyarrow().parquet
    rows = 0
    for p in parts:
        file = path / p["file"]
        if not file.exists():
            raise VerificationFailed(f"{file} is missing")
        if hash_file(file) != (p["bytes"], p["xxh3_128"]):
            raise VerificationFailed(f"{file} differs from the manifest")
        found = pq.read_metadata(str(file)).num_rows
        if found != p["rows"]:
            raise VerificationFailed(f"{file} holds {found} rows, the manifest records {p['rows']}")
        rows += found
    if dataset_digest(parts) != digest:
        raise VerificationFailed(f"{path}: the dataset's digest differs from the manifest")
    return rows
