"""The Python API from a plain script and from an asyncio program, each a real host process."""
from __future__ import annotations

import json
import os
import signal
import socket
import re
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import kgsupervisor
from kgsupervisor.errors import ConfigError
from scripts.sampledata import add_documents

from .conftest import seed, status_counts, wait_for
from .test_supervisor_lifecycle import children_named

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
from kgsupervisor import logs
logs.setup("text")

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

# Every setting not at its default, none from the environment: a reload that rebuilt the
# settings from the environment alone would show in what the new workers do.
RELOADING_HOST = """
import json, sys
import kgsupervisor
from kgsupervisor import logs
logs.setup("text")
manager = kgsupervisor.start_kg_workers(
    sys.argv[1], num_workers=1, poll_interval=0.1, service_url=sys.argv[2], batch_size=3, max_attempts=2,
    lease_seconds=300, retry_backoff=0.05, retry_backoff_max=0.1)
print(json.dumps({"supervisor_pid": manager.process.pid}), flush=True)
for line in sys.stdin:
    if line.strip() == "restart":
        kgsupervisor.restart_kg_workers()
        answer = {}
    elif line.strip() == "stats":
        answer = kgsupervisor.get_worker_stats()
    else:
        kgsupervisor.stop_kg_workers()
        answer = {"exitcode": manager.process.exitcode}
    print(json.dumps(answer), flush=True)
"""

HEALTH_KEYS = {"manager_running", "total_workers", "healthy_workers", "unhealthy_workers", "worker_details"}
STATS_KEYS = {"total_workers", "manager_running", "manager_started_at", "workers_restarted",
              "last_health_check", "total_processed", "total_success", "total_failed",
              "kg_service_enabled", "kg_service_status", "queue_size"}


def run_host(code: str, db_path: str, url: str) -> tuple[dict, str]:
    """Run `code` as a host program; what it printed last (JSON) and its log."""
    env = {**os.environ, "KG_SERVICE_URL": url}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), db_path], capture_output=True,
                          text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_the_api_from_a_plain_script(conn, db_path, kg_service):
    seed(conn, 10)
    out, _ = run_host(PLAIN, db_path, kg_service)
    health, stats = out["health"], out["stats"]
    assert set(health) == HEALTH_KEYS | {"host", "database", "paused"} and health["healthy_workers"] == 2
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
    out, log = run_host(ASYNCIO, db_path, kg_service)
    assert out["stats"]["total_success"] == 10
    assert out["health"]["healthy_workers"] == 2
    assert status_counts(conn) == {"completed": 10}
    # A clean stop from an asyncio host (the fork happens off its event loop, in an executor
    # thread) is as clean as the CLI's drain: every worker exits 0, nothing is logged as an error.
    pids = {d["pid"] for d in out["health"]["worker_details"]}
    assert {int(pid) for pid in re.findall(r"\(pid (\d+)\) exited with status 0", log)} == pids, log
    assert " ERROR " not in log and "exited with status 1" not in log, log


def test_no_orphans_when_the_host_process_dies(db_path, kg_service):
    env = {**os.environ, "KG_SERVICE_URL": kg_service}
    host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOST_THAT_DIES), db_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    supervisor_pid = int(host.stdout.readline())
    # start_kg_workers returns once the supervisor runs: its children come up after.
    wait_for(lambda: len(children_named(supervisor_pid, "kgs-worker-")) == 2
             and children_named(supervisor_pid, "kgs-stats"), 30, message="two workers and the stats manager")
    tree = [psutil.Process(supervisor_pid)] + psutil.Process(supervisor_pid).children(recursive=True)
    named = sorted(p.name() for p in tree[1:])
    assert named == ["kgs-stats", "kgs-worker-0", "kgs-worker-1"], named
    os.kill(host.pid, signal.SIGKILL)
    host.communicate(timeout=10)
    gone, alive = psutil.wait_procs(tree, timeout=15)
    assert alive == [], f"left behind: {alive}"


class GatedService:
    """A fault-server behaviour: ingests wait for the gate; with `failing` set they answer 500."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.failing = False

    def __call__(self, payload: dict, n: int):
        if self.failing:
            return 500, {"error": "injected"}
        assert self.gate.wait(30), "the gate never opened"
        return None


def show_the_settings_at_work(conn, service: GatedService, server, worker: int) -> None:
    """The worker `worker` sends to the test server (service_url), claims 3 rows at a time
    (batch_size; the default is 5) under 300 s leases (lease_seconds; the default is 60), and
    gives a failing document up after 2 attempts (max_attempts; the default is 5)."""
    owner = f"{socket.gethostname()}:{worker}"
    service.gate.clear()
    ids = queue_at_once(conn, 5)
    wait_for(lambda: {r["content_id"] for r in server.requests} & set(ids), 20, message="a claim in flight")
    held, expires = conn.execute("SELECT COUNT(*), MIN(lease_expires_at) FROM kg_processing_queue "
                                 "WHERE status = 'processing' AND lease_owner = ?", (owner,)).fetchone()
    assert held == 3, f"{held} row(s) claimed by {owner}"
    assert 60 < expires - time.time() <= 300
    service.gate.set()
    wait_for(lambda: all(status_of(conn, i)[0] == "completed" for i in ids), 20, message="the five completed")
    service.failing = True
    (failing,) = seed(conn, 1)
    wait_for(lambda: status_of(conn, failing)[0] == "failed", 20, message="the failing one failed")
    service.failing = False
    assert status_of(conn, failing)[1].startswith("gave up after 2 attempts"), status_of(conn, failing)


def queue_at_once(conn, count: int) -> list[int]:
    """Add `count` documents and queue them in one statement: a claim sees all or none of them."""
    ids = add_documents(conn, count, seed=count)
    conn.execute("INSERT INTO kg_processing_queue (content_id, priority) SELECT id, 1 FROM crawled_content "
                 "WHERE id BETWEEN ? AND ?", (ids[0], ids[-1]))
    return ids


def status_of(conn, content_id: int) -> tuple[str, str | None]:
    """The queue row's status and error message."""
    return conn.execute("SELECT status, error_message FROM kg_processing_queue WHERE content_id = ?",
                        (content_id,)).fetchone()


def test_a_reload_keeps_every_setting_given_to_start_kg_workers(conn, db_path, fault_server, tmp_path):
    service = GatedService()
    server = fault_server(service)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KG_")}
    log = tmp_path / "api-host.log"
    with log.open("w") as out:
        host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(RELOADING_HOST), db_path, server.url],
                                env=env, start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=out, text=True)

    def ask(command: str) -> dict:
        host.stdin.write(command + "\n")
        host.stdin.flush()
        line = host.stdout.readline()
        assert line, log.read_text()
        return json.loads(line)

    def the_worker(other_than: set[int]) -> int:
        def one_new() -> set[int] | None:
            pids = children_named(supervisor, "kgs-worker-")
            return pids if len(pids) == 1 and not pids & other_than else None
        (pid,) = wait_for(one_new, 20, message="one new worker")
        return pid

    try:
        line = host.stdout.readline()
        assert line, log.read_text()
        supervisor = json.loads(line)["supervisor_pid"]
        first = the_worker(set())
        show_the_settings_at_work(conn, service, server, first)
        os.kill(supervisor, signal.SIGHUP)
        after_hup = the_worker({first})
        show_the_settings_at_work(conn, service, server, after_hup)
        ask("restart")
        after_restart = the_worker({first, after_hup})
        show_the_settings_at_work(conn, service, server, after_restart)
        assert ask("stats")["workers_restarted"] == 2
        assert ask("stop")["exitcode"] == 0
        host.communicate(timeout=10)
    finally:
        service.gate.set()
        if host.poll() is None:
            os.killpg(host.pid, signal.SIGKILL)
            host.communicate()


def test_start_kg_workers_refuses_an_unknown_keyword_or_a_missing_token_file_before_forking(db_path, tmp_path):
    children = psutil.Process().children()
    with pytest.raises(ConfigError, match="start_kg_workers keyword='batchsize': expected a setting name"):
        kgsupervisor.start_kg_workers(db_path, batchsize=3)
    missing = tmp_path / "token"
    with pytest.raises(ConfigError, match=f"service_token_file='{missing}'"):
        kgsupervisor.start_kg_workers(db_path, service_token_file=str(missing))
    assert psutil.Process().children() == children, "nothing was forked"
