"""Several KG service endpoints: round robin among healthy ones, failover without charging, stats."""
from __future__ import annotations

import time

import pytest

from kgsupervisor.kg.breaker import CircuitBreaker
from kgsupervisor.kg.client import KGClient
from kgsupervisor.kg.endpoints import Endpoint, EndpointPool
from kgsupervisor.worker.stats import endpoint_status, kg_service_status

from .conftest import drive, make_settings, seed, status_counts

pytestmark = pytest.mark.timeout(60)


def pool_of(n: int, first: int = 0) -> EndpointPool:
    # Nothing is sent: choose() only looks at the breakers.
    return EndpointPool([Endpoint(KGClient(f"http://127.0.0.1:{9000 + i}", 5.0), CircuitBreaker(threshold=1))
                         for i in range(n)], first=first)


def test_round_robin_skips_open_breakers_and_excluded_endpoints():
    pool = pool_of(3)
    assert [pool.choose().url[-4:] for _ in range(4)] == ["9000", "9001", "9002", "9000"]
    pool.endpoints[1].breaker.record_failure(time.monotonic())
    assert [pool.choose().url[-4:] for _ in range(4)] == ["9002", "9000", "9002", "9000"]
    assert pool.choose(exclude=[pool.endpoints[0], pool.endpoints[2]]) is None
    assert not pool.all_down and pool.healthy_count() == 2
    now = time.monotonic()
    for e in pool.endpoints:
        e.breaker.record_failure(now)
    assert pool.all_down and pool.choose() is None
    assert 0 < pool.seconds_to_probe(now) <= 1.0


def test_workers_start_at_their_own_endpoint():
    assert [pool_of(3, first=w).choose().url[-4:] for w in range(4)] == ["9000", "9001", "9002", "9000"]


def test_endpoint_status_merges_workers_per_url():
    reports = [{"endpoints": [{"url": "http://a", "is_healthy": True, "last_health_check": "2026-01-01T00:00:02",
                               "consecutive_failures": 0, "requests": 3, "failures": 1,
                               "latency_seconds_total": 0.3}]},
               {"endpoints": [{"url": "http://a", "is_healthy": False, "last_health_check": "2026-01-01T00:00:01",
                               "consecutive_failures": 2, "requests": 1, "failures": 1,
                               "latency_seconds_total": 0.1}]}]
    [a] = endpoint_status(reports, enabled=True)
    assert a == {"url": "http://a", "is_healthy": True, "last_health_check": "2026-01-01T00:00:02",
                 "consecutive_failures": 2, "requests": 4, "failures": 2, "latency_seconds_total": 0.4,
                 "latency_ms_mean": 100.0}


def test_a_down_endpoint_costs_no_attempt_and_its_documents_go_to_the_others(conn, db_path, fault_server,
                                                                             worker_factory):
    seed(conn, 30)
    down = fault_server(lambda payload, n: (503, {"error": "down"}), healthy=False)
    up1, up2 = fault_server(), fault_server()
    w = worker_factory(make_settings(db_path, ",".join([up1.url, down.url, up2.url]), breaker_threshold=2,
                                     batch_size=5))
    drive(w, lambda: status_counts(conn) == {"completed": 30})
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert len(down.requests) == 2, "the down endpoint's breaker opened after KG_BREAKER_THRESHOLD failures"
    assert len(up1.requests) + len(up2.requests) == 30 and min(len(up1.requests), len(up2.requests)) >= 10
    status = w.endpoints.status(w.settings.service_url, True)
    assert status["is_healthy"] is True and status["consecutive_failures"] == 0
    by_url = {e["url"]: e for e in status["endpoints"]}
    assert by_url[down.url]["breaker"] == "open" and by_url[down.url]["is_healthy"] is False
    assert by_url[down.url]["failures"] == 2 and by_url[up1.url]["requests"] == len(up1.requests)


def test_an_item_failure_while_the_endpoint_is_healthy_is_charged_once_not_failed_over(conn, db_path,
                                                                                      fault_server, worker_factory):
    seed(conn, 1)
    flaky = fault_server(lambda payload, n: (500, {"error": "boom"}) if n == 0 else None)
    other = fault_server()
    w = worker_factory(make_settings(db_path, f"{flaky.url},{other.url}", max_attempts=3))
    drive(w, lambda: status_counts(conn) == {"completed": 1})
    assert conn.execute("SELECT retry_count FROM kg_processing_queue").fetchone()[0] == 1
    assert len(flaky.requests) == 1 and len(other.requests) == 1, "retried later, round robin to the other"


def test_every_endpoint_down_releases_uncharged_and_pauses_until_one_is_back(conn, db_path, fault_server,
                                                                           worker_factory):
    seed(conn, 4)
    a = fault_server(lambda payload, n: (503, {"error": "down"}), healthy=False)
    b = fault_server(lambda payload, n: (503, {"error": "down"}), healthy=False)
    w = worker_factory(make_settings(db_path, f"{a.url},{b.url}", breaker_threshold=1))
    drive(w, lambda: w.endpoints.all_down)
    assert status_counts(conn) == {"pending": 4}
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    asked = len(a.requests) + len(b.requests)
    for _ in range(5):
        w.loop_once(time.time())
    assert len(a.requests) + len(b.requests) == asked, "nothing sent while every endpoint is down"
    b.behaviour, b.healthy = None, True
    drive(w, lambda: status_counts(conn) == {"completed": 4})
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert w.endpoints.endpoints[0].breaker.is_open, "a is still down and still probed, not sent to"


def test_endpoints_nobody_has_asked_yet_are_listed_as_unknown():
    # Right after a start or a reload no worker has sent anything: the endpoints are still shown.
    fresh = {"url": "http://b", "enabled": True, "is_healthy": None, "last_health_check": None,
             "consecutive_failures": 0,
             "endpoints": [{"url": "http://b", "is_healthy": None, "last_health_check": None,
                            "consecutive_failures": 0, "requests": 0, "failures": 0, "latency_seconds_total": 0.0}]}
    status = kg_service_status([{"stats": {"kg_service": fresh}}], "http://b", True)
    [b] = status["endpoints"]
    assert b["url"] == "http://b" and b["is_healthy"] is None and b["requests"] == 0 and b["latency_ms_mean"] is None


def test_a_500_before_the_endpoint_ingested_anything_is_not_charged_while_health_says_degraded(
        conn, db_path, fault_server, worker_factory):
    seed(conn, 3)
    service = fault_server(lambda payload, n: (500, {"error": "Processing failed: LLM down"}) if n == 0 else None,
                           health_status="degraded")
    w = worker_factory(make_settings(db_path, service.url, max_attempts=3))
    drive(w, lambda: status_counts(conn) == {"completed": 3})
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    assert service.health_checks == 1, "/health asked once, for the unproven failure"
    assert [p["content_id"] for p in service.requests][:3] == [1, 2, 3], "the failed document was held back"


def test_a_500_after_the_endpoint_ingested_another_document_is_charged_whatever_health_says(
        conn, db_path, fault_server, worker_factory):
    seed(conn, 2)
    service = fault_server(lambda payload, n: (500, {"error": "Processing failed: bad input"}) if n == 1 else None,
                           health_status="unhealthy")
    w = worker_factory(make_settings(db_path, service.url, max_attempts=3))
    drive(w, lambda: status_counts(conn) == {"completed": 2})
    assert [r[0] for r in conn.execute("SELECT retry_count FROM kg_processing_queue ORDER BY id")] == [0, 1]
    assert service.health_checks == 0, "the endpoint had just ingested a document: no need to ask"


def test_a_500_saying_the_processor_is_not_initialized_is_an_outage_even_when_health_says_healthy(
        conn, db_path, fault_server, worker_factory):
    seed(conn, 2)
    not_ready = {"success": False, "error": "Processing failed: 503: KG processor not initialized",
                 "error_type": "ProcessingError", "timestamp": "2026-11-30T00:00:00"}
    service = fault_server(lambda payload, n: (500, not_ready) if n < 3 else None)
    w = worker_factory(make_settings(db_path, service.url, max_attempts=2))
    drive(w, lambda: status_counts(conn) == {"completed": 2})
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
