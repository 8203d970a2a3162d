"""The claim/release state machine of the leased queue, explored by hypothesis against a model.

Real SQLite file (and the same machine on a real PostgreSQL server, below), one connection (and
queue) per simulated worker, 20 rows. Rules claim,
renew, complete (the fenced write-back), fail, retry later, release, release a dead owner's
claims (with or without charging a crash to the claim its shared memory names in flight: any
claim ever handed out, live, stale or another owner's), let leases expire and requeue them, and
put failed rows back (those two in batches of 1-8 rows); another program's bulk statements move
every row of a status at once and back, the counts checked after each statement. Workers keep stale Claim objects on purpose: every later write through
one must be fenced out by its lease token. After every step the database must equal the model
and the invariants hold: row count constant, every row in exactly one of pending, processing,
completed, failed; a processing row has an owner, a token and an expiry (others have none); no
token spans two owners; a completed row is never claimed again and has its KG rows exactly once.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
from contextlib import closing

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

from kgsupervisor.errors import LeaseLost
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.queue.history import InFlight
from kgsupervisor.queue.leased import Claim, SQLiteQueue, queue_for
from kgsupervisor.queue.writeback import write_back
from kgsupervisor.states import JobStatus
from kgsupervisor.store.pgschema import migrate_pg
from kgsupervisor.store.postgres import PGConnection
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

pytestmark = [pytest.mark.timeout(120)]

ROWS = 20
WORKERS = 3
LEASE = 10.0
MAX_ATTEMPTS = 3
POISON_AFTER = 2
BACKOFF_BASE, BACKOFF_CAP = 1.0, 4.0
STATUSES = {"pending", "processing", "completed", "failed"}
# Every column a row of the model is compared on, and the rest a deleted row is put back with.
COPIED_COLUMNS = ("id", "content_id", "status", "priority", "queued_at", "processing_started_at", "processed_at",
                  "retry_count", "error_message", "result_summary", "skipped_reason", "lease_owner", "lease_token",
                  "lease_expires_at", "not_before", "crash_count", "started_at")


@functools.lru_cache(maxsize=1)
def template_db() -> str:
    """A migrated database with ROWS documents (2 chunks each) and one queue row per document,
    priorities 0-2; copied for every example, which is much cheaper than building it."""
    directory = tempfile.mkdtemp(prefix="kgq-template-")
    path = os.path.join(directory, "template.db")
    init_db(path)
    conn = connect(path)
    ids = add_documents(conn, ROWS, chunks=2, seed=1)
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority, queued_at) VALUES (?, ?, '2024-01-01')",
                     [(cid, cid % 3) for cid in ids])
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


class QueueMachine(RuleBasedStateMachine):
    @initialize()
    def open_database(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="kgq-")
        self.path = os.path.join(self.dir, "kg.db")
        shutil.copyfile(template_db(), self.path)
        self.conns = [connect(self.path) for _ in range(WORKERS)]
        self.queues = [SQLiteQueue(c) for c in self.conns]
        self.start_model()

    def start_model(self) -> None:
        """The model of the freshly opened database: every row pending, nothing held."""
        self.owners = [f"testhost:{1000 + w}" for w in range(WORKERS)]
        self.held: list[list[Claim]] = [[] for _ in range(WORKERS)]  # every claim ever handed out, stale ones too
        self.handed: list[tuple[int, Claim]] = []  # the same, as (worker, claim)
        self.now = 1_000_000.0
        self.model: dict[int, dict] = {}
        for qid, cid, priority in self.conns[0].execute("SELECT id, content_id, priority FROM kg_processing_queue"):
            self.model[qid] = dict(content_id=cid, priority=priority, status="pending", owner=None, token=None,
                                   expires=None, not_before=None, retry=0, crash=0)
        self.chunks = {cid: [r[0] for r in self.conns[0].execute(
            "SELECT rowid FROM content_chunks WHERE content_id = ?", (cid,))] for cid in
            (m["content_id"] for m in self.model.values())}
        self.completed_ever: set[int] = set()
        self.token_owner: dict[str, str] = {}

    def teardown(self) -> None:
        for c in getattr(self, "conns", []):
            c.close()
        if hasattr(self, "dir"):
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------

    def pick(self, index: int) -> tuple[int, Claim]:
        """Any claim ever handed out (live or stale) and the worker it was handed to."""
        return self.handed[index % len(self.handed)]

    def holds(self, claim: Claim) -> bool:
        """The model says this claim's token still holds its row."""
        row = self.model[claim.id]
        return row["status"] == "processing" and row["token"] == claim.token

    def to_pending(self, qid: int, not_before: float | None = None) -> None:
        self.model[qid].update(status="pending", owner=None, token=None, expires=None, not_before=not_before)

    def actual_not_before(self, qid: int) -> float | None:
        return self.conns[0].execute("SELECT not_before FROM kg_processing_queue WHERE id = ?", (qid,)).fetchone()[0]

    # -- rules -----------------------------------------------------------------------------------

    @rule(worker=st.integers(0, WORKERS - 1), limit=st.integers(1, 6))
    def claim(self, worker: int, limit: int) -> None:
        due = [qid for qid, m in self.model.items()
               if m["status"] == "pending" and (m["not_before"] is None or m["not_before"] <= self.now)]
        expected = sorted(due, key=lambda qid: (-self.model[qid]["priority"], qid))[:limit]
        token = uuid.uuid4().hex
        claims = self.queues[worker].claim(self.owners[worker], token, limit, LEASE, self.now)
        assert [c.id for c in claims] == expected
        assert not {c.id for c in claims} & self.completed_ever, "a completed row was claimed again"
        self.token_owner[token] = self.owners[worker]
        for c in claims:
            m = self.model[c.id]
            assert (c.content_id, c.retry_count, c.priority, c.owner, c.token) == (
                m["content_id"], m["retry"], m["priority"], self.owners[worker], token)
            m.update(status="processing", owner=self.owners[worker], token=token, expires=self.now + LEASE)
        self.held[worker].extend(claims)
        self.handed.extend((worker, c) for c in claims)

    @rule(worker=st.integers(0, WORKERS - 1))
    def extend(self, worker: int) -> None:
        for token in {c.token for c in self.held[worker]}:
            mine = [qid for qid, m in self.model.items() if m["status"] == "processing" and m["token"] == token]
            assert self.queues[worker].extend(token, LEASE, self.now) == len(mine)
            for qid in mine:
                self.model[qid]["expires"] = self.now + LEASE

    @precondition(lambda self: self.handed)
    @rule(index=st.integers(0, 200))
    def complete(self, index: int) -> None:
        worker, claim = self.pick(index)
        rowid = self.chunks[claim.content_id][0]
        body = json.dumps({"success": True, "content_id": claim.content_id, "neo4j_document_id": f"doc-{claim.id}",
                           "entities": [{"text": "Ada Lovelace", "type_primary": "PERSON", "confidence": 0.9,
                                         "chunk_appearances": [{"vector_rowid": rowid, "offset_start": 0,
                                                                "offset_end": 12}]}],
                           "relationships": []})
        result = parse_answer(body, content_id=claim.content_id, chunk_rowids=self.chunks[claim.content_id])
        if self.holds(claim):
            write_back(self.conns[worker], claim, result, self.now)
            self.model[claim.id].update(status="completed", owner=None, token=None, expires=None, not_before=None)
            self.completed_ever.add(claim.id)
        else:
            with pytest.raises(LeaseLost):
                write_back(self.conns[worker], claim, result, self.now)
        assert not self.conns[worker].in_transaction

    @precondition(lambda self: self.handed)
    @rule(index=st.integers(0, 200))
    def fail(self, index: int) -> None:
        worker, claim = self.pick(index)
        ok = self.queues[worker].fail(claim, "rejected: 400", self.now)
        assert ok == self.holds(claim)
        if ok:
            self.model[claim.id].update(status="failed", owner=None, token=None, expires=None, not_before=None,
                                        retry=claim.retry_count)

    @precondition(lambda self: self.handed)
    @rule(index=st.integers(0, 200))
    def retry_later(self, index: int) -> None:
        worker, claim = self.pick(index)
        held = self.holds(claim)
        status = self.queues[worker].retry_later(claim, "500", self.now, MAX_ATTEMPTS, BACKOFF_BASE, BACKOFF_CAP)
        if not held:
            assert status is None
            return  # fenced: nothing may have changed (the invariants compare the whole row)
        attempts = claim.retry_count + 1
        if attempts >= MAX_ATTEMPTS:
            assert status is JobStatus.FAILED
            self.model[claim.id].update(status="failed", owner=None, token=None, expires=None, not_before=None,
                                        retry=attempts)
        else:
            assert status is JobStatus.PENDING
            not_before = self.actual_not_before(claim.id)
            assert self.now <= not_before <= self.now + min(BACKOFF_CAP, BACKOFF_BASE * 2 ** claim.retry_count)
            self.to_pending(claim.id, not_before)
            self.model[claim.id]["retry"] = attempts

    @rule(worker=st.integers(0, WORKERS - 1), data=st.data(), later=st.booleans())
    def release(self, worker: int, data, later: bool) -> None:
        claims = self.held[worker]
        if not claims:
            return
        chosen = data.draw(st.lists(st.sampled_from(claims), max_size=6, unique_by=lambda c: (c.id, c.token)))
        not_before = self.now + 3.0 if later else None
        expected = [c.id for c in chosen if self.holds(c)]
        assert self.queues[worker].release(chosen, not_before) == len(expected)
        for qid in expected:
            self.to_pending(qid, not_before)

    @rule(dead=st.integers(0, WORKERS - 1), by=st.integers(0, WORKERS - 1))
    def release_owner(self, dead: int, by: int) -> None:
        """Worker `dead` died; `by` (the supervisor's or anyone's connection) gives its claims back."""
        mine = [qid for qid, m in self.model.items() if m["status"] == "processing" and m["owner"] == self.owners[dead]]
        assert self.queues[by].release_owner(self.owners[dead]) == len(mine)
        for qid in mine:
            self.to_pending(qid, self.model[qid]["not_before"])

    @rule(dead=st.integers(0, WORKERS - 1), by=st.integers(0, WORKERS - 1), flying=st.booleans(),
          index=st.integers(0, 200))
    def release_crashed(self, dead: int, by: int, flying: bool, index: int) -> None:
        """Worker `dead` died; its shared memory named a claim in flight (`flying`): any claim ever
        handed out, so a stale one or another owner's too, which must charge nothing."""
        owner = self.owners[dead]
        mine = [qid for qid, m in self.model.items() if m["status"] == "processing" and m["owner"] == owner]
        in_flight, charged = None, []
        if flying and self.handed:
            _, claim = self.pick(index)
            in_flight = InFlight(claim.id, claim.token, self.now)
            charged = [claim.id] if self.holds(claim) and claim.id in mine else []
        result = self.queues[by].release_crashed(owner, in_flight, "killed by SIGKILL", POISON_AFTER, self.now)
        poisoned = []
        for qid in charged:
            self.model[qid]["crash"] += 1
            if self.model[qid]["crash"] >= POISON_AFTER:
                poisoned.append(self.model[qid]["content_id"])
                self.model[qid].update(status="failed", owner=None, token=None, expires=None)
        assert sorted(result.in_flight) == sorted(self.model[q]["content_id"] for q in charged)
        assert sorted(result.poisoned) == sorted(poisoned)
        assert result.released == len(mine) - len(poisoned)
        for qid in mine:
            if self.model[qid]["status"] == "processing":
                self.to_pending(qid, self.model[qid]["not_before"])

    @rule(seconds=st.sampled_from([0.5, 2.0, 4.0, LEASE / 2, LEASE + 1]))
    def tick(self, seconds: float) -> None:
        self.now += seconds

    @rule(by=st.integers(0, WORKERS - 1), batch=st.integers(1, 8))
    def requeue_expired(self, by: int, batch: int) -> None:
        expired = [qid for qid, m in self.model.items() if m["status"] == "processing" and m["expires"] < self.now]
        assert self.queues[by].requeue_expired(self.now, batch_rows=batch) == len(expired)
        for qid in expired:
            self.to_pending(qid, self.model[qid]["not_before"])

    @precondition(lambda self: any(m["status"] == "failed" for m in self.model.values()))
    @rule(batch=st.integers(1, 8))
    def retry_failed(self, batch: int) -> None:
        """The operator's `kgsupervisor retry --failed`, in batches of `batch` rows."""
        failed = [qid for qid, m in self.model.items() if m["status"] == "failed"]
        assert self.queues[0].retry(failed=True, batch_rows=batch) == len(failed)
        for qid in failed:
            self.model[qid].update(status="pending", retry=0, crash=0, not_before=None)

    @rule(by=st.integers(0, WORKERS - 1), status=st.sampled_from(sorted(STATUSES)),
          how=st.sampled_from(["relabel", "delete and put back", "delete rolled back"]))
    def bulk_statement(self, by: int, status: str, how: str) -> None:
        """Another program's SQL moving every row of one status at once, then undoing it (so the
        model stays as it was): the counts must be exact after every statement, seen by the
        writer inside its transaction and by everyone after it."""
        conn = self.conns[by]
        if how == "relabel":
            for sql, params in (("UPDATE kg_processing_queue SET status = NULL WHERE status = ?", (status,)),
                                ("UPDATE kg_processing_queue SET status = ? WHERE status IS NULL", (status,))):
                conn.execute(sql, params)
                self.assert_counts_exact(by)
            return
        columns = ", ".join(COPIED_COLUMNS)
        rows = conn.execute(f"SELECT {columns} FROM kg_processing_queue WHERE status = ?", (status,)).fetchall()
        conn.execute("BEGIN")
        conn.execute("DELETE FROM kg_processing_queue WHERE status = ?", (status,))
        self.assert_counts_exact(by)
        if how == "delete and put back" and rows:
            conn.execute(f"INSERT INTO kg_processing_queue ({columns}) VALUES "
                         + ", ".join([f"({', '.join('?' * len(COPIED_COLUMNS))})"] * len(rows)),
                         [value for row in rows for value in row])
            self.assert_counts_exact(by)
        conn.execute("COMMIT" if how == "delete and put back" else "ROLLBACK")
        self.assert_counts_exact(by)

    def assert_counts_exact(self, by: int) -> None:
        """queue.counts() through connection `by` equals a GROUP BY through the same connection."""
        scanned = {status if status not in (None, "") else "(none)": n for status, n in self.conns[by].execute(
            "SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status").fetchall()}
        counted = self.queues[by].counts()
        assert {s: n for s, n in counted.items() if n and s != "total"} == scanned

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        if not hasattr(self, "conns"):
            return
        rows = self.conns[0].execute(
            "SELECT id, status, lease_owner, lease_token, lease_expires_at, retry_count, "
            "COALESCE(crash_count, 0), started_at IS NULL, not_before FROM kg_processing_queue").fetchall()
        assert len(rows) == ROWS, "row count changed"
        for qid, status, owner, token, expires, retry, crash, unmarked, not_before in rows:
            m = self.model[qid]
            assert status in STATUSES, (qid, status)
            if status == "processing":
                assert owner and token and expires is not None, (qid, owner, token, expires)
                assert self.token_owner[token] == owner, "one token held under two owners"
            else:
                assert owner is None and token is None and expires is None, (qid, status, owner, token)
            assert (status, owner, token, retry, crash, unmarked) == (
                m["status"], m["owner"], m["token"], m["retry"], m["crash"], True), (qid, m)
            if status == "processing":
                assert expires == pytest.approx(m["expires"])
            if status == "pending":
                assert not_before == m["not_before"] or not_before == pytest.approx(m["not_before"])

    @invariant()
    def counts_table_matches_a_scan(self) -> None:
        if not hasattr(self, "conns"):
            return
        scanned = dict(self.conns[1].execute(
            "SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status").fetchall())
        counted = self.queues[1].counts()
        assert {s: n for s, n in counted.items() if n and s != "total"} == scanned
        assert counted["total"] == ROWS

    @invariant()
    def completed_rows_are_final_and_written_once(self) -> None:
        if not hasattr(self, "conns"):
            return
        for qid in self.completed_ever:
            cid = self.model[qid]["content_id"]
            status = self.conns[1].execute("SELECT status FROM kg_processing_queue WHERE id = ?", (qid,)).fetchone()[0]
            assert status == "completed"
            entities = self.conns[1].execute("SELECT COUNT(*) FROM chunk_entities WHERE content_id = ?",
                                             (cid,)).fetchone()[0]
            processed = self.conns[1].execute("SELECT kg_processed, kg_document_id FROM crawled_content WHERE id = ?",
                                              (cid,)).fetchone()
            assert entities == 1 and processed == (1, f"doc-{qid}"), (qid, entities, processed)
        never = {m["content_id"] for q, m in self.model.items() if q not in self.completed_ever}
        if never:
            marks = ",".join("?" * len(never))
            assert self.conns[1].execute(f"SELECT COUNT(*) FROM chunk_entities WHERE content_id IN ({marks})",
                                         tuple(never)).fetchone()[0] == 0


QueueMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_queue_state_machine = QueueMachine.TestCase


# -- the same machine on PostgreSQL --------------------------------------------------------------

class PostgresQueueMachine(QueueMachine):
    """The same rules and invariants against a PostgreSQL database cloned from a template per
    example, so the two backends' semantics cannot drift apart."""

    def __init__(self, server, template: str) -> None:
        super().__init__()
        self.server = server
        self.template = template

    @initialize()
    def open_database(self) -> None:
        self.dbname = f"kgq_{uuid.uuid4().hex[:12]}"
        with closing(PGConnection(self.server.url())) as admin:
            admin.execute(f'CREATE DATABASE "{self.dbname}" TEMPLATE "{self.template}"')
        url = self.server.url(self.dbname)
        self.conns = [PGConnection(url) for _ in range(WORKERS)]
        self.queues = [queue_for(c) for c in self.conns]
        self.start_model()

    def teardown(self) -> None:
        for c in getattr(self, "conns", []):
            c.close()
        if hasattr(self, "dbname"):
            with closing(PGConnection(self.server.url())) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{self.dbname}" WITH (FORCE)')


def postgres_template(server) -> str:
    """A migrated PostgreSQL database with the same ROWS documents and queue rows as template_db()."""
    url = server.create_database("kgq_template")
    with closing(PGConnection(url)) as conn:
        migrate_pg(conn)
        ids = add_documents(conn, ROWS, chunks=2, seed=1)
        conn.executemany("INSERT INTO kg_processing_queue (content_id, priority, queued_at) "
                         "VALUES (?, ?, '2024-01-01')", [(cid, cid % 3) for cid in ids])
    return "kgq_template"


def test_queue_state_machine_on_postgresql(pg_server):
    template = postgres_template(pg_server)
    machines: list[PostgresQueueMachine] = []

    def machine() -> PostgresQueueMachine:
        machines.append(PostgresQueueMachine(pg_server, template))
        return machines[-1]

    run_state_machine_as_test(machine, settings=settings(max_examples=25, stateful_step_count=30, deadline=None,
                                                         suppress_health_check=[HealthCheck.too_slow]))
    ran = [m for m in machines if hasattr(m, "conns")]
    assert len(ran) >= 10 and all(isinstance(c, PGConnection) for m in ran for c in m.conns)
    assert not any(hasattr(m, "dir") for m in machines), "only the PostgreSQL database was opened"
