"""Helpers shared by the end-to-end export tests (test_export, test_resume, test_cli).

Imported as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` because it has
no ``__init__.py``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import xxhash
from psycopg import sql

from copystream.testing import EphemeralPostgres

#: How often the kill helper looks at the checkpoint / output of a running export.
POLL = 0.001


def xxh(data: bytes) -> str:
    """xxh3-128 hex digest, as copystream records it."""
    return xxhash.xxh3_128(data).hexdigest()


def checkpoint_file(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.json")


def manifest_file(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The checkpoint beside ``out`` as JSON, or ``None`` (it is replaced atomically)."""
    try:
        return dict(json.loads(checkpoint_file(out).read_bytes()))
    except FileNotFoundError:
        return None


def read_manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads(manifest_file(out).read_bytes()))


@contextmanager
def scratch_database(pg: EphemeralPostgres, schema: str) -> Iterator[str]:
    """A database holding ``schema`` for a whole test module (its tables are only read)."""
    name = f"m_{uuid.uuid4().hex[:12]}"
    dsn = pg.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(schema)
        yield dsn
    finally:
        if pg.running:
            with psycopg.connect(pg.dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` (name -> bytes): to prove a refusal touched nothing.

    ``*.lock`` files are left out: a killed export leaves its (empty) lock file behind and the
    next run may tidy it away.
    """
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.endswith(".lock")
    }


def cli(*args: str) -> list[str]:
    """The command line of ``copystream`` run as a real subprocess."""
    return [sys.executable, "-m", "copystream", *args]


def export_cmd(dsn: str, table: str, out: Path, *extra: str) -> list[str]:
    return cli("export", table, str(out), "--dsn", dsn, "--no-progress", *extra)


def env_with(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


def run(
    cmd: list[str], *, env: Mapping[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a command to the end; stdout and stderr as text."""
    return subprocess.run(cmd, capture_output=True, text=True, env=env_with(env), timeout=timeout)


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout={proc.stdout}\nstderr={proc.stderr}"
    )
    assert "Traceback" not in proc.stderr


def assert_one_error_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Exit ``code``, exactly one ``copystream: error:`` line on stderr containing ``needles``."""
    out = f"exit {proc.returncode}\nstdout={proc.stdout!r}\nstderr={proc.stderr!r}"
    assert proc.returncode == code, out
    assert "Traceback" not in proc.stderr, out
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("copystream: error: "), out
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error line\n{out}"
    return lines[0]


@dataclass(frozen=True)
class Killed:
    """What a SIGKILLed export left behind."""

    checkpoint: dict[str, Any] | None  # as the killed process last saved it
    size: int  # bytes in the output at the kill (-1: no output file)
    returncode: int  # -9 if it was SIGKILLed; 0 if it finished first (only with after_seconds)
    stderr: str


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def kill_export(
    cmd: list[str],
    out: Path,
    *,
    min_chunks: int | None = None,
    min_bytes: int | None = None,
    after_seconds: float | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 120.0,
    sig: int = signal.SIGKILL,
) -> Killed:
    """Start the export ``cmd`` and SIGKILL it at a point of progress.

    The kill comes when the checkpoint records at least ``min_chunks`` chunks, or when the
    output holds at least ``min_bytes`` bytes, or after ``after_seconds``. With a progress
    condition the export must still be running when it is met (else AssertionError).
    ``sig`` is the signal sent (SIGKILL unless told otherwise).
    """
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env_with(env),
            start_new_session=True,
            # A shell runs background jobs with SIGINT ignored, and Python then installs no
            # KeyboardInterrupt handler: give the child a real Ctrl-C whatever we inherited.
            preexec_fn=_default_sigint if sig == signal.SIGINT else None,
        )
        try:
            deadline = time.monotonic() + timeout
            kids: list[psutil.Process] = []
            if after_seconds is not None:
                time.sleep(after_seconds)
                kids = _descendants(proc.pid)
            else:
                while True:
                    # taken before the kill point is looked at, so that nothing delays the kill
                    kids = _descendants(proc.pid)
                    if min_chunks is not None:
                        cp = read_checkpoint(out)
                        if cp is not None and len(cp["chunks"]) >= min_chunks:
                            break
                    if min_bytes is not None and out.exists() and out.stat().st_size >= min_bytes:
                        break
                    if proc.poll() is not None:
                        err.seek(0)
                        raise AssertionError(
                            f"the export ended (exit {proc.returncode}) before the kill point: "
                            f"{err.read().decode(errors='replace')}"
                        )
                    assert time.monotonic() < deadline, "the kill point was never reached"
                    time.sleep(POLL)
            if proc.poll() is None:
                os.kill(proc.pid, sig)
            proc.wait(timeout=timeout)
            # Worker processes outlive a SIGKILLed parent for a moment (they notice it gone),
            # holding their ranges' locks: a re-run at once would find the output busy.
            psutil.wait_procs(kids, timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    size = out.stat().st_size if out.exists() else -1
    return Killed(read_checkpoint(out), size, proc.returncode, stderr)


def _descendants(pid: int) -> list[psutil.Process]:
    """The processes ``pid`` started (and theirs), from ``/proc/PID/task/*/children``: a few
    small reads, cheap enough to take at every poll."""
    found: list[psutil.Process] = []
    todo = [pid]
    while todo:
        for path in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                children = [int(c) for c in path.read_text().split()]
            except OSError:
                continue
            todo += children
            for c in children:
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(c))
    return found


class KillAtOpen:
    """Kills a process at the moment it opens the ``n``-th file whose name matches a pattern in
    one directory, while that open is held (Linux fanotify, ``FAN_OPEN_PERM``; needs root).

    The process is stopped *between* two steps, whatever the speed of the machine: a watcher
    that reacts to an event after the fact can arrive when the process has already finished.
    Opens of other files in the directory are allowed at once, by a thread of this object."""

    _FAN_CLASS_CONTENT = 0x04
    _FAN_CLOEXEC = 0x01
    _FAN_MARK_ADD = 0x01
    _FAN_OPEN_PERM = 0x10000
    _FAN_EVENT_ON_CHILD = 0x08000000
    _FAN_ALLOW, _FAN_DENY = 0x01, 0x02
    _AT_FDCWD = -100

    def __init__(self, directory: Path, pattern: str, n: int) -> None:
        import ctypes
        import re
        import threading

        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint64,
            ctypes.c_int,
            ctypes.c_char_p,
        ]
        self.fd = libc.fanotify_init(self._FAN_CLASS_CONTENT | self._FAN_CLOEXEC, os.O_RDONLY)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "fanotify_init (root needed)")
        mask = self._FAN_OPEN_PERM | self._FAN_EVENT_ON_CHILD
        if (
            libc.fanotify_mark(
                self.fd, self._FAN_MARK_ADD, mask, self._AT_FDCWD, str(directory).encode()
            )
            < 0
        ):
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "fanotify_mark")
        self.pattern, self.n, self.seen = re.compile(pattern), n, 0
        self.pid: int | None = None
        self.killed = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        """The process to kill (set it right after starting it: opens before are counted)."""
        self.pid = pid

    def _serve(self) -> None:
        import select
        import struct

        while not self._stop:
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if not ready:
                continue
            data = os.read(self.fd, 4096)
            at = 0
            while at + 24 <= len(data):
                length, _, _, _, _, fd, _ = struct.unpack_from("IBBHQii", data, at)
                at += length
                verdict = self._FAN_ALLOW
                try:
                    name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
                    if self.pattern.fullmatch(name) and not self.killed.is_set():
                        self.seen += 1
                        if self.seen == self.n and self.pid is not None:
                            os.kill(self.pid, signal.SIGKILL)
                            self.killed.set()
                            verdict = self._FAN_DENY
                finally:
                    os.write(self.fd, struct.pack("iI", fd, verdict))
                    os.close(fd)

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=10)
        os.close(self.fd)  # allows whatever open is still held


def write_plan(
    path: Path, dsn: str, body: str, *, output_dir: str = "out", **defaults: Any
) -> Path:
    """A bulk plan at ``path``: ``[defaults]`` with the DSN, ``output_dir`` and ``defaults``,
    then ``body`` (its ``[[tables]]``)."""
    lines = ["[defaults]", f"dsn = {json.dumps(dsn)}", f"output_dir = {json.dumps(output_dir)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in defaults.items()]
    path.write_text("\n".join(lines) + "\n\n" + body)
    return path


def psql_copy(
    pg: EphemeralPostgres,
    dsn: str,
    query: str,
    options: str = "FORMAT csv",
    env: Mapping[str, str] | None = None,
) -> bytes:
    """The reference exporter: the real psql's ``\\copy (query) TO STDOUT WITH (options)``,
    its stdout byte for byte (``env`` entries added to the environment)."""
    cmd = [
        pg.psql_bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn,
        "-c", f"\\copy ({query}) TO STDOUT WITH ({options})",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise AssertionError(f"psql failed ({proc.returncode}): {proc.stderr.decode()}")
    return proc.stdout


def shard_process(plan_file: Path, index: int, *, kill_after_chunks: int = 0) -> int:
    """Run shard ``index`` in a new process that reads only the plan file; with
    ``kill_after_chunks``, the process SIGKILLs itself once that many chunks are committed."""
    code = f"""
import os, signal, sys
import copystream
def progress(p):
    if {kill_after_chunks} and p.chunks >= {kill_after_chunks}:
        os.kill(os.getpid(), signal.SIGKILL)
r = copystream.run_shard({str(plan_file)!r}, {index}, progress=progress)
print(r.to_json())
"""
    return subprocess.run([sys.executable, "-c", code], timeout=120).returncode


def upserted(*files: Path) -> dict[str, list[str]]:
    """The CSV rows of ``files`` applied in order, each replacing the row of the same first
    column (the key): what a loader upserting increments by key holds."""
    rows: dict[str, list[str]] = {}
    for f in files:
        for row in csv.reader(io.StringIO(f.read_text())):
            rows[row[0]] = row
    return rows


def alive(p: psutil.Process) -> bool:
    """Whether any thread of ``p`` may still act: a SIGKILLed process's leader shows as a zombie
    while another of its threads still finishes a system call (a checkpoint's rename, seen in
    CI); the process is gone once the zombie leader is its only thread."""
    try:
        if not p.is_running():
            return False
        return p.status() != psutil.STATUS_ZOMBIE or p.num_threads() > 1
    except psutil.NoSuchProcess:
        return False


def wait_for(cond: Callable[[], bool], timeout: float, stop: threading.Event | None = None) -> bool:
    """Poll ``cond`` every 2 ms until true (True), or until ``timeout``/``stop`` (False)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            return False
        time.sleep(0.002)
    return True
