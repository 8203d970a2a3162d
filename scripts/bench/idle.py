"""Sections 4-5: pickup latency of an idle supervisor at default settings, and what idling costs."""
from __future__ import annotations

import random
import sqlite3
import time
from contextlib import closing

import psutil

from kgsupervisor.queue.leased import SQLiteQueue
from kgsupervisor.store.sqlite import connect

from .common import Supervisor, log, median, percentile, reset_database, tree
from .context import Context

DEFAULT_POLL_INTERVAL = 5.0  # KG_POLL_INTERVAL's default: the upper bound of a blind wait


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def role(p: psutil.Process, root: int) -> str:
    if p.pid == root:
        return "supervisor"
    name = p.name()
    return {"kgs-stats": "stats manager", "kgs-status": "status endpoint"}.get(name, name)


def idle_cost(sup: Supervisor, window: float) -> dict:
    """CPU of every process of the tree over `window` seconds, then RSS/USS/PSS of each."""
    procs = tree(sup.pid)
    before = {p.pid: cpu_seconds(p) for p in procs}
    started = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - started
    rows = []
    for p in procs:
        try:
            used = cpu_seconds(p) - before[p.pid]
            mem = p.memory_full_info()
            rows.append({"pid": p.pid, "role": role(p, sup.pid), "cpu_s": used,
                         "cpu_pct": 100 * used / elapsed, "rss": mem.rss, "uss": mem.uss, "pss": mem.pss})
        except psutil.Error:
            rows.append({"pid": p.pid, "role": "gone", "cpu_s": 0.0, "cpu_pct": 0.0, "rss": 0, "uss": 0, "pss": 0})
    total = {k: sum(r[k] for r in rows) for k in ("cpu_s", "cpu_pct", "rss", "uss", "pss")}
    return {"window_s": elapsed, "processes": rows, "total": total}


def pickup_sample(db_conn: sqlite3.Connection, queue: SQLiteQueue, content_id: int,
                  timeout: float = 20.0) -> dict:
    """Enqueue one document (as `kgsupervisor enqueue` does) and wait until it is completed.

    Picked up = the claim's time in the attempt history (`claimed_at`, the worker's clock at its
    claim) minus the moment the enqueue had committed."""
    queue.enqueue([content_id], 1, time.time())
    committed = time.time()
    qid = db_conn.execute("SELECT MAX(id) FROM kg_processing_queue WHERE content_id = ?",
                          (content_id,)).fetchone()[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        (status,) = db_conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (qid,)).fetchone()
        if status in ("completed", "failed"):
            done = time.time()
            (claimed,) = db_conn.execute("SELECT MIN(claimed_at) FROM kg_processing_attempts WHERE queue_id = ?",
                                         (qid,)).fetchone()
            return {"pickup_s": (claimed or done) - committed, "done_s": done - committed,
                    "status": status}
        time.sleep(0.005)
    return {"pickup_s": float("nan"), "done_s": float("nan"), "status": "timeout"}


def pickups(ctx: Context, samples: int, gap, label: str) -> list[dict]:
    rows = []
    with closing(connect(ctx.db)) as conn:
        queue = SQLiteQueue(conn)
        ids = [r[0] for r in conn.execute("SELECT id FROM crawled_content ORDER BY id")]
        for i in range(samples):
            time.sleep(gap())
            row = pickup_sample(conn, queue, ids[i % len(ids)])
            rows.append(row)
        p = [r["pickup_s"] for r in rows]
    log(f"  pickup ({label}): p50 {1000 * median(p):.0f} ms, p95 {1000 * percentile(p, 95):.0f} ms, "
        f"max {1000 * max(p):.0f} ms over {len(p)}")
    return rows


def run_idle(ctx: Context) -> dict:
    s = ctx.sizes
    reset_database(ctx.db, queued=False)
    sup = Supervisor(ctx.db, ctx.service(0.0).url, 4, ctx.path("idle-supervisor.log"), status=True).start()
    try:
        time.sleep(3.0)  # start-up is over: workers have checked in and gone idle
        cost = idle_cost(sup, s.idle_window)
        log(f"  idle: {cost['total']['cpu_pct']:.2f}% of a core over {cost['window_s']:.0f} s, "
            f"USS {cost['total']['uss'] / 2**20:.0f} MiB for {len(cost['processes'])} processes")
        # Idle: every worker has waited out its post-work poll interval before the next document.
        idle = pickups(ctx, s.pickup_idle_samples,
                       lambda: DEFAULT_POLL_INTERVAL + 0.7 + random.uniform(0, 0.3), "idle")
        # Trickle: the next document comes 0.3-1.5 s after the last one was done.
        trickle = pickups(ctx, s.pickup_trickle_samples, lambda: random.uniform(0.3, 1.5), "trickle")
    finally:
        sup.stop()
    return {"cost": cost, "pickup_idle": idle, "pickup_trickle": trickle, "workers": 4,
            "poll_interval": DEFAULT_POLL_INTERVAL}
