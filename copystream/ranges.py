"""Parallel export: split the key space, run one part per range in worker processes, join.

The split uses quantiles of a ``TABLESAMPLE`` of the key, ordered by PostgreSQL itself, so it
balances by row count for any btree-orderable key (text under any collation, uuid, timestamps,
composite keys), not only integers. Each range is a :class:`~copystream.part.PartJob` with its
own connection, file and checkpoint (``OUTPUT.part-NNNN.checkpoint.json``); the first range writes
OUTPUT itself, the others ``OUTPUT.part-NNNN``. The ranges are recorded in ``OUTPUT.parts.json``
so that re-running the same command resumes every unfinished range. When all parts are done the
later ones are appended to OUTPUT in key order with ``copy_file_range`` (no Python copy loop), the
joined file is re-hashed chunk by chunk against the parts' records, and the manifest has the same
form as a single-worker export's, with chunk offsets in the final file.

Workers are processes, not threads (the GIL would serialise the read loops): see
:mod:`copystream.pool`. On Linux they are killed if the coordinating process dies, so that a
re-run never races an orphaned worker.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ._atomic import NO_SPACE, atomic_write, fsync_dir, raise_if_full, remove_stale_temporaries
from .checkpoint import (
    Checkpoint,
    ChunkRecord,
    canonical_digest,
    checkpoint_path,
    load_checkpoint,
)
from .chunk import SnapshotGone, key_text_settings
from .destinations import check_at_checkpoint, rehash
from .errors import CheckpointMismatch, ExportFailed, OutputExists, Remedy
from .part import PartJob, PartOutcome, run_part
from .pool import Task, run_tasks
from .progress import Progress
from .queries import key_columns, key_text, where_clause
from .table import ResolvedTable

__all__ = [
    "KeyRanges",
    "join_parts",
    "load_parts",
    "new_parts",
    "part_data_path",
    "part_path",
    "pick_boundaries",
    "remove_parts",
    "run_parts",
    "sample_boundaries",
    "save_parts",
]

log = logging.getLogger("copystream")

#: Version 2: the first range writes OUTPUT itself. Version 1 (copystream 0.1.0) wrote every
#: range to a part file; such a plan is still resumed, and joined the way 0.1.0 did.
PARTS_VERSION = 2
_KNOWN_VERSIONS = (1, 2)
#: Table blocks read to place the boundaries. ``TABLESAMPLE SYSTEM`` takes whole blocks, and the
#: rows of a block are often neighbours in key order, so the balance depends on how many blocks
#: are sampled, not on how many rows: 5,000 blocks (40 MB) keep ranges within a few percent of
#: each other for up to ~16 ranges. A table of up to twice that is read whole.
SAMPLE_BLOCKS = 5_000
#: At most about this many (evenly spaced) sampled keys are sent to the client.
SAMPLE_ROWS = 30_000

Key = tuple[str, ...]


@dataclass(frozen=True)
class KeyRanges:
    """The ranges of a parallel export (``OUTPUT.parts.json``)."""

    export: dict[str, Any]
    settings: dict[str, str]
    started_at: str
    ranges: tuple[tuple[Key | None, Key | None], ...]
    version: int = PARTS_VERSION

    @property
    def first_in_place(self) -> bool:
        """Whether the first range writes OUTPUT itself (every plan but 0.1.0's)."""
        return self.version >= 2

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form with a self-digest."""
        body: dict[str, Any] = {
            "version": self.version,
            "kind": "copystream-parts",
            "export": self.export,
            "settings": self.settings,
            "started_at": self.started_at,
            "ranges": [
                [list(lo) if lo else None, list(hi) if hi else None] for lo, hi in self.ranges
            ],
        }
        body["parts_xxh3_128"] = canonical_digest(body)
        return body

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KeyRanges:
        """Inverse of :meth:`to_json`; ``ValueError`` on a damaged record."""
        if d.get("kind") != "copystream-parts" or d.get("version") not in _KNOWN_VERSIONS:
            raise ValueError("not a copystream parts plan of a known version")
        body = {k: v for k, v in d.items() if k != "parts_xxh3_128"}
        if canonical_digest(body) != d.get("parts_xxh3_128"):
            raise ValueError("its self-digest does not match (damaged or edited)")
        return cls(
            export=dict(d["export"]),
            settings={str(k): str(v) for k, v in d["settings"].items()},
            started_at=str(d["started_at"]),
            ranges=tuple(
                (tuple(lo) if lo is not None else None, tuple(hi) if hi is not None else None)
                for lo, hi in d["ranges"]
            ),
            version=int(d["version"]),
        )


def parts_path(output: Path) -> Path:
    """Where the parts plan of ``output`` lives."""
    return output.with_name(output.name + ".parts.json")


def part_path(output: Path, index: int) -> Path:
    """The name of part ``index``: its checkpoint is ``checkpoint_path(part_path(...))``."""
    return output.with_name(f"{output.name}.part-{index:04d}")


def part_data_path(output: Path, index: int, *, first_in_place: bool = True) -> Path:
    """The file part ``index`` writes: OUTPUT itself for the first part (its bytes are already
    where they belong, so the join copies only the later parts), else ``part_path``."""
    return output if index == 0 and first_in_place else part_path(output, index)


def load_parts(output: Path, *, strict: bool = True) -> KeyRanges | None:
    """The parts plan beside ``output``, or ``None``; a damaged one raises unless not strict."""
    path = parts_path(output)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return KeyRanges.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        if not strict:
            return None
        raise CheckpointMismatch(
            f"{path} cannot be used: {e}"
        ) from e


def save_parts(output: Path, parts: KeyRanges) -> None:
    """Write the parts plan atomically (0600)."""
    atomic_write(parts_path(output), json.dumps(parts.to_json(), indent=1).encode() + b"\n")


def remove_parts(output: Path, parts: KeyRanges | None = None) -> None:
    """Delete the part files, their checkpoints and the plan (after a join, or ``--restart``).

    Every ``OUTPUT.part-NNNN`` file goes, whatever ``parts`` says: also those of a plan that
    cannot be read any more (``--restart`` must be able to discard a damaged one).
    """
    # The plan goes first: once it is gone, OUTPUT (which the first part wrote) is never taken
    # for an unfinished part again, whatever part files an interruption leaves behind.
    with contextlib.suppress(FileNotFoundError):
        parts_path(output).unlink()
        fsync_dir(output.parent)
    remove_stale_temporaries(parts_path(output))  # of a save_parts that was killed
    part_name = re.compile(re.escape(output.name) + r"\.part-\d{4,}(?:\.checkpoint\.json)?")
    with os.scandir(output.parent) as entries:
        names = [e.name for e in entries if part_name.fullmatch(e.name)]
    for i in range(len(parts.ranges) if parts is not None else 0):
        names += [part_path(output, i).name, checkpoint_path(part_path(output, i)).name]
    for name in sorted(set(names)):
        with contextlib.suppress(FileNotFoundError):
            (output.parent / name).unlink()
    fsync_dir(output.parent)


def new_parts(
    identity: dict[str, Any], settings: dict[str, str], started_at: str, boundaries: Sequence[Key]
) -> KeyRanges:
    """The plan for ranges split at ``boundaries`` (ascending). Pure."""
    edges: list[Key | None] = [None, *boundaries, None]
    ranges = tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))
    return KeyRanges(export=identity, settings=settings, started_at=started_at, ranges=ranges)


# -- splitting ----------------------------------------------------------------------------------


def pick_boundaries(sample: Sequence[Key], parts: int) -> list[Key]:
    """Up to ``parts - 1`` boundaries at even quantiles of an ordered sample. Pure.

    ``sample`` must be in key order (PostgreSQL sorted it). Range ``i`` ends (inclusively) at the
    last key of the ``i``-th of ``parts`` equal slices of the sample, so the ranges get equal
    shares of it (to within one key). Repeated keys give one boundary.
    """
    if parts <= 1 or not sample:
        return []
    out: list[Key] = []
    for i in range(1, parts):
        j = (i * len(sample)) // parts - 1  # the last key of slice i (fewer keys than parts: < 0)
        if j < 0:
            continue
        k = sample[j]
        if not out or out[-1] != k:
            out.append(k)
    if out and out[-1] == sample[-1]:
        out.pop()  # a boundary at the very end would leave an empty last range
    return out


def _heap_blocks(conn: psycopg.Connection[Any], plan: ResolvedTable) -> int:
    """Blocks in the table's heap (of all its partitions), from the files' sizes: no statistics
    needed, and out-of-line (TOAST) data, which TABLESAMPLE does not sample, left out."""
    if plan.relkind == "p":
        query = (
            "SELECT COALESCE(sum(pg_relation_size(relid)), 0)::bigint "
            "FROM pg_partition_tree(%s::oid::regclass) WHERE isleaf"
        )
    else:
        query = "SELECT pg_relation_size(%s::oid::regclass)::bigint"
    row = conn.execute(query, [plan.oid]).fetchone()
    size = conn.execute("SELECT current_setting('block_size')::bigint").fetchone()
    assert row is not None and size is not None
    return int(row[0]) // int(size[0])


def sample_boundaries(
    conn: psycopg.Connection[Any], plan: ResolvedTable, parts: int, *, snapshot: str | None = None
) -> list[Key]:
    """Boundaries splitting ``plan``'s rows into ``parts`` ranges of about equal row counts."""
    if parts <= 1:
        return []
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot is not None:
            try:
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            except (
                psycopg.errors.InvalidParameterValue,
                psycopg.errors.ObjectNotInPrerequisiteState,
            ) as e:  # the session holding it died: a lost connection, not a bad request
                raise SnapshotGone(str(e)) from e
        for name, value in key_text_settings(plan.key_types).items():  # exact key text
            conn.execute("SELECT set_config(%s, %s, true)", [name, value])
        sampling: sql.Composable = sql.SQL("")
        blocks = _heap_blocks(conn, plan) if plan.relkind in ("r", "m", "p") else 0
        if blocks > 2 * SAMPLE_BLOCKS:
            pct = max(0.0001, min(100.0, 100.0 * SAMPLE_BLOCKS / blocks))
            sampling = sql.SQL(" TABLESAMPLE SYSTEM ({})").format(sql.Literal(round(pct, 6)))
        # The server sorts the sampled keys and sends every n-th: evenly spaced quantiles of
        # the whole sample, without shipping (or holding) all of it.
        query = sql.SQL(
            "SELECT {keys} FROM (SELECT {cols}, row_number() OVER (ORDER BY {cols}) AS {rn}, "
            "count(*) OVER () AS {n} FROM {table}{sampling}{where}) AS s "
            "WHERE {rn} % GREATEST(1, {n} / {most}) = 0 ORDER BY {rn}"
        ).format(
            keys=key_text(plan),
            cols=key_columns(plan),
            rn=sql.Identifier("copystream sample rn"),
            n=sql.Identifier("copystream sample n"),
            table=plan.table_ident,
            sampling=sampling,
            where=where_clause(plan),
            most=sql.Literal(min(SAMPLE_ROWS, parts * 100)),  # 1% of a range: plenty
        )
        rows = conn.execute(query).fetchall()
    sample = [tuple(str(v) for v in r) for r in rows]
    bounds = pick_boundaries(sample, parts)
    log.info(
        "%s: split into %d ranges from %s sampled keys",
        plan.qualified,
        len(bounds) + 1,
        f"{len(sample):,}",
    )
    return bounds


# -- running ------------------------------------------------------------------------------------


def run_parts(
    output: Path,
    parts: KeyRanges,
    template: PartJob,
    workers: int,
    progress: Callable[[Progress], None] | None,
) -> list[PartOutcome]:
    """Run every part (finished ones only re-verify) with up to ``workers`` processes.

    ``template`` is the whole-range job; each part's job has its own path, checkpoint and key
    range (``ranged``: the range is part of its identity).
    """
    plan = template.table
    jobs = []
    for i, (lo, hi) in enumerate(parts.ranges):
        state = part_path(output, i)
        path = part_data_path(output, i, first_in_place=parts.first_in_place)
        if os.path.lexists(path) and not checkpoint_path(state).exists():
            if path == output:  # never removed here: it may be a finished export of its own
                raise OutputExists(
                    f"{output} exists but the first range of the unfinished --workers export "
                    f"recorded in {parts_path(output).name} has no checkpoint",
                    remedy=Remedy.RESTART,
                )
            path.unlink()  # created but never checkpointed: nothing in it counts
        job = replace(
            template,
            path=str(path),
            state=str(state),
            lower=lo,
            upper=hi,
            first=i == 0,
            ranged=True,
        )
        cp = load_checkpoint(state)  # damaged or foreign: refused before any worker starts
        if cp is not None:
            cp.check_same_export(job.identity, state)
            # so is an edited part (its worker checks again, from the page cache)
            check_at_checkpoint(path, cp, recorded_in=checkpoint_path(state))
        jobs.append(job)
    return _run_in_pool(jobs, workers, plan.qualified, plan.estimated_rows, progress)


def _run_in_pool(
    jobs: Sequence[PartJob],
    workers: int,
    table: str,
    estimated_rows: int | None,
    progress: Callable[[Progress], None] | None,
) -> list[PartOutcome]:
    """Run the range jobs in the worker pool; their outcomes in order.

    If a range fails, the others still run to their end; then the first failure is raised
    (every checkpoint is intact).
    """
    rows = [0] * len(jobs)
    nbytes = [0] * len(jobs)
    started = time.monotonic()
    results: dict[int, PartOutcome] = {}
    failures: dict[int, BaseException] = {}
    tasks = [Task(run_part, (job,)) for job in jobs]
    for event in run_tasks(tasks, min(workers, len(jobs)), tick=1.0):
        if event.kind == "progress":
            rows[event.index], nbytes[event.index] = event.value.rows, event.value.bytes
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(Progress(table, sum(rows), sum(nbytes), estimated_rows, elapsed, 0))
        elif event.kind == "log":
            log.log(*event.value)
        elif event.kind == "done":
            results[event.index] = event.value
        elif event.kind == "failed":
            failures[event.index] = event.value
    if failures:
        raise failures[min(failures)]
    return [results[i] for i in range(len(jobs))]


# -- joining ------------------------------------------------------------------------------------


def _copy_all(src: int, dst: int, count: int) -> None:
    """Copy ``count`` bytes from ``src``'s start to ``dst``'s position, inside the kernel."""
    left = count
    offset = 0
    copy = functools.partial(os.copy_file_range, src, dst)
    while left > 0:
        try:
            n = copy(left, offset)
        except OSError:
            if copy.func is os.sendfile:
                raise
            # filesystems without copy_file_range support: sendfile is still in-kernel
            copy = functools.partial(os.sendfile, dst, src)
            continue
        if n == 0:
            break
        left -= n
        offset += n
    if left:
        raise ExportFailed(f"a part file is shorter than its checkpoint ({left} bytes missing)")


def join_parts(
    output: Path, parts: KeyRanges, outcomes: Sequence[PartOutcome]
) -> tuple[Checkpoint, str]:
    """Append the finished later parts to ``output`` and re-hash it against their chunks.

    ``output`` holds the first part already (it was written in place), and nothing after it:
    resuming the first part cut off whatever an interrupted join had appended. Returns the
    combined checkpoint (chunk offsets in the final file) and the file's digest.
    """
    chunks: list[ChunkRecord] = []
    offset = 0
    for o in outcomes:
        for c in o.checkpoint.chunks:
            chunks.append(replace(c, index=len(chunks), offset=offset + c.offset))
        offset += o.checkpoint.offset
    if parts.first_in_place:
        fd = os.open(output, os.O_RDWR | os.O_CLOEXEC)
        os.ftruncate(fd, outcomes[0].checkpoint.offset)
        os.lseek(fd, 0, os.SEEK_END)
        first_copied = 1
    else:  # a 0.1.0 plan: every range is in a part file; OUTPUT is at most a torn join
        with contextlib.suppress(FileNotFoundError):
            output.unlink()
        fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        first_copied = 0
    try:
        try:
            for i, o in enumerate(outcomes[first_copied:], start=first_copied):
                src = os.open(part_path(output, i), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _copy_all(src, fd, o.checkpoint.offset)
                finally:
                    os.close(src)
            os.fsync(fd)
        except OSError as e:
            if e.errno in NO_SPACE:
                os.ftruncate(fd, outcomes[0].checkpoint.offset if first_copied else 0)
                raise_if_full(e, f"cannot join the parts into {output}")
            raise
        try:  # a compressed output's chunks are decompressed too: the CSV's digest
            digest, destination = rehash(fd, chunks, parts.export)
        except ValueError as e:
            raise ExportFailed(
                f"joining the parts of {output} produced wrong bytes in chunk {e.args[0]}"
            ) from None
    finally:
        os.close(fd)
    fsync_dir(output.parent)
    first = outcomes[0].checkpoint
    last_key = next(
        (o.checkpoint.last_key for o in reversed(outcomes) if o.checkpoint.chunks), None
    )
    combined = Checkpoint(
        export=parts.export,
        settings=parts.settings,
        started_at=parts.started_at,
        chunk_rows=first.chunk_rows,
        estimated_rows=first.estimated_rows,
        offset=offset,
        rows=sum(o.checkpoint.rows for o in outcomes),
        last_key=last_key,
        xxh3_128=digest,
        finished=True,
        chunks=tuple(chunks),
        destination=destination,
    )
    return combined, digest
