"""Incremental exports: what an increment continues, and whether it may. Pure: no I/O.

Two kinds of increment continue a complete export (its manifest):

* **append** (``incremental``): the rows after the manifest's last key are appended to the same
  output as new chunks, and the manifest is rewritten to cover the whole file, with the history
  of the exports that wrote it (``increments``). Its checkpoint (:func:`append_checkpoint`) is
  the manifest's chunks, offset, digest and pinned settings, as if a full export had been
  interrupted after its last chunk: resuming it re-hashes the file (the xxh3-128 state of the
  whole file cannot be saved, so the one way to continue the whole-file digest is to read the
  file again), then the chunk loop carries on after the last key.
* **since** (``since``): the rows after the last key of another export's manifest go to a new
  output, whose manifest names that predecessor (``since``: its manifest's name, digest, rows
  and last key). :func:`chain_problem` checks that a list of such manifests follow each other
  without a gap or an overlap.

An increment is the export it continues but for the rows: the same table, key, columns, filter
and COPY options, under the session settings pinned by the first export.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, ChunkRecord
from .errors import CheckpointMismatch, Opt, OutputExists, Remedy, UsageError
from .manifest import Manifest, manifest_path
from .spec import ExportSpec, RunOptions, identity_mismatch
from .state import manifest_identity

__all__ = [
    "APPEND",
    "SINCE",
    "WATERMARK",
    "append_checkpoint",
    "chain_problem",
    "check_complete_since",
    "check_request",
    "check_resume",
    "continues",
    "dataset_state",
    "follows",
    "follows_named",
    "increment_stem",
    "last_key",
    "manifest_fields",
    "refuse_append",
    "since_checkpoint",
    "since_manifest",
    "untouched_append",
    "watermark_checkpoint",
]

APPEND = "append"
SINCE = "since"
WATERMARK = "watermark"

#: Key types whose text sorts as numbers: a chain check can tell a gap from an overlap.
_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint"})


def continues(run: RunOptions, spec: ExportSpec) -> bool:
    """Whether an export of ``spec`` run as ``run`` continues another one (an increment of
    any kind: appended, after a ``since`` manifest, or by a watermark)."""
    return run.incremental or run.since is not None or spec.watermark is not None


def check_request(
    run: RunOptions, watermark: str | None = None, *, parquet: bool = False
) -> None:
    """Refuse options that contradict an incremental export (before anything is touched).
    (``parquet``: a Parquet dataset takes every kind of increment.)"""
    if watermark is not None:
        if run.incremental and run.since is None:
            raise UsageError(
                [
                    "a watermark increment goes to a file of its own: name the previous "
                    "export with ",
                    Opt("since"),
                ]
            )
        return
    if run.incremental and run.restart and run.since is None:
        raise UsageError("an incremental export continues OUTPUT; restart would discard it")


def last_key(chunks: Sequence[ChunkRecord]) -> tuple[str, ...] | None:
    """The key of the last row of ``chunks`` (``None``: no row, e.g. a header alone)."""
    for c in reversed(chunks):
        if c.last_key is not None:
            return c.last_key
    return None


def _mismatch(
    recorded: Mapping[str, Any], expected: Mapping[str, Any], *, compress: bool
) -> str | None:
    """The first identity field that differs (``compress=False``: compression may differ)."""
    a, b = dict(recorded), dict(expected)
    a["range"] = b["range"] = None
    if not compress:
        a["compress"] = b["compress"] = None
    return identity_mismatch(a, b)


def _another(path: object, field: str, recorded: Any, expected: Any) -> UsageError:
    mine = json.dumps(recorded, ensure_ascii=False)
    theirs = json.dumps(expected, ensure_ascii=False)
    return UsageError(
        f"{path} records another export ({field} was {mine}, now {theirs})",
        remedy=Remedy.SAME_EXPORT,
    )


def refuse_append(
    output: Path | str,
    manifest: Manifest | None,
    identity: Mapping[str, Any],
    manifest_at: str | None = None,
) -> UsageError:
    """Why ``output`` cannot be appended to (it has no complete export that verifies);
    ``manifest_at``: where its manifest is, if not beside a local file (an S3 object's)."""
    where = manifest_at or str(manifest_path(Path(output)))
    if manifest is None:
        return UsageError(
            f"{output} has no complete export to continue "
            f"({manifest_at or manifest_path(Path(output)).name} does not exist)",
            remedy=Remedy.FULL_EXPORT,
        )
    recorded = manifest_identity(manifest)
    name = _mismatch(recorded, identity, compress=True)
    if name is not None:
        return _another(where, name, recorded.get(name), identity.get(name))
    return UsageError(
        f"{output} does not match its manifest (it was changed since it was exported)",
        remedy=Remedy.FULL_EXPORT,
    )


def append_checkpoint(
    manifest: Manifest,
    identity: Mapping[str, Any],
    destination: Mapping[str, Any],
    *,
    started_at: str,
    chunk_rows: int,
    estimated_rows: int | None,
) -> Checkpoint:
    """The checkpoint of an increment appended to the complete export ``manifest`` records.

    ``destination`` is the fresh state of the output's kind of destination; a compressed
    output's also carries the uncompressed size and digest the manifest records.
    """
    state = dict(destination)
    offset = manifest.bytes
    if manifest.parquet is not None:  # the chunks' offsets count the CSV decoded into parts
        offset = manifest.chunks[-1].offset + manifest.chunks[-1].bytes if manifest.chunks else 0
    if manifest.compress is not None:
        state["uncompressed_bytes"] = manifest.uncompressed_bytes
        state["uncompressed_xxh3_128"] = manifest.uncompressed_xxh3_128
    after = last_key(manifest.chunks)
    increment = {
        "mode": APPEND,
        "started_at": started_at,
        "base_chunks": len(manifest.chunks),
        "base_rows": manifest.rows,
        "base_bytes": manifest.bytes,
        "after": list(after) if after is not None else None,
    }
    return Checkpoint(
        export=dict(identity),
        settings=dict(manifest.settings),
        started_at=manifest.started_at,
        chunk_rows=chunk_rows,
        estimated_rows=estimated_rows,
        offset=offset,
        rows=manifest.rows,
        last_key=after,
        xxh3_128=manifest.xxh3_128,
        chunks=manifest.chunks,
        destination=state,
        increment=increment,
    )


def dataset_state(output: Path, manifest: Manifest, fresh: Mapping[str, Any]) -> dict[str, Any]:
    """The destination state of an increment appended to the Parquet dataset ``manifest``
    records: its parts, to which new part files are added. A dataset of one worker's parts
    (``part-NNNNN``) is numbered on; any other (written by key ranges, or grown by a
    parallel increment) gets parts named after :func:`increment_stem`, which sort after its
    own."""
    parts = [{k: v for k, v in p.items() if k != "last_key"} for p in manifest.parts]
    stem = str(fresh.get("stem", "part-"))
    if any(p["file"] != f"{stem}{i:05d}.parquet" for i, p in enumerate(parts)):
        stem = increment_stem(output, manifest)
    return {**fresh, "stem": stem, "parts": parts}


def increment_stem(output: Path | str, manifest: Manifest) -> str:
    """How the part files an increment adds to the Parquet dataset ``manifest`` records begin:
    ``part-iKKKK-`` (``KKKK`` the increment's number: ``i`` sorts after the digits of every
    earlier part's name), so that the dataset's files in name order are in key order.
    Raises :class:`UsageError` when the names would not sort after the existing ones."""
    number = len(manifest.increments) if manifest.increments else 1
    stem = f"part-i{number:04d}-"
    if number > 9999 or any(p["file"] >= stem for p in manifest.parts):
        raise UsageError(
            f"{output} has parts named after any an increment could add "
            f"({manifest.parts[-1]['file']})",
            remedy=Remedy.FULL_EXPORT,
        )
    return stem


def _size(cp: Checkpoint) -> int:
    """The bytes of ``cp``'s output: a file's offset, a Parquet dataset's parts."""
    if cp.destination.get("kind") == "parquet":
        return sum(int(p["bytes"]) for p in cp.destination.get("parts", ()))
    return cp.offset


def untouched_append(cp: Checkpoint) -> bool:
    """Whether ``cp`` is an appended increment that has not added a chunk yet (undoing it is
    removing it: the output and its manifest are as they were)."""
    inc = cp.increment
    return inc is not None and inc["mode"] == APPEND and len(cp.chunks) == inc["base_chunks"]


def since_manifest(since: str) -> tuple[Path, Path]:
    """The manifest ``since`` names (a manifest, or an output beside its manifest), and the
    output it describes."""
    path = Path(since)
    suffix = ".manifest.json"
    if path.name.endswith(suffix):
        return path, path.with_name(path.name[: -len(suffix)])
    return manifest_path(path), path


def follows(
    previous: Manifest, previous_path: Path, identity: Mapping[str, Any], output: Path
) -> dict[str, Any]:
    """What an increment to ``output`` records of the export it follows (its ``since``).

    Raises :class:`UsageError` when ``previous`` is another export's (its compression may
    differ), or is ``output``'s own manifest.
    """
    if previous_path.resolve() == manifest_path(output).resolve():
        raise UsageError(
            f"{previous_path} is the manifest of {output} itself; an increment goes to a new file"
        )
    return follows_named(previous, previous_path, identity)


def follows_named(
    previous: Manifest, where: Path | str, identity: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`follows` of the manifest ``where`` names (a path, or an ``s3://`` URL): refused
    when it is another export's."""
    recorded = manifest_identity(previous)
    name = _mismatch(recorded, identity, compress=False)
    if name is not None:
        raise _another(where, name, recorded.get(name), identity.get(name))
    after = last_key(previous.chunks)
    return {
        "manifest": Path(str(where)).name,
        "xxh3_128": previous.xxh3_128,
        "rows": previous.rows,
        "last_key": list(after) if after is not None else None,
    }


def since_checkpoint(
    previous: Manifest,
    follows: Mapping[str, Any],
    identity: Mapping[str, Any],
    destination: Mapping[str, Any],
    *,
    started_at: str,
    chunk_rows: int,
    estimated_rows: int | None,
) -> Checkpoint:
    """The checkpoint of a new increment file: nothing written yet, rows after ``follows``'s
    last key, under the settings the previous export pinned."""
    increment = {"mode": SINCE, "started_at": started_at, "follows": dict(follows)}
    return _new_file(
        identity, previous.settings, destination, follows["last_key"], increment,
        chunk_rows=chunk_rows, estimated_rows=estimated_rows,
    )  # fmt: skip


def _new_file(
    identity: Mapping[str, Any],
    settings: Mapping[str, str],
    destination: Mapping[str, Any],
    after: Sequence[str] | None,
    increment: dict[str, Any],
    *,
    chunk_rows: int,
    estimated_rows: int | None,
) -> Checkpoint:
    """The checkpoint of an increment to a new file: nothing written, rows after ``after``."""
    return Checkpoint(
        export=dict(identity),
        settings=dict(settings),
        started_at=increment["started_at"],
        chunk_rows=chunk_rows,
        estimated_rows=estimated_rows,
        last_key=tuple(after) if after is not None else None,
        destination=dict(destination),
        increment=increment,
    )


def watermark_checkpoint(
    identity: Mapping[str, Any],
    settings: Mapping[str, str],
    destination: Mapping[str, Any],
    mark: Mapping[str, Any],
    follows: Mapping[str, Any] | None,
    *,
    started_at: str,
    chunk_rows: int,
    estimated_rows: int | None,
) -> Checkpoint:
    """The checkpoint of a new watermark export: nothing written yet, rows after ``mark``'s
    ``after`` key (all rows for a first export), recording ``mark`` and what it follows."""
    increment: dict[str, Any] = {"mode": WATERMARK, "started_at": started_at, "watermark": mark}
    if follows is not None:
        increment["follows"] = dict(follows)
    return _new_file(
        identity, settings, destination, mark.get("after"), increment,
        chunk_rows=chunk_rows, estimated_rows=estimated_rows,
    )  # fmt: skip


def _after_what(follows: Mapping[str, Any] | None) -> str:
    return "another export" if follows is None else str(follows.get("manifest"))


def check_resume(
    cp: Checkpoint, wanted: Mapping[str, Any] | None, recorded_in: Path | str
) -> None:
    """Refuse to resume ``cp`` as the increment after ``wanted`` (``None``: an append) when it
    is not that increment."""
    have = cp.increment.get("follows") if cp.increment is not None else None
    if wanted is not None and have != wanted:
        raise CheckpointMismatch(
            f"{recorded_in} is of an increment after {_after_what(have)}, not after "
            f"{wanted['manifest']} (or that export changed since)"
        )


def check_complete_since(
    manifest: Manifest, wanted: Mapping[str, Any], output: Path | str
) -> None:
    """Refuse a complete ``output`` that is not the increment after ``wanted``."""
    if manifest.since != dict(wanted):
        raise OutputExists(
            f"{output} holds the increment after {_after_what(manifest.since)}, not after "
            f"{wanted['manifest']}"
        )


def _entry(
    started_at: str, finished_at: str | None, seconds: float | None, rows: int, nbytes: int,
    chunks: tuple[int, int], after: Any, last: tuple[str, ...] | None,
) -> dict[str, Any]:  # fmt: skip
    return {
        "started_at": started_at,
        "finished_at": finished_at,
        "seconds": seconds,
        "rows": rows,
        "bytes": nbytes,
        "first_chunk": chunks[0],
        "chunks": chunks[1],
        "after": after,
        "last_key": list(last) if last is not None else None,
    }


def _history(cp: Checkpoint, old: Manifest | None) -> list[dict[str, Any]]:
    """The increments before ``cp``'s: the old manifest's, or its full export as the first."""
    if old is not None and old.increments:
        return list(old.increments)
    inc = cp.increment or {}
    base = tuple(cp.chunks[: int(inc.get("base_chunks", 0))])
    done = old.finished_at if old is not None else None
    seconds = old.seconds if old is not None else None
    rows, nbytes = int(inc.get("base_rows", 0)), int(inc.get("base_bytes", 0))
    return [_entry(cp.started_at, done, seconds, rows, nbytes, (0, len(base)), None,
                   last_key(base))]  # fmt: skip


def manifest_fields(
    cp: Checkpoint, old: Manifest | None, *, finished_at: str, seconds: float
) -> dict[str, Any]:
    """The manifest fields an increment adds, for the finished checkpoint ``cp``: the history
    of an appended output (``old``: its manifest before, if any), or an increment's ``since``.
    Writing the same increment's manifest twice (killed in between) records it once."""
    inc = cp.increment
    if inc is None:
        return {}
    if inc["mode"] == SINCE:
        return {"since": dict(inc["follows"])}
    if inc["mode"] == WATERMARK:
        fields = {"watermark": dict(inc["watermark"])}
        return {**fields, "since": dict(inc["follows"])} if "follows" in inc else fields
    base = int(inc["base_chunks"])
    entry = _entry(
        str(inc["started_at"]), finished_at, seconds, cp.rows - int(inc["base_rows"]),
        _size(cp) - int(inc["base_bytes"]), (base, len(cp.chunks) - base), inc["after"],
        last_key(cp.chunks[base:]),
    )  # fmt: skip
    history = [h for h in _history(cp, old) if h.get("started_at") != entry["started_at"]]
    return {"increments": (*history, entry)}


def _order(a: Sequence[str], b: Sequence[str], types: Sequence[str]) -> int | None:
    """-1, 0 or 1 as key ``a`` sorts before, with or after ``b``; ``None``: unknown here."""
    if not all(t in _INTEGER_TYPES for t in types):
        return None
    x, y = tuple(int(v) for v in a), tuple(int(v) for v in b)
    return (x > y) - (x < y)


def _step_problem(prev: tuple[str, Manifest], cur: tuple[str, Manifest]) -> str | None:
    (pname, p), (cname, c) = prev, cur
    name = _mismatch(manifest_identity(c), manifest_identity(p), compress=False)
    if name is not None:
        return f"{cname} records another export than {pname} ({name} differs)"
    if c.since is None:
        return f"{cname} is not an increment: it follows no export, so it cannot follow {pname}"
    ended, starts = last_key(p.chunks), c.since.get("last_key")
    end = list(ended) if ended is not None else None
    if starts != end and c.watermark is None:  # a watermark increment overlaps by design
        shown = f"{cname} holds the rows after key {starts}, but {pname} ends at key {end}"
        order = _order(starts or (), end or (), p.key_types) if starts and end else None
        if order is None:
            return f"{shown}: a gap or an overlap"
        what = "a gap: the rows between them are in no file" if order > 0 else "an overlap"
        return f"{shown}: {what}"
    if (c.since.get("xxh3_128"), c.since.get("rows")) != (p.xxh3_128, p.rows):
        return (
            f"{cname} follows an export of {c.since.get('rows')} rows that is not {pname} "
            "as it is now (another file between them, or it was changed)"
        )
    return None


def chain_problem(chain: Sequence[tuple[str, Manifest]]) -> str | None:
    """The first break in a chain of ``(name, manifest)``, oldest first, where each is the
    increment after the one before it (the first may be any export); ``None``: unbroken."""
    for prev, cur in itertools.pairwise(chain):
        problem = _step_problem(prev, cur)
        if problem is not None:
            return problem
    return None
