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
from ..spec import Compression, ExportSpec, RunOptions, build, option_fields
from .names import parse_name_pattern
from .s3 import S3Path, s3_entry_problems, s3_prefix_problem

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

    Exactly one of ``name`` (one table) and ``pattern`` (any number) is set. ``spec`` and
    ``run`` hold the entry's export options (``spec.table`` is left empty: each table the
    entry selects fills it in, :meth:`spec_for`); ``explicit`` names the options the plan set
    for it (in the entry or in ``[defaults]``), the others having their defaults.
    ``consistent`` in ``[defaults]`` is the job's (:attr:`BulkPlan.consistent`), not merged in:
    ``run.consistent`` is the entry's own (a snapshot of its own per table; ``consistent =
    false`` in an entry keeps its tables out of the job's snapshot).
    """

    index: int  # position in the plan's tables array (0-based)
    line: int | None  # line of its [[tables]] header, when known
    name: str | None
    pattern: str | None
    exclude: tuple[str, ...] = ()
    output: str | None = None  # as written (relative to the output directory)
    dsn: str | None = field(default=None, repr=False)
    spec: ExportSpec = field(default_factory=lambda: ExportSpec(""))
    run: RunOptions = field(default_factory=RunOptions)
    explicit: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """``tables[N]``: how messages and the report refer to this entry."""
        return f"tables[{self.index}]"

    def spec_for(self, table: str) -> ExportSpec:
        """What this entry exports of ``table``."""
        return replace(self.spec, table=table)


@dataclass(frozen=True)
class BulkPlan:
    """A validated plan: where it came from, where the files go, and its entries in order.

    ``consistent`` (``consistent = true`` in ``[defaults]``): the whole job reads one snapshot,
    held for it from start to end, as ``pg_dump`` does.
    """

    path: Path
    output_dir: Path
    entries: tuple[PlanEntry, ...]
    consistent: bool = False

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


#: TOML's name for each Python type tomllib returns, in the order to test them (bool is an int).
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _toml_type(v: object) -> str:
    return next((name for t, name in _TOML_TYPES if isinstance(v, t)), type(v).__name__)


def _nonempty(v: object) -> bool:
    return isinstance(v, str) and bool(v)


def _names(v: object) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) and x for x in v)


#: Options allowed in ``[defaults]`` and in each ``[[tables]]`` entry, with their checks: the
#: export options a plan may set (declared in copystream.spec), and the connection string.
_OPTIONS: dict[str, Callable[[object], str | None]] = {
    "dsn": _check_dsn,
    **{name: _check(opt.kind.ok, opt.kind.want) for name, opt, _ in option_fields() if opt.plan},
}
def _local(v: object) -> bool:
    """Not an S3 URL: a table's ``output`` is relative to the job's output directory."""
    return _nonempty(v) and not str(v).startswith("s3://")


def _directory(v: object) -> bool:
    """A local directory, or an S3 prefix ``s3://bucket/prefix`` (see :mod:`.s3`)."""
    return _nonempty(v) and (not str(v).startswith("s3://") or s3_prefix_problem(str(v)) is None)


_DEFAULTS_ONLY: dict[str, Callable[[object], str | None]] = {
    "output_dir": _check(_directory, "a local directory path or s3://BUCKET/PREFIX"),
}
_ENTRY_ONLY: dict[str, Callable[[object], str | None]] = {
    "name": _check(_nonempty, "a table name"),
    "pattern": _check(_nonempty, "a table name pattern"),
    "exclude": _check(lambda v: _nonempty(v) or _names(v), "a pattern or an array of patterns"),
    "output": _check(
        lambda v: _local(v) and not str(v).endswith("/"),
        "a path relative to output_dir (not a directory, nor an s3:// URL)",
    ),
}
#: Every key allowed in ``[defaults]`` and in a ``[[tables]]`` entry, with its check.
_DEFAULTS_KEYS = {**_OPTIONS, **_DEFAULTS_ONLY}
_ENTRY_KEYS = {**_OPTIONS, **_ENTRY_ONLY}


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


def default_output(schema: str, table: str, fmt: str, compress: object = None) -> str:
    """``<schema>.<table>.csv`` (``.txt`` for the text format, ``.parquet`` for a Parquet
    dataset), with ``/`` made safe, and the suffix of the ``compress`` option (``.zst``,
    ``.gz``) when it compresses. Pure."""
    ext = {"text": "txt", "parquet": "parquet"}.get(fmt, "csv")
    return f"{schema}.{table}.{ext}{_suffix(compress)}".replace("/", "_")


def _suffix(compress: object) -> str:
    if isinstance(compress, str):
        try:
            compress = Compression.parse(compress)
        except ValueError:
            return ""  # reported as a problem of its own
    return compress.suffix if isinstance(compress, Compression) else ""


class _Problems:
    """The problems found in a plan, each with its place: all reported at once, in file order."""

    def __init__(self, source: str, loc: _Locator) -> None:
        self.source = source
        self.loc = loc
        self.found: list[tuple[int, str]] = []  # (line, problem)

    def add(self, where: str, key: str | None, message: str) -> None:
        """Record ``message`` about ``key`` of ``where`` ("top", "defaults" or "tables[N]")."""
        line = self.loc.at(where, key)
        place = f"{self.source}:{line}" if line is not None else self.source
        path = where if where != "top" else ""
        if key is not None:
            path = f"{path}.{key}" if path else key
        text = f"{place}: {path}: {message}" if path else f"{place}: {message}"
        self.found.append((line or 0, text))

    def add_unplaced(self, message: str) -> None:
        """Record a problem of the whole file (it sorts first)."""
        self.found.append((0, f"{self.source}: {message}"))

    def unknown(self, where: str, key: str, allowed: Sequence[str]) -> None:
        """Record an unknown key, with the closest allowed one as a hint."""
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.add(where, key, f"unknown key{hint}")

    def raise_if_any(self) -> None:
        """Raise :class:`PlanError` listing every problem by line, if there is any."""
        if self.found:
            raise PlanError([text for _, text in sorted(self.found, key=lambda f: f[0])])


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
    problems = _Problems(source, _Locator(text))
    for key in doc:
        if key not in ("defaults", "tables"):
            problems.unknown("top", key, ["defaults", "tables"])
    defaults = _parse_defaults(doc.get("defaults", {}), problems)
    where = str(defaults.get("output_dir", "."))
    output_dir = S3Path(where) if where.startswith("s3://") else base / where
    consistent = bool(defaults.pop("consistent", False))  # the job's, not each table's
    checker = _EntryChecker(problems, defaults, output_dir)
    entries = [checker.check(i, raw) for i, raw in enumerate(_tables_array(doc, problems))]
    if isinstance(output_dir, S3Path):
        for entry in entries:
            if entry is not None:
                for key, why in s3_entry_problems(entry.spec, entry.run):
                    problems.add(entry.label, key, why)
    problems.raise_if_any()
    kept = tuple(e for e in entries if e is not None)
    return BulkPlan(
        path=Path(source), output_dir=output_dir, entries=kept, consistent=consistent
    )


def _parse_defaults(raw: object, problems: _Problems) -> dict[str, Any]:
    """The ``[defaults]`` that pass their checks."""
    if not isinstance(raw, dict):
        problems.add("top", "defaults", "expected a table ([defaults])")
        return {}
    why = "not allowed in [defaults] (it belongs in a [[tables]] entry)"
    return _checked_keys(problems, "defaults", raw, _DEFAULTS_KEYS, elsewhere=_ENTRY_ONLY, why=why)


def _checked_keys(
    problems: _Problems,
    where: str,
    raw: Mapping[str, Any],
    allowed: Mapping[str, Callable[[object], str | None]],
    *,
    elsewhere: Mapping[str, object],
    why: str,
) -> dict[str, Any]:
    """The keys of ``raw`` that pass their checks; the others are recorded as problems (``why``
    for the keys that belong ``elsewhere``)."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        check = allowed.get(key)
        if check is None:
            if key in elsewhere:
                problems.add(where, key, why)
            else:
                problems.unknown(where, key, list(allowed))
            continue
        msg = check(value)
        if msg:
            problems.add(where, key, msg)
        else:
            values[key] = value
    return values


def _tables_array(doc: Mapping[str, Any], problems: _Problems) -> list[Any]:
    """The ``[[tables]]`` array (empty, with a problem recorded, when missing or not one)."""
    raw = doc.get("tables")
    if raw is None:
        problems.add_unplaced("the plan has no [[tables]] entry: nothing to export")
        return []
    if not isinstance(raw, list):
        problems.add("top", "tables", "expected an array of tables ([[tables]])")
        return []
    return raw


class _EntryChecker:
    """Checks the ``[[tables]]`` entries in order, remembering the names and outputs seen."""

    def __init__(self, problems: _Problems, defaults: dict[str, Any], output_dir: Path) -> None:
        self.problems = problems
        self.defaults = defaults
        self.output_dir = output_dir
        self.seen_names: dict[tuple[str | None, str], str] = {}  # folded name -> tables[N]
        self.seen_outputs: dict[str, str] = {}  # normalized path -> tables[N]

    def check(self, index: int, raw: object) -> PlanEntry | None:
        """Entry ``index`` with the defaults merged in (None if it is not a table at all)."""
        where = f"tables[{index}]"
        if not isinstance(raw, dict):
            self.problems.add(where, None, f"expected a table, got {_toml_type(raw)}")
            return None
        why = "allowed only in [defaults]"
        values = _checked_keys(
            self.problems, where, raw, _ENTRY_KEYS, elsewhere=_DEFAULTS_ONLY, why=why
        )
        self._check_selection(where, raw)
        name = values.get("name")
        named_twice = isinstance(name, str) and self._check_name(where, name)
        excludes = self._check_patterns(where, values)
        merged = {**self.defaults, **values}
        if isinstance(name, str) and not named_twice:
            fmt = str(merged.get("format", "csv"))
            self._check_output(where, name, values.get("output"), fmt, merged.get("compress"))
        return _entry(index, self.problems.loc.entry(index), merged, excludes)

    def _check_selection(self, where: str, raw: Mapping[str, Any]) -> None:
        """Exactly one of name and pattern; exclude only with a pattern, output only without."""
        if ("name" in raw) == ("pattern" in raw):
            self.problems.add(
                where, None, "give either name = (one table) or pattern = (a pattern)"
            )
        if "exclude" in raw and "pattern" not in raw:
            self.problems.add(where, "exclude", "allowed only with pattern =")
        if "output" in raw and "pattern" in raw:
            self.problems.add(
                where, "output", "not allowed with pattern = (each table gets its own file)"
            )

    def _check_name(self, where: str, name: str) -> bool:
        """Check an explicit table name; whether an earlier entry named the same table."""
        try:
            parsed = parse_name_pattern(name)
        except ValueError as e:
            self.problems.add(where, "name", f"{name!r} is not a valid table name: {e}")
        else:
            if parsed.wild:
                self.problems.add(where, "name", f"{name!r} has wildcards: use pattern = for those")
        folded = _fold_name(name)
        if folded is None:
            return False
        other = self.seen_names.get(folded)
        if other is not None:
            self.problems.add(where, "name", f"{name!r} is named twice (also in {other})")
            return True
        self.seen_names[folded] = where
        return False

    def _check_patterns(self, where: str, values: Mapping[str, Any]) -> list[str]:
        """Check the pattern and the excludes; the excludes as a list."""
        exclude = values.get("exclude", [])
        excludes = [exclude] if isinstance(exclude, str) else list(exclude)
        texts = [("pattern", values.get("pattern")), *(("exclude", x) for x in excludes)]
        for key, t in texts:
            if not isinstance(t, str):
                continue
            try:
                parse_name_pattern(t)
            except ValueError as e:
                self.problems.add(where, key, f"{t!r} is not a valid pattern: {e}")
        return excludes

    def _check_output(
        self, where: str, name: str, output: str | None, fmt: str, compress: object
    ) -> None:
        """Check that a named entry's output is its own and is not the job report."""
        # The default output is known before the server is asked only for a name with a
        # schema; the others are checked again once resolved (still before anything runs).
        folded = _fold_name(name)
        out = output
        if out is None and folded is not None and folded[0] is not None:
            out = default_output(folded[0], folded[1], fmt, compress)
        if out is None:
            return
        norm = os.path.normpath(self.output_dir / out)
        other = self.seen_outputs.get(norm)
        if other is not None:
            self.problems.add(where, "output", f"{out!r} is also the output of {other}")
        else:
            self.seen_outputs[norm] = where
        if Path(norm).name == REPORT_NAME:
            self.problems.add(where, "output", f"{REPORT_NAME} is the job report's name")


def _entry(index: int, line: int | None, v: Mapping[str, Any], exclude: list[str]) -> PlanEntry:
    options = {k: value for k, value in v.items() if k in _OPTIONS and k != "dsn"}
    spec, run = build("", **options)
    return PlanEntry(
        index=index,
        line=line,
        name=v.get("name"),
        pattern=v.get("pattern"),
        exclude=tuple(exclude),
        output=v.get("output"),
        dsn=v.get("dsn"),
        spec=spec,
        run=run,
        explicit=frozenset(options),
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
