"""Sections 1-3: drain throughput of kgsupervisor, the bare loop, Huey and the upstream schedule;
the ceilings of this machine (no HTTP, no database) and the service check."""
from __future__ import annotations

import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import psutil

from .common import (KG, child_env, count_status, log, median, read_log_tail, reset_database, stop_process,
                     watch_drain)
from .context import Context

NOHTTP = "bare claim + read + write-back (no HTTP)"
POST = "bare POST loop (no database)"
SERVICE_NAMES = {"bench": "benchmark service", "dev": "kgsupervisor dev-service"}
CONTENT_ID_INDEXES = (("chunk_entities", "content_id"), ("chunk_relationships", "content_id"),
                      ("content_chunks", "content_id"))


def loop_cmd(mode: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "bench.loops", mode, *args]


def verify(ctx: Context, db: str, total: int) -> dict:
    """The job was done, and done identically: every row completed, every KG row written once."""
    with closing(sqlite3.connect(db)) as conn:
        completed = count_status(conn)
        failed = count_status(conn, "failed")
        entities = conn.execute("SELECT COUNT(*) FROM chunk_entities").fetchone()[0]
        relationships = conn.execute("SELECT COUNT(*) FROM chunk_relationships").fetchone()[0]
    exact = (completed == total and entities == ctx.expected_entities
             and relationships == ctx.expected_relationships)
    return {"completed": completed, "failed": failed, "exact": exact}


def drain(ctx: Context, contender: str, workers: int, latency: float, procs_factory,
          window: float | None = None, db: str | None = None, analyze: bool = False) -> dict:
    """Reset the database, start the contender, watch it drain, stop it, check the result.

    `analyze`: ANALYZE the database with its queue full first (a what-if: see section 6)."""
    db = db or ctx.db
    total = ctx.sizes.documents
    reset_database(db)
    if analyze:
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("ANALYZE")
    service = ctx.service(latency)
    url = service.url
    before = _enqueue_hook(contender, ctx, db, workers, url)
    cpu0, svc0 = children_cpu(), process_cpu(service.proc.pid)
    started = time.monotonic()
    procs, logs = procs_factory(url, db)
    timeout = window or max(120.0, 4 * total * max(latency, 0.002) / workers + 60)
    progress = watch_drain(db, total, procs, timeout, started, window=window, service_pid=service.proc.pid)
    elapsed = time.monotonic() - started
    for proc in procs:
        stop_process(proc, _stop_signal(contender), timeout=60)
    cpu, svc = children_cpu() - cpu0, process_cpu(service.proc.pid) - svc0
    if analyze:  # back to the statistics init-db left: none for the queue
        with closing(sqlite3.connect(db)) as conn:
            conn.execute("DELETE FROM sqlite_stat1 WHERE tbl = 'kg_processing_queue'")
            conn.commit()
    row = {"contender": contender, "workers": workers, "latency_ms": round(latency * 1000),
           "documents": total, **verify(ctx, db, total), **before}
    done = progress.samples[-1][1]
    steady, steady_svc = progress.steady_cpu()
    row.update(cpu_ms_per_doc=steady, service_cpu_ms_per_doc=steady_svc,
               total_cpu_ms_per_doc=1000 * cpu / max(done, 1),
               total_service_cpu_ms_per_doc=1000 * svc / max(done, 1))
    if window is not None and done < total:
        row.update(rate=done / elapsed, wall_rate=done / elapsed, wall_s=elapsed, windowed=True)
    else:
        wall = progress.wall(total)
        row.update(rate=progress.steady_rate(total), wall_s=wall,
                   wall_rate=total / wall if wall else float("nan"), windowed=False)
        if row["completed"] < total or not row["exact"]:
            log(f"  {contender} x{workers}: only {row['completed']}/{total} completed "
                f"(exact={row['exact']}); log tail:\n{read_log_tail(logs[0]) if logs else ''}")
    log(f"  {contender:<9} {workers} worker(s) {row['latency_ms']:>3} ms: {row['rate']:7.1f} docs/s"
        f" (wall {row['wall_rate']:.1f}/s, {done}/{total} done{', window' if window else ''})")
    return row


def children_cpu() -> float:
    """CPU seconds of every child process that has exited and been waited for, with their own
    waited-for descendants (a supervisor's workers, Huey's worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _stop_signal(contender: str) -> int:
    import signal
    return signal.SIGINT if contender == "huey" else signal.SIGTERM


def _enqueue_hook(contender: str, ctx: Context, db: str, workers: int, url: str) -> dict:
    """Huey keeps its own queue: one task per queued document, enqueued before the clock starts."""
    if contender != "huey":
        return {}
    from .hueytask import huey, ingest
    huey.flush()
    started = time.monotonic()
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, content_id FROM kg_processing_queue ORDER BY id").fetchall()
    for queue_id, content_id in rows:
        ingest(queue_id, content_id)
    return {"enqueue_s": time.monotonic() - started}


def _spawn(ctx: Context, name: str, cmds: list[list[str]], env: dict | None = None) -> tuple[list, list]:
    procs, logs = [], []
    for i, cmd in enumerate(cmds):
        path = ctx.path(f"{name}-{i}.log")
        with open(path, "w") as out:
            procs.append(subprocess.Popen(cmd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                                          cwd=ctx.workdir))
        logs.append(path)
    return procs, logs


def ours(ctx: Context, workers: int):
    def factory(url: str, db: str):
        return _spawn(ctx, f"ours-{workers}", [KG + [
            "run", "--db", db, "--service-url", url, "--workers", str(workers), "--exit-when-empty",
            "--status-addr", "off", "--log-file", ctx.path(f"ours-{workers}-supervisor.log")]])
    return factory


def bare(ctx: Context, workers: int, mode: str = "bare", *extra: str):
    def factory(url: str, db: str):
        args = ["--db", db, "--url", url] if mode != "nohttp" else ["--db", db, "--answers", ctx.answers]
        args += list(extra)
        return _spawn(ctx, f"{mode}-{workers}", [loop_cmd(mode, *args)] * workers)
    return factory


def huey_consumer(ctx: Context, workers: int):
    def factory(url: str, db: str):
        exe = os.path.join(os.path.dirname(sys.executable), "huey_consumer")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "huey.bin.huey_consumer"]
        env = child_env(BENCH_DB=db, BENCH_URL=url, BENCH_HUEY_DB=ctx.path("huey.db"))
        return _spawn(ctx, f"huey-{workers}", [cmd + ["bench.hueytask.huey", "-k", "process", "-w",
                                                      str(workers)]], env)
    return factory


def run_throughput(ctx: Context) -> dict:
    """Every contender at every worker count and latency, interleaved so drift hits all alike."""
    os.environ["BENCH_HUEY_DB"] = ctx.path("huey.db")  # before bench.hueytask is imported
    s = ctx.sizes
    rows = []
    for latency in s.latencies:
        for workers in s.workers:
            repeats = s.repeats_0ms if latency == 0 else 1
            for _ in range(repeats):
                rows.append(drain(ctx, "ours", workers, latency, ours(ctx, workers)))
                rows.append(drain(ctx, "bare", workers, latency, bare(ctx, workers)))
                rows.append(drain(ctx, "huey", workers, latency, huey_consumer(ctx, workers)))
                if latency == 0:  # what-if: the bare loop plus the worker's extra commit per document
                    rows.append(drain(ctx, "bare_marked", workers, latency,
                                      bare(ctx, workers, "bare", "--mark-started")))
            rows.append(drain(ctx, "upstream", workers, latency, bare(ctx, workers, "upstream"),
                              window=s.upstream_window))
            if latency == 0:  # what-if: the same with the queue's statistics present (section 6)
                rows.append(drain(ctx, "ours_analyzed", workers, latency, ours(ctx, workers), analyze=True))
    return {"runs": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> list[dict]:
    """Median rate per (contender, workers, latency) over the repeats."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["contender"], r["workers"], r["latency_ms"]), []).append(r)
    return [{"contender": c, "workers": w, "latency_ms": l, "runs": len(rs),
             "rate": median([r["rate"] for r in rs]), "wall_rate": median([r["wall_rate"] for r in rs]),
             "cpu_ms_per_doc": median([r["cpu_ms_per_doc"] for r in rs]),
             "service_cpu_ms_per_doc": median([r["service_cpu_ms_per_doc"] for r in rs]),
             "exact": all(r["exact"] or r.get("windowed") for r in rs)}
            for (c, w, l), rs in sorted(groups.items())]


# -- section 3: the ceilings ----------------------------------------------------------------

def post_loop(ctx: Context, workers: int, kind: str, latency: float = 0.0, limit: int = 0) -> dict:
    """N processes POST every document's payload once (or `limit` each), no database."""
    url = ctx.service(latency, kind).url
    start_at = time.time() + 1.5 + 0.25 * workers
    cmds = [loop_cmd("post", "--url", url, "--payloads", ctx.payloads, "--index", str(i), "--of",
                     str(workers), "--start-at", str(start_at), "--limit", str(limit)) for i in range(workers)]
    procs = [subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, text=True) for cmd in cmds]
    reports = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        reports.append(json.loads(out.strip().splitlines()[-1]))
    done = sum(r["done"] for r in reports)
    seconds = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    row = {"loop": POST, "service": SERVICE_NAMES[kind], "workers": workers, "documents": done,
           "rate": done / seconds, "latency_ms": round(latency * 1000),
           "per_request_ms": 1000 * seconds * workers / done}
    log(f"  bare POST loop, {kind} service, {round(latency * 1000)} ms, {workers} process(es): "
        f"{row['rate']:.0f} docs/s, {row['per_request_ms']:.2f} ms a request")
    return row


def drop_content_id_indexes(db: str) -> list[str]:
    dropped = []
    with closing(sqlite3.connect(db)) as conn:
        for table, column in CONTENT_ID_INDEXES:
            for _, name, *_ in conn.execute(f"PRAGMA index_list({table})").fetchall():
                cols = [r[2] for r in conn.execute(f"PRAGMA index_info({name})")]
                if cols == [column]:
                    conn.execute(f"DROP INDEX {name}")
                    dropped.append(name)
        conn.commit()
    return dropped


def run_ceiling(ctx: Context) -> dict:
    s = ctx.sizes
    rows = []
    for workers in (1, 2, 4):
        r = drain(ctx, "nohttp", workers, 0.0, bare(ctx, workers, "nohttp"))
        rows.append({"loop": NOHTTP, "service": "—", "workers": workers, "rate": r["rate"],
                     "exact": r["exact"]})
    noidx = ctx.path("bench-noindex.db")
    reset_database(ctx.db)
    shutil.copyfile(ctx.db, noidx)
    dropped = drop_content_id_indexes(noidx)
    r = drain(ctx, "nohttp", 2, 0.0, bare(ctx, 2, "nohttp"), window=s.noindex_window, db=noidx)
    rows.append({"loop": NOHTTP + ", without the content_id indexes", "service": "—", "workers": 2,
                 "rate": r["rate"], "dropped": dropped, "exact": None})
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(noidx + suffix):
            os.unlink(noidx + suffix)
    for kind in ("bench", "dev"):
        for workers in s.workers:
            rows.append(post_loop(ctx, workers, kind))
    for latency in s.latencies:
        if latency:  # what one request costs at that latency, without any database work
            for workers in (1, max(s.workers)):
                rows.append(post_loop(ctx, workers, "bench", latency, limit=40 if ctx.quick else 200))
    return {"rows": rows, "extras": supervisor_extras(ctx)}


def supervisor_extras(ctx: Context, n: int = 200) -> dict:
    """What a kgsupervisor worker does per document or batch beyond the bare loop, one by one."""
    import multiprocessing
    import uuid

    from kgsupervisor.queue.leased import SQLiteQueue
    from kgsupervisor.store.sqlite import connect
    from kgsupervisor.worker.stats import WorkerStats

    from .common import percentile
    from .loops import mark_started

    reset_database(ctx.db)
    marks, extends = [], []
    with closing(connect(ctx.db)) as conn:
        q = SQLiteQueue(conn)
        for _ in range(n // 5):
            token = uuid.uuid4().hex
            held = q.claim("bench:extras", token, 5, 60.0, time.time())
            for claim in held:
                started = time.perf_counter()
                mark_started(conn, claim, time.time())
                marks.append(time.perf_counter() - started)
            started = time.perf_counter()
            q.extend(token, 60.0, time.time())
            extends.append(time.perf_counter() - started)
            q.release(held)
    manager = multiprocessing.get_context("fork").Manager()
    try:
        shared = manager.dict()
        stats = WorkerStats(worker_id=0)
        publishes = []
        for i in range(n):
            stats.total_processed = i
            started = time.perf_counter()
            shared[0] = stats.as_dict()
            publishes.append(time.perf_counter() - started)
    finally:
        manager.shutdown()

    def p(xs: list[float]) -> dict:
        return {"p50_ms": 1000 * median(xs), "p95_ms": 1000 * percentile(xs, 95)}
    out = {"mark_started": p(marks), "lease_extend": p(extends), "stats_publish": p(publishes)}
    log(f"  per-document extras: mark_started {out['mark_started']['p50_ms']:.3f} ms, stats publish "
        f"{out['stats_publish']['p50_ms']:.3f} ms, lease extend {out['lease_extend']['p50_ms']:.3f} ms")
    return out
