"""The decisions of incremental exports (copystream.incremental), without a server."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from copystream.checkpoint import ChunkRecord
from copystream.errors import CheckpointMismatch, OutputExists, Remedy, UsageError
from copystream.incremental import (
    append_checkpoint,
    chain_problem,
    check_complete_since,
    check_request,
    check_resume,
    follows,
    manifest_fields,
    refuse_append,
    since_checkpoint,
    since_manifest,
    untouched_append,
)
from copystream.manifest import Manifest
from copystream.spec import RunOptions

OPTIONS = {"format": "csv", "header": False}


def manifest(rows: int, last: int | None, **kw: Any) -> Manifest:
    chunks = (
        (ChunkRecord(0, 0, rows * 10, rows, f"c{rows}", (str(last),) if last else None),)
        if rows
        else ()
    )
    base: dict[str, Any] = {
        "table": "public.ev", "key": ("id",), "key_types": ("bigint",), "key_source": "pk",
        "columns": ("id", "v"), "where": None, "options": OPTIONS, "rows": rows,
        "bytes": rows * 10, "xxh3_128": f"whole{rows}", "chunks": chunks, "chunk_rows": 100,
        "settings": {"TimeZone": "UTC"}, "started_at": "T0", "finished_at": "T1",
        "seconds": 1.0, "resumed": False,
    }  # fmt: skip
    return Manifest(**{**base, **kw})


def identity(**kw: Any) -> dict[str, Any]:
    return {
        "table": "public.ev", "key": ["id"], "key_types": ["bigint"], "columns": ["id", "v"],
        "where": None, "options": OPTIONS, "compress": None, **kw,
    }  # fmt: skip


def test_an_append_continues_the_manifest_as_an_interrupted_export() -> None:
    m = manifest(50, 50)
    cp = append_checkpoint(m, identity(), {"kind": "file"}, started_at="T2", chunk_rows=7,
                           estimated_rows=60)  # fmt: skip
    assert (cp.offset, cp.rows, cp.last_key, cp.xxh3_128) == (500, 50, ("50",), "whole50")
    assert cp.chunks == m.chunks and cp.settings == m.settings and cp.started_at == "T0"
    assert cp.increment == {"mode": "append", "started_at": "T2", "base_chunks": 1,
                            "base_rows": 50, "base_bytes": 500, "after": ["50"]}  # fmt: skip
    assert untouched_append(cp)
    grown = cp.advance(nbytes=30, rows=3, digest="c3", prefix_digest="w53", last_key=("53",),
                       finished=True)  # fmt: skip
    assert not untouched_append(grown)
    fields = manifest_fields(grown, m, finished_at="T3", seconds=2.0)
    first, this = fields["increments"]
    assert (first["rows"], first["after"], first["last_key"], first["chunks"]) == (
        50, None, ["50"], 1
    )
    assert (this["rows"], this["bytes"], this["first_chunk"], this["after"]) == (3, 30, 1, ["50"])
    # written again after a kill between the manifest and the checkpoint's removal: once
    again = manifest_fields(grown, replace(m, **fields), finished_at="T4", seconds=2.0)
    assert [h["started_at"] for h in again["increments"]] == ["T0", "T2"]


def test_a_compressed_append_carries_the_uncompressed_digest() -> None:
    m = manifest(5, 5, compress={"codec": "zstd", "level": 3}, uncompressed_bytes=99,
                 uncompressed_xxh3_128="raw")  # fmt: skip
    fresh = {"kind": "zstd", "uncompressed_bytes": 0, "uncompressed_xxh3_128": "empty"}
    cp = append_checkpoint(m, identity(compress=m.compress), fresh, started_at="T",
                           chunk_rows=1, estimated_rows=None)  # fmt: skip
    assert cp.destination == {"kind": "zstd", "uncompressed_bytes": 99,
                              "uncompressed_xxh3_128": "raw"}  # fmt: skip


def test_refusals_say_what_differs_and_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "ev.csv"
    none = refuse_append(out, None, identity())
    assert "no complete export" in none.problem and none.remedy is Remedy.FULL_EXPORT
    other = refuse_append(out, manifest(5, 5), identity(where="id > 1"))
    assert 'where was null, now "id > 1"' in other.problem
    assert other.remedy is Remedy.SAME_EXPORT and "--where" in other.worded("cli")
    changed = refuse_append(out, manifest(5, 5), identity())
    assert "does not match its manifest" in changed.problem
    with pytest.raises(UsageError, match="restart would discard"):
        check_request(RunOptions(incremental=True, restart=True))
    check_request(RunOptions(since="m.json", restart=True))  # a new file may start again
    check_request(RunOptions(restart=True))  # not an incremental export: nothing to refuse


def test_a_since_increment_follows_the_last_key_under_the_first_settings(
    tmp_path: Path,
) -> None:
    assert since_manifest("d/a.csv") == (Path("d/a.csv.manifest.json"), Path("d/a.csv"))
    assert since_manifest("d/a.csv.manifest.json")[1] == Path("d/a.csv")
    prev, path, out = manifest(10, 10), tmp_path / "d0.csv.manifest.json", tmp_path / "d1.csv"
    after = follows(prev, path, identity(compress={"codec": "zstd", "level": 3}), out)
    assert after == {"manifest": "d0.csv.manifest.json", "xxh3_128": "whole10", "rows": 10,
                     "last_key": ["10"]}  # fmt: skip
    cp = since_checkpoint(prev, after, identity(), {"kind": "file"}, started_at="T",
                          chunk_rows=5, estimated_rows=None)  # fmt: skip
    assert (cp.offset, cp.last_key, cp.settings) == (0, ("10",), prev.settings)
    assert manifest_fields(cp, None, finished_at="T", seconds=0) == {"since": after}
    with pytest.raises(UsageError, match="columns was"):
        follows(prev, path, identity(columns=["id"]), out)
    with pytest.raises(UsageError, match="itself"):
        follows(prev, tmp_path / "d1.csv.manifest.json", identity(), out)
    check_resume(cp, after, tmp_path / "cp")
    with pytest.raises(CheckpointMismatch, match="not after x"):
        check_resume(cp, {**after, "manifest": "x"}, tmp_path / "cp")
    with pytest.raises(OutputExists, match="holds the increment after d0"):
        check_complete_since(manifest(1, 11, since=after), {**after, "rows": 9}, out)


def test_chain_gaps_overlaps_and_missing_files_are_named() -> None:
    m0 = manifest(10, 10)
    link = {"manifest": "a", "xxh3_128": "whole10", "rows": 10, "last_key": ["10"]}
    m1 = manifest(5, 15, since=link, xxh3_128="w15")
    m2 = manifest(5, 20, since={**link, "xxh3_128": "w15", "rows": 5, "last_key": ["15"]})
    assert chain_problem([("a", m0), ("b", m1), ("c", m2)]) is None
    assert "a gap" in (chain_problem([("a", m0), ("c", m2)]) or "")
    early = manifest(5, 12, since={**link, "last_key": ["8"]})
    assert "an overlap" in (chain_problem([("a", m0), ("x", early)]) or "")
    text = [replace(m, key_types=("text",)) for m in (m0, m2)]
    assert "a gap or an overlap" in (chain_problem([("a", text[0]), ("c", text[1])]) or "")
    same_key = manifest(5, 15, since={**link, "xxh3_128": "other"})
    assert "not a as it is now" in (chain_problem([("a", m0), ("s", same_key)]) or "")
    assert "is not an increment" in (chain_problem([("a", m0), ("b", m0)]) or "")
    assert "columns differs" in (chain_problem([("a", m0), ("b", replace(m1, columns=("id",)))])
                                 or "")  # fmt: skip


def test_watermark_decisions() -> None:
    from copystream import watermark as wm
    from copystream.incremental import watermark_checkpoint
    from copystream.table import ResolvedTable

    assert wm.watermark_key("at", ("id",)) == ("at", "id")
    assert wm.watermark_key("at", ("at", "id")) == ("at", "id")
    with pytest.raises(UsageError, match="previous export with since"):
        check_request(RunOptions(incremental=True), "at")
    check_request(RunOptions(incremental=True, since="m"), "at")
    plain = manifest(3, 3)
    with pytest.raises(UsageError, match="not a watermark export"):
        wm.previous_mark(plain, "at", None)
    measured = ("2026-01-01T00:00:00.000000+00", 1.5, 2)
    mark = wm.mark("at", measured, None, None, 0)
    marked = replace(plain, watermark=mark)
    assert wm.previous_mark(marked, "at", None) == ("2026-01-01T00:00:00.000000+00", 1.5)
    assert wm.previous_mark(marked, "at", 60) == ("2026-01-01T00:00:00.000000+00", 60.0)
    with pytest.raises(UsageError, match="tracked 'at', not 'b'"):
        wm.previous_mark(marked, "b", None)
    link = {"manifest": "a", "xxh3_128": "whole3", "rows": 3, "last_key": ["3"]}
    later = wm.mark("at", measured, "2025-12-31", ("t", "2"), 2)
    cp = watermark_checkpoint(identity(), {"TimeZone": "UTC"}, {"kind": "file"}, later, link,
                              started_at="T", chunk_rows=5, estimated_rows=None)  # fmt: skip
    assert cp.last_key == ("t", "2") and cp.offset == 0
    fields = manifest_fields(cp, None, finished_at="T", seconds=0)
    assert fields == {"watermark": later, "since": link}
    # a watermark increment starts inside its predecessor's key range by design
    overlapping = manifest(4, 3, **fields)
    assert chain_problem([("a", marked), ("b", overlapping)]) is None
    facts: dict[str, Any] = {
        "oid": 1, "schema": "public", "name": "w", "qualified": "public.w", "relkind": "r",
        "columns": ("id", "at"), "key": ("at", "id"), "key_types": ("text", "bigint"),
        "key_source": "--key", "key_unique": True, "key_indexed": True, "where": None,
        "estimated_rows": None, "estimated_bytes": None,
    }  # fmt: skip
    table = ResolvedTable(**facts)
    with pytest.raises(UsageError, match="must be a timestamp with time zone"):
        wm.check_type(table)
    assert wm.index_warning(table, [("at",)]) is None
    assert "no index starts with the key (at, id)" in (wm.index_warning(table, [("id",)]) or "")


def test_watermark_kinds_and_their_bounds() -> None:
    """Each type a watermark may have is a kind with a bound of its own: a time read against
    the server's clock (a timestamp and a date as the local time of the pinned TimeZone), or a
    counter read against its greatest value, whose lag counts in its own units (0 unless
    given) and whose bound an integer column reads (rounded up)."""
    from psycopg import sql

    from copystream import watermark as wm

    kinds = {t: wm.kind(t) for t in (
        "timestamp with time zone", "timestamp(3) with time zone", "timestamp without time zone",
        "date", "smallint", "integer", "bigint", "numeric", "numeric(12,2)", "text", "uuid",
        "time without time zone", "double precision",
    )}  # fmt: skip
    assert kinds == {
        "timestamp with time zone": "timestamptz", "timestamp(3) with time zone": "timestamptz",
        "timestamp without time zone": "timestamp", "date": "date", "smallint": "integer",
        "integer": "integer", "bigint": "integer", "numeric": "numeric",
        "numeric(12,2)": "numeric", "text": None, "uuid": None,
        "time without time zone": None, "double precision": None,
    }  # fmt: skip

    def text(q: sql.Composed) -> str:
        return q.as_string(None)

    assert "AT TIME ZONE current_setting('TimeZone')" in text(
        wm.lower_bound_query("timestamp", "2026-01-01T00:00:00+00", 5)
    )
    assert "AT TIME ZONE" not in text(wm.lower_bound_query("timestamptz", "2026", 5))
    assert text(wm.lower_bound_query("date", "2026", 5)).endswith("::date::text")
    assert text(wm.lower_bound_query("integer", "100", 2.5)).startswith("SELECT ceil('100'")
    measured = ("2026-01-01T00:00:00.000000+00", 3.0, 0, "100")
    counter = wm.mark("v", measured, None, None, 0, kind_="integer")
    assert (counter["started"], counter["kind"], counter["lag_seconds"]) == ("100", "integer", 3)
    clock = wm.mark("at", measured, None, None, 0, kind_="timestamp")
    assert clock["started"] == "2026-01-01T00:00:00.000000+00"
    assert wm.previous_mark(manifest(3, 3, watermark=counter), "v", None) == ("100", 0.0)
    assert wm.previous_mark(manifest(3, 3, watermark=counter), "v", 7) == ("100", 7.0)
    empty = wm.mark("v", (*measured[:3], None), None, None, 0, kind_="numeric")
    assert wm.previous_mark(manifest(0, None, watermark=empty), "v", None) == (None, 0.0)
    # a mark of an earlier release (no kind) is a timestamptz one
    old = {k: v for k, v in clock.items() if k != "kind"}
    assert wm.previous_mark(manifest(3, 3, watermark=old), "at", None) == (clock["started"], 3.0)
