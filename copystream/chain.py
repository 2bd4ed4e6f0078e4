""":func:`verify_chain`: a chain of incremental exports, each file intact and each following the
one before it without a gap or an overlap (the decisions are :mod:`copystream.incremental`'s)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import UsageError, VerificationFailed
from .incremental import chain_problem, since_manifest
from .manifest import Manifest, VerifyResult, load_manifest, verify_file
from .s3url import is_s3

__all__ = ["ChainResult", "verify_chain"]


@dataclass(frozen=True)
class ChainResult:
    """The outcome of a successful :func:`verify_chain`: each file's :class:`VerifyResult`,
    oldest first."""

    files: tuple[VerifyResult, ...]

    @property
    def rows(self) -> int:
        """Rows in the whole chain."""
        return sum(f.rows for f in self.files)


def verify_chain(
    paths: Sequence[str | os.PathLike[str]], *, deep: bool = False
) -> ChainResult:
    """Verify each export of a chain of increments, oldest first, and that each one follows
    the one before it: its manifest names that export (by digest) as its predecessor and its
    rows begin right after that export's last key.

    ``paths`` are manifests (``OUTPUT.manifest.json``) or outputs (``s3://`` objects too).
    Raises
    :class:`VerificationFailed` for a file that differs from its manifest, a gap or an overlap
    between two files, or a file missing from the middle (its successor follows another
    export); :class:`UsageError` when a manifest or a file is missing.

    Example::

        >>> copystream.verify_chain(["d1.csv", "d2.csv", "d3.csv"]).rows
        3000
    """
    if not paths:
        raise UsageError("no export to verify")
    chain: list[tuple[str, Manifest]] = []
    results = []
    for p in paths:
        if is_s3(p):  # an S3 object (its manifest beside it in the bucket)
            from .s3increment import load_any_manifest

            url = str(p).removesuffix(".manifest.json")
            manifest, manifest_file = load_any_manifest(url)
            output: str | Path = url
        else:
            manifest_path, output = since_manifest(os.fspath(p))
            manifest, manifest_file = load_manifest(output), str(manifest_path)
        if manifest is None:
            raise UsageError(f"{manifest_file} does not exist: nothing to verify against")
        results.append(verify_file(output, deep=deep))
        chain.append((PurePosixPath(str(output)).name, manifest))
    problem = chain_problem(chain)
    if problem is not None:
        raise VerificationFailed(problem)
    return ChainResult(tuple(results))
