"""Section 6: the cost of the queue's statements as the queue grows, and of reading its counts."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from contextlib import closing

import requests

from kgsupervisor.kg import devservice
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.leased import SQLiteQueue, db_timestamp
from kgsupervisor.queue.writeback import write_back
from kgsupervisor.store.sqlite import connect, transaction

from .common import KG, Supervisor, build_database, child_env, log, median, percentile
from .context import Context

REAL_DOCUMENTS = 200
FAKE_IDS = 10_000_000  # queue rows of documents that are not there: history and backlog only


def add_queue_rows(conn, start: int, count: int) -> None:
    """`count` rows in ONE executemany transaction: half completed history, half pending backlog."""
    stamp = db_timestamp(time.time())
    rows = ((FAKE_IDS + i, "completed" if i % 2 else "pending", 1, stamp,
             stamp if i % 2 else None) for i in range(start, start + count))
    with transaction(conn):
        conn.executemany("INSERT INTO kg_processing_queue (content_id, status, priority, queued_at, "
                         "processed_at) VALUES (?, ?, ?, ?, ?)", rows)


def stat(times: list[float]) -> dict:
    return {"p50_ms": 1000 * median(times), "p95_ms": 1000 * percentile(times, 95),
            "min_ms": 1000 * min(times), "n": len(times)}


def clock(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


CLAIM_PLAN_SQL = ("EXPLAIN QUERY PLAN SELECT id FROM kg_processing_queue WHERE {claimable} AND "
                  "(not_before IS NULL OR not_before <= 0) ORDER BY priority DESC, id ASC LIMIT 5")


def claim_plan(conn, claimable: str) -> str:
    """EXPLAIN QUERY PLAN of the product's own claim statement (or of its SELECT, in versions
    that do not expose the statement)."""
    try:
        from kgsupervisor.queue.leased import CLAIM_SQL
        rows = conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, ("", "", "", 0.0, 0.0, 5)).fetchall()
    except ImportError:
        rows = conn.execute(CLAIM_PLAN_SQL.format(claimable=claimable)).fetchall()
    return "; ".join(r[3] for r in rows)


def claim_cost(db: str, n: int, budget: float = 60.0) -> tuple[dict, dict, str]:
    """SQLiteQueue.claim of a batch of 5, released again after each: cost and plan. At most
    `budget` seconds (but 20 claims at least): a claim that scans the queue is slow at 1M rows."""
    from kgsupervisor.store.schema import CLAIMABLE
    with closing(connect(db)) as conn:
        q = SQLiteQueue(conn)
        claims, releases = [], []
        deadline = time.monotonic() + budget
        for i in range(n + 10):
            if len(claims) >= 20 and time.monotonic() > deadline:
                break
            started = time.perf_counter()
            held = q.claim("bench:growth", uuid.uuid4().hex, 5, 60.0, time.time())
            took = time.perf_counter() - started
            assert len(held) == 5
            if i >= 10:  # warm-up first
                claims.append(took)
                releases.append(clock(lambda: q.release(held)))
            else:
                q.release(held)
        plan = claim_plan(conn, CLAIMABLE)
    return stat(claims), stat(releases), plan


def claim_cost_analyzed(db: str, n: int) -> tuple[dict, str]:
    """The same after ANALYZE; the statistics are put back as they were afterwards."""
    with closing(connect(db)) as conn:
        has_stat = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").fetchone()
        saved = conn.execute("SELECT tbl, idx, stat FROM sqlite_stat1").fetchall() if has_stat else []
        conn.execute("ANALYZE")
    cost, _, plan = claim_cost(db, n)
    with closing(connect(db)) as conn:
        with transaction(conn):
            conn.execute("DELETE FROM sqlite_stat1")
            conn.executemany("INSERT INTO sqlite_stat1 (tbl, idx, stat) VALUES (?, ?, ?)", saved)
    return cost, plan


def measure_level(ctx: Context, db: str, results: dict) -> dict:
    s = ctx.sizes
    out: dict = {}
    out["claim"], out["release"], out["claim_plan"] = claim_cost(db, s.growth_claims)
    out["claim_analyzed"], out["claim_plan_analyzed"] = claim_cost_analyzed(db, max(20, s.growth_claims // 3))
    with closing(connect(db)) as conn:
        q = SQLiteQueue(conn)
        owner = "bench:growth"
        crashed = []
        for _ in range(20):
            held = q.claim(owner, uuid.uuid4().hex, 5, 60.0, time.time())
            crashed.append(clock(lambda: q.release_crashed(owner, None, "bench", 3, time.time())))
        out["release_crashed"] = stat(crashed)
        out["requeue_expired"] = stat([clock(lambda: q.requeue_expired(time.time())) for _ in range(20)])
        out["has_live_work"] = stat([clock(q.has_live_work) for _ in range(20)])
        out["counts"] = stat([clock(q.counts) for _ in range(7)])
        ids = list(results)[: s.growth_writebacks]
        out["enqueue"] = stat([clock(lambda: q.enqueue([cid], 5, time.time())) for cid in ids])
        held = q.claim(owner, uuid.uuid4().hex, len(ids), 60.0, time.time())
        assert {c.content_id for c in held} == set(ids), "the priority-5 rows come first"
        out["write_back"] = stat([clock(lambda: write_back(conn, c, results[c.content_id], time.time()))
                                  for c in held])
    out["queue_cmd"] = stat([clock(lambda: subprocess.run(KG + ["queue", "--db", db, "--json"], env=child_env(),
                                                          check=True, capture_output=True))
                             for _ in range(5)])
    out["queue_cmd_inproc"] = stat([clock(lambda: queue_command(db)) for _ in range(5)])
    return out


def queue_command(db: str) -> None:
    """`kgsupervisor queue --db DB --json` in this process: the command's own work, no start-up."""
    import contextlib
    import io

    from kgsupervisor.ops.cli import main as cli
    with contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main(["queue", "--db", db, "--json"], standalone_mode=False)
    assert json.loads(out.getvalue())["total"] > 0


def status_endpoint(ctx: Context, db: str, requests_n: int = 40) -> dict:
    """GET /stats of a supervisor on the big queue (workers disabled: they must not drain it)."""
    sup = Supervisor(db, ctx.service(0.0).url, 1, ctx.path("growth-supervisor.log"), status=True,
                     env={"KG_SERVICE_ENABLED": "false"}).start()
    times, totals = [], []
    try:
        time.sleep(2.5)
        session = requests.Session()
        for _ in range(requests_n):
            started = time.perf_counter()
            body = session.get(sup.status_url + "/stats", timeout=30).json()
            times.append(time.perf_counter() - started)
            totals.append(body["queue_size"].get("total", 0))
            time.sleep(0.12)
    finally:
        sup.stop()
    return {**stat(times), "max_ms": 1000 * max(times), "queue_total_seen": max(totals)}


def run_growth(ctx: Context) -> dict:
    db = ctx.path("growth.db")
    build_database(db, REAL_DOCUMENTS, seed=2)
    results = {}
    with closing(connect(db)) as conn:
        conn.execute("DELETE FROM kg_processing_queue")
        for (cid,) in conn.execute("SELECT id FROM crawled_content ORDER BY id").fetchall():
            payload, _ = build_payload(conn, cid)
            body = json.dumps(devservice.extract(payload)).encode()
            rowids = {c["vector_rowid"] for c in payload["chunks"]}
            results[cid] = parse_answer(body, content_id=cid, chunk_rowids=rowids)
    baseline = stat([clock(lambda: subprocess.run(KG + ["--version"], env=child_env(), check=True,
                                                  capture_output=True)) for _ in range(5)])
    levels, have = [], 0
    for level in ctx.sizes.growth_levels:
        with closing(connect(db)) as conn:
            started = time.monotonic()
            add_queue_rows(conn, have, level - have)
            fill = time.monotonic() - started
            have = level
        row = {"rows": level, "fill_s": fill, **measure_level(ctx, db, results)}
        levels.append(row)
        log(f"  {level:>9} rows (+{fill:.1f} s to insert): claim p50 {row['claim']['p50_ms']:.3f} ms, "
            f"(after ANALYZE {row['claim_analyzed']['p50_ms']:.3f} ms), "
            f"write-back p50 {row['write_back']['p50_ms']:.2f} ms, counts {row['counts']['p50_ms']:.1f} ms, "
            f"queue --json {row['queue_cmd_inproc']['p50_ms']:.1f} ms in-process, "
            f"{row['queue_cmd']['p50_ms']:.0f} ms as a process")
    status = status_endpoint(ctx, db)
    log(f"  status endpoint /stats at {have} rows: p50 {status['p50_ms']:.1f} ms, p95 {status['p95_ms']:.1f} ms,"
        f" max {status['max_ms']:.1f} ms")
    size = os.path.getsize(db)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix) and not ctx.keep:
            os.unlink(db + suffix)
    return {"levels": levels, "status_endpoint": status, "startup_baseline": baseline, "db_bytes": size}
