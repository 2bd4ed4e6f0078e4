"""Security: read-only exports, injection-proof names and filters, no leaked passwords, safe files.

Everything runs against the real test server; the command line runs as a real subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import copystream
from copystream._atomic import atomic_write
from copystream.errors import InvalidFilter
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

#: A hang guard only (not a speed assertion).
TIMEOUT = 60


# -- helpers ----------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}
    if not extra or "COPYSTREAM_DSN" not in extra:
        env.pop("COPYSTREAM_DSN", None)
    return env


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m copystream ARGS`` with stderr a pipe (so progress is log lines)."""
    return subprocess.run(
        [sys.executable, "-m", "copystream", *args],
        capture_output=True,
        text=True,
        env=_env(env),
        timeout=TIMEOUT,
        preexec_fn=preexec_fn,
        stdin=subprocess.DEVNULL,
    )


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2 with exactly one ``copystream: error:`` line containing ``needles``."""
    out = f"stdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, out
    assert "Traceback" not in proc.stderr + proc.stdout, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("copystream: error: "), out
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not in {lines[0]!r}"
    return lines[0]


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"stdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr


def checkpoint_chunks(path: Path) -> int:
    try:
        return len(json.loads(path.read_bytes())["chunks"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def run_and_kill(args: list[str], checkpoint: Path, chunks: int = 2) -> tuple[str, str]:
    """Start an export, SIGKILL it once ``checkpoint`` records ``chunks`` chunks; return output.

    The export must be slow enough (see ``slow_table``) to still be running by then.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "copystream", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while checkpoint_chunks(checkpoint) < chunks:
            assert proc.poll() is None, f"export ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return out, err


#: Filter that makes every chunk take ~0.1 s while ``delay.d`` is 0.05 (read-only: a subquery
#: and pg_sleep); set ``delay.d`` to 0 and the same export (same filter) runs at full speed.
SLOW_WHERE = "pg_sleep((SELECT d FROM delay)) IS NOT NULL"


def slow_table(run_sql: RunSql, dsn: str, rows: int = 400) -> None:
    run_sql(
        dsn,
        f"""CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL);
            INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, {rows}) g;
            CREATE TABLE delay (d float8 NOT NULL); INSERT INTO delay VALUES (0.05);
            ANALYZE big""",
    )


def listing(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def _dbname(dsn: str) -> str:
    return next(p.split("=", 1)[1] for p in dsn.split() if p.startswith("dbname="))


# -- READ ONLY --------------------------------------------------------------------------------

WRITERS = """
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 30) g;
CREATE SEQUENCE s;
SELECT nextval('s');
CREATE TABLE audit (i int);
CREATE FUNCTION leak(i int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  INSERT INTO audit VALUES (i);
  RETURN true;
END $$;
"""


@pytest.mark.parametrize(
    ("where", "workers"),
    [
        ("nextval('s') > 0", 1),
        ("leak(id)", 1),
        ("id > 3 AND leak(id)", 1),
        ("nextval('s') > 0", 2),  # the filter first runs when the key range is sampled
        ("leak(id)", 2),
    ],
)
def test_writing_filter_is_refused_read_only(
    dsn: str, run_sql: RunSql, outdir: Path, where: str, workers: int
) -> None:
    run_sql(dsn, WRITERS)
    seq_before = run_sql(dsn, "SELECT last_value, is_called FROM s")
    assert seq_before == [(1, True)]
    proc = run_cli(
        "export", "t", str(outdir / "t.csv"), "--dsn", dsn, "--where", where, "--chunk-rows", "7",
        "--workers", str(workers),
    )  # fmt: skip
    line = assert_refused(proc, "READ ONLY")
    assert "read-only transaction" in line
    assert run_sql(dsn, "SELECT last_value, is_called FROM s") == seq_before
    assert run_sql(dsn, "SELECT count(*) FROM audit") == [(0,)]
    assert listing(outdir) == []
    # the library: InvalidFilter, exit code 2, nothing left behind
    with pytest.raises(InvalidFilter) as info:
        copystream.export_table(
            dsn, "t", outdir / "lib.csv", where=where, chunk_rows=7, workers=workers
        )
    assert info.value.exit_code == 2 and "READ ONLY" in str(info.value)
    assert run_sql(dsn, "SELECT last_value, is_called FROM s") == seq_before
    assert run_sql(dsn, "SELECT count(*) FROM audit") == [(0,)]
    assert listing(outdir) == []


def test_chunks_run_read_only_repeatable_read(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, outdir: Path
) -> None:
    run_sql(dsn, WRITERS)
    out = outdir / "t.csv"
    where = (
        "current_setting('transaction_read_only') = 'on' "
        "AND current_setting('transaction_isolation') = 'repeatable read'"
    )
    proc = run_cli(
        "export", "t", str(out), "--dsn", dsn, "--where", where, "--chunk-rows", "7",
        "--no-progress",
    )  # fmt: skip
    assert_ok(proc)
    full = psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    assert full.count(b"\n") == 30
    assert out.read_bytes() == full  # every row passed: every chunk was RO + RR
    manifest = json.loads((outdir / "t.csv.manifest.json").read_bytes())
    assert len(manifest["chunks"]) == 5  # 30 rows in chunks of 7: the filter ran in each


# -- identifiers and filters ------------------------------------------------------------------

SENTINELS = """
CREATE TABLE sentinel (id int PRIMARY KEY); INSERT INTO sentinel VALUES (42);
CREATE TABLE x (id int PRIMARY KEY); INSERT INTO x VALUES (7);
"""

DATA = """INSERT INTO {t} VALUES
 (1, 'plain', 'ü'), (2, 'it''s "quoted", with comma', 'line
break'), (3, NULL, 'back\\slash'), (4, '', ';--'), (5, 'DROP TABLE x;', '日本')"""

STRANGE_NAMES = [
    pytest.param('"we""ird; DROP TABLE x; --"', id="quotes-semicolon"),
    pytest.param('"Ünïcødé tåble"', id="unicode-space"),
    pytest.param('"select"', id="reserved-word"),
    pytest.param('"My Schema"."MiXeD Case"', id="schema-mixed-case"),
    pytest.param('"Robert\'); DROP TABLE sentinel;--"', id="single-quote"),
    pytest.param('"back\\slash $$ %s {}"', id="backslash-dollar-percent-braces"),
    pytest.param("MixedUnquoted", id="unquoted-folds"),
]


@pytest.mark.parametrize("name", STRANGE_NAMES)
def test_strange_identifiers(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, outdir: Path, name: str
) -> None:
    run_sql(dsn, SENTINELS + 'CREATE SCHEMA "My Schema";')
    run_sql(dsn, f'CREATE TABLE {name} (id int PRIMARY KEY, "va""l; --" text, "Ünï col" text)')
    run_sql(dsn, DATA.format(t=name))
    out = outdir / "o.csv"
    proc = run_cli("export", name, str(out), "--dsn", dsn, "--chunk-rows", "2", "--no-progress")
    assert_ok(proc)
    expected = psql_csv(dsn, f"SELECT * FROM {name} ORDER BY id")
    assert expected.count(b"\n") == 6  # 5 rows, one with an embedded newline
    assert out.read_bytes() == expected
    assert run_sql(dsn, "SELECT (SELECT id FROM sentinel), (SELECT id FROM x)") == [(42, 7)]
    assert_ok(run_cli("verify", str(out)))
    # a column list with the strange column names, quoted as in psql
    proc = run_cli(
        "export", name, str(outdir / "c.csv"), "--dsn", dsn, "--chunk-rows", "3",
        "--columns", '"Ünï col","va""l; --"', "--no-progress",
    )  # fmt: skip
    assert_ok(proc)
    cols = psql_csv(dsn, f'SELECT "Ünï col", "va""l; --" FROM {name} ORDER BY id')
    assert (outdir / "c.csv").read_bytes() == cols
    assert run_sql(dsn, "SELECT (SELECT id FROM sentinel), (SELECT id FROM x)") == [(42, 7)]


@pytest.mark.parametrize(
    "where",
    [
        "true; DROP TABLE sentinel",
        "true); DROP TABLE sentinel; --",
        "true); COMMIT; DROP TABLE sentinel; --",
        "true); COMMIT; DROP TABLE sentinel; SELECT (true",
        "true) ORDER BY 1) TO STDOUT; DROP TABLE sentinel; --",
        "true)) TO PROGRAM 'touch {marker}' --",
        "true)) TO PROGRAM 'touch {marker}'; SELECT ((1",
    ],
)
def test_filter_cannot_run_a_second_statement(
    dsn: str, run_sql: RunSql, outdir: Path, tmp_path: Path, where: str
) -> None:
    run_sql(dsn, SENTINELS + "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1), (2)")
    marker = Path(tempfile.gettempdir()) / f"copystream-pwned-{uuid.uuid4().hex}"
    where = where.format(marker=marker)
    proc = run_cli(
        "export", "t", str(outdir / "o.csv"), "--dsn", dsn, "--where", where, "--chunk-rows", "1"
    )
    assert_refused(proc, "--where")
    assert run_sql(dsn, "SELECT (SELECT id FROM sentinel), (SELECT id FROM x)") == [(42, 7)]
    assert not marker.exists()
    assert listing(outdir) == []
    with pytest.raises(InvalidFilter):
        copystream.export_table(dsn, "t", outdir / "lib.csv", where=where)
    assert run_sql(dsn, "SELECT count(*) FROM sentinel") == [(1,)]
    assert not marker.exists()
    assert listing(outdir) == []


def test_text_keys_with_quotes_and_backslashes_page_correctly(
    dsn: str, run_sql: RunSql, psql_csv: PsqlCsv, outdir: Path
) -> None:
    run_sql(dsn, SENTINELS + "CREATE TABLE k (name text PRIMARY KEY, n int)")
    keys = [
        "O'Brien\\",
        "O'Brien\\\\",
        "a''b",
        "\\x",
        "\\",
        "'",
        '"quoted"',
        "new\nline",
        "tab\tsep",
        "$$dollar$$",
        "%s %(x)s",
        "{} {0}",
        "'); DROP TABLE sentinel; --",
        "E'\\n'",
        "Ünïcødé",
        " leading space",
        ",comma",
    ]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for i, key in enumerate(keys):
            conn.execute("INSERT INTO k VALUES (%s, %s)", [key, i])
    out = outdir / "k.csv"
    proc = run_cli("export", "k", str(out), "--dsn", dsn, "--chunk-rows", "1", "--no-progress")
    assert_ok(proc)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM k ORDER BY name")
    manifest = json.loads((outdir / "k.csv.manifest.json").read_bytes())
    assert manifest["rows"] == len(keys)
    assert len(manifest["chunks"]) == len(keys)  # one row per chunk: every key was a bound
    assert sorted(c["last_key"][0] for c in manifest["chunks"]) == sorted(keys)
    assert run_sql(dsn, "SELECT count(*) FROM sentinel") == [(1,)]
    # resuming from a checkpoint whose last key holds quotes and backslashes
    slow = "pg_sleep(0.05) IS NOT NULL"
    out2 = outdir / "k2.csv"
    run_and_kill(
        ["export", "k", str(out2), "--dsn", dsn, "--chunk-rows", "1", "--where", slow,
         "--no-progress"],
        outdir / "k2.csv.checkpoint.json",
        chunks=3,
    )  # fmt: skip
    proc = run_cli(
        "export", "k", str(out2), "--dsn", dsn, "--chunk-rows", "50", "--where", slow,
        "--no-progress",
    )  # fmt: skip
    assert_ok(proc)
    assert "resumed" in proc.stdout
    assert out2.read_bytes() == out.read_bytes()


# -- passwords --------------------------------------------------------------------------------

PASSWORD = "S3cr3t-PW-xyzzy"


@pytest.fixture
def password_user(pg: EphemeralPostgres) -> str:
    user = f"pw_user_{uuid.uuid4().hex[:8]}"
    pg.add_password_user(user, PASSWORD)
    return user


def test_password_never_appears(
    pg: EphemeralPostgres,
    dsn: str,
    run_sql: RunSql,
    tmp_path: Path,
    outdir: Path,
    password_user: str,
) -> None:
    slow_table(run_sql, dsn)
    db = _dbname(dsn)
    kw = pg.dsn_for(db, password_user, PASSWORD)
    uri = f"postgresql://{password_user}:{PASSWORD}@{pg.host}:{pg.port}/{db}"
    bad_uri = f"postgresql://{password_user}:{PASSWORD}@{pg.host}:notaport/{db}"
    assert PASSWORD in kw and PASSWORD in uri
    captured: list[str] = []

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = run_cli(*args, env=env)
        captured.extend([proc.stdout, proc.stderr])
        return proc

    # 1. keyword DSN, progress log lines, -v, --report; killed mid-way: a checkpoint stays
    report = str(outdir / "a.report.json")
    killed = ["export", "big", str(outdir / "a.csv"), "--dsn", kw, "-v", "--report", report,
              "--chunk-rows", "10", "--where", SLOW_WHERE]  # fmt: skip
    captured.extend(run_and_kill(killed, outdir / "a.csv.checkpoint.json"))
    assert (outdir / "a.csv.checkpoint.json").exists()
    # 2. URI DSN, a complete export
    run_sql(dsn, "UPDATE delay SET d = 0")
    p = run(
        "export", "big", str(outdir / "b.csv"), "--dsn", uri, "-v",
        "--report", str(outdir / "b.report.json"), "--chunk-rows", "100",
    )  # fmt: skip
    assert_ok(p)
    assert "rows" in p.stderr and "big" in p.stderr  # progress log lines were on
    # 3. --dsn=... form, and the DSN from the environment
    assert_ok(run("export", "big", str(outdir / "c.csv"), f"--dsn={kw}", "-v",
                  "--report", str(outdir / "c.report.json")))  # fmt: skip
    assert_ok(run("export", "big", str(outdir / "d.csv"), "-v", env={"COPYSTREAM_DSN": uri}))
    # 4. resume the killed run with the URI form
    run_sql(dsn, "UPDATE delay SET d = 0")
    p = run(
        "export", "big", str(outdir / "a.csv"), "--dsn", uri, "-v", "--report",
        str(outdir / "a.report.json"), "--chunk-rows", "10", "--where", SLOW_WHERE,
    )  # fmt: skip
    assert_ok(p)
    assert "resumed" in p.stdout
    # ... and leave one more checkpoint behind for the search
    run_sql(dsn, "UPDATE delay SET d = 0.05")
    killed = ["export", "big", str(outdir / "e.csv"), "--dsn", uri, "-v", "--chunk-rows", "10",
              "--where", SLOW_WHERE]  # fmt: skip
    captured.extend(run_and_kill(killed, outdir / "e.csv.checkpoint.json"))
    # 5. errors with the password DSN in every form: wrong table, wrong database, bad DSN
    wrong_db = {kw: kw.replace(f"dbname={db}", "dbname=nosuchdb"), uri: uri.replace(db, "nosuchdb")}
    cases = [
        ("nosuch", kw, "--dsn"), ("nosuch", uri, "--dsn="), ("nosuch", kw, "env"),
        ("big", wrong_db[uri], "--dsn"), ("big", wrong_db[kw], "--dsn="),
        ("big", wrong_db[uri], "env"), ("big", bad_uri, "--dsn"), ("big", f"{kw} port", "env"),
    ]  # fmt: skip
    for table, conninfo, how in cases:
        where = str(outdir / "x.csv")
        if how == "env":
            p = run("export", table, where, env={"COPYSTREAM_DSN": conninfo})
        elif how == "--dsn=":
            p = run("export", table, where, f"--dsn={conninfo}")
        else:
            p = run("export", table, where, "--dsn", conninfo)
        assert_refused(p, "nosuch" if "nosuch" in table + conninfo else "connection")
    # 6. status and verify of what is there
    assert_ok(run("status", str(outdir / "e.csv")))
    assert_ok(run("status", str(outdir / "e.csv"), "--json"))
    assert_ok(run("verify", str(outdir / "b.csv")))

    # the files really are there (so the search below means something)
    names = set(listing(outdir))
    assert {
        "a.csv",
        "a.csv.manifest.json",
        "a.report.json",
        "b.csv",
        "b.csv.manifest.json",
        "b.report.json",
        "c.report.json",
        "e.csv",
        "e.csv.checkpoint.json",
    } <= names
    assert "x.csv" not in names
    assert (outdir / "b.csv").read_bytes() == (outdir / "a.csv").read_bytes()
    assert len(captured) >= 30
    password = PASSWORD.encode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert password not in path.read_bytes(), f"password in {path}"
    for i, text in enumerate(captured):
        assert PASSWORD not in text, f"password in captured output #{i}: {text!r}"


# -- files: permissions, temporary files, symlinks --------------------------------------------


def test_private_files_are_0600_and_no_temp_files(dsn: str, run_sql: RunSql, outdir: Path) -> None:
    slow_table(run_sql, dsn)
    out = outdir / "big.csv"
    args = ["export", "big", str(out), "--dsn", dsn, "--chunk-rows", "10", "--where", SLOW_WHERE,
            "--no-progress"]  # fmt: skip
    old = os.umask(0)  # a lax umask: the private files must not depend on it
    try:
        run_and_kill(args, outdir / "big.csv.checkpoint.json")
        assert stat.S_IMODE((outdir / "big.csv.checkpoint.json").stat().st_mode) == 0o600
        run_sql(dsn, "UPDATE delay SET d = 0")
        proc = run_cli(*args, "--report", str(outdir / "report.json"))
    finally:
        os.umask(old)
    assert_ok(proc)
    assert listing(outdir) == ["big.csv", "big.csv.manifest.json", "report.json"]
    for name in ("big.csv.manifest.json", "report.json"):
        assert stat.S_IMODE((outdir / name).stat().st_mode) == 0o600, name


def test_atomic_write_never_follows_a_planted_temp_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"do not touch\n")
    target = tmp_path / "out.csv.checkpoint.json"
    # The temporary name the writer will try first is predicted (pinned) and a symlink to the
    # victim is planted there: O_EXCL must refuse it and move on to another name.
    tried: list[str] = []

    def names() -> Iterator[str]:
        for n in ("planted", "fresh0001", "fresh0002"):
            tried.append(n)
            yield n

    monkeypatch.setattr(tempfile, "_get_candidate_names", names)
    planted = tmp_path / f".{target.name}.planted.tmp"
    planted.symlink_to(victim)
    atomic_write(target, b'{"new": true}\n')
    assert tried[:2] == ["planted", "fresh0001"]  # the planted name was really tried first
    assert victim.read_bytes() == b"do not touch\n"
    assert planted.is_symlink() and planted.readlink() == victim
    assert target.read_bytes() == b'{"new": true}\n' and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == sorted([victim.name, planted.name, target.name])


@pytest.fixture
def small(dsn: str, run_sql: RunSql) -> str:
    run_sql(dsn, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                 "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g")  # fmt: skip
    return dsn


def test_symlink_at_output_is_refused(small: str, outdir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim\n")
    out = outdir / "o.csv"
    out.symlink_to(victim)
    proc = run_cli("export", "t", str(out), "--dsn", small, "--no-progress")
    assert_refused(proc, "exists")
    assert victim.read_bytes() == b"victim\n"
    assert out.is_symlink() and out.readlink() == victim
    assert listing(outdir) == ["o.csv"]


def test_dangling_symlink_at_output_is_refused(small: str, outdir: Path, tmp_path: Path) -> None:
    nowhere = tmp_path / "created-through-symlink.txt"
    out = outdir / "o.csv"
    out.symlink_to(nowhere)
    proc = run_cli("export", "t", str(out), "--dsn", small, "--no-progress")
    assert_refused(proc, "exists")
    assert not nowhere.exists()
    assert out.is_symlink() and out.readlink() == nowhere
    assert listing(outdir) == ["o.csv"]


def test_symlink_at_checkpoint_path_is_not_written_through(
    small: str, psql_csv: PsqlCsv, outdir: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.json"
    victim.write_bytes(b"victim\n")
    out = outdir / "o.csv"
    cp = outdir / "o.csv.checkpoint.json"
    cp.symlink_to(victim)
    # not a checkpoint: refused, nothing written through the link
    proc = run_cli("export", "t", str(out), "--dsn", small, "--no-progress")
    assert_refused(proc, str(cp))
    assert victim.read_bytes() == b"victim\n"
    assert listing(outdir) == ["o.csv.checkpoint.json"]
    # a dangling link there: the export runs and replaces the link, never creating its target
    cp.unlink()
    nowhere = tmp_path / "nowhere.json"
    cp.symlink_to(nowhere)
    assert_ok(run_cli("export", "t", str(out), "--dsn", small, "--chunk-rows", "3",
                      "--no-progress"))  # fmt: skip
    assert not nowhere.exists()
    assert out.read_bytes() == psql_csv(small, "SELECT * FROM t ORDER BY id")
    assert listing(outdir) == ["o.csv", "o.csv.manifest.json"]


def test_symlinks_at_manifest_and_report_are_replaced_not_followed(
    small: str, outdir: Path, tmp_path: Path
) -> None:
    victims = {name: tmp_path / f"victim-{name}" for name in ("manifest", "report")}
    for v in victims.values():
        v.write_bytes(b"victim\n")
    (outdir / "o.csv.manifest.json").symlink_to(victims["manifest"])
    (outdir / "r.json").symlink_to(victims["report"])
    proc = run_cli(
        "export", "t", str(outdir / "o.csv"), "--dsn", small, "--no-progress",
        "--report", str(outdir / "r.json"),
    )  # fmt: skip
    assert_ok(proc)
    for v in victims.values():
        assert v.read_bytes() == b"victim\n"
    for name in ("o.csv.manifest.json", "r.json"):
        p = outdir / name
        assert not p.is_symlink() and json.loads(p.read_bytes())
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert_ok(run_cli("verify", str(outdir / "o.csv")))
