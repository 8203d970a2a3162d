"""A worker thread that keeps the leases of in-flight claims alive and the worker's heartbeat fresh."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .db import connect
from .queue import SQLiteQueue

log = logging.getLogger("kgsupervisor.lease")


class LeaseKeeper(threading.Thread):
    """Renews every held token every `lease_seconds / 3`, so a 30-minute request keeps its claim.

    It has its own connection: statements on the worker's connection would otherwise land
    inside the worker's open write-back transaction.
    """

    def __init__(self, db_path: str, lease_seconds: float, beat: Callable[[], None],
                 interval: float | None = None) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.db_path = db_path
        self.lease_seconds = lease_seconds
        self.interval = interval or max(0.2, min(lease_seconds / 3, 5.0))
        self._beat = beat
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def hold(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    def drop(self, token: str) -> None:
        with self._lock:
            self._tokens.discard(token)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        conn = connect(self.db_path)
        queue = SQLiteQueue(conn)
        try:
            while not self._stop.wait(self.interval):
                self._beat()
                self.renew_all(queue)
        finally:
            conn.close()

    def renew_all(self, queue: SQLiteQueue) -> None:
        with self._lock:
            tokens = list(self._tokens)
        for token in tokens:
            try:
                if queue.extend(token, self.lease_seconds, time.time()) == 0:
                    log.debug("lease %s holds no rows any more", token)
            except Exception as exc:  # a locked database now is retried next interval
                log.warning("could not renew lease (%s); retrying in %.1fs", exc, self.interval)
