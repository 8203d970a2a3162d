"""The fault suite's harness: drain a queue through a real `kgsupervisor run`, then prove the invariants."""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import sqlite3
import time
from typing import Any

import requests

from kgsupervisor.store.postgres import PGConnection, is_postgres_url

from .. import oracle
from ..faultserver import Exchange, Journal
from ..processes import KGSUPERVISOR, Process, free_port, wait_for

FAST = {"KG_RETRY_BACKOFF": "0.05", "KG_RETRY_BACKOFF_MAX": "0.5", "KG_LEASE_SECONDS": "10",
        "KG_POLL_INTERVAL": "0.2", "KG_SERVICE_TIMEOUT": "10"}


# Set by the autouse fixture in tests/chaos/conftest.py: when the running scenario began.
TEST_CLOCK: dict[str, float] = {"started": 0.0}
# The running scenario's rows of docs/reliability.md: the chaos conftest writes them only once
# the whole test passed, every assertion after check_invariants() included.
RECORDED: list[Outcome] = []
# The running scenario's supervisors: the chaos conftest kills any still running at its end.
STARTED: list[Process] = []


@dataclasses.dataclass
class Outcome:
    """One scenario's row in docs/reliability.md."""

    scenario: str
    documents: int
    faults: str
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    failed: int = 0
    recover_seconds: float | None = None
    wall_seconds: float = 0.0
    exit_code: int | None = None
    notes: str = ""


class Supervisor:
    """`kgsupervisor run` as a real process in its own session, with a status endpoint on a free port."""

    def __init__(self, db_path: str, service_url: str, *args: str, env: dict[str, str] | None = None,
                 log_path: str | None = None) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        # `log_path` puts the log elsewhere than beside the database (a database on a full or
        # read-only filesystem must not take the log down with it).
        self.log_path = log_path or f"{db_path}.{time.monotonic_ns()}.log"
        self.proc = Process(KGSUPERVISOR + ["run", "--db", db_path, "--service-url", service_url,
                                            "--status-addr", self.addr, "--log-format", "json", *args],
                            self.log_path, env={**FAST, **(env or {})}, name="supervisor")
        STARTED.append(self.proc)
        self.started = time.monotonic()

    @property
    def stderr(self) -> str:
        """Its log so far (stdout and stderr)."""
        return self.proc.output

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict[str, Any] | None:
        try:
            return requests.get(f"http://{self.addr}/stats", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None

    def stats_counting(self, n: int, timeout: float = 10.0) -> dict[str, Any]:
        """/stats once it counts `n` documents completed or failed: the status snapshot is
        refreshed once a second, and a batch is counted just after its commit."""
        return wait_for(lambda: (lambda s: s if s and s["total_success"] + s["total_failed"] >= n else None)(
            self.stats()), timeout, interval=0.2, message=f"/stats to count all {n} documents")

    def health(self) -> dict[str, Any] | None:
        """The status endpoint's /health body (check_worker_health(): worker_details, restarts, ...)."""
        try:
            return requests.get(f"http://{self.addr}/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            return None

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(lambda: (self.stats() or {}).get("manager_running"), timeout, message="supervisor up")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal it and wait for the exit; returns the exit code (the log is kept). One still
        running after `timeout` seconds is killed with its group and fails the test."""
        self.proc.stop(sig, timeout)
        return self.proc.returncode

    def kill_tree(self) -> None:
        """SIGKILL its whole process group and reap it."""
        self.proc.kill()


def drain_until_empty(db_path: str, server: Any, *args: str, env: dict[str, str] | None = None,
                      timeout: float = 150) -> tuple[int, str]:
    """`run --exit-when-empty` against `server` until it exits by itself; its exit code and log.
    The server is closed afterwards, and a supervisor still running at the timeout is killed."""
    sup = Supervisor(db_path, server.url, *args, "--exit-when-empty", env=env)
    try:
        code = sup.proc.wait(timeout=timeout)
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    return code, sup.stderr


def check_invariants(target: str, ids: list[int], outcome: Outcome, journal: Journal, *,
                     queue_rows: int | None = None, poison: dict[int, str] | None = None) -> Outcome:
    """Every document completed exactly once in effect (or failed as poison, saying why, with no
    KG rows), nothing stuck, the queue row count unchanged; every request the service got (its
    `journal`) is the one the document's rows make, and every completed document holds exactly
    the rows of the last answer it was sent (tests/oracle.py, not the code under test).
    Fills the counts of `outcome`, asserts, and only then records it."""
    poison = poison or {}
    if not outcome.wall_seconds and TEST_CLOCK["started"]:
        outcome.wall_seconds = round(time.monotonic() - TEST_CLOCK["started"], 1)
    sent = journal.by_document()
    postgres = is_postgres_url(target)
    conn = oracle.connect(target)
    try:
        rows = conn.execute("SELECT content_id, status, error_message FROM kg_processing_queue").fetchall()
        by_doc = {cid: (status, error) for cid, status, error in rows}
        if queue_rows is not None:
            assert len(rows) == queue_rows, f"queue row count changed: {len(rows)} != {queue_rows}"
        outcome.stuck = sum(1 for _, status, _ in rows if status == "processing")
        outcome.failed = sum(1 for _, status, _ in rows if status == "failed")
        problems = wrong_requests(conn, sent) + history_problems(conn, poison)
        for cid in ids:
            status, error = by_doc.get(cid, (None, None))
            if cid in poison:
                assert status == "failed" and poison[cid] in (error or ""), (cid, status, error)
                if oracle.written_entity_rows(conn, cid) or oracle.written_relationship_rows(conn, cid):
                    problems.append(f"content_id {cid}: failed, yet it has KG rows")
                continue
            if status != "completed":
                outcome.lost += 1
                continue
            wrong = wrong_rows(conn, cid, sent.get(cid, []), postgres)
            if wrong:
                outcome.duplicated += 1
                problems.append(f"content_id {cid}: {wrong}")
    finally:
        conn.close()
    assert (outcome.lost, outcome.duplicated, outcome.stuck) == (0, 0, 0) and not problems, \
        f"{outcome}\n{len(problems)} problem(s):\n" + "\n".join(problems[:10])
    record(outcome)
    return outcome


# How a document that fails on purpose may end: failed (rejected, or out of attempts), a poison
# pill (worker deaths), or a queue row that could not be processed at all.
FAILED_FOR_GOOD = ("failed", "poison_pill", "bad_row")


def history_problems(conn: Any, poison: dict[int, str]) -> list[str]:
    """What the attempt history gets wrong: an attempt of no queue row, a claim recorded twice,
    a completed row whose last attempt is not `completed`, a document failed on purpose whose
    last attempt is no failure for good (`poison_pill` for a poison pill)."""
    statuses = {qid: (cid, status) for qid, cid, status in
                conn.execute("SELECT id, content_id, status FROM kg_processing_queue").fetchall()}
    attempts = conn.execute("SELECT queue_id, claim_key, outcome FROM kg_processing_attempts "
                            "ORDER BY id").fetchall()
    problems = [f"attempt of queue row {qid} ({outcome}): no such queue row"
                for qid, _, outcome in attempts if qid not in statuses]
    claims = collections.Counter(key for _, key, _ in attempts)
    problems += [f"claim {key} recorded {n} times" for key, n in sorted(claims.items()) if n > 1]
    last = {qid: outcome for qid, _, outcome in attempts}  # ordered by id: the last one stays
    for qid, (cid, status) in statuses.items():
        if status == "completed":
            wanted: tuple[str, ...] = ("completed",)
        elif cid in poison and status == "failed":
            wanted = ("poison_pill",) if "poison pill" in poison[cid] else FAILED_FOR_GOOD
        else:
            continue
        if last.get(qid) not in wanted:
            problems.append(f"queue row {qid} (content_id {cid}) is {status}, yet its last attempt is "
                            f"{last.get(qid) or 'missing'}, not {' or '.join(wanted)}")
    return problems


def wrong_requests(conn: Any, sent: dict[Any, list[Exchange]]) -> list[str]:
    """Every request that is not the one its document's rows make, one line a document."""
    problems = []
    for cid, exchanges in sent.items():
        want = oracle.expected_request(conn, cid) if type(cid) is int else None
        for exchange in exchanges:
            if want is None:
                problems.append(f"request {exchange.seq} for content_id {cid!r}: nothing to send for it, yet sent")
                break
            wrong = oracle.first_difference(want, exchange.payload)
            if wrong:
                problems.append(f"content_id {cid}: request {exchange.seq}: {wrong}")
                break
    return problems


def wrong_rows(conn: Any, cid: int, exchanges: list[Exchange], postgres: bool) -> str | None:
    """How a completed document's KG rows differ from those of the answer it was sent last, if they do."""
    answer = oracle.written_answer(exchanges)
    if answer is None:
        return f"completed without a whole 200 answer ({len(exchanges)} request(s))"
    entities = oracle.written_entity_rows(conn, cid)
    chunks = dict(conn.execute(oracle.WRITTEN_CHUNKS_SQL, (cid,)).fetchall())
    document = [tuple(r) for r in conn.execute(oracle.WRITTEN_DOCUMENT_SQL, (cid,))]
    foreign = sorted({row[0] for row in entities} - set(chunks))
    differences = {
        "chunk_entities": oracle.rows_difference(oracle.entity_rows(answer, cid, postgres), entities),
        "chunk_relationships": oracle.rows_difference(oracle.relationship_rows(answer, cid, postgres),
                                                      oracle.written_relationship_rows(conn, cid)),
        "crawled_content": oracle.rows_difference([oracle.document_columns(answer)], document),
        "content_chunks.kg_processed": oracle.rows_difference([(rowid, 1) for rowid in chunks], list(chunks.items())),
        "created_at": "rows without it" if conn.execute(oracle.UNSTAMPED_ROWS_SQL, (cid, cid)).fetchone()[0] else None,
        "chunk_rowid": f"{foreign[:5]} are not chunks of the document" if foreign else None,
    }
    return " | ".join(f"{what}: {wrong}" for what, wrong in differences.items() if wrong) or None


def record(outcome: Outcome) -> None:
    """Keep `outcome` as a row of docs/reliability.md; tests/chaos/conftest.py writes it once
    the whole test has passed (write_recorded)."""
    RECORDED.append(outcome)


def write_recorded(passed: bool) -> None:
    """Append the rows the test recorded to $KG_RELIABILITY_RESULTS (JSON lines) when the report
    is being made and the test passed; forget them either way."""
    path = os.environ.get("KG_RELIABILITY_RESULTS")
    if path and passed and RECORDED:
        with open(path, "a") as f:
            for outcome in RECORDED:
                f.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
    RECORDED.clear()


def record_hostile(given: str, outcome: str, charged: str) -> None:
    """One row of docs/reliability.md's hostile input table: what was given, what became of it,
    and whether a document was charged an attempt. Call it after the case's assertions passed."""
    path = os.environ.get("KG_RELIABILITY_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"kind": "hostile", "input": given, "outcome": outcome, "charged": charged}) + "\n")


def queue_done(db_path: str, total: int) -> bool:
    """Every row has reached an end state (completed or failed)."""
    conn = PGConnection(db_path) if is_postgres_url(db_path) else sqlite3.connect(db_path, timeout=30)
    try:
        n = conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status IN ('completed', 'failed')").fetchone()[0]
    finally:
        conn.close()
    return n == total


def log_messages(text: str) -> list[str]:
    """The messages of a `--log-format json` log (lines that are not JSON are kept whole)."""
    messages = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            messages.append(line)
            continue
        if not isinstance(entry, dict):
            messages.append(line)
            continue
        message = str(entry.get("message", line))
        if entry.get("exception"):
            message += "\n" + str(entry["exception"])
        messages.append(message)
    return messages


def worker_deaths(text: str) -> list[str]:
    """Log lines saying a worker died: killed by a signal, or exited with a status other than 0."""
    return [m for m in log_messages(text)
            if "killed by" in m or ("exited with status" in m and "exited with status 0" not in m)
            or "Traceback" in m]


def scalar(conn: sqlite3.Connection, sql: str, *args) -> int:
    """One number from the database."""
    return conn.execute(sql, args).fetchone()[0]


def completed(conn: sqlite3.Connection) -> int:
    return scalar(conn, "SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'")
