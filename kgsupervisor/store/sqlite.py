"""Open SQLite connections the way every part of kgsupervisor needs them, and run transactions."""
from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from kgsupervisor.errors import DatabaseError

log = logging.getLogger("kgsupervisor.db")

MIN_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING
BUSY_TIMEOUT_MS = 5000


def check_sqlite_version(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Refuse to run on an SQLite without RETURNING."""
    if tuple(version) < MIN_SQLITE:
        have = ".".join(map(str, version))
        raise DatabaseError(
            f"SQLite {have} is too old: kgsupervisor needs SQLite >= 3.35 (UPDATE ... RETURNING)"
        )


def check_is_sqlite_file(path: str) -> None:
    """Fail with one line when `path` is missing, a directory or unreadable.

    It never opens the file: closing any descriptor of a database drops every POSIX lock this
    process holds on it, including those of its live connections, and a neighbour closing
    its connection would then delete the WAL under them.
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        raise DatabaseError(f"database {path!r} does not exist (create it with: kgsupervisor init-db --db {path})") from None
    except OSError as exc:  # not "does not exist": a directory on the way cannot be searched, or is a file
        raise DatabaseError(f"database {path!r} cannot be reached: {exc.strerror} "
                            f"(check the directories on its path)") from None
    if os.path.isdir(path):
        raise DatabaseError(f"database {path!r} is a directory, not an SQLite file")
    if not os.access(path, os.R_OK):
        raise DatabaseError(f"database {path!r} is not readable by this user")


def connect(path: str, *, create: bool = False) -> sqlite3.Connection:
    """Open `path` in autocommit mode with WAL, busy_timeout and synchronous=NORMAL.

    Transactions are explicit (`transaction()`), so the driver never opens one behind our back.
    """
    check_sqlite_version()
    if not create or os.path.exists(path):
        check_is_sqlite_file(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise DatabaseError(f"{path!r} is not an SQLite database") from None
        raise DatabaseError(f"cannot open database {path!r}: {exc}{_unwritable_hint(path)}") from None
    if mode.lower() != "wal":
        log.warning("database %s is in journal_mode=%s, not WAL: concurrent workers will block", path, mode)
    return conn


def _unwritable_hint(path: str) -> str:
    """Why SQLite may have failed to open a WAL database: it, or the directory where the -wal and
    -shm files must live, is read-only (access() also sees an immutable flag, even as root)."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return " (the database file is read-only)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f" (its directory {directory!r} is read-only: SQLite creates the -wal and -shm files there)"
    return ""


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so a read-then-write never fails half-way with
    SQLITE_BUSY after it has read (the deferred-upgrade deadlock).
    """
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")

