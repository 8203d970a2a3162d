"""The real servers around the browser tests: the reference KG service with a gate the test
holds, a running supervisor's console and its database, and a page on another origin."""
from __future__ import annotations

import dataclasses
import http.server
import sqlite3
import threading
from contextlib import closing

import requests

from kgsupervisor.kg.devservice import DevServiceServer
from kgsupervisor.queue.audit import AUDIT_TABLE
from kgsupervisor.queue.sql import PAUSED_FLAG
from kgsupervisor.store.owntables import CONTROL_TABLE
from kgsupervisor.store.sqlite import connect

from ..processes import Process

TOKEN = "console-token-of-the-tests"


class GatedService(DevServiceServer):
    """The reference KG service whose answers wait for the test's say-so: `hold()` stops them,
    `allow(n)` lets n more go, `open()` lets every one go (as it starts)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), latency=0.0, fail_rate=0.0, token=None, verbose=False)
        self.gate = threading.Condition()
        self.budget: int | None = None  # None: no limit

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def ingest_answer(self, *request: object) -> tuple[dict, dict[str, str]]:
        with self.gate:
            # Bounded, so that a test that fails while holding cannot hang the supervisor's stop.
            self.gate.wait_for(lambda: self.budget is None or self.budget > 0, timeout=30)
            if self.budget:
                self.budget -= 1
        return super().ingest_answer(*request)

    def hold(self) -> None:
        self.allow(0)

    def allow(self, answers: int | None) -> None:
        with self.gate:
            self.budget = answers
            self.gate.notify_all()

    def open(self) -> None:
        self.allow(None)


@dataclasses.dataclass
class Console:
    """A running supervisor and its console: the base URL, the database and the KG service."""

    base: str
    db: str
    service: GatedService
    supervisor: Process

    def connect(self) -> sqlite3.Connection:
        """A connection of the test's own to the supervisor's database."""
        return connect(self.db)

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows `sql` selects, read on a connection of their own."""
        with closing(self.connect()) as conn:
            return conn.execute(sql, params).fetchall()

    def counts(self) -> dict[str, int]:
        """Queue rows by status, counted."""
        return dict(self.rows("SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status"))

    def pause_reason(self) -> tuple[str | None] | None:
        """The pause row's (reason,), or None when not paused."""
        found = self.rows(f"SELECT reason FROM {CONTROL_TABLE} WHERE name = ?", (PAUSED_FLAG,))
        return found[0] if found else None

    def audit(self) -> list[tuple[str, str, int | None]]:
        """(who, action, rows) of every audit entry, oldest first (init-db made the table)."""
        return self.rows(f"SELECT who, action, rows FROM {AUDIT_TABLE} ORDER BY id")


def answers(url: str) -> bool:
    """True once a GET of `url` answers 200."""
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


class ForeignSite:
    """Another origin on loopback, serving one page: 127.0.0.1 on another port (the browser reaches
    no other address). The same site, so the SameSite=Strict cookie goes along and only the
    console's CSRF and Origin checks stand in the way."""

    def __init__(self, page: str) -> None:
        body = page.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
