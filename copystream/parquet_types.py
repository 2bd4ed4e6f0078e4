"""PostgreSQL column types → Parquet (Arrow) types, and the policies for what does not fit. Pure.

A Parquet export reads each chunk with the same keyset COPY as a CSV export, but the COPY selects
a *typed* form of each column, one that Arrow's CSV reader parses exactly: dates as days since
1970-01-01, timestamps and times as microseconds (computed by the server, so BC dates, time zones
and far-future values need no text parsing), everything else as PostgreSQL prints it under fixed
session settings (:data:`PARQUET_SETTINGS`). :func:`plan_columns` decides, from what the catalog
says of each column (:class:`ColumnType`), its Arrow type and how it travels (:class:`ColumnPlan`);
:func:`select_list` composes the typed SELECT list. The mapping (docs/formats.md has the table):

=============================================  =================================================
PostgreSQL                                     Parquet / Arrow
=============================================  =================================================
smallint, integer, bigint; oid                 int16, int32, int64; uint32
real, double precision                         float32, float64 (NaN and ±Infinity kept)
numeric(p,s), p ≤ 38, 0 ≤ s ≤ p                decimal128(p,s) (NaN: the ``out_of_range`` policy)
numeric (unbounded, or p > 38)                 string, as PostgreSQL prints it (NaN, Infinity too)
boolean                                        bool
text, varchar, char(n), "char", name, enum     string
bytea                                          binary
uuid                                           16-byte UUID logical type (``arrow.uuid``)
json, jsonb                                    string with the JSON logical type
date                                           date32 (days)
timestamp                                      timestamp(µs), no time zone
timestamptz                                    timestamp(µs, UTC)
time                                           time64(µs)
interval                                       string, ISO 8601 (``P1Y2M3DT4H5M6S``); with
                                               ``interval_form="struct"``: struct<months: int32,
                                               days: int32, microseconds: int64>, the three
                                               fields PostgreSQL keeps (:data:`INTERVAL_STRUCT`)
1-D arrays of the scalar types above           list of that type (elements: see ``LIST_ELEMENTS``)
anything else (composite, range, timetz, ...)  string, as PostgreSQL prints it
=============================================  =================================================

``infinity``/``-infinity`` dates, timestamps (and, from PostgreSQL 17, intervals written as
structs), timestamps past Parquet's range (int64 µs from
1970: after 294247-01-10 04:00:54.775807 UTC) and ``NaN`` in a ``numeric(p,s)`` column follow the
``out_of_range`` policy: ``"error"`` (the default: the export stops naming the column, the value
and the key of the first such row), ``"null"`` (written as NULL) or ``"clamp"`` (the smallest or
largest value the Parquet type holds; a NaN is an error under ``clamp``). ``strict_types`` refuses
the last row of the table (types written as text) instead of writing them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from psycopg import sql

from .errors import Remedy, UsageError

__all__ = [
    "ADBC_DRIVER_MIN",
    "INTERVAL_FORMS",
    "INTERVAL_STRUCT",
    "LIST_ELEMENTS",
    "PARQUET_SETTINGS",
    "POLICIES",
    "REFUSED_BELOW",
    "BinaryPlan",
    "ColumnPlan",
    "ColumnType",
    "ValueOutOfRange",
    "binary_plan",
    "driver_minimum",
    "driver_refusal",
    "parquet_settings",
    "plan_columns",
    "record_text",
    "refusal",
    "refused_wire",
    "select_list",
]

#: The ``out_of_range`` policies.
POLICIES = ("error", "null", "clamp")

#: The forms of an interval column: ISO 8601 text, or :data:`INTERVAL_STRUCT`.
INTERVAL_FORMS = ("text", "struct")

#: The Arrow type of an interval written as a struct: its months, days and microseconds, each
#: with its own sign, as PostgreSQL keeps them (a month is not a number of days, nor a day a
#: number of hours across a DST change, so the three are not added up).
INTERVAL_STRUCT = "struct<months: int32, days: int32, microseconds: int64>"

#: Session settings of a Parquet export's chunks, replacing the user's: what travels as text
#: is then read the same way whatever the environment (ISO intervals, shortest exact floats,
#: hex bytea, UTF-8). search_path stays the user's (it names objects in regclass columns).
PARQUET_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "iso_8601",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "client_encoding": "UTF8",
}

#: The marker of a value the policy refuses: the server raises it inside the chunk's COPY (as
#: the text of a failed cast, the only way a query can raise), and the error is reworded.
MARKER = "copystream-parquet-value:"

_INTS = {"int2": "int16", "int4": "int32", "int8": "int64", "oid": "uint32"}
_FLOATS = {"float4": "float32", "float8": "float64"}
_STRINGS = frozenset({"text", "varchar", "bpchar", "char", "name", "interval"})
#: Array element types written as a list of that type (others: the array's text).
LIST_ELEMENTS = {
    **_INTS, **_FLOATS, "bool": "bool", "text": "string", "varchar": "string",
    "bpchar": "string", "name": "string",
}  # fmt: skip

#: The greatest timestamp Parquet's int64 microseconds from 1970 hold.
_MAX_TIMESTAMP = "294247-01-10 04:00:54.775807"
_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class ColumnType:
    """What the catalog says of one column (domains resolved to their base type)."""

    name: str
    pg_type: str  # format_type(): "numeric(12,2)", "timestamp with time zone", "integer[]"
    base: str  # pg_type.typname of the base type: "numeric", "timestamptz", "_int4"
    category: str  # pg_type.typcategory of the base type: "A" array, "E" enum, ...
    typmod: int  # of the base type (-1: none)
    element: str | None = None  # typname of an array's element type


@dataclass(frozen=True)
class ColumnPlan:
    """How one column is written: its Arrow type and the form it travels in.

    ``arrow`` is a type name the decoder understands (``"int64"``, ``"decimal128(12,2)"``,
    ``"timestamp[us, UTC]"``, ``"list<int32>"``...); ``wire`` how the COPY delivers it: ``"text"``
    (as PostgreSQL prints it, parsed as ``arrow``), ``"micros"`` (int64 µs), ``"days"`` (int32),
    ``"hex"`` (bytea's hex form), ``"uuid"`` (its text) or ``"json"`` (an array as JSON).
    ``guard`` is what the ``out_of_range`` policy watches: ``"timestamp"``, ``"date"``, ``"nan"``.
    """

    name: str
    pg_type: str
    arrow: str
    wire: str = "text"
    guard: str | None = None

    def to_json(self) -> list[str]:
        """The form an export's identity records: ``[name, pg_type, arrow, wire]``."""
        return [self.name, self.pg_type, self.arrow, self.wire]


def _numeric(typmod: int) -> tuple[int, int] | None:
    """``(precision, scale)`` of a numeric typmod, ``None`` when unbounded (PostgreSQL packs
    the scale as an 11-bit signed number since 15, when it may be negative)."""
    if typmod < 4:
        return None
    packed = typmod - 4
    return (packed >> 16) & 0xFFFF, ((packed & 0x7FF) ^ 1024) - 1024


def _scalar(
    c: ColumnType, numeric_scale: int | None = None, interval: str = "text"
) -> ColumnPlan | None:
    """The plan of a column of a scalar type with a native mapping, or ``None``."""
    b = c.base
    if b == "interval" and interval == "struct":
        return ColumnPlan(c.name, c.pg_type, INTERVAL_STRUCT, "interval", "interval")
    if b in _INTS:
        return ColumnPlan(c.name, c.pg_type, _INTS[b])
    if b in _FLOATS:
        return ColumnPlan(c.name, c.pg_type, _FLOATS[b])
    if b == "bool":
        return ColumnPlan(c.name, c.pg_type, "bool")
    if b == "numeric":
        ps = _numeric(c.typmod)
        if ps is not None and ps[0] <= 38 and 0 <= ps[1] <= ps[0]:
            return ColumnPlan(c.name, c.pg_type, f"decimal128({ps[0]},{ps[1]})", guard="nan")
        if numeric_scale is not None:  # checked by the server: never rounded, never cut
            return ColumnPlan(c.name, c.pg_type, f"decimal128(38,{numeric_scale})", guard="exact")
        return ColumnPlan(c.name, c.pg_type, "string")
    if b in _STRINGS or c.category == "E":
        return ColumnPlan(c.name, c.pg_type, "string")
    simple = {
        "bytea": ("binary", "hex", None),
        "uuid": ("uuid", "uuid", None),
        "json": ("json", "text", None),
        "jsonb": ("json", "text", None),
        "date": ("date32", "days", "date"),
        "timestamp": ("timestamp[us]", "micros", "timestamp"),
        "timestamptz": ("timestamp[us, UTC]", "micros", "timestamp"),
        "time": ("time64[us]", "micros", None),
    }
    if b in simple:
        arrow, wire, guard = simple[b]
        return ColumnPlan(c.name, c.pg_type, arrow, wire, guard)
    return None


def plan_columns(
    columns: Sequence[ColumnType],
    *,
    strict: bool = False,
    table: str = "",
    numeric_scale: int | None = None,
    interval: str = "text",
) -> tuple[ColumnPlan, ...]:
    """The plan of every column, in order. Pure.

    A type with no native mapping is written as text, or with ``strict`` refused: a
    :class:`UsageError` naming the column and its type (before anything is written).
    ``numeric_scale``: numeric columns with no decimal128 of their own (unbounded, or of a
    precision over 38) become ``decimal128(38, numeric_scale)`` instead of text.
    ``interval``: ``"text"`` (ISO 8601) or ``"struct"`` (:data:`INTERVAL_STRUCT`).
    """
    plans = []
    for c in columns:
        plan = _scalar(c, numeric_scale, interval)
        if plan is None and c.category == "A" and c.element in LIST_ELEMENTS:
            plan = ColumnPlan(c.name, c.pg_type, f"list<{LIST_ELEMENTS[c.element]}>", "json")
        if plan is None:
            if strict:
                raise UsageError(
                    f"column {c.name} of {table} is of type {c.pg_type}, which has no Parquet "
                    "type of its own",
                    remedy=Remedy.LOOSE_TYPES,
                )
            plan = ColumnPlan(c.name, c.pg_type, "string")
        plans.append(plan)
    return tuple(plans)


def parquet_settings(settings: dict[str, str]) -> dict[str, str]:
    """The pinned settings of a Parquet export: the user's, with :data:`PARQUET_SETTINGS`."""
    return {**settings, **PARQUET_SETTINGS}


# -- the typed SELECT list ----------------------------------------------------------------------


def _refuse(col: sql.Identifier, name: str, key: sql.Composable, kind: str) -> sql.Composed:
    """An expression that makes the server raise the marker, the column, value and key: a cast
    of that text to int8 fails with it (a query has no other way to raise)."""
    text = sql.SQL("({} || {} || ' ' || {}::text || ' at key ' || {})::int8").format(
        sql.Literal(MARKER), sql.Literal(f"{name}\x1f{kind}\x1f"), col, key
    )
    return text


def _outside(
    plan: ColumnPlan,
    col: sql.Identifier,
    key: sql.Composable,
    policy: str,
    bounds: tuple[int, int],
) -> sql.Composable:
    if policy == "null":
        return sql.SQL("NULL")
    if policy == "clamp" and plan.guard != "nan":
        low, high = bounds
        return sql.SQL("CASE WHEN {c} > {zero} THEN {hi} ELSE {lo} END").format(
            c=col,
            zero=sql.Literal("1970-01-01"),
            hi=sql.Literal(high),
            lo=sql.Literal(low),
        )
    kind = "NaN" if plan.guard == "nan" else "a value outside Parquet's range"
    return _refuse(col, plan.name, key, kind)


def _expression(plan: ColumnPlan, key: sql.Composable, policy: str) -> sql.Composable:
    col = sql.Identifier(plan.name)
    value: sql.Composable
    if plan.wire == "micros":
        value = sql.SQL("(extract(epoch FROM {}) * 1000000)::int8").format(col)
        if plan.guard is None:  # time: always in range
            return value
        value = _micros(col)
        fits = sql.SQL("isfinite({c}) AND {c} <= {hi}").format(
            c=col, hi=sql.Literal(_MAX_TIMESTAMP + ("+00" if "UTC" in plan.arrow else ""))
        )
        outside = _outside(plan, col, key, policy, _INT64)
    elif plan.wire == "days":
        value = sql.SQL("({} - DATE '1970-01-01')").format(col)
        fits = sql.SQL("isfinite({})").format(col)
        outside = _outside(plan, col, key, policy, _INT32)
    elif plan.wire == "json":
        value = sql.SQL("array_to_json({})::text").format(col)
        fits = sql.SQL("array_ndims({}) IS NULL OR array_ndims({}) = 1").format(col, col)
        refuse = _refuse(col, plan.name, key, "a multi-dimensional array")
        outside = sql.SQL("{}::text").format(refuse)
    elif plan.guard == "nan":
        value, fits = col, sql.SQL("{} <> 'NaN'").format(col)
        outside = _outside(plan, col, key, policy, _INT64)
    elif plan.guard == "exact":
        return _exact(plan, col, key, policy)
    elif plan.wire == "interval":
        value = _interval_fields(col)
        fits = sql.SQL("isfinite({})").format(col)  # infinite intervals: PostgreSQL 17 on
        if policy == "null":
            outside = sql.SQL("NULL")
        else:  # an infinite interval has no nearest struct to clamp to
            outside = sql.SQL("{}::text").format(
                _refuse(col, plan.name, key, "an infinite interval")
            )
    else:
        return col
    return sql.SQL("CASE WHEN {c} IS NULL OR ({fits}) THEN {value} ELSE {outside} END").format(
        c=col, fits=fits, value=value, outside=outside
    )


def _micros(col: sql.Identifier) -> sql.Composable:
    """A timestamp's µs from 1970 (a timestamptz's in the pinned UTC), exactly: its days and
    its time of day. (``extract(epoch …)`` divides a numeric within ~30 years of Parquet's
    last timestamp, where it lost the last µs digits: 294247-01-10 04:00:54.775807 came out
    as …775800.)"""
    return sql.SQL(
        "(({c})::date - DATE '1970-01-01')::int8 * 86400000000 + "
        "(extract(epoch FROM ({c})::time) * 1000000)::int8"
    ).format(c=col)


def _interval_fields(col: sql.Identifier) -> sql.Composable:
    """An interval's months, days and microseconds, as text separated by spaces: extract's
    year, month, day, hour, minute and microseconds fields are the three it keeps, cut up
    (each truncated toward zero, so they share its sign and add up exactly)."""
    return sql.SQL(
        "((extract(year FROM {c}) * 12 + extract(month FROM {c}))::int4 || ' ' || "
        "extract(day FROM {c})::int4 || ' ' || ((extract(hour FROM {c}) * 3600 + "
        "extract(minute FROM {c}) * 60) * 1000000 + extract(microseconds FROM {c}))::int8)"
    ).format(c=col)


def _exact(
    plan: ColumnPlan, col: sql.Identifier, key: sql.Composable, policy: str
) -> sql.Composable:
    """An unbounded numeric as ``decimal128(38, scale)``: a NaN follows the policy; a value
    with more decimal places than the scale, or more digits before the point than 38 - scale
    (±Infinity too), is refused whatever the policy: it is never rounded."""
    scale = int(plan.arrow.rstrip(")").rsplit(",", 1)[1])
    nan = replace(plan, guard="nan")
    return sql.SQL(
        "CASE WHEN {c} IS NULL THEN {c} WHEN {c} = 'NaN' THEN {nan} "
        "WHEN {c} <> round({c}, {s}) THEN {rounded} WHEN abs({c}) >= {limit} THEN {overflow} "
        "ELSE {c} END"
    ).format(
        c=col,
        nan=_outside(nan, col, key, policy, _INT64),
        s=sql.Literal(scale),
        rounded=_refuse(col, plan.name, key, f"more than {scale} decimal place(s)"),
        limit=sql.SQL("1e{}::numeric").format(sql.SQL(str(38 - scale))),
        overflow=_refuse(col, plan.name, key, f"more than {38 - scale} digits before the point"),
    )


def select_list(
    plans: Sequence[ColumnPlan], key: Sequence[str], policy: str
) -> tuple[sql.Composable, ...]:
    """The typed SELECT list of a Parquet export's COPY, one expression per column. Pure.

    ``key`` names the key columns (quoted in the message of a refused value).
    """
    if len(key) == 1:
        key_text: sql.Composable = sql.SQL("{}::text").format(sql.Identifier(key[0]))
    else:
        key_text = sql.SQL("ROW({})::text").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key)
        )
    return tuple(_expression(p, key_text, policy) for p in plans)


# -- a refused value, as the server reported it -------------------------------------------------


class ValueOutOfRange(UsageError):
    """A value the ``out_of_range`` policy refuses (``infinity``, a NaN decimal, ...)."""


def refused_value(message: str, table: str) -> ValueOutOfRange | None:
    """The error for a server message that carries :data:`MARKER`, or ``None``. Pure."""
    at = message.find(MARKER)
    if at < 0:
        return None
    body = message[at + len(MARKER) :].rstrip('"')
    try:
        column, kind, rest = body.split("\x1f", 2)
    except ValueError:
        return None
    value, _, key = rest.strip().partition(" at key ")
    if kind == "a multi-dimensional array":
        return ValueOutOfRange(
            f"column {column} of {table} holds {kind} at key {key}, which a Parquet list of "
            "one dimension cannot hold"
        )
    if kind.startswith("more than "):  # numeric_scale's refusal: never rounded, never cut
        return ValueOutOfRange(
            f"column {column} of {table} holds {value} at key {key}: {kind}, which its "
            "Parquet decimal cannot hold exactly (copystream never rounds)",
            remedy=Remedy.NUMERIC_SCALE,
        )
    return ValueOutOfRange(
        f"column {column} of {table} holds {value} ({kind}) at key {key}, which Parquet "
        "cannot store",
        remedy=Remedy.OUT_OF_RANGE,
    )


# -- the binary path: COPY BINARY decoded by ADBC's PostgreSQL driver ---------------------------

#: Base types whose binary form ADBC's driver decodes into exactly their plan's Arrow type
#: (bpchar keeps its padding; json and jsonb arrive as JSON text, uuid as 16 bytes).
_BINARY_NATIVE = frozenset(
    {*_INTS, *_FLOATS, "bool", "text", "varchar", "bpchar", "bytea", "uuid", "json", "jsonb"}
)


#: What ADBC's driver makes of the instants it decodes (its ``PostgresCopyNetworkEndianFieldReader``
#: adds the 2000 → 1970 epoch shift to PostgreSQL's integer, wrapping around on overflow): a
#: timestamp's ``infinity`` and ``-infinity`` (int64 max and min) and every timestamp after
#: Parquet's last (:data:`_MAX_TIMESTAMP`) land below -9.2e18 µs, a date's infinities (int32 max
#: and min) below -2.1e9 days, far below the least value PostgreSQL holds (4714-11-24 BC:
#: -2.1e17 µs, -2.4e6 days). So one comparison with the column's least value tells a batch
#: holds none of them.
_EPOCH_SHIFT = {
    "timestamp": 946_684_800_000_000,
    "timestamptz": 946_684_800_000_000,
    "date": 10_957,
}
_LIMITS = {"timestamp": _INT64, "timestamptz": _INT64, "date": _INT32}

#: Per kind of checked column: a value below this is one :func:`refused_wire` treats (a NaN
#: decimal travels as the least int8, and no unscaled decimal of 18 digits is below -1e18).
#: Each is the least integer of its width whose two highest bits are not ``10``: a value is
#: below it exactly when its highest byte is 0x80-0xBF, which the client checks a whole
#: column at a time.
REFUSED_BELOW = {"date": -(2**30), "timestamp": -(2**62), "timestamptz": -(2**62), "nan": -(2**62)}


@dataclass(frozen=True)
class BinaryPlan:
    """How a table's chunks are read through COPY BINARY (ADBC) instead of typed CSV.

    ``select`` holds one expression per column, then the key columns that are not exported
    as integers, as text (``key_columns`` of them, dropped before writing); ``key_at`` is where
    each key column is in a batch (the chunk's last key is read from its last row). The Arrow
    fix of each column is decided by the destination from its plan (:class:`ColumnPlan`) and
    the type ADBC delivered (see ``destinations.parquet.Decoder.from_batch``). ``checks``: the
    columns (position, name, kind) whose ``infinity``, out-of-range or NaN values the client
    finds (:func:`refused_wire`) and treats by ``policy``, as the typed CSV's guards do.
    """

    select: tuple[sql.Composable, ...]
    key_columns: int
    key_at: tuple[int, ...] = ()
    checks: tuple[tuple[int, str, str], ...] = ()
    policy: str = "error"


def _binary_expression(
    c: ColumnType, plan: ColumnPlan, typed: sql.Composable
) -> sql.Composable | None:
    """The expression a column is read as through COPY BINARY, or ``None`` (no exact form).

    Dates, timestamps and times travel as they are (ADBC shifts them to 1970's epoch; the
    client finds what does not fit, see :func:`refused_wire`): the server's
    ``extract(epoch …)`` is numeric arithmetic, most of what the typed list costs it more than
    a bare ``SELECT *``. The rest keeps the typed CSV's expression (its guards and integer
    forms); what travels as text is cast to text (ADBC would decode an interval, enum, range
    or composite otherwise, or not at all), and everything else to its base type (a domain's
    oid is unknown to ADBC)."""
    if plan.wire in ("micros", "days"):
        raw = sql.Identifier("pg_catalog", c.base)
        return sql.SQL("{}::{}").format(sql.Identifier(c.name), raw)
    if plan.wire in ("json", "interval"):
        return typed  # text: the fix parses it as the CSV path does
    if plan.arrow == "string" and c.base not in ("text", "varchar", "bpchar"):
        return sql.SQL("({})::text").format(typed)
    if plan.arrow.startswith("decimal128("):
        precision, scale = (int(x) for x in plan.arrow[len("decimal128(") : -1].split(","))
        if precision <= 18:  # its unscaled integer fits an int8: no text on either side
            # a NaN as the least int8, which no value of 18 digits is (see refused_wire)
            return sql.SQL("CASE WHEN {c} = 'NaN' THEN int8 {n} ELSE ({c} * {k})::int8 END").format(
                c=sql.Identifier(c.name), n=sql.Literal(str(_INT64[0])), k=sql.Literal(10**scale)
            )
    base = "numeric" if plan.arrow.startswith("decimal128(") else c.base
    if base != "numeric" and base not in _BINARY_NATIVE:
        return None
    return sql.SQL("({})::{}").format(typed, sql.Identifier("pg_catalog", base))


#: The oldest ``adbc-driver-postgresql`` the binary path runs on: before 1.11 the driver aborts
#: the whole process (a ``std::logic_error`` built from a NULL SQLSTATE) when a statement fails
#: because its connection was lost, as a network outage does (apache/arrow-adbc#3891, first
#: released in 1.11.0; 1.9.0 and 1.10.0 abort in the fault tests as 1.8.0 does).
ADBC_DRIVER_MIN = (1, 11)


def driver_refusal(version: str | None, missing: str | None = None) -> str | None:
    """Why ADBC's PostgreSQL driver of ``version`` cannot read the binary path, or ``None``
    when it can. ``missing``: why it could not be imported (then ``version`` is not looked at).
    A version that does not start with two numbers is refused too. Pure."""
    name = "adbc-driver-postgresql"
    if missing is not None:
        return f"{name} cannot be imported ({missing})"
    found = re.match(r"(\d+)\.(\d+)", version or "")
    if found is None:
        return f"{name} of an unknown version ({version!r})"
    if (int(found.group(1)), int(found.group(2))) < ADBC_DRIVER_MIN:
        return f"{name} {version} aborts on a lost connection (fixed in {driver_minimum()})"
    return None


def driver_minimum() -> str:
    """The oldest usable driver, as pip writes it: ``"1.11"``. Pure."""
    return ".".join(map(str, ADBC_DRIVER_MIN))


def binary_plan(
    columns: Sequence[ColumnType],
    plans: Sequence[ColumnPlan],
    typed: Sequence[sql.Composable],
    key: Sequence[str],
    *,
    key_unique: bool,
    policy: str = "error",
) -> BinaryPlan | str:
    """The :class:`BinaryPlan` of a table, or why its chunks stay typed CSV. Pure.

    ``typed`` is :func:`select_list` of ``plans`` under ``policy``. A key not provably unique
    stays on the CSV path (its chunks need their bound before the rows: the binary path
    takes the last key from the rows), as does a column with no exact binary form. A key
    column exported as an integer is read from its column (an integer's text is Python's).
    """
    if not key_unique:
        return "its key is not provably unique"
    select: list[sql.Composable] = []
    for c, plan, expr in zip(columns, plans, typed, strict=True):
        binary = _binary_expression(c, plan, expr)
        if binary is None:
            return f"column {c.name} is of type {c.pg_type}"
        select.append(binary)
    integers = {c.name: i for i, c in enumerate(columns) if c.base in ("int2", "int4", "int8")}
    key_at, extra = [], 0
    for k in key:
        if k in integers:
            key_at.append(integers[k])
            continue
        key_at.append(len(columns) + extra)
        extra += 1
        select.append(sql.SQL("{}::text").format(sql.Identifier(k)))
    return BinaryPlan(tuple(select), extra, tuple(key_at), _checks(plans), policy)


def _checks(plans: Sequence[ColumnPlan]) -> tuple[tuple[int, str, str], ...]:
    """The columns whose values the client checks (:func:`refused_wire`): position, name and
    kind (``"date"``, ``"timestamp"``, ``"timestamptz"``, ``"nan"``)."""
    found = []
    for i, p in enumerate(plans):
        if p.wire in ("micros", "days") and p.guard:
            found.append((i, p.name, "timestamptz" if "UTC" in p.arrow else p.guard))
        elif p.guard == "nan" and int(p.arrow[len("decimal128(") :].split(",")[0]) <= 18:
            found.append((i, p.name, "nan"))
    return tuple(found)


def refused_wire(value: int, kind: str) -> tuple[str, int | None] | None:
    """For a value of a checked column as ADBC delivered it (``kind``: ``"date"``, days from
    1970; ``"timestamp"``, ``"timestamptz"``, µs from 1970; ``"nan"``, a decimal's unscaled
    int8), ``None`` if it is the value PostgreSQL holds; else (see :data:`REFUSED_BELOW`) the
    value as PostgreSQL prints it (``infinity``, ``-infinity``, a timestamp past Parquet's
    range, a timestamptz's in UTC; ``NaN``) and the value ``clamp`` writes in its place
    (``None``: none, a NaN). Pure."""
    if value >= REFUSED_BELOW[kind]:
        return None
    if kind == "nan":
        return "NaN", None
    low, high = _LIMITS[kind]
    shift = _EPOCH_SHIFT[kind]
    sent = value - shift + (high - low + 1)  # PostgreSQL's own integer, unwrapped
    if sent > high:  # only -infinity (the least integer) does not wrap
        sent -= high - low + 1
    if sent == high:
        return "infinity", high
    if sent == low:
        return "-infinity", low
    return _timestamp_text(sent) + ("+00" if kind == "timestamptz" else ""), high


def _timestamp_text(micros: int) -> str:
    """PostgreSQL's ISO text of a timestamp of ``micros`` µs from 2000-01-01 (as UTC, from
    year 1 on: only those past Parquet's range reach here). Pure."""
    days, rest = divmod(micros, 86_400_000_000)
    # days → civil date (proleptic Gregorian), after Howard Hinnant's days_from_civil inverse
    z = days + 10_957 + 719_468  # days from 0000-03-01
    era, doe = divmod(z, 146_097)
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day, month = doy - (153 * mp + 2) // 5 + 1, mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (month <= 2)
    seconds, micro = divmod(rest, 1_000_000)
    text = f"{year:04d}-{month:02d}-{day:02d} {seconds // 3600:02d}:{seconds // 60 % 60:02d}:"
    text += f"{seconds % 60:02d}"
    return text + (f".{micro:06d}".rstrip("0") if micro else "")


def record_text(values: Sequence[str]) -> str:
    """``ROW(…)::text`` of a key of several columns, from each column's text. Pure."""
    quoted = []
    for v in values:
        if v == "" or any(ch in v for ch in '"\\(),') or any(ch.isspace() for ch in v):
            v = '"' + v.replace("\\", "\\\\").replace('"', '""') + '"'
        quoted.append(v)
    return "(" + ",".join(quoted) + ")"


def refusal(column: str, kind: str, value: str, key: str) -> str:
    """The message of a value the policy refuses, as :func:`_refuse`'s expression makes the
    server raise it (:func:`refused_value` reads both). Pure."""
    return f"{MARKER}{column}\x1f{kind}\x1f {value} at key {key}"
