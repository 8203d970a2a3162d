"""init-db creates the upstream schema, migrates an upstream database losslessly, and indexes the claim."""
from __future__ import annotations

import sqlite3
import time

import pytest

from kgsupervisor.errors import DatabaseError
from kgsupervisor.queue.leased import NO_STATUS, SQLiteQueue
from kgsupervisor.store.owntables import OWN_TABLES
from kgsupervisor.store.schema import CLAIMABLE, QUEUE_COLUMNS, check_schema, init_db
from kgsupervisor.store.sqlite import connect

pytestmark = pytest.mark.timeout(60)

# The upstream migration as the pipeline ran it: its own index names, rows already in it.
UPSTREAM_DDL = """
CREATE TABLE crawled_content (id INTEGER PRIMARY KEY, url TEXT UNIQUE, title TEXT, markdown TEXT,
    metadata TEXT, tags TEXT, created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    kg_processed BOOLEAN DEFAULT 0, kg_entity_count INTEGER DEFAULT 0,
    kg_relationship_count INTEGER DEFAULT 0, kg_document_id TEXT, kg_processed_at DATETIME);
CREATE TABLE content_chunks (rowid INTEGER PRIMARY KEY, content_id INTEGER, chunk_index INTEGER,
    chunk_text TEXT, char_start INTEGER, char_end INTEGER, word_count INTEGER,
    kg_processed BOOLEAN DEFAULT 0, created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE chunk_entities (id INTEGER PRIMARY KEY AUTOINCREMENT, chunk_rowid INTEGER,
    content_id INTEGER, entity_text TEXT, entity_normalized TEXT, entity_type_primary TEXT,
    entity_type_sub1 TEXT, entity_type_sub2 TEXT, entity_type_sub3 TEXT, confidence REAL,
    offset_start INTEGER, offset_end INTEGER, neo4j_node_id TEXT, spans_multiple_chunks BOOLEAN,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE chunk_relationships (id INTEGER PRIMARY KEY AUTOINCREMENT, content_id INTEGER,
    subject_entity TEXT, predicate TEXT, object_entity TEXT, confidence REAL, context TEXT,
    neo4j_relationship_id TEXT, spans_chunks BOOLEAN, chunk_rowids TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP);
CREATE TABLE kg_processing_queue (id INTEGER PRIMARY KEY AUTOINCREMENT, content_id INTEGER,
    status TEXT DEFAULT 'pending', priority INTEGER DEFAULT 1,
    queued_at DATETIME DEFAULT CURRENT_TIMESTAMP, processing_started_at DATETIME,
    processed_at DATETIME, retry_count INTEGER DEFAULT 0, error_message TEXT,
    result_summary TEXT, skipped_reason TEXT);
CREATE INDEX idx_crawled_kg ON crawled_content(kg_processed, kg_processed_at);
CREATE INDEX idx_chunks_content ON content_chunks(content_id);
CREATE INDEX idx_chunks_span ON content_chunks(char_start, char_end);
CREATE INDEX idx_chunks_kg ON content_chunks(kg_processed);
CREATE INDEX idx_ent_chunk ON chunk_entities(chunk_rowid);
CREATE INDEX idx_ent_text ON chunk_entities(entity_text);
CREATE INDEX idx_ent_type ON chunk_entities(entity_type_primary, entity_type_sub1);
CREATE INDEX idx_ent_content ON chunk_entities(content_id);
CREATE INDEX idx_ent_neo ON chunk_entities(neo4j_node_id);
CREATE INDEX idx_ent_norm ON chunk_entities(entity_normalized);
CREATE INDEX idx_rel_content ON chunk_relationships(content_id);
CREATE INDEX idx_rel_subj ON chunk_relationships(subject_entity);
CREATE INDEX idx_rel_obj ON chunk_relationships(object_entity);
CREATE INDEX idx_rel_pred ON chunk_relationships(predicate);
CREATE INDEX idx_queue_status ON kg_processing_queue(status, priority, queued_at);
CREATE INDEX idx_queue_content ON kg_processing_queue(content_id);
INSERT INTO crawled_content (id, url, title, markdown, metadata, tags, kg_processed)
    VALUES (1, 'https://a.example/1', 'One', '# One', '{"k": 1}', 'x,y', 1),
           (2, 'https://a.example/2', 'Two', '# Two', NULL, NULL, 0);
INSERT INTO content_chunks (rowid, content_id, chunk_index, chunk_text, char_start, char_end, word_count)
    VALUES (10, 1, 0, 'One', 0, 3, 1), (11, 2, 0, 'Two', 0, 3, 1);
INSERT INTO chunk_entities (chunk_rowid, content_id, entity_text) VALUES (10, 1, 'One');
INSERT INTO chunk_relationships (content_id, subject_entity, predicate, object_entity, chunk_rowids)
    VALUES (1, 'One', 'is', 'Two', '[10]');
INSERT INTO kg_processing_queue (content_id, status, result_summary) VALUES (1, 'completed', 'ok'),
    (2, 'skipped', NULL);
"""


def dump(path: str) -> dict[str, list]:
    c = sqlite3.connect(path)
    tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    out = {}
    for t in tables:
        cols = [r[1] for r in c.execute(f"PRAGMA table_info({t})")]
        out[t] = (cols, c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall())
    c.close()
    return out


def test_init_db_on_an_upstream_database_keeps_every_row_and_column(tmp_path):
    path = str(tmp_path / "upstream.db")
    c = sqlite3.connect(path)
    c.executescript(UPSTREAM_DDL)
    c.close()
    before = dump(path)
    changes = init_db(path)
    after = dump(path)
    assert any("lease_token" in ch for ch in changes)
    created = {ch.split()[-1] for ch in changes if ch.startswith("created table")}
    assert created == set(OWN_TABLES), "no upstream table made again; only kgsupervisor's own added"
    assert not any("created index on" in ch for ch in changes), "upstream indexes are recognised by columns"
    for table, (cols, rows) in before.items():
        new_cols, new_rows = after[table]
        assert new_cols[: len(cols)] == cols, f"{table}: upstream columns kept in order"
        assert [r[: len(cols)] for r in new_rows] == rows, f"{table}: every row kept"
    assert set(after["kg_processing_queue"][0]) >= set(QUEUE_COLUMNS)
    # Running it again changes nothing at all.
    assert init_db(path) == []
    assert dump(path) == after


def test_queue_counts_are_seeded_on_migration_and_follow_any_writer(tmp_path):
    path = str(tmp_path / "upstream.db")
    c = sqlite3.connect(path)
    c.executescript(UPSTREAM_DDL)
    c.close()
    init_db(path)
    queue = SQLiteQueue(connect(path))
    assert queue.counts() == {"pending": 0, "processing": 0, "completed": 1, "failed": 0, "skipped": 1, "total": 2}
    # The upstream application writes with plain SQL on its own connection: the triggers still count.
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("INSERT INTO kg_processing_queue (content_id) VALUES (2), (2), (1)")
    c.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE id = 3")
    c.execute("UPDATE kg_processing_queue SET status = NULL WHERE id = 4")
    c.execute("UPDATE kg_processing_queue SET priority = 9")  # not a status change
    c.execute("DELETE FROM kg_processing_queue WHERE status = 'skipped'")
    scanned = dict(c.execute("SELECT IFNULL(status, ''), COUNT(*) FROM kg_processing_queue GROUP BY 1"))
    c.close()
    counts = queue.counts()
    # A row without a status is counted too, under its own name.
    assert {s: n for s, n in counts.items() if n and s != "total"} == {k or NO_STATUS: v for k, v in scanned.items()}
    assert counts["total"] == sum(scanned.values()) == 4


def test_init_db_twice_on_a_new_file_is_a_no_op(tmp_path):
    path = str(tmp_path / "new.db")
    assert init_db(path)
    schema = sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    assert init_db(path) == []
    assert sqlite3.connect(path).execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == schema


def test_write_back_indexes_exist(db_path):
    c = sqlite3.connect(db_path)
    indexed = {(r[0], c.execute(f"PRAGMA index_info({r[1]})").fetchone()[2])
               for r in c.execute("SELECT tbl_name, name FROM sqlite_master WHERE type = 'index'")}
    for table in ("chunk_entities", "chunk_relationships", "content_chunks"):
        assert (table, "content_id") in indexed


def test_connection_is_wal_with_busy_timeout(db_path):
    c = connect(db_path)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_claim_at_200k_rows_uses_the_claim_index_not_a_scan(db_path):
    c = connect(db_path)
    c.execute("BEGIN")
    c.executemany("INSERT INTO kg_processing_queue (content_id, priority, status) VALUES (?, ?, ?)",
                  ((i, i % 5, "pending" if i % 4 else "completed") for i in range(200_000)))
    c.execute("COMMIT")
    c.execute("ANALYZE")
    # The very statement the claim runs: the partial index walked in claim order, no sort.
    plan = c.execute(
        "EXPLAIN QUERY PLAN UPDATE kg_processing_queue SET status = 'processing' WHERE id IN "
        f"(SELECT id FROM kg_processing_queue WHERE {CLAIMABLE} AND (not_before IS NULL OR "
        "not_before <= ?) ORDER BY priority DESC, id ASC LIMIT 5) RETURNING id", (time.time(),)).fetchall()
    steps = [r[3] for r in plan]
    assert "SCAN kg_processing_queue USING INDEX idx_kgq_claim_order" in steps, steps
    assert not any("TEMP B-TREE" in s for s in steps), steps
    assert "SCAN kg_processing_queue" not in steps, steps  # a bare full-table scan


def test_not_sqlite_and_missing_queue_are_one_line_errors(tmp_path):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("hello, I am not a database\n" * 10)
    with pytest.raises(DatabaseError, match="is not an SQLite database"):
        connect(str(bogus))
    with pytest.raises(DatabaseError, match="does not exist"):
        connect(str(tmp_path / "missing.db"))
    empty = str(tmp_path / "empty.db")
    sqlite3.connect(empty).execute("CREATE TABLE other (x)").connection.commit()
    with pytest.raises(DatabaseError, match="no kg_processing_queue table"):
        check_schema(connect(empty), empty)


def test_the_claim_keeps_its_index_when_statistics_are_stale(db_path):
    """Regression: statistics taken while the queue was empty made SQLite plan the claim as an
    OR over the status index plus a sort, which grows with the queue (found by the benchmark)."""
    from kgsupervisor.queue.leased import CLAIM_SQL
    c = connect(db_path)
    c.execute("ANALYZE")  # stale: the queue is empty now
    c.execute("BEGIN")
    c.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, ?)",
                  ((i, i % 3) for i in range(50_000)))
    c.execute("COMMIT")
    steps = [r[3] for r in c.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, ("t", "o", "k", 0.0, 0.0, 5)).fetchall()]
    assert "SCAN kg_processing_queue USING INDEX idx_kgq_claim_order" in steps, steps
    assert not any("TEMP B-TREE" in s or "MULTI-INDEX" in s for s in steps), steps


def test_a_queue_without_the_claim_index_is_caught_at_start_and_init_db_restores_it(db_path):
    """The claim names its index (INDEXED BY): a database without it would fail every claim."""
    c = sqlite3.connect(db_path)
    c.execute("DROP INDEX idx_kgq_claim_order")
    c.close()
    with pytest.raises(DatabaseError, match=r"needs migrating: kg_processing_queue lacks index idx_kgq_claim_order"):
        check_schema(connect(db_path), db_path)
    assert init_db(db_path) == ["created index idx_kgq_claim_order"]
    check_schema(connect(db_path), db_path)
