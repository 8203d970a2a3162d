"""What the supervisor tells the world: stats snapshots, control-pipe answers, systemd notices."""
from __future__ import annotations

import logging
import time
from contextlib import closing
from typing import TYPE_CHECKING, Any

from kgsupervisor.ops.render import RateMeter, progress_line
from kgsupervisor.pool.systemd import Notifier
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.states import SupervisorState
from kgsupervisor.store.backend import backend_name, connect_to, describe
from kgsupervisor.worker.counters import latency_histogram
from kgsupervisor.worker.stats import aggregate, iso_now, worker_health

if TYPE_CHECKING:
    from kgsupervisor.pool.supervisor import Supervisor

log = logging.getLogger("kgsupervisor.reporting")

QUEUE_COUNT_EVERY = 2.0  # a count is a scan: never one per scrape
PUBLISH_EVERY = 1.0
PROGRESS_LOG_EVERY = 30.0


class Reporter:
    """Builds the CONTRACT §7 dicts from the supervisor's slots and answers whoever asks."""

    def __init__(self, supervisor: "Supervisor", notifier: Notifier | None = None) -> None:
        self.sup = supervisor
        self.notifier = notifier or Notifier()
        self.controls: list[Any] = []
        self.latest: dict[str, Any] = {}
        self.queue_size: dict[str, int] = {}
        self.last_health_check: str | None = None
        self.ready_sent = False
        self._queue_counted = 0.0
        self._published_at = 0.0
        self._watchdog_at = 0.0
        self.meter = RateMeter()
        self.progress_handler = None  # set when logging to a terminal
        self._progress_logged_at = time.monotonic()

    # -- snapshots ---------------------------------------------------------------------------

    def check_worker_health(self) -> dict[str, Any]:
        sup = self.sup
        self.last_health_check = iso_now()
        published = sup.stats.snapshot()
        now = time.time()
        details = [slot.describe(now, published.get(slot.worker_id)) for _, slot in sorted(sup.slots.items())
                   if slot.worker_id < sup.num_workers or slot.current or slot.retiring]
        return {**worker_health(details, sup.state is SupervisorState.RUNNING), **self.whereabouts()}

    def whereabouts(self) -> dict[str, Any]:
        """Which host this supervisor runs on and which database it drains: with several hosts
        on one PostgreSQL queue, the workers are this host's and the queue counts everyone's."""
        return {"host": self.sup.host, "database": {"backend": backend_name(self.sup.db_path),
                                                    "name": describe(self.sup.db_path)}}

    def refresh_queue_size(self) -> None:
        now = time.monotonic()
        if now - self._queue_counted < QUEUE_COUNT_EVERY:
            return
        self._queue_counted = now
        try:
            with closing(connect_to(self.sup.db_path)) as conn:
                self.queue_size = queue_for(conn).counts()
        except Exception as exc:
            log.warning("could not count the queue: %s", exc)

    def extra(self, details: list[dict[str, Any]]) -> dict[str, Any]:
        """What /metrics and `status` show beyond the contract's keys."""
        totals: dict[str, float] = {}
        for slot in self.sup.slots.values():
            for name, value in slot.counts().items():
                totals[name] = totals.get(name, 0) + value
        return {
            "supervisor_pid": self.sup.pid, "state": self.sup.state.value,
            "total_retried": int(totals.get("retried", 0)), "total_released": int(totals.get("released", 0)),
            "in_flight": sum(1 for d in details if d["current_content_id"] is not None),
            "kg_request_latency": {"buckets": latency_histogram(totals), "sum": totals.get("latency_sum", 0.0)},
            "stats_manager_restarts": self.sup.stats.restarts,
        }

    def publish(self, force: bool = False) -> None:
        """Refresh the snapshot (at most once a second unless forced) and tell systemd."""
        now = time.monotonic()
        if not force and now - self._published_at < PUBLISH_EVERY:
            return
        self._published_at = now
        sup = self.sup
        health = self.check_worker_health()
        self.refresh_queue_size()
        stats = aggregate(health["worker_details"], manager_running=health["manager_running"],
                          manager_started_at=sup.started_at, workers_restarted=sup.workers_restarted,
                          last_health_check=self.last_health_check, url=sup.settings.service_url,
                          enabled=sup.settings.service_enabled, queue_size=self.queue_size)
        stats.update(self.whereabouts())
        self.latest = {"stats": stats, "health": health, "extra": self.extra(health["worker_details"])}
        sup.stats.publish_supervisor(self.latest)
        self.notify_systemd(health, stats)
        self.show_progress(stats)

    def show_progress(self, stats: dict[str, Any]) -> None:
        """A live progress line on a terminal; a log line every 30 s while there is work, elsewhere."""
        line = progress_line(stats, self.meter)
        if self.progress_handler is not None:
            self.progress_handler.show(line)
            return
        q = stats["queue_size"]
        busy = q.get("pending", 0) + q.get("processing", 0) > 0
        if busy and time.monotonic() - self._progress_logged_at >= PROGRESS_LOG_EVERY:
            self._progress_logged_at = time.monotonic()
            log.info("progress: %s", line)

    # -- the control pipes (API handle, status process) --------------------------------------

    def answer(self) -> None:
        """Answer every pending request: 'health', 'stats' or 'snapshot'."""
        pending = [c for c in self.controls if c.poll()]
        if pending:
            self.publish(force=True)
        for conn in pending:
            try:
                while conn.poll():
                    request = conn.recv()
                    conn.send(self.latest if request == "snapshot" else self.latest.get(request))
            except (EOFError, OSError):
                self.controls.remove(conn)

    # -- systemd -----------------------------------------------------------------------------

    def notify_systemd(self, health: dict[str, Any], stats: dict[str, Any]) -> None:
        if not self.notifier.enabled:
            return
        q = stats["queue_size"]
        states = [f"STATUS={health['healthy_workers']}/{health['total_workers']} workers, "
                  f"{stats['total_success']} completed, {stats['total_failed']} failed; queue: "
                  f"{q.get('pending', 0)} pending, {q.get('processing', 0)} processing; KG service "
                  f"{'up' if stats['kg_service_status']['is_healthy'] else 'down or unknown'}"]
        if not self.ready_sent and self.sup.state is SupervisorState.RUNNING and self.workers_checked_in(health):
            states.insert(0, "READY=1")
            self.ready_sent = True
        self.notifier.notify(*states)
        self.ping_watchdog(health)

    def workers_checked_in(self, health: dict[str, Any]) -> bool:
        """Every worker runs and has published its own stats (so it opened the database)."""
        details = health["worker_details"]
        return bool(details) and all(d["running"] and d["stats"].get("pid") == d["pid"] for d in details)

    def ping_watchdog(self, health: dict[str, Any]) -> None:
        """WATCHDOG=1 only while workers heartbeat: a wedged pool lets systemd restart us."""
        interval = self.notifier.watchdog_interval
        if interval is None or time.monotonic() - self._watchdog_at < interval:
            return
        limit = self.sup.settings.hang_timeout
        beating = [d for d in health["worker_details"]
                   if d["running"] and d["heartbeat_age"] is not None and d["heartbeat_age"] < limit]
        if beating:
            self._watchdog_at = time.monotonic()
            self.notifier.notify("WATCHDOG=1")

    def notify(self, *states: str) -> None:
        self.notifier.notify(*states)
