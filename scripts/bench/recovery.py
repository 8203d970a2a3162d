"""Section 7: kill -9 of a busy worker, and SIGTERM of the supervisor, idle and with work in flight."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import time
from contextlib import closing

import psutil

from .common import Supervisor, count_status, log, median, percentile, reset_database, wait_for, workers_of
from .context import Context

KILL_LATENCY = 0.2      # service latency while killing: every worker always has a document in flight
INFLIGHT_LATENCY = 1.0  # service latency of the SIGTERM-with-work case
HOST = socket.gethostname()


def owner(pid: int) -> str:
    return f"{HOST}:{pid}"


def held_by(conn: sqlite3.Connection, who: str) -> int:
    return conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'processing' "
                        "AND lease_owner = ?", (who,)).fetchone()[0]


def top_up(conn: sqlite3.Connection, low: int = 60) -> None:
    """Keep a backlog: completed rows go back to pending when the queue runs low."""
    if count_status(conn, "pending") < low:
        conn.execute("UPDATE kg_processing_queue SET status = 'pending', processed_at = NULL "
                     "WHERE status = 'completed'")


def victim(sup: Supervisor, conn: sqlite3.Connection, min_age: float = 2.6) -> psutil.Process | None:
    """A worker older than the crash-loop window that holds claims right now."""
    now = time.time()
    for p in workers_of(sup.pid):
        try:
            if now - p.create_time() >= min_age and held_by(conn, owner(p.pid)) > 0:
                return p
        except psutil.Error:
            pass
    return None


def kill_one(sup: Supervisor, conn: sqlite3.Connection, timeout: float = 10.0) -> dict | None:
    """SIGSTOP a busy worker (so what it holds cannot change), count its claims, SIGKILL it, and
    time: claims released, a new worker process running, the new worker's first claim."""
    for _ in range(50):
        wait_for(lambda: victim(sup, conn) is not None, 10.0, 0.01)
        target = victim(sup, conn)
        if target is None:
            return None
        os.kill(target.pid, signal.SIGSTOP)
        who = owner(target.pid)
        held = held_by(conn, who)
        if held:
            break
        os.kill(target.pid, signal.SIGCONT)  # it finished its batch meanwhile: another one
    else:
        return None
    before = {p.pid for p in workers_of(sup.pid)}
    os.kill(target.pid, signal.SIGKILL)
    t0 = time.monotonic()
    released = replaced = working = None
    while time.monotonic() - t0 < timeout and None in (released, replaced, working):
        now = time.monotonic() - t0
        if released is None and held_by(conn, who) == 0:
            released = now
        new = [p.pid for p in workers_of(sup.pid) if p.pid not in before]
        if replaced is None and new:
            replaced = now
        if new and working is None and any(held_by(conn, owner(pid)) for pid in new):
            working = now
        time.sleep(0.002)
    both = max(released, replaced) if released is not None and replaced is not None else None
    return {"held": held, "released_s": released, "replaced_s": replaced, "working_s": working,
            "recovered_s": both}


def run_kills(ctx: Context) -> list[dict]:
    reset_database(ctx.db)
    sup = Supervisor(ctx.db, ctx.service(KILL_LATENCY).url, 4, ctx.path("kill-supervisor.log")).start()
    rows = []
    try:
        with closing(sqlite3.connect(ctx.db, timeout=30, isolation_level=None)) as conn:
            time.sleep(3.0)
            for _ in range(ctx.sizes.kills):
                top_up(conn)
                row = kill_one(sup, conn)
                if row is not None:
                    rows.append(row)
                time.sleep(0.5)
    finally:
        sup.stop()
    rec = [r["recovered_s"] for r in rows if r["recovered_s"] is not None]
    log(f"  kill -9: replaced and released p50 {1000 * median(rec):.0f} ms, p95 "
        f"{1000 * percentile(rec, 95):.0f} ms over {len(rec)} kills")
    return rows


def documents_in_hand(sup: Supervisor) -> list[float]:
    """When each worker took the document it holds, from the status endpoint (its shared memory:
    the row in flight is no longer stamped in the database)."""
    import requests
    details = requests.get(sup.status_url + "/health", timeout=5).json()["worker_details"]
    now = time.time()
    return [now - d["held_seconds"] for d in details if d.get("current_content_id") is not None]


def sigterm(ctx: Context, latency: float, busy: bool) -> dict:
    sup = Supervisor(ctx.db, ctx.service(latency).url, 4, ctx.path("term-supervisor.log"), status=True).start()
    with closing(sqlite3.connect(ctx.db, timeout=30)) as conn:
        if busy:
            wait_for(lambda: len(documents_in_hand(sup)) >= 4, 30)
            time.sleep(0.3)
        else:
            time.sleep(2.0)
        in_flight = documents_in_hand(sup)
        sent = time.time()
        t0 = time.monotonic()
        sup.proc.send_signal(signal.SIGTERM)
        code = sup.proc.wait(120)
        took = time.monotonic() - t0
        left = count_status(conn, "processing")
    remaining = max((s + latency - sent for s in in_flight), default=0.0)
    sup.stop()
    return {"busy": busy, "exit_s": took, "exit_code": code, "in_flight": len(in_flight),
            "left_processing": left, "in_flight_remaining_s": max(0.0, remaining)}


def run_recovery(ctx: Context) -> dict:
    kills = run_kills(ctx)
    reset_database(ctx.db, queued=False)
    idle = [sigterm(ctx, 0.0, False) for _ in range(ctx.sizes.sigterms)]
    reset_database(ctx.db)
    busy = [sigterm(ctx, INFLIGHT_LATENCY, True) for _ in range(ctx.sizes.sigterms)]
    for label, rows in (("idle", idle), ("in flight", busy)):
        log(f"  SIGTERM {label}: exit p50 {1000 * median([r['exit_s'] for r in rows]):.0f} ms, "
            f"exit codes {sorted({r['exit_code'] for r in rows})}, left processing "
            f"{sum(r['left_processing'] for r in rows)}")
    return {"kills": kills, "sigterm_idle": idle, "sigterm_busy": busy, "kill_latency": KILL_LATENCY,
            "inflight_latency": INFLIGHT_LATENCY}
