"""The status endpoint: /health, /stats and /metrics, and the operator console under every other
path, served by waitress in a child process of its own.

This module is imported by the supervisor before it forks: it imports no web library itself.
waitress and the console (Flask) are imported in the child alone, so the supervisor's memory
and start-up time do not grow with them."""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.lifeline import exit_with_parent
from kgsupervisor.logs import host_port
from kgsupervisor.ops import metrics
from kgsupervisor.ops.console.settings import ConsoleSettings, console_settings, is_loopback
from kgsupervisor.procname import become_helper_child

if TYPE_CHECKING:
    from kgsupervisor.config import Settings

log = logging.getLogger("kgsupervisor.statusd")

Fetch = Callable[[], "dict[str, Any] | None"]
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

STATUS_PATHS = ("/health", "/stats", "/metrics")
SERVER_IDENT = "kgsupervisor-status"  # the Server header: how `health` knows a 503 is ours
SERVE_THREADS = 8  # a few console pages slowed by a busy database leave threads for /health
REASONS = {200: "OK", 404: "Not Found", 501: "Not Implemented", 503: "Service Unavailable"}


def bind(addr: tuple[str, int], what: str = "status address",
         hint: str = "choose another with --status-addr, or --status-addr off") -> socket.socket:
    """Bind and listen before serving (the supervisor: before any fork): a busy port fails the start."""
    host, port = addr
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise KGSupervisorError(f"{what} {host_port(host, port)} cannot be used: {exc.strerror} "
                                f"({hint})") from None
    sock.listen(64)
    return sock


# -- /health, /stats, /metrics: the same answers as ever -----------------------------------------

def status_answer(path: str, snapshot: dict[str, Any] | None) -> tuple[int, str, bytes]:
    """The status code, content type and body of a GET of `path`, from the latest snapshot."""
    if snapshot is None:
        return 503, "application/json", b'{"error": "supervisor is not answering"}'
    if path == "/health":
        health = snapshot["health"]
        ok = health.get("manager_running") and health.get("healthy_workers", 0) > 0
        return 200 if ok else 503, "application/json", json.dumps(health).encode()
    if path == "/stats":
        return 200, "application/json", json.dumps(snapshot["stats"]).encode()
    if path == "/metrics":
        return 200, metrics.CONTENT_TYPE, metrics.render(snapshot)
    return 404, "application/json", b'{"error": "try /health, /stats or /metrics"}'


def status_app(fetch: Fetch, console: WSGIApp | None = None) -> WSGIApp:
    """One WSGI app: the three status paths answered from `fetch()`, every other path by the
    console (or a 404 naming the three, without one)."""
    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if console is not None and path not in STATUS_PATHS:
            return console(environ, start_response)
        if environ.get("REQUEST_METHOD") != "GET":
            status, content_type, body = 501, "application/json", b'{"error": "only GET is answered here"}'
        else:
            status, content_type, body = status_answer(path, fetch())
        start_response(f"{status} {REASONS[status]}", [("Content-Type", content_type),
                                                        ("Content-Length", str(len(body)))])
        return [body]
    return app


class WSGIServer:
    """waitress serving `app` on a socket bound already; serve_forever, shutdown and
    server_close as socketserver names them (tests stop it as they stop any server)."""

    def __init__(self, sock: socket.socket, app: WSGIApp, ident: str) -> None:
        from waitress.server import create_server
        self.server_address = sock.getsockname()[:2]
        # No proxy header is trusted or cleared: the console reads their presence itself.
        self.server = create_server(app, sockets=[sock], ident=ident, threads=SERVE_THREADS,
                                    clear_untrusted_proxy_headers=False, expose_tracebacks=False)
        self._stopping = threading.Event()
        self._idle = threading.Event()  # set while no serve_forever loop runs
        self._idle.set()

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until shutdown(); `poll_interval` bounds how late a shutdown is noticed."""
        from waitress import wasyncore
        self._idle.clear()
        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=poll_interval, map=self.server._map, count=1)
        finally:
            self._idle.set()

    def shutdown(self) -> None:
        """Stop serving and wait until the loop has ended, as socketserver's shutdown does."""
        self._stopping.set()
        self.server.pull_trigger()
        self._idle.wait()

    def server_close(self) -> None:
        """Close the listening socket, every connection, and the serving threads."""
        from waitress import wasyncore
        self.shutdown()
        self.server.task_dispatcher.shutdown()
        wasyncore.close_all(self.server._map)


class StatusServer(WSGIServer):
    """The status endpoint on a socket the supervisor bound: status_app over `fetch()`, which
    returns the latest snapshot, with the console (a WSGI app) under every other path."""

    def __init__(self, sock: socket.socket, fetch: Fetch, console: WSGIApp | None = None) -> None:
        self.fetch = fetch
        super().__init__(sock, status_app(fetch, console), SERVER_IDENT)


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


def status_main(sock: socket.socket, conn: Any, parent_pid: int, close_fds: list[int],
                console: ConsoleSettings | None = None) -> None:
    """Entry point of the forked status process: serve until the supervisor stops or is gone."""
    signal.set_wakeup_fd(-1)
    become_helper_child("kgs-status", parent_pid, close_fds)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The supervisor blocked its signals around our fork; our own dispositions are set now.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    fetch = pipe_fetcher(conn)
    console_app = started_console(console, fetch, parent_pid) if console is not None else None
    server = StatusServer(sock, fetch, console_app)
    # Never shut down here (the process leaves with the supervisor): no need to look for it often.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 60.0}, daemon=True).start()
    if console_app is not None:
        log.info("console on http://%s/ (%s)", host_port(*server.server_address), console.access())
    exit_with_parent(parent_pid)


def started_console(console: ConsoleSettings, fetch: Fetch, parent_pid: int) -> WSGIApp | None:
    """The console app with its sampler running, or None (logged) if it cannot be built: the
    status paths are served either way."""
    try:
        from kgsupervisor.ops.console.app import create_app  # here, in the child alone
        app = create_app(dataclasses.replace(console, supervisor_pid=parent_pid), fetch)
        app.extensions["kgsupervisor"].start()
    except Exception as exc:
        log.error("console not served (/health, /stats and /metrics are): %s: %s", type(exc).__name__, exc)
        return None
    return app


class StatusEndpoint:
    """The status endpoint as the supervisor's StatusServer: bound in it, served by its child,
    with the console under `/` when `settings` are given."""

    def __init__(self, addr: tuple[str, int], settings: Settings | None = None) -> None:
        self.addr = addr
        self.console = console_settings(settings, addr) if settings is not None else None
        self.sock: socket.socket | None = None

    def bind(self) -> int:
        self.sock = bind(self.addr)
        if not is_loopback(self.addr[0]):
            log.warning("status endpoint listens on %s, beyond this host: /health, /stats and /metrics are "
                        "open to anyone who reaches it; the console asks for the operator token",
                        self.address())
        return self.sock.fileno()

    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return host_port(host, port)

    def serve(self, conn: Connection, parent_pid: int, fds: list[int]) -> None:
        status_main(self.sock, conn, parent_pid, fds, self.console)
