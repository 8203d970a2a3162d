"""An idle worker sleeps until a commit: inotify on SQLite's -wal file, a poll where it cannot."""
from __future__ import annotations

import select
import sqlite3
from contextlib import closing

import pytest

from kgsupervisor.store.commitwatch import DataVersionWatch, WalWatch, sqlite_commit_watch
from kgsupervisor.store.sqlite import connect

from .conftest import seed, status_counts, wait_for, wait_for_log

pytestmark = [pytest.mark.timeout(120)]

# An hour's poll and a registry row due every 200 s: within a test only a commit can wake a worker.
NEVER_BY_CLOCK = {"KG_POLL_INTERVAL": "3600", "KG_LEASE_SECONDS": "600"}


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def run_idle(processes, db_path: str, kg_service: str, log, **env: str):
    """A supervisor with two workers on an empty queue, started with `env`; waits for both to be idle."""
    command = ["run", "--db", db_path, "--service-url", kg_service, "--workers", "2", "--log-file", str(log)]
    proc = processes.kgsupervisor(command, env={**NEVER_BY_CLOCK, **env})
    wait_for_log(log, "idle, this worker", count=2)
    return proc


def test_an_idle_worker_takes_a_document_on_the_commit_of_another_process(conn, db_path, kg_service,
                                                                         processes, tmp_path):
    log = tmp_path / "supervisor.log"
    proc = run_idle(processes, db_path, kg_service, log)
    try:
        text = wait_for_log(log, "idle, this worker", count=2)
        assert text.count(f"waits for commits on {db_path}-wal (inotify)") == 2
        seed(conn, 2)  # this test's process commits; only that can wake a worker parked for an hour
        wait_for(lambda: status_counts(conn) == {"completed": 2}, 20, message="both taken on the commit")
    finally:
        err = proc.stop()
    assert proc.returncode == 0, err


def test_kg_commit_watch_poll_is_said_at_start_and_still_takes_the_document(conn, db_path, kg_service,
                                                                           processes, tmp_path):
    log = tmp_path / "supervisor.log"
    proc = run_idle(processes, db_path, kg_service, log, KG_COMMIT_WATCH="poll")
    try:
        text = wait_for_log(log, "idle, this worker", count=2)
        assert text.count("looks for commits every 0.15 s (PRAGMA data_version)") == 2
        assert "inotify" not in text
        seed(conn, 1)
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 20, message="taken by a look")
    finally:
        err = proc.stop()
    assert proc.returncode == 0, err


def test_the_wal_watch_wakes_on_another_connections_commit_not_on_its_own(db_path):
    with closing(connect(db_path)) as mine, closing(connect(db_path)) as theirs:
        watch = sqlite_commit_watch(mine)
        assert isinstance(watch, WalWatch)
        try:
            assert not readable(watch.fileno())
            theirs.execute("INSERT INTO kg_processing_queue (content_id) VALUES (1)")
            assert readable(watch.fileno()), "their commit wrote the -wal file"
            assert watch.changed() and watch.interval is None
            mine.execute("INSERT INTO kg_processing_queue (content_id) VALUES (2)")
            assert readable(watch.fileno())
            assert not watch.changed(), "our own commit is no reason to claim"
            assert watch.interval == 0.002, "an event with nothing to see: looked at again shortly"
            while watch.interval is not None:
                assert not watch.changed()
            assert not readable(watch.fileno())
        finally:
            watch.close()


def test_without_wal_the_watch_polls_and_says_why(tmp_path):
    with closing(sqlite3.connect(tmp_path / "rollback.db", isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = delete")
        watch = sqlite_commit_watch(conn)
        assert type(watch) is DataVersionWatch and watch.fileno() is None and watch.interval == 0.15
        assert watch.how.endswith("journal_mode is delete, not wal")
