"""Retry as data: classify an error, then decide — attempt again, after how long, or give up.

:func:`classify` looks at an exception; :func:`decide` looks at a :class:`RetryPolicy`, a
:class:`RetryState` and the current time: both are pure. :class:`Retrier` is the one loop helper
every retrying loop uses (connecting, planning, chunks): classify → decide → log and wait, with
the clock and the sleep injected, so tests of the backoff run instantly.
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
    "Decision",
    "Retrier",
    "RetryPolicy",
    "RetryState",
    "StallTimeout",
    "classify",
    "decide",
]

log = logging.getLogger("copystream")

#: SQLSTATEs worth retrying: the server or the network, not the request, was at fault.
TRANSIENT_SQLSTATES = {
    "57P01": "admin shutdown",
    "57P02": "crash shutdown",
    "57P03": "cannot connect now",
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "53300": "too many connections",
    "55P03": "lock not available",
    "53100": "disk full on the server",
    "53200": "out of memory on the server",
    "58030": "I/O error on the server",
}


class StallTimeout(psycopg.OperationalError):
    """No byte arrived from the server for longer than the I/O timeout (a stalled network)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try a chunk again.

    ``retries`` is per chunk (a successful chunk resets the count); ``budget`` is the total
    number of seconds the whole export may spend failing and waiting. Waits grow exponentially
    from ``base_delay`` up to ``max_delay``, with full jitter (a uniform draw below the cap), so
    that many exporters hitting one restarted server do not come back in lockstep.
    """

    retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    budget: float = 900.0
    retry_statement_timeout: bool = False

    def cap(self, attempt: int) -> float:
        """Upper bound of the wait before retry number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.base_delay * (2 ** (attempt - 1))))


@dataclass(frozen=True)
class RetryState:
    """What has happened so far: failures of the current chunk, and time spent failing."""

    attempts: int = 0  # failures of the current chunk
    spent: float = 0.0  # seconds spent in failed attempts and waits, whole export
    failed_since: float | None = None  # clock reading when the current failing streak began

    def succeeded(self, now: float) -> RetryState:
        """The state after a chunk succeeds: the per-chunk count starts again."""
        spent = self.spent + (now - self.failed_since if self.failed_since is not None else 0.0)
        return RetryState(attempts=0, spent=spent, failed_since=None)


@dataclass(frozen=True)
class Decision:
    """The verdict on one failure."""

    retry: bool
    delay: float
    state: RetryState
    reason: str


def classify(exc: BaseException, *, retry_statement_timeout: bool = False) -> str | None:
    """The reason ``exc`` is transient (worth a retry on a fresh connection), or ``None``.

    Lost connections (``OperationalError`` without a SQLSTATE, as from ``pg_terminate_backend``
    or a killed backend), class 08, shutdowns, serialization failures, deadlocks, too many
    connections and lock timeouts are transient. Syntax errors, missing objects, permissions,
    client disk full and everything else are permanent.
    """
    if isinstance(exc, CopystreamError):
        return None
    if isinstance(exc, StallTimeout):
        return "no data from the server within the I/O timeout"
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return "statement timeout" if retry_statement_timeout else None
    if isinstance(exc, psycopg.Error):
        state = exc.sqlstate
        if state is None:
            if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection lost"
                return f"connection lost ({first})"
            return None
        if state.startswith("08"):
            return f"connection exception {state}"
        return TRANSIENT_SQLSTATES.get(state)
    if isinstance(exc, ConnectionError | TimeoutError):
        return f"network error ({exc})"
    return None


def decide(
    policy: RetryPolicy,
    state: RetryState,
    *,
    reason: str | None,
    now: float,
    rand: Callable[[float, float], float] = random.uniform,
) -> Decision:
    """Decide what to do after a failure classified as ``reason`` (``None`` = permanent)."""
    failed_since = state.failed_since if state.failed_since is not None else now
    attempts = state.attempts + 1
    new_state = replace(state, attempts=attempts, failed_since=failed_since)
    if reason is None:
        return Decision(False, 0.0, new_state, "permanent error")
    if attempts > policy.retries:
        return Decision(False, 0.0, new_state, f"{policy.retries} retries used up ({reason})")
    spent = state.spent + (now - failed_since)
    delay = rand(0.0, policy.cap(attempts))
    if spent + delay > policy.budget:
        return Decision(
            False, 0.0, new_state, f"retry time budget of {policy.budget:g}s used up ({reason})"
        )
    return Decision(True, delay, new_state, reason)


class Retrier:
    """The state of one retrying loop: classify → decide → log and wait.

    Used the same way by every loop that retries::

        retrier = Retrier(policy, sleep=sleep)
        while True:
            try:
                return attempt()
            except psycopg.Error as e:
                d = retrier.failed(e)
                if not d.retry:
                    raise give_up(e, d) from e
                retrier.wait(d, "planning the export of t")

    ``classifier`` says whether an error is transient (default :func:`classify`, honouring the
    policy's ``retry_statement_timeout``); ``retries`` counts every wait taken.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        classifier: Callable[[BaseException], str | None] | None = None,
    ) -> None:
        self.policy = policy
        self.state = RetryState()
        self.retries = 0
        self.transient = False  # whether the last failure recorded was transient
        self._sleep = sleep
        self._clock = clock
        self._classify = classifier or (
            lambda e: classify(e, retry_statement_timeout=policy.retry_statement_timeout)
        )

    def failed(self, exc: BaseException) -> Decision:
        """Record a failure and decide about it; :attr:`transient` says how it was classified."""
        reason = self._classify(exc)
        d = decide(self.policy, self.state, reason=reason, now=self._clock())
        self.state = d.state
        self.transient = reason is not None
        return d

    def wait(self, d: Decision, doing: str, *, level: int = logging.WARNING) -> None:
        """Log the retry of ``doing`` and sleep the decided delay."""
        self.retries += 1
        log.log(
            level,
            "%s failed (%s); retry %d/%d in %.1fs",
            doing,
            d.reason,
            d.state.attempts,
            self.policy.retries,
            d.delay,
        )
        self._sleep(d.delay)

    def succeeded(self) -> None:
        """A step succeeded: the per-step count starts again (the budget keeps running)."""
        self.state = self.state.succeeded(self._clock())
