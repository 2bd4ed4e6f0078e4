"""Unit tests of copystream.manifest: JSON round trip, saving, and verify_file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import xxhash

from copystream.checkpoint import ChunkRecord
from copystream.errors import UsageError, VerificationFailed
from copystream.manifest import (
    Manifest,
    load_manifest,
    manifest_path,
    save_manifest,
    verify_file,
)

CHUNKS = [b"id,name\n1,a\n2,b\n", b'3,"c, d"\n4,\xc3\xa9\n', b"5,e\n" * 1000]
KEYS = [("2",), ("4",), ('5 o\'clock \\ "x"\n',)]


def h(data: bytes) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def build(out: Path, chunks: list[bytes] = CHUNKS) -> Manifest:
    """Write ``chunks`` to ``out`` and a matching manifest beside it."""
    out.write_bytes(b"".join(chunks))
    records = []
    offset = 0
    for i, c in enumerate(chunks):
        records.append(ChunkRecord(i, offset, len(c), c.count(b"\n"), h(c), KEYS[i % len(KEYS)]))
        offset += len(c)
    m = Manifest(
        table='public."Ünïcødé table"',
        key=("id",),
        key_types=("bigint",),
        key_source="primary key",
        columns=("id", "name"),
        where="name <> 'z'",
        options={"format": "csv", "header": True, "delimiter": None, "force_quote": []},
        rows=sum(c.count(b"\n") for c in chunks),
        bytes=offset,
        xxh3_128=h(b"".join(chunks)),
        chunks=tuple(records),
        chunk_rows=1000,
        settings={"TimeZone": "UTC", "DateStyle": "ISO, MDY"},
        started_at="2024-05-01T12:00:00+00:00",
        finished_at="2024-05-01T12:00:03.250000+00:00",
        seconds=3.25,
        resumed=True,
    )
    save_manifest(out, m)
    return m


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.csv"


# -- round trip ---------------------------------------------------------------------------------


def test_manifest_json_round_trip(out: Path) -> None:
    m = build(out)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert load_manifest(out) == m
    d = json.loads(manifest_path(out).read_bytes())
    assert d["kind"] == "copystream-manifest"
    assert d["version"] == 1
    assert d["xxh3_128"] == h(b"".join(CHUNKS))
    assert [c["offset"] for c in d["chunks"]] == [0, len(CHUNKS[0]), len(CHUNKS[0] + CHUNKS[1])]


def test_manifest_is_owner_only_and_beside_the_output(out: Path) -> None:
    build(out)
    assert manifest_path(out) == out.with_name("out.csv.manifest.json")
    assert stat.S_IMODE(manifest_path(out).stat().st_mode) == 0o600
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.csv", "out.csv.manifest.json"]


def test_load_manifest_absent_and_damaged(out: Path) -> None:
    assert load_manifest(out) is None
    manifest_path(out).write_text('{"kind": "something else"}')
    with pytest.raises(UsageError):
        load_manifest(out)
    for damaged in ("{truncated", "[]", "null", '"text"'):
        manifest_path(out).write_text(damaged)
        with pytest.raises(UsageError) as ei:
            load_manifest(out)
        assert "not a readable copystream manifest" in str(ei.value)


# -- verify_file --------------------------------------------------------------------------------


def test_verify_ok(out: Path) -> None:
    m = build(out)
    r = verify_file(out)
    assert r.path == out
    assert (r.rows, r.bytes, r.chunks) == (m.rows, len(b"".join(CHUNKS)), 3)
    assert r.xxh3_128 == h(out.read_bytes())
    assert verify_file(str(out)).bytes == r.bytes  # a str path works too


def test_verify_ok_for_an_empty_export(out: Path) -> None:
    build(out, [])
    r = verify_file(out)
    assert (r.rows, r.bytes, r.chunks, r.xxh3_128) == (0, 0, 0, h(b""))


@pytest.mark.parametrize(
    ("position", "index"),
    [(0, 0), (len(CHUNKS[0]), 1), (len(CHUNKS[0] + CHUNKS[1]) + 100, 2)],
)
def test_flipped_byte_names_the_chunk(out: Path, position: int, index: int) -> None:
    build(out)
    data = bytearray(out.read_bytes())
    data[position] ^= 0x20
    out.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed) as ei:
        verify_file(out)
    msg = str(ei.value)
    assert f"chunk {index} " in msg
    assert ei.value.exit_code == 1
    if index > 0:
        assert ", ".join(KEYS[index - 1]) in msg  # where the damaged rows start
    else:
        assert "(start)" in msg


@pytest.mark.parametrize("cut", [1, len(CHUNKS[2]), len(CHUNKS[2]) + 1])
def test_truncated_file_fails(out: Path, cut: int) -> None:
    build(out)
    data = out.read_bytes()
    out.write_bytes(data[:-cut])
    with pytest.raises(VerificationFailed) as ei:
        verify_file(out)
    assert "chunk" in str(ei.value)


def test_extended_file_fails(out: Path) -> None:
    build(out)
    with open(out, "ab") as f:
        f.write(b"6,extra\n")
    with pytest.raises(VerificationFailed) as ei:
        verify_file(out)
    size = len(b"".join(CHUNKS))
    assert f"is {size + 8} bytes but the manifest records {size}" in str(ei.value)


def test_whole_file_digest_is_checked(out: Path) -> None:
    m = build(out)
    d = m.to_json()
    d["xxh3_128"] = h(b"something else")
    manifest_path(out).write_text(json.dumps(d))
    with pytest.raises(VerificationFailed) as ei:
        verify_file(out)
    assert "whole-file digest" in str(ei.value)


def test_missing_manifest_is_a_usage_error(out: Path) -> None:
    out.write_bytes(b"data\n")
    with pytest.raises(UsageError) as ei:
        verify_file(out)
    assert not isinstance(ei.value, VerificationFailed)
    assert ei.value.exit_code == 2
    assert "out.csv.manifest.json does not exist" in str(ei.value)


def test_missing_output_with_manifest_is_a_usage_error(out: Path) -> None:
    build(out)
    out.unlink()
    with pytest.raises(UsageError) as ei:
        verify_file(out)
    assert "does not exist" in str(ei.value)


def test_output_that_is_a_directory_is_a_usage_error(out: Path) -> None:
    build(out)
    out.unlink()
    out.mkdir()
    with pytest.raises(UsageError) as ei:
        verify_file(out)
    assert "is a directory" in str(ei.value)
