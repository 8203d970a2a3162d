"""WorkerSlot: one place in the pool, the process in it, and what the processes before it did."""
from __future__ import annotations

import dataclasses
import enum
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

import psutil

from kgsupervisor.pool.stacks import CapturedStack, capture_stack
from kgsupervisor.queue.history import InFlight
from kgsupervisor.states import EXIT_ERROR, EXIT_OK
from kgsupervisor.worker.counters import COUNTS, SharedCounters
from kgsupervisor.worker.stats import iso_now

log = logging.getLogger("kgsupervisor.supervisor")

# A worker that dies sooner than this after its start counts as crash-looping: back off.
MIN_UPTIME = 2.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
EXIT_HINTS = {
    -signal.SIGKILL: " (perhaps out of memory?)",
    -signal.SIGBUS: " (the database's -shm file could not be written: immutable (chattr +i) or a "
                    "failing disk? its documents go back uncharged)",
}


def describe_exit(exitcode: int | None) -> str:
    """`exited with status 1`, `killed by SIGKILL`, as an operator wants to read it."""
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


def exit_level(exitcode: int | None, crashed: bool) -> int:
    """How loud an exit is: a clean one is news, a kill or an error is an error, the rest warnings."""
    if not crashed:
        return logging.INFO
    return logging.ERROR if exitcode in (-signal.SIGKILL, -signal.SIGBUS, EXIT_ERROR) else logging.WARNING


@dataclasses.dataclass
class WorkerProcess:
    """One forked worker: its process, its shared counters and the psutil handle that watches it."""

    process: multiprocessing.process.BaseProcess
    counters: SharedCounters
    owner: str
    started_mono: float = dataclasses.field(default_factory=time.monotonic)
    started_at: str = dataclasses.field(default_factory=iso_now)
    kill_reason: str | None = None   # set when the supervisor killed it (hang, drain timeout)
    stop_requested: bool = False     # SIGTERM sent: retiring, draining or recycling
    ps: psutil.Process | None = None
    rss_bytes: int = 0
    cpu_percent: float = 0.0
    stack: str | None = None         # where it was stuck, captured before a hang kill
    permit_cell: int | None = None   # its cell of the shared admission control, if any

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def sample(self) -> bool:
        """Refresh RSS and CPU with psutil; False when the pid is gone, a zombie, or reused."""
        try:
            if self.ps is None:
                self.ps = psutil.Process(self.pid)
                self.ps.cpu_percent(None)  # primes the CPU counter
            if not self.ps.is_running():  # compares create_time: catches pid reuse
                return False
            with self.ps.oneshot():
                if self.ps.status() == psutil.STATUS_ZOMBIE:
                    return False
                self.rss_bytes = self.ps.memory_info().rss
                self.cpu_percent = self.ps.cpu_percent(None)
        except psutil.Error:
            return False
        return True

    @property
    def crashed(self) -> bool:
        """It exited other than cleanly, and not because a drain ran out of time."""
        drain_kill = self.stop_requested and self.kill_reason == "drain timeout"
        return self.process.exitcode != EXIT_OK and not drain_kill

    def in_flight(self) -> InFlight | None:
        """The claim it was sending, as its shared memory names it (which outlives the worker)."""
        return self.counters.in_flight()

    def exit_hint(self) -> str:
        """A likely cause of its exit, when we did not kill it ourselves."""
        return "" if self.kill_reason else EXIT_HINTS.get(self.process.exitcode, "")

    def capture_stack(self, timeout: float) -> CapturedStack:
        """The stacks of its threads, within `timeout` seconds (see pool.stacks)."""
        return capture_stack(self.pid, timeout)

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass


class SlotState(str, enum.Enum):
    """Where a slot is in the life of its process, as the supervisor sees it."""

    STOPPED = "stopped"  # no process and none due: new, retired, or done for the drain
    RUNNING = "running"  # a process is in it
    EXITED = "exited"  # its process exited; the next one starts at the next turn
    BACKOFF = "backoff"  # its process exited soon after its start; the next one waits


@dataclasses.dataclass
class WorkerSlot:
    """A numbered place in the pool; processes come and go, the slot keeps their totals."""

    worker_id: int
    state: SlotState = SlotState.STOPPED  # written by change_state only
    current: WorkerProcess | None = None
    retiring: list[WorkerProcess] = dataclasses.field(default_factory=list)  # told to stop, not gone yet
    restarts: int = 0
    backoff: float = 0.0
    respawn_at: float = 0.0
    last_exit: str | None = None
    totals: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    def fold(self, worker: WorkerProcess) -> None:
        """Add an exited process's counts to the slot, so totals survive respawns."""
        for name, value in worker.counters.counts().items():
            self.totals[name] += value

    def processes(self) -> list[WorkerProcess]:
        return ([self.current] if self.current else []) + self.retiring

    def counts(self) -> dict[str, int]:
        result = dict(self.totals)
        for worker in self.processes():
            for name, value in worker.counters.counts().items():
                result[name] += value
        return result

    def change_state(self, state: SlotState) -> None:
        """The one writer of `state`."""
        if state is not self.state:
            log.debug("slot %d %s -> %s", self.worker_id, self.state.value, state.value)
            self.state = state

    def due(self, now: float) -> bool:
        """No process in it, and its backoff (if any) is over."""
        return self.current is None and now >= self.respawn_at

    def occupy(self, worker: WorkerProcess) -> None:
        """A freshly started process takes the slot."""
        self.current = worker
        self.change_state(SlotState.RUNNING)  # STOPPED, EXITED or BACKOFF -> RUNNING

    def vacate(self) -> None:
        """Its process was told to leave: the slot is free at once, with no backoff."""
        self.retiring.append(self.current)
        self.current = None
        self.backoff, self.respawn_at = 0.0, 0.0
        self.change_state(SlotState.STOPPED)  # RUNNING -> STOPPED

    def exited(self, worker: WorkerProcess, cause: str) -> None:
        """Fold an exited process's counts into the slot, and free the slot if it was its own."""
        self.fold(worker)
        if worker is not self.current:
            self.retiring.remove(worker)  # a retired one: the slot moved on already
            return
        self.current = None
        self.last_exit = cause
        self.change_state(SlotState.EXITED)  # RUNNING -> EXITED

    def stand_down(self) -> None:
        """After an exit while the pool drains: nothing is respawned."""
        if self.state is SlotState.EXITED:
            self.change_state(SlotState.STOPPED)  # EXITED -> STOPPED

    def schedule_respawn(self, worker: WorkerProcess, crashed: bool, now: float, floor: float = 0.0) -> None:
        """Respawn at once after a clean or long-lived exit; back off while it crash-loops.

        Crash-looping means dying soon after start without getting anything done: a worker that
        finished a document before it was killed (an operator, the OOM killer) was working.
        """
        self.restarts += 1
        lived = now - worker.started_mono
        progressed = any(worker.counters.counts()[name] for name in ("processed", "retried", "released"))
        if crashed and lived < MIN_UPTIME and not progressed:
            self.backoff = min(max(self.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        else:
            self.backoff = 0.0
        self.backoff = max(self.backoff, floor)  # a boot error waits `floor` whatever happened
        self.respawn_at = now + self.backoff
        if self.backoff:
            self.change_state(SlotState.BACKOFF)  # EXITED -> BACKOFF

    def shown_state(self, published: dict[str, Any]) -> str:
        """What the slot is doing: its process's own published state, or why it has none."""
        w = self.current
        if w is None:
            return "backoff" if self.state is SlotState.BACKOFF else "stopped"
        # Until a new process publishes, the map still holds its predecessor's last state.
        return published.get("state") if published.get("pid") == w.pid else "starting"

    def describe(self, now_wall: float, stats: dict[str, Any] | None) -> dict[str, Any]:
        """The worker_details entry of check_worker_health() for this slot."""
        w = self.current
        counts = self.counts()
        stats = dict(stats or {})
        stats.update({"total_processed": counts["processed"], "total_success": counts["success"],
                      "total_failed": counts["failed"], "total_retried": counts["retried"],
                      "total_released": counts["released"]})
        stats.setdefault("last_processed_at", None)
        return {
            "worker_id": self.worker_id,
            "pid": w.pid if w else None,
            "running": bool(w and w.process.is_alive()),
            "state": self.shown_state(stats),
            "restarts": self.restarts,
            "backoff_seconds": self.backoff,
            "last_exit": self.last_exit,
            "started_at": w.started_at if w else None,
            "heartbeat_age": round(w.counters.heartbeat_age(now_wall), 3) if w else None,
            "current_content_id": w.counters.current() if w else None,
            "held_seconds": _tenths(w.counters.held_for(now_wall)) if w else None,
            "rss_bytes": w.rss_bytes if w else 0,
            "cpu_percent": w.cpu_percent if w else 0.0,
            "stats": stats,
        }


def _tenths(seconds: float | None) -> float | None:
    """Seconds to a tenth, as the stats show durations; None stays None."""
    return None if seconds is None else round(seconds, 1)
