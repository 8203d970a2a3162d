"""A circuit breaker for the KG service: closed, open while it is down, probing until it is back."""
from __future__ import annotations

import enum
import random


class BreakerState(str, enum.Enum):
    CLOSED = "closed"        # send documents
    OPEN = "open"            # the service is down: claim nothing, probe /health now and then
    HALF_OPEN = "half-open"  # up but not healthy ("degraded"): one document tries whether ingests work


class CircuitBreaker:
    """Opens after `threshold` consecutive service failures; closes on the first good probe.

    Pure: every method takes `now` (monotonic seconds), so tests drive it with a fake clock.
    """

    def __init__(self, threshold: int = 3, probe_base: float = 0.5, probe_cap: float = 10.0) -> None:
        self.threshold = threshold
        self.probe_base = probe_base
        self.probe_cap = probe_cap
        self.state = BreakerState.CLOSED
        self.consecutive_failures = 0
        self.next_probe_at = 0.0
        self._probe_delay = probe_base

    @property
    def is_open(self) -> bool:
        return self.state is BreakerState.OPEN

    @property
    def is_half_open(self) -> bool:
        return self.state is BreakerState.HALF_OPEN

    def allow_trial(self) -> None:
        """A probe found the service answering but not healthy: let one document find out
        whether it ingests (a /health that stays "degraded" must not keep claims paused)."""
        if self.state is BreakerState.OPEN:
            # OPEN -> HALF_OPEN
            self.state = BreakerState.HALF_OPEN

    def record_success(self) -> None:
        """The service did its job: forget past failures."""
        self.consecutive_failures = 0
        # OPEN -> CLOSED
        self.state = BreakerState.CLOSED
        self._probe_delay = self.probe_base

    def record_failure(self, now: float, retry_after: float | None = None) -> bool:
        """Count one service failure; returns True when this one opened the breaker."""
        self.consecutive_failures += 1
        if self.state is BreakerState.OPEN:
            self._schedule_probe(now, retry_after)
            return False
        if self.state is BreakerState.HALF_OPEN:
            # HALF_OPEN -> OPEN: the trial failed; the probe backoff goes on growing.
            self.state = BreakerState.OPEN
            self._schedule_probe(now, retry_after)
            return False
        if self.consecutive_failures >= self.threshold or retry_after:
            # CLOSED -> OPEN
            self.state = BreakerState.OPEN
            self._probe_delay = self.probe_base
            self._schedule_probe(now, retry_after)
            return True
        return False

    def probe_due(self, now: float) -> bool:
        return self.state is BreakerState.OPEN and now >= self.next_probe_at

    def seconds_to_probe(self, now: float) -> float:
        return max(0.0, self.next_probe_at - now) if self.is_open else 0.0

    def _schedule_probe(self, now: float, retry_after: float | None) -> None:
        # Jitter keeps N workers of one host from probing a recovering service in lockstep.
        delay = self._probe_delay * random.uniform(0.8, 1.2)
        if retry_after:
            delay = max(delay, retry_after)
        self.next_probe_at = now + delay
        self._probe_delay = min(self._probe_delay * 2, self.probe_cap)
