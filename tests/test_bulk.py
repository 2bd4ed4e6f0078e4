"""Bulk migrations: ``copystream bulk PLAN.toml`` and :func:`copystream.run_bulk`.

A plan is validated as a whole before anything happens (every problem reported at once, with its
line, exit 2, nothing written); patterns are resolved like ``pg_dump -t`` against a real schema
(quoted names, excludes, partitions left to their parent, explicit entries win); the job runs the
tables through ``export_table`` in worker processes, survives a SIGKILL of the coordinator (no
worker outlives it) and resumes; every output is byte for byte psql's ``\\copy``; a failing table
does not stop the others; the report agrees with the manifests; and the library returns what the
command reports.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from helpers import (
    alive,
    assert_one_error_line,
    cli,
    read_manifest,
    run,
    scratch_database,
    write_plan,
    xxh,
)

import copystream
import copystream.errors
from copystream.bulk import (
    PlanError,
    Relation,
    match_pattern,
    order_largest_first,
    parse_name_pattern,
    parse_plan,
)
from copystream.bulk.run import WORKER_RESTARTS
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]

SCHEMA = r"""
CREATE SCHEMA sales;
CREATE SCHEMA "Mixed";

CREATE TABLE public.orders (id bigint PRIMARY KEY, customer int, total numeric(12, 2),
                            placed timestamptz, note text);
INSERT INTO public.orders
SELECT g, g % 997, (g * 7 % 100000) / 100.0, timestamptz '2024-01-01' + g * interval '37 s',
       CASE g % 5 WHEN 0 THEN NULL WHEN 1 THEN 'say "hi", then go' WHEN 2 THEN E'two\nlines'
                  ELSE 'n' || g END
FROM generate_series(1, 120000) g;

CREATE TABLE sales."Order Items" (order_id int, line int, sku text NOT NULL, qty int,
                                  PRIMARY KEY (order_id, line));
INSERT INTO sales."Order Items" SELECT g / 4, g % 4, md5(g::text), g % 13
FROM generate_series(1, 30000) g;

CREATE TABLE sales.events (at timestamptz NOT NULL, seq int NOT NULL, payload jsonb);
INSERT INTO sales.events
SELECT timestamptz '2024-06-01' + (g / 3) * interval '1 min', g % 3,
       jsonb_build_object('n', g, 'tag', 'e' || g)
FROM generate_series(1, 15000) g;

CREATE TABLE sales.parted (id int, region text, amount numeric, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE sales.parted_eu PARTITION OF sales.parted FOR VALUES IN ('eu');
CREATE TABLE sales.parted_us PARTITION OF sales.parted FOR VALUES IN ('us');
INSERT INTO sales.parted SELECT g, CASE WHEN g % 3 = 0 THEN 'eu' ELSE 'us' END, g / 7.0
FROM generate_series(1, 12000) g;

CREATE TABLE sales.tmp_scratch (id int PRIMARY KEY);
CREATE TABLE sales.tmp_more (id int PRIMARY KEY);
CREATE VIEW sales.recent AS SELECT * FROM sales.events WHERE seq = 0;

CREATE TABLE "Mixed"."CamelTable" (id int PRIMARY KEY, "Value" text);
INSERT INTO "Mixed"."CamelTable" SELECT g, 'v' || g FROM generate_series(1, 500) g;

CREATE TABLE public.blobs (id uuid PRIMARY KEY, data bytea);
INSERT INTO public.blobs SELECT md5(g::text)::uuid, decode(md5(g::text), 'hex')
FROM generate_series(1, 3000) g;

CREATE TABLE public.empty (id int PRIMARY KEY);
ANALYZE;
"""

#: What psql is asked for, per exported table: the query and the COPY options.
REFERENCE = {
    "public.orders": ("SELECT * FROM public.orders ORDER BY id", "FORMAT csv"),
    'sales."Order Items"': (
        'SELECT * FROM sales."Order Items" ORDER BY order_id, line',
        "FORMAT csv, HEADER true",
    ),
    "sales.events": ("SELECT * FROM sales.events ORDER BY at, seq", "FORMAT csv"),
    "sales.parted": ("SELECT * FROM sales.parted ORDER BY id, region", "FORMAT csv"),
    '"Mixed"."CamelTable"': ('SELECT * FROM "Mixed"."CamelTable" ORDER BY id', "FORMAT csv"),
    "public.blobs": (
        "SELECT * FROM public.blobs WHERE data IS NOT NULL ORDER BY id",
        "FORMAT text",
    ),
    "public.empty": ("SELECT * FROM public.empty ORDER BY id", "FORMAT csv"),
}


@pytest.fixture(scope="module")
def shop(pg: EphemeralPostgres) -> Iterator[str]:
    """A database with tables of several shapes; the tests only read it."""
    with scratch_database(pg, SCHEMA) as dsn:
        yield dsn


#: The plan of the kill test: every shape above, one missing table, one pattern with excludes.
MIGRATION = """
[[tables]]
name = "public.orders"
chunk_rows = 500

[[tables]]
name = 'sales."Order Items"'
header = true
output = "items/order-items.csv"

[[tables]]
name = "sales.events"
key = ["at", "seq"]

[[tables]]
name = "public.does_not_exist"

[[tables]]
pattern = "sales.*"
exclude = ["sales.tmp_*", "sales.recent"]

[[tables]]
pattern = '"Mixed".*'

[[tables]]
name = "blobs"
format = "text"
where = "data IS NOT NULL"

[[tables]]
name = "public.empty"
"""


def bulk_cmd(plan: Path, *extra: str) -> list[str]:
    return cli("bulk", str(plan), "--no-progress", *extra)


def read_report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "copystream-report.json").read_bytes()))


def by_table(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["table"]: t for t in report["tables"]}


def assert_outputs_match_psql(
    shop: str, psql_csv: PsqlCsv, report: dict[str, Any], tables: list[str]
) -> None:
    rows = by_table(report)
    for table in tables:
        entry = rows[table]
        query, options = REFERENCE[table]
        data = Path(entry["output"]).read_bytes()
        assert data == psql_csv(shop, query, options), f"{table}: differs from psql"


def assert_report_matches_manifests(report: dict[str, Any]) -> None:
    """Every exported table: rows, bytes and digest as its manifest and the file say."""
    for t in report["tables"]:
        if t["status"] not in ("done", "skipped"):
            continue
        out = Path(t["output"])
        m = read_manifest(out)
        assert (t["rows"], t["bytes"], t["xxh3_128"]) == (m["rows"], m["bytes"], m["xxh3_128"])
        data = out.read_bytes()
        assert len(data) == t["bytes"] and xxh(data) == t["xxh3_128"]
        assert copystream.verify_file(out).rows == t["rows"]
    totals = report["totals"]
    assert totals["rows"] == sum(t["rows"] for t in report["tables"])
    assert totals["bytes"] == sum(t["bytes"] for t in report["tables"])
    assert totals["tables"] == len(report["tables"])


# -- the plan: pure validation ------------------------------------------------------------------


BAD_PLAN = """\
jobs = 4

[defaults]
chunk_rows = "lots"
output_dir = "out"

[[tables]]
name = "public.orders"
wher = "id > 5"
header = "yes"

[[tables]]
name = "PUBLIC.Orders"

[[tables]]
name = "public.a"
output = "same.csv"

[[tables]]
name = "public.b"
output = "same.csv"

[[tables]]
pattern = 'sales."Order'

[[tables]]
pattern = "a.b.c"
exclude = 5
"""


def test_parse_plan_reports_every_problem_with_its_line() -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(BAD_PLAN, source="plan.toml")
    problems = info.value.problems
    assert problems == (
        "plan.toml:1: jobs: unknown key",
        "plan.toml:4: defaults.chunk_rows: expected an integer >= 0, got 'lots'",
        "plan.toml:9: tables[0].wher: unknown key (did you mean 'where'?)",
        "plan.toml:10: tables[0].header: expected true or false, got 'yes'",
        "plan.toml:13: tables[1].name: 'PUBLIC.Orders' is named twice (also in tables[0])",
        "plan.toml:21: tables[3].output: 'same.csv' is also the output of tables[2]",
        "plan.toml:24: tables[4].pattern: 'sales.\"Order' is not a valid pattern: "
        "unterminated double quote",
        "plan.toml:27: tables[5].pattern: 'a.b.c' is not a valid pattern: too many dotted "
        "names (use schema.table)",
        "plan.toml:28: tables[5].exclude: expected a pattern or an array of patterns, got 5",
    )
    assert isinstance(info.value, copystream.UsageError) and info.value.exit_code == 2
    assert str(info.value).startswith("invalid plan (9 problems): plan.toml:1: jobs")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[[tables]]\n", "tables[0]: give either name = (one table) or pattern = (a pattern)"),
        ('[[tables]]\nname = "a"\npattern = "b"\n', "give either name ="),
        ('[[tables]]\nname = "sales.*"\n', "has wildcards: use pattern = for those"),
        ('[[tables]]\nname = "a"\nexclude = ["b"]\n', "tables[0].exclude: allowed only with"),
        ('[[tables]]\npattern = "a*"\noutput = "x.csv"\n', "tables[0].output: not allowed"),
        ('[[tables]]\nname = "a"\noutput_dir = "x"\n', "output_dir: allowed only in [defaults]"),
        ('[[tables]]\nname = "a"\nchunk_rows = -1\n', "chunk_rows: expected an integer >= 0"),
        ('[[tables]]\nname = "a"\nchunk_rows = true\n', "chunk_rows: expected an integer"),
        ('[[tables]]\nname = "a"\nworkers = 0\n', "workers: expected an integer >= 1"),
        ('[[tables]]\nname = "a"\nformat = "xml"\n', 'format: expected "csv" or "text"'),
        ('[[tables]]\nname = "a"\nkey = []\n', "key: expected a column name or an array"),
        ('[[tables]]\nname = "a"\ncolumns = "id"\n', "columns: expected a non-empty array"),
        ('[[tables]]\nname = "a"\nio_timeout = 0\n', "io_timeout: expected seconds >= 0.1"),
        ('[[tables]]\nname = "a"\noutput = "copystream-report.json"\n', "job report's name"),
        ('[[tables]]\nname = "a b"\n', "unquoted white space"),
        ('[[tables]]\npattern = "sales."\n', "empty schema or table name"),
        ("[defaults]\nname = 'x'\n[[tables]]\nname = 'a'\n", "not allowed in [defaults]"),
        ("[defaults]\ndsn = 'host=x password=hunter2 port=notaport'\n", "no [[tables]]"),
        ('[[tables]]\nname = "a"\n[[tables]]\nname = "b"\noutput = "a.csv"\n', ""),
        ("[[tables]\nname = 1", "not valid TOML"),
        ("", "the plan has no [[tables]] entry"),
    ],
)
def test_parse_plan_problems(body: str, needle: str) -> None:
    if not needle:  # two different tables, distinct outputs: valid
        plan = parse_plan(body, source="p.toml")
        assert [e.name for e in plan.entries] == ["a", "b"]
        return
    with pytest.raises(PlanError) as info:
        parse_plan(body, source="p.toml")
    assert any(needle in p for p in info.value.problems), info.value.problems
    assert "hunter2" not in str(info.value)


def test_defaults_merge_into_entries_and_map_to_export_table() -> None:
    plan = parse_plan(
        """
[defaults]
dsn = "host=db dbname=shop password=s3cret"
output_dir = "exports"
chunk_rows = 1000
header = true
retries = 9
force_quote = "*"

[[tables]]
name = "public.orders"
key = "id"
header = false
dsn = "host=other dbname=x"
statement_timeout = 30

[[tables]]
pattern = "sales.*"
exclude = "sales.tmp_*"
format = "text"
workers = 2
consistent = true
""",
        source="p.toml",
        base_dir=Path("/plans"),
    )
    assert plan.output_dir == Path("/plans/exports")
    orders, sales = plan.entries
    assert (orders.line, sales.line) == (10, 17)
    assert (
        orders.dsn == "host=other dbname=x" and sales.dsn == "host=db dbname=shop password=s3cret"
    )
    spec, run = orders.spec_for("public.orders"), orders.run
    assert spec.key == ("id",) and run.chunk_rows == 1000 and run.retries == 9
    assert run.statement_timeout == 30.0
    assert spec.options == copystream.CopyOptions(header=False, force_quote=True)
    assert sales.exclude == ("sales.tmp_*",)
    sspec, srun = sales.spec_for("sales.x"), sales.run
    assert sspec.options.format == "text" and sspec.options.header is True
    assert srun.workers == 2 and srun.consistent is True
    assert "s3cret" not in repr(plan)  # the DSN is kept out of repr
    assert "s3cret" in plan.secrets


def test_name_patterns_follow_pg_dump() -> None:
    p = parse_name_pattern('Sales."Order *"')
    assert p.matches("sales", "Order *") and not p.matches("sales", "Order Items")
    assert not p.matches("Sales", "Order *")  # unquoted folds to lower case
    star = parse_name_pattern("sales.tmp_*")
    assert star.wild and star.matches("sales", "tmp_") and star.matches("sales", "tmp_x.y")
    assert not star.matches("sales", "tmpx")  # "_" is literal, not a LIKE wildcard
    q = parse_name_pattern("t?")
    assert q.matches("any", "t1", visible=True) and not q.matches("any", "t1", visible=False)
    assert not q.matches("any", "t12")
    assert parse_name_pattern('"a""b"').matches("s", 'a"b')
    assert parse_name_pattern("x.y+z").matches("x", "y+z")  # regex characters are literal
    assert not parse_name_pattern("x.y+z").matches("x", "yyz")
    for bad in ('"open', "a.b.c", ".x", "x.", "", "a b"):
        with pytest.raises(ValueError):
            parse_name_pattern(bad)


def test_patterns_leave_out_partitions_and_system_schemas_and_excludes() -> None:
    def rel(oid: int, schema: str, name: str, **kw: Any) -> Relation:
        base: dict[str, Any] = dict(
            oid=oid,
            schema=schema,
            name=name,
            qualified=f"{schema}.{name}",
            relkind="r",
            partition=False,
            visible=schema == "public",
            system=False,
            estimated_rows=None,
            estimated_bytes=None,
        )
        base.update(kw)
        return Relation(**base)

    catalog = {
        r.oid: r
        for r in [
            rel(1, "sales", "a"),
            rel(2, "sales", "a_1", partition=True),
            rel(3, "sales", "tmp_x"),
            rel(4, "pg_catalog", "pg_class", system=True, visible=True),
            rel(5, "public", "a"),
        ]
    }
    plan = parse_plan(
        '[[tables]]\npattern = "sales.*"\nexclude = ["sales.tmp_*"]\n[[tables]]\npattern = "*"\n',
        source="p.toml",
    )
    assert [r.oid for r in match_pattern(plan.entries[0], catalog)] == [1]
    assert [r.oid for r in match_pattern(plan.entries[1], catalog)] == [5]  # visible, not system


# -- against a real schema ----------------------------------------------------------------------


def test_patterns_excludes_and_explicit_entries_resolve_on_the_server(
    shop: str, tmp_path: Path
) -> None:
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        """
[[tables]]
pattern = "sales.*"
exclude = ["sales.tmp_*"]

[[tables]]
name = 'sales."Order Items"'
output = "items.csv"
header = true

[[tables]]
pattern = '"Mixed".*'

[[tables]]
pattern = "Mixed.*"

[[tables]]
pattern = "orde?s"

[[tables]]
pattern = "nothing_here_*"
""",
    )
    result = copystream.run_bulk(plan, dry_run=True)
    got = {t.table: t for t in result.tables}
    assert set(got) == {
        'sales."Order Items"',
        "sales.events",
        "sales.parted",
        "sales.recent",
        '"Mixed"."CamelTable"',
        "public.orders",
    }
    # the explicit entry wins over the pattern that also matches it: its options apply
    items = got['sales."Order Items"']
    assert items.entry == "tables[1]" and items.output == tmp_path / "out" / "items.csv"
    assert got["sales.parted"].entry == "tables[0]"  # the parent, not parted_eu / parted_us
    assert got['"Mixed"."CamelTable"'].output == tmp_path / "out" / "Mixed.CamelTable.csv"
    assert got["public.orders"].entry == "tables[4]"
    # unquoted Mixed folds to "mixed": no such schema; and the other pattern matches nothing
    assert [w.split(": ", 1)[1] for w in result.warnings] == [
        "tables[3]: pattern 'Mixed.*' matches no table",
        "tables[5]: pattern 'nothing_here_*' matches no table",
    ]
    assert result.warnings[0].startswith(f"{plan}:18: ")
    assert got["sales.recent"].status == "refused"  # a view without a key
    assert "no primary key" in got["sales.recent"].errors[0]
    assert not (tmp_path / "out").exists()


def test_largest_first(shop: str, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.toml", shop, '[[tables]]\npattern = "public.*"\n')
    result = copystream.run_bulk(plan, dry_run=True)
    names = [t.table for t in result.tables]
    assert names[:2] == ["public.orders", "public.blobs"]
    sizes = [t.estimated_bytes or 0 for t in result.tables]
    assert sizes == sorted(sizes, reverse=True)
    assert order_largest_first([]) == []


def test_dry_run_prints_the_resolved_plan_and_writes_nothing(shop: str, tmp_path: Path) -> None:
    plan = write_plan(tmp_path / "plan.toml", shop, MIGRATION, chunk_rows=2000)
    proc = run(cli("bulk", str(plan), "--dry-run", "--jobs", "3"))
    assert proc.returncode == 1, proc.stderr  # a table would be refused
    out = proc.stdout
    assert "8 tables, 7 ready, 1 refused; 3 at a time, largest first" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith(" ")}
    assert "id (primary key)" in lines["public.orders"]
    assert "120,000" in lines["public.orders"]
    assert str(tmp_path / "out" / "public.orders.csv") in lines["public.orders"]
    assert "at, seq (the plan's key)" in lines["sales.events"]
    assert "order_id, line (primary key)" in lines['sales."Order']
    assert str(tmp_path / "out" / "items" / "order-items.csv") in lines['sales."Order']
    assert " new" in lines["public.orders"]
    assert "would be refused:" in out
    assert "public.does_not_exist (tables[3]): table public.does_not_exist does not exist" in out
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("copystream: error: ")]
    assert len(err) == 1 and "public.does_not_exist" in err[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


def test_invalid_plan_exits_2_listing_every_problem_and_writes_nothing(
    shop: str, tmp_path: Path
) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text(BAD_PLAN.replace("jobs = 4\n", f"jobs = 4\n# {shop}\n"))
    proc = run(cli("bulk", str(plan), "--jobs", "2"))
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 9 and all(ln.startswith("copystream: error: ") for ln in lines)
    assert f"{plan}:11: tables[0].header" in lines[3]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]
    # a missing plan file is one line, exit 2
    missing = run(cli("bulk", str(tmp_path / "nope.toml")))
    assert_one_error_line(missing, 2, "nope.toml: plan file does not exist")


def test_two_tables_resolving_to_one_output_is_a_plan_error(shop: str, tmp_path: Path) -> None:
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        '[[tables]]\nname = "orders"\n'
        '[[tables]]\nname = "blobs"\noutput = "public.orders.csv"\n'
        '[[tables]]\nname = "public.empty"\n'
        '[[tables]]\nname = "empty"\n',
    )
    with pytest.raises(PlanError) as info:
        copystream.run_bulk(plan)
    text = str(info.value)
    assert "public.empty is also named in tables[2]" in text
    assert "would both be written to" in text  # only known once "orders" is resolved
    proc = run(cli("bulk", str(plan)))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.toml"]


# -- the job ------------------------------------------------------------------------------------


@contextlib.contextmanager
def background(cmd: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                with contextlib.suppress(psutil.Error):
                    for p in psutil.Process(proc.pid).children(recursive=True):
                        p.kill()
                proc.kill()
            proc.wait(timeout=60)


def chunks_in_checkpoints(out: Path) -> int:
    total = 0
    for cp in out.rglob("*.checkpoint.json"):
        with contextlib.suppress(OSError, ValueError):
            total += len(json.loads(cp.read_bytes())["chunks"])
    return total


def test_sigkill_midway_then_rerun_is_byte_identical_and_reports_the_missing_table(
    shop: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    plan = write_plan(tmp_path / "plan.toml", shop, MIGRATION, chunk_rows=2000)
    out = tmp_path / "out"
    workers: dict[int, tuple[psutil.Process, str]] = {}

    def collect(pid: int) -> None:
        """Remember every descendant of the job (with its command line, read while alive)."""
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(pid).children(recursive=True):
                if p.pid not in workers:
                    with contextlib.suppress(psutil.Error):
                        workers[p.pid] = (p, " ".join(p.cmdline()))

    with background(bulk_cmd(plan, "--jobs", "2")) as proc:
        deadline = time.monotonic() + 120
        while chunks_in_checkpoints(out) < 1:
            collect(proc.pid)
            assert proc.poll() is None, "the job ended before the kill point"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        collect(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert workers, "no worker process seen"  # (forked from the job: its command line)
    deadline = time.monotonic() + 20
    while any(alive(p) for p, _ in workers.values()):
        assert time.monotonic() < deadline, "a worker process outlived the killed job"
        time.sleep(0.01)

    # killed mid-way: some table unfinished, its checkpoint on disk
    unfinished = [cp for cp in out.rglob("*.checkpoint.json")]
    assert unfinished, "the kill came after every table had finished"
    killed_report = read_report(out)
    assert killed_report["finished"] is False

    proc2 = run(bulk_cmd(plan, "--jobs", "2"), timeout=300)
    assert proc2.returncode == 1, proc2.stderr
    errors = [ln for ln in proc2.stderr.splitlines() if ln.startswith("copystream: error: ")]
    assert errors == [
        "copystream: error: public.does_not_exist (tables[3]): table public.does_not_exist "
        "does not exist (or is not visible with the current search_path)"
    ]
    assert "Traceback" not in proc2.stderr

    report = read_report(out)
    assert report["finished"] is True
    rows = by_table(report)
    assert set(rows) == {*REFERENCE, "public.does_not_exist"}
    assert rows["public.does_not_exist"]["status"] == "failed"
    assert "does not exist" in rows["public.does_not_exist"]["errors"][0]
    exported = [t for t in rows if t != "public.does_not_exist"]
    assert all(rows[t]["status"] in ("done", "skipped") for t in exported)
    assert any(rows[t]["resumed"] for t in exported), "nothing was resumed"
    assert report["totals"]["failed"] == 1
    assert report["totals"]["done"] + report["totals"]["skipped"] == len(exported)
    assert_outputs_match_psql(shop, psql_csv, report, exported)
    assert_report_matches_manifests(report)
    assert rows["public.empty"]["rows"] == 0 and rows["public.orders"]["rows"] == 120_000
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".checkpoint.json", ".lock"))]
    assert leftovers == []
    assert (out / "copystream-report.json").stat().st_mode & 0o777 == 0o600
    assert shop not in (out / "copystream-report.json").read_text()
    # the summary on stdout names every table
    for t in exported:
        assert t in proc2.stdout

    # a third run: every verified table is skipped, nothing rewritten
    before = {t: Path(rows[t]["output"]).stat().st_mtime_ns for t in exported}
    proc3 = run(bulk_cmd(plan, "--jobs", "2"), timeout=300)
    assert proc3.returncode == 1
    again = by_table(read_report(out))
    assert {t: again[t]["status"] for t in exported} == dict.fromkeys(exported, "skipped")
    assert {t: Path(again[t]["output"]).stat().st_mtime_ns for t in exported} == before
    assert_report_matches_manifests(read_report(out))


def test_a_failing_table_does_not_stop_the_others(
    shop: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        """
[[tables]]
name = "public.orders"
where = "no_such_column > 0"

[[tables]]
name = '"Mixed"."CamelTable"'

[[tables]]
name = "public.blobs"
format = "text"
where = "data IS NOT NULL"
""",
    )
    proc = run(cli("bulk", str(plan)))  # stderr is not a terminal: progress as log lines
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("copystream: error: ")]
    assert len(errors) == 1
    assert "public.orders (tables[0])" in errors[0] and "no_such_column" in errors[0]
    assert "Traceback" not in proc.stderr
    logged = proc.stderr
    assert 'copystream INFO: "Mixed"."CamelTable": started' in logged
    assert 'copystream INFO: "Mixed"."CamelTable": done, 500 rows' in logged
    assert "copystream WARNING: public.orders: FAILED: invalid where filter" in logged
    assert "copystream INFO: job: 3/3 tables finished (1 failed), " in logged
    rows = by_table(read_report(tmp_path / "out"))
    assert rows["public.orders"]["status"] == "failed"
    assert not (tmp_path / "out" / "public.orders.csv").exists()
    assert rows['"Mixed"."CamelTable"']["status"] == "done"
    assert rows["public.blobs"]["status"] == "done"
    assert_outputs_match_psql(
        shop, psql_csv, read_report(tmp_path / "out"), ['"Mixed"."CamelTable"', "public.blobs"]
    )


def _bulk_workers(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The bulk job's worker processes running now (its children: forked from it, they have
    its command line)."""
    alive = []
    for p in psutil.Process(proc.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):  # (one that just exited)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def test_a_table_that_kills_every_worker_fails_alone_and_the_rerun_resumes(
    shop: str, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A table whose worker dies each time it is started again (here: killed three times) fails
    once its restarts are spent; the others finish, and a re-run resumes it."""
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        '[[tables]]\nname = "public.orders"\nchunk_rows = 300\n'
        '[[tables]]\nname = "public.blobs"\nformat = "text"\nwhere = "data IS NOT NULL"\n',
    )
    out = tmp_path / "out"
    with background(bulk_cmd(plan)) as proc:
        deadline = time.monotonic() + 120
        killed: set[int] = set()
        for _ in range(WORKER_RESTARTS + 1):
            chunks = chunks_in_checkpoints(out)
            while True:
                assert proc.poll() is None and time.monotonic() < deadline
                victims = [p for p in _bulk_workers(proc) if p.pid not in killed]
                if victims and chunks_in_checkpoints(out) > chunks:
                    break
                time.sleep(0.002)
            assert len(victims) == 1  # --jobs 1: the orders worker
            victims[0].kill()
            killed.add(victims[0].pid)
        assert proc.wait(timeout=120) == 1
    rows = by_table(read_report(out))
    assert rows["public.orders"]["status"] == "failed"
    assert "killed by SIGKILL" in rows["public.orders"]["errors"][0]
    assert rows["public.blobs"]["status"] == "done"
    proc2 = run(bulk_cmd(plan), timeout=300)
    assert proc2.returncode == 0, proc2.stderr
    report = read_report(out)
    again = by_table(report)
    assert again["public.orders"]["status"] == "done" and again["public.orders"]["resumed"]
    assert again["public.blobs"]["status"] == "skipped"
    assert_outputs_match_psql(shop, psql_csv, report, ["public.orders", "public.blobs"])
    assert_report_matches_manifests(report)


def test_a_server_that_cannot_be_reached_fails_its_tables_only(shop: str, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"host=127.0.0.1 port={port} dbname=x user=u password=Down-Pw-99 connect_timeout=2"
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        '[[tables]]\nname = "public.empty"\n'
        f'[[tables]]\nname = "public.far"\ndsn = "{down}"\n'
        f'[[tables]]\npattern = "far.*"\ndsn = "{down}"\n',
    )
    proc = run(bulk_cmd(plan))
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("copystream: error: ")]
    assert len(errors) == 2 and all("cannot connect to 127.0.0.1" in e for e in errors)
    assert "public.far (tables[1])" in errors[0] and "far.* (tables[2])" in errors[1]
    rows = by_table(read_report(tmp_path / "out"))
    assert rows["public.empty"]["status"] == "done"
    report = (tmp_path / "out" / "copystream-report.json").read_text()
    assert "Down-Pw-99" not in report + proc.stderr + proc.stdout
    # when no server of the plan can be reached, the command itself is wrong: exit 2, one line
    only_down = write_plan(tmp_path / "down.toml", down, '[[tables]]\nname = "t"\n', output_dir="d")
    proc2 = run(bulk_cmd(only_down))
    assert_one_error_line(proc2, 2, "cannot connect to 127.0.0.1")
    assert "Down-Pw-99" not in proc2.stderr and not (tmp_path / "d").exists()


def test_a_script_without_a_main_guard_runs_the_job_once(shop: str, tmp_path: Path) -> None:
    """Workers do not re-import the caller's __main__ (as multiprocessing's spawn would)."""
    plan = write_plan(
        tmp_path / "plan.toml",
        shop,
        '[[tables]]\nname = "public.empty"\n[[tables]]\npattern = \'"Mixed".*\'\n',
    )
    script = tmp_path / "nightly.py"
    script.write_text(
        "import sys\nimport copystream\n\n"
        "result = copystream.run_bulk(sys.argv[1], jobs=2)\n"
        "print('RESULT', result.exit_code, len(result.tables))\n"
    )
    proc = run([sys.executable, str(script), str(plan)])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["RESULT 0 2"]
    assert {t["status"] for t in read_report(tmp_path / "out")["tables"]} == {"done"}


def test_errors_cross_process_boundaries() -> None:
    """Errors pickle (they may cross from a worker process) with their message, remedy and
    exit code."""
    for name in copystream.errors.__all__:
        cls = getattr(copystream.errors, name)
        if not (isinstance(cls, type) and issubclass(cls, copystream.errors.CopystreamError)):
            continue
        err = pickle.loads(pickle.dumps(cls("what went wrong")))
        assert type(err) is cls and err.problem == "what went wrong"
        assert err.remedy is cls.remedy and str(err) == cls("what went wrong").worded()
        assert err.exit_code == cls.exit_code
        restart = copystream.errors.Remedy.RESTART
        moved = pickle.loads(pickle.dumps(cls("x", remedy=restart)))
        assert moved.remedy is restart and "--restart" in moved.worded("cli")
    plan_error = pickle.loads(pickle.dumps(PlanError(["p.toml:1: a", "p.toml:2: b"])))
    assert plan_error.problems == ("p.toml:1: a", "p.toml:2: b") and plan_error.exit_code == 2


def test_library_returns_what_the_command_reports(
    shop: str, pg: EphemeralPostgres, tmp_path: Path
) -> None:
    body = """
[[tables]]
name = "public.empty"

[[tables]]
pattern = '"Mixed".*'

[[tables]]
name = "public.nope"

[[tables]]
name = "sales.events"
key = ["at", "seq"]
"""
    plan_cli = write_plan(tmp_path / "cli.toml", shop, body, output_dir="cli")
    plan_lib = write_plan(tmp_path / "lib.toml", shop, body, output_dir="lib")
    proc = run(bulk_cmd(plan_cli, "--jobs", "2"))
    assert proc.returncode == 1
    seen: list[copystream.BulkProgress] = []
    result = copystream.run_bulk(plan_lib, jobs=2, progress=seen.append)
    assert result.exit_code == 1 and not result.ok
    assert [t.table for t in result.failed] == ["public.nope"]
    cli_rows = by_table(read_report(tmp_path / "cli"))
    lib_report = read_report(tmp_path / "lib")
    lib_rows = by_table(lib_report)
    assert set(cli_rows) == set(lib_rows) == {t.table for t in result.tables}
    for t in result.tables:
        c, lr = cli_rows[t.table], lib_rows[t.table]
        assert (t.status, t.rows, t.bytes, t.xxh3_128) == (
            c["status"],
            c["rows"],
            c["bytes"],
            c["xxh3_128"],
        )
        assert (lr["status"], lr["rows"], lr["xxh3_128"]) == (t.status, t.rows, t.xxh3_128)
        assert t.errors == tuple(c["errors"])
    assert result.report == tmp_path / "lib" / "copystream-report.json"
    assert seen and seen[-1].done and seen[-1].finished == len(result.tables)
    assert seen[-1].rows == sum(t.rows for t in result.tables)
    assert result.to_json()["totals"]["failed"] == 1
    # --only, from the library and the command
    only = copystream.run_bulk(plan_lib, only=["events"])
    assert [t.table for t in only.tables] == ["sales.events"]
    assert only.tables[0].status == "skipped" and only.exit_code == 0
    kept = by_table(read_report(tmp_path / "lib"))
    assert kept["public.nope"]["status"] == "failed"  # not run this time: kept from before
    bad = run(bulk_cmd(plan_cli, "--only", "public.nothing"))
    assert_one_error_line(bad, 2, "--only 'public.nothing' matches no table of the plan")


def test_passwords_never_reach_the_report_or_the_output(
    shop: str, pg: EphemeralPostgres, tmp_path: Path
) -> None:
    password = "Bulk-Secret-4711"
    user = f"bulk_{uuid.uuid4().hex[:8]}"
    pg.add_password_user(user, password)
    dbname = psycopg.conninfo.conninfo_to_dict(shop)["dbname"]
    user_dsn = pg.dsn_for(str(dbname), user=user, password=password)
    plan = write_plan(
        tmp_path / "plan.toml",
        user_dsn,
        '[[tables]]\nname = "public.nope"\n'
        '[[tables]]\nname = "public.orders"\nwhere = "bad_column = 1"\n',
    )
    proc = run(bulk_cmd(plan))
    assert proc.returncode == 1
    report_text = (tmp_path / "out" / "copystream-report.json").read_text()
    for text in (proc.stdout, proc.stderr, report_text):
        assert password not in text


def test_status_watches_a_bulk_job_from_its_plan(shop: str, tmp_path: Path) -> None:
    """``copystream status PLAN --watch`` draws the job from its report and the checkpoints of
    the tables not finished yet, and ends by itself when the job has finished; ``status PLAN``
    draws one frame, ``status --json PLAN`` prints the report. Before the job: one line, exit 2."""
    plan = write_plan(tmp_path / "plan.toml", shop, """
[[tables]]
name = "public.orders"
chunk_rows = 200

[[tables]]
name = "public.does_not_exist"

[[tables]]
name = "public.empty"
""")  # fmt: skip
    before = run(cli("status", str(plan)))
    assert_one_error_line(before, 2, "no job report at")
    job = subprocess.Popen(bulk_cmd(plan), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        report = tmp_path / "out" / "copystream-report.json"
        deadline = time.monotonic() + 60
        while not report.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        watcher = subprocess.run(
            cli("status", str(plan), "--watch", "--interval", "0.1"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 1  # one table failed
    assert watcher.returncode == 0, watcher.stderr
    frames = watcher.stdout.split(f"{plan}: ")[1:]
    assert frames, watcher.stdout
    final = read_report(tmp_path / "out")
    assert frames[-1].startswith(
        f"finished; 3 tables: 2 done, 0 skipped, 1 failed, 0 pending; "
        f"{final['totals']['rows']:,} rows"
    ), frames[-1]
    assert "  public.does_not_exist: failed: " in frames[-1]
    for f in frames[:-1]:  # the frames before: the job running, orders' rows as they came
        assert f.startswith("running; 3 tables: "), f
    # 600 chunks take seconds: the watcher, started once the job had begun, saw it run
    assert any("  public.orders: in progress, " in f for f in frames[:-1]), frames
    one = run(cli("status", str(tmp_path / "out")))
    assert one.returncode == 0 and one.stdout.startswith(f"{plan}: finished; 3 tables"), one
    as_json = run(cli("status", "--json", str(plan)))
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == final
