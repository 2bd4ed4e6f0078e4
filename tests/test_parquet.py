"""Parquet output (``--format parquet``): typed, lossless, in parts, resumable by part.

The claims, each against real readers: every mapped type reads back with pyarrow equal, value by
value, to what psycopg returns for the same rows (instants compared as UTC microseconds, since
Python's datetime holds no BC date; decimals exactly); DuckDB reads the dataset with the right
row count, in key order; a SIGKILL at several points, then a resume, gives the same values as an
uninterrupted export; ``infinity`` follows the ``out_of_range`` policy; bad requests exit 2 with
one line and leave nothing; ``verify`` catches a changed part. The mapping and the resume point
are pure and tested without a server; the destination is tested on its own too (its rollback
rewrites the part in flight).
"""

from __future__ import annotations

import logging
import math
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import psycopg
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from helpers import (
    assert_ok,
    assert_one_error_line,
    cli,
    export_cmd,
    kill_export,
    read_manifest,
    run,
    scratch_database,
    snapshot,
    wait_for,
)

import copystream
from copystream.arrowchunk import _suspect
from copystream.checkpoint import new_checkpoint
from copystream.destinations import parquet
from copystream.destinations.parquet import ParquetDataset, resume_point
from copystream.errors import UsageError
from copystream.parquet_types import (
    INTERVAL_STRUCT,
    BinaryPlan,
    ColumnPlan,
    ColumnType,
    binary_plan,
    driver_minimum,
    driver_refusal,
    plan_columns,
    record_text,
    refused_wire,
    select_list,
)
from copystream.spec import build
from copystream.testing import EphemeralPostgres

BIG = "x" * 3_000_000  # TOAST-sized, and larger than Arrow's default CSV block

SCHEMA = f"""
CREATE TYPE mood AS ENUM ('sad', 'happy');
CREATE DOMAIN money2 AS numeric(10,2);
CREATE TABLE every (
    id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, o oid, f4 real, f8 float8,
    n numeric(12,2), n38 numeric(38,10), nu numeric, dm money2, b bool,
    t text, vc varchar(10), c char(3), m mood, nm name,
    by bytea, u uuid, j json, jb jsonb,
    d date, ts timestamp, tz timestamptz, tm time, iv interval,
    ai int[], at text[], af float8[], ab bool[],
    r int4range
);
INSERT INTO every VALUES
 (1, 1, 2, 9223372036854775807, 4000000000, 'NaN', 'Infinity', 9999999999.99,
  9999999999999999999999999999.9999999999, 'NaN', 12.50, true,
  E'a,"b"\\nc', '', 'ab', 'happy', 'n1', '\\x00ff0a', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{{"a": 1}}', '{{"b": [1, 2]}}', '0044-03-15 BC', '2024-01-01 12:00:00.123456',
  '2024-06-01 12:00:00+05:30', '24:00:00', '1 year 2 mons 3 days 04:05:06.7',
  '{{1,NULL,3}}', '{{"x,y",NULL,""}}', '{{NaN,Infinity,-Infinity,1.5}}', '{{t,f}}', '[1,5)'),
 (2, NULL, NULL, NULL, NULL, '-Infinity', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  '{{}}', '{{}}', '{{}}', '{{}}', NULL),
 (3, -32768, -2147483648, -9223372036854775808, 0, 1.5, -0.0, -0.01,
  -0.0000000001, '123456789012345678901234567890.123456789', -1, false,
  'ünïcödé 😀 ''q''', 'x', NULL, 'sad', 'n3', '', '00000000-0000-0000-0000-000000000000',
  'null', '"s"', '5874897-12-31', '4713-01-01 00:00:00 BC', '4713-01-01 00:00:00+00 BC',
  '00:00:00', '-1 day -00:00:01', NULL, NULL, '{{-0}}', NULL, 'empty'),
 (4, 7, 7, 7, 7, 3.4e38, 1e-300, 0, 0, '-Infinity', 0, true, '{BIG}', 'yyyyyyyyyy', 'abc',
  'happy', 'n4', '\\x', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '[]', '{{}}',
  '1970-01-01', '294247-01-10 04:00:54.775807', '2000-01-01 00:00:00-12',
  '23:59:59.999999', '0', '{{-2147483648,2147483647}}', '{{"ü"}}', NULL, '{{NULL}}',
  '(,)');
CREATE TABLE every_heap AS SELECT * FROM every;  -- no unique key: the typed-CSV path
ALTER TABLE every_heap ALTER id SET NOT NULL;
CREATE TABLE big (id bigint PRIMARY KEY, name text, ts timestamptz, amount numeric(12,2),
                  ref uuid);
INSERT INTO big SELECT g, 'name ' || g || CASE WHEN g % 7 = 0 THEN E'\\n,"' ELSE '' END,
        timestamptz '2020-01-01 00:00:00+00' + g * interval '37.123 seconds',
        (g * 7.31)::numeric(12,2), md5(g::text)::uuid
    FROM generate_series(1, 60000) g;
CREATE TABLE inf (id int PRIMARY KEY, d date, ts timestamptz, n numeric(5,2));
INSERT INTO inf VALUES (1, '2020-01-01', now(), 1), (2, 'infinity', '-infinity', 'NaN'),
                       (3, '-infinity', 'infinity', 2);
CREATE TABLE ranged (id int PRIMARY KEY, r tsrange);
INSERT INTO ranged VALUES (1, '[2020-01-01,2021-01-01)');
CREATE TABLE nums (id int PRIMARY KEY, n numeric, w numeric(60,4));
INSERT INTO nums VALUES (1, 0, 0), (2, NULL, NULL), (3, 'NaN', 1.5),
    (4, 9999999999999999999999999999.9999999999, -12345678901234567890123456.7891),
    (5, -0.0000000001, 0.0001), (6, 123.5, 1000000000000000000000000000.0000),
    (7, 1.23456789012, 1), (8, 123456789012345678901234567890, 1);
CREATE TABLE ivs (id int PRIMARY KEY, iv interval);
INSERT INTO ivs VALUES (1, '1 year 2 mons 3 days 04:05:06.7'), (2, NULL),
    (3, '-1 day -00:00:01'), (4, '-1 year +2 mons -3 days +25:00:00.000001'),
    (5, '178000000 years'), (6, '-2147483648 days -2562047788 hours -54.775807 seconds'),
    (7, '0'), (8, '-178000000 years 2147483647 days 2562047788:00:54.775807');
CREATE TABLE far (id int PRIMARY KEY, ts timestamp, tz timestamptz, d date);
INSERT INTO far SELECT g, timestamp '2020-01-01' + g * interval '1 hour',
        timestamptz '2020-01-01 00:00:00+00' - g * interval '1 day', DATE '2020-01-01' - g
    FROM generate_series(1, 20000) g;
UPDATE far SET ts = '294247-01-10 04:00:54.775808' WHERE id = 15000;
UPDATE far SET tz = '294276-12-31 23:59:59.999999+00', d = 'infinity' WHERE id = 12000;
UPDATE far SET d = '-infinity', tz = NULL WHERE id = 17000;
CREATE TABLE far_text (k text PRIMARY KEY, d date);
INSERT INTO far_text VALUES ('a b', '2020-01-01'), ('b', 'infinity');
CREATE TABLE far_heap AS SELECT * FROM far;  -- no unique key: the typed-CSV path
ALTER TABLE far_heap ALTER id SET NOT NULL;
ANALYZE;
"""

#: psycopg's reference for each column: its value, or a form Python holds exactly (instants as
#: UTC microseconds, dates as days since 1970, json and other types as text).
REFERENCE = """
SELECT id, i2, i4, i8, o::int8, f4, f8, n, n38, nu::text, dm, b, t, vc, c, m::text, nm::text,
       by, u, j::text, jb::text,
       d - DATE '1970-01-01',
       (ts::date - DATE '1970-01-01')::int8 * 86400000000
         + (extract(epoch FROM ts::time) * 1000000)::int8,
       ((tz AT TIME ZONE 'UTC')::date - DATE '1970-01-01')::int8 * 86400000000
         + (extract(epoch FROM (tz AT TIME ZONE 'UTC')::time) * 1000000)::int8,
       (extract(epoch FROM tm) * 1000000)::int8,
       iv::text, ai, at, af, ab, r::text
FROM every ORDER BY id
"""


@pytest.fixture(scope="module")
def db(pg: EphemeralPostgres) -> Iterator[str]:
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


def read_dataset(path: Path) -> pa.Table:
    return ds.dataset(path, format="parquet").to_table()


def comparable(table: pa.Table) -> list[tuple[Any, ...]]:
    """Rows of an exported ``every`` in the reference's forms (temporal values as integers)."""
    columns = []
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_date32(col.type):
            col = col.cast(pa.int32())
        elif pa.types.is_timestamp(col.type) or pa.types.is_time64(col.type):
            col = col.cast(pa.int64())
        elif isinstance(col.type, pa.ExtensionType) and col.type.extension_name == "arrow.json":
            col = col.cast(pa.string())
        columns.append(col.to_pylist())
    return list(zip(*columns, strict=True))


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    return bool(a == b) and type(a) is type(b)


# -- the mapping, pure ----------------------------------------------------------------------------


def col(name: str, base: str, pg_type: str = "", typmod: int = -1, **kw: Any) -> ColumnType:
    return ColumnType(name, pg_type or base, base, kw.pop("category", "N"), typmod, **kw)


def test_mapping_table() -> None:
    """Each catalog type gets the Arrow type and wire form the documented table says."""
    cases = {
        col("a", "int2"): ("int16", "text"),
        col("a", "oid"): ("uint32", "text"),
        col("a", "float4"): ("float32", "text"),
        col("a", "numeric", typmod=(12 << 16 | 2) + 4): ("decimal128(12,2)", "text"),
        col("a", "numeric", typmod=(39 << 16 | 2) + 4): ("string", "text"),
        col("a", "numeric"): ("string", "text"),
        col("a", "bytea"): ("binary", "hex"),
        col("a", "uuid"): ("uuid", "uuid"),
        col("a", "jsonb"): ("json", "text"),
        col("a", "date"): ("date32", "days"),
        col("a", "timestamptz"): ("timestamp[us, UTC]", "micros"),
        col("a", "timestamp"): ("timestamp[us]", "micros"),
        col("a", "time"): ("time64[us]", "micros"),
        col("a", "interval"): ("string", "text"),
        col("a", "mood", category="E"): ("string", "text"),
        col("a", "_int4", category="A", element="int4"): ("list<int32>", "json"),
        col("a", "_text", category="A", element="text"): ("list<string>", "json"),
        col("a", "_date", category="A", element="date"): ("string", "text"),
        col("a", "int4range", category="R"): ("string", "text"),
    }
    for column, (arrow, wire) in cases.items():
        (plan,) = plan_columns([column])
        assert (plan.arrow, plan.wire) == (arrow, wire), column


def test_negative_scale_numeric_is_text() -> None:
    """PostgreSQL 15's numeric(2,-3) has no Parquet decimal: written as text."""
    packed = (2 << 16) | ((-3) & 0x7FF)
    (plan,) = plan_columns([col("a", "numeric", typmod=packed + 4)])
    assert plan.arrow == "string"


def test_strict_types_refuses_a_type_without_mapping() -> None:
    with pytest.raises(UsageError, match=r"column r of public\.t is of type tsrange"):
        plan_columns([col("r", "tsrange", category="R")], strict=True, table="public.t")


def test_policies_compose_into_the_select() -> None:
    """The policy changes only what a value outside the range becomes."""
    plans = plan_columns([col("ts", "timestamptz", "timestamp with time zone")])
    policies = ("error", "null", "clamp")
    texts = {p: select_list(plans, ["id"], p)[0].as_string(None) for p in policies}
    assert "copystream-parquet-value:" in texts["error"]
    assert "ELSE NULL END" in texts["null"]
    assert "9223372036854775807" in texts["clamp"]
    assert all("isfinite" in t for t in texts.values())


@pytest.mark.parametrize(
    "options",
    [
        {"format": "parquet", "delimiter": ";"},
        {"format": "parquet", "header": True},
        {"format": "parquet", "compress": "zstd"},
        {"part_size": "64MB"},
        {"out_of_range": "null"},
        {"strict_types": True},
    ],
)
def test_options_of_the_other_format_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=r"not an option of|option of parquet"):
        build("t", **options)


def test_sizes_take_units() -> None:
    spec, _ = build("t", format="parquet", part_size="2MiB", row_group_size="100kb")
    assert (spec.part_size, spec.row_group_size) == (2 * 1024 * 1024, 100_000)


def test_part_size_takes_a_row_count() -> None:
    """``"N rows"`` (any spacing, ``_`` separators) is a row count, recorded as ``part_rows``
    in place of a byte size; zero rows or a bare word is refused."""
    for text in ("5000000 rows", "5_000_000rows", " 5000000 ROWS "):
        spec, _ = build("t", format="parquet", part_size=text)
        assert spec.part_size == "5000000 rows"
        assert spec.parquet is not None
        assert (spec.parquet["part_size"], spec.parquet["part_rows"]) == (None, 5_000_000)
    spec, _ = build("t", format="parquet")
    assert spec.parquet is not None and "part_rows" not in spec.parquet
    for bad in ("0 rows", "rows", "12 row", "-3 rows"):
        with pytest.raises(UsageError, match="row count"):
            build("t", format="parquet", part_size=bad)


def test_numeric_scale_and_interval_form_plan() -> None:
    """``numeric_scale`` turns unbounded numeric (and p > 38) into decimal128(38, S) checked
    by the server; bounded numerics keep their own. ``interval_form="struct"``: the struct,
    travelling as its three numbers."""
    columns = [
        col("u", "numeric"),
        col("wide", "numeric", typmod=(60 << 16) + 4 + 4),
        col("n", "numeric", typmod=(12 << 16) + 2 + 4),
        col("iv", "interval"),
    ]
    plans = {p.name: p for p in plan_columns(columns, numeric_scale=4, interval="struct")}
    assert plans["u"].arrow == plans["wide"].arrow == "decimal128(38,4)"
    assert plans["n"].arrow == "decimal128(12,2)"
    assert (plans["iv"].arrow, plans["iv"].wire) == (INTERVAL_STRUCT, "interval")
    text = select_list([plans["u"]], ["id"], "error")[0].as_string(None)
    assert "round" in text and "1e34" in text
    default = {p.name: p for p in plan_columns(columns)}
    assert default["u"].arrow == default["iv"].arrow == "string"
    with pytest.raises(UsageError, match="at most 38"):
        build("t", format="parquet", numeric_scale=39)
    for options in ({"numeric_scale": 2}, {"interval_form": "struct"}):
        with pytest.raises(UsageError, match="not an option of csv"):
            build("t", **options)


def test_resume_point_keeps_only_sealed_parts() -> None:
    """A checkpoint whose last part was in flight resumes after the last sealed part's chunk."""
    cp = new_checkpoint(
        export={"parquet": {}}, settings={}, started_at="", chunk_rows=10, estimated_rows=None,
        destination={"kind": "parquet", "stem": "part-", "parts": []},
    )  # fmt: skip
    for i in range(5):
        cp = cp.advance(nbytes=100, rows=10, digest=f"d{i}", prefix_digest="p",
                        last_key=(str(10 * (i + 1)),), finished=False)  # fmt: skip
    part = {"file": "part-00000.parquet", "rows": 30, "bytes": 1, "xxh3_128": "x", "chunks": 3}
    cp = cp.advance(nbytes=0, rows=0, digest="", prefix_digest="p", last_key=None,
                    finished=False, destination={**cp.destination, "parts": [part]})  # fmt: skip
    back = resume_point(cp)
    assert (len(back.chunks), back.rows, back.offset, back.last_key) == (3, 30, 300, ("30",))
    assert resume_point(back) == back
    empty = resume_point(cp.__class__(**{**cp.__dict__, "destination": {"parts": []}}))
    assert (empty.chunks, empty.last_key, empty.rows) == ((), None, 0)


# -- the destination on its own -------------------------------------------------------------------


def test_rollback_rewrites_the_part_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk that fails after writing row groups leaves no row behind; the chunks before it
    stay, and the sealed part holds exactly the committed rows."""
    monkeypatch.setattr(parquet, "PARSE_BYTES", 1)  # every write is parsed at once
    export = {"parquet": {"compression": "zstd", "part_size": 1 << 30, "row_group_size": 1,
                          "columns": [["id", "integer", "int32", "text"],
                                      ["s", "text", "string", "text"]]}}  # fmt: skip
    path = tmp_path / "d.parquet"
    dest = ParquetDataset.create(path, export, {"kind": "parquet", "stem": "part-", "parts": []})
    dest.begin_chunk()
    dest.write(b"1,a\n2,b\n")
    dest.end_chunk()
    dest.begin_chunk()
    dest.write(b'3,"c\nd"\n')
    assert dest._decoding.drain() is None
    part = dest._current
    assert part is not None and (part.groups, part.kept) == (2, 1)  # a row group of its own
    dest.rollback()
    dest.begin_chunk()
    dest.write(b'4,\n5,""\n')
    dest.end_chunk()
    dest.end_parts()
    dest.sync()
    dest.close()
    table = pq.read_table(path / "part-00000.parquet")
    assert table.to_pylist() == [
        {"id": 1, "s": "a"}, {"id": 2, "s": "b"}, {"id": 4, "s": None}, {"id": 5, "s": ""},
    ]  # fmt: skip
    assert [p["rows"] for p in dest.state()["parts"]] == [4]
    assert not [p for p in os.listdir(path) if p.startswith(".")]


def test_blocks_reach_the_parser_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk loop's buffer is parsed as it was given (no copy) when it is a block of its
    own; smaller writes are joined in order; the dataset holds every row once."""
    monkeypatch.setattr(parquet, "PARSE_BYTES", 8)
    export = {"parquet": {"compression": "zstd", "part_size": 1 << 30, "row_group_size": 1 << 20,
                          "columns": [["id", "integer", "int32", "text"]]}}  # fmt: skip
    path = tmp_path / "d.parquet"
    dest = ParquetDataset.create(path, export, {"kind": "parquet", "stem": "part-", "parts": []})
    parsed: list[Any] = []
    decode = dest._decode
    monkeypatch.setattr(dest._decoding, "_work", lambda b: (parsed.append(b), decode(b)))
    dest.begin_chunk()
    whole = bytearray(b"1\n2\n3\n4\n")  # 8 bytes: a block on its own
    dest.write(whole)
    dest.write(b"5\n")
    dest.write(bytearray(b"6\n7\n8\n"))  # 2 + 6 bytes: joined into one block
    dest.write(b"9\n")  # the chunk's rest, at its end
    dest.end_chunk()
    dest.end_parts()
    dest.sync()
    dest.close()
    blocks = [bytes(b) for b in parsed if b is not parquet.END_OF_CHUNK]
    assert parsed[0] is whole
    assert blocks == [b"1\n2\n3\n4\n", b"5\n6\n7\n8\n", b"9\n"]
    table = pq.read_table(path / "part-00000.parquet")
    assert table.column("id").to_pylist() == list(range(1, 10))


def test_a_failed_write_loses_the_part_in_flight_and_stops(tmp_path: Path) -> None:
    """Rows the decoding thread could not write may be an ended chunk's: the part in flight is
    dropped and every later call raises ExportFailed (exit 1; a resume redoes the part)."""
    export = {"parquet": {"compression": "none", "part_size": 1 << 30, "row_group_size": 1 << 20,
                          "columns": [["n", "integer", "int32", "text"]]}}  # fmt: skip
    path = tmp_path / "f.parquet"
    dest = ParquetDataset.create(path, export, {"kind": "parquet", "stem": "part-", "parts": []})
    dest.begin_chunk()
    dest.write(b"1\n2\n")
    dest.end_chunk()
    dest.begin_chunk()
    dest.write(b"x\n")  # cannot be an int32
    dest.end_chunk()  # returns at once: the rows are written by the decoding thread
    with pytest.raises(pa.ArrowInvalid):
        dest.end_parts()
    with pytest.raises(copystream.ExportFailed, match="part in flight"):
        dest.begin_chunk()
    dest.close()
    assert os.listdir(path) == []


def test_a_null_row_of_one_column_is_kept(tmp_path: Path) -> None:
    """The NULL of a one-column table is an empty line of CSV: a row, never skipped."""
    export = {"parquet": {"compression": "none", "part_size": 1 << 30, "row_group_size": 1 << 20,
                          "columns": [["n", "integer", "int32", "text"]]}}  # fmt: skip
    path = tmp_path / "n.parquet"
    dest = ParquetDataset.create(path, export, {"kind": "parquet", "stem": "part-", "parts": []})
    dest.begin_chunk()
    dest.write(b"1\n\n3\n\n")
    dest.end_chunk()
    dest.end_parts()
    dest.sync()
    dest.close()
    assert pq.read_table(path / "part-00000.parquet").column("n").to_pylist() == [1, None, 3, None]


# -- against a server -----------------------------------------------------------------------------


@pytest.mark.all_versions
def test_every_type_reads_back_equal(db: str, tmp_path: Path) -> None:
    """pyarrow reads back, value by value, what psycopg returns (NULLs, NaN, ±Infinity, extreme
    numerics, BC dates, time zones, unicode, TOAST-sized text, arrays, empty arrays)."""
    out = tmp_path / "every.parquet"
    result = copystream.export_table(db, "every", out, format="parquet", out_of_range="error")
    assert result.rows == 4
    table = read_dataset(out)
    with psycopg.connect(db) as conn:
        conn.execute("SET IntervalStyle = iso_8601")
        expected = conn.execute(REFERENCE).fetchall()
    got = comparable(table)
    names = table.column_names
    for want_row, got_row in zip(expected, got, strict=True):
        for name, want, have in zip(names, want_row, got_row, strict=True):
            if name == "f4" and want is not None:  # psycopg reads real's text as a double
                want = struct.unpack("f", struct.pack("f", want))[0]
            if isinstance(want, bytes):
                have = bytes(have) if have is not None else None
            assert same(want, have), (name, want_row[0], want, have)
    assert table.schema.field("n").type == pa.decimal128(12, 2)
    assert table.schema.field("dm").type == pa.decimal128(10, 2)  # a domain: its base type
    assert table.schema.field("tz").type == pa.timestamp("us", "UTC")
    assert table.schema.field("u").type.extension_name == "arrow.uuid"
    meta = pq.ParquetFile(out / "part-00000.parquet").schema
    assert "(UUID)" in str(meta) and "(JSON)" in str(meta)
    copystream.verify_file(out)


def test_duckdb_reads_the_dataset_in_key_order(db: str, tmp_path: Path) -> None:
    """Several parts (small part and row group sizes), read by DuckDB as one table: every row,
    in key order, equal values."""
    out = tmp_path / "big.parquet"
    result = copystream.export_table(
        db, "big", out, format="parquet", part_size="1MiB", row_group_size="256KiB",
        chunk_rows=7000,
    )  # fmt: skip
    m = read_manifest(out)
    assert len(m["parts"]) >= 2, m["parts"]
    assert sorted(os.listdir(out)) == [p["file"] for p in m["parts"]]
    assert [p["last_key"] for p in m["parts"]][-1] == ["60000"]
    assert result.bytes == sum(p["bytes"] for p in m["parts"])
    glob = str(out / "*.parquet")
    ((count, ordered),) = duckdb.sql(
        f"SELECT count(*), bool_and(id = rn) FROM (SELECT id, row_number() OVER () AS rn "
        f"FROM read_parquet('{glob}'))"
    ).fetchall()
    assert (count, ordered) == (60000, True)
    with psycopg.connect(db) as conn:
        want = conn.execute("SELECT id, name, amount, ref FROM big ORDER BY id").fetchall()
    got = duckdb.sql(f"SELECT id, name, amount, ref FROM read_parquet('{glob}')").fetchall()
    assert got == want
    status = copystream.export_status(out)
    assert (status.state, status.rows, status.parts) == ("complete", 60000, len(m["parts"]))


def test_sigkill_at_several_points_then_resume(db: str, tmp_path: Path) -> None:
    """Killed three times mid-export, each resume continues after the last whole part (the
    part in flight is deleted); the result has the same values as an uninterrupted export."""
    whole = tmp_path / "whole.parquet"
    opts = ("--format", "parquet", "--part-size", "1MiB", "--chunk-rows", "1500")
    assert_ok(run(export_cmd(db, "big", whole, *opts)))
    out = tmp_path / "k.parquet"
    cmd = export_cmd(db, "big", out, *opts)
    for chunks in (2, 12, 25):
        killed = kill_export(cmd, out, min_chunks=chunks)
        assert killed.returncode == -9, killed.stderr
        cp = killed.checkpoint
        assert cp is not None and cp["destination"]["kind"] == "parquet"
        for part in cp["destination"]["parts"]:  # every recorded part is whole and readable
            assert pq.read_metadata(out / part["file"]).num_rows == part["rows"]
        assert copystream.export_status(out).parts == len(cp["destination"]["parts"])
    assert_ok(run(cmd))
    m = read_manifest(out)
    assert m["resumed"] and m["rows"] == 60000
    assert not [p for p in os.listdir(out) if p.startswith(".")]
    assert read_dataset(out).equals(read_dataset(whole))
    copystream.verify_file(out)


@pytest.mark.all_versions
def test_infinity_follows_the_policy(db: str, tmp_path: Path) -> None:
    """Default: exit 2 naming the column, the value and the key, nothing left; null: NULL;
    clamp: the extreme values the Parquet types hold (a NaN decimal is still an error)."""
    out = tmp_path / "inf.parquet"
    before = snapshot(tmp_path)
    proc = run(export_cmd(db, "inf", out, "--format", "parquet"))
    assert_one_error_line(proc, 2, "column d of public.inf", "infinity", "key 2", "--out-of-range")
    assert snapshot(tmp_path) == before and not out.exists()
    copystream.export_table(db, "inf", out, format="parquet", out_of_range="null")
    rows = read_dataset(out).to_pylist()
    assert [(r["d"], r["ts"], r["n"]) for r in rows[1:]] == [
        (None, None, None), (None, None, Decimal("2.00"))
    ]  # fmt: skip
    clamped = tmp_path / "clamp.parquet"
    with pytest.raises(UsageError, match=r"column n of public\.inf holds NaN"):
        copystream.export_table(db, "inf", clamped, format="parquet", out_of_range="clamp",
                                columns=["id", "n"])  # fmt: skip
    assert not clamped.exists()
    copystream.export_table(db, "inf", clamped, format="parquet", out_of_range="clamp",
                            columns=["id", "d", "ts"])  # fmt: skip
    t = read_dataset(clamped)
    assert t.column("d").cast(pa.int32()).to_pylist()[1:] == [2**31 - 1, -(2**31)]
    assert t.column("ts").cast(pa.int64()).to_pylist()[1:] == [-(2**63), 2**63 - 1]


@pytest.mark.all_versions
def test_bad_requests_exit_2_and_leave_nothing(db: str, tmp_path: Path) -> None:
    out = tmp_path / "bad.parquet"
    before = snapshot(tmp_path)
    for extra, needles in [
        (("--delimiter", ";"), ("--delimiter", "parquet")),
        (("--header",), ("--header",)),
        (("--strict-types",), ("column r of public.ranged", "tsrange", "--strict-types")),
    ]:
        proc = run(export_cmd(db, "ranged", out, "--format", "parquet", *extra))
        assert_one_error_line(proc, 2, *needles)
    proc = run(export_cmd(db, "ranged", tmp_path / "x.csv", "--part-size", "2MB"))
    assert_one_error_line(proc, 2, "--part-size", "csv")
    assert snapshot(tmp_path) == before and not out.exists()


@pytest.mark.all_versions
def test_numeric_scale_reads_back_exactly_or_refuses(db: str, tmp_path: Path) -> None:
    """numeric_scale=10: every value that fits reads back equal to psycopg's Decimal, as
    decimal128(38,10); a NaN follows out_of_range; a value with more decimal places, or more
    integer digits, stops the export (exit 2) naming column, value, key and which, never
    rounded, and leaves nothing."""
    out = tmp_path / "nums.parquet"
    copystream.export_table(db, "nums", out, format="parquet", numeric_scale=10,
                            out_of_range="null", where="id <= 6")  # fmt: skip
    table = read_dataset(out)
    assert table.schema.field("n").type == table.schema.field("w").type == pa.decimal128(38, 10)
    with psycopg.connect(db) as conn:
        want = conn.execute("SELECT id, n, w FROM nums WHERE id <= 6 ORDER BY id").fetchall()
    want = [(i, None if n is not None and n.is_nan() else n, w) for i, n, w in want]
    got = [(r["id"], r["n"], r["w"]) for r in table.to_pylist()]
    assert got == want  # Decimal equality: exact
    before = snapshot(tmp_path)
    bad = tmp_path / "bad.parquet"
    for where, needles in [
        ("id = 7", ("column n of public.nums", "1.23456789012", "key 7", "10 decimal place")),
        ("id = 8", ("column n of public.nums", "key 8", "28 digits before the point")),
        ("id = 3", ("column n of public.nums", "NaN", "key 3", "--out-of-range")),
    ]:
        proc = run(export_cmd(db, "nums", bad, "--format", "parquet", "--numeric-scale", "10",
                              "--where", where))  # fmt: skip
        assert_one_error_line(proc, 2, *needles)
    proc = run(export_cmd(db, "nums", bad, "--format", "parquet", "--numeric-scale", "0",
                          "--columns", "id,w", "--out-of-range", "clamp"))  # fmt: skip
    assert_one_error_line(proc, 2, "column w", "1.5000", "key 3", "0 decimal place",
                          "--numeric-scale")  # fmt: skip
    assert snapshot(tmp_path) == before and not bad.exists()


@pytest.mark.all_versions
def test_interval_struct_reads_back_exactly(db: str, tmp_path: Path, server_version: int) -> None:
    """interval_form="struct": each value's months, days and microseconds, put back together
    by the server, print exactly as the original (extremes, mixed signs, NULL). From
    PostgreSQL 17 an infinite interval is an error, or NULL with out_of_range="null"."""
    out = tmp_path / "ivs.parquet"
    copystream.export_table(db, "ivs", out, format="parquet", interval_form="struct")
    table = read_dataset(out)
    assert table.schema.field("iv").type == pa.struct(
        [("months", pa.int32()), ("days", pa.int32()), ("microseconds", pa.int64())]
    )
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(1, 9)) and rows[1]["iv"] is None
    with psycopg.connect(db) as conn:
        for r in rows:
            iv = r["iv"]
            if iv is None:
                continue
            text = f"{iv['months']} mons {iv['days']} days {iv['microseconds']} microseconds"
            ((back, original),) = conn.execute(
                "SELECT %s::interval::text, iv::text FROM ivs WHERE id = %s", [text, r["id"]]
            ).fetchall()
            assert back == original, (r, back, original)
    assert rows[3]["iv"] == {"months": -10, "days": -3, "microseconds": 90_000_000_001}
    if server_version < 170000:
        return
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE ivinf AS SELECT 1 AS id, 'infinity'::interval AS iv")
        conn.execute("ALTER TABLE ivinf ADD PRIMARY KEY (id)")
    proc = run(export_cmd(db, "ivinf", tmp_path / "inf.parquet", "--format", "parquet",
                          "--interval-form", "struct"))  # fmt: skip
    assert_one_error_line(proc, 2, "column iv of public.ivinf", "infinite interval", "key 1")
    copystream.export_table(db, "ivinf", tmp_path / "n.parquet", format="parquet",
                            interval_form="struct", out_of_range="null")  # fmt: skip
    assert read_dataset(tmp_path / "n.parquet").to_pylist() == [{"id": 1, "iv": None}]


def test_part_size_in_rows(db: str, tmp_path: Path) -> None:
    """``--part-size "N rows"``: a part closes at the first chunk end that brings it to N rows,
    so with chunks of a divisor of N every part but the last holds exactly N; the dataset is
    the same table."""
    out = tmp_path / "rows.parquet"
    copystream.export_table(db, "big", out, format="parquet", part_size="9000 rows",
                            chunk_rows=3000)  # fmt: skip
    m = read_manifest(out)
    assert [p["rows"] for p in m["parts"]] == [9000] * 6 + [6000]
    assert m["parquet"]["part_rows"] == 9000 and m["parquet"]["part_size"] is None
    assert read_dataset(out).column("id").to_pylist() == list(range(1, 60001))
    copystream.verify_file(out)


def test_an_export_keeps_its_memory_lean(db: str, tmp_path: Path) -> None:
    """What the peak RSS and CPU figures rest on: a Parquet export, on either path, never
    imports pyarrow.compute (~9 MB per process; nor ADBC's DB-API, which does), pyarrow
    allocates with glibc's malloc (mimalloc's purged pages were faulted in again for every
    row group), and mimalloc, when chosen, returns freed pages at once; the environment's own
    settings stay."""
    script = (
        "import os, sys, copystream\n"
        "copystream.export_table(sys.argv[1], 'every', sys.argv[2] + '-b', format='parquet')\n"
        "copystream.export_table(sys.argv[1], 'every_heap', sys.argv[2], format='parquet',\n"
        "                        key=['id'])\n"
        "import pyarrow\n"
        "print('pyarrow.compute' in sys.modules, os.environ.get('MIMALLOC_PURGE_DELAY'),\n"
        "      pyarrow.default_memory_pool().backend_name)\n"
    )
    mine = ("MIMALLOC_PURGE_DELAY", "ARROW_DEFAULT_MEMORY_POOL")
    env = {k: v for k, v in os.environ.items() if k not in mine}
    proc = subprocess.run(
        [sys.executable, "-c", script, db, str(tmp_path / "lean.parquet")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", parquet.MIMALLOC_PURGE_DELAY, parquet.MEMORY_POOL]
    env["MIMALLOC_PURGE_DELAY"] = "25"  # the user's settings stay
    env["ARROW_DEFAULT_MEMORY_POOL"] = "mimalloc"
    proc = subprocess.run(
        [sys.executable, "-c", script, db, str(tmp_path / "lean2.parquet")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.stdout.split() == ["False", "25", "mimalloc"], proc.stderr


def test_verify_catches_a_changed_part(db: str, tmp_path: Path) -> None:
    out = tmp_path / "v.parquet"
    copystream.export_table(db, "big", out, format="parquet", part_size="1MiB")
    assert_ok(run(cli("verify", str(out))))
    part = out / read_manifest(out)["parts"][0]["file"]
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    proc = run(cli("verify", str(out)))
    assert proc.returncode == 1 and part.name in proc.stderr


def test_rerun_of_a_complete_dataset_does_nothing(db: str, tmp_path: Path) -> None:
    out = tmp_path / "again.parquet"
    copystream.export_table(db, "ranged", out, format="parquet")
    assert copystream.export_table(db, "ranged", out, format="parquet").already_complete
    restarted = copystream.export_table(db, "ranged", out, format="parquet", restart=True)
    assert not restarted.already_complete and restarted.rows == 1


def test_workers_write_their_own_parts_in_key_order(db: str, tmp_path: Path) -> None:
    """``--workers 2``: each range writes its own parts (range index in the name, so the names
    sort in key order); nothing is joined. Killed mid-way and resumed, the dataset has the same
    values as a single-worker export."""
    single = tmp_path / "single.parquet"
    copystream.export_table(db, "big", single, format="parquet")
    out = tmp_path / "w.parquet"
    cmd = export_cmd(db, "big", out, "--format", "parquet", "--workers", "2",
                     "--part-size", "1MiB", "--chunk-rows", "2000")  # fmt: skip
    killed = kill_export(cmd, out, after_seconds=2.0)
    assert killed.returncode in (-9, 0), killed.stderr
    try:
        status: copystream.ExportStatus | None = copystream.export_status(out)
    except UsageError:  # killed before anything was recorded
        status = None
    if status is not None and status.state == "in progress":  # every range's complete parts
        on_disk = [p for p in os.listdir(out) if p.endswith(".parquet")] if out.exists() else []
        assert status.parts is not None and status.parts <= len(on_disk)
        assert status.ranges == 2
        assert status.parts > 0 or status.bytes == 0
    assert_ok(run(cmd))
    m = read_manifest(out)
    names = [p["file"] for p in m["parts"]]
    assert m["workers"] == 2 and names == sorted(os.listdir(out))
    assert {n[: len("part-0000")] for n in names} == {"part-0000", "part-0001"}
    assert read_dataset(out).equals(read_dataset(single))
    glob = str(out / "*.parquet")
    ids = [r[0] for r in duckdb.sql(f"SELECT id FROM read_parquet('{glob}')").fetchall()]
    assert ids == list(range(1, 60001))
    copystream.verify_file(out)


def test_a_bulk_plan_exports_parquet_datasets(db: str, tmp_path: Path) -> None:
    """``format = "parquet"`` in a plan's defaults: each table becomes
    ``<schema>.<table>.parquet``, a dataset that verifies and holds every row."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        f'[defaults]\ndsn = "{db}"\noutput_dir = "out"\nformat = "parquet"\n'
        'out_of_range = "null"\n\n'
        '[[tables]]\nname = "public.big"\n[[tables]]\nname = "inf"\n[[tables]]\nname = "ranged"\n'
    )
    copystream.run_bulk(plan)
    finished = {}
    for name, rows in (("big", 60000), ("inf", 3), ("ranged", 1)):
        out = tmp_path / "out" / f"public.{name}.parquet"
        assert copystream.verify_file(out).rows == rows
        assert read_dataset(out).num_rows == rows
        finished[name] = read_manifest(out)["finished_at"]
    copystream.run_bulk(plan)  # again: every dataset is complete, none is exported again
    for name, at in finished.items():
        assert read_manifest(tmp_path / "out" / f"public.{name}.parquet")["finished_at"] == at


# -- the decoding path: COPY BINARY (ADBC) or typed CSV ------------------------------------------


def _plans(*columns: ColumnType) -> tuple[Any, ...]:
    plans = plan_columns(columns)
    return plans, select_list(plans, ["id"], "error")


def test_common_types_take_the_binary_path_pure() -> None:
    """The common types (integers, floats, text, bool, date, timestamps, numeric(p,s), uuid,
    json, bytea) and everything written as text have a binary form; numeric(p,s) up to 18 digits
    travels as its unscaled int8, a date as int4 days; the key's text comes last."""
    cols = [
        ColumnType("id", "bigint", "int8", "N", -1), ColumnType("f", "real", "float4", "N", -1),
        ColumnType("t", "text", "text", "S", -1), ColumnType("b", "boolean", "bool", "B", -1),
        ColumnType("d", "date", "date", "D", -1),
        ColumnType("tz", "timestamp with time zone", "timestamptz", "D", -1),
        ColumnType("n", "numeric(12,2)", "numeric", "N", (12 << 16 | 2) + 4),
        ColumnType("w", "numeric(30,2)", "numeric", "N", (30 << 16 | 2) + 4),
        ColumnType("u", "uuid", "uuid", "U", -1), ColumnType("j", "jsonb", "jsonb", "U", -1),
        ColumnType("by", "bytea", "bytea", "U", -1),
        ColumnType("r", "int4range", "int4range", "R", -1),
        ColumnType("c", "character(3)", "bpchar", "S", 7),
    ]  # fmt: skip
    plans, typed = _plans(*cols)
    plan = binary_plan(cols, plans, typed, ["id"], key_unique=True)
    assert isinstance(plan, BinaryPlan)
    # the key, an exported integer, is read from its column: no text of it is sent
    assert plan.key_columns == 0 and plan.key_at == (0,) and len(plan.select) == len(cols)
    text = [str(e.as_string(None)) for e in plan.select]
    assert text[0] == '("id")::"pg_catalog"."int8"'
    # dates and timestamps as they are: the client checks them (no extract(epoch …))
    assert text[4] == '"d"::"pg_catalog"."date"'
    assert text[5] == '"tz"::"pg_catalog"."timestamptz"'
    # numeric(12,2): unscaled, a NaN as the least int8
    assert text[6] == (
        "CASE WHEN \"n\" = 'NaN' THEN int8 '-9223372036854775808' ELSE (\"n\" * 100)::int8 END"
    )
    assert text[7].endswith(')::"pg_catalog"."numeric"')  # numeric(30,2): its text
    assert text[11] == '("r")::text' and text[12] == '("c")::"pg_catalog"."bpchar"'
    assert plan.checks == ((4, "d", "date"), (5, "tz", "timestamptz"), (6, "n", "nan"))
    by_text = binary_plan(cols, plans, typed, ["c", "id"], key_unique=True)
    assert isinstance(by_text, BinaryPlan)  # a text key column comes last, as text
    assert by_text.key_columns == 1 and by_text.key_at == (len(cols), 0)
    assert str(by_text.select[-1].as_string(None)) == '"c"::text'


def test_what_stays_on_the_typed_csv_path_pure() -> None:
    """A key not provably unique stays typed CSV (its chunks need their bound first), and so
    does a column whose plan has no exact binary form; the reason names it."""
    cols = [ColumnType("id", "integer", "int4", "N", -1)]
    plans, typed = _plans(*cols)
    assert binary_plan(cols, plans, typed, ["id"], key_unique=False) == (
        "its key is not provably unique"
    )
    odd = ColumnType("x", "weird", "weird", "U", -1)
    plans = (plans[0], ColumnPlan("x", "weird", "int64"))
    typed = select_list(plans, ["id"], "error")
    assert binary_plan([*cols, odd], plans, typed, ["id"], key_unique=True) == (
        "column x is of type weird"
    )


def test_an_adbc_driver_that_aborts_on_a_lost_connection_is_not_used_pure() -> None:
    """ADBC's driver before 1.11 aborts the process when a statement fails on a lost
    connection (a std::logic_error from a NULL SQLSTATE): it is not used, nor one that cannot
    be imported, nor one whose version cannot be read."""
    missing = driver_refusal(None, missing="No module named 'adbc_driver_postgresql'")
    assert missing == (
        "adbc-driver-postgresql cannot be imported (No module named 'adbc_driver_postgresql')"
    )
    for old in ("1.8.0", "1.0.0", "0.11.0", "1.8.1", "1.9.0", "1.10.0", "1.10.2"):
        refused = driver_refusal(old)
        assert refused is not None and old in refused and "aborts" in refused, old
        assert "fixed in 1.11" in refused and driver_minimum() == "1.11"
    for odd in (None, "", "unknown", "v1.9.0", "1"):
        assert driver_refusal(odd) == f"adbc-driver-postgresql of an unknown version ({odd!r})"
    for good in ("1.11.0", "1.12.0", "1.13.0", "1.11.0.dev3", "2.0.0rc1", "10.0"):
        assert driver_refusal(good) is None, good


def test_an_old_adbc_driver_means_the_typed_csv_path(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With adbc-driver-postgresql older than 1.11 installed, a table that would be read
    through COPY BINARY is read as typed CSV instead, with one warning saying how to upgrade,
    and the dataset has the same values."""
    import importlib.metadata

    from copystream import pipeline

    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata,
        "version",
        lambda name: "1.8.0" if name == "adbc-driver-postgresql" else real(name),
    )
    pipeline._adbc_refusal.cache_clear()
    caplog.set_level(logging.DEBUG, logger="copystream")
    try:
        copystream.export_table(db, "every", tmp_path / "old.parquet", format="parquet")
        copystream.export_table(db, "every", tmp_path / "old2.parquet", format="parquet")
    finally:
        monkeypatch.undo()
        pipeline._adbc_refusal.cache_clear()
    assert "public.every: COPY BINARY" not in caplog.text
    assert caplog.text.count("adbc-driver-postgresql 1.8.0 aborts on a lost connection") == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'adbc-driver-postgresql>=1.11'" in (
        warnings[0].getMessage()
    )
    caplog.clear()
    binary = read_dataset(_export(db, "every", tmp_path / "new.parquet", {}))
    assert "public.every: COPY BINARY, decoded by ADBC" in caplog.text
    old = read_dataset(tmp_path / "old.parquet")
    assert binary.schema.equals(old.schema, check_metadata=True)
    for name in binary.column_names:
        for want, have in zip(
            comparable(binary.select([name])), comparable(old.select([name])), strict=True
        ):
            assert same(want[0], have[0]), (name, want, have)


def test_without_adbc_parquet_is_read_as_typed_csv(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pyarrow installed without ADBC's driver: the export reads typed CSV and says so once
    (it failed, asking to run it again, before stop 19)."""
    from copystream import pipeline

    monkeypatch.setitem(sys.modules, "adbc_driver_postgresql", None)  # import raises
    pipeline._adbc_refusal.cache_clear()
    caplog.set_level(logging.DEBUG, logger="copystream")
    try:
        result = copystream.export_table(db, "every", tmp_path / "a.parquet", format="parquet")
    finally:
        monkeypatch.undo()
        pipeline._adbc_refusal.cache_clear()
    assert result.rows == read_dataset(tmp_path / "a.parquet").num_rows > 0
    assert "typed CSV, not COPY BINARY: adbc-driver-postgresql cannot be imported (" in (
        caplog.text
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pip install 'adbc-driver-postgresql>=1.11'" in warnings[0]


def test_which_path_a_table_takes(
    db: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A table of every type with a primary key is read through COPY BINARY; the same rows
    paged by a key that is not unique, as typed CSV."""
    caplog.set_level(logging.DEBUG, logger="copystream")
    copystream.export_table(db, "every", tmp_path / "a.parquet", format="parquet")
    assert "public.every: COPY BINARY, decoded by ADBC" in caplog.text
    caplog.clear()
    copystream.export_table(db, "every_heap", tmp_path / "b.parquet", format="parquet", key=["id"])
    assert "public.every_heap: typed CSV, not COPY BINARY: its key is not provably unique" in (
        caplog.text
    )


@pytest.mark.parametrize("options", [{}, {"out_of_range": "null", "interval_form": "struct"}])
def test_both_paths_write_equal_datasets(db: str, tmp_path: Path, options: dict[str, Any]) -> None:
    """The every-type table through COPY BINARY and through typed CSV: the same schema and the
    same values, value by value (NaN as NaN, -0.0 as -0.0, decimals exactly)."""
    binary = read_dataset(_export(db, "every", tmp_path / "binary.parquet", options))
    csv = read_dataset(
        _export(db, "every_heap", tmp_path / "csv.parquet", {**options, "key": ["id"]})
    )
    assert binary.schema.equals(csv.schema, check_metadata=True)
    for name in binary.column_names:
        for want, have in zip(
            comparable(csv.select([name])), comparable(binary.select([name])), strict=True
        ):
            assert same(want[0], have[0]), (name, want, have)


def _export(db: str, table: str, out: Path, options: dict[str, Any]) -> Path:
    copystream.export_table(db, table, out, format="parquet", **options)
    return out


def test_binary_path_survives_terminated_backends(db: str, tmp_path: Path) -> None:
    """A chunk's ADBC connection terminated in its COPY (pg_terminate_backend) is a lost
    connection: retried on a fresh one, and the dataset holds every row once, in order.

    One termination is certain: once a chunk's COPY runs, the table is locked (granted when that
    chunk's transaction ends), so the next chunk's query waits for the lock until it is
    terminated. Then the lock goes and later COPYs are terminated as they are caught."""
    out = tmp_path / "t.parquet"
    copying = (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
        "application_name = 'copystream' AND query LIKE 'COPY (SELECT%' "
        "AND datname = current_database()"
    )
    waiting = (  # (ADBC describes the COPY's query first: its SELECT is what waits)
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
        "application_name = 'copystream' AND wait_event_type = 'Lock' "
        "AND datname = current_database()"
    )
    seen = (
        "SELECT count(*) FROM pg_stat_activity WHERE "
        "query LIKE 'COPY (SELECT%' AND state = 'active'"
    )
    with psycopg.connect(db) as locker, psycopg.connect(db, autocommit=True) as conn:
        proc = subprocess.Popen(
            export_cmd(db, "big", out, "--format", "parquet", "--chunk-rows", "500", "-v"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert wait_for(lambda: _count(conn, seen) > 0, 60), "no COPY was seen"
        lock = threading.Thread(
            target=locker.execute, args=["LOCK TABLE big IN ACCESS EXCLUSIVE MODE"]
        )
        lock.start()
        assert wait_for(lambda: _count(conn, waiting) > 0, 60), "no COPY waited for the lock"
        lock.join(60)
        locker.rollback()
        later = 0
        while proc.poll() is None and later < 2:
            later += _count(conn, copying)
            time.sleep(0.05)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "connection lost" in stderr, stderr
    ids = read_dataset(out).column("id").to_pylist()
    assert ids == list(range(1, 60001))
    copystream.verify_file(out)


def _count(conn: psycopg.Connection[Any], query: str) -> int:
    row = conn.execute(query).fetchone()
    return int(row[0]) if row else 0


def test_adbc_errors_are_worded_as_psycopg_errors_pure() -> None:
    """An ADBC error becomes the psycopg error of its SQLSTATE (none: a lost connection, which
    copystream retries), with the server's line only (not the query after it, which holds key
    values) and the connection's secrets masked."""
    import adbc_driver_manager

    from copystream.arrowchunk import adbc_error
    from copystream.retry import classify

    refused = adbc_driver_manager.DataError(
        "INVALID_DATA: [libpq] Failed: ERROR:  invalid input syntax for type bigint: "
        '"copystream-parquet-value:d\x1fNaN\x1f x at key 2"\n\nQuery was: COPY (SELECT 1)',
        status_code=adbc_driver_manager.AdbcStatusCode.INVALID_DATA,
        sqlstate="22P02",
    )
    error = adbc_error(refused, ["hunter2"])
    assert isinstance(error, psycopg.errors.InvalidTextRepresentation)
    assert str(error).startswith("invalid input syntax") and "Query was" not in str(error)
    assert classify(error) is None  # the request's fault: not retried
    lost = adbc_driver_manager.OperationalError(
        "IO: [libpq] connection to postgresql://u:hunter2@h/db failed: server closed the "
        "connection unexpectedly",
        status_code=adbc_driver_manager.AdbcStatusCode.IO,
    )
    error = adbc_error(lost, ["hunter2"])
    assert type(error) is psycopg.OperationalError and "hunter2" not in str(error)
    failure = classify(error)
    assert failure is not None and failure.outage


def test_binary_path_reads_the_export_snapshot(db: str, tmp_path: Path) -> None:
    """``consistent``: every chunk's ADBC transaction imports the export's snapshot, so a row
    committed while the export runs (after its first chunk) is not in the dataset."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE snap AS SELECT id, name FROM big WHERE id <= 20000")
        conn.execute("ALTER TABLE snap ADD PRIMARY KEY (id)")
    inserted: list[bool] = []

    def progress(_: Any) -> None:
        if not inserted:
            with psycopg.connect(db, autocommit=True) as conn:
                conn.execute("INSERT INTO snap VALUES (99999, 'late')")
            inserted.append(True)

    out = tmp_path / "snap.parquet"
    result = copystream.export_table(
        db, "snap", out, format="parquet", consistent=True, chunk_rows=1000, progress=progress
    )
    assert inserted and result.rows == 20000
    assert read_dataset(out).column("id").to_pylist() == list(range(1, 20001))
    with psycopg.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM snap").fetchone() == (20001,)


# -- what the client checks on the binary path ------------------------------------------------

#: What ADBC's driver delivered (measured, adbc-driver-postgresql 1.13) for values Parquet
#: cannot hold: PostgreSQL's integer plus the 2000 → 1970 shift, wrapped around.
WRAPPED = [
    (-9222425352054775809, "timestamptz", ("infinity", 2**63 - 1)),
    (-9222425352054775808, "timestamp", ("-infinity", -(2**63))),
    (-(2**63), "timestamptz", ("294247-01-10 04:00:54.775808+00", 2**63 - 1)),
    (-9222426057709551617, "timestamp", ("294276-12-31 23:59:59.999999", 2**63 - 1)),
    (-2147472692, "date", ("infinity", 2**31 - 1)),
    (-2147472691, "date", ("-infinity", -(2**31))),
    (-(2**63), "nan", ("NaN", None)),
]
#: ... and for the extremes it holds: 4713-01-01 BC, Parquet's last timestamp, 5874897-12-31.
HELD = [
    (-210863520000000000, "timestamp"), (2**63 - 1, "timestamptz"), (-2440550, "date"),
    (2145042905, "date"), (-(10**18) + 1, "nan"), (10**18 - 1, "nan"), (0, "timestamp"),
]  # fmt: skip


def test_small_decimals_widen_exactly_pure() -> None:
    """A numeric(p<=18)'s unscaled int8, as ADBC delivers it, becomes the decimal128 of the
    same value: signs spread over the high word, NULLs kept, a slice read from its offset."""
    values = [None, 0, -1, 1, 10**18 - 1, -(10**18 - 1), -123456789012345678, 99, None, -5]
    arr = pa.array(values, pa.int64())
    kind = pa.decimal128(18, 2)
    for piece in (arr, arr.slice(1), arr.slice(3, 5)):
        got = parquet._decimals(pa, piece, kind)
        expected = [None if v is None else Decimal(v).scaleb(-2) for v in piece.to_pylist()]
        assert got.type == kind and got.to_pylist() == expected


def test_refused_wire_values_pure() -> None:
    """ADBC's wrapped instants are told from every value PostgreSQL holds, by value and by the
    client's one-pass check (:func:`_suspect`), with PostgreSQL's text of each (a timestamp
    past Parquet's range unwrapped to its date) and what clamp writes; a NaN decimal too."""
    for value, kind, want in WRAPPED:
        assert refused_wire(value, kind) == want, (value, kind)
        size = pa.int32() if kind == "date" else pa.int64()
        assert _suspect(pa.array([0, value, 1], size).slice(1, 1), kind)
    for value, kind in HELD:
        assert refused_wire(value, kind) is None, (value, kind)
        size = pa.int32() if kind == "date" else pa.int64()
        assert not _suspect(pa.array([value, None], size), kind)
    assert record_text(["1", "a b", "", 'q"', "x,y"]) == '(1,"a b","","q""","x,y")'


def test_binary_path_treats_what_parquet_cannot_hold_as_the_csv_path(
    db: str, tmp_path: Path
) -> None:
    """Dates and timestamps travel as they are on the binary path; the client finds infinity
    and timestamps past Parquet's range (deep in a chunk, several per batch) and treats them
    as the typed CSV's server-side guards do: the same error (of the first row by key, then
    column; a text key too), NULLs, or the clamped extremes, value for value."""
    errors = []
    for table, options in (("far", {}), ("far_heap", {"key": ["id"]})):
        with pytest.raises(UsageError) as caught:
            copystream.export_table(db, table, tmp_path / f"{table}.parquet", format="parquet",
                                    **options)  # fmt: skip
        errors.append(str(caught.value).replace("far_heap", "far"))
        assert not (tmp_path / f"{table}.parquet").exists()
    refused = [
        f"column {c} of public.far holds {v} (a value outside Parquet's range) at key {k}, "
        for c, v, k in [("tz", "294276-12-31 23:59:59.999999+00", 12000),
                        ("ts", "294247-01-10 04:00:54.775808", 15000)]
    ]  # fmt: skip
    assert errors[0].startswith(refused[0])  # the first by key, then column
    # the typed CSV's sort evaluates the guards in the table's order: one of the two, worded
    # the same
    assert errors[1].startswith(tuple(refused))
    assert errors[0].partition(", ")[2] == errors[1].partition(", ")[2]
    with pytest.raises(UsageError, match=r"column d of public\.far_text holds infinity .* key b,"):
        copystream.export_table(db, "far_text", tmp_path / "t.parquet", format="parquet")
    for policy in ("null", "clamp"):
        got = [
            read_dataset(_export(db, table, tmp_path / f"{table}-{policy}.parquet",
                                 {"out_of_range": policy, **options}))
            for table, options in (("far", {}), ("far_heap", {"key": ["id"]}))
        ]  # fmt: skip
        assert got[0].equals(got[1]), policy
        rows = {r[0]: r for r in comparable(got[0].select(["id", "ts", "tz", "d"]))}
        top, top32 = (None, None) if policy == "null" else (2**63 - 1, 2**31 - 1)
        assert rows[12000][2:] == (top, top32) and rows[15000][1] == top
        assert rows[17000][2:] == (None, None if policy == "null" else -(2**31))
        assert rows[1] == (1, 1577840400000000, 1577750400000000, 18261)


def test_an_opaque_uuid_from_adbc_1_11_and_1_12_is_written_as_uuid_pure() -> None:
    """ADBC's driver 1.11 and 1.12 give a uuid column as an opaque extension of variable
    binary (1.13: as Arrow's uuid): the binary path writes it as arrow.uuid either way, value
    for value, NULLs and a sliced batch too, without importing pyarrow.compute (stop 20 found
    1.12 failing every table with a uuid column); a value of another length is refused, never
    cut or padded."""
    script = """
import sys, uuid
import pyarrow as pa
from copystream.destinations.parquet import Decoder
dec = Decoder([["id", "bigint", "int64", "text"], ["u", "uuid", "uuid", "uuid"]])
opaque = pa.opaque(pa.binary(), "uuid", "PostgreSQL")
values = [uuid.UUID(int=i * 7919 + 1).bytes for i in range(5)]
for us in (values, values[:2] + [None] + values[3:]):
    storage = pa.array(us, pa.binary())
    batch = pa.record_batch([pa.array(range(5), pa.int64()),
                             pa.ExtensionArray.from_storage(opaque, storage)], ["id", "u"])
    for b in (batch, batch.slice(2)):
        t = dec.from_batch(b)
        assert t.schema.field("u").type == pa.uuid(), t.schema
        assert t.column("u").combine_chunks().storage.to_pylist() == us[5 - len(b):], us
print("pyarrow.compute" in sys.modules)
bad = pa.ExtensionArray.from_storage(opaque, pa.array([b"x" * 15], pa.binary()))
try:
    dec.from_batch(pa.record_batch([pa.array([1], pa.int64()), bad], ["id", "u"]))
except pa.ArrowInvalid as e:
    print("refused", "length 16" in str(e))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "refused", "True"], proc.stdout
