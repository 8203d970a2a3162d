"""The PostgreSQL backend through the command line and the schema, on a throwaway real server."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest

from kgsupervisor.pgdb import PGConnection, redact
from kgsupervisor.pgschema import migrate_pg
from kgsupervisor.sampledata import add_documents

from .conftest import status_counts

pytestmark = pytest.mark.timeout(90)


def kg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgsupervisor", *args], capture_output=True, text=True, timeout=60)


def test_init_db_enqueue_queue_retry_on_a_postgresql_url(pg_server):
    url = pg_server.create_database("cli")
    first = kg("init-db", "--db", url)
    assert first.returncode == 0, first.stderr
    assert "created table kg_processing_queue" in first.stdout and "created kg_queue_status_counts" in first.stdout
    again = kg("init-db", "--db", url)
    assert again.returncode == 0 and "schema up to date (0 change(s))" in again.stdout
    conn = PGConnection(url)
    try:
        ids = add_documents(conn, 4, seed=1)
        out = kg("enqueue", "--db", url, *map(str, ids[:3]), "999")
        assert out.returncode == 1 and "queued 3 document(s)" in out.stdout and "999" in out.stderr
        assert kg("enqueue", "--db", url, "--all-unprocessed").stdout.startswith("queued 1 unprocessed")
        counts = json.loads(kg("queue", "--db", url, "--json").stdout)
        assert counts["pending"] == 4 and counts["total"] == 4
        conn.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE content_id = ?", (ids[0],))
        assert kg("retry", "--db", url, "--failed").stdout.strip() == "1 row(s) back to pending"
        assert status_counts(conn) == {"pending": 4}
    finally:
        conn.close()


def test_an_unreachable_or_unmigrated_postgresql_is_one_line_and_the_password_is_never_shown(pg_server):
    url = f"postgresql://kg:s3cret@127.0.0.1:{pg_server.port + 1}/nowhere"
    out = kg("queue", "--db", url)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "cannot connect to PostgreSQL at postgresql://kg:***@127.0.0.1" in out.stderr and "s3cret" not in out.stderr
    empty = pg_server.create_database("empty")
    out = kg("queue", "--db", empty)
    assert out.returncode != 0 and "has no kg_processing_queue table (run: kgsupervisor init-db" in out.stderr
    assert out.stderr.count("\n") == 1


def test_worker_once_on_a_postgresql_url_and_the_password_masked_in_print_config(pg_server, kg_service):
    url = pg_server.create_database("worker")
    assert kg("init-db", "--db", url).returncode == 0
    conn = PGConnection(url)
    try:
        ids = add_documents(conn, 3, seed=2)
        assert kg("enqueue", "--db", url, *map(str, ids)).returncode == 0
        out = kg("worker", "--db", url, "--service-url", kg_service, "--once")
        assert out.returncode == 0, out.stderr
        assert status_counts(conn) == {"completed": 3}
        assert conn.execute("SELECT MIN(kg_entity_count) FROM crawled_content").fetchone()[0] > 0
    finally:
        conn.close()
    secret = url.replace("postgres@", "postgres:hunter2@")
    out = kg("run", "--db", secret, "--print-config")
    assert out.returncode == 0 and "postgres:***@" in out.stdout and "hunter2" not in out.stdout


def test_two_init_db_at_once_make_one_schema(pg_server):
    url = pg_server.create_database("race")
    results: list[list[str]] = []

    def migrate() -> None:
        conn = PGConnection(url)
        try:
            results.append(migrate_pg(conn))
        finally:
            conn.close()

    threads = [threading.Thread(target=migrate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(len(r) > 0 for r in results) == [False, False, True], "one did it, the others found it done"


def test_redact_hides_only_the_password():
    assert redact("postgresql://kg:pw@db:5432/crawl") == "postgresql://kg:***@db:5432/crawl"
    assert redact("postgresql://kg@db/crawl") == "postgresql://kg@db/crawl"


def sqlite_database_with_history(tmp_path) -> tuple[str, list[int]]:
    """An SQLite database as a running pipeline leaves it: done, failed, pending and claimed
    rows, KG rows written back, and text that is not valid UTF-8."""
    from kgsupervisor.db import connect
    from kgsupervisor.schema import init_db
    path = str(tmp_path / "crawl.db")
    init_db(path)
    conn = connect(path)
    try:
        ids = add_documents(conn, 40, seed=3)
        conn.executemany("INSERT INTO kg_processing_queue (content_id, status) VALUES (?, ?)",
                         [(cid, ("completed", "failed", "pending", "processing")[i % 4]) for i, cid in enumerate(ids)])
        conn.execute("INSERT INTO chunk_entities (chunk_rowid, content_id, entity_text) VALUES (1, ?, 'Ada')", (ids[0],))
        conn.execute("UPDATE crawled_content SET markdown = CAST(X'41FF42' AS TEXT) WHERE id = ?", (ids[1],))
    finally:
        conn.close()
    return path, ids


def test_copy_db_moves_everything_verifies_counts_and_resumes_after_an_interruption(pg_server, tmp_path):
    from kgsupervisor.copydb import copy_database
    source, ids = sqlite_database_with_history(tmp_path)
    url = pg_server.create_database("copy")

    def crash_after_first_batch(table: str, done: int, total: int) -> None:
        if table == "content_chunks":
            raise KeyboardInterrupt  # as Ctrl-C or a kill would, half-way through a table

    with pytest.raises(KeyboardInterrupt):
        copy_database(source, url, batch_rows=25, progress=crash_after_first_batch)
    out = kg("copy-db", "--from", source, "--to", url, "--batch-rows", "25")
    assert out.returncode == 0, out.stderr
    assert "crawled_content" in out.stdout and "40 already there" in out.stdout, out.stdout
    assert "10 claim(s) that were processing" in out.stdout and "verified" in out.stdout
    conn = PGConnection(url)
    try:
        assert status_counts(conn) == {"completed": 10, "failed": 10, "pending": 20}
        assert conn.execute("SELECT COUNT(*) FROM content_chunks").fetchone()[0] == 120
        assert conn.execute("SELECT markdown FROM crawled_content WHERE id = ?", (ids[1],)).fetchone()[0] == "A\ufffdB"
        new = add_documents(conn, 1, seed=9)  # keys go on after the copied ones
        assert new == [max(ids) + 1]
        conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (new[0],))
    finally:
        conn.close()
    again = kg("copy-db", "--from", source, "--to", url)
    assert again.returncode != 0 and "copy not verified: crawled_content has 40 row(s)" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr
