"""The HTTP client of the KG service: send one document, classify the outcome, check health."""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import re
import socket
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import tenacity
import urllib3

from kgsupervisor.addresses import mask_urls
from kgsupervisor.errors import DocumentRejected, InvalidAnswer, ItemFailure, ServiceUnavailable
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.kg.deadline import Deadline, DeadlineAdapter, Watchdog
from kgsupervisor.kg.result import IngestResult
from kgsupervisor.masking import Mask, secrets_in

log = logging.getLogger("kgsupervisor.kgclient")

INGEST_PATH = "/api/v1/ingest"
HEALTH_PATH = "/health"
GATEWAY_DOWN = {502, 503, 504}
JSON_HEADERS = {"Content-Type": "application/json"}
HEALTH_MAX_BYTES = 64 * 1024  # the real service's /health answer is a few hundred bytes
# The real service's error while its processor is not initialized: "Processing failed: 503: ...".
_NOT_READY = re.compile(r"Processing failed: 503\b")
# Retry-After values up to this are waited out inside one request; longer ones go back to the
# queue with a not-before time instead of holding a worker.
MAX_INLINE_WAIT = 10.0
BLIP_WAIT = tenacity.wait_random_exponential(multiplier=0.2, max=2.0)


def _retry_after_seconds(value: str | None, cap: float) -> float | None:
    """Retry-After (delta-seconds or an HTTP date) as seconds, at most `cap`; None when absent or
    not a finite time (`inf`, `nan`, `-5`, not a date).

    The cap is KG_RETRY_BACKOFF_MAX: a service asking for years (`1e300`, a date in 9999) must
    not park documents where nothing, `retry` included, would ever claim them again.
    """
    seconds = _delta_seconds(value) if value else None
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


def _delta_seconds(value: str) -> float | None:
    """Retry-After's seconds from now as the service wrote them (maybe negative, inf or nan)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, local zone unknown (RFC 5322)
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _inline_wait(state: tenacity.RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, ServiceUnavailable) and exc.retry_after is not None:
        return exc.retry_after
    return BLIP_WAIT(state)


def _worth_inline_retry(exc: BaseException) -> bool:
    """Short blips only: a refused connection or a gateway saying 'later' for a moment."""
    if not isinstance(exc, ServiceUnavailable):
        return False
    return exc.retry_after is None or exc.retry_after <= MAX_INLINE_WAIT


class HealthVerdict(enum.Enum):
    """What GET /health said: the real service answers 200 with healthy, degraded or unhealthy."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"    # a dependency is down; ingests may still work
    UNHEALTHY = "unhealthy"  # answering, but says it is not fit (e.g. models loading)
    DOWN = "down"            # unreachable, an error status, or not a health answer

    @property
    def answering(self) -> bool:
        """Reachable and able to say so: worth one trial document while the breaker is open."""
        return self is not HealthVerdict.DOWN


@dataclasses.dataclass
class ServiceHealth:
    """What the last health checks said about the service (CONTRACT §7 kg_service_status)."""

    url: str
    enabled: bool = True
    is_healthy: bool | None = None
    last_health_check: str | None = None
    consecutive_failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class KGClient:
    """One keep-alive session to the KG service; never touches the database."""

    def __init__(self, url: str, read_timeout: float, *, token: str | None = None,
                 connect_timeout: float = 10.0, health_timeout: float = 5.0,
                 max_answer_bytes: int = 64 * 1024 * 1024, inline_attempts: int = 3,
                 max_retry_after: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.read_timeout = read_timeout  # per read, and for the whole request (see deadline.py)
        self.connect_timeout = connect_timeout
        self.health_timeout = health_timeout
        self.max_answer_bytes = max_answer_bytes
        self.max_retry_after = max_retry_after
        self.health_status = ServiceHealth(url=self.url)
        # The last ingest's answer as the attempt history records it: its HTTP status and size.
        self.last_status: int | None = None
        self.last_answer_bytes: int | None = None
        # Wraps each network wait (an ingest's exchange, inline retries included; a health check),
        # all bounded by their timeouts: a worker's hang check does not count them. Not the parse.
        self.waiting: Callable[[], AbstractContextManager[object]] = nullcontext
        self._watchdog = Watchdog()
        self._session = _session_with_environment_read_once(self.url)
        self._session.headers["User-Agent"] = "kgsupervisor"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        self._mask = Mask([token or "", *secrets_in(self.url)])
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(inline_attempts), wait=_inline_wait,
            retry=tenacity.retry_if_exception(_worth_inline_retry), reraise=True)

    def __repr__(self) -> str:  # never show the token
        return f"KGClient(url={self.url!r})"

    def close(self) -> None:
        self._session.close()
        self._watchdog.close()

    def ingest(self, content_id: int, body: bytes, chunk_rowids: Collection[int], *,
               retry_blips: bool = True) -> IngestResult:
        """POST one document's request `body` (documents.encode_payload) and return its validated result.

        Raises ServiceUnavailable (the service is down or busy), ItemFailure / InvalidAnswer (this
        document failed; worth another attempt) or DocumentRejected (never worth another).
        `retry_blips=False` gives up on the first refused connection or gateway error: the caller
        has another endpoint to try.
        """
        try:
            with self.waiting():
                answer = self._retrying(self._post_once, body) if retry_blips else self._post_once(body)
            return parse_answer(answer, content_id=content_id, chunk_rowids=chunk_rowids,
                                max_bytes=self.max_answer_bytes)
        except (ServiceUnavailable, ItemFailure, DocumentRejected) as exc:
            # Its message is logged and stored: it may quote our URL with its credentials, or the
            # service echoing our Authorization header (requests' own errors quote it too).
            exc.args = (self._mask(str(exc)),)
            raise

    def _post_once(self, body: bytes) -> bytes:
        """One POST, all of it (sending, the headers, the whole answer) within read_timeout."""
        self.last_status = self.last_answer_bytes = None
        with self._watchdog.deadline(self.read_timeout) as deadline:
            resp = self._send(body, deadline)
            self.last_status = resp.status_code
            with resp:
                self._raise_for_status(resp)
                answer = self._read_limited(resp, deadline)
            self.last_answer_bytes = len(answer)
            return answer

    def _send(self, body: bytes, deadline: Deadline) -> requests.Response:
        """POST the document; the answer's status and headers, its body left to read.

        No redirect is followed: a 307/308 would send the document to another host, and a 302
        would turn the POST into a GET whose answer passes for an empty result.
        """
        try:
            resp = self._session.post(self.url + INGEST_PATH, data=body, headers=JSON_HEADERS, stream=True,
                                      allow_redirects=False, timeout=(self.connect_timeout, self.read_timeout))
        except requests.exceptions.ConnectTimeout:
            raise ServiceUnavailable(f"KG service at {self.url} did not accept a connection "
                                     f"within {self.connect_timeout:g}s") from None
        except requests.exceptions.RequestException as exc:
            if deadline.expired or isinstance(exc, requests.exceptions.ReadTimeout):
                raise ItemFailure(f"KG service did not answer within {self.read_timeout:g}s") from None
            raise ServiceUnavailable(f"KG service at {self.url} unreachable: {_short(exc)}") from None
        if deadline.expired:
            # Cut while the headers trickled in: the cut may have passed for their end.
            resp.close()
            raise ItemFailure(f"KG service did not answer within {self.read_timeout:g}s")
        return resp

    def _raise_for_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
        detail = _error_detail(resp)
        retry_after = _retry_after_seconds(resp.headers.get("Retry-After"), self.max_retry_after)
        if status == 429:
            raise ServiceUnavailable(f"KG service is rate limiting (429){detail}", retry_after=retry_after or 1.0)
        if status in GATEWAY_DOWN:
            raise ServiceUnavailable(f"KG service unavailable ({status}){detail}", retry_after=retry_after)
        if 300 <= status < 400:
            # A misconfigured URL, as a 404 is: an outage that charges no document.
            location = mask_urls(resp.headers.get("Location") or "(no Location header)")[:300]
            raise ServiceUnavailable(f"KG service redirects {INGEST_PATH} ({status}) to {location}, "
                                     f"which is not followed: check KG_SERVICE_URL={self.url}")
        if status in (401, 403):
            # Not the document's fault: a wrong token would otherwise fail the whole queue.
            raise ServiceUnavailable(f"KG service refused our credentials ({status}): check KG_SERVICE_TOKEN")
        if status in (404, 405):
            raise ServiceUnavailable(f"KG service has no {INGEST_PATH} ({status}): check KG_SERVICE_URL={self.url}")
        if status >= 500 and _NOT_READY.search(detail):
            # The real service wraps its own 503 in a 500 while its models load: nobody's document.
            raise ServiceUnavailable(f"KG service is not ready ({status}){detail}")
        if status >= 500:
            raise ItemFailure(f"KG service error {status}{detail}")
        raise DocumentRejected(f"KG service rejected the document ({status}){detail}")

    def _read_limited(self, resp: requests.Response, deadline: Deadline) -> bytes:
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(chunk_size=256 * 1024):
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise InvalidAnswer(f"answer is over the {self.max_answer_bytes}-byte limit")
                chunks.append(chunk)
        except requests.exceptions.RequestException as exc:
            if deadline.expired or _is_read_timeout(exc):
                # Headers came, then the body stalled or trickled past the timeout: the same item
                # failure as a timeout before the headers (the worker asks /health whose fault it is).
                raise ItemFailure(f"KG service did not finish its answer within {self.read_timeout:g}s") from None
            # The connection broke mid-body: the service is in trouble, not the document.
            raise ServiceUnavailable(f"KG service connection broke mid-answer: {_short(exc)}") from None
        if deadline.expired:
            # The cut may have passed for the end of a body sent without a length.
            raise ItemFailure(f"KG service did not finish its answer within {self.read_timeout:g}s")
        return b"".join(chunks)

    def check_health(self) -> HealthVerdict:
        """GET /health; records (as the upstream does: "degraded" is up) and returns the verdict.

        Bounded like an ingest: a total deadline (a /health trickled byte by byte must not hold
        the worker) and a size limit; either one exceeded, or a redirect, says DOWN.
        """
        wait = self.connect_timeout + self.health_timeout
        try:
            with self.waiting(), self._watchdog.deadline(wait) as deadline:
                with self._session.get(self.url + HEALTH_PATH, allow_redirects=False, stream=True,
                                       timeout=(self.connect_timeout, self.health_timeout)) as resp:
                    body = resp.raw.read(HEALTH_MAX_BYTES + 1, decode_content=True)
            too_big = len(body) > HEALTH_MAX_BYTES
            verdict = HealthVerdict.DOWN if deadline.expired or too_big else _health_verdict(resp.status_code, body)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError):
            verdict = HealthVerdict.DOWN
        self.record_health(verdict in (HealthVerdict.HEALTHY, HealthVerdict.DEGRADED))
        return verdict

    def record_health(self, ok: bool) -> None:
        h = self.health_status
        h.is_healthy = ok
        h.last_health_check = datetime.now(timezone.utc).isoformat(timespec="seconds")
        h.consecutive_failures = 0 if ok else h.consecutive_failures + 1


def _session_with_environment_read_once(url: str) -> requests.Session:
    """A session that honours HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE as read now.

    With trust_env on, requests re-reads the proxy variables and ~/.netrc on every request: a
    tenth of a bare POST's cost on loopback. A worker's environment never changes (a reload
    starts new workers), so it is read once here. Its connections can be cut by a deadline.
    """
    session = requests.Session()
    for prefix in ("http://", "https://"):
        session.mount(prefix, DeadlineAdapter())
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session


def _health_verdict(status_code: int, raw: bytes) -> HealthVerdict:
    if status_code != 200:
        return HealthVerdict.DOWN
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return HealthVerdict.DOWN
    if not isinstance(body, dict):
        return HealthVerdict.DOWN
    status = str(body.get("status", "")).lower()
    if status in ("healthy", "ok"):
        return HealthVerdict.HEALTHY
    return HealthVerdict.DEGRADED if status == "degraded" else HealthVerdict.UNHEALTHY


def _error_detail(resp: requests.Response) -> str:
    """The start of an error answer's body, for the message; best effort only. The status line
    already decided what happens to the document: an error body cut short or stalling (urllib3's
    ProtocolError / ReadTimeoutError, raised raw here) must not escape and kill the worker."""
    try:
        text = resp.raw.read(500, decode_content=True).decode("utf-8", "replace").strip() if resp.raw else ""
    except Exception:  # noqa: BLE001 - whatever broke, the detail is only decoration
        return " (error body unreadable)"
    return f": {' '.join(text.split())[:200]}" if text else ""


def _is_read_timeout(exc: requests.exceptions.RequestException) -> bool:
    """A read timeout while streaming the body: requests wraps urllib3's ReadTimeoutError in a
    plain ConnectionError there, unlike the ReadTimeout it raises while waiting for headers."""
    if isinstance(exc, requests.exceptions.Timeout):
        return True
    return any(isinstance(arg, (urllib3.exceptions.TimeoutError, socket.timeout)) for arg in exc.args)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."
