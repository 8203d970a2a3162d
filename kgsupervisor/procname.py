"""Process identity and lifetime: a name for ps/top, and dying with the parent (Linux)."""
from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Best effort: Linux keeps 15 bytes; elsewhere this does nothing."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def die_with_parent(parent_pid: int, signum: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `signum` when the parent dies; False where prctl is unavailable.

    For children that hold nothing worth saving (the stats Manager, the status endpoint): they
    are gone at once, so a restarted supervisor finds its port and pidfile free.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # it died before the request took effect
        os.kill(os.getpid(), signum)
    return True


SUPERVISOR_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)


def become_helper_child(name: str, parent_pid: int, close_fds: list[int]) -> None:
    """The start of a stateless child (stats Manager, status endpoint): named, bound to the
    supervisor's life, rid of its descriptors (a pidfile lock or listening socket held here
    would outlive a kill -9 of the supervisor), and deaf to the signals meant for it."""
    set_process_name(name)
    die_with_parent(parent_pid)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
