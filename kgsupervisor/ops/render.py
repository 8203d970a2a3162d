"""Human views of a stats snapshot: the status table, the progress line and the live view."""
from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text


class RateMeter:
    """Documents per second over a sliding window, and the ETA that follows from it."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.points: list[tuple[float, int]] = []

    def add(self, done: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[0][0] > self.window:
            self.points.pop(0)

    def rate(self) -> float:
        if len(self.points) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def eta(self, remaining: int) -> float | None:
        rate = self.rate()
        return remaining / rate if rate > 0 else None


def queue_progress(queue: dict[str, int]) -> tuple[int, int]:
    """(done, total) of the queue: done is completed + failed + skipped."""
    done = queue.get("completed", 0) + queue.get("failed", 0) + queue.get("skipped", 0)
    return done, queue.get("total", 0)


def progress_line(stats: dict[str, Any], meter: RateMeter) -> str:
    """`1200/5000 done (24%), 3 failed, 38.2 docs/s, ETA 1m39s` for logs and terminals."""
    done, total = queue_progress(stats.get("queue_size") or {})
    meter.add(done)
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    eta = meter.eta(total - done)
    eta_text = _duration(eta) if eta is not None else "-"
    return (f"{done}/{total} done{pct}, {stats.get('total_failed', 0)} failed, "
            f"{meter.rate():.1f} docs/s, ETA {eta_text}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def worker_table(health: dict[str, Any]) -> Table:
    table = Table(title="workers", title_justify="left", expand=False)
    for column in ("id", "pid", "state", "doc", "done", "ok", "failed", "restarts", "RSS MiB", "CPU %", "beat s"):
        table.add_column(column, justify="right" if column not in ("state",) else "left")
    for d in health.get("worker_details", []):
        s = d.get("stats") or {}
        table.add_row(str(d["worker_id"]), str(d.get("pid") or "-"), str(d.get("state") or "-"),
                      str(d.get("current_content_id") or "-"), str(s.get("total_processed", 0)),
                      str(s.get("total_success", 0)), str(s.get("total_failed", 0)), str(d.get("restarts", 0)),
                      f"{(d.get('rss_bytes') or 0) / 2**20:.0f}", f"{d.get('cpu_percent') or 0:.0f}",
                      f"{d['heartbeat_age']:.1f}" if d.get("heartbeat_age") is not None else "-")
    return table


def endpoint_lines(kg: dict[str, Any]) -> list[str]:
    """One line per KG service endpoint, when there is more than one."""
    endpoints = kg.get("endpoints") or []
    if len(endpoints) < 2:
        return []
    return [f"  endpoint {e['url']}: {'up' if e.get('is_healthy') else 'down or unknown'}, "
            f"{e.get('requests', 0)} requests, {e.get('failures', 0)} failed, "
            f"consecutive_failures={e.get('consecutive_failures', 0)}, "
            f"mean {e['latency_ms_mean'] if e.get('latency_ms_mean') is not None else '-'} ms"
            for e in endpoints]


def admission_lines(stats: dict[str, Any]) -> list[str]:
    """Per endpoint: its in-flight limit, permits in use, waiting workers, and budget use."""
    lines = []
    for e in stats.get("kg_admission") or []:
        parts = []
        if "limit" in e:
            parts.append(f"in-flight limit {e['limit']}, {e['in_use']} in use, {e['waiting']} worker(s) waiting")
        budget = e.get("budget")
        if "budget" in e:
            parts.append("budget unreadable" if budget is None else "; ".join(
                f"{use['used']}/{use['limit']} {kind} in the last minute" for kind, use in budget.items()))
        lines.append(f"  sending to {e['url']}: " + ("; ".join(parts) or "no limit"))
    return lines


def pause_lines(stats: dict[str, Any]) -> list[str]:
    """The operator's pause, when there is one, on a line of its own."""
    paused = stats.get("paused")
    if not paused:
        return []
    reason = f" (reason: {paused['reason']})" if paused.get("reason") else ""
    return [f"PAUSED since {paused['since']} by {paused.get('set_by') or '?'}{reason}: workers finish what "
            f"they hold and claim nothing until `kgsupervisor resume`"]


def status_view(snapshot: dict[str, Any], meter: RateMeter) -> Group:
    """The `status --watch` screen: progress bar, queue and service line, worker table."""
    stats, health = snapshot["stats"], snapshot["health"]
    done, total = queue_progress(stats.get("queue_size") or {})
    line = progress_line(stats, meter)
    q = stats.get("queue_size") or {}
    kg = stats.get("kg_service_status") or {}
    service = "up" if kg.get("is_healthy") else ("disabled" if not kg.get("enabled") else "down or unknown")
    summary = Text(f"queue: {q.get('pending', 0)} pending, {q.get('processing', 0)} processing, "
                   f"{q.get('completed', 0)} completed, {q.get('failed', 0)} failed    "
                   f"KG service {kg.get('url')}: {service}    restarts (HUP): {stats.get('workers_restarted', 0)}")
    return Group(ProgressBar(total=max(total, 1), completed=done, width=60), Text(line),
                 *(Text(p, style="bold yellow") for p in pause_lines(stats)), summary,
                 *(Text(e) for e in endpoint_lines(kg) + admission_lines(stats)), worker_table(health))


KNOWN_STATUSES = ("pending", "processing", "completed", "failed", "skipped")


def queue_statuses(q: dict[str, int]) -> list[tuple[str, int]]:
    """The known statuses in order, then any other the queue holds (rows no worker will claim)."""
    others = [(status, n) for status, n in q.items() if status not in KNOWN_STATUSES and status != "total"]
    return [(status, q.get(status, 0)) for status in KNOWN_STATUSES] + others


def status_text(snapshot: dict[str, Any]) -> str:
    """`kgsupervisor status` without --watch: a few plain lines."""
    stats, health = snapshot["stats"], snapshot["health"]
    q = stats.get("queue_size") or {}
    kg = stats.get("kg_service_status") or {}
    lines = [
        f"supervisor: {'running' if stats.get('manager_running') else 'stopping'}, "
        f"{health.get('healthy_workers', 0)}/{health.get('total_workers', 0)} workers healthy, "
        f"started {stats.get('manager_started_at')}, {stats.get('workers_restarted', 0)} reload(s)",
        *pause_lines(stats),
        f"host {stats.get('host', '?')}, database {(stats.get('database') or {}).get('name', '?')} "
        f"({(stats.get('database') or {}).get('backend', '?')}; the queue below is everyone's, the workers "
        f"this host's)",
        f"documents: {stats.get('total_processed', 0)} processed, {stats.get('total_success', 0)} "
        f"succeeded, {stats.get('total_failed', 0)} failed",
        "queue: " + ", ".join(f"{n} {status}" for status, n in queue_statuses(q)),
        f"KG service {kg.get('url')}: enabled={kg.get('enabled')} healthy={kg.get('is_healthy')} "
        f"consecutive_failures={kg.get('consecutive_failures')} last_check={kg.get('last_health_check')}",
        *endpoint_lines(kg),
        *admission_lines(stats),
    ]
    for d in health.get("worker_details", []):
        s = d.get("stats") or {}
        lines.append(f"  worker {d['worker_id']}: pid {d.get('pid')} {d.get('state')} "
                     f"processed={s.get('total_processed', 0)} restarts={d.get('restarts', 0)} "
                     f"rss={(d.get('rss_bytes') or 0) / 2**20:.0f}MiB doc={d.get('current_content_id')}")
    return "\n".join(lines)


HOST_COLUMNS = ("host", "pid", "state", "workers", "version", "status address", "started", "heartbeat")


def host_cells(h: dict[str, Any]) -> tuple[str, ...]:
    """One row of the hosts table: workers as running/wanted, the heartbeat's age."""
    age = h.get("heartbeat_age")
    return (str(h["host"]), str(h["pid"]), str(h["state"]),
            f"{h.get('workers_running') if h.get('workers_running') is not None else '-'}"
            f"/{h.get('workers_wanted') if h.get('workers_wanted') is not None else '-'}",
            str(h.get("version") or "-"), str(h.get("status_addr") or "off"), str(h.get("started_at") or "-"),
            "-" if age is None else f"{age:.1f}s ago" if age < 60 else f"{_duration(age)} ago")


def aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as left-aligned plain-text columns: no terminal width involved, pipes get it whole."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def hosts_text(document: dict[str, Any]) -> str:
    """`kgsupervisor status --all`: the database, every supervisor's row, the queue."""
    hosts = document["hosts"]
    states: dict[str, int] = {}
    for h in hosts:
        states[h["state"]] = states.get(h["state"], 0) + 1
    database = document["database"]
    summary = ", ".join(f"{n} {state}" for state, n in states.items())
    lines = [f"database {database['name']} ({database['backend']}): {len(hosts)} supervisor(s)"
             + (f", {summary}" if summary else "")
             + f"; gone = no heartbeat for {document['lease_seconds']:g}s",
             "queue: " + ", ".join(f"{n} {status}" for status, n in queue_statuses(document["queue_size"]))]
    if not hosts:
        return "\n".join(lines + ["no supervisor is registered in this database"])
    return "\n".join(lines + aligned([HOST_COLUMNS] + [host_cells(h) for h in hosts]))
