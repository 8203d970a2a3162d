"""Sleeping until something happens: a doorbell another thread or a signal handler rings, a
descriptor that becomes readable (a commit watch, a parent's exit), or a deadline."""
from __future__ import annotations

import os
import select
import time
from collections.abc import Callable, Iterable
from typing import Any


class Doorbell:
    """A pipe rung by `ring()` (safe in a signal handler and from any thread) that ends a `wait()`.

    The pipe is opened on first use, in the process that uses it: a worker object is built
    before the fork and must open nothing there.
    """

    def __init__(self) -> None:
        self._pid: int | None = None
        self._fds: tuple[int, int] | None = None
        self.rung = False  # set by ring(): a ring before the pipe exists is not lost

    def _pipe(self) -> tuple[int, int]:
        if self._fds is None or self._pid != os.getpid():
            self._fds, self._pid = os.pipe(), os.getpid()
            for fd in self._fds:
                os.set_blocking(fd, False)
        return self._fds

    def ring(self) -> None:
        self.rung = True
        try:
            os.write(self._pipe()[1], b"\0")
        except (BlockingIOError, OSError):  # full: it is rung already
            pass

    def wait(self, fds: Iterable[int], timeout: float) -> bool:
        """Sleep up to `timeout` or until one of `fds` is readable; True when rung (and reset)."""
        if not self.rung:
            poller = select.poll()  # not select(): no limit on the descriptors' numbers
            for fd in (self._pipe()[0], *fds):
                poller.register(fd, select.POLLIN)
            poller.poll(max(0.0, timeout) * 1000)
        return self.answer()

    def answer(self) -> bool:
        """True when rung since the last answer; the ring is consumed."""
        try:
            while os.read(self._pipe()[0], 512):
                pass
        except BlockingIOError:
            pass
        rung, self.rung = self.rung, False
        return rung

    def close(self) -> None:
        if self._fds is not None and self._pid == os.getpid():
            for fd in self._fds:
                os.close(fd)
        self._fds = None


def process_exit_fd(pid: int | None) -> int | None:
    """A descriptor that becomes readable when process `pid` exits (Linux pidfd), or None where
    there is none (another system, an old kernel): the caller then looks every so often."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def readable(fd: int) -> bool:
    """Whether `fd` is readable now (never waits)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def wait_for_commit(bell: Doorbell, watch: Any, timeout: float, alive: Callable[[], bool]) -> None:
    """Sleep up to `timeout` until `bell` rings or `watch` (a store.commitwatch watch, or None)
    sees a commit by someone else: on its descriptor where it has one (no wake-up until then),
    else by a look every `watch.interval`."""
    deadline = time.monotonic() + timeout
    # What came while busy first: a descriptor shows only what is still unread (psycopg reads a
    # NOTIFY that arrives with a statement's reply), and a commit then needs no event.
    if watch is not None and watch.fileno() is not None and watch.changed():
        return
    while alive():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        fd = watch.fileno() if watch is not None else None
        step = left if watch is None or watch.interval is None else min(left, watch.interval)
        if bell.wait([] if fd is None else [fd], step):
            return
        if watch is not None and watch.changed():
            return
