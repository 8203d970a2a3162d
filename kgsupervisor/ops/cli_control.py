"""The control commands of `kgsupervisor`: pause and resume claiming, through the database."""
from __future__ import annotations

import os
import socket
import time
from contextlib import closing

import click

from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.cli_options import db_option
from kgsupervisor.ops.cli_queue import database_errors
from kgsupervisor.queue import control
from kgsupervisor.store import backend


def command_owner() -> str:
    """Who set the pause: this command's host and pid, as lease owners are named."""
    return f"{socket.gethostname()}:{os.getpid()}"


def describe_pause(pause: control.Pause) -> str:
    """`since 2024-05-01T10:00:00+00:00 by host:pid (reason: ...)`"""
    reason = f" (reason: {pause.reason})" if pause.reason else ""
    return f"since {control.iso_time(pause.since)} by {pause.set_by or '?'}{reason}"


@click.command()
@db_option
@click.option("--reason", metavar="TEXT", help="Why, as status, /stats and systemd show it.")
def pause(db_path: str, reason: str | None) -> None:
    """Stop every worker of every host from claiming: each finishes what it holds and waits.

    \b
    The flag is in the database: it outlasts restarts until `kgsupervisor resume`. Pausing
    again keeps the first time and who paused; a new --reason replaces the old one.
    """
    if reason is not None and len(reason) > control.MAX_REASON:
        raise ConfigError("--reason", f"{reason[:40]}...", f"at most {control.MAX_REASON} characters")
    with database_errors(db_path), closing(backend.open_database(db_path)) as conn:
        state, added = control.pause(conn, reason, command_owner(), time.time())
    verb = "paused" if added else "already paused"
    click.echo(f"{verb} {describe_pause(state)}: workers on every host finish what they hold and claim "
               "nothing until `kgsupervisor resume`")


@click.command()
@db_option
def resume(db_path: str) -> None:
    """Let workers claim again, on every host at once."""
    with database_errors(db_path), closing(backend.open_database(db_path)) as conn:
        lifted = control.resume(conn)
    if lifted is None:
        click.echo("not paused: workers are claiming already")
    else:
        click.echo(f"resumed: workers claim again (paused {describe_pause(lifted)})")


COMMANDS = (pause, resume)
