"""Worker processes for parallel exports: ``python -m copystream._worker``, one per part.

Workers are plain subprocesses of the current Python interpreter, not ``multiprocessing``
children: ``spawn`` re-imports the caller's ``__main__`` in every child (a script without an
``if __name__ == "__main__"`` guard would run again; an Airflow task would re-import Airflow),
and ``fork`` copies a possibly multi-threaded, large host process. A worker reads its pickled
:class:`~copystream.part.PartJob` on stdin and writes one line per event on stdout:
``P <rows> <bytes>`` for progress, ``R <base64 pickle of PartOutcome>`` for the result, or
``E <json [error class, message, exit code]>``. Its log lines go to the inherited stderr.

On Linux a worker asks the kernel to kill it when its coordinator dies (``PR_SET_PDEATHSIG``),
so a re-run never races an orphan writing the same part.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any

from . import errors
from .errors import CopystreamError, ExportFailed
from .part import PartJob, PartOutcome

__all__ = ["decode_error", "die_with_coordinator", "encode_error", "run_jobs", "spawn_worker"]

log = logging.getLogger("copystream")


def encode_error(e: BaseException) -> str:
    """The ``E`` line payload for an exception raised in a worker."""
    if isinstance(e, CopystreamError):
        return json.dumps([type(e).__name__, str(e), e.exit_code])
    return json.dumps(["ExportFailed", f"{type(e).__name__}: {e}", 1])


def decode_error(payload: str) -> CopystreamError:
    """The exception an ``E`` line stands for, as its own :class:`CopystreamError` class."""
    name, message, _code = json.loads(payload)
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, CopystreamError)):
        cls = ExportFailed
    return cls(message)


def spawn_worker(module: str, job: object) -> subprocess.Popen[bytes]:
    """Start ``python -m module COORDINATOR_PID LOG_LEVEL`` and hand it the pickled ``job``.

    Its stdout is a pipe for its event lines; its stderr is ours (its log lines).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", module, str(os.getpid()), str(log.getEffectiveLevel())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        close_fds=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(pickle.dumps(job))
        proc.stdin.close()
    except BrokenPipeError:  # it died at once; its exit status will say how
        pass
    return proc


class _Worker:
    def __init__(self, index: int, job: PartJob, events: queue.Queue[tuple[int, str, str]]) -> None:
        self.index = index
        self.proc = spawn_worker("copystream._worker", job)
        assert self.proc.stdout is not None
        self.reader = threading.Thread(
            target=self._read, args=(self.proc.stdout, events), daemon=True
        )
        self.reader.start()

    def _read(self, stdout: IO[bytes], events: queue.Queue[tuple[int, str, str]]) -> None:
        for raw in stdout:
            line = raw.decode().rstrip("\n")
            kind, _, payload = line.partition(" ")
            events.put((self.index, kind, payload))
        events.put((self.index, "EOF", ""))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)


def run_jobs(
    jobs: Sequence[PartJob],
    workers: int,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> list[PartOutcome]:
    """Run ``jobs`` in up to ``workers`` worker processes; outcomes in job order.

    ``on_progress(index, rows, bytes)`` is called as workers report. If any job fails, the
    others still run to their end; then the first failure is raised (checkpoints are intact).
    """
    events: queue.Queue[tuple[int, str, str]] = queue.Queue()
    waiting = list(range(len(jobs)))
    running: dict[int, _Worker] = {}
    results: dict[int, PartOutcome] = {}
    failures: dict[int, CopystreamError] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max(1, workers):
                i = waiting.pop(0)
                running[i] = _Worker(i, jobs[i], events)
            try:
                i, kind, payload = events.get(timeout=1.0)
            except queue.Empty:
                continue
            if kind == "P" and on_progress is not None:
                rows, nbytes = payload.split()
                on_progress(i, int(rows), int(nbytes))
            elif kind == "R":
                results[i] = pickle.loads(base64.b64decode(payload))
            elif kind == "E":
                failures[i] = decode_error(payload)
            elif kind == "EOF":
                worker = running.pop(i)
                code = worker.proc.wait()
                if i not in results and i not in failures:
                    failures[i] = ExportFailed(
                        f"worker process for part {i} died (exit status {code})"
                    )
    finally:
        for worker in running.values():
            worker.stop()
    if failures:
        raise failures[min(failures)]
    return [results[i] for i in range(len(jobs))]


def die_with_coordinator(coordinator: int, level: int) -> None:
    """Set up a worker process: killed when ``coordinator`` dies, Ctrl-C left to it, logging.

    Exits at once if the coordinator is already gone (it died before the kernel was told).
    """
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != coordinator:
        os._exit(1)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s copystream[{os.getpid()}] %(levelname)s: %(message)s")
    )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def worker_main(argv: Sequence[str]) -> int:
    """Body of ``python -m copystream._worker COORDINATOR_PID LOG_LEVEL``."""
    die_with_coordinator(int(argv[0]), int(argv[1]))
    job: PartJob = pickle.load(sys.stdin.buffer)
    out = sys.stdout
    last = 0.0

    def report(p: Any) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > 0.25 or p.done:
            last = now
            out.write(f"P {p.rows} {p.bytes}\n")
            out.flush()

    from .part import run_part

    try:
        outcome = run_part(job, progress=report)
    except BaseException as e:  # every failure goes back to the coordinator as one line
        out.write(f"E {encode_error(e)}\n")
        out.flush()
        return 1
    out.write(f"R {base64.b64encode(pickle.dumps(outcome)).decode()}\n")
    out.flush()
    return 0
