"""The shared stats dict: a multiprocessing Manager the supervisor owns, watches and recreates."""
from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.context import BaseContext
from multiprocessing.managers import SyncManager
from typing import Any

from kgsupervisor.lifeline import exit_with_parent
from kgsupervisor.procname import become_helper_child
from kgsupervisor.worker.stats import iso_now

log = logging.getLogger("kgsupervisor.manager")


def _manager_process_init(parent_pid: int, close_fds: list[int], name: str = "kgs-stats") -> None:
    """Runs in a Manager's server process: survive Ctrl-C, never outlive the supervisor."""
    become_helper_child(name, parent_pid, close_fds)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor shuts it down by its pipe
    threading.Thread(target=exit_with_parent, args=(parent_pid,), daemon=True).start()


def manager_process_init(name: str, parent_pid: int, close_fds: list[int]) -> Callable[[], None]:
    """The start of another Manager process of the supervisor's (the rate budgets' keeper)."""
    return lambda: _manager_process_init(parent_pid, close_fds, name)


class StatsManager:
    """Owns the Manager process and its dict; every call is best-effort and never raises."""

    def __init__(self, ctx: BaseContext, close_fds: list[int] | None = None) -> None:
        self.ctx = ctx
        self.close_fds = close_fds if close_fds is not None else []  # read at every (re)start
        self.restarts = 0
        self.start()

    def start(self) -> None:
        self.manager = SyncManager(ctx=self.ctx)
        self.manager.start(_manager_process_init, (os.getpid(), list(self.close_fds)))
        self.map = self.manager.dict()
        self.started_at = iso_now()

    @property
    def alive(self) -> bool:
        process = getattr(self.manager, "_process", None)
        return process is not None and process.is_alive()

    def ensure_running(self, on_restart: Callable[[], None]) -> None:
        """If the Manager died, start a new one and tell the caller (workers hold the old proxy)."""
        if self.alive:
            return
        log.error("the stats Manager process died; starting a new one (totals are kept in shared memory)")
        self.restarts += 1
        try:
            self.manager.shutdown()
        except Exception:
            pass
        self.start()
        on_restart()

    def snapshot(self) -> dict[Any, Any]:
        try:
            return self.map.copy()
        except Exception:
            return {}

    def shutdown(self) -> None:
        try:
            self.manager.shutdown()
        except Exception:
            pass
