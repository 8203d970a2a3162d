"""Fault suite, PostgreSQL: a real `kgsupervisor run` draining a PostgreSQL queue, and two
supervisors (separate process trees, as two hosts would be) sharing one, one of them killed whole.

The database is a throwaway server of the tests' own (tests/pgserver.py); documents are checked
by the same check_invariants() as every other scenario.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import psutil
import pytest

from kgsupervisor.store.pgschema import migrate_pg
from kgsupervisor.store.postgres import PGConnection
from scripts.sampledata import add_documents

from ..conftest import wait_for
from ..faultserver import FaultServer
from ..pgserver import PostgresServer
from .harness import Outcome, Supervisor, check_invariants, queue_done

pytestmark = [pytest.mark.timeout(1800 if "--soak" in sys.argv else 240), pytest.mark.slow, pytest.mark.chaos]


def seed_pg(url: str, n: int) -> list[int]:
    conn = PGConnection(url)
    try:
        ids = add_documents(conn, n, seed=n)
        conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, 1)", [(i,) for i in ids])
        return ids
    finally:
        conn.close()


def count(url: str, where: str) -> int:
    conn = PGConnection(url)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM kg_processing_queue WHERE {where}").fetchone()[0]
    finally:
        conn.close()


def test_a_supervisor_drains_a_postgresql_queue_and_is_woken_by_notify(pg_backend, soak, tmp_path, reference_service):
    """Drain 200 documents; then, idle with a 30 s poll interval, a newly enqueued document is
    taken at once: only the NOTIFY trigger can have woken the workers."""
    url = pg_backend.target
    n = 3000 if soak else 200
    ids = seed_pg(url, n)
    sup = Supervisor(url, reference_service.url, "--workers", "2", env={"KG_POLL_INTERVAL": "30"},
                     log_path=str(tmp_path / "run.log"))
    try:
        sup.wait_ready()
        wait_for(lambda: queue_done(url, n), 120 if not soak else 900, interval=0.2, message="drained")
        wait_for(lambda: all(d.get("state") == "idle" for d in (sup.health() or {}).get("worker_details", [])),
                 10, interval=0.1, message="workers idle")
        ids += seed_pg(url, 1)
        wait_for(lambda: queue_done(url, n + 1), 10, interval=0.02,
                 message="the new document taken long before the 30 s poll")
        sup.stats_counting(n + 1)
        # Queue counts in /stats are refreshed every 2 s: wait for them to show the drain.
        stats = wait_for(lambda: (lambda st: st if st and st["queue_size"].get("completed") == n + 1 else None)(
            sup.stats()), 10, interval=0.2, message="/stats queue_size caught up")
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
    assert code == 0, sup.stderr[-3000:]
    assert stats["total_success"] == n + 1 and stats["queue_size"]["pending"] == 0, stats
    assert "postgresql://" in sup.stderr and "Traceback" not in sup.stderr
    assert stats["database"] == {"backend": "postgresql", "name": url} and stats["host"] == socket.gethostname()
    outcome = check_invariants(url, ids, Outcome("PostgreSQL: one supervisor drains the queue", n + 1,
                                                 "none; then one document enqueued into the idle supervisor "
                                                 "(KG_POLL_INTERVAL=30): taken on NOTIFY", exit_code=code),
                               queue_rows=n + 1, journal=reference_service.journal)
    assert outcome.failed == 0


def test_two_hosts_one_killed_whole_the_other_completes_everything(pg_backend, soak, tmp_path, reference_service):
    """Two supervisors drain one PostgreSQL queue against the reference service; one process
    tree is SIGKILLed mid-run, each of its workers waiting for an answer (no clean stop, nothing
    released): the other recovers its claims once their leases expire."""
    url = pg_backend.target
    # 600: a quarter done with both hosts busy, and enough left after the kill that host B is
    # still under load when host A's 3 s leases expire (it needs ~10 s for the rest).
    n = 6000 if soak else 600
    ids = seed_pg(url, n)
    lease = {"KG_LEASE_SECONDS": "3"}
    hold, release = threading.Event(), threading.Event()
    held_requests: list[int] = []

    def answers_until_held(payload: dict, i: int) -> str | None:
        """Host A's service: the reference answer, until `hold`; then no answer until host A is dead."""
        if not hold.is_set():
            return None
        held_requests.append(i)
        release.wait(120)
        return "reset"  # nobody is left to read an answer

    a_service = FaultServer(answers_until_held, journal=reference_service.journal)
    a = Supervisor(url, a_service.url, "--workers", "2", "--adaptive", "off", env=lease, log_path=str(tmp_path / "host-a.log"))
    b = Supervisor(url, reference_service.url, "--workers", "2", env=lease, log_path=str(tmp_path / "host-b.log"))
    recovered: list[float] = []
    try:
        a.wait_ready()
        b.wait_ready()
        wait_for(lambda: count(url, "status = 'completed'") >= n // 4, 120, interval=0.1, message="a quarter done")
        # Each of A's workers sends one document at a time: two held requests are both of them
        # waiting, each with its document (and the rest of its batch) claimed.
        hold.set()
        wait_for(lambda: len(held_requests) == 2, 30, message="both of host A's workers waiting for an answer")
        tree = [a.pid] + [p.pid for p in psutil.Process(a.pid).children(recursive=True)]
        of_a = "status = 'processing' AND lease_owner IN (%s)" % ",".join(
            f"'{socket.gethostname()}:{pid}'" for pid in tree)
        os.killpg(a.pid, signal.SIGKILL)  # the whole host at once: no worker releases anything
        killed = time.monotonic()
        a.proc.wait(10)
        held = count(url, of_a)
        wait_for(lambda: count(url, of_a) == 0, 60, interval=0.1, message="host A's claims recovered by host B")
        recovered.append(time.monotonic() - killed)
        wait_for(lambda: queue_done(url, n), 240, interval=0.2, message="host B drained everything")
        code = b.stop()
    finally:
        for sup in (a, b):
            if sup.proc.poll() is None:
                sup.kill_tree()
        release.set()
        a_service.close()
    assert code == 0, b.stderr[-3000:]
    assert held >= 2, f"host A held {held} claim(s) when it was killed"
    assert "with expired leases back to pending" in b.stderr, "B's lease upkeep did the recovery"
    outcome = check_invariants(
        url, ids, Outcome("PostgreSQL: two hosts, one SIGKILLed whole", n,
                          f"host A's whole process tree SIGKILLed after {n // 4} documents (KG_LEASE_SECONDS=3)",
                          recover_seconds=round(recovered[0], 2), exit_code=code,
                          notes=f"{held} claim(s) of host A recovered by lease expiry"),
        queue_rows=n, journal=reference_service.journal)
    assert outcome.failed == 0


def test_postgresql_server_down_mid_run_pauses_workers_and_loses_nothing(soak, tmp_path, reference_service):
    """The server stops (fast shutdown: every connection cut) for 3 s mid-run (10 s with --soak),
    then starts again: workers pause, reconnect, give back what they held; nothing is failed or
    charged, nothing lost or written twice. A server of its own, not the session's."""
    server = PostgresServer().start()
    try:
        url = server.create_database("outage")
        conn = PGConnection(url)
        try:
            migrate_pg(conn)
        finally:
            conn.close()
        n = 3000 if soak else 300
        outage = 10.0 if soak else 3.0
        ids = seed_pg(url, n)
        sup = Supervisor(url, reference_service.url, "--workers", "2", log_path=str(tmp_path / "run.log"))
        try:
            sup.wait_ready()
            wait_for(lambda: count(url, "status = 'completed'") >= n // 4, 60, interval=0.05, message="a quarter done")
            server.halt("fast")
            time.sleep(outage)
            server.start()
            up = time.monotonic()
            before = count(url, "status = 'completed'")
            wait_for(lambda: count(url, "status = 'completed'") > before, 30, interval=0.05,
                     message="documents completing again")
            back = time.monotonic() - up
            wait_for(lambda: queue_done(url, n), 120 if not soak else 900, interval=0.2, message="drained after the outage")
            health = sup.health() or {}
            code = sup.stop()
        finally:
            if sup.proc.poll() is None:
                sup.kill_tree()
        log = sup.stderr
        assert code == 0, log[-3000:]
        assert "database error, pausing" in log and "database works again" in log
        assert count(url, "retry_count > 0 OR status = 'failed'") == 0, "the outage charged a document"
        restarts = {d["worker_id"]: d["restarts"] for d in health.get("worker_details", [])}
        assert restarts and not any(restarts.values()), f"a worker died of the outage: {restarts}"
        assert "Traceback" not in log, log[-3000:]
        check_invariants(url, ids, Outcome("PostgreSQL: server down mid-run", n,
                                           f"server stopped (fast) for {outage:g} s after {n // 4} documents",
                                           recover_seconds=round(back, 2), exit_code=code,
                                           notes="workers paused and reconnected; none restarted"),
                         queue_rows=n, journal=reference_service.journal)
    finally:
        server.stop()
