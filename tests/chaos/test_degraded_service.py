"""Fault suite, KG service "degraded": the real service's /health says degraded (or unhealthy)
while it may or may not ingest. "degraded" is up; a 500 is a document's fault only once the
endpoint has shown it can ingest other documents (or /health says healthy)."""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

import pytest

from ..conftest import seed, wait_for
from ..faultserver import FaultServer, service_error
from .harness import (Outcome, Supervisor, check_invariants, completed, drain_until_empty, queue_done,
                      record_hostile, scalar)

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.chaos]

NOT_INITIALIZED = service_error("Processing failed: 503: KG processor not initialized")
LLM_DOWN = service_error("Processing failed: LLM server unreachable")


def charged(conn) -> int:
    return scalar(conn, "SELECT COUNT(*) FROM kg_processing_queue WHERE retry_count > 0 OR status = 'failed'")


def paced_until_failed(db_path: str, bad: int) -> Callable[[dict, int], Any]:
    """A behaviour: `bad` answers 500 every time; the others answer after 50 ms until `bad` has
    failed for good, so that documents are still flowing while it uses up its attempts (a
    service answering in 2 ms drains the rest first), and at once from then on."""
    failed = threading.Event()

    def behaviour(payload: dict, i: int) -> Any:
        if payload["content_id"] == bad:
            return 500, LLM_DOWN
        if not failed.is_set():
            with closing(sqlite3.connect(db_path, timeout=30)) as c:
                if scalar(c, "SELECT COUNT(*) FROM kg_processing_queue WHERE content_id = ? "
                             "AND status = 'failed'", bad):
                    failed.set()
                    return None
            time.sleep(0.05)
        return None

    return behaviour


def test_degraded_and_answering_documents_flow_with_nothing_paused(conn, db_path):
    n = 300
    ids = seed(conn, n)
    server = FaultServer(health_status="degraded")
    code, log = drain_until_empty(db_path, server, "--workers", "2")
    outcome = check_invariants(db_path, ids, Outcome('KG service "degraded", ingests answered', n,
                                                     "/health says degraded throughout", exit_code=code),
                               queue_rows=n, journal=server.journal)
    assert code == 0 and outcome.failed == 0 and charged(conn) == 0
    assert "pausing claims" not in log and "unavailable" not in log, log[-2000:]
    assert server.health_checks == 0, "documents that succeed never make a worker doubt the service"
    record_hostile('KG /health says "degraded", ingests succeed', "every document completed, nothing paused", "no")


def test_degraded_one_document_fails_alone_and_is_charged_while_the_rest_flow(conn, db_path):
    # 300: the bad document is out of attempts within ~7 s (each uncharged release puts it back
    # for ~2 s), while the rest still flow.
    n = 300
    ids = seed(conn, n)
    bad = ids[0]  # first in line: it meets a worker before that worker has ingested anything
    server = FaultServer(paced_until_failed(db_path, bad), health_status="degraded")
    code, log = drain_until_empty(db_path, server, "--workers", "2", env={"KG_MAX_ATTEMPTS": "3"})
    row = conn.execute("SELECT status, retry_count, error_message FROM kg_processing_queue WHERE content_id = ?",
                       (bad,)).fetchone()
    assert tuple(row[:2]) == ("failed", 3), row
    assert "LLM server unreachable" in row[2]
    assert completed(conn) == n - 1
    assert scalar(conn, "SELECT COUNT(*) FROM kg_processing_queue WHERE retry_count > 0 AND content_id != ?",
                  bad) == 0, "no other document was charged"
    assert "pausing claims" not in log, "one failing document never paused the queue"
    outcome = check_invariants(db_path, ids, Outcome('KG service "degraded", one document answers 500', n,
                                                     "one document 500s on every attempt", exit_code=code),
                               queue_rows=n, poison={bad: "LLM server unreachable"}, journal=server.journal)
    assert code == 0 and outcome.failed == 1
    record_hostile('KG "degraded", one document answers 500, the others 200',
                   "that document failed after KG_MAX_ATTEMPTS, every other completed, no pause", "that document only")


@pytest.mark.parametrize(("health", "error"), [("unhealthy", NOT_INITIALIZED), ("degraded", LLM_DOWN)],
                         ids=["models-loading", "degraded-all-500"])
def test_every_document_500_charges_nothing_pauses_and_resumes_by_itself(conn, db_path, health, error):
    n = 200
    ids = seed(conn, n)
    failing = threading.Event()
    failing.set()
    server = FaultServer(lambda payload, i: (500, error) if failing.is_set() else None, health_status=health)
    sup = Supervisor(db_path, server.url, "--workers", "2")
    try:
        sup.wait_ready()
        wait_for(lambda: sup.stderr.count("pausing claims") >= 2, 60, message="both workers to pause claims")
        before = len(server.requests)
        assert charged(conn) == 0, "a service that ingests nothing charged a document"
        assert completed(conn) == 0
        failing.clear()  # ingests work again; /health still says the same
        wait_for(lambda: queue_done(db_path, n), 120, interval=0.1, message="the queue to drain after recovery")
        assert len(server.requests) > before
        stats = sup.stats_counting(n)
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    outcome = check_invariants(db_path, ids, Outcome(f'KG service "{health}", every ingest 500 then back', n,
                                                     f"every document 500 ({error['error']}) until recovery",
                                                     exit_code=code), queue_rows=n, journal=server.journal)
    assert code == 0 and outcome.failed == 0 and charged(conn) == 0
    assert stats["total_success"] == n and stats["total_failed"] == 0
    record_hostile(f'KG "{health}", every ingest 500 ({error["error"]})',
                   "claims paused, resumed by itself once ingests succeeded; all completed", "no")
