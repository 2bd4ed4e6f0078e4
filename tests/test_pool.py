"""The worker pool: long-lived worker processes, each running many tasks in a row.

Real processes (``python -m copystream._worker``) run module-level functions of this file (the
workers find it through ``PYTHONPATH``). Every task ends with exactly one ``done`` or ``failed``
event; a worker that dies fails only the task it was running; an unexpected exception retires
its worker; a ``CopystreamError`` does not.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import pickle
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from copystream.errors import ExportFailed, TableNotFound
from copystream.pool import (
    SHORT_AHEAD,
    SHORT_REFILL,
    STILLBORN_LIMIT,
    Event,
    Task,
    _frame,
    _frames,
    _top_up,
    run_tasks,
)

_SEEN: list[int] = []  # module state of a worker process: what it ran before


def remember(n: int, *, progress: Any) -> tuple[int, int, list[int]]:
    """Return (pid, n, what this process ran before); remember n."""
    before = list(_SEEN)
    _SEEN.append(n)
    progress(("working on", n))
    return os.getpid(), n, before


class Finished:
    """A progress object as an export's last one: ``done``, with the rows it found on disk."""

    def __init__(self, n: int, start_rows: int) -> None:
        self.n, self.done, self.start_rows = n, True, start_rows

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Finished) and (self.n, self.start_rows) == (
            other.n, other.start_rows,
        )  # fmt: skip

    def __hash__(self) -> int:
        return hash((self.n, self.start_rows))


def finish(n: int, start_rows: int, *, progress: Any) -> int:
    """Report a finished progress (as an export's last), return ``n``."""
    progress(Finished(n, start_rows))
    return n


def die(*, progress: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_once(marker: str, *, progress: Any) -> int:
    """Be SIGKILLed the first time (``marker`` does not exist yet), return the pid the next."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def fail_expected(*, progress: Any) -> None:
    raise TableNotFound("no such table")


def fail_unexpected(*, progress: Any) -> None:
    raise ZeroDivisionError("boom")


@pytest.fixture(autouse=True)
def importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The workers import this module by name."""
    here = str(Path(__file__).parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    )
    yield


def outcomes(events: list[Event]) -> dict[int, Event]:
    ends = [e for e in events if e.kind in ("done", "failed")]
    assert len(ends) == len({e.index for e in ends}), "a task ended twice"
    return {e.index: e for e in ends}


def test_many_tasks_run_in_few_long_lived_processes() -> None:
    events = list(run_tasks([Task(remember, (n,)) for n in range(12)], 2))
    done = outcomes(events)
    assert sorted(done) == list(range(12)) and {e.kind for e in done.values()} == {"done"}
    pids = {e.value[0] for e in done.values()}
    assert len(pids) <= 2, "a process per task"
    started = {e.index: e.value for e in events if e.kind == "started"}
    assert started == {i: e.value[0] for i, e in done.items()}  # started names the worker
    # what a task keeps at module level is there for the next task of the same process
    for e in done.values():
        pid, n, before = e.value
        assert n not in before
        assert all(done[m].value[0] == pid for m in before)
    assert sum(len(e.value[2]) for e in done.values()) > 0
    progress = [e for e in events if e.kind == "progress"]
    # a worker sends progress at most every PROGRESS_INTERVAL, across its tasks
    assert progress and {e.value for e in progress} <= {("working on", n) for n in range(12)}
    assert all(e.value == ("working on", e.index) for e in progress)
    for e in progress:  # a task's progress comes before its outcome
        assert events.index(e) < events.index(done[e.index])


def test_a_short_task_that_did_not_resume_sends_no_last_progress_its_outcome_says_it() -> None:
    """A finished task's last progress is sent, except a short task's that found nothing on
    disk (its outcome follows at once): the coordinator wakes once per such task, not twice."""
    tasks = [
        Task(finish, (0, 0), short=True),
        Task(finish, (1, 5), short=True),  # resumed: its rows before this run are news
        Task(finish, (2, 0)),
        *(Task(finish, (n, 0), short=True) for n in range(3, 9)),
    ]
    events = list(run_tasks(tasks, 1))
    assert sorted(outcomes(events)) == list(range(9))
    sent = {e.index for e in events if e.kind == "progress"}
    assert {1, 2} <= sent  # a resumed short task, a long one
    # of the other seven, only those PROGRESS_INTERVAL after the last progress sent: the first
    # (and, on a machine that stalls meanwhile, one or two more), not all as before
    assert len(sent - {1, 2}) <= 3


def test_a_worker_that_dies_fails_only_its_task() -> None:
    tasks = [Task(remember, (0,)), Task(die, ()), *(Task(remember, (n,)) for n in range(2, 8))]
    done = outcomes(list(run_tasks(tasks, 1)))
    assert sorted(done) == list(range(8))
    assert done[1].kind == "failed" and isinstance(done[1].value, ExportFailed)
    assert "was killed by SIGKILL" in str(done[1].value)
    assert all(done[i].kind == "done" for i in range(8) if i != 1)
    assert done[0].value[0] != done[2].value[0]  # a fresh worker took over


def test_an_unexpected_error_retires_its_worker_an_expected_one_does_not() -> None:
    tasks = [
        Task(remember, (0,)),
        Task(fail_expected, ()),
        Task(remember, (2,)),
        Task(fail_unexpected, ()),
        Task(remember, (4,)),
    ]
    done = outcomes(list(run_tasks(tasks, 1)))
    assert type(done[1].value) is TableNotFound and done[1].value.problem == "no such table"
    assert done[0].value[0] == done[2].value[0]  # the same worker went on
    assert isinstance(done[3].value, ExportFailed)
    assert "unexpected ZeroDivisionError: boom" in str(done[3].value)
    assert done[4].kind == "done" and done[4].value[0] != done[2].value[0]
    assert done[4].value[2] == []  # a fresh process: nothing remembered


def test_workers_that_cannot_start_fail_their_tasks_instead_of_being_started_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker that ends before it begins a task (here: an interpreter that cannot run it) hands
    its tasks to a new one; after STILLBORN_LIMIT such ends in a row the tasks fail, saying why
    (before: new processes were started for ever, and the job hung)."""
    monkeypatch.setattr(sys, "executable", "/bin/false")

    def hung(signum: int, frame: Any) -> None:
        raise AssertionError("run_tasks still starting workers after 60 s")

    signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        done = outcomes(list(run_tasks([Task(remember, (n,)) for n in range(3)], 2)))
    finally:
        signal.alarm(0)
    assert sorted(done) == [0, 1, 2] and {e.kind for e in done.values()} == {"failed"}
    for e in done.values():
        assert isinstance(e.value, ExportFailed)
        assert f"{STILLBORN_LIMIT} worker processes in a row ended before they began a task" in (
            e.value.problem
        )
        assert "(the last one exited with status 1)" in e.value.problem


def test_closing_early_kills_the_workers() -> None:
    gen = run_tasks([Task(remember, (n,)) for n in range(4)], 2)
    first = next(e for e in gen if e.kind == "started")
    pid = first.value
    gen.close()
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_short_tasks_are_handed_out_ahead_and_a_death_loses_only_the_running_one() -> None:
    tasks = [Task(remember, (n,), short=True) for n in range(10)]
    tasks[4] = Task(die, (), short=True)
    events = list(run_tasks(tasks, 1))
    done = outcomes(events)
    assert sorted(done) == list(range(10))
    assert done[4].kind == "failed" and "SIGKILL" in str(done[4].value)
    assert all(done[i].kind == "done" for i in range(10) if i != 4)  # none lost with it
    started = [e.index for e in events if e.kind == "started"]
    assert started == list(range(10))  # each task started once, in order


def test_a_task_whose_worker_died_is_started_again_when_restart_says_so(tmp_path: Path) -> None:
    """``restart`` gives a delay: the task runs again in a new worker and ends once, done; the
    other tasks are not disturbed. A task ``restart`` answers ``None`` for fails as before."""
    asked: list[tuple[int, str]] = []

    def restart(i: int, error: ExportFailed) -> float | None:
        asked.append((i, error.problem))
        return 0.2 if asked.count((i, error.problem)) == 1 and i == 0 else None

    marker = str(tmp_path / "died")
    tasks = [Task(die_once, (marker,)), Task(remember, (7,)), Task(die, ())]
    events = list(run_tasks(tasks, 2, restart=restart))
    ends = outcomes(events)
    kinds = [e.kind for e in events if e.index == 0]
    assert kinds.count("restarting") == 1 and kinds.count("started") == 2, kinds
    assert ends[0].kind == "done" and ends[1].kind == "done"
    assert ends[2].kind == "failed" and "SIGKILL" in ends[2].value.problem
    assert sorted(i for i, _ in asked) == [0, 2] and all("SIGKILL" in why for _, why in asked)


#: Run in an interpreter of its own (forking needs a process with no other thread: the test
#: process has those of earlier tests): tasks in workers started ahead within fork_workers.
FORKED_POOL = """
import json, os, sys, time
import test_pool as t
from copystream.pool import Task, fork_workers, run_tasks, started_ahead
t._SEEN[:] = [99]  # this process's module state, which only a forked worker sees
tasks = [Task(t.remember, (n,), short=True) for n in range(8)]
tasks[5] = Task(t.die, (), short=True)
with fork_workers(), started_ahead(2):
    events = list(run_tasks(tasks, 2))
pids = {e.value for e in events if e.kind == "started"}
deadline = time.monotonic() + 20
while pids and time.monotonic() < deadline:  # each exits (and is reaped) by itself
    for pid in list(pids):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pids.discard(pid)
    time.sleep(0.01)
ends = {e.index: (e.kind, list(e.value) if e.kind == "done" else str(e.value))
        for e in events if e.kind in ("done", "failed")}
json.dump({"me": os.getpid(), "ends": ends, "left": sorted(pids)}, sys.stdout)
"""


def test_workers_started_ahead_within_fork_workers_are_forked_and_behave_alike() -> None:
    """Within ``fork_workers`` the workers started ahead are the process forked (they see what
    it had at the fork: its module state), run the tasks as spawned ones do, one that dies is
    replaced by a spawned one, and every worker exits once the pool is done (none kept alive by
    another's inherited pipe)."""
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_POOL], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    ends = {int(i): v for i, v in got["ends"].items()}
    assert sorted(ends) == list(range(8)) and ends[5][0] == "failed" and "SIGKILL" in ends[5][1]
    done = [v for i, (kind, v) in ends.items() if i != 5 and kind == "done"]
    assert len(done) == 7 and all(pid != got["me"] for pid, _, _ in done)
    assert any(99 in before for _, _, before in done), "no task ran in a forked worker"
    assert got["left"] == [], "a worker is still there"


def remember_locked(n: int, lock: Any, *, progress: Any) -> tuple[int, int, bool]:
    """Return (pid, n, whether ``lock``, which cannot be pickled, is held)."""
    return os.getpid(), n, lock.locked()


#: Run in an interpreter of its own, as FORKED_POOL: workers the pool forks itself, with their
#: tasks in memory (an argument that cannot be pickled goes through); not while a thread runs.
FORKED_BY_THE_POOL = """
import json, os, sys, threading, time
import test_pool as t
from copystream.pool import Task, fork_workers, forks, run_tasks
lock = threading.Lock()  # cannot be pickled: only a worker that has the tasks in memory runs it
tasks = [Task(t.remember_locked, (n, lock), short=True) for n in range(8)]
tasks[3] = Task(t.die, (), short=True)
class Lingering(threading.Timer):
    def run(self):
        super().run()
        time.sleep(0.5)  # cancelled (finished), yet still running a while

timer = Lingering(60, print)
timer.start()
timer.cancel()  # a timer that is ending: forking waits for it
with fork_workers():
    forked = forks()
    events = list(run_tasks(tasks, 1))  # (one worker: the dead one's successor runs the rest)
    threading.Thread(target=threading.Event().wait, args=(60,), daemon=True).start()
    with_a_thread = forks()
ends = {e.index: (e.kind, list(e.value) if e.kind == "done" else str(e.value))
        for e in events if e.kind in ("done", "failed")}
json.dump({"me": os.getpid(), "ends": ends, "forked": forked, "threaded": with_a_thread},
          sys.stdout)
"""


def test_workers_the_pool_forks_have_their_tasks_in_memory_and_not_while_a_thread_runs() -> None:
    """Within ``fork_workers``, with no worker started ahead, the pool forks its workers with
    the tasks in memory: a task is handed by its index, not pickled (an argument that cannot
    be pickled goes through), a dead worker's replacement likewise. A cancelled timer is let
    end first; any other thread running means new interpreters (no fork)."""
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_BY_THE_POOL], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    assert got["forked"] is True and got["threaded"] is False
    ends = {int(i): v for i, v in got["ends"].items()}
    assert sorted(ends) == list(range(8)) and ends[3][0] == "failed" and "SIGKILL" in ends[3][1]
    done = {i: v for i, (kind, v) in ends.items() if kind == "done"}
    assert sorted(done) == [0, 1, 2, 4, 5, 6, 7], ends
    assert all(pid != got["me"] and n == i and not held for i, (pid, n, held) in done.items())
    before, after = {done[i][0] for i in (0, 1, 2)}, {done[i][0] for i in (4, 5, 6, 7)}
    assert len(before) == len(after) == 1 and before != after  # the dead worker was replaced
    assert b"Traceback" not in proc.stderr, proc.stderr.decode()  # by one that started


#: Run in an interpreter of its own: a worker forked after another's pipes were closed, whose
#: own pipes get the numbers those had.
FORKED_AGAIN = """
import base64, os, pickle, sys
import test_pool as t
from copystream.pool import EVENTS_MARKER, Task, _Forked, fork_workers
with fork_workers():
    first, second = _Forked(()), _Forked(())
    numbers = sorted((first.stdin.fileno(), first.stdout.fileno()))
    first.stdin.close()
    first.stdout.close()
    first.wait()
    held = []  # every lower free number taken: the next pipe gets the closed ones
    while (fd := os.open(os.devnull, os.O_RDONLY)) != numbers[0]:
        held.append(fd)
    os.close(fd)
    third = _Forked(())
    third.stdin.write(base64.b64encode(pickle.dumps(Task(t.remember, (5,)))) + b"\\n")
    third.stdin.close()
    events, kinds = third.stdout.read().partition(EVENTS_MARKER)[2], []
    while events:  # frames: kind (1 byte), length (4 bytes), pickle
        kinds.append(events[:1].decode())
        events = events[5 + int.from_bytes(events[1:5], "big") :]
    print(" ".join(kinds))
    sys.exit(third.wait())
"""


def test_a_worker_forked_after_others_ended_keeps_its_pipes() -> None:
    """A forked worker closes the pipes of the workers forked before it, by number: not its
    own pipes, which may have been given the numbers of an earlier worker's, closed since."""
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_AGAIN], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().split() == ["S", "P", "R"]  # started, progress, result


#: Run in an interpreter of its own: within fork_workers, while forking fails (EAGAIN).
FORK_FAILS = """
import json, os, sys
import test_pool as t
from copystream.pool import Task, fork_workers, run_tasks

def refuse():
    raise BlockingIOError(11, "Resource temporarily unavailable")

os.fork = refuse
with fork_workers():
    events = list(run_tasks([Task(t.remember, (n,), short=True) for n in range(4)], 2))
print(json.dumps(sorted(e.kind for e in events if e.kind in ("done", "failed"))))
"""


def test_a_worker_that_cannot_be_forked_is_a_new_interpreter() -> None:
    """Should forking fail (EAGAIN, ENOMEM), the pool starts new interpreters instead, handed
    pickled tasks: the job goes on."""
    proc = subprocess.run(
        [sys.executable, "-c", FORK_FAILS], capture_output=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout) == ["done"] * 4


def test_what_a_worker_s_interpreter_prints_at_its_start_is_not_taken_for_events(
    tmp_path: Path,
) -> None:
    """A site customization printing on stdout as a worker's interpreter starts (before the
    worker's marker on that pipe) is skipped, not read as events."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.stdout.write('hello from site\\n')\nsys.stdout.flush()\n"
    )
    code = (
        "import json, test_pool as t\n"
        "from copystream.pool import Task, run_tasks\n"
        "events = list(run_tasks([Task(t.remember, (n,), short=True) for n in range(3)], 1))\n"
        "print(json.dumps([e.kind for e in events if e.kind in ('done', 'failed')]))\n"
    )
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), tests])}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=120, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().splitlines()[-1] == json.dumps(["done"] * 3)


class _Handed:
    """What :func:`_top_up` uses of a worker: its queue, the bytes it has not read, its writes."""

    def __init__(self) -> None:
        self.queue: collections.deque[int] = collections.deque()
        self.unread: dict[int, int] = {}
        self.writes: list[list[int]] = []

    def line(self, i: int, tasks: Sequence[Task]) -> bytes:
        return base64.b64encode(pickle.dumps(tasks[i])) + b"\n"  # as to a spawned worker

    def give(self, given: Sequence[tuple[int, bytes]]) -> None:
        self.writes.append([i for i, _ in given])
        for i, line in given:
            self.queue.append(i)
            self.unread[i] = len(line)

    def finish(self) -> None:
        """Its first task ends; the next one begins (read off the pipe)."""
        self.queue.popleft()
        if self.queue:
            self.unread.pop(self.queue[0], None)


def test_a_worker_running_short_tasks_is_topped_up_in_batches_pure() -> None:
    """A free worker gets a task at once, with SHORT_AHEAD more behind it when they are short;
    as it works through them it is handed more only once SHORT_REFILL or fewer are left ahead,
    then up to SHORT_AHEAD again, in one write: a write per several tasks, none lost or
    handed twice, in order."""
    tasks = [Task(remember, (n,), short=True) for n in range(100)]
    waiting = collections.deque(range(len(tasks)))
    worker = _Handed()
    _top_up(worker, tasks, waiting)  # type: ignore[arg-type]
    assert worker.writes == [list(range(SHORT_AHEAD + 1))]
    ran: list[int] = []
    while worker.queue:
        ran.append(worker.queue[0])
        worker.finish()
        _top_up(worker, tasks, waiting)  # type: ignore[arg-type]
        assert len(worker.queue) >= min(SHORT_REFILL + 1, len(tasks) - len(ran))
    assert ran == list(range(len(tasks))) and not waiting
    assert all(len(w) > 1 for w in worker.writes[:-1])  # never one task at a time
    assert len(worker.writes) <= 2 + len(tasks) // (SHORT_AHEAD - SHORT_REFILL)
    long = [Task(remember, (0,), short=True), Task(remember, (1,))]
    worker, waiting = _Handed(), collections.deque(range(2))
    _top_up(worker, long, waiting)  # type: ignore[arg-type]
    assert worker.writes == [[0]] and list(waiting) == [1]  # a long task waits for a free one


def test_events_are_read_frame_by_frame_whatever_the_reads_pure() -> None:
    """A worker's events are frames (kind, pickle's length, pickle): read whole however the
    pipe cuts them, a frame not complete yet kept for the next read, none for a start."""
    big = b"\n" * 70_000  # more than one read's worth, and line ends mean nothing
    data = _frame(b"S") + _frame(b"P", ("working on", 1)) + _frame(b"R", big)
    for cut in (0, 1, 4, 5, 6, 20, len(data) - 1, len(data)):
        first, rest, bad = _frames(data[:cut])
        second, left, worse = _frames(rest + data[cut:])
        assert [k for k, _ in first + second] == [b"S", b"P", b"R"] and left == b""
        assert [pickle.loads(p) for _, p in (first + second)[1:]] == [("working on", 1), big]
        assert not bad and not worse
    assert _frames(data[:-1]) == (_frames(data)[0][:2], _frame(b"R", big)[:-1], False)
    # what is not a frame: read no further (its worker is killed: nothing after can be read)
    assert _frames(_frame(b"S") + b"hello\n" + _frame(b"R", 1)) == ([(b"S", b"")], b"", True)
    assert _frames(b"R\xff\xff\xff\xff")[2]  # (a length no pickle of a worker's has)
