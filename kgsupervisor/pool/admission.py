"""The supervisor's side of admission control: made before the fork, a permit cell per worker
process, a dead one's permits handed back, big moves logged, a dead budget keeper replaced."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from kgsupervisor.addresses import mask_urls
from kgsupervisor.config import Settings
from kgsupervisor.kg.adaptive import shown
from kgsupervisor.kg.admission import AdmissionControl
from kgsupervisor.pool.manager import manager_process_init
from kgsupervisor.worker.admitting import admission_control, permit_cells

log = logging.getLogger("kgsupervisor.supervisor")


class PoolAdmission:
    """The shared AdmissionControl of a pool's workers, and which permit cell each process uses."""

    def __init__(self, control: AdmissionControl, cells: int, keeper_init: Callable[[], None]) -> None:
        self.control = control
        self.keeper_init = keeper_init
        self._free = list(range(cells - 1, -1, -1))
        self._cells = cells

    @classmethod
    def start(cls, settings: Settings, supervisor_pid: int, close_fds: list[int]) -> PoolAdmission | None:
        """Limits and budgets as configured (None when neither applies); call before any fork."""
        cells = permit_cells(settings.num_workers)
        keeper = manager_process_init("kgs-budgets", supervisor_pid, close_fds)
        control = admission_control(settings, cells, keeper_init=keeper)
        return cls(control, cells, keeper) if control is not None else None

    def allocate(self) -> int | None:
        """A cell for a new worker process; None when every cell is in use (it then sends unlimited)."""
        if not self._free:
            log.error("no permit cell left for a new worker: it sends without the adaptive limit "
                      "(more worker processes alive at once than the cells made at start)")
            return None
        return self._free.pop()

    def free(self, cell: int | None) -> None:
        """The process in `cell` is gone: hand back whatever permits it held, and the cell."""
        if cell is None:
            return
        if self.control.limits is not None:
            self.control.limits.release_all_of(cell)
        self._free.append(cell)

    def set_max(self, workers: int) -> None:
        """No endpoint's in-flight limit above the worker count."""
        if self.control.limits is not None:
            self.control.limits.set_max(workers)

    def describe(self) -> list[dict[str, Any]]:
        return self.control.describe()

    def close(self) -> None:
        self.control.close()

    def watch(self, settings: Settings, running: bool, retire_all: Callable[[], None]) -> None:
        """Log big moves of the limits; replace a budget keeper that died, and the workers that
        hold the old one (a worker cannot reach the new one)."""
        self.log_big_moves()
        budgets = self.control.budgets
        if running and not getattr(budgets, "keeper_alive", True):
            log.error("the rate budgets' keeper process died; starting a new one (the last minute's "
                      "spending is forgotten) and restarting the workers")
            fresh = admission_control(settings, self._cells, keeper_init=self.keeper_init)
            self.control.budgets = fresh.budgets if fresh is not None else None
            retire_all()

    def log_big_moves(self) -> None:
        """One line when an endpoint's limit moved by more than a factor of two since the last one."""
        limits = self.control.limits
        if limits is None:
            return
        for endpoint in limits.endpoints:
            moved = limits.factor_2_change(endpoint)
            if moved:
                before, now = moved
                log.warning("in-flight limit of %s %s from %s to %s (%s)", mask_urls(endpoint),
                            "fell" if now < before else "rose", shown(before), shown(now),
                            "the KG service is answering slower or refusing: sending less" if now < before
                            else "the KG service keeps up: sending more")
