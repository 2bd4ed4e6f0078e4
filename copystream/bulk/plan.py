"""A bulk plan (pure): the TOML file parsed and validated into a :class:`BulkPlan` of
:class:`PlanEntry` values, every problem reported at once with its line (:class:`PlanError`)."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..connection import Target
from ..errors import CopystreamError, UsageError
from ..spec import CopyOptions
from .names import parse_name_pattern

#: The job report, in the plan's output directory.
REPORT_NAME = "copystream-report.json"


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
