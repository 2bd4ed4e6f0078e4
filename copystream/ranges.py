"""Parallel export: split the key space, run one part per range in worker processes.

The split uses quantiles of a ``TABLESAMPLE`` of the key, ordered by PostgreSQL itself, so it
balances by row count for any btree-orderable key (text under any collation, uuid, timestamps,
composite keys), not only integers. Each range is a :class:`~copystream.part.PartJob` with its
own connection, file and checkpoint (``OUTPUT.part-NNNN.checkpoint.json``); the first range writes
OUTPUT itself, the others ``OUTPUT.part-NNNN``. The ranges are recorded in ``OUTPUT.parts.json``
so that re-running the same command resumes every unfinished range. When all parts are done,
:mod:`copystream.join` appends the later ones to OUTPUT in key order, in constant free space,
and the manifest has the same form as a single-worker export's, with chunk offsets in the final
file.

Workers are processes, not threads (the GIL would serialise the read loops): see
:mod:`copystream.pool`. On Linux they are killed if the coordinating process dies, so that a
re-run never races an orphaned worker; a worker that dies on its own is started again from its
range's checkpoint (:class:`_Restarts`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from ._atomic import atomic_write, fsync_dir, lock_path, locked, remove_stale_temporaries
from .checkpoint import (
    canonical_digest,
    checkpoint_path,
    load_checkpoint,
)
from .chunk import SnapshotGone, key_text_settings
from .destinations import Destination, check_at_checkpoint
from .errors import (
    CheckpointMismatch,
    CopystreamError,
    ExportFailed,
    OutputExists,
    Remedy,
    RetriesExhausted,
)
from .progress import Progress
from .queries import key_columns, key_text, where_clause
from .retry import Failure, Retrier
from .server import snapshot_gone_errors
from .table import ResolvedTable

if TYPE_CHECKING:  # (imported when a range runs: an export of one COPY needs neither)
    from .part import PartJob, PartOutcome
    from .pool import Task

__all__ = [
    "FOLLOW_COST",
    "KeyRanges",
    "first_share",
    "load_parts",
    "new_parts",
    "part_data_path",
    "part_lock_path",
    "part_path",
    "pick_boundaries",
    "range_job",
    "remove_parts",
    "run_parts",
    "run_range",
    "sample_boundaries",
    "save_parts",
]

log = logging.getLogger("copystream")

#: Version 2: the first range writes OUTPUT itself. Version 1 (copystream 0.1.0) wrote every
#: range to a part file; such a plan is still resumed and joined. Version 3: a plan whose join
#: has begun (it carries a ``join`` record); copystream versions that do not know it refuse it
#: rather than run ranges whose part files the join has consumed.
PARTS_VERSION = 2
JOINING_VERSION = 3
_KNOWN_VERSIONS = (1, 2, 3)
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
    #: How far the join got once it began: OUTPUT holds, durably, every part before
    #: ``join[0]`` and the first ``join[1]`` bytes of that part; ``None``: not begun.
    join: tuple[int, int] | None = None
    #: How a Parquet dataset's part files begin (range ``i``'s: ``{stem}{i:04d}-NNNNN``); an
    #: increment's sort after the dataset's existing parts (:func:`~copystream.incremental.
    #: increment_stem`).
    stem: str = "part-"

    @property
    def first_in_place(self) -> bool:
        """Whether the first range writes OUTPUT itself (every plan but 0.1.0's)."""
        return self.version >= 2

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form with a self-digest."""
        body: dict[str, Any] = {
            "version": JOINING_VERSION if self.join is not None else self.version,
            "kind": "copystream-parts",
            "export": self.export,
            "settings": self.settings,
            "started_at": self.started_at,
            "ranges": [
                [list(lo) if lo else None, list(hi) if hi else None] for lo, hi in self.ranges
            ],
        }
        if self.join is not None:
            body["join"] = {"part": self.join[0], "copied": self.join[1]}
        if self.stem != "part-":  # absent otherwise: older plans keep their digest
            body["stem"] = self.stem
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
            join=_join_record(d),
            stem=str(d.get("stem", "part-")),
        )


def _join_record(d: dict[str, Any]) -> tuple[int, int] | None:
    """The ``join`` record of a plan's JSON: present exactly in a version 3 plan."""
    if (d["version"] == JOINING_VERSION) != ("join" in d):
        raise ValueError("its join record does not match its version")
    join = d.get("join")
    return None if join is None else (int(join["part"]), int(join["copied"]))


def parts_path(output: Path) -> Path:
    """Where the parts plan of ``output`` lives."""
    return output.with_name(output.name + ".parts.json")


def part_path(output: Path, index: int) -> Path:
    """The name of part ``index``: its checkpoint is ``checkpoint_path(part_path(...))``."""
    return output.with_name(f"{output.name}.part-{index:04d}")


def part_lock_path(output: Path, index: int) -> Path:
    """The lock file a process holds while it exports part ``index`` (:func:`run_range`)."""
    return lock_path(part_path(output, index))


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
    part_name = re.compile(re.escape(output.name) + r"\.part-\d{4,}(?:\.checkpoint\.json|\.lock)?")
    with os.scandir(output.parent) as entries:
        names = [e.name for e in entries if part_name.fullmatch(e.name)]
    for i in range(len(parts.ranges) if parts is not None else 0):
        names += [part_path(output, i).name, checkpoint_path(part_path(output, i)).name]
    for name in sorted(set(names)):
        if name.endswith(".lock"):
            _remove_free_lock(output.parent / name)
            continue
        with contextlib.suppress(FileNotFoundError):
            (output.parent / name).unlink()
    fsync_dir(output.parent)


def _remove_free_lock(path: Path) -> None:
    """Remove a range's lock file that a killed process left (:func:`run_range`), unless a
    live process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink()
    except OSError:  # held (BlockingIOError), or gone meanwhile
        pass
    finally:
        os.close(fd)


def new_parts(
    identity: dict[str, Any],
    settings: dict[str, str],
    started_at: str,
    boundaries: Sequence[Key],
    after: Key | None = None,
) -> KeyRanges:
    """The plan for ranges split at ``boundaries`` (ascending), of the keys after ``after``
    (``None``: every key; an increment's are those after its last key). Pure."""
    edges: list[Key | None] = [after, *boundaries, None]
    ranges = tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))
    return KeyRanges(export=identity, settings=settings, started_at=started_at, ranges=ranges)


# -- splitting ----------------------------------------------------------------------------------


#: What following a later range costs range 0's process, as a share of the CPU (server and
#: client) that exporting that range costs. Range 0's process decompresses (follows) every later
#: range once its own is done (:mod:`copystream.join`), so it gets less to export. Decompressing
#: alone is ~0.1 (~1-2 s of CPU for the 1.04 GB of CSV, 320 MB of zstd, of the 5M-row bench
#: table, whose export takes ~20-25 s), but the following thread gets only part of a core beside
#: the later range's export (its backend, read loop and zstd threads), and can decompress only
#: what is committed: with 0.1 (range 0: 47.4% of the rows) it ended 0.4-0.9 s after range 1
#: (4 runs), with 0.2 (44.4%) 0.2-0.4 s after (3 runs), while range 1 still ended 2.1-2.8 s after
#: range 0, so both cores stayed busy (docs/benchmarks.md, issue 13).
FOLLOW_COST = 0.2


def first_share(parts: int, cost: float = FOLLOW_COST) -> float:
    """The share of the rows that range 0 of ``parts`` gets when its process also decompresses
    the later ranges, each later range getting an equal share of the rest: so that range 0's
    export and its following of range 1 (``cost`` of range 1's export, :data:`FOLLOW_COST`) end
    when range 1's export does. Pure.

    Only range 1 can be followed while it runs: range 2 is followed once range 1 is done, so
    with more ranges their following comes after the ranges whatever the shares, and a smaller
    range 0 would only make every other range longer. With ``s`` range 0's share and ``t = (1 -
    s) / (parts - 1)`` each other's: ``s + cost * t = t``, so ``s = (1 - cost) / (parts -
    cost)``; for 2 ranges and a cost of 0.2, ``s = 0.8 / 1.8 = 0.444``, for 4, ``0.8 / 3.8 =
    0.211`` (the others 0.263 each, against 0.25 with an even split)."""
    if parts <= 1:
        return 1.0
    return (1 - cost) / (parts - cost)


def pick_boundaries(sample: Sequence[Key], parts: int, first: float | None = None) -> list[Key]:
    """Up to ``parts - 1`` boundaries at quantiles of an ordered sample. Pure.

    ``sample`` must be in key order (PostgreSQL sorted it). Range ``i`` ends (inclusively) at the
    last key of the ``i``-th of ``parts`` equal slices of the sample, so the ranges get equal
    shares of it (to within one key); with ``first``, range 0 gets that share of the sample
    (:func:`first_share`) and the others equal shares of the rest. Repeated keys give one
    boundary.
    """
    if parts <= 1 or not sample:
        return []
    out: list[Key] = []
    n = len(sample)
    for i in range(1, parts):
        if first is None:
            j = (i * n) // parts - 1  # the last key of slice i (fewer keys than parts: < 0)
        else:
            j = int(n * (first + (1 - first) * (i - 1) / (parts - 1))) - 1
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
    conn: psycopg.Connection[Any],
    plan: ResolvedTable,
    parts: int,
    *,
    snapshot: str | None = None,
    after: Key | None = None,
    first: float | None = None,
) -> list[Key]:
    """Boundaries splitting ``plan``'s rows (those after the key ``after``, if given) into
    ``parts`` ranges of about equal row counts (``first``: range 0's share of them, see
    :func:`pick_boundaries`).

    The rows after ``after`` (an increment's) may be too few for the sampled blocks to show:
    then their keys are read whole (too few to cost much), so they split all the same."""
    if parts <= 1:
        return []
    sample, sampled = _sample(conn, plan, parts, snapshot, after, whole=False)
    if sampled and after is not None and len(sample) < parts * 10:
        sample, _ = _sample(conn, plan, parts, snapshot, after, whole=True)
    bounds = pick_boundaries(sample, parts, first)
    log.info(
        "%s: split into %d ranges from %s sampled keys%s",
        plan.qualified,
        len(bounds) + 1,
        f"{len(sample):,}",
        "" if first is None else f" (the first gets {first:.1%} of the rows: it follows the rest)",
    )
    return bounds


def _sample(
    conn: psycopg.Connection[Any],
    plan: ResolvedTable,
    parts: int,
    snapshot: str | None,
    after: Key | None,
    *,
    whole: bool,
) -> tuple[list[Key], bool]:
    """Evenly spaced keys of a sample of ``plan``'s rows after ``after`` (``whole``: of every
    such row), in key order, and whether they were sampled (not read whole)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot is not None:
            try:
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            except snapshot_gone_errors(conn.info.server_version) as e:
                # the session holding it died: a lost connection, not a bad request
                raise SnapshotGone(str(e)) from e
        for name, value in key_text_settings(plan.key_types).items():  # exact key text
            conn.execute("SELECT set_config(%s, %s, true)", [name, value])
        sampling: sql.Composable = sql.SQL("")
        blocks = _heap_blocks(conn, plan) if plan.relkind in ("r", "m", "p") and not whole else 0
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
            where=where_clause(plan, after),
            most=sql.Literal(min(SAMPLE_ROWS, parts * 100)),  # 1% of a range: plenty
        )
        rows = conn.execute(query).fetchall()
    return [tuple(str(v) for v in r) for r in rows], bool(blocks > 2 * SAMPLE_BLOCKS)


# -- running ------------------------------------------------------------------------------------


def range_job(
    output: Path, parts: KeyRanges, template: PartJob, i: int, *, check: bool = True
) -> PartJob:
    """The job of range ``i`` of ``parts``, checked against what is on disk (unless not
    ``check``: it was, by the caller): the one way a range's job is made, for ``workers`` and
    for :func:`copystream.run_shard` alike.

    ``template`` is the whole-range job; the range's job has its own path, checkpoint and key
    range (``ranged``: the range is part of its identity). A part file created but never
    checkpointed is removed; a damaged, foreign or edited part is refused before it runs.
    """
    lo, hi = parts.ranges[i]
    state = part_path(output, i)
    dataset = parts.export.get("parquet") is not None  # each range writes its own part files
    path = output if dataset else part_data_path(output, i, first_in_place=parts.first_in_place)
    job = replace(
        template, path=str(path), state=str(state), lower=lo, upper=hi, first=i == 0, ranged=True,
        part_stem=f"{parts.stem}{i:04d}-" if dataset else template.part_stem,
    )  # fmt: skip
    if check:
        _check_range(output, job, dataset=dataset)
    return job


def _check_range(output: Path, job: PartJob, *, dataset: bool) -> None:
    """Refuse a range whose files are not what its checkpoint says (see :func:`range_job`)."""
    path, state = Path(job.path), Path(str(job.state))
    if not dataset and os.path.lexists(path) and not checkpoint_path(state).exists():
        if path == output:  # never removed here: it may be a finished export of its own
            raise OutputExists(
                f"{output} exists but the first range of the unfinished --workers export "
                f"recorded in {parts_path(output).name} has no checkpoint",
                remedy=Remedy.RESTART,
            )
        path.unlink()  # created but never checkpointed: nothing in it counts
    cp = load_checkpoint(state)  # damaged or foreign: refused before any worker starts
    if cp is not None:
        cp.check_same_export(job.identity, state)
        # so is an edited part (its worker checks again, from the page cache)
        check_at_checkpoint(path, cp, recorded_in=checkpoint_path(state))


def run_range(
    output: Path,
    parts: KeyRanges,
    template: PartJob,
    i: int,
    checked: bool = False,
    *,
    progress: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    finished: Callable[[Destination], None] | None = None,
) -> PartOutcome:
    """Run range ``i`` of ``parts`` (its job is :func:`range_job`'s) under the range's own
    lock: the one entry point of a range, whether a ``workers`` pool runs it or
    :func:`copystream.run_shard` does. ``checked``: the caller checked its files already (a
    pool's coordinator checks every range before any worker starts). ``finished``: as for
    :func:`~copystream.part.run_part`.

    The lock (``OUTPUT.part-NNNN.lock``) keeps two processes (two retries of one shard that
    overlap, a shard and a ``workers`` run) from writing one range at once: the second is
    refused (:class:`UsageError`) before it touches the range's files.
    """
    from .part import run_part

    state = part_path(output, i)
    busy = f"another copystream process is exporting to {state} right now"
    with locked(part_lock_path(output, i), busy):
        job = range_job(output, parts, template, i, check=not checked)
        return run_part(job, progress=progress, sleep=sleep, finished=finished)


def run_parts(
    output: Path,
    parts: KeyRanges,
    template: PartJob,
    workers: int,
    progress: Callable[[Progress], None] | None,
    first: Callable[..., PartOutcome] = run_range,
) -> list[PartOutcome]:
    """Run every part (finished ones only re-verify) with up to ``workers`` processes; each
    part's job is :func:`range_job`'s. ``first``: range 0's task, called as
    :func:`run_range` is (:func:`copystream.join.follow_after_range` follows the other ranges
    after it)."""
    from .pool import Task

    plan = template.table
    jobs = [range_job(output, parts, template, i) for i in range(len(parts.ranges))]
    calls = [first if i == 0 else run_range for i in range(len(jobs))]
    tasks = [Task(calls[i], (output, parts, template, i, True)) for i in range(len(jobs))]
    return _run_in_pool(jobs, tasks, workers, plan.qualified, plan.estimated_rows, progress)


def _run_in_pool(
    jobs: Sequence[PartJob],
    tasks: Sequence[Task],
    workers: int,
    table: str,
    estimated_rows: int | None,
    progress: Callable[[Progress], None] | None,
    chunks_of: Callable[[int], int] | None = None,
) -> list[PartOutcome]:
    """Run the ranges' ``tasks`` (one per job) in the worker pool; their outcomes in order.
    ``chunks_of(i)``: the chunks range ``i``'s checkpoint records, when it is not a local file.

    A worker that dies (the OOM killer, a stray ``kill -9``) is started again from its range's
    checkpoint as :class:`_Restarts` decides. If a range fails for good, the others still run
    to their end; then the first failure is raised (every checkpoint is intact).
    """
    from .pool import run_tasks

    latest: dict[int, Progress] = {}  # of each range
    started = time.monotonic()
    results: dict[int, PartOutcome] = {}
    failures: dict[int, BaseException] = {}
    restarts = _Restarts(jobs, table, chunks_of)
    for event in run_tasks(tasks, min(workers, len(jobs)), tick=1.0, restart=restarts):
        if event.kind == "progress":
            latest[event.index] = event.value
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(_summed(table, estimated_rows, elapsed, latest.values()))
        elif event.kind == "log":
            log.log(*event.value)
        elif event.kind == "done":
            results[event.index] = restarts.settled(event.index, event.value)
        elif event.kind == "failed":
            failures[event.index] = restarts.error(event.index, event.value)
    if failures:
        raise failures[min(failures)]
    return [results[i] for i in range(len(jobs))]


def _summed(
    table: str, estimated_rows: int | None, elapsed: float, ranges: Iterable[Progress]
) -> Progress:
    """The progress of the whole export from the latest of each range's. Pure."""
    ranges = list(ranges)
    retries: dict[str, int] = {}
    for p in ranges:
        for reason, count in p.retries:
            retries[reason] = retries.get(reason, 0) + count
    return Progress(
        table, sum(p.rows for p in ranges), sum(p.bytes for p in ranges), estimated_rows,
        elapsed, sum(p.chunks for p in ranges), retries=tuple(retries.items()),
        outage_seconds=sum(p.outage_seconds for p in ranges),
    )  # fmt: skip


def _died(e: BaseException) -> Failure:
    """A dead worker is worth a retry, counted (an OOM kill may well come again)."""
    return Failure(e.problem if isinstance(e, CopystreamError) else str(e))


class _Restarts:
    """Whether to start a range's dead worker again: the pool's ``restart`` decision.

    A dead worker counts against the export's retry policy like a failed chunk (``retries``
    in a row; the count starts again once the range has committed a chunk since its worker
    last started), and waits the policy's backoff. The new worker resumes from the range's
    checkpoint, as a re-run would.
    """

    def __init__(
        self, jobs: Sequence[PartJob], table: str, chunks_of: Callable[[int], int] | None = None
    ) -> None:
        self.jobs = jobs
        self.table = table
        self._chunks = chunks_of or self._local_chunks
        self.retriers = [Retrier(job.run.policy, classifier=_died) for job in jobs]
        self.chunks = [max(0, self._chunks(i)) for i in range(len(jobs))]
        self.resumed = [self._chunks(i) >= 0 for i in range(len(jobs))]  # before this run
        self.gave_up: dict[int, str] = {}

    def _local_chunks(self, i: int) -> int:
        """Chunks the checkpoint of range ``i`` records now (-1: it has none)."""
        state = self.jobs[i].state
        try:
            cp = load_checkpoint(Path(state)) if state is not None else None
        except CopystreamError:
            return 0
        return len(cp.chunks) if cp is not None else -1

    def __call__(self, i: int, error: ExportFailed) -> float | None:
        retrier = self.retriers[i]
        chunks = self._chunks(i)
        if chunks > self.chunks[i]:  # it got somewhere since it started: a new streak
            retrier.succeeded()
            self.chunks[i] = chunks
        d = retrier.failed(error)
        doing = f"range {i + 1} of {len(self.jobs)} of {self.table}"
        if not d.retry:
            self.gave_up[i] = f"{doing} stopped: {d.reason}"
            return None
        then = f"; its new worker resumes from the checkpoint ({chunks:,} chunks)"
        retrier.announce(d, doing, then=then)
        return d.delay

    def settled(self, i: int, outcome: PartOutcome) -> PartOutcome:
        """The outcome of range ``i`` with its restarts counted as retries. A restarted worker
        resumed the range within this run (from the same snapshot, if any): the range counts
        as resumed only if it was before this run began."""
        restarts = self.retriers[i].retries
        if not restarts:
            return outcome
        return replace(outcome, retries=outcome.retries + restarts, resumed=self.resumed[i])

    def error(self, i: int, error: BaseException) -> BaseException:
        """The error range ``i`` fails with: the worker's own, or the verdict on its deaths."""
        if i in self.gave_up:
            return RetriesExhausted(self.gave_up[i])
        return error
