"""Incremental exports (issue 16), end to end against the real server and psql.

* append by key: a full export, then rounds of inserts and ``--incremental``, is byte for byte
  psql's full export of the table each time, and its manifest covers the whole file;
* a SIGKILL in the middle of an increment resumes to the same bytes, recorded once;
* increments to files of their own (``--since``) chain without a gap or an overlap, and
  ``verify --chain`` finds a file removed from the middle and an edited one;
* bad input: one error line, exit 2, nothing created or changed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from helpers import (
    assert_ok,
    assert_one_error_line,
    checkpoint_file,
    cli,
    export_cmd,
    kill_export,
    manifest_file,
    read_manifest,
    run,
    snapshot,
)

import copystream

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

pytestmark = pytest.mark.all_versions  # also run on PostgreSQL 18 (.ci/run)

DDL = "CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz, payload text, n numeric)"


def insert(run_sql: RunSql, dsn: str, first: int, last: int) -> None:
    """Rows ``first``..``last`` (their values depend on the id only)."""
    run_sql(
        dsn,
        f"INSERT INTO ev SELECT g, '2026-01-01'::timestamptz + g * interval '1 minute', "
        f"repeat(md5(g::text), 1 + g % 3) || E',\"\\n', g / 7.0 FROM generate_series({first}, "
        f"{last}) g",
    )


def full_csv(psql_csv: PsqlCsv, dsn: str, *, header: bool = False) -> bytes:
    opts = "FORMAT csv, HEADER true" if header else "FORMAT csv"
    return psql_csv(dsn, "SELECT * FROM ev ORDER BY id", opts)


def stored(out: Path) -> bytes:
    data = out.read_bytes()
    if out.suffix == ".zst":
        return b"".join(_frames(data))
    return data


def _frames(data: bytes) -> list[bytes]:
    out, d = [], zstandard.ZstdDecompressor()
    while data:
        obj = d.decompressobj()
        out.append(obj.decompress(data))
        data = obj.unused_data
    return out


@pytest.mark.parametrize(("name", "header"), [("ev.csv", True), ("ev.csv.zst", False)])
def test_appended_increments_equal_a_full_export(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path, name: str, header: bool
) -> None:
    """Three rounds of inserts and incremental exports: after each, the file is psql's full
    export (one header), it verifies, and its manifest's history adds up to it."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 3000)
    out = tmp_path / name
    opts: dict[str, Any] = {"chunk_rows": 700, "header": header}
    first = copystream.export_table(dsn, "ev", out, **opts)
    assert first.increment is None
    for round_, (lo, hi) in enumerate([(3001, 3900), (3901, 3901), (3902, 6000)], start=1):
        insert(run_sql, dsn, lo, hi)
        r = copystream.export_table(dsn, "ev", out, incremental=True, **opts)
        assert stored(out) == full_csv(psql_csv, dsn, header=header), f"round {round_}"
        assert r.rows == hi and r.increment is not None and r.increment["rows"] == hi - lo + 1
        assert r.increment["after"] == [str(lo - 1)] and r.increment["last_key"] == [str(hi)]
        assert not r.resumed and not checkpoint_file(out).exists()
        v = copystream.verify_file(out, deep=True)
        assert v.rows == hi and v.bytes == out.stat().st_size
        m = read_manifest(out)
        history = m["increments"]
        assert len(history) == round_ + 1
        assert sum(h["rows"] for h in history) == m["rows"] == hi
        assert sum(h["bytes"] for h in history) == m["bytes"]
        assert [h["first_chunk"] for h in history[1:]] == [
            h["first_chunk"] + h["chunks"] for h in history[:-1]
        ]
    if name.endswith(".zst"):  # each chunk one more frame, appended
        assert len(_frames(out.read_bytes())) == len(read_manifest(out)["chunks"])
    nothing = copystream.export_table(dsn, "ev", out, incremental=True, **opts)
    assert nothing.increment is not None and nothing.increment["rows"] == 0
    assert stored(out) == full_csv(psql_csv, dsn, header=header)


def test_a_killed_increment_resumes_to_the_same_bytes(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """SIGKILL while an increment runs; the same command again resumes it: psql's bytes, the
    increment recorded once, the earlier part of the file untouched meanwhile."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 2000)
    out = tmp_path / "ev.csv"
    assert_ok(run(export_cmd(dsn, "ev", out, "--chunk-rows", "500")))
    base = out.read_bytes()
    insert(run_sql, dsn, 2001, 60_000)
    cmd = export_cmd(dsn, "ev", out, "--incremental", "--chunk-rows", "500")
    k = kill_export(cmd, out, min_chunks=4 + 5)
    assert k.returncode == -9 and k.checkpoint is not None
    assert k.checkpoint["increment"]["base_chunks"] == 4
    assert out.read_bytes()[: len(base)] == base
    again = run(cmd)
    assert_ok(again)
    assert "resumed" in again.stdout
    assert out.read_bytes() == full_csv(psql_csv, dsn)
    history = read_manifest(out)["increments"]
    assert [h["rows"] for h in history] == [2000, 58_000]
    assert_ok(run(cli("verify", str(out))))


def test_since_chain_has_no_gap_and_verify_chain_finds_breaks(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A full export and three increments to files of their own: together psql's export, each
    beginning after its predecessor's last key. verify --chain accepts the chain, and finds a
    removed middle file (a gap), an increment made twice (an overlap) and an edited file."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 1000)
    files = [tmp_path / "d0.csv"]
    assert_ok(run(export_cmd(dsn, "ev", files[0], "--chunk-rows", "300")))
    for i, (lo, hi) in enumerate([(1001, 1500), (1501, 1502), (1503, 2500)], start=1):
        insert(run_sql, dsn, lo, hi)
        files.append(tmp_path / f"d{i}.csv")
        since = str(manifest_file(files[-2]))
        proc = run(export_cmd(dsn, "ev", files[-1], "--since", since, "--chunk-rows", "300"))
        assert_ok(proc)
        assert f"after {manifest_file(files[-2]).name}" in proc.stdout
        m = read_manifest(files[-1])
        assert m["rows"] == hi - lo + 1 and m["since"]["last_key"] == [str(lo - 1)]
    assert b"".join(f.read_bytes() for f in files) == full_csv(psql_csv, dsn)
    ok = run(cli("verify", "--chain", *map(str, files)))
    assert_ok(ok)
    assert "chain of 4: OK, 2,500 rows" in ok.stdout
    gap = run(cli("verify", "--chain", str(files[0]), str(files[1]), str(files[3])))
    assert_one_error_line(gap, 1, "d3.csv holds the rows after key ['1502']", "a gap")
    twice = tmp_path / "d1-again.csv"
    since = str(manifest_file(files[0]))
    workers = run(export_cmd(dsn, "ev", twice, "--since", since, "--workers", "2"))
    assert_ok(workers)  # the keys after d0's, split into ranges: the same bytes
    assert twice.read_bytes() == b"".join(f.read_bytes() for f in files[1:])
    overlap = run(cli("verify", "--chain", str(files[0]), str(files[1]), str(twice)))
    assert_one_error_line(overlap, 1, "an overlap")
    data = bytearray(files[2].read_bytes())
    data[5] ^= 1
    files[2].write_bytes(bytes(data))
    edited = run(cli("verify", "--chain", *map(str, files)))
    assert_one_error_line(edited, 1, "d2.csv: chunk 0")


def test_a_since_increment_resumes_and_is_not_redone(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """Killed, the increment resumes; finished, the same command does nothing; the same
    output after another predecessor is refused."""
    run_sql(dsn, DDL)
    insert(run_sql, dsn, 1, 100)
    d0, d1 = tmp_path / "d0.csv", tmp_path / "d1.csv"
    assert_ok(run(export_cmd(dsn, "ev", d0)))
    insert(run_sql, dsn, 101, 50_000)
    cmd = export_cmd(dsn, "ev", d1, "--since", str(d0), "--chunk-rows", "500")
    k = kill_export(cmd, d1, min_chunks=5)
    assert k.returncode == -9
    assert_ok(run(cmd))
    assert d1.read_bytes() == psql_csv(dsn, "SELECT * FROM ev WHERE id > 100 ORDER BY id")
    again = run(cmd)
    assert_ok(again)
    assert "already complete" in again.stdout
    other = tmp_path / "other.csv"
    assert_ok(run(export_cmd(dsn, "ev", other)))
    before = snapshot(tmp_path)
    wrong = run(export_cmd(dsn, "ev", d1, "--since", str(other)))
    assert_one_error_line(wrong, 2, "holds the increment after d0.csv.manifest.json", "--force")
    assert snapshot(tmp_path) == before


def test_bad_input_is_refused_and_changes_nothing(
    dsn: str, run_sql: RunSql, tmp_path: Path
) -> None:
    """--incremental without a complete export, or with another table, columns or filter, or
    with --restart; --since a missing manifest: exit 2, one line saying what to do, no file
    created or changed."""
    run_sql(dsn, DDL + "; CREATE TABLE other (id int PRIMARY KEY, v text)")
    insert(run_sql, dsn, 1, 100)
    out = tmp_path / "ev.csv"
    fresh = run(export_cmd(dsn, "ev", out, "--incremental"))
    assert_one_error_line(fresh, 2, "no complete export to continue", "without --incremental")
    assert not list(tmp_path.iterdir())
    assert_ok(run(export_cmd(dsn, "ev", out)))
    before = snapshot(tmp_path)
    for extra, needle in [
        (["--columns", "id,n"], "columns was"),
        (["--where", "id > 5"], "where was null"),
        (["--header"], "options was"),
        (["--restart"], "restart would discard it"),
    ]:
        proc = run(export_cmd(dsn, "ev", out, "--incremental", *extra))
        line = assert_one_error_line(proc, 2, needle)
        assert "Traceback" not in line
        assert snapshot(tmp_path) == before, extra
    other = run(export_cmd(dsn, "other", out, "--incremental"))
    assert_one_error_line(other, 2, 'table was "public.ev"', "--key, --columns, --where")
    missing = run(export_cmd(dsn, "ev", tmp_path / "d1.csv", "--since", str(tmp_path / "no.csv")))
    assert_one_error_line(missing, 2, "no.csv.manifest.json does not exist")
    d1 = tmp_path / "d1.csv"
    mismatch = run(export_cmd(dsn, "ev", d1, "--since", str(out), "--columns", "id"))
    assert_one_error_line(mismatch, 2, "records another export (columns was")
    assert snapshot(tmp_path) == before
    data = bytearray(out.read_bytes())
    data[3] ^= 1
    out.write_bytes(bytes(data))
    before = snapshot(tmp_path)
    changed = run(export_cmd(dsn, "ev", out, "--incremental"))
    assert_one_error_line(changed, 2, "does not match its manifest")
    assert snapshot(tmp_path) == before
    out.write_bytes(bytes(data) + b"101,x\n")  # bytes past the manifest's end are not cut
    before = snapshot(tmp_path)
    longer = run(export_cmd(dsn, "ev", out, "--incremental"))
    assert_one_error_line(longer, 2, "does not match its manifest")
    assert snapshot(tmp_path) == before
    assert json.loads(manifest_file(out).read_text())["rows"] == 100


# -- watermark increments -----------------------------------------------------------------------

WDDL = (
    "CREATE TABLE w (id bigint PRIMARY KEY, updated_at timestamptz NOT NULL DEFAULT now(), "
    "v text); CREATE INDEX ON w (updated_at, id)"
)


def ids_of(out: Path) -> set[int]:
    return {int(line.split(b",", 1)[0]) for line in out.read_bytes().splitlines()}


def test_a_late_commit_is_in_the_next_watermark_increment(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A transaction inserts a row (its updated_at: the transaction's start), stays open while
    the watermark export runs, and commits after it: the next increment has the row, with the
    default safety lag (the open transaction's age); with no lag it would be lost. Rows tying
    on updated_at (one transaction, one now()) page exactly by (updated_at, id)."""
    import time

    import psycopg

    run_sql(dsn, WDDL)
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'a' || g FROM generate_series(1, 100) g")
    d0, d1, d1_nolag = (tmp_path / n for n in ("d0.csv", "d1.csv", "d1-nolag.csv"))
    with psycopg.connect(dsn) as late:
        late.execute("INSERT INTO w (id, v) VALUES (1000, 'late')")  # not committed yet
        time.sleep(0.5)
        run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'b' || g FROM generate_series(101, 200) g")
        assert_ok(run(export_cmd(dsn, "w", d0, "--watermark", "updated_at", "--chunk-rows", "7")))
        late.commit()
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'c' || g FROM generate_series(201, 210) g")
    ordered = "SELECT * FROM w WHERE id <= 200 AND id <> 1000 ORDER BY updated_at, id"
    assert d0.read_bytes() == psql_csv(dsn, ordered)
    m0 = read_manifest(d0)
    assert m0["watermark"]["lag_seconds"] >= 0.5 and m0["key"] == ["updated_at", "id"]
    proc = run(export_cmd(dsn, "w", d1, "--watermark", "updated_at", "--since", str(d0)))
    assert_ok(proc)
    assert ids_of(d1) == {*range(101, 211), 1000}  # the late row, and the overlap 101..200
    m1 = read_manifest(d1)
    assert m1["watermark"]["overlap_rows"] == 101 and "101 of them in the overlap" in proc.stdout
    assert m1["since"]["manifest"] == "d0.csv.manifest.json"
    lower = m1["watermark"]["from"]
    assert d1.read_bytes() == psql_csv(
        dsn, f"SELECT * FROM w WHERE updated_at >= '{lower}' ORDER BY updated_at, id"
    )
    nolag = export_cmd(dsn, "w", d1_nolag, "--watermark", "updated_at", "--since", str(d0),
                       "--watermark-lag", "0")  # fmt: skip
    assert_ok(run(nolag))
    assert 1000 not in ids_of(d1_nolag) and set(range(201, 211)) <= ids_of(d1_nolag)
    assert_ok(run(cli("verify", "--chain", str(d0), str(d1))))


def test_a_killed_watermark_increment_resumes(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """SIGKILL in the middle of a watermark increment; the same command again resumes it from
    its checkpoint, with the lower bound measured before its first chunk: psql's rows."""
    run_sql(dsn, WDDL)
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'a' FROM generate_series(1, 100) g")
    d0, d1 = tmp_path / "d0.csv", tmp_path / "d1.csv"
    assert_ok(run(export_cmd(dsn, "w", d0, "--watermark", "updated_at")))
    run_sql(dsn, "INSERT INTO w (id, v) SELECT g, 'b' FROM generate_series(101, 40000) g")
    cmd = export_cmd(dsn, "w", d1, "--watermark", "updated_at", "--since", str(d0),
                     "--chunk-rows", "500")  # fmt: skip
    k = kill_export(cmd, d1, min_chunks=5)
    assert k.returncode == -9 and k.checkpoint is not None
    lower = k.checkpoint["increment"]["watermark"]["from"]
    assert_ok(run(cmd))
    assert read_manifest(d1)["watermark"]["from"] == lower
    assert d1.read_bytes() == psql_csv(
        dsn, f"SELECT * FROM w WHERE updated_at >= '{lower}' ORDER BY updated_at, id"
    )


def test_watermark_bad_input(dsn: str, run_sql: RunSql, tmp_path: Path) -> None:
    """A nullable watermark is refused and an unindexed one warned about, as keys are; another
    type, an append, or a previous export that tracked nothing are refused: exit 2, nothing
    created."""
    run_sql(
        dsn,
        "CREATE TABLE x (id int PRIMARY KEY, maybe timestamptz, plain timestamptz NOT NULL "
        "DEFAULT now(), t text NOT NULL DEFAULT 1); INSERT INTO x (id) VALUES (1), (2)",
    )
    out = tmp_path / "x.csv"
    for extra, needle in [
        (["--watermark", "maybe"], "'maybe' of public.x is nullable"),
        (["--watermark", "t"], "must be a timestamp with time zone"),
        (["--watermark", "plain", "--incremental"], "name the previous export with --since"),
    ]:
        assert_one_error_line(run(export_cmd(dsn, "x", out, *extra)), 2, needle)
        assert not list(tmp_path.iterdir()), extra
    unindexed = run(export_cmd(dsn, "x", out, "--watermark", "plain"))
    assert_ok(unindexed)
    assert "no index starts with the key (plain, id)" in unindexed.stderr
    run_sql(dsn, "CREATE INDEX ON x (plain)")  # an index on the watermark alone will do
    plain = tmp_path / "plain.csv"
    assert_ok(run(export_cmd(dsn, "x", plain, "--key", "plain,id")))
    after_plain = run(export_cmd(dsn, "x", tmp_path / "d1.csv", "--watermark", "plain",
                                 "--since", str(plain)))  # fmt: skip
    assert_one_error_line(after_plain, 2, "was not a watermark export")
    assert not (tmp_path / "d1.csv").exists()


def test_a_bulk_plan_with_incremental_exports_in_full_then_appends(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """``incremental = true`` in a plan: the first run exports the table in full, each later run
    appends what is new; the table without it is skipped as complete."""
    run_sql(dsn, DDL + "; CREATE TABLE other (id int PRIMARY KEY); INSERT INTO other VALUES (1)")
    insert(run_sql, dsn, 1, 500)
    plan = tmp_path / "plan.toml"
    body = (
        f"[defaults]\ndsn = {json.dumps(dsn)}\noutput_dir = \"out\"\nchunk_rows = 200\n\n"
        '[[tables]]\nname = "public.ev"\nincremental = true\n\n[[tables]]\nname = "public.other"\n'
    )
    plan.write_text(body)
    out = tmp_path / "out" / "public.ev.csv"
    dry = copystream.run_bulk(plan, dry_run=True)
    assert {t.table: t.note for t in dry.tables}["public.ev"] == "new"
    for round_, (first, last) in enumerate([(0, 0), (501, 900), (901, 1400)]):
        if first:
            insert(run_sql, dsn, first, last)
        result = copystream.run_bulk(plan)
        assert result.ok, [t.errors for t in result.failed]
        status = {t.table: t.status for t in result.tables}
        assert status == {"public.ev": "done", "public.other": "skipped" if round_ else "done"}
        assert out.read_bytes() == full_csv(psql_csv, dsn)
        history = read_manifest(out).get("increments", [])
        assert [h["rows"] for h in history] == [[], [500, 400], [500, 400, 500]][round_]
    dry = copystream.run_bulk(plan, dry_run=True)
    assert "will be appended" in {t.table: t.note for t in dry.tables}["public.ev"]
