"""The ``copystream`` command: parses arguments, calls the library, turns errors into exit codes.

Exit codes: 0 done; 1 failed but resumable (run the same command again); 2 bad usage or input
(one line on stderr, no files created).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click

from ._atomic import atomic_write
from .connection import Target, redact
from .errors import CopystreamError, UsageError
from .export import export_status, export_table
from .manifest import verify_file
from .pool import fork_workers
from .progress import BarReporter, LogReporter, Progress
from .spec import Choice, Count, Flag, Kind, Seconds, Text, option_fields

__all__ = ["main", "run"]

log = logging.getLogger("copystream")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s copystream %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="copystream")
def cli() -> None:
    """Export PostgreSQL tables to files through COPY: resumable, verifiable, constant memory."""


def _flag_type(kind: Kind) -> click.ParamType | None:  # type: ignore[type-arg]
    if isinstance(kind, Count):
        return click.IntRange(min=kind.least)
    if isinstance(kind, Seconds):
        return click.FloatRange(min=kind.least)
    if isinstance(kind, Choice):
        return click.Choice(list(kind.words))
    return None


def _parsed(kind: Kind) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None or not isinstance(value, str) or isinstance(kind, Text | Choice):
            return value
        try:
            return kind.parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from e

    return parse


def export_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add a flag for every export option declared in :mod:`copystream.spec`."""
    for name, opt, default in reversed(list(option_fields())):
        flag = "--" + name.replace("_", "-")
        if isinstance(opt.kind, Flag):
            command = click.option(flag, name, is_flag=True, default=None, help=opt.help)(command)
            continue
        shown = default not in (None, (), "")
        command = click.option(
            flag,
            name,
            type=_flag_type(opt.kind),
            default=default if shown else None,
            show_default=shown,
            callback=_parsed(opt.kind),
            help=opt.help,
        )(command)
    return command


@cli.command()
@click.argument("table")
@click.argument("output", type=click.Path(dir_okay=True, path_type=str))
@click.option(
    "--dsn",
    envvar="COPYSTREAM_DSN",
    help="libpq connection string or URI "
    "(default: the libpq environment, PG* variables, service file, .pgpass).",
)
@export_options
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the summary as JSON to this file.",
)
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
def export(
    table: str,
    output: str,
    dsn: str | None,
    no_progress: bool,
    report: Path | None,
    verbose: bool,
    **options: Any,
) -> None:
    """Export TABLE to the file OUTPUT; run it again after an interruption to resume."""
    _setup_logging(verbose)
    secrets = Target(dsn or "").secrets
    if report is not None and not report.parent.is_dir():
        raise UsageError(f"report directory {report.parent} does not exist")
    with contextlib.ExitStack() as stack:
        if not output.startswith("s3://"):  # this process is ours: a --workers export's fork
            stack.enter_context(fork_workers())
        reporter = stack.enter_context(_progress(no_progress))
        result = export_table(dsn, table, output, progress=reporter, **options)
    click.echo(redact(result.summary(), *secrets))
    if report is not None:
        atomic_write(report, json.dumps(result.to_json(), indent=1).encode() + b"\n")


@contextlib.contextmanager
def _progress(off: bool) -> Iterator[Callable[[Progress], None] | None]:
    if off:
        yield None
    elif sys.stderr.isatty():
        with BarReporter() as bar:
            yield bar
    else:
        yield LogReporter(interval=30.0)


@cli.command()
@click.argument("output", type=click.Path(path_type=str), nargs=-1, required=True)
@click.option(
    "--deep", is_flag=True, help="Also decompress a compressed OUTPUT and check the CSV's digests."
)
@click.option(
    "--chain",
    is_flag=True,
    help="OUTPUT... are incremental exports, oldest first: also check that each follows the "
    "one before it, without a gap or an overlap.",
)
def verify(output: tuple[str, ...], deep: bool, chain: bool) -> None:
    """Re-hash OUTPUT against its manifest; exit 1 naming the first chunk that differs."""
    if chain:
        from .chain import verify_chain  # (on first use: most commands never need it)

        result = verify_chain(output, deep=deep)
        for r in result.files:
            click.echo(f"{r.path}: OK, {r.rows:,} rows, {r.bytes:,} bytes")
        click.echo(f"chain of {len(result.files)}: OK, {result.rows:,} rows, no gap, no overlap")
        return
    if len(output) != 1:
        raise UsageError("verify takes one OUTPUT (several only with --chain)")
    r = verify_file(output[0], deep=deep)
    line = (
        f"{r.path}: OK, {r.rows:,} rows, {r.bytes:,} bytes, {r.chunks} chunks, "
        f"xxh3_128 {r.xxh3_128}"
    )
    if r.deep:
        line += (
            f"; decompressed: {r.uncompressed_bytes:,} bytes, "
            f"xxh3_128 {r.uncompressed_xxh3_128}"
        )
    click.echo(line)


@cli.command()
@click.argument("output", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option(
    "--watch", is_flag=True, help="Redraw the status and each shard's until the export is done."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between two redraws of --watch.",
)
def status(output: str, as_json: bool, watch: bool, interval: float) -> None:
    """Show how far the export to OUTPUT (or of the shard plan OUTPUT.shards.json) got; or the
    bulk job of the plan OUTPUT (*.toml), its output directory or its report."""
    from .watch import job_frame, job_report, job_report_path, output_of, watch_job, watch_status

    report = job_report_path(output)
    if report is not None:  # a bulk job
        if watch:
            watch_job(output, interval=interval)
        else:
            click.echo(job_report(report) if as_json else job_frame(report)[0])
        return
    if watch:
        watch_status(output, interval=interval)
        return
    s = export_status(output_of(output))
    pct = s.percent
    if as_json:
        click.echo(
            json.dumps(
                {
                    "output": str(s.output),
                    "state": s.state,
                    "table": s.table,
                    "rows": s.rows,
                    "bytes": s.bytes,
                    "last_key": list(s.last_key) if s.last_key else None,
                    "estimated_rows": s.estimated_rows,
                    "percent": pct,
                    "chunks": s.chunks,
                    "ranges": s.ranges,
                    "ranges_finished": s.ranges_finished,
                    "parts": s.parts,
                }
            )
        )
        return
    share = (
        f" ({pct:.1f}% of ~{s.estimated_rows:,} estimated rows)"
        if pct is not None and (s.estimated_rows)
        else ""
    )
    if s.ranges > 1 and s.state != "complete":
        where = f"{s.ranges_finished} of {s.ranges} key ranges finished"
    else:
        where = "last key " + (", ".join(s.last_key) if s.last_key else "(none)")
    held = f"{s.chunks} chunks" if s.parts is None else f"{s.parts} parts ({s.chunks} chunks)"
    click.echo(
        f"{s.output}: {s.state}; table {s.table}; {s.rows:,} rows{share}, "
        f"{s.bytes:,} bytes in {held}; {where}"
    )


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, each exporting one table at a time (largest first).",
)
@click.option(
    "--consistent",
    is_flag=True,
    default=None,
    help="Read every table from one snapshot held for the whole job (as pg_dump does).",
)
@click.option(
    "--require-snapshot",
    is_flag=True,
    help="With one snapshot for the job: refuse to go on when tables were exported by an "
    "earlier run (under a snapshot that is gone).",
)
@click.option("--dry-run", is_flag=True, help="Print the resolved plan; export nothing.")
@click.option("--no-progress", is_flag=True, help="No live view or progress log lines.")
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help="Run only the plan's tables matching NAME (a name or pattern); repeatable.",
)
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
def bulk(
    plan: Path,
    jobs: int,
    consistent: bool | None,
    require_snapshot: bool,
    dry_run: bool,
    no_progress: bool,
    only: tuple[str, ...],
    verbose: bool,
) -> None:
    """Export every table of the TOML plan PLAN; run it again to resume."""
    from . import bulk as b

    _setup_logging(verbose)
    reporter: Callable[[b.BulkProgress], None] | None = None
    try:
        loaded = b.load_plan(plan)
        with contextlib.ExitStack() as stack:
            stack.enter_context(fork_workers())  # this process is ours: its workers fork
            if not (no_progress or dry_run):
                if sys.stderr.isatty():
                    reporter = stack.enter_context(b.BulkBarReporter())
                else:
                    reporter = b.BulkLogReporter(interval=30.0)
            result = b.run_bulk(
                loaded, jobs=jobs, only=only or None, dry_run=dry_run, progress=reporter,
                consistent=consistent, require_snapshot=require_snapshot,
            )  # fmt: skip
    except b.PlanError as e:  # every problem of the plan, one line each; nothing was written
        for problem in e.problems:
            click.echo(f"copystream: error: {problem}", err=True)
        sys.exit(2)  # click returns, not raises, an Exit when not standalone
    secrets = loaded.secrets
    text = b.format_dry_run(result) if dry_run else b.format_summary_table(result)
    click.echo(redact(text, *secrets))
    for t in result.failed:
        why = "; ".join(t.errors)
        click.echo(redact(f"copystream: error: {t.table} ({t.entry}): {why}", *secrets), err=True)
    if result.exit_code:
        sys.exit(result.exit_code)


def run() -> NoReturn:
    """Entry point of the ``copystream`` console script and ``python -m copystream``:
    :func:`main`, then the process ends without the interpreter's teardown (see
    :func:`_end`)."""
    try:
        main()
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise  # (a message to print: as the interpreter does)
        _end(e.code or 0)
    _end(0)


def _end(code: int) -> NoReturn:
    """End the process with ``code`` as the interpreter would, but without tearing down every
    module and object first: for a small export that teardown is a tenth of the command's
    CPU, and nothing of copystream's needs it (its files and connections are closed by then).
    What a normal exit does before that teardown is done: the threads' exit hooks run (an
    executor left running lets its threads go) and other threads are waited for
    (``threading._shutdown``, which the interpreter calls), then the exit handlers run
    (logging's flushes its files); then stdout and stderr are flushed."""
    # (Both private, both what CPython 3.11-3.13 itself runs at exit.)
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    else:  # (an interpreter without it: at least wait for the other threads)
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
    except Exception as e:  # as the interpreter: said on stderr, and exit status 120
        with contextlib.suppress(Exception):
            sys.stderr.write(f"copystream: error: writing the output failed: {e}\n")
        code = code or 120
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> None:
    """The command line, on ``argv`` (``sys.argv[1:]`` if ``None``); exits with its code."""
    args = sys.argv[1:] if argv is None else argv
    secrets = _secrets_in(args)
    try:
        cli.main(args=args, prog_name="copystream", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        _fail("interrupted; run the same command again to resume", 1)
    except click.ClickException as e:
        _fail(redact(e.format_message(), *secrets), 2)
    except CopystreamError as e:
        _fail(redact(e.worded("cli"), *secrets), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted; run the same command again to resume", 1)
    except Exception as e:  # a bug, not the user's mistake: one line, and how to see more
        _fail(f"unexpected {type(e).__name__}: {redact(str(e), *secrets)} (please report this)", 1)


def _secrets_in(args: list[str]) -> list[str]:
    """Passwords that error lines must not show: from --dsn, COPYSTREAM_DSN and PGPASSWORD."""
    out: list[str] = [os.environ["PGPASSWORD"]] if os.environ.get("PGPASSWORD") else []
    values: list[Any] = [os.environ.get("COPYSTREAM_DSN")]
    for i, a in enumerate(args):
        if a == "--dsn" and i + 1 < len(args):
            values.append(args[i + 1])
        elif a.startswith("--dsn="):
            values.append(a.split("=", 1)[1])
    for value in values:
        if value:
            with contextlib.suppress(CopystreamError):
                out.extend(Target(value).secrets)
    return out


def _fail(message: str, code: int) -> None:
    click.echo(f"copystream: error: {message}", err=True)
    sys.exit(code)
