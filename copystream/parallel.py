"""Parallel export: split the key space, run one part per range in worker processes, join.

The split uses quantiles of a ``TABLESAMPLE`` of the key, ordered by PostgreSQL itself, so it
balances by row count for any btree-orderable key (text under any collation, uuid, timestamps,
composite keys), not only integers. Each range is a :class:`~copystream.runner.PartJob` with its
own connection, part file (``OUTPUT.part-NNNN``) and checkpoint; the ranges are recorded in
``OUTPUT.parts.json`` so that re-running the same command resumes every unfinished range. When all
parts are done they are joined in key order into OUTPUT with ``copy_file_range`` (no Python copy
loop), the joined file is re-hashed chunk by chunk against the parts' records, and the manifest
has the same form as a single-worker export's, with chunk offsets in the final file.

Workers are processes, not threads (the GIL would serialise the read loops), started with the
``spawn`` method, and on Linux they are killed if the coordinating process dies, so that a
re-run never races an orphaned worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue as queue_mod
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import xxhash
from psycopg import sql

from ._atomic import atomic_write, fsync_dir
from .checkpoint import Checkpoint, ChunkRecord, canonical_digest, checkpoint_path
from .chunk import key_text_settings
from .errors import CheckpointMismatch, CopystreamError, ExportFailed
from .plan import TablePlan, key_columns, key_text, where_clause
from .progress import Progress
from .runner import PartJob, PartOutcome, run_part
from .sink import hash_range

__all__ = [
    "PartsPlan",
    "join_parts",
    "load_parts",
    "new_parts",
    "part_path",
    "pick_boundaries",
    "remove_parts",
    "run_parts",
    "sample_boundaries",
    "save_parts",
]

log = logging.getLogger("copystream")

PARTS_VERSION = 1
#: Sampled keys used to place the boundaries: ±1% balance needs a few thousand per range.
SAMPLE_ROWS = 30_000

Key = tuple[str, ...]


@dataclass(frozen=True)
class PartsPlan:
    """The ranges of a parallel export (``OUTPUT.parts.json``)."""

    export: dict[str, Any]
    settings: dict[str, str]
    started_at: str
    ranges: tuple[tuple[Key | None, Key | None], ...]

    def check_same_export(self, identity: dict[str, Any], output: Path) -> None:
        """Raise :class:`CheckpointMismatch` unless this plan is for ``identity``."""
        for name in ("table", "key", "columns", "where", "options"):
            if self.export.get(name) != identity.get(name):
                raise CheckpointMismatch(
                    f"{parts_path(output)} was made for another export ({name} differs); "
                    "pass --restart to discard it and start from zero"
                )

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form with a self-digest."""
        body: dict[str, Any] = {
            "version": PARTS_VERSION,
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
    def from_json(cls, d: dict[str, Any]) -> PartsPlan:
        """Inverse of :meth:`to_json`; ``ValueError`` on a damaged record."""
        if d.get("kind") != "copystream-parts" or d.get("version") != PARTS_VERSION:
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
        )


def parts_path(output: Path) -> Path:
    """Where the parts plan of ``output`` lives."""
    return output.with_name(output.name + ".parts.json")


def part_path(output: Path, index: int) -> Path:
    """The file of part ``index``."""
    return output.with_name(f"{output.name}.part-{index:04d}")


def load_parts(output: Path, *, strict: bool = True) -> PartsPlan | None:
    """The parts plan beside ``output``, or ``None``; a damaged one raises unless not strict."""
    path = parts_path(output)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return PartsPlan.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError) as e:
        if not strict:
            return None
        raise CheckpointMismatch(
            f"{path} cannot be used: {e}; pass --restart to discard it and start from zero"
        ) from e


def save_parts(output: Path, parts: PartsPlan) -> None:
    """Write the parts plan atomically (0600)."""
    atomic_write(parts_path(output), json.dumps(parts.to_json(), indent=1).encode() + b"\n")


def remove_parts(output: Path, parts: PartsPlan) -> None:
    """Delete the part files, their checkpoints and the plan (after a join, or ``--restart``)."""
    for i in range(len(parts.ranges)):
        for p in (part_path(output, i), checkpoint_path(part_path(output, i))):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    with contextlib.suppress(FileNotFoundError):
        parts_path(output).unlink()
    fsync_dir(output.parent)


def new_parts(
    identity: dict[str, Any], settings: dict[str, str], started_at: str, boundaries: Sequence[Key]
) -> PartsPlan:
    """The plan for ranges split at ``boundaries`` (ascending). Pure."""
    edges: list[Key | None] = [None, *boundaries, None]
    ranges = tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))
    return PartsPlan(export=identity, settings=settings, started_at=started_at, ranges=ranges)


# -- splitting ----------------------------------------------------------------------------------


def pick_boundaries(sample: Sequence[Key], parts: int) -> list[Key]:
    """Up to ``parts - 1`` boundaries at even quantiles of an ordered sample. Pure.

    ``sample`` must be in key order (PostgreSQL sorted it). Repeated keys give one boundary.
    """
    if parts <= 1 or not sample:
        return []
    out: list[Key] = []
    for i in range(1, parts):
        k = sample[min(len(sample) - 1, (i * len(sample)) // parts)]
        if not out or out[-1] != k:
            out.append(k)
    if out and out[-1] == sample[-1] and len(out) > 1:
        out.pop()  # a boundary at the very end would leave an empty last range
    return out


def sample_boundaries(
    conn: psycopg.Connection[Any], plan: TablePlan, parts: int, *, snapshot: str | None = None
) -> list[Key]:
    """Boundaries splitting ``plan``'s rows into ``parts`` ranges of about equal row counts."""
    if parts <= 1:
        return []
    est = plan.estimated_rows or (plan.estimated_bytes or 0) // 100
    sampling: sql.Composable = sql.SQL("")
    if plan.relkind in ("r", "m", "p") and est > SAMPLE_ROWS:
        pct = max(0.0001, min(100.0, 100.0 * SAMPLE_ROWS / est))
        sampling = sql.SQL(" TABLESAMPLE SYSTEM ({})").format(sql.Literal(round(pct, 6)))
    query = sql.SQL(
        "SELECT {keys} FROM (SELECT {cols} FROM {table}{sampling}{where} ORDER BY {cols}) AS s"
    ).format(
        keys=key_text(plan),
        cols=key_columns(plan),
        table=plan.table_ident,
        sampling=sampling,
        where=where_clause(plan),
    )
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot is not None:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        for name, value in key_text_settings(plan.key_types).items():  # exact key text
            conn.execute("SELECT set_config(%s, %s, true)", [name, value])
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

_progress_queue: Any = None


def _worker_init(progress_queue: Any, level: int, coordinator: int) -> None:
    """Runs in each worker process before its first job."""
    global _progress_queue
    _progress_queue = progress_queue
    if sys.platform.startswith("linux"):  # die with the coordinator: no orphan keeps writing
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != coordinator:  # it died before the line above took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator handles Ctrl-C
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s copystream[{os.getpid()}] %(levelname)s: %(message)s")
    )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _run_in_worker(index: int, job: PartJob) -> PartOutcome:
    last = 0.0

    def report(p: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if _progress_queue is not None and (now - last > 0.25 or p.done):
            last = now
            with contextlib.suppress(Exception):
                _progress_queue.put_nowait((index, p.rows, p.bytes))

    return run_part(job, progress=report)


def run_parts(
    output: Path,
    parts: PartsPlan,
    template: PartJob,
    workers: int,
    progress: Callable[[Progress], None] | None,
) -> list[PartOutcome]:
    """Run every part (finished ones only re-verify) with up to ``workers`` processes.

    ``template`` is the whole-range job; each part replaces its path, identity and range.
    """
    plan = template.plan
    jobs = []
    for i, (lo, hi) in enumerate(parts.ranges):
        path = part_path(output, i)
        if path.exists() and not checkpoint_path(path).exists():
            path.unlink()  # created but never checkpointed: nothing in it counts
        span = [list(lo) if lo else None, list(hi) if hi else None]
        jobs.append(
            replace(
                template,
                path=str(path),
                identity={**parts.export, "range": span},
                lower=lo,
                upper=hi,
                first=i == 0,
            )
        )
    ctx = multiprocessing.get_context("spawn")
    progress_queue = ctx.Queue()
    done_rows = [0] * len(jobs)
    done_bytes = [0] * len(jobs)
    started = time.monotonic()
    results: dict[int, PartOutcome] = {}
    errors: list[BaseException] = []
    with ProcessPoolExecutor(
        max_workers=min(workers, len(jobs)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(progress_queue, log.getEffectiveLevel(), os.getpid()),
    ) as pool:
        futures: dict[Future[PartOutcome], int] = {
            pool.submit(_run_in_worker, i, job): i for i, job in enumerate(jobs)
        }
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for f in finished:
                i = futures[f]
                try:
                    results[i] = f.result()
                    done_rows[i] = results[i].checkpoint.rows
                    done_bytes[i] = results[i].checkpoint.offset
                except BrokenProcessPool as e:
                    errors.append(
                        ExportFailed(
                            "a worker process died; the checkpoints are intact, run the same "
                            "command again to resume"
                        )
                    )
                    errors[-1].__cause__ = e
                except BaseException as e:
                    errors.append(e)
            while True:
                try:
                    i, rows, nbytes = progress_queue.get_nowait()
                except (queue_mod.Empty, OSError, ValueError):
                    break
                done_rows[i], done_bytes[i] = rows, nbytes
            if progress is not None:
                progress(
                    Progress(
                        plan.qualified,
                        sum(done_rows),
                        sum(done_bytes),
                        plan.estimated_rows,
                        time.monotonic() - started,
                        len(results),
                    )
                )
    progress_queue.close()
    if errors:
        first = errors[0]
        if isinstance(first, CopystreamError):
            raise first
        raise ExportFailed(
            f"a worker failed: {first}; the checkpoints are intact, run the same command again "
            "to resume"
        ) from first
    return [results[i] for i in range(len(jobs))]


# -- joining ------------------------------------------------------------------------------------


def _copy_all(src: int, dst: int, count: int) -> None:
    """Copy ``count`` bytes from ``src``'s start to ``dst``'s position, inside the kernel."""
    left = count
    offset = 0
    try:
        while left > 0:
            n = os.copy_file_range(src, dst, left, offset)
            if n == 0:
                break
            left -= n
            offset += n
    except OSError:  # filesystems without copy_file_range support: sendfile is still in-kernel
        while left > 0:
            n = os.sendfile(dst, src, offset, left)
            if n == 0:
                break
            left -= n
            offset += n
    if left:
        raise ExportFailed(f"a part file is shorter than its checkpoint ({left} bytes missing)")


def join_parts(
    output: Path, parts: PartsPlan, outcomes: Sequence[PartOutcome]
) -> tuple[Checkpoint, str]:
    """Concatenate the finished parts into ``output`` and re-hash it against their chunks.

    Returns the combined checkpoint (chunk offsets in the final file) and the file's digest.
    """
    with contextlib.suppress(FileNotFoundError):
        output.unlink()  # only ever a join that was interrupted: the parts plan is still there
    chunks: list[ChunkRecord] = []
    offset = 0
    for o in outcomes:
        for c in o.checkpoint.chunks:
            chunks.append(
                ChunkRecord(len(chunks), offset + c.offset, c.bytes, c.rows, c.xxh3_128, c.last_key)
            )
        offset += o.checkpoint.offset
    fd = os.open(output, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for i, o in enumerate(outcomes):
            src = os.open(part_path(output, i), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_all(src, fd, o.checkpoint.offset)
            finally:
                os.close(src)
        os.fsync(fd)
        whole = xxhash.xxh3_128()
        for c in chunks:
            h = xxhash.xxh3_128()
            hash_range(fd, c.offset, c.bytes, whole, h)
            if h.hexdigest() != c.xxh3_128:
                raise ExportFailed(
                    f"joining the parts of {output} produced wrong bytes in chunk {c.index}; "
                    "run the same command again to retry the join"
                )
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
        xxh3_128=whole.hexdigest(),
        finished=True,
        chunks=tuple(chunks),
    )
    return combined, whole.hexdigest()
