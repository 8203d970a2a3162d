"""Fault suite, a database that cannot be read at all: the queue's own pages damaged under a
running supervisor. Unlike one document's damaged rows (test_hostile_rows), nothing can be
claimed: every worker pauses, no document is charged, and work resumes once the pages read again.
"""
from __future__ import annotations

import sqlite3

import pytest

from ..conftest import seed, wait_for
from ..faultserver import FaultServer
from .harness import Supervisor, queue_done, record_hostile, scalar

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.chaos, pytest.mark.hostile]


def queue_pages(conn: sqlite3.Connection) -> tuple[int, list[int]]:
    """The page size and every page of kg_processing_queue and its indexes, all in the main file
    (checkpointed, so no newer copy of them waits in the WAL)."""
    wait_for(lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0, 30,
             message="a complete checkpoint")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [r[0] for r in conn.execute(
        "SELECT pageno FROM dbstat WHERE name IN "
        "(SELECT name FROM sqlite_master WHERE tbl_name = 'kg_processing_queue' AND type IN ('table', 'index'))")]
    assert pages
    return page_size, pages


def test_queue_pages_damaged_under_a_running_supervisor_pause_everyone_uncharged(conn, db_path):
    n = 60
    seed(conn, n)
    # Not claimable until the test says so: the workers idle, polling, until the pages go.
    conn.execute("UPDATE kg_processing_queue SET status = 'skipped', skipped_reason = 'held by the test'")
    server = FaultServer()
    sup = Supervisor(db_path, server.url, "--workers", "2")
    try:
        sup.wait_ready()
        page_size, pages = queue_pages(conn)
        with open(db_path, "r+b") as f:
            originals = {}
            for page in pages:
                f.seek((page - 1) * page_size)
                originals[page] = f.read(page_size)
                f.seek((page - 1) * page_size)
                f.write(b"\x00" * page_size)  # not a b-tree page any more: SQLITE_CORRUPT on every read
        # An idle worker's next claim reads the claim index: damaged, like every queue page.
        wait_for(lambda: "database error, pausing" in sup.stderr, 60, interval=0.1,
                 message="a worker to pause on the unreadable queue")
        assert not server.requests, "nothing could be claimed, so nothing was sent"
        with open(db_path, "r+b") as f:
            for page, data in originals.items():
                f.seek((page - 1) * page_size)
                f.write(data)
        conn.close()
        with sqlite3.connect(db_path) as fresh:
            fresh.execute("UPDATE kg_processing_queue SET status = 'pending', skipped_reason = NULL")
        wait_for(lambda: queue_done(db_path, n), 90, interval=0.2, message="the queue to drain once it reads again")
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    log = sup.stderr
    with sqlite3.connect(db_path) as check:
        assert scalar(check, "SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'") == n
        assert scalar(check, "SELECT MAX(retry_count) FROM kg_processing_queue") == 0, "no document charged"
    assert code == 0
    assert "Traceback" not in log and "failed for good" not in log, log[-3000:]
    record_hostile("the queue table's pages damaged under a running supervisor (SQLITE_CORRUPT on every claim)",
                   "every worker pauses with one error line; once the pages read again, all documents complete",
                   "no")
