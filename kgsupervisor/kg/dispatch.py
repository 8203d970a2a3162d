"""Sending one document to the KG service: the next healthy endpoint, the next again on its outage."""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Protocol

from kgsupervisor.addresses import mask_urls
from kgsupervisor.errors import DocumentRejected, InvalidAnswer, ItemFailure, ServiceUnavailable
from kgsupervisor.kg.admission import Admission, endpoint_key
from kgsupervisor.kg.client import HealthVerdict
from kgsupervisor.kg.endpoints import Endpoint, EndpointPool
from kgsupervisor.kg.permits import Outcome, Overload, Success
from kgsupervisor.kg.result import IngestResult

# A document a not-yet-proven endpoint failed waits this long, so that others go first.
UNPROVEN_FAILURE_HOLD_BACK = 2.0
# The answers that say the service is full: they lower the endpoint's in-flight limit.
OVERLOAD_STATUSES = {429: "429", 503: "503"}


def load_signal(exc: BaseException | None, status: int | None, took: float, chars: int) -> Outcome:
    """What one request says of the endpoint's load, for its adaptive limit: an answer's latency,
    an overload (429, 503, no answer in time), or nothing (a fault of the document or the network)."""
    if exc is None:
        return Success(took, chars)
    if status in OVERLOAD_STATUSES:
        return Overload(OVERLOAD_STATUSES[status], took)
    if isinstance(exc, ItemFailure) and not isinstance(exc, InvalidAnswer) and status is None:
        return Overload("timeout", took)  # the only item failure without a status
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Exchange:
    """The last request of a send, as the attempt history records it."""

    endpoint: str               # the endpoint's URL, credentials masked
    sent_at: float              # wall-clock time the request went
    http_status: int | None     # None: no answer came (refused, cut, timed out before headers)
    answer_bytes: int | None    # the whole answer's size, when one was read


class LatencySink(Protocol):
    """Where a request's seconds go (the worker's shared counters)."""

    def observe_latency(self, seconds: float) -> None: ...


class Dispatcher:
    """A worker's way to the KG service endpoints: failover, breakers, probes and latency."""

    def __init__(self, endpoints: EndpointPool, counters: LatencySink,
                 log: logging.Logger | logging.LoggerAdapter, admission: Admission | None = None) -> None:
        self.endpoints = endpoints
        self.counters = counters
        self.log = log
        self.admission = admission
        self.last_exchange: Exchange | None = None  # of the last send, answered or not

    def send(self, content_id: int, body: bytes, rowids: set[int], chars: int = 0) -> tuple[IngestResult, float]:
        """POST to the next healthy endpoint, and on that endpoint's outage to the next one.

        Returns the result and the request's seconds. Raises ServiceUnavailable once every
        healthy endpoint was down for this document (no attempt charged), or the item's own
        failure (ItemFailure, InvalidAnswer, DocumentRejected). `chars`, the document's text,
        goes with each request's outcome to the endpoint's adaptive limit.
        """
        tried: list[Endpoint] = []
        outage = ServiceUnavailable("every KG service endpoint is down")
        self.last_exchange = None
        while (endpoint := self.next_endpoint(tried, chars)) is not None:
            tried.append(endpoint)
            sent, sent_at = time.monotonic(), time.time()
            error: BaseException | None = None
            try:
                # A blip is retried inline only where there is no other endpoint to go to.
                result = endpoint.client.ingest(content_id, body, rowids,
                                                retry_blips=not self.endpoints.has_another(tried))
            except InvalidAnswer as exc:
                error = exc
                self.observe(endpoint, sent, ok=False)
                raise
            except ItemFailure as exc:
                error = exc
                self.observe(endpoint, sent, ok=False)
                outage = self.blame(endpoint, exc)
                if outage is None:
                    raise
            except ServiceUnavailable as exc:
                error = outage = exc
                self.observe(endpoint, sent, ok=False)
            except DocumentRejected as exc:
                error = exc
                self.observe(endpoint, sent, ok=True)
                raise
            else:
                endpoint.answered_since_failure = True
                return result, self.observe(endpoint, sent, ok=True)
            finally:
                self.note_exchange(endpoint, sent_at)
                self.note_load(endpoint, error, time.monotonic() - sent, chars)
            endpoint.answered_since_failure = False
            self.endpoint_down(endpoint, outage)
        raise outage

    def next_endpoint(self, tried: list[Endpoint], chars: int) -> Endpoint | None:
        """The next healthy endpoint to try: the one whose permit the worker took first; on a
        failover, the next with a permit and budget room free now (the others are skipped)."""
        while (endpoint := self.endpoints.choose(exclude=tried)) is not None:
            if not tried or self.admission is None:
                return endpoint
            key = endpoint_key(endpoint.url)
            if self.admission.try_take(key) and self.admission.spend(key, chars) == 0:
                return endpoint
            tried.append(endpoint)  # full or out of budget now: not this document's way out
        return None

    def note_load(self, endpoint: Endpoint, error: BaseException | None, took: float, chars: int) -> None:
        """Tell the endpoint's adaptive limit what this request said of its load."""
        if self.admission is not None:
            self.admission.observe(endpoint_key(endpoint.url),
                                   load_signal(error, endpoint.client.last_status, took, chars))

    def note_exchange(self, endpoint: Endpoint, sent_at: float) -> None:
        """Keep what the history records of the request just made to `endpoint`."""
        client = endpoint.client
        self.last_exchange = Exchange(mask_urls(endpoint.url), sent_at, client.last_status,
                                      client.last_answer_bytes)

    def blame(self, endpoint: Endpoint, exc: ItemFailure) -> ServiceUnavailable | None:
        """Whose fault is a 500 or a timeout: None when the document's (charge it), else the outage.

        The document's when the endpoint has answered another document since its last failure
        (it ingests; this one broke it), or when /health says "healthy". Otherwise, a service
        that is "degraded", "unhealthy" or gone has not shown it can ingest anything, and the
        document goes back uncharged, held back a moment so that other documents go first and
        can show whether the service works.
        """
        if endpoint.answered_since_failure:
            endpoint.answered_since_failure = False
            return None
        verdict = endpoint.client.check_health()
        if verdict is HealthVerdict.HEALTHY:
            return None
        return ServiceUnavailable(f"{exc} (not charged: {endpoint.url} has ingested no other document "
                                  f"since its last failure and /health says {verdict.value})",
                                  hold_back=UNPROVEN_FAILURE_HOLD_BACK)

    def probe_endpoints(self, mono: float) -> None:
        """Ask /health of each endpoint whose breaker is open and whose probe is due.

        "healthy" closes the breaker. "degraded" or "unhealthy" lets one document try (the real
        service may ingest while it says so, and may say so for ever); no answer keeps it open.
        """
        for endpoint in self.endpoints.probes_due(mono):
            verdict = endpoint.client.check_health()
            if verdict is HealthVerdict.HEALTHY:
                endpoint.breaker.record_success()
                self.log.info("KG service at %s is healthy again; resuming", endpoint.url)
            elif verdict.answering:
                endpoint.breaker.allow_trial()
                self.log.info("KG service at %s says %s; trying one document", endpoint.url, verdict.value)
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
