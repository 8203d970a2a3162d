"""Retention of the attempt history: the supervisor deletes attempts older than KG_HISTORY_DAYS,
a small batch a transaction, so that no worker waits long on the write lock (docs/history.md)."""
from __future__ import annotations

import logging
import time
from contextlib import closing

from kgsupervisor.config import DAY
from kgsupervisor.queue.history import PRUNE_BATCH_ROWS, prune_attempts
from kgsupervisor.store.backend import connect_to

log = logging.getLogger("kgsupervisor.supervisor")

PRUNE_EVERY = 60.0  # seconds between prunes
# A prune stops after this long even with old rows left (the first prune of a long history):
# the supervisor's loop has workers to watch. It goes on at the next turn, not a minute later.
PRUNE_BUDGET = 0.25


class HistoryPruner:
    """Deletes old attempt rows, at most every PRUNE_EVERY seconds, each batch its own transaction."""

    def __init__(self, db_path: str, batch_rows: int = PRUNE_BATCH_ROWS) -> None:
        self.db_path = db_path
        self.batch_rows = batch_rows
        self.next_due = 0.0  # monotonic
        self.failing = False  # a failure is logged once, not every minute

    def prune_if_due(self, days: int, mono: float) -> int:
        """When due at monotonic time `mono`, delete the attempts finished more than `days` days
        ago (none when `days` is 0: keep all); returns how many. A database that refuses is
        tried again at the next due time: the history only grows meanwhile."""
        if days <= 0 or mono < self.next_due:
            return 0
        self.next_due = mono + PRUNE_EVERY
        try:
            deleted, done = self.prune(time.time() - days * DAY)
        except Exception as exc:  # noqa: BLE001 - locked, read-only, gone: retention can wait
            if not self.failing:
                log.warning("could not prune the attempt history (%s); trying again every %.0fs", exc,
                            PRUNE_EVERY)
            self.failing = True
            return 0
        self.failing = False
        if not done:
            self.next_due = mono  # old rows left: go on at the next turn
        if deleted:
            log.info("pruned %d attempt(s) older than %d day(s) from the history", deleted, days)
        return deleted

    def prune(self, before: float) -> tuple[int, bool]:
        """Delete attempts finished before `before`, batch after batch, within PRUNE_BUDGET;
        returns how many, and whether none older is left."""
        deleted = 0
        started = time.monotonic()
        with closing(connect_to(self.db_path)) as conn:
            while time.monotonic() - started < PRUNE_BUDGET:
                batch = prune_attempts(conn, before, self.batch_rows)
                deleted += batch
                if batch < self.batch_rows:
                    return deleted, True
        return deleted, False
