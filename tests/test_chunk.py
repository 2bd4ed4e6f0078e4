"""The chunk runner's sibling connection: it must never hold its transaction open for the COPY.

The sibling imports the chunk's snapshot and finds the chunk's last key while the main connection
streams the COPY. If its transaction (and its ACCESS SHARE lock on the table) stayed open until
the COPY ended, an ALTER TABLE queued between the two connections' locks would wait for the
sibling, the COPY would wait behind the ALTER, and the sibling would wait for the COPY: a
deadlock PostgreSQL cannot see, broken only by the I/O timeout.

(The key is ``numeric``: with one of an integer type, the chunk's last key is read from the
COPY's own last row and there is no sibling; tests/test_chunk_key.py.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psycopg

import copystream
from copystream.progress import Progress


def _states(dsn: str) -> list[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT state FROM pg_stat_activity WHERE application_name = 'copystream' "
            "AND datname = current_database()"
        ).fetchall()
    return sorted(str(r[0]) for r in rows)


def test_sibling_transaction_ends_while_the_copy_streams(
    dsn: str, run_sql: Any, psql_csv: Any, tmp_path: Path
) -> None:
    run_sql(
        dsn,
        "CREATE TABLE t (id numeric PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 60000) g;"
        "ANALYZE t",
    )
    seen: list[list[str]] = []

    def slow(p: Progress) -> None:  # about once per MiB, from inside the COPY's read loop
        if not p.done and p.rows < 60000:  # inside the first chunk's COPY
            seen.append(_states(dsn))
            time.sleep(0.05)

    out = tmp_path / "t.csv"
    copystream.export_table(dsn, "t", out, chunk_rows=60000, progress=slow)
    assert out.read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
    # after its first MiB the COPY's is the only copystream transaction (active, or idle in
    # transaction once the server has sent everything): the sibling's has ended
    assert len(seen) >= 4, seen
    assert all(s in (["active", "idle"], ["idle", "idle in transaction"]) for s in seen[1:]), seen


def test_exclusive_lock_during_an_export_is_not_a_deadlock(
    dsn: str, run_sql: Any, psql_csv: Any, tmp_path: Path
) -> None:
    """ALTER-style locks taken again and again while chunks run: each is granted promptly."""
    run_sql(
        dsn,
        "CREATE TABLE t (id numeric PRIMARY KEY, v text);"
        "INSERT INTO t SELECT g * 3, md5(g::text) FROM generate_series(1, 200000) g; ANALYZE t",
    )
    waits: list[float] = []
    stop = threading.Event()

    def locker() -> None:
        with psycopg.connect(dsn) as conn:
            while not stop.is_set() and len(waits) < 200:
                t0 = time.monotonic()
                conn.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
                waits.append(time.monotonic() - t0)
                conn.rollback()
                time.sleep(0.005)

    th = threading.Thread(target=locker, daemon=True)
    th.start()
    try:
        result = copystream.export_table(
            dsn, "t", tmp_path / "t.csv", chunk_rows=500, io_timeout=5.0
        )
    finally:
        stop.set()
        th.join(timeout=30)
    assert result.retries == 0
    assert waits and max(waits) < 4.0, max(waits)
    assert (tmp_path / "t.csv").read_bytes() == psql_csv(dsn, "SELECT * FROM t ORDER BY id")
