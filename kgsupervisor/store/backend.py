"""Which backend a --db value names (an SQLite path or a postgresql:// URL), and opening it."""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from typing import Any

from kgsupervisor.errors import DatabaseError
from kgsupervisor.masking import redact
from kgsupervisor.queue.leased import LeasedQueue, queue_for
from kgsupervisor.store.postgres import is_postgres_url
from kgsupervisor.store.schema import check_schema, init_db
from kgsupervisor.store.sqlite import connect


def backend_name(target: str) -> str:
    """`postgresql` or `sqlite`, as stats and health say it."""
    return "postgresql" if is_postgres_url(target) else "sqlite"


def describe(target: str) -> str:
    """The database as it may be shown: a URL without its password."""
    return redact(target) if is_postgres_url(target) else target


def connect_to(target: str) -> Any:
    """A connection to `target`, SQLite file or PostgreSQL URL, its schema taken as checked
    (the periodic opens of a supervisor whose start checked it)."""
    if is_postgres_url(target):
        from kgsupervisor.store.postgres import PGConnection
        return PGConnection(target)
    return connect(target)


def open_database(target: str) -> Any:
    """A connection to the schema-checked database `target`; a one-line error otherwise."""
    conn = connect_to(target)
    try:
        if is_postgres_url(target):
            from kgsupervisor.store.pgschema import check_schema_pg
            check_schema_pg(conn, redact(target))
        else:
            check_schema(conn, target)
    except BaseException:
        conn.close()
        raise
    return conn


def check_writable(target: str) -> None:
    """The schema is there and workers could write back (not a read-only file or a standby)."""
    if is_postgres_url(target):
        with closing(open_database(target)) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise DatabaseError(f"{describe(target)} is a read-only standby: workers could not write back")
        return
    # SQLite opens a file it cannot write read-only without a word, and a read-only
    # connection even accepts BEGIN IMMEDIATE: ask the file system first.
    if not os.access(target, os.W_OK):
        raise DatabaseError(f"database {target!r} is read-only: workers could not write back")
    with closing(open_database(target)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            raise DatabaseError(f"database {target!r} is not writable: {exc}") from None


def open_queue(target: str) -> LeasedQueue:
    """The queue of the database `target` (its connection is `queue.conn`)."""
    return queue_for(open_database(target))


def init_database(target: str) -> list[str]:
    """Create or migrate the schema at `target`, SQLite or PostgreSQL; idempotent."""
    if not is_postgres_url(target):
        return init_db(target)
    from kgsupervisor.store.pgschema import migrate_pg
    conn = connect_to(target)
    try:
        return migrate_pg(conn)
    finally:
        conn.close()
