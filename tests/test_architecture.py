"""The architecture's promises, checked: options declared once, one worker entry module, errors
that cross the worker pool whole, functions that fit on a screen."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest

import copystream
from copystream.bulk.plan import _OPTIONS
from copystream.bulk.run import export_task
from copystream.cli import cli
from copystream.errors import Remedy, TableNotFound, UsageError
from copystream.pool import Task, run_tasks
from copystream.spec import ExportSpec, RunOptions, build, option_fields

RunSql = Callable[[str, str], list[tuple[Any, ...]]]

PACKAGE = Path(copystream.__file__).parent
#: The longest a function of the package may be (lines, decorators and docstring included).
LONGEST = 80


def _functions() -> list[tuple[str, int]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                assert node.end_lineno is not None
                name = f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}"
                out.append((name, node.end_lineno - first + 1))
    return out


def test_no_function_is_longer_than_a_screen() -> None:
    long = [f"{name} ({n} lines)" for name, n in _functions() if n > LONGEST]
    assert not long, f"functions over {LONGEST} lines: {long}"


def test_exactly_one_worker_entry_module() -> None:
    entries = [
        p.relative_to(PACKAGE)
        for p in PACKAGE.rglob("*.py")
        if "worker_main(" in p.read_text() and "sys.exit" in p.read_text()
    ]
    assert [str(e) for e in entries] == ["_worker.py"]


def _flags(command: click.Command) -> set[str]:
    return {o.name for o in command.params if isinstance(o, click.Option) and o.name}


def test_every_option_is_a_flag_a_plan_key_and_a_keyword() -> None:
    """The flags of `copystream export`, the keys of a bulk plan and export_table's keyword
    arguments all come from the declarations in copystream.spec."""
    declared = {name for name, _, _ in option_fields()}
    export = cli.commands["export"]  # type: ignore[attr-defined]
    assert _flags(export) == declared | {"dsn", "no_progress", "report", "verbose"}
    plan_keys = {name for name, opt, _ in option_fields() if opt.plan}
    assert set(_OPTIONS) == plan_keys | {"dsn"}
    # metrics_file: every table of a plan would write the same file; an increment to a file of
    # its own names its predecessor: not a plan's (fixed) key (a plan's watermark chain names
    # each file's predecessor itself: copystream.bulk.increments)
    assert plan_keys == declared - {"restart", "force", "metrics_file", "since"}
    for name, opt, default in option_fields():
        spec, run = build("t", **{name: default})
        assert (spec, run) == build("t"), name  # the default is the default everywhere
        assert opt.help and opt.kind.want


def test_unknown_or_wrong_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="did you mean 'chunk_rows'"):
        build("t", chunk_row=10)
    with pytest.raises(UsageError, match="workers: expected an integer >= 1"):
        build("t", workers=0)
    spec, run = build("t", key="id", header=True, retries=2, statement_timeout=5)
    assert spec.key == ("id",) and spec.options.header and run.retries == 2
    assert run.policy.retry_statement_timeout and run.policy.retries == 2


def test_the_export_signature_documents_its_options() -> None:
    doc = inspect.getdoc(copystream.export_table) or ""
    missing = [name for name, _, _ in option_fields() if name not in doc]
    assert not missing, f"export_table's docstring does not describe {missing}"


def test_identity_is_the_resolved_spec() -> None:
    a = ExportSpec("t").resolved("public.t", ["id"], ["bigint"], ["id", "v"])
    b = ExportSpec("public.t", key=("id",)).resolved("public.t", ["id"], ["integer"], ["id", "v"])
    assert a.identity()["key_types"] == ["bigint"] and a != b
    assert copystream.spec.identity_mismatch(a.identity(), b.identity()) == "key_types"


@pytest.mark.parametrize("remedy", list(Remedy))
def test_every_remedy_is_worded_for_every_audience(remedy: Remedy) -> None:
    words = {audience: remedy.words(audience) for audience in ("cli", "plan", "python")}
    assert len(set(words.values())) == 3, words
    assert "--" not in words["python"] and "--" not in words["plan"]


def test_a_usage_error_crosses_the_pool_with_its_class_and_remedy(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """In a bulk job's worker and in a range worker alike, a UsageError reaches the coordinator
    as its own class, with its problem and remedy (nothing is parsed back from text)."""
    run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    spec = ExportSpec("no_such_table")
    tasks = [
        Task(export_task, (dsn, spec, str(tmp_path / "a.csv"), RunOptions())),
        Task(copystream.run_export, (dsn, ExportSpec("t", key=("nope",)), str(tmp_path / "b"))),
    ]
    outcomes = {e.index: e for e in run_tasks(tasks, 2) if e.kind in ("done", "failed")}
    assert {e.kind for e in outcomes.values()} == {"failed"}
    missing, bad_key = outcomes[0].value, outcomes[1].value
    assert type(missing) is TableNotFound and "no_such_table" in missing.problem
    assert type(bad_key) is copystream.KeyProblem and bad_key.remedy is Remedy.CHOOSE_KEY
    assert "--key" in bad_key.worded("cli") and "key = in the plan" in bad_key.worded("plan")
    assert not list(tmp_path.iterdir())  # nothing left behind
