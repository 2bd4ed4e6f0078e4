"""Bad input: every mistake a user can make ends with exit code 2, one clear line, no files.

Each case runs the real ``copystream`` command as a subprocess against the real test server and
checks the contract of the developers' guide:

* exit code 2;
* stderr is exactly one line, ``copystream: error: ...``, naming the problem;
* no traceback anywhere;
* the output directory holds exactly what it held before (nothing created, nothing changed).

The library raises the matching :class:`~copystream.errors.CopystreamError` subclass.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import copystream
from copystream.errors import (
    AuthenticationFailed,
    ConnectionFailed,
    CopystreamError,
    InvalidFilter,
    KeyProblem,
    OutputExists,
    OutputProblem,
    TableNotFound,
    UsageError,
)
from copystream.testing import EphemeralPostgres

RunSql = Callable[[str, str], list[tuple[Any, ...]]]

#: A hang guard only (not a speed assertion): no bad-input case may take anywhere near this long.
TIMEOUT = 60

SCHEMA = """
CREATE TABLE t (id int PRIMARY KEY, v text, n int NOT NULL);
INSERT INTO t SELECT g, 'row ' || g, g * 10 FROM generate_series(1, 50) g;
CREATE TABLE nopk (a int, b text);
INSERT INTO nopk VALUES (1, 'x');
"""


# -- helpers ----------------------------------------------------------------------------------


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m copystream ARGS`` (stderr is a pipe, never a tty)."""
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    full_env.pop("COPYSTREAM_DSN", None)
    return subprocess.run(
        [sys.executable, "-m", "copystream", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=TIMEOUT,
        preexec_fn=preexec_fn,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def assert_bad_input(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one ``copystream: error:`` line naming the problem, no traceback."""
    out = f"stdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == 2, out
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("copystream: error: "), out
    assert len(line) > len("copystream: error: ") + 10, out
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    assert proc.stdout == "", out
    return line


def snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry (hidden ones too) with its mode, size and content digest."""
    out: dict[str, tuple[int, int, str]] = {}
    for name in sorted(os.listdir(directory)):
        p = directory / name
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else ""
        out[name] = (st.st_mode, st.st_size, digest)
    return out


@pytest.fixture
def db(dsn: str, run_sql: RunSql) -> str:
    run_sql(dsn, SCHEMA)
    return dsn


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections: bound (so nobody else takes it), not listening."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def _dsn_with(pg: EphemeralPostgres, **changes: str) -> str:
    parts = {"host": pg.host, "port": str(pg.port), "user": "postgres", "dbname": "postgres"}
    parts.update(changes)
    return " ".join(f"{k}={v}" for k, v in parts.items())


def _dbname(dsn: str) -> str:
    return next(p.split("=", 1)[1] for p in dsn.split() if p.startswith("dbname="))


# -- database-side mistakes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "extra", "needles"),
    [
        pytest.param("nosuch_table", [], ["nosuch_table", "does not exist"], id="missing-table"),
        pytest.param("nosuch.t", [], ["nosuch.t", "does not exist"], id="missing-schema"),
        pytest.param("a.b.c.d", [], ["a.b.c.d", "not a valid table name"], id="malformed-name"),
        pytest.param('"unclosed', [], ['"unclosed', "not a valid table name"], id="bad-quoting"),
        pytest.param("t", ["--key", "nope"], ["nope", "does not exist"], id="key-missing"),
        pytest.param("t", ["--key", "v"], ["'v'", "nullable"], id="key-nullable"),
        pytest.param("nopk", [], ["no primary key", "--key"], id="no-usable-key"),
        pytest.param("t", ["--columns", "id,zzz"], ["zzz", "does not exist"], id="column-missing"),
        pytest.param(
            "t", ["--where", "id >>> 'x' AND ("], ["invalid --where", "syntax"], id="where-syntax"
        ),
        pytest.param(  # closes the chunk's parentheses: would OR the key range away
            "t", ["--where", "id > 5) OR (id > 0"], ["invalid --where", "syntax"], id="where-parens"
        ),
        pytest.param(
            "t", ["--where", "nosuchcol > 3"], ["invalid --where", "nosuchcol"], id="where-column"
        ),
        pytest.param(
            "t", ["--where", "id = 'abc'"], ["invalid --where", "abc"], id="where-bad-literal"
        ),
        # valid SQL that fails only when it runs (EXPLAIN cannot catch these): still exit 2
        pytest.param(
            "t", ["--where", "10 / (id - 1) > 0"], ["division by zero", "--where"], id="where-div0"
        ),
        pytest.param(
            "t",
            ["--where", "10 / (id - 1) > 0", "--workers", "2"],
            ["division by zero", "--where"],
            id="where-div0-workers",
        ),
        pytest.param(
            "t", ["--where", "v::int > 0"], ["invalid input syntax", "--where"], id="where-cast"
        ),
        pytest.param(
            "t",
            ["--where", "id = (SELECT 1 UNION SELECT 2)"],
            ["more than one row", "--where"],
            id="where-cardinality",
        ),
    ],
)
def test_bad_table_key_or_filter(
    db: str, outdir: Path, table: str, extra: list[str], needles: list[str]
) -> None:
    before = snapshot(outdir)
    proc = run_cli("export", table, str(outdir / "o.csv"), "--dsn", db, *extra)
    assert_bad_input(proc, *needles)
    assert snapshot(outdir) == before == {}


def test_unreachable_host(pg: EphemeralPostgres, outdir: Path, refused_port: int) -> None:
    dsn = _dsn_with(pg, port=str(refused_port))
    proc = run_cli("export", "t", str(outdir / "o.csv"), "--dsn", dsn)
    line = assert_bad_input(proc, "cannot connect", f"127.0.0.1:{refused_port}")
    assert "refused" in line.lower()
    assert snapshot(outdir) == {}


def test_wrong_database(pg: EphemeralPostgres, outdir: Path) -> None:
    dsn = _dsn_with(pg, dbname="no_such_db_q7")
    proc = run_cli("export", "t", str(outdir / "o.csv"), "--dsn", dsn)
    assert_bad_input(proc, "no_such_db_q7", "does not exist")
    assert snapshot(outdir) == {}


def test_authentication_failure(pg: EphemeralPostgres, db: str, outdir: Path) -> None:
    user = f"bad_auth_{uuid.uuid4().hex[:8]}"
    pg.add_password_user(user, "right-pw-4d1")
    dsn = pg.dsn_for(_dbname(db), user, "wrong-pw-9x2")
    proc = run_cli("export", "t", str(outdir / "o.csv"), "--dsn", dsn)
    line = assert_bad_input(proc, "authentication failed", user)
    assert "wrong-pw-9x2" not in line and "right-pw-4d1" not in line
    assert snapshot(outdir) == {}
    # the right password works: the failure above was the password, nothing else
    good = pg.dsn_for(_dbname(db), user, "right-pw-4d1")
    ok = run_cli("export", "t", str(outdir / "o.csv"), "--dsn", good, "--no-progress")
    assert ok.returncode == 0, ok.stderr


# -- output-side mistakes ---------------------------------------------------------------------


def test_output_directory_missing(db: str, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    proc = run_cli("export", "t", str(tmp_path / "nodir" / "o.csv"), "--dsn", db)
    assert_bad_input(proc, "nodir", "does not exist")
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "nodir").exists()


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


_PR_CAPBSET_DROP = 24
#: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: the capabilities that let root ignore
#: permission bits.
_DAC_CAPS = (1, 2, 3)


def _unprivileged() -> Callable[[], None] | None:
    """A preexec_fn that makes the child subject to permission bits, or None if it already is.

    As root, permission bits do not stop writes. Switching to ``nobody`` would also lock the
    child out of the interpreter (which may live under a 0700 home), so the child stays uid 0 but
    drops the DAC-override capabilities from its bounding set: after exec it is a plain owner of
    root-owned files, and a 0555 directory is really not writable for it.
    """
    if os.geteuid() != 0:
        return None

    def drop() -> None:
        libc = _libc()
        for cap in _DAC_CAPS:
            if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def test_output_directory_not_writable(db: str, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_bytes(b"already here\n")
    ro.chmod(0o555)
    try:
        pre = _unprivileged()
        # the child really cannot write there (proves the setup, so the test can fail)
        probe = subprocess.run(
            [sys.executable, "-c", f"open({str(ro / 'probe')!r}, 'w')"],
            capture_output=True,
            text=True,
            preexec_fn=pre,
            timeout=TIMEOUT,
        )
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
        before = snapshot(ro)
        proc = run_cli("export", "t", str(ro / "o.csv"), "--dsn", db, preexec_fn=pre)
        assert_bad_input(proc, str(ro), "not writable")
        assert snapshot(ro) == before
    finally:
        ro.chmod(0o755)


def test_output_is_a_directory(db: str, outdir: Path) -> None:
    (outdir / "sub").mkdir()
    before = snapshot(outdir)
    proc = run_cli("export", "t", str(outdir / "sub"), "--dsn", db)
    assert_bad_input(proc, "is a directory")
    assert snapshot(outdir) == before
    assert os.listdir(outdir / "sub") == []


def test_existing_output_without_checkpoint(db: str, outdir: Path) -> None:
    out = outdir / "o.csv"
    out.write_bytes(b"precious data, not an export\n")
    os.utime(out, (1_000_000_000, 1_000_000_000))
    before = snapshot(outdir)
    proc = run_cli("export", "t", str(out), "--dsn", db)
    assert_bad_input(proc, str(out), "exists", "--restart", "--force")
    assert snapshot(outdir) == before
    assert out.stat().st_mtime == 1_000_000_000
    # and the two ways to overwrite it do work
    for flag in ("--force", "--restart"):
        ok = run_cli("export", "t", str(out), "--dsn", db, flag, "--no-progress")
        assert ok.returncode == 0, ok.stderr
        assert out.read_bytes().startswith(b"1,row 1,10\n")
        out.write_bytes(b"precious data, not an export\n")
        (outdir / "o.csv.manifest.json").unlink()


# -- command-line mistakes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        pytest.param(["--dsn", "host=127.0.0.1 port"], ["invalid connection string"], id="dsn-kw"),
        pytest.param(
            ["--dsn", "postgresql://u@127.0.0.1:99999999999/x"], ["99999999999"], id="dsn-port"
        ),
        pytest.param(["--dsn", "nosuchoption=1"], ["invalid connection string"], id="dsn-opt"),
        pytest.param(["--chunk-rows", "-1"], ["--chunk-rows", "-1"], id="chunk-rows-neg1"),
        pytest.param(["--chunk-rows", "-5"], ["--chunk-rows", "-5"], id="chunk-rows-neg"),
        pytest.param(["--chunk-rows", "many"], ["--chunk-rows", "many"], id="chunk-rows-nan"),
        pytest.param(["--bogus"], ["--bogus"], id="unknown-option"),
        pytest.param(["--format", "xml"], ["--format", "xml"], id="bad-format"),
        pytest.param(["--key", "id,"], ["--key", "empty"], id="empty-key-name"),
        pytest.param(["--report", "/nonexistent-dir-q/r.json"], ["report"], id="report-dir"),
    ],
)
def test_bad_command_line(
    pg: EphemeralPostgres, outdir: Path, args: list[str], needles: list[str]
) -> None:
    args = args if "--dsn" in args else [*args, "--dsn", pg.dsn]
    proc = run_cli("export", "t", str(outdir / "o.csv"), *args)
    assert_bad_input(proc, *needles)
    assert snapshot(outdir) == {}


def test_missing_arguments_and_unknown_command(outdir: Path) -> None:
    assert_bad_input(run_cli("export"), "missing argument")
    assert_bad_input(run_cli("frobnicate"), "frobnicate")
    assert snapshot(outdir) == {}


# -- the library ------------------------------------------------------------------------------


@pytest.fixture
def lib_cases(
    pg: EphemeralPostgres, db: str, outdir: Path, refused_port: int
) -> dict[str, tuple[dict[str, Any], type[CopystreamError]]]:
    user = f"lib_auth_{uuid.uuid4().hex[:8]}"
    pg.add_password_user(user, "lib-right-pw")
    (outdir / "exists.csv").write_bytes(b"keep me\n")
    (outdir / "adir").mkdir()
    o = str(outdir / "o.csv")
    return {
        "missing-table": ({"conninfo": db, "table": "nosuch", "output": o}, TableNotFound),
        "missing-schema": ({"conninfo": db, "table": "nosuch.t", "output": o}, TableNotFound),
        "malformed": ({"conninfo": db, "table": "a.b.c.d", "output": o}, TableNotFound),
        "key-missing": ({"conninfo": db, "table": "t", "output": o, "key": "nope"}, KeyProblem),
        "key-nullable": ({"conninfo": db, "table": "t", "output": o, "key": ["v"]}, KeyProblem),
        "where-syntax": (
            {"conninfo": db, "table": "t", "output": o, "where": "id >>> ("},
            InvalidFilter,
        ),
        "where-column": (
            {"conninfo": db, "table": "t", "output": o, "where": "nosuchcol = 1"},
            InvalidFilter,
        ),
        "where-div0": (
            {"conninfo": db, "table": "t", "output": o, "where": "1 / (id - 1) = 1"},
            InvalidFilter,
        ),
        "dir-missing": (
            {"conninfo": db, "table": "t", "output": str(outdir / "no" / "o.csv")},
            OutputProblem,
        ),
        "is-dir": ({"conninfo": db, "table": "t", "output": str(outdir / "adir")}, OutputProblem),
        "exists": (
            {"conninfo": db, "table": "t", "output": str(outdir / "exists.csv")},
            OutputExists,
        ),
        "refused": (
            {"conninfo": _dsn_with(pg, port=str(refused_port)), "table": "t", "output": o},
            ConnectionFailed,
        ),
        "wrong-db": (
            {"conninfo": _dsn_with(pg, dbname="no_such_db_q8"), "table": "t", "output": o},
            ConnectionFailed,
        ),
        "auth": (
            {"conninfo": pg.dsn_for(_dbname(db), user, "nope"), "table": "t", "output": o},
            AuthenticationFailed,
        ),
        "bad-dsn": ({"conninfo": "host=x port", "table": "t", "output": o}, UsageError),
        "chunk-rows-neg": (
            {"conninfo": db, "table": "t", "output": o, "chunk_rows": -1},
            UsageError,
        ),
    }


def test_library_raises_matching_errors(
    lib_cases: dict[str, tuple[dict[str, Any], type[CopystreamError]]], outdir: Path
) -> None:
    before = snapshot(outdir)
    sleeps: list[float] = []
    for name, (kwargs, expected) in lib_cases.items():
        kw = dict(kwargs)
        conninfo, table, output = kw.pop("conninfo"), kw.pop("table"), kw.pop("output")
        with pytest.raises(CopystreamError) as info:
            copystream.export_table(conninfo, table, output, sleep=sleeps.append, **kw)
        err = info.value
        assert type(err) is expected, f"{name}: {type(err).__name__}: {err}"
        assert isinstance(err, UsageError), name
        assert err.exit_code == 2, name
        assert "\n" not in str(err) and str(err), name
        assert snapshot(outdir) == before, name
    # an unreachable server is retried a couple of times before the verdict (not forever)
    assert 1 <= len(sleeps) <= 3, sleeps
