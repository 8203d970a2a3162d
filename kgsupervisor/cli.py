"""The `kgsupervisor` command: a thin click layer over the library."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import closing
from typing import TYPE_CHECKING, Any

import click
import psutil

from . import backend, config, logs
from .pidfile import Pidfile, running_pid
from .errors import ConfigError, KGSupervisorError, NotReachable
from .states import EXIT_USAGE

if TYPE_CHECKING:
    import requests

# The supervisor, worker, HTTP client, dev service and rich views are imported by the commands
# that use them: `queue`, `enqueue` and `health` are called from scripts and cron, and each call
# would otherwise pay ~0.3 s of imports it never uses.


class KGGroup(click.Group):
    """Turns kgsupervisor's own errors into one line on stderr and an exit status, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConfigError, NotReachable) as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_USAGE)
        except KGSupervisorError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(1)


@click.group(cls=KGGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kgsupervisor")
def main() -> None:
    """Supervise workers that drain the knowledge-graph ingest queue of a crawl database."""


def db_option(f: Callable) -> Callable:
    return click.option("--db", "db_path", envvar="KG_DB_PATH", metavar="PATH|URL", required=True,
                        help="SQLite database, or a postgresql:// URL (env KG_DB_PATH).")(f)


def settings_options(f: Callable) -> Callable:
    """The options shared by `worker` and `run`; unset ones fall back to env, file, default."""
    options = [
        click.option("--config", "config_file", metavar="FILE", help="TOML config file."),
        click.option("--db", "db_path", metavar="PATH|URL", help="SQLite database or postgresql:// URL [KG_DB_PATH]."),
        click.option("--service-url", help="KG service base URL [KG_SERVICE_URL]."),
        click.option("--service-timeout", type=float, help="Read timeout of one ingest, seconds [KG_SERVICE_TIMEOUT]."),
        click.option("--poll-interval", type=float, help="Seconds an idle worker waits [KG_POLL_INTERVAL]."),
        click.option("--batch-size", type=int, help="Rows one claim takes at most [KG_BATCH_SIZE]."),
        click.option("--max-attempts", type=int, help="Attempts before a document fails [KG_MAX_ATTEMPTS]."),
        click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON [KG_LOG_FORMAT]."),
        click.option("--log-file", metavar="FILE", help="Log to FILE, reopened on SIGUSR1 [KG_LOG_FILE]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def load_settings(kwargs: dict[str, Any]) -> tuple[config.Settings, dict[str, str]]:
    cli = {k: v for k, v in kwargs.items() if k in config.FIELDS}
    return config.load(cli, config_file=kwargs.get("config_file"))


@main.command("init-db")
@db_option
def init_db_command(db_path: str) -> None:
    """Create the schema, or migrate an existing upstream database (idempotent)."""
    changes = backend.init_database(db_path)
    for change in changes:
        click.echo(change)
    click.echo(f"{backend.describe(db_path)}: schema up to date ({len(changes)} change(s))")


@main.command()
@db_option
@click.argument("ids", nargs=-1, type=int)
@click.option("--all-unprocessed", is_flag=True, help="Queue every document with kg_processed = 0.")
@click.option("--priority", type=int, default=1, show_default=True, help="Higher is taken first.")
def enqueue(db_path: str, ids: tuple[int, ...], all_unprocessed: bool, priority: int) -> None:
    """Queue documents (crawled_content ids); a document already queued is not queued twice."""
    if not ids and not all_unprocessed:
        raise click.UsageError("give document ids or --all-unprocessed")
    queue = backend.open_queue(db_path)
    if all_unprocessed:
        click.echo(f"queued {queue.enqueue_all_unprocessed(priority, time.time())} unprocessed document(s)")
    if ids:
        result = queue.enqueue(ids, priority, time.time())
        click.echo(f"queued {len(result.added)} document(s)")
        if result.already_queued:
            click.echo(f"already pending or processing: {_id_list(result.already_queued)}")
        if result.unknown:
            click.echo(f"not in crawled_content, not queued: {_id_list(result.unknown)}", err=True)
            sys.exit(1)


def _id_list(ids: list[int]) -> str:
    shown = ", ".join(map(str, ids[:20]))
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


@main.command("queue")
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def queue_command(db_path: str, as_json: bool) -> None:
    """Counts of queue rows by status, straight from the database."""
    counts = backend.open_queue(db_path).counts()
    if as_json:
        click.echo(json.dumps(counts))
        return
    for status, n in counts.items():
        click.echo(f"{status:<11} {n:>9}")


@main.command()
@db_option
@click.option("--failed", is_flag=True, help="Every failed row.")
@click.option("--skipped", is_flag=True, help="Every skipped row.")
@click.option("--id", "ids", type=int, multiple=True, help="A queue row id (repeatable).")
def retry(db_path: str, failed: bool, skipped: bool, ids: tuple[int, ...]) -> None:
    """Put failed or skipped rows back to pending with a fresh attempt budget."""
    if not (failed or skipped or ids):
        raise click.UsageError("give --failed, --skipped or --id N")
    n = backend.open_queue(db_path).retry(failed=failed, skipped=skipped, ids=ids)
    click.echo(f"{n} row(s) back to pending")


@main.command("copy-db")
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

    from .copydb import copy_database
    with Progress(transient=not sys.stderr.isatty(), disable=not sys.stderr.isatty()) as bar:
        tasks: dict[str, Any] = {}

        def show(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], completed=done)

        done, released = copy_database(source, target, batch_rows=batch_rows, progress=show)
    for t in done:
        click.echo(f"{t.table:<20} {t.source_rows:>9} row(s): {t.copied} copied, {t.already_there} already there")
    if released:
        click.echo(f"{released} claim(s) that were processing in the SQLite database are pending in PostgreSQL")
    click.echo(f"verified: every table has as many rows in {backend.describe(target)} as in {source}")


@main.command()
@settings_options
@click.option("--once", is_flag=True, help="Claim and process one batch, then exit.")
@click.option("--worker-id", type=int, default=0, show_default=True)
def worker(once: bool, worker_id: int, **kwargs: Any) -> None:
    """Run one worker in the foreground (for debugging; production uses `run`)."""
    settings, _ = load_settings(kwargs)
    config.require_db(settings)
    setup_logging(settings)
    from .worker import run_worker
    sys.exit(run_worker(settings, worker_id, once=once))


def setup_logging(settings: config.Settings) -> None:
    logs.setup(settings.log_format, secrets=[settings.token() or ""], path=settings.log_file)


@main.command("dev-service")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8088, show_default=True)
@click.option("--latency", type=float, default=0.0, show_default=True, help="Seconds added to each ingest.")
@click.option("--fail-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of ingests that answer 500.")
@click.option("--token", envvar="KG_SERVICE_TOKEN", help="Require this bearer token.")
def dev_service(host: str, port: int, latency: float, fail_rate: float, token: str | None) -> None:
    """A reference KG service (CONTRACT §3) with deterministic extraction, for demos and tests."""
    def ready(bound: int) -> None:
        click.echo(f"dev-service listening on http://{host}:{bound}", err=True)
    from . import devservice
    try:
        devservice.serve(host, port, latency=latency, fail_rate=fail_rate, token=token, ready=ready)
    except OSError as exc:
        raise KGSupervisorError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@main.command()
@settings_options
@click.option("--workers", "num_workers", type=int, help="Worker processes [KG_NUM_WORKERS].")
@click.option("--drain-timeout", type=float, help="Seconds in-flight documents get on SIGTERM [KG_DRAIN_TIMEOUT].")
@click.option("--pidfile", metavar="FILE", help="Write and lock a pidfile [KG_PIDFILE].")
@click.option("--status-addr", metavar="HOST:PORT", help="Status endpoint, or off [KG_STATUS_ADDR; 127.0.0.1:9188].")
@click.option("--exit-when-empty", is_flag=True, help="Drain and exit 0 once nothing is pending or processing.")
@click.option("--print-config", is_flag=True, help="Show every effective setting and its source, then exit.")
def run(exit_when_empty: bool, print_config: bool, **kwargs: Any) -> None:
    """Run the supervisor in the foreground (what systemd or supervisord start)."""
    settings, sources = load_settings(kwargs)
    if print_config:
        return show_config(settings, sources)
    db_path = config.require_db(settings)
    with closing(backend.open_database(db_path)):  # closed: no connection may cross the fork
        pass
    setup_logging(settings)
    pidfile = Pidfile(settings.pidfile) if settings.pidfile else None
    if pidfile:
        pidfile.acquire()
    cli_values = {k: v for k, v in kwargs.items() if k in config.FIELDS}
    from .supervisor import Supervisor
    supervisor = Supervisor(
        settings, exit_when_empty=exit_when_empty, status_addr=config.parse_addr(settings.status_addr),
        reload_settings=lambda: config.load(cli_values, os.environ, kwargs.get("config_file"))[0],
        extra_close_fds=[pidfile.fd] if pidfile else [])
    try:
        status = supervisor.run()
    finally:
        if pidfile:
            pidfile.release()
    sys.exit(status)


def show_config(settings: config.Settings, sources: dict[str, str]) -> None:
    for name, value in settings.masked().items():
        click.echo(f"{name:<26} {value!s:<32} ({sources[name]}; {config.FIELDS[name].metadata['env']})")


def pidfile_option(f: Callable) -> Callable:
    return click.option("--pidfile", envvar="KG_PIDFILE", required=True, metavar="FILE",
                        help="Pidfile the supervisor was started with [KG_PIDFILE].")(f)


@main.command()
@pidfile_option
def reload(pidfile: str) -> None:
    """Send SIGHUP: reload the configuration and restart every worker."""
    pid = running_pid(pidfile)
    _send(pid, signal.SIGHUP)
    click.echo(f"sent SIGHUP to supervisor pid {pid}")


@main.command()
@pidfile_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it has exited.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait.")
def stop(pidfile: str, wait: bool, timeout: float) -> None:
    """Send SIGTERM: drain in-flight documents, release the rest, exit."""
    pid = running_pid(pidfile)
    _send(pid, signal.SIGTERM)
    click.echo(f"sent SIGTERM to supervisor pid {pid}")
    deadline = time.monotonic() + timeout
    while wait and _alive(pid):
        if time.monotonic() > deadline:
            raise KGSupervisorError(f"supervisor pid {pid} still running after {timeout:g}s")
        time.sleep(0.1)


def _send(pid: int, signum: int) -> None:
    """Signal the supervisor, or one line if it exited since its pidfile was read."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise KGSupervisorError(f"supervisor pid {pid} has just exited") from None


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie has exited, only its parent (a script) has not reaped it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def status_addr_option(f: Callable) -> Callable:
    return click.option("--status-addr", envvar="KG_STATUS_ADDR", default="127.0.0.1:9188", show_default=True,
                        metavar="HOST:PORT", help="Where the supervisor serves its status [KG_STATUS_ADDR].")(f)


def fetch(addr: str, path: str) -> requests.Response:
    """GET from a running supervisor's status endpoint, or a one-line error (exit 2)."""
    import requests
    parsed = config.parse_addr(addr)
    if parsed is None:
        raise NotReachable("the status endpoint is off (--status-addr off): nothing to ask")
    host, port = parsed
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}{path}"
    try:
        return requests.get(url, timeout=5)
    except requests.RequestException:
        raise NotReachable(f"no supervisor answering on {host}:{port} (is `kgsupervisor run` running? "
                           f"is --status-addr the same?)") from None


@main.command()
@status_addr_option
@click.option("--json", "as_json", is_flag=True, help="Print get_worker_stats() as JSON.")
@click.option("--watch", is_flag=True, help="A live view: progress bar, queue, per-worker table.")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Refresh of --watch, seconds.")
def status(status_addr: str, as_json: bool, watch: bool, interval: float) -> None:
    """Aggregate stats of a running supervisor, read from its status endpoint."""
    if watch:
        return watch_status(status_addr, interval)
    if as_json:
        return click.echo(fetch(status_addr, "/stats").text)
    snapshot = {"stats": fetch(status_addr, "/stats").json(), "health": fetch(status_addr, "/health").json()}
    from . import render
    click.echo(render.status_text(snapshot))


def watch_status(status_addr: str, interval: float) -> None:
    """Redraw the status until Ctrl-C or SIGTERM."""
    import threading

    from rich.live import Live

    from . import render
    meter = render.RateMeter()
    # A flag, not KeyboardInterrupt: an exception raised at a random point could land while
    # rich's refresh thread waits on a lock the main thread holds, and the exit would hang.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())

    def view():
        snapshot = {"stats": fetch(status_addr, "/stats").json(), "health": fetch(status_addr, "/health").json()}
        return render.status_view(snapshot, meter)
    with Live(view(), refresh_per_second=4, screen=False) as live:
        while not stop.wait(interval):
            live.update(view())


@main.command()
@status_addr_option
@click.option("--json", "as_json", is_flag=True, help="Print check_worker_health() as JSON.")
def health(status_addr: str, as_json: bool) -> None:
    """Exit 0 when the supervisor's workers are healthy, 1 when not, 2 when it cannot be reached."""
    try:
        resp = fetch(status_addr, "/health")
    except NotReachable as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    body = resp.json()
    if as_json:
        click.echo(json.dumps(body))
    else:
        click.echo(f"{'healthy' if resp.status_code == 200 else 'unhealthy'}: "
                   f"{body.get('healthy_workers', 0)}/{body.get('total_workers', 0)} workers running")
    sys.exit(0 if resp.status_code == 200 else 1)
