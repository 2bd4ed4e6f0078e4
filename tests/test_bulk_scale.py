"""Bulk jobs at scale: planned once, run in long-lived workers, finished work skipped locally,
small tables in one COPY written atomically, and one snapshot for a whole job.

Against the real server: the tables of a plan are planned in a few catalog queries however many
there are, and the plans agree with a table-by-table introspection; the job opens a handful of
sessions, not one per table, and a finished job is re-checked without a session per table (the
server's own ``pg_stat_database.sessions`` counts them); small tables are byte for byte psql's
with the manifest of a chunked export, and a job killed at any moment finishes identical on the
next run; a lost connection between tables is re-established; and a writer keeping three tables'
sums equal cannot unbalance an export that reads one snapshot for the job, while it does unbalance
one that does not.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest
from helpers import assert_one_error_line, cli, read_manifest, run, write_plan, xxh

import copystream
from copystream.bulk import parse_plan, share_workers
from copystream.bulk.plan import PlanEntry
from copystream.bulk.resolve import SPLIT_BYTES, _Task
from copystream.catalog import introspect, introspect_many
from copystream.spec import CopyOptions, ExportSpec

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

#: Tables of several shapes in schema ``s``: a float key (its text needs extra_float_digits), a
#: text key, a composite key, a timestamptz key, an empty one, one without key (refused).
SHAPES = """
CREATE SCHEMA s;
CREATE TABLE s.floaty (k double precision PRIMARY KEY, v text);
INSERT INTO s.floaty SELECT g / 7.0, 'f' || g FROM generate_series(1, 300) g;
CREATE TABLE s.texty (k text PRIMARY KEY, v int);
INSERT INTO s.texty SELECT md5(g::text), g FROM generate_series(1, 300) g;
CREATE TABLE s.pair (a int, b int, v text, PRIMARY KEY (a, b));
INSERT INTO s.pair SELECT g % 10, g, 'line ' || g || E'\\nsecond, "quoted"'
FROM generate_series(1, 300) g;
CREATE TABLE s.times (at timestamptz PRIMARY KEY, v numeric);
INSERT INTO s.times SELECT timestamptz '2024-01-01' + g * interval '1 h', g / 3.0
FROM generate_series(1, 300) g;
CREATE TABLE s.empty (id int PRIMARY KEY);
CREATE TABLE s.nokey (v int);
"""


def many_tables(n: int, rows: int = 50, schema: str = "m") -> str:
    """``n`` small tables ``schema.t000..`` with a few types, analyzed."""
    return f"""
CREATE SCHEMA {schema};
DO $$ BEGIN
FOR i IN 0..{n - 1} LOOP
  EXECUTE format('CREATE TABLE {schema}.t%s (id int PRIMARY KEY, name text, amount numeric,
                  at timestamptz)', lpad(i::text, 3, '0'));
  EXECUTE format('INSERT INTO {schema}.t%s SELECT g, md5(g::text) || '', "x"'', g / 7.0,
                  timestamptz ''2024-01-01'' + g * interval ''1 min''
                  FROM generate_series(1, {rows} + %s) g', lpad(i::text, 3, '0'), i);
END LOOP; END $$;
ANALYZE;
"""


def report_of(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "copystream-report.json").read_bytes()))


def by_table(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["table"]: t for t in report["tables"]}


@contextlib.contextmanager
def session_counter(dsn: str) -> Iterator[Callable[[], int]]:
    """``count()``: sessions other than this one opened in the database since the start (the
    server's own count, ``pg_stat_database.sessions``, of sessions that have ended)."""
    with psycopg.connect(dsn, autocommit=True) as conn:

        def sessions() -> int:
            row = conn.execute(
                "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            assert row is not None
            return int(row[0])

        base = sessions()

        def count() -> int:
            # a session's stats are flushed when its backend exits, a moment after the client
            # closed it: wait until the count stops moving
            last, stable_since = sessions(), time.monotonic()
            while time.monotonic() - stable_since < 0.5:
                time.sleep(0.05)
                now = sessions()
                if now != last:
                    last, stable_since = now, time.monotonic()
            return last - base

        yield count


def assert_matches_psql(dsn: str, psql_csv: PsqlCsv, report: dict[str, Any]) -> None:
    """Every exported table of the report is psql's ``\\copy`` of it, byte for byte."""
    with psycopg.connect(dsn) as conn:
        for t in report["tables"]:
            if t["status"] not in ("done", "skipped"):
                continue
            key = ", ".join(psycopg.sql.Identifier(k).as_string(conn) for k in t["key"])
            query = f"SELECT * FROM {t['table']} ORDER BY {key}"
            assert Path(t["output"]).read_bytes() == psql_csv(dsn, query), t["table"]


def stray_files(out: Path) -> list[str]:
    """Files a finished job must not leave: temporaries, locks, checkpoints, parts."""
    return sorted(
        p.name
        for p in out.rglob("*")
        if p.name.endswith((".tmp", ".lock", ".checkpoint.json", ".parts.json"))
        or ".part-" in p.name
    )


# -- planning once ------------------------------------------------------------------------------


class CountingConnection(psycopg.Connection[Any]):
    """A real connection that counts the statements it is asked to run."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        type(self).statements += 1
        return super().execute(*args, **kwargs)


def test_every_table_is_planned_in_a_few_queries_as_one_by_one_would(
    dsn: str, run_sql: RunSql
) -> None:
    run_sql(dsn, SHAPES + many_tables(40, rows=5))
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = [
            str(r[0])
            for r in conn.execute(
                "SELECT format('%I.%I', nspname, relname) FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = relnamespace WHERE nspname IN ('s', 'm') AND relkind = 'r' ORDER BY 1"
            ).fetchall()
        ]
        oids = [int(conn.execute("SELECT %s::regclass::oid", [n]).fetchall()[0][0]) for n in names]
    wanted = [(o, ExportSpec(n)) for o, n in zip(oids, names, strict=True)]
    wanted += [
        (oids[0], ExportSpec(names[0], key=("nope",))),
        (oids[1], ExportSpec(names[1], where="no_such_column > 0")),
        (oids[2], ExportSpec(names[2], where="true")),
        (oids[3], ExportSpec(names[3], options=CopyOptions(delimiter="ab"))),
        (oids[4], ExportSpec(names[4], options=CopyOptions(delimiter="ab"))),
        (oids[5], ExportSpec(names[5], options=CopyOptions(format="text"))),
        (999_999_999, ExportSpec("gone")),
    ]
    with CountingConnection.connect(dsn, autocommit=True) as conn:
        CountingConnection.statements = 0
        many = introspect_many(conn, wanted)
        statements = CountingConnection.statements
    # relations, columns, indexes (+ the transaction's settings); a filter's EXPLAIN; one check
    # of each distinct non-default COPY options: not one query per table
    assert statements <= 12, statements
    with psycopg.connect(dsn, autocommit=True) as conn:
        for (_, spec), got in zip(wanted, many, strict=True):
            try:
                one: Any = introspect(
                    conn, spec.table, key=spec.key, columns=spec.columns, where=spec.where,
                    options=spec.options,
                )  # fmt: skip
            except copystream.CopystreamError as e:
                one = e
            if spec.table == "gone":
                assert isinstance(got, copystream.TableNotFound)
            elif isinstance(one, copystream.CopystreamError):
                assert isinstance(got, copystream.UsageError)
                assert type(got) is type(one) and got.problem == one.problem
            else:  # the same plan; only the size estimate may come from elsewhere
                assert not isinstance(got, copystream.UsageError)
                assert replace(got, estimated_bytes=None) == replace(one, estimated_bytes=None)
    refused = {n for (_, spec), p in zip(wanted, many, strict=True) if not hasattr(p, "key")
               for n in [spec.table]}  # fmt: skip
    assert "s.nokey" in refused


# -- long-lived workers, one connection, small tables in one COPY ------------------------------


def test_a_job_of_small_tables_opens_a_few_sessions_and_a_rerun_none_per_table(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, many_tables(60))
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n')
    out = tmp_path / "out"
    with session_counter(dsn) as sessions:
        proc = run(cli("bulk", str(plan), "--jobs", "2", "--no-progress"))
        assert proc.returncode == 0, proc.stderr
        first = sessions()
    # the catalog's, one per worker (kept from table to table): not one per table
    assert first <= 4, first
    report = report_of(out)
    assert report["totals"]["done"] == 60
    assert_matches_psql(dsn, psql_csv, report)
    for t in report["tables"]:
        m = read_manifest(Path(t["output"]))
        assert m["chunk_rows"] == 0 and len(m["chunks"]) == 1  # one COPY
        assert m["rows"] == t["rows"] and copystream.verify_file(t["output"]).rows == t["rows"]
        assert Path(t["output"]).stat().st_mode & 0o777 == 0o644
    assert stray_files(out) == []

    seen: list[copystream.BulkProgress] = []
    with session_counter(dsn) as sessions:
        result = copystream.run_bulk(plan, jobs=2, progress=seen.append)
        again = sessions()
    assert again <= 1, again  # the catalog's only: finished tables are checked on disk
    assert {t.status for t in result.tables} == {"skipped"}
    assert not any(p.running for p in seen)  # no table was handed to a worker
    assert result.tables[0].rows > 0 and result.tables[0].xxh3_128

    victim = Path(report["tables"][7]["output"])  # a finished file changed by hand
    victim.write_bytes(victim.read_bytes().replace(b",", b";", 1))
    third = copystream.run_bulk(plan, jobs=2)
    failed = [t for t in third.tables if t.status == "failed"]
    assert [t.output for t in failed] == [victim]  # never silently rewritten
    assert "delete it to export the table again" in failed[0].errors[0]


def test_a_connection_lost_between_small_tables_is_opened_again(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, many_tables(150, rows=3000))
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n', retries=10)
    stop, working = threading.Event(), threading.Event()
    killed: list[int] = []

    def terminate() -> None:  # the workers' backends, a few times while the job runs
        working.wait(60)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set() and len(killed) < 4:
                rows = conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                    "application_name = 'copystream' AND datname = current_database() "
                    "AND pid <> pg_backend_pid()"
                ).fetchall()
                killed.extend(1 for r in rows if r[0])
                time.sleep(0.1)

    thread = threading.Thread(target=terminate, daemon=True)
    thread.start()
    def progress(p: copystream.BulkProgress) -> None:
        if p.running:  # the workers are at work (the catalog is read)
            working.set()

    try:
        result = copystream.run_bulk(plan, jobs=2, progress=progress)
    finally:
        stop.set()
        thread.join(10)
    assert killed, "no backend was terminated while the job ran"
    assert result.ok, [t.errors for t in result.failed]
    assert sum(t.retries for t in result.tables) >= 1
    assert_matches_psql(dsn, psql_csv, report_of(tmp_path / "out"))


def test_a_small_export_has_the_manifest_of_a_chunked_one(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, SHAPES + "ANALYZE;")
    timing = ("started_at", "finished_at", "seconds")
    cases = [(t, True) for t in ("s.floaty", "s.texty", "s.pair", "s.times", "s.empty")]
    for table, header in [*cases, ("s.empty", False), ("s.pair", False)]:
        small = tmp_path / f"{table}.{header}.a.csv"
        chunked = tmp_path / f"{table}.{header}.b.csv"
        copystream.export_table(dsn, table, small, header=header)
        copystream.export_table(dsn, table, chunked, header=header, chunk_rows=0)
        assert small.read_bytes() == chunked.read_bytes()
        a, b = read_manifest(small), read_manifest(chunked)
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }, table
        assert copystream.verify_file(small).rows == a["rows"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("suffix", [".csv.zst", ".csv.gz"])
def test_a_small_compressed_export_is_one_frame_with_the_manifest_of_a_chunked_one(
    suffix: str, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The compression the OUTPUT's suffix asks for holds for a small table too: one frame, the
    same bytes and manifest as a chunked export of one chunk, the CSV psql's."""
    run_sql(dsn, SHAPES + "ANALYZE;")
    timing = ("started_at", "finished_at", "seconds")
    for table, order in (("s.pair", "a, b"), ("s.empty", "id")):
        small, chunked = tmp_path / f"{table}.a{suffix}", tmp_path / f"{table}.b{suffix}"
        r = copystream.export_table(dsn, table, small, header=True)
        assert not small.with_name(small.name + ".checkpoint.json").exists()
        copystream.export_table(dsn, table, chunked, header=True, chunk_rows=0)
        assert small.read_bytes() == chunked.read_bytes()
        a, b = read_manifest(small), read_manifest(chunked)
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }, table
        csv = psql_csv(dsn, f"SELECT * FROM {table} ORDER BY {order}", "FORMAT csv, HEADER")
        tool = "zstd" if suffix.endswith("zst") else "gzip"
        got = subprocess.run([tool, "-dc", str(small)], capture_output=True, check=True).stdout
        assert got == csv and a["uncompressed_bytes"] == len(csv) == r.uncompressed_bytes
        assert a["compress"]["codec"] == tool and a["uncompressed_xxh3_128"] == xxh(csv)
        assert copystream.verify_file(small, deep=True).uncompressed_bytes == len(csv)
    # consistent: one COPY is one snapshot
    result = copystream.export_table(dsn, "s.pair", tmp_path / "pit.csv", consistent=True)
    assert result.point_in_time and read_manifest(tmp_path / "pit.csv")["point_in_time"]


def test_a_running_job_owns_its_output_directory(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The job writes its outputs without their locks: copystream export refuses to write in
    its directory (or below) while it runs, and may again once it is done."""
    run_sql(dsn, many_tables(30, rows=50) + SHAPES + "ANALYZE;")
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n')
    out = tmp_path / "out"
    with psycopg.connect(dsn) as holder:
        holder.execute("LOCK TABLE m.t005 IN ACCESS EXCLUSIVE MODE")  # the job waits for it
        with subprocess.Popen(
            cli("bulk", str(plan), "--jobs", "2", "--no-progress"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ) as job:
            deadline = time.monotonic() + 60
            while not (out / ".copystream-bulk.lock").exists():
                assert job.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            (out / "sub").mkdir(exist_ok=True)
            refused = [
                run(cli("export", "s.texty", str(target), "--dsn", dsn, "--no-progress"))
                for target in (out / "texty.csv", out / "sub" / "texty.csv")
            ]
            assert job.poll() is None, "the job ended before the exports were tried"
            holder.rollback()  # the job goes on
            assert job.wait(timeout=300) == 0
    running = f"a copystream bulk job is running with output directory {out}"
    for proc in refused:
        assert_one_error_line(proc, 2, running)
    assert not (out / "texty.csv").exists() and not (out / "sub" / "texty.csv").exists()
    assert_matches_psql(dsn, psql_csv, report_of(out))
    again = run(cli("export", "s.texty", str(out / "texty.csv"), "--dsn", dsn, "--no-progress"))
    assert again.returncode == 0, again.stderr


def test_publish_makes_a_group_durable_and_visible_and_one_failure_stays_its_own(
    tmp_path: Path,
) -> None:
    """publish() of a group (its files fsynced and its manifests written from several threads):
    every file gets its name and its manifest; an item whose file cannot be synced (removed
    here) fails alone, leaving nothing of its own; no temporary file is left."""
    from copystream.errors import CopystreamError
    from copystream.whole import Staged, publish, temporary_path

    items = []
    for n in range(20):
        output = tmp_path / f"t{n}.csv"
        temporary = temporary_path(output)
        temporary.write_bytes(f"{n},row\n".encode())
        items.append(Staged(output, temporary, json.dumps({"n": n}).encode()))
    items[7].temporary.unlink()  # its fsync fails
    errors = publish(items)
    assert [i for i, e in enumerate(errors) if e is not None] == [7]
    assert isinstance(errors[7], CopystreamError) and "t7.csv" in str(errors[7])
    for n, item in enumerate(items):
        manifest = tmp_path / f"t{n}.csv.manifest.json"
        if n == 7:
            assert not item.output.exists() and not manifest.exists()
        else:
            assert item.output.read_bytes() == f"{n},row\n".encode()
            assert json.loads(manifest.read_bytes()) == {"n": n}
            assert manifest.stat().st_mode & 0o777 == 0o600
    assert stray_files(tmp_path) == []


def staged_files(directory: Path, count: int) -> list[Any]:
    """``count`` small exports staged in ``directory`` for publish(): ``t<n>.csv`` to be, its
    bytes ``x\\n`` in a temporary file, its manifest ``{}``."""
    from copystream import whole

    items = []
    for n in range(count):
        output = directory / f"t{n}.csv"
        temporary = whole.temporary_path(output)
        temporary.write_bytes(b"x\n")
        items.append(whole.Staged(output, temporary, b"{}"))
    return items


def test_a_bug_in_a_publishing_thread_is_raised_not_taken_for_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception in one of publish()'s threads is raised by publish() (the bulk
    coordinator then fails the group), not lost with its thread; no file gets its name."""
    from copystream import whole

    items = staged_files(tmp_path, 12)
    synced = whole.fsync_path

    def fsync_path(path: Path) -> None:
        if path == items[5].temporary:
            raise RuntimeError("a bug")
        synced(path)

    monkeypatch.setattr(whole, "fsync_path", fsync_path)
    with pytest.raises(RuntimeError, match="a bug"):
        whole.publish(items)
    assert not any(item.output.exists() for item in items)
    assert stray_files(tmp_path) == [] and list(tmp_path.glob("*.manifest.json")) == []


def test_an_output_linked_before_a_later_step_failed_keeps_its_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish()'s last directory fsync fails (EIO): every item reports it, but the outputs
    already have their names, and each keeps its manifest beside it (the next run finds them
    complete), never an output without one."""
    from copystream import whole

    items = staged_files(tmp_path, 5)
    synced = whole.fsync_dir
    calls: list[Path] = []

    def fsync_dir(directory: Path) -> None:
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        synced(directory)

    monkeypatch.setattr(whole, "fsync_dir", fsync_dir)
    errors = whole.publish(items)
    assert all(e is not None and "Input/output error" in str(e) for e in errors)
    for item in items:
        assert item.output.read_bytes() == b"x\n"
        assert item.output.with_name(item.output.name + ".manifest.json").read_bytes() == b"{}"
    assert stray_files(tmp_path) == []


def test_a_ctrl_c_while_a_group_is_published_still_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the coordinator waits for the group being published: waiting again (as
    the job does on its way out, to record the tables finished) still waits until the group
    is published, and returns its outcomes. (With ``Thread.join``, CPython 3.11 marks the
    interrupted thread ended: the next wait returned at once, before the group's errors were
    known.)"""
    import copystream.bulk.run as bulk_run
    from copystream.whole import Staged

    release, published = threading.Event(), []

    def slow_publish(items: list[Staged]) -> list[None]:
        release.wait(10)
        published.extend(items)
        return [None] * len(items)

    monkeypatch.setattr(bulk_run, "publish", slow_publish)
    staged = Staged(tmp_path / "t.csv", tmp_path / ".t.csv.0.tmp", b"{}")
    task, outcome = object(), object()
    publisher = bulk_run._Publisher(set())
    publisher.start([(task, outcome, staged)])  # type: ignore[list-item]
    main = threading.main_thread().ident
    assert main is not None
    threading.Timer(0.2, signal.pthread_kill, [main, signal.SIGINT]).start()
    threading.Timer(0.6, release.set).start()
    with pytest.raises(KeyboardInterrupt):
        publisher.finished(wait=True)
    assert not release.is_set() and published == []  # interrupted while the group ran
    assert publisher.finished(wait=True) == [(task, outcome, None)]
    assert published == [staged] and not publisher.busy


def test_what_a_killed_small_export_leaves_is_a_fresh_start(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """The states a kill can leave (temporary files; a manifest without its output, whole or
    torn: it is written in place before the output is linked) are taken for a fresh start, by
    copystream export and by a bulk job alike, and ``status`` reports no export."""
    run_sql(dsn, SHAPES + "ANALYZE;")
    out = tmp_path / "t.csv"
    ref = psql_csv(dsn, "SELECT * FROM s.texty ORDER BY k")
    copystream.export_table(dsn, "s.texty", out)
    manifest = out.with_name(out.name + ".manifest.json")
    stale = [tmp_path / ".t.csv.ab12cd34.tmp", tmp_path / ".t.csv.manifest.json.0a1b2c3d.tmp"]
    out.unlink()  # killed between the manifest's rename and the file's
    for p in stale:  # killed before either
        p.write_bytes(b"partial")
    result = copystream.export_table(dsn, "s.texty", out)
    assert not result.already_complete and out.read_bytes() == ref
    assert [p for p in stale if p.exists()] == [] and manifest.exists()
    torn = manifest.read_bytes()[:40]
    out.unlink()
    manifest.write_bytes(torn)  # killed while the manifest was written
    with pytest.raises(copystream.UsageError, match="no export to report on"):
        copystream.export_status(out)
    result = copystream.export_table(dsn, "s.texty", out)
    assert not result.already_complete and out.read_bytes() == ref
    assert json.loads(manifest.read_bytes())["rows"] == result.rows

    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "s.t*"\n')
    copystream.run_bulk(plan)
    bulk_out = tmp_path / "out" / "s.texty.csv"
    bulk_out.unlink()
    (tmp_path / "out" / ".s.texty.csv.00000000.tmp").write_bytes(b"partial")
    bulk_manifest = bulk_out.with_name(bulk_out.name + ".manifest.json")
    bulk_manifest.write_bytes(bulk_manifest.read_bytes()[:40])
    again = copystream.run_bulk(plan)
    assert {t.table: t.status for t in again.tables} == {"s.texty": "done", "s.times": "skipped"}
    assert bulk_out.read_bytes() == ref and stray_files(tmp_path / "out") == []


def test_a_bulk_workers_small_table_has_the_manifest_copystream_export_writes(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """A bulk worker's small table (one COPY on its open connection, published by the
    coordinator) has the manifest ``copystream export`` writes for the same table, but for the
    times."""
    run_sql(dsn, SHAPES + "ANALYZE;")
    times = {"started_at", "finished_at", "seconds"}
    for suffix, entry in ((".csv", ""), (".csv.zst", 'compress = "zstd"\n')):
        plan = write_plan(
            tmp_path / f"plan{suffix}.toml", dsn, f'[[tables]]\npattern = "s.t*"\n{entry}'
        )
        assert copystream.run_bulk(plan, jobs=1).exit_code == 0
        for name in ("texty", "times"):
            alone = tmp_path / f"{name}{suffix}"
            copystream.export_table(dsn, f"s.{name}", alone)
            in_job = read_manifest(tmp_path / "out" / f"s.{name}{suffix}")
            by_itself = read_manifest(alone)
            assert {k: v for k, v in in_job.items() if k not in times} == {
                k: v for k, v in by_itself.items() if k not in times
            }, (name, suffix)


def test_a_small_table_whose_kept_connection_the_server_ended_goes_through_the_pipeline(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A worker exports a fresh small table in one attempt on the connection it kept from the
    table before. When the server ended that connection meanwhile, the attempt fails and the
    table goes through the pipeline (a new connection): done, the attempt counted as a retry,
    its file psql's."""
    from copystream.bulk import load_plan, worker
    from copystream.bulk.resolve import _resolve_on_servers
    from copystream.whole import publish

    run_sql(dsn, SHAPES + "ANALYZE;")
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "s.t*"\n')
    tasks = [t for t in _resolve_on_servers(load_plan(plan)).tasks if t.resolved is not None]
    (tmp_path / "out").mkdir()

    def export(t: _Task) -> worker.TableDone:
        return worker.export_task(
            t.entry.dsn or "", t.spec, str(t.output), t.run, t.resolved, None, True, False,
            progress=lambda p: None,
        )  # fmt: skip

    try:
        first = export(tasks[0])
        kept = worker._KEPT[dsn]
        assert first.result.retries == 0 and first.temporary is not None
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [kept.info.backend_pid])
        second = export(tasks[1])
        assert second.result.retries == 1 and worker._KEPT[dsn] is not kept
    finally:
        worker._close_kept()  # (this process is no worker: none stays open after the test)
    for t, done in ((tasks[0], first), (tasks[1], second)):
        staged = done.staged(t.output)
        assert staged is not None and publish([staged]) == [None]
        table = t.resolved
        assert table is not None
        key = ", ".join(table.key)
        assert t.output.read_bytes() == psql_csv(dsn, f"SELECT * FROM {t.table} ORDER BY {key}")
        assert read_manifest(t.output)["rows"] == done.result.rows == 300


@pytest.mark.parametrize("seed", [1, *(pytest.param(s, marks=pytest.mark.slow) for s in (2, 3, 4))])
def test_a_job_killed_at_any_moment_finishes_identical(
    seed: int, dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    run_sql(dsn, many_tables(120, rows=300))
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n')
    out = tmp_path / "out"
    rng = random.Random(seed)
    kills = 0
    for _ in range(4):
        # killed once the job has published a random number of tables more (a time alone
        # would miss a job that an idle machine finishes in a second)
        done = len(list(out.glob("*.manifest.json"))) if out.exists() else 0
        target = done + rng.randint(1, 40)
        proc = subprocess.Popen(
            cli("bulk", str(plan), "--jobs", "2", "--no-progress"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if out.exists() and len(list(out.glob("*.manifest.json"))) >= target:
                break
            time.sleep(rng.uniform(0.0, 0.005))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 1, "the job always finished before the kill"
    final = run(cli("bulk", str(plan), "--jobs", "2", "--no-progress"), timeout=300)
    assert final.returncode == 0, final.stderr
    report = report_of(out)
    assert report["finished"] and report["totals"]["done"] + report["totals"]["skipped"] == 120
    assert_matches_psql(dsn, psql_csv, report)
    for t in report["tables"]:
        data = Path(t["output"]).read_bytes()
        assert xxh(data) == t["xxh3_128"] == read_manifest(Path(t["output"]))["xxh3_128"]
    assert stray_files(out) == []


def test_workers_killed_mid_job_are_replaced_and_the_job_finishes_identical(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """SIGKILL every worker of a ``--jobs 2`` job while one is in the middle of a chunked table
    (the other runs small tables, more handed to it ahead): new workers take over, the chunked
    table resumes from its checkpoint and the small ones are exported anew; the job exits 0
    with every table psql's, the deaths counted as retries, nothing temporary left."""
    run_sql(dsn, many_tables(120, rows=300) + BIG)
    plan = write_plan(
        tmp_path / "plan.toml",
        dsn,
        '[[tables]]\npattern = "m.*"\n[[tables]]\nname = "big"\nchunk_rows = 500\n',
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli("bulk", str(plan), "--jobs", "2", "--no-progress"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while chunks_in(out / "public.big.csv.checkpoint.json") < 2:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.002)
        victims = psutil.Process(proc.pid).children()  # its workers (forked: no command line)
        assert victims
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):  # (one that just exited)
                victim.kill()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert b"public.big: the worker process was killed by SIGKILL" in stderr
    report = report_of(out)
    rows = by_table(report)
    assert report["totals"]["done"] == 121
    assert rows["public.big"]["retries"] >= 1 and rows["public.big"]["resumed"]
    assert_matches_psql(dsn, psql_csv, report)
    assert stray_files(out) == []


def chunks_in(checkpoint: Path) -> int:
    """The chunks a checkpoint records now (0: none yet)."""
    try:
        return len(json.loads(checkpoint.read_bytes())["chunks"])
    except (OSError, ValueError, KeyError):
        return 0


#: A table of many chunks (``chunk_rows = 500``) beside the small ones.
BIG = """
CREATE TABLE public.big (id int PRIMARY KEY, v text);
INSERT INTO public.big SELECT g, md5(g::text) FROM generate_series(1, 100000) g;
ANALYZE public.big;
"""


# -- one snapshot for the whole job -------------------------------------------------------------

LEDGER = """
CREATE TABLE {t} (id int PRIMARY KEY, amount numeric NOT NULL);
INSERT INTO {t} SELECT g, 100 FROM generate_series(1, 20000) g;
"""


class Balancer:
    """Moves amounts in ``a``, ``b`` and ``c`` together, keeping their sums equal, until
    stopped: every transaction adds the same amount to one row of each."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.stop = threading.Event()
        self.commits = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = random.Random(7)
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    delta = rng.randint(1, 50)
                    with conn.transaction():
                        for t in ("a", "b", "c"):
                            row = rng.randint(1, 20000)
                            conn.execute(
                                psycopg.sql.SQL("UPDATE {} SET amount = amount + %s WHERE id = %s")
                                .format(psycopg.sql.Identifier(t)),
                                [delta, row],
                            )
                    self.commits += 1
        except BaseException as e:
            self.error = e

    def __enter__(self) -> Balancer:
        self.thread.start()
        while self.commits < 5:  # it runs before the job starts, and all through it
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.error is None, self.error


def sums(out: Path) -> list[Decimal]:
    """The sum of the amounts in each of the three exported files."""
    total = []
    for t in ("a", "b", "c"):
        rows = csv.reader(io.StringIO((out / f"public.{t}.csv").read_text()))
        total.append(sum((Decimal(r[1]) for r in rows), Decimal(0)))
    return total


#: a small (one COPY), b chunked, c in two key ranges: each way of exporting reads the snapshot
LEDGER_PLAN = """
[[tables]]
name = "a"

[[tables]]
name = "b"
chunk_rows = 1000

[[tables]]
name = "c"
chunk_rows = 700
workers = 2
"""


def test_one_snapshot_for_the_job_keeps_an_invariant_across_tables(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, "".join(LEDGER.format(t=t) for t in "abc") + "ANALYZE;")
    plan = write_plan(tmp_path / "plan.toml", dsn, LEDGER_PLAN, consistent=True)
    with Balancer(dsn) as writer:
        before = writer.commits
        proc = run(cli("bulk", str(plan), "--jobs", "2", "--no-progress"), timeout=300)
        during = writer.commits - before
    assert proc.returncode == 0, proc.stderr
    assert during > 20, f"the writer committed only {during} times during the job"
    a, b, c = sums(tmp_path / "out")
    assert a == b == c, (a, b, c)
    report = report_of(tmp_path / "out")
    assert report["snapshot"]["point_in_time"] is True
    labels = [t["snapshot"] for t in report["tables"]]
    assert all(labels) and len({json.dumps(x, sort_keys=True) for x in labels}) == 1
    assert all(t["point_in_time"] for t in report["tables"])
    assert "one point in time" in proc.stdout

    # without the job's snapshot, each table (each chunk) reads its own: the sums drift apart
    for attempt in range(3):
        other = tmp_path / f"plain{attempt}"
        plain = write_plan(tmp_path / f"p{attempt}.toml", dsn, LEDGER_PLAN, output_dir=other.name)
        with Balancer(dsn):
            assert copystream.run_bulk(plain, jobs=2).ok
        a, b, c = sums(other)
        if not a == b == c:
            break
    else:
        pytest.fail("three exports without a job snapshot all kept the sums equal")
    assert report_of(other)["snapshot"] is None


def test_require_snapshot_refuses_to_finish_a_job_begun_under_another(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    run_sql(dsn, "".join(LEDGER.format(t=t) for t in "abc") + "ANALYZE;")
    plan = write_plan(tmp_path / "plan.toml", dsn, LEDGER_PLAN, consistent=True)
    out = tmp_path / "out"
    first = copystream.run_bulk(plan, jobs=2, only=["a"])  # a run that did part of the job
    assert first.ok and first.snapshot is not None and first.snapshot.point_in_time
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = run(cli("bulk", str(plan), "--jobs", "2", "--require-snapshot", "--no-progress"))
    line = assert_one_error_line(refused, 2, "public.a", "earlier run")
    assert "leave out --require-snapshot" in line and "delete their outputs" in line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written
    with pytest.raises(copystream.SnapshotRequired) as info:
        copystream.run_bulk(plan, require_snapshot=True)
    assert "require_snapshot=False" in str(info.value)

    done = copystream.run_bulk(plan, jobs=2)
    assert done.ok and done.snapshot is not None
    assert done.snapshot.point_in_time is False
    assert "1 from an earlier run's" in done.snapshot.note
    rows = by_table(report_of(out))
    assert rows["public.a"]["status"] == "skipped"
    assert rows["public.a"]["snapshot"] == first.tables[0].snapshot  # finished under the first
    now = rows["public.b"]["snapshot"]
    assert now == rows["public.c"]["snapshot"] != rows["public.a"]["snapshot"]
    assert report_of(out)["snapshot"]["point_in_time"] is False
    # all done now: nothing left to read, so nothing to refuse
    assert copystream.run_bulk(plan, require_snapshot=True).ok


# -- pure decisions -------------------------------------------------------------------------------


def test_consistent_in_defaults_is_the_jobs_and_in_an_entry_the_tables() -> None:
    plan = parse_plan(
        "[defaults]\nconsistent = true\nchunk_rows = 5\n"
        '[[tables]]\nname = "a"\n'
        '[[tables]]\nname = "b"\nconsistent = false\n'
        '[[tables]]\nname = "c"\nconsistent = true\n',
        source="p.toml",
    )
    assert plan.consistent
    a, b, c = plan.entries
    assert not a.run.consistent and "consistent" not in a.explicit and "chunk_rows" in a.explicit
    assert "consistent" in b.explicit and not b.run.consistent  # out of the job's snapshot
    assert c.run.consistent
    assert not parse_plan('[[tables]]\nname = "a"\n', source="p").consistent


def _task(name: str, size: int, **run: Any) -> _Task:
    entry = PlanEntry(0, 1, name, None)
    if run:
        plan = parse_plan(
            f'[[tables]]\nname = "{name}"\n' + "".join(f"{k} = {v}\n" for k, v in run.items()),
            source="p",
        )
        entry = plan.entries[0]
    return _Task(entry, name, "public", name, Path(name), 1, size)


def test_a_table_larger_than_its_share_of_the_job_gets_key_ranges() -> None:
    big, rest = _task("big", 5 * SPLIT_BYTES), [_task(f"t{i}", 1000) for i in range(500)]
    shared = share_workers([big, *rest], 2)
    assert shared[0].workers == 2 and shared[0].run.workers == 2
    assert all(t.workers is None and t.run.workers == 1 for t in shared[1:])
    assert share_workers([big, *rest], 1)[0].workers is None  # one job slot: nothing to share
    four = share_workers([big, _task("other", 4 * SPLIT_BYTES), *rest], 4)
    assert (four[0].workers, four[1].workers) == (2, 2)  # each about half the job
    small_big = _task("mid", SPLIT_BYTES // 2)
    assert share_workers([small_big, *rest], 2)[0].workers is None  # not worth a split
    pinned = _task("big", 5 * SPLIT_BYTES, workers=1)
    assert share_workers([pinned, *rest], 2)[0].workers is None  # the plan said so


def test_a_job_splits_a_table_larger_than_its_share_into_key_ranges(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_sql(
        dsn,
        many_tables(20, rows=20)
        + "CREATE TABLE m.big (id int PRIMARY KEY, v text);"
        + "INSERT INTO m.big SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 30000) g;"
        + "ANALYZE;",
    )
    # the job's threshold, scaled down to a table a test can afford (the coordinator decides)
    monkeypatch.setattr(sys.modules["copystream.bulk.resolve"], "SPLIT_BYTES", 1024 * 1024)
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n')
    result = copystream.run_bulk(plan, jobs=2)
    assert result.ok
    big = tmp_path / "out" / "m.big.csv"
    assert read_manifest(big)["workers"] == 2  # two key ranges, joined
    small = tmp_path / "out" / "m.t000.csv"
    assert read_manifest(small)["workers"] == 1 and read_manifest(small)["chunk_rows"] == 0
    assert_matches_psql(dsn, psql_csv, report_of(tmp_path / "out"))
    assert stray_files(tmp_path / "out") == []


def test_a_planned_task_keeps_its_spec_unless_its_table_changes_pure() -> None:
    """A task's spec is made once: the copies planning makes of it (resolved, its estimates,
    its key ranges) keep it; one of another table makes its own."""
    task = _task("public.t", 10)
    spec = task.spec
    planned = task.but(estimated_rows=5, estimated_bytes=99, workers=2)
    assert planned.spec is spec and planned.estimated_bytes == 99 and planned.workers == 2
    other = task.but(table="public.u")
    assert other.spec is not spec and other.spec.table == "public.u"


#: Run in an interpreter of its own (forking needs a process with no other thread): a bulk job
#: within fork_workers, as ``copystream bulk`` runs it, with pickling a task refused.
FORKED_JOB = """
import json, sys
import copystream, copystream.pool as pool
from copystream.pool import Task, fork_workers

pickle_of = pool._dumps

def _dumps(value):
    assert not isinstance(value, Task), "a task was pickled"
    return pickle_of(value)

pool._dumps = _dumps
with fork_workers():
    result = copystream.run_bulk(sys.argv[1], jobs=2)
print(json.dumps([t.status for t in result.tables]))
"""


def test_copystream_bulk_forks_its_workers_once_planned_and_hands_them_tables_by_index(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """Within ``fork_workers`` (``copystream bulk``), the workers are forked once the tables are
    planned, none ahead: they have the tables in memory and no task is pickled."""
    run_sql(dsn, many_tables(6, rows=30) + "ANALYZE;")
    plan = write_plan(tmp_path / "plan.toml", dsn, '[[tables]]\npattern = "m.*"\n')
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_JOB, str(plan)], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout.decode().splitlines()[-1]) == ["done"] * 6


def test_copystream_export_imports_nothing_it_does_not_use() -> None:
    """``copystream export``'s start-up is most of a small table's export: what only a bulk job,
    a shard, an increment chain, a Parquet export or a pool of workers uses is imported on first
    use (a chunk loop and key ranges too: a small table is one COPY), and the library's names
    still resolve."""
    unused = (
        "copystream.shards", "copystream.chain", "copystream.arrowchunk", "copystream.s3url",
        "copystream.part", "copystream.join",
    )  # fmt: skip
    code = (
        "import sys, copystream.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "      ('rich', 'tomllib', 'pickle', 'difflib', 'secrets', 'pyarrow', 'boto3')\n"
        f"      or m.startswith('copystream.bulk') or m in {unused!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    # and the names are still there when asked for
    assert copystream.run_bulk.__module__ == "copystream.bulk.run"
    assert copystream.plan_shards.__module__ == "copystream.shards"
    assert copystream.verify_chain.__module__ == "copystream.chain"
    assert copystream.ChainResult.__module__ == "copystream.chain"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        copystream.nothing  # noqa: B018
