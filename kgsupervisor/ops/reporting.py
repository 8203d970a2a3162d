"""What the supervisor tells the world, rendered from the snapshot it hands over each turn:
stats for the control pipes, systemd notices, the progress line."""
from __future__ import annotations

import logging
import math
import time
from multiprocessing.connection import Connection
from typing import Any

from kgsupervisor import logs
from kgsupervisor.ops.render import RateMeter, progress_line
from kgsupervisor.pool.snapshot import PoolSnapshot
from kgsupervisor.pool.systemd import Notifier
from kgsupervisor.worker.counters import latency_histogram
from kgsupervisor.worker.stats import aggregate, worker_health

log = logging.getLogger("kgsupervisor.reporting")

PUBLISH_EVERY = 1.0
PROGRESS_LOG_EVERY = 30.0


class Reporter:
    """Builds the CONTRACT §7 dicts from the supervisor's snapshots and answers whoever asks."""

    def __init__(self, controls: list[Connection] | None = None, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.controls: list[Connection] = list(controls or [])
        self.latest: dict[str, Any] = {}
        self.ready_sent = False
        self._published_at: float | None = None
        self._watchdog_at = 0.0
        self.meter = RateMeter()
        self.progress_handler: Any = None  # set when logging to a terminal
        self._progress_logged_at = time.monotonic()

    def start(self) -> None:
        """On a terminal, a live progress line below the log."""
        self.progress_handler = logs.attach_progress_line()

    def finish(self) -> None:
        if self.progress_handler is not None:
            self.progress_handler.finish()

    # -- snapshots ---------------------------------------------------------------------------

    def wants_snapshot(self, now: float) -> bool:
        """One a second, and one whenever a control pipe has a request."""
        due = self._published_at is None or now - self._published_at >= PUBLISH_EVERY
        return due or any(c.poll() for c in self.controls)

    def due_in(self, now: float) -> float:
        """While the pool is quiet only a systemd watchdog ping is due unasked (the rest waits for
        a request or the supervisor's next turn): seconds until it is, inf without a watchdog."""
        interval = self.notifier.watchdog_interval
        if not self.notifier.enabled or interval is None:
            return math.inf
        return max(0.0, self._watchdog_at + interval - now)

    def publish(self, snapshot: PoolSnapshot) -> None:
        """Render the snapshot, tell systemd and the terminal, and answer every pending request."""
        self._published_at = snapshot.clock
        health = check_worker_health(snapshot)
        stats = aggregate(health["worker_details"], manager_running=health["manager_running"],
                          manager_started_at=snapshot.started_at,
                          workers_restarted=snapshot.workers_restarted,
                          last_health_check=snapshot.taken_at, url=snapshot.service_url,
                          enabled=snapshot.service_enabled, queue_size=dict(snapshot.queue_size))
        stats.update(whereabouts(snapshot), **pause_view(snapshot), kg_admission=list(snapshot.admission))
        self.latest = {"stats": stats, "health": health, "extra": extra(snapshot, health["worker_details"])}
        self.notify_systemd(snapshot, health, stats)
        self.show_progress(stats)
        self.answer()

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
        for conn in [c for c in self.controls if c.poll()]:
            try:
                while conn.poll():
                    request = conn.recv()
                    conn.send(self.latest if request == "snapshot" else self.latest.get(request))
            except (EOFError, OSError):
                self.controls.remove(conn)

    # -- systemd -----------------------------------------------------------------------------

    def notify_systemd(self, snapshot: PoolSnapshot, health: dict[str, Any], stats: dict[str, Any]) -> None:
        if not self.notifier.enabled:
            return
        states = [f"STATUS={systemd_status(health, stats)}"]
        if not self.ready_sent and snapshot.running and self.workers_checked_in(health):
            states.insert(0, "READY=1")
            self.ready_sent = True
        self.notifier.notify(*states)
        self.ping_watchdog(health, snapshot.hang_timeout)

    def workers_checked_in(self, health: dict[str, Any]) -> bool:
        """Every worker runs and has published its own stats (so it opened the database)."""
        details = health["worker_details"]
        return bool(details) and all(d["running"] and d["stats"].get("pid") == d["pid"] for d in details)

    def ping_watchdog(self, health: dict[str, Any], limit: float) -> None:
        """WATCHDOG=1 only while workers heartbeat: a wedged pool lets systemd restart us."""
        interval = self.notifier.watchdog_interval
        if interval is None or time.monotonic() - self._watchdog_at < interval:
            return
        beating = [d for d in health["worker_details"]
                   if d["running"] and d["heartbeat_age"] is not None and d["heartbeat_age"] < limit]
        if beating:
            self._watchdog_at = time.monotonic()
            self.notifier.notify("WATCHDOG=1")

    def notify(self, *states: str) -> None:
        self.notifier.notify(*states)


def systemd_status(health: dict[str, Any], stats: dict[str, Any]) -> str:
    """The STATUS= line `systemctl status` shows: a pause first, then workers, outcomes, queue, service."""
    q = stats["queue_size"]
    paused = stats.get("paused")
    reason = f" (reason: {paused['reason']})" if paused and paused["reason"] else ""
    return ((f"PAUSED since {paused['since']}{reason}, claiming nothing; " if paused else "")
            + f"{health['healthy_workers']}/{health['total_workers']} workers, "
            f"{stats['total_success']} completed, {stats['total_failed']} failed; queue: "
            f"{q.get('pending', 0)} pending, {q.get('processing', 0)} processing; KG service "
            f"{'up' if stats['kg_service_status']['is_healthy'] else 'down or unknown'}")


def check_worker_health(snapshot: PoolSnapshot) -> dict[str, Any]:
    """check_worker_health() (CONTRACT §7), with where the pool runs and whether it is paused."""
    return {**worker_health(list(snapshot.workers), snapshot.running), **whereabouts(snapshot),
            **pause_view(snapshot)}


def whereabouts(snapshot: PoolSnapshot) -> dict[str, Any]:
    """Which host this supervisor runs on and which database it drains: with several hosts
    on one PostgreSQL queue, the workers are this host's and the queue counts everyone's."""
    return {"host": snapshot.host, "database": dict(snapshot.database)}


def pause_view(snapshot: PoolSnapshot) -> dict[str, Any]:
    """`paused`: the operator's pause as /stats and /health show it (reason, since, set_by), or
    None. A paused pool is healthy: its workers run, they only claim nothing."""
    return {"paused": snapshot.paused.as_dict() if snapshot.paused else None}


def extra(snapshot: PoolSnapshot, details: list[dict[str, Any]]) -> dict[str, Any]:
    """What /metrics and `status` show beyond the contract's keys."""
    totals = snapshot.totals
    return {
        "supervisor_pid": snapshot.pid, "state": snapshot.state.value,
        "total_retried": int(totals.get("retried", 0)), "total_released": int(totals.get("released", 0)),
        "in_flight": sum(1 for d in details if d["current_content_id"] is not None),
        "kg_request_latency": {"buckets": latency_histogram(totals), "sum": totals.get("latency_sum", 0.0)},
        "stats_manager_restarts": snapshot.manager_restarts,
    }
