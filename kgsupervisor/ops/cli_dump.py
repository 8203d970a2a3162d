"""`kgsupervisor dump`: where each worker of a running supervisor is, as a Python stack."""
from __future__ import annotations

import dataclasses
from typing import Any

import click
import psutil

from kgsupervisor.errors import ConfigError, KGSupervisorError
from kgsupervisor.ops.cli_options import status_addr_option
from kgsupervisor.ops.statusclient import HEALTH_KEYS, fetch_document
from kgsupervisor.pool.pidfile import running_pid

WORKER_NAME = "kgs-worker-"  # the process name a worker gives itself (worker.main)


@dataclasses.dataclass(frozen=True)
class WorkerView:
    """A worker as `dump` shows it: its number, its pid, and what it holds."""

    worker_id: int
    pid: int
    document: str


@click.command()
@click.option("--pidfile", envvar="KG_PIDFILE", metavar="FILE",
              help="Find the supervisor through its pidfile [KG_PIDFILE]; else through --status-addr.")
@status_addr_option
def dump(pidfile: str | None, status_addr: str) -> None:
    """Print the Python stack of every worker of a running supervisor, and the document each holds."""
    from kgsupervisor.pool.stacks import capture_stack  # the worker's imports: only this command needs them
    workers = find_workers(pidfile, status_addr)
    if not workers:
        click.echo("the supervisor has no running worker")
    for worker in workers:
        captured = capture_stack(worker.pid)
        click.echo(f"worker {worker.worker_id} (pid {worker.pid}) {worker.document}; "
                   f"its stack ({captured.source}):")
        click.echo(captured.text + "\n")


def find_workers(pidfile: str | None, status_addr: str) -> list[WorkerView]:
    """The supervisor's workers on this host, by worker number: the children of the pidfile's
    process, or those its status endpoint lists; with the documents the endpoint reports."""
    details = worker_details(status_addr, required=pidfile is None)
    if pidfile:
        pids = children_named(running_pid(pidfile), WORKER_NAME)
    else:
        pids = {pid for pid in details if process_named(pid, WORKER_NAME)}
        if details and not pids:
            raise KGSupervisorError(f"none of the workers of the supervisor on {status_addr} (pids "
                                    f"{', '.join(map(str, sorted(details)))}) runs on this host")
    views = [WorkerView(worker_number(pid, details), pid, held_document(details.get(pid)))
             for pid in pids]
    return sorted(views, key=lambda v: (v.worker_id, v.pid))


def worker_details(status_addr: str, required: bool) -> dict[int, dict[str, Any]]:
    """pid -> worker_details entry of the status endpoint's /health; {} when it cannot be asked
    and the workers are known otherwise (`required` False)."""
    try:
        _, health = fetch_document(status_addr, "/health", HEALTH_KEYS)
    except ConfigError:
        raise  # a bad --status-addr: a usage error
    except KGSupervisorError as exc:  # nothing answers there, or not a supervisor that answers
        if required:  # then no supervisor to dump: a plain failure (exit 1)
            raise KGSupervisorError(str(exc)) from None
        return {}
    return {d["pid"]: d for d in health["worker_details"] if d.get("pid") and d.get("running")}


def held_document(detail: dict[str, Any] | None) -> str:
    """What the worker holds, as its status entry says."""
    if detail is None:
        return "document unknown (not listed by the status endpoint)"
    held = detail.get("current_content_id")
    return f"holding content_id {held}" if held is not None else "holding no document"


def worker_number(pid: int, details: dict[int, dict[str, Any]]) -> int:
    """The worker's slot number: from its status entry, else from its process name."""
    if pid in details:
        return int(details[pid]["worker_id"])
    try:
        return int(psutil.Process(pid).name().removeprefix(WORKER_NAME))
    except (psutil.Error, ValueError):
        return -1


def children_named(pid: int, prefix: str) -> set[int]:
    """The live children of `pid` whose process name starts with `prefix`."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return set()
    return {child.pid for child in children if process_named(child.pid, prefix)}


def process_named(pid: int, prefix: str) -> bool:
    """`pid` is a live process (not a zombie) of this host whose name starts with `prefix`."""
    try:
        process = psutil.Process(pid)
        return process.name().startswith(prefix) and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


COMMANDS = (dump,)
