"""Unit tests of copystream.retry: classification of real psycopg errors and the backoff policy."""

from __future__ import annotations

import random

import psycopg
import pytest

from copystream.errors import DiskFull, KeyProblem
from copystream.retry import RetryPolicy, RetryState, StallTimeout, classify, decide


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
    reason = classify(e)
    assert reason is not None
    assert "connection lost" in reason
    assert "server closed the connection unexpectedly" in reason


def test_empty_operational_error_is_transient() -> None:
    assert classify(psycopg.OperationalError("")) == "connection lost (connection lost)"


def test_closed_connection_interface_error_is_transient() -> None:
    assert classify(psycopg.InterfaceError("the connection is closed")) is not None


@pytest.mark.parametrize("state", ["08000", "08001", "08003", "08006", "08P01"])
def test_connection_exception_class_08_is_transient(state: str) -> None:
    assert classify(pg_error(state)) == f"connection exception {state}"


@pytest.mark.parametrize("state", ["57P01", "57P02", "57P03", "40001", "40P01", "53300", "55P03"])
def test_transient_sqlstates(state: str) -> None:
    assert classify(pg_error(state)) is not None


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
    assert classify(e, retry_statement_timeout=True) == "statement timeout"


def test_stall_timeout_is_transient() -> None:
    assert classify(StallTimeout("no data for 300s")) is not None


@pytest.mark.parametrize(
    "exc",
    [DiskFull("no space left"), KeyProblem("no key")],
    ids=["DiskFull", "KeyProblem"],
)
def test_copystream_errors_are_permanent(exc: Exception) -> None:
    assert classify(exc) is None
    assert classify(exc, retry_statement_timeout=True) is None


def test_socket_errors_are_transient_and_other_exceptions_are_not() -> None:
    assert classify(ConnectionResetError(104, "Connection reset by peer")) is not None
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
        assert classify(canceled.value, retry_statement_timeout=True) == "statement timeout"
    with psycopg.connect(dsn, autocommit=True) as victim, psycopg.connect(dsn) as killer:
        pid = victim.info.backend_pid
        killer.execute("SELECT pg_terminate_backend(%s)", [pid])
        with pytest.raises(psycopg.OperationalError) as lost:
            victim.execute("SELECT 1")
        assert classify(lost.value) is not None


# -- decide -------------------------------------------------------------------------------------


def take_max(lo: float, hi: float) -> float:
    return hi


def take_min(lo: float, hi: float) -> float:
    return lo


def test_cap_grows_exponentially_and_is_clamped() -> None:
    p = RetryPolicy(base_delay=0.5, max_delay=30.0)
    assert [p.cap(n) for n in range(1, 9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert p.cap(200) == 30.0


def test_delays_are_the_cap_with_full_jitter() -> None:
    p = RetryPolicy(retries=10, base_delay=1.0, max_delay=5.0, budget=1e9)
    state = RetryState()
    seen: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    delays = []
    for _ in range(5):
        d = decide(p, state, reason="x", now=0.0, rand=rand)
        assert d.retry
        delays.append(d.delay)
        state = d.state
    assert seen == [(0.0, 1.0), (0.0, 2.0), (0.0, 4.0), (0.0, 5.0), (0.0, 5.0)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_delays_with_real_random_stay_within_zero_and_cap() -> None:
    p = RetryPolicy(retries=8, base_delay=0.25, max_delay=3.0, budget=1e9)
    rng = random.Random(1234)
    for _ in range(50):
        state = RetryState()
        for attempt in range(1, 9):
            d = decide(p, state, reason="x", now=0.0, rand=rng.uniform)
            assert d.retry
            assert 0.0 <= d.delay <= p.cap(attempt) <= 3.0
            state = d.state


def test_retries_are_counted_per_chunk_and_exhausted() -> None:
    p = RetryPolicy(retries=3, budget=1e9)
    state = RetryState()
    for n in range(1, 4):
        d = decide(p, state, reason="admin shutdown", now=float(n), rand=take_min)
        assert d.retry, n
        assert d.state.attempts == n
        state = d.state
    d = decide(p, state, reason="admin shutdown", now=10.0, rand=take_min)
    assert not d.retry
    assert d.reason == "3 retries used up (admin shutdown)"
    # A successful chunk starts the count again.
    state = state.succeeded(now=11.0)
    assert state.attempts == 0
    assert decide(p, state, reason="admin shutdown", now=20.0, rand=take_min).retry


def test_zero_retries_never_retry() -> None:
    d = decide(RetryPolicy(retries=0), RetryState(), reason="x", now=0.0, rand=take_min)
    assert not d.retry
    assert d.state.attempts == 1


def test_succeeded_resets_attempts_but_keeps_time_spent() -> None:
    p = RetryPolicy(retries=5, budget=1e9)
    d1 = decide(p, RetryState(spent=3.0), reason="x", now=100.0, rand=take_min)
    assert d1.state.failed_since == 100.0
    d2 = decide(p, d1.state, reason="x", now=104.0, rand=take_min)
    assert d2.state.failed_since == 100.0  # the streak began at the first failure
    ok = d2.state.succeeded(now=107.0)
    assert ok == RetryState(attempts=0, spent=10.0, failed_since=None)
    # succeeding without a failing streak adds nothing
    assert ok.succeeded(now=500.0).spent == 10.0


def test_budget_stops_retries() -> None:
    p = RetryPolicy(retries=100, base_delay=1.0, max_delay=1.0, budget=10.0)
    d = decide(p, RetryState(), reason="x", now=0.0, rand=take_max)
    assert d.retry and d.delay == 1.0
    d = decide(p, d.state, reason="x", now=5.0, rand=take_max)
    assert d.retry  # 5 s spent + 1 s wait <= 10
    assert decide(p, d.state, reason="x", now=9.5, rand=take_min).retry  # 9.5 + 0 <= 10
    stop = decide(p, d.state, reason="x", now=9.5, rand=take_max)  # 9.5 + 1 > 10
    assert not stop.retry
    assert stop.delay == 0.0
    assert stop.reason == "retry time budget of 10s used up (x)"


def test_budget_is_shared_by_all_chunks() -> None:
    p = RetryPolicy(retries=100, base_delay=1.0, max_delay=1.0, budget=10.0)
    d = decide(p, RetryState(), reason="x", now=0.0, rand=take_max)
    state = d.state.succeeded(now=9.5)  # 9.5 s lost on the first chunk
    d = decide(p, state, reason="x", now=1000.0, rand=take_max)  # a later chunk fails
    assert not d.retry
    assert "budget" in d.reason


def test_permanent_errors_never_retry() -> None:
    p = RetryPolicy(retries=100, budget=1e9)
    d = decide(p, RetryState(), reason=None, now=0.0, rand=take_max)
    assert not d.retry
    assert d.delay == 0.0
    assert d.reason == "permanent error"


def test_classify_then_decide_end_to_end() -> None:
    p = RetryPolicy(retries=2, budget=1e9)
    transient = classify(pg_error("57P01", "terminating connection due to administrator command"))
    permanent = classify(pg_error("42P01", 'relation "t" does not exist'))
    assert decide(p, RetryState(), reason=transient, now=0.0, rand=take_min).retry
    assert not decide(p, RetryState(), reason=permanent, now=0.0, rand=take_min).retry
