"""The one exception tree of copystream, and the remedy each error carries as data.

Every error that copystream raises on purpose is a :class:`CopystreamError`. Each carries an
``exit_code`` (what the command line exits with), a ``problem`` (what went wrong, in words that
name no interface) and a :class:`Remedy` (what to do about it). The remedy is worded by whoever
shows the error, in its own terms: the command line says "pass --restart", a bulk plan's report
"delete the output ...", the Python API "pass restart=True" (:meth:`CopystreamError.worded`;
``str(error)`` is the Python wording). Errors caused by a psycopg error are raised ``from`` it,
so the server's diagnostics stay reachable through ``__cause__``. Errors survive pickling with
their class, problem and remedy (they cross from worker processes to the coordinator).

Two families:

* :class:`UsageError` (exit code 2): the request itself is wrong — a missing table, a bad key, an
  output path that cannot be used, a checkpoint made for another export. Running the same command
  again will fail the same way. Nothing is created on disk.
* :class:`ExportFailed` (exit code 1): the export was interrupted by something outside the user's
  request (the server went away, retries ran out, the disk filled). The checkpoint is intact:
  running the same command again resumes.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Audience",
    "AuthenticationFailed",
    "CheckpointMismatch",
    "ConnectionFailed",
    "CopystreamError",
    "DiskFull",
    "ExportFailed",
    "InvalidFilter",
    "KeyProblem",
    "Opt",
    "OutputExists",
    "OutputProblem",
    "PrefixMismatch",
    "Remedy",
    "RetriesExhausted",
    "SnapshotRequired",
    "TableNotFound",
    "UsageError",
    "VerificationFailed",
]

#: Who words a remedy: the ``copystream`` command, a bulk plan's report, or Python code.
Audience = Literal["cli", "plan", "python"]


class Remedy(enum.Enum):
    """What the user should do about an error. Data: each interface words it (:meth:`words`)."""

    RESTART = "restart"  # discard the checkpoint and output, export again from zero
    OVERWRITE = "overwrite"  # an output exists without a checkpoint: restart or force
    CHOOSE_KEY = "choose_key"  # page by other columns
    FIX_FILTER = "fix_filter"  # the filter is at fault
    FREE_SPACE = "free_space"  # the client's disk is full: free space, then resume
    RUN_AGAIN = "run_again"  # transient trouble: the same request again resumes
    CHECK_S3 = "check_s3"  # the bucket, the AWS credentials or their permissions are at fault
    FULL_EXPORT = "full_export"  # an incremental export has no complete export to continue
    SAME_EXPORT = "same_export"  # an increment must be the export it continues, but for rows
    ONE_SNAPSHOT = "one_snapshot"  # a job's earlier tables came from a snapshot that is gone
    OUT_OF_RANGE = "out_of_range"  # a value Parquet cannot store: choose what to write instead
    LOOSE_TYPES = "loose_types"  # a type Parquet has none of: allow it as text, or leave it out
    NUMERIC_SCALE = "numeric_scale"  # an unbounded numeric the chosen scale cannot hold exactly

    def words(self, audience: Audience = "python") -> str:
        """This remedy as ``audience`` says it."""
        return _WORDS[self][audience]


_WORDS: dict[Remedy, dict[Audience, str]] = {
    Remedy.RESTART: {
        "cli": "pass --restart to discard it and start from zero",
        "plan": "delete the output and the files beside it to start from zero",
        "python": "pass restart=True to discard it and start from zero",
    },
    Remedy.OVERWRITE: {
        "cli": "pass --restart or --force to overwrite it",
        "plan": "delete it to export the table again",
        "python": "pass restart=True or force=True to overwrite it",
    },
    Remedy.CHOOSE_KEY: {
        "cli": "name the column(s) to page by with --key",
        "plan": "name the column(s) to page by with key = in the plan",
        "python": "name the column(s) to page by with key=",
    },
    Remedy.FIX_FILTER: {
        "cli": "check the --where filter",
        "plan": "check the where filter of the plan",
        "python": "check the where= filter",
    },
    Remedy.FREE_SPACE: {
        "cli": "free some space and run the same command again to resume",
        "plan": "free some space and run the plan again to resume",
        "python": "free some space and call again with the same arguments to resume",
    },
    Remedy.ONE_SNAPSHOT: {
        "cli": "delete their outputs and the files beside them to export every table again "
        "under one snapshot, or leave out --require-snapshot to finish the job without one",
        "plan": "delete their outputs and the files beside them to export every table again "
        "under one snapshot",
        "python": "delete their outputs and the files beside them to export every table again "
        "under one snapshot, or pass require_snapshot=False to finish the job without one",
    },
    Remedy.RUN_AGAIN: {
        "cli": "the checkpoint is intact, run the same command again to resume",
        "plan": "the checkpoint is intact, run the plan again to resume",
        "python": "the checkpoint is intact, call again with the same arguments to resume",
    },
    Remedy.CHECK_S3: {
        "cli": "check the bucket of OUTPUT, the AWS credentials (AWS_PROFILE, "
        "AWS_ACCESS_KEY_ID) and what they may do",
        "plan": "check the bucket name of output_dir, the AWS credentials (AWS_PROFILE, "
        "AWS_ACCESS_KEY_ID) and what they may do",
        "python": "check the bucket of output, the AWS credentials (AWS_PROFILE, "
        "AWS_ACCESS_KEY_ID) and what they may do",
    },
    Remedy.FULL_EXPORT: {
        "cli": "export it in full first (the same command without --incremental)",
        "plan": "export it in full first (delete the output and run the plan again)",
        "python": "export it in full first (the same call without incremental=True)",
    },
    Remedy.SAME_EXPORT: {
        "cli": "give the table, --key, --columns, --where and COPY options of the export it "
        "continues",
        "plan": "give the key, columns, where and COPY options of the export it continues",
        "python": "give the key=, columns=, where= and COPY options of the export it continues",
    },
    Remedy.OUT_OF_RANGE: {
        "cli": "pass --out-of-range null or --out-of-range clamp to write such values as NULL "
        "or as the nearest value Parquet holds",
        "plan": 'set out_of_range = "null" or "clamp" to write such values as NULL or as the '
        "nearest value Parquet holds",
        "python": 'pass out_of_range="null" or "clamp" to write such values as NULL or as the '
        "nearest value Parquet holds",
    },
    Remedy.NUMERIC_SCALE: {
        "cli": "pass another --numeric-scale, or leave it out to write such columns as text",
        "plan": "set another numeric_scale, or leave it out to write such columns as text",
        "python": "pass another numeric_scale=, or leave it out to write such columns as text",
    },
    Remedy.LOOSE_TYPES: {
        "cli": "leave out --strict-types to write it as text, or the column with --columns",
        "plan": "leave out strict_types to write it as text, or the column with columns =",
        "python": "leave out strict_types=True to write it as text, or the column with columns=",
    },
}

@dataclass(frozen=True)
class Opt:
    """An export option named inside a problem: ``--where`` on the command line, ``where`` in
    a bulk plan and in Python. A problem is text and :class:`Opt` parts, never text to rewrite."""

    name: str

    def words(self, audience: Audience) -> str:
        """The option as ``audience`` names it."""
        return "--" + self.name.replace("_", "-") if audience == "cli" else self.name


Problem = str | Sequence[str | Opt]

_CLASS_DEFAULT: Any = object()


class CopystreamError(Exception):
    """Base of every error copystream raises on purpose.

    ``problem`` says what went wrong; ``remedy`` (or ``None``) what to do. ``str(error)`` is a
    single line fit to show a Python user as it is; :meth:`worded` words it for another audience.
    """

    exit_code: int = 1
    #: The remedy when the raiser names none (each class its own).
    remedy: Remedy | None = None

    def __init__(self, problem: Problem, *, remedy: Remedy | None = _CLASS_DEFAULT) -> None:
        parts = (problem,) if isinstance(problem, str) else tuple(problem)
        self.parts: tuple[str | Opt, ...] = parts
        super().__init__(self.problem)
        if remedy is not _CLASS_DEFAULT:
            self.remedy = remedy

    @property
    def problem(self) -> str:
        """What went wrong, as Python code would name its options."""
        return self._problem("python")

    def _problem(self, audience: Audience) -> str:
        return "".join(p if isinstance(p, str) else p.words(audience) for p in self.parts)

    def worded(self, audience: Audience = "python") -> str:
        """The problem and its remedy as one line for ``audience``."""
        if self.remedy is None:
            return self._problem(audience)
        return f"{self._problem(audience)}; {self.remedy.words(audience)}"

    def __str__(self) -> str:
        return self.worded("python")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt with its class, problem, remedy and any attributes a subclass added.
        return (_rebuild, (type(self), self.parts, self.remedy), dict(self.__dict__))


def _rebuild(
    cls: type[CopystreamError], parts: tuple[str | Opt, ...], remedy: Remedy | None
) -> CopystreamError:
    error = cls.__new__(cls)
    error.parts = parts
    Exception.__init__(error, error.problem)
    error.remedy = remedy
    return error


class UsageError(CopystreamError):
    """The request cannot be carried out as given; fix the command and run it again."""

    exit_code = 2


class ConnectionFailed(UsageError):
    """The server could not be reached (wrong host, port or database, or it is down)."""


class AuthenticationFailed(UsageError):
    """The server refused the credentials."""


class TableNotFound(UsageError):
    """The table (or its schema) does not exist or is not visible to the connecting role."""


class KeyProblem(UsageError):
    """No usable key: the table has no primary key, or the chosen key cannot page the table."""

    remedy = Remedy.CHOOSE_KEY


class InvalidFilter(UsageError):
    """The ``where`` filter is not valid SQL for this table."""


class OutputProblem(UsageError):
    """The output path cannot be used (missing directory, not writable, is a directory...)."""


class OutputExists(OutputProblem):
    """The output file exists and there is no checkpoint to resume it from."""

    remedy = Remedy.OVERWRITE


class CheckpointMismatch(UsageError):
    """The checkpoint beside the output was made for a different export."""

    remedy = Remedy.RESTART


class PrefixMismatch(UsageError):
    """The output file no longer matches its checkpoint (edited, truncated or replaced).

    The file is left untouched; nothing can be appended to it safely.
    """

    remedy = Remedy.RESTART


class SnapshotRequired(UsageError):
    """A bulk job that must read one snapshot cannot: tables of it were exported before, under
    a snapshot that ended with the run that held it."""

    remedy = Remedy.ONE_SNAPSHOT


class ExportFailed(CopystreamError):
    """The export stopped before the end; the checkpoint is intact and a re-run resumes."""

    exit_code = 1
    remedy = Remedy.RUN_AGAIN


class RetriesExhausted(ExportFailed):
    """A chunk failed with transient errors more often than the retry policy allows."""


class DiskFull(ExportFailed):
    """Writing the output failed for lack of space (or quota) on the client."""

    remedy = Remedy.FREE_SPACE


class VerificationFailed(CopystreamError):
    """A finished file does not match its manifest."""

    exit_code = 1
