"""The pause flag an operator sets in the database (`kgsupervisor pause` / `resume`): while its row
is there, the claim statement takes nothing (queue.sql.pause_terms), on every host at once."""
from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

from kgsupervisor.queue.sql import PAUSED_FLAG
from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.owntables import CONTROL_TABLE
from kgsupervisor.store.sqlite import transaction

# A reason is shown on one line everywhere (status, the sd_notify STATUS= line): bounded.
MAX_REASON = 500


@dataclasses.dataclass(frozen=True)
class Pause:
    """The pause in force: why, since when (unix seconds) and who set it (host:pid)."""

    reason: str | None
    since: float
    set_by: str | None

    def as_dict(self) -> dict[str, Any]:
        """As /stats and /health show it: `since` in ISO 8601, as every timestamp there."""
        return {"reason": self.reason, "since": iso_time(self.since), "set_by": self.set_by}


def iso_time(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def one_line(reason: str | None) -> str | None:
    """The reason on one line (whitespace runs become one space), None when it says nothing."""
    if reason is None:
        return None
    text = " ".join(reason.split())
    return text or None


def paused_state(conn: Any) -> Pause | None:
    """The pause in force, or None when workers may claim."""
    row = conn.execute(f"SELECT reason, since, set_by FROM {CONTROL_TABLE} WHERE name = ?",
                       (PAUSED_FLAG,)).fetchone()
    return Pause(*row) if row else None


def pause(conn: Any, reason: str | None, set_by: str, now: float) -> tuple[Pause, bool]:
    """Pause claiming; returns the pause in force and whether this call set it. Pausing again
    keeps the first `since` and `set_by` (how long claims have been stopped, and by whom) and
    replaces the reason only when one is given."""
    reason = one_line(reason)
    with transaction(conn):
        added = conn.execute(
            f"INSERT INTO {CONTROL_TABLE} (name, value, reason, since, set_by) VALUES (?, '1', ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING", (PAUSED_FLAG, reason, now, set_by)).rowcount == 1
        if not added and reason is not None:
            conn.execute(f"UPDATE {CONTROL_TABLE} SET reason = ? WHERE name = ?", (reason, PAUSED_FLAG))
        state = paused_state(conn)
    return state, added


def resume(conn: Any) -> Pause | None:
    """Lift the pause and wake idle claimers on every host at once; returns the pause lifted,
    or None when there was none."""
    with transaction(conn):
        # fetchall: SQLite commits only once the statement has run to its end.
        rows = conn.execute(f"DELETE FROM {CONTROL_TABLE} WHERE name = ? RETURNING reason, since, set_by",
                            (PAUSED_FLAG,)).fetchall()
        if rows:
            backend_of(conn).wake_claimers(conn)  # sent with the commit: they find the flag gone
    return Pause(*rows[0]) if rows else None
