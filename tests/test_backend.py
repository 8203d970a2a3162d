"""One Backend per database kind: which one a target or a connection is, and how each classifies
the errors of a real SQLite file and a real PostgreSQL server."""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing

import psycopg
import pytest

from kgsupervisor.queue.leased import open_queue
from kgsupervisor.queue.sql import claim_sql
from kgsupervisor.store.backend import (POSTGRESQL, SQLITE, backend_for, backend_of, backend_of_error,
                                        check_writable, commit_watch, describe, init_database, is_driver_error)
from kgsupervisor.store.commitwatch import DataVersionWatch, NotifyWatch
from kgsupervisor.store.faults import describe_database_fault, is_database_fault, is_lock_error

from .conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def caught(step) -> BaseException:
    """The exception `step` raises (it must raise one)."""
    with pytest.raises(Exception) as info:
        step()
    return info.value


@pytest.mark.parametrize("target, name", [
    ("/var/lib/crawl/crawl.db", "sqlite"), ("relative.db", "sqlite"),
    ("postgresql://kg@db/crawl", "postgresql"), ("postgres://kg@db/crawl", "postgresql"),
    (" POSTGRESQL://kg@db/crawl", "postgresql"),
])
def test_a_target_names_its_backend(target, name):
    assert backend_for(target).name == name


def test_a_url_is_described_without_its_password_and_a_path_as_it_is():
    assert describe("postgresql://kg:s3cret@db/crawl") == "postgresql://kg:***@db/crawl"
    assert describe("/var/lib/crawl/crawl.db") == "/var/lib/crawl/crawl.db"


def test_a_connection_names_its_backend_and_gets_its_commit_watch(db_path, pg_backend):
    with closing(sqlite3.connect(db_path)) as lite, closing(pg_backend.connect()) as pg:
        assert backend_of(lite) is SQLITE and backend_of(pg) is POSTGRESQL
        assert isinstance(commit_watch(lite), DataVersionWatch)
        assert isinstance(commit_watch(pg), NotifyWatch)


def test_a_commit_by_another_connection_is_noticed(backend):
    with closing(backend.connect()) as watcher, closing(backend.connect()) as writer:
        watch = commit_watch(watcher)
        watch.changed()  # the first look sets the baseline
        assert not watch.changed()
        writer.execute("INSERT INTO kg_processing_queue (content_id, status) VALUES (1, 'pending')")
        wait_for(watch.changed, 10, message="the watch notices the other connection's commit")


def test_the_claim_names_the_index_on_sqlite_and_skips_locked_rows_on_postgresql():
    assert "INDEXED BY idx_kgq_claim_order" in claim_sql(SQLITE) and "SKIP LOCKED" not in claim_sql(SQLITE)
    assert "FOR UPDATE SKIP LOCKED" in claim_sql(POSTGRESQL) and "INDEXED BY" not in claim_sql(POSTGRESQL)


def test_init_is_idempotent_and_the_queue_opens_on_both(tmp_path, pg_server):
    for target in (str(tmp_path / "new.db"), pg_server.create_database(f"backend_init_{os.getpid()}")):
        assert init_database(target), "a new database gets its schema"
        assert init_database(target) == []
        check_writable(target)
        with closing(open_queue(target).conn) as conn:
            assert backend_of(conn) is backend_for(target)


# -- SQLite's errors -----------------------------------------------------------------------------

def test_sqlite_a_held_write_lock_is_a_lock_error_and_a_fault(db_path):
    with closing(sqlite3.connect(db_path, isolation_level=None)) as holder, \
            closing(sqlite3.connect(db_path, isolation_level=None, timeout=0)) as other:
        holder.execute("BEGIN IMMEDIATE")
        exc = caught(lambda: other.execute("BEGIN IMMEDIATE"))
        holder.execute("ROLLBACK")
    assert backend_of_error(exc) is SQLITE and is_driver_error(exc)
    assert is_lock_error(exc) and is_database_fault(exc)
    assert describe_database_fault(exc).startswith("SQLITE_BUSY: database is locked")


def test_sqlite_a_bad_row_is_not_a_fault_and_names_its_not_null_column(db_path):
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("CREATE TABLE strict_one (id INTEGER PRIMARY KEY, must TEXT NOT NULL)")
        exc = caught(lambda: conn.execute("INSERT INTO strict_one (id) VALUES (1)"))
    assert not is_database_fault(exc) and not is_lock_error(exc)
    assert SQLITE.not_null_column(exc) == "strict_one.must"


def test_errors_no_driver_raised_are_no_driver_errors():
    assert not is_driver_error(ValueError("not a database's"))
    assert not is_database_fault(ValueError("not a database's"))


# -- PostgreSQL's errors -------------------------------------------------------------------------

def test_postgresql_a_lost_connection_is_a_fault(pg_backend):
    with closing(pg_backend.connect()) as victim, closing(pg_backend.connect()) as admin:
        pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
        admin.execute("SELECT pg_terminate_backend(?)", (pid,))
        exc = caught(lambda: victim.execute("SELECT 1"))
    assert backend_of_error(exc) is POSTGRESQL and is_driver_error(exc)
    assert is_database_fault(exc) and not is_lock_error(exc)
    assert "the PostgreSQL server is unreachable, restarting or shutting down" in describe_database_fault(exc)


def test_postgresql_a_read_only_server_is_a_fault(pg_backend):
    with closing(pg_backend.connect()) as conn:
        conn.execute("SET default_transaction_read_only = on")
        exc = caught(lambda: conn.execute("INSERT INTO crawled_content (url) VALUES ('https://example.org/r')"))
    assert getattr(exc, "sqlstate", None) == "25006"
    assert is_database_fault(exc)
    assert describe_database_fault(exc).startswith("ReadOnlySqlTransaction (25006): ")
    assert describe_database_fault(exc).endswith("(the PostgreSQL server is read-only (a standby?))")


def test_postgresql_a_lock_timeout_is_a_lock_error(pg_backend):
    with closing(pg_backend.connect()) as holder, closing(pg_backend.connect()) as other:
        holder.execute("INSERT INTO crawled_content (url) VALUES ('https://example.org/l')")
        holder.execute("BEGIN")
        holder.execute("UPDATE crawled_content SET title = 'held'")
        other.execute("SET lock_timeout = '10ms'")
        exc = caught(lambda: other.execute("UPDATE crawled_content SET title = 'waits'"))
        holder.execute("ROLLBACK")
    assert isinstance(exc, psycopg.errors.LockNotAvailable)
    assert is_lock_error(exc) and not is_database_fault(exc)


def test_postgresql_a_bad_row_is_not_a_fault_and_names_its_not_null_column(pg_backend):
    with closing(pg_backend.connect()) as conn:
        conn.execute("CREATE TABLE strict_one (id INTEGER PRIMARY KEY, must TEXT NOT NULL)")
        exc = caught(lambda: conn.execute("INSERT INTO strict_one (id) VALUES (1)"))
    assert not is_database_fault(exc) and not is_lock_error(exc)
    assert POSTGRESQL.not_null_column(exc) == "strict_one.must"


def test_postgresql_text_is_stored_without_nul_and_sqlite_rows_as_they_are():
    rows = [(1, "a\x00b", None)]
    assert POSTGRESQL.storable(rows) == [(1, "a\ufffdb", None)]
    assert SQLITE.storable(rows) == rows
