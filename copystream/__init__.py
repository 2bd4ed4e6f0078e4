"""copystream: resumable, verifiable, constant-memory export of PostgreSQL tables through COPY.

The library is the product; the ``copystream`` command is a thin layer over it::

    import copystream

    result = copystream.export_table("host=db dbname=shop", "public.orders", "orders.csv")
    print(result.rows, result.xxh3_128)
    copystream.verify_file("orders.csv")
"""

from __future__ import annotations

from .bulk import (
    BulkBarReporter,
    BulkLogReporter,
    BulkPlan,
    BulkProgress,
    BulkResult,
    PlanEntry,
    PlanError,
    TableOutcome,
    load_plan,
    run_bulk,
)
from .chain import ChainResult, verify_chain
from .errors import (
    AuthenticationFailed,
    CheckpointMismatch,
    ConnectionFailed,
    CopystreamError,
    DiskFull,
    ExportFailed,
    InvalidFilter,
    KeyProblem,
    OutputExists,
    OutputProblem,
    PrefixMismatch,
    Remedy,
    RetriesExhausted,
    TableNotFound,
    UsageError,
    VerificationFailed,
)
from .export import ExportResult, ExportStatus, export_status, export_table, run_export
from .manifest import Manifest, VerifyResult, load_manifest, verify_file
from .progress import BarReporter, LogReporter, Progress
from .retry import RetryPolicy
from .spec import Compression, CopyOptions, ExportSpec, RunOptions

__version__ = "0.1.0"

__all__ = [
    "AuthenticationFailed",
    "BarReporter",
    "BulkBarReporter",
    "BulkLogReporter",
    "BulkPlan",
    "BulkProgress",
    "BulkResult",
    "ChainResult",
    "CheckpointMismatch",
    "Compression",
    "ConnectionFailed",
    "CopyOptions",
    "CopystreamError",
    "DiskFull",
    "ExportFailed",
    "ExportResult",
    "ExportSpec",
    "ExportStatus",
    "InvalidFilter",
    "KeyProblem",
    "LogReporter",
    "Manifest",
    "OutputExists",
    "OutputProblem",
    "PlanEntry",
    "PlanError",
    "PrefixMismatch",
    "Progress",
    "Remedy",
    "RetriesExhausted",
    "RetryPolicy",
    "RunOptions",
    "TableNotFound",
    "TableOutcome",
    "UsageError",
    "VerificationFailed",
    "VerifyResult",
    "__version__",
    "export_status",
    "export_table",
    "load_manifest",
    "load_plan",
    "run_bulk",
    "run_export",
    "verify_chain",
    "verify_file",
]
