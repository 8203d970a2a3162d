"""The child's side of a fork: what a worker does from its first instant to its exit status."""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from kgsupervisor import logs
from kgsupervisor.config import Settings
from kgsupervisor.errors import ConfigError, DatabaseError
from kgsupervisor.kg.admission import AdmissionControl
from kgsupervisor.lifeline import close_fds
from kgsupervisor.masking import secrets_of
from kgsupervisor.procname import set_process_name
from kgsupervisor.states import EXIT_BOOT_ERROR, OPERATOR_SIGNALS
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.kgworker import KGWorker

# The signals the supervisor handles; its workers get their own handlers for them.
HANDLED_SIGNALS = OPERATOR_SIGNALS + (signal.SIGCHLD,)
# Asks a worker for the stacks of all its threads (faulthandler); used by nothing else.
STACK_SIGNAL = signal.SIGUSR2
STACK_FILE_SUFFIX = ".stack"
# Held across a fork too: its default action kills, and a worker answers it once registered.
HELD_SIGNALS = HANDLED_SIGNALS + (STACK_SIGNAL,)


@contextmanager
def signals_held() -> Iterator[None]:
    """Block our signals across a fork; the child unblocks them once its handlers are in."""
    # Otherwise a signal in the child's first instants runs the inherited supervisor handler,
    # which queues it in the child's useless copy of the supervisor: a drain's SIGTERM is lost
    # and the worker runs on until the drain timeout kills it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_main(settings: Settings, worker_id: int, stats_map: Any, counters: SharedCounters,
                parent_pid: int, max_documents: int | None, fds: list[int],
                admission: AdmissionControl | None = None, permit_cell: int | None = None) -> None:
    """Entry point of a forked worker: shed the parent's handles, then run the worker loop."""
    signal.set_wakeup_fd(-1)
    set_process_name(f"kgs-worker-{worker_id}")
    logs.mask_secrets(secrets_of(settings))  # a reload may have brought a new token
    close_fds(fds)
    worker = KGWorker(settings, worker_id, stats_map, counters, parent_pid, max_documents,
                      admission if permit_cell is not None else None, permit_cell or 0)
    worker.install_supervised_signal_handlers()
    register_stack_dump()
    # Held since the fork (see signals_held): a SIGTERM sent meanwhile reaches the worker now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
    try:
        worker.init_process()
    except (DatabaseError, ConfigError) as exc:
        logging.getLogger("kgsupervisor.worker").error("worker %d cannot start: %s", worker_id, exc)
        raise SystemExit(EXIT_BOOT_ERROR)
    raise SystemExit(worker.run())



def register_stack_dump() -> IO[str] | None:
    """On STACK_SIGNAL, write the stack of every thread to this worker's own stack file.

    faulthandler writes from its C signal handler, so the stack comes even while no Python code
    can run (a C call holding the GIL, a thread stopped holding it). The file is unlinked at
    once: nothing is left behind however the worker ends, and the supervisor and `dump` read
    it through this process's descriptor (/proc/PID/fd). None when it cannot be made: the
    signal is then ignored, so a stray one does not kill the worker.
    """
    try:
        fd, path = tempfile.mkstemp(prefix=stack_file_prefix(os.getpid()), suffix=STACK_FILE_SUFFIX)
    except OSError as exc:
        logging.getLogger("kgsupervisor.worker").warning(
            "no stack file (%s): this worker's stack can only be read with py-spy", exc)
        signal.signal(STACK_SIGNAL, signal.SIG_IGN)
        return None
    os.unlink(path)
    stack_file = os.fdopen(fd, "w")
    faulthandler.register(STACK_SIGNAL, file=stack_file, all_threads=True, chain=False)
    return stack_file


def stack_file_prefix(pid: int) -> str:
    """How the name of worker `pid`'s stack file begins (a random part follows)."""
    return f"kgsupervisor-{pid}-"
