"""The console's audit log (queue/audit.py) on SQLite and PostgreSQL: init-db makes its table, the
start check does not ask for it, the first action made creates it, and what it stores is masked."""
from __future__ import annotations

from contextlib import closing

import pytest

from kgsupervisor.queue.audit import AUDIT_TABLE, MAX_DETAIL, AuditEntry, recent_actions, record_action
from kgsupervisor.store.backend import init_database, open_database

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0


def audit_rows(conn) -> list[tuple]:
    return conn.execute(f"SELECT who, action, detail, rows FROM {AUDIT_TABLE} ORDER BY id").fetchall()


def test_init_db_makes_the_table_and_an_older_database_runs_and_records_without_it(backend):
    with closing(backend.connect()) as conn:
        assert audit_rows(conn) == [], "init-db made the table"
        conn.execute(f"DROP TABLE {AUDIT_TABLE}")  # as a database an older version migrated
    with closing(open_database(backend.target)) as conn:  # the start check of `run`
        assert recent_actions(conn) == []
        record_action(conn, "alice@127.0.0.1", "pause", "reason: deploy", None, NOW)
        record_action(conn, "alice@127.0.0.1", "retry-matching", "status=failed error=500", 12, NOW + 1)
        assert recent_actions(conn) == [
            AuditEntry(2, NOW + 1, "alice@127.0.0.1", "retry-matching", "status=failed error=500", 12),
            AuditEntry(1, NOW, "alice@127.0.0.1", "pause", "reason: deploy", None)]
        assert [entry.action for entry in recent_actions(conn, limit=1)] == ["retry-matching"]
        conn.execute(f"DROP TABLE {AUDIT_TABLE}")
    assert f"created table {AUDIT_TABLE}" in init_database(backend.target)


def test_secrets_in_what_is_recorded_are_masked_and_it_is_bounded_and_on_one_line(backend):
    with closing(backend.connect()) as conn:
        detail = ("moved to postgresql://bob:s3cret-pw@db.example/kg\nAuthorization: Bearer abcdefghijklmnop "
                  + "x" * 5000)
        record_action(conn, "mallory\n@10.0.0.9", "fail-matching", detail, 3, NOW)
        [(who, action, stored, rows)] = audit_rows(conn)
    assert (who, action, rows) == ("mallory @10.0.0.9", "fail-matching", 3)
    assert "s3cret-pw" not in stored and "abcdefghijklmnop" not in stored and "\n" not in stored
    assert stored.startswith("moved to postgresql://bob:***@db.example/kg Authorization: ")
    assert len(stored) == MAX_DETAIL and stored.endswith("...")


def test_a_detail_holding_nul_or_nothing_is_stored(backend):
    with closing(backend.connect()) as conn:
        record_action(conn, "bob@127.0.0.1", "login", None, None, NOW)
        record_action(conn, "bob@127.0.0.1", "logout", "a\x00b", None, NOW)
        assert audit_rows(conn) == [("bob@127.0.0.1", "login", None, None),
                                    ("bob@127.0.0.1", "logout", "a\ufffdb", None)]
