"""The registry of supervisors (kg_supervisor_hosts): each supervisor writes its own row, `status
--all` reads them all. The same SQL on SQLite and PostgreSQL."""
from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timezone
from typing import Any

from kgsupervisor.store.backend import SQLITE, backend_of, connect_to
from kgsupervisor.store.optional import ensure_optional_table, table_exists
from kgsupervisor.store.owntables import HOSTS_TABLE, WORKERS_TABLE

GONE = "gone"  # shown, never stored: a row whose heartbeat is older than the lease
STOPPED = "stopped"
REGISTRY_WAIT = 0.25  # seconds a registry write may wait for a lock: the supervisor's loop waits with it

COLUMNS = ("host", "pid", "started_at", "heartbeat_at", "workers_wanted", "workers_running", "version",
           "status_addr", "state")
# (host, pid) is unique (idx_kgh_host): a supervisor's row is updated in place, and a pid reused
# on the same host takes the old row over.
UPSERT_SQL = (f"INSERT INTO {HOSTS_TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
              "ON CONFLICT (host, pid) DO UPDATE SET "
              + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[2:]))


@dataclasses.dataclass(frozen=True)
class HostRow:
    """One supervisor as its row says; times are unix seconds."""

    host: str
    pid: int
    started_at: float | None
    heartbeat_at: float | None
    workers_wanted: int | None
    workers_running: int | None
    version: str | None
    status_addr: str | None  # None when its status endpoint is off
    state: str  # starting, running, paused, draining, stopped

    def shown_state(self, now: float, lease: float) -> str:
        """Its state, or `gone` when it stopped beating without saying so for over a lease."""
        if self.state != STOPPED and (self.heartbeat_at is None or now - self.heartbeat_at > lease):
            return GONE
        return self.state

    def describe(self, now: float, lease: float) -> dict[str, Any]:
        """The row as `status --all --json` shows it: its shown state, ISO 8601 times, the age of
        its heartbeat in seconds."""
        age = None if self.heartbeat_at is None else round(max(0.0, now - self.heartbeat_at), 1)
        return {"host": self.host, "pid": self.pid, "state": self.shown_state(now, lease),
                "workers_running": self.workers_running, "workers_wanted": self.workers_wanted,
                "version": self.version, "status_addr": self.status_addr,
                "started_at": iso_time(self.started_at), "heartbeat_at": iso_time(self.heartbeat_at),
                "heartbeat_age": age}


def iso_time(unix: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC, as the stats say times."""
    return None if unix is None else datetime.fromtimestamp(unix, timezone.utc).isoformat(timespec="seconds")


def upsert_host(conn: Any, row: HostRow) -> None:
    """Write a supervisor's row: one autocommitted statement."""
    conn.execute(UPSERT_SQL, dataclasses.astuple(row))


def mark_stopped(conn: Any, host: str, pid: int, now: float) -> None:
    """A supervisor's clean exit: its row says stopped, with no worker running."""
    conn.execute(f"UPDATE {HOSTS_TABLE} SET state = ?, heartbeat_at = ?, workers_running = 0 "
                 "WHERE host = ? AND pid = ?", (STOPPED, now, host, pid))


def prune_hosts(conn: Any, before: float) -> int:
    """Delete the rows of supervisors not heard of since `before` (gone or stopped); how many."""
    if table_exists(conn, WORKERS_TABLE):
        conn.execute(f"DELETE FROM {WORKERS_TABLE} WHERE updated_at < ?", (before,))
    return conn.execute(f"DELETE FROM {HOSTS_TABLE} WHERE heartbeat_at < ?", (before,)).rowcount


def upsert_workers(conn: Any, host: str, pid: int, workers: list[dict[str, Any]], now: float) -> None:
    """Write the workers of supervisor (host, pid) as it sees them now (the table made on first use)."""
    ensure_optional_table(conn, WORKERS_TABLE)
    conn.execute(f"INSERT INTO {WORKERS_TABLE} (host, pid, updated_at, workers) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (host, pid) DO UPDATE SET updated_at = excluded.updated_at, "
                 "workers = excluded.workers", (host, pid, now, json.dumps(workers)))


def read_workers(conn: Any) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Each supervisor's workers as it last wrote them, by (host, pid); unreadable JSON is none."""
    if not table_exists(conn, WORKERS_TABLE):
        return {}
    found = {}
    for host, pid, text in conn.execute(f"SELECT host, pid, workers FROM {WORKERS_TABLE}").fetchall():
        try:
            workers = json.loads(text or "[]")
        except ValueError:  # a row written by hand, or cut short: show no workers, not an error page
            workers = []
        found[(host, pid)] = [w for w in workers if isinstance(w, dict)] if isinstance(workers, list) else []
    return found


def read_hosts(conn: Any) -> list[HostRow]:
    """Every supervisor's row, by host and pid."""
    rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {HOSTS_TABLE} ORDER BY host, pid").fetchall()
    return [HostRow(*row) for row in rows]


def registry_connection(target: str) -> Any:
    """A connection for the registry's writes that never holds the supervisor up long: a
    database locked by a writer is given up on after REGISTRY_WAIT and tried again later."""
    conn = connect_to(target)
    try:
        if backend_of(conn) is SQLITE:
            conn.execute(f"PRAGMA busy_timeout = {int(REGISTRY_WAIT * 1000)}")
        else:
            conn.execute(f"SET statement_timeout = {int(REGISTRY_WAIT * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn
