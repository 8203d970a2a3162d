"""The PostgreSQL backend through the command line and the schema, on a throwaway real server."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing

import psycopg
import pytest

from kgsupervisor.masking import redact
from kgsupervisor.store.pgschema import migrate_pg
from kgsupervisor.store.postgres import PGConnection
from scripts.sampledata import add_documents

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
    from kgsupervisor.store.schema import init_db
    from kgsupervisor.store.sqlite import connect
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
    from kgsupervisor.store.copydb import copy_database
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


UPSTREAM_COLUMNS_COPIED = {
    "crawled_content": "id, url, title, content, markdown, content_hash, timestamp, added_by_session, "
                       "retention_policy, tags, metadata, kg_processed, kg_entity_count, kg_relationship_count, "
                       "kg_document_id, kg_processed_at",
    "content_chunks": "rowid, content_id, chunk_index, chunk_text, char_start, char_end, word_count, "
                      "kg_processed, created_at",
    "chunk_entities": "id, chunk_rowid, content_id, entity_text, entity_normalized, entity_type_primary, "
                      "entity_type_sub1, entity_type_sub2, entity_type_sub3, confidence, offset_start, offset_end, "
                      "neo4j_node_id, spans_multiple_chunks, created_at",
    "chunk_relationships": "id, content_id, subject_entity, predicate, object_entity, confidence, context, "
                           "neo4j_relationship_id, spans_chunks, chunk_rowids, created_at",
}


def source_files(path: str) -> dict[str, str | None]:
    """The digest of the database and of its -wal and -shm (None: no such file)."""
    from .upstream import sha256_of
    return {suffix: sha256_of(path + suffix) for suffix in ("", "-wal", "-shm")}


def sqlite_script(path: str, script: str) -> None:
    """Run `script` on the SQLite file `path` with a plain connection, as another program would."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(script)


def same_rows(source: str, conn: PGConnection, table: str, columns: str) -> bool:
    with closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src:
        want = src.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()
    have = conn.execute(f"SELECT {columns} FROM {table} ORDER BY 1").fetchall()
    return [tuple(r) for r in have] == want and len(want) > 0


def test_copy_db_reads_an_untouched_upstream_database_and_leaves_it_byte_identical(pg_server, tmp_path):
    from .upstream import make_upstream_database
    source = str(tmp_path / "crawl.db")
    make_upstream_database(source, pages=5)
    before = source_files(source)
    assert before["-wal"] is None and before["-shm"] is None
    url = pg_server.create_database("untouched")
    out = kg("copy-db", "--from", source, "--to", url)
    assert out.returncode == 0, out.stderr
    assert "1 claim(s) that were processing" in out.stdout and "not copied" not in out.stdout, out.stdout
    assert source_files(source) == before, "the source is read, never written (no -wal or -shm either)"
    conn = PGConnection(url)
    try:
        for table, columns in UPSTREAM_COLUMNS_COPIED.items():
            assert same_rows(source, conn, table, columns), table
        queue = conn.execute("SELECT content_id, status, lease_owner, lease_token, crash_count, not_before "
                             "FROM kg_processing_queue ORDER BY id").fetchall()
        assert [tuple(r) for r in queue] == [(1, "completed", None, None, None, None), (2, "failed", None, None, None, None),
                                             (3, "pending", None, None, None, None), (4, "pending", None, None, None, None),
                                             (5, "skipped", None, None, None, None)]
        assert status_counts(conn) == {"completed": 1, "failed": 1, "pending": 2, "skipped": 1}
    finally:
        conn.close()


def test_copy_db_of_a_crawler_database_without_the_kg_migration_gives_the_kg_columns_their_defaults(
        pg_server, tmp_path):
    from .upstream import make_upstream_database
    source = str(tmp_path / "crawl.db")
    make_upstream_database(source, kg_migration=False, pages=3)
    # A newer crawler's column, unknown to CONTRACT §2.
    sqlite_script(source, "ALTER TABLE crawled_content ADD COLUMN language TEXT DEFAULT 'en'")
    before = source_files(source)
    url = pg_server.create_database("bare")
    out = kg("copy-db", "--from", source, "--to", url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "crawled_content              3 row(s): 3 copied, 0 already there" in lines, lines
    assert "crawled_content      not copied (PostgreSQL has no such column): language" in lines, lines
    assert "kg_processing_queue          0 row(s): 0 copied, 0 already there" in lines, lines
    assert source_files(source) == before
    conn = PGConnection(url)
    try:
        crawler_columns = "id, url, title, content, markdown, content_hash, timestamp, added_by_session, " \
                          "retention_policy, tags, metadata"
        assert same_rows(source, conn, "crawled_content", crawler_columns)
        kg_columns = conn.execute("SELECT kg_processed, kg_entity_count, kg_relationship_count, kg_document_id, "
                                  "kg_processed_at FROM crawled_content").fetchall()
        assert [tuple(r) for r in kg_columns] == [(0, 0, 0, None, None)] * 3
        assert conn.execute("SELECT COUNT(*) FROM content_chunks").fetchone()[0] == 0
    finally:
        conn.close()


def test_copy_db_reads_a_wal_database_whose_writer_is_still_open_without_writing_to_it(pg_server, tmp_path):
    """Commits still in the -wal (the writer has not checkpointed them) are copied; the database
    and its -wal stay byte for byte as they were."""
    from .upstream import CRAWLER_INSERT, make_upstream_database, page
    source = str(tmp_path / "crawl.db")
    make_upstream_database(source, pages=2)
    writer = sqlite3.connect(source, isolation_level=None)
    try:
        writer.execute("PRAGMA journal_mode = WAL")
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        writer.execute(CRAWLER_INSERT, page(3))
        before = source_files(source)
        assert before["-wal"] is not None
        url = pg_server.create_database("wal")
        out = kg("copy-db", "--from", source, "--to", url)
        assert out.returncode == 0, out.stderr
        after = source_files(source)
        assert (after[""], after["-wal"]) == (before[""], before["-wal"])
    finally:
        writer.close()
    conn = PGConnection(url)
    try:
        assert conn.execute("SELECT url FROM crawled_content ORDER BY id").fetchall()[-1][0] == page(3)[0]
    finally:
        conn.close()


def test_copy_db_refusals_are_one_line(pg_server, tmp_path):
    other = str(tmp_path / "other.db")
    sqlite_script(other, "CREATE TABLE notes (x)")
    url = pg_server.create_database("refusals")
    out = kg("copy-db", "--from", other, "--to", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "has no crawled_content table: not a crawl database" in out.stderr
    # A database an older kgsupervisor made: its url could be NULL, which the crawler's schema refuses.
    old = str(tmp_path / "old.db")
    sqlite_script(old, "CREATE TABLE crawled_content (id INTEGER PRIMARY KEY, url TEXT, title TEXT, markdown TEXT);"
                       "INSERT INTO crawled_content VALUES (1, 'https://a.example/', 'A', 'a'), (2, NULL, 'B', 'b');")
    out = kg("copy-db", "--from", old, "--to", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert 'PostgreSQL refused the rows of crawled_content with id > 0: null value in column "url"' in out.stderr


def test_a_new_postgresql_schema_has_the_crawlers_constraints_and_every_upstream_column(pg_server):
    from kgsupervisor.store.pgschema import PG_COLUMNS
    from kgsupervisor.store.schema import UPSTREAM_COLUMNS
    assert {t: list(c) for t, c in PG_COLUMNS.items()} == {t: list(c) for t, c in UPSTREAM_COLUMNS.items()}
    url = pg_server.create_database("fresh")
    conn = PGConnection(url)
    try:
        migrate_pg(conn)
        conn.execute("INSERT INTO crawled_content (url, title) VALUES ('https://a.example/', 'A')")
        row = conn.execute("SELECT retention_policy, timestamp IS NOT NULL, kg_processed, kg_entity_count "
                           "FROM crawled_content").fetchone()
        assert tuple(row) == ("permanent", True, 0, 0)
        with pytest.raises(psycopg.errors.NotNullViolation):
            conn.execute("INSERT INTO crawled_content (title) VALUES ('no url')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO crawled_content (url) VALUES ('https://a.example/')")
    finally:
        conn.close()


def test_init_db_on_a_postgresql_schema_an_older_version_made_adds_what_it_lacks(pg_server):
    url = pg_server.create_database("older")
    conn = PGConnection(url)
    try:
        migrate_pg(conn)
        conn.execute("INSERT INTO crawled_content (id, url) VALUES (1, 'https://a.example/')")
        for column in ("content", "timestamp", "tags"):
            conn.execute(f"ALTER TABLE crawled_content DROP COLUMN {column}")
    finally:
        conn.close()
    out = kg("queue", "--db", url)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "needs migrating: crawled_content lacks tags (run: kgsupervisor init-db --db URL)" in out.stderr
    out = kg("init-db", "--db", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:3] == ["added column crawled_content.content", "added column crawled_content.timestamp",
                                           "added column crawled_content.tags"]
    conn = PGConnection(url)
    try:
        # The old row's time is not known; new rows get one.
        conn.execute("INSERT INTO crawled_content (id, url) VALUES (2, 'https://b.example/')")
        stamps = conn.execute("SELECT id, timestamp IS NULL FROM crawled_content ORDER BY id").fetchall()
        assert [tuple(r) for r in stamps] == [(1, True), (2, False)]
    finally:
        conn.close()
