"""The status commands of `kgsupervisor`: status (once, --watch, or --all hosts) and health."""
from __future__ import annotations

import json
import signal
import sys
import time
from contextlib import closing
from typing import Any

import click
from click.core import ParameterSource

from kgsupervisor.errors import ConfigError, KGSupervisorError, NotReachable
from kgsupervisor.ops.cli_options import FiniteRange, status_addr_option
from kgsupervisor.ops.statusclient import HEALTH_KEYS, STATS_KEYS, fetch_document, status_snapshot


@click.command()
@status_addr_option
@click.option("--json", "as_json", is_flag=True, help="Print get_worker_stats() as JSON.")
@click.option("--watch", is_flag=True, help="A live view: progress bar, queue, per-worker table.")
@click.option("--interval", type=FiniteRange(0, 3600, min_open=True), default=1.0, show_default=True, help="Refresh of --watch, seconds.")
@click.option("--all", "all_hosts", is_flag=True,
              help="Every supervisor of the queue at --db, and its counts, read from the database alone.")
@click.option("--db", "db_path", envvar="KG_DB_PATH", metavar="PATH|URL",
              help="With --all: SQLite database, or a postgresql:// URL [KG_DB_PATH].")
@click.option("--lease-seconds", type=FiniteRange(0, 86400, min_open=True), envvar="KG_LEASE_SECONDS",
              default=60.0, show_default=True,
              help="With --all: a supervisor silent for longer is shown gone [KG_LEASE_SECONDS].")
def status(status_addr: str, as_json: bool, watch: bool, interval: float, all_hosts: bool,
           db_path: str | None, lease_seconds: float) -> None:
    """Aggregate stats of a running supervisor, read from its status endpoint; with --all, every
    supervisor sharing a queue, read from its database."""
    if all_hosts:
        return hosts_status(db_path, lease_seconds, as_json, watch)
    if db_path and click.get_current_context().get_parameter_source("db_path") is ParameterSource.COMMANDLINE:
        raise ConfigError("--db", db_path,
                          "--all with it (without --all, status asks the endpoint at --status-addr)")
    if watch:
        return watch_status(status_addr, interval)
    if as_json:
        return click.echo(json.dumps(fetch_document(status_addr, "/stats", STATS_KEYS)[1]))
    from kgsupervisor.ops import render
    click.echo(render.status_text(status_snapshot(status_addr)))


def hosts_status(db_path: str | None, lease: float, as_json: bool, watch: bool) -> None:
    """`status --all`: the registry of hosts and the queue's counts, from the database alone."""
    if watch:
        raise ConfigError("--watch", True, "no --watch with --all (the hosts are read once)")
    if not db_path:
        raise ConfigError("KG_DB_PATH", None, "a database with --all (--db PATH|URL or KG_DB_PATH)")
    document = hosts_document(db_path, lease, time.time())
    if as_json:
        return click.echo(json.dumps(document))
    from kgsupervisor.ops import render
    click.echo(render.hosts_text(document))


def hosts_document(db_path: str, lease: float, now: float) -> dict[str, Any]:
    """What `status --all --json` prints: the database, every host's row with its shown state,
    and the queue's counts."""
    from kgsupervisor.ops.cli_queue import database_errors
    from kgsupervisor.queue.leased import open_queue
    from kgsupervisor.store.backend import backend_name, describe
    from kgsupervisor.store.hosts import read_hosts
    with database_errors(db_path):
        queue = open_queue(db_path)
        with closing(queue.conn):
            hosts, counts = read_hosts(queue.conn), queue.counts()
    return {"database": {"backend": backend_name(db_path), "name": describe(db_path)}, "lease_seconds": lease,
            "hosts": [host.describe(now, lease) for host in hosts], "queue_size": counts}


def watch_status(status_addr: str, interval: float) -> None:
    """Redraw the status until Ctrl-C or SIGTERM."""
    import threading

    from rich.live import Live

    from kgsupervisor.ops import render
    meter = render.RateMeter()
    # A flag, not KeyboardInterrupt: an exception raised at a random point could land while
    # rich's refresh thread waits on a lock the main thread holds, and the exit would hang.
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        """Only set the flag; the loop below notices it within one wait."""
        stop.set()

    def view():
        return render.status_view(status_snapshot(status_addr), meter)
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Live(view(), refresh_per_second=4, screen=False) as live:
            while not stop.wait(interval):
                live.update(view())
    finally:
        # Run in-process (a CliRunner, a test), a later Ctrl-C must not just set a dead flag.
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command()
@status_addr_option
@click.option("--json", "as_json", is_flag=True, help="Print check_worker_health() as JSON.")
def health(status_addr: str, as_json: bool) -> None:
    """Exit 0 when the supervisor's workers are healthy, 1 when not, 2 when it cannot be reached."""
    try:
        code, body = fetch_document(status_addr, "/health", HEALTH_KEYS)
    except (NotReachable, ConfigError) as exc:  # a bad --status-addr is a usage error, not ill health
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except KGSupervisorError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(body))
    else:
        click.echo(f"{'healthy' if code == 200 else 'unhealthy'}: "
                   f"{body['healthy_workers']}/{body['total_workers']} workers running")
    sys.exit(0 if code == 200 else 1)


COMMANDS = (status, health)
