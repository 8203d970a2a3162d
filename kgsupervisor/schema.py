"""Create the upstream schema when missing and add, idempotently, what the supervisor needs."""
from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from .db import connect, transaction
from .errors import DatabaseError

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("kgsupervisor.schema")

# The upstream pipeline's tables, as its migration creates them (CONTRACT §2).
UPSTREAM_TABLES = {
    "crawled_content": """
        CREATE TABLE IF NOT EXISTS crawled_content (
            id INTEGER PRIMARY KEY, url TEXT, title TEXT, markdown TEXT,
            metadata TEXT, tags TEXT,
            kg_processed BOOLEAN DEFAULT 0, kg_entity_count INTEGER DEFAULT 0,
            kg_relationship_count INTEGER DEFAULT 0, kg_document_id TEXT,
            kg_processed_at DATETIME)""",
    "content_chunks": """
        CREATE TABLE IF NOT EXISTS content_chunks (
            rowid INTEGER PRIMARY KEY, content_id INTEGER, chunk_index INTEGER,
            chunk_text TEXT, char_start INTEGER, char_end INTEGER, word_count INTEGER,
            kg_processed BOOLEAN DEFAULT 0, created_at DATETIME DEFAULT CURRENT_TIMESTAMP)""",
    "chunk_entities": """
        CREATE TABLE IF NOT EXISTS chunk_entities (
            id INTEGER PRIMARY KEY AUTOINCREMENT, chunk_rowid INTEGER, content_id INTEGER,
            entity_text TEXT, entity_normalized TEXT, entity_type_primary TEXT,
            entity_type_sub1 TEXT, entity_type_sub2 TEXT, entity_type_sub3 TEXT,
            confidence REAL, offset_start INTEGER, offset_end INTEGER, neo4j_node_id TEXT,
            spans_multiple_chunks BOOLEAN DEFAULT 0,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP)""",
    "chunk_relationships": """
        CREATE TABLE IF NOT EXISTS chunk_relationships (
            id INTEGER PRIMARY KEY AUTOINCREMENT, content_id INTEGER, subject_entity TEXT,
            predicate TEXT, object_entity TEXT, confidence REAL, context TEXT,
            neo4j_relationship_id TEXT, spans_chunks BOOLEAN DEFAULT 0, chunk_rowids TEXT,
            created_at DATETIME DEFAULT CURRENT_TIMESTAMP)""",
    "kg_processing_queue": """
        CREATE TABLE IF NOT EXISTS kg_processing_queue (
            id INTEGER PRIMARY KEY AUTOINCREMENT, content_id INTEGER,
            status TEXT DEFAULT 'pending', priority INTEGER DEFAULT 1,
            queued_at DATETIME DEFAULT CURRENT_TIMESTAMP, processing_started_at DATETIME,
            processed_at DATETIME, retry_count INTEGER DEFAULT 0, error_message TEXT,
            result_summary TEXT, skipped_reason TEXT)""",
}

UPSTREAM_INDEXES = [
    ("crawled_content", ["kg_processed", "kg_processed_at"]),
    ("content_chunks", ["content_id"]),
    ("content_chunks", ["char_start", "char_end"]),
    ("content_chunks", ["kg_processed"]),
    ("chunk_entities", ["chunk_rowid"]),
    ("chunk_entities", ["entity_text"]),
    ("chunk_entities", ["entity_type_primary", "entity_type_sub1"]),
    ("chunk_entities", ["content_id"]),
    ("chunk_entities", ["neo4j_node_id"]),
    ("chunk_entities", ["entity_normalized"]),
    ("chunk_relationships", ["content_id"]),
    ("chunk_relationships", ["subject_entity"]),
    ("chunk_relationships", ["object_entity"]),
    ("chunk_relationships", ["predicate"]),
    ("kg_processing_queue", ["status", "priority", "queued_at"]),
    ("kg_processing_queue", ["content_id"]),
]

# Columns the supervisor adds to the queue. Times it compares are REAL unix seconds, so that
# a lease check is one numeric comparison and no clock-format parsing.
QUEUE_COLUMNS = {
    "lease_owner": str,       # "host:pid" of the worker holding the claim
    "lease_token": str,       # fresh per claim: the fence a write-back must match
    "lease_expires_at": float,
    "not_before": float,      # earliest time a retried row may be claimed again
    "crash_count": int,       # worker deaths while this document was in flight (poison pills)
    "started_at": float,      # set when a worker starts sending this document
}

# The claim's WHERE, spelled once: the partial index below is only usable by a query whose
# WHERE contains this exact term.
CLAIMABLE = ("(status = 'pending' OR (status = 'skipped' "
             "AND skipped_reason = 'kg_service_unavailable'))")

SUPERVISOR_INDEXES = {
    # Serves the claim's `ORDER BY priority DESC, id ASC` over claimable rows only: O(log n) at
    # a million rows, where the upstream (status, priority, queued_at) index needs a sort.
    "idx_kgq_claim_order":
        f"CREATE INDEX IF NOT EXISTS idx_kgq_claim_order ON kg_processing_queue"
        f"(priority DESC, id ASC) WHERE {CLAIMABLE}",
    # Release of a dead owner's claims and the lease-expiry backstop touch only live claims.
    "idx_kgq_lease":
        "CREATE INDEX IF NOT EXISTS idx_kgq_lease ON kg_processing_queue"
        "(lease_owner, lease_expires_at) WHERE status = 'processing'",
}


# Queue counts by status, kept by triggers in the same transaction as every change to a row's
# status (ours or the upstream application's), so `queue` and the status endpoint read a handful
# of rows instead of scanning a million. NULL status is counted under ''.
STATUS_COUNTS_TABLE = "kg_queue_status_counts"
STATUS_COUNT_TRIGGERS = {
    "kgq_count_insert": f"""
        CREATE TRIGGER IF NOT EXISTS kgq_count_insert AFTER INSERT ON kg_processing_queue BEGIN
            INSERT INTO {STATUS_COUNTS_TABLE} (status, n) VALUES (IFNULL(NEW.status, ''), 1)
                ON CONFLICT (status) DO UPDATE SET n = n + 1;
        END""",
    "kgq_count_delete": f"""
        CREATE TRIGGER IF NOT EXISTS kgq_count_delete AFTER DELETE ON kg_processing_queue BEGIN
            UPDATE {STATUS_COUNTS_TABLE} SET n = n - 1 WHERE status = IFNULL(OLD.status, '');
        END""",
    "kgq_count_update": f"""
        CREATE TRIGGER IF NOT EXISTS kgq_count_update AFTER UPDATE OF status ON kg_processing_queue
        WHEN OLD.status IS NOT NEW.status BEGIN
            UPDATE {STATUS_COUNTS_TABLE} SET n = n - 1 WHERE status = IFNULL(OLD.status, '');
            INSERT INTO {STATUS_COUNTS_TABLE} (status, n) VALUES (IFNULL(NEW.status, ''), 1)
                ON CONFLICT (status) DO UPDATE SET n = n + 1;
        END""",
}


def _install_status_counts(conn: sqlite3.Connection) -> bool:
    """Create the counts table and its triggers when any is missing, seeded from one scan."""
    have = {name for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'kg_processing_queue'")}
    if set(STATUS_COUNT_TRIGGERS) <= have:
        return False
    # Inside the migration's write transaction no row can change between the seed and the triggers.
    for name in STATUS_COUNT_TRIGGERS:
        conn.execute(f"DROP TRIGGER IF EXISTS {name}")
    conn.execute(f"DROP TABLE IF EXISTS {STATUS_COUNTS_TABLE}")
    conn.execute(f"CREATE TABLE {STATUS_COUNTS_TABLE} (status TEXT PRIMARY KEY, n INTEGER NOT NULL) "
                 "WITHOUT ROWID")
    conn.execute(f"INSERT INTO {STATUS_COUNTS_TABLE} (status, n) "
                 "SELECT IFNULL(status, ''), COUNT(*) FROM kg_processing_queue GROUP BY 1")
    for ddl in STATUS_COUNT_TRIGGERS.values():
        conn.execute(ddl)
    return True


def _upstream_index_name(table: str, columns: list[str]) -> str:
    return f"idx_{table}_{'_'.join(columns)}"


def _has_index_on(db: sqlite_utils.Database, table: str, columns: list[str]) -> bool:
    return any(list(ix.columns) == columns for ix in db[table].indexes)


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Bring the schema up to date in one transaction; returns what was changed (empty: nothing)."""
    import sqlite_utils  # only init-db migrates; every other command checks with two PRAGMAs
    db = sqlite_utils.Database(conn)
    changes: list[str] = []
    with transaction(conn):
        for table, ddl in UPSTREAM_TABLES.items():
            if not db[table].exists():
                conn.execute(ddl)
                changes.append(f"created table {table}")
        for table, columns in UPSTREAM_INDEXES:
            # An upstream database already has these under its own names: match by columns.
            if not _has_index_on(db, table, columns):
                db[table].create_index(columns, _upstream_index_name(table, columns), if_not_exists=True)
                changes.append(f"created index on {table}({', '.join(columns)})")
        queue = db["kg_processing_queue"]
        have = queue.columns_dict
        for name, col_type in QUEUE_COLUMNS.items():
            if name not in have:
                queue.add_column(name, col_type)
                changes.append(f"added column kg_processing_queue.{name}")
        existing = {ix.name for ix in queue.indexes}
        for name, ddl in SUPERVISOR_INDEXES.items():
            if name not in existing:
                conn.execute(ddl)
                changes.append(f"created index {name}")
        if _install_status_counts(conn):
            changes.append(f"created {STATUS_COUNTS_TABLE} and its triggers")
    # No ANALYZE here: statistics of a still-empty queue would mislead the planner later.
    return changes


def init_db(path: str) -> list[str]:
    """Create or migrate the database at `path`; safe to run any number of times."""
    conn = connect(path, create=True)
    try:
        return migrate(conn)
    finally:
        conn.close()


def check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Fail with one line when the database is not one kgsupervisor can work on."""
    require_queue_columns({row[1] for row in conn.execute("PRAGMA table_info(kg_processing_queue)")},
                          repr(path), path)


def require_queue_columns(have: set[str], label: str, db_arg: str) -> None:
    """One line naming what the queue table lacks and the init-db that adds it (either backend)."""
    if not have:
        raise DatabaseError(f"{label} has no kg_processing_queue table (run: kgsupervisor init-db --db {db_arg})")
    missing = [c for c in QUEUE_COLUMNS if c not in have]
    if missing:
        raise DatabaseError(f"{label} needs migrating, kg_processing_queue lacks {', '.join(missing)} "
                            f"(run: kgsupervisor init-db --db {db_arg})")
