"""The Python API from a plain script and from an asyncio program, each a real host process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import psutil
import pytest

from .conftest import seed, status_counts, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

PLAIN = """
import json, os, sys, time
from kgsupervisor import (get_kg_manager, get_worker_stats, restart_kg_workers, start_kg_workers,
                          stop_kg_workers)
manager = start_kg_workers(sys.argv[1], num_workers=2, poll_interval=0.2)
assert manager is get_kg_manager()
health = manager.check_worker_health()
deadline = time.time() + 30
while get_worker_stats()["queue_size"].get("completed", 0) < 10 and time.time() < deadline:
    time.sleep(0.1)
before = {d["pid"] for d in health["worker_details"]}
restart_kg_workers()
while time.time() < deadline:
    after = get_kg_manager().check_worker_health()
    pids = {d["pid"] for d in after["worker_details"] if d["running"]}
    if len(pids) == 2 and not (pids & before):
        break
    time.sleep(0.1)
while get_worker_stats()["workers_restarted"] != 1 and time.time() < deadline:
    time.sleep(0.1)
stats = get_worker_stats()
stop_kg_workers()
print(json.dumps({"health": health, "stats": stats, "before": sorted(before), "after": sorted(pids)}))
"""

ASYNCIO = """
import asyncio, json, sys, time
import kgsupervisor

async def main():
    await kgsupervisor.start_kg_workers_async(sys.argv[1], num_workers=2, poll_interval=0.2)
    for _ in range(300):
        stats = await kgsupervisor.get_worker_stats_async()
        if stats["total_processed"] >= 10:
            break
        await asyncio.sleep(0.1)
    health = await kgsupervisor.check_worker_health_async()
    await kgsupervisor.stop_kg_workers_async()
    print(json.dumps({"stats": stats, "health": health}))

asyncio.run(main())
"""

HOST_THAT_DIES = """
import os, sys, time
from kgsupervisor import start_kg_workers
manager = start_kg_workers(sys.argv[1], num_workers=2, poll_interval=0.2)
print(manager.process.pid, flush=True)
time.sleep(60)
"""

HEALTH_KEYS = {"manager_running", "total_workers", "healthy_workers", "unhealthy_workers", "worker_details"}
STATS_KEYS = {"total_workers", "manager_running", "manager_started_at", "workers_restarted",
              "last_health_check", "total_processed", "total_success", "total_failed",
              "kg_service_enabled", "kg_service_status", "queue_size"}


def run_host(code: str, db_path: str, url: str) -> dict:
    env = {**os.environ, "KG_SERVICE_URL": url}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), db_path], capture_output=True,
                          text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_api_from_a_plain_script(conn, db_path, kg_service):
    seed(conn, 10)
    out = run_host(PLAIN, db_path, kg_service)
    health, stats = out["health"], out["stats"]
    assert set(health) == HEALTH_KEYS | {"host", "database"} and health["healthy_workers"] == 2
    assert health["database"] == {"backend": "sqlite", "name": db_path} and health["host"] == socket.gethostname()
    detail = health["worker_details"][0]
    assert {"worker_id", "pid", "running", "stats"} <= set(detail)
    assert {"total_processed", "total_success", "total_failed", "last_processed_at"} <= set(detail["stats"])
    assert {"rss_bytes", "cpu_percent", "restarts", "current_content_id", "started_at", "heartbeat_age"} <= set(detail)
    assert set(stats) >= STATS_KEYS
    assert stats["workers_restarted"] == 1
    assert stats["total_success"] == 10 and stats["total_processed"] == 10
    assert set(stats["kg_service_status"]) == {"enabled", "url", "is_healthy", "last_health_check",
                                               "consecutive_failures", "endpoints"}
    assert [e["url"] for e in stats["kg_service_status"]["endpoints"]] == [kg_service]
    assert set(stats["queue_size"]) == {"total", "pending", "processing", "completed", "failed", "skipped"}
    assert not set(out["before"]) & set(out["after"])
    assert status_counts(conn) == {"completed": 10}


def test_the_api_from_an_asyncio_program(conn, db_path, kg_service):
    seed(conn, 10)
    out = run_host(ASYNCIO, db_path, kg_service)
    assert out["stats"]["total_success"] == 10
    assert out["health"]["healthy_workers"] == 2
    assert status_counts(conn) == {"completed": 10}


def test_no_orphans_when_the_host_process_dies(db_path, kg_service):
    env = {**os.environ, "KG_SERVICE_URL": kg_service}
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOST_THAT_DIES), db_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    supervisor_pid = int(host.stdout.readline())
    tree = [psutil.Process(supervisor_pid)] + psutil.Process(supervisor_pid).children()
    assert len(tree) >= 3, "supervisor, stats manager and two workers"
    os.kill(host.pid, signal.SIGKILL)
    host.communicate(timeout=10)
    gone, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == [], f"left behind: {alive}"
