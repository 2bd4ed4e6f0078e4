"""Watermark increments in a bulk job: which file each run of the job writes for a table with
``watermark = "column"`` in its plan entry.

The table's output (``public.orders.csv``) holds the first export, in full, paged by
``(watermark, key)``. Once it is complete, every later run of the job writes the next increment
to a file of its own beside it, after the one before (``--since``): ``public.orders.inc-00001.csv``,
``public.orders.inc-00002.csv``... (the number goes before the format's suffix, so a compressed
output keeps its ``.csv.zst``). A run that was interrupted resumes its increment; the next run
after a finished one starts a new one. The files form a chain that ``copystream verify --chain``
checks, oldest first; a loader upserts them by key in that order.

Deciding is pure (:func:`increment_name`, :func:`next_increment`); :func:`watermark_step` reads
one directory listing (of a job writing to S3: its prefix's, listed once for the job).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from pathlib import Path

from ..errors import UsageError
from ..incremental import check_request
from ..manifest import manifest_path
from .resolve import _Task

__all__ = ["INCREMENT", "increment_name", "increment_number", "next_increment", "watermark_step"]

#: What names an increment file: ``<stem>.inc-<n>.<suffix>``.
INCREMENT = ".inc-"

#: A suffix of compression, after the format's (``.csv.zst``).
_COMPRESSED = (".zst", ".gz")

#: Manifest and checkpoint suffixes, beside an output.
_CHECKPOINT = ".checkpoint.json"


def _split(name: str) -> tuple[str, str]:
    """``public.orders.csv.zst`` → (``public.orders``, ``.csv.zst``); no suffix: (name, "")."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return name, ""
    if "." + ext in _COMPRESSED:
        inner, dot2, ext2 = stem.rpartition(".")
        if dot2 and inner and re.fullmatch(r"[A-Za-z0-9]{1,4}", ext2):
            return inner, f".{ext2}.{ext}"
    return stem, "." + ext


def increment_name(base: str, n: int) -> str:
    """The name of increment ``n`` (1, 2...) after the first export to ``base``."""
    stem, suffix = _split(base)
    return f"{stem}{INCREMENT}{n:05d}{suffix}"


def increment_number(base: str, name: str) -> int | None:
    """``n`` when ``name`` is increment ``n`` of ``base`` (else ``None``)."""
    stem, suffix = _split(base)
    m = re.fullmatch(re.escape(stem + INCREMENT) + r"(\d{5,})" + re.escape(suffix), name)
    return int(m.group(1)) if m else None


def next_increment(base_complete: bool, existing: Mapping[int, bool]) -> int:
    """Which file this run writes: 0, the first export (until it is complete), else the
    increment after the last one found. ``existing``: the increments found, each complete or not
    (an unfinished one is resumed)."""
    if not base_complete or not existing:
        return 0 if not base_complete else 1
    last = max(existing)
    return last if not existing[last] else last + 1


def _complete(name: str, names: Collection[str]) -> bool:
    """Whether the files ``names`` hold a finished export to ``name`` (a manifest, no
    checkpoint: whether it still verifies, the increment after it checks)."""
    return manifest_path(Path(name)).name in names and name + _CHECKPOINT not in names


def _listing(directory: Path) -> set[str]:
    try:
        return set(os.listdir(directory))
    except OSError:
        return set()


def watermark_step(task: _Task, listing: Callable[[Path], set[str]] | None = None) -> _Task:
    """``task`` as this run of the job does it: a table without a watermark as it is; with one,
    its first export, or the increment after the last file of its chain (``since``).
    ``listing``: the names in a directory (default: the local one's; a job writing to S3 gives
    its prefix's, :meth:`copystream.bulk.s3.Listing.names`)."""
    spec, run = task.spec, task.entry.run
    if task.error is not None or spec.watermark is None:
        return task
    base = task.output
    try:
        check_request(replace(run, since=str(base)), spec.watermark,
                      parquet=spec.options.format == "parquet")  # fmt: skip
    except UsageError as e:
        return replace(task, error=e.worded("plan"))
    names = (listing or _listing)(base.parent)
    existing = {
        n: _complete(name, names)
        for name in names
        if not name.endswith(".json") and (n := increment_number(base.name, name)) is not None
    }
    for name in names:  # an increment whose output is not there yet: only its checkpoint
        if name.endswith(_CHECKPOINT):
            n = increment_number(base.name, name[: -len(_CHECKPOINT)])
            if n is not None:
                existing.setdefault(n, False)
    n = next_increment(_complete(base.name, names), existing)
    if n == 0:
        return replace(task, entry=replace(task.entry, run=replace(run, incremental=False)))
    previous = base if n == 1 else base.with_name(increment_name(base.name, n - 1))
    since = replace(run, incremental=True, since=str(manifest_path(previous)))
    output = base.with_name(increment_name(base.name, n))
    return replace(task, output=output, entry=replace(task.entry, run=since))
