"""The HTTP client of the KG service: send one document, classify the outcome, check health."""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
from collections.abc import Collection
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests
import tenacity
import urllib3

from .answer import IngestResult, parse_answer
from .errors import DocumentRejected, InvalidAnswer, ItemFailure, ServiceUnavailable

log = logging.getLogger("kgsupervisor.kgclient")

INGEST_PATH = "/api/v1/ingest"
HEALTH_PATH = "/health"
GATEWAY_DOWN = {502, 503, 504}
# Retry-After values up to this are waited out inside one request; longer ones go back to the
# queue with a not-before time instead of holding a worker.
MAX_INLINE_WAIT = 10.0
BLIP_WAIT = tenacity.wait_random_exponential(multiplier=0.2, max=2.0)


def _retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
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
                 max_answer_bytes: int = 64 * 1024 * 1024, inline_attempts: int = 3) -> None:
        self.url = url.rstrip("/")
        self.read_timeout = read_timeout
        self.connect_timeout = connect_timeout
        self.health_timeout = health_timeout
        self.max_answer_bytes = max_answer_bytes
        self.health_status = ServiceHealth(url=self.url)
        self._session = _session_with_environment_read_once(self.url)
        self._session.headers["User-Agent"] = "kgsupervisor"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(inline_attempts), wait=_inline_wait,
            retry=tenacity.retry_if_exception(_worth_inline_retry), reraise=True)

    def __repr__(self) -> str:  # never show the token
        return f"KGClient(url={self.url!r})"

    def close(self) -> None:
        self._session.close()

    def ingest(self, payload: dict[str, Any], chunk_rowids: Collection[int], *,
               retry_blips: bool = True) -> IngestResult:
        """POST one document and return its validated result.

        Raises ServiceUnavailable (the service is down or busy), ItemFailure / InvalidAnswer (this
        document failed; worth another attempt) or DocumentRejected (never worth another).
        `retry_blips=False` gives up on the first refused connection or gateway error: the caller
        has another endpoint to try.
        """
        body = self._retrying(self._post_once, payload) if retry_blips else self._post_once(payload)
        return parse_answer(body, content_id=payload["content_id"], chunk_rowids=chunk_rowids,
                            max_bytes=self.max_answer_bytes)

    def _post_once(self, payload: dict[str, Any]) -> bytes:
        try:
            resp = self._session.post(self.url + INGEST_PATH, json=payload, stream=True,
                                      timeout=(self.connect_timeout, self.read_timeout))
        except requests.exceptions.ReadTimeout:
            raise ItemFailure(f"KG service did not answer within {self.read_timeout:g}s") from None
        except requests.exceptions.ConnectTimeout:
            raise ServiceUnavailable(f"KG service at {self.url} did not accept a connection "
                                     f"within {self.connect_timeout:g}s") from None
        except requests.exceptions.RequestException as exc:
            raise ServiceUnavailable(f"KG service at {self.url} unreachable: {_short(exc)}") from None
        with resp:
            self._raise_for_status(resp)
            return self._read_limited(resp)

    def _raise_for_status(self, resp: requests.Response) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
        detail = _error_detail(resp)
        if status == 429:
            raise ServiceUnavailable(f"KG service is rate limiting (429){detail}",
                                     retry_after=_retry_after_seconds(resp.headers.get("Retry-After")) or 1.0)
        if status in GATEWAY_DOWN:
            raise ServiceUnavailable(f"KG service unavailable ({status}){detail}",
                                     retry_after=_retry_after_seconds(resp.headers.get("Retry-After")))
        if status in (401, 403):
            # Not the document's fault: a wrong token would otherwise fail the whole queue.
            raise ServiceUnavailable(f"KG service refused our credentials ({status}): check KG_SERVICE_TOKEN")
        if status in (404, 405):
            raise ServiceUnavailable(f"KG service has no {INGEST_PATH} ({status}): check KG_SERVICE_URL={self.url}")
        if status >= 500:
            raise ItemFailure(f"KG service error {status}{detail}")
        raise DocumentRejected(f"KG service rejected the document ({status}){detail}")

    def _read_limited(self, resp: requests.Response) -> bytes:
        chunks, size = [], 0
        try:
            for chunk in resp.iter_content(chunk_size=256 * 1024):
                size += len(chunk)
                if size > self.max_answer_bytes:
                    raise InvalidAnswer(f"answer is over the {self.max_answer_bytes}-byte limit")
                chunks.append(chunk)
        except requests.exceptions.RequestException as exc:
            if _is_read_timeout(exc):
                # Headers came, then the body stalled past the read timeout: the same item failure
                # as a timeout before the headers (the worker asks /health whose fault it is).
                raise ItemFailure(f"KG service did not finish its answer within {self.read_timeout:g}s") from None
            # The connection broke mid-body: the service is in trouble, not the document.
            raise ServiceUnavailable(f"KG service connection broke mid-answer: {_short(exc)}") from None
        return b"".join(chunks)

    def health(self) -> bool:
        """GET /health; records and returns whether the service said it is healthy."""
        ok = False
        try:
            resp = self._session.get(self.url + HEALTH_PATH,
                                     timeout=(self.connect_timeout, self.health_timeout))
            ok = resp.status_code == 200 and _says_healthy(resp)
        except requests.exceptions.RequestException:
            ok = False
        self.record_health(ok)
        return ok

    def record_health(self, ok: bool) -> None:
        h = self.health_status
        h.is_healthy = ok
        h.last_health_check = datetime.now(timezone.utc).isoformat(timespec="seconds")
        h.consecutive_failures = 0 if ok else h.consecutive_failures + 1


def _session_with_environment_read_once(url: str) -> requests.Session:
    """A session that honours HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE as read now.

    With trust_env on, requests re-reads the proxy variables and ~/.netrc on every request: a
    tenth of a bare POST's cost on loopback. A worker's environment never changes (a reload
    starts new workers), so it is read once here.
    """
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session


def _says_healthy(resp: requests.Response) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("status", "")).lower() in ("healthy", "ok")


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
