"""Rate budgets per KG endpoint: requests per minute and estimated tokens per minute.

A worker spends from its endpoint's budget before it claims a document, so waiting for budget
never holds a claim and never costs an attempt. The counts are pyrate-limiter sliding-window logs
(every window of `window_s`, not only aligned minutes) kept by a multiprocessing manager, so the
budget is shared by every worker forked from the supervisor that created it.

A request spends from two logs at once (requests and tokens). pyrate-limiter's put() spends as it
checks, so a put that passed on one log and failed on the other would waste the first: under one
lock both logs are checked first (peek at the entry that would block) and only then both spent.
"""
from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.managers import SyncManager

from pyrate_limiter import InMemoryBucket, Rate, RateItem
from pyrate_limiter.buckets.mp_bucket import MultiprocessBucket

from kgsupervisor.errors import KGSupervisorError

DEFAULT_CHARS_PER_TOKEN = 4.0
WINDOW_S = 60.0
REQUESTS = "requests"
TOKENS = "tokens"


class OverBudget(KGSupervisorError):
    """A document needs more tokens than its endpoint's whole budget: it can never be sent."""


@dataclass(frozen=True)
class Budget:
    """The limits of one endpoint per window; None means that kind is not limited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def limits(self) -> dict[str, int]:
        """The limited kinds and their limits."""
        kinds = {REQUESTS: self.requests_per_minute, TOKENS: self.tokens_per_minute}
        return {kind: limit for kind, limit in kinds.items() if limit is not None}


def estimated_tokens(chars: int, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN) -> int:
    """Tokens a document of `chars` characters is estimated to cost, rounded up."""
    return math.ceil(chars / chars_per_token)


class RateBudgets:
    """Per endpoint budgets, shared by the processes forked after it is made (or one process's own
    when `shared` is False). Endpoints not named have no budget. Times are `clock` seconds."""

    def __init__(self, budgets: Mapping[str, Budget], chars_per_token: float = DEFAULT_CHARS_PER_TOKEN,
                 window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, shared: bool = True,
                 keeper_init: Callable[[], None] | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        self.chars_per_token = chars_per_token
        self.window_ms = round(window_s * 1000)
        self.last_spent_at: float | None = None  # per process: when this process last spent
        self._clock = clock
        self._sleep = sleep
        self._lock = ctx.Lock()
        self._manager = None
        if shared and any(b.limits() for b in budgets.values()):
            # The logs' keeper process; `keeper_init` runs first in it (the supervisor's: shed its
            # descriptors, ignore its signals, die with it).
            self._manager = SyncManager(ctx=ctx)
            self._manager.start(keeper_init)
        self._limits = {e: b.limits() for e, b in budgets.items()}
        self._logs = {e: {kind: self._new_log(limit) for kind, limit in limits.items()}
                      for e, limits in self._limits.items()}

    def close(self) -> None:
        """Stop the manager process that keeps the shared logs."""
        if self._manager is not None:
            self._manager.shutdown()

    @property
    def keeper_alive(self) -> bool:
        """The process keeping the shared logs is there (always, for a process's own logs)."""
        process = getattr(self._manager, "_process", None)
        return self._manager is None or (process is not None and process.is_alive())

    def tokens(self, chars: int) -> int:
        return estimated_tokens(chars, self.chars_per_token)

    def try_spend(self, endpoint: str, chars: int) -> bool:
        """Spend one request and the document's tokens if the budget has room now; never waits."""
        with self._lock:
            now_ms = self._now_ms()
            if self._free_at_ms(endpoint, chars, now_ms) > now_ms:
                return False
            self._spend(endpoint, chars, now_ms)
            return True

    def next_free_at(self, endpoint: str, chars: int) -> float:
        """When the document would fit (now or earlier if it fits now), unless others spend first."""
        with self._lock:
            now_ms = self._now_ms()
            return max(self._free_at_ms(endpoint, chars, now_ms), now_ms) / 1000

    def seconds_until_room(self, endpoint: str, chars: int) -> float:
        """How long until the document would fit (0: it fits now), unless others spend first."""
        with self._lock:
            now_ms = self._now_ms()
            return max(0, self._free_at_ms(endpoint, chars, now_ms) - now_ms) / 1000

    def wait_for(self, endpoint: str, chars: int, deadline: float) -> bool:
        """Spend as soon as the budget has room, asleep and holding nothing meanwhile; False as
        soon as it is clear the room comes after `deadline` (a `clock` time)."""
        while True:
            with self._lock:
                now_ms = self._now_ms()
                free_at_ms = self._free_at_ms(endpoint, chars, now_ms)
                if free_at_ms <= now_ms:
                    self._spend(endpoint, chars, now_ms)
                    return True
            if free_at_ms / 1000 > deadline:
                return False
            self._sleep(max(0.0, free_at_ms / 1000 - self._clock()))

    def used(self, endpoint: str) -> dict[str, int]:
        """Requests and tokens spent in the last window, per limited kind; for status and metrics."""
        with self._lock:
            now_ms = self._now_ms()
            return {kind: self._in_window(log, now_ms) for kind, log in self._logs.get(endpoint, {}).items()}

    def limits(self, endpoint: str) -> dict[str, int]:
        return dict(self._limits.get(endpoint, {}))

    def _new_log(self, limit: int) -> InMemoryBucket:
        rates = [Rate(limit, self.window_ms)]
        if self._manager is None:
            return InMemoryBucket(rates)
        return MultiprocessBucket(rates, self._manager.list(), self._manager.RLock())

    def _now_ms(self) -> int:
        """Read under the lock, so entries reach the logs in time order (the logs bisect on it)."""
        return math.floor(self._clock() * 1000)

    def _weights(self, chars: int) -> dict[str, int]:
        return {REQUESTS: 1, TOKENS: self.tokens(chars)}

    def _free_at_ms(self, endpoint: str, chars: int, now_ms: int) -> int:
        """Under the lock: the first millisecond every log of the endpoint has room for the request."""
        weights = self._weights(chars)
        free_at = now_ms
        for kind, log in self._logs.get(endpoint, {}).items():
            free_at = max(free_at, self._log_free_at_ms(log, self._limits[endpoint][kind], weights[kind],
                                                        now_ms, f"{endpoint} {kind}"))
        return free_at

    def _log_free_at_ms(self, log: InMemoryBucket, limit: int, weight: int, now_ms: int, name: str) -> int:
        """The entry `limit - weight` back from the newest blocks until it leaves the window: the
        window holds the entries stamped within [now - window, now], both ends included."""
        if weight > limit:
            raise OverBudget(f"{name}: {weight} needed, the whole budget is {limit} a window")
        log.leak(now_ms)
        blocking = log.peek(limit - weight) if weight else None
        if blocking is None or blocking.timestamp < now_ms - self.window_ms:
            return now_ms
        return blocking.timestamp + self.window_ms + 1

    def _spend(self, endpoint: str, chars: int, now_ms: int) -> None:
        """Under the lock, once every log was seen to have room."""
        weights = self._weights(chars)
        for kind, log in self._logs.get(endpoint, {}).items():
            if weights[kind] and not log.put(RateItem(endpoint, now_ms, weight=weights[kind])):
                raise RuntimeError(f"{endpoint} {kind}: the log refused an entry it had room for")
        self.last_spent_at = now_ms / 1000

    def _in_window(self, log: InMemoryBucket, now_ms: int) -> int:
        log.leak(now_ms)
        return log.count()
