"""Real outages, ridden out with the default settings: the server stopped and started again
(what a failover or a restart looks like to a client), and backends terminated over and over (an
over-eager idle killer, a failing pooler).

An outage is a duration, not a count: with the defaults an export waits out a server that cannot
be reached for up to ``max_outage`` (300 s), one log line per attempt and one when it is back,
and finishes byte-identical to psql. Past that it stops with exit 1 and a resumable checkpoint.
A chunk that fails is retried with half the rows, so that under repeated terminations the export
keeps committing small chunks, and grows them back afterwards.

Everything runs through the real command line against a server of this module's own (stopping
the session's server would disturb other tests). The short forms run in the default suite; the
long ones (a 2-minute stop, a server gone for good, 10 s of terminations on a larger table) need
``--slow`` and print the figures the README quotes.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from copystream.checkpoint import load_checkpoint
from copystream.manifest import manifest_path
from copystream.retry import RetryPolicy
from copystream.testing import EphemeralPostgres

try:
    from test_faults import assert_checkpoint_intact, assert_finished, make_table
except ImportError:  # tests/ imported as a package
    from tests.test_faults import (  # type: ignore[no-redef, import-not-found, unused-ignore]
        assert_checkpoint_intact,
        assert_finished,
        make_table,
    )

PsqlCsv = Callable[..., bytes]
QUERY = "SELECT * FROM t ORDER BY id"
DEFAULT = RetryPolicy()


@pytest.fixture(scope="module")
def server() -> Iterator[EphemeralPostgres]:
    """A server of this module's own, which the tests stop and start."""
    pg = EphemeralPostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.cleanup()


def database(pg: EphemeralPostgres, rows: int) -> str:
    """A fresh database on ``pg`` holding ``t`` with ``rows`` rows (see test_faults)."""
    pg.start()  # an earlier test may have left it stopped
    dsn = pg.create_database(f"outage_{uuid.uuid4().hex[:10]}")
    make_table(dsn, rows)
    return dsn


def drop(pg: EphemeralPostgres, dsn: str) -> None:
    pg.start()
    name = str(conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        drop_it = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop_it.format(sql.Identifier(name)))


@dataclass
class Running:
    """``copystream export`` running in the background; stderr goes to a temporary file."""

    proc: subprocess.Popen[bytes]
    err: IO[bytes]

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None


@contextlib.contextmanager
def export(dsn: str, out: Path, *args: str) -> Iterator[Running]:
    cmd = [sys.executable, "-m", "copystream", "export", "t", str(out), "--dsn", dsn,
           "--no-progress", *args]  # fmt: skip
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        try:
            yield Running(proc, err)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)


def committed(out: Path) -> int:
    """Rows the checkpoint beside ``out`` records (0 when there is none yet, or mid-replace)."""
    try:
        cp = load_checkpoint(out)
    except Exception:
        return 0
    return cp.rows if cp is not None else 0


def wait_until(run: Running, cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert run.alive(), f"the export ended before {what}: {run.stderr()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.002)


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [x for x in stderr.splitlines() if x.startswith("copystream: error:")]


def stamp(line: str) -> float:
    """Seconds since midnight of a log line's timestamp (``2026-11-26 09:00:01,114 ...``)."""
    m = re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) ", line)
    assert m, line
    h, mi, s, ms = (int(g) for g in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


# -- the server stopped, then started again ------------------------------------------------------


def ride_out_a_stop(
    pg: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path, seconds: float, rows: int
) -> dict[str, float]:
    """Stop the server for ``seconds`` in the middle of a default-settings export; assert it
    finishes byte-identical and logged each attempt and its return. Returns the figures."""
    dsn = database(pg, rows)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    with export(dsn, out, "--chunk-rows", str(rows // 50)) as run:
        wait_until(run, lambda: committed(out) >= rows // 5, 60, "a fifth of the rows")
        pg.stop("fast")
        stopped = time.monotonic()
        time.sleep(seconds)
        pg.start()
        back = time.monotonic()
        resumed_at = rows + 1
        with contextlib.suppress(AssertionError):  # it may also finish before we look
            before = committed(out)
            wait_until(run, lambda: committed(out) > before, DEFAULT.max_delay + 30, "progress")
            resumed_at = committed(out)
        recovered = time.monotonic()
        run.proc.wait(timeout=120)
        ended = time.monotonic()
        err = run.stderr()
    assert run.proc.returncode == 0, err
    assert not error_lines(err)
    attempts = [x for x in err.splitlines() if "(up to 300s for an outage); attempt" in x]
    returns = [x for x in err.splitlines() if ": back after " in x]
    assert len(attempts) >= 2, err
    assert len(returns) == 1, err
    waited = float(re.search(r"back after ([\d.]+)s", returns[0]).group(1))  # type: ignore[union-attr]
    assert seconds <= waited <= seconds + DEFAULT.max_delay + 5, returns[0]
    manifest = assert_finished(out, expected)
    assert manifest["resumed"] is False  # one run rode it out
    drop(pg, dsn)
    figures = {
        "outage_s": round(back - stopped, 1),
        "attempts": len(attempts),
        "back_after_server_s": round(recovered - back, 1) if resumed_at <= rows else -1.0,
        "failing_s": waited,
        "export_s_after_stop": round(ended - stopped, 1),
    }
    print(f"server stopped {seconds:g}s mid-export, default settings: {figures}")
    return figures


def test_server_stopped_mid_export_is_waited_out(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """What a switchover looks like: the server gone for 6 s (connections refused), then back."""
    ride_out_a_stop(server, psql_csv, tmp_path, 6.0, 200_000)


@pytest.mark.slow
def test_server_stopped_for_two_minutes(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """What a managed database's failover looks like (RDS Multi-AZ: 60-120 s)."""
    figures = ride_out_a_stop(server, psql_csv, tmp_path, 120.0, 500_000)
    assert figures["attempts"] >= 8  # not 5: the count does not limit an outage


def stop_for_good(
    pg: EphemeralPostgres, tmp_path: Path, *args: str
) -> tuple[str, Path, str, float]:
    """Stop the server for good mid-export; the export's dsn, output, stderr, and the seconds
    from the stop to its exit (which must be 1, with one error line and an intact checkpoint)."""
    dsn = database(pg, 100_000)
    out = tmp_path / "t.csv"
    try:
        with export(dsn, out, "--chunk-rows", "2000", *args) as run:
            wait_until(run, lambda: committed(out) >= 20_000, 60, "a fifth of the rows")
            pg.stop("fast")
            stopped = time.monotonic()
            run.proc.wait(timeout=DEFAULT.max_outage + 120)
            gave_up = time.monotonic() - stopped
            err = run.stderr()
    finally:
        pg.start()
    assert run.proc.returncode == 1, err
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert "run the same command again to resume" in errors[0]
    return dsn, out, errors[0], gave_up


def test_an_outage_longer_than_max_outage_stops_resumably(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """``--max-outage 3``: a server that stays away longer ends the export after about 3 s with
    exit 1 and an intact checkpoint; once it is back, the same command resumes and finishes."""
    dsn, out, error, gave_up = stop_for_good(server, tmp_path, "--max-outage", "3")
    print(f"--max-outage 3: gave up {gave_up:.1f}s after the stop: {error}")
    assert "the server was unreachable for 3s" in error
    assert 3.0 - 1.0 <= gave_up <= 3.0 + 10, gave_up  # -1: counted from the drop; +10: slow start
    expected = psql_csv(dsn, QUERY)
    assert 0 < assert_checkpoint_intact(out, expected) < len(expected)
    again = subprocess.run(
        [sys.executable, "-m", "copystream", "export", "t", str(out), "--dsn", dsn,
         "--no-progress"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert assert_finished(out, expected)["resumed"] is True
    drop(server, dsn)


def test_a_resume_started_during_an_outage_waits_it_out(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A re-run (a scheduler's retry) while the server is still away: with a checkpoint to
    resume, its first connection waits the outage out as the chunks do. Still away past
    ``--max-outage``: exit 1, resumable (not exit 2, as for a wrong host on a first run); back
    within it: the export resumes and finishes."""
    dsn, out, _, _ = stop_for_good(server, tmp_path, "--max-outage", "2")
    expected = psql_csv(dsn, QUERY)
    before = assert_checkpoint_intact(out, expected)
    server.stop("fast")
    try:
        with export(dsn, out, "--max-outage", "2") as run:
            run.proc.wait(timeout=60)
            err = run.stderr()
        assert run.proc.returncode == 1, err
        errors = error_lines(err)
        assert len(errors) == 1 and "run the same command again to resume" in errors[0], err
        assert assert_checkpoint_intact(out, expected) == before
        with export(dsn, out, "--max-outage", "60") as run:
            time.sleep(3)
            assert run.alive(), run.stderr()
            server.start()
            run.proc.wait(timeout=120)
            err = run.stderr()
    finally:
        server.start()
    assert run.proc.returncode == 0, err
    assert not error_lines(err)
    assert assert_finished(out, expected)["resumed"] is True
    drop(server, dsn)


@pytest.mark.slow
def test_a_server_gone_for_good_is_given_up_after_five_minutes(
    server: EphemeralPostgres, tmp_path: Path
) -> None:
    """The default: 300 s of outage, then exit 1 (the figure the README quotes)."""
    dsn, out, error, gave_up = stop_for_good(server, tmp_path)
    print(f"default settings, server gone for good: gave up {gave_up:.1f}s after the stop")
    assert "the server was unreachable for 300s" in error
    # from the stop's return: the export sees the connection drop (and starts counting) a
    # moment before pg_ctl returns
    assert 300.0 - 1.0 <= gave_up <= 300.0 + 15, gave_up
    assert manifest_path(out).exists() is False and load_checkpoint(out) is not None
    drop(server, dsn)


# -- backends terminated over and over ------------------------------------------------------------


class Terminator(threading.Thread):
    """Terminates every backend of the export (``application_name = 'copystream'``) every
    ``every`` seconds for ``seconds`` seconds, as an idle killer or a failing pooler would."""

    def __init__(self, dsn: str, out: Path, every: float, seconds: float) -> None:
        super().__init__(name="terminator", daemon=True)
        self.dsn, self.out, self.every, self.seconds = dsn, out, every, seconds
        self.terminated = 0
        # rows checkpointed when the kills began, and the most seen while they went on (an
        # export that finishes inside the window removes its checkpoint: 0 rows at the end)
        self.rows_at: list[int] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True, application_name="terminator") as c:
                self.rows_at.append(committed(self.out))
                seen = self.rows_at[0]
                end = time.monotonic() + self.seconds
                while time.monotonic() < end:
                    seen = max(seen, committed(self.out))
                    row = c.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE application_name = 'copystream'"
                        " AND datname = current_database() AND pid <> pg_backend_pid()"
                    ).fetchone()
                    self.terminated += int(row[0]) if row else 0
                    time.sleep(self.every)
                self.rows_at.append(max(seen, committed(self.out)))
        except BaseException as e:
            self.error = e


def terminations(
    pg: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path, rows: int, seconds: float
) -> dict[str, Any]:
    """Terminate the export's backends every 0.5 s for ``seconds`` under default settings
    (adaptive chunks); assert it finishes identical, shrinking chunks under the kills and
    growing them after. Returns the figures."""
    dsn = database(pg, rows)
    expected = psql_csv(dsn, QUERY)
    out = tmp_path / "t.csv"
    killer = Terminator(dsn, out, 0.5, seconds)
    started = time.monotonic()
    with export(dsn, out, "--report", str(tmp_path / "r.json")) as run:
        # the chunk loop has begun (planning done) once the first checkpoint exists
        wait_until(run, lambda: load_checkpoint(out) is not None, 60, "the first checkpoint")
        killer.start()
        run.proc.wait(timeout=300)
        killer.join(seconds + 10)
        err = run.stderr()
    assert killer.error is None, killer.error
    assert run.proc.returncode == 0, err
    assert not error_lines(err)
    manifest = assert_finished(out, expected)
    sizes = [c["rows"] for c in manifest["chunks"]]
    shrunk = [int(m.replace(",", "")) for m in re.findall(r"with ([\d,]+) rows instead of", err)]
    during = killer.rows_at[1] - killer.rows_at[0] if len(killer.rows_at) == 2 else -1
    figures = {
        "terminated": killer.terminated,
        "retries": json.loads((tmp_path / "r.json").read_bytes())["retries"],
        "rows_committed_during_kills": during,
        "attempt_sizes": shrunk,
        "chunk_rows": sizes,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"backends terminated every 0.5 s for {seconds:g} s: {figures}")
    # the export waits between attempts (backoff) with no backend to kill: at one kill per
    # two seconds at least, the kills still fell on it throughout (27, 17, 9 terminated in runs)
    assert killer.terminated >= seconds / 2, "the terminator hardly hit the export"
    assert len(shrunk) >= 2 and min(shrunk) < max(sizes), "the chunks never shrank"
    assert during > 0, "nothing was committed while the kills went on"
    smallest = sizes.index(min(sizes[:-1]))  # the last chunk is whatever remains
    assert max(sizes[smallest + 1 :]) > sizes[smallest], "the chunks never grew back"
    drop(pg, dsn)
    return figures


def test_backends_terminated_every_half_second(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    # 8 s: under load the first attempts may all be killed and the waits between them grow;
    # the kills must outlast that to show chunks committed between them
    terminations(server, psql_csv, tmp_path, 1_000_000, 8.0)


@pytest.mark.slow
def test_backends_terminated_every_half_second_for_ten_seconds(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    terminations(server, psql_csv, tmp_path, 3_000_000, 10.0)


def test_the_readme_states_the_defaults_the_code_has() -> None:
    """The README's figures of how long an outage is waited out, and how to change it, are the
    code's (the measured ones above print alongside)."""
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert DEFAULT.max_outage == 300.0 and "for up to **5 minutes** per chunk" in readme
    last = f"growing to {DEFAULT.max_delay / 2:g}-{DEFAULT.max_delay:g} s"
    assert last in readme, last
    first = f"waits of {DEFAULT.base_delay / 2:g}-{DEFAULT.base_delay:g} s"
    assert first in readme, first
    assert "`--max-outage SECONDS` (`max_outage=` in Python)" in readme
    assert f"`--retries N` (default {DEFAULT.retries})" in readme
    assert f"`--retry-budget S` (default {DEFAULT.budget:g})" in readme


def test_a_bulk_rerun_started_during_an_outage_waits_it_out(
    server: EphemeralPostgres, psql_csv: PsqlCsv, tmp_path: Path
) -> None:
    """A bulk job that ran before (its report is there) and is started again while its server
    is away waits the outage out as it connects, as a resumed export does: past ``max_outage``
    exit 1, resumable, nothing touched; back within it, the job finishes. A first run of the
    same plan during the outage is a usage error at once (exit 2): a wrong host looks alike."""
    dsn = database(server, 1_000)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE u AS SELECT g AS id, g * 2 AS v FROM generate_series(1, 500) g")
        conn.execute("ALTER TABLE u ADD PRIMARY KEY (id); ANALYZE")

    def plan(max_outage: int, output_dir: str = "out") -> Path:
        path = tmp_path / f"plan-{output_dir}-{max_outage}.toml"
        path.write_text(
            f"[defaults]\ndsn = {json.dumps(dsn)}\noutput_dir = {json.dumps(output_dir)}\n"
            f'max_outage = {max_outage}\n\n[[tables]]\nname = "t"\n\n[[tables]]\nname = "u"\n'
        )
        return path

    def bulk(path: Path) -> subprocess.Popen[str]:
        cmd = [sys.executable, "-m", "copystream", "bulk", str(path), "--no-progress"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    out = tmp_path / "out"
    first = bulk(plan(2))
    assert first.wait(timeout=120) == 0, first.communicate()
    (out / "public.u.csv").unlink()  # one table to do again: the re-run has work
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    server.stop("fast")
    try:
        started = time.monotonic()
        fresh = bulk(plan(2, "elsewhere"))  # never ran: a usage error, at once
        _, err = fresh.communicate(timeout=60)
        assert fresh.returncode == 2, err
        assert len(error_lines(err)) == 1 and time.monotonic() - started < 30, err
        rerun = bulk(plan(2))
        _, err = rerun.communicate(timeout=60)
        assert rerun.returncode == 1, err
        errors = error_lines(err)
        assert len(errors) == 1 and "run the same command again to resume" in errors[0], err
        assert "unreachable for 2s" in errors[0], err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
        waiting = bulk(plan(60))
        time.sleep(3)
        assert waiting.poll() is None, waiting.communicate()
        server.start()
        _, err = waiting.communicate(timeout=120)
    finally:
        server.start()
    assert waiting.returncode == 0, err
    assert not error_lines(err)
    assert (out / "public.u.csv").read_bytes() == psql_csv(dsn, "SELECT * FROM u ORDER BY id")
    assert (out / "public.t.csv").read_bytes() == before["public.t.csv"]
    drop(server, dsn)
