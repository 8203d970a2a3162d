"""Supervisor: the parent process. It forks N workers, watches them, respawns them, obeys signals,
and each turn hands its reporter a snapshot of the pool."""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from contextlib import closing

from kgsupervisor import logs
from kgsupervisor.config import Settings, require_db
from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.lifeline import parent_gone
from kgsupervisor.pool.admission import PoolAdmission
from kgsupervisor.pool.manager import StatsManager
from kgsupervisor.pool.ports import Reporter, StatsStore, StatusServer
from kgsupervisor.pool.pruning import HistoryPruner
from kgsupervisor.pool.registry import HostRegistry
from kgsupervisor.pool.releases import ClaimReleaser
from kgsupervisor.pool.reload import check_startable, reloaded_settings, warn_start_only, worker_count
from kgsupervisor.pool.slots import WorkerProcess, describe_exit
from kgsupervisor.pool.snapshot import PoolSnapshot, QueueCounter, describe_slots, sum_counts
from kgsupervisor.pool.statuschild import StatusChild
from kgsupervisor.pool.wakeups import IDLE_TICK, TICK, Wakeups, hang_deadlines, quiet_pool
from kgsupervisor.pool.workers import Launch, WorkerPool
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.states import EXIT_OK, SupervisorState
from kgsupervisor.store.backend import backend_name, connect_to, describe
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.kgworker import owner_name
from kgsupervisor.worker.main import signals_held, worker_main
from kgsupervisor.worker.stats import iso_now

log = logging.getLogger("kgsupervisor.supervisor")

SECOND_SIGNAL_GRACE = 1.0  # a terminal and a process manager often send the same stop twice


class Supervisor:
    """The parent process. Signal handlers only queue the signal; the loop does the work."""

    def __init__(self, settings: Settings, reporter: Reporter, *, status_server: StatusServer | None = None,
                 reload_settings: Callable[[], Settings] | None = None, exit_when_empty: bool = False,
                 extra_close_fds: list[int] | None = None, parent_pid: int | None = None,
                 stats: StatsStore | None = None, launch: Launch | None = None) -> None:
        self.settings = settings
        self.db_path = require_db(settings)
        self.reporter = reporter
        self.reload_settings = reload_settings
        self.exit_when_empty = exit_when_empty
        self.extra_close_fds = list(extra_close_fds or [])
        self.parent_pid = parent_pid  # API mode: drain when the host process is gone
        self.stats = stats  # started by run() unless given
        self.ctx = multiprocessing.get_context("fork")
        self.pid = os.getpid()
        self.status = StatusChild(status_server, self.ctx, self.pid) if status_server else None
        self.state = SupervisorState.STARTING
        self.workers_restarted = 0
        self.started_at = iso_now()
        self.drain_deadline = 0.0
        self.stop_signal_at: float | None = None
        self.host = socket.gethostname()
        self.releaser = ClaimReleaser(self.db_path, self.host)
        self.registry = HostRegistry(self.db_path, self.host, self.pid)
        self.pruner = HistoryPruner(self.db_path)
        self.pool = WorkerPool(settings, launch or self.fork_worker, self.releaser)
        self.queue_counter = QueueCounter(self.db_path)
        self.wakeups = Wakeups()
        self.admission: PoolAdmission | None = None  # made in prepare(), before any fork

    # -- start and stop ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until drained; returns the exit status."""
        self.prepare()
        try:
            self.start(time.monotonic())
            while self.state is not SupervisorState.STOPPED:
                self.loop_once(self.wait_for_events(self.turn_timeout(time.monotonic())), time.monotonic())
        finally:
            self.halt()
        return EXIT_OK

    def prepare(self) -> None:
        """Before any fork: a startable configuration, earlier runs' orphans released, the
        status port bound (a busy one is an error now), the stats store and our handlers up."""
        check_startable(self.settings)
        self.releaser.release_orphans()
        if self.status is not None:
            self.extra_close_fds.append(self.status.bind())
        self.admission = self.pool.cells = PoolAdmission.start(self.settings, self.pid, self.extra_close_fds)
        if self.stats is None:
            self.stats = StatsManager(self.ctx, close_fds=self.extra_close_fds)
        self.wakeups.install(self.parent_pid)
        self.reporter.start()

    def sync_inflight_max(self) -> None:
        if self.admission is not None:
            self.admission.set_max(self.pool.num_workers)

    def start(self, now: float) -> None:
        """Fork the status process and the workers; the pool runs."""
        if self.status is not None:
            self.spawn_status_process()
        self.pool.manage(now)
        self.change_state(SupervisorState.RUNNING)  # STARTING -> RUNNING
        if self.status is not None:
            self.registry.status_addr = self.status.server.address()
        self.refresh_registry(now)
        log.info("supervisor started: pid %d, %d worker(s), db=%s, service=%s", self.pid,
                 self.pool.num_workers, describe(self.db_path), self.settings.service_url)

    def child_fds(self) -> list[int]:
        """Our descriptors a child must close: the wake pipe, the pidfile lock, the status port."""
        return self.wakeups.fds() + self.extra_close_fds

    def spawn_status_process(self) -> None:
        """Fork the status endpoint's process; the reporter answers its requests."""
        self.reporter.controls.append(self.status.start(self.child_fds()))
        log.info("status endpoint on http://%s (the console at /, /health /stats /metrics)",
                 self.status.server.address())

    def watch_status_process(self) -> None:
        """Restart a dead status process, while running only: a drain does not need one."""
        if self.state is not SupervisorState.RUNNING or self.status is None or not self.status.gone():
            return
        log.error("status process (pid %d) %s; restarting it", self.status.process.pid,
                  describe_exit(self.status.process.exitcode))
        self.spawn_status_process()

    def halt(self) -> None:
        """Last resort and normal end alike: no worker left behind, no claim left held."""
        self.pool.kill_all()
        self.registry.stop()
        if self.status is not None:
            self.status.stop()
        self.reporter.notify("STOPPING=1")
        self.reporter.finish()
        if self.stats is not None:
            self.stats.shutdown()
        if self.admission is not None:
            self.admission.close()
        self.wakeups.uninstall()

    # -- the loop ----------------------------------------------------------------------------

    def wait_for_events(self, timeout: float) -> list[int]:
        """Sleep until a signal, a child exit, a control request, the host process's exit (API
        mode), or `timeout`; the signals."""
        status = self.status.process if self.status is not None else None
        others = [status.sentinel] if status is not None and status.is_alive() else []
        return self.wakeups.wait([w.process.sentinel for w in self.pool.processes()] + self.reporter.controls
                                 + others, timeout)

    def turn_timeout(self, now: float) -> float:
        """How long the loop may sleep: TICK while anything is under way, else until the next
        deadline (a hang timeout, the registry row, a watchdog ping), IDLE_TICK at most."""
        busy = self.exit_when_empty or self.wakeups.parent_unwatched(self.parent_pid) or not quiet_pool(self.pool)
        if self.state is not SupervisorState.RUNNING or busy:
            return TICK
        due = [IDLE_TICK, self.registry.due_in(now, self.settings.lease_seconds), self.reporter.due_in(now)]
        return max(TICK, min(due + hang_deadlines(self.pool, self.settings.hang_timeout)))

    def loop_once(self, sigs: list[int], now: float) -> None:
        """One turn at monotonic time `now`: dispatch signals, reap, kill hung workers, converge
        the pool, publish."""
        for sig in sigs:
            handler = getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}", None)
            if handler:
                handler(now)
        running = self.state is SupervisorState.RUNNING
        self.pool.reap(now, respawn=running)
        self.releaser.retry_refused(self.settings.poison_after, {w.pid for w in self.pool.processes()})
        self.pool.watch(recycle=running)
        if running:
            self.stats.ensure_running(self.on_manager_restart)
            self.pool.manage(now)
            self.check_exit_when_empty(now)
            if parent_gone(self.parent_pid):
                self.begin_drain("host process exited", now)
        elif self.state is SupervisorState.STOPPING:
            self.check_drain(now)
        self.watch_status_process()
        if self.admission is not None:
            self.admission.watch(self.settings, self.state is SupervisorState.RUNNING, self.pool.retire_all)
        self.refresh_registry(now)
        self.pruner.prune_if_due(self.settings.history_days, now)
        if self.reporter.wants_snapshot(now):
            self.reporter.publish(self.snapshot(now))

    def refresh_registry(self, now: float) -> None:
        """This supervisor's row in the registry of hosts, when due (status --all reads it)."""
        self.registry.refresh(now, self.state, self.pool, self.settings.lease_seconds,
                              paused=self.queue_counter.paused is not None)

    def snapshot(self, now: float) -> PoolSnapshot:
        """The pool as it is this turn, for the reporter."""
        return PoolSnapshot(
            clock=now, taken_at=iso_now(), pid=self.pid, host=self.host, state=self.state,
            started_at=self.started_at, workers_restarted=self.workers_restarted,
            manager_restarts=self.stats.restarts,
            database={"backend": backend_name(self.db_path), "name": describe(self.db_path)},
            service_url=self.settings.service_url, service_enabled=self.settings.service_enabled,
            hang_timeout=self.settings.hang_timeout,
            workers=describe_slots(self.pool.slots, self.pool.num_workers, self.stats.snapshot(),
                                   time.time()),
            totals=sum_counts(self.pool.slots.values()), queue_size=self.queue_counter.counts(now),
            paused=self.queue_counter.paused,  # after the counts: read with them
            admission=self.admission.describe() if self.admission is not None else [])

    # -- signals -----------------------------------------------------------------------------

    def handle_term(self, now: float) -> None:
        """SIGTERM: drain. Claim nothing new, let in-flight documents finish, then exit 0.
        A second one (after a second's grace): stop now, releasing every claim."""
        if self.state is SupervisorState.STOPPING:
            if self.stop_signal_at is None or now - self.stop_signal_at >= SECOND_SIGNAL_GRACE:
                log.warning("second stop signal: stopping now; unfinished documents go back to pending")
                self.change_state(SupervisorState.STOPPED)  # STOPPING -> STOPPED
            return
        self.stop_signal_at = now
        self.begin_drain("stop signal", now)

    handle_int = handle_term

    def handle_hup(self, now: float) -> None:
        """SIGHUP: reload config file and environment, then restart every worker, new before old.
        A configuration no worker could start with is refused: the running one and its workers stay."""
        if self.state is not SupervisorState.RUNNING:
            return
        self.reporter.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            settings = reloaded_settings(self.settings, self.reload_settings)
        except KGSupervisorError as exc:
            log.error("reload refused, keeping the running configuration and workers: %s", exc)
        else:
            self.pool.num_workers = worker_count(self.settings, settings, self.pool.num_workers)
            self.sync_inflight_max()
            warn_start_only(self.settings, settings)
            self.settings = self.pool.settings = settings
            self.workers_restarted += 1
            log.info("reloading: restarting %d worker(s) (restart #%d)", self.pool.num_workers,
                     self.workers_restarted)
            self.pool.retire_all()
            self.pool.manage(now)
        self.reporter.notify("READY=1")

    def handle_ttin(self, now: float) -> None:
        """SIGTTIN: one worker more."""
        self.pool.num_workers += 1
        self.sync_inflight_max()
        log.info("SIGTTIN: now %d worker(s)", self.pool.num_workers)

    def handle_ttou(self, now: float) -> None:
        """SIGTTOU: one worker fewer (never below one)."""
        self.pool.num_workers = max(1, self.pool.num_workers - 1)
        self.sync_inflight_max()
        log.info("SIGTTOU: now %d worker(s)", self.pool.num_workers)

    def handle_usr1(self, now: float) -> None:
        """SIGUSR1: reopen log files (after logrotate)."""
        logs.reopen()
        for worker in self.pool.processes():
            worker.signal(signal.SIGUSR1)
        log.info("log files reopened (workers told too)")

    def handle_chld(self, now: float) -> None:
        """SIGCHLD: nothing to do here; the pool is reaped on every turn of the loop."""

    # -- workers -----------------------------------------------------------------------------

    def fork_worker(self, worker_id: int, max_documents: int | None, now: float) -> WorkerProcess:
        """The real launch: fork a worker process (see worker.main)."""
        counters = SharedCounters()
        cell = self.pool.cells.allocate() if self.pool.cells is not None else None
        process = self.ctx.Process(
            target=worker_main, name=f"kgsupervisor-worker-{worker_id}", daemon=False,
            args=(self.settings, worker_id, self.stats.map, counters, self.pid, max_documents,
                  self.child_fds(), self.admission.control if self.admission else None, cell))
        with signals_held():
            process.start()
        return WorkerProcess(process, counters, owner_name(process.pid), started_mono=now, permit_cell=cell)

    def on_manager_restart(self) -> None:
        """The stats Manager was recreated: restart workers so they publish into the new one."""
        self.pool.retire_all()

    # -- draining ----------------------------------------------------------------------------

    def begin_drain(self, why: str, now: float) -> None:
        """Claim nothing new; every worker finishes its document and leaves, by the deadline."""
        self.change_state(SupervisorState.STOPPING)  # RUNNING -> STOPPING
        self.reporter.notify("STOPPING=1")
        self.drain_deadline = now + self.settings.drain_timeout
        self.pool.stop_all()
        # Logged once every worker was told: a reader of this line knows none claims anew.
        log.info("draining (%s): no new claims; in-flight documents get up to %.0fs",
                 why, self.settings.drain_timeout)

    def check_drain(self, now: float) -> None:
        """Stop once every worker has left; at the deadline, kill those still there."""
        alive = [w for w in self.pool.processes() if w.process.is_alive()]
        if not alive:
            # The last ones may have exited since this turn's reap: reap them too, so that
            # their exit is logged and a crash still charges the document it was working on.
            self.pool.reap(now, respawn=False)
            log.info("drained: all workers stopped")
            self.change_state(SupervisorState.STOPPED)  # STOPPING -> STOPPED
        elif now >= self.drain_deadline:
            log.warning("drain timeout: killing %d worker(s); their documents go back to pending", len(alive))
            for worker in alive:
                worker.kill_reason = "drain timeout"
                worker.signal(signal.SIGKILL)
                worker.process.join(5)
            self.pool.reap(now, respawn=False)
            self.change_state(SupervisorState.STOPPED)  # STOPPING -> STOPPED

    def check_exit_when_empty(self, now: float) -> None:
        """With --exit-when-empty: drain once nothing is pending or processing."""
        if not self.exit_when_empty:
            return
        try:
            with closing(connect_to(self.db_path)) as conn:
                if queue_for(conn).has_live_work():
                    return
        except Exception as exc:  # busy or gone for now: ask again next turn
            log.warning("could not check whether the queue is empty: %s", exc)
            return
        self.begin_drain("queue is empty", now)

    def change_state(self, state: SupervisorState) -> None:
        """The one writer of the supervisor's state."""
        if state is not self.state:
            log.debug("supervisor %s -> %s", self.state.value, state.value)
            self.state = state
