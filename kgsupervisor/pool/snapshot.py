"""The value the supervisor publishes each turn: its pool's slots, states, counters and queue."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from contextlib import closing
from typing import Any

from kgsupervisor.pool.slots import WorkerSlot
from kgsupervisor.queue.control import Pause, iso_time, paused_state
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.states import SupervisorState
from kgsupervisor.store.backend import connect_to

log = logging.getLogger("kgsupervisor.reporting")

QUEUE_COUNT_EVERY = 2.0  # a count is a scan: never one per scrape


@dataclasses.dataclass(frozen=True)
class PoolSnapshot:
    """The pool at one turn of the supervisor's loop: everything a reporter renders, as values."""

    clock: float  # the supervisor's monotonic clock at this turn
    taken_at: str  # ISO 8601: the contract's last_health_check
    pid: int
    host: str
    state: SupervisorState
    started_at: str
    workers_restarted: int
    manager_restarts: int
    database: Mapping[str, str]  # backend and name, without credentials
    service_url: str
    service_enabled: bool
    hang_timeout: float
    workers: tuple[dict[str, Any], ...]  # the worker_details entries, one per slot shown
    totals: Mapping[str, float]  # counters summed over every process that ran in any slot
    queue_size: Mapping[str, int]
    paused: Pause | None = None  # the operator's pause (`kgsupervisor pause`), read with the counts
    admission: tuple[dict[str, Any], ...] | list[dict[str, Any]] = ()  # per endpoint (kg.admission)

    @property
    def running(self) -> bool:
        return self.state is SupervisorState.RUNNING


def describe_slots(slots: Mapping[int, WorkerSlot], num_workers: int, published: Mapping[Any, Any],
                   now_wall: float) -> tuple[dict[str, Any], ...]:
    """The worker_details of the slots in use: those wanted, and any with a process still in it."""
    return tuple(slot.describe(now_wall, published.get(slot.worker_id)) for _, slot in sorted(slots.items())
                 if slot.worker_id < num_workers or slot.processes())


def sum_counts(slots: Iterable[WorkerSlot]) -> dict[str, float]:
    """Every slot's counters added up."""
    totals: dict[str, float] = {}
    for slot in slots:
        for name, value in slot.counts().items():
            totals[name] = totals.get(name, 0) + value
    return totals


class QueueCounter:
    """The queue's rows by status and the pause flag, read again at most every QUEUE_COUNT_EVERY
    seconds (on one connection: the flag costs one primary-key look-up more)."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.latest: dict[str, int] = {}
        self.paused: Pause | None = None  # as of the latest read
        self._counted_at: float | None = None

    def counts(self, now: float) -> dict[str, int]:
        """The latest counts; a database that cannot answer now keeps the previous ones (and
        the previous pause flag)."""
        if self._counted_at is not None and now - self._counted_at < QUEUE_COUNT_EVERY:
            return self.latest
        self._counted_at = now
        try:
            with closing(connect_to(self.db_path)) as conn:
                self.latest = queue_for(conn).counts()
                self.note_pause(paused_state(conn))
        except Exception as exc:
            log.warning("could not count the queue: %s", exc)
        return self.latest

    def note_pause(self, paused: Pause | None) -> None:
        """Keep the flag just read; its coming and going is logged once, on every host."""
        if paused is not None and self.paused is None:
            reason = f" (reason: {paused.reason})" if paused.reason else ""
            log.warning("claims paused by %s since %s%s: workers finish what they hold and claim nothing "
                        "until `kgsupervisor resume`", paused.set_by, iso_time(paused.since), reason)
        elif paused is None and self.paused is not None:
            log.info("claims resumed: the pause was lifted")
        self.paused = paused
