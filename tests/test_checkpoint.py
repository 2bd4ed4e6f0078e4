"""Unit tests of copystream.checkpoint: pure transitions, exact JSON round trip, durable saving."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from copystream.checkpoint import (
    Checkpoint,
    ChunkRecord,
    checkpoint_path,
    load_checkpoint,
    new_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from copystream.errors import CheckpointMismatch

EXPORT: dict[str, Any] = {
    "table": 'public."Order Items"',
    "key": ["id", "at"],
    "key_types": ["bigint", "timestamp with time zone"],
    "columns": ["id", "at", "note"],
    "where": "note <> 'x'",
    "options": {
        "format": "csv",
        "header": True,
        "delimiter": None,
        "null": None,
        "quote": None,
        "escape": None,
        "force_quote": [],
        "encoding": None,
    },
}
SETTINGS = {"TimeZone": "UTC", "DateStyle": "ISO, MDY", "extra_float_digits": "1"}

TRICKY_KEYS: list[tuple[str, ...]] = [
    ("2024-01-01 00:00:00+00",),
    ("0.1",),
    ('he said "hi", it\'s \\ fine\nnext line — ünïcødé ✓',),
    ("\\x00ff",),
    ("", " leading and trailing "),
    ("9223372036854775807", "1e-300"),
]


def fresh() -> Checkpoint:
    return new_checkpoint(
        export=EXPORT,
        settings=SETTINGS,
        started_at="2024-05-01T12:00:00+00:00",
        chunk_rows=1000,
        estimated_rows=12345,
    )


def advanced() -> Checkpoint:
    cp = fresh()
    cp = cp.advance(
        nbytes=100, rows=10, digest="a" * 32, prefix_digest="b" * 32,
        last_key=("10", "2024-01-01 00:00:00+00"), finished=False,
    )  # fmt: skip
    return cp.advance(
        nbytes=50, rows=5, digest="c" * 32, prefix_digest="d" * 32,
        last_key=('15', 'quote " and \\ and \n'), finished=False,
    )  # fmt: skip


# -- advance ------------------------------------------------------------------------------------


def test_new_checkpoint_starts_at_zero() -> None:
    cp = fresh()
    assert (cp.offset, cp.rows, cp.last_key, cp.finished, cp.chunks) == (0, 0, None, False, ())
    assert cp.xxh3_128 == xxhash.xxh3_128(b"").hexdigest()


def test_advance_accumulates_offsets_rows_and_records() -> None:
    cp = advanced()
    assert cp.offset == 150
    assert cp.rows == 15
    assert cp.xxh3_128 == "d" * 32
    assert cp.last_key == ("15", 'quote " and \\ and \n')
    assert cp.chunks == (
        ChunkRecord(0, 0, 100, 10, "a" * 32, ("10", "2024-01-01 00:00:00+00")),
        ChunkRecord(1, 100, 50, 5, "c" * 32, ("15", 'quote " and \\ and \n')),
    )
    assert fresh().offset == 0  # pure: the original is unchanged


def test_empty_chunk_adds_no_record_but_can_finish() -> None:
    cp = advanced()
    done = cp.advance(
        nbytes=0, rows=0, digest=xxhash.xxh3_128(b"").hexdigest(), prefix_digest=cp.xxh3_128,
        last_key=None, finished=True,
    )  # fmt: skip
    assert done.finished is True
    assert done.chunks == cp.chunks
    assert (done.offset, done.rows) == (cp.offset, cp.rows)
    assert done.last_key == cp.last_key  # None keeps the last key


def test_last_key_none_keeps_previous_but_records_none() -> None:
    cp = advanced()
    nxt = cp.advance(
        nbytes=7, rows=0, digest="e" * 32, prefix_digest="f" * 32, last_key=None, finished=False
    )
    assert nxt.last_key == cp.last_key
    assert nxt.chunks[-1] == ChunkRecord(2, 150, 7, 0, "e" * 32, None)


# -- JSON round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("last_key", TRICKY_KEYS)
def test_json_round_trip_is_exact(last_key: tuple[str, ...]) -> None:
    cp = fresh().advance(
        nbytes=3, rows=1, digest="1" * 32, prefix_digest="2" * 32, last_key=last_key,
        finished=False,
    )  # fmt: skip
    back = Checkpoint.from_json(json.loads(json.dumps(cp.to_json())))
    assert back == cp
    assert back.last_key == last_key
    assert back.chunks[0].last_key == last_key


@pytest.mark.parametrize("last_key", TRICKY_KEYS)
def test_save_and_load_round_trip_is_exact(tmp_path: Path, last_key: tuple[str, ...]) -> None:
    out = tmp_path / "out.csv"
    cp = advanced().advance(
        nbytes=1, rows=1, digest="9" * 32, prefix_digest="8" * 32, last_key=last_key,
        finished=True,
    )  # fmt: skip
    save_checkpoint(out, cp)
    assert load_checkpoint(out) == cp


def test_load_without_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path / "out.csv") is None


def test_checkpoint_path_is_beside_output(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path / "a.b.csv") == tmp_path / "a.b.csv.checkpoint.json"


# -- self-digest --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.__setitem__("offset", d["offset"] + 1),
        lambda d: d.__setitem__("rows", 0),
        lambda d: d.__setitem__("last_key", ["999", "x"]),
        lambda d: d["chunks"][1].__setitem__("xxh3_128", "0" * 32),
        lambda d: d["export"].__setitem__("where", None),
        lambda d: d["settings"].__setitem__("TimeZone", "Europe/Paris"),
        lambda d: d.__setitem__("finished", True),
    ],
    ids=["offset", "rows", "last_key", "chunk-digest", "where", "settings", "finished"],
)
def test_self_digest_detects_an_edited_field(tmp_path: Path, edit: Any) -> None:
    out = tmp_path / "out.csv"
    save_checkpoint(out, advanced())
    path = checkpoint_path(out)
    d = json.loads(path.read_bytes())
    edit(d)
    path.write_text(json.dumps(d, indent=1))
    with pytest.raises(CheckpointMismatch) as ei:
        load_checkpoint(out)
    assert "self-digest" in str(ei.value)
    assert "--restart" in ei.value.worded("cli")
    assert ei.value.exit_code == 2


def test_reformatted_but_unchanged_checkpoint_still_loads(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    save_checkpoint(out, advanced())
    path = checkpoint_path(out)
    path.write_text(json.dumps(json.loads(path.read_bytes()), indent=4, sort_keys=True))
    assert load_checkpoint(out) == advanced()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b"null",
        b'"text"',
        b'{"kind": "copystream-checkpoint", "version": 99}',
        b"\xff\xfe",
    ],
    ids=["empty", "garbage", "list", "null", "string", "version", "binary"],
)
def test_unreadable_checkpoint_is_a_mismatch(tmp_path: Path, content: bytes) -> None:
    out = tmp_path / "out.csv"
    checkpoint_path(out).write_bytes(content)
    with pytest.raises(CheckpointMismatch) as ei:
        load_checkpoint(out)
    assert "--restart" in ei.value.worded("cli")


# -- saving -------------------------------------------------------------------------------------


def test_save_is_owner_only_and_leaves_no_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    old = os.umask(0o022)
    try:
        save_checkpoint(out, fresh())
        save_checkpoint(out, advanced())  # replacing keeps the mode too
    finally:
        os.umask(old)
    path = checkpoint_path(out)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv.checkpoint.json"]
    assert load_checkpoint(out) == advanced()


def test_symlink_at_checkpoint_path_is_replaced_not_followed(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    os.chmod(victim, 0o644)
    checkpoint_path(out).symlink_to(victim)
    save_checkpoint(out, advanced())
    assert victim.read_bytes() == b"precious\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    path = checkpoint_path(out)
    assert not path.is_symlink()
    assert path.is_file()
    assert load_checkpoint(out) == advanced()


def test_symlink_planted_at_the_temporary_name_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Make mkstemp's first candidate name predictable, plant a symlink there, and check that
    # the O_EXCL create skips it instead of writing through it.
    names = iter(["planted", "second", "third"])

    def candidates() -> Iterator[str]:
        return names

    monkeypatch.setattr(tempfile, "_get_candidate_names", candidates)
    out = tmp_path / "out.csv"
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    planted = tmp_path / ".out.csv.checkpoint.json.planted.tmp"
    planted.symlink_to(victim)
    save_checkpoint(out, advanced())
    assert victim.read_bytes() == b"precious\n"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert load_checkpoint(out) == advanced()
    assert not (tmp_path / ".out.csv.checkpoint.json.second.tmp").exists()


def test_remove_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    save_checkpoint(out, fresh())
    remove_checkpoint(out)
    assert not checkpoint_path(out).exists()
    remove_checkpoint(out)  # already gone: no error


# -- check_same_export --------------------------------------------------------------------------


def test_same_export_passes(tmp_path: Path) -> None:
    advanced().check_same_export(json.loads(json.dumps(EXPORT)), tmp_path / "out.csv")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("table", "public.other"),
        ("key", ["id"]),
        ("key", ["at", "id"]),
        ("columns", ["id", "at"]),
        ("where", None),
        ("where", "note <> 'y'"),
        ("options", {**EXPORT["options"], "header": False}),
        ("options", {**EXPORT["options"], "delimiter": ";"}),
    ],
)
def test_other_export_is_refused(tmp_path: Path, field: str, value: object) -> None:
    other = {**EXPORT, field: value}
    with pytest.raises(CheckpointMismatch) as ei:
        advanced().check_same_export(other, tmp_path / "out.csv")
    msg = ei.value.worded("cli")
    assert "--restart" in msg
    assert f"({field} was " in msg
    assert "out.csv.checkpoint.json" in msg
    assert "\n" not in msg
