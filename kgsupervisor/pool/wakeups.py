"""How the supervisor sleeps: until a signal, a child's exit, a request, or a timeout."""
from __future__ import annotations

import multiprocessing.connection
import os
import queue
import signal
import time
from collections.abc import Iterable
from typing import Any

from kgsupervisor.pool.workers import WorkerPool
from kgsupervisor.worker.doorbell import process_exit_fd
from kgsupervisor.worker.main import HANDLED_SIGNALS

TICK = 0.5  # a turn this often while documents are in flight, or something is due soon
# A quiet pool (every worker idle, nothing due) turns at least this often (a dead stats Manager,
# memory); signals, child exits, requests and its own deadlines end the sleep sooner.
IDLE_TICK = 10.0


def quiet_pool(pool: WorkerPool) -> bool:
    """Every wanted worker is there and holds no document, and none is retiring: nothing changes
    until an event (a signal, an exit, a request) says so."""
    if any(slot.retiring for slot in pool.slots.values()):
        return False
    for worker_id in range(pool.num_workers):
        slot = pool.slots.get(worker_id)
        if slot is None or slot.current is None or slot.current.counters.current() is not None:
            return False
    return True


def hang_deadlines(pool: WorkerPool, hang_timeout: float) -> list[float]:
    """Seconds until each worker's heartbeat is older than `hang_timeout`, as it stands."""
    wall = time.time()
    return [hang_timeout - w.counters.heartbeat_age(wall) for w in pool.processes()]


class Wakeups:
    """Signal handlers that only queue the signal, and a wake pipe that ends the sleep."""

    def __init__(self) -> None:
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()  # reentrant-safe in a handler
        self.pipe: tuple[int, int] | None = None
        self.parent_exit: int | None = None  # API mode: readable once the host process exits

    def install(self, parent_pid: int | None = None) -> None:
        self.parent_exit = process_exit_fd(parent_pid)
        self.pipe = os.pipe()
        for fd in self.pipe:
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.pipe[1], warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self.queue_signal)
        # `kgsupervisor run` holds them from its first instant: one sent during start-up is
        # delivered now, queued, and handled by the first turn of the loop.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def queue_signal(self, signum: int, frame: Any) -> None:
        """Signal handler - no logging, no killing: just queue the signal."""
        self.signals.put_nowait(signum)

    def wait(self, waitables: Iterable[Any], timeout: float) -> list[int]:
        """Sleep until a signal or one of `waitables` is ready, or `timeout`; the signals queued."""
        parent = [] if self.parent_exit is None else [self.parent_exit]
        ready = multiprocessing.connection.wait([self.pipe[0], *parent, *waitables], timeout)
        if self.parent_exit is not None and self.parent_exit in ready:  # readable for good from now on
            os.close(self.parent_exit)
            self.parent_exit = None
        try:
            while os.read(self.pipe[0], 512):
                pass
        except BlockingIOError:
            pass
        sigs = []
        while True:
            try:
                sigs.append(self.signals.get_nowait())
            except queue.Empty:
                return sigs

    def parent_unwatched(self, parent_pid: int | None) -> bool:
        """A parent to watch (API mode) without a pidfd, or whose pidfd has fired: look each turn."""
        return parent_pid is not None and self.parent_exit is None

    def fds(self) -> list[int]:
        """Its descriptors, which a forked child must close."""
        return list(self.pipe or ()) + ([] if self.parent_exit is None else [self.parent_exit])

    def uninstall(self) -> None:
        """Default dispositions back, the wake pipe closed."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.fds():
            os.close(fd)
        self.pipe = self.parent_exit = None
