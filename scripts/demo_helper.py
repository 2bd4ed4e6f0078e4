"""Driver of ``scripts/demo.sh``: a resumable export shown end to end on a throwaway server.

1. start a throwaway PostgreSQL server (:class:`copystream.testing.EphemeralPostgres`);
2. create a sample ``orders`` table (bigint primary key, int, text with quotes, commas and
   newlines, numeric, timestamptz, jsonb, NULLs) and ANALYZE it;
3. run ``copystream export`` with its progress bar on this terminal, and SIGKILL it once its
   checkpoint covers 40% of the rows;
4. show ``copystream status`` and what is on disk;
5. run the very same command again: it resumes;
6. ``copystream verify``;
7. export the table with psql's ``\\copy`` and compare the two files with ``cmp``;
8. print a summary.

The server is always stopped and its files removed, even after an error or Ctrl-C. Run it through
``scripts/demo.sh``, which sets up ``.venv`` and PostgreSQL first.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from copystream.testing import EphemeralPostgres

#: The sample table. Every column type that COPY formats differently is here, and the text
#: column holds what CSV must quote: double quotes, commas, newlines, empty strings and NULLs.
CREATE = """
CREATE TABLE orders (
    id          bigint PRIMARY KEY,
    customer_id int NOT NULL,
    status      text NOT NULL,
    note        text,
    amount      numeric(12, 2),
    created_at  timestamptz NOT NULL,
    shipped_at  timestamptz,
    attrs       jsonb
)
"""

FILL = """
INSERT INTO orders
SELECT g,
       1 + (g::bigint * 7919) % 50000,
       (ARRAY['new', 'paid', 'shipped', 'cancelled'])[1 + g % 4],
       CASE WHEN g % 97 = 0 THEN NULL
            WHEN g % 89 = 0 THEN ''
            WHEN g % 13 = 0 THEN 'customer said "leave it at the door", twice'
            WHEN g % 31 = 0 THEN E'first line\\nsecond line'
            ELSE 'order ' || g END,
       CASE WHEN g % 50 = 0 THEN NULL ELSE round(((g::bigint * 31) % 100000) / 100.0 + 0.99, 2) END,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '37 seconds',
       CASE WHEN g % 4 = 2
            THEN timestamptz '2024-01-02 00:00:00+00' + g * interval '37 seconds' END,
       CASE WHEN g % 23 = 0 THEN NULL
            ELSE jsonb_build_object('sku', 'SKU-' || (g % 1000), 'qty', 1 + g % 5,
                                    'gift', g % 11 = 0) END
FROM generate_series(1, {rows}) AS g
"""


class DemoFailed(Exception):
    """A step of the demo did not do what it should; the message says which."""


def step(n: int, total: int, title: str) -> None:
    """Print a step header."""
    print(f"\n=== {n}/{total} {title}", flush=True)


def shell(cmd: list[str]) -> str:
    """``cmd`` as one would type it."""
    return "$ " + shlex.join(cmd)


def copystream_cmd() -> list[str]:
    """The ``copystream`` console script beside this Python, else ``python -m copystream``."""
    script = Path(sys.executable).parent / "copystream"
    if os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "copystream"]


def restore_terminal() -> None:
    """Show the cursor again: the progress bar hides it, and a killed process cannot undo that."""
    for stream in (sys.stderr, sys.stdout):
        if stream.isatty():
            stream.write("\x1b[?25h\n")
            stream.flush()
            return


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path`` (replaced atomically by copystream), or ``None`` if absent."""
    try:
        data: dict[str, Any] = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    return data


def run(cmd: list[str], what: str) -> None:
    """Run ``cmd`` with the terminal inherited; fail the demo if it does not exit 0."""
    print(shell(cmd), flush=True)
    rc = subprocess.run(cmd, check=False).returncode
    if rc != 0:
        raise DemoFailed(f"{what} exited with {rc}")


def export_and_kill(cmd: list[str], out: Path, kill_rows: int) -> dict[str, Any] | None:
    """Run the export to ``out``; SIGKILL it once its checkpoint records ``kill_rows`` rows.

    Returns the checkpoint that survived the kill, or ``None`` if the export finished first.
    """
    checkpoint = out.with_name(out.name + ".checkpoint.json")
    print(shell(cmd), flush=True)
    proc = subprocess.Popen(cmd)  # stdout and stderr are this terminal: the bar is live
    try:
        while proc.poll() is None:
            cp = read_json(checkpoint)
            if cp is not None and cp["rows"] >= kill_rows:
                # Let the next chunk write its first buffers, so the kill lands mid-chunk.
                deadline = time.monotonic() + 0.5
                while (
                    proc.poll() is None
                    and out.stat().st_size <= cp["offset"]
                    and time.monotonic() < deadline
                ):
                    time.sleep(0.002)
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        rc = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    restore_terminal()
    if rc == -signal.SIGKILL:
        print(f"*** killed the export (SIGKILL, pid {proc.pid}): it gets no chance to clean up")
        return read_json(checkpoint)  # what survived the kill
    if rc == 0:
        print("the export finished before it could be killed (try a smaller --chunk-rows)")
        return None
    raise DemoFailed(f"the first export run exited with {rc}")


def same_bytes(a: Path, b: Path) -> bool:
    """Whether two files are byte-identical (``cmp`` when present)."""
    if shutil.which("cmp"):
        print(shell(["cmp", str(a), str(b)]), flush=True)
        return subprocess.run(["cmp", str(a), str(b)], check=False).returncode == 0
    return filecmp.cmp(a, b, shallow=False)


def demo(pg: EphemeralPostgres, workdir: Path, args: argparse.Namespace) -> None:
    """Steps 2-8 (the server is already running)."""
    total = 8
    step(2, total, f"create a sample table: orders, {args.rows:,} rows of mixed types")
    dsn = pg.create_database("shop")
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CREATE)
        conn.execute(sql.SQL(FILL).format(rows=sql.Literal(args.rows)))
        conn.execute("ANALYZE orders")
        size = conn.execute("SELECT pg_size_pretty(pg_total_relation_size('orders'))").fetchone()
    pretty = size[0] if size else "?"
    print(f"filled and analyzed in {time.monotonic() - t0:.1f}s; table size {pretty}")
    print("columns: id bigint PK, customer_id int, status text, note text (quotes, commas,")
    print("newlines, empty strings, NULLs), amount numeric, created_at and shipped_at timestamptz,")
    print("attrs jsonb")

    out = workdir / "orders.csv"
    checkpoint = out.with_name(out.name + ".checkpoint.json")
    manifest = out.with_name(out.name + ".manifest.json")
    cs = copystream_cmd()
    export = [*cs, "export", "orders", str(out), "--dsn", dsn, "--chunk-rows", str(args.chunk_rows)]
    kill_rows = int(args.rows * args.kill_at)

    step(3, total, f"export; SIGKILL it once the checkpoint covers {args.kill_at:.0%} of the rows")
    print(f"(--chunk-rows {args.chunk_rows:,} gives the demo something to interrupt; without it,")
    print("chunks adapt to about 2 seconds each and this small table takes only a few chunks)")
    t0 = time.monotonic()
    seen = export_and_kill(export, out, kill_rows)
    first_run = time.monotonic() - t0

    step(4, total, "what the killed export left behind")
    run([*cs, "status", str(out)], "copystream status")
    cp = read_json(checkpoint)
    if seen is not None:
        if cp is None:
            raise DemoFailed("the killed export left no checkpoint")
        on_disk = out.stat().st_size
        done, extra = cp["offset"], on_disk - cp["offset"]
        last = ", ".join(cp["last_key"])
        print(f"{out.name} holds {on_disk:,} bytes. The checkpoint vouches for the first {done:,}")
        print(f"({len(cp['chunks'])} chunks, {cp['rows']:,} rows, ids up to {last}).")
        if extra > 0:
            print(f"The other {extra:,} bytes come from the chunk that was killed: on resume,")
            print("copystream re-hashes the vouched-for prefix against the chunk digests in the")
            print("checkpoint, then cuts those bytes off and exports that chunk again.")
        else:
            print("The kill came between two chunks: there is nothing to cut.")

    step(5, total, "run the same command again: it resumes")
    t0 = time.monotonic()
    run(export, "the resumed export")
    second_run = time.monotonic() - t0
    if checkpoint.exists() or not manifest.exists():
        raise DemoFailed("after the resume the checkpoint should be gone and the manifest there")

    step(6, total, "verify the file against its manifest")
    run([*cs, "verify", str(out)], "copystream verify")

    step(7, total, "compare with psql's \\copy of the same query")
    ref = workdir / "orders.psql.csv"
    meta = f"\\copy (SELECT * FROM orders ORDER BY id) TO '{ref}' CSV"
    print(f'$ psql -X -d {shlex.quote(dsn)} -c "{meta}"', flush=True)
    proc = pg.psql("-c", meta, dbname="shop")
    if proc.returncode != 0:
        raise DemoFailed(f"psql failed: {proc.stderr.decode(errors='replace').strip()}")
    if not same_bytes(out, ref):
        raise DemoFailed(f"{out} differs from psql's output {ref}")
    print("identical to psql \\copy")

    step(8, total, "summary")
    m = read_json(manifest)
    assert m is not None
    with out.open("rb") as f:
        head = [f.readline().decode().rstrip("\n") for _ in range(2)]
    print(f"table            {m['table']} (key {', '.join(m['key'])}, {m['key_source']})")
    print(f"rows / bytes     {m['rows']:,} rows, {m['bytes']:,} bytes in {len(m['chunks'])} chunks")
    print(f"xxh3-128         {m['xxh3_128']}")
    if seen is not None:
        print(f"first run        killed after {first_run:.1f}s, {seen['rows']:,} rows checkpointed")
    else:
        print(f"first run        finished in {first_run:.1f}s (not interrupted)")
    print(f"second run       {second_run:.1f}s, resumed={str(m['resumed']).lower()}")
    print("checked          copystream verify OK; byte-identical to psql \\copy")
    print(f"first rows       {head[0]}")
    print(f"                 {head[1]}")
    print(f"files            {out.name}, {manifest.name}" + (f" in {workdir}" if args.keep else ""))


def main() -> int:
    """Run the demo; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the sample table")
    parser.add_argument("--chunk-rows", type=int, default=50_000, help="rows per chunk")
    parser.add_argument(
        "--kill-at", type=float, default=0.4, help="share of rows checkpointed before the kill"
    )
    parser.add_argument("--keep", action="store_true", help="keep the exported files")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="copystream-demo-"))
    pg: EphemeralPostgres | None = None
    try:
        step(1, 8, "start a throwaway PostgreSQL server")
        pg = EphemeralPostgres()
        pg.start()
        print(f"PostgreSQL from {pg.bin_dir} on {pg.host}:{pg.port}, files in {pg.base_dir}")
        demo(pg, workdir, args)
    except DemoFailed as e:
        restore_terminal()
        print(f"\ndemo FAILED: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        restore_terminal()
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        if pg is not None:
            print("\n=== stopping the server and removing its files", flush=True)
            pg.cleanup()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\ndemo finished: the export survived SIGKILL and matches psql byte for byte")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
