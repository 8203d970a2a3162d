"""KGWorker: the poll -> claim -> POST -> write-back loop of one worker process."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from kgsupervisor import logs
from kgsupervisor.config import Settings, require_db
from kgsupervisor.kg.admission import AdmissionControl
from kgsupervisor.kg.dispatch import Dispatcher
from kgsupervisor.kg.endpoints import EndpointPool
from kgsupervisor.queue.leased import Claim
from kgsupervisor.states import WorkerState
from kgsupervisor.store.backend import describe
from kgsupervisor.store.faults import is_database_fault
from kgsupervisor.worker.admitted import AdmittedSending
from kgsupervisor.worker.admitting import admission_control
from kgsupervisor.worker.counters import Progress, SharedCounters
from kgsupervisor.worker.database import WorkerDatabase
from kgsupervisor.worker.document import DocumentProcessor
from kgsupervisor.worker.doorbell import Doorbell, wait_for_commit
from kgsupervisor.worker.lease import BEAT_INTERVAL, LeaseKeeper
from kgsupervisor.worker.stats import StatsPublisher, WorkerStats
from kgsupervisor.worker.worklog import WorkerLog, holding
from kgsupervisor.worker.writer import AnswerWriter

log = logging.getLogger("kgsupervisor.worker")

# Expired leases (a host that vanished) are looked for this often, or every half lease if shorter.
REQUEUE_EXPIRED_EVERY = 30.0


def owner_name(pid: int | None = None) -> str:
    """The lease owner of a process: host and pid, so a supervisor can tell its own dead workers."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


class KGWorker(AdmittedSending):
    """One worker. `__init__` runs before a fork and opens nothing; `init_process()` after it."""

    def __init__(self, settings: Settings, worker_id: int = 0,
                 stats_map: MutableMapping[Any, Any] | None = None,
                 counters: SharedCounters | None = None, parent_pid: int | None = None,
                 max_documents: int | None = None, admission: AdmissionControl | None = None,
                 permit_cell: int = 0) -> None:
        self.settings = settings
        self.admission_control = admission  # shared with the other workers (see kg.admission)
        self.permit_cell = permit_cell
        self.expected_chars = 0  # the last document's size: what the next claim is sized by
        self.db_path = require_db(settings)
        self.worker_id = worker_id
        self.parent_pid = parent_pid
        self.max_documents = max_documents
        self.alive = True
        self.reopen_logs = False  # set by SIGUSR1; the loop reopens, never the handler
        self.stats = WorkerStats(worker_id=worker_id, counters=counters or SharedCounters())
        self.publisher = StatsPublisher(stats_map)
        self.log = WorkerLog(log, {"worker_id": worker_id, "content_id": None})
        # What the heartbeat says: the main thread's progress, marked at each step (counters.Progress).
        self.progress = Progress(beat=self.stats.counters.beat)
        # A pipe, not an Event: writing one is safe inside a signal handler, Event.set is not.
        self._wakeups = Doorbell()
        self._last_requeue = 0.0

    # -- process lifecycle -------------------------------------------------------------------

    def init_process(self) -> None:
        """Open this process's own connection, HTTP session and lease keeper."""
        self.stats.pid = os.getpid()
        self.owner = owner_name()
        self.db = WorkerDatabase(self.db_path, self.owner, self.log, self.stats, self.progress,
                                 watch_mode=self.settings.commit_watch)
        self.log.info("idle, this worker %s", self.db.commits.how)
        s = self.settings
        self.endpoints = EndpointPool.from_settings(s, self.worker_id)
        for endpoint in self.endpoints.endpoints:  # a request waits on its deadline: not hung
            endpoint.client.waiting = self.progress.parked
        control = self.admission_control
        self.admission = control.for_worker(self.permit_cell, lambda: not self.alive) if control else None
        self.dispatch = Dispatcher(self.endpoints, self.stats.counters, self.log, self.admission)
        self.documents = DocumentProcessor(s, self.db, self.dispatch, self.stats, self.log,
                                           busy=lambda: self.set_state(WorkerState.BUSY),
                                           progress=self.progress)
        self.progress.mark()
        self.keeper = LeaseKeeper(self.db_path, self.owner, s.lease_seconds, beat=self.publish,
                                  parent_pid=self.parent_pid, stop_claiming=self.stop_claiming,
                                  hang_timeout=s.hang_timeout)
        self.keeper.start()
        # Answers are written beside the sends (worker/writer.py); at most a batch of them waits.
        self.writer = AnswerWriter(self.db_path, self.stats, self.keeper.drop, s.batch_size)
        self.writer.start()
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
        self._wakeups.ring()

    def stop_claiming(self) -> None:
        """Called by the lease keeper when the supervisor is gone."""
        self.alive = False

    def handle_drain_signal(self, signum: int, frame: Any) -> None:
        """Under a supervisor: finish the document in hand, then exit; a repeat changes nothing."""
        self.alive = False
        self._wakeups.ring()

    def handle_stop_signal(self, signum: int, frame: Any) -> None:
        self.alive = False
        self._wakeups.ring()
        # The second signal interrupts even a blocking request; run() releases what is held.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def run(self, once: bool = False) -> int:
        """Loop until stopped (or, with `once`, for one claimed batch); returns the exit status.

        A database that cannot be written pauses the worker instead of killing it: it backs off,
        and the next iteration starts on a fresh connection by giving back every claim still
        held, uncharged. No document is failed because of the database.
        """
        self.log.info("worker started: db=%s service=%s batch=%d", describe(self.db_path),
                      self.settings.service_url, self.settings.batch_size)
        crashed = False
        try:
            while self.alive:
                self.progress.mark()
                try:
                    self.db.recover()
                    wait = self.loop_once(time.time())
                except Exception as exc:
                    if not is_database_fault(exc):
                        raise
                    wait = self.pause_for_database(exc)
                else:
                    self.db.pause.recovered()
                self.reopen_log_if_asked()
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

    def pause_for_database(self, exc: BaseException) -> float:
        """Roll back, note the claims to give back, pause; returns how long."""
        # The claims go back uncharged once the answers handed over are written (or dropped).
        self.writer.settle(self.progress)
        self.db.failed(exc)
        self.set_state(WorkerState.PAUSED)
        return self.db.pause.failed(exc)

    def reopen_log_if_asked(self) -> None:
        """After a SIGUSR1 (logrotate): reopen the log file here, outside the signal handler."""
        if self.reopen_logs:
            self.reopen_logs = False
            logs.reopen()
            self.log.info("log file reopened")

    def shutdown(self, release: bool = True) -> None:
        """Release anything still held, stop the keeper, close connections.

        After a crash (`release=False`) the claims are left to the supervisor, which charges the
        document in flight one crash (a poison pill after KG_POISON_AFTER): giving them back
        here, uncharged, would let a document that crashes workers do so forever.
        """
        self.set_state(WorkerState.STOPPING)
        self.writer.stop(self.progress)  # every answer handed over is written before the rest goes back
        released = self.db.release_all() if release else 0
        if released:
            self.log.info("released %d claimed document(s) back to pending", released)
        self.keeper.stop()
        self.endpoints.close()
        self.db.close()
        self.log.info("worker stopped: %d processed, %d succeeded, %d failed",
                      self.stats.total_processed, self.stats.total_success, self.stats.total_failed)

    # -- one iteration -----------------------------------------------------------------------

    def loop_once(self, now: float) -> float:
        """One iteration at wall-clock time `now`: claim one batch and see it through; returns
        how long to wait before the next (0: go again at once). A database fault propagates."""
        if not self.settings.service_enabled:
            self.set_state(WorkerState.DISABLED)
            return self.settings.poll_interval
        mono = time.monotonic()
        self.dispatch.probe_endpoints(mono)
        if self.endpoints.all_down:
            self.set_state(WorkerState.PAUSED)
            return self.endpoints.seconds_to_probe(mono)
        self.requeue_expired(now)
        self.writer.check()  # a write that failed pauses the worker before it claims more
        if not self.alive:  # stopped (or orphaned) since the loop last looked: claim nothing
            return 0.0
        # While the service is only on trial (a half-open breaker), one document finds out.
        limit = 1 if self.endpoints.trial_only else self.settings.batch_size
        if self.admission is not None:
            limit = self.admit_batch(limit)
            if not limit:  # it waited for a permit or for budget, holding nothing: look again
                return 0.0
            now = time.time()  # it may have waited for its permit: the claim and its lease start now
        try:
            with self.writer.claiming(self.progress):
                claims = self.db.retrying(lambda q: q.claim(
                    self.owner, uuid.uuid4().hex, limit, self.settings.lease_seconds, now))
            if not claims:
                return self.go_idle()
            self.process_batch(claims)
        finally:
            if self.admission is not None:
                self.admission.give_back()
        # A full batch means there is probably more: claim again at once (the upstream slept).
        if len(claims) == limit:
            return 0.0
        # A short one found the queue empty: this worker waits for work.
        return self.go_idle()

    def go_idle(self) -> float:
        """Idle once every answer is written (the stats then count them all); returns the poll interval."""
        self.writer.flush(self.progress)
        self.set_state(WorkerState.IDLE)
        return self.settings.poll_interval

    def requeue_expired(self, now: float) -> None:
        if now - self._last_requeue < min(REQUEUE_EXPIRED_EVERY, self.settings.lease_seconds / 2):
            return
        self._last_requeue = now
        count = self.db.retrying(lambda q: q.requeue_expired(now))
        if count:
            self.log.warning("put %d row(s) with expired leases back to pending (their owner vanished)", count)

    def process_batch(self, claims: list[Claim]) -> None:
        """Send each claimed document in order, handing each answer to the write-back thread; on
        stop or outage, release the ones not started once the answers handed over are written."""
        token = claims[0].token
        self.keeper.hold(token)
        try:
            for i, claim in enumerate(claims):
                self.progress.mark()
                if not self.alive or self.endpoints.all_down:
                    self.release_unstarted(claims[i:], stopping=not self.alive)
                    break
                if self.budgeted(claim) and not self.spend_budget(claim):
                    if not self.alive:  # stopped while waiting for budget: this one was not sent
                        self.release_unstarted(claims[i:], stopping=True)
                        break
                    continue  # failed: it can never fit the budget
                # A row with a problem has no usable content_id: it is failed with no document held.
                with self.holding(None if claim.problem else claim.content_id):
                    self.process_document(claim)
            if self.admission is not None:  # nothing more to send: others may, while this one writes
                self.admission.give_back()
        finally:
            self.writer.end_batch(token)  # the lease is kept until the answers handed over are written
            self.publish()

    def release_unstarted(self, claims: list[Claim], stopping: bool) -> None:
        """The answers handed over written first, the documents not sent back to pending, uncharged."""
        self.writer.flush(self.progress)
        self.documents.release_unstarted(claims, stopping=stopping)

    def process_document(self, claim: Claim) -> None:
        """Process one document of the batch; its answer goes to the write-back thread at once."""
        item = self.documents.process(claim)
        if item:
            self.writer.hand(item, self.progress)
        self.check_recycle()

    def holding(self, content_id: int | None) -> AbstractContextManager[None]:
        """This worker holds document `content_id` for the block: log lines, stats and counters name it."""
        return holding(self.log, self.stats, content_id)

    def check_recycle(self) -> None:
        """After max_documents the worker leaves cleanly, to be replaced by a fresh process."""
        def done() -> int:
            return self.stats.total_processed + self.stats.total_retried
        if not self.max_documents or self.writer.plus_unwritten(done) < self.max_documents:
            return
        # Counted as done once written: a write that fails raises here, and the pause sends them again.
        self.writer.flush(self.progress)
        if done() >= self.max_documents:
            if self.alive:
                self.log.info("recycling after %d documents", self.max_documents)
            self.alive = False

    # -- waiting and stats -------------------------------------------------------------------

    def wait_for_work(self, timeout: float) -> None:
        """Sleep up to `timeout`, waking early on a stop signal or on a commit by anyone else."""
        with self.progress.parked():  # bounded by `timeout`: idle is not hung
            self._wait_for_work(timeout)

    def _wait_for_work(self, timeout: float) -> None:
        # Watch for commits whenever the worker would claim next (idle, or after a partial
        # batch); not while paused, when a commit is no reason to call a service that is down.
        watch = self.db.commits if self.stats.state in (WorkerState.IDLE.value, WorkerState.BUSY.value) else None
        wait_for_commit(self._wakeups, watch, timeout, lambda: self.alive)

    def _woken(self, timeout: float) -> bool:
        """Sleep up to `timeout`; True when a signal (a stop, a log reopen) ended the sleep."""
        return self._wakeups.wait([], timeout)

    def set_state(self, state: WorkerState) -> None:
        if self.stats.state != state.value:
            self.stats.state = state.value
            self.publish()

    def publish(self) -> None:
        """Beat with the main thread's progress (the heartbeat ages while it is stuck outside a
        bounded wait), and copy the stats to the shared map when they changed (or every 10 s)."""
        self.stats.counters.beat(self.progress.heartbeat(BEAT_INTERVAL))
        if hasattr(self, "endpoints"):
            self.stats.kg_service = self.endpoints.status(self.settings.service_url, self.settings.service_enabled)
        self.publisher.publish_if_changed(self.stats)


def run_worker(settings: Settings, worker_id: int = 0, once: bool = False,
               stats_map: MutableMapping[Any, Any] | None = None) -> int:
    """Build, initialise and run one worker in this process (the `worker` command)."""
    # Alone, a worker has no in-flight limit to share; a rate budget it keeps (on PostgreSQL, with every host).
    worker = KGWorker(settings, worker_id, stats_map, admission=admission_control(settings, 1, shared=False))
    worker.init_process()
    worker.install_signal_handlers()
    return worker.run(once=once)
