"""The operator console's audit log: who did what to the queue, to how many rows, and when.

init-db creates its table, but `run` does not ask for it: the first action recorded creates it
when missing, so a database migrated by an older version needs no init-db to keep running."""
from __future__ import annotations

import dataclasses
from typing import Any

from kgsupervisor.masking import redact
from kgsupervisor.store.optional import ensure_optional_table, table_exists
from kgsupervisor.store.owntables import AUDIT_TABLE

__all__ = ["ACTIONS", "AUDIT_TABLE", "AuditEntry", "record_action", "recent_actions"]

# What the console records, by name.
ACTIONS = ("retry", "retry-matching", "fail-matching", "pause", "resume", "add-worker", "remove-worker",
           "drain", "login", "logout")
# A detail is shown on one line of the audit page: a filter, a reason. Who is a typed login name.
MAX_DETAIL = 1000
MAX_WHO = 200
MAX_ACTION = 50


@dataclasses.dataclass(frozen=True)
class AuditEntry:
    """One recorded action."""

    id: int
    at: float            # unix seconds
    who: str             # the name given at login and the client address, e.g. alice@127.0.0.1
    action: str
    detail: str | None
    rows: int | None     # queue rows the action changed, when it changes rows


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(text: str | None, limit: int) -> str | None:
    """`text` on one line (runs of white space as one space, NUL as U+FFFD: PostgreSQL text holds
    none), its secrets masked before the cut (no half secret left to recognise), bounded."""
    if text is None:
        return None
    return _cut(redact(" ".join(text.replace("\x00", "\ufffd").split())), limit)


def record_action(conn: Any, who: str, action: str, detail: str | None, rows: int | None, now: float) -> None:
    """Record that `who` did `action` (to `rows` queue rows) at `now`; creates the table when
    missing. `detail` (a filter, a reason: the operator's text) is masked and bounded."""
    ensure_optional_table(conn, AUDIT_TABLE)
    conn.execute(f"INSERT INTO {AUDIT_TABLE} (at, who, action, detail, rows) VALUES (?, ?, ?, ?, ?)",
                 (now, _one_line(who, MAX_WHO), _one_line(action, MAX_ACTION), _one_line(detail, MAX_DETAIL),
                  rows))


def recent_actions(conn: Any, limit: int = 100) -> list[AuditEntry]:
    """The last `limit` actions recorded, newest first; [] when none was ever recorded."""
    if not table_exists(conn, AUDIT_TABLE):
        return []
    rows = conn.execute(f"SELECT id, at, who, action, detail, rows FROM {AUDIT_TABLE} "
                        "ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [AuditEntry(*row) for row in rows]
