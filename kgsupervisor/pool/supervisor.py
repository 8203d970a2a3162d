"""Supervisor: fork N workers, watch them with psutil, respawn, obey signals, gather stats."""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from typing import Any

from kgsupervisor import config, logs
from kgsupervisor.config import Settings, require_db
from kgsupervisor.errors import ConfigError, DatabaseError, KGSupervisorError
from kgsupervisor.masking import secrets_of
from kgsupervisor.ops import statusd
from kgsupervisor.ops.reporting import Reporter
from kgsupervisor.pool.manager import StatsManager
from kgsupervisor.pool.procname import set_process_name
from kgsupervisor.pool.releases import ClaimReleaser
from kgsupervisor.pool.slots import WorkerProcess, WorkerSlot, describe_exit
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.states import EXIT_BOOT_ERROR, EXIT_ERROR, EXIT_OK, SupervisorState, WorkerState
from kgsupervisor.store.backend import check_writable, connect_to, describe
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.kgworker import KGWorker, owner_name
from kgsupervisor.worker.stats import iso_now

log = logging.getLogger("kgsupervisor.supervisor")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU,
                   signal.SIGUSR1, signal.SIGCHLD)
TICK = 0.5
BOOT_ERROR_BACKOFF = 1.0  # a worker that could not open the database will not a moment later either
SECOND_SIGNAL_GRACE = 1.0  # a terminal and a process manager often send the same stop twice
# Settings read once at start: a reload that changes them says they wait for a restart.
START_ONLY = ("status_addr", "pidfile", "log_format", "log_file")
EXIT_HINTS = {
    -signal.SIGKILL: " (perhaps out of memory?)",
    -signal.SIGBUS: " (the database's -shm file could not be written: immutable (chattr +i) or a "
                    "failing disk? its documents go back uncharged)",
}


def worker_main(settings: Settings, worker_id: int, stats_map: Any, counters: SharedCounters,
                parent_pid: int, max_documents: int | None, close_fds: list[int]) -> None:
    """Entry point of a forked worker: shed the parent's handles, then run the worker loop."""
    signal.set_wakeup_fd(-1)
    set_process_name(f"kgs-worker-{worker_id}")
    logs.mask_secrets(secrets_of(settings))  # a reload may have brought a new token
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    worker = KGWorker(settings, worker_id, stats_map, counters, parent_pid, max_documents)
    worker.install_supervised_signal_handlers()
    # Held since the fork (see signals_held): a SIGTERM sent meanwhile reaches the worker now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    try:
        worker.init_process()
    except (DatabaseError, ConfigError) as exc:
        logging.getLogger("kgsupervisor.worker").error("worker %d cannot start: %s", worker_id, exc)
        raise SystemExit(EXIT_BOOT_ERROR)
    raise SystemExit(worker.run())


def check_startable(settings: Settings) -> None:
    """Everything a worker needs, checked before any fork, at start and on reload alike:
    valid values, a database path, a readable token, a schema-checked writable database."""
    config.validate(settings)
    require_db(settings)
    settings.token()  # a token file gone or unreadable would make every new worker exit 3
    check_writable(settings.db_path)


def reloader(flags: Mapping[str, Any], config_file: str | None = None) -> Callable[[], Settings]:
    """Settings built again as at start: the same flags (or API keyword arguments) over the
    environment, over the config file read anew, over the defaults."""
    flags = dict(flags)
    return lambda: config.load(flags, os.environ, config_file)[0]


@contextmanager
def signals_held() -> Iterator[None]:
    """Block our signals across a worker fork; the child unblocks them once its handlers are in."""
    # Otherwise a signal in the child's first instants runs the inherited supervisor handler,
    # which queues it in the child's useless copy of the supervisor: a drain's SIGTERM is lost
    # and the worker runs on until the drain timeout kills it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class Supervisor:
    """The parent process. Signal handlers only queue the signal; the loop does the work."""

    def __init__(self, settings: Settings, *, reload_settings: Callable[[], Settings] | None = None,
                 exit_when_empty: bool = False, control: multiprocessing.connection.Connection | None = None,
                 extra_close_fds: list[int] | None = None, parent_pid: int | None = None,
                 status_addr: tuple[str, int] | None = None) -> None:
        self.settings = settings
        self.db_path = require_db(settings)
        self.reload_settings = reload_settings
        self.exit_when_empty = exit_when_empty
        self.extra_close_fds = list(extra_close_fds or [])
        self.status_addr = status_addr
        self.status_process: multiprocessing.process.BaseProcess | None = None
        self.reporter = Reporter(self)
        if control is not None:
            self.reporter.controls.append(control)
        self.parent_pid = parent_pid  # API mode: drain when the host process is gone
        self.ctx = multiprocessing.get_context("fork")
        self.state = SupervisorState.STARTING
        self.num_workers = settings.num_workers
        self.slots: dict[int, WorkerSlot] = {}
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.workers_restarted = 0
        self.started_at = iso_now()
        self.drain_deadline = 0.0
        self.stop_signal_at = 0.0
        self.exit_status = EXIT_OK
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.releaser = ClaimReleaser(self.db_path, self.host)

    # -- start and stop ----------------------------------------------------------------------

    def run(self) -> int:
        """Run until drained; returns the exit status."""
        check_startable(self.settings)
        self.releaser.release_orphans()
        status_sock = statusd.bind(self.status_addr) if self.status_addr else None
        if status_sock is not None:
            self.extra_close_fds.append(status_sock.fileno())
            self.status_sock = status_sock
        self.stats = StatsManager(self.ctx, close_fds=self.extra_close_fds)
        self.install_signal_handlers()
        self.reporter.progress_handler = logs.attach_progress_line()
        try:
            if status_sock is not None:
                self.spawn_status_process()
            self.manage_workers()
            self.change_state(SupervisorState.RUNNING)
            log.info("supervisor started: pid %d, %d worker(s), db=%s, service=%s", self.pid,
                     self.num_workers, describe(self.db_path), self.settings.service_url)
            while self.state is not SupervisorState.STOPPED:
                self.loop_once(self.wait_for_events(TICK))
        finally:
            self.halt()
        return self.exit_status

    def spawn_status_process(self) -> None:
        """The status endpoint, in a child of its own: no thread in this forking process."""
        mine, theirs = self.ctx.Pipe()
        close_fds = [self._wake_r, self._wake_w] + [fd for fd in self.extra_close_fds
                                                     if fd != self.status_sock.fileno()]
        self.status_process = self.ctx.Process(target=statusd.status_main, name="kgsupervisor-status",
                                               args=(self.status_sock, theirs, self.pid, close_fds))
        with signals_held():
            self.status_process.start()
        theirs.close()
        self.reporter.controls.append(mine)
        host, port = self.status_sock.getsockname()[:2]
        log.info("status endpoint on http://%s (/health /stats /metrics)", logs.host_port(host, port))

    def watch_status_process(self) -> None:
        """Restart a dead status process, while running only: a drain does not need one."""
        if self.state is not SupervisorState.RUNNING:
            return
        if self.status_process is not None and not self.status_process.is_alive():
            self.status_process.join()
            log.error("status process (pid %d) %s; restarting it", self.status_process.pid,
                      describe_exit(self.status_process.exitcode))
            self.spawn_status_process()

    def install_signal_handlers(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.queue_signal)
        # `kgsupervisor run` holds them from its first instant: one sent during start-up is
        # delivered now, queued, and handled by the first turn of the loop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def queue_signal(self, signum: int, frame: Any) -> None:
        """Signal handler - no logging, no killing: just queue the signal."""
        self.signals.put_nowait(signum)

    def halt(self) -> None:
        """Last resort and normal end alike: no worker left behind, no claim left held."""
        for slot in self.slots.values():
            for worker in slot.processes():
                if worker.process.is_alive():
                    worker.kill_reason = worker.kill_reason or "supervisor stopping"
                    worker.signal(signal.SIGKILL)
                    worker.process.join(5)
                self.releaser.release_gone_worker(worker.owner, worker.pid, False, "", self.settings.poison_after)
        if self.status_process is not None and self.status_process.is_alive():
            self.status_process.terminate()
            self.status_process.join(2)
            if self.status_process.is_alive():  # it holds nothing: never wait on it
                self.status_process.kill()
                self.status_process.join(2)
        self.reporter.notify("STOPPING=1")
        if self.reporter.progress_handler is not None:
            self.reporter.progress_handler.finish()
        if hasattr(self, "stats"):
            self.stats.shutdown()
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if hasattr(self, "_wake_r"):
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- the loop ----------------------------------------------------------------------------

    def wait_for_events(self, timeout: float) -> list[int]:
        """Sleep until a signal, a child exit, a control request, or `timeout`."""
        waitables: list[Any] = [self._wake_r]
        waitables += [w.process.sentinel for s in self.slots.values() for w in s.processes()]
        waitables += self.reporter.controls
        multiprocessing.connection.wait(waitables, timeout)
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        sigs = []
        while True:
            try:
                sigs.append(self.signals.get_nowait())
            except queue.Empty:
                return sigs

    def loop_once(self, sigs: list[int]) -> None:
        """One turn: dispatch signals, reap, kill hung workers, converge the pool, publish."""
        for sig in sigs:
            handler = getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}", None)
            if handler:
                handler()
        self.reap_workers()
        self.releaser.retry_refused(self.settings.poison_after,
                                    {w.pid for s in self.slots.values() for w in s.processes()})
        self.watch_workers()
        if self.state is SupervisorState.RUNNING:
            self.stats.ensure_running(self.on_manager_restart)
            self.manage_workers()
            self.check_exit_when_empty()
            if self.parent_pid is not None and os.getppid() != self.parent_pid:
                self.begin_drain("host process exited")
        elif self.state is SupervisorState.STOPPING:
            self.check_drain()
        self.watch_status_process()
        self.reporter.publish()
        self.reporter.answer()

    # -- signals -----------------------------------------------------------------------------

    def handle_term(self) -> None:
        """SIGTERM: drain. Claim nothing new, let in-flight documents finish, then exit 0.
        A second one (after a second's grace): stop now, releasing every claim."""
        now = time.monotonic()
        if self.state is SupervisorState.STOPPING:
            if now - self.stop_signal_at >= SECOND_SIGNAL_GRACE:
                log.warning("second stop signal: stopping now; unfinished documents go back to pending")
                self.change_state(SupervisorState.STOPPED)
            return
        self.stop_signal_at = now
        self.begin_drain("stop signal")

    handle_int = handle_term

    def handle_hup(self) -> None:
        """SIGHUP: reload config file and environment, then restart every worker, new before old.
        A configuration no worker could start with is refused: the running one and its workers stay."""
        if self.state is not SupervisorState.RUNNING:
            return
        self.reporter.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self.apply_settings(self.reloaded_settings())
        except KGSupervisorError as exc:
            log.error("reload refused, keeping the running configuration and workers: %s", exc)
        else:
            self.workers_restarted += 1
            log.info("reloading: restarting %d worker(s) (restart #%d)", self.num_workers, self.workers_restarted)
            for slot in list(self.slots.values()):
                self.retire(slot)
            self.manage_workers()
        self.reporter.notify("READY=1")

    def reloaded_settings(self) -> Settings:
        """The configuration read anew, checked as a start checks it (ConfigError, DatabaseError)."""
        if self.reload_settings is None:
            return self.settings
        settings = self.reload_settings()
        check_startable(settings)
        if settings.db_path != self.settings.db_path:
            # The supervisor's releases and counts stay on the database it started with.
            raise ConfigError("KG_DB_PATH", describe(settings.db_path),
                              f"the running database {describe(self.db_path)} (another one needs a restart)")
        return settings

    def apply_settings(self, settings: Settings) -> None:
        """Take the reloaded settings; a worker count set by SIGTTIN/SIGTTOU stays unless the
        configuration itself changed it."""
        if settings.num_workers != self.settings.num_workers:
            self.num_workers = settings.num_workers
        elif self.num_workers != settings.num_workers:
            log.info("keeping %d worker(s) set by SIGTTIN/SIGTTOU (configured: %d)",
                     self.num_workers, settings.num_workers)
        waiting = [name for name in START_ONLY if getattr(settings, name) != getattr(self.settings, name)]
        if waiting:
            log.warning("reload: %s changed; taking effect at the next start", ", ".join(waiting))
        self.settings = settings

    def handle_ttin(self) -> None:
        """SIGTTIN: one worker more."""
        self.num_workers += 1
        log.info("SIGTTIN: now %d worker(s)", self.num_workers)

    def handle_ttou(self) -> None:
        """SIGTTOU: one worker fewer (never below one)."""
        self.num_workers = max(1, self.num_workers - 1)
        log.info("SIGTTOU: now %d worker(s)", self.num_workers)

    def handle_usr1(self) -> None:
        """SIGUSR1: reopen log files (after logrotate)."""
        logs.reopen()
        for slot in self.slots.values():
            for worker in slot.processes():
                worker.signal(signal.SIGUSR1)
        log.info("log files reopened (workers told too)")

    def handle_chld(self) -> None:
        """SIGCHLD: nothing to do here; reap_workers runs on every turn of the loop."""

    # -- workers -----------------------------------------------------------------------------

    def manage_workers(self) -> None:
        """Converge the pool to num_workers: respawn empty slots when due, retire extra ones."""
        now = time.monotonic()
        for worker_id in range(self.num_workers):
            slot = self.slots.setdefault(worker_id, WorkerSlot(worker_id))
            if slot.current is None and now >= slot.respawn_at:
                self.spawn_worker(slot)
        for worker_id in sorted(self.slots):
            slot = self.slots[worker_id]
            if worker_id >= self.num_workers and slot.current is not None:
                self.retire(slot)

    def spawn_worker(self, slot: WorkerSlot) -> None:
        counters = SharedCounters()
        limit = self.settings.max_documents_per_worker
        # Jitter, so that workers started together are not all recycled together.
        limit = limit + random.randint(0, max(1, limit // 10)) if limit else None
        close_fds = [self._wake_r, self._wake_w] + self.extra_close_fds
        process = self.ctx.Process(
            target=worker_main, name=f"kgsupervisor-worker-{slot.worker_id}", daemon=False,
            args=(self.settings, slot.worker_id, self.stats.map, counters, self.pid, limit, close_fds))
        with signals_held():
            process.start()
        slot.current = WorkerProcess(process, counters, owner_name(process.pid))
        log.info("worker %d started (pid %d)", slot.worker_id, process.pid)

    def retire(self, slot: WorkerSlot) -> None:
        """Ask the slot's worker to finish its document and leave; the slot is free at once."""
        worker = slot.current
        if worker is None:
            return
        worker.stop_requested = True
        worker.signal(signal.SIGTERM)
        slot.retiring.append(worker)
        slot.current = None
        slot.backoff, slot.respawn_at = 0.0, 0.0

    def reap_workers(self) -> None:
        """Collect every exited worker: release its claims at once, record why, schedule respawn."""
        now = time.monotonic()
        for slot in self.slots.values():
            for worker in slot.processes():
                if worker.process.is_alive():
                    continue
                worker.process.join()
                self.classify_exit(slot, worker, now)

    def classify_exit(self, slot: WorkerSlot, worker: WorkerProcess, now: float) -> None:
        code = worker.process.exitcode
        cause = worker.kill_reason or describe_exit(code)
        crashed = code != EXIT_OK and not (worker.stop_requested and worker.kill_reason == "drain timeout")
        # Only a worker with a document in hand can have been killed by it. A SIGBUS is a
        # memory-mapped file that could not be written (SQLite's -shm made immutable, a
        # failing disk), never a document.
        charged = crashed and code != -signal.SIGBUS and self.had_document_in_hand(slot, worker)
        # Release before respawn: the replacement must find the documents pending.
        self.releaser.release_gone_worker(worker.owner, worker.pid, charged, cause, self.settings.poison_after)
        slot.fold(worker)
        backoff = ""
        if worker is slot.current:
            slot.current = None
            slot.last_exit = cause
            if self.state is SupervisorState.RUNNING:
                slot.restarts += 1
                slot.schedule_respawn(worker, crashed, now,
                                      floor=BOOT_ERROR_BACKOFF if code == EXIT_BOOT_ERROR else 0.0)
                backoff = f"; respawn in {slot.backoff:.1f}s" if slot.backoff else ""
        else:
            slot.retiring.remove(worker)
        level = logging.INFO if not crashed else (
            logging.ERROR if code in (-signal.SIGKILL, -signal.SIGBUS, EXIT_ERROR) else logging.WARNING)
        hint = EXIT_HINTS.get(code, "") if not worker.kill_reason else ""
        log.log(level, "worker %d (pid %d) %s%s%s", slot.worker_id, worker.pid, cause, hint, backoff)

    def had_document_in_hand(self, slot: WorkerSlot, worker: WorkerProcess) -> bool:
        """Its last published state was busy, or is unknown: not paused, idle or stopping."""
        published = self.stats.snapshot().get(slot.worker_id) or {}
        return published.get("pid") != worker.pid or published.get("state") == WorkerState.BUSY.value

    def watch_workers(self) -> None:
        """psutil and heartbeat checks: kill hung workers, recycle ones over the memory limit."""
        now_wall = time.time()
        limit = self.settings.max_worker_rss_mb * 1024 * 1024
        over_limit = []
        for slot in self.slots.values():
            worker = slot.current
            if worker is None or not worker.sample():
                continue
            age = worker.counters.heartbeat_age(now_wall)
            if age > self.settings.hang_timeout and worker.kill_reason is None:
                worker.kill_reason = f"hung: no heartbeat for {age:.0f}s"
                log.error("worker %d (pid %d) %s; killing it", slot.worker_id, worker.pid, worker.kill_reason)
                worker.signal(signal.SIGKILL)
            elif limit and worker.rss_bytes > limit:
                over_limit.append(slot)
        self.recycle_one(over_limit)

    def recycle_one(self, over_limit: list[WorkerSlot]) -> None:
        """Retire the oldest worker over the memory limit; one at a time keeps the pool working."""
        # Oldest first gives every slot its turn: slot 0 first would starve the others when
        # even a fresh worker is over the limit.
        recycling = any(w.stop_requested for s in self.slots.values() for w in s.retiring)
        if not over_limit or recycling or self.state is not SupervisorState.RUNNING:
            return
        slot = min(over_limit, key=lambda s: s.current.started_mono)
        log.info("worker %d (pid %d) uses %.0f MiB, over the limit: recycling it",
                 slot.worker_id, slot.current.pid, slot.current.rss_bytes / 2**20)
        self.retire(slot)

    def on_manager_restart(self) -> None:
        """The stats Manager was recreated: restart workers so they publish into the new one."""
        for slot in list(self.slots.values()):
            self.retire(slot)

    # -- draining ----------------------------------------------------------------------------

    def begin_drain(self, why: str) -> None:
        self.change_state(SupervisorState.STOPPING)
        self.reporter.notify("STOPPING=1")
        self.drain_deadline = time.monotonic() + self.settings.drain_timeout
        for slot in self.slots.values():
            for worker in slot.processes():
                worker.stop_requested = True
                worker.signal(signal.SIGTERM)
        # Logged once every worker was told: a reader of this line knows none claims anew.
        log.info("draining (%s): no new claims; in-flight documents get up to %.0fs",
                 why, self.settings.drain_timeout)

    def check_drain(self) -> None:
        alive = [w for s in self.slots.values() for w in s.processes() if w.process.is_alive()]
        if not alive:
            # The last ones may have exited since this turn's reap: reap them too, so that
            # their exit is logged and a crash still charges the document it was working on.
            self.reap_workers()
            log.info("drained: all workers stopped")
            self.change_state(SupervisorState.STOPPED)
        elif time.monotonic() >= self.drain_deadline:
            log.warning("drain timeout: killing %d worker(s); their documents go back to pending", len(alive))
            for worker in alive:
                worker.kill_reason = "drain timeout"
                worker.signal(signal.SIGKILL)
                worker.process.join(5)
            self.reap_workers()
            self.change_state(SupervisorState.STOPPED)

    def check_exit_when_empty(self) -> None:
        if not self.exit_when_empty:
            return
        try:
            with closing(connect_to(self.db_path)) as conn:
                if queue_for(conn).has_live_work():
                    return
        except Exception as exc:  # busy or gone for now: ask again next turn
            log.warning("could not check whether the queue is empty: %s", exc)
            return
        self.begin_drain("queue is empty")

    def change_state(self, state: SupervisorState) -> None:
        if state is not self.state:
            log.debug("supervisor %s -> %s", self.state.value, state.value)
            self.state = state

