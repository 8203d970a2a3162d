"""A purpose-built misbehaving KG service for tests: real HTTP on 127.0.0.1, scripted answers."""
from __future__ import annotations

import collections
import dataclasses
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kgsupervisor.kg.devextract import extract

# A behaviour gets (payload, request number) and returns (status, body, headers), or None to
# answer like the reference service. It may sleep, or return the string "reset" to drop the
# connection without an answer, or "reset-mid-body" (RESET_MID_BODY) to send a 200 whose
# Content-Length promises more than the half of the reference answer it writes before the
# connection is cut ((RESET_MID_BODY, status) does the same to an error answer of that status),
# or (STALL_MID_BODY, seconds) to send a 200 and half of the reference
# answer at once and the rest only after `seconds` (a read timeout in the middle of the body).
Behaviour = Callable[[dict, int], Any]
RESET_MID_BODY = "reset-mid-body"
STALL_MID_BODY = "stall-mid-body"


@dataclasses.dataclass
class Exchange:
    """One ingest as the fault server saw it: the request as received, the answer as sent."""

    seq: int                   # arrival order, across every server sharing the journal
    payload: Any               # the request body, decoded
    status: int | None = None  # None: the connection was cut before any answer
    body: bytes = b""          # the body bytes written (only the first half of a cut answer)
    whole: bool = False        # the whole body went out at once, as its headers promised

    @property
    def content_id(self) -> Any:
        return self.payload.get("content_id") if isinstance(self.payload, dict) else None


class Journal:
    """Every ingest of one or more fault servers, in arrival order: an oracle's record of what
    the service was asked and what it answered. A server restarted on the same port shares its
    predecessor's journal. Thread-safe."""

    def __init__(self) -> None:
        self._exchanges: list[Exchange] = []
        self._lock = threading.Lock()

    def arrived(self, payload: Any) -> Exchange:
        """Note a request; the server fills in its answer on the returned Exchange as it sends it."""
        with self._lock:
            self._exchanges.append(Exchange(len(self._exchanges), payload))
            return self._exchanges[-1]

    def by_document(self) -> dict[Any, list[Exchange]]:
        """content_id -> that document's exchanges in arrival order."""
        with self._lock:
            exchanges = list(self._exchanges)
        grouped: dict[Any, list[Exchange]] = {}
        for exchange in exchanges:
            grouped.setdefault(exchange.content_id, []).append(exchange)
        return grouped


class _QuietServer(ThreadingHTTPServer):
    """A client that went away mid-answer (a worker killed by the test) is part of the scenario,
    not an error worth a traceback on the test's output; anything else still prints."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FaultServer:
    """Runs in a thread; `behaviour`, `healthy` and `health_status` may be changed while it serves.

    Healthy, /health answers 200 with `health_status` as the real service does ("healthy",
    "degraded" or "unhealthy"); not healthy, it answers 503. Every ingest and its answer go to
    `journal` (a new one unless given).
    """

    def __init__(self, behaviour: Behaviour | None = None, healthy: bool = True, port: int = 0,
                 health_status: str = "healthy", journal: Journal | None = None) -> None:
        self.behaviour = behaviour
        self.journal = journal or Journal()
        self.healthy = healthy
        self.health_status = health_status
        self.health_checks = 0
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self.httpd = _QuietServer(("127.0.0.1", port), self._handler_class())
        self.httpd.daemon_threads = True
        self.connections: set[socket.socket] = set()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        """Stop like a crashed service: no listener, and every open keep-alive connection cut."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.connections.clear()

    def _record(self, payload: dict) -> int:
        with self._lock:
            self.requests.append(payload)
            return len(self.requests) - 1

    def _handler_class(self) -> type:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Headers and body are two writes: with Nagle on, the body waits for the client's
                # delayed ACK (40 ms a request). A real service (uvicorn) turns Nagle off too.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with server._lock:
                    server.connections.add(self.connection)

            def finish(self) -> None:
                with server._lock:
                    server.connections.discard(self.connection)
                super().finish()

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, exchange: Exchange, status: int, body: bytes, headers: dict | None = None) -> None:
                """Send a whole answer. The journal has it before the client can (no reader of the
                journal may miss an answer a client already acted on), and drops `whole` if the
                write fails."""
                exchange.status, exchange.body, exchange.whole = status, body, True
                try:
                    self._send(status, body, headers)
                except OSError:
                    exchange.whole = False
                    raise

            def _send_half_then_cut(self, exchange: Exchange, body: bytes, status: int = 200) -> None:
                """Headers promising the whole body (and more), half of it, then a cut connection."""
                exchange.status, exchange.body = status, body[: len(body) // 2]
                self.close_connection = True
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) + 4096))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

            def _send_half_then_stall(self, exchange: Exchange, body: bytes, seconds: float) -> None:
                """Headers and half the body at once, the other half after `seconds` (if the client
                is still there). Never whole in the journal: the stall is there to be a read timeout."""
                exchange.status, exchange.body = 200, body[: len(body) // 2]
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                time.sleep(seconds)
                try:
                    self.wfile.write(body[len(body) // 2:])
                    self.wfile.flush()
                    exchange.body = body
                except OSError:
                    self.close_connection = True

            def do_GET(self) -> None:
                with server._lock:
                    server.health_checks += 1
                if server.healthy:
                    self._send(200, json.dumps({"status": server.health_status, "services": {}}).encode())
                else:
                    self._send(503, b'{"status": "down"}')

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                exchange = server.journal.arrived(payload)
                n = server._record(payload)
                outcome = server.behaviour(payload, n) if server.behaviour else None
                if outcome == "reset":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if outcome == RESET_MID_BODY:
                    self._send_half_then_cut(exchange, json.dumps(extract(payload)).encode())
                    return
                if isinstance(outcome, tuple) and outcome[:1] == (RESET_MID_BODY,):
                    self._send_half_then_cut(exchange, b'{"error": "upstream connect error or disconnect/reset '
                                                       b'before headers (injected)"}', status=outcome[1])
                    return
                if isinstance(outcome, tuple) and outcome[:1] == (STALL_MID_BODY,):
                    self._send_half_then_stall(exchange, json.dumps(extract(payload)).encode(), outcome[1])
                    return
                if outcome is None:
                    outcome = (200, json.dumps(extract(payload)).encode(), None)
                status, body, headers = (tuple(outcome) + (None,))[:3]
                self._answer(exchange, status, body if isinstance(body, bytes) else json.dumps(body).encode(), headers)

        return Handler


def service_error(error: str, error_type: str = "ProcessingError") -> dict:
    """The real service's error body (CONTRACT §3)."""
    return {"success": False, "error": error, "error_type": error_type, "timestamp": "2026-11-30T00:00:00"}


def reference_answer(payload: dict) -> dict:
    return extract(payload)


def sleep_then(seconds: float, outcome: Any = None) -> Any:
    time.sleep(seconds)
    return outcome


class Attempts:
    """Counts requests per content_id, so a behaviour can fault a document's k-th attempt
    (deterministic whatever order the workers send documents in). Thread-safe."""

    def __init__(self) -> None:
        self._seen: collections.Counter[Any] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, payload: dict) -> int:
        """Record one request for this payload's document; returns its attempt number (0 first)."""
        with self._lock:
            k = self._seen[payload.get("content_id")]
            self._seen[payload.get("content_id")] = k + 1
            return k

    def __getitem__(self, content_id: Any) -> int:
        with self._lock:
            return self._seen[content_id]
