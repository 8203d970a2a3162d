"""The pool of worker slots: converged to a count, reaped, watched; the supervisor decides when."""
from __future__ import annotations

import logging
import random
import signal
import time
from collections.abc import Callable

from kgsupervisor.config import Settings
from kgsupervisor.pool.admission import PoolAdmission
from kgsupervisor.pool.releases import ClaimReleaser
from kgsupervisor.pool.slots import WorkerProcess, WorkerSlot, describe_exit, exit_level
from kgsupervisor.pool.stacks import CAPTURE_TIMEOUT
from kgsupervisor.states import EXIT_BOOT_ERROR

log = logging.getLogger("kgsupervisor.supervisor")

BOOT_ERROR_BACKOFF = 1.0  # a worker that could not open the database will not a moment later either

# Starts a worker for a slot: (worker_id, max_documents, now) -> the process, running.
Launch = Callable[[int, "int | None", float], WorkerProcess]


class WorkerPool:
    """Numbered slots, each with at most one current process and any retiring ones."""

    def __init__(self, settings: Settings, launch: Launch, releaser: ClaimReleaser) -> None:
        self.settings = settings  # the supervisor's, replaced on reload
        self.launch = launch
        self.releaser = releaser
        self.num_workers = settings.num_workers
        self.slots: dict[int, WorkerSlot] = {}
        self.cells: PoolAdmission | None = None  # set by the supervisor when its workers share permits

    def processes(self) -> list[WorkerProcess]:
        """Every worker process of every slot, current and retiring."""
        return [w for slot in self.slots.values() for w in slot.processes()]

    def manage(self, now: float) -> None:
        """Converge the pool to num_workers: respawn empty slots when due, retire extra ones."""
        for worker_id in range(self.num_workers):
            slot = self.slots.setdefault(worker_id, WorkerSlot(worker_id))
            if slot.due(now):
                self.spawn(slot, now)
        for worker_id in sorted(self.slots):
            if worker_id >= self.num_workers:
                self.retire(self.slots[worker_id])

    def spawn(self, slot: WorkerSlot, now: float) -> None:
        limit = self.settings.max_documents_per_worker
        # Jitter, so that workers started together are not all recycled together.
        limit = limit + random.randint(0, max(1, limit // 10)) if limit else None
        slot.occupy(self.launch(slot.worker_id, limit, now))
        log.info("worker %d started (pid %d)", slot.worker_id, slot.current.pid)

    def retire(self, slot: WorkerSlot) -> None:
        """Ask the slot's worker to finish its document and leave; the slot is free at once."""
        worker = slot.current
        if worker is None:
            return
        worker.stop_requested = True
        worker.signal(signal.SIGTERM)
        slot.vacate()

    def retire_all(self) -> None:
        for slot in list(self.slots.values()):
            self.retire(slot)

    def stop_all(self) -> None:
        """Tell every process to finish its document and leave; no slot is refilled after."""
        for worker in self.processes():
            worker.stop_requested = True
            worker.signal(signal.SIGTERM)

    def kill_all(self) -> None:
        """The last resort: SIGKILL whatever still runs, and give back every claim, uncharged."""
        for worker in self.processes():
            if worker.process.is_alive():
                worker.kill_reason = worker.kill_reason or "supervisor stopping"
                worker.signal(signal.SIGKILL)
                worker.process.join(5)
            self.releaser.release_gone_worker(worker.owner, worker.pid, False, "", self.settings.poison_after,
                                              in_flight=worker.in_flight())  # its sent time, uncharged

    def reap(self, now: float, respawn: bool) -> None:
        """Collect every exited worker: release its claims at once, record why, schedule respawn."""
        for slot in self.slots.values():
            for worker in slot.processes():
                if worker.process.is_alive():
                    continue
                worker.process.join()
                self.classify_exit(slot, worker, now, respawn)

    def classify_exit(self, slot: WorkerSlot, worker: WorkerProcess, now: float, respawn: bool) -> None:
        """Give back the claims of an exited worker, say why it went, and free its slot."""
        code = worker.process.exitcode
        cause = worker.kill_reason or describe_exit(code)
        # Only the document a worker was sending (its shared memory names the claim) can have
        # killed it: not one it had not sent yet, nor an answer waiting for its write-back. A
        # SIGBUS is a memory-mapped file that could not be written (SQLite's -shm made
        # immutable, a failing disk), never a document.
        in_flight = worker.in_flight()
        charged = worker.crashed and code != -signal.SIGBUS and in_flight is not None
        # Release before respawn: the replacement must find the documents pending.
        self.releaser.release_gone_worker(worker.owner, worker.pid, charged, cause,
                                          self.settings.poison_after, worker=slot.worker_id,
                                          stack=worker.stack, in_flight=in_flight)
        if self.cells is not None:  # its permits: a worker killed holding one would keep it for good
            self.cells.free(worker.permit_cell)
        was_current = worker is slot.current
        slot.exited(worker, cause)
        backoff = ""
        if was_current and respawn:
            slot.schedule_respawn(worker, worker.crashed, now,
                                  floor=BOOT_ERROR_BACKOFF if code == EXIT_BOOT_ERROR else 0.0)
            backoff = f"; respawn in {slot.backoff:.1f}s" if slot.backoff else ""
        elif was_current:
            slot.stand_down()
        log.log(exit_level(code, worker.crashed), "worker %d (pid %d) %s%s%s", slot.worker_id, worker.pid,
                cause, worker.exit_hint(), backoff)

    def watch(self, recycle: bool) -> None:
        """psutil and heartbeat checks: kill hung workers; with `recycle`, retire one over the
        memory limit."""
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
                self.keep_stack(slot.worker_id, worker)
                worker.signal(signal.SIGKILL)
            elif limit and worker.rss_bytes > limit:
                over_limit.append(slot)
        if recycle:
            self.recycle_one(over_limit)

    def keep_stack(self, worker_id: int, worker: WorkerProcess) -> None:
        """Before a hung worker is killed: log where it is stuck, and keep it for its history."""
        captured = worker.capture_stack(CAPTURE_TIMEOUT)  # bounded: the loop waits for it
        worker.stack = captured.text
        held = worker.counters.current()
        document = f"holding content_id {held}" if held is not None else "holding no document"
        log.error("worker %d (pid %d) hung %s; its stack (%s):\n%s", worker_id, worker.pid, document,
                  captured.source, captured.text)

    def recycle_one(self, over_limit: list[WorkerSlot]) -> None:
        """Retire the oldest worker over the memory limit; one at a time keeps the pool working."""
        # Oldest first gives every slot its turn: slot 0 first would starve the others when
        # even a fresh worker is over the limit.
        recycling = any(w.stop_requested for s in self.slots.values() for w in s.retiring)
        if not over_limit or recycling:
            return
        slot = min(over_limit, key=lambda s: s.current.started_mono)
        log.info("worker %d (pid %d) uses %.0f MiB, over the limit: recycling it",
                 slot.worker_id, slot.current.pid, slot.current.rss_bytes / 2**20)
        self.retire(slot)
