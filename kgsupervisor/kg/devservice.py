"""The HTTP server behind `kgsupervisor dev-service`: the real service's routes, refusals, health."""
from __future__ import annotations

import hmac
import json
import math
import queue
import signal
import socketserver
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import urlsplit

from kgsupervisor import __version__
from kgsupervisor.kg.devcapacity import (CAPACITY_SIGNALS, CapacityModel, CapacitySchedule, QueueFull,
                                         admin_capacity, is_loopback)
from kgsupervisor.kg.devextract import extract
from kgsupervisor.kg.devvalidate import error_detail, parse_ingest_request

SERVICE_NAME = "kgsupervisor-dev-service"
SERVICE_VERSION = f"{__version__}-dev"
# 10 MB of text can grow sixfold as JSON \u escapes.
MAX_BODY_BYTES = 256 * 1024 * 1024
IDLE_CONNECTION_TIMEOUT_S = 120.0

HEALTH_STATES = ("healthy", "degraded", "unhealthy")
# The real service raises HTTPException(503) while its models load, and its own catch-all
# turns that into a 500 whose text carries the 503.
NOT_INITIALIZED = "503: KG processor not initialized"
ROUTES = {"/health": ("GET", "answer_health"), "/api/v1/ingest": ("POST", "answer_ingest")}
# Only a service with a capacity model has these; they answer callers on loopback only.
ADMIN_ROUTES = {"/admin/capacity": ("POST", "answer_admin_capacity")}
OVERLOAD_ERRORS = {503: "Service at capacity: too many requests waiting",
                   429: "Too many requests: service at capacity"}
RETRY_AFTER_S = 1  # the client's own backoff takes over from there
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_POLL_S = 1.0


class Refusal(Exception):
    """An answer other than 200, raised where a request turns out not to be answerable."""

    def __init__(self, status: int, answer: dict, headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.answer = answer
        self.headers = headers or {}


def error_answer(error: str, error_type: str) -> dict:
    """The real service's error body."""
    return {"success": False, "error": error, "error_type": error_type, "timestamp": _now()}


def http_error(status: int, error: str, headers: dict[str, str] | None = None) -> Refusal:
    """A refusal at the HTTP level, as the real service words a FastAPI HTTPException."""
    return Refusal(status, error_answer(error, "HTTPException"), headers)


def processing_failure(reason: str) -> Refusal:
    """The 500 the real service answers for anything that went wrong while processing."""
    return Refusal(500, error_answer(f"Processing failed: {reason}", "ProcessingError"))


def _unprocessable(loc: tuple, kind: str, value: object, ctx: dict | None = None) -> Refusal:
    return Refusal(422, {"detail": error_detail(loc, kind, value, ctx)})


def decode_ingest_body(body: bytes, content_type: str | None) -> dict:
    """The validated ingest request in `body`, or a Refusal: 422 worded as FastAPI does, or 400."""
    if content_type and not _is_json_media_type(content_type):
        # FastAPI reads a body it is not told is JSON as a string, which is not an object.
        raise _unprocessable(("body",), "model_attributes_type", body.decode("utf-8", "replace"))
    if not body:
        raise _unprocessable(("body",), "missing", None)
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _unprocessable(("body", exc.pos), "json_invalid", {}, {"error": exc.msg}) from None
    except (ValueError, RecursionError):  # not UTF-8, or nested deeper than the decoder goes
        raise http_error(400, "There was an error parsing the body") from None
    request, errors = parse_ingest_request(payload)
    if request is None:
        raise Refusal(422, {"detail": errors})
    request.setdefault("metadata", {})  # the model's default
    return request


def _is_json_media_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class DevServiceServer(ThreadingHTTPServer):
    """The HTTP server plus the state its handlers share: settings, switches and counters.

    `health_status` and `not_initialized` may be changed while it serves: tests switch the
    service between the states the real one goes through.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], *, latency: float, fail_rate: float,
                 token: str | None, verbose: bool, health: str = "healthy",
                 not_initialized: bool = False, capacity: CapacityModel | None = None) -> None:
        self.latency = latency
        # None: every request is served at once, as without --capacity.
        self.capacity = capacity
        self.fail_rate = fail_rate
        self.token = token
        self.verbose = verbose
        self.health_status = health
        # True: every ingest fails as the real service's do while its models load.
        self.not_initialized = not_initialized
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._requests_served = 0
        self._ingests_seen = 0
        super().__init__(address, _Handler)

    @property
    def health_status(self) -> str:
        """What /health says: healthy, degraded or unhealthy."""
        return self._health_status

    @health_status.setter
    def health_status(self, status: str) -> None:
        if status not in HEALTH_STATES:
            raise ValueError(f"health must be one of {', '.join(HEALTH_STATES)}, got {status!r}")
        self._health_status = status

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall
        # for seconds on hosts with broken resolvers; the dev service has no use for the name.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def count_request(self) -> None:
        with self._lock:
            self._requests_served += 1

    @property
    def requests_served(self) -> int:
        with self._lock:
            return self._requests_served

    def next_ingest_fails(self) -> bool:
        """Spread failures evenly: request n fails when floor((n+1)*rate) > floor(n*rate)."""
        with self._lock:
            n = self._ingests_seen
            self._ingests_seen += 1
        return math.floor((n + 1) * self.fail_rate) > math.floor(n * self.fail_rate)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        expected = f"Bearer {self.token}".encode("utf-8", "surrogatepass")
        given = (header or "").encode("utf-8", "surrogatepass")
        return hmac.compare_digest(expected, given)

    def health(self) -> dict:
        """The /health answer; loading models make a healthy service degraded, as upstream."""
        loading = self.not_initialized
        status = "degraded" if loading and self.health_status == "healthy" else self.health_status
        return {
            "status": status,
            "services": {
                "neo4j": "disconnected" if status == "unhealthy" else "connected",
                "llm": "disconnected" if status == "degraded" and not loading else "connected",
                "entity_model": "loading" if loading else "loaded",
            },
            "version": SERVICE_VERSION,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "timestamp": _now(),
            **(self.capacity.snapshot() if self.capacity else {}),
        }

    def route_of(self, path: str) -> tuple[str, str] | None:
        """(method, handler name) of the route at `path`, if it has one."""
        return ROUTES.get(path) or (ADMIN_ROUTES.get(path) if self.capacity else None)

    def ingest(self, authorization: str | None, content_type: str | None, body: bytes) -> dict:
        """The 200 answer to one ingest request; raises Refusal for every other answer."""
        return self.ingest_answer(authorization, content_type, body)[0]

    def ingest_answer(self, authorization: str | None, content_type: str | None,
                      body: bytes) -> tuple[dict, dict[str, str]]:
        """The 200 answer to one ingest request and its headers; raises Refusal for every other."""
        # Authentication comes before parsing so an unauthenticated caller learns nothing.
        if not self.authorized(authorization):
            raise http_error(401, "Invalid or missing bearer token", {"WWW-Authenticate": "Bearer"})
        request = decode_ingest_body(body, content_type)
        if self.not_initialized:
            raise processing_failure(NOT_INITIALIZED)
        if self.capacity is None:
            return self.extract_answer(request, time.monotonic()), {}
        arrived, chars = time.time(), sum(len(chunk["text"]) for chunk in request["chunks"])
        try:
            with self.capacity.slot() as admitted:
                started = time.monotonic()
                self.capacity.process(chars)
                # The admission number lets a test see the FIFO order the service kept.
                answer = self.extract_answer(request, started), {"X-Dev-Admission": str(admitted)}
            self.capacity.record(arrived, chars, 200)
            return answer
        except QueueFull:
            status = self.capacity.overload
            self.capacity.record(arrived, chars, status)
            raise http_error(status, OVERLOAD_ERRORS[status],
                             {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None) from None

    def extract_answer(self, request: dict, started: float) -> dict:
        """The extraction, after --latency and --fail-rate have had their say."""
        if self.latency > 0:
            time.sleep(self.latency)
        if self.next_ingest_fails():
            raise processing_failure("injected failure (--fail-rate)")
        try:
            answer = extract(request)
        except Exception as exc:  # noqa: BLE001 - a reference server answers rather than hanging up
            raise processing_failure(f"{type(exc).__name__}: {exc}") from None
        answer["processing_time_ms"] = int((time.monotonic() - started) * 1000)
        return answer

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(); a capacity schedule runs meanwhile, counted from here."""
        schedule = CapacitySchedule(self.capacity) if self.capacity and self.capacity.schedule else None
        if schedule:
            schedule.start()
        try:
            super().serve_forever(poll_interval)
        finally:
            if schedule:
                schedule.stop()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client hanging up mid-answer is routine for a test double; stay quiet about it.
        if self.verbose:
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Routes GET /health and POST /api/v1/ingest; every answer is JSON with a Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = SERVICE_NAME
    timeout = IDLE_CONNECTION_TIMEOUT_S
    # Headers and body go out in two writes; with Nagle on, a keep-alive client waits ~40 ms
    # for the delayed ACK before it sees the body.
    disable_nagle_algorithm = True
    server: DevServiceServer

    def route(self) -> None:
        """Answer one request: read its body, then pick the handler by path and method."""
        self.server.count_request()
        try:
            body = self.read_body()
            route = self.server.route_of(urlsplit(self.path).path)
            if route is None:
                raise http_error(404, "Not Found")
            if self.command != route[0]:
                raise http_error(405, "Method Not Allowed", {"Allow": route[0]})
            getattr(self, route[1])(body)
        except Refusal as refusal:
            self.send_json(refusal.status, refusal.answer, refusal.headers)

    # Every method goes through one router, so a known path with the wrong verb gets 405.
    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = route

    def read_body(self) -> bytes:
        """Read exactly Content-Length bytes, or raise the Refusal to answer."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise self.unread(411, "Content-Length required")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise self.unread(400, "Invalid Content-Length header") from None
        if length < 0:
            raise self.unread(400, "Invalid Content-Length header")
        if length > MAX_BODY_BYTES:
            raise self.unread(413, "Request body too large")
        return self.rfile.read(length) if length else b""

    @staticmethod
    def unread(status: int, error: str) -> Refusal:
        # The body was not read, so the connection cannot carry another request.
        return http_error(status, error, {"Connection": "close"})

    def answer_health(self, body: bytes) -> None:
        self.send_json(200, self.server.health())

    def answer_ingest(self, body: bytes) -> None:
        self.send_json(200, *self.server.ingest_answer(self.headers.get("Authorization"),
                                                       self.headers.get("Content-Type"), body))

    def answer_admin_capacity(self, body: bytes) -> None:
        if not is_loopback(self.client_address[0]):
            raise http_error(403, "Admin calls are answered on loopback only")
        capacity = admin_capacity(body)
        if capacity is None:
            raise http_error(400, 'Expected a JSON body {"capacity": N} with N an integer >= 1')
        self.server.capacity.set_capacity(capacity, f"admin call from {self.client_address[0]}")
        self.send_json(200, self.server.capacity.snapshot())

    def send_json(self, status: int, answer: dict, headers: dict[str, str] | None = None) -> None:
        # ensure_ascii keeps lone surrogates from the request encodable on the way back.
        body = json.dumps(answer).encode("ascii")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


def make_server(host: str = "127.0.0.1", port: int = 8088, *, latency: float = 0.0,
                fail_rate: float = 0.0, token: str | None = None, verbose: bool = False,
                health: str = "healthy", not_initialized: bool = False,
                capacity: CapacityModel | None = None) -> DevServiceServer:
    """Bind the dev service to (host, port) without serving; port 0 picks a free port.
    With a `capacity` model it serves as a GPU box would (devcapacity), without one at once."""
    if latency < 0:
        raise ValueError(f"latency must be >= 0, got {latency!r}")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError(f"fail_rate must be within [0, 1], got {fail_rate!r}")
    if health not in HEALTH_STATES:
        raise ValueError(f"health must be one of {', '.join(HEALTH_STATES)}, got {health!r}")
    return DevServiceServer((host, port), latency=latency, fail_rate=fail_rate, token=token,
                            verbose=verbose, health=health, not_initialized=not_initialized,
                            capacity=capacity)


def serve(host: str, port: int, *, latency: float = 0.0, fail_rate: float = 0.0,
          token: str | None = None, ready: Callable[[int], None] | None = None,
          verbose: bool = False, health: str = "healthy", not_initialized: bool = False,
          capacity: CapacityModel | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then close the socket and return; main thread only.
    With a `capacity` model, SIGUSR1 halves its capacity and SIGUSR2 restores it."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("serve() installs signal handlers and must run in the main thread; "
                           "use make_server() elsewhere")
    server = make_server(host, port, latency=latency, fail_rate=fail_rate, token=token,
                         verbose=verbose, health=health, not_initialized=not_initialized,
                         capacity=capacity)
    signals: queue.SimpleQueue[int] = queue.SimpleQueue()
    previous = _install_handlers(signals, STOP_SIGNALS + (CAPACITY_SIGNALS if capacity else ()))
    worker = threading.Thread(target=server.serve_forever, name="devservice", daemon=True)
    worker.start()
    try:
        if ready is not None:
            ready(server.server_address[1])
        while (signum := _next_signal(signals)) in CAPACITY_SIGNALS:
            server.capacity.obey(signum)
    finally:
        _restore_handlers(previous)
        server.shutdown()
        server.server_close()
        worker.join()


def _next_signal(signals: queue.SimpleQueue) -> int:
    # A signal that lands after the queue let go of the GIL but before its wait blocks only runs
    # its handler at the next bytecode: wake once a second so it is never left waiting.
    while True:
        try:
            return signals.get(timeout=SIGNAL_POLL_S)
        except queue.Empty:
            pass


def _install_handlers(signals: queue.SimpleQueue, which: tuple[int, ...]) -> dict[int, object]:
    # SimpleQueue.put is reentrant-safe; an Event's lock could deadlock inside a handler.
    def handler(signum: int, frame: object) -> None:
        signals.put_nowait(signum)

    return {sig: signal.signal(sig, handler) for sig in which}


def _restore_handlers(previous: dict[int, object]) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
