"""KGWorker: the poll -> claim -> POST -> write-back loop of one worker process."""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import time
import uuid
from collections.abc import MutableMapping
from typing import Any

from kgsupervisor import logs
from kgsupervisor.config import Settings, require_db
from kgsupervisor.errors import DocumentRejected, InvalidAnswer, ItemFailure, LeaseLost, ServiceUnavailable
from kgsupervisor.kg.dispatch import Dispatcher
from kgsupervisor.kg.endpoints import EndpointPool
from kgsupervisor.queue.documents import build_payload, encode_payload
from kgsupervisor.queue.leased import Claim, queue_for
from kgsupervisor.queue.writeback import Answered, write_back_group
from kgsupervisor.states import JobStatus, WorkerState
from kgsupervisor.store.backend import connect_to, describe, open_database
from kgsupervisor.store.commitwatch import commit_watch
from kgsupervisor.store.faults import DatabasePause, describe_database_fault, is_corruption, is_database_fault
from kgsupervisor.store.sqlite import LockRetry
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.lease import LeaseKeeper
from kgsupervisor.worker.stats import StatsPublisher, WorkerStats

log = logging.getLogger("kgsupervisor.worker")

# Expired leases (a host that vanished) are looked for this often, or every half lease if shorter.
REQUEUE_EXPIRED_EVERY = 30.0
# Answers of one claimed batch are written in one transaction (a third less write cost a
# document). An answer waits for its batch's later documents only while they come fast: one
# that took this long, or an older answer in hand, is written at once, so after a crash the
# service is asked again for little.
WRITE_GROUP_MAX_AGE = 0.5


def owner_name(pid: int | None = None) -> str:
    """The lease owner of a process: host and pid, so a supervisor can tell its own dead workers."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


class WorkerLog(logging.LoggerAdapter):
    """Prefixes every line with the worker id, pid and the document in hand."""

    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        cid = self.extra.get("content_id")
        doc = f" content_id={cid}" if cid is not None else ""
        # Also as fields, for the JSON formatter.
        kwargs["extra"] = {"worker_id": self.extra["worker_id"], "content_id": cid}
        return f"[worker {self.extra['worker_id']} pid {os.getpid()}{doc}] {msg}", kwargs


class KGWorker:
    """One worker. `__init__` runs before a fork and opens nothing; `init_process()` after it."""

    def __init__(self, settings: Settings, worker_id: int = 0,
                 stats_map: MutableMapping[Any, Any] | None = None,
                 counters: SharedCounters | None = None, parent_pid: int | None = None,
                 max_documents: int | None = None) -> None:
        self.settings = settings
        self.db_path = require_db(settings)
        self.worker_id = worker_id
        self.parent_pid = parent_pid
        self.max_documents = max_documents
        self.alive = True
        self.reopen_logs = False  # set by SIGUSR1; the loop reopens, never the handler
        self.stats = WorkerStats(worker_id=worker_id, counters=counters or SharedCounters())
        self.publisher = StatsPublisher(stats_map)
        self.log = WorkerLog(log, {"worker_id": worker_id, "content_id": None})
        # SimpleQueue, not Event: put_nowait is safe inside a signal handler, Event.set is not.
        self._wakeups: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._last_requeue = 0.0
        self.db_pause = DatabasePause(self.log)
        self._db_claims_held = False  # claims left behind by a failed step, to give back
        self._db_reopen = False  # after a database fault, retry on a fresh connection

    # -- process lifecycle -------------------------------------------------------------------

    def init_process(self) -> None:
        """Open this process's own connection, HTTP session and lease keeper."""
        self.stats.pid = os.getpid()
        self.owner = owner_name()
        self.conn = open_database(self.db_path)
        self.queue = queue_for(self.conn)
        # A commit by anyone else (an enqueue) wakes an idle worker at once, not after poll_interval.
        self.commits = commit_watch(self.conn)
        self.lock_retry = LockRetry(on_retry=self._count_lock_retry)
        s = self.settings
        self.endpoints = EndpointPool.from_settings(s, self.worker_id)
        self.dispatch = Dispatcher(self.endpoints, self.stats.counters, self.log)
        self.keeper = LeaseKeeper(self.db_path, self.owner, s.lease_seconds, beat=self.publish,
                                  parent_pid=self.parent_pid, stop_claiming=self.stop_claiming)
        self.keeper.start()
        self.set_state(WorkerState.IDLE)

    def install_signal_handlers(self) -> None:
        """TERM/INT: finish the document in hand, release the rest, exit. A second one: stop now."""
        signal.signal(signal.SIGTERM, self.handle_stop_signal)
        signal.signal(signal.SIGINT, self.handle_stop_signal)

    def install_supervised_signal_handlers(self) -> None:
        """Under a supervisor: TERM drains this worker; INT and HUP belong to the supervisor.

        A Ctrl-C reaches the whole process group: ignoring it here lets the supervisor drain
        instead of every worker dying mid-write. A TERM to the whole group (GNU timeout,
        `kill -- -PGID`) arrives twice, from the sender and from the draining supervisor: both
        are the same drain. The supervisor stops a worker at once with SIGKILL, never a TERM.
        """
        signal.signal(signal.SIGTERM, self.handle_drain_signal)
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.handle_usr1)

    def handle_usr1(self, signum: int, frame: Any) -> None:
        self.reopen_logs = True
        self._wakeups.put_nowait(signum)

    def stop_claiming(self) -> None:
        """Called by the lease keeper when the supervisor is gone."""
        self.alive = False

    def handle_drain_signal(self, signum: int, frame: Any) -> None:
        """Under a supervisor: finish the document in hand, then exit; a repeat changes nothing."""
        self.alive = False
        self._wakeups.put_nowait(signum)

    def handle_stop_signal(self, signum: int, frame: Any) -> None:
        self.alive = False
        self._wakeups.put_nowait(signum)
        # The second signal interrupts even a blocking request; run() releases what is held.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def run(self, once: bool = False) -> int:
        """Loop until stopped (or, with `once`, for one claimed batch); returns the exit status."""
        self.log.info("worker started: db=%s service=%s batch=%d", describe(self.db_path),
                      self.settings.service_url, self.settings.batch_size)
        crashed = False
        try:
            while self.alive:
                wait = self.step(time.time())
                if self.reopen_logs:
                    self.reopen_logs = False
                    logs.reopen()
                    self.log.info("log file reopened")
                if once:
                    break
                if wait > 0:
                    self.wait_for_work(wait)
        except KeyboardInterrupt:
            self.log.warning("stopped at once by a second signal; releasing held claims")
        except Exception:
            crashed = True
            raise
        finally:
            self.shutdown(release=not crashed)
        return 0

    def shutdown(self, release: bool = True) -> None:
        """Release anything still held, stop the keeper, close connections.

        After a crash (`release=False`) the claims are left to the supervisor, which charges the
        document in flight one crash (a poison pill after KG_POISON_AFTER): giving them back
        here, uncharged, would let a document that crashes workers do so forever.
        """
        self.set_state(WorkerState.STOPPING)
        try:
            if self._db_reopen and release:
                self.reopen_database()
            released = self.queue.release_owner(self.owner) if release else 0
        except Exception as exc:
            if not is_database_fault(exc):
                raise
            # The supervisor tries again when it reaps us, and lease expiry is the backstop.
            self.log.error("could not give claimed documents back (%s); they return to pending "
                           "when the database is writable again", describe_database_fault(exc))
            released = 0
        if released:
            self.log.info("released %d claimed document(s) back to pending", released)
        self.keeper.stop()
        self.endpoints.close()
        self.conn.close()
        self.log.info("worker stopped: %d processed, %d succeeded, %d failed",
                      self.stats.total_processed, self.stats.total_success, self.stats.total_failed)

    # -- one iteration -----------------------------------------------------------------------

    def step(self, now: float) -> float:
        """loop_once, riding out a database that cannot be written instead of dying of it.

        While the database fails, the worker backs off and retries; its first successful write
        gives back every claim it still holds (the document whose write-back failed, the rest of
        its batch) to pending, uncharged. No document is failed because of the database.
        """
        try:
            if self._db_reopen:
                self.reopen_database()
            if self._db_claims_held:
                self.give_back_claims()
            wait = self.loop_once(now)
        except Exception as exc:
            if not is_database_fault(exc):
                raise
            return self.database_fault(exc)
        self.db_pause.recovered()
        return wait

    def database_fault(self, exc: BaseException) -> float:
        """Roll back, note the claims to give back, pause; returns how long."""
        try:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the fault that brought us here (or a failed reopen) may break this too
            pass
        self._db_claims_held = True
        self._db_reopen = True
        self.log.extra["content_id"] = None
        self.stats.set_current(None)
        self.set_state(WorkerState.PAUSED)
        return self.db_pause.failed(exc)

    def reopen_database(self) -> None:
        """Close the connection and open a fresh one.

        SQLite opens a file it cannot write read-only (a worker started while the database was
        read-only), and every connection of the process to that file stays read-only until all
        of them are closed: the old one goes first. If the open fails the step fails, and the
        next one tries again.
        """
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - the fault that brought us here may break this too
            pass
        self.conn = connect_to(self.db_path)
        self.queue = queue_for(self.conn)
        self.commits = commit_watch(self.conn)
        self._db_reopen = False

    def give_back_claims(self) -> None:
        """After a database failure: every claim this worker still holds back to pending,
        uncharged (the document whose write-back failed, the rest of its batch)."""
        released = self.lock_retry(lambda: self.queue.release_owner(self.owner))
        self._db_claims_held = False
        self.stats.record_released(released)
        if released:
            self.log.info("%d claimed document(s) back to pending after the database error", released)

    def loop_once(self, now: float) -> float:
        """Do one step of work; returns how long to wait before the next (0: go again at once)."""
        if not self.settings.service_enabled:
            self.set_state(WorkerState.DISABLED)
            return self.settings.poll_interval
        mono = time.monotonic()
        self.dispatch.probe_endpoints(mono)
        if self.endpoints.all_down:
            self.set_state(WorkerState.PAUSED)
            return self.endpoints.seconds_to_probe(mono)
        self.requeue_expired(now)
        if not self.alive:  # stopped (or orphaned) since the loop last looked: claim nothing
            return 0.0
        # While the service is only on trial (a half-open breaker), one document finds out.
        limit = 1 if self.endpoints.trial_only else self.settings.batch_size
        claims = self.lock_retry(lambda: self.queue.claim(
            self.owner, uuid.uuid4().hex, limit, self.settings.lease_seconds, now))
        if not claims:
            self.set_state(WorkerState.IDLE)
            return self.settings.poll_interval
        self.process_batch(claims)
        # A full batch means there is probably more: claim again at once (the upstream slept).
        return 0.0 if len(claims) == limit else self.settings.poll_interval

    def requeue_expired(self, now: float) -> None:
        if now - self._last_requeue < min(REQUEUE_EXPIRED_EVERY, self.settings.lease_seconds / 2):
            return
        self._last_requeue = now
        count = self.lock_retry(lambda: self.queue.requeue_expired(now))
        if count:
            self.log.warning("put %d row(s) with expired leases back to pending (their owner vanished)", count)

    def process_batch(self, claims: list[Claim]) -> None:
        """Send each claimed document in order and write the answers back together; on stop or
        outage, release the ones not started."""
        token = claims[0].token
        self.keeper.hold(token)
        answered: list[Answered] = []
        try:
            for i, claim in enumerate(claims):
                if not self.alive or self.endpoints.all_down:
                    self.write_answered(answered)
                    self.stats.record_released(self.lock_retry(lambda: self.queue.release(claims[i:])))
                    break
                item = self.process_one(claim)
                if item:
                    answered.append(item)
                    # A slow service's answers are written one by one: the next document
                    # would probably hold this one in memory as long again.
                    if (item.took >= WRITE_GROUP_MAX_AGE
                            or time.monotonic() - answered[0].at >= WRITE_GROUP_MAX_AGE):
                        self.write_answered(answered)
                self.check_recycle(len(answered))
            self.write_answered(answered)
        finally:
            if answered:
                # Only after an error: these answers are dropped, their rows go back to pending
                # uncharged with the rest of this worker's claims.
                self.log.warning("%d answer(s) not written because of the error; their documents "
                                 "will be sent again", len(answered))
            self.keeper.drop(token)
            self.log.extra["content_id"] = None
            self.stats.set_current(None)
            self.publish()

    def write_answered(self, answered: list[Answered]) -> None:
        """Write the answers in hand in one transaction, then count and log each outcome."""
        if not answered:
            return
        outcomes = self.lock_retry(lambda: write_back_group(self.conn, answered, time.time()))
        # Count every outcome before logging any: a log write can block (a full pipe), and the
        # totals must not trail the committed rows meanwhile.
        for outcome in outcomes:
            if isinstance(outcome, LeaseLost):
                self.stats.lease_lost += 1
            else:
                self.stats.record_outcome(True)
        for item, outcome in zip(answered, outcomes):
            self.log.extra["content_id"] = item.claim.content_id
            if isinstance(outcome, LeaseLost):
                self.log.warning("%s", outcome)
            else:
                self.log.info("completed: %d entities, %d relationships", outcome["entities"],
                              outcome["relationships"])
        answered.clear()

    def check_recycle(self, unwritten: int = 0) -> None:
        """After max_documents the worker leaves cleanly, to be replaced by a fresh process."""
        done = self.stats.total_processed + self.stats.total_retried + unwritten
        if self.max_documents and done >= self.max_documents:
            if self.alive:
                self.log.info("recycling after %d documents", self.max_documents)
            self.alive = False

    def process_one(self, claim: Claim) -> Answered | None:
        """One document from claimed to an outcome (failed, retried later, released) or to an
        answer in hand, returned for the group write-back."""
        if claim.problem:
            self.fail_document(claim, claim.problem)  # this row alone: nothing else waits on it
            return None
        self.log.extra["content_id"] = claim.content_id
        self.stats.set_current(claim.content_id)
        self.set_state(WorkerState.BUSY)
        self.lock_retry(lambda: self.queue.mark_started(claim, time.time()))
        try:
            payload, notes = self.read_document(claim)
            result, took = self.dispatch.send(claim.content_id, encode_payload(payload),
                                              {c["vector_rowid"] for c in payload["chunks"]})
        except DocumentRejected as exc:
            self.fail_document(claim, str(exc))
        except InvalidAnswer as exc:
            self.retry_document(claim, f"invalid answer: {exc}")
        except ItemFailure as exc:
            self.retry_document(claim, str(exc))
        except ServiceUnavailable as exc:
            self.release_for_outage(claim, exc)
        except Exception as exc:
            if is_database_fault(exc):
                raise  # the database, not this document: step() pauses the worker
            # A bug this document trips (a RecursionError on its data, ...): it costs the
            # document an attempt, and the worker lives on, instead of dying on it again and again.
            self.log.exception("unexpected error while processing this document; charging it an attempt")
            self.retry_document(claim, f"internal error: {type(exc).__name__}: {str(exc)[:300]}")
        else:
            return Answered(claim, result, notes, at=time.monotonic(), took=took)
        return None

    def read_document(self, claim: Claim) -> tuple[dict[str, Any], list[str]]:
        """The document's request; a damaged page in its own rows rejects it alone.

        When reading the document hits SQLITE_CORRUPT but its queue row still reads, the damage
        is in this document's rows (a chunk's overflow page, say): no retry can help it, and
        the rest of the queue must not wait on it. A database that cannot be read at all fails
        that probe too, and the fault pauses the worker as any other database fault.
        """
        try:
            return build_payload(self.conn, claim.content_id)
        except Exception as exc:
            if not is_corruption(exc):
                raise
            self.conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (claim.id,)).fetchone()
            raise DocumentRejected(f"the document's rows cannot be read from the database: "
                                   f"{describe_database_fault(exc)}") from None

    # -- outcomes ----------------------------------------------------------------------------

    def fail_document(self, claim: Claim, reason: str) -> None:
        # PROCESSING -> FAILED
        if self.lock_retry(lambda: self.queue.fail(claim, reason, time.time())):
            self.stats.record_outcome(False)
            self.log.warning("failed for good: %s", reason)

    def retry_document(self, claim: Claim, reason: str) -> None:
        s = self.settings
        status = self.lock_retry(lambda: self.queue.retry_later(
            claim, reason, time.time(), s.max_attempts, s.retry_backoff, s.retry_backoff_max))
        if status is None:
            self.stats.lease_lost += 1
            self.log.warning("lease lost before this failure was recorded (the document went back to the "
                             "queue meanwhile); not charged: %s", reason)
        elif status is JobStatus.FAILED:
            # PROCESSING -> FAILED
            self.stats.record_outcome(False)
            self.log.warning("failed after %d attempts: %s", claim.retry_count + 1, reason)
        else:
            # PROCESSING -> PENDING (attempt charged)
            self.stats.record_retry()
            self.log.warning("attempt %d of %d failed, will retry: %s", claim.retry_count + 1,
                             s.max_attempts, reason)

    def release_for_outage(self, claim: Claim, exc: ServiceUnavailable) -> None:
        """PROCESSING -> PENDING with no attempt charged: no endpoint could take the document."""
        now = time.time()
        not_before = now + exc.requeue_delay if exc.requeue_delay else None
        self.stats.record_released(self.lock_retry(lambda: self.queue.release([claim], not_before)))
        self.log.warning("KG service unavailable, document released: %s", exc)

    # -- waiting and stats -------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> None:
        """Sleep up to `timeout`, waking early on a stop signal or on a commit by anyone else."""
        deadline = time.monotonic() + timeout
        # Watch for commits whenever the worker would claim next (idle, or after a partial
        # batch); not while paused, when a commit is no reason to call a service that is down.
        watch = self.stats.state in (WorkerState.IDLE.value, WorkerState.BUSY.value)
        while self.alive:
            left = deadline - time.monotonic()
            if left <= 0 or self._woken(min(left, self.commits.interval if watch else left)):
                return
            if watch and self.commits.changed():
                return

    def _woken(self, timeout: float) -> bool:
        try:
            self._wakeups.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def set_state(self, state: WorkerState) -> None:
        if self.stats.state != state.value:
            self.stats.state = state.value
            self.publish()

    def publish(self) -> None:
        """Beat, and copy the stats to the shared map when they changed (or every 10 s)."""
        self.stats.counters.beat()
        if hasattr(self, "endpoints"):
            self.stats.kg_service = self.endpoints.status(self.settings.service_url, self.settings.service_enabled)
        self.publisher.publish_if_changed(self.stats)

    def _count_lock_retry(self) -> None:
        self.stats.db_lock_retries += 1


def run_worker(settings: Settings, worker_id: int = 0, once: bool = False,
               stats_map: MutableMapping[Any, Any] | None = None) -> int:
    """Build, initialise and run one worker in this process (the `worker` command)."""
    worker = KGWorker(settings, worker_id, stats_map)
    worker.init_process()
    worker.install_signal_handlers()
    return worker.run(once=once)
