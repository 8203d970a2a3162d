"""The Python API of CONTRACT §7 (names kept from the asyncio KG manager it replaces)."""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from kgsupervisor import config, logs
from kgsupervisor.config import Settings
from kgsupervisor.errors import ConfigError, KGSupervisorError
from kgsupervisor.masking import Mask, secrets_of
from kgsupervisor.ops.reporting import Reporter
from kgsupervisor.pool.reload import check_startable, reloader
from kgsupervisor.pool.supervisor import Supervisor
from kgsupervisor.procname import mask_command_line
from kgsupervisor.worker.stats import kg_service_status

log = logging.getLogger("kgsupervisor.api")

# The one module-level singleton of kgsupervisor, as the replaced API had it.
_manager: "KGWorkerManager | None" = None
_manager_lock = threading.Lock()


def _supervisor_main(settings: Settings, flags: Mapping[str, Any], control: Any, host_pid: int,
                     updates: Any) -> None:
    """Entry point of the forked supervisor process; a reload rebuilds settings as `run` does,
    the API's keyword arguments (the newest `updates` sent) standing for its flags."""
    # The host's log handlers are this process's own copies now: mask our secrets in all they
    # write from here and from the workers forked from here.
    secrets = secrets_of(settings)
    logs.mask_secrets(secrets)
    mask_command_line(Mask(secrets))
    supervisor = Supervisor(settings, Reporter(controls=[control]), parent_pid=host_pid,
                            reload_settings=_following(flags, updates))
    raise SystemExit(supervisor.run())


def _following(flags: Mapping[str, Any], updates: Any) -> Callable[[], Settings]:
    """reloader(flags), the flags replaced first by the newest a handle's restart(flags) sent."""
    current = [dict(flags)]

    def reload() -> Settings:
        while updates.poll():
            current[0] = updates.recv()
        return reloader(current[0])()
    return reload


def fork_from_a_plain_thread(process: multiprocessing.process.BaseProcess) -> None:
    """Start `process` from a thread of our own. The thread that forks is the child's main
    thread; when it is a ThreadPoolExecutor's worker (asyncio.to_thread, run_in_executor: how
    an asyncio host calls us), the executor's exit hook, inherited by every process forked from
    the child, joins that very thread at interpreter shutdown, fails, and turns every clean
    worker exit into status 1."""
    failure: list[BaseException] = []

    def start() -> None:
        try:
            process.start()
        except BaseException as exc:  # raised again in the caller's thread below
            failure.append(exc)
    forker = threading.Thread(target=start, name="kgsupervisor-fork")
    forker.start()
    forker.join()
    if failure:
        raise failure[0]


class KGWorkerManager:
    """A handle on a supervisor process forked from this one; every method is thread-safe."""

    def __init__(self, settings: Settings, flags: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        # The keyword arguments of start_kg_workers: they win over the environment on reload too.
        self.flags = dict(flags or {})
        self.process: multiprocessing.process.BaseProcess | None = None
        self._control: Any = None
        self._updates: Any = None  # the write end of the pipe restart(flags) sends new flags on
        self._lock = threading.Lock()

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def start(self, ready_timeout: float = 30.0) -> "KGWorkerManager":
        """Fork the supervisor (which forks the workers) and wait until it reports in."""
        if self.is_running:
            return self
        check_startable(self.settings)  # a bad token or database is this caller's error, not a child's
        ctx = multiprocessing.get_context("fork")
        mine, theirs = ctx.Pipe()
        updates, self._updates = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_supervisor_main, name="kgsupervisor", daemon=False,
                                   args=(self.settings, self.flags, theirs, os.getpid(), updates))
        fork_from_a_plain_thread(self.process)
        theirs.close()
        updates.close()
        self._control = mine
        atexit.register(self.stop)
        deadline = time.monotonic() + ready_timeout
        while not self.check_worker_health().get("healthy_workers"):
            if not self.is_running:
                raise KGSupervisorError(f"the supervisor exited at start ({self.process.exitcode}); see its log")
            if time.monotonic() > deadline:
                raise KGSupervisorError(f"no worker checked in within {ready_timeout:g}s")
            time.sleep(0.05)
        return self

    def _ask(self, what: str) -> dict[str, Any] | None:
        if not self.is_running or self._control is None:
            return None
        with self._lock:
            try:
                self._control.send(what)
                if self._control.poll(10):
                    return self._control.recv()
            except (EOFError, OSError):
                return None
        return None

    def check_worker_health(self) -> dict[str, Any]:
        """manager_running, total/healthy/unhealthy workers and worker_details (CONTRACT §7)."""
        return self._ask("health") or {"manager_running": False, "total_workers": 0, "healthy_workers": 0,
                                       "unhealthy_workers": 0, "worker_details": []}

    def get_aggregate_stats(self) -> dict[str, Any]:
        """Totals over every worker that ran, KG service status and queue size (CONTRACT §7)."""
        stats = self._ask("stats")
        if stats is not None:
            return stats
        return {"total_workers": 0, "manager_running": False, "manager_started_at": None,
                "workers_restarted": 0, "last_health_check": None, "total_processed": 0,
                "total_success": 0, "total_failed": 0, "kg_service_enabled": self.settings.service_enabled,
                "kg_service_status": kg_service_status([], self.settings.service_url, self.settings.service_enabled),
                "queue_size": {}}

    def restart(self, flags: Mapping[str, Any] | None = None) -> None:
        """Reload the configuration and restart every worker, new before old (SIGHUP to the supervisor);
        `flags`, checked here first, replace the keyword arguments of start_kg_workers."""
        if not self.is_running:
            return
        if flags is not None:
            settings = config.load(flags, os.environ)[0]
            check_startable(settings)
            self.settings, self.flags = settings, dict(flags)
            self._updates.send(self.flags)
        os.kill(self.process.pid, signal.SIGHUP)

    def stop(self, timeout: float | None = None) -> None:
        """Drain and stop; waits up to the drain timeout, then kills (claims are released either way)."""
        if not self.is_running:
            return
        timeout = self.settings.drain_timeout + 10 if timeout is None else timeout
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.join(timeout)
        if self.process.is_alive():
            log.error("supervisor pid %d did not stop within %.0fs; killing it", self.process.pid, timeout)
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(5)


def get_kg_manager() -> KGWorkerManager:
    """The process-wide manager (built from the environment if none was started)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = KGWorkerManager(config.load({}, os.environ)[0])
        return _manager


def start_kg_workers(db_path: str, num_workers: int = 2, poll_interval: float = 5.0,
                     **settings: Any) -> KGWorkerManager:
    """Fork the supervisor and its workers; returns the manager. Keyword arguments win over the
    environment (KG_*), at start and on every reload, as the flags of `run` do."""
    global _manager
    unknown = sorted(set(settings) - set(config.FIELDS))
    if unknown:
        # The name only: a misspelt token= must not put the token in an error message.
        raise ConfigError("start_kg_workers keyword", unknown[0], f"a setting name ({', '.join(config.FIELDS)})")
    values = {"db_path": db_path, "num_workers": num_workers, "poll_interval": poll_interval, **settings}
    with _manager_lock:
        if _manager is not None and _manager.is_running:
            return _manager
        _manager = KGWorkerManager(config.load(values, os.environ)[0], values)
    return _manager.start()


def stop_kg_workers() -> None:
    """Drain and stop the workers started by start_kg_workers()."""
    if _manager is not None:
        _manager.stop()


def restart_kg_workers() -> None:
    """Reload (keyword arguments kept, environment read again) and restart every worker."""
    get_kg_manager().restart()


def get_worker_stats() -> dict[str, Any]:
    return get_kg_manager().get_aggregate_stats()


async def start_kg_workers_async(db_path: str, num_workers: int = 2, poll_interval: float = 5.0,
                                 **settings: Any) -> KGWorkerManager:
    """start_kg_workers() for an asyncio host (a FastAPI lifespan), off the event loop."""
    return await asyncio.to_thread(start_kg_workers, db_path, num_workers, poll_interval, **settings)


async def stop_kg_workers_async() -> None:
    await asyncio.to_thread(stop_kg_workers)


async def restart_kg_workers_async() -> None:
    await asyncio.to_thread(restart_kg_workers)


async def get_worker_stats_async() -> dict[str, Any]:
    return await asyncio.to_thread(get_worker_stats)


async def check_worker_health_async() -> dict[str, Any]:
    return await asyncio.to_thread(lambda: get_kg_manager().check_worker_health())
