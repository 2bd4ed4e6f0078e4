"""What an export is (:class:`ExportSpec`) and how it runs (:class:`RunOptions`).

Every option of an export is declared once, here, as a dataclass field with its default, its
kind (:class:`Kind`: how a value is checked and read from text) and its help text. The keyword
arguments of :func:`copystream.export_table`, the flags of ``copystream export`` and the keys of
a bulk plan are all derived from these declarations (:func:`option_fields`), so adding an option
means adding a field here (and its documentation), nothing else.

The export's identity is the resolved :class:`ExportSpec` (table, key and its types, columns,
filter, COPY options): :meth:`ExportSpec.identity` is what checkpoints, range files and manifests
record, and :func:`identity_mismatch` the one comparison of two identities.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from psycopg import sql

from .errors import CheckpointMismatch, Opt, UsageError
from .parquet_types import INTERVAL_FORMS, POLICIES, ColumnPlan
from .retry import RetryPolicy

__all__ = [
    "Compression",
    "CopyOptions",
    "ExportSpec",
    "Kind",
    "Option",
    "RunOptions",
    "build",
    "identity_mismatch",
    "option_fields",
    "require_same",
]


# -- kinds of option values (pure) ---------------------------------------------------------------


class Kind:
    """How values of one kind of option are checked (Python and TOML values) and read from text.

    ``want`` describes an acceptable value for messages ("an integer >= 0").
    """

    want = "a value"

    def ok(self, value: object) -> bool:
        """Whether ``value`` (as Python code or a TOML plan gives it) is acceptable."""
        raise NotImplementedError

    def coerce(self, value: Any) -> Any:
        """``value`` (accepted by :meth:`ok`) as the field stores it."""
        return value

    def parse(self, text: str) -> Any:
        """A command-line flag's text as a value (raises ``ValueError`` when it is not one)."""
        return text


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Count(Kind):
    """A whole number of at least ``least``."""

    def __init__(self, least: int) -> None:
        self.least = least
        self.want = f"an integer >= {least}"

    def ok(self, value: object) -> bool:
        return _is_int(value) and int(str(value)) >= self.least

    def parse(self, text: str) -> int:
        return int(text)


class Seconds(Kind):
    """A number of seconds of at least ``least``."""

    def __init__(self, least: float) -> None:
        self.least = least
        self.want = f"seconds >= {least:g}"

    def ok(self, value: object) -> bool:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and float(str(value)) >= self.least

    def coerce(self, value: Any) -> float:
        return float(value)

    def parse(self, text: str) -> float:
        return float(text)


class Flag(Kind):
    """True or false."""

    want = "true or false"

    def ok(self, value: object) -> bool:
        return isinstance(value, bool)


class Text(Kind):
    """A string (``empty=False``: a non-empty one)."""

    def __init__(self, *, empty: bool = True, want: str = "a string") -> None:
        self.empty = empty
        self.want = want

    def ok(self, value: object) -> bool:
        return isinstance(value, str) and (self.empty or bool(value))


class Choice(Kind):
    """One of a few words."""

    def __init__(self, *words: str) -> None:
        self.words = words
        self.want = " or ".join(f'"{w}"' for w in words)

    def ok(self, value: object) -> bool:
        return value in self.words


def _names(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and bool(value)
        and all(isinstance(x, str) and x for x in value)
    )


def _split(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(","))
    if not all(parts):
        raise ValueError(f"empty name in {text!r}")
    return parts


class Names(Kind):
    """Column names: a list (``single``: or one name); comma-separated on the command line."""

    def __init__(self, *, single: bool = False) -> None:
        self.single = single
        self.want = (
            "a column name or an array of them" if single else "a non-empty array of column names"
        )

    def ok(self, value: object) -> bool:
        return (self.single and isinstance(value, str) and bool(value)) or _names(value)

    def coerce(self, value: Any) -> tuple[str, ...]:
        return (value,) if isinstance(value, str) else tuple(value)

    def parse(self, text: str) -> tuple[str, ...]:
        return _split(text)


class ForceQuote(Kind):
    """``"*"`` or true (every column), or column names."""

    want = '"*", true, or an array of column names'

    def ok(self, value: object) -> bool:
        # () is the Python default (no column); a plan's empty array is refused as before
        return value == "*" or value == () or isinstance(value, bool) or _names(value)

    def coerce(self, value: Any) -> tuple[str, ...] | bool:
        if value == "*" or value is True:
            return True
        return tuple(value) if value else ()

    def parse(self, text: str) -> tuple[str, ...] | bool:
        return True if text == "*" else _split(text)


@dataclass(frozen=True)
class Compression:
    """How the output is compressed: ``codec`` ``"zstd"``, ``"gzip"`` or ``"none"``, at ``level``.

    Each chunk becomes one zstd frame or gzip member, so the file is valid at every checkpoint.
    """

    codec: str
    level: int | None = None  # None only for "none"

    #: Default level and accepted range of each codec. zstd 3 and gzip 6 are the CLIs' defaults:
    #: the sizes users expect, and zstd 3 keeps up with one backend (docs/benchmarks.md).
    LEVELS: ClassVar[dict[str, tuple[int, int, int]]] = {"zstd": (3, 1, 22), "gzip": (6, 1, 9)}
    #: OUTPUT suffixes that ask for a codec when ``compress`` is not given.
    SUFFIXES: ClassVar[dict[str, str]] = {".zst": "zstd", ".gz": "gzip"}

    @classmethod
    def parse(cls, text: str) -> Compression:
        """``zstd``, ``gzip:9``, ``none``... as a :class:`Compression` (``ValueError`` if not)."""
        codec, sep, level = text.strip().lower().partition(":")
        if codec == "none":
            if sep:
                raise ValueError("compression none takes no level")
            return cls("none")
        if codec not in cls.LEVELS:
            raise ValueError(f"unknown compression {text!r}: use zstd, gzip or none[:LEVEL]")
        default, least, most = cls.LEVELS[codec]
        try:
            number = int(level) if sep else default
        except ValueError:
            raise ValueError(f"compression level {level!r} is not a whole number") from None
        if not least <= number <= most:
            raise ValueError(f"{codec} levels go from {least} to {most}, not {number}")
        return cls(codec, number)

    @classmethod
    def for_output(cls, output: object) -> Compression:
        """The compression an OUTPUT's suffix asks for (``.zst``, ``.gz``; else none). Pure."""
        name = str(output).lower()
        for suffix, codec in cls.SUFFIXES.items():
            if name.endswith(suffix):
                return cls.parse(codec)
        return cls("none")

    @property
    def suffix(self) -> str:
        """The file suffix of this codec (``""`` for none)."""
        return next((s for s, c in self.SUFFIXES.items() if c == self.codec), "")

    def to_json(self) -> dict[str, Any] | None:
        """The form identities and manifests record: ``None`` for uncompressed output."""
        return None if self.codec == "none" else {"codec": self.codec, "level": self.level}

    def __str__(self) -> str:
        return self.codec if self.level is None else f"{self.codec}:{self.level}"


class Compress(Kind):
    """A compression: ``zstd``, ``gzip`` or ``none``, optionally ``:LEVEL``."""

    want = 'a compression ("zstd", "gzip" or "none", optionally with ":LEVEL")'

    def ok(self, value: object) -> bool:
        if isinstance(value, Compression):
            return True
        if not isinstance(value, str):
            return False
        try:
            Compression.parse(value)
        except ValueError:
            return False
        return True

    def coerce(self, value: Any) -> Compression:
        return value if isinstance(value, Compression) else Compression.parse(value)

    def parse(self, text: str) -> Compression:
        return Compression.parse(text)


class Size(Kind):
    """A number of bytes of at least ``least``: ``134217728``, ``128MB``, ``64MiB``, ``1GB``."""

    UNITS: ClassVar[dict[str, int]] = {
        "": 1, "b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
        "gb": 1000**3, "gib": 1024**3,
    }  # fmt: skip

    def __init__(self, least: int) -> None:
        self.least = least
        self.want = f"a size in bytes >= {least} (or with a unit: 128MB, 64MiB)"

    def _bytes(self, value: object) -> int | None:
        if _is_int(value):
            return int(str(value))
        if not isinstance(value, str):
            return None
        text = value.strip().lower().replace(" ", "")
        digits = text.rstrip("abgikm")
        unit = self.UNITS.get(text[len(digits) :])
        if unit is None or not digits.isdigit():
            return None
        return int(digits) * unit

    def ok(self, value: object) -> bool:
        n = self._bytes(value)
        return n is not None and n >= self.least

    def coerce(self, value: Any) -> int:
        n = self._bytes(value)
        assert n is not None
        return n

    def parse(self, text: str) -> int:
        n = self._bytes(text)
        if n is None:
            raise ValueError(f"{text!r} is not a size")
        return n


class PartSize(Kind):
    """A Parquet part's size: bytes as :class:`Size` reads them, or rows: ``"1000000 rows"``
    (the field then holds that canonical text)."""

    def __init__(self, least: int) -> None:
        self.size = Size(least)
        self.want = f'a size in bytes >= {least} (128MB, 64MiB) or a row count ("1000000 rows")'

    @staticmethod
    def rows(value: object) -> int | None:
        """The row count of ``"N rows"`` (``None`` when ``value`` is not one). Pure."""
        if not isinstance(value, str) or not value.strip().lower().endswith("rows"):
            return None
        digits = value.strip().lower().removesuffix("rows").replace(" ", "").replace("_", "")
        return int(digits) if digits.isdigit() else None

    def ok(self, value: object) -> bool:
        n = self.rows(value)
        return n >= 1 if n is not None else self.size.ok(value)

    def coerce(self, value: Any) -> int | str:
        n = self.rows(value)
        return f"{n} rows" if n is not None else self.size.coerce(value)

    def parse(self, text: str) -> int | str:
        n = self.rows(text)
        return f"{n} rows" if n is not None else self.size.parse(text)


FLAG = Flag()
TEXT = Text()


@dataclass(frozen=True)
class Option:
    """The declaration of one export option (a dataclass field's metadata)."""

    kind: Kind
    help: str
    plan: bool = True  # may be set in a bulk plan (``restart`` and ``force`` may not)


def option(default: Any, kind: Kind, help: str, *, plan: bool = True) -> Any:
    """A dataclass field that is an export option."""
    return field(default=default, metadata={"option": Option(kind, help, plan)})


@dataclass(frozen=True)
class CopyOptions:
    """How COPY formats the rows. PostgreSQL does all formatting; these are its COPY options.

    The defaults give PostgreSQL's plain CSV (``FORMAT csv``).
    """

    format: str = option(
        "csv",
        Choice("csv", "text", "parquet"),
        "Output format: COPY's csv or text, or parquet (a directory of typed Parquet files).",
    )
    header: bool = option(False, FLAG, "Write a header line.")
    delimiter: str | None = option(None, TEXT, "Field delimiter (COPY DELIMITER).")
    null: str | None = option(None, TEXT, "String written for NULL (COPY NULL).")
    quote: str | None = option(None, TEXT, "Quote character (COPY QUOTE, csv only).")
    escape: str | None = option(None, TEXT, "Escape character (COPY ESCAPE, csv only).")
    force_quote: tuple[str, ...] | bool = option(
        (), ForceQuote(), "Columns always quoted, comma-separated, or '*' (csv only)."
    )
    encoding: str | None = option(
        None, Text(empty=False, want="an encoding name"), "Output encoding (COPY ENCODING)."
    )

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe form, recorded in the checkpoint and manifest."""
        fq: object = (
            self.force_quote if isinstance(self.force_quote, bool) else list(self.force_quote)
        )
        return {
            "format": self.format,
            "header": self.header,
            "delimiter": self.delimiter,
            "null": self.null,
            "quote": self.quote,
            "escape": self.escape,
            "force_quote": fq,
            "encoding": self.encoding,
        }

    def compose(self, *, header: bool) -> sql.Composed:
        """The parenthesised option list of a COPY statement.

        ``header`` is passed separately because only the first chunk of a file carries it.
        """
        opts: list[sql.Composable] = [
            sql.SQL("FORMAT {}").format(sql.SQL(_format_word(self.format)))
        ]
        if header:
            opts.append(sql.SQL("HEADER true"))
        for word, value in (
            ("DELIMITER", self.delimiter),
            ("NULL", self.null),
            ("QUOTE", self.quote),
            ("ESCAPE", self.escape),
            ("ENCODING", self.encoding),
        ):
            if value is not None:
                opts.append(sql.SQL(word + " {}").format(sql.Literal(value)))
        if self.force_quote is True:
            opts.append(sql.SQL("FORCE_QUOTE *"))
        elif self.force_quote:
            opts.append(
                sql.SQL("FORCE_QUOTE ({})").format(
                    sql.SQL(", ").join(sql.Identifier(c) for c in self.force_quote)
                )
            )
        return sql.SQL("({})").format(sql.SQL(", ").join(opts))


def _format_word(fmt: str) -> str:
    words = {"csv": "csv", "text": "text", "parquet": "csv"}  # parquet: typed CSV, then parsed
    if fmt not in words:
        raise UsageError(f"unknown format {fmt!r}: use 'csv' or 'text'")
    return words[fmt]


#: Defaults of a Parquet export: zstd like DuckDB and Spark; parts of ~128 MB, the size data
#: lakes are tuned for; row groups of 16 MB of Arrow data, what memory holds (about DuckDB's
#: 122,880 rows of a typical table; peak RSS ~130 MB, ~150 MB at 32 MB: docs/benchmarks.md).
PARQUET_COMPRESSION = "zstd"
PART_SIZE = 128 * 1024 * 1024
ROW_GROUP_SIZE = 16 * 1024 * 1024

#: The options of CSV and text output only, and of Parquet output only (with their defaults).
_COPY_ONLY = ("header", "delimiter", "null", "quote", "escape", "force_quote", "encoding")
_PARQUET_ONLY = (
    "parquet_compression", "part_size", "row_group_size", "out_of_range", "numeric_scale",
    "interval_form",
)  # fmt: skip


def _part_limit(part_size: int | str | None) -> dict[str, int | None]:
    """A Parquet export's part limit as its identity records it: ``{"part_size": bytes}``, or
    ``{"part_size": None, "part_rows": rows}`` for a row count. Pure."""
    rows = PartSize.rows(part_size)
    if rows is not None:
        return {"part_size": None, "part_rows": rows}
    return {"part_size": int(part_size or PART_SIZE)}


# -- what is exported, and how -------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """What is exported: the table, the key that pages it, the columns, the filter, the format.

    As the user asks for it, ``table`` is a name as typed in psql and ``key``/``columns`` may be
    ``None`` (the primary key, every column). :meth:`resolved` fills them in from the server's
    answer; the resolved spec is the export's identity (:meth:`identity`).
    """

    table: str
    key: tuple[str, ...] | None = option(
        None, Names(single=True), "Column(s) to page by, comma-separated (default: primary key)."
    )
    columns: tuple[str, ...] | None = option(
        None, Names(), "Columns to export, comma-separated, in this order."
    )
    where: str | None = option(
        None, Text(want="a string (an SQL filter)"), "SQL filter applied inside every chunk."
    )
    compress: Compression | None = option(  # noqa: RUF009 (a field declaration, not a value)
        None,
        Compress(),
        "Compress the output: zstd, gzip or none, optionally :LEVEL (default: from OUTPUT's "
        "suffix, .zst or .gz; zstd level 3, gzip 6).",
    )
    watermark: str | None = option(
        None,
        Text(empty=False, want="a column name"),
        "Change-tracking column (updated_at: timestamptz, timestamp, date, or an integer or "
        "numeric counter): page by it, then the key; with --since, export the rows changed "
        "since that export, less a safety lag.",
    )
    parquet_compression: str | None = option(
        None,
        Choice("zstd", "snappy", "gzip", "none"),
        "Parquet column compression: zstd (default), snappy, gzip or none.",
    )
    part_size: int | str | None = option(
        None,
        PartSize(1024 * 1024),
        'Bytes of Parquet per part file (default 128MB), or rows ("1000000 rows").',
    )
    row_group_size: int | None = option(
        None,
        Size(64 * 1024),
        "Uncompressed bytes per Parquet row group, what memory holds (default 16MB).",
    )
    out_of_range: str | None = option(
        None,
        Choice(*POLICIES),
        "Parquet: infinite or out-of-range dates and timestamps, NaN decimals: error (default), "
        "null or clamp.",
    )
    strict_types: bool = option(
        False, FLAG, "Parquet: refuse columns of types written as text (composite, range...)."
    )
    numeric_scale: int | None = option(
        None,
        Count(0),
        "Parquet: write unbounded numeric columns as decimal128(38, this scale), failing on a "
        "value that would need rounding or more digits (default: as text).",
    )
    interval_form: str | None = option(
        None,
        Choice(*INTERVAL_FORMS),
        "Parquet: write interval columns as ISO 8601 text (default) or as a struct of months, "
        "days and microseconds.",
    )
    options: CopyOptions = field(default_factory=CopyOptions)
    key_types: tuple[str, ...] | None = None  # known once resolved
    #: How each column is written to Parquet (known once resolved; ``None`` for CSV and text).
    parquet_columns: tuple[ColumnPlan, ...] | None = None

    def __post_init__(self) -> None:
        parquet = self.options.format == "parquet"
        wrong = _COPY_ONLY if parquet else _PARQUET_ONLY
        for name in wrong:
            owner = self.options if name in _COPY_ONLY else self
            if getattr(owner, name) not in (None, False, ()):
                fmt = "parquet" if parquet else self.options.format
                raise UsageError([Opt(name), f" is not an option of {fmt} output"])
        if parquet and self.compress is not None and self.compress.codec != "none":
            raise UsageError(
                [Opt("compress"), " is not an option of parquet output (see ",
                 Opt("parquet_compression"), ")"]
            )  # fmt: skip
        if not parquet and self.strict_types:
            raise UsageError([Opt("strict_types"), " is an option of parquet output only"])
        if self.numeric_scale is not None and self.numeric_scale > 38:
            raise UsageError([Opt("numeric_scale"), " must be at most 38 (decimal128's precision)"])

    @property
    def parquet(self) -> dict[str, Any] | None:
        """The Parquet settings of this export, defaults filled in (``None``: not Parquet)."""
        if self.options.format != "parquet":
            return None
        return {
            "compression": self.parquet_compression or PARQUET_COMPRESSION,
            **_part_limit(self.part_size),
            "row_group_size": self.row_group_size or ROW_GROUP_SIZE,
            "out_of_range": self.out_of_range or "error",
            **({} if self.numeric_scale is None else {"numeric_scale": self.numeric_scale}),
            **({} if self.interval_form is None else {"interval_form": self.interval_form}),
            "columns": [c.to_json() for c in self.parquet_columns or ()],
        }

    def resolved(
        self,
        table: str,
        key: Sequence[str],
        key_types: Sequence[str],
        columns: Sequence[str],
        *,
        output: object = None,
    ) -> ExportSpec:
        """This spec as the server resolved it (qualified name, chosen key and its types), with
        the compression ``output``'s suffix asks for when none was given."""
        compress = self.compress
        if compress is None and self.options.format != "parquet":
            compress = Compression.for_output(output) if output is not None else None
        return replace(
            self, table=table, key=tuple(key), key_types=tuple(key_types), columns=tuple(columns),
            compress=compress,
        )  # fmt: skip

    def identity(self) -> dict[str, Any]:
        """The JSON form recorded as ``export`` in checkpoints and range files."""
        return {
            "table": self.table,
            "key": list(self.key or ()),
            "key_types": list(self.key_types or ()),
            "columns": list(self.columns or ()),
            "where": self.where,
            "options": self.options.to_dict(),
            "compress": self.compress.to_json() if self.compress is not None else None,
            "parquet": self.parquet,
        }


#: The fields two identities must agree on, in the order a mismatch is reported. A record
#: without ``compress`` (copystream 0.1.0) is an uncompressed export's: ``None`` either way.
IDENTITY_FIELDS = (
    "table", "key", "key_types", "columns", "where", "options", "compress", "parquet", "range",
)  # fmt: skip


def identity_mismatch(recorded: Mapping[str, Any], expected: Mapping[str, Any]) -> str | None:
    """The first field on which ``recorded`` differs from ``expected`` (``None``: the same)."""
    for name in IDENTITY_FIELDS:
        if recorded.get(name) != expected.get(name):
            return name
    return None


def require_same(recorded: Mapping[str, Any], expected: Mapping[str, Any], where: object) -> None:
    """Raise :class:`CheckpointMismatch` unless ``recorded`` (what the file ``where`` was made
    for) is the export ``expected``: the one place two identities are compared."""
    name = identity_mismatch(recorded, expected)
    if name is not None:
        mine, theirs = _show(recorded.get(name)), _show(expected.get(name))
        raise CheckpointMismatch(
            f"{where} was made for another export ({name} was {mine}, now {theirs})"
        )


def _show(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class RunOptions:
    """How an export runs: chunk sizing, parallelism, consistency, retries, timeouts, restart.

    None of these changes the bytes of the output.
    """

    chunk_rows: int | None = option(
        None, Count(0), "Rows per chunk (default: adaptive); 0 = the whole table in one COPY."
    )
    workers: int = option(
        1, Count(1), "Worker processes, each exporting one key range; parts are joined in order."
    )
    consistent: bool = option(
        False, FLAG, "Read every chunk from one exported snapshot (point-in-time export)."
    )
    retries: int = option(
        RetryPolicy.retries, Count(0), "Retries of a chunk whose error repeats on a live server."
    )
    max_outage: float = option(
        RetryPolicy.max_outage,
        Seconds(0),
        "Seconds to wait out a server that cannot be reached (a restart, a failover).",
    )
    retry_budget: float = option(
        RetryPolicy.budget, Seconds(0), "Total seconds the export may spend retrying."
    )
    io_timeout: float = option(
        300.0, Seconds(0.1), "Seconds without data from the server before a chunk is retried."
    )
    statement_timeout: float | None = option(
        None,
        Seconds(0.001),
        "Server statement_timeout per statement, in seconds (retried when hit).",
    )
    restart: bool = option(
        False, FLAG, "Discard any checkpoint and output; start from zero.", plan=False
    )
    force: bool = option(
        False, FLAG, "Overwrite an existing output that has no checkpoint.", plan=False
    )
    metrics_file: str | None = option(
        None,
        Text(empty=False, want="a file path"),
        "Keep Prometheus metrics in this file (node_exporter textfile format), rewritten "
        "atomically every --metrics-interval seconds.",
        plan=False,
    )
    pushgateway: str | None = option(
        None,
        Text(empty=False, want="a URL"),
        "Push Prometheus metrics to this Pushgateway URL every --metrics-interval seconds and "
        "at the end.",
    )
    metrics_interval: float = option(
        5.0, Seconds(0.1), "Seconds between two writes or pushes of the metrics."
    )
    incremental: bool = option(
        False,
        FLAG,
        "Export only the rows after the last key of OUTPUT's complete export, appended to it "
        "(with --since: to OUTPUT, a new file).",
    )
    since: str | None = option(
        None,
        Text(empty=False, want="the path of a manifest"),
        "Incremental export to a file of its own: the rows after the export this manifest "
        "records (implies --incremental).",
        plan=False,
    )
    watermark_lag: float | None = option(
        None,
        Seconds(0),
        "Safety lag of a --watermark increment, in seconds (default: the age of the oldest "
        "transaction open when the previous export started); of a counter, in its units "
        "(default 0).",
    )
    retry_policy: RetryPolicy | None = None  # a full policy (delays too), replacing the above

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy in force. The cancellations of a ``statement_timeout`` asked for
        here are retried, whatever the policy's own default."""
        policy = self.retry_policy or RetryPolicy(
            retries=self.retries, budget=self.retry_budget, max_outage=self.max_outage
        )
        if self.statement_timeout is not None and not policy.retry_statement_timeout:
            policy = replace(policy, retry_statement_timeout=True)
        return policy


# -- the declarations, and building from them ----------------------------------------------------


def option_fields() -> Iterator[tuple[str, Option, Any]]:
    """Every export option: ``(name, declaration, default)``, in the order of the help."""
    for owner in (ExportSpec, CopyOptions, RunOptions):
        for f in dataclasses.fields(owner):
            opt = f.metadata.get("option")
            if opt is not None:
                yield f.name, opt, f.default


def _owners() -> dict[str, type[Any]]:
    return {
        f.name: owner
        for owner in (ExportSpec, CopyOptions, RunOptions)
        for f in dataclasses.fields(owner)
        if "option" in f.metadata
    }


def build(table: str, **kwargs: Any) -> tuple[ExportSpec, RunOptions]:
    """The spec and run options of :func:`copystream.export_table`'s keyword arguments.

    Every option of :func:`option_fields` is accepted by name (``None`` leaves the default);
    besides them, ``options`` (a whole :class:`CopyOptions`, which the COPY options given
    by name then amend) and ``retry_policy``. Raises :class:`UsageError` for an unknown name or
    a value of the wrong kind.
    """
    owners = _owners()
    declared = {name: opt for name, opt, _ in option_fields()}
    values: dict[type[Any], dict[str, Any]] = {ExportSpec: {}, CopyOptions: {}, RunOptions: {}}
    base = kwargs.pop("options", None) or CopyOptions()
    if "retry_policy" in kwargs:
        values[RunOptions]["retry_policy"] = kwargs.pop("retry_policy")
    for name, value in kwargs.items():
        if name not in owners:
            import difflib  # (on first use: only a mistyped option needs it)

            close = difflib.get_close_matches(name, [*owners, "options", "retry_policy"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown export option {name!r}{hint}")
        if value is None:
            continue
        kind = declared[name].kind
        if not kind.ok(value):
            raise UsageError(f"{name}: expected {kind.want}, got {value!r}")
        values[owners[name]][name] = kind.coerce(value)
    if values[CopyOptions].get("header") is False and base.header:
        del values[CopyOptions]["header"]  # header=False does not undo options' header
    spec = ExportSpec(table, options=replace(base, **values[CopyOptions]), **values[ExportSpec])
    return spec, RunOptions(**values[RunOptions])
