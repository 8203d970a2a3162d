"""A worker's leave to send to a KG endpoint: a permit under its adaptive limit, room in its budget."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kgsupervisor.addresses import mask_urls
from kgsupervisor.kg.permits import Outcome, SharedAdaptiveLimits


# Requests slower than this (the endpoint's smoothed latency) get one document a permit while the
# limit holds workers back: two transactions saved by a batch are then a few percent at most.
ONE_DOCUMENT_A_PERMIT_FROM_S = 0.05


class BudgetLedger(Protocol):
    """Rate budgets per endpoint: kg.budgets.RateBudgets (one host) or the PostgreSQL one (all hosts)."""

    def tokens(self, chars: int) -> int: ...
    def try_spend(self, endpoint: str, chars: int) -> bool: ...
    def seconds_until_room(self, endpoint: str, chars: int) -> float: ...
    def used(self, endpoint: str) -> dict[str, int]: ...
    def limits(self, endpoint: str) -> dict[str, int]: ...
    def close(self) -> None: ...


def endpoint_key(url: str) -> str:
    """The name an endpoint's permits go by: its URL as the client uses it."""
    return url.rstrip("/")


def budget_key(endpoint: str) -> str:
    """The name an endpoint's budget goes by: its URL with credentials masked, since on
    PostgreSQL it is stored in the database for every host to read."""
    return mask_urls(endpoint)


@dataclasses.dataclass
class AdmissionControl:
    """Made by the supervisor before it forks, shared by its workers: the adaptive limits (None
    with KG_ADAPTIVE off) and the rate budgets (None when no budget is set) of its endpoints."""

    endpoints: list[str]
    limits: SharedAdaptiveLimits | None
    budgets: BudgetLedger | None

    def for_worker(self, cell: int, give_up: Callable[[], bool]) -> Admission:
        """The view of the worker process in permit cell `cell`; `give_up()` ends its waits."""
        return Admission(self, cell, give_up)

    def describe(self) -> list[dict[str, Any]]:
        """Per endpoint: limit, permits in use, waiting workers and budget use (status, metrics)."""
        each = []
        for endpoint in self.endpoints:
            entry: dict[str, Any] = {"url": mask_urls(endpoint), "adaptive": self.limits is not None}
            if self.limits is not None:
                entry.update(self.limits.describe(endpoint))
            if self.budgets is not None:
                entry["budget"] = self.budget_use(endpoint)
            each.append(entry)
        return each

    def budget_use(self, endpoint: str) -> dict[str, dict[str, int]] | None:
        """Spent and allowed in the last window, per limited kind; None while the budget cannot be
        read (its keeper process or database is gone: status must still answer)."""
        try:
            limits = self.budgets.limits(budget_key(endpoint))
            return {kind: {"used": used, "limit": limits[kind]}
                    for kind, used in self.budgets.used(budget_key(endpoint)).items()}
        except Exception:
            return None

    def close(self) -> None:
        if self.budgets is not None:
            self.budgets.close()


class Admission:
    """One worker's permits and spending: which endpoint it may send to, and what came of it."""

    def __init__(self, control: AdmissionControl, cell: int, give_up: Callable[[], bool]) -> None:
        self.control = control
        self.cell = cell
        self.give_up = give_up
        self.held: list[str] = []  # endpoints this worker holds a permit of (two during a failover)

    @property
    def limited(self) -> bool:
        return self.control.limits is not None

    @property
    def budgeted(self) -> bool:
        return self.control.budgets is not None

    def take(self, endpoints: Sequence[str], timeout: float) -> str | None:
        """A permit for the first of `endpoints` (in the worker's rotation) with one free, waiting
        up to `timeout` seconds for one; the first endpoint at once when nothing limits them."""
        limits = self.control.limits
        known = [e for e in endpoints if e in self.control.endpoints]
        if limits is None or not known:
            return endpoints[0] if endpoints else None
        taken = limits.acquire_any(known, self.cell, timeout, self.give_up)
        if taken is not None:
            self.held.append(taken)
        return taken

    def one_document_a_permit(self, endpoint: str) -> bool:
        """Should a permit of `endpoint` cover one document rather than a batch?

        While the limit holds workers back from a slow endpoint, yes: the permit then comes back
        after each answer, so a lower limit takes effect at once and no permit sits through a
        batch's database work while the service idles (measured at 100 ms a document: 0.91 x
        capacity and p95 1.7 x the service time with batches, 0.98 x and 1.45 x without). With
        fast answers a batch's saved transactions matter more (a claim and a write a document:
        1.7 x the throughput at a few milliseconds a document); with a limit as high as the
        worker count nobody waits anyway."""
        limits = self.control.limits
        if limits is None or endpoint not in self.control.endpoints or not limits.limiting(endpoint):
            return False
        latency = limits.latency(endpoint)
        return latency == 0 or latency >= ONE_DOCUMENT_A_PERMIT_FROM_S

    def try_take(self, endpoint: str) -> bool:
        """For a failover: a permit of another endpoint if one is free now (never waits)."""
        limits = self.control.limits
        if limits is None or endpoint not in self.control.endpoints or endpoint in self.held:
            return True
        if limits.try_acquire(endpoint, self.cell):
            self.held.append(endpoint)
            return True
        return False

    def observe(self, endpoint: str, outcome: Outcome) -> None:
        """What became of a request to `endpoint`: moves its limit (under a permit held)."""
        if self.control.limits is not None and endpoint in self.held:
            self.control.limits.observe(endpoint, self.cell, outcome)

    def give_back(self) -> None:
        """Return every permit held: the batch is done."""
        limits = self.control.limits
        while self.held:
            endpoint = self.held.pop()
            if limits is not None:
                limits.release(endpoint, self.cell)

    def room(self, endpoint: str, chars: int) -> int | None:
        """How many documents of `chars` characters the endpoint's budget takes now (None: no budget)."""
        budgets, name = self.control.budgets, budget_key(endpoint)
        if budgets is None or not budgets.limits(name):
            return None
        limits, used = budgets.limits(name), budgets.used(name)
        weights = {"requests": 1, "tokens": budgets.tokens(chars)}
        return min((limits[kind] - used.get(kind, 0)) // max(weights[kind], 1) for kind in limits)

    def seconds_until_room(self, endpoint: str, chars: int) -> float:
        """How long until the endpoint's budget has room for `chars` characters (0: now)."""
        budgets = self.control.budgets
        return 0.0 if budgets is None else budgets.seconds_until_room(budget_key(endpoint), chars)

    def spend(self, endpoint: str, chars: int) -> float:
        """Spend one request of `chars` characters from the endpoint's budget: 0 when spent, else
        the seconds until it would fit. Raises OverBudget when it never can."""
        budgets, name = self.control.budgets, budget_key(endpoint)
        if budgets is None or budgets.try_spend(name, chars):
            return 0.0
        return max(budgets.seconds_until_room(name, chars), 0.001)
