"""The write-back thread: a worker sends on while its answers wait to be written, and a kill or a
drain costs no answer more than it must, with real supervisors, workers, signals and HTTP."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.kg.devextract import extract
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.queue.writeback import Answered
from kgsupervisor.worker.counters import Progress
from kgsupervisor.worker.stats import WorkerStats
from kgsupervisor.worker.writer import AnswerWriter

from .conftest import seed, status_counts, wait_for
from .test_admission import charged
from .test_pause import Host
from .test_worker import wal_commits

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def holding_requests(gates: dict[int, threading.Event]):
    """A fault-server behaviour: the requests numbered in `gates` (0 first) wait for their gate,
    60 s at most; every answer is the reference service's."""
    def behaviour(payload: dict, n: int) -> None:
        if n in gates:
            gates[n].wait(60)
    return behaviour


def completed(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'").fetchone()[0]


def answered(server) -> list:
    """The content ids the server has answered in full, in order."""
    exchanges = [e for each in server.journal.by_document().values() for e in each]
    return [e.content_id for e in sorted(exchanges, key=lambda e: e.seq) if e.status == 200 and e.whole]


def one_worker(host: Host) -> int:
    """The pid of the supervisor's one worker."""
    pids = wait_for(lambda: host.proc.children("kgs-worker"), 30, message="the worker runs")
    assert len(pids) == 1
    return next(iter(pids))


def test_answers_are_written_while_the_next_documents_are_sent_and_a_kill_charges_the_one_in_flight(
        conn, db_path, fault_server, processes):
    ids = seed(conn, 5)
    first, fourth, fifth = threading.Event(), threading.Event(), threading.Event()
    server = fault_server(holding_requests({0: first, 3: fourth, 4: fifth}))
    host = Host(processes, db_path, server.url, "--workers", "1", "--batch-size", "5", "--adaptive", "off")
    try:
        wait_for(lambda: len(server.requests) == 1, 30, message="the batch claimed, its first document sent")
        worker = one_worker(host)
        conn.execute("BEGIN IMMEDIATE")  # the write lock: no answer can be written meanwhile
        first.set()
        wait_for(lambda: len(server.requests) == 4, 30, message="three more documents sent")
        assert answered(server) == ids[:3] and completed(conn) == 0, "sent on while the answers waited"
        conn.execute("ROLLBACK")
        wait_for(lambda: completed(conn) == 3, 30, message="three written, the fourth document in flight")
        conn.execute("BEGIN IMMEDIATE")
        fourth.set()
        wait_for(lambda: len(server.requests) == 5, 30, message="the fifth document sent")
        assert answered(server) == ids[:4] and completed(conn) == 3, "the fourth answer waits to be written"
        os.kill(worker, signal.SIGKILL)  # the fifth document in flight, the fourth answer unwritten
        wait_for(lambda: worker not in host.proc.children("kgs-worker"), 30, message="the worker is dead")
        conn.execute("ROLLBACK")
        fifth.set()
        wait_for(lambda: status_counts(conn) == {"completed": 5}, 60, message="everything completed")
    finally:
        for gate in (first, fourth, fifth):
            gate.set()
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        host.proc.stop()
    assert host.proc.returncode == 0, host.proc.output
    written = conn.execute("SELECT content_id, COUNT(*) FROM kg_processing_attempts "
                           "WHERE outcome = 'completed' GROUP BY content_id ORDER BY content_id").fetchall()
    assert written == [(cid, 1) for cid in ids], "every document written once"
    assert charged(conn) == 0, "no attempt charged: the unwritten answer went back uncharged"
    crashes = conn.execute("SELECT content_id, crash_count FROM kg_processing_queue "
                           "WHERE crash_count > 0").fetchall()
    assert crashes == [(ids[4], 1)], "the claim in flight alone is charged the crash"
    asked = {cid: len(exchanges) for cid, exchanges in server.journal.by_document().items()}
    assert asked == {**{cid: 1 for cid in ids[:3]}, ids[3]: 2, ids[4]: 2}, "asked again for the lost alone"


def test_a_drain_writes_the_answers_waiting_before_the_worker_exits(conn, db_path, fault_server, processes):
    ids = seed(conn, 3)
    first, third = threading.Event(), threading.Event()
    server = fault_server(holding_requests({0: first, 2: third}))
    host = Host(processes, db_path, server.url, "--workers", "1", "--batch-size", "3", "--adaptive", "off")
    try:
        wait_for(lambda: len(server.requests) == 1, 30, message="the batch claimed, its first document sent")
        worker = one_worker(host)
        conn.execute("BEGIN IMMEDIATE")
        first.set()
        wait_for(lambda: len(server.requests) == 3, 30, message="the last document sent")
        # What a drain sends each worker; now, while it waits for the answer: it claims nothing more.
        os.kill(worker, signal.SIGTERM)
        third.set()
        host.proc.wait_for_log("writing 3 answer(s) before stopping", timeout=30)
        assert completed(conn) == 0 and psutil.pid_exists(worker), "its exit waits for the write"
        conn.execute("ROLLBACK")
        wait_for(lambda: worker not in host.proc.children("kgs-worker"), 30, message="the worker exited")
        assert status_counts(conn) == {"completed": 3}
    finally:
        first.set()
        third.set()
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        output = host.proc.stop()
    assert host.proc.returncode == 0, output
    assert answered(server) == ids
    assert charged(conn) == 0


def reference_answers(conn, claims) -> list[Answered]:
    """The reference service's answer to each claimed document, parsed as a worker parses it."""
    answers = []
    for claim in claims:
        payload, _ = build_payload(conn, claim.content_id)
        body = json.dumps(extract(payload))
        result = parse_answer(body, content_id=claim.content_id,
                              chunk_rowids={c["vector_rowid"] for c in payload["chunks"]})
        answers.append(Answered(claim, result, at=time.monotonic()))
    return answers


def test_the_answers_waiting_for_a_write_are_written_together_in_one_transaction(conn, db_path):
    seed(conn, 4)
    claims = queue_for(conn).claim("host:1", "token", 4, 600.0, time.time())
    answers = reference_answers(conn, claims)
    dropped: list[str] = []
    writer = AnswerWriter(db_path, WorkerStats(worker_id=0), dropped.append, room=4)
    writer.start()
    progress = Progress()
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone() == (0, 0, 0)
        conn.execute("BEGIN IMMEDIATE")  # the first answer waits for the lock, the others behind it
        for item in answers:
            writer.hand(item, progress)
        writer.end_batch("token")
        assert wal_commits(db_path) == 0 and dropped == []
        conn.execute("ROLLBACK")
        writer.flush(progress)
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        writer.stop(progress)
    assert status_counts(conn) == {"completed": 4}
    assert wal_commits(db_path) <= 2, "one transaction for the answers that waited, at most one before"
    assert writer.stats.total_success == 4
    wait_for(lambda: dropped == ["token"], 10, message="the batch's lease let go once written")
