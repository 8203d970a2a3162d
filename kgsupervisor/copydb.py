"""Copy an SQLite database into PostgreSQL: table by table in key order, resumable, verified by counts."""
from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Callable
from contextlib import closing

from .db import connect
from .errors import DatabaseError
from .pgdb import PGConnection, redact
from .pgschema import migrate_pg, table_columns
from .schema import check_schema

# Parents before children, each in the order of its key: a copy stopped anywhere resumes after
# the highest key already in PostgreSQL.
TABLES = (("crawled_content", "id"), ("content_chunks", "rowid"), ("chunk_entities", "id"),
          ("chunk_relationships", "id"), ("kg_processing_queue", "id"))
BATCH_ROWS = 5000

Progress = Callable[[str, int, int], None]  # table, rows of it in PostgreSQL now, rows in SQLite


@dataclasses.dataclass
class TableCopy:
    """What the copy did to one table."""

    table: str
    source_rows: int
    already_there: int
    copied: int


def _lenient_text(raw: bytes) -> str:
    # Crawled text may hold invalid UTF-8 (SQLite does not check); PostgreSQL holds neither
    # that nor NUL: both become U+FFFD, as the worker does when it sends such a document.
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _sqlite_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def copy_table(src: sqlite3.Connection, dst: PGConnection, table: str, key: str,
               batch_rows: int = BATCH_ROWS, progress: Progress | None = None) -> TableCopy:
    """Copy the rows of `table` whose key is above the highest one already in PostgreSQL."""
    columns = [c for c in _sqlite_columns(src, table) if c in table_columns(dst, table)]
    if key not in columns:
        columns.insert(0, key)  # content_chunks.rowid is implicit in some upstream databases
    total = src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    last = dst.execute(f"SELECT COALESCE(MAX({key}), 0) FROM {table}").fetchone()[0]
    there = dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    select = f"SELECT {', '.join(columns)} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT ?"
    at = columns.index(key)
    copied = 0
    while True:
        rows = src.execute(select, (last, batch_rows)).fetchall()
        if not rows:
            break
        dst.execute("BEGIN")
        try:
            with dst.raw.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    # A BLOB in a text column (SQLite does not enforce types) is copied as text.
                    copy.write_row([_lenient_text(v) if isinstance(v, bytes) else v for v in row])
            dst.execute("COMMIT")
        except BaseException:
            dst.execute("ROLLBACK")
            raise
        last = rows[-1][at]
        copied += len(rows)
        if progress:
            progress(table, there + copied, total)
    # Rows inserted later without a key must not collide with the copied ones.
    dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                f"GREATEST((SELECT COALESCE(MAX({key}), 0) FROM {table}), 1))")
    return TableCopy(table, total, there, copied)


def copy_database(source: str, target: str, *, batch_rows: int = BATCH_ROWS,
                  progress: Progress | None = None) -> tuple[list[TableCopy], int]:
    """Copy every table of the SQLite database `source` into the PostgreSQL database `target`
    (schema created or migrated first); returns what each table got and how many claims that
    were `processing` in SQLite went back to pending. Raises DatabaseError when the counts differ.
    """
    with closing(connect(source)) as src, closing(PGConnection(target)) as dst:
        check_schema(src, source)
        src.text_factory = _lenient_text
        migrate_pg(dst)
        done = [copy_table(src, dst, table, key, batch_rows, progress) for table, key in TABLES]
        # A claim belongs to a worker of the old database: in the new one it is nobody's.
        released = dst.execute(
            "UPDATE kg_processing_queue SET status = 'pending', lease_owner = NULL, lease_token = NULL, "
            "lease_expires_at = NULL, started_at = NULL, processing_started_at = NULL "
            "WHERE status = 'processing'").rowcount
        for table, _ in TABLES:
            want = src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            have = dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            if want != have:
                raise DatabaseError(
                    f"copy not verified: {table} has {want} row(s) in {source!r} and {have} in "
                    f"{redact(target)} (was the PostgreSQL database written to by anything else?)")
    return done, released
