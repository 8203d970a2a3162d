"""The `kgsupervisor` command: a thin click layer over the library; here its group and process commands."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, TextIO

import click

from kgsupervisor import config, logs
from kgsupervisor.addresses import parse_addr
from kgsupervisor.errors import ConfigError, KGSupervisorError, NotReachable
from kgsupervisor.ops import cli_console, cli_control, cli_dump, cli_history, cli_queue, cli_status
from kgsupervisor.ops.cli_options import FiniteRange, pidfile_option, settings_options
from kgsupervisor.ops.control import signal_supervisor, wait_for_exit
from kgsupervisor.pool.pidfile import Pidfile
from kgsupervisor.states import EXIT_USAGE, OPERATOR_SIGNALS
from kgsupervisor.store import backend

if TYPE_CHECKING:
    from kgsupervisor.kg.devcapacity import CapacityModel

# The supervisor, worker, HTTP client, dev service and rich views are imported by the commands
# that use them: `queue`, `enqueue` and `health` are called from scripts and cron, and each call
# would otherwise pay ~0.3 s of imports it never uses.

# Held from the first instant of `run` until its handlers are in: a stop during start-up then
# drains like any other (exit 0, pidfile removed) instead of killing it with its pidfile left behind.
STARTUP_SIGNALS = OPERATOR_SIGNALS


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


for command in (*cli_queue.COMMANDS, *cli_status.COMMANDS, *cli_history.COMMANDS, *cli_control.COMMANDS,
                *cli_dump.COMMANDS, *cli_console.COMMANDS):
    main.add_command(command)


def load_settings(kwargs: dict[str, Any]) -> tuple[config.Settings, dict[str, str]]:
    """Settings from the command's flags, over the environment, config file and defaults."""
    cli = {k: v for k, v in kwargs.items() if k in config.FIELDS}
    return config.load(cli, config_file=kwargs.get("config_file"))


@main.command()
@settings_options
@click.option("--once", is_flag=True, help="Claim and process one batch, then exit.")
@click.option("--worker-id", type=int, default=0, show_default=True)
def worker(once: bool, worker_id: int, **kwargs: Any) -> None:
    """Run one worker in the foreground (for debugging; production uses `run`)."""
    settings, _ = load_settings(kwargs)
    config.require_db(settings)
    setup_logging(settings)
    from kgsupervisor.worker.kgworker import run_worker
    sys.exit(run_worker(settings, worker_id, once=once))


def setup_logging(settings: config.Settings) -> None:
    """Logs as configured; the configuration's secrets masked there and in our command line."""
    from kgsupervisor.masking import Mask, secrets_of
    from kgsupervisor.procname import mask_command_line
    settings.token()  # a token that cannot be used is a one-line error before anything starts
    secrets = secrets_of(settings)
    logs.setup(settings.log_format, secrets=secrets, path=settings.log_file)
    mask_command_line(Mask(secrets))


@main.command("dev-service")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8088, show_default=True)
@click.option("--latency", type=FiniteRange(0, 3600), default=0.0, show_default=True, help="Seconds added to each ingest.")
@click.option("--fail-rate", type=FiniteRange(0, 1), default=0.0, show_default=True,
              help="Fraction of ingests that answer 500.")
@click.option("--token", envvar="KG_SERVICE_TOKEN", help="Require this bearer token.")
@click.option("--health", type=click.Choice(["healthy", "degraded", "unhealthy"]), default="healthy",
              show_default=True, help="The status GET /health reports.")
@click.option("--not-initialized", is_flag=True,
              help="Act as the real service while its models load: every ingest answers 500.")
@click.option("--capacity", type=click.IntRange(1),
              help="Serve this many ingests at once, as a GPU box would.")
@click.option("--queue-limit", type=click.IntRange(0),
              help="With --capacity: ingests that may wait; beyond, refused at once [default: no limit].")
@click.option("--service-time-per-kchar", type=FiniteRange(0, 3600),
              help="With --capacity: seconds of service per 1,000 characters of chunk text [default: 0.1].")
@click.option("--overload", type=click.Choice(["503", "429"]),
              help="With --queue-limit: the refusal, 503 or 429 with Retry-After [default: 503].")
@click.option("--thrash", is_flag=True,
              help="With --capacity: admit every ingest, all slowing as more than the capacity are in.")
@click.option("--capacity-schedule", metavar="S:C,...",
              help="With --capacity: at S seconds set the capacity to C, e.g. 30:2,60:4.")
@click.option("--request-log", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --capacity: append one JSON line per ingest (arrived, finished, chars, status).")
def dev_service(host: str, port: int, latency: float, fail_rate: float, token: str | None,
                health: str, not_initialized: bool, request_log: str | None, **capacity: Any) -> None:
    """A reference KG service (CONTRACT §3) with deterministic extraction, for demos and tests.
    With --capacity it serves like a GPU box; SIGUSR1 halves the capacity, SIGUSR2 restores it."""
    def ready(bound: int) -> None:
        click.echo(f"dev-service listening on http://{logs.host_port(host, bound)}", err=True)
    model = capacity_model(**capacity)
    if request_log is not None and model is None:
        raise click.UsageError("--request-log needs --capacity")
    if model is not None:
        logs.setup("text", secrets=[token] if token else ())  # for its log line at each capacity change
    if request_log is not None:
        model.request_log = open_request_log(request_log)
    from kgsupervisor.kg import devservice
    try:
        devservice.serve(host, port, latency=latency, fail_rate=fail_rate, token=token, ready=ready,
                         health=health, not_initialized=not_initialized, capacity=model)
    except OSError as exc:
        raise KGSupervisorError(f"cannot listen on {logs.host_port(host, port)}: {exc.strerror}") from None


def open_request_log(path: str) -> TextIO:
    """The dev service's request log, appended to (never truncated), a line at a time."""
    try:
        return open(path, "a", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="'--request-log'") from None


def capacity_model(capacity: int | None, queue_limit: int | None, service_time_per_kchar: float | None,
                   overload: str | None, thrash: bool, capacity_schedule: str | None) -> CapacityModel | None:
    """The dev service's CapacityModel from its options; None without --capacity."""
    given = {"--queue-limit": queue_limit is not None, "--overload": overload is not None,
             "--service-time-per-kchar": service_time_per_kchar is not None, "--thrash": thrash,
             "--capacity-schedule": capacity_schedule is not None}
    if capacity is None:
        if any(given.values()):
            raise click.UsageError(f"{next(k for k, v in given.items() if v)} needs --capacity")
        return None
    if thrash and (given["--queue-limit"] or given["--overload"]):
        raise click.UsageError("--thrash admits every ingest: --queue-limit and --overload do not apply")
    from kgsupervisor.kg import devcapacity
    try:
        schedule = devcapacity.parse_schedule(capacity_schedule) if capacity_schedule else ()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--capacity-schedule'") from None
    if service_time_per_kchar is None:
        service_time_per_kchar = devcapacity.DEFAULT_SERVICE_TIME_PER_KCHAR
    return devcapacity.CapacityModel(capacity, queue_limit=queue_limit,
                                     service_time_per_kchar=service_time_per_kchar,
                                     thrash=thrash, overload=int(overload or 503), schedule=schedule)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold STARTUP_SIGNALS until the supervisor's handlers are in (it unblocks them), and from
    its end until the pidfile is gone; at the very end drop any still pending (they ask for the
    exit under way) and give the caller its signal mask back."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)
        while signal.sigtimedwait(STARTUP_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@main.command()
@settings_options
@click.option("--workers", "num_workers", type=int, help="Worker processes, 1 to 256 [KG_NUM_WORKERS].")
@click.option("--drain-timeout", type=float, help="Seconds in-flight documents get on SIGTERM, at most 86400 [KG_DRAIN_TIMEOUT].")
@click.option("--pidfile", metavar="FILE", help="Write and lock a pidfile [KG_PIDFILE].")
@click.option("--status-addr", metavar="HOST:PORT", help="Status endpoint, or off [KG_STATUS_ADDR; 127.0.0.1:9188].")
@click.option("--exit-when-empty", is_flag=True, help="Drain and exit 0 once nothing is pending or processing.")
@click.option("--print-config", is_flag=True, help="Show every effective setting and its source, then exit.")
@stop_signals_held()
def run(exit_when_empty: bool, print_config: bool, **kwargs: Any) -> None:
    """Run the supervisor in the foreground (what systemd or supervisord start)."""
    settings, sources = load_settings(kwargs)
    if print_config:
        return show_config(settings, sources)
    db_path = config.require_db(settings)
    with closing(backend.open_database(db_path)):  # closed: no connection may cross the fork
        pass
    setup_logging(settings)
    from kgsupervisor.ops.statusd import StatusEndpoint
    status_addr = parse_addr(settings.status_addr)
    # Its console refuses to listen beyond this host without a token: one line, before the pidfile.
    status_server = StatusEndpoint(status_addr, settings) if status_addr else None
    pidfile = Pidfile(settings.pidfile) if settings.pidfile else None
    if pidfile:
        pidfile.acquire()
    from kgsupervisor.ops.reporting import Reporter
    from kgsupervisor.pool.reload import reloader
    from kgsupervisor.pool.supervisor import Supervisor
    flags = {k: v for k, v in kwargs.items() if k in config.FIELDS}
    supervisor = Supervisor(
        settings, Reporter(), exit_when_empty=exit_when_empty, status_server=status_server,
        reload_settings=reloader(flags, kwargs.get("config_file")),
        extra_close_fds=[pidfile.fd] if pidfile else [])
    try:
        status = supervisor.run()
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, STARTUP_SIGNALS)  # a late stop waits for the pidfile
        if pidfile:
            pidfile.release()
    sys.exit(status)


def show_config(settings: config.Settings, sources: dict[str, str]) -> None:
    """`run --print-config`: each setting, its value (secrets hidden), its source and variable."""
    for name, value in settings.masked().items():
        click.echo(f"{name:<26} {value!s:<32} ({sources[name]}; {config.FIELDS[name].metadata['env']})")


@main.command()
@pidfile_option
def reload(pidfile: str) -> None:
    """Send SIGHUP: reload the configuration and restart every worker."""
    pid = signal_supervisor(pidfile, signal.SIGHUP)
    click.echo(f"sent SIGHUP to supervisor pid {pid}")


@main.command()
@pidfile_option
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until it has exited.")
@click.option("--timeout", type=FiniteRange(0, 86400), default=120.0, show_default=True, help="Seconds to wait.")
def stop(pidfile: str, wait: bool, timeout: float) -> None:
    """Send SIGTERM: drain in-flight documents, release the rest, exit."""
    pid = signal_supervisor(pidfile, signal.SIGTERM)
    click.echo(f"sent SIGTERM to supervisor pid {pid}")
    if wait:
        wait_for_exit(pid, timeout)
