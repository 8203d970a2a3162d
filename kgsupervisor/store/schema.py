"""Create the upstream schema when missing and add, idempotently, what the supervisor needs."""
from __future__ import annotations

import logging
import re
import sqlite3
from typing import TYPE_CHECKING

from kgsupervisor.errors import DatabaseError
from kgsupervisor.store.owntables import SQLITE_SPELLING, create_own_tables, lacking_own
from kgsupervisor.store.sqlite import connect, transaction

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("kgsupervisor.schema")

# The upstream pipeline's tables column by column, declared as it declares them (CONTRACT §2):
# `crawled_content` as the crawler creates it plus the KG migration's columns, the chunk tables
# and the queue as the KG migration creates them (without its NOT NULLs and foreign keys, which
# CONTRACT §2 does not list). A missing table is created from this; a missing column the
# supervisor uses is added from it.
UPSTREAM_COLUMNS: dict[str, dict[str, str]] = {
    "crawled_content": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "url": "TEXT UNIQUE NOT NULL", "title": "TEXT",
        "content": "TEXT", "markdown": "TEXT", "content_hash": "TEXT",
        "timestamp": "DATETIME DEFAULT CURRENT_TIMESTAMP", "added_by_session": "TEXT",
        "retention_policy": "TEXT DEFAULT 'permanent'", "tags": "TEXT", "metadata": "TEXT",
        "kg_processed": "BOOLEAN DEFAULT 0", "kg_entity_count": "INTEGER DEFAULT 0",
        "kg_relationship_count": "INTEGER DEFAULT 0", "kg_document_id": "TEXT",
        "kg_processed_at": "DATETIME",
    },
    "content_chunks": {
        "rowid": "INTEGER PRIMARY KEY", "content_id": "INTEGER", "chunk_index": "INTEGER",
        "chunk_text": "TEXT", "char_start": "INTEGER", "char_end": "INTEGER", "word_count": "INTEGER",
        "kg_processed": "BOOLEAN DEFAULT 0", "created_at": "DATETIME DEFAULT CURRENT_TIMESTAMP",
    },
    "chunk_entities": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "chunk_rowid": "INTEGER", "content_id": "INTEGER",
        "entity_text": "TEXT", "entity_normalized": "TEXT", "entity_type_primary": "TEXT",
        "entity_type_sub1": "TEXT", "entity_type_sub2": "TEXT", "entity_type_sub3": "TEXT",
        "confidence": "REAL", "offset_start": "INTEGER", "offset_end": "INTEGER",
        "neo4j_node_id": "TEXT", "spans_multiple_chunks": "BOOLEAN DEFAULT 0",
        "created_at": "DATETIME DEFAULT CURRENT_TIMESTAMP",
    },
    "chunk_relationships": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "content_id": "INTEGER", "subject_entity": "TEXT",
        "predicate": "TEXT", "object_entity": "TEXT", "confidence": "REAL", "context": "TEXT",
        "neo4j_relationship_id": "TEXT", "spans_chunks": "BOOLEAN DEFAULT 0", "chunk_rowids": "TEXT",
        "created_at": "DATETIME DEFAULT CURRENT_TIMESTAMP",
    },
    "kg_processing_queue": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT", "content_id": "INTEGER",
        "status": "TEXT DEFAULT 'pending'", "priority": "INTEGER DEFAULT 1",
        "queued_at": "DATETIME DEFAULT CURRENT_TIMESTAMP", "processing_started_at": "DATETIME",
        "processed_at": "DATETIME", "retry_count": "INTEGER DEFAULT 0", "error_message": "TEXT",
        "result_summary": "TEXT", "skipped_reason": "TEXT",
    },
}
UPSTREAM_TABLES = {
    table: f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(f'{c} {d}' for c, d in columns.items())})"
    for table, columns in UPSTREAM_COLUMNS.items()
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
SQLITE_TYPES = {str: "TEXT", float: "FLOAT", int: "INTEGER"}

# Every column kgsupervisor reads or writes (documents.py, writeback.py, queue.py), by table:
# the start check of every command requires them all, and init-db adds those an older database
# lacks. This is the one list: tests/test_upstream.py runs the workers on a database that has
# these columns and no other, and holds it to the column names the SQL of those modules spells.
USED_COLUMNS: dict[str, tuple[str, ...]] = {
    "crawled_content": ("id", "url", "title", "markdown", "metadata", "tags", "kg_processed",
                        "kg_entity_count", "kg_relationship_count", "kg_document_id", "kg_processed_at"),
    "content_chunks": ("rowid", "content_id", "chunk_index", "chunk_text", "char_start", "char_end",
                       "kg_processed"),
    "chunk_entities": ("chunk_rowid", "content_id", "entity_text", "entity_normalized",
                       "entity_type_primary", "entity_type_sub1", "entity_type_sub2",
                       "entity_type_sub3", "confidence", "offset_start", "offset_end",
                       "neo4j_node_id", "spans_multiple_chunks", "created_at"),
    "chunk_relationships": ("content_id", "subject_entity", "predicate", "object_entity",
                            "confidence", "context", "neo4j_relationship_id", "spans_chunks",
                            "chunk_rowids", "created_at"),
    "kg_processing_queue": ("id", "content_id", "status", "priority", "queued_at",
                            "processing_started_at", "processed_at", "retry_count", "error_message",
                            "result_summary", "skipped_reason", *QUEUE_COLUMNS),
}


def column_declaration(table: str, column: str) -> str:
    """The SQLite declaration of a used column: the upstream's, or the supervisor's own type."""
    return UPSTREAM_COLUMNS[table].get(column) or SQLITE_TYPES[QUEUE_COLUMNS[column]]


def addable_declaration(declaration: str) -> str | None:
    """`declaration` as ADD COLUMN takes it on a table with rows, or None for a key (never added).

    SQLite adds neither a UNIQUE column, nor a NOT NULL one without a default, nor a column
    with a non-constant default (CURRENT_TIMESTAMP: the write-back sets created_at itself).
    """
    if "PRIMARY KEY" in declaration:
        return None
    return re.sub(r" (UNIQUE|NOT NULL|DEFAULT CURRENT_TIMESTAMP)\b", "", declaration)

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


def table_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column names of `table`, `rowid` included (empty: no such table)."""
    names = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    # Every table of the pipeline has a rowid, declared (content_chunks) or not.
    return names | {"rowid"} if names else names


def _add_missing_columns(conn: sqlite3.Connection) -> list[str]:
    """Add each used column an existing table lacks; a missing key stops the migration."""
    changes = []
    for table, columns in USED_COLUMNS.items():
        have = table_columns(conn, table)
        for column in (c for c in columns if c not in have):
            declaration = addable_declaration(column_declaration(table, column))
            if declaration is None:
                raise DatabaseError(f"{table} has no {column} column, and init-db cannot add a key "
                                    f"to an existing table")
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            changes.append(f"added column {table}.{column}")
    return changes


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Bring the schema up to date in one transaction; returns what was changed (empty: nothing).

    It never rebuilds or drops a table and never changes a column the database has: what the
    upstream reads stays as it was.
    """
    import sqlite_utils  # only init-db migrates; every other command checks with a few PRAGMAs
    db = sqlite_utils.Database(conn)
    changes: list[str] = []
    with transaction(conn):
        for table, ddl in UPSTREAM_TABLES.items():
            if not db[table].exists():
                conn.execute(ddl)
                changes.append(f"created table {table}")
        changes += _add_missing_columns(conn)
        for table, columns in UPSTREAM_INDEXES:
            # An upstream database already has these under its own names: match by columns. One on
            # a column this database lacks (and the supervisor never uses) is the upstream's to make.
            if set(columns) <= table_columns(conn, table) and not _has_index_on(db, table, columns):
                db[table].create_index(columns, _upstream_index_name(table, columns), if_not_exists=True)
                changes.append(f"created index on {table}({', '.join(columns)})")
        existing = {ix.name for ix in db["kg_processing_queue"].indexes}
        for name, ddl in SUPERVISOR_INDEXES.items():
            if name not in existing:
                conn.execute(ddl)
                changes.append(f"created index {name}")
        if _install_status_counts(conn):
            changes.append(f"created {STATUS_COUNTS_TABLE} and its triggers")
        changes += create_own_tables(conn, *_tables_and_indexes(conn), SQLITE_SPELLING)
    # No ANALYZE here: statistics of a still-empty queue would mislead the planner later.
    return changes


def init_db(path: str) -> list[str]:
    """Create or migrate the database at `path`; safe to run any number of times."""
    conn = connect(path, create=True)
    try:
        changes = migrate(conn)
        check_schema(conn, path)  # what `run` will ask of it: init-db never reports done when it is not
        return changes
    finally:
        conn.close()


def _tables_and_indexes(conn: sqlite3.Connection) -> tuple[set[str], set[str]]:
    """The names of the database's tables and of its indexes."""
    tables: set[str] = set()
    indexes: set[str] = set()
    for kind, name in conn.execute("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'index')"):
        (tables if kind == "table" else indexes).add(name)
    return tables, indexes


def check_schema(conn: sqlite3.Connection, path: str) -> None:
    """Fail with one line when the database lacks a table, column or index kgsupervisor uses."""
    have = {table: table_columns(conn, table) for table in USED_COLUMNS}
    tables, indexes = _tables_and_indexes(conn)
    # The claim names its index (INDEXED BY): without it every claim fails.
    require_schema(have, repr(path), path, [name for name in SUPERVISOR_INDEXES if name not in indexes],
                   lacking_own(tables, indexes))


def require_schema(have: dict[str, set[str]], label: str, db_arg: str,
                   lacking_indexes: list[str] | None = None, lacking: list[str] | None = None) -> None:
    """One line naming every table, column and index the database lacks, and the init-db that
    adds them (either backend); `have` holds each table's columns, empty when it is missing."""
    hint = f"(run: kgsupervisor init-db --db {db_arg})"
    if not have.get("kg_processing_queue"):
        raise DatabaseError(f"{label} has no kg_processing_queue table {hint}")
    problems = []
    for table, columns in USED_COLUMNS.items():
        found = have.get(table, set())
        missing = [c for c in columns if c not in found]
        if not found:
            problems.append(f"no {table} table")
        elif missing:
            problems.append(f"{table} lacks {', '.join(missing)}")
    problems += [f"kg_processing_queue lacks index {name}" for name in lacking_indexes or []]
    problems += lacking or []
    if problems:
        raise DatabaseError(f"{label} needs migrating: {'; '.join(problems)} {hint}")
