"""The supervisor as a real process: real forks, real signals, real HTTP, real SQLite."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import psutil
import pytest

from .conftest import seed, status_counts, wait_for, wait_for_log
from .processes import worker_pids

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def completed_once(conn, ids):
    """Each document completed, with exactly one set of KG rows (no duplicates)."""
    rows = conn.execute("SELECT content_id, status FROM kg_processing_queue").fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids), "queue row count unchanged"
    assert {r[1] for r in rows} == {"completed"}, status_counts(conn)
    dupes = conn.execute("""
        SELECT content_id, chunk_rowid, offset_start, entity_normalized, COUNT(*) FROM chunk_entities
        GROUP BY 1, 2, 3, 4 HAVING COUNT(*) > 1""").fetchall()
    assert dupes == []
    mismatch = conn.execute("""
        SELECT c.id FROM crawled_content c WHERE c.kg_relationship_count !=
        (SELECT COUNT(*) FROM chunk_relationships r WHERE r.content_id = c.id)""").fetchall()
    assert mismatch == []


def test_kill_9_of_a_worker_mid_document_charges_that_document_alone_and_nothing_is_lost(
        conn, db_path, fault_server, processes):
    ids = seed(conn, 3)
    killed = threading.Event()

    def hold_the_second(payload, n):
        if payload["content_id"] == ids[1]:
            killed.wait(30)  # in flight until its sender is dead

    server = fault_server(hold_the_second)
    # One batch of three: the first answered (in hand, unwritten), the second in flight, the third
    # not sent. Leases far longer than the test: only the supervisor's reaping releases the claims.
    proc = processes.supervisor(db_path, server.url, "--workers", "1", "--batch-size", "3",
                                "--adaptive", "off", env={"KG_LEASE_SECONDS": "600"})
    try:
        wait_for(lambda: ids[1] in server.journal.by_document(), 20, message="the second document in flight")
        owner = conn.execute("SELECT lease_owner FROM kg_processing_queue WHERE content_id = ?",
                             (ids[1],)).fetchone()[0]
        victim = int(owner.rsplit(":", 1)[1])
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: not conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE lease_owner = ?",
                                          (owner,)).fetchone()[0], 30, message="its claims released")
        killed.set()
        wait_for(lambda: status_counts(conn) == {"completed": 3}, 30, message="drain")
    finally:
        killed.set()
        err = proc.stop()
    completed_once(conn, ids)
    assert proc.returncode == 0, err
    assert f"(pid {victim}) killed by SIGKILL" in err
    crashes = dict(conn.execute("SELECT content_id, COALESCE(crash_count, 0) FROM kg_processing_queue"))
    assert crashes == {ids[0]: 0, ids[1]: 1, ids[2]: 0}, "only the document in flight is charged"
    # Its death is in each claim's history; only the one in flight was sent, as the worker's
    # shared memory said.
    died = {cid: conn.execute("SELECT sent_at FROM kg_processing_attempts WHERE content_id = ? AND "
                              "outcome = 'crashed' AND error_class = 'SIGKILL'", (cid,)).fetchall()
            for cid in ids[1:]}
    assert len(died[ids[1]]) == 1 and 0 < killed_at - died[ids[1]][0][0] < 30, died
    assert died[ids[2]] == [(None,)], died


def test_sigterm_lets_two_in_flight_documents_finish(conn, db_path, fault_server, processes):
    seed(conn, 2)
    server = fault_server(lambda payload, n: time.sleep(2.0))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "1")
    wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
    err = proc.stop()
    assert proc.returncode == 0, err
    assert status_counts(conn) == {"completed": 2}


def test_sigterm_with_a_short_drain_timeout_puts_in_flight_back_with_no_attempt(conn, db_path, fault_server,
                                                                                processes):
    seed(conn, 2)
    server = fault_server(lambda payload, n: time.sleep(30))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "1",
                                "--adaptive", "off", "--drain-timeout", "1.5")
    wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
    err = proc.stop()
    assert proc.returncode == 0, err
    # The drain timeout ended it, not the answers (30 s away): they never came.
    assert "drain timeout: killing 2 worker(s)" in err
    assert status_counts(conn) == {"pending": 2}
    assert conn.execute("SELECT MAX(retry_count), MAX(COALESCE(crash_count, 0)) FROM kg_processing_queue").fetchone() == (0, 0)


def test_sighup_under_load_restarts_every_worker_and_processes_each_document_once(conn, db_path, fault_server,
                                                                                   processes):
    ids = seed(conn, 60)
    server = fault_server(lambda payload, n: time.sleep(0.05))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "2")
    try:
        wait_for(lambda: len(worker_pids(proc)) == 2, 20, message="two workers")
        wait_for(lambda: status_counts(conn).get("completed", 0) >= 5, 20, message="load")
        old = worker_pids(proc)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(worker_pids(proc)) == 2 and not (worker_pids(proc) & old), 20, message="new workers")
        wait_for(lambda: status_counts(conn) == {"completed": 60}, 60, message="drain")
    finally:
        err = proc.stop()
    completed_once(conn, ids)
    assert len(server.requests) == 60, "no document was sent twice"
    assert "restart #1" in err
    assert proc.returncode == 0, err


def test_ttin_and_ttou_change_the_worker_count(conn, db_path, kg_service, tmp_path, processes):
    log = tmp_path / "supervisor.log"
    proc = processes.supervisor(db_path, kg_service, "--workers", "2", "--log-file", str(log))
    try:
        wait_for(lambda: len(worker_pids(proc)) == 2, 20, message="two workers")
        proc.send_signal(signal.SIGTTIN)
        wait_for(lambda: len(worker_pids(proc)) == 3, 20, message="three workers")
        # Two signals of one kind sent back to back may arrive as one (POSIX does not queue
        # them), so the second goes after the first has taken effect.
        proc.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(worker_pids(proc)) == 2, 20, message="two workers again")
        proc.send_signal(signal.SIGTTOU)
        wait_for(lambda: len(worker_pids(proc)) == 1, 20, message="one worker")
        wait_for_log(log, "SIGTTOU: now 1 worker(s)")
        proc.send_signal(signal.SIGTTOU)  # never below one
        wait_for_log(log, "SIGTTOU: now 1 worker(s)", count=2)
        # Had it gone to none, one more would make one, not two.
        proc.send_signal(signal.SIGTTIN)
        wait_for_log(log, "SIGTTIN: now 2 worker(s)")
        wait_for(lambda: len(worker_pids(proc)) == 2, 20, message="two workers after the last SIGTTIN")
    finally:
        proc.stop()
    assert proc.returncode == 0, log.read_text()


def test_a_sigstopped_worker_is_detected_as_hung_and_replaced(conn, db_path, kg_service, processes):
    proc = processes.supervisor(db_path, kg_service, "--workers", "1", env={"KG_HANG_TIMEOUT": "2"})
    try:
        (victim,) = wait_for(lambda: worker_pids(proc), 20, message="a worker")
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: worker_pids(proc) and victim not in worker_pids(proc), 15, message="replacement")
        seed(conn, 3)
        wait_for(lambda: status_counts(conn) == {"completed": 3}, 20, message="work after the hang")
    finally:
        err = proc.stop()
    assert "hung: no heartbeat" in err
    assert proc.returncode == 0, err


def killing_the_sender(db_path: str, content_id: int, sig: int, kills: list[int], times: int = 1000):
    """A fault-server behaviour: sending `content_id` gets the sender (the row's lease owner)
    killed with `sig`, the first `times` times."""
    def behaviour(payload, n):
        if payload["content_id"] != content_id or len(kills) >= times:
            return None
        c = sqlite3.connect(db_path, timeout=10)
        owner = c.execute("SELECT lease_owner FROM kg_processing_queue WHERE content_id = ? AND "
                          "status = 'processing'", (content_id,)).fetchone()[0]
        c.close()
        kills.append(int(owner.rsplit(":", 1)[1]))
        os.kill(kills[-1], sig)
        return "reset"
    return behaviour


def test_a_poison_document_fails_after_k_crashes_and_the_rest_complete(conn, db_path, fault_server,
                                                                        processes):
    ids = seed(conn, 8)
    poison = ids[3]
    kills = []
    server = fault_server(killing_the_sender(db_path, poison, signal.SIGKILL, kills))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "4",
                                env={"KG_POISON_AFTER": "3"})
    try:
        wait_for(lambda: status_counts(conn) == {"completed": 7, "failed": 1}, 60, message="queue settled")
    finally:
        err = proc.stop()
    assert len(kills) == 3 and len(set(kills)) == 3, kills
    status, error, crashes = conn.execute("SELECT status, error_message, crash_count FROM kg_processing_queue "
                                          "WHERE content_id = ?", (poison,)).fetchone()
    assert status == "failed" and crashes == 3
    assert "poison pill: a worker died 3 times" in error and "killed by SIGKILL" in error
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert proc.returncode == 0, err


def test_a_worker_killed_by_sigbus_charges_nothing(conn, db_path, fault_server, processes):
    """SIGBUS is SQLite's -shm mapping failing to be written (an immutable file, a failing disk),
    never the document: however often it happens, the document is not poisoned."""
    ids = seed(conn, 4)
    kills = []
    server = fault_server(killing_the_sender(db_path, ids[1], signal.SIGBUS, kills, times=3))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "2",
                                env={"KG_POISON_AFTER": "2"})
    try:
        wait_for(lambda: status_counts(conn) == {"completed": 4}, 60, message="every document completed")
    finally:
        err = proc.stop()
    assert len(kills) == 3, kills
    assert conn.execute("SELECT MAX(COALESCE(crash_count, 0)), MAX(retry_count) FROM kg_processing_queue"
                        ).fetchone() == (0, 0)
    assert "killed by SIGBUS" in err and "its documents go back uncharged" in err
    completed_once(conn, ids)
    assert proc.returncode == 0, err


def test_kill_9_of_the_supervisor_workers_exit_and_a_new_run_completes_everything(conn, db_path, fault_server,
                                                                                   processes):
    ids = seed(conn, 10)
    server = fault_server(lambda payload, n: time.sleep(0.4))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "5")
    wait_for(lambda: len(server.requests) >= 2, 20, message="work in flight")
    children = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"orphans left: {alive}"
    # Whatever the dead tree still held is released by the next run on this host.
    second = processes.supervisor(db_path, server.url, "--workers", "2", "--exit-when-empty")
    try:
        second.wait(60)
    finally:
        err = second.stop()
    assert second.returncode == 0, err
    completed_once(conn, ids)
