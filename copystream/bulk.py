"""Bulk migrations: many tables from one TOML plan, run as one resumable job.

A *plan* names tables (``name = "public.orders"``) and patterns (``pattern = "sales.*"``, as
``pg_dump -t``), with export options as defaults and per table. :func:`load_plan` reads and
validates it (pure: every problem of the file is reported at once, with its place);
:func:`run_bulk` resolves the patterns on the server, orders the tables largest first and runs
each through :func:`copystream.export_table` in a worker process of its own, up to ``jobs`` at a
time. Running the same plan again resumes: finished tables whose manifest still verifies are
skipped, unfinished ones resume from their checkpoints, failed ones are tried again. The job's
report, ``copystream-report.json`` in the output directory, is rewritten atomically as tables
finish.

Each table runs in a worker process of its own (``python -m copystream._bulk_worker``, not a
pool), so a worker that dies (the OOM killer, a crash) fails only its own table; workers are
killed if the coordinating process dies (``PR_SET_PDEATHSIG``, as in
:mod:`copystream.workers`), so a re-run never races an orphan.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import fcntl
import itertools
import json
import logging
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psycopg

from ._atomic import atomic_write, remove_stale_temporaries
from .checkpoint import checkpoint_path
from .connection import Target, connect, connect_error, redact
from .errors import CopystreamError, UsageError
from .export import ExportResult, export_table, first_connect
from .manifest import manifest_path
from .plan import CopyOptions, introspect
from .progress import Progress

__all__ = [
    "REPORT_NAME",
    "BulkBarReporter",
    "BulkLogReporter",
    "BulkPlan",
    "BulkProgress",
    "BulkResult",
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
    "resolve",
    "run_bulk",
]

log = logging.getLogger("copystream")

#: The job report, in the plan's output directory.
REPORT_NAME = "copystream-report.json"
REPORT_VERSION = 1
_LOCK_NAME = ".copystream-bulk.lock"


class PlanError(UsageError):
    """The plan file is not valid. ``problems`` lists every problem found, each with its place.

    ``str(error)`` joins them on one line; the command prints one line per problem (exit 2).
    Nothing is written when a plan is invalid.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        n = len(self.problems)
        super().__init__(
            f"invalid plan ({n} problem{'s' if n != 1 else ''}): " + "; ".join(problems)
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problems,))


# -- name patterns (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    regex: str  # a Python regex for the whole part (use with fullmatch)
    literal: str  # the name with quotes removed and unquoted letters folded
    wild: bool  # has an unquoted * or ?


@dataclass(frozen=True)
class NamePattern:
    """A table name pattern with ``pg_dump -t`` semantics.

    ``*`` matches any characters and ``?`` one; a dot separates schema and table; unquoted
    letters fold to lower case; inside double quotes everything is literal (``""`` is a quote).
    Without a schema part, a pattern matches only tables visible on the ``search_path``.
    """

    text: str
    schema: _Part | None
    table: _Part

    @property
    def wild(self) -> bool:
        """Whether the pattern has wildcards (else it names one table)."""
        return self.table.wild or (self.schema is not None and self.schema.wild)

    def matches(self, schema: str, name: str, *, visible: bool = True) -> bool:
        """Whether the relation ``schema.name`` matches (``visible``: on the search_path)."""
        if self.schema is None:
            if not visible:
                return False
        elif re.fullmatch(self.schema.regex, schema, re.DOTALL) is None:
            return False
        return re.fullmatch(self.table.regex, name, re.DOTALL) is not None


def parse_name_pattern(text: str) -> NamePattern:
    """Parse a ``pg_dump -t`` style pattern; ``ValueError`` says what is wrong with it. Pure."""
    parts: list[_Part] = []
    regex: list[str] = []
    literal: list[str] = []
    wild = quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            if quoted and text[i + 1 : i + 2] == '"':
                regex.append(re.escape('"'))
                literal.append('"')
                i += 2
                continue
            quoted = not quoted
        elif quoted:
            regex.append(re.escape(ch))
            literal.append(ch)
        elif ch == ".":
            parts.append(_Part("".join(regex), "".join(literal), wild))
            regex, literal, wild = [], [], False
        elif ch in "*?":
            regex.append(".*" if ch == "*" else ".")
            literal.append(ch)
            wild = True
        elif ch.isspace():
            raise ValueError("unquoted white space (quote names that contain spaces)")
        else:
            folded = ch.lower() if "A" <= ch <= "Z" else ch  # as PostgreSQL folds identifiers
            regex.append(re.escape(folded))
            literal.append(folded)
        i += 1
    if quoted:
        raise ValueError("unterminated double quote")
    parts.append(_Part("".join(regex), "".join(literal), wild))
    if len(parts) > 2:
        raise ValueError("too many dotted names (use schema.table)")
    if any(not p.literal for p in parts):
        raise ValueError("empty schema or table name")
    if len(parts) == 2:
        return NamePattern(text, parts[0], parts[1])
    return NamePattern(text, None, parts[0])


# -- the plan (pure) ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanEntry:
    """One ``[[tables]]`` entry of a plan, with the ``[defaults]`` merged in.

    Exactly one of ``name`` (one table) and ``pattern`` (any number) is set. The options are
    those of :func:`copystream.export_table`.
    """

    index: int  # position in the plan's tables array (0-based)
    line: int | None  # line of its [[tables]] header, when known
    name: str | None
    pattern: str | None
    exclude: tuple[str, ...] = ()
    output: str | None = None  # as written (relative to the output directory)
    dsn: str | None = field(default=None, repr=False)
    key: tuple[str, ...] | None = None
    columns: tuple[str, ...] | None = None
    where: str | None = None
    chunk_rows: int | None = None
    options: CopyOptions = field(default_factory=CopyOptions)
    retries: int = 5
    retry_budget: float = 900.0
    io_timeout: float = 300.0
    statement_timeout: float | None = None
    workers: int = 1
    consistent: bool = False

    @property
    def label(self) -> str:
        """``tables[N]``: how messages and the report refer to this entry."""
        return f"tables[{self.index}]"

    def export_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`copystream.export_table` for a table of this entry."""
        return {
            "key": list(self.key) if self.key else None,
            "columns": list(self.columns) if self.columns else None,
            "where": self.where,
            "chunk_rows": self.chunk_rows,
            "options": self.options,
            "retries": self.retries,
            "retry_budget": self.retry_budget,
            "io_timeout": self.io_timeout,
            "statement_timeout": self.statement_timeout,
            "workers": self.workers,
            "consistent": self.consistent,
        }


@dataclass(frozen=True)
class BulkPlan:
    """A validated plan: where it came from, where the files go, and its entries in order."""

    path: Path
    output_dir: Path
    entries: tuple[PlanEntry, ...]

    @property
    def report_path(self) -> Path:
        """Where :func:`run_bulk` writes the job report."""
        return self.output_dir / REPORT_NAME

    @property
    def secrets(self) -> list[str]:
        """Every password and raw DSN of the plan: never shown in any message or report."""
        out: list[str] = []
        for e in self.entries:
            if e.dsn:
                with contextlib.suppress(CopystreamError):
                    out.extend(Target(e.dsn).secrets)
        return sorted(set(out), key=len, reverse=True)  # longest first: a DSN before its password


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _names(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)


def _check_dsn(v: object) -> str | None:
    if not isinstance(v, str):
        return "expected a string"
    try:
        Target(v)
    except UsageError as e:
        return str(e)  # Target's message never echoes a password
    return None


def _check(
    ok: Callable[[object], bool], want: str, *, show: bool = True
) -> Callable[[object], str | None]:
    def check(v: object) -> str | None:
        if ok(v):
            return None
        got = f"got {v!r}" if show and not isinstance(v, dict | list) else f"got {_toml_type(v)}"
        return f"expected {want}, {got}"

    return check


def _toml_type(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


def _str(v: object) -> bool:
    return isinstance(v, str)


def _nonempty(v: object) -> bool:
    return isinstance(v, str) and bool(v)


#: Options allowed in ``[defaults]`` and in each ``[[tables]]`` entry, with their checks.
_OPTIONS: dict[str, Callable[[object], str | None]] = {
    "dsn": _check_dsn,
    "key": _check(lambda v: _nonempty(v) or _names(v), "a column name or an array of them"),
    "columns": _check(_names, "a non-empty array of column names"),
    "where": _check(_str, "a string (an SQL filter)"),
    "chunk_rows": _check(lambda v: _is_int(v) and int(str(v)) >= 0, "an integer >= 0"),
    "header": _check(lambda v: isinstance(v, bool), "true or false"),
    "format": _check(lambda v: v in ("csv", "text"), '"csv" or "text"'),
    "delimiter": _check(_str, "a string"),
    "null": _check(_str, "a string"),
    "quote": _check(_str, "a string"),
    "escape": _check(_str, "a string"),
    "force_quote": _check(
        lambda v: v == "*" or isinstance(v, bool) or _names(v),
        '"*", true, or an array of column names',
    ),
    "encoding": _check(_nonempty, "an encoding name"),
    "retries": _check(lambda v: _is_int(v) and int(str(v)) >= 0, "an integer >= 0"),
    "retry_budget": _check(lambda v: _is_number(v) and float(str(v)) >= 0, "seconds >= 0"),
    "io_timeout": _check(lambda v: _is_number(v) and float(str(v)) >= 0.1, "seconds >= 0.1"),
    "statement_timeout": _check(
        lambda v: _is_number(v) and float(str(v)) >= 0.001, "seconds >= 0.001"
    ),
    "workers": _check(lambda v: _is_int(v) and int(str(v)) >= 1, "an integer >= 1"),
    "consistent": _check(lambda v: isinstance(v, bool), "true or false"),
}
_DEFAULTS_ONLY: dict[str, Callable[[object], str | None]] = {
    "output_dir": _check(_nonempty, "a directory path"),
}
_ENTRY_ONLY: dict[str, Callable[[object], str | None]] = {
    "name": _check(_nonempty, "a table name"),
    "pattern": _check(_nonempty, "a table name pattern"),
    "exclude": _check(lambda v: _nonempty(v) or _names(v), "a pattern or an array of patterns"),
    "output": _check(
        lambda v: _nonempty(v) and not str(v).endswith("/"), "a file path (not a directory)"
    ),
}


class _Locator:
    """Finds the line of a plan element by scanning the text (tomllib gives no positions)."""

    _HEADER = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.\"' -]+?)\s*\]\]?\s*(?:#.*)?$")

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str, bool]] = []  # (line number, name, is array)
        for n, line in enumerate(self.lines, 1):
            m = self._HEADER.match(line)
            if m:
                self.headers.append((n, m.group(1).strip(), line.lstrip().startswith("[[")))
        self.entries = [n for n, name, arr in self.headers if arr and name == "tables"]

    def _section(self, start: int | None) -> range:
        """Line numbers from ``start`` (a header, or None: the top) to the next header."""
        begin = start + 1 if start is not None else 1
        ends = [n for n, _, _ in self.headers if n >= begin]
        return range(begin, ends[0] if ends else len(self.lines) + 1)

    def _key_line(self, start: int | None, key: str) -> int | None:
        pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        for n in self._section(start):
            if pattern.match(self.lines[n - 1]):
                return n
        return start

    def entry(self, index: int) -> int | None:
        return self.entries[index] if index < len(self.entries) else None

    def defaults(self) -> int | None:
        return next((n for n, name, arr in self.headers if not arr and name == "defaults"), None)

    def at(self, where: str, key: str | None = None) -> int | None:
        """Line of ``key`` in ``where`` ("top", "defaults" or "tables[N]")."""
        if where == "top":
            return self._key_line(None, key) if key else None
        if where == "defaults":
            start = self.defaults()
        else:
            start = self.entry(int(where[len("tables[") : -1]))
            if start is None:
                return None
        if start is None:
            return None
        return self._key_line(start, key) if key else start


def _fold_name(name: str) -> tuple[str | None, str] | None:
    """``(schema, table)`` as the server reads an explicit name; None if it has wildcards."""
    try:
        p = parse_name_pattern(name)
    except ValueError:
        return None
    if p.wild:
        return None
    return (p.schema.literal if p.schema else None, p.table.literal)


def default_output(schema: str, table: str, fmt: str) -> str:
    """``<schema>.<table>.csv`` (``.txt`` for the text format), with ``/`` made safe. Pure."""
    ext = "txt" if fmt == "text" else "csv"
    return f"{schema}.{table}.{ext}".replace("/", "_")


def parse_plan(text: str, *, source: str = "plan", base_dir: Path | None = None) -> BulkPlan:
    """Parse and validate the TOML text of a plan. Pure (no file or server is touched).

    ``source`` names the file in messages; ``base_dir`` is what a relative ``output_dir`` is
    relative to (default: the current directory). Raises :class:`PlanError` listing every
    problem, each as ``source:LINE: tables[N].key: what is wrong``.
    """
    base = base_dir if base_dir is not None else Path(".")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlanError([f"{source}: not valid TOML: {e}"]) from e
    loc = _Locator(text)
    found: list[tuple[int, str]] = []  # (line, problem): reported in the file's order

    def problem(where: str, key: str | None, message: str) -> None:
        line = loc.at(where, key)
        place = f"{source}:{line}" if line is not None else source
        path = where if where != "top" else ""
        if key is not None:
            path = f"{path}.{key}" if path else key
        found.append((line or 0, f"{place}: {path}: {message}" if path else f"{place}: {message}"))

    def unknown(where: str, key: str, allowed: Sequence[str]) -> None:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problem(where, key, f"unknown key{hint}")

    for key in doc:
        if key not in ("defaults", "tables"):
            unknown("top", key, ["defaults", "tables"])

    defaults: dict[str, Any] = {}
    raw_defaults = doc.get("defaults", {})
    if not isinstance(raw_defaults, dict):
        problem("top", "defaults", "expected a table ([defaults])")
        raw_defaults = {}
    for key, value in raw_defaults.items():
        check = _OPTIONS.get(key) or _DEFAULTS_ONLY.get(key)
        if check is None:
            why = " (it belongs in a [[tables]] entry)" if key in _ENTRY_ONLY else ""
            if why:
                problem("defaults", key, f"not allowed in [defaults]{why}")
            else:
                unknown("defaults", key, [*_OPTIONS, *_DEFAULTS_ONLY])
            continue
        msg = check(value)
        if msg:
            problem("defaults", key, msg)
        else:
            defaults[key] = value

    raw_tables = doc.get("tables")
    if raw_tables is None:
        found.append((0, f"{source}: the plan has no [[tables]] entry: nothing to export"))
        raw_tables = []
    elif not isinstance(raw_tables, list):
        problem("top", "tables", "expected an array of tables ([[tables]])")
        raw_tables = []

    fmt_default = str(defaults.get("format", "csv"))
    output_dir = base / str(defaults.get("output_dir", "."))
    entries: list[PlanEntry] = []
    seen_names: dict[tuple[str | None, str], str] = {}
    seen_outputs: dict[str, str] = {}
    for i, raw in enumerate(raw_tables):
        where = f"tables[{i}]"
        if not isinstance(raw, dict):
            problem(where, None, f"expected a table, got {_toml_type(raw)}")
            continue
        values: dict[str, Any] = {}
        for key, value in raw.items():
            check = _OPTIONS.get(key) or _ENTRY_ONLY.get(key)
            if check is None:
                if key in _DEFAULTS_ONLY:
                    problem(where, key, "allowed only in [defaults]")
                else:
                    unknown(where, key, [*_OPTIONS, *_ENTRY_ONLY])
                continue
            msg = check(value)
            if msg:
                problem(where, key, msg)
            else:
                values[key] = value
        name, pattern = values.get("name"), values.get("pattern")
        if ("name" in raw) == ("pattern" in raw):
            problem(where, None, "give either name = (one table) or pattern = (a pattern)")
        if "exclude" in raw and "pattern" not in raw:
            problem(where, "exclude", "allowed only with pattern =")
        if "output" in raw and "pattern" in raw:
            problem(where, "output", "not allowed with pattern = (each table gets its own file)")
        named_twice = False
        if isinstance(name, str):
            folded = _fold_name(name)
            try:
                parsed = parse_name_pattern(name)
            except ValueError as e:
                problem(where, "name", f"{name!r} is not a valid table name: {e}")
            else:
                if parsed.wild:
                    problem(where, "name", f"{name!r} has wildcards: use pattern = for those")
            if folded is not None:
                other = seen_names.get(folded)
                if other is not None:
                    problem(where, "name", f"{name!r} is named twice (also in {other})")
                    named_twice = True
                else:
                    seen_names[folded] = where
        excludes: list[str] = []
        for key, texts in (("pattern", [pattern]), ("exclude", values.get("exclude", []))):
            for t in [texts] if isinstance(texts, str) else texts:
                if not isinstance(t, str):
                    continue
                try:
                    parse_name_pattern(t)
                except ValueError as e:
                    problem(where, key, f"{t!r} is not a valid pattern: {e}")
                if key == "exclude":
                    excludes.append(t)
        merged = {**defaults, **values}
        fmt = str(merged.get("format", fmt_default))
        if isinstance(name, str) and not named_twice:
            # The default output is known before the server is asked only for a name with a
            # schema; the others are checked again once resolved (still before anything runs).
            folded = _fold_name(name)
            out = values.get("output")
            if out is None and folded is not None and folded[0] is not None:
                out = default_output(folded[0], folded[1], fmt)
            if isinstance(out, str):
                norm = os.path.normpath(output_dir / out)
                other = seen_outputs.get(norm)
                if other is not None:
                    problem(where, "output", f"{out!r} is also the output of {other}")
                else:
                    seen_outputs[norm] = where
                if Path(norm).name == REPORT_NAME:
                    problem(where, "output", f"{REPORT_NAME} is the job report's name")
        entries.append(_entry(i, loc.entry(i), merged, excludes))

    if found:
        raise PlanError([text for _, text in sorted(found, key=lambda f: f[0])])
    return BulkPlan(path=Path(source), output_dir=output_dir, entries=tuple(entries))


def _entry(index: int, line: int | None, v: Mapping[str, Any], exclude: list[str]) -> PlanEntry:
    key = v.get("key")
    fq = v.get("force_quote", ())
    options = CopyOptions(
        format=str(v.get("format", "csv")),
        header=bool(v.get("header", False)),
        delimiter=v.get("delimiter"),
        null=v.get("null"),
        quote=v.get("quote"),
        escape=v.get("escape"),
        force_quote=True if fq == "*" or fq is True else tuple(fq) if fq else (),
        encoding=v.get("encoding"),
    )
    timeout = v.get("statement_timeout")
    return PlanEntry(
        index=index,
        line=line,
        name=v.get("name"),
        pattern=v.get("pattern"),
        exclude=tuple(exclude),
        output=v.get("output"),
        dsn=v.get("dsn"),
        key=(key,) if isinstance(key, str) else tuple(key) if key else None,
        columns=tuple(v["columns"]) if v.get("columns") else None,
        where=v.get("where"),
        chunk_rows=v.get("chunk_rows"),
        options=options,
        retries=int(v.get("retries", 5)),
        retry_budget=float(v.get("retry_budget", 900.0)),
        io_timeout=float(v.get("io_timeout", 300.0)),
        statement_timeout=float(timeout) if timeout is not None else None,
        workers=int(v.get("workers", 1)),
        consistent=bool(v.get("consistent", False)),
    )


def load_plan(path: str | os.PathLike[str]) -> BulkPlan:
    """Read and validate the plan file at ``path``.

    A relative ``output_dir`` is relative to the plan file's directory (so the plan works from
    cron, whatever the current directory). Raises :class:`PlanError` (exit code 2) listing
    every problem of the file at once.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError as e:
        raise PlanError([f"{p}: plan file does not exist"]) from e
    except IsADirectoryError as e:
        raise PlanError([f"{p}: is a directory, not a plan file"]) from e
    except UnicodeDecodeError as e:
        raise PlanError([f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"]) from e
    except OSError as e:
        raise PlanError([f"{p}: cannot read it: {e.strerror}"]) from e
    plan = parse_plan(text, source=str(p), base_dir=p.absolute().parent)
    return replace(plan, path=p)


# -- resolving the plan on the server -----------------------------------------------------------


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
        return f"table {name} does not exist (or is not visible with the current search_path)"
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
    tasks: list[_Task] = []
    warnings: list[str] = []
    problems: list[str] = []
    claimed: dict[tuple[str, int], PlanEntry] = {}
    source = str(plan.path)

    def where(e: PlanEntry) -> str:
        return f"{source}:{e.line}: {e.label}" if e.line is not None else f"{source}: {e.label}"

    for e in plan.entries:  # explicit names first: they win over patterns
        if e.name is None:
            continue
        dsn = e.dsn or ""
        catalog = catalogs.get(dsn)
        found = lookups.get((dsn, e.name), "not looked up")
        folded = _fold_name(e.name) or (None, e.name)
        fmt = e.options.format
        if isinstance(catalog, str) or isinstance(found, str):
            reason = catalog if isinstance(catalog, str) else str(found)
            out = plan.output_dir / (e.output or _unresolved_output(folded, fmt))
            tasks.append(_Task(e, e.name, folded[0], folded[1], out, error=reason))
            continue
        rel = (catalog or {}).get(found)
        if rel is None:
            out = plan.output_dir / (e.output or _unresolved_output(folded, fmt))
            reason = f"{e.name} is not a table, view, materialized view or foreign table"
            tasks.append(_Task(e, e.name, folded[0], folded[1], out, error=reason))
            continue
        other = claimed.get((dsn, rel.oid))
        if other is not None:
            problems.append(f"{where(e)}.name: {rel.qualified} is also named in {other.label}")
            continue
        claimed[(dsn, rel.oid)] = e
        tasks.append(_task(plan, e, rel))

    for e in plan.entries:
        if e.pattern is None:
            continue
        dsn = e.dsn or ""
        catalog = catalogs.get(dsn)
        if isinstance(catalog, str) or catalog is None:
            reason = catalog if isinstance(catalog, str) else "not looked up"
            out = plan.output_dir / f"{e.label}.unresolved"
            tasks.append(_Task(e, f"{e.pattern} ({e.label})", None, e.pattern, out, error=reason))
            continue
        matched = match_pattern(e, catalog)
        fresh = [r for r in matched if (dsn, r.oid) not in claimed]
        if not matched:
            warnings.append(f"{where(e)}: pattern {e.pattern!r} matches no table")
        for rel in fresh:
            claimed[(dsn, rel.oid)] = e
            tasks.append(_task(plan, e, rel))

    outputs: dict[str, _Task] = {}
    for t in tasks:
        if t.error is not None:
            continue
        norm = os.path.normpath(t.output)
        other_task = outputs.get(norm)
        if other_task is not None:
            problems.append(
                f"{where(t.entry)}: {t.table} and {other_task.table} ({other_task.entry.label}) "
                f"would both be written to {t.output}"
            )
        else:
            outputs[norm] = t
    if problems:
        raise PlanError(problems)
    order = {id(t): i for i, t in enumerate(tasks)}
    tasks.sort(key=lambda t: (t.entry.index, order[id(t)]))
    return _Resolution(tuple(tasks), tuple(warnings))


def _unresolved_output(folded: tuple[str | None, str], fmt: str) -> str:
    """The output named in the report for a table that could not be resolved."""
    schema, table = folded
    return default_output(schema, table, fmt) if schema else default_output("", table, fmt)[1:]


def _task(plan: BulkPlan, e: PlanEntry, rel: Relation) -> _Task:
    out = e.output or default_output(rel.schema, rel.name, e.options.format)
    return _Task(
        e,
        rel.qualified,
        rel.schema,
        rel.name,
        plan.output_dir / out,
        rel.estimated_rows,
        rel.estimated_bytes,
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


def _resolve_on_servers(plan: BulkPlan) -> _Resolution:
    """Read each DSN's catalog once and look up the explicit names; then :func:`resolve`."""
    catalogs: dict[str, dict[int, Relation] | str] = {}
    lookups: dict[tuple[str, str], int | str] = {}
    errors: list[CopystreamError] = []
    by_dsn: dict[str, list[PlanEntry]] = {}
    for e in plan.entries:
        by_dsn.setdefault(e.dsn or "", []).append(e)
    for dsn, entries in by_dsn.items():
        target = Target(dsn)
        try:
            conn = first_connect(target, time.sleep)
        except CopystreamError as err:
            errors.append(err)
            catalogs[dsn] = redact(str(err), *plan.secrets)
            continue
        try:
            catalogs[dsn] = _fetch_catalog(conn)
            for e in entries:
                if e.name is not None:
                    lookups[(dsn, e.name)] = _lookup(conn, e.name)
        except psycopg.Error as err:  # e.g. the connection dropped: this server's tables fail
            detail = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            catalogs[dsn] = redact(
                f"cannot read the catalog of {target.describe()}: {detail}", *plan.secrets
            )
        finally:
            conn.close()
    if errors and len(errors) == len(by_dsn):
        raise errors[0]  # no server could be reached at all: the command itself is wrong (exit 2)
    return resolve(plan, catalogs, lookups)


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableOutcome:
    """What happened to one table of a bulk job (or, in a dry run, what would).

    ``status`` is ``"done"`` (exported in this run, from zero or resumed), ``"skipped"`` (already
    complete and still verifying), ``"failed"`` (``errors`` says why), ``"pending"`` (not run
    yet: only in a report written while the job runs), or in a dry run ``"ready"`` or
    ``"refused"``.
    """

    table: str
    entry: str  # "tables[N]": the plan entry that selected it
    output: Path
    status: str
    rows: int = 0
    bytes: int = 0
    xxh3_128: str | None = None
    seconds: float = 0.0
    retries: int = 0
    errors: tuple[str, ...] = ()
    resumed: bool = False
    key: tuple[str, ...] = ()
    key_source: str = ""
    estimated_rows: int | None = None
    estimated_bytes: int | None = None
    warnings: tuple[str, ...] = ()
    note: str = ""  # dry run: what the files beside the output say (new, resumes, finished)

    @property
    def ok(self) -> bool:
        """Whether the table is exported (done or skipped) or, in a dry run, would be."""
        return self.status in ("done", "skipped", "ready")

    def to_json(self) -> dict[str, Any]:
        """The table's entry in the job report."""
        return {
            "table": self.table,
            "entry": self.entry,
            "output": str(self.output),
            "status": self.status,
            "rows": self.rows,
            "bytes": self.bytes,
            "xxh3_128": self.xxh3_128,
            "seconds": round(self.seconds, 3),
            "retries": self.retries,
            "errors": list(self.errors),
            "resumed": self.resumed,
            "key": list(self.key),
            "key_source": self.key_source,
            "estimated_rows": self.estimated_rows,
            "estimated_bytes": self.estimated_bytes,
            "warnings": list(self.warnings),
        }


@dataclass(frozen=True)
class BulkResult:
    """What :func:`run_bulk` did: one :class:`TableOutcome` per table, in the order they ran."""

    plan: Path
    tables: tuple[TableOutcome, ...]
    warnings: tuple[str, ...]
    seconds: float
    dry_run: bool
    jobs: int
    report: Path | None  # the job report written (None in a dry run)

    @property
    def failed(self) -> tuple[TableOutcome, ...]:
        """The tables that failed (or, in a dry run, would be refused)."""
        return tuple(t for t in self.tables if not t.ok)

    @property
    def ok(self) -> bool:
        """Whether every table succeeded (or, in a dry run, would be exported)."""
        return not self.failed

    @property
    def exit_code(self) -> int:
        """What the command exits with: 0 if every table succeeded, else 1."""
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """JSON-safe form: the job report's totals and tables."""
        return {
            "plan": str(self.plan),
            "dry_run": self.dry_run,
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
            "totals": _totals(self.tables),
            "warnings": list(self.warnings),
            "tables": [t.to_json() for t in self.tables],
        }


def _totals(tables: Sequence[TableOutcome]) -> dict[str, int]:
    out = {"tables": len(tables), "rows": 0, "bytes": 0}
    for status in ("done", "skipped", "failed", "pending"):
        out[status] = 0
    for t in tables:
        out[t.status] = out.get(t.status, 0) + 1
        out["rows"] += t.rows
        out["bytes"] += t.bytes
    return out


@dataclass(frozen=True)
class BulkProgress:
    """A snapshot of a running bulk job, passed to ``run_bulk(progress=...)``.

    ``running`` holds the latest :class:`~copystream.Progress` of each table being exported;
    ``outcomes`` every table finished so far, in finishing order. ``rows`` and ``bytes`` count
    the finished and running tables; ``start_rows``/``start_bytes`` the part of them that was
    already on disk when this run started (skipped tables, resumed prefixes).
    """

    tables: int
    outcomes: tuple[TableOutcome, ...]
    running: tuple[Progress, ...]
    rows: int
    bytes: int
    start_rows: int
    start_bytes: int
    estimated_rows: int | None  # of all the job's tables (finished ones: their actual rows)
    elapsed: float
    done: bool = False

    @property
    def finished(self) -> int:
        """Tables finished (done, skipped or failed)."""
        return len(self.outcomes)

    @property
    def failed(self) -> int:
        """Tables that failed so far."""
        return sum(1 for o in self.outcomes if not o.ok)

    @property
    def rate(self) -> float:
        """Bytes per second written by this run."""
        return (self.bytes - self.start_bytes) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left by the estimated row counts, or ``None`` when unknown."""
        here = self.rows - self.start_rows
        if not self.estimated_rows or here <= 0 or self.elapsed <= 0:
            return None
        return max(self.estimated_rows - self.rows, 0) * self.elapsed / here


# -- the worker process -------------------------------------------------------------------------
#
# A worker is ``python -m copystream._bulk_worker COORDINATOR_PID LOG_LEVEL``, a plain subprocess
# (like the parallel export's workers, see copystream.workers): multiprocessing's ``spawn``
# would re-import the caller's ``__main__`` in every worker (a cron script without a main guard
# would start the job again; an Airflow task would re-import Airflow). The worker reads its
# pickled job on stdin and writes one line per event on stdout: ``P <progress>``,
# ``L <level> <message>``, then ``R <result>`` or ``E <message>`` (payloads base64).


@dataclass(frozen=True)
class _Job:
    conninfo: str
    table: str
    output: str
    kwargs: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _LineLogHandler(logging.Handler):
    """Sends a worker's log lines to the coordinator, which logs them in its own way."""

    def __init__(self, send: Callable[[str], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(f"L {record.levelno} {_b64(record.getMessage().encode())}")


def worker_main(argv: Sequence[str]) -> int:
    """Body of ``python -m copystream._bulk_worker COORDINATOR_PID LOG_LEVEL``: one table."""
    from .workers import die_with_coordinator  # killed with the coordinator; ignores Ctrl-C

    die_with_coordinator(int(argv[0]), int(argv[1]))
    job: _Job = pickle.load(sys.stdin.buffer)
    # The events get the real stdout to themselves; anything else printed goes to stderr.
    events = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(line: str) -> None:
        with lock:
            events.write(line + "\n")
            events.flush()

    log.handlers[:] = [_LineLogHandler(send)]
    last = 0.0

    def report(p: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if p.done or now - last >= 0.2:
            last = now
            send(f"P {_b64(pickle.dumps(p))}")

    try:
        result = export_table(
            job.conninfo or None, job.table, job.output, progress=report, **job.kwargs
        )
    except CopystreamError as e:
        send(f"E {_b64(str(e).encode())}")
        return 1
    except Exception as e:  # a bug: fail this table, not the job
        send(f"E {_b64(f'unexpected {type(e).__name__}: {e} (please report this)'.encode())}")
        return 1
    # The chunk records stay in the manifest: a huge table's would only weigh on the pipe.
    send(f"R {_b64(pickle.dumps(replace(result, chunks=())))}")
    return 0


class _Running:
    """A worker process exporting one table, and what it has said so far."""

    def __init__(self, task: _Task, index: int, events: queue.Queue[tuple[int, str]]) -> None:
        self.task = task
        self.started = time.monotonic()
        self.progress = Progress(task.table, 0, 0, task.estimated_rows, 0.0, 0)
        self.result: ExportResult | None = None
        self.error: str | None = None
        job = _Job(
            conninfo=task.entry.dsn or "",
            table=task.table,
            output=str(task.output),
            kwargs=task.entry.export_kwargs(),
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "copystream._bulk_worker",
                str(os.getpid()),
                str(log.getEffectiveLevel()),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(pickle.dumps(job))
            self.proc.stdin.close()
        except BrokenPipeError:  # it died at once; its exit status will say how
            pass
        self.reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, index, events), daemon=True
        )
        self.reader.start()
        log.debug("%s: started in process %s", task.table, self.proc.pid)

    @staticmethod
    def _read(stdout: IO[bytes], index: int, events: queue.Queue[tuple[int, str]]) -> None:
        for raw in stdout:
            events.put((index, raw.decode("ascii", errors="replace").rstrip("\n")))
        events.put((index, "EOF"))

    def handle(self, line: str, secrets: Sequence[str]) -> None:
        """Take in one event line of the worker."""
        kind, _, payload = line.partition(" ")
        try:
            if kind == "P":
                self.progress = pickle.loads(base64.b64decode(payload))
            elif kind == "L":
                level, _, text = payload.partition(" ")
                message = base64.b64decode(text).decode(errors="replace")
                log.log(int(level), "%s", _in_plan_terms(redact(message, *secrets)))
            elif kind == "R":
                self.result = pickle.loads(base64.b64decode(payload))
            elif kind == "E":
                self.error = base64.b64decode(payload).decode(errors="replace")
        except (ValueError, pickle.UnpicklingError, EOFError):  # a torn line of a killed worker
            pass

    def stop(self) -> None:
        """Terminate the worker (its own workers die with it)."""
        with contextlib.suppress(Exception):
            self.proc.terminate()


def _outcome(task: _Task, status: str, **kw: Any) -> TableOutcome:
    return TableOutcome(
        table=task.table,
        entry=task.entry.label,
        output=task.output,
        status=status,
        estimated_rows=task.estimated_rows,
        estimated_bytes=task.estimated_bytes,
        **kw,
    )


def _from_result(task: _Task, r: ExportResult) -> TableOutcome:
    return _outcome(
        task,
        "skipped" if r.already_complete else "done",
        rows=r.rows,
        bytes=r.bytes,
        xxh3_128=r.xxh3_128,
        seconds=r.seconds,
        retries=r.retries,
        resumed=r.resumed,
        key=r.key,
        key_source=_key_source(r.key_source),
        warnings=r.warnings,
    )


def _key_source(source: str) -> str:
    return "the plan's key" if source == "--key" else source


#: The export command's words in export_table's messages, and what a plan says instead.
_PLAN_WORDS = (
    ("pass --restart or --force to overwrite it", "delete it to export the table again"),
    (
        "pass --restart to discard it and start from zero",
        "delete the output and the files beside it to start from zero",
    ),
    ("with --key", "with key = in the plan"),
    ("--key", "key"),
    ("--where", "where"),
    ("--columns", "columns"),
)


def _in_plan_terms(message: str) -> str:
    """``message`` with the export command's option names put as a plan names them."""
    for old, new in _PLAN_WORDS:
        message = message.replace(old, new)
    return message


# -- the report ---------------------------------------------------------------------------------


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
        totals: dict[str, int] = {"tables": len(tables), "rows": 0, "bytes": 0}
        for status in ("done", "skipped", "failed", "pending", "not run"):
            totals[status] = 0
        for t in tables:
            totals[t["status"]] = totals.get(t["status"], 0) + 1
            totals["rows"] += int(t["rows"])
            totals["bytes"] += int(t["bytes"])
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


@contextlib.contextmanager
def _job_lock(directory: Path) -> Iterator[None]:
    """One bulk job per output directory at a time."""
    path = directory / _LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise UsageError(f"cannot write in the output directory {directory}: {e.strerror}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise UsageError(
                f"another copystream bulk job is running with output directory {directory}"
            ) from e
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


# -- running ------------------------------------------------------------------------------------


def run_bulk(
    plan: BulkPlan | str | os.PathLike[str],
    *,
    jobs: int = 1,
    only: Sequence[str] | None = None,
    dry_run: bool = False,
    progress: Callable[[BulkProgress], None] | None = None,
) -> BulkResult:
    """Export every table of ``plan`` (a :class:`BulkPlan` or the path of a plan file).

    Patterns are resolved on the server, the tables ordered largest first (by the planner's
    size estimates), and each exported by :func:`copystream.export_table` in a worker process of
    its own, ``jobs`` at a time. One table's failure does not stop the others. Calling it again
    resumes: finished tables that still verify are skipped, unfinished ones resume from their
    checkpoints, failed ones are tried again. ``copystream-report.json`` in the output directory
    is rewritten atomically as each table finishes.

    ``only``: names or patterns; just the plan's tables matching one of them run (a name that
    matches none raises :class:`UsageError`). ``dry_run``: resolve the plan and say, per table,
    its key and where it came from, its estimated size, its output and whether it would be
    refused; nothing is written. ``progress``: called with a :class:`BulkProgress` a few times a
    second and whenever a table starts or finishes.

    Raises :class:`PlanError` for an invalid plan and :class:`UsageError` when no server of the
    plan can be reached (nothing is written then); a failed table is reported in the result
    (``result.failed``, ``result.exit_code``), not raised.
    """
    started = time.monotonic()
    if jobs < 1:
        raise UsageError("jobs must be at least 1")
    bulk = plan if isinstance(plan, BulkPlan) else load_plan(plan)
    secrets = bulk.secrets
    resolution = _resolve_on_servers(bulk)
    tasks = list(resolution.tasks)
    selected = _select_only(tasks, only) if only else tasks
    ordered = order_largest_first(selected)
    warnings = tuple(redact(w, *secrets) for w in resolution.warnings)
    for w in warnings:
        log.warning("%s", w)
    if dry_run:
        outcomes = _dry_run(ordered, secrets)
        return BulkResult(
            bulk.path, tuple(outcomes), warnings, time.monotonic() - started, True, jobs, None
        )
    try:
        bulk.output_dir.mkdir(parents=True, exist_ok=True)
        for t in ordered:
            if t.error is None:
                t.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output directory: {e}") from e
    with _job_lock(bulk.output_dir):
        remove_stale_temporaries(bulk.report_path)
        report = _Report(bulk, tasks, ordered, jobs)
        report.write(finished=False, warnings=warnings, seconds=0.0)
        outcomes = _execute(ordered, jobs, report, warnings, secrets, progress, started)
        report.write(finished=True, warnings=warnings, seconds=time.monotonic() - started)
    return BulkResult(
        bulk.path,
        tuple(outcomes),
        warnings,
        time.monotonic() - started,
        False,
        jobs,
        bulk.report_path,
    )


def _execute(
    ordered: Sequence[_Task],
    jobs: int,
    report: _Report,
    warnings: Sequence[str],
    secrets: Sequence[str],
    progress: Callable[[BulkProgress], None] | None,
    started: float,
) -> list[TableOutcome]:
    """Run the tasks, ``jobs`` processes at a time; record each outcome as it comes."""
    events: queue.Queue[tuple[int, str]] = queue.Queue()
    counter = itertools.count()
    # Tables that cannot run (missing, no server) are reported first: they take no worker.
    todo = [t for t in ordered if t.error is not None] + [t for t in ordered if t.error is None]
    running: dict[int, _Running] = {}
    outcomes: list[TableOutcome] = []
    base_rows = base_bytes = 0  # of finished tables: what was on disk before this run
    last_report = 0.0

    def finish(task: _Task, outcome: TableOutcome) -> None:
        outcome = replace(
            outcome,
            errors=tuple(_in_plan_terms(redact(e, *secrets)) for e in outcome.errors),
            warnings=tuple(_in_plan_terms(w) for w in outcome.warnings),
        )
        outcomes.append(outcome)
        report.set(task, outcome)
        report.write(finished=False, warnings=warnings, seconds=time.monotonic() - started)
        if not outcome.ok:
            log.debug("%s failed: %s", task.table, "; ".join(outcome.errors))

    def emit(done: bool = False) -> None:
        if progress is None:
            return
        finished_rows = sum(o.rows for o in outcomes)
        finished_bytes = sum(o.bytes for o in outcomes)
        live = [r.progress for r in running.values()]
        estimate = finished_rows + sum(max(p.estimated_rows or 0, p.rows) for p in live)
        estimate += sum(t.estimated_rows or 0 for t in todo)
        progress(
            BulkProgress(
                tables=len(ordered),
                outcomes=tuple(outcomes),
                running=tuple(live),
                rows=finished_rows + sum(p.rows for p in live),
                bytes=finished_bytes + sum(p.bytes for p in live),
                start_rows=base_rows + sum(p.start_rows for p in live),
                start_bytes=base_bytes + sum(p.start_bytes for p in live),
                estimated_rows=estimate or None,
                elapsed=time.monotonic() - started,
                done=done,
            )
        )

    try:
        while todo or running:
            changed = False
            while todo and len(running) < jobs:
                task = todo.pop(0)
                changed = True
                if task.error is not None:
                    finish(task, _outcome(task, "failed", errors=(task.error,)))
                    continue
                index = next(counter)
                running[index] = _Running(task, index, events)
            if changed:
                emit()
            try:
                index, line = events.get(timeout=0.25)
            except queue.Empty:
                index, line = -1, ""
            while index in running:
                r = running[index]
                if line != "EOF":
                    r.handle(line, secrets)
                else:
                    code = r.proc.wait()
                    del running[index]
                    if r.result is not None:
                        outcome = _from_result(r.task, r.result)
                        if outcome.status == "skipped":
                            base_rows += outcome.rows
                            base_bytes += outcome.bytes
                        else:
                            base_rows += r.progress.start_rows
                            base_bytes += r.progress.start_bytes
                    else:
                        outcome = _outcome(
                            r.task,
                            "failed",
                            errors=(r.error or _died(code),),
                            seconds=time.monotonic() - r.started,
                        )
                    finish(r.task, outcome)
                    changed = True
                try:
                    index, line = events.get_nowait()
                except queue.Empty:
                    break
            now = time.monotonic()
            if changed or now - last_report >= 0.25:
                last_report = now
                emit()
    except BaseException:
        _stop(list(running.values()))
        for r in running.values():
            report.set(r.task, _outcome(r.task, "failed", errors=("interrupted",)))
        with contextlib.suppress(Exception):
            report.write(finished=False, warnings=warnings, seconds=time.monotonic() - started)
        raise
    emit(done=True)
    return outcomes


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name}"
        if exitcode == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with status {exitcode}"
    return (
        f"the worker process exporting it {how}; its checkpoint is intact, run the same "
        "command again to resume"
    )


def _stop(running: Sequence[_Running]) -> None:
    """Terminate the workers (their own workers die with them) and wait for them."""
    for r in running:
        r.stop()
    deadline = time.monotonic() + 5.0
    for r in running:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _dry_run(tasks: Sequence[_Task], secrets: Sequence[str]) -> list[TableOutcome]:
    """Plan each table on its server (no file is touched) and say what would happen."""
    conns: dict[str, psycopg.Connection[Any] | str] = {}
    out: list[TableOutcome] = []
    try:
        for t in tasks:
            if t.error is not None:
                out.append(_outcome(t, "refused", errors=(redact(t.error, *secrets),)))
                continue
            dsn = t.entry.dsn or ""
            conn = conns.get(dsn)
            if conn is None:
                target = Target(dsn)
                try:
                    conn = connect(target)
                except psycopg.Error as e:
                    conn = redact(str(connect_error(e, target)), *secrets)
                conns[dsn] = conn
            if isinstance(conn, str):
                out.append(_outcome(t, "refused", errors=(conn,)))
                continue
            try:
                p = introspect(
                    conn,
                    t.table,
                    key=list(t.entry.key) if t.entry.key else None,
                    columns=list(t.entry.columns) if t.entry.columns else None,
                    where=t.entry.where,
                )
            except (CopystreamError, psycopg.Error) as e:
                why = _in_plan_terms(redact(str(e).strip().split("\n")[0], *secrets))
                out.append(_outcome(t, "refused", errors=(why,)))
                continue
            note, refused = _file_state(t.output)
            out.append(
                replace(
                    _outcome(
                        t, "refused" if refused else "ready", errors=(note,) if refused else ()
                    ),
                    key=p.key,
                    key_source=_key_source(p.key_source),
                    estimated_rows=p.estimated_rows,
                    estimated_bytes=p.estimated_bytes,
                    warnings=tuple(_in_plan_terms(w) for w in p.warnings),
                    note=note,
                )
            )
    finally:
        for c in conns.values():
            if not isinstance(c, str):
                c.close()
    return out


def _file_state(output: Path) -> tuple[str, bool]:
    """What the files beside ``output`` say about its export, and whether it would be refused."""
    cp = checkpoint_path(output)
    parts = output.with_name(output.name + ".parts.json")
    if cp.exists() or parts.exists():
        try:
            rows = int(json.loads(cp.read_bytes()).get("rows", 0)) if cp.exists() else 0
        except (OSError, ValueError, TypeError, AttributeError):
            rows = 0
        return (f"resumes after {rows:,} rows" if rows else "resumes"), False
    if manifest_path(output).exists():
        return "finished (re-verified; skipped if unchanged)", False
    if os.path.lexists(output):
        return f"{output} exists and has no checkpoint to resume from", True
    return "new", False


# -- showing it ---------------------------------------------------------------------------------


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _table(rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_dry_run(result: BulkResult) -> str:
    """The resolved plan, in the order the tables would run, as the command prints it."""
    ready = [t for t in result.tables if t.ok]
    head = (
        f"plan {result.plan}: {len(result.tables)} tables, {len(ready)} ready, "
        f"{len(result.failed)} refused; {result.jobs} at a time, largest first"
    )
    lines = [head]
    if ready:
        rows = [["TABLE", "KEY (FROM)", "EST. ROWS", "EST. SIZE", "OUTPUT", "STATE"]]
        for t in ready:
            rows.append(
                [
                    t.table,
                    f"{', '.join(t.key)} ({t.key_source})",
                    _num(t.estimated_rows),
                    _mb(t.estimated_bytes),
                    str(t.output),
                    t.note,
                ]
            )
        lines += _table(rows, {2, 3})
    if result.failed:
        lines.append("would be refused:")
        lines += [f"  {t.table} ({t.entry}): {'; '.join(t.errors)}" for t in result.failed]
    lines += [f"warning: {w}" for w in result.warnings]
    return "\n".join(lines)


def format_summary_table(result: BulkResult) -> str:
    """The table of outcomes and the totals line printed at the end of a job."""
    rows = [["TABLE", "STATUS", "ROWS", "SIZE", "SECONDS", "RETRIES", "OUTPUT"]]
    for t in result.tables:
        status = t.status + (" (resumed)" if t.resumed else "")
        rows.append(
            [
                t.table,
                status,
                _num(t.rows) if t.ok else "-",
                _mb(t.bytes) if t.ok else "-",
                f"{t.seconds:.1f}",
                str(t.retries),
                str(t.output) if t.ok else "",
            ]
        )
    lines = _table(rows, {2, 3, 4, 5}) if result.tables else []
    totals = _totals(result.tables)
    lines.append(
        f"{totals['tables']} tables: {totals['done']} done, {totals['skipped']} skipped, "
        f"{totals['failed']} failed; {totals['rows']:,} rows, {_mb(totals['bytes'])} "
        f"in {result.seconds:.1f}s"
        + (f"; report {result.report}" if result.report is not None else "")
    )
    return "\n".join(lines)


def _describe(o: TableOutcome) -> str:
    if o.status == "failed":
        return f"{o.table}: FAILED: {'; '.join(o.errors)}"
    how = "already complete, skipped" if o.status == "skipped" else "done"
    resumed = " (resumed)" if o.resumed else ""
    return f"{o.table}: {how}{resumed}, {o.rows:,} rows, {_mb(o.bytes)} in {o.seconds:.1f}s"


class BulkLogReporter:
    """Progress of a bulk job as log lines: one per table started or finished, and every
    ``interval`` seconds one for the whole job (for cron and Airflow task logs)."""

    def __init__(self, interval: float = 30.0, logger: logging.Logger | None = None) -> None:
        self.interval = interval
        self.logger = logger or log
        self._seen = 0
        self._running: set[str] = set()
        self._last = time.monotonic()

    def __call__(self, p: BulkProgress) -> None:
        """Receive one snapshot of the job."""
        for o in p.outcomes[self._seen :]:
            level = logging.WARNING if not o.ok else logging.INFO
            self.logger.log(level, "%s", _describe(o))
        self._seen = len(p.outcomes)
        names = {r.table for r in p.running}
        for name in sorted(names - self._running):
            self.logger.info("%s: started", name)
        self._running = names
        now = time.monotonic()
        if p.done or now - self._last >= self.interval:
            self._last = now
            eta = f", ETA {p.eta:.0f}s" if p.eta is not None and not p.done else ""
            running = "; ".join(f"{r.table} {r.rows:,} rows" for r in p.running)
            self.logger.info(
                "job: %d/%d tables finished (%d failed), %s rows, %s, %s/s%s%s",
                p.finished,
                p.tables,
                p.failed,
                f"{p.rows:,}",
                _mb(p.bytes),
                _mb(p.rate),
                eta,
                f"; running: {running}" if running else "",
            )


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Any) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.console.print(self.format(record), markup=False, highlight=False)


class BulkBarReporter:
    """One live view of a bulk job on a terminal (rich): a bar for the whole job (tables, rows,
    MB, MB/s, time left) and a line per running table. Use it as a context manager; log lines
    of the ``copystream`` logger are printed above the view meanwhile."""

    def __init__(self, file: IO[str] | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:>12,.0f} rows"),
            TextColumn("{task.fields[mb]:>12}"),
            TextColumn("{task.fields[rate]:>12}"),
            TimeRemainingColumn(),
            console=Console(file=file, stderr=file is None),
            transient=False,
        )
        self._job: Any = None
        self._tasks: dict[str, Any] = {}
        self._handlers: list[logging.Handler] = []
        self._seen = 0

    def __enter__(self) -> BulkBarReporter:
        self._bar.start()
        self._handlers = log.handlers[:]
        handler = _ConsoleHandler(self._bar.console)
        if self._handlers and self._handlers[0].formatter is not None:
            handler.setFormatter(self._handlers[0].formatter)
        log.handlers[:] = [handler]
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()
        log.handlers[:] = self._handlers

    def __call__(self, p: BulkProgress) -> None:
        """Receive one snapshot of the job."""
        for o in p.outcomes[self._seen :]:
            self._bar.console.print(_describe(o), markup=False, highlight=False)
        self._seen = len(p.outcomes)
        desc = f"[bold]job {p.finished}/{p.tables} tables" + (
            f" [red]({p.failed} failed)" if p.failed else ""
        )
        total = max(p.estimated_rows or 0, p.rows) or None
        mb, rate = _mb(p.bytes), _mb(p.rate) + "/s"
        if self._job is None:
            self._job = self._bar.add_task(desc, total=total, mb=mb, rate=rate)
        self._bar.update(
            self._job, description=desc, completed=p.rows, total=total, mb=mb, rate=rate
        )
        names = {r.table for r in p.running}
        for name in list(self._tasks):
            if name not in names:
                self._bar.remove_task(self._tasks.pop(name))
        for r in p.running:
            t_total = max(r.estimated_rows or 0, r.rows) or None
            mb, rate = _mb(r.bytes), _mb(r.rate) + "/s"
            if r.table not in self._tasks:
                self._tasks[r.table] = self._bar.add_task(
                    f"  {r.table}", total=t_total, mb=mb, rate=rate
                )
            self._bar.update(
                self._tasks[r.table], completed=r.rows, total=t_total, mb=mb, rate=rate
            )
