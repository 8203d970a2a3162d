"""Section 9: PostgreSQL at a million queue rows: bulk statements, bulk commands, claim, counts and
the status endpoint, with the counts compared with a full GROUP BY after every step."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import closing

from kgsupervisor.queue.leased import PG_CLAIM_SQL, queue_for
from kgsupervisor.store.postgres import PGConnection

from .common import KG, child_env, log, median, percentile
from .context import Context
from .growth import status_endpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.pgserver import PostgresServer  # noqa: E402  (the tests' throwaway server)

STATEMENT_ROWS = 1_000  # the "statements of 1,000" every single INSERT is compared with
CLAIMS = 300
# Every status (and an unknown one) in every bulk INSERT: the triggers add one delta per status.
STATUS_MIX = "(ARRAY['pending', 'completed', 'failed', 'skipped', 'processing', 'archived'])[1 + g % 6]"


def clock(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def stat(times: list[float]) -> dict:
    return {"p50_ms": 1000 * median(times), "p95_ms": 1000 * percentile(times, 95), "n": len(times)}


class Steps:
    """The steps of the section in order: what each took, and whether the counts were exact after it."""

    def __init__(self, conn: PGConnection) -> None:
        self.conn = conn
        self.rows: list[dict] = []

    def run(self, name: str, fn, **extra) -> float:
        took = clock(fn)
        self.check(name, took, **extra)
        return took

    def check(self, name: str, seconds: float | None, **extra) -> None:
        scan, counted = group_by(self.conn), counts_table(self.conn)
        exact = scan == counted
        self.rows.append({"step": name, "seconds": seconds, "exact": exact, "rows": sum(scan.values()), **extra})
        took = "" if seconds is None else f"{seconds:8.2f} s  "
        log(f"  {took}{name}: {sum(scan.values()):,} queue rows, counts "
            f"{'exact' if exact else f'WRONG: {counted} vs {scan}'}")


def group_by(conn: PGConnection) -> dict[str, int]:
    return dict(conn.execute("SELECT COALESCE(status, ''), COUNT(*) FROM kg_processing_queue GROUP BY 1").fetchall())


def counts_table(conn: PGConnection) -> dict[str, int]:
    return {s: n for s, n in conn.execute("SELECT status, CAST(SUM(n) AS BIGINT) FROM kg_queue_status_counts "
                                          "GROUP BY 1").fetchall() if n}


def insert_once(conn: PGConnection, n: int) -> None:
    conn.execute(f"INSERT INTO kg_processing_queue (content_id, status) SELECT g, {STATUS_MIX} "
                 f"FROM generate_series(1, {n}) AS g")


def insert_in_statements(conn: PGConnection, n: int) -> None:
    for low in range(1, n + 1, STATEMENT_ROWS):
        conn.execute(f"INSERT INTO kg_processing_queue (content_id, status) SELECT g, {STATUS_MIX} "
                     f"FROM generate_series({low}, {min(low + STATEMENT_ROWS - 1, n)}) AS g")


def linearity(conn: PGConnection, steps: Steps, levels: tuple[int, ...]) -> list[dict]:
    """One INSERT of N rows against N / 1,000 INSERTs of 1,000 (each its own transaction), on an
    emptied queue each time; the median of 3 below a million rows, one run at a million."""
    out = []
    for n in levels:
        once, batched = [], []
        for _ in range(3 if n < 1_000_000 else 1):
            conn.execute("TRUNCATE kg_processing_queue")
            once.append(steps.run(f"one INSERT of {n:,} rows", lambda: insert_once(conn, n)))
            conn.execute("TRUNCATE kg_processing_queue")
            batched.append(steps.run(f"{n // STATEMENT_ROWS:,} INSERTs of {STATEMENT_ROWS:,} rows",
                                     lambda: insert_in_statements(conn, n)))
        out.append({"rows": n, "one_s": median(once), "statements_s": median(batched),
                    "ratio": median(once) / median(batched), "runs": len(once)})
        log(f"  {n:>9,} rows: one INSERT {median(once):.2f} s, in statements of {STATEMENT_ROWS:,} "
            f"{median(batched):.2f} s, ratio {median(once) / median(batched):.2f}")
    return out


def one_transaction_of_single_rows(conn: PGConnection, steps: Steps, n: int = 10_000) -> dict:
    """What per-statement counting still costs: n one-row INSERTs inside one transaction update
    the same count row n times, against the same statements each committed on its own."""
    conn.execute("TRUNCATE kg_processing_queue")

    def in_one_transaction() -> None:
        conn.execute("BEGIN")
        for i in range(n):
            conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (i,))
        conn.execute("COMMIT")

    def each_committed() -> None:
        for i in range(n):
            conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (i,))

    one = steps.run(f"{n:,} one-row INSERTs in one transaction", in_one_transaction)
    each = steps.run(f"{n:,} one-row INSERTs, each committed", each_committed)
    return {"statements": n, "one_transaction_s": one, "each_committed_s": each}


def claim_cost(conn: PGConnection) -> dict:
    """PostgresQueue.claim of 5, released after each (10 warm-up claims first)."""
    queue = queue_for(conn)
    times = []
    for i in range(CLAIMS + 10):
        started = time.perf_counter()
        held = queue.claim("bench:pgscale", uuid.uuid4().hex, 5, 60.0, time.time())
        took = time.perf_counter() - started
        assert len(held) == 5
        queue.release(held)
        if i >= 10:
            times.append(took)
    return stat(times)


def claim_plan(conn: PGConnection) -> str:
    """EXPLAIN ANALYZE of the product's claim statement, rolled back."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + PG_CLAIM_SQL,
                            ("", "bench:plan", "plan", 0.0, time.time(), 5)).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return "\n".join(r[0] for r in rows)


def counts_cost(conn: PGConnection, url: str) -> dict:
    """queue.counts(), and `kgsupervisor queue --json` in this process (the command's own work)."""
    queue = queue_for(conn)
    counts = [clock(queue.counts) for _ in range(50)]
    command = [clock(lambda: queue_json(url)) for _ in range(7)]
    return {"counts": stat(counts), "queue_cmd_inproc": stat(command)}


def queue_json(url: str) -> None:
    from kgsupervisor.ops.cli import main as cli
    with contextlib.redirect_stdout(io.StringIO()) as out:
        cli.main(["queue", "--db", url, "--json"], standalone_mode=False)
    assert json.loads(out.getvalue())["total"] > 0


def command(args: list[str]) -> tuple[float, str]:
    """A kgsupervisor command as a real process (interpreter start-up included): time, stdout."""
    started = time.perf_counter()
    proc = subprocess.run(KG + args, env=child_env(), capture_output=True, text=True, timeout=3600)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:1])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return took, proc.stdout.strip()


def add_documents_sql(conn: PGConnection, n: int) -> None:
    """n crawled_content rows in one statement (the queue needs their ids, not their text)."""
    conn.execute("INSERT INTO crawled_content (url, title, markdown) "
                 f"SELECT 'https://bench.example/' || g, 'document ' || g, 'text' FROM generate_series(1, {n}) AS g")


def run_pgscale(ctx: Context) -> dict:
    n = ctx.sizes.pg_scale_rows
    levels = tuple(x for x in (10_000, 100_000, 1_000_000) if x <= n)
    server = PostgresServer().start()
    try:
        url = server.create_database("pgscale")
        took, out = command(["init-db", "--db", url])
        log(f"  init-db: {out.splitlines()[-1]}")
        with closing(PGConnection(url)) as conn:
            steps = Steps(conn)
            log(f"adding {n:,} documents to crawled_content")
            steps.run(f"{n:,} documents into crawled_content (one INSERT)", lambda: add_documents_sql(conn, n))
            conn.execute("ANALYZE crawled_content")
            inserts = linearity(conn, steps, levels)
            single = one_transaction_of_single_rows(conn, steps)
            conn.execute("TRUNCATE kg_processing_queue")
            conn.execute("INSERT INTO kg_processing_queue (content_id) SELECT g FROM generate_series(1, 1000) AS g")
            small = claim_cost(conn)
            steps.check("claims at 1,000 pending rows", None)
            conn.execute("TRUNCATE kg_processing_queue")
            enqueue_s, enqueue_out = command(["enqueue", "--db", url, "--all-unprocessed"])
            steps.check(f"`enqueue --all-unprocessed` of {n:,} documents", enqueue_s, output=enqueue_out)
            counts = counts_cost(conn, url)
            big = claim_cost(conn)
            plan = claim_plan(conn)
            steps.check(f"claims at {n:,} pending rows", None)
            failed = n // 10
            steps.run(f"UPDATE of {failed:,} rows to failed (one statement)",
                      lambda: conn.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE id % 10 = 0"))
            retry_s, retry_out = command(["retry", "--db", url, "--failed"])
            steps.check(f"`retry --failed` of {failed:,} rows", retry_s, output=retry_out)
            expiring = queue_for(conn)
            steps.run(f"claim of {failed:,} rows in one statement, lease 0 s",
                      lambda: expiring.claim("bench:gone", "gone", failed, 0.0, time.time()))
            requeued: list[int] = []
            steps.run(f"requeue of {failed:,} expired leases (in batches)",
                      lambda: requeued.append(expiring.requeue_expired(time.time() + 1)))
            log(f"  status endpoint on a {n:,}-row queue")
            status = status_endpoint(ctx, url)
            steps.check("status endpoint requests", None)
            steps.run(f"DELETE of {failed:,} rows (one statement)",
                      lambda: conn.execute("DELETE FROM kg_processing_queue WHERE id % 10 = 5"))
            steps.run("TRUNCATE of the queue", lambda: conn.execute("TRUNCATE kg_processing_queue"))
        return {"rows": n, "inserts": inserts, "single_rows": single, "enqueue_all": {"s": enqueue_s, "out": enqueue_out},
                "retry_failed": {"rows": failed, "s": retry_s, "out": retry_out}, "requeued": requeued[0],
                "claim_small": {"rows": 1_000, **small}, "claim_big": {"rows": n, **big}, "claim_plan": plan,
                **counts, "status_endpoint": status, "steps": steps.rows,
                "server_settings": "fsync=off, synchronous_commit=off, full_page_writes=off (the tests' throwaway server)",
                "postgres_version": server_version(url)}
    finally:
        server.stop()


def server_version(url: str) -> str:
    with closing(PGConnection(url)) as conn:
        return conn.execute("SHOW server_version").fetchone()[0]
