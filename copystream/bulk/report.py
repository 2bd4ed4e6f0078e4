"""The job report, ``copystream-report.json`` in the output directory: rewritten atomically
as tables finish (at most once a second, and at the end), keeping what is known of tables
not run this time, and which snapshot each finished table was read from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from .._atomic import atomic_write
from ..errors import CopystreamError
from .outcome import _STATUSES, JobSnapshot, TableOutcome, _outcome, _tally
from .plan import BulkPlan
from .resolve import _Task
from .s3 import JobBucket, S3Path, output_text

REPORT_VERSION = 1


class _Report:
    """The job report, rewritten atomically (0600) as tables finish.

    Each table is one line of compact JSON, encoded once when its outcome is set: rewriting the
    report of a thousand tables costs a join, not a thousand encodings. The lines of the tables
    not finished yet are made when the report is first set or written, not before.
    """

    def __init__(
        self,
        plan: BulkPlan,
        tasks: Sequence[_Task],
        selected: Sequence[_Task],
        jobs: int,
        *,
        bucket: JobBucket | None = None,
    ) -> None:
        self.path = plan.report_path
        self.bucket = bucket  # a job writing to S3: the report is an object there
        self.plan = plan
        self.jobs = jobs
        self.started_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        self.before = self._previous()
        self.tasks, self.selected = tasks, selected
        self.rows: dict[int, dict[str, Any]] = {}
        self.lines: dict[int, str] = {}
        chosen = {id(t) for t in selected}
        self.order = [id(t) for t in selected] + [id(t) for t in tasks if id(t) not in chosen]

    def _begin(self) -> None:
        """Make every table's line the first time one is needed: what an earlier run recorded
        of a table not run this time (``--only``), else pending (or not run)."""
        if self.lines:
            return
        chosen = {id(t) for t in self.selected}
        for t in self.tasks:
            old = self.before.get((t.table, str(t.output)))
            if id(t) not in chosen and old is not None:
                self._set(t, old)  # not run this time (--only): keep what is known
            else:
                status = "pending" if id(t) in chosen else "not run"
                self._set(t, _outcome(t, status).to_json())

    def _previous(self) -> dict[tuple[str, str], dict[str, Any]]:
        try:
            doc = json.loads(self._load())
            return {(str(t["table"]), str(t["output"])): dict(t) for t in doc["tables"]}
        except (OSError, CopystreamError, ValueError, KeyError, TypeError):
            return {}

    def _load(self) -> bytes:
        if isinstance(self.path, S3Path) and self.bucket is not None:
            return self.bucket.get(self.path.url.key) or b""
        return self.path.read_bytes()

    def _save(self, data: bytes) -> None:
        if isinstance(self.path, S3Path) and self.bucket is not None:
            self.bucket.put(self.path.url.key, data)  # replaced whole, as a rename would
        else:
            atomic_write(self.path, data)

    def set(self, task: _Task, outcome: TableOutcome) -> None:
        self._begin()
        self._set(task, outcome.to_json())

    def _set(self, task: _Task, row: dict[str, Any]) -> None:
        self.rows[id(task)] = row
        self.lines[id(task)] = json.dumps(row, ensure_ascii=False)

    def earlier_snapshot(self, task: _Task) -> dict[str, str] | None:
        """The job snapshot an earlier run recorded for ``task``'s table, if it finished it."""
        old = self.before.get((task.table, str(task.output)))
        if old is None or old.get("status") not in ("done", "skipped"):
            return None
        snapshot = old.get("snapshot")
        if not isinstance(snapshot, dict) or not {"server", "id", "taken_at"} <= set(snapshot):
            return None
        return {k: str(snapshot[k]) for k in ("server", "id", "taken_at")}

    def write(
        self,
        *,
        finished: bool,
        warnings: Sequence[str],
        seconds: float,
        snapshot: JobSnapshot | None = None,
    ) -> None:
        self._begin()
        tables = [self.rows[i] for i in self.order]
        counts = [(t["status"], int(t["rows"]), int(t["bytes"])) for t in tables]
        totals = _tally(counts, (*_STATUSES, "not run"))
        doc = {
            "version": REPORT_VERSION,
            "kind": "copystream-bulk-report",
            "plan": str(self.plan.path.resolve()),
            "output_dir": output_text(self.plan.output_dir),
            "jobs": self.jobs,
            "started_at": self.started_at,
            "updated_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "finished": finished,
            "seconds": round(seconds, 3),
            "totals": totals,
            "warnings": list(warnings),
            "snapshot": snapshot.to_json() if snapshot is not None else None,
        }
        head = json.dumps(doc, indent=1, ensure_ascii=False)
        assert head.endswith("\n}")
        rows = ",\n  ".join(self.lines[i] for i in self.order)
        text = f'{head[:-2]},\n "tables": [\n  {rows}\n ]\n}}\n'
        # Error strings are redacted as they come; no DSN is ever put in the report.
        self._save(text.encode())
