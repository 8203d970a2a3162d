"""The status endpoint: /health, /stats and /metrics, served by a child process of its own."""
from __future__ import annotations

import ipaddress
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from typing import Any

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.lifeline import exit_with_parent
from kgsupervisor.logs import host_port
from kgsupervisor.ops import metrics
from kgsupervisor.procname import become_helper_child

log = logging.getLogger("kgsupervisor.statusd")

Fetch = Callable[[], "dict[str, Any] | None"]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(addr: tuple[str, int]) -> socket.socket:
    """Bind and listen in the supervisor, before any fork, so a busy port is an error at start."""
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KGSupervisorError(f"status address {host_port(host, port)} cannot be used: {exc.strerror} "
                                f"(choose another with --status-addr, or --status-addr off)") from None
    sock.listen(64)
    if not is_loopback(host):
        log.warning("status endpoint listens on %s, beyond this host; it has no authentication", host_port(host, port))
    return sock


class StatusServer(ThreadingHTTPServer):
    """An HTTP server around a socket the supervisor bound; `fetch()` returns the latest snapshot."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, fetch: Fetch) -> None:
        super().__init__(sock.getsockname()[:2], StatusHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.fetch = fetch


class StatusHandler(BaseHTTPRequestHandler):
    server: StatusServer
    server_version = "kgsupervisor-status"  # how `health` knows its 503 "not answering" is ours

    def log_message(self, *args: Any) -> None:  # scrapes every few seconds are not news
        pass

    def do_GET(self) -> None:
        snapshot = self.server.fetch()
        if snapshot is None:
            return self.send(503, "application/json", b'{"error": "supervisor is not answering"}')
        path = self.path.split("?", 1)[0]
        if path == "/health":
            health = snapshot["health"]
            ok = health.get("manager_running") and health.get("healthy_workers", 0) > 0
            return self.send(200 if ok else 503, "application/json", json.dumps(health).encode())
        if path == "/stats":
            return self.send(200, "application/json", json.dumps(snapshot["stats"]).encode())
        if path == "/metrics":
            return self.send(200, metrics.CONTENT_TYPE, metrics.render(snapshot))
        self.send(404, "application/json", b'{"error": "try /health, /stats or /metrics"}')

    def send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def pipe_fetcher(conn: Any, timeout: float = 5.0) -> Fetch:
    """Ask the supervisor over its control pipe; one request at a time."""
    lock = threading.Lock()

    def fetch() -> dict[str, Any] | None:
        with lock:
            try:
                conn.send("snapshot")
                return conn.recv() if conn.poll(timeout) else None
            except (EOFError, OSError):
                return None
    return fetch


def status_main(sock: socket.socket, conn: Any, parent_pid: int, close_fds: list[int]) -> None:
    """Entry point of the forked status process: serve until the supervisor stops or is gone."""
    signal.set_wakeup_fd(-1)
    become_helper_child("kgs-status", parent_pid, close_fds)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The supervisor blocked its signals around our fork; our own dispositions are set now.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    server = StatusServer(sock, pipe_fetcher(conn))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True).start()
    exit_with_parent(parent_pid)


class StatusEndpoint:
    """The status endpoint as the supervisor's StatusServer: bound in it, served by its child."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.sock: socket.socket | None = None

    def bind(self) -> int:
        self.sock = bind(self.addr)
        return self.sock.fileno()

    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return host_port(host, port)

    def serve(self, conn: Connection, parent_pid: int, fds: list[int]) -> None:
        status_main(self.sock, conn, parent_pid, fds)
