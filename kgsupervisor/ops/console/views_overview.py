"""The overview (`/`, and `/live`, the part the page's script fetches again every 2 s) and the
actions on it: pause and resume (every host), and inside `run` one worker more or fewer, and drain."""
from __future__ import annotations

import signal
import socket
from typing import Any

from flask import Blueprint, abort, render_template, request, url_for

from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.console import charts
from kgsupervisor.ops.console.formats import parse_time
from kgsupervisor.ops.console.security import who
from kgsupervisor.ops.console.state import conn, now, state
from kgsupervisor.ops.console.web import back_to, banner, local_snapshot, page, record
from kgsupervisor.queue import browse, control
from kgsupervisor.store.hosts import read_hosts, read_workers

blueprint = Blueprint("overview", __name__)


@blueprint.get("/")
def index() -> str:
    values = live_values()
    return page("overview.html", pool_actions=state().pool is not None, **values)


@blueprint.get("/live")
def live() -> str:
    return render_template("_live.html", **live_values())


def live_values() -> dict[str, Any]:
    """Everything the live part shows, read now."""
    t, db = now(), conn()
    snapshot = local_snapshot()
    counts = browse.queue_counts(db)
    hosts = [host.describe(t, state().settings.lease_seconds) for host in read_hosts(db)]
    return {
        "banner": banner(snapshot),
        "counts": [(status, counts.get(status, 0)) for status in browse.STATUSES],
        "total": counts.get("total", sum(counts.get(s, 0) for s in browse.STATUSES)),
        "hosts": hosts,
        "local": snapshot is not None,
        "in_run": state().pool is not None,
        "workers": local_worker_rows(snapshot, t) + other_hosts_worker_rows(db, hosts, t),
        "endpoints": endpoint_rows(snapshot),
        "totals": totals(snapshot),
        "charts": [charts.throughput_chart(browse.throughput_series(db, t), t),
                   charts.depth_chart(state().samples.recent(t), t, counts)],
    }


def local_worker_rows(snapshot: dict[str, Any] | None, t: float) -> list[dict[str, Any]]:
    """The local supervisor's workers, as it answers now."""
    details = ((snapshot or {}).get("health") or {}).get("worker_details") or []
    pool = state().pool
    return worker_rows(details, t, (snapshot or {}).get("health", {}).get("host"),
                       pool.supervisor_pid if pool else None)


def other_hosts_worker_rows(db: Any, hosts: list[dict[str, Any]], t: float) -> list[dict[str, Any]]:
    """The workers of every other live supervisor, as its last registry refresh wrote them."""
    pool = state().pool
    written = read_workers(db)
    rows = []
    for h in hosts:
        if h["state"] in ("stopped", "gone") or (pool is not None and h["pid"] == pool.supervisor_pid
                                                  and is_this_host(h["host"])):
            continue
        rows += worker_rows(written.get((h["host"], h["pid"]), []), t, h["host"], h["pid"])
    return rows


def is_this_host(name: str) -> bool:
    """Is `name` this machine, as the registry names hosts?"""
    return name == socket.gethostname()


def worker_rows(details: list[dict[str, Any]], t: float, host: str | None,
                supervisor_pid: int | None) -> list[dict[str, Any]]:
    """Workers as the table shows them: host, state, pid, the document in hand and for how long,
    RSS, uptime, restarts."""
    rows = []
    for d in details:
        started = parse_time(d.get("started_at"))
        pid, content_id = d.get("pid"), d.get("current_content_id")
        rows.append({"host": host, "supervisor_pid": supervisor_pid,
                     "worker_id": d.get("worker_id"), "pid": pid, "state": d.get("state"),
                     "running": d.get("running"), "content_id": content_id,
                     "held_for": d.get("held_seconds"),
                     "rss": d.get("rss_bytes"), "uptime": None if started is None or not d.get("running")
                     else t - started, "restarts": d.get("restarts"), "last_exit": d.get("last_exit")})
    return rows


def breaker_states(details: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Each endpoint's breaker state as each worker reports it."""
    found: dict[str, list[str]] = {}
    for d in details:
        for e in ((d.get("stats") or {}).get("kg_service") or {}).get("endpoints") or []:
            if e.get("url") and e.get("breaker"):
                found.setdefault(e["url"], []).append(e["breaker"])
    return found


def breaker_text(states: list[str]) -> str:
    """`closed`, or how many workers see it open or half-open."""
    if not states:
        return "unknown"
    trouble = [s for s in states if s != "closed"]
    if not trouble:
        return "closed"
    return ", ".join(f"{s} on {trouble.count(s)} of {len(states)} workers" for s in sorted(set(trouble)))


def endpoint_rows(snapshot: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The KG endpoints: up or down, breaker state, requests, failures, mean latency."""
    if snapshot is None:
        return []
    stats = snapshot.get("stats") or {}
    kg = stats.get("kg_service_status") or {}
    breakers = breaker_states((snapshot.get("health") or {}).get("worker_details") or [])
    admission = {a.get("url"): a for a in stats.get("kg_admission") or []}
    return [{"url": e.get("url"), "healthy": e.get("is_healthy"),
             "breaker": breaker_text(breakers.get(e.get("url"), [])), "requests": e.get("requests"),
             "failures": e.get("failures"), "latency_ms": e.get("latency_ms_mean"),
             "consecutive_failures": e.get("consecutive_failures"),
             "sending": sending_text(admission.get(e.get("url")))} for e in kg.get("endpoints") or []]


def sending_text(admission: dict[str, Any] | None) -> str:
    """An endpoint's in-flight limit, permits in use, waiting workers and budget use, in a few words."""
    if not admission:
        return "no limit"
    parts = []
    if "limit" in admission:
        parts.append(f"{admission['in_use']} of {admission['limit']} in flight, {admission['waiting']} waiting")
    if "budget" in admission:
        budget = admission["budget"]
        parts.append("budget unreadable" if budget is None else ", ".join(
            f"{use['used']:,}/{use['limit']:,} {kind}/min" for kind, use in budget.items()))
    return "; ".join(parts) or "no limit"


def totals(snapshot: dict[str, Any] | None) -> dict[str, Any] | None:
    """The local supervisor's totals since it started."""
    if snapshot is None:
        return None
    stats, extra = snapshot.get("stats") or {}, snapshot.get("extra") or {}
    health = snapshot.get("health") or {}
    return {"processed": stats.get("total_processed"), "completed": stats.get("total_success"),
            "failed": stats.get("total_failed"), "retried": extra.get("total_retried"),
            "in_flight": extra.get("in_flight"), "healthy": health.get("healthy_workers"),
            "workers": health.get("total_workers"), "state": extra.get("state"),
            "started_at": stats.get("manager_started_at"), "host": health.get("host")}


# -- actions ---------------------------------------------------------------------------------------

@blueprint.post("/pause")
def pause() -> Any:
    reason = request.form.get("reason") or None
    if reason is not None and len(reason) > control.MAX_REASON:
        raise ConfigError("reason", f"{reason[:40]}...", f"at most {control.MAX_REASON} characters")
    paused, added = control.pause(conn(), reason, who(), now())
    message = ("Paused: workers on every host finish what they hold and claim nothing until resumed"
               if added else "Already paused" + ("; the reason is replaced" if reason else ""))
    record("pause", paused.reason, None, message)
    return back_to(url_for("overview.index"))


@blueprint.post("/resume")
def resume() -> Any:
    lifted = control.resume(conn())
    record("resume", None if lifted is None else f"paused since {control.iso_time(lifted.since)}", None,
           "Resumed: workers claim again" if lifted else "Not paused: workers are claiming already")
    return back_to(url_for("overview.index"))


POOL_SIGNALS = {"add-worker": (signal.SIGTTIN, "Asked the supervisor for one worker more"),
                "remove-worker": (signal.SIGTTOU, "Asked the supervisor for one worker fewer (one stays)"),
                "drain": (signal.SIGTERM, "The supervisor drains: in-flight documents finish, then it exits")}


def signal_pool(action: str) -> Any:
    """Signal the local supervisor (only the console inside `run` has one)."""
    pool = state().pool
    if pool is None:
        abort(404, description="no supervisor here to act on: this console runs on its own "
                               "(`kgsupervisor console`)")
    signum, message = POOL_SIGNALS[action]
    pool.signal(signum)
    record(action, f"{signal.Signals(signum).name} to supervisor pid {pool.supervisor_pid}", None, message)
    return back_to(url_for("overview.index"))


@blueprint.post("/workers/add")
def add_worker() -> Any:
    return signal_pool("add-worker")


@blueprint.post("/workers/remove")
def remove_worker() -> Any:
    return signal_pool("remove-worker")


@blueprint.post("/drain")
def drain() -> Any:
    return signal_pool("drain")
