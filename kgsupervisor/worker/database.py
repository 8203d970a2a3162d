"""The worker's own database connection, and how it rides out a database that fails."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from kgsupervisor.queue.history import Attempt, Outcome
from kgsupervisor.queue.leased import LeasedQueue, queue_for
from kgsupervisor.store.backend import commit_watch, connect_to, open_database
from kgsupervisor.store.faults import DatabasePause, LockRetry, describe_database_fault, is_database_fault
from kgsupervisor.worker.counters import Progress
from kgsupervisor.worker.stats import WorkerStats

T = TypeVar("T")

# A database call counts as a wait (not hung) for this long: SQLite waits up to its busy timeout
# (5 s) for another writer's lock, PostgreSQL up to its connect timeout (10 s) to reconnect.
# Longer, it counts as stuck, as a PostgreSQL statement blocked on a lock for ever would be.
DB_WAIT = 10.0


class WorkerDatabase:
    """The connection, queue and commit watch of one worker process, fresh again after a fault.

    While the database fails, the worker backs off and retries; its first successful write
    gives back every claim it still holds (the document whose write-back failed, the rest of
    its batch) to pending, uncharged. No document is failed because of the database.
    """

    def __init__(self, db_path: str, owner: str, log: logging.LoggerAdapter, stats: WorkerStats,
                 progress: Progress | None = None, watch_mode: str = "auto") -> None:
        self.db_path = db_path
        self.watch_mode = watch_mode  # KG_COMMIT_WATCH
        self.owner = owner
        self.log = log
        self.stats = stats
        self.progress = progress or Progress()
        self.conn = open_database(db_path)
        self.queue: LeasedQueue = queue_for(self.conn)
        # A commit by anyone else (an enqueue) wakes an idle worker at once, not after poll_interval.
        self.commits = commit_watch(self.conn, watch_mode)
        self.lock_retry = LockRetry(on_retry=self._count_lock_retry, sleep=self._wait_for_lock)
        self.pause = DatabasePause(log)
        self.claims_held = False  # claims left behind by a failed iteration, to give back
        self.fault = ""  # what the last database fault was, for the history of those claims
        self.stale = False  # after a database fault, retry on a fresh connection

    def retrying(self, step: Callable[[LeasedQueue], T]) -> T:
        """`step` on the queue, run again while another writer holds the lock; each try counts
        as a wait for DB_WAIT seconds at most, so a long lock wait never looks hung."""
        def one_try() -> T:
            with self.progress.parked(up_to=DB_WAIT):
                return step(self.queue)
        return self.lock_retry(one_try)

    def failed(self, exc: BaseException | None = None) -> None:
        """After a database fault: roll back, note the claims to give back and the connection to renew."""
        self.fault = describe_database_fault(exc) if exc is not None else "a database error"
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the fault that brought us here (or a failed reopen) may break this too
            pass
        self.claims_held = True
        self.stale = True

    def recover(self) -> None:
        """Before an iteration after a fault: a fresh connection, and every claim still held given back."""
        if self.stale:
            self.reopen()
        if self.claims_held:
            self.give_back_claims()

    def reopen(self) -> None:
        """Close the connection and open a fresh one.

        SQLite opens a file it cannot write read-only (a worker started while the database was
        read-only), and every connection of the process to that file stays read-only until all
        of them are closed: the old one goes first. If the open fails the iteration fails, and
        the next one tries again.
        """
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the fault that brought us here may break this too
            pass
        with self.progress.parked(up_to=DB_WAIT):
            self.conn = connect_to(self.db_path)
        self.queue = queue_for(self.conn)
        self.commits.close()
        self.commits = commit_watch(self.conn, self.watch_mode)
        self.stale = False

    def give_back_claims(self) -> None:
        """After a database failure: every claim this worker still holds back to pending,
        uncharged (the document whose write-back failed, the rest of its batch)."""
        attempt = Attempt(worker=self.stats.worker_id, error_class="database",
                          error_message=f"given back uncharged after a database error: {self.fault}")
        released = self.retrying(lambda q: q.release_owner(self.owner, outcome=Outcome.OUTAGE,
                                                           attempt=attempt))
        self.claims_held = False
        self.stats.record_released(released)
        if released:
            self.log.info("%d claimed document(s) back to pending after the database error", released)

    def release_all(self) -> int:
        """At shutdown: every claim of this worker back to pending; 0 if the database fails."""
        try:
            if self.stale:
                self.reopen()
            attempt = Attempt(worker=self.stats.worker_id, error_message="given back as the worker stopped")
            with self.progress.parked(up_to=DB_WAIT):
                return self.queue.release_owner(self.owner, outcome=Outcome.DRAINED, attempt=attempt)
        except Exception as exc:
            if not is_database_fault(exc):
                raise
            # The supervisor tries again when it reaps us, and lease expiry is the backstop.
            self.log.error("could not give claimed documents back (%s); they return to pending "
                           "when the database is writable again", describe_database_fault(exc))
            return 0

    def close(self) -> None:
        self.commits.close()
        self.conn.close()

    def _count_lock_retry(self) -> None:
        self.stats.count("db_lock_retries")
        self.progress.mark()

    def _wait_for_lock(self, seconds: float) -> None:
        """LockRetry's pause between tries: a wait, not a hang."""
        with self.progress.parked():
            time.sleep(seconds)
