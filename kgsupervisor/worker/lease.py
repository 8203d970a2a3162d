"""A worker thread that keeps in-flight leases alive, the heartbeat fresh, and watches the parent."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import closing

from kgsupervisor.lifeline import PARENT_WATCH_EVERY, parent_gone
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.backend import connect_to
from kgsupervisor.worker.doorbell import Doorbell, process_exit_fd, readable

log = logging.getLogger("kgsupervisor.lease")

BEAT_INTERVAL = 1.0  # while the worker holds claims
# While it holds none (idle, paused, waiting for a permit) its heartbeat is at most this old, and
# at most a quarter of KG_HANG_TIMEOUT: an idle worker is parked, not hung, and must look it.
IDLE_BEAT = 5.0


def idle_beat(hang_timeout: float | None) -> float:
    """How often the keeper beats while the worker holds no claim."""
    return BEAT_INTERVAL if not hang_timeout else max(0.05, min(IDLE_BEAT, hang_timeout / 4))


class LeaseKeeper(threading.Thread):
    """Beats, renews every held token every `lease_seconds / 3`, and leaves when the parent dies.

    It runs beside the main thread, so a 30-minute request keeps its claim whatever the main
    thread does. The beat publishes the main thread's progress (`beat`, see counters.Progress):
    a request, parked in its bounded wait, keeps the heartbeat fresh too, while a main thread
    spinning in Python lets it age and is killed as hung. A SIGSTOP or a stuck C call holding
    the GIL stops the beats altogether, as it should. It opens its own connection for each
    renewal: statements on the worker's connection would otherwise land inside the worker's
    open write-back transaction.

    It sleeps until something is due: a beat (every second while claims are held, every
    `idle_beat` otherwise), a renewal, a new claim (`hold` rings), or the parent's exit (a
    pidfd where Linux has one; else a look every second).
    """

    def __init__(self, db_path: str, owner: str, lease_seconds: float, beat: Callable[[], None],
                 parent_pid: int | None = None, stop_claiming: Callable[[], None] | None = None,
                 hang_timeout: float | None = None) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.db_path = db_path
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.renew_every = max(0.2, lease_seconds / 3)
        self.idle_beat = idle_beat(hang_timeout)
        self.parent_pid = parent_pid
        self._beat = beat
        self._stop_claiming = stop_claiming or (lambda: None)
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._held_since = 0.0
        self._bell = Doorbell()
        self.wakeups = 0  # turns of its loop: what an idle worker costs, for the stats and tests

    def hold(self, token: str) -> None:
        with self._lock:
            if not self._tokens:
                self._held_since = time.monotonic()  # the first renewal is a third of a lease from now
            self._tokens.add(token)
        self._bell.ring()  # it may sleep for idle_beat: beats and renewals follow the claim now

    def drop(self, token: str) -> None:
        with self._lock:
            self._tokens.discard(token)

    def stop(self) -> None:
        self._stop.set()
        self._bell.ring()

    def holding(self) -> bool:
        with self._lock:
            return bool(self._tokens)

    def run(self) -> None:
        parent_exit = process_exit_fd(self.parent_pid)
        if parent_gone(self.parent_pid):  # gone before the pidfd was opened
            self.leave_as_orphan()
        renewed_at = time.monotonic()
        while not self._stop.is_set():
            holding = self.holding()
            renewed_at = max(renewed_at, self._held_since)
            self._bell.wait([] if parent_exit is None else [parent_exit],
                            self.next_wake(holding, renewed_at, parent_exit is not None))
            self.wakeups += 1
            if self._stop.is_set():
                return
            if parent_gone(self.parent_pid):
                self.leave_as_orphan()
            elif parent_exit is not None and readable(parent_exit):  # not yet re-parented: look each second
                os.close(parent_exit)
                parent_exit = None
            self._beat()
            renewed_at = max(renewed_at, self._held_since)
            if self.holding() and time.monotonic() - renewed_at >= self.renew_every:
                renewed_at = time.monotonic()
                self.renew_all()

    def next_wake(self, holding: bool, renewed_at: float, parent_watched: bool) -> float:
        """Seconds until the next beat or renewal (or look at the parent, without a pidfd)."""
        wait = BEAT_INTERVAL if holding else self.idle_beat
        if holding:
            wait = min(wait, renewed_at + self.renew_every - time.monotonic())
        if not parent_watched:
            wait = min(wait, PARENT_WATCH_EVERY)
        return max(0.0, wait)

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
