"""The child's side of a fork: what a worker does from its first instant to its exit status."""
from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kgsupervisor import logs
from kgsupervisor.config import Settings
from kgsupervisor.errors import ConfigError, DatabaseError
from kgsupervisor.lifeline import close_fds
from kgsupervisor.masking import secrets_of
from kgsupervisor.procname import set_process_name
from kgsupervisor.states import EXIT_BOOT_ERROR, OPERATOR_SIGNALS
from kgsupervisor.worker.counters import SharedCounters
from kgsupervisor.worker.kgworker import KGWorker

# The signals the supervisor handles; its workers get their own handlers for them.
HANDLED_SIGNALS = OPERATOR_SIGNALS + (signal.SIGCHLD,)


@contextmanager
def signals_held() -> Iterator[None]:
    """Block our signals across a fork; the child unblocks them once its handlers are in."""
    # Otherwise a signal in the child's first instants runs the inherited supervisor handler,
    # which queues it in the child's useless copy of the supervisor: a drain's SIGTERM is lost
    # and the worker runs on until the drain timeout kills it.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_main(settings: Settings, worker_id: int, stats_map: Any, counters: SharedCounters,
                parent_pid: int, max_documents: int | None, fds: list[int]) -> None:
    """Entry point of a forked worker: shed the parent's handles, then run the worker loop."""
    signal.set_wakeup_fd(-1)
    set_process_name(f"kgs-worker-{worker_id}")
    logs.mask_secrets(secrets_of(settings))  # a reload may have brought a new token
    close_fds(fds)
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
