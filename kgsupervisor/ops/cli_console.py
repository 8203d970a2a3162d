"""`kgsupervisor console`: the operator console on its own, over the database alone (an ops host
with no supervisor): hosts, queue, charts, documents, failures and the audit log; no pool actions."""
from __future__ import annotations

import signal
import threading
from contextlib import closing
from typing import TYPE_CHECKING

import click

from kgsupervisor.errors import ConfigError

if TYPE_CHECKING:
    from kgsupervisor.config import Settings
    from kgsupervisor.ops.console.settings import ConsoleSettings

DEFAULT_BIND = "127.0.0.1:9189"
CONSOLE_IDENT = "kgsupervisor-console"


def bind_address(text: str) -> tuple[str, int]:
    """--bind as (host, port); a one-line ConfigError for anything else (`off` included)."""
    from kgsupervisor.addresses import addr_problem, parse_addr
    problem = addr_problem(text)
    parsed = None if problem else parse_addr(text)
    if parsed is None:
        raise ConfigError("--bind", text, problem or "HOST:PORT, e.g. 127.0.0.1:9189")
    return parsed


@click.command()
@click.option("--db", "db_path", envvar="KG_DB_PATH", metavar="PATH|URL",
              help="SQLite database, or a postgresql:// URL [KG_DB_PATH].")
@click.option("--bind", default=DEFAULT_BIND, show_default=True, metavar="HOST:PORT",
              help="Where to listen; beyond loopback it needs KG_CONSOLE_TOKEN, and every page a login.")
@click.option("--config", "config_file", metavar="FILE",
              help="TOML config file (console_token, lease_seconds, log_format, log_file).")
def console(db_path: str | None, bind: str, config_file: str | None) -> None:
    """Serve the operator console of the database at --db until Ctrl-C or SIGTERM.

    \b
    The token comes from KG_CONSOLE_TOKEN or KG_CONSOLE_TOKEN_FILE (or the config file): on
    loopback, reading needs no login and every action one; beyond it, every page needs one.
    """
    from kgsupervisor import config
    from kgsupervisor.ops.cli_queue import database_errors
    from kgsupervisor.ops.console.settings import console_settings
    from kgsupervisor.store import backend
    settings, _ = config.load({"db_path": db_path}, config_file=config_file)
    target = config.require_db(settings)
    addr = bind_address(bind)
    chosen = console_settings(settings, addr)  # no token beyond loopback: one line, here
    with database_errors(target), closing(backend.open_database(target)):
        pass
    setup_logging(settings)
    serve(chosen, addr)


def setup_logging(settings: Settings) -> None:
    """Logs as configured, every secret of the configuration (the token too) masked."""
    from kgsupervisor import logs
    from kgsupervisor.masking import Mask, secrets_of
    from kgsupervisor.procname import mask_command_line
    secrets = secrets_of(settings)
    logs.setup(settings.log_format, secrets=secrets, path=settings.log_file)
    mask_command_line(Mask(secrets))


def serve(chosen: ConsoleSettings, addr: tuple[str, int]) -> None:
    """Listen at `addr` and serve the console until SIGTERM or SIGINT, then exit 0."""
    import logging

    from kgsupervisor.logs import host_port
    from kgsupervisor.ops.console.app import create_app
    from kgsupervisor.ops.statusd import WSGIServer
    from kgsupervisor.ops.statusd import bind as listen
    sock = listen(addr, "console address", "choose another with --bind")
    app = create_app(chosen)
    server = WSGIServer(sock, app, CONSOLE_IDENT)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    app.extensions["kgsupervisor"].start()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True)
    thread.start()
    logging.getLogger("kgsupervisor.console").info(
        "console on http://%s/ (%s)", host_port(*server.server_address), chosen.access())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.server_close()
        app.extensions["kgsupervisor"].stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


COMMANDS = (console,)
