"""Issue 18's idle targets on SQLite, measured alone: what an idle supervisor with 4 workers
costs (whole tree, 30 s), and how soon it picks up a committed INSERT.

    cd scripts && python -m bench.idlewake [--window 30] [--samples 40] [--env KG_X=y ...]

Pickup here is the time from the enqueue's commit to the first sight of its row out of
`pending` (the claim), watched every millisecond from this process.
"""
from __future__ import annotations

import argparse
import os
import random
import sqlite3
import tempfile
import time
from contextlib import closing

from kgsupervisor.queue.leased import SQLiteQueue
from kgsupervisor.store.sqlite import connect

from .common import Service, Supervisor, build_database, log, median, percentile, reset_database, tree
from .idle import role

DOCUMENTS = 50


def cpu_ns(pid: int) -> int:
    """CPU time of every live thread of `pid`, in nanoseconds (schedstat: finer than clock ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError):
            pass
    return total


def idle_cost(root: int, window: float) -> tuple[float, list[tuple[str, int, float]]]:
    """Percent of a core the process tree of `root` used over `window` seconds, and each process's ms."""
    procs = tree(root)
    before = {p.pid: cpu_ns(p.pid) for p in procs}
    started = time.monotonic()
    time.sleep(window)
    elapsed = time.monotonic() - started
    rows = [(role(p, root), p.pid, (cpu_ns(p.pid) - before[p.pid]) / 1e6) for p in procs]
    return 100 * sum(r[2] for r in rows) / 1000 / elapsed, rows


def claimed_after_commit(conn: sqlite3.Connection, queue: SQLiteQueue, content_id: int,
                         timeout: float = 20.0) -> float:
    """Enqueue `content_id` and return the seconds until its row left pending (NaN on timeout)."""
    queue.enqueue([content_id], 1, time.time())
    committed = time.perf_counter()
    qid = conn.execute("SELECT MAX(id) FROM kg_processing_queue WHERE content_id = ?", (content_id,)).fetchone()[0]
    while time.perf_counter() - committed < timeout:
        if conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (qid,)).fetchone()[0] != "pending":
            return time.perf_counter() - committed
        time.sleep(0.001)
    return float("nan")


def wait_until_done(conn: sqlite3.Connection, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and conn.execute(
            "SELECT COUNT(*) FROM kg_processing_queue WHERE status IN ('pending', 'processing')").fetchone()[0]:
        time.sleep(0.01)


def pickups(db: str, samples: int, gap: tuple[float, float]) -> list[float]:
    """`samples` enqueues into an idle pool, each after a random pause in `gap` once the last is done."""
    found = []
    with closing(connect(db)) as conn:
        queue = SQLiteQueue(conn)
        ids = [r[0] for r in conn.execute("SELECT id FROM crawled_content ORDER BY id")]
        for i in range(samples):
            time.sleep(random.uniform(*gap))
            found.append(claimed_after_commit(conn, queue, ids[i % len(ids)]))
            wait_until_done(conn)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after start before the window")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the supervisor")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="kgidle-")
    db = f"{work}/idle.db"
    build_database(db, DOCUMENTS)
    reset_database(db, queued=False)
    env = dict(e.split("=", 1) for e in args.env)
    with Service("", 0.0, kind="dev") as service:
        sup = Supervisor(db, service.url, 4, f"{work}/supervisor.log", status=True, env=env).start()
        try:
            time.sleep(args.settle)
            pct, rows = idle_cost(sup.pid, args.window)
            log(f"idle: {pct:.3f}% of a core over {args.window:.0f} s (whole tree, {len(rows)} processes)")
            for name, pid, ms in rows:
                log(f"    {name:>16} pid {pid}: {ms:.1f} ms CPU")
            found = pickups(db, args.samples, (0.5, 1.5))
            log(f"pickup: p50 {1000 * median(found):.1f} ms, p95 {1000 * percentile(found, 95):.1f} ms, "
                f"max {1000 * max(found):.1f} ms over {len(found)}")
        finally:
            sup.stop()
    log(f"log: {work}/supervisor.log")


if __name__ == "__main__":
    main()
