"""Section 8: the same drain on PostgreSQL (one and two supervisors) beside SQLite, and NOTIFY pickup."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import closing

from kgsupervisor.store.copydb import copy_database
from kgsupervisor.store.postgres import PGConnection
from kgsupervisor.store.sqlite import connect

from .common import KG, child_env, log, median, percentile, reset_database
from .context import Context

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.pgserver import PostgresServer  # noqa: E402  (the tests' throwaway server)

WORKERS = 2  # per supervisor


def completed(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'completed'").fetchone()[0]


def drain_rate(ctx: Context, db: str, open_db, supervisors: int, url: str, label: str) -> dict:
    """Start `supervisors` supervisors of WORKERS workers on `db`; rate between 10% and 90% done."""
    n = ctx.sizes.documents
    procs = [subprocess.Popen(KG + ["run", "--db", db, "--service-url", url, "--workers", str(WORKERS),
                                    "--exit-when-empty", "--status-addr", "off",
                                    "--log-file", ctx.path(f"pg-{label}-{i}.log")], env=child_env())
             for i in range(supervisors)]
    marks: dict[float, float] = {}
    deadline = time.monotonic() + 600
    with closing(open_db()) as conn:
        while time.monotonic() < deadline:
            done = completed(conn)
            now = time.monotonic()
            for frac in (0.1, 0.9):
                if frac not in marks and done >= frac * n:
                    marks[frac] = now
            if done >= n:
                break
            time.sleep(0.02)
        total = completed(conn)
    for p in procs:
        p.wait(60)
    rate = 0.8 * n / (marks[0.9] - marks[0.1]) if len(marks) == 2 and marks[0.9] > marks[0.1] else float("nan")
    row = {"config": label, "supervisors": supervisors, "workers": supervisors * WORKERS, "rate": rate,
           "completed": total, "documents": n, "exit_codes": [p.returncode for p in procs]}
    log(f"  {label:<32} {rate:7.1f} docs/s ({total}/{n} done, exit {row['exit_codes']})")
    return row


def notify_pickup(ctx: Context, url: str, kg_url: str, samples: int) -> dict:
    """Enqueue one document at a time into an idle supervisor at default settings (5 s poll):
    the time until a worker has claimed it."""
    with closing(PGConnection(url)) as conn:
        conn.execute("UPDATE kg_processing_queue SET status = 'completed'")
        ids = [r[0] for r in conn.execute("SELECT id FROM crawled_content ORDER BY id LIMIT ?", (samples,))]
    proc = subprocess.Popen(KG + ["run", "--db", url, "--service-url", kg_url, "--workers", "4",
                                  "--status-addr", "off", "--log-file", ctx.path("pg-pickup.log")], env=child_env())
    times = []
    try:
        time.sleep(3.0)  # workers up and idle
        with closing(PGConnection(url)) as conn:
            for cid in ids:
                started = time.monotonic()
                qid = conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?) RETURNING id",
                                   (cid,)).fetchone()[0]
                while conn.execute("SELECT status FROM kg_processing_queue WHERE id = ?", (qid,)).fetchone()[0] == "pending":
                    if time.monotonic() - started > 10:
                        break
                    time.sleep(0.002)
                times.append(time.monotonic() - started)
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(60)
    result = {"p50_ms": 1000 * median(times), "p95_ms": 1000 * percentile(times, 95), "n": len(times)}
    log(f"  NOTIFY pickup, idle supervisor (4 workers, 5 s poll): p50 {result['p50_ms']:.0f} ms, "
        f"p95 {result['p95_ms']:.0f} ms over {len(times)}")
    return result


def run_postgres(ctx: Context) -> dict:
    """SQLite, PostgreSQL with one supervisor and with two, on the same documents and service."""
    server = PostgresServer().start()
    try:
        template = server.create_database("bench_template")
        reset_database(ctx.db)
        log("copying the benchmark database into PostgreSQL (copy-db)")
        copy_database(ctx.db, template)
        kg_url = ctx.service(0.0).url
        rows = []
        for repeat in range(2 if not ctx.quick else 1):
            reset_database(ctx.db)
            rows.append(drain_rate(ctx, ctx.db, lambda: connect(ctx.db), 1, kg_url, "SQLite, 1 supervisor"))
            for supervisors in (1, 2):
                name = f"bench_{supervisors}_{repeat}"
                with closing(PGConnection(server.url())) as admin:
                    admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "bench_template"')
                url = server.url(name)
                rows.append(drain_rate(ctx, url, lambda u=url: PGConnection(u), supervisors, kg_url,
                                       f"PostgreSQL, {supervisors} supervisor(s)"))
        pickup = notify_pickup(ctx, server.url("bench_1_0"), kg_url, ctx.sizes.pickup_idle_samples)
        settings = "fsync=off, synchronous_commit=off, full_page_writes=off (the tests' throwaway server)"
        return {"runs": rows, "pickup": pickup, "server_settings": settings}
    finally:
        server.stop()
