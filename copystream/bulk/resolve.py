"""Resolving a plan on its server(s): the catalog read without locks, names looked up,
patterns matched, every table planned in a few catalog queries for all of them
(:func:`copystream.catalog.introspect_many`), ``--only`` applied, the tables ordered largest
first, and a table too large for its share of the job split into key ranges."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg

from ..catalog import introspect_many, missing_table_problem
from ..connection import Target, redact
from ..errors import CopystreamError, UsageError
from ..pipeline import first_connect, retrying, watermarked
from ..spec import ExportSpec, RunOptions
from ..table import ResolvedTable
from .names import NamePattern, parse_name_pattern
from .plan import BulkPlan, PlanEntry, PlanError, _fold_name, default_output


@dataclass(frozen=True)
class Relation:
    """A relation as the catalog lists it: what patterns are matched against."""

    oid: int
    schema: str
    name: str
    qualified: str  # as PostgreSQL quotes it
    relkind: str
    partition: bool  # a partition of a partitioned table (exported through its parent)
    visible: bool  # on the search_path
    system: bool  # pg_catalog, information_schema, toast or temporary schemas
    estimated_rows: int | None
    estimated_bytes: int | None


#: Every exportable relation with its planner estimates, without taking a lock on any of them
#: (pg_relation_size or pg_partition_tree would lock each table: thousands of them could
#: exhaust the lock table, and one under ALTER TABLE would block the job's planning).
_CATALOG_QUERY = """
WITH RECURSIVE tree(root, relid) AS (
    SELECT c.oid, c.oid FROM pg_catalog.pg_class c WHERE c.relkind = 'p'
    UNION ALL
    SELECT t.root, i.inhrelid FROM tree t JOIN pg_catalog.pg_inherits i ON i.inhparent = t.relid
), leaves AS (
    SELECT t.root, sum(GREATEST(l.reltuples, 0))::bigint AS tuples,
           sum(l.relpages)::bigint AS pages
    FROM tree t JOIN pg_catalog.pg_class l ON l.oid = t.relid
    WHERE l.relkind <> 'p'
    GROUP BY t.root
)
SELECT c.oid::bigint, n.nspname, c.relname, format('%I.%I', n.nspname, c.relname),
       c.relkind::text, c.relispartition, pg_catalog.pg_table_is_visible(c.oid),
       n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname LIKE 'pg\\_toast%'
           OR n.nspname LIKE 'pg\\_temp\\_%',
       CASE WHEN c.relkind = 'p' THEN COALESCE(lv.tuples, 0)
            WHEN c.reltuples >= 0 THEN c.reltuples::bigint END,
       CASE WHEN c.relkind = 'p' THEN COALESCE(lv.pages, 0)
            WHEN c.relkind IN ('r', 'm') THEN c.relpages::bigint END
           * current_setting('block_size')::bigint
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN leaves lv ON lv.root = c.oid
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
ORDER BY n.nspname, c.relname
"""


def _fetch_catalog(conn: psycopg.Connection[Any]) -> dict[int, Relation]:
    out: dict[int, Relation] = {}
    for r in conn.execute(_CATALOG_QUERY).fetchall():
        rel = Relation(
            oid=int(r[0]),
            schema=str(r[1]),
            name=str(r[2]),
            qualified=str(r[3]),
            relkind=str(r[4]),
            partition=bool(r[5]),
            visible=bool(r[6]),
            system=bool(r[7]),
            estimated_rows=int(r[8]) if r[8] is not None else None,
            estimated_bytes=int(r[9]) if r[9] is not None else None,
        )
        out[rel.oid] = rel
    return out


def _lookup(conn: psycopg.Connection[Any], name: str) -> int | str:
    """The oid of an explicitly named relation, or why it cannot be found."""
    try:
        row = conn.execute("SELECT to_regclass(%s)::oid::bigint", [name]).fetchone()
    except psycopg.errors.Error as e:
        return f"{name!r} is not a valid table name: {e.diag.message_primary or e}"
    if row is None or row[0] is None:
        return missing_table_problem(conn, name)
    return int(row[0])


@dataclass(frozen=True)
class _Task:
    """One table of the job, resolved: what to export, from where, to where."""

    entry: PlanEntry
    table: str  # qualified as PostgreSQL quotes it; the name as written if unresolved
    schema: str | None
    name: str
    output: Path
    estimated_rows: int | None = None
    estimated_bytes: int | None = None
    error: str | None = None  # the table fails without running (missing table, no server)
    oid: int | None = None
    resolved: ResolvedTable | None = None  # planned by the coordinator (None: by its worker)
    workers: int | None = None  # key ranges the job chose for it (None: the entry's)

    @functools.cached_property
    def spec(self) -> ExportSpec:
        """What is exported of this table, as the plan asks for it (made once: the job asks
        several times per table)."""
        return self.entry.spec_for(self.table)

    def but(self, **changes: Any) -> _Task:
        """This task with ``changes`` (:func:`dataclasses.replace`), keeping its :attr:`spec`
        if it was made already and the changes leave it as it is."""
        task = replace(self, **changes)
        if "spec" in self.__dict__ and not changes.keys() & {"entry", "table"}:
            task.__dict__["spec"] = self.__dict__["spec"]  # (where cached_property keeps it)
        return task

    @property
    def run(self) -> RunOptions:
        """How this table is exported: its entry's options, with the job's choice of workers."""
        run = self.entry.run
        return run if self.workers is None else replace(run, workers=self.workers)


@dataclass(frozen=True)
class _Resolution:
    tasks: tuple[_Task, ...]
    warnings: tuple[str, ...]


def match_pattern(entry: PlanEntry, catalog: Mapping[int, Relation]) -> list[Relation]:
    """The relations ``entry``'s pattern selects, less its excludes, in catalog order. Pure.

    Partitions are left out (their parent exports their rows), and so are system schemas.
    """
    assert entry.pattern is not None
    pattern = parse_name_pattern(entry.pattern)
    excludes = [parse_name_pattern(x) for x in entry.exclude]
    return [
        rel
        for rel in catalog.values()
        if not rel.partition
        and not rel.system
        and pattern.matches(rel.schema, rel.name, visible=rel.visible)
        and not any(x.matches(rel.schema, rel.name, visible=rel.visible) for x in excludes)
    ]


def resolve(
    plan: BulkPlan,
    catalogs: Mapping[str, dict[int, Relation] | str],
    lookups: Mapping[tuple[str, str], int | str],
) -> _Resolution:
    """Turn the plan's entries into tasks, given what the server(s) said. Pure.

    ``catalogs`` maps each DSN (``""``: the libpq environment) to its relations or to the reason
    it could not be read; ``lookups`` maps ``(dsn, name)`` of every explicit name to its oid or
    to why it was not found. Explicit entries win over pattern matches of the same table; of
    two patterns matching one table the first wins. Two explicit entries naming the same table,
    or two tables writing one output, raise :class:`PlanError`.
    """
    r = _Resolver(plan, catalogs, lookups)
    for e in plan.entries:  # explicit names first: they win over patterns
        if e.name is not None:
            r.add_named(e, e.name)
    for e in plan.entries:
        if e.pattern is not None:
            r.add_matched(e, e.pattern)
    r.check_outputs()
    if r.problems:
        raise PlanError(r.problems)
    order = {id(t): i for i, t in enumerate(r.tasks)}
    tasks = sorted(r.tasks, key=lambda t: (t.entry.index, order[id(t)]))
    return _Resolution(tuple(tasks), tuple(r.warnings))


class _Resolver:
    """One :func:`resolve` under way: the tasks so far, the tables they claim, what is wrong."""

    def __init__(
        self,
        plan: BulkPlan,
        catalogs: Mapping[str, dict[int, Relation] | str],
        lookups: Mapping[tuple[str, str], int | str],
    ) -> None:
        self.plan = plan
        self.catalogs = catalogs
        self.lookups = lookups
        self.tasks: list[_Task] = []
        self.warnings: list[str] = []
        self.problems: list[str] = []
        self.claimed: dict[tuple[str, int], PlanEntry] = {}  # (dsn, oid) -> its entry

    def where(self, e: PlanEntry) -> str:
        """``plan:LINE: tables[N]``: the entry's place in messages."""
        source = str(self.plan.path)
        return f"{source}:{e.line}: {e.label}" if e.line is not None else f"{source}: {e.label}"

    def add_named(self, e: PlanEntry, name: str) -> None:
        """The task of an explicit name (failing without running if it cannot be found)."""
        dsn = e.dsn or ""
        catalog = self.catalogs.get(dsn)
        found = self.lookups.get((dsn, name), "not looked up")
        if isinstance(catalog, str) or isinstance(found, str):
            reason = catalog if isinstance(catalog, str) else str(found)
            self.tasks.append(self._unresolved(e, name, reason))
            return
        rel = (catalog or {}).get(found)
        if rel is None:
            reason = f"{name} is not a table, view, materialized view or foreign table"
            self.tasks.append(self._unresolved(e, name, reason))
            return
        other = self.claimed.get((dsn, rel.oid))
        if other is not None:
            self.problems.append(
                f"{self.where(e)}.name: {rel.qualified} is also named in {other.label}"
            )
            return
        self._claim(dsn, e, rel)

    def add_matched(self, e: PlanEntry, pattern: str) -> None:
        """The tasks of the tables a pattern matches that no earlier entry claimed."""
        dsn = e.dsn or ""
        catalog = self.catalogs.get(dsn)
        if isinstance(catalog, str) or catalog is None:
            reason = catalog if isinstance(catalog, str) else "not looked up"
            out = self.plan.output_dir / f"{e.label}.unresolved"
            self.tasks.append(_Task(e, f"{pattern} ({e.label})", None, pattern, out, error=reason))
            return
        matched = match_pattern(e, catalog)
        if not matched:
            self.warnings.append(f"{self.where(e)}: pattern {pattern!r} matches no table")
        for rel in [r for r in matched if (dsn, r.oid) not in self.claimed]:
            self._claim(dsn, e, rel)

    def check_outputs(self) -> None:
        """Record a problem for each task writing the output of an earlier one."""
        outputs: dict[str, _Task] = {}
        for t in self.tasks:
            if t.error is not None:
                continue
            norm = os.path.normpath(t.output)
            other = outputs.get(norm)
            if other is not None:
                self.problems.append(
                    f"{self.where(t.entry)}: {t.table} and {other.table} ({other.entry.label}) "
                    f"would both be written to {t.output}"
                )
            else:
                outputs[norm] = t

    def _claim(self, dsn: str, e: PlanEntry, rel: Relation) -> None:
        self.claimed[(dsn, rel.oid)] = e
        self.tasks.append(_task(self.plan, e, rel))

    def _unresolved(self, e: PlanEntry, name: str, reason: str) -> _Task:
        """The task of a name that cannot be exported: it fails without running."""
        folded = _fold_name(name) or (None, name)
        output = e.output or _unresolved_output(folded, e.spec)
        return _Task(e, name, folded[0], folded[1], self.plan.output_dir / output, error=reason)


def _unresolved_output(folded: tuple[str | None, str], spec: ExportSpec) -> str:
    """The output named in the report for a table that could not be resolved."""
    schema, table = folded
    name = default_output(schema or "", table, spec.options.format, spec.compress)
    return name if schema else name[1:]


def _task(plan: BulkPlan, e: PlanEntry, rel: Relation) -> _Task:
    out = e.output or default_output(rel.schema, rel.name, e.spec.options.format, e.spec.compress)
    return _Task(
        e,
        rel.qualified,
        rel.schema,
        rel.name,
        plan.output_dir / out,
        rel.estimated_rows,
        rel.estimated_bytes,
        oid=rel.oid,
    )


def order_largest_first(tasks: Sequence[_Task]) -> list[_Task]:
    """The tasks by estimated size, largest first (then rows; unknown sizes last). Pure.

    Starting the largest table first keeps it from starting last and finishing long after
    everything else; ties keep the plan's order.
    """
    indexed = list(enumerate(tasks))
    indexed.sort(
        key=lambda it: (
            it[1].estimated_bytes is None,
            -(it[1].estimated_bytes or 0),
            -(it[1].estimated_rows or 0),
            it[0],
        )
    )
    return [t for _, t in indexed]


#: A table below this size is never split by the job itself: sampling its key and joining its
#: parts would cost about what the split saves.
SPLIT_BYTES = 128 * 1024 * 1024


def share_workers(tasks: Sequence[_Task], jobs: int) -> list[_Task]:
    """The tasks, with key ranges for a table too large for its share of the job. Pure.

    Largest first, the largest table starts at once; but when it is larger than the job's
    total divided by ``jobs`` (by the planner's size estimates), the other job slots finish
    everything else before it and then sit idle. Such a table (of at least
    :data:`SPLIT_BYTES`, whose entry does not set ``workers``) gets about as many key ranges
    as job slots its size would fill, up to ``jobs``: it runs them as ``--workers`` would, in
    processes of its own under its job slot.
    """
    sizes = [t.estimated_bytes or 0 for t in tasks if t.error is None]
    total = sum(sizes)
    if jobs < 2 or total <= 0:
        return list(tasks)
    share = total / jobs
    out = []
    for t in tasks:
        size = t.estimated_bytes or 0
        if (
            t.error is None
            and "workers" not in t.entry.explicit
            and size >= SPLIT_BYTES
            and size > share
        ):
            t = t.but(workers=min(jobs, max(2, round(size / share))))
        out.append(t)
    return out


def _select_only(tasks: Sequence[_Task], only: Sequence[str]) -> list[_Task]:
    """The tasks whose table matches one of the ``--only`` names or patterns. Pure."""
    patterns: list[NamePattern] = []
    for text in only:
        try:
            patterns.append(parse_name_pattern(text))
        except ValueError as e:
            raise UsageError(f"--only {text!r} is not a valid name or pattern: {e}") from e
    chosen: list[_Task] = []
    used: set[int] = set()
    for t in tasks:
        for i, p in enumerate(patterns):
            if p.schema is None or t.schema is None:
                hit = re.fullmatch(p.table.regex, t.name, re.DOTALL) is not None
            else:
                hit = p.matches(t.schema, t.name)
            if hit:
                used.add(i)
                chosen.append(t)
                break
    unused = [only[i] for i in range(len(patterns)) if i not in used]
    if unused:
        raise UsageError(f"--only {unused[0]!r} matches no table of the plan")
    return chosen


def _resolve_on_servers(plan: BulkPlan, *, ran_before: bool | None = None) -> _Resolution:
    """Read each DSN's catalog once and look up the explicit names; then :func:`resolve`, and
    plan every table in a few queries per server (:func:`_plan_tables`). A job that ran before
    (its report is there) waits an outage out as it connects (:func:`_connect`)."""
    catalogs: dict[str, dict[int, Relation] | str] = {}
    lookups: dict[tuple[str, str], int | str] = {}
    errors: list[CopystreamError] = []
    by_dsn: dict[str, list[PlanEntry]] = {}
    conns: dict[str, psycopg.Connection[Any]] = {}
    for e in plan.entries:
        by_dsn.setdefault(e.dsn or "", []).append(e)
    if ran_before is None:  # (a job writing to S3 says: its report is an object)
        ran_before = plan.report_path.exists()
    try:
        for dsn, entries in by_dsn.items():
            target = Target(dsn)
            try:
                conns[dsn] = _connect(target, entries[0].run, waits=ran_before)
            except CopystreamError as err:
                errors.append(err)
                catalogs[dsn] = redact(str(err), *plan.secrets)
                continue
            catalogs[dsn] = _read_catalog(conns[dsn], target, entries, lookups, plan.secrets)
        if errors and len(errors) == len(by_dsn):
            # no server could be reached at all: on a first run the command is wrong (exit 2);
            # a job that ran before waited the outage out (exit 1 past max_outage)
            raise errors[0]
        resolution = resolve(plan, catalogs, lookups)
        return _plan_tables(resolution, conns, plan.secrets)
    finally:
        for conn in conns.values():
            conn.close()


def _connect(target: Target, run: RunOptions, *, waits: bool) -> psycopg.Connection[Any]:
    """The planning connection to one server. A first run makes a few quick attempts (a wrong
    host or port is a usage error, exit 2). A job that ran before reached this server then:
    like an export with a checkpoint to resume (:func:`copystream.pipeline.resumable`), it
    retries as ``run``'s policy says, waiting an outage out up to ``max_outage`` (then
    :class:`~copystream.errors.RetriesExhausted`, exit 1: run it again later)."""
    if not waits:
        return first_connect(target, time.sleep)
    doing = f"connecting to {target.describe()}"
    conn, _ = retrying(target, run, time.sleep, doing, "", lambda c: None, None, planning=True)
    return conn


def _read_catalog(
    conn: psycopg.Connection[Any],
    target: Target,
    entries: Sequence[PlanEntry],
    lookups: dict[tuple[str, str], int | str],
    secrets: Sequence[str],
) -> dict[int, Relation] | str:
    """The catalog of one server, with its explicit names looked up (into ``lookups``); or
    why it could not be read."""
    dsn = target.conninfo
    try:
        catalog = _fetch_catalog(conn)
        for e in entries:
            if e.name is not None:
                lookups[(dsn, e.name)] = _lookup(conn, e.name)
    except psycopg.Error as err:  # e.g. the connection dropped: this server's tables fail
        detail = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        return redact(f"cannot read the catalog of {target.describe()}: {detail}", *secrets)
    return catalog


def _watermarked(
    conn: psycopg.Connection[Any],
    wanted: Sequence[tuple[int, ExportSpec]],
    plans: list[ResolvedTable | UsageError],
) -> list[ResolvedTable | UsageError]:
    """The plans of tables with a ``watermark``: paged by it, then the key (one more query
    each), or refused as a key would be."""
    out = list(plans)
    for i, ((_, spec), p) in enumerate(zip(wanted, plans, strict=True)):
        if spec.watermark is not None and isinstance(p, ResolvedTable):
            try:
                out[i] = watermarked(conn, spec, p)
            except UsageError as e:
                out[i] = e
    return out


def _plan_tables(
    resolution: _Resolution, conns: Mapping[str, psycopg.Connection[Any]], secrets: Sequence[str]
) -> _Resolution:
    """Every task planned on its server (:func:`~copystream.catalog.introspect_many`): with its
    resolved table, or failing without running when it cannot be exported (no usable key, a
    bad filter). A server lost meanwhile leaves its tables to be planned by their workers."""
    tasks = list(resolution.tasks)
    warnings = list(resolution.warnings)
    by_dsn: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        if t.error is None and t.oid is not None:
            by_dsn.setdefault(t.entry.dsn or "", []).append(i)
    for dsn, members in by_dsn.items():
        conn = conns.get(dsn)
        if conn is None or conn.closed or conn.broken:
            continue
        wanted = [(tasks[i].oid or 0, tasks[i].spec) for i in members]
        try:
            plans = _watermarked(conn, wanted, introspect_many(conn, wanted))
        except psycopg.Error as err:
            why = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            where = Target(dsn).describe()
            warnings.append(
                redact(f"the tables of {where} could not be planned in advance ({why}): each "
                       "is planned when it runs", *secrets)
            )  # fmt: skip
            continue
        for i, p in zip(members, plans, strict=True):
            if isinstance(p, CopystreamError):
                tasks[i] = tasks[i].but(error=redact(p.worded("plan"), *secrets))
            else:  # its estimates as the resolved table has them, for the order and display
                tasks[i] = tasks[i].but(
                    resolved=p, estimated_rows=p.estimated_rows, estimated_bytes=p.estimated_bytes
                )
    return _Resolution(tuple(tasks), tuple(warnings))
