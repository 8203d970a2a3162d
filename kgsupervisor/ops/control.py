"""Controlling a running supervisor from outside: signal it through its pidfile, wait for its exit."""
from __future__ import annotations

import os
import time

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.lifeline import pid_alive
from kgsupervisor.pool.pidfile import running_pid


def signal_supervisor(pidfile: str, signum: int) -> int:
    """Send `signum` to the supervisor that holds `pidfile`; its pid, or one line why not."""
    pid = running_pid(pidfile)
    _send(pid, signum)
    return pid


def wait_for_exit(pid: int, timeout: float) -> None:
    """Return once `pid` has exited; a KGSupervisorError if it still runs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise KGSupervisorError(f"supervisor pid {pid} still running after {timeout:g}s")
        time.sleep(0.1)


def _send(pid: int, signum: int) -> None:
    """Signal the supervisor, or one line if it exited since its pidfile was read."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise KGSupervisorError(f"supervisor pid {pid} has just exited") from None
    except PermissionError:
        raise KGSupervisorError(f"not allowed to signal supervisor pid {pid}: it runs as another user") from None

