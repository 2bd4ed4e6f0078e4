"""The worker processes of a bulk job: the body of ``python -m copystream._bulk_worker`` (one
table, events on stdout) and the coordinator's handle on each worker (:class:`_Running`)."""

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import IO, Any

from ..connection import redact
from ..errors import CopystreamError
from ..export import ExportResult, export_table
from ..pool import spawn_worker
from ..progress import Progress
from .outcome import _in_plan_terms
from .resolve import _Task

log = logging.getLogger("copystream")

# A worker is ``python -m copystream._bulk_worker COORDINATOR_PID LOG_LEVEL``, a plain subprocess
# (like the parallel export's workers, see copystream.pool): multiprocessing's ``spawn``
# would re-import the caller's ``__main__`` in every worker (a cron script without a main guard
# would start the job again; an Airflow task would re-import Airflow). The worker reads its
# pickled job on stdin and writes one line per event on stdout: ``P <progress>``,
# ``L <level> <message>``, then ``R <result>`` or ``E <message>`` (payloads base64).


@dataclass(frozen=True)
class _Job:
    conninfo: str
    table: str
    output: str
    kwargs: dict[str, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _LineLogHandler(logging.Handler):
    """Sends a worker's log lines to the coordinator, which logs them in its own way."""

    def __init__(self, send: Callable[[str], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(f"L {record.levelno} {_b64(record.getMessage().encode())}")


def worker_main(argv: Sequence[str]) -> int:
    """Body of ``python -m copystream._bulk_worker COORDINATOR_PID LOG_LEVEL``: one table."""
    from ..pool import die_with_coordinator  # killed with the coordinator; ignores Ctrl-C

    die_with_coordinator(int(argv[0]), int(argv[1]))
    job: _Job = pickle.load(sys.stdin.buffer)
    # The events get the real stdout to themselves; anything else printed goes to stderr.
    events = os.fdopen(os.dup(1), "w", encoding="ascii")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(line: str) -> None:
        with lock:
            events.write(line + "\n")
            events.flush()

    log.handlers[:] = [_LineLogHandler(send)]
    last = 0.0

    def report(p: Progress) -> None:
        nonlocal last
        now = time.monotonic()
        if p.done or now - last >= 0.2:
            last = now
            send(f"P {_b64(pickle.dumps(p))}")

    try:
        result = export_table(
            job.conninfo or None, job.table, job.output, progress=report, **job.kwargs
        )
    except CopystreamError as e:
        send(f"E {_b64(str(e).encode())}")
        return 1
    except Exception as e:  # a bug: fail this table, not the job
        send(f"E {_b64(f'unexpected {type(e).__name__}: {e} (please report this)'.encode())}")
        return 1
    # The chunk records stay in the manifest: a huge table's would only weigh on the pipe.
    send(f"R {_b64(pickle.dumps(replace(result, chunks=())))}")
    return 0


class _Running:
    """A worker process exporting one table, and what it has said so far."""

    def __init__(self, task: _Task, index: int, events: queue.Queue[tuple[int, str]]) -> None:
        self.task = task
        self.started = time.monotonic()
        self.progress = Progress(task.table, 0, 0, task.estimated_rows, 0.0, 0)
        self.result: ExportResult | None = None
        self.error: str | None = None
        job = _Job(
            conninfo=task.entry.dsn or "",
            table=task.table,
            output=str(task.output),
            kwargs=task.entry.export_kwargs(),
        )
        self.proc = spawn_worker("copystream._bulk_worker", job)
        assert self.proc.stdout is not None
        self.reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, index, events), daemon=True
        )
        self.reader.start()
        log.debug("%s: started in process %s", task.table, self.proc.pid)

    @staticmethod
    def _read(stdout: IO[bytes], index: int, events: queue.Queue[tuple[int, str]]) -> None:
        for raw in stdout:
            events.put((index, raw.decode("ascii", errors="replace").rstrip("\n")))
        events.put((index, "EOF"))

    def handle(self, line: str, secrets: Sequence[str]) -> None:
        """Take in one event line of the worker."""
        kind, _, payload = line.partition(" ")
        try:
            if kind == "P":
                self.progress = pickle.loads(base64.b64decode(payload))
            elif kind == "L":
                level, _, text = payload.partition(" ")
                message = base64.b64decode(text).decode(errors="replace")
                log.log(int(level), "%s", _in_plan_terms(redact(message, *secrets)))
            elif kind == "R":
                self.result = pickle.loads(base64.b64decode(payload))
            elif kind == "E":
                self.error = base64.b64decode(payload).decode(errors="replace")
        except (ValueError, pickle.UnpicklingError, EOFError):  # a torn line of a killed worker
            pass

    def stop(self) -> None:
        """Terminate the worker (its own workers die with it)."""
        with contextlib.suppress(Exception):
            self.proc.terminate()


def _died(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name}"
        if exitcode == -signal.SIGKILL:
            how += " (out of memory?)"
    else:
        how = f"exited with status {exitcode}"
    return (
        f"the worker process exporting it {how}; its checkpoint is intact, run the same "
        "command again to resume"
    )


def _stop(running: Sequence[_Running]) -> None:
    """Terminate the workers (their own workers die with them) and wait for them."""
    for r in running:
        r.stop()
    deadline = time.monotonic() + 5.0
    for r in running:
        try:
            r.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()
