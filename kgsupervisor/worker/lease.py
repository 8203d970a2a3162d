"""A worker thread that keeps in-flight leases alive, the heartbeat fresh, and watches the parent."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import closing

from kgsupervisor.lifeline import parent_gone
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.backend import connect_to

log = logging.getLogger("kgsupervisor.lease")

BEAT_INTERVAL = 1.0


class LeaseKeeper(threading.Thread):
    """Beats every second and renews every held token every `lease_seconds / 3`.

    It runs beside the main thread, so a 30-minute request keeps its claim whatever the main
    thread does. The beat publishes the main thread's progress (`beat`, see counters.Progress):
    a request, parked in its bounded wait, keeps the heartbeat fresh too, while a main thread
    spinning in Python lets it age and is killed as hung. A SIGSTOP or a stuck C call holding
    the GIL stops the beats altogether, as it should. It opens its own connection for each
    renewal: statements on the worker's connection would otherwise land inside the worker's
    open write-back transaction.
    """

    def __init__(self, db_path: str, owner: str, lease_seconds: float, beat: Callable[[], None],
                 parent_pid: int | None = None, stop_claiming: Callable[[], None] | None = None) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.db_path = db_path
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.renew_every = max(0.2, lease_seconds / 3)
        self.parent_pid = parent_pid
        self._beat = beat
        self._stop_claiming = stop_claiming or (lambda: None)
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
        last_renew = time.monotonic()
        while not self._stop.wait(min(BEAT_INTERVAL, self.renew_every)):
            if parent_gone(self.parent_pid):
                self.leave_as_orphan()
            self._beat()
            if time.monotonic() - last_renew >= self.renew_every:
                last_renew = time.monotonic()
                self.renew_all()

    def renew_all(self) -> None:
        """Extend every held lease, on a connection open only meanwhile.

        A connection kept open would pin SQLite's read-only view of a file opened while it could
        not be written (every connection of the process to it stays read-only), and the worker's
        own reconnect could never recover; one open every lease/3 costs well under a millisecond.
        """
        with self._lock:
            tokens = list(self._tokens)
        if not tokens:
            return
        try:
            with closing(connect_to(self.db_path)) as conn:  # the worker checked the schema
                queue = queue_for(conn)
                for token in tokens:
                    if queue.extend(token, self.lease_seconds, time.time()) == 0:
                        log.debug("lease %s holds no rows any more", token)
        except Exception as exc:  # a locked or read-only database now is retried next interval
            log.warning("could not renew lease (%s); retrying in %.1fs", exc, self.renew_every)

    def leave_as_orphan(self) -> None:
        """The supervisor is gone: give every claim back and exit now, not after a long request.

        The release waits for the main thread's write-back, if one is under way, to commit:
        completed rows hold no lease, so only unfinished ones go back to pending.
        """
        released = 0
        # First make sure the main thread claims nothing more, then give back what it holds.
        self._stop_claiming()
        try:
            with closing(connect_to(self.db_path)) as conn:
                released = queue_for(conn).release_owner(self.owner)
        finally:
            log.warning("supervisor (pid %d) is gone; released %d claim(s) and exiting",
                        self.parent_pid, released)
            logging.shutdown()
            os._exit(0)
