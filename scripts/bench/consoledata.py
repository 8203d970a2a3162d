"""The operator console's benchmark database: N documents and N queue rows on SQLite or PostgreSQL,
made in a few INSERT ... SELECT statements (seconds, not a drain): ~1% failed with varied messages
and error classes, a pending backlog, a few processing, an attempt history whose last hours are
busy, a few documents with a rare url and a few failures with a rare error text."""
from __future__ import annotations

import time
from contextlib import closing
from typing import Any

from kgsupervisor.store.backend import backend_name, connect_to, init_database
from kgsupervisor.store.hosts import HostRow, iso_time, upsert_host, upsert_workers

RARE_EVERY = 100_000          # one row in this many has the rare url, one failed row the rare error
RARE_URL = "needle-xyz"
RARE_URLS = (12307, 12345, 99999)  # ids % RARE_EVERY with RARE_URL: failed, completed, pending (the backlog)
RARE_ERROR = "certificate verify failed"
PROCESSING = 16               # rows a worker holds, at the bottom of the backlog
RECENT_GAP = 0.12             # seconds between completed attempts of the busy hours (~8 documents/s)
CHUNKED = 20_000              # the first documents have 3 chunks each (the document page shows them)
AUDIT_ROWS = 500
FAILED_ID = 10_007            # a failed document with chunks and 3 attempts: the document page shown

# Failed rows (id % 100 = 7): the queue's message and the newest attempt's error class, by id % 7.
FAILURES = {
    0: ("gave up after 3 attempts: KG service error 500: {\"detail\": \"boom ' || i || '\"}", "http_500"),
    1: ("gave up after 3 attempts: KG service did not answer within 30s", "timeout"),
    2: ("KG service rejected the document (422): bad chunk ' || (i % 13) || '", "http_422"),
    3: ("gave up after 3 attempts: invalid answer: answer is not JSON: <html>' || i || '", "invalid_answer"),
    4: ("poison pill: a worker died 3 times while processing this document (last: SIGKILL); not retried",
        "poison_pill"),
    5: ("content_id ' || i || ' has no chunks in content_chunks", "bad_row"),
    6: ("gave up after 3 attempts: KG service error 503: overloaded", "http_503"),
}
RARE_FAILURE = (f"gave up after 3 attempts: cannot reach the KG service: SSL: {RARE_ERROR} (' || i || ')",
                "connection")
ENDPOINT = ("CASE {} % 3 WHEN 0 THEN 'http://kg-a.internal:8088' WHEN 1 THEN 'http://kg-b.internal:8088' "
            "ELSE 'http://kg-c.internal:8088' END")


def stamp(backend: str, seconds: str) -> str:
    """SQL of the upstream's DATETIME text (UTC `YYYY-MM-DD HH:MM:SS`) of unix `seconds`."""
    if backend == "postgresql":
        return f"to_char(to_timestamp({seconds}) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS')"
    return f"datetime({seconds}, 'unixepoch')"


def numbers(conn: Any, backend: str, n: int) -> None:
    """A temporary table bench_n(i) of 1..n, the rows every statement below is made from."""
    if backend == "postgresql":
        conn.execute(f"CREATE TEMP TABLE bench_n AS SELECT i FROM generate_series(1, {n}) AS s(i)")
    else:
        conn.execute(f"CREATE TEMP TABLE bench_n AS WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 "
                     f"FROM s WHERE i < {n}) SELECT i FROM s")


def status_of(n: int) -> str:
    """The status of queue row i: ~1% failed, 0.5% skipped, the newest 13% a pending backlog with
    PROCESSING rows at its bottom, the rest completed."""
    backlog = int(n * 0.87)
    return (f"CASE WHEN i % 100 = 7 THEN 'failed' WHEN i > {backlog} AND i <= {backlog + PROCESSING} "
            f"THEN 'processing' WHEN i > {backlog} THEN 'pending' WHEN i % 200 = 3 THEN 'skipped' "
            "ELSE 'completed' END")


def failure_case(column: int, row_id: str = "i") -> str:
    """SQL of a failed row's message (column 0) or error class (column 1), from its id."""
    whens = " ".join(f"WHEN {k} THEN '{v[column]}'" for k, v in FAILURES.items())
    return (f"CASE WHEN {row_id} % {RARE_EVERY} = 50007 THEN '{RARE_FAILURE[column]}' "
            f"ELSE CASE {row_id} % 7 {whens} END END")


def add_documents(conn: Any, n: int) -> None:
    """n documents; 3 of every RARE_EVERY have RARE_URL in their url."""
    conn.execute(
        "INSERT INTO crawled_content (id, url, title, kg_processed) SELECT i, 'https://news.example.org/' || "
        "CASE i % 5 WHEN 0 THEN 'graph-databases' WHEN 1 THEN 'entity-linking' WHEN 2 THEN 'vector-search' "
        "WHEN 3 THEN 'knowledge-graphs' ELSE 'language-models' END || "
        f"CASE WHEN i % {RARE_EVERY} IN {RARE_URLS} THEN '/{RARE_URL}' ELSE '' END || '/' || i, "
        "'Notes from Geneva number ' || i, CASE WHEN i % 100 = 7 THEN 0 ELSE 1 END FROM bench_n")
    conn.execute("INSERT INTO content_chunks (content_id, chunk_index, chunk_text, char_start, char_end, "
                 f"word_count) SELECT (i - 1) / 3 + 1, (i - 1) % 3, 'chunk text', 0, 10, 2 FROM bench_n "
                 f"WHERE i <= {3 * min(CHUNKED, n)}")


def add_queue(conn: Any, backend: str, n: int, base: float) -> None:
    """One queue row a document, queued 0.5 s apart up to two hours ago."""
    finished = "CASE WHEN st IN ('completed', 'failed', 'skipped') THEN {} END".format(
        stamp(backend, f"{base} + i * 0.5 + 60"))
    conn.execute(
        "INSERT INTO kg_processing_queue (id, content_id, status, priority, queued_at, processed_at, "
        f"retry_count, error_message) SELECT i, i, st, 1, {stamp(backend, f'{base} + i * 0.5')}, {finished}, "
        f"CASE WHEN st = 'failed' THEN 3 ELSE 0 END, CASE WHEN st = 'failed' THEN {failure_case(0)} END "
        f"FROM (SELECT i, {status_of(n)} AS st FROM bench_n) AS s")


def add_attempts(conn: Any, n: int, base: float, now: float) -> None:
    """3 attempts of each failed row (its error class on each), and one of every completed row of
    the newest 30% before the backlog, finished RECENT_GAP apart up to now (the busy hours)."""
    failed_class = failure_case(1, "q.id")
    columns = ("INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, owner, worker, "
               "endpoint, claimed_at, sent_at, finished_at, duration, outcome, http_status, ")
    conn.execute(
        f"{columns}error_class, error_message) SELECT q.id, q.content_id, a.i, 'tok-' || q.id || '/' || a.i, "
        f"'web-1:42', 1, {ENDPOINT.format('(q.id + a.i)')}, {base} + q.id * 0.5 + a.i, "
        f"{base} + q.id * 0.5 + a.i, {base} + q.id * 0.5 + a.i + 1, 1.0, CASE WHEN a.i < 3 THEN 'retried' "
        f"ELSE 'failed' END, 500, {failed_class}, 'KG service error' FROM kg_processing_queue q, "
        "(SELECT 1 AS i UNION ALL SELECT 2 UNION ALL SELECT 3) AS a "
        "WHERE q.status = 'failed' ORDER BY q.id, a.i")
    backlog, first = int(n * 0.87), int(n * 0.57)
    done = f"{now} - ({backlog} - q.id) * {RECENT_GAP}"
    conn.execute(
        f"{columns}entities, relationships) SELECT q.id, q.content_id, 1, 'tok-' || q.id, 'web-1:42', 1, "
        f"{ENDPOINT.format('q.id')}, {done} - 1, {done} - 1, {done}, 1.0, 'completed', 200, 5, 3 "
        f"FROM kg_processing_queue q WHERE q.id > {first} AND q.id < {backlog} AND q.status = 'completed' "
        "ORDER BY q.id")


def worker(k: int, now: float) -> dict:
    """One busy worker as a supervisor writes it beside its registry row."""
    return {"worker_id": k, "pid": 1000 + k, "state": "busy", "running": True,
            "current_content_id": 870000 + k, "held_seconds": 0.4, "rss_bytes": 60 << 20,
            "started_at": iso_time(now - 3600), "restarts": 0}


def add_hosts_and_audit(conn: Any, now: float) -> None:
    """Three supervisors of 4 workers beating now, and AUDIT_ROWS past actions (the audit page
    shows 200)."""
    for k, host in enumerate(("web-1", "web-2", "web-3")):
        upsert_host(conn, HostRow(host, 42 + k, now - 86400, now - 1, 4, 4, "0.1.0", None, "running"))
        upsert_workers(conn, host, 42 + k, [worker(w, now) for w in range(1, 5)], now - 1)
    conn.execute("INSERT INTO kg_supervisor_audit (at, who, action, detail, rows) SELECT "
                 f"{now} - i * 600, 'alice@127.0.0.1', 'retry-matching', 'status=failed error=timeout "
                 f"upto_id=' || i, i % 40 FROM bench_n WHERE i <= {AUDIT_ROWS}")


def build(target: str, n: int) -> dict:
    """A fresh database by init-db at `target` (SQLite path or PostgreSQL URL) holding the queue
    above; PostgreSQL then VACUUM ANALYZEd as autovacuum would leave it, SQLite without ANALYZE
    as init-db leaves it. Returns how long it took and the queue's counts."""
    started, now = time.monotonic(), time.time()
    init_database(target)
    backend = backend_name(target)
    with closing(connect_to(target)) as conn:
        conn.execute("BEGIN")
        numbers(conn, backend, n)
        add_documents(conn, n)
        add_queue(conn, backend, n, now - n * 0.5 - 7200)
        add_attempts(conn, n, now - n * 0.5 - 7200, now)
        add_hosts_and_audit(conn, now)
        conn.execute("COMMIT")
        if backend == "postgresql":
            conn.execute("VACUUM ANALYZE")
        else:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = dict(conn.execute("SELECT status, SUM(n) FROM kg_queue_status_counts "
                                   "GROUP BY status").fetchall())
        attempts = conn.execute("SELECT COUNT(*) FROM kg_processing_attempts").fetchone()[0]
    return {"build_s": time.monotonic() - started, "counts": {k: int(v) for k, v in counts.items() if v},
            "attempts": attempts, "built_at": now}
