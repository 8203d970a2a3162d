"""Adaptive in-flight limits and rate budgets with real supervisors, workers, signals and HTTP."""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import closing

import pytest

from .conftest import held_until, seed, status_counts, wait_for
from kgsupervisor.store.postgres import PGConnection

from .faultserver import sleep_then
from .processes import run_to_exit
from .test_pause import Host, pg_counts, queue_rows

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def admission(host: Host) -> dict:
    """The one endpoint's entry of /stats kg_admission ({} until the supervisor answers)."""
    entries = host.stats().get("kg_admission") or []
    return entries[0] if entries else {}


def worker_states(host: Host) -> list[str]:
    return [w["state"] for w in host.workers() if w["running"]]


def processing_rows(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'processing'").fetchone()[0]


def charged(conn) -> int:
    """Attempts charged: retry counts and attempts recorded as retried or failed."""
    retries = conn.execute("SELECT COALESCE(SUM(retry_count), 0) FROM kg_processing_queue").fetchone()[0]
    outcomes = conn.execute("SELECT COUNT(*) FROM kg_processing_attempts "
                            "WHERE outcome IN ('retried', 'failed')").fetchone()[0]
    return retries + outcomes


def test_a_worker_without_a_permit_waits_holding_no_claim(conn, db_path, fault_server, processes):
    seed(conn, 8)
    gate = threading.Event()
    server = fault_server(held_until(gate))
    host = Host(processes, db_path, server.url, "--workers", "3", "--batch-size", "5")
    try:
        # A new endpoint's limit starts at KG_MIN_INFLIGHT (1): one request goes, two workers wait.
        wait_for(lambda: len(server.requests) == 1
                 and sorted(worker_states(host)) == ["busy", "waiting", "waiting"],
                 30, message="one worker sending, two waiting for a permit")
        assert processing_rows(conn) == 1, "only the document in flight is claimed, not a batch"
        assert conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE lease_owner IS NOT NULL "
                            "AND status != 'processing'").fetchone()[0] == 0
        wait_for(lambda: admission(host).get("waiting") == 2, 10, message="/stats shows two waiting")
        assert {k: admission(host)[k] for k in ("limit", "in_use", "waiting")} == {"limit": 1, "in_use": 1,
                                                                                  "waiting": 2}
        metrics = host.get("/metrics").text
        assert 'kgsupervisor_kg_endpoint_permits_waiting{url="%s"} 2.0' % server.url in metrics
        assert '<td class="sending">1 of 1 in flight, 2 waiting</td>' in host.get("/live").text  # the console
        status = run_to_exit("status", "--status-addr", host.addr).stdout
        assert f"  sending to {server.url}: in-flight limit 1, 1 in use, 2 worker(s) waiting" in status
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 8}, 60, message="everything completed")
    finally:
        gate.set()
        host.proc.stop()
    assert len(server.requests) == 8
    assert charged(conn) == 0


def test_adaptive_off_sends_from_every_worker_at_once_as_before(conn, db_path, fault_server, processes):
    seed(conn, 8)
    gate = threading.Event()
    server = fault_server(held_until(gate))
    host = Host(processes, db_path, server.url, "--workers", "3", "--batch-size", "1", "--adaptive", "off")
    try:
        wait_for(lambda: len(server.requests) == 3, 30, message="three requests in flight at once")
        assert processing_rows(conn) == 3
        wait_for(lambda: host.stats().get("kg_admission") == [], 10, message="/stats without any limit")
        assert "waiting" not in worker_states(host)
        assert "kgsupervisor_kg_endpoint_inflight_limit{" not in host.get("/metrics").text
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 8}, 60, message="everything completed")
    finally:
        gate.set()
        host.proc.stop()


def test_the_permit_of_a_worker_killed_mid_request_goes_back(conn, db_path, fault_server, processes):
    seed(conn, 4)
    gate = threading.Event()
    server = fault_server(held_until(gate))
    host = Host(processes, db_path, server.url, "--workers", "2", env={"KG_LEASE_SECONDS": "600"})
    try:
        wait_for(lambda: len(server.requests) == 1, 30, message="the one permit in use")
        sender = next(w for w in host.workers() if w["state"] == "busy")
        os.kill(sender["pid"], signal.SIGKILL)
        # Its permit comes back with its death: the other worker (or its replacement) sends next.
        wait_for(lambda: len(server.requests) == 2, 30, message="a second request after the kill")
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 4}, 60, message="everything completed")
        wait_for(lambda: admission(host).get("in_use") == 0, 10, message="no permit left held")
    finally:
        gate.set()
        host.proc.stop()


def test_a_429_storm_lowers_the_limit_and_charges_nothing(conn, db_path, fault_server, processes):
    seed(conn, 200)
    storm = threading.Event()

    def behaviour(payload: dict, n: int):
        if storm.is_set():
            return 429, b'{"detail": "rate limited"}', {"Retry-After": "0"}
        time.sleep(0.05)  # a service time that dwarfs the noise of a loaded machine; no queue: the limit grows
        return None
    server = fault_server(behaviour)
    host = Host(processes, db_path, server.url, "--workers", "6", "--batch-size", "1",
                env={"KG_BREAKER_THRESHOLD": "1000"})  # keep sending through the storm
    try:
        wait_for(lambda: admission(host).get("limit", 0) >= 4, 60, message="the limit grew on fast answers")
        grown = admission(host)["limit"]
        storm.set()
        wait_for(lambda: admission(host).get("limit", grown) <= grown // 2, 30, message="the limit halved")
        storm.clear()
        wait_for(lambda: status_counts(conn) == {"completed": 200}, 90, message="everything completed")
    finally:
        storm.clear()
        host.proc.stop()
    exchanges = [e for each in server.journal.by_document().values() for e in each]
    assert any(e.status == 429 for e in exchanges), "the storm reached the workers"
    assert charged(conn) == 0


def test_a_request_budget_is_shared_by_the_workers_of_a_supervisor(conn, db_path, fault_server, processes):
    seed(conn, 20)
    server = fault_server()
    host = Host(processes, db_path, server.url, "--workers", "3", env={"KG_RATE_LIMIT_RPM": "5"})
    try:
        # Every worker tried to send and found the minute's budget spent: five requests, no more.
        wait_for(lambda: worker_states(host) == ["waiting"] * 3 and len(server.requests) == 5, 30,
                 message="three workers waiting for budget after five requests")
        budget = admission(host)["budget"]["requests"]
        assert budget == {"used": 5, "limit": 5}
        wait_for(lambda: status_counts(conn).get("completed") == 5, 10, message="the five answers written")
        assert 'kgsupervisor_kg_endpoint_budget_used{kind="requests",url="%s"} 5.0' % server.url \
            in host.get("/metrics").text
    finally:
        output = host.proc.stop()
    assert len(server.requests) == 5
    assert status_counts(conn) == {"completed": 5, "pending": 15}, "the drain gave back what waited, uncharged"
    assert charged(conn) == 0
    assert host.proc.returncode == 0, output


def test_a_document_bigger_than_the_whole_token_budget_fails_alone_with_the_reason(conn, db_path, fault_server,
                                                                                     processes):
    seed(conn, 1)
    server = fault_server()
    host = Host(processes, db_path, server.url, "--workers", "1", env={"KG_TOKEN_BUDGET_TPM": "3"})
    try:
        wait_for(lambda: status_counts(conn) == {"failed": 1}, 30, message="failed for good")
    finally:
        host.proc.stop()
    message = conn.execute("SELECT error_message FROM kg_processing_queue").fetchone()[0]
    assert "never fits the rate budget" in message and "KG_TOKEN_BUDGET_TPM" in message
    assert server.requests == []


def test_a_big_move_of_the_limit_is_logged_once(conn, db_path, fault_server, processes):
    seed(conn, 400)
    # A service time that dwarfs a busy machine's scheduling noise: the limit's rounds read an
    # unloaded service and grow (answered at once, the latency was the workers' own CPU contention,
    # which on a loaded 2-core CI machine rose with the limit and held it at 2).
    server = fault_server(lambda payload, n: sleep_then(0.2))
    host = Host(processes, db_path, server.url, "--workers", "8", "--batch-size", "1")
    try:
        host.proc.wait_for_log("in-flight limit of", timeout=60)
    finally:
        host.proc.stop()
    line = next(line for line in host.proc.output.splitlines() if "in-flight limit of" in line)
    assert f"in-flight limit of {server.url} rose from 1 to" in line


def test_a_request_budget_on_postgresql_is_shared_by_two_supervisors(pg_backend, processes, fault_server):
    url = pg_backend.target
    with closing(PGConnection(url)) as conn:
        queue_rows(conn, 20)
    server = fault_server()
    env = {"KG_RATE_LIMIT_RPM": "5"}
    # Credentials in the service URL: the budget's rows, shared through the database, never hold them.
    service_url = server.url.replace("http://", "http://kg:s3cret-pw@")
    hosts = [Host(processes, url, service_url, "--workers", "2", env=env, name=name)
             for name in ("host-a", "host-b")]
    try:
        # Both hosts' four workers tried and found the minute's budget spent: five requests between them.
        wait_for(lambda: all(worker_states(h) == ["waiting"] * 2 for h in hosts) and len(server.requests) == 5,
                 60, message="four workers of two hosts waiting for budget after five requests")
        assert {h.addr: admission(h)["budget"]["requests"]["used"] for h in hosts} == {h.addr: 5 for h in hosts}
        assert not any("s3cret-pw" in h.get(path).text for h in hosts for path in ("/stats", "/metrics"))
        # The five answers are written; what a worker claimed by the room it saw waits in hand.
        wait_for(lambda: pg_counts(url).get("completed") == 5, 10, message="the five answers written")
    finally:
        for host in hosts:
            host.proc.stop()
    assert len(server.requests) == 5
    assert pg_counts(url) == {"completed": 5, "pending": 15}, "the drain gave back what waited, uncharged"
    with closing(PGConnection(url)) as conn:
        assert conn.execute("SELECT COALESCE(SUM(retry_count), 0) FROM kg_processing_queue").fetchone()[0] == 0
        spends = conn.execute("SELECT * FROM kg_supervisor_budget_spends").fetchall()
    assert len(spends) == 5 and "s3cret-pw" not in repr(spends)
