"""Noticing a commit by someone else (an enqueue, a release): SQLite's data_version, PostgreSQL's NOTIFY."""
from __future__ import annotations

from typing import Any

# Channel of the NOTIFY that pgschema's triggers send when a row becomes claimable.
QUEUE_CHANNEL = "kgsupervisor_queue"


class DataVersionWatch:
    """SQLite: PRAGMA data_version changes when another connection commits; a few microseconds a look."""

    interval = 0.15  # an idle worker looks this often

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._version: int | None = None

    def changed(self) -> bool:
        try:
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        except Exception:
            return False
        changed = self._version is not None and version != self._version
        self._version = version
        return changed


class NotifyWatch:
    """PostgreSQL: LISTEN on the queue's channel; a look reads what the socket already holds."""

    interval = 0.05

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        conn.listen(QUEUE_CHANNEL)

    def changed(self) -> bool:
        try:
            return self.conn.notified()
        except Exception:
            return False
