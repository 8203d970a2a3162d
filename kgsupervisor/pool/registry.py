"""This supervisor's row in the registry of hosts (kg_supervisor_hosts): written at start,
refreshed every few seconds from the loop, marked stopped at the exit. A database that refuses
is logged once and tried again at the next refresh: the registry never stops the supervisor."""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

from kgsupervisor import __version__
from kgsupervisor.pool.workers import WorkerPool
from kgsupervisor.states import SupervisorState
from kgsupervisor.store.faults import describe_database_fault
from kgsupervisor.store.hosts import (HostRow, mark_stopped, prune_hosts, registry_connection, upsert_host,
                                     upsert_workers)

log = logging.getLogger("kgsupervisor.supervisor")

REFRESH_EVERY = 5.0  # at most; a third of the lease when that is shorter, so a live host never looks gone
# A row that would say nothing new is refreshed only every third of the lease: a host looks gone
# after a lease without a heartbeat, and an idle supervisor's write would wake every idle worker.
PRUNE_EVERY = 3600.0
KEEP_UNHEARD = 86400.0  # rows of supervisors not heard of for a day are deleted
STATE_NAMES = {SupervisorState.STARTING: "starting", SupervisorState.RUNNING: "running",
               SupervisorState.STOPPING: "draining", SupervisorState.STOPPED: "stopped"}


def host_state(state: SupervisorState, paused: bool = False) -> str:
    """The registry's word for a supervisor's state; a running one honouring the pause flag is paused."""
    return "paused" if paused and state is SupervisorState.RUNNING else STATE_NAMES[state]


def worker_summaries(pool: WorkerPool, now: float) -> list[dict[str, Any]]:
    """Each slot's worker as a console on another host shows it: pid, busy or idle, the document
    in hand and for how long, RSS, since when, restarts (all read here, without asking it)."""
    summaries = []
    for worker_id, slot in sorted(pool.slots.items()):
        w = slot.current
        alive = bool(w and w.process.is_alive())
        held = w.counters.current() if w else None
        held_for = w.counters.held_for(now) if w else None
        state = ("busy" if held is not None else "idle") if alive else slot.state.name.lower()
        summaries.append({"worker_id": worker_id, "pid": w.pid if w else None, "running": alive,
                          "state": state, "current_content_id": held,
                          "held_seconds": None if held_for is None else round(held_for, 1),
                          "rss_bytes": w.rss_bytes if w else 0, "started_at": w.started_at if w else None,
                          "restarts": slot.restarts})
    return summaries


def quiet_view(summary: dict[str, Any]) -> tuple:
    """What of a worker's summary says something new (its memory and time held aside)."""
    return (summary["worker_id"], summary["pid"], summary["running"], summary["state"],
            summary["current_content_id"], summary["restarts"])


def running_workers(pool: WorkerPool) -> int:
    """Worker processes alive now, retiring ones included."""
    return sum(1 for worker in pool.processes() if worker.process.is_alive())


class HostRegistry:
    """Keeps one supervisor's row; `refresh` is called every turn of the loop and writes when due."""

    def __init__(self, db_path: str, host: str, pid: int) -> None:
        self.db_path = db_path
        self.host = host
        self.pid = pid
        self.started_at = time.time()
        self.status_addr: str | None = None  # set once the status port is bound
        self.next_refresh: float | None = None  # monotonic; None: due now
        self.next_prune: float | None = None
        self.state_written: str | None = None
        self.shown_written: tuple | None = None  # what the last row said, heartbeats aside
        self.written_at: float | None = None  # monotonic
        self.refused = False  # the last write failed (and was logged)

    def refresh(self, now: float, state: SupervisorState, pool: WorkerPool, lease: float,
                paused: bool = False) -> None:
        """Write this supervisor's row if a refresh is due at monotonic time `now`: at once when
        its state changed (a drain shows as it begins), every REFRESH_EVERY while what it shows
        changes (a worker busy), every third of the lease while it does not."""
        shown = host_state(state, paused)
        wall = time.time()
        workers = worker_summaries(pool, wall)
        said = (shown, pool.num_workers, running_workers(pool), [quiet_view(w) for w in workers])
        busy = any(w["current_content_id"] is not None for w in workers)  # its time held moves on
        if shown == self.state_written and now < self.next_refresh_at(said, busy, lease):
            return
        self.written_at = now
        self.next_refresh = now + min(REFRESH_EVERY, lease / 3)
        self.state_written, self.shown_written = shown, said
        row = HostRow(self.host, self.pid, self.started_at, wall, pool.num_workers, said[2],
                      __version__, self.status_addr, shown)
        prune = self.next_prune is None or now >= self.next_prune
        prune_before = wall - KEEP_UNHEARD if prune else None
        if self.write(lambda conn: self.upsert(conn, row, workers, prune_before)) and prune:
            self.next_prune = now + PRUNE_EVERY

    def next_refresh_at(self, said: tuple, busy: bool, lease: float) -> float:
        """When the row is due again: soon when it would say something new, else a third of a lease on."""
        if self.next_refresh is None or self.written_at is None:
            return -math.inf
        return self.next_refresh if busy or said != self.shown_written else self.written_at + lease / 3

    def due_in(self, now: float, lease: float) -> float:
        """Seconds until the row is due if nothing changes meanwhile (for a quiet supervisor's sleep)."""
        if self.written_at is None:
            return 0.0
        return max(0.0, self.written_at + lease / 3 - now)

    @staticmethod
    def upsert(conn: Any, row: HostRow, workers: list[dict[str, Any]], prune_before: float | None) -> None:
        """The row and its workers, and (when due) the rows of supervisors not heard of for a day deleted."""
        upsert_host(conn, row)
        upsert_workers(conn, row.host, row.pid, workers, row.heartbeat_at)
        if prune_before is not None:
            prune_hosts(conn, prune_before)

    def stop(self) -> None:
        """The exit: the row says stopped."""
        self.write(lambda conn: mark_stopped(conn, self.host, self.pid, time.time()))

    def write(self, action: Callable[[Any], None]) -> bool:
        """Run `action` on a registry connection; a refusal is logged once, until one succeeds."""
        try:
            with closing(registry_connection(self.db_path)) as conn:
                action(conn)
        except Exception as exc:  # locked, read-only, full, unreachable: try again next time
            if not self.refused:
                log.warning("could not write this supervisor's row in the registry of hosts (%s); "
                            "trying again every few seconds", describe_database_fault(exc))
            self.refused = True
            return False
        if self.refused:
            log.info("registry of hosts written again")
        self.refused = False
        return True
