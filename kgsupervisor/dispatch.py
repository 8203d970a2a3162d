"""Sending one document to the KG service: the next healthy endpoint, the next again on its outage."""
from __future__ import annotations

import logging
import time
from typing import Any

from .answer import IngestResult
from .endpoints import Endpoint, EndpointPool
from .errors import DocumentRejected, InvalidAnswer, ItemFailure, ServiceUnavailable
from .heartbeat import SharedCounters


class Dispatcher:
    """A worker's way to the KG service endpoints: failover, breakers, probes and latency."""

    def __init__(self, endpoints: EndpointPool, counters: SharedCounters,
                 log: logging.Logger | logging.LoggerAdapter) -> None:
        self.endpoints = endpoints
        self.counters = counters
        self.log = log

    def send(self, payload: dict[str, Any], rowids: set[int]) -> tuple[IngestResult, float]:
        """POST to the next healthy endpoint, and on that endpoint's outage to the next one.

        Returns the result and the request's seconds. Raises ServiceUnavailable once every
        healthy endpoint was down for this document (no attempt charged), or the item's own
        failure (ItemFailure, InvalidAnswer, DocumentRejected).
        """
        tried: list[Endpoint] = []
        outage = ServiceUnavailable("every KG service endpoint is down")
        while (endpoint := self.endpoints.choose(exclude=tried)) is not None:
            tried.append(endpoint)
            sent = time.monotonic()
            try:
                # A blip is retried inline only where there is no other endpoint to go to.
                result = endpoint.client.ingest(payload, rowids, retry_blips=not self.endpoints.has_another(tried))
            except ItemFailure as exc:
                self.observe(endpoint, sent, ok=False)
                # A 500 or timeout while /health also fails is an outage, not this document.
                if isinstance(exc, InvalidAnswer) or endpoint.client.health():
                    raise
                outage = ServiceUnavailable(str(exc))
            except ServiceUnavailable as exc:
                self.observe(endpoint, sent, ok=False)
                outage = exc
            except DocumentRejected:
                self.observe(endpoint, sent, ok=True)
                raise
            else:
                return result, self.observe(endpoint, sent, ok=True)
            self.endpoint_down(endpoint, outage)
        raise outage

    def probe_endpoints(self, mono: float) -> None:
        """Ask /health of each endpoint whose breaker is open and whose probe is due."""
        for endpoint in self.endpoints.probes_due(mono):
            if endpoint.client.health():
                endpoint.breaker.record_success()
                self.log.info("KG service at %s is healthy again; resuming", endpoint.url)
            else:
                endpoint.breaker.record_failure(mono)
                self.log.info("KG service at %s still down; next probe in %.1fs", endpoint.url,
                              endpoint.breaker.seconds_to_probe(mono))

    def observe(self, endpoint: Endpoint, sent: float, ok: bool) -> float:
        took = time.monotonic() - sent
        self.counters.observe_latency(took)
        endpoint.record_request(took, ok)
        return took

    def endpoint_down(self, endpoint: Endpoint, exc: ServiceUnavailable) -> None:
        """Feed the endpoint's breaker; say so when that leaves the others, or nothing."""
        if not endpoint.record_outage(time.monotonic(), exc.retry_after):
            return
        left = self.endpoints.healthy_count()
        if left:
            self.log.error("KG service at %s unavailable, sending to the %d other healthy endpoint(s): %s",
                           endpoint.url, left, exc)
        else:
            self.log.error("KG service unavailable, pausing claims (no document is charged): %s", exc)
