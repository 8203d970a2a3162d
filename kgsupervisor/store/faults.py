"""A database that cannot be written: which errors those are, what to tell the operator, how long to pause."""
from __future__ import annotations

import logging
import sqlite3
import time

from kgsupervisor.errors import DatabaseBusy, DatabaseError

# A database that cannot be written (read-only, disk full, I/O errors, locked for minutes) pauses
# the worker with this backoff; it never fails a document and never kills the worker.
DB_FAULT_BACKOFF_FIRST = 0.25
DB_FAULT_BACKOFF_MAX = 5.0
DB_FAULT_LOG_EVERY = 30.0


# PostgreSQL SQLSTATE classes of a server in trouble rather than a bad statement: connection
# lost, out of disk or memory, shutting down, system or internal error, a deadlock that outlived
# its retries; and 25006, a read-only server (a standby after a failover).
PG_FAULT_CLASSES = {"08", "53", "57", "58", "XX", "40"}


def is_database_fault(exc: BaseException) -> bool:
    """A problem of the database as a whole, not of one document: worth waiting out.

    OperationalError covers locked, read-only, full, I/O error and cannot-open; a bare
    DatabaseError is a damaged file. IntegrityError, DataError or ProgrammingError would be a
    bug or a bad document and still surface as one. On PostgreSQL: a lost connection (no
    SQLSTATE) and the classes above.
    """
    if type(exc).__module__.startswith("psycopg"):
        state = getattr(exc, "sqlstate", None)
        return state is None or state[:2] in PG_FAULT_CLASSES or state == "25006"
    return (isinstance(exc, (sqlite3.OperationalError, DatabaseError))
            or type(exc) is sqlite3.DatabaseError)


def is_corruption(exc: BaseException) -> bool:
    """SQLite found a damaged page (SQLITE_CORRUPT): perhaps only one document's rows."""
    return isinstance(exc, sqlite3.DatabaseError) and "CORRUPT" in (getattr(exc, "sqlite_errorname", "") or "")


def describe_database_fault(exc: BaseException) -> str:
    """The SQLite error and what an operator should look at."""
    if type(exc).__module__.startswith("psycopg"):
        return _describe_postgres_fault(exc)
    name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
    if isinstance(exc, DatabaseBusy):
        hint = "another program holds a write transaction (find it with: fuser DB)"
    elif "FULL" in name:
        hint = "the disk holding the database is full"
    elif "READONLY" in name or "readonly" in str(exc):
        hint = "the database file or its directory is read-only"
    elif "IOERR" in name:
        hint = "the database file cannot be written (read-only or immutable file, failing or full disk)"
    elif "CORRUPT" in name or "NOTADB" in name:
        hint = "the database file is damaged (check it with: PRAGMA integrity_check)"
    elif "CANTOPEN" in name:
        hint = "the database or its -wal/-shm file cannot be opened"
    else:
        hint = "the database cannot be used"
    return f"{name}: {exc} ({hint})"


def _describe_postgres_fault(exc: BaseException) -> str:
    state = getattr(exc, "sqlstate", None) or ""
    if not state or state[:2] in ("08", "57"):
        hint = "the PostgreSQL server is unreachable, restarting or shutting down"
    elif state == "53100":
        hint = "the PostgreSQL server's disk is full"
    elif state[:2] == "53":
        hint = "the PostgreSQL server is out of resources (memory, connections)"
    elif state == "25006":
        hint = "the PostgreSQL server is read-only (a standby?)"
    else:
        hint = "the PostgreSQL server cannot be used"
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}{f' ({state})' if state else ''}: {text} ({hint})"


class DatabasePause:
    """How long a worker has waited out a database fault, its next pause, when it last said so."""

    def __init__(self, log: logging.Logger | logging.LoggerAdapter) -> None:
        self.log = log
        self.since: float | None = None  # monotonic; set while the database fails
        self.backoff = 0.0
        self.logged = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note one more failure, log it (an error once, then every 30 s), return the pause."""
        mono = time.monotonic()
        first = self.since is None
        if first:
            self.since = mono
        self.backoff = min(max(self.backoff * 2, DB_FAULT_BACKOFF_FIRST), DB_FAULT_BACKOFF_MAX)
        if first:
            self.log.error("database error, pausing (no document is charged; claims go back to "
                           "pending once it is writable): %s", describe_database_fault(exc))
            self.logged = mono
        elif mono - self.logged >= DB_FAULT_LOG_EVERY:
            self.log.warning("database still failing after %.0fs: %s", mono - self.since,
                             describe_database_fault(exc))
            self.logged = mono
        return self.backoff

    def recovered(self) -> None:
        """A step went through: say so if it had been failing, and start the backoff afresh."""
        if self.since is not None:
            self.log.info("database works again after %.1fs; resuming", time.monotonic() - self.since)
            self.since = None
        self.backoff = 0.0
