"""Per-worker counters, published best-effort into a dict the supervisor may share."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger("kgsupervisor.stats")


def iso_now(now: float | None = None) -> str:
    """An ISO 8601 UTC timestamp for stats (CONTRACT §7)."""
    return datetime.fromtimestamp(time.time() if now is None else now, timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class WorkerStats:
    """What one worker has done; `publish()` copies it into the shared map under its worker id."""

    worker_id: int
    pid: int = dataclasses.field(default_factory=os.getpid)
    state: str = "starting"
    started_at: str = dataclasses.field(default_factory=iso_now)
    heartbeat: float = dataclasses.field(default_factory=time.time)
    total_processed: int = 0
    total_success: int = 0
    total_failed: int = 0
    total_retried: int = 0
    total_released: int = 0
    lease_lost: int = 0
    db_lock_retries: int = 0
    last_processed_at: str | None = None
    current_content_id: int | None = None
    kg_service: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def record_outcome(self, succeeded: bool) -> None:
        """A document reached its end: completed or failed for good."""
        self.total_processed += 1
        if succeeded:
            self.total_success += 1
        else:
            self.total_failed += 1
        self.last_processed_at = iso_now()


class StatsPublisher:
    """Writes a worker's stats into a (possibly Manager-backed) map, never failing the worker."""

    def __init__(self, target: MutableMapping[Any, Any] | None) -> None:
        self.target = target
        self._warned = False

    def publish(self, stats: WorkerStats) -> None:
        if self.target is None:
            return
        stats.heartbeat = time.time()
        try:
            # The whole dict at once: a Manager dict proxy does not see nested mutations.
            self.target[stats.worker_id] = stats.as_dict()
        except Exception as exc:  # a dead Manager must not take the worker with it
            if not self._warned:
                log.warning("cannot publish worker stats (%s: %s); the supervisor recounts from the database",
                            type(exc).__name__, exc)
                self._warned = True
