"""Copy an SQLite database into PostgreSQL: table by table in key order, resumable, verified by counts.

The source is read as the crawler left it and never written to: opened read-only, neither
migrated nor switched to WAL. Its columns are copied by name; a column it lacks (the KG or lease
columns of a database no KG migration or init-db has touched) gets its PostgreSQL default, and a
table it lacks (no KG migration: no chunks, no queue) has nothing to copy.
"""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from contextlib import closing

from kgsupervisor.errors import DatabaseError
from kgsupervisor.masking import redact
from kgsupervisor.store.pgschema import migrate_pg, table_columns
from kgsupervisor.store.postgres import PGConnection
from kgsupervisor.store.sqlite import BUSY_TIMEOUT_MS, check_is_sqlite_file, check_sqlite_version

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
    left_out: list[str] = dataclasses.field(default_factory=list)  # source columns PostgreSQL has not


def _lenient_text(raw: bytes) -> str:
    # Crawled text may hold invalid UTF-8 (SQLite does not check); PostgreSQL holds neither
    # that nor NUL: both become U+FFFD, as the worker does when it sends such a document.
    return raw.decode("utf-8", "replace").replace("\x00", "\ufffd")


def _sqlite_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def open_source(path: str) -> sqlite3.Connection:
    """The SQLite database at `path`, read-only; one line when it is not a crawl database.

    mode=ro, not immutable=1: the crawler may still be writing, and immutable would let SQLite
    skip the locks that keep a reader off half-written pages. A rollback-journal database is only
    read; one in WAL mode gets the -shm (and an empty -wal) any reader of it needs.
    """
    check_sqlite_version()
    check_is_sqlite_file(path)
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        tables = _source_tables(conn)
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise DatabaseError(f"{path!r} is not an SQLite database") from None
        raise DatabaseError(f"cannot read database {path!r}: {exc}") from None
    if "crawled_content" not in tables:
        conn.close()
        raise DatabaseError(f"{path!r} has no crawled_content table: not a crawl database, nothing to copy")
    conn.text_factory = _lenient_text
    return conn


def _source_tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def copy_table(src: sqlite3.Connection, dst: PGConnection, table: str, key: str,
               batch_rows: int = BATCH_ROWS, progress: Progress | None = None) -> TableCopy:
    """Copy the rows of `table` whose key is above the highest one already in PostgreSQL; the
    columns the source has, by name (PostgreSQL gives the others their defaults)."""
    target_columns = table_columns(dst, table)
    source_columns = _sqlite_columns(src, table)
    columns = [c for c in source_columns if c in target_columns]
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
        _copy_batch(dst, table, columns, rows, f"{key} > {last}")
        last = rows[-1][at]
        copied += len(rows)
        if progress:
            progress(table, there + copied, total)
    # Rows inserted later without a key must not collide with the copied ones.
    dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{key}'), "
                f"GREATEST((SELECT COALESCE(MAX({key}), 0) FROM {table}), 1))")
    return TableCopy(table, total, there, copied, [c for c in source_columns if c not in target_columns])


def _copy_batch(dst: PGConnection, table: str, columns: list[str], rows: list[tuple], where: str) -> None:
    """One batch in one transaction; a row PostgreSQL refuses is one line naming the table."""
    import psycopg
    dst.execute("BEGIN")
    try:
        with dst.raw.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                # A BLOB in a text column (SQLite does not enforce types) is copied as text.
                copy.write_row([_lenient_text(v) if isinstance(v, bytes) else v for v in row])
        dst.execute("COMMIT")
    except BaseException as exc:
        dst.execute("ROLLBACK")
        if isinstance(exc, psycopg.DatabaseError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseError(f"PostgreSQL refused the rows of {table} with {where}: {first}") from None
        raise


def _nothing_to_copy(dst: PGConnection, table: str) -> TableCopy:
    """A table the source does not have (no KG migration ran on it)."""
    return TableCopy(table, 0, dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0], 0)


def copy_database(source: str, target: str, *, batch_rows: int = BATCH_ROWS,
                  progress: Progress | None = None) -> tuple[list[TableCopy], int]:
    """Copy every table of the SQLite database `source` into the PostgreSQL database `target`
    (schema created or migrated first); returns what each table got and how many claims that
    were `processing` in SQLite went back to pending. Raises DatabaseError when the counts differ.
    """
    with closing(open_source(source)) as src, closing(PGConnection(target)) as dst:
        migrate_pg(dst)
        present = _source_tables(src)
        try:
            done = [copy_table(src, dst, table, key, batch_rows, progress) if table in present
                    else _nothing_to_copy(dst, table) for table, key in TABLES]
        except sqlite3.DatabaseError as exc:
            raise DatabaseError(f"cannot read database {source!r}: {exc}") from None
        # A claim belongs to a worker of the old database: in the new one it is nobody's.
        released = dst.execute(
            "UPDATE kg_processing_queue SET status = 'pending', lease_owner = NULL, lease_token = NULL, "
            "lease_expires_at = NULL, started_at = NULL, processing_started_at = NULL "
            "WHERE status = 'processing'").rowcount
        for table in (t for t, _ in TABLES if t in present):
            want = src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            have = dst.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            if want != have:
                raise DatabaseError(
                    f"copy not verified: {table} has {want} row(s) in {source!r} and {have} in "
                    f"{redact(target)} (was the PostgreSQL database written to by anything else?)")
    return done, released
