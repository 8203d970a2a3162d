"""A database that cannot be written: which errors those are, what to tell the operator, how long to
pause, and retrying while another writer holds the lock."""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from kgsupervisor.errors import DatabaseBusy
from kgsupervisor.store.backend import backend_of_error

log = logging.getLogger("kgsupervisor.db")

T = TypeVar("T")

# A database that cannot be written (read-only, disk full, I/O errors, locked for minutes) pauses
# the worker with this backoff; it never fails a document and never kills the worker.
DB_FAULT_BACKOFF_FIRST = 0.25
DB_FAULT_BACKOFF_MAX = 5.0
DB_FAULT_LOG_EVERY = 30.0


def is_database_fault(exc: BaseException) -> bool:
    """A problem of the database as a whole, not of one document: worth waiting out."""
    return backend_of_error(exc).is_fault(exc)


def is_corruption(exc: BaseException) -> bool:
    """A damaged page (SQLITE_CORRUPT): perhaps only one document's rows."""
    return backend_of_error(exc).is_corruption(exc)


def is_lock_error(exc: BaseException) -> bool:
    """Another writer holds the lock (SQLITE_BUSY, a PostgreSQL deadlock): worth retrying."""
    return backend_of_error(exc).is_lock_error(exc)


def describe_database_fault(exc: BaseException) -> str:
    """The database's error and what an operator should look at."""
    return backend_of_error(exc).describe_fault(exc)


class DatabasePause:
    """How long a worker has waited out a database fault, its next pause, when it last said so."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.log = log
        self.since: float | None = None  # monotonic; set while the database fails
        self.backoff = 0.0
        self.logged = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note one more failure, log it (an error once, then every 30 s), return the pause."""
        mono = time.monotonic()
        first = self.since is None
        if first:
            self.since = mono
        self.backoff = min(max(self.backoff * 2, DB_FAULT_BACKOFF_FIRST), DB_FAULT_BACKOFF_MAX)
        if first:
            self.log.error("database error, pausing (no document is charged; claims go back to "
                           "pending once it is writable): %s", describe_database_fault(exc))
            self.logged = mono
        elif mono - self.logged >= DB_FAULT_LOG_EVERY:
            self.log.warning("database still failing after %.0fs: %s", mono - self.since,
                             describe_database_fault(exc))
            self.logged = mono
        return self.backoff

    def recovered(self) -> None:
        """A step went through: say so if it had been failing, and start the backoff afresh."""
        if self.since is not None:
            self.log.info("database works again after %.1fs; resuming", time.monotonic() - self.since)
            self.since = None
        self.backoff = 0.0


class LockRetry:
    """Run a database step again while another writer holds the lock, counting each retry."""

    def __init__(self, patience: float = 120.0, on_retry: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.patience = patience
        self.retries = 0
        self._on_retry = on_retry
        self._clock = clock
        self._sleep = sleep

    def __call__(self, step: Callable[[], T]) -> T:
        deadline = self._clock() + self.patience
        delay = 0.05
        while True:
            try:
                return step()
            except Exception as exc:
                if not is_lock_error(exc):
                    raise
                if self._clock() >= deadline:
                    raise DatabaseBusy(f"database stayed locked for {self.patience:.0f}s: {exc}") from None
                self.retries += 1
                if self._on_retry:
                    self._on_retry()
                log.warning("database is locked by another writer; retry %d in %.2fs", self.retries, delay)
                # Jitter so that workers that collided do not collide again in lockstep.
                self._sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
