"""The worker's write-back thread: it writes the answers handed over while the main thread sends on."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from kgsupervisor.errors import LeaseLost
from kgsupervisor.queue.writeback import Answered, write_back_group
from kgsupervisor.store.backend import connect_to
from kgsupervisor.store.faults import LockRetry, describe_database_fault, is_database_fault
from kgsupervisor.worker.counters import Progress
from kgsupervisor.worker.stats import WorkerStats
from kgsupervisor.worker.worklog import WorkerLog

log = logging.getLogger("kgsupervisor.worker")

# An answer waits this long at most for the answers after it: a fast service's answers are written
# several in a commit (each commit rewrites ~220 pages of the same indexes: a third less write
# cost a document), a slow service's one by one, so that a crash loses little.
GROUP_WAIT = 0.1


class AnswerWriter(threading.Thread):
    """Writes the answers the main thread hands over, every one waiting in one transaction.

    The main thread hands each answer over as it comes and sends the next document meanwhile:
    one request in flight, and the write of the last answers beside it. An answer is written
    GROUP_WAIT after it came at the latest, at once when `room` answers wait (the main thread
    then waits for room), or when its batch is over and the main thread has claimed the next
    (the claim first: it is short, and the next sends go on while the batch is written). A
    batch's token stays with the lease keeper until its last answer is written.

    Nothing here is sent or charged: a death loses only the answers not yet written, whose rows
    go back to pending uncharged. A failed write drops the answers in hand and keeps the error
    for the main thread, which meets it at its next hand-off or flush and pauses for the
    database as for a fault of its own (the rows are given back uncharged).
    """

    def __init__(self, db_path: str, stats: WorkerStats, drop_token: Callable[[str], None],
                 room: int) -> None:
        super().__init__(name="write-back", daemon=True)
        self.db_path = db_path
        self.stats = stats
        # Log lines of its own: the main thread's prefix names the document it sends.
        self.log = WorkerLog(log, {"worker_id": stats.worker_id, "content_id": None})
        self._drop_token = drop_token
        self.room = max(1, room)
        self.conn: Any = connect_to(db_path)  # the main thread checked the schema
        self.stale = False  # after a fault: write on a fresh connection
        self._lock_retry = LockRetry(on_retry=lambda: stats.count("db_lock_retries"))
        # Held while it writes: the worker's claims wait on it, not in SQLite's busy handler,
        # whose sleeps (1, 2, 5, 10 ms...) would cost more than the write itself.
        self._writing = threading.Lock()
        self._cond = threading.Condition()
        self._queue: list[Answered | str] = []  # answers, and the tokens of batches that end there
        self._unwritten = 0  # handed over, not yet counted as written (nor dropped)
        self._unfinished = 0  # handed over, not yet counted and logged (nor dropped)
        self._fault: BaseException | None = None
        self._stopping = False
        self._hurried = 0  # main-thread waits for the writes: no answer waits for the next then
        self._claim_pending = False  # a batch ended, the main thread's next claim not yet made

    # -- the main thread's side ----------------------------------------------------------------

    def hand(self, item: Answered, progress: Progress) -> None:
        """Queue `item` to be written, once there is room; raises the writer's fault instead."""
        with self._cond:
            if self._unfinished >= self.room:
                with progress.parked():  # bounded by the writes ahead of it
                    self._cond.wait_for(lambda: self._unfinished < self.room or self._fault is not None)
            if self._fault is not None:
                self._drop([item])
                self._raise_fault()
            self._queue.append(item)
            self._unwritten += 1
            self._unfinished += 1
            self._cond.notify_all()

    def end_batch(self, token: str) -> None:
        """The batch of `token` has no more answers: its lease is let go once they are written."""
        with self._cond:
            self._queue.append(token)
            self._claim_pending = True
            self._cond.notify_all()

    @contextmanager
    def claiming(self, progress: Progress) -> Iterator[None]:
        """The main thread's claim: never beside a write (no busy wait), and the ended batch's
        answers are written right after it."""
        try:
            with progress.parked():  # bounded by the write under way
                self._writing.acquire()
            try:
                yield
            finally:
                self._writing.release()
        finally:
            with self._cond:
                self._claim_pending = False
                self._cond.notify_all()

    def flush(self, progress: Progress) -> None:
        """Wait until every answer handed over is written, counted and logged; raises the writer's
        fault, if any."""
        with self._cond:
            if self._unfinished:
                self._wait_written(progress)
            if self._fault is not None:
                self._raise_fault()

    def settle(self, progress: Progress) -> None:
        """Wait until nothing is being written, forget a fault (the worker pauses for it anyway)
        and close the connection: the next write opens a fresh one."""
        with self._cond:
            self._wait_written(progress)
            self._fault = None
            # Now, not at the next write: SQLite shares one -shm mapping among a process's
            # connections to a file, and one opened while the file was read-only would keep the
            # main thread's fresh connection read-only for as long as it stays open.
            with suppress(Exception):  # a broken connection is closed all the same
                self.conn.close()
            self.stale = True

    def check(self) -> None:
        """Raise the writer's fault, if a write failed since the main thread last looked."""
        with self._cond:
            if self._fault is not None:
                self._raise_fault()

    def plus_unwritten(self, counted: Callable[[], int]) -> int:
        """`counted()` plus the answers not written yet, read at once: an answer is counted in
        the stats or unwritten, never both nor neither."""
        with self._cond:
            return counted() + self._unwritten

    def stop(self, progress: Progress) -> None:
        """Write what was handed over, then end the thread and close its connection."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            if self._unfinished:
                self.log.info("writing %d answer(s) before stopping", self._unfinished)
        if self.is_alive():
            with progress.parked():
                self.join()
        with suppress(Exception):  # a broken connection is closed all the same
            self.conn.close()

    def _wait_written(self, progress: Progress) -> None:
        """Wait, holding the condition, until every answer handed over is written; none waits for more."""
        self._hurried += 1
        self._cond.notify_all()
        try:
            with progress.parked():  # bounded by the writes ahead of it
                self._cond.wait_for(lambda: not self._unfinished)
        finally:
            self._hurried -= 1

    def _raise_fault(self) -> None:
        """Hand the fault to the main thread, once (called holding the condition)."""
        fault, self._fault = self._fault, None
        raise fault

    # -- the thread ----------------------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._cond:
                while (due := self._seconds_to_write()) != 0:
                    if due is None and self._stopping:
                        return
                    self._cond.wait(due)
                work, self._queue = self._queue, []
            answers = [w for w in work if isinstance(w, Answered)]
            outcomes = self.write(answers)
            with self._cond:
                self.count(outcomes)
                self._unwritten -= len(answers)
            for token in (w for w in work if isinstance(w, str)):
                self._drop_token(token)
            # Logged once counted: a log write can block (a full pipe), and the totals must not
            # trail the committed rows meanwhile.
            self.log_outcomes(answers, outcomes)
            with self._cond:
                self._unfinished -= len(answers)
                self._cond.notify_all()

    def _seconds_to_write(self) -> float | None:
        """How long the queue may wait (called holding the condition): 0 now, None for ever."""
        if not self._queue:
            return None
        answers = [w for w in self._queue if isinstance(w, Answered)]
        if not answers or self._stopping or self._hurried or len(answers) >= self.room:
            return 0.0
        if len(answers) < len(self._queue) and not self._claim_pending:
            return 0.0  # a batch is over and the next one claimed
        return max(0.0, answers[0].at + GROUP_WAIT - time.monotonic())

    def write(self, answers: list[Answered]) -> list[dict | LeaseLost]:
        """Write `answers` in one transaction: their outcomes; none when a fault dropped them."""
        if not answers:
            return []
        if self._fault is not None:  # the main thread has not met the last one yet: these wait too
            self._drop(answers)
            return []
        try:
            with self._writing:
                return self._lock_retry(lambda: self._write_group(answers))
        except Exception as exc:  # noqa: BLE001 - every error reaches the main thread, which decides
            self._failed(exc)
            self._drop(answers)
            return []

    def _write_group(self, answers: list[Answered]) -> list[dict | LeaseLost]:
        if self.stale:
            with suppress(Exception):  # the fault that made it stale may break this too
                self.conn.close()
            self.conn = connect_to(self.db_path)
            self.stale = False
        return write_back_group(self.conn, answers, time.time())

    def count(self, outcomes: list[dict | LeaseLost]) -> None:
        for outcome in outcomes:
            if isinstance(outcome, LeaseLost):
                self.stats.count("lease_lost")
            else:
                self.stats.record_outcome(True)

    def log_outcomes(self, answers: list[Answered], outcomes: list[dict | LeaseLost]) -> None:
        for item, outcome in zip(answers, outcomes):
            self.log.extra["content_id"] = item.claim.content_id
            if isinstance(outcome, LeaseLost):
                self.log.warning("%s", outcome)
            else:
                self.log.info("completed: %d entities, %d relationships", outcome["entities"],
                              outcome["relationships"])
        self.log.extra["content_id"] = None

    def _failed(self, exc: BaseException) -> None:
        """Roll back and keep `exc` for the main thread; the next write opens a fresh connection."""
        with suppress(Exception):  # the fault may break this too
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        self.stale = True
        self.log.warning("write-back failed: %s",
                         describe_database_fault(exc) if is_database_fault(exc) else exc)
        with self._cond:
            self._fault = exc
            self._cond.notify_all()

    def _drop(self, answers: list[Answered]) -> None:
        self.log.warning("%d answer(s) not written because of the error; their documents will be sent "
                         "again", len(answers))
