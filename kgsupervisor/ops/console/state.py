"""What the console's pages share: its settings, a database connection per serving thread, the
depth samples and (inside `run`) the local pool."""
from __future__ import annotations

import threading
import time
from typing import Any

from flask import current_app

from kgsupervisor.ops.console.samples import DepthSamples, Fetch, LocalPool
from kgsupervisor.ops.console.settings import ConsoleSettings
from kgsupervisor.store import backend


class Connections:
    """One database connection per serving thread, opened at its first use (after the fork) and
    dropped after a database error, so the next request opens a fresh one."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._local = threading.local()
        self._opened: list[Any] = []
        self._lock = threading.Lock()

    def get(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = backend.connect_to(self.target)
            self._local.conn = conn
            with self._lock:
                self._opened.append(conn)
        return conn

    def drop(self) -> None:
        """Close this thread's connection (it failed); the next get() opens another."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._opened = [c for c in self._opened if c is not conn]
            _close_quietly(conn)

    def close_all(self) -> None:
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            _close_quietly(conn)


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # a broken connection has nothing left to close
        pass


class ConsoleState:
    """What the pages share: the settings, the connections, the depth samples and (inside `run`)
    the local pool."""

    def __init__(self, settings: ConsoleSettings, fetch: Fetch | None) -> None:
        self.settings = settings
        self.connections = Connections(settings.db_target)
        pid = settings.supervisor_pid
        self.pool = LocalPool(fetch, pid) if fetch is not None and pid is not None else None
        self.samples = DepthSamples(settings.db_target)

    def start(self) -> None:
        """Start sampling the queue's depth."""
        self.samples.start()

    def stop(self) -> None:
        self.samples.stop()
        self.connections.close_all()


def state() -> ConsoleState:
    return current_app.extensions["kgsupervisor"]


def conn() -> Any:
    """This thread's database connection."""
    return state().connections.get()


def now() -> float:
    return time.time()
