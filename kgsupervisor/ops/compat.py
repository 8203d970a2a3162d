"""The asyncio KG manager's Python API, call for call, on top of ops/api.py: migrating is a
one-line import change (`from kgsupervisor.compat import start_kg_workers, ...`)."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any

from kgsupervisor import config
from kgsupervisor.errors import ConfigError, KGSupervisorError
from kgsupervisor.ops import api
from kgsupervisor.pool.reload import check_startable

log = logging.getLogger("kgsupervisor.compat")

__all__ = ["KGWorkerManager", "get_kg_manager", "start_kg_workers", "stop_kg_workers", "get_worker_stats"]

DB_MANAGER_EXPECTED = "an object with a db_path attribute, a database path or a postgresql:// URL"
# The keyword arguments the upstream's calls carry; any others given to kgsupervisor's own
# start_kg_workers earlier are kept across a restart.
OWN_FLAGS = ("db_path", "num_workers", "poll_interval")
RESTART_TIMEOUT = 30.0

# Two starts at once (two tasks of one event loop, each in its own thread) must not fork two
# supervisors, nor a stop slip between a restart's stop and start.
_changing = threading.Lock()


def database_of(db_manager: Any) -> str:
    """The database a db_manager names: its db_path, a path, or a postgresql:// URL."""
    path = _path_or_url(db_manager)
    if path is not None:
        return path
    if hasattr(db_manager, "db_path"):
        raise ConfigError("db_manager.db_path", type(db_manager.db_path).__name__,
                          "a database path or a postgresql:// URL")
    # The type's name only: the object may hold a password.
    raise ConfigError("db_manager", type(db_manager).__name__, DB_MANAGER_EXPECTED)


def _path_or_url(value: Any) -> str | None:
    """`value` (or its db_path) as a str path or URL, else None."""
    for candidate in (value, getattr(value, "db_path", None)):
        if isinstance(candidate, (str, os.PathLike)):
            path = os.fspath(candidate)
            if isinstance(path, str):
                return path
    return None


def same_database(wanted: str, running: str | None) -> bool:
    """Whether two db_path values name one database (a file by any path to it, or one URL)."""
    if running is None:
        return False
    if "://" in wanted or "://" in running:
        return wanted == running
    return os.path.realpath(wanted) == os.path.realpath(running)


def _other_flags(manager: api.KGWorkerManager) -> dict[str, Any]:
    """The keyword arguments of an earlier start beyond the upstream's three."""
    return {name: value for name, value in manager.flags.items() if name not in OWN_FLAGS}


def _start(db_path: str, num_workers: int, poll_interval: float) -> bool:
    """Start the API's manager unless it runs; whether this call started it."""
    with _changing:
        if api.get_kg_manager().is_running:
            return False
        api.start_kg_workers(db_path, num_workers, poll_interval)
        return True


def _stop() -> None:
    """Drain and stop the API's manager, if it runs."""
    with _changing:
        api.stop_kg_workers()


def _restart(db_path: str, poll_interval: float) -> None:
    """The same database: a rolling reload; another one: stop, then start there with as many workers."""
    with _changing:
        manager = api.get_kg_manager()
        flags = {**_other_flags(manager), "db_path": db_path, "num_workers": manager.settings.num_workers,
                 "poll_interval": poll_interval}
        if manager.is_running and same_database(db_path, manager.settings.db_path):
            _reload(manager, {**manager.flags, "poll_interval": poll_interval})
            return
        # Checked before the running workers stop: a bad database leaves them running.
        check_startable(config.load(flags, os.environ)[0])
        manager.stop()
        api.start_kg_workers(**flags)


def _reload(manager: api.KGWorkerManager, flags: dict[str, Any]) -> None:
    """SIGHUP with the new flags, then wait until a new worker runs in every slot."""
    old = {d["pid"] for d in manager.check_worker_health()["worker_details"]}
    manager.restart(flags)
    deadline = time.monotonic() + RESTART_TIMEOUT
    while not _all_new(manager.check_worker_health(), old):
        if not manager.is_running:
            raise KGSupervisorError(f"the supervisor exited during the restart ({manager.process.exitcode}); "
                                    "see its log")
        if time.monotonic() > deadline:
            raise KGSupervisorError(f"no new workers within {RESTART_TIMEOUT:g}s of the restart; see the log")
        time.sleep(0.05)


def _all_new(health: dict[str, Any], old: set[int]) -> bool:
    """Every slot runs a healthy worker that is none of `old`."""
    details = health["worker_details"]
    pids = {d["pid"] for d in details}
    return bool(details) and health["healthy_workers"] == len(details) and not pids & old


class KGWorkerManager:
    """The asyncio manager's handle, bound to the API's one process-wide manager: every
    instance speaks for the same supervisor. Blocking calls run off the event loop."""

    @property
    def is_running(self) -> bool:
        """Whether the supervisor runs (the upstream's attribute)."""
        return api.get_kg_manager().is_running

    async def start_workers(self, db_manager: Any, num_workers: int = 1, poll_interval: float = 5.0) -> None:
        """Fork the supervisor and its workers; if they run already, warn and return (as upstream)."""
        db_path = database_of(db_manager)
        if not await asyncio.to_thread(_start, db_path, num_workers, poll_interval):
            log.warning("KG workers already running")

    async def stop_workers(self) -> None:
        """Drain and stop; nothing to do before a start."""
        await asyncio.to_thread(_stop)

    async def restart_workers(self, db_manager: Any, poll_interval: float = 5.0) -> None:
        """Restart every worker, new before old on the same database; not running: start."""
        await asyncio.to_thread(_restart, database_of(db_manager), poll_interval)

    async def check_worker_health(self) -> dict[str, Any]:
        """The API's check_worker_health() (CONTRACT §7)."""
        return await asyncio.to_thread(lambda: api.get_kg_manager().check_worker_health())

    def get_aggregate_stats(self) -> dict[str, Any]:
        """The API's get_worker_stats() (CONTRACT §7)."""
        return api.get_kg_manager().get_aggregate_stats()


def get_kg_manager() -> KGWorkerManager:
    """A handle on the process-wide manager (one state however many handles)."""
    return KGWorkerManager()


async def start_kg_workers(db_manager: Any, num_workers: int = 1,
                           poll_interval: float = 5.0) -> KGWorkerManager:
    """Start the workers on db_manager's database; other settings from the environment (KG_*)."""
    manager = get_kg_manager()
    await manager.start_workers(db_manager, num_workers, poll_interval)
    return manager


async def stop_kg_workers() -> None:
    """Drain and stop the workers; nothing to do before a start."""
    await get_kg_manager().stop_workers()


def get_worker_stats() -> dict[str, Any]:
    """Totals, KG service status and queue size (CONTRACT §7); sync, as upstream."""
    return get_kg_manager().get_aggregate_stats()
