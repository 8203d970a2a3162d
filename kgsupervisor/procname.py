"""Process identity and lifetime: a name for ps/top, and dying with the parent (Linux)."""
from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

from kgsupervisor.lifeline import close_fds, parent_gone

PR_SET_PDEATHSIG = 1


def set_process_name(name: str) -> None:
    """Best effort: Linux keeps 15 bytes; elsewhere this does nothing."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


def mask_command_line(mask: Callable[[str], str]) -> bool:
    """Rewrite this process's command line, as ps and /proc/PID/cmdline show it to every user,
    with `mask` applied to each argument (a password given in --db or --service-url); forked
    children inherit it. Best effort, Linux only: True when something was masked.
    """
    try:
        start, end = _argument_area()
        with open("/proc/self/mem", "r+b", buffering=0) as memory:
            memory.seek(start)
            area = memory.read(end - start)
            masked = _masked_arguments(area, mask)
            if masked == area:
                return False
            memory.seek(start)
            memory.write(masked)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _argument_area() -> tuple[int, int]:
    """Where the kernel keeps our argv strings: arg_start and arg_end (fields 48 and 49 of
    /proc/self/stat, counted after the parenthesised name, which may hold blanks)."""
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[45]), int(fields[46])


def _masked_arguments(area: bytes, mask: Callable[[str], str]) -> bytes:
    """The NUL-separated arguments masked one by one, in exactly the area's length: padded with
    NULs (the kernel shows up to the last one), or cut short if masks made them longer."""
    arguments = area.rstrip(b"\0").split(b"\0")
    text = b"\0".join(os.fsencode(mask(os.fsdecode(a))) for a in arguments)
    return text[:len(area) - 1].ljust(len(area), b"\0")


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
    if parent_gone(parent_pid):  # it died before the request took effect
        os.kill(os.getpid(), signum)
    return True


SUPERVISOR_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1)


def become_helper_child(name: str, parent_pid: int, fds: list[int]) -> None:
    """The start of a stateless child (stats Manager, status endpoint): named, bound to the
    supervisor's life, rid of its descriptors (a pidfile lock or listening socket held here
    would outlive a kill -9 of the supervisor), and deaf to the signals meant for it."""
    set_process_name(name)
    die_with_parent(parent_pid)
    close_fds(fds)
    for sig in SUPERVISOR_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
