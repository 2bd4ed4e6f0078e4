"""How many rows each chunk of an adaptive export holds. Pure: no I/O.

The first chunk is sized from the planner's estimates (a small table is one COPY); every next one
is steered from how long the last one took, towards :data:`TARGET_CHUNK_SECONDS`, and an attempt
that failed is tried again with half the rows (a chunk that cannot finish between two failures
— backends terminated every second — gets small enough to, then grows back). A separate
module because these rules are tuning, not planning: they change for speed, never for
correctness (every chunk size pages the table exactly once).
"""

from __future__ import annotations

__all__ = [
    "AFTER_FAILED_COPY_ROWS",
    "FIRST_CHUNK_BYTES",
    "MANY_CHUNKS",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "SMALL_TABLE_BYTES",
    "TARGET_CHUNK_SECONDS",
    "first_chunk_rows",
    "many_chunks_warning",
    "next_chunk_rows",
]

#: Bounds of an adaptive chunk. Below ~1,000 rows the per-chunk round trips (BEGIN, bound query,
#: COPY, COMMIT, fsync, checkpoint) start to show; above ~2,000,000 a resume redoes too much.
MIN_CHUNK_ROWS = 1_000
MAX_CHUNK_ROWS = 2_000_000
#: Target duration of one chunk: per-chunk overhead (a few ms) stays well under 2%, and a
#: crash costs at most a couple of seconds of redone work.
TARGET_CHUNK_SECONDS = 2.0
#: Size of the first chunk when only the planner's estimate is known.
FIRST_CHUNK_BYTES = 32 * 1024 * 1024
#: A table estimated below this is exported in a single chunk (one COPY).
SMALL_TABLE_BYTES = 8 * 1024 * 1024


def first_chunk_rows(estimated_rows: int | None, estimated_bytes: int | None) -> int:
    """Rows in the first adaptive chunk, from the planner's row count and table size. Pure.

    A small table (by estimate) gets ``0``: the whole table in a single COPY.
    """
    if estimated_rows is not None and estimated_bytes is not None and estimated_rows > 0:
        if estimated_bytes < SMALL_TABLE_BYTES:
            return 0
        width = max(estimated_bytes / estimated_rows, 1.0)
        return _clamp(int(FIRST_CHUNK_BYTES / width))
    return 100_000


#: Rows of the attempt after a failed single COPY (``0``: the whole range at once): from then on
#: the range goes in chunks, so that the next failure costs less than all of it again.
AFTER_FAILED_COPY_ROWS = 50_000


def next_chunk_rows(current: int, rows: int, seconds: float, *, failed: bool = False) -> int:
    """Rows in the next adaptive chunk. Pure.

    After a success (the last chunk took ``seconds`` for ``rows``): aims at
    :data:`TARGET_CHUNK_SECONDS`, changes by at most 4x per step (one slow chunk does not collapse
    the size), and stays within the bounds. After a ``failed`` attempt at ``current`` rows: half
    of it, down to :data:`MIN_CHUNK_ROWS` (a single COPY becomes :data:`AFTER_FAILED_COPY_ROWS`);
    successes then grow it back towards the target.
    """
    if failed:
        return AFTER_FAILED_COPY_ROWS if current <= 0 else _clamp(current // 2)
    if current <= 0 or rows <= 0 or seconds <= 0:
        return current
    ideal = rows / seconds * TARGET_CHUNK_SECONDS
    return _clamp(int(min(max(ideal, current / 4), current * 4)))


def _clamp(rows: int) -> int:
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))


#: Beyond this many chunks per range, a fixed ``--chunk-rows`` costs noticeably: the checkpoint
#: records every chunk and is rewritten after each one (about 200 bytes per chunk).
MANY_CHUNKS = 10_000


def many_chunks_warning(
    estimated_rows: int | None, chunk_rows: int | None, ranges: int = 1
) -> str | None:
    """A warning when a fixed chunk size would make a very long checkpoint, else ``None``. Pure.

    ``ranges``: the key ranges of a ``--workers`` export (each has its own checkpoint).
    """
    if not chunk_rows or not estimated_rows or ranges < 1:
        return None
    chunks = estimated_rows // (chunk_rows * ranges)
    if chunks <= MANY_CHUNKS:
        return None
    return (
        f"--chunk-rows {chunk_rows:,} makes about {chunks:,} chunks"
        + (" per range" if ranges > 1 else "")
        + "; every checkpoint records all chunks so far, so writing them grows with each chunk: "
        "omit --chunk-rows (chunks adapt to ~2 s each) or give a larger number"
    )
