"""How the supervisor sleeps: until a signal, a child's exit, a request, or a timeout."""
from __future__ import annotations

import multiprocessing.connection
import os
import queue
import signal
from collections.abc import Iterable
from typing import Any

from kgsupervisor.worker.main import HANDLED_SIGNALS


class Wakeups:
    """Signal handlers that only queue the signal, and a wake pipe that ends the sleep."""

    def __init__(self) -> None:
        self.signals: queue.SimpleQueue[int] = queue.SimpleQueue()  # reentrant-safe in a handler
        self.pipe: tuple[int, int] | None = None

    def install(self) -> None:
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
        multiprocessing.connection.wait([self.pipe[0], *waitables], timeout)
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

    def uninstall(self) -> None:
        """Default dispositions back, the wake pipe closed."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        for fd in self.pipe or ():
            os.close(fd)
        self.pipe = None
