"""A database as the upstream pipeline leaves it, built with its own DDL and its own statements:
the crawler's tables, then (optionally) its KG migration, and no kgsupervisor anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from contextlib import closing

# The crawler's tables, as its storage layer creates them.
CRAWLER_DDL = """
CREATE TABLE IF NOT EXISTS crawled_content (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT UNIQUE NOT NULL,
    title TEXT,
    content TEXT,
    markdown TEXT,
    content_hash TEXT,
    timestamp DATETIME DEFAULT CURRENT_TIMESTAMP,
    added_by_session TEXT,
    retention_policy TEXT DEFAULT 'permanent',
    tags TEXT,
    metadata TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    last_active DATETIME DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS blocked_domains (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pattern TEXT UNIQUE NOT NULL,
    description TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP
);
"""
# sqlite-vec's virtual table. kgsupervisor never loads the extension (nor does this test suite
# depend on it): the schema entry is written as the extension writes it, so kgsupervisor meets a
# table whose module it does not have, as it does in production.
VECTORS_ENTRY = ("table", "content_vectors", "content_vectors", 0,
                 "CREATE VIRTUAL TABLE content_vectors USING vec0(embedding FLOAT[384], content_id INTEGER)")

# The KG migration (001): columns added to crawled_content, then its tables and indexes.
KG_COLUMNS = [("kg_processed", "BOOLEAN DEFAULT 0"), ("kg_entity_count", "INTEGER DEFAULT 0"),
              ("kg_relationship_count", "INTEGER DEFAULT 0"), ("kg_document_id", "TEXT"),
              ("kg_processed_at", "DATETIME")]
KG_MIGRATION_DDL = """
CREATE INDEX IF NOT EXISTS idx_crawled_content_kg ON crawled_content(kg_processed, kg_processed_at);
CREATE TABLE IF NOT EXISTS content_chunks (
    rowid INTEGER PRIMARY KEY,
    content_id INTEGER NOT NULL,
    chunk_index INTEGER NOT NULL,
    chunk_text TEXT NOT NULL,
    char_start INTEGER NOT NULL,
    char_end INTEGER NOT NULL,
    word_count INTEGER,
    kg_processed BOOLEAN DEFAULT 0,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (content_id) REFERENCES crawled_content(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_content_chunks_content_id ON content_chunks(content_id);
CREATE INDEX IF NOT EXISTS idx_content_chunks_position ON content_chunks(char_start, char_end);
CREATE INDEX IF NOT EXISTS idx_content_chunks_kg_processed ON content_chunks(kg_processed);
CREATE TABLE IF NOT EXISTS chunk_entities (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk_rowid INTEGER NOT NULL,
    content_id INTEGER NOT NULL,
    entity_text TEXT NOT NULL,
    entity_normalized TEXT,
    entity_type_primary TEXT,
    entity_type_sub1 TEXT,
    entity_type_sub2 TEXT,
    entity_type_sub3 TEXT,
    confidence REAL,
    offset_start INTEGER,
    offset_end INTEGER,
    neo4j_node_id TEXT,
    spans_multiple_chunks BOOLEAN DEFAULT 0,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (chunk_rowid) REFERENCES content_chunks(rowid) ON DELETE CASCADE,
    FOREIGN KEY (content_id) REFERENCES crawled_content(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_chunk ON chunk_entities(chunk_rowid);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_entity ON chunk_entities(entity_text);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_type ON chunk_entities(entity_type_primary, entity_type_sub1);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_content ON chunk_entities(content_id);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_neo4j ON chunk_entities(neo4j_node_id);
CREATE INDEX IF NOT EXISTS idx_chunk_entities_normalized ON chunk_entities(entity_normalized);
CREATE TABLE IF NOT EXISTS chunk_relationships (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_id INTEGER NOT NULL,
    subject_entity TEXT NOT NULL,
    predicate TEXT NOT NULL,
    object_entity TEXT NOT NULL,
    confidence REAL,
    context TEXT,
    neo4j_relationship_id TEXT,
    spans_chunks BOOLEAN DEFAULT 0,
    chunk_rowids TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (content_id) REFERENCES crawled_content(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_chunk_relationships_content ON chunk_relationships(content_id);
CREATE INDEX IF NOT EXISTS idx_chunk_relationships_subject ON chunk_relationships(subject_entity);
CREATE INDEX IF NOT EXISTS idx_chunk_relationships_object ON chunk_relationships(object_entity);
CREATE INDEX IF NOT EXISTS idx_chunk_relationships_predicate ON chunk_relationships(predicate);
CREATE TABLE IF NOT EXISTS kg_processing_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_id INTEGER NOT NULL,
    status TEXT DEFAULT 'pending',
    priority INTEGER DEFAULT 1,
    queued_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    processing_started_at DATETIME,
    processed_at DATETIME,
    retry_count INTEGER DEFAULT 0,
    error_message TEXT,
    result_summary TEXT,
    skipped_reason TEXT,
    FOREIGN KEY (content_id) REFERENCES crawled_content(id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_kg_queue_status ON kg_processing_queue(status, priority, queued_at);
CREATE INDEX IF NOT EXISTS idx_kg_queue_content ON kg_processing_queue(content_id);
"""

# The crawler's own statement for storing a page, verbatim.
CRAWLER_INSERT = ("INSERT OR REPLACE INTO crawled_content (url, title, content, markdown, content_hash, "
                  "added_by_session, retention_policy, tags, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")

UPSTREAM_TABLES = ("crawled_content", "sessions", "blocked_domains", "content_chunks", "chunk_entities",
                   "chunk_relationships", "kg_processing_queue")


def page(n: int, session: str = "sess-1") -> tuple:
    """The crawler's values for page `n`, in CRAWLER_INSERT's order."""
    markdown = f"# Page {n}\n\nAda Lovelace met Charles Babbage in London to discuss engine number {n}."
    return (f"https://docs.example.org/page/{n}", f"Page {n}", markdown.replace("#", "").strip(), markdown,
            hashlib.sha256(markdown.encode()).hexdigest(), session, "permanent", "history,computing",
            json.dumps({"source": "crawl", "depth": n % 3}))


def add_vectors_entry(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("INSERT INTO sqlite_master (type, name, tbl_name, rootpage, sql) VALUES (?, ?, ?, ?, ?)",
                 VECTORS_ENTRY)
    conn.execute("PRAGMA writable_schema = OFF")


def run_kg_migration(conn: sqlite3.Connection) -> None:
    """The upstream's migration 001, as its Python script runs it."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(crawled_content)")}
    for column, definition in KG_COLUMNS:
        if column not in have:
            conn.execute(f"ALTER TABLE crawled_content ADD COLUMN {column} {definition}")
    conn.executescript(KG_MIGRATION_DDL)


def make_upstream_database(path: str, *, kg_migration: bool = True, pages: int = 4) -> None:
    """The crawler's tables with `pages` pages (chunked, some processed, some queued when the KG
    migration ran), in the rollback-journal mode the crawler leaves; no -wal or -shm behind."""
    conn = sqlite3.connect(path)
    conn.executescript(CRAWLER_DDL)
    add_vectors_entry(conn)
    conn.execute("INSERT INTO sessions (session_id) VALUES ('sess-1')")
    conn.execute("INSERT INTO blocked_domains (pattern, description) VALUES ('*.spam.example', 'spam')")
    if kg_migration:
        run_kg_migration(conn)
    for n in range(1, pages + 1):
        conn.execute(CRAWLER_INSERT, page(n))
    if kg_migration:
        _add_kg_rows(conn, pages)
    conn.commit()
    conn.close()
    assert not os.path.exists(path + "-wal") and not os.path.exists(path + "-shm")


def _add_kg_rows(conn: sqlite3.Connection, pages: int) -> None:
    """Chunks for every page (rowids as the vector table gives them), KG rows for page 1, and a
    queue with one row in each state the upstream coordinator leaves."""
    for cid in range(1, pages + 1):
        markdown = conn.execute("SELECT markdown FROM crawled_content WHERE id = ?", (cid,)).fetchone()[0]
        half = len(markdown) // 2
        for index, (start, end) in enumerate(((0, half), (half, len(markdown)))):
            conn.execute("INSERT INTO content_chunks (rowid, content_id, chunk_index, chunk_text, char_start, "
                         "char_end, word_count) VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (40_000 + cid * 10 + index, cid, index, markdown[start:end], start, end,
                          len(markdown[start:end].split())))
    conn.execute("INSERT INTO chunk_entities (chunk_rowid, content_id, entity_text, entity_normalized, "
                 "entity_type_primary, confidence, offset_start, offset_end, neo4j_node_id) "
                 "VALUES (40010, 1, 'Ada Lovelace', 'ada lovelace', 'Person', 0.97, 10, 22, '4:doc:1')")
    conn.execute("INSERT INTO chunk_relationships (content_id, subject_entity, predicate, object_entity, "
                 "confidence, context, spans_chunks, chunk_rowids) VALUES (1, 'Ada Lovelace', 'met', "
                 "'Charles Babbage', 0.9, 'Ada Lovelace met Charles Babbage', 1, '[40010, 40011]')")
    conn.execute("UPDATE crawled_content SET kg_processed = 1, kg_entity_count = 1, kg_relationship_count = 1, "
                 "kg_document_id = '4:doc:1', kg_processed_at = '2025-10-16 08:00:00' WHERE id = 1")
    conn.execute("UPDATE content_chunks SET kg_processed = 1 WHERE content_id = 1")
    statuses = ["completed", "failed", "processing", "pending", "skipped"]
    for cid in range(1, pages + 1):
        conn.execute("INSERT INTO kg_processing_queue (content_id, status, processing_started_at) VALUES (?, ?, ?)",
                     (cid, statuses[(cid - 1) % len(statuses)], "2025-10-16 08:00:00"))


def table_info(path: str, table: str) -> list[tuple]:
    """PRAGMA table_info: name, type, NOT NULL, default and key of every column, in order."""
    with closing(_reader(path)) as conn:
        return conn.execute(f"PRAGMA table_info({table})").fetchall()


def rows(path: str, table: str) -> list[tuple]:
    with closing(_reader(path)) as conn:
        return conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()


def index_names(path: str, table: str) -> set[str]:
    with closing(_reader(path)) as conn:
        return {r[1] for r in conn.execute(f"PRAGMA index_list({table})")}


def _reader(path: str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def sha256_of(path: str) -> str | None:
    """The file's digest, or None when it does not exist."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()
