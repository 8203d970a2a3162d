"""Permits to send to each KG endpoint, shared by the workers of a supervisor in shared memory.

Created by the supervisor before the fork, so every worker maps the same memory: each endpoint's
AdaptiveLimit state, and per worker slot the permits it holds and whether it waits. Counts are
derived from the per-slot cells, so the supervisor can hand back a dead worker's permits.
"""
from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kgsupervisor.kg.adaptive import FIELDS, AdaptiveLimit

# A waiter sleeps on its endpoint's wake semaphore at most this long before it looks again: a
# wake-up lost to a waiter that timed out or died costs this much delay, never a permit.
WAKE_BOUND_S = 1.0
# Nothing holds the lock longer than a few microseconds: a holder still there after this long
# is a process that died inside (SIGKILL), and release_all_of takes the lock over from it.
LOCK_STUCK_S = 2.0
NO_HOLDER = -1.0


@dataclass(frozen=True)
class Success:
    """The request was answered: `chars` characters in `latency_s` seconds."""

    latency_s: float
    chars: int


@dataclass(frozen=True)
class Overload:
    """The service said it is full ("429", "503") or did not answer in time ("timeout")."""

    kind: str
    latency_s: float = 0.0


Outcome = Success | Overload | None  # None: the permit went unused, or the failure says nothing of load


class SharedAdaptiveLimits:
    """One adaptive in-flight limit per endpoint, for `workers` worker slots, in shared memory."""

    def __init__(self, endpoints: Sequence[str], min_limit: int, max_limit: int, workers: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.endpoints = list(endpoints)
        self.workers = workers
        self._index = {e: i for i, e in enumerate(self.endpoints)}
        count = len(self.endpoints)
        self._limit_state = ctx.RawArray("d", count * len(FIELDS))
        self._held = ctx.RawArray("d", count * workers)  # permits held, per (worker, endpoint)
        self._waiting = ctx.RawArray("d", count * workers)  # 1 while the worker waits for one
        self._holder = ctx.RawArray("d", 1)  # the worker in the lock, for release_all_of
        self._holder[0] = NO_HOLDER
        self._max = ctx.RawValue("d", max_limit)  # the worker count, moved by SIGTTIN/SIGTTOU
        self._lock = ctx.Lock()
        self.lock_stuck_s = LOCK_STUCK_S
        # One wake-up semaphore for every endpoint: a worker waits for a permit of any of them.
        self._wake = ctx.Semaphore(0)
        self.min_limit = min_limit
        self._limits = [AdaptiveLimit(min_limit, max_limit, self._limit_state, i * len(FIELDS))
                        for i in range(count)]
        for limit in self._limits:
            limit.reset()

    def limit(self, endpoint: str) -> int:
        """The permits the endpoint's limit grants now (a fractional limit: one more at times)."""
        return self._limits[self._index[endpoint]].limit

    def limiting(self, endpoint: str) -> bool:
        """Is the endpoint's limit below the maximum (the worker count)?"""
        return self._limits[self._index[endpoint]].value < int(self._max.value)

    def latency(self, endpoint: str) -> float:
        """The endpoint's smoothed latency of answers, seconds; 0 before the first."""
        return self._limits[self._index[endpoint]].rtt

    def in_use(self, endpoint: str) -> int:
        i = self._index[endpoint]
        return int(sum(self._held[w * len(self.endpoints) + i] for w in range(self.workers)))

    def waiting(self, endpoint: str) -> int:
        i = self._index[endpoint]
        return int(sum(self._waiting[w * len(self.endpoints) + i] for w in range(self.workers)))

    def try_acquire(self, endpoint: str, worker: int) -> bool:
        """Take a permit for `endpoint` if one is free; never waits."""
        with self._locked(worker):
            return self._take(endpoint, worker)

    def acquire(self, endpoint: str, worker: int, timeout: float) -> bool:
        """Take a permit, waiting up to `timeout` seconds (asleep, holding nothing) for one."""
        return self.acquire_any([endpoint], worker, timeout) is not None

    def acquire_any(self, endpoints: Sequence[str], worker: int, timeout: float,
                    give_up: Callable[[], bool] = lambda: False) -> str | None:
        """A permit for the first of `endpoints` with one free, waiting up to `timeout` seconds
        (asleep, holding nothing) for one; None at the timeout or once `give_up()` says so."""
        deadline = time.monotonic() + timeout
        cells = [self._cell(endpoint, worker) for endpoint in endpoints]
        while True:
            with self._locked(worker):
                taken = next((e for e in endpoints if self._take(e, worker)), None)
                remaining = deadline - time.monotonic()
                done = taken is not None or remaining <= 0 or give_up()
                for cell in cells:
                    self._waiting[cell] = 0.0 if done else 1.0
            if done:
                return taken
            self._wake.acquire(timeout=min(remaining, WAKE_BOUND_S))

    def observe(self, endpoint: str, worker: int, outcome: Outcome, now: float | None = None) -> None:
        """What became of one request sent under a permit still held (a batch sends several)."""
        now = time.monotonic() if now is None else now
        with self._locked(worker):
            self._learn(endpoint, outcome, now)
            self._wake_waiters(endpoint)

    def set_max(self, max_limit: int) -> None:
        """The worker count changed: no endpoint's limit goes above it (nor below the floor)."""
        with self._locked(NO_HOLDER):
            self._max.value = max(max_limit, self.min_limit)
            self._sync_max()
            for limit in self._limits:
                limit.value = min(limit.value, self._max.value)

    def describe(self, endpoint: str) -> dict[str, float | int]:
        """The endpoint's limit (4 or 4.25), permits in use and waiting workers, for status and metrics."""
        with self._locked(NO_HOLDER):
            return {"limit": self._limits[self._index[endpoint]].shown(), "in_use": self.in_use(endpoint),
                    "waiting": self.waiting(endpoint)}

    def release(self, endpoint: str, worker: int, outcome: Outcome = None, now: float | None = None) -> None:
        """Give a permit back, with what became of its request; wakes waiters it makes room for."""
        now = time.monotonic() if now is None else now
        with self._locked(worker):
            cell = self._cell(endpoint, worker)
            if self._held[cell] < 1:
                raise ValueError(f"worker {worker} holds no permit for {endpoint}")
            self._held[cell] -= 1
            self._learn(endpoint, outcome, now)
            self._wake_waiters(endpoint)

    def _learn(self, endpoint: str, outcome: Outcome, now: float) -> None:
        """Under the lock: move the endpoint's limit by one request's outcome."""
        limit = self._limits[self._index[endpoint]]
        if isinstance(outcome, Success):
            limit.on_success(outcome.latency_s, outcome.chars, now)
        elif isinstance(outcome, Overload):
            limit.on_overload(outcome.kind, now, outcome.latency_s)

    def release_all_of(self, worker: int) -> int:
        """Hand back every permit of a worker that is gone; returns how many it held."""
        with self._locked(worker, dead=True):
            freed = 0
            for endpoint in self.endpoints:
                cell = self._cell(endpoint, worker)
                freed += int(self._held[cell])
                self._held[cell] = self._waiting[cell] = 0.0
                self._wake_waiters(endpoint)
            return freed

    def factor_2_change(self, endpoint: str) -> tuple[float, float] | None:
        """(limit last reported, limit now) when the limit moved by more than a factor of 2 since; for the log."""
        with self._locked(NO_HOLDER):
            return self._limits[self._index[endpoint]].factor_2_change()

    def _sync_max(self) -> None:
        """Under the lock: this process's limits take the shared maximum (set in another process)."""
        for limit in self._limits:
            limit.max_limit = int(self._max.value)

    def _cell(self, endpoint: str, worker: int) -> int:
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker slot: expected 0..{self.workers - 1}, got {worker}")
        return worker * len(self.endpoints) + self._index[endpoint]

    def _take(self, endpoint: str, worker: int) -> bool:
        """Under the lock: one more permit for the worker if the endpoint's limit allows."""
        in_use = self.in_use(endpoint)
        limit = self._limits[self._index[endpoint]]
        if in_use >= limit.limit:
            return False
        self._held[self._cell(endpoint, worker)] += 1
        limit.note_in_flight(in_use + 1)
        return True

    def _wake_waiters(self, endpoint: str) -> None:
        """Under the lock: one wake-up per free permit, up to the number of waiters."""
        free = self.limit(endpoint) - self.in_use(endpoint)
        for _ in range(max(0, min(free, self.waiting(endpoint)))):
            self._wake.release()

    @contextmanager
    def _locked(self, worker: int, dead: bool = False) -> Iterator[None]:
        """Hold the lock, naming the holder. For a dead worker's clean-up, a lock still held by
        that worker after LOCK_STUCK_S is taken over: it died inside and will never let go."""
        if not self._lock.acquire(timeout=self.lock_stuck_s if dead else None) and self._holder[0] != worker:
            self._lock.acquire()
        self._holder[0] = float(worker)
        self._sync_max()
        try:
            yield
        finally:
            self._holder[0] = NO_HOLDER
            self._lock.release()
