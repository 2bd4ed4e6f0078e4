"""Unit tests of copystream.retry: classification of real psycopg errors and the backoff policy.

An outage (the server unreachable or going away) is a duration: retried until the step has been
failing for ``max_outage`` seconds, however many attempts that takes; an error that repeats on a
live server is a count (``retries``). The clock and the random draw are injected: nothing here
waits.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from copystream.errors import DiskFull, KeyProblem
from copystream.failures import classify_connect
from copystream.retry import (
    Decision,
    Failure,
    Retrier,
    RetryPolicy,
    RetryState,
    StallTimeout,
    classify,
    decide,
)


def port_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["port"])


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pg_error(sqlstate: str, message: str = "msg") -> psycopg.Error:
    """A real psycopg exception of the class psycopg raises for ``sqlstate``."""
    err = psycopg.errors.lookup(sqlstate)(message)
    assert err.sqlstate == sqlstate
    return err


# -- classify -----------------------------------------------------------------------------------


def test_lost_connection_without_sqlstate_is_transient() -> None:
    e = psycopg.OperationalError(
        "consuming input failed: server closed the connection unexpectedly\n"
        "\tThis probably means the server terminated abnormally"
    )
    assert e.sqlstate is None
    failure = classify(e)
    assert failure is not None and failure.outage
    assert "connection lost" in failure.reason
    assert "server closed the connection unexpectedly" in failure.reason


def test_empty_operational_error_is_transient() -> None:
    lost = Failure("connection lost (connection lost)", outage=True)
    assert classify(psycopg.OperationalError("")) == lost


def test_closed_connection_interface_error_is_transient() -> None:
    assert classify(psycopg.InterfaceError("the connection is closed")) is not None


@pytest.mark.parametrize("state", ["08000", "08001", "08003", "08006", "08P01"])
def test_connection_exception_class_08_is_transient(state: str) -> None:
    assert classify(pg_error(state)) == Failure(f"connection exception {state}", outage=True)


@pytest.mark.parametrize("state", ["57P01", "57P02", "57P03", "53300"])
def test_outage_sqlstates(state: str) -> None:
    """Shutdowns, a server not accepting connections yet, no free connection slot."""
    failure = classify(pg_error(state))
    assert failure is not None and failure.outage, state


@pytest.mark.parametrize(
    "state", ["40001", "40P01", "55P03", "53100", "53200", "58030", "25P04", "57P05"]
)
def test_live_server_sqlstates_are_counted(state: str) -> None:
    failure = classify(pg_error(state))
    assert failure is not None and not failure.outage, state


def test_read_only_25006_is_an_outage_only_during_recovery() -> None:
    """A standby (in recovery) refusing something is a failover under way: waited out. A READ
    ONLY transaction refusing a writing filter is the request's fault: never retried."""
    standby = classify(pg_error("25006", "cannot execute pg_export_snapshot() during recovery"))
    assert standby is not None and standby.outage and "recovery" in standby.reason
    writing = pg_error("25006", "cannot execute nextval() in a read-only transaction")
    assert classify(writing) is None


@pytest.mark.parametrize(
    "state",
    [
        "42601",  # syntax error
        "42P01",  # undefined table
        "42501",  # insufficient privilege
        "42703",  # undefined column
        "22P02",  # invalid text representation
        "23505",  # unique violation
        "XX000",  # internal error
    ],
)
def test_permanent_sqlstates(state: str) -> None:
    assert classify(pg_error(state)) is None
    assert classify(pg_error(state), retry_statement_timeout=True) is None


def test_query_canceled_transient_only_when_asked() -> None:
    e = pg_error("57014", "canceling statement due to statement timeout")
    assert classify(e) is None
    assert classify(e, retry_statement_timeout=True) == Failure("statement timeout")


def test_stall_timeout_is_transient_and_counted() -> None:
    failure = classify(StallTimeout("no data for 300s"))
    assert failure is not None and not failure.outage


@pytest.mark.parametrize(
    "exc",
    [DiskFull("no space left"), KeyProblem("no key")],
    ids=["DiskFull", "KeyProblem"],
)
def test_copystream_errors_are_permanent(exc: Exception) -> None:
    assert classify(exc) is None
    assert classify(exc, retry_statement_timeout=True) is None


def test_socket_errors_are_transient_and_other_exceptions_are_not() -> None:
    reset = classify(ConnectionResetError(104, "Connection reset by peer"))
    assert reset is not None and reset.outage
    assert classify(TimeoutError("timed out")) is not None
    assert classify(ValueError("bug")) is None
    assert classify(psycopg.ProgrammingError("bad query")) is None


def test_errors_from_a_real_server_classify(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as syntax:
            conn.execute("SELEC 1")
        assert classify(syntax.value) is None
        with pytest.raises(psycopg.Error) as missing:
            conn.execute("SELECT * FROM no_such_table")
        assert classify(missing.value) is None
        conn.execute("SET statement_timeout = '10ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as canceled:
            conn.execute("SELECT pg_sleep(5)")
        assert classify(canceled.value) is None
        timeout = classify(canceled.value, retry_statement_timeout=True)
        assert timeout == Failure("statement timeout")
    with psycopg.connect(dsn, autocommit=True) as victim, psycopg.connect(dsn) as killer:
        pid = victim.info.backend_pid
        killer.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(psycopg.OperationalError) as lost:
            victim.execute("SELECT 1")
        terminated = classify(lost.value)
        assert terminated is not None and terminated.outage
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(dsn.replace(f"port={port_of(dsn)}", f"port={free_port()}"))
    failure = classify(refused.value)
    assert failure is not None and failure.outage, refused.value
    # before anything worked, the same refusal is a mistake to report fast, so it is counted
    first = classify_connect(refused.value)
    assert first is not None and not first.outage


# -- decide -------------------------------------------------------------------------------------

OUTAGE = Failure("connection lost (Connection refused)", outage=True)
LIVE = Failure("deadlock detected")


def take_max(lo: float, hi: float) -> float:
    return hi


def take_min(lo: float, hi: float) -> float:
    return lo


def test_cap_grows_exponentially_and_is_clamped() -> None:
    p = RetryPolicy(base_delay=0.5, max_delay=30.0)
    assert [p.cap(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert p.cap(200) == 30.0
    assert RetryPolicy().cap(100) == 15.0  # the default: a server that is back is seen in 15 s


def test_delays_are_the_cap_with_jitter_in_its_upper_half() -> None:
    p = RetryPolicy(retries=10, base_delay=1.0, max_delay=5.0, budget=1e9)
    state = RetryState()
    seen: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    delays = []
    for _ in range(5):
        d = decide(p, state, failure=LIVE, now=0.0, rand=rand)
        assert d.retry
        delays.append(d.delay)
        state = d.state
    assert seen == [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.5, 5.0), (2.5, 5.0)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_delays_with_real_random_stay_within_half_cap_and_cap() -> None:
    p = RetryPolicy(retries=8, base_delay=0.25, max_delay=3.0, budget=1e9)
    rng = random.Random(1234)
    for _ in range(50):
        state = RetryState()
        for attempt in range(1, 9):
            d = decide(p, state, failure=LIVE, now=0.0, rand=rng.uniform)
            assert d.retry
            assert p.cap(attempt) / 2 <= d.delay <= p.cap(attempt) <= 3.0
            state = d.state


def test_live_server_errors_are_counted_per_step_and_exhausted() -> None:
    p = RetryPolicy(retries=3, budget=1e9)
    state = RetryState()
    for n in range(1, 4):
        d = decide(p, state, failure=LIVE, now=float(n), rand=take_min)
        assert d.retry, n
        assert d.state.repeats == n
        state = d.state
    d = decide(p, state, failure=LIVE, now=10.0, rand=take_min)
    assert not d.retry
    assert d.reason == "3 retries used up (deadlock detected)"
    # A successful step starts the count again.
    state = state.succeeded(now=11.0)
    assert state.attempts == state.repeats == 0
    assert decide(p, state, failure=LIVE, now=20.0, rand=take_min).retry


def test_zero_retries_never_retry_a_live_server_error() -> None:
    d = decide(RetryPolicy(retries=0), RetryState(), failure=LIVE, now=0.0, rand=take_min)
    assert not d.retry
    assert d.state.attempts == 1


def run_outage(
    p: RetryPolicy, rand: Callable[[float, float], float] = random.uniform
) -> tuple[list[float], Decision]:
    """Fail with an outage on a clock that the decided waits advance; the waits and the end."""
    clock, state = 0.0, RetryState()
    waits: list[float] = []
    while True:
        d = decide(p, state, failure=OUTAGE, now=clock, rand=rand)
        state = d.state
        if not d.retry:
            return waits, d
        waits.append(d.delay)
        clock += d.delay + 0.01  # each attempt takes 10 ms


def test_an_outage_is_a_duration_not_a_count() -> None:
    """The default policy waits out a server that stays unreachable for 5 minutes, whatever
    ``retries`` says, with waits that grow to 15 s: about 25 attempts, not 5."""
    p = RetryPolicy()
    assert (p.retries, p.max_outage) == (5, 300.0)
    for seed in range(20):
        waits, end = run_outage(p, random.Random(seed).uniform)
        total = sum(waits) + 0.01 * len(waits)
        assert 299.9 <= total <= 300.0 + 0.02, (seed, total)
        assert 20 <= len(waits) <= 45, (seed, len(waits))
        assert max(waits) <= 15.0 and waits[0] >= 0.25
        assert all(w >= min(p.cap(n + 1) / 2, 300.0 - sum(waits[:n]) - 0.01 * n) - 1e-9
                   for n, w in enumerate(waits))  # fmt: skip
        assert end.reason == "the server was unreachable for 300s"
    # retries=0 does not shorten an outage
    waits, _ = run_outage(RetryPolicy(retries=0, max_outage=20.0), take_max)
    assert 19.9 <= sum(waits) + 0.01 * len(waits) <= 20.02


def test_the_last_attempt_comes_when_the_allowed_outage_ends() -> None:
    p = RetryPolicy(base_delay=4.0, max_delay=4.0, max_outage=10.0, budget=1e9)
    waits, _ = run_outage(p, take_max)
    assert waits == [4.0, 4.0, pytest.approx(1.98)]


def test_an_outage_counts_waits_even_when_sleep_passes_no_time() -> None:
    """With an injected sleep the clock stands still; the decided waits still add up."""
    p = RetryPolicy(max_outage=30.0, budget=1e9)
    state, n = RetryState(), 0
    while True:
        d = decide(p, state, failure=OUTAGE, now=100.0, rand=take_max)
        state = d.state
        if not d.retry:
            break
        n += 1
    assert state.waited == pytest.approx(30.0)
    assert 4 <= n <= 8


def test_outage_and_count_mix_in_one_streak() -> None:
    """Live-server errors in an outage streak are counted; the outage clock runs from the
    first failure of the streak."""
    p = RetryPolicy(retries=1, max_outage=60.0, budget=1e9)
    d1 = decide(p, RetryState(), failure=OUTAGE, now=0.0, rand=take_min)
    d2 = decide(p, d1.state, failure=LIVE, now=10.0, rand=take_min)
    assert d2.retry and d2.state.repeats == 1
    d3 = decide(p, d2.state, failure=OUTAGE, now=59.0, rand=take_min)
    assert d3.retry and d3.failing == 59.0
    assert not decide(p, d3.state, failure=LIVE, now=59.5, rand=take_min).retry
    assert not decide(p, d3.state, failure=OUTAGE, now=60.0, rand=take_min).retry


def test_succeeded_resets_the_streak_but_keeps_time_spent() -> None:
    p = RetryPolicy(retries=5, budget=1e9)
    d1 = decide(p, RetryState(spent=3.0), failure=LIVE, now=100.0, rand=take_min)
    assert d1.state.failed_since == 100.0
    d2 = decide(p, d1.state, failure=LIVE, now=104.0, rand=take_min)
    assert d2.state.failed_since == 100.0  # the streak began at the first failure
    ok = d2.state.succeeded(now=107.0)
    assert ok == RetryState(attempts=0, spent=10.0, failed_since=None)
    # succeeding without a failing streak adds nothing
    assert ok.succeeded(now=500.0).spent == 10.0


def test_budget_stops_retries() -> None:
    p = RetryPolicy(retries=100, base_delay=1.0, max_delay=1.0, budget=10.0)
    d = decide(p, RetryState(), failure=LIVE, now=0.0, rand=take_max)
    assert d.retry and d.delay == 1.0
    d = decide(p, d.state, failure=LIVE, now=5.0, rand=take_max)
    assert d.retry  # 5 s spent + 1 s wait <= 10
    assert decide(p, d.state, failure=LIVE, now=9.5, rand=take_min).retry  # 9.5 + 0.5 <= 10
    stop = decide(p, d.state, failure=LIVE, now=9.5, rand=take_max)  # 9.5 + 1 > 10
    assert not stop.retry
    assert stop.delay == 0.0
    assert stop.reason == "retry time budget of 10s used up (deadlock detected)"


def test_budget_is_shared_by_all_steps() -> None:
    p = RetryPolicy(retries=100, base_delay=1.0, max_delay=1.0, budget=10.0)
    d = decide(p, RetryState(), failure=OUTAGE, now=0.0, rand=take_max)
    state = d.state.succeeded(now=9.5)  # 9.5 s lost on the first chunk
    d = decide(p, state, failure=OUTAGE, now=1000.0, rand=take_max)  # a later chunk fails
    assert not d.retry
    assert "budget" in d.reason


def test_permanent_errors_never_retry() -> None:
    p = RetryPolicy(retries=100, budget=1e9)
    d = decide(p, RetryState(), failure=None, now=0.0, rand=take_max)
    assert not d.retry
    assert d.delay == 0.0
    assert d.reason == "permanent error"


def test_classify_then_decide_end_to_end() -> None:
    p = RetryPolicy(retries=2, budget=1e9)
    transient = classify(pg_error("57P01", "terminating connection due to administrator command"))
    permanent = classify(pg_error("42P01", 'relation "t" does not exist'))
    assert decide(p, RetryState(), failure=transient, now=0.0, rand=take_min).retry
    assert not decide(p, RetryState(), failure=permanent, now=0.0, rand=take_min).retry


# -- Retrier: the loop helper --------------------------------------------------------------------


class Clock:
    """A clock that only the injected sleep moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_retrier_logs_each_attempt_and_the_return(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    r = Retrier(RetryPolicy(max_outage=20.0), sleep=clock.sleep, clock=lambda: clock.now)
    lost = psycopg.OperationalError("connection to server failed: Connection refused")
    with caplog.at_level(logging.INFO, logger="copystream"):
        for _ in range(4):
            d = r.failed(lost)
            assert d.retry and d.outage and r.transient
            r.wait(d, "chunk 7 of public.t", then=", with 500 rows instead of 1,000")
        r.succeeded("chunk 7 of public.t")
        r.succeeded("chunk 8 of public.t")  # no streak: no line
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 5, lines
    assert all(x.startswith("chunk 7 of public.t failed (connection lost (") for x in lines[:4])
    assert "attempt 2 in" in lines[0] and "up to 20s for an outage" in lines[0]
    assert lines[3].endswith(", with 500 rows instead of 1,000")
    back = f"chunk 7 of public.t: back after {sum(clock.slept):.1f}s and 4 failed attempts"
    assert lines[4] == back
    assert r.retries == 4 and r.state == RetryState(spent=sum(clock.slept))


def test_retrier_gives_up_after_the_outage_with_a_standing_clock() -> None:
    """An injected sleep that passes no time (as tests pass) still ends an outage."""
    slept: list[float] = []
    r = Retrier(RetryPolicy(max_outage=10.0), sleep=slept.append)
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    while (d := r.failed(lost)).retry:
        r.wait(d, "connecting")
    assert sum(slept) == pytest.approx(10.0)
    assert d.reason.startswith("the server was unreachable for 10s")
