"""Helpers shared by the end-to-end export tests (test_export, test_resume, test_cli).

Imported as ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path`` because it has
no ``__init__.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
            if after_seconds is not None:
                time.sleep(after_seconds)
            else:
                while True:
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
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    size = out.stat().st_size if out.exists() else -1
    return Killed(read_checkpoint(out), size, proc.returncode, stderr)


class Renames:
    """Counts the files renamed into a directory under one name (Linux inotify, IN_MOVED_TO):
    how a test stops a process right after its N-th atomic replacement of a file, such as a
    join record in ``OUTPUT.parts.json``, with no polling delay to miss it by."""

    _IN_MOVED_TO = 0x80
    _IN_CLOEXEC = 0o2000000

    def __init__(self, directory: Path, name: str) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self._IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if self._libc.inotify_add_watch(self.fd, str(directory).encode(), self._IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), "inotify_add_watch")
        self.name = name.encode()
        self.count = 0

    def wait(self, count: int, timeout: float, alive: Any = None) -> bool:
        """Block until ``count`` renames were seen in all (``False`` on timeout, or as soon as
        ``alive()`` says the process being watched has ended)."""
        import select
        import struct

        deadline = time.monotonic() + timeout
        while self.count < count:
            left = deadline - time.monotonic()
            if left <= 0 or (alive is not None and not alive()):
                return False
            ready, _, _ = select.select([self.fd], [], [], min(left, 0.05))
            if not ready:
                continue
            data = os.read(self.fd, 65536)
            at = 0
            while at < len(data):
                _, _, _, size = struct.unpack_from("iIII", data, at)
                name = data[at + 16 : at + 16 + size].rstrip(b"\0")
                at += 16 + size
                self.count += name == self.name
        return True

    def close(self) -> None:
        os.close(self.fd)
