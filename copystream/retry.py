"""Retry as data: classify an error, then decide — attempt again, after how long, or give up.

:func:`classify` looks at an exception and says whether it is worth another attempt, and which
limit governs it (a :class:`Failure`); :func:`decide` looks at a :class:`RetryPolicy`, a
:class:`RetryState` and the current time: both are pure. :class:`Retrier` is the one loop helper
every retrying loop uses (connecting, planning, chunks, restarting a dead worker): classify →
decide → log and wait, with the clock and the sleep injected, so tests of the backoff run
instantly.

Two kinds of trouble, two limits:

* an **outage** — the server cannot be reached or went away (connection refused or reset, a
  terminated backend, a shutdown, a server still starting, a standby in recovery, no free
  connection slot) — is a *duration*: the step is tried again until it has been failing for
  ``max_outage`` seconds (default 300), however many attempts that takes;
* an error that **repeats on a live server** (a serialization failure, a deadlock, a lock or
  statement timeout, a stalled stream, the server's disk or memory full) is a *count*: at most
  ``retries`` times per step.

Both reset when the step succeeds; ``budget`` caps the seconds a whole run spends failing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psycopg

from .errors import CopystreamError

__all__ = [
    "OUTAGE_SQLSTATES",
    "REPEAT_SQLSTATES",
    "Decision",
    "Failure",
    "Retrier",
    "RetryPolicy",
    "RetryState",
    "StallTimeout",
    "classify",
    "decide",
]

log = logging.getLogger("copystream")

#: SQLSTATEs that mean the server is going away, not up yet, or full: an outage (a duration).
OUTAGE_SQLSTATES = {
    "57P01": "admin shutdown",
    "57P02": "crash shutdown",
    "57P03": "cannot connect now",
    "53300": "too many connections",
}
#: SQLSTATEs of a live server worth a few more attempts: counted against ``retries``.
REPEAT_SQLSTATES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
    "53100": "disk full on the server",
    "53200": "out of memory on the server",
    "58030": "I/O error on the server",
    # the server ended the session for a timeout of its own: a fresh one (a smaller chunk
    # after a transaction timeout) goes on
    "25P04": "the server's transaction_timeout",
    "57P05": "the server's idle_session_timeout",
}


class StallTimeout(psycopg.OperationalError):
    """No byte arrived from the server for longer than the I/O timeout (a stalled network)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a step (a chunk, a connection, the planning) again.

    An outage (see :func:`classify`) is retried until the step has been failing for
    ``max_outage`` seconds; any other transient error at most ``retries`` times in a row. Both
    start again after every step that succeeds. ``budget`` is the total number of seconds a
    whole export may spend failing and waiting. Before attempt *n* + 1 the wait is drawn
    uniformly from ``[cap(n) / 2, cap(n)]``, ``cap(n) = min(max_delay, base_delay * 2**(n-1))``:
    exponential, capped, with jitter (so that many exporters hitting one restarted server do
    not come back in lockstep), never vanishing (a few seconds of outage are not ten attempts).
    """

    retries: int = 5
    base_delay: float = 0.5
    #: The longest wait between two attempts: a server that is back is noticed within this.
    max_delay: float = 15.0
    budget: float = 900.0
    retry_statement_timeout: bool = False
    #: A managed database's failover takes 1-2 minutes (RDS Multi-AZ: 60-120 s), a Patroni
    #: switchover some seconds, a restart for a minor upgrade under a minute: 5 minutes covers
    #: them with room to spare, and is still short enough to notice a server that is gone.
    max_outage: float = 300.0

    def cap(self, attempt: int) -> float:
        """Upper bound of the wait before retry number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.base_delay * (2 ** (attempt - 1))))


@dataclass(frozen=True)
class Failure:
    """Why an error is worth another attempt, and which limit governs it."""

    reason: str
    #: The server cannot be reached or went away: limited by ``max_outage``, not counted.
    outage: bool = False


@dataclass(frozen=True)
class RetryState:
    """What has happened so far: the current failing streak, and time spent failing."""

    attempts: int = 0  # failures of the current step, of every kind
    spent: float = 0.0  # seconds spent in failed attempts and waits, whole run, past streaks
    failed_since: float | None = None  # clock reading when the current failing streak began
    repeats: int = 0  # failures of the current step that were not an outage
    waited: float = 0.0  # seconds of waits decided in the current streak

    def failing(self, now: float) -> float:
        """Seconds the current streak has lasted: by the clock, or by the waits decided,
        whichever says more (an injected sleep that does not pass real time still counts)."""
        if self.failed_since is None:
            return 0.0
        return max(now - self.failed_since, self.waited)

    def succeeded(self, now: float) -> RetryState:
        """The state after the step succeeds: the streak ends, its time joins ``spent``."""
        return RetryState(spent=self.spent + self.failing(now))


@dataclass(frozen=True)
class Decision:
    """The verdict on one failure."""

    retry: bool
    delay: float
    state: RetryState
    reason: str
    outage: bool = False  # the failure was an outage (the log says for how long)
    failing: float = 0.0  # seconds the streak had lasted at this failure


def classify(exc: BaseException, *, retry_statement_timeout: bool = False) -> Failure | None:
    """Whether ``exc`` is transient (worth a retry on a fresh connection), and of which kind.

    An outage: a lost connection (``OperationalError`` without a SQLSTATE, as from
    ``pg_terminate_backend``, a killed backend, a refused or reset connection), class 08,
    admin or crash shutdown, cannot connect now, too many connections, and a 25006 raised
    because the server is in recovery (a standby during a failover). Repeating on a live
    server: serialization failures, deadlocks, lock timeouts, the server's disk or memory full,
    its I/O errors, a session it ended for its ``transaction_timeout`` or
    ``idle_session_timeout``, a stalled stream and (when asked) a statement timeout. Syntax errors,
    missing objects, permissions, a filter that writes (25006 "in a read-only transaction"),
    the client's disk full and everything else are permanent (``None``).
    """
    if isinstance(exc, CopystreamError):
        return None
    if isinstance(exc, StallTimeout):
        return Failure("no data from the server within the I/O timeout")
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return Failure("statement timeout") if retry_statement_timeout else None
    if isinstance(exc, psycopg.Error):
        return _classify_psycopg(exc)
    if isinstance(exc, ConnectionError | TimeoutError):
        return Failure(f"network error ({exc})", outage=True)
    return None


def _classify_psycopg(exc: psycopg.Error) -> Failure | None:
    state = exc.sqlstate
    if state is None:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection lost"
            return Failure(f"connection lost ({first})", outage=True)
        return None
    if state.startswith("08"):
        return Failure(f"connection exception {state}", outage=True)
    if state == "25006" and "during recovery" in str(exc):
        # a standby refusing what only a primary does; "... in a read-only transaction" is
        # this export's own READ ONLY transaction refusing a writing filter: permanent
        return Failure("the server is in recovery (a standby, or a failover under way)", True)
    if state in OUTAGE_SQLSTATES:
        return Failure(OUTAGE_SQLSTATES[state], outage=True)
    if state in REPEAT_SQLSTATES:
        return Failure(REPEAT_SQLSTATES[state])
    return None


def decide(
    policy: RetryPolicy,
    state: RetryState,
    *,
    failure: Failure | None,
    now: float,
    rand: Callable[[float, float], float] = random.uniform,
) -> Decision:
    """Decide what to do after a failure classified as ``failure`` (``None`` = permanent)."""
    failed_since = state.failed_since if state.failed_since is not None else now
    started = replace(state, failed_since=failed_since)
    failing = started.failing(now)
    outage = failure is not None and failure.outage
    new_state = replace(
        started,
        attempts=state.attempts + 1,
        repeats=state.repeats + (failure is not None and not outage),
    )
    if failure is None:
        return Decision(False, 0.0, new_state, "permanent error", failing=failing)
    reason = failure.reason

    def stop(why: str) -> Decision:
        return Decision(False, 0.0, new_state, why, outage, failing)

    if outage and failing >= policy.max_outage:  # the error itself says how it was unreachable
        return stop(f"the server was unreachable for {policy.max_outage:g}s")
    why = f"({reason})"
    if not outage and new_state.repeats > policy.retries:
        return stop(f"{policy.retries} retries used up {why}")
    cap = policy.cap(new_state.attempts)
    delay = rand(cap / 2, cap)
    if outage:  # the last attempt comes when the allowed outage ends, not after it
        delay = min(delay, policy.max_outage - failing)
    if state.spent + failing + delay > policy.budget:
        return stop(f"retry time budget of {policy.budget:g}s used up {why}")
    waited = replace(new_state, waited=new_state.waited + delay)
    return Decision(True, delay, waited, reason, outage, failing)


class Retrier:
    """The state of one retrying loop: classify → decide → log and wait.

    Used the same way by every loop that retries::

        retrier = Retrier(policy, sleep=sleep)
        while True:
            try:
                result = attempt()
            except psycopg.Error as e:
                d = retrier.failed(e)
                if not d.retry:
                    raise give_up(e, d) from e
                retrier.wait(d, "planning the export of t")
            else:
                retrier.succeeded("planning the export of t")
                return result

    ``classifier`` says whether an error is transient and of which kind (default
    :func:`classify`, honouring the policy's ``retry_statement_timeout``); ``retries`` counts
    every retry announced. Each retry is one log line; the first success after a failing
    streak is one more ("... back after 42.0s").
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        classifier: Callable[[BaseException], Failure | None] | None = None,
    ) -> None:
        self.policy = policy
        self.state = RetryState()
        self.retries = 0
        #: Retries announced, by reason ("outage" for every outage: their texts vary).
        self.by_reason: dict[str, int] = {}
        self.outage_seconds = 0.0  # seconds of failing streaks that were outages, ended
        self._in_outage = False
        self.transient = False  # whether the last failure recorded was transient
        self._sleep = sleep
        self._clock = clock
        self._classify = classifier or (
            lambda e: classify(e, retry_statement_timeout=policy.retry_statement_timeout)
        )

    def failed(self, exc: BaseException) -> Decision:
        """Record a failure and decide about it; :attr:`transient` says how it was classified."""
        failure = self._classify(exc)
        d = decide(self.policy, self.state, failure=failure, now=self._clock())
        self.state = d.state
        self.transient = failure is not None
        return d

    def announce(
        self, d: Decision, doing: str, *, then: str = "", level: int = logging.WARNING
    ) -> None:
        """Log the retry of ``doing`` (``then``: what the next attempt does differently)."""
        self.retries += 1
        why = "outage" if d.outage else d.reason
        self.by_reason[why] = self.by_reason.get(why, 0) + 1
        self._in_outage = self._in_outage or d.outage
        if d.outage:
            log.log(
                level,
                "%s failed (%s); failing for %.1fs (up to %gs for an outage); attempt %d in "
                "%.1fs%s",
                doing, d.reason, d.failing, self.policy.max_outage, d.state.attempts + 1,
                d.delay, then,
            )  # fmt: skip
        else:
            log.log(
                level,
                "%s failed (%s); retry %d/%d in %.1fs%s",
                doing, d.reason, d.state.repeats, self.policy.retries, d.delay, then,
            )  # fmt: skip

    def wait(
        self, d: Decision, doing: str, *, then: str = "", level: int = logging.WARNING
    ) -> None:
        """Log the retry of ``doing`` and sleep the decided delay."""
        self.announce(d, doing, then=then, level=level)
        self._sleep(d.delay)

    def succeeded(self, doing: str | None = None) -> None:
        """A step succeeded: the streak ends, the counts start again (the budget keeps
        running). After a failing streak, ``doing`` is logged as being back."""
        now = self._clock()
        if doing is not None and self.state.attempts:
            log.info(
                "%s: back after %.1fs and %d failed attempt%s",
                doing,
                self.state.failing(now),
                self.state.attempts,
                "" if self.state.attempts == 1 else "s",
            )
        if self._in_outage:
            self.outage_seconds += self.state.failing(now)
            self._in_outage = False
        self.state = self.state.succeeded(now)
