"""The attempt history: one row per outcome of a claim, written with the outcome, on SQLite and
PostgreSQL; a real worker's tries, a real worker's death, and retention."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import threading
import time

import pytest

from kgsupervisor import config
from kgsupervisor.errors import ConfigError, LeaseLost
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.kg.devextract import extract
from kgsupervisor.pool.pruning import HistoryPruner
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.history import MAX_ERROR_CHARS, Attempt, InFlight, Outcome, attempts_of
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.queue.writeback import Answered, write_back, write_back_group
from kgsupervisor.states import JobStatus
from kgsupervisor.store.sqlite import connect

from .conftest import drive, held_until, make_settings, seed, status_counts, wait_for
from .processes import worker_pids

pytestmark = pytest.mark.timeout(90)
DAY = 86400.0


@pytest.fixture
def conn(backend):
    """A connection to the test's database, SQLite file or PostgreSQL (the test runs on both)."""
    c = backend.connect()
    yield c
    c.close()


@pytest.fixture
def sqlite_conn(db_path):
    """A connection to the SQLite file `db_path`, for what is the same on both backends."""
    c = connect(db_path)
    yield c
    c.close()


def outcomes(conn, queue_id: int) -> list[str]:
    return [a["outcome"] for a in attempts_of(conn, queue_id)]


def queue_id_of(conn, content_id: int) -> int:
    return conn.execute("SELECT id FROM kg_processing_queue WHERE content_id = ?", (content_id,)).fetchone()[0]


def result_for(conn, content_id: int):
    """The reference service's validated answer for a document, as a worker would hold it."""
    payload, _ = build_payload(conn, content_id)
    return parse_answer(json.dumps(extract(payload)), content_id=content_id,
                        chunk_rowids={c["vector_rowid"] for c in payload["chunks"]})


# -- a real worker's tries ----------------------------------------------------------------------

def test_a_document_that_fails_twice_then_completes_shows_three_attempts(backend, conn, fault_server,
                                                                        worker_factory):
    (cid,) = seed(conn, 1)
    server = fault_server(lambda payload, n: (500, {"success": False, "error": f"model crashed #{n}"})
                          if n < 2 else None)
    w = worker_factory(make_settings(backend.target, server.url, max_attempts=5))
    drive(w, lambda: status_counts(conn) == {"completed": 1})
    attempts = attempts_of(conn, queue_id_of(conn, cid))
    assert [a["outcome"] for a in attempts] == ["retried", "retried", "completed"]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["http_status"] for a in attempts] == [500, 500, 200]
    assert [a["error_class"] for a in attempts] == ["http_500", "http_500", None]
    assert "model crashed #0" in attempts[0]["error_message"] and "model crashed #1" in attempts[1]["error_message"]
    assert attempts[2]["error_message"] is None
    assert {(a["owner"], a["worker"], a["endpoint"], a["content_id"]) for a in attempts} == {(w.owner, 0, server.url, cid)}
    assert len({a["claim_key"] for a in attempts}) == 3, "one claim each"
    for a in attempts:
        assert a["claimed_at"] <= a["sent_at"] <= a["finished_at"]
        assert a["duration"] == pytest.approx(a["finished_at"] - a["claimed_at"])
    answer = server.journal.by_document()[cid][-1]
    written = conn.execute("SELECT kg_entity_count, kg_relationship_count FROM crawled_content WHERE id = ?",
                           (cid,)).fetchone()
    assert (attempts[2]["entities"], attempts[2]["relationships"]) == tuple(written)
    assert attempts[2]["answer_bytes"] == len(answer.body)


def test_a_bad_row_a_rejection_and_an_outage_are_told_apart(db_path, sqlite_conn, fault_server, worker_factory):
    conn = sqlite_conn  # SQLite alone lets a queue row hold text in content_id
    rejected, outage = seed(conn, 2)
    conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES ('not-an-id')")
    server = fault_server(lambda payload, n: (400, {"error": "chunks too long"}) if payload["content_id"] == rejected
                          else (503, {"error": "down"}))
    w = worker_factory(make_settings(db_path, server.url, batch_size=3))
    drive(w, lambda: status_counts(conn).get("failed") == 2)
    bad = conn.execute("SELECT id FROM kg_processing_queue WHERE content_id = 'not-an-id'").fetchone()[0]
    (bad_row,) = attempts_of(conn, bad)
    assert (bad_row["outcome"], bad_row["error_class"], bad_row["content_id"]) == ("bad_row", "bad_row", None)
    assert bad_row["endpoint"] is None and bad_row["sent_at"] is None, "nothing was sent for it"
    (failed,) = attempts_of(conn, queue_id_of(conn, rejected))
    assert (failed["outcome"], failed["error_class"], failed["http_status"]) == ("failed", "http_400", 400)
    first = attempts_of(conn, queue_id_of(conn, outage))[0]
    assert (first["outcome"], first["error_class"], first["http_status"]) == ("outage", "http_503", 503)


# -- a real worker's death ----------------------------------------------------------------------

def test_a_worker_sigkilled_mid_document_shows_crashed_then_completed(backend, conn, fault_server, processes):
    (cid,) = seed(conn, 1)
    answer = threading.Event()
    server = fault_server(held_until(answer))
    proc = processes.supervisor(backend.target, server.url, "--workers", "1", "--batch-size", "1")
    wait_for(lambda: len(server.requests) == 1, 30, message="the document in flight")
    (victim,) = worker_pids(proc)
    os.kill(victim, signal.SIGKILL)
    qid = queue_id_of(conn, cid)
    wait_for(lambda: outcomes(conn, qid) == ["crashed"], 30, message="the crash recorded")
    answer.set()
    wait_for(lambda: status_counts(conn) == {"completed": 1}, 30, message="the document completed")
    crashed, completed = attempts_of(conn, qid)
    assert (crashed["outcome"], crashed["error_class"], crashed["worker"]) == ("crashed", "SIGKILL", 0)
    assert crashed["owner"] == f"{socket.gethostname()}:{victim}"
    assert "killed by SIGKILL" in crashed["error_message"]
    assert crashed["claimed_at"] <= crashed["sent_at"] <= crashed["finished_at"], "it was in flight"
    assert (completed["outcome"], completed["attempt"]) == ("completed", 2)
    assert completed["owner"] != crashed["owner"]
    proc.stop()


# -- the queue's outcomes, fenced and recorded once ---------------------------------------------

def test_each_outcome_is_recorded_once_with_the_change_it_describes(conn):
    q = queue_for(conn)
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(i, i) for i in range(1, 5)])
    now = time.time()
    a, b, c, d = q.claim("host:1", "t1", 4, 60, now)
    assert q.retry_later(a, "KG service error 500", now + 1, 5, 0, 0, attempt=Attempt(worker=3)) is JobStatus.PENDING
    assert q.fail(b, "rejected (400)", now + 1)
    assert q.release([c], outcome=Outcome.OUTAGE, now=now + 1) == 1
    assert q.release_owner("host:1", now=now + 1) == 1  # d alone: the others are no longer held
    assert [outcomes(conn, i) for i in (1, 2, 3, 4)] == [["retried"], ["failed"], ["outage"], ["drained"]]
    (retried,) = attempts_of(conn, 1)
    assert (retried["worker"], retried["claimed_at"], retried["finished_at"]) == (3, now, now + 1)
    assert retried["claim_key"] == "t1/1" and retried["error_message"] == "KG service error 500"
    # A stale claim changes nothing, and its outcome is lease_lost only where nobody recorded one.
    assert q.retry_later(a, "late", now + 2, 5, 0, 0) is None
    assert outcomes(conn, 1) == ["retried"], "that claim's outcome is recorded already"
    (again,) = q.claim("host:2", "t2", 1, 60, now + 3)
    assert q.fail(dataclasses.replace(again, token="t-stale"), "nope", now + 4) is False
    assert outcomes(conn, again.id)[-1] == "lease_lost"
    assert conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (again.id,)).fetchone()[0] == "processing"


def test_a_crash_records_the_death_once_per_claim_and_the_poison_pill(conn):
    q = queue_for(conn)
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2)])
    now = time.time()
    for crash in (1, 2):
        first, _ = q.claim("host:9", f"t{crash}", 2, 60, now)
        # The first was in flight since now + 1, as the dead worker's shared memory says.
        q.release_crashed("host:9", InFlight(first.id, first.token, now + 1), "hung: no heartbeat for 61s", 2,
                          now + 2, outcome=Outcome.HUNG,
                          attempt=Attempt(worker=1, error_class="no_heartbeat", stack="File x.py, line 1"))
    in_flight, waiting = attempts_of(conn, 1), attempts_of(conn, 2)
    assert [a["outcome"] for a in in_flight] == ["hung", "poison_pill"]
    assert [a["outcome"] for a in waiting] == ["hung", "hung"]
    assert all(a["stack"] == "File x.py, line 1" and a["sent_at"] == now + 1 for a in in_flight)
    assert all(a["stack"] is None and a["sent_at"] is None for a in waiting), "the stack goes to the row in flight"
    assert "poison pill" in in_flight[1]["error_message"] and [a["attempt"] for a in in_flight] == [1, 2]


def test_an_expired_lease_is_recorded_and_the_late_write_back_is_not_recorded_twice(conn):
    (cid,) = seed(conn, 1)
    q = queue_for(conn)
    now = time.time()
    (claim,) = q.claim("gone-host:1", "t1", 1, 10, now)
    assert q.requeue_expired(now + 11) == 1
    with pytest.raises(LeaseLost):
        write_back(conn, claim, result_for(conn, cid), now + 12)
    (expired,) = attempts_of(conn, claim.id)
    assert (expired["outcome"], expired["error_class"], expired["owner"]) == ("crashed", "lease_expired", "gone-host:1")
    (fresh,) = q.claim("host:2", "t2", 1, 60, now + 13)
    outcomes_of_group = write_back_group(conn, [Answered(fresh, result_for(conn, cid)),
                                               Answered(claim, result_for(conn, cid))], now + 14)
    assert isinstance(outcomes_of_group[1], LeaseLost)
    assert outcomes(conn, claim.id) == ["crashed", "completed"]


def test_a_fenced_out_write_back_nobody_recorded_is_lease_lost_and_rolled_back_work_is_not(conn):
    (cid,) = seed(conn, 1)
    q = queue_for(conn)
    now = time.time()
    (claim,) = q.claim("host:1", "t1", 1, 60, now)
    # Taken over by hand (an operator's UPDATE): nobody recorded the first claim's outcome.
    conn.execute("UPDATE kg_processing_queue SET lease_token = 'other' WHERE id = ?", (claim.id,))
    with pytest.raises(LeaseLost):
        write_back(conn, claim, result_for(conn, cid), now + 1, attempt=Attempt(worker=2))
    (lost,) = attempts_of(conn, claim.id)
    assert (lost["outcome"], lost["worker"], lost["entities"]) == ("lease_lost", 2, None)
    assert conn.execute("SELECT COUNT(*) FROM chunk_entities WHERE content_id = ?", (cid,)).fetchone()[0] == 0


def test_a_stored_error_is_bounded_and_its_secrets_masked(conn):
    q = queue_for(conn)
    conn.execute("INSERT INTO kg_processing_queue (id, content_id) VALUES (1, 1)")
    (claim,) = q.claim("host:1", "t1", 1, 60, time.time())
    q.fail(claim, "service at http://kg:hunter2@gpu1:8088 said: Bearer abcdefgh12345678 " + "x" * 5000, time.time(),
           attempt=Attempt(endpoint="http://kg:hunter2@gpu1:8088"))
    (failed,) = attempts_of(conn, 1)
    assert len(failed["error_message"]) == MAX_ERROR_CHARS and failed["error_message"].endswith("...")
    assert "hunter2" not in failed["error_message"] and "abcdefgh12345678" not in failed["error_message"]
    assert failed["endpoint"] == "http://***@gpu1:8088"


# -- retention ----------------------------------------------------------------------------------

def insert_attempts(conn, finished: list[float]) -> None:
    conn.executemany("INSERT INTO kg_processing_attempts (queue_id, attempt, claim_key, finished_at, outcome) "
                     "VALUES (1, ?, ?, ?, 'completed')", [(i, f"t{i}", at) for i, at in enumerate(finished)])


def test_retention_prunes_old_attempts_in_batches_and_keeps_recent_ones(backend, conn):
    now = time.time()
    insert_attempts(conn, [now - 40 * DAY] * 7 + [now - 29 * DAY] * 2)
    pruner = HistoryPruner(backend.target, batch_rows=3)
    assert pruner.prune_if_due(0, 0.0) == 0, "0 keeps all"
    assert pruner.prune_if_due(30, 0.0) == 7
    assert pruner.prune_if_due(30, 1.0) == 0, "not due again within a minute"
    kept = conn.execute("SELECT finished_at FROM kg_processing_attempts").fetchall()
    assert sorted(at for (at,) in kept) == [now - 29 * DAY] * 2


def test_the_supervisor_prunes_the_history_by_kg_history_days(db_path, sqlite_conn, kg_service, processes):
    conn = sqlite_conn
    now = time.time()
    insert_attempts(conn, [now - 3 * DAY] * 5 + [now - 60.0])
    proc = processes.supervisor(db_path, kg_service, "--workers", "1", env={"KG_HISTORY_DAYS": "2"})
    wait_for(lambda: conn.execute("SELECT COUNT(*) FROM kg_processing_attempts").fetchone()[0] == 1, 30,
             message="the old attempts pruned")
    proc.wait_for_log("pruned 5 attempt(s) older than 2 day(s)")
    proc.stop()


def test_kg_history_days_is_a_whole_number_of_days_or_0():
    assert config.load({}, {})[0].history_days == 30
    assert config.load({}, {"KG_HISTORY_DAYS": "0"})[0].history_days == 0
    with pytest.raises(ConfigError) as refused:
        config.load({}, {"KG_HISTORY_DAYS": "-1"})
    assert str(refused.value) == "KG_HISTORY_DAYS=-1: expected a whole number from 0 to 36500"
