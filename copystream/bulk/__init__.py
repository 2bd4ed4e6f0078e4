"""Bulk migrations: many tables from one TOML plan, run as one resumable job.

A *plan* names tables (``name = "public.orders"``) and patterns (``pattern = "sales.*"``, as
``pg_dump -t``), with export options as defaults and per table. :func:`load_plan` reads and
validates it (pure: every problem of the file is reported at once, with its place);
:func:`run_bulk` resolves the patterns and plans every table on the server in a few catalog
queries for all of them, orders the tables largest first and runs them in ``jobs`` long-lived
worker processes (:mod:`copystream.pool`), each taking the next table when it is free. A small
table is one COPY on the worker's open connection, written atomically
(:mod:`copystream.whole`); any other goes through :func:`copystream.export_table`'s pipeline.
Running the same plan again resumes: finished tables whose manifest still verifies are skipped
without connecting for them, unfinished ones resume from their checkpoints, failed ones are tried
again. With ``consistent``, the whole job reads one snapshot, as ``pg_dump`` does. The job's
report, ``copystream-report.json`` in the output directory, is rewritten atomically as tables
finish. The output directory may be an S3 prefix, ``s3://bucket/prefix`` (:mod:`.s3`).

A worker that dies (the OOM killer, a crash) fails only the table it was running; workers are
killed if the coordinating process dies (``PR_SET_PDEATHSIG``, as in :mod:`copystream.pool`),
so a re-run never races an orphan.
"""

from __future__ import annotations

from .display import BulkBarReporter, BulkLogReporter, format_dry_run, format_summary_table
from .names import NamePattern, parse_name_pattern
from .outcome import BulkProgress, BulkResult, JobSnapshot, TableOutcome
from .plan import REPORT_NAME, BulkPlan, PlanEntry, PlanError, default_output, load_plan, parse_plan
from .resolve import Relation, match_pattern, order_largest_first, resolve, share_workers
from .run import run_bulk
from .shards import BulkShardPlan, BulkShardResult, plan_bulk_shards

__all__ = [
    "REPORT_NAME",
    "BulkBarReporter",
    "BulkLogReporter",
    "BulkPlan",
    "BulkProgress",
    "BulkResult",
    "BulkShardPlan",
    "BulkShardResult",
    "JobSnapshot",
    "NamePattern",
    "PlanEntry",
    "PlanError",
    "Relation",
    "TableOutcome",
    "default_output",
    "format_dry_run",
    "format_summary_table",
    "load_plan",
    "match_pattern",
    "order_largest_first",
    "parse_name_pattern",
    "parse_plan",
    "plan_bulk_shards",
    "resolve",
    "run_bulk",
    "share_workers",
]
