"""A total deadline for an HTTP request made with requests: its sockets are shut down when it passes.

requests and urllib3 time out each socket operation only, so an answer trickled one byte at a
time never times out. Here a watchdog thread shuts down the sockets a request uses once its
deadline has passed: the read blocked on them returns at once (an error, or what looks like the
end of the stream), and the caller, seeing `Deadline.expired`, reports a timeout.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

# The deadline of the request this thread is making, if any: urllib3 opens and reuses
# connections in the thread that makes the request, so that is where they are handed over.
_current = threading.local()


class Deadline:
    """One request's deadline and the sockets it used, shut down when it passes."""

    def __init__(self, at: float) -> None:
        self.at = at  # time.monotonic()
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def watch(self, sock: socket.socket | None) -> None:
        """Shut `sock` down when the deadline passes (at once, if it has)."""
        if sock is None:
            return
        with self._lock:
            if not any(s is sock for s in self._sockets):
                self._sockets.append(sock)
            expired = self.expired
        if expired:
            _shut_down(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut_down(sock)


def _shut_down(sock: socket.socket) -> None:
    """Both directions: a read blocked in another thread returns, and the peer sees the close.

    Not close(), whose descriptor could be reused while the other thread still reads it; and on
    a TLS socket the plain socket's shutdown, which leaves the TLS state that thread uses alone.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed meanwhile, or never connected


class Watchdog:
    """One thread that expires the deadlines of the requests in flight, whichever thread made them.

    A threading.Timer per request would start a thread per request (~0.2 ms, a large share of a
    POST on loopback); this thread sleeps until the earliest deadline, and is woken only when a
    request brings an earlier one.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._armed: set[Deadline] = set()
        self._wake_at: float | None = None  # when the thread looks next; None: when woken
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[Deadline]:
        """Requests this thread makes inside the block are cut once `seconds` have passed."""
        deadline = Deadline(time.monotonic() + seconds)
        self._arm(deadline)
        outer = getattr(_current, "deadline", None)
        _current.deadline = deadline
        try:
            yield deadline
        finally:
            _current.deadline = outer
            with self._cond:
                self._armed.discard(deadline)

    def close(self) -> None:
        """Let the thread end; a later deadline starts another."""
        with self._cond:
            self._thread = None
            self._cond.notify_all()

    def _arm(self, deadline: Deadline) -> None:
        if self._pid != os.getpid():
            # A forked child: the parent's thread did not come along, and its lock may be held.
            self._reset()
        with self._cond:
            self._armed.add(deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kg-request-deadlines", daemon=True)
                self._thread.start()
            elif self._wake_at is None or deadline.at < self._wake_at:
                self._cond.notify_all()

    def _run(self) -> None:
        me = threading.current_thread()
        with self._cond:
            while self._thread is me:
                now = time.monotonic()
                for deadline in [d for d in self._armed if d.at <= now]:
                    self._armed.discard(deadline)
                    deadline.expire()
                self._wake_at = min((d.at for d in self._armed), default=None)
                self._cond.wait(None if self._wake_at is None
                                else min(self._wake_at - now, threading.TIMEOUT_MAX))


def _watch_current(sock: socket.socket | None) -> None:
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)


class _WatchedConnection:
    """Mixed into urllib3's connections: each hands its socket to the deadline of the request
    being made, a new connection once connected, a kept-alive one when it sends a request."""

    sock: socket.socket | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _watch_current(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch_current(self.sock)
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_WatchedConnection, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class _WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


WATCHED_POOLS = {"http": _WatchedHTTPConnectionPool, "https": _WatchedHTTPSConnectionPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' HTTP adapter, on connections whose sockets a Watchdog deadline can shut down.

    urllib3's PoolManager takes its pool classes from the instance attribute
    `pool_classes_by_scheme`, there so that it can be overridden per manager.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools bring their own connections
            manager.pool_classes_by_scheme = WATCHED_POOLS
        return manager
