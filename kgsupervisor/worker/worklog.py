"""The worker's log prefix, and the document it holds as its log lines, stats and counters name it."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kgsupervisor.worker.stats import WorkerStats


class WorkerLog(logging.LoggerAdapter):
    """Prefixes every line with the worker id, pid and the document in hand."""

    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        cid = self.extra.get("content_id")
        doc = f" content_id={cid}" if cid is not None else ""
        # Also as fields, for the JSON formatter.
        kwargs["extra"] = {"worker_id": self.extra["worker_id"], "content_id": cid}
        return f"[worker {self.extra['worker_id']} pid {os.getpid()}{doc}] {msg}", kwargs


@contextmanager
def holding(log: WorkerLog, stats: WorkerStats, content_id: int | None) -> Iterator[None]:
    """The worker holds document `content_id` for the block: its log lines, its stats and the
    shared counters name it, then name again what they named before (nothing, outside a batch)."""
    previous = stats.current_content_id
    _show_current(log, stats, content_id)
    try:
        yield
    finally:
        # Also when a fault unwinds the block: a paused worker holds no document.
        _show_current(log, stats, previous)


def _show_current(log: WorkerLog, stats: WorkerStats, content_id: int | None) -> None:
    """Name `content_id` in the log prefix, the stats and the shared counters at once."""
    log.extra["content_id"] = content_id
    stats.set_current(content_id)
