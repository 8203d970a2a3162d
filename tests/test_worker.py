"""The worker loop against real HTTP services: outcomes, retries, outages, malformed answers."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from contextlib import closing

import pytest

from kgsupervisor.queue.leased import queue_for
from kgsupervisor.worker.counters import Progress
from kgsupervisor.worker.kgworker import KGWorker

from .conftest import (drive, free_port, held_until, make_settings, seed, spawn, status_counts, wait_for,
                       wait_for_log)

pytestmark = pytest.mark.timeout(90)


def queue_rows(conn):
    return conn.execute("SELECT content_id, status, retry_count, error_message FROM kg_processing_queue "
                        "ORDER BY id").fetchall()


def test_worker_completes_every_document_including_skipped_for_outage(conn, db_path, kg_service, worker_factory):
    ids = seed(conn, 12)
    conn.execute("UPDATE kg_processing_queue SET status = 'skipped', skipped_reason = 'kg_service_unavailable' "
                 "WHERE content_id = ?", (ids[0],))
    w = worker_factory(make_settings(db_path, kg_service, batch_size=5))
    drive(w, lambda: status_counts(conn) == {"completed": 12})
    assert w.stats.total_success == 12 and w.stats.total_processed == 12
    assert conn.execute("SELECT COUNT(*) FROM crawled_content WHERE kg_processed = 1").fetchone()[0] == 12


def test_a_full_batch_claims_again_at_once_a_partial_one_waits(conn, db_path, kg_service, worker_factory):
    seed(conn, 7)
    w = worker_factory(make_settings(db_path, kg_service, batch_size=5, poll_interval=3.0))
    assert w.loop_once(time.time()) == 0.0
    assert w.loop_once(time.time()) == 3.0
    assert status_counts(conn) == {"completed": 7}


def answered_once_the_earlier_are_written(db_path: str, seen: list[int | None]):
    """A fault-server behaviour: request n (0 first) is answered once the database shows n documents
    completed, and notes n (None if they were not within 4 s, under the worker's request timeout)."""
    def completed() -> int:
        with closing(sqlite3.connect(db_path)) as c:
            return status_counts(c).get("completed", 0)

    def wait_then_answer(payload, n):
        try:
            wait_for(lambda: completed() == n, 4, message=f"{n} written")
        except AssertionError:
            seen.append(None)
        else:
            seen.append(n)
    return wait_then_answer


def wal_commits(db_path: str) -> int:
    """Transactions committed into the database's -wal since it was last reset, counted in the
    file itself (sqlite.org/fileformat.html, "WAL File Format"): frames of the header's salts
    whose "database size after commit" field is set, one such frame ending each commit."""
    with open(db_path + "-wal", "rb") as f:
        data = f.read()
    if len(data) < 32:
        return 0
    (page_size,) = struct.unpack(">I", data[8:12])
    page_size = 65536 if page_size == 1 else page_size  # 1 in the header stands for 65536
    salts, commits, offset = data[16:24], 0, 32
    while offset + 24 + page_size <= len(data) and data[offset + 8:offset + 16] == salts:
        commits += data[offset + 4:offset + 8] != bytes(4)
        offset += 24 + page_size
    return commits


def test_each_answer_is_written_while_the_next_document_is_sent(conn, db_path, fault_server, worker_factory):
    """Each answer goes to the write-back thread at once, written while the next document is in
    flight: what a crash could make the service redo stays bounded."""
    seed(conn, 3)
    seen: list[int | None] = []
    server = fault_server(answered_once_the_earlier_are_written(db_path, seen))
    w = worker_factory(make_settings(db_path, server.url, batch_size=3))
    drive(w, lambda: status_counts(conn) == {"completed": 3})
    assert seen == [0, 1, 2]
    assert w.stats.total_success == 3


def test_500s_retry_with_backoff_then_fail_with_the_last_error(conn, db_path, fault_server, worker_factory):
    seed(conn, 1)
    server = fault_server(lambda payload, n: (500, {"success": False, "error": f"model crashed #{n}"}))
    w = worker_factory(make_settings(db_path, server.url, max_attempts=3))
    drive(w, lambda: status_counts(conn) == {"failed": 1})
    (_, status, retries, error), = queue_rows(conn)
    assert retries == 3 and len(server.requests) == 3
    assert "500" in error and "model crashed #2" in error, error
    assert w.stats.total_retried == 2 and w.stats.total_failed == 1


def test_timeouts_retry_then_fail(conn, db_path, fault_server, worker_factory):
    seed(conn, 1)
    server = fault_server(lambda payload, n: time.sleep(1.0))
    w = worker_factory(make_settings(db_path, server.url, max_attempts=2, service_timeout=0.2))
    drive(w, lambda: status_counts(conn) == {"failed": 1})
    (_, _, retries, error), = queue_rows(conn)
    assert retries == 2 and "did not answer within 0.2s" in error


def test_a_400_fails_at_once(conn, db_path, fault_server, worker_factory):
    seed(conn, 1)
    server = fault_server(lambda payload, n: (400, {"success": False, "error": "chunks too long"}))
    w = worker_factory(make_settings(db_path, server.url))
    drive(w, lambda: status_counts(conn) == {"failed": 1})
    (_, _, retries, error), = queue_rows(conn)
    assert len(server.requests) == 1 and retries == 0
    assert "rejected the document (400)" in error and "chunks too long" in error


def test_a_missing_document_fails_at_once_and_the_next_completes(conn, db_path, kg_service, worker_factory):
    seed(conn, 1)
    conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (999)")
    w = worker_factory(make_settings(db_path, kg_service))
    drive(w, lambda: status_counts(conn) == {"completed": 1, "failed": 1})
    assert "999 does not exist" in queue_rows(conn)[1][3]


MALFORMED = {
    "not json": (200, b"<html>oops</html>", "answer is not JSON"),
    "success false": (200, {"success": False, "error": "GPU out of memory"}, "answer.success is false"),
    "wrong content id": (200, {"success": True, "content_id": -5}, "answer.content_id"),
    "entities not a list": (200, None, "answer.entities"),
    "unknown vector_rowid": (200, None, "is not a chunk of document"),
    "mistyped text": (200, None, "answer.entities[0].text"),
}


def malformed_answer(kind: str, payload: dict):
    status, body, _ = MALFORMED[kind]
    if body is not None:
        return status, body
    good = {"success": True, "content_id": payload["content_id"], "neo4j_document_id": "d",
            "entities": [{"text": "X", "chunk_appearances": [{"vector_rowid": payload["chunks"][0]["vector_rowid"]}]}],
            "relationships": []}
    if kind == "entities not a list":
        good["entities"] = {"oops": 1}
    elif kind == "unknown vector_rowid":
        good["entities"][0]["chunk_appearances"][0]["vector_rowid"] = 10**9
    elif kind == "mistyped text":
        good["entities"][0]["text"] = 42
    return status, good


def test_each_malformed_answer_gives_a_clear_error_and_the_worker_keeps_running(conn, db_path, fault_server, worker_factory):
    ids = seed(conn, len(MALFORMED) + 1)
    kinds = dict(zip(ids, MALFORMED))

    def behaviour(payload, n):
        kind = kinds.get(payload["content_id"])
        return malformed_answer(kind, payload) if kind else None

    server = fault_server(behaviour)
    w = worker_factory(make_settings(db_path, server.url, max_attempts=1))
    drive(w, lambda: status_counts(conn) == {"failed": len(MALFORMED), "completed": 1})
    errors = {cid: err for cid, _, _, err in queue_rows(conn)}
    for cid, kind in kinds.items():
        assert MALFORMED[kind][2] in errors[cid], (kind, errors[cid])
        assert "invalid answer" in errors[cid]
    assert errors[ids[-1]] is None
    assert w.endpoints.endpoints[0].breaker.consecutive_failures == 0, "a bad answer is the document's fault, not an outage"


def test_an_invalid_answer_is_retried_like_a_5xx(conn, db_path, fault_server, worker_factory):
    seed(conn, 1)
    server = fault_server(lambda payload, n: (200, b"garbage") if n == 0 else None)
    w = worker_factory(make_settings(db_path, server.url, max_attempts=3))
    drive(w, lambda: status_counts(conn) == {"completed": 1})
    assert queue_rows(conn)[0][2] == 1, "the bad answer cost one attempt"


def test_an_outage_charges_no_attempt_and_pauses_claims(conn, db_path, fault_server, worker_factory):
    seed(conn, 6)
    server = fault_server(lambda payload, n: (503, {"error": "down"}), healthy=False)
    w = worker_factory(make_settings(db_path, server.url, breaker_threshold=2, batch_size=3))
    drive(w, lambda: w.endpoints.all_down)
    assert status_counts(conn) == {"pending": 6}
    assert all(r[2] == 0 for r in queue_rows(conn)), "no attempt charged"
    asked = len(server.requests)
    for _ in range(5):  # while open, the worker claims nothing and sends nothing
        w.loop_once(time.time())
    assert len(server.requests) == asked
    server.behaviour, server.healthy = None, True
    drive(w, lambda: status_counts(conn) == {"completed": 6})
    assert all(r[2] == 0 for r in queue_rows(conn))


def test_500s_while_health_fails_are_an_outage_not_item_failures(conn, db_path, fault_server, worker_factory):
    seed(conn, 2)
    server = fault_server(lambda payload, n: (500, {"error": "boom"}), healthy=False)
    w = worker_factory(make_settings(db_path, server.url, max_attempts=1, breaker_threshold=1))
    drive(w, lambda: w.endpoints.all_down)
    assert status_counts(conn) == {"pending": 2}


def test_429_with_retry_after_postpones_without_charging(conn, db_path, fault_server, worker_factory):
    seed(conn, 1)
    server = fault_server(lambda payload, n: (429, {"error": "slow down"}, {"Retry-After": "30"}))
    # Retry-After is capped at KG_RETRY_BACKOFF_MAX (make_settings': 0.2 s): raise it above 30 s.
    w = worker_factory(make_settings(db_path, server.url, retry_backoff_max=60.0))
    drive(w, lambda: w.endpoints.all_down)
    status, retries, not_before = conn.execute(
        "SELECT status, retry_count, not_before FROM kg_processing_queue").fetchone()
    assert (status, retries) == ("pending", 0) and not_before > time.time() + 20
    assert len(server.requests) == 1, "a long Retry-After is not waited out inside the request"


def test_disabled_service_claims_nothing(conn, db_path, kg_service, worker_factory):
    seed(conn, 2)
    w = worker_factory(make_settings(db_path, kg_service, service_enabled=False))
    assert w.loop_once(time.time()) > 0
    assert status_counts(conn) == {"pending": 2}
    assert w.stats.state == "disabled"


def start_dev_service(port: int) -> subprocess.Popen:
    proc = spawn(["dev-service", "--port", str(port)])
    wait_for(lambda: "listening" in (proc.stderr.readline() or "x"), 10, message="dev-service")
    return proc


def test_service_down_marks_nothing_failed_and_work_resumes(conn, db_path, tmp_path):
    """Real processes: a worker and the dev-service; the service is killed, and comes back once
    the worker has paused and probed it in vain."""
    port = free_port()
    log = tmp_path / "worker.log"
    service = start_dev_service(port)
    worker = spawn(["worker", "--db", db_path, "--service-url", f"http://127.0.0.1:{port}",
                    "--poll-interval", "0.2", "--log-file", str(log)], env={"KG_RETRY_BACKOFF": "0.1"})
    try:
        seed(conn, 5)
        wait_for(lambda: status_counts(conn) == {"completed": 5}, 20, message="first batch")
        service.send_signal(signal.SIGTERM)
        service.wait(10)
        seed(conn, 10)
        # The worker tried the new documents, found the service gone, paused, then probed it
        # again in vain: a document charged for the outage would have been charged by now.
        wait_for_log(log, "KG service unavailable, pausing claims")
        wait_for_log(log, "still down; next probe in")
        assert status_counts(conn) == {"completed": 5, "pending": 10}
        assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
        service = start_dev_service(port)
        wait_for(lambda: status_counts(conn) == {"completed": 15}, 60, message="drain after the outage")
        assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=15)
        service.send_signal(signal.SIGTERM)
        service.communicate(timeout=10)
    assert worker.returncode == 0, log.read_text()
    assert "healthy again; resuming" in log.read_text()


def test_sigterm_lets_the_document_in_flight_finish_and_releases_the_rest(conn, db_path, fault_server):
    seed(conn, 3)
    answer = threading.Event()
    server = fault_server(held_until(answer))
    worker = spawn(["worker", "--db", db_path, "--service-url", server.url, "--batch-size", "3",
                    "--poll-interval", "0.1"])
    wait_for(lambda: len(server.requests) == 1, 15, message="first request in flight")
    worker.send_signal(signal.SIGTERM)
    answer.set()  # the TERM is pending before the answer can arrive
    _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err
    assert status_counts(conn) == {"completed": 1, "pending": 2}
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert len(server.requests) == 1


def test_worker_once_processes_one_batch_and_exits(conn, db_path, kg_service):
    seed(conn, 7)
    proc = subprocess.run([sys.executable, "-m", "kgsupervisor", "worker", "--once", "--db", db_path,
                           "--service-url", kg_service, "--batch-size", "5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert status_counts(conn) == {"completed": 5, "pending": 2}
    assert "worker stopped: 5 processed, 5 succeeded, 0 failed" in proc.stderr


def test_a_locked_database_is_waited_out_counted_and_fails_nothing(conn, db_path, kg_service, worker_factory):
    """Another process holds the write lock longer than busy_timeout: the worker retries, never fails."""
    seed(conn, 3)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({db_path!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); time.sleep(7); c.execute('COMMIT')\n")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    w = worker_factory(make_settings(db_path, kg_service))
    drive(w, lambda: status_counts(conn) == {"completed": 3}, timeout=40)
    holder.wait(10)
    assert w.stats.db_lock_retries >= 1
    assert w.stats.total_failed == 0


def test_the_bearer_token_is_sent_and_never_logged(conn, db_path):
    port = free_port()
    service = spawn(["dev-service", "--port", str(port)], env={"KG_SERVICE_TOKEN": "t0p-s3cret"})
    wait_for(lambda: "listening" in (service.stderr.readline() or "x"), 10, message="dev-service")
    try:
        seed(conn, 2)
        wrong = subprocess.run([sys.executable, "-m", "kgsupervisor", "worker", "--once", "--db", db_path,
                                "--service-url", f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                               timeout=60, env={**os.environ, "KG_SERVICE_TOKEN": "wrong-token"})
        assert wrong.returncode == 0
        assert "refused our credentials (401): check KG_SERVICE_TOKEN" in wrong.stderr
        assert "wrong-token" not in wrong.stderr
        assert status_counts(conn) == {"pending": 2}, "a wrong token fails no document"
        right = subprocess.run([sys.executable, "-m", "kgsupervisor", "worker", "--once", "--db", db_path,
                                "--service-url", f"http://127.0.0.1:{port}", "--log-format", "json"],
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "KG_SERVICE_TOKEN": "t0p-s3cret"})
        assert right.returncode == 0, right.stderr
        assert status_counts(conn) == {"completed": 2}
        assert "t0p-s3cret" not in right.stderr
        assert all(json.loads(line)["logger"].startswith("kgsupervisor") for line in right.stderr.splitlines())
    finally:
        service.send_signal(signal.SIGTERM)
        service.communicate(timeout=10)


def test_proxy_variables_are_honoured_though_read_only_once(conn, db_path, fault_server):
    """The session reads HTTP_PROXY / NO_PROXY at start (not per request): both still take effect."""
    proxy = fault_server()  # answers whatever reaches it, absolute-URI proxy requests included
    seed(conn, 2)
    nothing_listens = "http://127.0.0.2:9"  # reachable only through the proxy
    base = {**os.environ, "HTTP_PROXY": proxy.url, "NO_PROXY": ""}
    proxied = subprocess.run([sys.executable, "-m", "kgsupervisor", "worker", "--once", "--db", db_path,
                              "--service-url", nothing_listens], capture_output=True, text=True, timeout=60,
                             env=base)
    assert proxied.returncode == 0, proxied.stderr
    assert status_counts(conn) == {"completed": 2}
    assert len(proxy.requests) == 2, "both documents went through the proxy"
    seed(conn, 1)
    bypassed = subprocess.run([sys.executable, "-m", "kgsupervisor", "worker", "--once", "--db", db_path,
                               "--service-url", nothing_listens], capture_output=True, text=True, timeout=60,
                              env={**base, "NO_PROXY": "127.0.0.2"})
    assert bypassed.returncode == 0, bypassed.stderr
    assert "unreachable" in bypassed.stderr
    assert len(proxy.requests) == 2 and status_counts(conn) == {"completed": 2, "pending": 1}


def test_loop_once_decides_by_the_clock_it_is_given(conn, db_path, kg_service, worker_factory, caplog):
    """Claims whose owner vanished are put back once their lease has expired at `now`, and the
    same iteration claims and completes them: the iteration reads no clock of its own for it."""
    seed(conn, 3)
    assert len(queue_for(conn).claim("gone-host:1", "t", 3, 10.0, time.time())) == 3
    w = worker_factory(make_settings(db_path, kg_service, batch_size=3, poll_interval=3.0))
    assert w.loop_once(time.time()) == 3.0 and status_counts(conn) == {"processing": 3}
    with caplog.at_level(logging.WARNING, logger="kgsupervisor.worker"):
        assert w.loop_once(time.time() + 60) == 0.0, "a full batch: claim again at once"
    assert "put 3 row(s) with expired leases back to pending" in caplog.text
    w.writer.flush(w.progress)  # the answers are written beside the sends
    assert status_counts(conn) == {"completed": 3}
    assert w.stats.total_success == 3


def test_the_document_in_hand_is_named_in_stats_counters_and_log_while_it_is_in_hand(
        conn, db_path, fault_server, worker_factory, caplog):
    ids = seed(conn, 3)
    named: list[tuple] = []
    server = fault_server()
    w = worker_factory(make_settings(db_path, server.url, batch_size=3))

    def note_what_the_worker_names(payload, n):
        named.append((payload["content_id"], w.stats.current_content_id, w.stats.counters.current(),
                      w.log.extra["content_id"]))

    server.behaviour = note_what_the_worker_names
    with caplog.at_level(logging.INFO, logger="kgsupervisor.worker"):
        drive(w, lambda: status_counts(conn) == {"completed": 3})
        w.writer.flush(w.progress)  # the write-back thread logs beside the sends
    assert named == [(cid, cid, cid, cid) for cid in ids]
    assert (w.stats.current_content_id, w.stats.counters.current(), w.log.extra["content_id"]) == (None,) * 3
    done = [r for r in caplog.records if "completed:" in r.getMessage()]
    assert sorted(r.content_id for r in done) == ids, "each completed line names its own document"
    assert all(f"content_id={r.content_id}]" in r.getMessage() for r in done)


def test_the_claim_in_flight_is_in_shared_memory_while_it_is_sent_and_only_then(
        conn, db_path, fault_server, worker_factory):
    seed(conn, 2)
    flying: list[bool] = []
    server = fault_server()
    w = worker_factory(make_settings(db_path, server.url, batch_size=2))

    def note_the_claim_in_flight(payload, n):
        seen = w.stats.counters.in_flight()
        row = conn.execute("SELECT id, lease_token FROM kg_processing_queue WHERE content_id = ?",
                           (payload["content_id"],)).fetchone()
        flying.append((seen.row_id, seen.token, seen.since <= time.time()) == (*row, True))

    server.behaviour = note_the_claim_in_flight
    drive(w, lambda: status_counts(conn) == {"completed": 2})
    assert flying == [True, True], "each request names its own claim, not the answer in hand before it"
    assert w.stats.counters.in_flight() is None, "nothing in flight once the answers are in"


def test_a_row_whose_content_id_is_no_id_fails_with_no_document_held(conn, db_path, kg_service,
                                                                     worker_factory):
    seed(conn, 1)
    conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES ('abc')")
    w = worker_factory(make_settings(db_path, kg_service, batch_size=2))
    drive(w, lambda: status_counts(conn) == {"completed": 1, "failed": 1})
    assert "content_id 'abc'" in queue_rows(conn)[1][3]
    assert w.stats.counters.current() is None and w.stats.total_failed == 1


def test_holding_names_a_document_for_the_block_then_what_was_named_before(db_path, kg_service,
                                                                          worker_factory):
    w = worker_factory(make_settings(db_path, kg_service))

    def named():
        return w.stats.current_content_id, w.stats.counters.current(), w.log.extra["content_id"]

    with pytest.raises(RuntimeError, match="unwinds"):
        with w.holding(7):
            assert named() == (7, 7, 7)
            with w.holding(8):
                assert named() == (8, 8, 8)
            assert named() == (7, 7, 7)
            raise RuntimeError("a fault unwinds the block")
    assert named() == (None, None, None)


def big_answer(payload: dict, n: int):
    """A valid answer far larger than any page the database has free: its write needs new pages."""
    rowid = payload["chunks"][0]["vector_rowid"]
    entities = [{"text": f"entity {i} " + "x" * 200, "type": "THING",
                 "chunk_appearances": [{"vector_rowid": rowid}]} for i in range(1500)]
    return 200, {"success": True, "content_id": payload["content_id"], "neo4j_document_id": "d",
                 "entities": entities, "relationships": []}


def test_run_pauses_on_a_full_database_gives_the_claims_back_and_resumes(conn, db_path, fault_server, caplog):
    """run() owns the fault handling: the write-back fails (SQLITE_FULL on the write-back thread's own
    connection), the worker pauses instead of dying, and on a fresh connection gives the claim
    back uncharged and completes every document."""
    seed(conn, 2)
    server = fault_server(big_answer)
    w = KGWorker(make_settings(db_path, server.url, batch_size=2), max_documents=2)
    w.init_process()
    pages = w.writer.conn.execute("PRAGMA page_count").fetchone()[0]
    w.writer.conn.execute(f"PRAGMA max_page_count = {pages}")  # this connection only: a reopen lifts it
    with caplog.at_level(logging.INFO, logger="kgsupervisor"):
        assert w.run() == 0
    log = "\n".join(r.getMessage() for r in caplog.records)
    assert "database error, pausing (no document is charged" in log and "database or disk is full" in log
    assert "answer(s) not written because of the error" in log  # one or both, as the writer grouped them
    assert "2 claimed document(s) back to pending after the database error" in log
    assert "database works again after" in log
    assert status_counts(conn) == {"completed": 2}
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert (w.stats.total_success, w.stats.total_failed, w.stats.total_released) == (2, 0, 2)
    assert w.stats.counters.current() is None


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_ages_outside_a_park_and_not_inside_one():
    clock = Clock()
    beats: list[float] = []
    progress = Progress(clock, beat=lambda: beats.append(clock.now))
    clock.now += 5
    assert progress.stuck_for() == 5
    progress.mark()
    assert progress.stuck_for() == 0 and beats == [1005.0]
    with progress.parked():
        clock.now += 3600  # a long request: a wait, not a hang
        assert progress.stuck_for() == 0
        progress.mark()  # a mark inside a park leaves the park in place (the keeper beats)
        clock.now += 10
        assert progress.stuck_for() == 0 and beats == [1005.0]
    assert progress.stuck_for() == 0, "leaving a park is progress"
    assert beats == [1005.0, 4615.0], "and beats at once: a C call holding the GIL may follow"
    clock.now += 7
    assert progress.stuck_for() == 7


def test_a_bounded_park_counts_as_progress_for_its_bound_only_and_nested_parks_restore():
    clock = Clock()
    progress = Progress(clock)
    with progress.parked(up_to=10):
        clock.now += 4
        assert progress.stuck_for() == 0
        clock.now += 9
        assert progress.stuck_for() == 3, "stuck since the bound ran out"
    with progress.parked():
        with progress.parked(up_to=10):
            clock.now += 60
        assert progress.stuck_for() == 0, "back in the enclosing park"
        clock.now += 60
        assert progress.stuck_for() == 0


def test_the_heartbeat_is_now_while_progressing_and_the_last_progress_once_stuck():
    clock = Clock()
    progress = Progress(clock)
    clock.now += 0.5
    assert progress.heartbeat(1.0, now=50_000.0) == 50_000.0
    clock.now += 2.5
    assert progress.heartbeat(1.0, now=50_000.0) == 50_000.0 - 3.0
    with progress.parked():
        clock.now += 100
        assert progress.heartbeat(1.0, now=50_000.0) == 50_000.0


def test_the_worker_is_parked_while_its_request_is_in_flight_and_while_it_waits_for_work(
        conn, db_path, fault_server, worker_factory):
    """What the lease keeper beats with, seen from other threads while the worker's main thread
    waits: in a request, and in the wait for work (woken by the test)."""
    seed(conn, 1)
    server = fault_server()
    w = worker_factory(make_settings(db_path, server.url))
    in_request: list[float] = []
    server.behaviour = lambda payload, n: in_request.append(w.progress.until)
    drive(w, lambda: status_counts(conn) == {"completed": 1})
    assert in_request == [math.inf]
    assert w.progress.until < math.inf, "out of the request, progress is a time again"

    idle: list[float] = []
    seen = threading.Event()

    def wake_once_waiting() -> None:
        wait_for(lambda: w.progress.until == math.inf, 20, message="the worker waiting for work")
        idle.append(w.progress.stuck_for())
        seen.set()
        w.handle_usr1(signal.SIGUSR1, None)  # wakes the wait, as a logrotate would

    waker = threading.Thread(target=wake_once_waiting)
    waker.start()
    while not seen.is_set() and waker.is_alive():  # a commit seen may end a wait early: wait again
        w.wait_for_work(60)
    waker.join()
    assert idle == [0.0]
    assert w.progress.until < math.inf
