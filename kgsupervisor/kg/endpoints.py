"""The KG service endpoints of one worker: a client and a circuit breaker each, and which one is next."""
from __future__ import annotations

import dataclasses
from typing import Any

from kgsupervisor.config import Settings
from kgsupervisor.kg.breaker import BreakerState, CircuitBreaker
from kgsupervisor.kg.client import KGClient


@dataclasses.dataclass
class Endpoint:
    """One KG service instance as this worker sees it: its session, breaker and counts."""

    client: KGClient
    breaker: CircuitBreaker
    requests: int = 0
    failures: int = 0  # outages and item failures seen here
    latency_seconds: float = 0.0  # summed over `requests`
    # Has it answered a document with a result since its last failure? Then a 500 or a timeout
    # is that document's own fault, whatever /health says (see Dispatcher.blame).
    answered_since_failure: bool = False

    @property
    def url(self) -> str:
        return self.client.url

    def record_request(self, took: float, ok: bool) -> None:
        self.requests += 1
        self.latency_seconds += took
        if ok:
            self.breaker.record_success()
            self.client.record_health(True)
        else:
            self.failures += 1

    def record_outage(self, now: float, retry_after: float | None) -> bool:
        """This endpoint is down or refusing work; True when that opened its breaker."""
        self.client.record_health(False)
        return self.breaker.record_failure(now, retry_after)

    def status(self) -> dict[str, Any]:
        """Health and counts, the per-endpoint entry of kg_service_status."""
        health = self.client.health_status
        return {"url": self.url, "is_healthy": health.is_healthy, "last_health_check": health.last_health_check,
                "consecutive_failures": self.breaker.consecutive_failures, "breaker": self.breaker.state.value,
                "requests": self.requests, "failures": self.failures,
                "latency_seconds_total": round(self.latency_seconds, 6)}


class EndpointPool:
    """Round robin over the endpoints whose breaker is closed.

    Each worker starts at its own offset, so N one-request-at-a-time workers spread their
    documents evenly: with every endpoint healthy this is what least-in-flight would pick.
    """

    def __init__(self, endpoints: list[Endpoint], first: int = 0) -> None:
        if not endpoints:
            raise ValueError("at least one endpoint")
        self.endpoints = endpoints
        self._next = first % len(endpoints)

    @classmethod
    def from_settings(cls, settings: Settings, worker_id: int = 0) -> EndpointPool:
        token = settings.token()
        endpoints = []
        for url in settings.service_urls():
            client = KGClient(url, settings.service_timeout, token=token,
                              max_answer_bytes=int(settings.max_answer_mb * 1024 * 1024),
                              max_retry_after=settings.retry_backoff_max)
            client.health_status.enabled = settings.service_enabled
            endpoints.append(Endpoint(client, CircuitBreaker(threshold=settings.breaker_threshold)))
        return cls(endpoints, first=worker_id)

    @property
    def all_down(self) -> bool:
        """Every breaker open: claim nothing until a probe says one is back."""
        return all(e.breaker.is_open for e in self.endpoints)

    def healthy_count(self) -> int:
        return sum(1 for e in self.endpoints if not e.breaker.is_open)

    @property
    def trial_only(self) -> bool:
        """No breaker closed, one half-open: claim a single document to try the service with."""
        return not any(e.breaker.state is BreakerState.CLOSED for e in self.endpoints)

    def choose(self, exclude: list[Endpoint] | tuple[Endpoint, ...] = ()) -> Endpoint | None:
        """The next endpoint with a closed breaker not in `exclude`, or None."""
        n = len(self.endpoints)
        for i in range(n):
            endpoint = self.endpoints[(self._next + i) % n]
            if not endpoint.breaker.is_open and endpoint not in exclude:
                self._next = (self._next + i + 1) % n
                return endpoint
        return None

    def rotation(self) -> list[Endpoint]:
        """The endpoints with a closed breaker in the order choose() would give them."""
        n = len(self.endpoints)
        ordered = (self.endpoints[(self._next + i) % n] for i in range(n))
        return [e for e in ordered if not e.breaker.is_open]

    def prefer(self, endpoint: Endpoint) -> None:
        """choose() gives `endpoint` next (the one the worker holds a permit of)."""
        self._next = self.endpoints.index(endpoint)

    def has_another(self, exclude: list[Endpoint]) -> bool:
        """Is there a healthy endpoint not in `exclude`, to fail over to?"""
        return any(not e.breaker.is_open and e not in exclude for e in self.endpoints)

    def probes_due(self, now: float) -> list[Endpoint]:
        return [e for e in self.endpoints if e.breaker.probe_due(now)]

    def seconds_to_probe(self, now: float) -> float:
        return min(e.breaker.seconds_to_probe(now) for e in self.endpoints)

    def status(self, url: str, enabled: bool) -> dict[str, Any]:
        """This worker's verdict on the service: healthy while any endpoint is (CONTRACT §7 keys,
        plus `endpoints`)."""
        each = [e.status() for e in self.endpoints]
        checks = [s["last_health_check"] for s in each if s["last_health_check"]]
        verdicts = [s["is_healthy"] for s in each if s["is_healthy"] is not None]
        return {"url": url, "enabled": enabled,
                "is_healthy": any(verdicts) if verdicts else None,
                "last_health_check": max(checks, default=None),
                "consecutive_failures": min(s["consecutive_failures"] for s in each),
                "endpoints": each}

    def close(self) -> None:
        for e in self.endpoints:
            e.client.close()
