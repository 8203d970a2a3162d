"""The queue commands of `kgsupervisor`: init-db, enqueue, queue, retry and copy-db."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from kgsupervisor.errors import ConfigError, KGSupervisorError
from kgsupervisor.ops.cli_options import db_option
from kgsupervisor.queue.leased import open_queue
from kgsupervisor.states import ALL_JOB_STATUSES
from kgsupervisor.store import backend

# `queue` and `enqueue` are called from scripts and cron: rich is imported only when a bulk
# command shows a progress bar on a terminal, the copy by `copy-db` alone, and the database
# fault descriptions only when a database refuses.


@contextmanager
def database_errors(db_path: str) -> Iterator[None]:
    """A database that refuses a command (read-only, damaged, gone) is one line, not a traceback."""
    try:
        yield
    except Exception as exc:
        if not backend.is_driver_error(exc):
            raise
        raise KGSupervisorError(_database_error(db_path, exc)) from None


def _database_error(db_path: str, exc: BaseException) -> str:
    """One line: which database refused, and why."""
    from kgsupervisor.store.faults import describe_database_fault
    return f"database {backend.describe(db_path)}: {describe_database_fault(exc)}"


@contextmanager
def progress_bar(label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar (done, total) on a terminal's stderr, as copy-db shows; None when stderr
    is a pipe or a file, so that scripts and cron get only the summary line."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress
    with Progress(*Progress.get_default_columns(), MofNCompleteColumn(), console=Console(stderr=True)) as bar:
        tasks: list[Any] = []  # made at the first batch: a command with nothing to do shows no bar

        def show(done: int, total: int) -> None:
            if not tasks:
                tasks.append(bar.add_task(label, total=total))
            bar.update(tasks[0], completed=done, total=total)

        yield show


def _id_list(ids: list[int]) -> str:
    """At most 20 ids, comma-separated, and how many more there are."""
    shown = ", ".join(map(str, ids[:20]))
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


@click.command("init-db")
@db_option
def init_db_command(db_path: str) -> None:
    """Create the schema, or migrate an existing upstream database (idempotent)."""
    changes = backend.init_database(db_path)
    for change in changes:
        click.echo(change)
    click.echo(f"{backend.describe(db_path)}: schema up to date ({len(changes)} change(s))")


@click.command()
@db_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-unprocessed", is_flag=True, help="Queue every document with kg_processed = 0.")
@click.option("--priority", type=int, default=1, show_default=True, help="Higher is taken first.")
def enqueue(db_path: str, ids: tuple[int, ...], all_unprocessed: bool, priority: int) -> None:
    """Queue documents (crawled_content ids); a document already queued is not queued twice."""
    if not ids and not all_unprocessed:
        raise click.UsageError("give document ids or --all-unprocessed")
    with database_errors(db_path):
        queue = open_queue(db_path)
        unprocessed = None
        if all_unprocessed:
            with progress_bar("documents looked at") as progress:
                unprocessed = queue.enqueue_all_unprocessed(priority, time.time(), progress=progress)
        result = queue.enqueue(ids, priority, time.time()) if ids else None
    if unprocessed is not None:
        click.echo(f"queued {unprocessed} unprocessed document(s)")
    if result is not None:
        click.echo(f"queued {len(result.added)} document(s)")
        if result.already_queued:
            click.echo(f"already pending or processing: {_id_list(result.already_queued)}")
        if result.unknown:
            click.echo(f"not in crawled_content, not queued: {_id_list(result.unknown)}", err=True)
            sys.exit(1)


@click.command("queue")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def queue_command(db_path: str, as_json: bool) -> None:
    """Counts of queue rows by status, straight from the database."""
    with database_errors(db_path):
        counts = open_queue(db_path).counts()
    if as_json:
        click.echo(json.dumps(counts))
        return
    for status, n in counts.items():
        unknown = status != "total" and status not in ALL_JOB_STATUSES
        click.echo(f"{status:<11} {n:>9}" + ("  (not a status kgsupervisor knows: never claimed)" if unknown else ""))


@click.command()
@db_option
@click.option("--failed", is_flag=True, help="Every failed row.")
@click.option("--skipped", is_flag=True, help="Every skipped row.")
@click.option("--pending", is_flag=True, help="Every pending row told to wait (Retry-After, backoff): due now.")
@click.option("--id", "ids", type=int, multiple=True, help="A queue row id (repeatable).")
@click.option("--error", "error_text", metavar="TEXT",
              help="The failed rows whose message or error class contains TEXT (any case), "
                   "as `failed` finds them.")
@click.option("--since", metavar="DURATION",
              help="The failed rows that failed within the last DURATION: 90s, 15m, 2h, 7d.")
@click.option("--dry-run", is_flag=True,
              help="Print how many failed rows would go back to pending; change nothing.")
def retry(db_path: str, failed: bool, skipped: bool, pending: bool, ids: tuple[int, ...],
          error_text: str | None, since: str | None, dry_run: bool) -> None:
    """Put failed or skipped rows back to pending with a fresh attempt budget; pending rows
    (--pending, or by --id) that wait for a later time become due now. --error and --since
    choose among the failed rows (both: rows that match both)."""
    from kgsupervisor.queue.inspection import FailureFilter, retry_failures
    filtered = error_text is not None or since is not None
    if not (failed or skipped or pending or ids or filtered):
        raise click.UsageError("give --failed, --skipped, --pending, --id N, --error TEXT "
                               "or --since DURATION")
    if dry_run and (skipped or pending or ids):
        raise click.UsageError("--dry-run counts failed rows: use it with --failed, --error or --since, "
                               "not with --skipped, --pending or --id")
    chosen = FailureFilter.of_options(error_text, since, time.time())
    with database_errors(db_path):
        queue = open_queue(db_path)
        if dry_run:
            n = retry_failures(queue, chosen, dry_run=True)
            click.echo(f"{n} row(s) would go back to pending (dry run: nothing changed)")
            return
        n = 0
        if filtered:
            with progress_bar("back to pending") as progress:
                n += retry_failures(queue, chosen, progress=progress)
        with progress_bar("back to pending") as progress:
            n += queue.retry(failed=failed and not filtered, skipped=skipped, ids=ids, progress=progress)
        with progress_bar("due now") as progress:
            due = queue.make_due(time.time(), every_pending=pending, ids=ids, progress=progress)
    click.echo(f"{n} row(s) back to pending")
    if pending or due:
        click.echo(f"{due} pending row(s) due now instead of later")


@click.command("copy-db")
@click.option("--from", "source", metavar="PATH", required=True, help="The SQLite database to copy.")
@click.option("--to", "target", metavar="URL", required=True, help="The postgresql:// database to copy into.")
@click.option("--batch-rows", type=click.IntRange(1), default=5000, show_default=True,
              help="Rows per transaction; an interrupted copy resumes after the last one committed.")
def copy_db(source: str, target: str, batch_rows: int) -> None:
    """Copy an SQLite database (documents, chunks, KG rows, queue) into PostgreSQL.

    \b
    Stop every supervisor on the SQLite database first. Run it again after an interruption:
    it resumes where it stopped. It ends by comparing every table's row count.
    Example: kgsupervisor copy-db --from /var/lib/crawl/crawl.db --to postgresql://kg@db/crawl
    """
    if not backend.is_postgres_url(target):
        raise ConfigError("--to", target, "a postgresql:// URL")
    from rich.progress import Progress

    from kgsupervisor.store.copydb import copy_database
    with Progress(transient=not sys.stderr.isatty(), disable=not sys.stderr.isatty()) as bar:
        tasks: dict[str, Any] = {}

        def show(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], completed=done)

        done, released = copy_database(source, target, batch_rows=batch_rows, progress=show)
    for t in done:
        click.echo(f"{t.table:<20} {t.source_rows:>9} row(s): {t.copied} copied, {t.already_there} already there")
        if t.left_out:
            click.echo(f"{t.table:<20} not copied (PostgreSQL has no such column): {', '.join(t.left_out)}")
    if released:
        click.echo(f"{released} claim(s) that were processing in the SQLite database are pending in PostgreSQL")
    click.echo(f"verified: every table has as many rows in {backend.describe(target)} as in {source}")


COMMANDS = (init_db_command, enqueue, queue_command, retry, copy_db)
