"""The job report, ``copystream-report.json`` in the output directory: rewritten atomically
as tables finish, keeping what is known of tables not run this time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .._atomic import atomic_write
from .outcome import _STATUSES, TableOutcome, _outcome, _tally
from .plan import BulkPlan
from .resolve import _Task

REPORT_VERSION = 1


class _Report:
    """The job report, rewritten atomically (0600) whenever a table finishes."""

    def __init__(
        self, plan: BulkPlan, tasks: Sequence[_Task], selected: Sequence[_Task], jobs: int
    ) -> None:
        self.path = plan.report_path
        self.plan = plan
        self.jobs = jobs
        self.started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        previous = self._previous()
        chosen = {id(t) for t in selected}
        self.rows: dict[int, dict[str, Any]] = {}
        self.order = [id(t) for t in selected] + [id(t) for t in tasks if id(t) not in chosen]
        for t in tasks:
            old = previous.get((t.table, str(t.output)))
            if id(t) not in chosen and old is not None:
                self.rows[id(t)] = old  # not run this time (--only): keep what is known
            else:
                status = "pending" if id(t) in chosen else "not run"
                self.rows[id(t)] = _outcome(t, status).to_json()

    def _previous(self) -> dict[tuple[str, str], dict[str, Any]]:
        try:
            doc = json.loads(self.path.read_bytes())
            return {(str(t["table"]), str(t["output"])): dict(t) for t in doc["tables"]}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def set(self, task: _Task, outcome: TableOutcome) -> None:
        self.rows[id(task)] = outcome.to_json()

    def write(self, *, finished: bool, warnings: Sequence[str], seconds: float) -> None:
        tables = [self.rows[i] for i in self.order]
        counts = [(t["status"], int(t["rows"]), int(t["bytes"])) for t in tables]
        totals = _tally(counts, (*_STATUSES, "not run"))
        doc = {
            "version": REPORT_VERSION,
            "kind": "copystream-bulk-report",
            "plan": str(self.plan.path.resolve()),
            "output_dir": str(self.plan.output_dir.resolve()),
            "jobs": self.jobs,
            "started_at": self.started_at,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "finished": finished,
            "seconds": round(seconds, 3),
            "totals": totals,
            "warnings": list(warnings),
            "tables": tables,
        }
        # Error strings are redacted as they come; no DSN is ever put in the report.
        atomic_write(self.path, json.dumps(doc, indent=1, ensure_ascii=False).encode() + b"\n")
