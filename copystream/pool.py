"""The one pool of worker processes: ``--workers`` (key ranges) and ``bulk --jobs`` (tables).

Workers are plain subprocesses of the current interpreter, ``python -m copystream._worker``, not
``multiprocessing`` children: ``spawn`` re-imports the caller's ``__main__`` in every child (a
script without an ``if __name__ == "__main__"`` guard would run again; an Airflow task would
re-import Airflow), and ``fork`` copies a possibly multi-threaded, large host process.

Workers live long: :func:`run_tasks` starts at most ``jobs`` of them and hands each the next
waiting task whenever it is free, so a thousand small tasks cost ``jobs`` interpreter start-ups,
not a thousand, and what a task function keeps at module level (an open connection, say) serves
the next task of the same process. A :class:`Task` names a module-level function and its
arguments; the coordinator writes each task to a worker's stdin as one line,
``<base64 of a pickle>``. The worker calls ``function(*args, progress=report)`` and writes its
events on its stdout, after a marker (anything its interpreter printed there before is skipped),
each a frame: its kind (one byte), the length of its pickle (4 bytes, big endian) and the
pickle: ``P`` a progress object, ``L`` a
log line (level, message), then ``R`` the function's result or ``E`` the exception it raised (a
:class:`CopystreamError` arrives as its own class, with its problem and remedy; anything else as
an :class:`ExportFailed` naming it), and waits for the next task (an outcome is written together
with the next task's ``S`` when that task is there already: one write, one wake-up of the
coordinator per task). After an unexpected exception
(not a :class:`CopystreamError`) it says so (``X``, before the ``E``) and exits, so no state a
bug left behind reaches another task; a fresh worker takes over. A worker that dies fails only
the task it was running. The coordinator reads the events as :class:`Event` values from
:func:`run_tasks`.

Within :func:`fork_workers` (``copystream bulk``: a process of copystream's own, small and
single-threaded), workers are forked from the coordinator instead, sparing each an
interpreter's start-up and imports; they run the same :func:`worker_main`. One forked by
:func:`run_tasks` itself has its tasks in memory already: it is handed a task as ``#<index>``,
not pickled (pickling a bulk table's task and unpickling it cost more than the rest of what
the coordinator does for a small table).

On Linux a worker asks the kernel to kill it when its coordinator dies (``PR_SET_PDEATHSIG``),
so a re-run never races an orphan writing the same files.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import gc
import importlib
import logging
import os
import select
import selectors
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn, Protocol

from .errors import CopystreamError, ExportFailed

__all__ = ["Event", "Task", "fork_workers", "forks", "run_tasks", "started_ahead", "worker_main"]

log = logging.getLogger("copystream")

#: Seconds between two progress events of one worker (a finished task always reports, unless it
#: is short and did not resume: its outcome, following at once, says as much).
PROGRESS_INTERVAL = 0.2
#: Seconds a worker with no more tasks is given to exit by itself before it is killed.
EXIT_GRACE = 10.0
#: Short tasks handed to a worker ahead of the one it runs (see :class:`Task`), and at most
#: how many bytes of tasks it has not begun (a pipe holds 64 KiB).
SHORT_AHEAD = 16
#: A worker running short tasks is handed more once it has at most this many ahead (then up to
#: :data:`SHORT_AHEAD` in one write): the coordinator writes to it once per several tasks, not
#: once per task (each write cost it ~0.1-0.25 ms of system time on 2 busy cores).
SHORT_REFILL = SHORT_AHEAD // 2
#: After how many worker processes in a row that ended before they began a task (one that
#: cannot start: a broken interpreter, the OOM killer at start-up) the tasks they held fail
#: instead of going to yet another new process.
STILLBORN_LIMIT = 3
AHEAD_BYTES = 32 * 1024


@dataclass(frozen=True)
class Task:
    """A call to run in a worker: ``function(*args, progress=callback)``, all picklable.

    Workers run many tasks in a row: a task must not leave anything running behind it (a
    thread, an open transaction). What it keeps on purpose at module level serves the next
    task of the same worker. A ``short`` task is expected to take little time: a worker running
    one is handed the next short tasks already (up to :data:`SHORT_AHEAD`, in one write), so
    that it never waits for the coordinator between two (a long task is handed only to a free
    worker, never queued behind another).
    """

    function: Callable[..., Any]
    args: tuple[Any, ...]
    short: bool = False


@dataclass(frozen=True)
class Event:
    """Something a task did. ``kind`` is ``"started"`` (``value``: the worker's pid),
    ``"progress"`` (``value``: the progress object), ``"log"`` (``value``: ``(level,
    message)``), ``"done"`` (``value``: the result), ``"failed"`` (``value``: a
    :class:`CopystreamError`), ``"restarting"`` (its worker died and it is started again;
    ``value``: the :class:`ExportFailed` saying how it died) or ``"tick"`` (nothing happened
    for a while; ``index`` is -1)."""

    index: int
    kind: str
    value: Any = None


def _dumps(value: object) -> bytes:
    """``value`` pickled (pickle is imported on first use: an export with one worker needs
    no pool)."""
    import pickle

    return pickle.dumps(value)


def _loads(data: bytes) -> Any:
    import pickle

    return pickle.loads(data)


#: An event's frame before its pickle: its kind and the pickle's length.
_FRAME = struct.Struct(">cI")
#: The largest pickle a frame may carry (a bigger length is not a frame's).
MAX_FRAME = 1 << 30
#: What a worker writes before its events: whatever its interpreter printed before is skipped.
EVENTS_MARKER = b"\x00copystream-events\x00"


def _frame(kind: bytes, *value: object) -> bytes:
    """An event as the worker writes it: ``kind``, then the pickle of ``value`` if one is
    given (none for ``S`` and ``X``)."""
    payload = _dumps(value[0]) if value else b""
    return _FRAME.pack(kind, len(payload)) + payload


def _frames(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes, bool]:
    """The whole frames (kind, pickle) at the start of ``data``, the rest (the start of one not
    complete yet), and whether a frame's head is not one a worker writes (then nothing after it
    can be read). Pure."""
    at, frames = 0, list[tuple[bytes, bytes]]()
    while len(data) - at >= _FRAME.size:
        kind, size = _FRAME.unpack_from(data, at)
        if kind not in _FRAME_KINDS or size > MAX_FRAME:
            return frames, b"", True
        end = at + _FRAME.size + size
        if end > len(data):
            break
        frames.append((kind, data[at + _FRAME.size : end]))
        at = end
    return frames, data[at:], False


class _Process(Protocol):
    """A worker process as the pool uses it: a :class:`subprocess.Popen`, or a
    :class:`_Forked`."""

    pid: int
    returncode: int | None
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def kill(self) -> None: ...


def _spawn(preload: Sequence[str] = ()) -> _Process:
    """Start ``python -m copystream._worker COORDINATOR_PID LOG_LEVEL [MODULE...]``."""
    level = str(log.getEffectiveLevel())
    return subprocess.Popen(
        [sys.executable, "-m", "copystream._worker", str(os.getpid()), level, *preload],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )


#: Whether workers may be forked from this process (:func:`fork_workers`).
_FORK = [False]
#: In a worker forked by :func:`run_tasks`: the tasks it was forked with (handed by index).
_INHERITED: list[Sequence[Task]] = []


def forks() -> bool:
    """Whether a worker started now would be forked from this process (within
    :func:`fork_workers`, while no other thread runs), not a new interpreter. A timer that
    was cancelled or has fired (:func:`~copystream.connection.io_deadline`'s) is let end."""
    if not (_FORK[0] and hasattr(os, "fork")):
        return False
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer) and thread.finished.is_set():
            thread.join(timeout=1.0)
    return threading.active_count() == 1


@contextlib.contextmanager
def fork_workers() -> Iterator[None]:
    """Within it, workers (:func:`started_ahead`'s, and those :func:`run_tasks` starts, which
    then have their tasks in memory) are forked from this process when it has no other thread
    (:func:`forks`), instead of being new interpreters: they begin with what this process
    imported already (an interpreter and its imports cost a few tenths of a second of CPU
    each). For a process that is copystream's own, small and single-threaded: ``copystream
    bulk`` and ``copystream export`` run within it. A library caller (an Airflow task: large,
    threaded) keeps new interpreters, as does a worker started while a thread runs."""
    _FORK[0] = True
    try:
        yield
    finally:
        _FORK[0] = False


class _Forked:
    """A worker forked from this process, with :class:`subprocess.Popen`'s interface as far as
    the pool uses it. The child runs :func:`worker_main` on two pipes and never returns."""

    def __init__(self, preload: Sequence[str], tasks: Sequence[Task] | None = None) -> None:
        args = [str(os.getpid()), str(log.getEffectiveLevel()), *preload]
        task_r, task_w = os.pipe()
        event_r, event_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # nothing buffered here is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        # Ctrl-C reaches the whole process group: held back until the child ignores it, so that
        # it never unwinds this process's stack (its locks, its snapshot, its workers) in the child
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        gc.freeze()  # the child's collections leave this process's objects (and pages) alone
        try:
            self.pid = os.fork()
            if self.pid == 0:  # pragma: no cover (the child: measured by the tests it runs)
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                    _INHERITED[:] = [] if tasks is None else [tasks]
                    self._child(args, task_r, event_w)
                finally:
                    os._exit(1)
        except OSError:  # no fork now (EAGAIN, ENOMEM): the caller starts an interpreter
            for fd in (task_r, task_w, event_r, event_w):
                os.close(fd)
            raise
        finally:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(task_r)
        os.close(event_w)
        self.stdin: IO[bytes] | None = os.fdopen(task_w, "wb")
        self.stdout: IO[bytes] | None = os.fdopen(event_r, "rb")
        self.returncode: int | None = None

    @staticmethod
    def _child(args: list[str], task_r: int, event_w: int) -> NoReturn:
        code = 1
        _FORK[0] = False  # its own workers (a bulk table's key ranges) are new interpreters
        try:
            os.dup2(task_r, 0)
            os.dup2(event_w, 1)
            # Nothing of this process's but its standard streams, as a new interpreter has: no
            # other worker's pipe (it would never see its stdin end), no lock, socket or file.
            os.closerange(3, os.sysconf("SC_OPEN_MAX"))
            code = worker_main(args)
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            os._exit(code)

    def poll(self) -> int | None:
        """Its exit status if it has exited (a signal as its negative number), else ``None``."""
        if self.returncode is None:
            with contextlib.suppress(ChildProcessError):
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid == self.pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; raise :class:`subprocess.TimeoutExpired` past ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def kill(self) -> None:
        """SIGKILL it (if it has not exited yet)."""
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


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


_KINDS = {b"P": "progress", b"L": "log", b"R": "done", b"E": "failed"}
#: Every kind a frame may have: those above, ``S`` (started) and ``X`` (it exits after this task).
_FRAME_KINDS = frozenset((*_KINDS, b"S", b"X"))


class _Worker:
    """One running worker process, the tasks handed to it, and what it wrote of its events."""

    def __init__(self, selector: selectors.BaseSelector, tasks: Sequence[Task]) -> None:
        self.queue: collections.deque[int] = collections.deque()  # the first one runs
        self.started = False  # the first one has begun (it said so)
        self.retiring = False  # it exits after its current task (it said so, or none is left)
        self.inherited = False  # forked now: it has ``tasks`` in memory (handed by index)
        self.proc = _AHEAD.pop(0) if _AHEAD else self._start(tasks)
        self.synced = False  # its events' marker was read: what follows is frames
        self.garbled = False  # it wrote what is not an event, and was killed
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.pending = b""  # the start of a frame not complete yet
        self.unread: dict[int, int] = {}  # bytes of each task handed to it and not begun
        selector.register(self.fd, selectors.EVENT_READ, self)

    def _start(self, tasks: Sequence[Task]) -> _Process:
        """A new worker process: forked with ``tasks`` when this process may fork now, else
        (or should the fork fail) a new interpreter."""
        if forks():
            try:
                process = _Forked((), tasks)
                self.inherited = True
                return process
            except OSError as e:
                log.debug("forking a worker failed (%s): starting an interpreter instead", e)
        return _spawn()

    def read(self) -> tuple[list[tuple[bytes, bytes]], bool]:
        """The events (kind, pickle) it has written since, and whether its stdout has ended
        (a frame torn by its death is dropped). What comes before its events' marker (printed
        by its interpreter's start, a site customization, say) is skipped; should anything
        else than events follow, it is killed (its stdout then ends)."""
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return [], False
        if not data:
            return [], True
        data = self.pending + data
        if not self.synced:
            at = data.find(EVENTS_MARKER)
            if at < 0:  # (keep what may be the start of the marker)
                self.pending = data[-len(EVENTS_MARKER) + 1 :]
                return [], False
            data, self.synced = data[at + len(EVENTS_MARKER) :], True
        frames, self.pending, bad = _frames(data)
        if bad:
            self.garbled = True
            self.proc.kill()
        return frames, False

    def line(self, i: int, tasks: Sequence[Task]) -> bytes:
        """How task ``i`` travels to it: its index if it has the tasks in memory, else one
        line, the base64 of its pickle."""
        if self.inherited:
            return b"#%d\n" % i
        return base64.b64encode(_dumps(tasks[i])) + b"\n"

    @property
    def task(self) -> int | None:
        """The index of the task it runs (or will run next), if any."""
        return self.queue[0] if self.queue else None

    def give(self, given: Sequence[tuple[int, bytes]]) -> None:
        """Hand it the tasks ``given`` (index, line: :meth:`line`), to run after those it
        has, in one write (a worker that died meanwhile reports no outcome for them)."""
        for i, line in given:
            self.queue.append(i)
            self.unread[i] = len(line)
        assert self.proc.stdin is not None
        lines = b"".join(line for _, line in given)
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(lines)
            self.proc.stdin.flush()

    def retire(self) -> None:
        """No more tasks for it: it exits once its current one is done."""
        self.retiring = True
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def event(self, kind: bytes, payload: bytes) -> Event | None:
        """The event of one frame; ``None`` for one that says nothing to the caller (or is
        not understood). An outcome ends the task it is about."""
        if self.task is None:
            return None
        if kind == b"X":  # it exits after this task: give it no other
            self.retiring = True
            return None
        if kind == b"S":
            self.started = True
            self.unread.pop(self.task, None)
            return Event(self.task, "started", self.proc.pid)
        if kind not in _KINDS:
            return None
        try:
            value = _loads(payload)
        except Exception:
            return None
        event = Event(self.task, _KINDS[kind], value)
        if event.kind in ("done", "failed"):
            self.queue.popleft()
            self.started = False
        return event

    def stop(self, grace: float = 0.0) -> None:
        """Let it exit within ``grace`` seconds, else kill it; reap it."""
        self.retire()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


#: Worker processes started ahead of their tasks (:func:`started_ahead`), for the next
#: :func:`run_tasks` to take.
_AHEAD: list[_Process] = []


@contextlib.contextmanager
def started_ahead(count: int, preload: Sequence[str] = ()) -> Iterator[None]:
    """Start ``count`` worker processes now, importing the modules ``preload`` names, for the
    next :func:`run_tasks` to take: their interpreters start while the caller still prepares
    its tasks. Those left unused are ended on the way out."""
    fork = forks()
    procs = [_Forked(preload) if fork else _spawn(preload) for _ in range(count)]
    _AHEAD[:] = procs
    try:
        yield
    finally:
        _AHEAD.clear()
        for proc in procs:
            if proc.returncode is None and proc.stdin is not None and not proc.stdin.closed:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # an unused one exits at once
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_GRACE)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


#: Decides about a task whose worker died while running it: seconds to wait before starting
#: it again (in another worker), or ``None`` to let the task fail with the error given.
Restart = Callable[[int, ExportFailed], float | None]


def run_tasks(
    tasks: Sequence[Task], jobs: int, *, tick: float = 0.25, restart: Restart | None = None
) -> Iterator[Event]:
    """Run ``tasks`` in up to ``jobs`` worker processes, in order; yield their events.

    Each worker takes the next waiting task as soon as it is free (short ones: already while
    it runs a short one). Every task ends with exactly one ``done`` or ``failed`` event, after
    its ``started`` event if it began. A worker that dies fails the task it was running with
    :class:`ExportFailed` saying how it ended, unless ``restart(index, error)`` gives a delay:
    then the task waits that many seconds and starts again (a ``restarting`` event, ``value``:
    the error, then ``started`` again). The tasks handed to a dead worker that it had not begun
    go to another worker (they fail once :data:`STILLBORN_LIMIT` workers in a row ended before
    they began any). A ``tick`` comes when nothing happened for ``tick`` seconds. Closing
    the generator early (or an exception in the consumer) kills the workers still running.
    """
    selector = selectors.DefaultSelector()  # the workers' stdouts, read in this thread
    waiting = collections.deque(range(len(tasks)))
    stillborn = 0  # workers in a row that ended before they began a task
    delayed: list[tuple[float, int]] = []  # (not before, index) of tasks to start again
    workers: dict[int, _Worker] = {}  # by the fd of its stdout
    clean = False
    try:
        while waiting or delayed or any(w.queue for w in workers.values()):
            _due(delayed, waiting)
            _hand_out(tasks, waiting, workers, jobs, selector)
            ready = selector.select(timeout=_until_due(delayed, tick))
            if not ready and not (delayed and delayed[0][0] <= time.monotonic()):
                yield Event(-1, "tick")
            for key, _ in ready:
                worker: _Worker = key.data
                frames, ended = worker.read()
                for kind, payload in frames:
                    event = worker.event(kind, payload)
                    if event is not None:
                        stillborn = 0 if event.kind == "started" else stillborn
                        yield event
                if ended:  # it exited: of itself when idle, or it died
                    stillborn += bool(worker.queue) and not worker.started
                    give_up = stillborn >= STILLBORN_LIMIT
                    yield from _ended(worker, workers, selector, waiting, restart, delayed, give_up)
        clean = True
    finally:
        if clean:  # idle: they exit as their stdin closes; the job need not wait for that
            for worker in workers.values():
                worker.retire()
            _reap_later([w.proc for w in workers.values()])
        else:
            for worker in workers.values():
                worker.stop()
        selector.close()


def _ended(
    worker: _Worker,
    workers: dict[int, _Worker],
    selector: selectors.BaseSelector,
    waiting: collections.deque[int],
    restart: Restart | None,
    delayed: list[tuple[float, int]],
    give_up: bool = False,
) -> Iterator[Event]:
    """A worker's stdout ended: it exited. The task it had begun fails, or waits to start again
    if ``restart`` says so; the ones handed to it ahead wait for another worker, unless
    ``give_up`` (workers keep ending before they begin anything): then they fail."""
    selector.unregister(worker.fd)
    del workers[worker.fd]
    code = worker.proc.wait()
    if worker.proc.stdout is not None:
        worker.proc.stdout.close()
    if worker.started:
        i = worker.queue.popleft()
        how = "wrote what is not an event and was killed" if worker.garbled else died(code)
        error = ExportFailed(f"the worker process {how}")
        delay = restart(i, error) if restart is not None else None
        if delay is None:
            yield Event(i, "failed", error)
        else:
            delayed.append((time.monotonic() + delay, i))
            delayed.sort()
            yield Event(i, "restarting", error)
    if give_up:
        error = ExportFailed(
            f"{STILLBORN_LIMIT} worker processes in a row ended before they began a task "
            f"(the last one {died(code)})"
        )
        yield from (Event(i, "failed", error) for i in worker.queue)
    else:
        waiting.extendleft(reversed(worker.queue))  # handed to it, never begun


def _due(delayed: list[tuple[float, int]], waiting: collections.deque[int]) -> None:
    """Move the tasks whose restart delay has passed to the front of ``waiting``."""
    now = time.monotonic()
    while delayed and delayed[0][0] <= now:
        waiting.appendleft(delayed.pop(0)[1])


def _until_due(delayed: list[tuple[float, int]], tick: float) -> float:
    """How long to wait for an event: ``tick``, or less when a delayed start falls due."""
    if not delayed:
        return tick
    return max(0.001, min(tick, delayed[0][0] - time.monotonic()))


def _reap_later(procs: Sequence[_Process]) -> None:
    """Wait for idle workers to exit in a thread of its own (killing any that outstays
    :data:`EXIT_GRACE`), so that none is left a zombie and nobody waits for them."""

    def reap() -> None:
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_GRACE)
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)

    if procs:
        threading.Thread(target=reap, name="copystream-reaper", daemon=True).start()


def _hand_out(
    tasks: Sequence[Task],
    waiting: collections.deque[int],
    workers: dict[int, _Worker],
    jobs: int,
    selector: selectors.BaseSelector,
) -> None:
    """Give each free worker the next waiting task, and one running short tasks the next short
    ones (or, when none is left, let a free worker exit); start workers while tasks wait and
    fewer than ``jobs`` are at work."""
    for worker in list(workers.values()):
        if worker.retiring:
            continue
        if not worker.queue and not waiting:
            worker.retire()
        elif waiting:
            _top_up(worker, tasks, waiting)
    while waiting and sum(not w.retiring for w in workers.values()) < max(1, jobs):
        worker = _Worker(selector, tasks)
        workers[worker.fd] = worker
        _top_up(worker, tasks, waiting)


def _top_up(worker: _Worker, tasks: Sequence[Task], waiting: collections.deque[int]) -> None:
    """Hand ``worker`` the next waiting task if it is free; then, while all it has and the next
    waiting task are short, more, up to :data:`SHORT_AHEAD` ahead of the one it runs and
    :data:`AHEAD_BYTES` not begun yet (so that its stdin's pipe never fills: the coordinator
    would wait for a worker that waits for it), once it has no more than
    :data:`SHORT_REFILL` ahead."""
    if len(worker.queue) > SHORT_REFILL + 1:  # (the first one runs)
        return
    given: list[tuple[int, bytes]] = []
    queued = list(worker.queue)
    unread = sum(worker.unread.values())
    while waiting:
        i = waiting[0]
        if queued and not (
            len(queued) <= SHORT_AHEAD and tasks[i].short and all(tasks[q].short for q in queued)
        ):
            break
        line = worker.line(i, tasks)
        if queued and unread + len(line) > AHEAD_BYTES:
            break
        waiting.popleft()
        given.append((i, line))
        queued.append(i)
        unread += len(line)
    if given:
        worker.give(given)


# -- inside a worker ------------------------------------------------------------------------------


class _EventLog(logging.Handler):
    """Sends a worker's log lines to the coordinator, which logs them in its own way."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(_frame(b"L", (record.levelno, record.getMessage())))


def _die_with_coordinator(coordinator: int) -> None:
    """Be killed when ``coordinator`` dies; leave Ctrl-C to it; exit if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != coordinator:
        os._exit(1)


class _Inbox:
    """A worker's stdin, line by line (one task a line)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.ended = False

    def ready(self) -> bool:
        """Whether the next line (or the end) is there already: reading it will not wait."""
        while b"\n" not in self.buf and not self.ended:
            if not select.select([self.fd], [], [], 0)[0]:
                return False
            self._fill()
        return True

    def next(self) -> bytes | None:
        """The next line, waiting for it; ``None`` once stdin has ended."""
        while b"\n" not in self.buf and not self.ended:
            self._fill()
        if b"\n" not in self.buf:
            return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _fill(self) -> None:
        data = os.read(self.fd, 1 << 16)
        self.buf += data
        self.ended = not data


def worker_main(argv: Sequence[str]) -> int:
    """Body of ``python -m copystream._worker COORDINATOR_PID LOG_LEVEL [MODULE...]``: import the
    modules, then run the tasks its stdin brings, one at a time, until it closes (or a task
    fails unexpectedly).

    A task's outcome is held back while the next task is already there, and written with that
    task's start, in one write: the coordinator wakes once per task, not twice. It is written
    at once whenever the worker would otherwise wait."""
    # The events get the real stdout to themselves, after their marker (what the interpreter's
    # start printed there comes before it); anything printed from now on goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(EVENTS_MARKER)  # (written with the first event)
    _die_with_coordinator(int(argv[0]))
    for module in argv[2:]:  # what its tasks will need, while the coordinator prepares them
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    inbox = _Inbox(0)  # (not sys.stdin: a forked worker may have inherited a stand-in)
    lock = threading.Lock()

    def send(frames: bytes) -> None:
        with lock:
            out.write(frames)
            out.flush()

    log.handlers[:] = [_EventLog(send)]
    log.setLevel(int(argv[1]))
    log.propagate = False
    last = [0.0]  # when progress was last sent
    held = b""  # the last task's outcome, not written yet
    while True:
        if held and not inbox.ready():
            send(held)
            held = b""
        line = inbox.next()
        if line is None:
            break
        try:
            task = _task(line)
        except Exception as e:  # e.g. its function cannot be imported here
            send(held + _frame(b"X") + _frame(b"E", _portable(e)))
            return 1
        outcome, go_on = _run(task, send, last, held)
        if not go_on:
            send(outcome)
            return 1
        held = outcome
    if held:
        send(held)
    return 0


def _task(line: bytes) -> Task:
    """The task of a line: ``#<index>`` of the tasks this worker was forked with, or the base64
    of its pickle."""
    if line.startswith(b"#"):
        return _INHERITED[0][int(line[1:])]
    task: Task = _loads(base64.b64decode(line))
    return task


def _run(
    task: Task, send: Callable[[bytes], None], last: list[float], held: bytes
) -> tuple[bytes, bool]:
    """Run one task, sending ``held`` (the outcome of the one before) with its start and its
    progress meanwhile; its outcome's frames, and whether the worker may take another task.
    ``last`` holds when this worker last sent progress: a run of short tasks sends some, not
    each task's. A finished task's last progress is sent too, unless the task is short and
    did not resume: then it says nothing that its outcome, following at once, does not (and the
    coordinator wakes once less per task)."""
    send(held + _frame(b"S"))

    def report(progress: Any) -> None:
        now = time.monotonic()
        done = getattr(progress, "done", False)
        said = task.short and not getattr(progress, "start_rows", 0)
        if (done and not said) or now - last[0] >= PROGRESS_INTERVAL:
            last[0] = now
            send(_frame(b"P", progress))

    try:
        result = task.function(*task.args, progress=report)
    except BaseException as e:  # every failure goes back to the coordinator as one event
        expected = isinstance(e, CopystreamError)
        # an unexpected one: "X" before the outcome, so the coordinator gives it no more
        return (b"" if expected else _frame(b"X")) + _frame(b"E", _portable(e)), expected
    return _frame(b"R", result), True


def _portable(e: BaseException) -> CopystreamError:
    """``e`` as an error that pickles whole: itself if it is a CopystreamError that does."""
    if isinstance(e, CopystreamError):
        try:
            _dumps(e)
        except Exception:
            return ExportFailed(e.problem, remedy=e.remedy)
        return e
    return ExportFailed(f"unexpected {type(e).__name__}: {e} (please report this)", remedy=None)
