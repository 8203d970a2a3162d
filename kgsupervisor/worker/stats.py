"""Per-worker counters, published best-effort into a dict the supervisor may share."""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import MutableMapping
from datetime import datetime, timezone
from typing import Any

from kgsupervisor.masking import hide_credentials, hide_in
from kgsupervisor.worker.counters import SharedCounters

log = logging.getLogger("kgsupervisor.stats")
# A worker's main thread and its write-back thread (worker/writer.py) both count: one at a time.
_COUNTING = threading.Lock()


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
    # Shared-memory twin of the counts, read by the supervisor even when the Manager is dead.
    counters: SharedCounters = dataclasses.field(default_factory=SharedCounters, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """What is published: the KG service URLs without their credentials (they reach /health)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "counters"}
        values["kg_service"] = hide_in(self.kg_service)
        return values

    def record_outcome(self, succeeded: bool) -> None:
        """A document reached its end: completed or failed for good."""
        with _COUNTING:
            self._record_outcome(succeeded)

    def _record_outcome(self, succeeded: bool) -> None:
        self.total_processed += 1
        self.counters.add("processed")
        if succeeded:
            self.total_success += 1
            self.counters.add("success")
        else:
            self.total_failed += 1
            self.counters.add("failed")
        self.last_processed_at = iso_now()

    def record_retry(self) -> None:
        with _COUNTING:
            self.total_retried += 1
            self.counters.add("retried")

    def record_released(self, count: int) -> None:
        with _COUNTING:
            self.total_released += count
            self.counters.add("released", count)

    def count(self, name: str, amount: int = 1) -> None:
        """Add to a plain count (lease_lost, db_lock_retries), one thread at a time."""
        with _COUNTING:
            setattr(self, name, getattr(self, name) + amount)

    def set_current(self, content_id: int | None) -> None:
        self.current_content_id = content_id
        self.counters.set_current(content_id)


class StatsPublisher:
    """Writes a worker's stats into a (possibly Manager-backed) map, never failing the worker."""

    # Only what changed is published: an idle worker's stats do not change, and a round trip to
    # the Manager per beat would be most of an idle pool's CPU (its heartbeat is in shared memory).

    def __init__(self, target: MutableMapping[Any, Any] | None) -> None:
        self.target = target
        self._warned = False
        self._last: tuple | None = None

    def publish_if_changed(self, stats: WorkerStats) -> None:
        signature = (stats.state, stats.total_processed, stats.total_retried, stats.total_released,
                     stats.current_content_id, stats.lease_lost, stats.db_lock_retries,
                     tuple(sorted(stats.kg_service.items())))
        if signature != self._last:
            self._last = signature
            self.publish(stats)

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


# A worker's heartbeat comes every second from its lease keeper thread while it holds claims, every
# few seconds while idle (lease.IDLE_BEAT); one this old belongs to a process that is stopped
# (SIGSTOP) or stuck in C code holding the GIL.
STALE_HEARTBEAT = 10.0


def is_beating(detail: dict[str, Any]) -> bool:
    """A worker_details entry of a process that runs and still heartbeats."""
    age = detail.get("heartbeat_age")
    return bool(detail["running"]) and (age is None or age < STALE_HEARTBEAT)


def worker_health(details: list[dict[str, Any]], manager_running: bool) -> dict[str, Any]:
    """check_worker_health() (CONTRACT §7): liveness of the workers only, not of the KG service.
    A worker is healthy while its process runs and heartbeats."""
    healthy = sum(1 for d in details if is_beating(d))
    return {
        "manager_running": manager_running,
        "total_workers": len(details),
        "healthy_workers": healthy,
        "unhealthy_workers": len(details) - healthy,
        "worker_details": details,
    }


def kg_service_status(details: list[dict[str, Any]], url: str, enabled: bool) -> dict[str, Any]:
    """The freshest health verdict any worker has about the KG service."""
    every = [d["stats"].get("kg_service") or {} for d in details]
    reports = [r for r in every if r.get("last_health_check")]
    latest = max(reports, key=lambda r: r["last_health_check"], default={})
    return {
        "enabled": enabled, "url": hide_credentials(url),
        "is_healthy": latest.get("is_healthy") if enabled else False,
        "last_health_check": latest.get("last_health_check"),
        "consecutive_failures": max((r.get("consecutive_failures") or 0 for r in reports), default=0),
        "endpoints": endpoint_status(every, enabled),  # also those no worker has asked yet
    }


def endpoint_status(reports: list[dict[str, Any]], enabled: bool) -> list[dict[str, Any]]:
    """Each KG service endpoint across the workers: the freshest verdict, summed counts."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for e in report.get("endpoints") or []:
            m = merged.setdefault(e["url"], {"url": e["url"], "is_healthy": None, "last_health_check": None,
                                             "consecutive_failures": 0, "requests": 0, "failures": 0,
                                             "latency_seconds_total": 0.0})
            if e.get("last_health_check") and (m["last_health_check"] or "") <= e["last_health_check"]:
                m["is_healthy"], m["last_health_check"] = e.get("is_healthy"), e["last_health_check"]
            m["consecutive_failures"] = max(m["consecutive_failures"], e.get("consecutive_failures") or 0)
            for key in ("requests", "failures", "latency_seconds_total"):
                m[key] += e.get(key) or 0
    for m in merged.values():
        m["is_healthy"] = m["is_healthy"] if enabled else False
        m["latency_ms_mean"] = round(1000 * m["latency_seconds_total"] / m["requests"], 1) if m["requests"] else None
    return list(merged.values())


def aggregate(details: list[dict[str, Any]], *, manager_running: bool, manager_started_at: str,
              workers_restarted: int, last_health_check: str | None, url: str, enabled: bool,
              queue_size: dict[str, int]) -> dict[str, Any]:
    """get_worker_stats() (CONTRACT §7): sums over every worker that ever ran, plus the queue."""
    def total(key: str) -> int:
        return sum(d["stats"][key] for d in details)

    return {
        "total_workers": len(details),
        "manager_running": manager_running,
        "manager_started_at": manager_started_at,
        "workers_restarted": workers_restarted,
        "last_health_check": last_health_check,
        "total_processed": total("total_processed"),
        "total_success": total("total_success"),
        "total_failed": total("total_failed"),
        "kg_service_enabled": enabled,
        "kg_service_status": kg_service_status(details, url, enabled),
        "queue_size": queue_size,
    }
