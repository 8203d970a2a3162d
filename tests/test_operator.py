"""The operator surface over real processes: status endpoint, status/health, sd_notify, logs, config."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import free_port, seed, status_counts, wait_for
from .processes import run_to_exit

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

FAST = {"KG_RETRY_BACKOFF": "0.05", "KG_RETRY_BACKOFF_MAX": "0.2"}
STATS_KEYS = {"total_workers", "manager_running", "manager_started_at", "workers_restarted",
              "last_health_check", "total_processed", "total_success", "total_failed",
              "kg_service_enabled", "kg_service_status", "queue_size", "host", "database", "paused",
              "kg_admission"}


@pytest.fixture
def running(conn, db_path, kg_service, processes):
    """A supervisor with its status endpoint on a free loopback port; yields (proc, addr)."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    proc = processes.kgsupervisor(["run", "--db", db_path, "--service-url", kg_service, "--workers", "2",
                                   "--poll-interval", "0.2", "--status-addr", addr], env=FAST)
    wait_for(lambda: _get(addr, "/health") is not None and _get(addr, "/health").status_code == 200, 20,
             message="status endpoint healthy")
    yield proc, addr
    proc.stop()


def _get(addr: str, path: str):
    try:
        return requests.get(f"http://{addr}{path}", timeout=5)
    except requests.RequestException:
        return None


def test_status_endpoint_health_stats_and_metrics(running, conn, kg_service):
    proc, addr = running
    seed(conn, 20)
    wait_for(lambda: status_counts(conn) == {"completed": 20}, 30, message="drain")
    # queue_size is counted at most every 2 s (a count is a scan): wait for it to catch up.
    wait_for(lambda: _get(addr, "/stats").json()["total_success"] == 20
             and _get(addr, "/stats").json()["queue_size"].get("completed") == 20, 10, message="stats caught up")
    stats = _get(addr, "/stats").json()
    assert set(stats) == STATS_KEYS
    assert stats["queue_size"]["completed"] == 20 and stats["total_workers"] == 2
    health = _get(addr, "/health")
    assert health.status_code == 200 and health.json()["healthy_workers"] == 2
    families = {f.name: f for f in text_string_to_metric_families(_get(addr, "/metrics").text)}
    assert families["kgsupervisor_documents_succeeded"].samples[0].value == 20
    queue = {s.labels["status"]: s.value for s in families["kgsupervisor_queue_rows"].samples}
    assert queue["completed"] == 20
    hist = {s.name: s.value for s in families["kgsupervisor_kg_request_duration_seconds"].samples
            if not s.labels.get("le") or s.labels["le"] == "+Inf"}
    assert hist["kgsupervisor_kg_request_duration_seconds_count"] >= 20
    assert families["kgsupervisor_kg_up"].samples[0].value == 1
    [endpoint] = stats["kg_service_status"]["endpoints"]
    assert endpoint["requests"] == 20 and endpoint["is_healthy"] is True and endpoint["url"] == kg_service
    up = families["kgsupervisor_kg_endpoint_up"].samples
    assert [(s.labels["url"], s.value) for s in up] == [(endpoint["url"], 1)]
    count = [s.value for s in families["kgsupervisor_kg_endpoint_request_duration_seconds"].samples
             if s.name.endswith("_count")]
    assert count == [20]
    assert {s.labels["worker_id"] for s in families["kgsupervisor_worker_rss_bytes"].samples} == {"0", "1"}
    assert all(s.value > 0 for s in families["kgsupervisor_worker_rss_bytes"].samples)


def test_status_and_health_commands(running, conn):
    proc, addr = running
    out = run_to_exit("status", "--json", "--status-addr", addr)
    assert out.returncode == 0 and set(json.loads(out.stdout)) == STATS_KEYS
    out = run_to_exit("status", "--status-addr", addr)
    assert out.returncode == 0 and "workers healthy" in out.stdout and "worker 0: pid" in out.stdout
    assert f"host {socket.gethostname()}, database " in out.stdout and "(sqlite;" in out.stdout
    out = run_to_exit("health", "--json", "--status-addr", addr)
    assert out.returncode == 0 and json.loads(out.stdout)["healthy_workers"] == 2
    proc.stop()
    out = run_to_exit("health", "--status-addr", addr)
    assert out.returncode == 2 and "no supervisor answering" in out.stderr and "Traceback" not in out.stderr
    out = run_to_exit("status", "--status-addr", addr)
    assert out.returncode == 2 and out.stderr.count("\n") == 1


def test_a_kg_outage_does_not_make_the_supervisor_unhealthy(db_path, conn, processes):
    addr = f"127.0.0.1:{free_port()}"
    proc = processes.kgsupervisor(["run", "--db", db_path, "--service-url", f"http://127.0.0.1:{free_port()}",
                                   "--workers", "1", "--status-addr", addr, "--poll-interval", "0.2"],
                                  env=FAST)
    try:
        seed(conn, 1)
        wait_for(lambda: (_get(addr, "/stats") or None) and
                 _get(addr, "/stats").json()["kg_service_status"]["is_healthy"] is False, 30, message="KG down seen")
        assert _get(addr, "/health").status_code == 200
        assert run_to_exit("health", "--status-addr", addr).returncode == 0
    finally:
        proc.stop()


def test_a_busy_status_address_is_a_one_line_error_at_start(db_path, kg_service):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        out = run_to_exit("run", "--db", db_path, "--service-url", kg_service,
                          "--status-addr", f"127.0.0.1:{port}")
    assert out.returncode == 1
    assert f"status address 127.0.0.1:{port} cannot be used" in out.stderr and "Traceback" not in out.stderr


def test_print_config_shows_sources_and_masks_the_token(tmp_path, db_path):
    cfg = tmp_path / "kg.toml"
    cfg.write_text("batch_size = 9\n")
    out = run_to_exit("run", "--config", str(cfg), "--db", db_path, "--workers", "3", "--print-config",
                      env={"KG_SERVICE_TOKEN": "hunter2", "KG_POLL_INTERVAL": "1.5"})
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "(flag;" in lines["num_workers"] and " 3 " in lines["num_workers"]
    assert "(env;" in lines["poll_interval"] and "1.5" in lines["poll_interval"]
    assert f"(file {cfg};" in lines["batch_size"]
    assert "(default;" in lines["drain_timeout"]
    assert "hunter2" not in out.stdout and "********" in lines["service_token"]


def test_sd_notify_ready_status_watchdog_reloading_stopping_in_order(tmp_path, db_path, kg_service,
                                                                      processes):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    proc = processes.kgsupervisor(["run", "--db", db_path, "--service-url", kg_service, "--workers", "2"],
                                  env={**FAST, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    seen: list[str] = []

    def receive_until(word: str, since: int = 0, timeout: float = 30) -> int:
        """Read datagrams until a line starting with `word` is at index `since` or later; its index."""
        deadline = time.monotonic() + timeout
        while True:
            found = [i for i, line in enumerate(seen) if i >= since and line.startswith(word)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {word} after line {since} in "
                                     f"{[line for line in seen if not line.startswith('STATUS=')]}")
            try:
                seen.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    try:
        first_ready = receive_until("READY=1")
        first_ping = receive_until("WATCHDOG=1")
        receive_until("WATCHDOG=1", first_ping + 1)  # pinged again: a watchdog, not a one-off
        assert any(line.startswith("STATUS=2/2 workers") for line in seen)
        proc.send_signal(signal.SIGHUP)
        reloading = receive_until("RELOADING=1")
        ready_again = receive_until("READY=1", reloading + 1)
        receive_until("WATCHDOG=1", ready_again + 1)  # the new workers heartbeat: pings go on
        proc.send_signal(signal.SIGTERM)
        receive_until("STOPPING=1", ready_again + 1)
    finally:
        err = proc.stop()
        sock.close()
    order = [line.split("=")[0] for line in seen if line.split("=")[0] in ("READY", "RELOADING", "STOPPING")]
    assert order[:4] == ["READY", "RELOADING", "READY", "STOPPING"], order
    pings = [i for i, line in enumerate(seen) if line == "WATCHDOG=1"]
    assert all(i > first_ready for i in pings), f"WATCHDOG=1 before READY=1: {seen}"
    assert proc.returncode == 0, err


def test_log_file_is_reopened_on_sigusr1(tmp_path, db_path, conn, kg_service, processes):
    log_path = tmp_path / "kg.log"
    proc = processes.kgsupervisor(["run", "--db", db_path, "--service-url", kg_service, "--workers", "1",
                                   "--log-file", str(log_path), "--log-format", "json",
                                   "--poll-interval", "0.2"], env=FAST)
    try:
        wait_for(lambda: log_path.exists() and "worker started" in log_path.read_text(), 20, message="log")
        os.rename(log_path, tmp_path / "kg.log.1")  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: log_path.exists() and "log files reopened" in log_path.read_text()
                 and "] log file reopened" in log_path.read_text(), 10, message="supervisor and worker reopened")
        seed(conn, 2)
        wait_for(lambda: status_counts(conn) == {"completed": 2}, 20)
        wait_for(lambda: "completed:" in log_path.read_text(), 10, message="worker writes to the new file")
    finally:
        proc.stop()
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    done = [e for e in entries if e["message"].endswith("relationships")]
    assert done and all(e["worker_id"] == 0 and e["content_id"] and e["pid"] for e in done)


def test_a_non_loopback_status_address_warns(db_path, kg_service, processes):
    # Beyond this host the console needs an operator token to start (tests/test_console_run.py).
    proc = processes.kgsupervisor(["run", "--db", db_path, "--service-url", kg_service, "--workers", "1",
                                   "--status-addr", f"0.0.0.0:{free_port()}"],
                                  env={**FAST, "KG_CONSOLE_TOKEN": "non-loopback-test-token"})
    wait_for(lambda: proc.children("kgs-worker-0"), 20, message="running")
    assert "beyond this host: /health, /stats and /metrics are open to anyone" in proc.stop()


def catches(pid: int, sig: signal.Signals) -> bool:
    """The process runs a handler of its own for `sig` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            caught = next(line for line in f if line.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(int(caught.split()[1], 16) & (1 << (sig - 1)))


def test_status_watch_shows_progress_and_the_worker_table(running, conn, processes):
    proc, addr = running
    seed(conn, 5)
    watch = processes.kgsupervisor(["status", "--watch", "--status-addr", addr, "--interval", "0.3"],
                                   env={"COLUMNS": "160"}, name="status-watch",
                                   stdout=subprocess.PIPE, text=True)
    # SIGTERM is caught only once the view's stop handlers are in (SIGINT too, then).
    wait_for(lambda: catches(watch.pid, signal.SIGTERM), 30, message="status --watch running")
    watch.send_signal(signal.SIGINT)
    out, _ = watch.popen.communicate(timeout=10)
    assert watch.returncode == 0, watch.output
    assert "workers" in out and "done" in out and "docs/s" in out and "KG service" in out
