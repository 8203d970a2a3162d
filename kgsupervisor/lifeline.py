"""A process's ties to others: whether a pid still runs, whether our parent is gone, and the
descriptors a forked child must not keep."""
from __future__ import annotations

import os
import select
import time
from collections.abc import Iterable
from typing import NoReturn

import psutil

PARENT_WATCH_EVERY = 1.0  # seconds between two looks at our parent


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie has exited, only its parent (a script) has not reaped it."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def parent_gone(parent_pid: int | None) -> bool:
    """True once `parent_pid` is no longer our parent: it exited and we were re-parented."""
    return parent_pid is not None and os.getppid() != parent_pid


def exit_with_parent(parent_pid: int) -> NoReturn:
    """Block until the parent is gone, then leave at once: for children that hold nothing.
    Asleep on a pidfd where Linux has one (no wake-up before the parent's exit), else a look a second."""
    try:
        exited = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        exited = None
    if exited is not None and not parent_gone(parent_pid):
        poller = select.poll()
        poller.register(exited, select.POLLIN)
        poller.poll()
    while not parent_gone(parent_pid):  # re-parenting may lag the exit a moment
        time.sleep(PARENT_WATCH_EVERY)
    os._exit(0)


def close_fds(fds: Iterable[int]) -> None:
    """Close descriptors inherited across a fork; one already closed is no matter."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
