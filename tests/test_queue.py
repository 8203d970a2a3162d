"""The queue contract: the leased queue on a real SQLite file and a real PostgreSQL server, one suite
for both, including claims from several real processes."""
from __future__ import annotations

import dataclasses
import multiprocessing
import time
import uuid

import pytest

from kgsupervisor.queue.claims import CrashRelease
from kgsupervisor.queue.history import InFlight
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.states import JobStatus

from .conftest import seed, status_counts, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def conn(backend):
    c = backend.connect()
    yield c
    c.close()


def claim_until_empty(backend, owner: str, results, start) -> None:
    """Runs in a forked child: claim batches of 7 until nothing is left, record every id."""
    conn = backend.connect()
    queue = queue_for(conn)
    taken = []
    start.wait(10)  # all four start claiming together, so the claims really interleave
    while True:
        claims = queue.claim(owner, uuid.uuid4().hex, 7, 60.0, time.time())
        if not claims:
            break
        taken.extend((c.id, c.priority) for c in claims)
    results.put((owner, taken))
    conn.close()


def test_four_processes_claim_every_row_exactly_once(backend, conn):
    rows = [(i, i % 3) for i in range(1, 2001)]
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, ?)", rows)
    ctx = multiprocessing.get_context("fork")
    results, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=claim_until_empty, args=(backend, f"owner{i}", results, start))
             for i in range(4)]
    for p in procs:
        p.start()
    taken = dict(results.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    all_ids = [i for batch in taken.values() for i, _ in batch]
    assert len(all_ids) == 2000
    assert len(set(all_ids)) == 2000
    # SQLite's busy handler is not fair, so one claimer may be starved in a burst this short;
    # what matters is that the claims really ran concurrently.
    assert sum(1 for batch in taken.values() if batch) >= 2
    # Each process sees priorities in non-increasing order: the claim follows priority DESC.
    for batch in taken.values():
        prios = [p for _, p in batch]
        assert prios == sorted(prios, reverse=True)
    assert status_counts(conn) == {"processing": 2000}


def test_claim_takes_priority_desc_then_id_asc(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id, priority) VALUES (?, ?, ?)",
                     [(1, 1, 1), (2, 2, 5), (3, 3, 1), (4, 4, 5), (5, 5, 9)])
    claims = queue_for(conn).claim("me", "t1", 4, 60, time.time())
    assert [c.id for c in claims] == [5, 2, 4, 1]
    assert all(c.token == "t1" and c.owner == "me" for c in claims)
    row = conn.execute("SELECT status, lease_owner, lease_token, processing_started_at FROM "
                       "kg_processing_queue WHERE id = 5").fetchone()
    assert row[:3] == ("processing", "me", "t1") and row[3]


def test_skipped_for_service_unavailable_is_claimable_other_skips_are_not(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id, status, skipped_reason) VALUES (?, ?, ?, ?)",
                     [(1, 1, "skipped", "kg_service_unavailable"), (2, 2, "skipped", "too_short"),
                      (3, 3, "completed", None)])
    claims = queue_for(conn).claim("me", "t", 10, 60, time.time())
    assert [c.id for c in claims] == [1]


def test_not_before_delays_a_row(conn):
    now = time.time()
    conn.execute("INSERT INTO kg_processing_queue (id, content_id, not_before) VALUES (1, 1, ?)", (now + 100,))
    q = queue_for(conn)
    assert q.claim("me", "t", 5, 60, now) == []
    assert [c.id for c in q.claim("me", "t", 5, 60, now + 101)] == [1]


def test_release_is_fenced_and_charges_no_attempt(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2)])
    q = queue_for(conn)
    claims = q.claim("me", "mine", 5, 60, time.time())
    stale = [c.__class__(**{**{f: getattr(c, f) for f in c.__slots__}, "token": "old"}) for c in claims]
    assert q.release(stale) == 0, "a stale token releases nothing"
    assert q.release(claims) == 2
    rows = conn.execute("SELECT status, retry_count, lease_owner, lease_token FROM kg_processing_queue").fetchall()
    assert rows == [("pending", 0, None, None)] * 2


def test_retry_later_and_fail_are_fenced(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2)])
    q = queue_for(conn)
    mine, almost_spent = q.claim("me", "mine", 2, 60, time.time())
    spent = dataclasses.replace(almost_spent, token="old", retry_count=2)
    assert q.retry_later(dataclasses.replace(mine, token="old"), "500", time.time(), 3, 1.0, 5.0) is None
    assert q.retry_later(spent, "500", time.time(), 3, 1.0, 5.0) is None, "a stale token fails nothing"
    assert conn.execute("SELECT status, retry_count, lease_token FROM kg_processing_queue").fetchall() == [
        ("processing", 0, "mine")] * 2


def test_release_owner_frees_only_that_owner(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(i, i) for i in range(1, 5)])
    q = queue_for(conn)
    q.claim("host:1", "a", 2, 60, time.time())
    q.claim("host:2", "b", 2, 60, time.time())
    assert q.release_owner("host:1") == 2
    assert status_counts(conn) == {"pending": 2, "processing": 2}


def test_retry_later_backs_off_then_fails_with_last_error(conn):
    conn.execute("INSERT INTO kg_processing_queue (id, content_id) VALUES (1, 1)")
    q = queue_for(conn)
    now = time.time()
    for attempt in range(1, 3):
        (claim,) = q.claim("me", f"t{attempt}", 1, 60, now + 1000 * attempt)
        assert q.retry_later(claim, f"boom {attempt}", now, 3, 1.0, 5.0) is JobStatus.PENDING
        retry_count, not_before = conn.execute("SELECT retry_count, not_before FROM kg_processing_queue").fetchone()
        assert retry_count == attempt and now <= not_before <= now + 5.0
    (claim,) = q.claim("me", "t3", 1, 60, now + 5000)
    assert q.retry_later(claim, "boom 3", now, 3, 1.0, 5.0) is JobStatus.FAILED
    status, retry_count, error = conn.execute(
        "SELECT status, retry_count, error_message FROM kg_processing_queue").fetchone()
    assert (status, retry_count) == ("failed", 3)
    assert "boom 3" in error and "3 attempts" in error


def test_requeue_expired_backstop(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2)])
    q = queue_for(conn)
    now = time.time()
    q.claim("gone:1", "a", 1, 10, now)
    q.claim("alive:2", "b", 1, 1000, now)
    assert q.requeue_expired(now + 20) == 1
    assert conn.execute("SELECT status FROM kg_processing_queue WHERE id = 1").fetchone()[0] == "pending"


def test_extend_renews_only_rows_still_held(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2)])
    q = queue_for(conn)
    now = time.time()
    claims = q.claim("me", "tok", 2, 10, now)
    q.release(claims[:1])
    assert q.extend("tok", 100, now) == 1
    assert conn.execute("SELECT lease_expires_at FROM kg_processing_queue WHERE id = ?",
                        (claims[1].id,)).fetchone()[0] == pytest.approx(now + 100)


def test_enqueue_never_makes_a_second_live_row(conn):
    ids = seed(conn, 3)
    q = queue_for(conn)
    result = q.enqueue([ids[0], ids[0], 999], 1, time.time())
    assert result.added == [] and result.already_queued == [ids[0]] and result.unknown == [999]
    conn.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE content_id = ?", (ids[1],))
    assert q.enqueue([ids[1]], 7, time.time()).added == [ids[1]], "a failed row is not live"
    assert q.enqueue_all_unprocessed(1, time.time()) == 0
    conn.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE content_id = ?", (ids[2],))
    assert q.enqueue_all_unprocessed(1, time.time()) == 1, "kg_processed = 0 and no live row"
    live = conn.execute("SELECT content_id, COUNT(*) FROM kg_processing_queue WHERE status IN "
                        "('pending', 'processing') GROUP BY content_id HAVING COUNT(*) > 1").fetchall()
    assert live == []


def test_retry_resets_failed_and_skipped_but_not_into_a_duplicate(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id, status, retry_count) VALUES (?, ?, ?, ?)",
                     [(1, 1, "failed", 5), (2, 2, "skipped", 0), (3, 3, "failed", 5), (4, 3, "pending", 0)])
    q = queue_for(conn)
    assert q.retry(failed=True) == 1, "row 3 stays failed: document 3 already has a live row"
    assert q.retry(skipped=True) == 1
    assert conn.execute("SELECT status, retry_count FROM kg_processing_queue WHERE id = 1").fetchone() == ("pending", 0)


def test_counts_are_a_pure_read(backend, conn):
    conn.executemany("INSERT INTO kg_processing_queue (content_id, status) VALUES (?, ?)",
                     [(1, "pending"), (2, "failed"), (3, "completed"), (4, "completed")])
    before = conn.total_changes if backend.kind == "sqlite" else None
    counts = queue_for(conn).counts()
    assert before is None or conn.total_changes == before
    assert counts == {"pending": 1, "processing": 0, "completed": 2, "failed": 1, "skipped": 0, "total": 4}
    assert all(type(n) is int for n in counts.values()), "plain ints, for JSON (not PostgreSQL's numeric)"


def test_a_crash_charges_only_the_document_in_flight_and_poisons_after_the_limit(conn):
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(1, 1), (2, 2), (3, 3)])
    q = queue_for(conn)
    now = time.time()
    q.claim("host:9", "t0", 3, 60, now)
    # What a dead worker's shared memory names is charged only while that claim still holds its
    # row: not the row under another claim's token, not a row of another owner.
    assert q.release_crashed("host:8", InFlight(2, "t0", now), "SIGKILL", 2, now) == CrashRelease(0, [], [])
    assert q.release_crashed("host:9", InFlight(2, "t-old", now), "SIGKILL", 2, now) == CrashRelease(3, [], [])
    for crash in range(1, 3):
        claims = q.claim("host:9", f"t{crash}", 3, 60, now)
        result = q.release_crashed("host:9", InFlight(2, f"t{crash}", now), "SIGKILL", 2, now)
        assert result.released == (3 if crash == 1 else 2) and result.in_flight == [2] and len(claims) == 3
        assert result.poisoned == ([] if crash == 1 else [2])
    rows = conn.execute("SELECT id, status, crash_count, error_message, started_at FROM kg_processing_queue "
                        "ORDER BY id").fetchall()
    assert [(r[0], r[1], r[2] or 0) for r in rows] == [(1, "pending", 0), (2, "failed", 2), (3, "pending", 0)]
    assert "poison pill" in rows[1][3] and "SIGKILL" in rows[1][3]
    assert {r[4] for r in rows} == {None}, "started_at is no longer written"


def test_counts_follow_every_status_change_including_the_upstreams_own(conn):
    q = queue_for(conn)
    conn.executemany("INSERT INTO kg_processing_queue (content_id) VALUES (?)", [(i,) for i in range(1, 7)])
    q.claim("me", "t", 2, 60, time.time())
    conn.execute("UPDATE kg_processing_queue SET status = 'skipped', skipped_reason = 'x' WHERE id = 6")
    conn.execute("DELETE FROM kg_processing_queue WHERE id = 5")
    conn.execute("INSERT INTO kg_processing_queue (content_id, status) VALUES (9, NULL)")
    scanned = dict(conn.execute("SELECT COALESCE(status, ''), COUNT(*) FROM kg_processing_queue GROUP BY 1").fetchall())
    counts = q.counts()
    # A NULL status is shown as "(none)", not hidden in the total: such rows are never claimed.
    assert {k: v for k, v in counts.items() if v and k != "total"} == {k or "(none)": v for k, v in scanned.items()}
    assert counts["total"] == 6


# -- PostgreSQL only: what SQLite's one-writer-at-a-time makes moot --------------------------------

def test_postgres_claimers_pass_over_rows_locked_by_an_uncommitted_claim(pg_backend):
    conn = pg_backend.connect()
    conn.executemany("INSERT INTO kg_processing_queue (id, content_id) VALUES (?, ?)", [(i, i) for i in range(1, 5)])
    other = pg_backend.connect()
    try:
        conn.execute("BEGIN")
        mine = queue_for(conn).claim("a", "ta", 2, 60, time.time())
        other.execute("SET statement_timeout = '2s'")  # waiting on the lock would fail, not hang
        theirs = queue_for(other).claim("b", "tb", 5, 60, time.time())
        conn.execute("COMMIT")
    finally:
        other.close()
    assert [c.id for c in mine] == [1, 2] and [c.id for c in theirs] == [3, 4]
    assert queue_for(conn).counts()["processing"] == 4, "two connections' count rows add up"
    conn.close()


def test_postgres_count_rows_of_closed_connections_are_folded_by_the_upkeep(pg_backend):
    for i in range(5):  # five connections come and go, each leaving its own count rows
        c = pg_backend.connect()
        c.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (i,))
        c.close()
    conn = pg_backend.connect()
    try:
        slots = lambda: conn.execute("SELECT COUNT(DISTINCT slot) FROM kg_queue_status_counts").fetchone()[0]
        assert slots() >= 5
        wait_for(lambda: queue_for(conn).requeue_expired(time.time()) == 0 and slots() == 1, 10,
                 message="closed connections' rows folded into slot 0")
        assert queue_for(conn).counts()["pending"] == 5
    finally:
        conn.close()
