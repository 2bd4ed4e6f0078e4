"""Shared fixtures: one throwaway PostgreSQL server per session, a fresh database per test.

A missing or broken server is an error, never a skip.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from copystream.testing import EphemeralPostgres

PsqlCsv = Callable[..., bytes]
RunSql = Callable[[str, str], list[tuple[Any, ...]]]


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
def pg() -> Iterator[EphemeralPostgres]:
    """A PostgreSQL server shared by the whole session."""
    server = EphemeralPostgres()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


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
        cmd = [
            pg.psql_bin, "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn,
            "-c", f"\\copy ({query}) TO STDOUT WITH ({options})",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise AssertionError(f"psql failed ({proc.returncode}): {proc.stderr.decode()}")
        return proc.stdout

    return run
