"""One Backend per database kind, an SQLite file or a postgresql:// URL: everything that differs."""
from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from typing import Any

from kgsupervisor.errors import DatabaseBusy, DatabaseError
from kgsupervisor.masking import redact
from kgsupervisor.store.commitwatch import QUEUE_CHANNEL, DataVersionWatch, NotifyWatch, sqlite_commit_watch
from kgsupervisor.store.pgschema import FOLD_COUNT_ROWS_SQL, check_schema_pg, migrate_pg
from kgsupervisor.store.postgres import PGConnection, is_postgres_url
from kgsupervisor.store.schema import check_schema, init_db
from kgsupervisor.store.sqlite import connect

# PostgreSQL SQLSTATE classes of a server in trouble rather than a bad statement: connection
# lost, out of disk or memory, shutting down, system or internal error, a deadlock that outlived
# its retries; and 25006, a read-only server (a standby after a failover).
PG_FAULT_CLASSES = {"08", "53", "57", "58", "XX", "40"}
# PostgreSQL waits for row locks by itself; what is worth running again is a deadlock, a
# serialisation failure or a lock timeout.
PG_RETRYABLE = {"40P01", "40001", "55P03"}


class Backend:
    """What one kind of database does its own way; the database itself is named by a target
    (a path or a URL) or a connection, so one instance serves every database of its kind."""

    name = ""  # as stats and health say it
    # The claim's dialect: the index its subquery names, and how it locks the rows it picks.
    claim_index = ""
    claim_locking = ""

    def names(self, target: str) -> bool:
        """Does `target` (a --db value) name a database of this kind?"""
        raise NotImplementedError

    def holds(self, conn: object) -> bool:
        """Is `conn` a connection to a database of this kind?"""
        raise NotImplementedError

    def raised(self, exc: BaseException) -> bool:
        """Did this kind's driver raise `exc`?"""
        raise NotImplementedError

    def describe(self, target: str) -> str:
        """The database as it may be shown: no password in it."""
        return target

    def connect(self, target: str) -> Any:
        """A connection to `target`, its schema taken as checked (the periodic opens of a
        supervisor whose start checked it)."""
        raise NotImplementedError

    def check_schema(self, conn: Any, target: str) -> None:
        """One line naming what the database lacks, else nothing."""
        raise NotImplementedError

    def open(self, target: str) -> Any:
        """A connection to the schema-checked database `target`; a one-line error otherwise."""
        conn = self.connect(target)
        try:
            self.check_schema(conn, target)
        except BaseException:
            conn.close()
            raise
        return conn

    def check_writable(self, target: str) -> None:
        """The schema is there and workers could write back."""
        raise NotImplementedError

    def init(self, target: str) -> list[str]:
        """Create or migrate the schema at `target`; idempotent. Returns what was changed."""
        raise NotImplementedError

    def commit_watch(self, conn: Any, mode: str = "auto") -> DataVersionWatch | NotifyWatch:
        """What notices a commit by someone else (an enqueue, a release) on `conn`; `mode`
        `poll` looks every so often even where events could be waited for."""
        raise NotImplementedError

    def wake_claimers(self, conn: Any) -> None:
        """Wake every idle claimer on `conn`'s database, on every host, with the commit of the
        transaction under way (a change no queue row shows, such as a lifted pause). SQLite's
        watchers notice any commit by themselves."""

    def lenient_text(self, column: str) -> str:
        """`column` as a read that must survive text which is not UTF-8 spells it."""
        return column

    def storable(self, rows: list[tuple]) -> list[tuple]:
        """Rows to insert, their values as this database can hold them."""
        return rows

    def fold_count_rows(self, conn: Any) -> None:
        """Periodic upkeep of the status counts table (with the lease-expiry backstop)."""

    def is_lock_error(self, exc: BaseException) -> bool:
        """Another writer holds what `exc`'s statement needed: worth running again."""
        raise NotImplementedError

    def is_fault(self, exc: BaseException) -> bool:
        """A problem of the database as a whole, not of one document: worth waiting out."""
        raise NotImplementedError

    def is_corruption(self, exc: BaseException) -> bool:
        """A damaged page: perhaps only one document's rows."""
        return False

    def describe_fault(self, exc: BaseException) -> str:
        """The error and what an operator should look at."""
        raise NotImplementedError

    def not_null_column(self, exc: BaseException) -> str | None:
        """`table.column` of the NOT NULL violation `exc`, else None."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    """A file of SQLite in WAL mode: one writer at a time, the claim served by its partial index."""

    name = "sqlite"
    claim_index = "INDEXED BY idx_kgq_claim_order"

    def names(self, target: str) -> bool:
        return not is_postgres_url(target)

    def holds(self, conn: object) -> bool:
        return isinstance(conn, sqlite3.Connection)

    def raised(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error)

    def connect(self, target: str) -> sqlite3.Connection:
        return connect(target)

    def check_schema(self, conn: Any, target: str) -> None:
        check_schema(conn, target)

    def check_writable(self, target: str) -> None:
        # SQLite opens a file it cannot write read-only without a word, and a read-only
        # connection even accepts BEGIN IMMEDIATE: ask the file system first.
        if not os.access(target, os.W_OK):
            raise DatabaseError(f"database {target!r} is read-only: workers could not write back")
        with closing(self.open(target)) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                raise DatabaseError(f"database {target!r} is not writable: {exc}") from None

    def init(self, target: str) -> list[str]:
        return init_db(target)

    def commit_watch(self, conn: Any, mode: str = "auto") -> DataVersionWatch:
        return sqlite_commit_watch(conn, mode)

    def lenient_text(self, column: str) -> str:
        # Read as bytes and decoded leniently: a crawler that stored invalid UTF-8 must cost one
        # document a replacement character, not crash the worker with "Could not decode to UTF-8".
        return f"CAST({column} AS BLOB)"

    def is_lock_error(self, exc: BaseException) -> bool:
        """SQLITE_BUSY / SQLITE_LOCKED."""
        if not isinstance(exc, sqlite3.OperationalError):
            return False
        text = str(exc).lower()
        return "locked" in text or "busy" in text

    def is_fault(self, exc: BaseException) -> bool:
        """OperationalError covers locked, read-only, full, I/O error and cannot-open; a bare
        DatabaseError is a damaged file. IntegrityError, DataError or ProgrammingError would be a
        bug or a bad document and still surface as one."""
        return (isinstance(exc, (sqlite3.OperationalError, DatabaseError))
                or type(exc) is sqlite3.DatabaseError)

    def is_corruption(self, exc: BaseException) -> bool:
        """SQLITE_CORRUPT."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        return isinstance(exc, sqlite3.DatabaseError) and "CORRUPT" in name

    def describe_fault(self, exc: BaseException) -> str:
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        return f"{name}: {exc} ({self._hint(exc, name)})"

    @staticmethod
    def _hint(exc: BaseException, name: str) -> str:
        if isinstance(exc, DatabaseBusy):
            return "another program holds a write transaction (find it with: fuser DB)"
        if "FULL" in name:
            return "the disk holding the database is full"
        if "READONLY" in name or "readonly" in str(exc):
            return "the database file or its directory is read-only"
        if "IOERR" in name:
            return "the database file cannot be written (read-only or immutable file, failing or full disk)"
        if "CORRUPT" in name or "NOTADB" in name:
            return "the database file is damaged (check it with: PRAGMA integrity_check)"
        if "CANTOPEN" in name:
            return "the database or its -wal/-shm file cannot be opened"
        return "the database cannot be used"

    def not_null_column(self, exc: BaseException) -> str | None:
        if isinstance(exc, sqlite3.IntegrityError):
            match = re.match(r"NOT NULL constraint failed: (\S+)", str(exc))
            return match.group(1) if match else None
        return None


class PostgresBackend(Backend):
    """A PostgreSQL database: claimers on many hosts skip each other's locked rows."""

    name = "postgresql"
    claim_locking = "FOR UPDATE SKIP LOCKED"

    def names(self, target: str) -> bool:
        return is_postgres_url(target)

    def holds(self, conn: object) -> bool:
        return isinstance(conn, PGConnection)

    def raised(self, exc: BaseException) -> bool:
        return type(exc).__module__.startswith("psycopg")

    def describe(self, target: str) -> str:
        return redact(target)

    def connect(self, target: str) -> PGConnection:
        return PGConnection(target)

    def check_schema(self, conn: Any, target: str) -> None:
        check_schema_pg(conn, redact(target))

    def check_writable(self, target: str) -> None:
        """Not a read-only standby either."""
        with closing(self.open(target)) as conn:
            if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                raise DatabaseError(f"{self.describe(target)} is a read-only standby: "
                                    "workers could not write back")

    def init(self, target: str) -> list[str]:
        with closing(self.connect(target)) as conn:
            return migrate_pg(conn)

    def commit_watch(self, conn: Any, mode: str = "auto") -> NotifyWatch:
        return NotifyWatch(conn, mode)

    def wake_claimers(self, conn: Any) -> None:
        """A NOTIFY on the channel every idle worker LISTENs on, as the queue's triggers send."""
        conn.execute("SELECT pg_notify(?, '')", (QUEUE_CHANNEL,))

    def storable(self, rows: list[tuple]) -> list[tuple]:
        """PostgreSQL text cannot hold NUL: an answer with one gets U+FFFD there, as undecodable
        bytes do on the way in, instead of failing its whole batch."""
        return [tuple(v.replace("\x00", "\ufffd") if isinstance(v, str) and "\x00" in v else v for v in row)
                for row in rows]

    def fold_count_rows(self, conn: Any) -> None:
        """The count rows of closed connections folded into one, so a count reads few rows
        however many connections have come and gone."""
        conn.execute(FOLD_COUNT_ROWS_SQL)

    def is_lock_error(self, exc: BaseException) -> bool:
        """A deadlock, a serialisation failure or a lock timeout."""
        return getattr(exc, "sqlstate", None) in PG_RETRYABLE

    def is_fault(self, exc: BaseException) -> bool:
        """A lost connection (no SQLSTATE) and the classes of PG_FAULT_CLASSES."""
        state = getattr(exc, "sqlstate", None)
        return state is None or state[:2] in PG_FAULT_CLASSES or state == "25006"

    def describe_fault(self, exc: BaseException) -> str:
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

    def not_null_column(self, exc: BaseException) -> str | None:
        if getattr(exc, "sqlstate", None) == "23502":  # psycopg's NotNullViolation
            diag = getattr(exc, "diag", None)
            return f"{getattr(diag, 'table_name', '?')}.{getattr(diag, 'column_name', '?')}"
        return None


SQLITE = SQLiteBackend()
POSTGRESQL = PostgresBackend()
BACKENDS = (POSTGRESQL, SQLITE)  # the URL is asked first: anything else is a path


def backend_for(target: str) -> Backend:
    """The backend of a --db value: a postgresql:// URL, else an SQLite path."""
    return next(b for b in BACKENDS if b.names(target))


def backend_of(conn: object) -> Backend:
    """The backend of an open connection."""
    return POSTGRESQL if POSTGRESQL.holds(conn) else SQLITE


def backend_of_error(exc: BaseException) -> Backend:
    """The backend whose driver raised `exc`; SQLite's for kgsupervisor's own DatabaseError
    (busy for minutes, cannot reconnect), which it has always described."""
    return POSTGRESQL if POSTGRESQL.raised(exc) else SQLITE


def is_driver_error(exc: BaseException) -> bool:
    """Did a database driver (sqlite3, psycopg) raise `exc`?"""
    return any(b.raised(exc) for b in BACKENDS)


# The names the rest of kgsupervisor calls, each the target's backend at work.

def backend_name(target: str) -> str:
    """`postgresql` or `sqlite`, as stats and health say it."""
    return backend_for(target).name


def describe(target: str) -> str:
    """The database as it may be shown: a URL without its password."""
    return backend_for(target).describe(target)


def connect_to(target: str) -> Any:
    """A connection to `target`, its schema taken as checked."""
    return backend_for(target).connect(target)


def open_database(target: str) -> Any:
    """A connection to the schema-checked database `target`; a one-line error otherwise."""
    return backend_for(target).open(target)


def check_writable(target: str) -> None:
    """The schema is there and workers could write back (not a read-only file or a standby)."""
    backend_for(target).check_writable(target)


def init_database(target: str) -> list[str]:
    """Create or migrate the schema at `target`, SQLite or PostgreSQL; idempotent."""
    return backend_for(target).init(target)


def commit_watch(conn: Any, mode: str = "auto") -> DataVersionWatch | NotifyWatch:
    """The watch that suits this connection's backend (`mode`: KG_COMMIT_WATCH)."""
    return backend_of(conn).commit_watch(conn, mode)
