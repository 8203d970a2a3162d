"""The click options and parameter types that several `kgsupervisor` commands share."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan, which passes every comparison a range check makes."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not a number.", param, ctx)
        return number


def db_option(f: Callable) -> Callable:
    """The required --db of the queue commands."""
    return click.option("--db", "db_path", envvar="KG_DB_PATH", metavar="PATH|URL", required=True,
                        help="SQLite database, or a postgresql:// URL (env KG_DB_PATH).")(f)


def settings_options(f: Callable) -> Callable:
    """The options shared by `worker` and `run`; unset ones fall back to env, file, default."""
    options = [
        click.option("--config", "config_file", metavar="FILE", help="TOML config file."),
        click.option("--db", "db_path", metavar="PATH|URL", help="SQLite database or postgresql:// URL [KG_DB_PATH]."),
        click.option("--service-url", help="KG service base URL [KG_SERVICE_URL]."),
        click.option("--service-timeout", type=float, help="Read timeout of one ingest, seconds, at most 86400 [KG_SERVICE_TIMEOUT]."),
        click.option("--poll-interval", type=float, help="Seconds an idle worker waits, at most 3600 [KG_POLL_INTERVAL]."),
        click.option("--batch-size", type=int, help="Rows one claim takes at most [KG_BATCH_SIZE]."),
        click.option("--max-attempts", type=int, help="Attempts before a document fails [KG_MAX_ATTEMPTS]."),
        click.option("--adaptive", type=click.Choice(["on", "off"]),
                     help="Match each KG endpoint's in-flight limit to its capacity, or not [KG_ADAPTIVE]."),
        click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON [KG_LOG_FORMAT]."),
        click.option("--log-file", metavar="FILE", help="Log to FILE, reopened on SIGUSR1 [KG_LOG_FILE]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def pidfile_option(f: Callable) -> Callable:
    """The required --pidfile of `reload` and `stop`."""
    return click.option("--pidfile", envvar="KG_PIDFILE", required=True, metavar="FILE",
                        help="Pidfile the supervisor was started with [KG_PIDFILE].")(f)


def status_addr_option(f: Callable) -> Callable:
    """The --status-addr of `status` and `health`."""
    return click.option("--status-addr", envvar="KG_STATUS_ADDR", default="127.0.0.1:9188", show_default=True,
                        metavar="HOST:PORT", help="Where the supervisor serves its status [KG_STATUS_ADDR].")(f)
