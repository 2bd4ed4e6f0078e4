"""The one exception tree of copystream.

Every error that copystream raises on purpose is a :class:`CopystreamError`. Each carries an
``exit_code`` (what the command line exits with) and a message that tells the user what to do.
Errors caused by a psycopg error are raised ``from`` it, so the server's diagnostics stay
reachable through ``__cause__``.

Two families:

* :class:`UsageError` (exit code 2): the request itself is wrong — a missing table, a bad key, an
  output path that cannot be used, a checkpoint made for another export. Running the same command
  again will fail the same way. Nothing is created on disk.
* :class:`ExportFailed` (exit code 1): the export was interrupted by something outside the user's
  request (the server went away, retries ran out, the disk filled). The checkpoint is intact:
  running the same command again resumes.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "CheckpointMismatch",
    "ConnectionFailed",
    "CopystreamError",
    "DiskFull",
    "ExportFailed",
    "InvalidFilter",
    "KeyProblem",
    "OutputExists",
    "OutputProblem",
    "PrefixMismatch",
    "RetriesExhausted",
    "TableNotFound",
    "UsageError",
    "VerificationFailed",
]


class CopystreamError(Exception):
    """Base of every error copystream raises on purpose.

    ``str(error)`` is a single line fit to show the user as it is.
    """

    exit_code: int = 1


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


class InvalidFilter(UsageError):
    """The ``where`` filter is not valid SQL for this table."""


class OutputProblem(UsageError):
    """The output path cannot be used (missing directory, not writable, is a directory...)."""


class OutputExists(OutputProblem):
    """The output file exists and there is no checkpoint to resume it from."""


class CheckpointMismatch(UsageError):
    """The checkpoint beside the output was made for a different export."""


class PrefixMismatch(UsageError):
    """The output file no longer matches its checkpoint (edited, truncated or replaced).

    The file is left untouched; nothing can be appended to it safely.
    """


class ExportFailed(CopystreamError):
    """The export stopped before the end; the checkpoint is intact and a re-run resumes."""

    exit_code = 1


class RetriesExhausted(ExportFailed):
    """A chunk failed with transient errors more often than the retry policy allows."""


class DiskFull(ExportFailed):
    """Writing the output failed for lack of space (or quota) on the client."""


class VerificationFailed(CopystreamError):
    """A finished file does not match its manifest."""

    exit_code = 1
