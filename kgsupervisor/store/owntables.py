"""The tables kgsupervisor keeps for itself beside the upstream's: the attempt history, the
pause flag, the registry of supervisors and the console's audit log; one declaration for SQLite
and PostgreSQL."""
from __future__ import annotations

from typing import Any

# Times are REAL unix seconds, as the lease columns are: one numeric comparison to prune or to
# tell a gone host, the same values in both backends (copy-db moves them verbatim).
ATTEMPTS_TABLE = "kg_processing_attempts"
CONTROL_TABLE = "kg_supervisor_control"
HOSTS_TABLE = "kg_supervisor_hosts"
AUDIT_TABLE = "kg_supervisor_audit"
WORKERS_TABLE = "kg_supervisor_workers"
BUDGET_SPENDS_TABLE = "kg_supervisor_budget_spends"

# One row per outcome of a claim (docs/history.md): the lease token is the claim's, so a claim
# has at most one outcome recorded (a unique index), whoever records it.
ATTEMPT_COLUMNS: dict[str, str] = {
    "id": "{id}",
    "queue_id": "INTEGER NOT NULL",
    "content_id": "INTEGER",
    "attempt": "INTEGER NOT NULL",          # 1 for the first claim of this queue row, ...
    "claim_key": "TEXT NOT NULL",            # the claim: its lease token and queue row, TOKEN/ID
    "owner": "TEXT",                         # host:pid of the worker
    "worker": "INTEGER",                     # its worker number in the pool
    "endpoint": "TEXT",                      # the KG service URL, credentials stripped
    "claimed_at": "{real}",
    "sent_at": "{real}",
    "finished_at": "{real} NOT NULL",
    "duration": "{real}",                    # seconds from claim to outcome
    "outcome": "TEXT NOT NULL",              # history.Outcome
    "http_status": "INTEGER",
    "error_class": "TEXT",
    "error_message": "TEXT",                 # bounded, secrets masked
    "answer_bytes": "INTEGER",
    "entities": "INTEGER",
    "relationships": "INTEGER",
    "stack": "TEXT",                         # a hung worker's stack, captured before the kill
}
# The pause flag (and any later switch every host obeys): one row per name.
CONTROL_COLUMNS: dict[str, str] = {
    "name": "TEXT PRIMARY KEY",
    "value": "TEXT",
    "reason": "TEXT",
    "since": "{real}",
    "set_by": "TEXT",                        # host:pid of the command that set it
}
# One row per supervisor process, refreshed every few seconds.
HOST_COLUMNS: dict[str, str] = {
    "host": "TEXT NOT NULL",
    "pid": "INTEGER NOT NULL",
    "started_at": "{real}",
    "heartbeat_at": "{real}",
    "workers_wanted": "INTEGER",
    "workers_running": "INTEGER",
    "version": "TEXT",
    "status_addr": "TEXT",
    "state": "TEXT",                         # starting, running, paused, draining, stopped
}
# One row per operator action taken in the console (queue.audit).
AUDIT_COLUMNS: dict[str, str] = {
    "id": "{id}",
    "at": "{real} NOT NULL",
    "who": "TEXT",                           # the name given at login and the client address
    "action": "TEXT NOT NULL",
    "detail": "TEXT",                        # bounded, secrets masked
    "rows": "INTEGER",                       # queue rows the action changed
}
# Each supervisor's workers as it last saw them (JSON), written with its registry row: what a
# console shows of the workers of another host.
WORKERS_COLUMNS: dict[str, str] = {
    "host": "TEXT NOT NULL",
    "pid": "INTEGER NOT NULL",               # the supervisor's pid
    "updated_at": "{real}",
    "workers": "TEXT",                       # [{worker_id, pid, state, content_id, held_seconds, ...}]
    "_key": "UNIQUE (host, pid)",
}
# One row per request spent from a KG endpoint's rate budget by any host (queue.hostbudgets); rows
# older than the window are deleted as spends go. Stamps are integer milliseconds of the database
# server's clock, not REAL seconds: the window's edges are compared exactly.
BUDGET_SPENDS_COLUMNS: dict[str, str] = {
    "endpoint": "TEXT NOT NULL",
    "spent_ms": "BIGINT NOT NULL",
    "tokens": "INTEGER NOT NULL",            # estimated tokens of the document; the row is 1 request
}
OWN_TABLES: dict[str, dict[str, str]] = {
    ATTEMPTS_TABLE: ATTEMPT_COLUMNS, CONTROL_TABLE: CONTROL_COLUMNS, HOSTS_TABLE: HOST_COLUMNS,
    AUDIT_TABLE: AUDIT_COLUMNS, WORKERS_TABLE: WORKERS_COLUMNS, BUDGET_SPENDS_TABLE: BUDGET_SPENDS_COLUMNS,
}
# Tables init-db creates that the start check does not ask for: their writer creates them when
# missing, so a database migrated by an older version keeps running without init-db.
OPTIONAL_TABLES = {AUDIT_TABLE, WORKERS_TABLE, BUDGET_SPENDS_TABLE}
OWN_INDEXES: dict[str, str] = {
    "idx_kga_claim": f"CREATE UNIQUE INDEX IF NOT EXISTS idx_kga_claim ON {ATTEMPTS_TABLE} (claim_key)",
    "idx_kga_queue": f"CREATE INDEX IF NOT EXISTS idx_kga_queue ON {ATTEMPTS_TABLE} (queue_id, id)",
    "idx_kga_content": f"CREATE INDEX IF NOT EXISTS idx_kga_content ON {ATTEMPTS_TABLE} (content_id, id)",
    "idx_kga_finished": f"CREATE INDEX IF NOT EXISTS idx_kga_finished ON {ATTEMPTS_TABLE} (finished_at)",
    "idx_kga_failures": f"CREATE INDEX IF NOT EXISTS idx_kga_failures ON {ATTEMPTS_TABLE} "
                        "(outcome, error_class, finished_at)",
    "idx_kgh_host": f"CREATE UNIQUE INDEX IF NOT EXISTS idx_kgh_host ON {HOSTS_TABLE} (host, pid)",
}
SQLITE_SPELLING = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL"}
POSTGRES_SPELLING = {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "real": "DOUBLE PRECISION"}


def own_table_ddl(table: str, spelling: dict[str, str]) -> str:
    """CREATE TABLE IF NOT EXISTS of one of our tables, in a backend's spelling."""
    # A name starting with "_" is a table constraint, not a column.
    columns = ", ".join(declaration.format(**spelling) if name.startswith("_")
                        else f"{name} {declaration.format(**spelling)}"
                        for name, declaration in OWN_TABLES[table].items())
    return f"CREATE TABLE IF NOT EXISTS {table} ({columns})"


def create_own_tables(conn: Any, have: set[str], indexes: set[str], spelling: dict[str, str]) -> list[str]:
    """Create the tables of ours not in `have` and the indexes not in `indexes`, inside the
    caller's migration transaction; returns what was done."""
    changes = []
    for table in OWN_TABLES:
        if table not in have:
            conn.execute(own_table_ddl(table, spelling))
            changes.append(f"created table {table}")
    for name, ddl in OWN_INDEXES.items():
        if name not in indexes:
            conn.execute(ddl)
            changes.append(f"created index {name}")
    return changes


def lacking_own(have: set[str], indexes: set[str]) -> list[str]:
    """What of ours a database lacks, as require_schema words it."""
    return ([f"no {table} table" for table in OWN_TABLES if table not in have | OPTIONAL_TABLES]
            + [f"lacks index {name}" for name in OWN_INDEXES if name not in indexes])

