"""copystream: resumable, verifiable, constant-memory export of PostgreSQL tables through COPY.

The library is the product; the ``copystream`` command is a thin layer over it::

    import copystream

    result = copystream.export_table("host=db dbname=shop", "public.orders", "orders.csv")
    print(result.rows, result.xxh3_128)
    copystream.verify_file("orders.csv")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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
    SnapshotRequired,
    TableNotFound,
    UsageError,
    VerificationFailed,
)
from .export import ExportResult, ExportStatus, export_status, export_table, run_export
from .manifest import Manifest, VerifyResult, load_manifest, verify_file
from .progress import BarReporter, LogReporter, Progress
from .retry import RetryPolicy
from .spec import Compression, CopyOptions, ExportSpec, RunOptions

if TYPE_CHECKING:
    from .bulk import (
        BulkBarReporter,
        BulkLogReporter,
        BulkPlan,
        BulkProgress,
        BulkResult,
        BulkShardPlan,
        BulkShardResult,
        JobSnapshot,
        PlanEntry,
        PlanError,
        TableOutcome,
        load_plan,
        plan_bulk_shards,
        run_bulk,
    )
    from .chain import ChainResult, verify_chain
    from .shards import ShardPlan, ShardResult, finish_shards, plan_shards, run_shard

__version__ = "0.1.0"

#: Names imported on first use, by the module that holds them: ``copystream export`` never
#: needs a bulk job's, a shard's or an increment chain's.
_LAZY = {
    **dict.fromkeys(
        [
            "BulkBarReporter",
            "BulkLogReporter",
            "BulkPlan",
            "BulkProgress",
            "BulkResult",
            "BulkShardPlan",
            "BulkShardResult",
            "JobSnapshot",
            "PlanEntry",
            "PlanError",
            "TableOutcome",
            "load_plan",
            "plan_bulk_shards",
            "run_bulk",
        ],
        "bulk",
    ),
    **dict.fromkeys(
        ["ShardPlan", "ShardResult", "finish_shards", "plan_shards", "run_shard"], "shards"
    ),
    **dict.fromkeys(["ChainResult", "verify_chain"], "chain"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AuthenticationFailed",
    "BarReporter",
    "BulkBarReporter",
    "BulkLogReporter",
    "BulkPlan",
    "BulkProgress",
    "BulkResult",
    "BulkShardPlan",
    "BulkShardResult",
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
    "JobSnapshot",
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
    "ShardPlan",
    "ShardResult",
    "SnapshotRequired",
    "TableNotFound",
    "TableOutcome",
    "UsageError",
    "VerificationFailed",
    "VerifyResult",
    "__version__",
    "export_status",
    "export_table",
    "finish_shards",
    "load_manifest",
    "load_plan",
    "plan_bulk_shards",
    "plan_shards",
    "run_bulk",
    "run_export",
    "run_shard",
    "verify_chain",
    "verify_file",
]
