"""The ``copystream`` command: parses arguments, calls the library, turns errors into exit codes.

Exit codes: 0 done; 1 failed but resumable (run the same command again); 2 bad usage or input
(one line on stderr, no files created).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ._atomic import atomic_write
from .connection import Target, redact
from .errors import CopystreamError, UsageError
from .export import export_status, export_table
from .manifest import verify_file
from .progress import BarReporter, LogReporter, Progress, format_summary
from .spec import CopyOptions

__all__ = ["main"]

log = logging.getLogger("copystream")


def _split(value: str | None, option: str) -> list[str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if not all(parts):
        raise click.BadParameter(f"empty name in {value!r}", param_hint=f"'{option}'")
    return parts


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


@cli.command()
@click.argument("table")
@click.argument("output", type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "--dsn",
    envvar="COPYSTREAM_DSN",
    help="libpq connection string or URI "
    "(default: the libpq environment, PG* variables, service file, .pgpass).",
)
@click.option("--key", help="Column(s) to page by, comma-separated (default: primary key).")
@click.option("--columns", help="Columns to export, comma-separated, in this order.")
@click.option("--where", "where", help="SQL filter applied inside every chunk.")
@click.option(
    "--chunk-rows",
    type=click.IntRange(min=0),
    help="Rows per chunk (default: adaptive); 0 = the whole table in one COPY.",
)
@click.option("--header", is_flag=True, help="Write a header line.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "text"]),
    default="csv",
    show_default=True,
    help="COPY format.",
)
@click.option("--delimiter", help="Field delimiter (COPY DELIMITER).")
@click.option("--null", "null", help="String written for NULL (COPY NULL).")
@click.option("--quote", help="Quote character (COPY QUOTE, csv only).")
@click.option("--escape", help="Escape character (COPY ESCAPE, csv only).")
@click.option("--force-quote", help="Columns always quoted, comma-separated, or '*' (csv only).")
@click.option("--encoding", help="Output encoding (COPY ENCODING).")
@click.option("--restart", is_flag=True, help="Discard any checkpoint and output; start from zero.")
@click.option("--force", is_flag=True, help="Overwrite an existing output that has no checkpoint.")
@click.option("--no-progress", is_flag=True, help="No progress bar or progress log lines.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the summary as JSON to this file.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Retries of a failing chunk.",
)
@click.option(
    "--retry-budget",
    type=click.FloatRange(min=0),
    default=900.0,
    show_default=True,
    help="Total seconds the export may spend retrying.",
)
@click.option(
    "--io-timeout",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Seconds without data from the server before a chunk is retried.",
)
@click.option(
    "--statement-timeout",
    type=click.FloatRange(min=0.001),
    help="Server statement_timeout per statement, in seconds (retried when hit).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes, each exporting one key range; parts are joined in order.",
)
@click.option(
    "--consistent",
    is_flag=True,
    help="Read every chunk from one exported snapshot (point-in-time export).",
)
@click.option("-v", "--verbose", is_flag=True, help="More log lines.")
def export(
    table: str,
    output: Path,
    dsn: str | None,
    key: str | None,
    columns: str | None,
    where: str | None,
    chunk_rows: int | None,
    header: bool,
    fmt: str,
    delimiter: str | None,
    null: str | None,
    quote: str | None,
    escape: str | None,
    force_quote: str | None,
    encoding: str | None,
    restart: bool,
    force: bool,
    no_progress: bool,
    report: Path | None,
    retries: int,
    retry_budget: float,
    io_timeout: float,
    statement_timeout: float | None,
    workers: int,
    consistent: bool,
    verbose: bool,
) -> None:
    """Export TABLE to the file OUTPUT; run it again after an interruption to resume."""
    _setup_logging(verbose)
    secrets = Target(dsn or "").secrets
    options = CopyOptions(
        format=fmt,
        header=header,
        delimiter=delimiter,
        null=null,
        quote=quote,
        escape=escape,
        force_quote=True
        if force_quote == "*"
        else tuple(_split(force_quote, "--force-quote") or ()),
        encoding=encoding,
    )
    if report is not None and not report.parent.is_dir():
        raise UsageError(f"report directory {report.parent} does not exist")
    with _progress(no_progress) as reporter:
        result = export_table(
            dsn,
            table,
            output,
            key=_split(key, "--key"),
            columns=_split(columns, "--columns"),
            where=where,
            chunk_rows=chunk_rows,
            options=options,
            restart=restart,
            force=force,
            progress=reporter,
            retries=retries,
            retry_budget=retry_budget,
            io_timeout=io_timeout,
            statement_timeout=statement_timeout,
            workers=workers,
            consistent=consistent,
        )
    summary = format_summary(
        table=result.table,
        rows=result.rows,
        nbytes=result.bytes,
        seconds=result.seconds,
        peak_rss=result.peak_rss,
        resumed=result.resumed,
    )
    if result.already_complete:
        summary += " — already complete, nothing done"
    click.echo(redact(summary, *secrets))
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
@click.argument("output", type=click.Path(path_type=Path))
def verify(output: Path) -> None:
    """Re-hash OUTPUT against its manifest; exit 1 naming the first chunk that differs."""
    r = verify_file(output)
    click.echo(
        f"{r.path}: OK, {r.rows:,} rows, {r.bytes:,} bytes, {r.chunks} chunks, "
        f"xxh3_128 {r.xxh3_128}"
    )


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(output: Path, as_json: bool) -> None:
    """Show how far the export to OUTPUT got."""
    s = export_status(output)
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
    click.echo(
        f"{s.output}: {s.state}; table {s.table}; {s.rows:,} rows{share}, "
        f"{s.bytes:,} bytes in {s.chunks} chunks; {where}"
    )


@cli.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Tables exported at the same time, each in its own process (largest first).",
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
    plan: Path, jobs: int, dry_run: bool, no_progress: bool, only: tuple[str, ...], verbose: bool
) -> None:
    """Export every table of the TOML plan PLAN; run it again to resume."""
    from . import bulk as b

    _setup_logging(verbose)
    reporter: Callable[[b.BulkProgress], None] | None = None
    try:
        loaded = b.load_plan(plan)
        with contextlib.ExitStack() as stack:
            if not (no_progress or dry_run):
                if sys.stderr.isatty():
                    reporter = stack.enter_context(b.BulkBarReporter())
                else:
                    reporter = b.BulkLogReporter(interval=30.0)
            result = b.run_bulk(
                loaded, jobs=jobs, only=only or None, dry_run=dry_run, progress=reporter
            )
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``copystream`` console script."""
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
        _fail(redact(str(e), *secrets), e.exit_code)
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
