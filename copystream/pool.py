"""The one pool of worker processes: ``--workers`` (key ranges) and ``bulk --jobs`` (tables).

Workers are plain subprocesses of the current interpreter, ``python -m copystream._worker``, not
``multiprocessing`` children: ``spawn`` re-imports the caller's ``__main__`` in every child (a
script without an ``if __name__ == "__main__"`` guard would run again; an Airflow task would
re-import Airflow), and ``fork`` copies a possibly multi-threaded, large host process.

A :class:`Task` names a module-level function and its arguments. The worker reads the pickled
task on stdin, calls ``function(*args, progress=report)`` and writes one event per line on its
stdout, ``<kind> <base64 of a pickle>``: ``P`` a progress object, ``L`` a log line
(level, message), then ``R`` the function's result or ``E`` the exception it raised (a
:class:`CopystreamError` arrives as its own class, with its problem and remedy; anything else
as an :class:`ExportFailed` naming it). The coordinator reads the events as :class:`Event`
values from :func:`run_tasks`.

On Linux a worker asks the kernel to kill it when its coordinator dies (``PR_SET_PDEATHSIG``),
so a re-run never races an orphan writing the same files.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

from .errors import CopystreamError, ExportFailed

__all__ = ["Event", "Task", "run_tasks", "worker_main"]

log = logging.getLogger("copystream")

#: Seconds between two progress events of one worker (a finished one always reports).
PROGRESS_INTERVAL = 0.2


@dataclass(frozen=True)
class Task:
    """A call to run in a worker: ``function(*args, progress=callback)``, all picklable."""

    function: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class Event:
    """Something a task did. ``kind`` is ``"started"`` (``value``: the worker's pid),
    ``"progress"`` (``value``: the progress object), ``"log"`` (``value``: ``(level,
    message)``), ``"done"`` (``value``: the result), ``"failed"`` (``value``: a
    :class:`CopystreamError`), ``"restarting"`` (its worker died and is started again;
    ``value``: the :class:`ExportFailed` saying how it died) or ``"tick"`` (nothing happened
    for a while; ``index`` is -1)."""

    index: int
    kind: str
    value: Any = None


def _encode(kind: str, value: object) -> str:
    return f"{kind} {base64.b64encode(pickle.dumps(value)).decode('ascii')}\n"


def _spawn(task: Task) -> subprocess.Popen[bytes]:
    """Start ``python -m copystream._worker COORDINATOR_PID LOG_LEVEL`` and hand it ``task``."""
    level = str(log.getEffectiveLevel())
    proc = subprocess.Popen(
        [sys.executable, "-m", "copystream._worker", str(os.getpid()), level],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
    assert proc.stdin is not None
    try:
        proc.stdin.write(pickle.dumps(task))
        proc.stdin.close()
    except BrokenPipeError:  # it died at once; its exit status will say how
        pass
    return proc


def died(code: int | None) -> str:
    """How a worker that reported no outcome ended, from its exit status."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"was killed by {name}"
        return how + (" (out of memory?)" if code == -signal.SIGKILL else "")
    return f"exited with status {code}"


class _Worker:
    """One running worker process and the thread that reads its events."""

    def __init__(self, index: int, task: Task, events: queue.Queue[tuple[int, bytes]]) -> None:
        self.index = index
        self.outcome: Event | None = None
        self.proc = _spawn(task)
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout, events), daemon=True).start()

    def _read(self, stdout: IO[bytes], events: queue.Queue[tuple[int, bytes]]) -> None:
        for raw in stdout:
            events.put((self.index, raw))
        events.put((self.index, b""))

    def event(self, raw: bytes) -> Event | None:
        """The event of one line; ``None`` for a torn line (a worker killed mid-write)."""
        kind, _, payload = raw.decode("ascii", errors="replace").strip().partition(" ")
        names = {"P": "progress", "L": "log", "R": "done", "E": "failed"}
        try:
            value = pickle.loads(base64.b64decode(payload))
        except Exception:
            return None
        if kind not in names:
            return None
        return Event(self.index, names[kind], value)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


#: Decides about a worker that died without reporting an outcome: seconds to wait before
#: starting its task again, or ``None`` to let the task fail with the error given.
Restart = Callable[[int, ExportFailed], float | None]


def run_tasks(
    tasks: Sequence[Task], jobs: int, *, tick: float = 0.25, restart: Restart | None = None
) -> Iterator[Event]:
    """Run ``tasks`` in up to ``jobs`` worker processes, in order; yield their events.

    Every task ends with exactly one ``done`` or ``failed`` event. A worker that dies without
    an outcome (killed by a signal, say) fails with :class:`ExportFailed` saying how it ended,
    unless ``restart(index, error)`` gives a delay: then its task is started again in a new
    worker after that many seconds (a ``restarting`` event, ``value``: the error, then
    ``started`` again). A ``tick`` comes when nothing happened for ``tick`` seconds. Closing
    the generator early (or an exception in the consumer) kills the workers still running.
    """
    events: queue.Queue[tuple[int, bytes]] = queue.Queue()
    waiting = [(0.0, i) for i in range(len(tasks))]  # (not before, index), in start order
    running: dict[int, _Worker] = {}
    try:
        while waiting or running:
            yield from _start_due(tasks, jobs, waiting, running, events)
            try:
                room = len(running) < max(1, jobs)
                i, raw = events.get(timeout=_until_due(waiting, tick) if room else tick)
            except queue.Empty:
                yield Event(-1, "tick")
                continue
            worker = running[i]
            if raw:
                event = worker.event(raw)
                if event is not None and event.kind in ("done", "failed"):
                    worker.outcome = event
                elif event is not None:
                    yield event
                continue
            del running[i]
            code = worker.proc.wait()
            if worker.outcome is not None:
                yield worker.outcome
                continue
            error = ExportFailed(f"the worker process {died(code)}")
            delay = restart(i, error) if restart is not None else None
            if delay is None:
                yield Event(i, "failed", error)
                continue
            waiting.append((time.monotonic() + delay, i))
            waiting.sort()
            yield Event(i, "restarting", error)
    finally:
        for worker in running.values():
            worker.stop()


def _start_due(
    tasks: Sequence[Task],
    jobs: int,
    waiting: list[tuple[float, int]],
    running: dict[int, _Worker],
    events: queue.Queue[tuple[int, bytes]],
) -> Iterator[Event]:
    """Start the waiting tasks that are due, while there is room; yield their ``started``."""
    now = time.monotonic()
    while waiting and waiting[0][0] <= now and len(running) < max(1, jobs):
        _, i = waiting.pop(0)
        running[i] = _Worker(i, tasks[i], events)
        yield Event(i, "started", running[i].proc.pid)


def _until_due(waiting: list[tuple[float, int]], tick: float) -> float:
    """How long to wait for an event: ``tick``, or less when a delayed start falls due."""
    if not waiting:
        return tick
    return max(0.001, min(tick, waiting[0][0] - time.monotonic()))


# -- inside a worker ------------------------------------------------------------------------------


class _EventLog(logging.Handler):
    """Sends a worker's log lines to the coordinator, which logs them in its own way."""

    def __init__(self, send: Callable[[str], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(_encode("L", (record.levelno, record.getMessage())))


def _die_with_coordinator(coordinator: int) -> None:
    """Be killed when ``coordinator`` dies; leave Ctrl-C to it; exit if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != coordinator:
        os._exit(1)


def worker_main(argv: Sequence[str]) -> int:
    """Body of ``python -m copystream._worker COORDINATOR_PID LOG_LEVEL``: one task."""
    _die_with_coordinator(int(argv[0]))
    task: Task = pickle.load(sys.stdin.buffer)
    # The events get the real stdout to themselves; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(line: str) -> None:
        with lock:
            out.write(line)
            out.flush()

    log.handlers[:] = [_EventLog(send)]
    log.setLevel(int(argv[1]))
    log.propagate = False
    last = 0.0

    def report(progress: Any) -> None:
        nonlocal last
        now = time.monotonic()
        if getattr(progress, "done", False) or now - last >= PROGRESS_INTERVAL:
            last = now
            send(_encode("P", progress))

    try:
        result = task.function(*task.args, progress=report)
    except BaseException as e:  # every failure goes back to the coordinator as one event
        send(_encode("E", _portable(e)))
        return 1
    send(_encode("R", result))
    return 0


def _portable(e: BaseException) -> CopystreamError:
    """``e`` as an error that pickles whole: itself if it is a CopystreamError that does."""
    if isinstance(e, CopystreamError):
        try:
            pickle.dumps(e)
        except Exception:
            return ExportFailed(e.problem, remedy=e.remedy)
        return e
    return ExportFailed(f"unexpected {type(e).__name__}: {e} (please report this)", remedy=None)
