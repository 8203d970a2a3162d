"""Prometheus text for /metrics, rendered with prometheus_client from one stats snapshot."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
                                    SummaryMetricFamily)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SnapshotCollector:
    """Turns the supervisor's published snapshot into metric families; reads nothing else."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot.get("stats") or {}
        health = self.snapshot.get("health") or {}
        extra = self.snapshot.get("extra") or {}
        details = health.get("worker_details") or []
        yield from self._documents(stats, extra)
        yield from self._queue(stats)
        yield from self._service(stats, extra)
        yield from self._workers(stats, details)
        yield from self._pause(stats)

    def _documents(self, stats: dict, extra: dict) -> Iterator[Metric]:
        for key, name, doc in (("total_processed", "processed", "Documents that reached an outcome"),
                               ("total_success", "succeeded", "Documents completed"),
                               ("total_failed", "failed", "Documents failed for good")):
            yield CounterMetricFamily(f"kgsupervisor_documents_{name}", doc, value=stats.get(key, 0))
        yield CounterMetricFamily("kgsupervisor_documents_retried", "Item failures that cost an attempt",
                                  value=extra.get("total_retried", 0))
        yield GaugeMetricFamily("kgsupervisor_documents_in_flight", "Documents being sent right now",
                                value=extra.get("in_flight", 0))

    def _queue(self, stats: dict) -> Iterator[Metric]:
        depth = GaugeMetricFamily("kgsupervisor_queue_rows", "Queue rows by status", labels=["status"])
        for status, n in (stats.get("queue_size") or {}).items():
            if status != "total":
                depth.add_metric([status], n)
        yield depth

    def _service(self, stats: dict, extra: dict) -> Iterator[Metric]:
        kg = stats.get("kg_service_status") or {}
        yield GaugeMetricFamily("kgsupervisor_kg_up", "1 when the KG service answered its last health check",
                                value=1 if kg.get("is_healthy") else 0)
        yield GaugeMetricFamily("kgsupervisor_kg_consecutive_failures", "Consecutive KG service failures",
                                value=kg.get("consecutive_failures") or 0)
        yield from self._endpoints(kg.get("endpoints") or [])
        yield from self._admission(stats.get("kg_admission") or [])
        latency = extra.get("kg_request_latency") or {}
        yield HistogramMetricFamily("kgsupervisor_kg_request_duration_seconds", "KG ingest request latency",
                                    buckets=[tuple(b) for b in latency.get("buckets", [("+Inf", 0)])],
                                    sum_value=latency.get("sum", 0.0))

    def _endpoints(self, endpoints: list[dict]) -> Iterator[Metric]:
        up = GaugeMetricFamily("kgsupervisor_kg_endpoint_up", "1 when this KG service endpoint answered "
                               "its last request or health check", labels=["url"])
        failing = GaugeMetricFamily("kgsupervisor_kg_endpoint_consecutive_failures",
                                    "Consecutive failures of this endpoint", labels=["url"])
        failures = CounterMetricFamily("kgsupervisor_kg_endpoint_failures", "Failed requests to this endpoint "
                                       "(outages and item failures), current worker processes", labels=["url"])
        requests = SummaryMetricFamily("kgsupervisor_kg_endpoint_request_duration_seconds",
                                       "Ingest requests to this endpoint, current worker processes", labels=["url"])
        for e in endpoints:
            up.add_metric([e["url"]], 1 if e.get("is_healthy") else 0)
            failing.add_metric([e["url"]], e.get("consecutive_failures") or 0)
            failures.add_metric([e["url"]], e.get("failures") or 0)
            requests.add_metric([e["url"]], count_value=e.get("requests") or 0,
                                sum_value=e.get("latency_seconds_total") or 0.0)
        yield from (up, failing, failures, requests)

    def _admission(self, endpoints: list[dict]) -> Iterator[Metric]:
        """The adaptive in-flight limits and rate budgets of the endpoints (kg.admission)."""
        gauges = {key: GaugeMetricFamily(f"kgsupervisor_kg_endpoint_{name}", doc, labels=["url"]) for key, name, doc in (
            ("limit", "inflight_limit", "Requests this supervisor's workers may have in flight to this "
                                        "endpoint now (its adaptive limit)"),
            ("in_use", "permits_in_use", "Permits of this endpoint's in-flight limit held by workers"),
            ("waiting", "permits_waiting", "Workers waiting for a permit of this endpoint"))}
        used = GaugeMetricFamily("kgsupervisor_kg_endpoint_budget_used", "Spent from this endpoint's rate "
                                 "budget in the last 60 s (kind: requests or estimated tokens)", labels=["url", "kind"])
        allowed = GaugeMetricFamily("kgsupervisor_kg_endpoint_budget_limit", "This endpoint's rate budget "
                                    "per 60 s (kind: requests or estimated tokens)", labels=["url", "kind"])
        for e in endpoints:
            for key, gauge in gauges.items():
                if key in e:
                    gauge.add_metric([e["url"]], e[key])
            for kind, use in (e.get("budget") or {}).items():
                used.add_metric([e["url"], kind], use["used"])
                allowed.add_metric([e["url"], kind], use["limit"])
        yield from (*gauges.values(), used, allowed)

    def _workers(self, stats: dict, details: list[dict]) -> Iterator[Metric]:
        yield GaugeMetricFamily("kgsupervisor_workers", "Worker slots", value=stats.get("total_workers", 0))
        yield GaugeMetricFamily("kgsupervisor_workers_running", "Workers alive",
                                value=sum(1 for d in details if d.get("running")))
        yield CounterMetricFamily("kgsupervisor_workers_restarted", "Rolling restarts (SIGHUP)",
                                  value=stats.get("workers_restarted", 0))
        respawns = CounterMetricFamily("kgsupervisor_worker_respawns", "Worker processes replaced", labels=["worker_id"])
        rss = GaugeMetricFamily("kgsupervisor_worker_rss_bytes", "Worker resident memory", labels=["worker_id"])
        for d in details:
            respawns.add_metric([str(d["worker_id"])], d.get("restarts", 0))
            rss.add_metric([str(d["worker_id"])], d.get("rss_bytes", 0))
        yield respawns
        yield rss

    def _pause(self, stats: dict) -> Iterator[Metric]:
        yield GaugeMetricFamily("kgsupervisor_paused", "1 while an operator has paused claiming "
                                "(kgsupervisor pause): workers finish what they hold and claim nothing",
                                value=1 if stats.get("paused") else 0)


def render(snapshot: dict[str, Any]) -> bytes:
    """The Prometheus text exposition of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry)
