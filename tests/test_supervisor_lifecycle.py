"""The supervisor's lifecycle as real processes: Ctrl-C, a dead stats Manager, recycling, crash-loop
backoff, two supervisors on one database, the pidfile and --exit-when-empty."""
from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.pool.pidfile import running_pid
from kgsupervisor.pool.supervisor import SECOND_SIGNAL_GRACE

from .conftest import held_until, seed, status_counts, wait_for
from .processes import FAST, Process, children_named, run_to_exit, worker_pids
from .test_supervisor import completed_once

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

# A host program of the Python API that answers one command per stdin line with one JSON line,
# so a test can ask the real API while it breaks things around the supervisor.
API_HOST = """
import json, sys
import kgsupervisor
from kgsupervisor import logs
logs.setup("text")
manager = kgsupervisor.start_kg_workers(sys.argv[1], num_workers=int(sys.argv[2]), poll_interval=0.2)
print(json.dumps({"supervisor_pid": manager.process.pid}), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "health":
        answer = kgsupervisor.get_kg_manager().check_worker_health()
    elif command == "stats":
        answer = kgsupervisor.get_worker_stats()
    else:
        kgsupervisor.stop_kg_workers()
        answer = {"exitcode": manager.process.exitcode}
    print(json.dumps(answer), flush=True)
"""


class ApiHost:
    """A real host process running the Python API, answering on its stdout; its log (and the
    supervisor's) is the harness's log of the process."""

    def __init__(self, process: Process) -> None:
        self.process = process
        self.log = process.log
        self.supervisor_pid = self.read()["supervisor_pid"]

    def read(self) -> dict:
        line = self.process.popen.stdout.readline()
        assert line, f"the API host exited: {self.log.read_text()}"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.popen.stdin.write(command + "\n")
        self.process.popen.stdin.flush()
        return self.read()

    def stop(self) -> int:
        """stop_kg_workers(); returns the supervisor's exit code."""
        exitcode = self.ask("stop")["exitcode"]
        self.process.popen.communicate(timeout=10)
        return exitcode


@pytest.fixture
def launch(processes):
    """Starts `kgsupervisor run` with no status endpoint: these tests read its log and the database."""
    def run(db_path: str, url: str, *args: str, env: dict | None = None, name: str = "supervisor") -> Process:
        return processes.supervisor(db_path, url, "--status-addr", "off", *args, env=env, name=name)
    return run


@pytest.fixture
def api_host(processes):
    """Starts ApiHost processes; any still running at teardown is killed with its supervisor."""
    def start(db_path: str, url: str, workers: int, env: dict | None = None) -> ApiHost:
        command = [sys.executable, "-c", textwrap.dedent(API_HOST), db_path, str(workers)]
        env = {**FAST, "KG_SERVICE_URL": url, **(env or {})}
        return ApiHost(processes.start(command, "api-host", env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True))
    return start


def completed_count(conn) -> int:
    return status_counts(conn).get("completed", 0)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The command printed exactly one line on stderr and no traceback; returns it."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def pid_in(path: str) -> str:
    """What a pidfile holds ('' while it does not exist)."""
    try:
        return pathlib.Path(path).read_text().strip()
    except FileNotFoundError:
        return ""


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- 1. Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_to_the_whole_process_group_drains_instead_of_killing_workers(conn, db_path, fault_server, launch):
    seed(conn, 4)
    answers = threading.Event()
    server = fault_server(held_until(answers))
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "1", "--adaptive", "off")
    try:
        wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
        workers = worker_pids(proc)
        in_flight = sorted(p["content_id"] for p in server.requests)
        proc.signal_group(signal.SIGINT)  # what the terminal does on Ctrl-C
        # The answers come once the drain is under way: the documents were in flight throughout.
        proc.wait_for_log("draining (stop signal)")
        answers.set()
        err = proc.stop(sig=None)
    finally:
        answers.set()
    assert proc.returncode == 0, err
    assert len(workers) == 2 and "killed by" not in err
    for pid in workers:  # each worker finished its document and left on its own
        assert f"(pid {pid}) exited with status 0" in err
    completed = [r[0] for r in conn.execute(
        "SELECT content_id FROM kg_processing_queue WHERE status = 'completed' ORDER BY content_id")]
    assert completed == in_flight
    assert status_counts(conn) == {"completed": 2, "pending": 2}, "nothing left in processing"
    assert len(server.requests) == 2, "nothing new was claimed after Ctrl-C"


def test_a_second_ctrl_c_stops_at_once_and_puts_in_flight_documents_back_uncharged(conn, db_path, fault_server,
                                                                                      launch):
    seed(conn, 2)
    answers = threading.Event()  # never set while the supervisor runs: only a stop ends the drain
    server = fault_server(held_until(answers, timeout=120))
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "1", "--adaptive", "off")
    try:
        wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
        proc.signal_group(signal.SIGINT)
        proc.wait_for_log("draining (stop signal)")  # the first Ctrl-C is handled
        assert proc.poll() is None and status_counts(conn) == {"processing": 2}, "still draining"
        # The grace counts from the handling just seen; it is time itself, so only time ends it.
        time.sleep(SECOND_SIGNAL_GRACE + 0.2)
        proc.signal_group(signal.SIGINT)
        # Within the drain timeout (60 s) and before any answer: only the second Ctrl-C can end it.
        err = proc.stop(sig=None, timeout=45)
    finally:
        answers.set()
    assert proc.returncode == 0, err
    assert "second stop signal: stopping now" in err and "drain timeout" not in err, err
    assert status_counts(conn) == {"pending": 2}
    assert conn.execute("SELECT MAX(retry_count), MAX(COALESCE(crash_count, 0)) FROM kg_processing_queue").fetchone() == (0, 0)


# -- 2. the stats Manager dies ------------------------------------------------------------------


def test_a_killed_stats_manager_is_replaced_workers_restart_and_totals_survive(conn, db_path, fault_server, api_host):
    ids = seed(conn, 40)
    server = fault_server(lambda payload, n: time.sleep(0.1))
    host = api_host(db_path, server.url, workers=2)
    sup = host.supervisor_pid
    wait_for(lambda: completed_count(conn) >= 6, 20, message="some documents completed")
    (manager,) = children_named(sup, "kgs-stats")
    old_workers = children_named(sup, "kgs-worker-")
    before = host.ask("stats")["total_success"]
    assert before >= 6
    os.kill(manager, signal.SIGKILL)
    (new_manager,) = wait_for(lambda: children_named(sup, "kgs-stats") - {manager}, 10,
                              message="a new stats Manager")
    assert host.ask("stats")["total_success"] >= before, "totals survive the Manager"
    wait_for(lambda: len(children_named(sup, "kgs-worker-")) == 2
             and not children_named(sup, "kgs-worker-") & old_workers, 15, message="workers restarted")
    wait_for(lambda: status_counts(conn) == {"completed": 40}, 30, message="drain")
    # A worker counts its batch just after the batch's commit: the totals may trail the
    # database by that instant, never by a document for good.
    stats = wait_for(lambda: (lambda s: s if s["total_success"] == 40 else None)(host.ask("stats")), 5,
                     message="stats totals to reach the database's 40")
    assert stats["total_success"] == completed_count(conn) == 40
    assert stats["total_processed"] == 40 and stats["total_failed"] == 0
    health = host.ask("health")
    assert health["healthy_workers"] == 2
    assert children_named(sup, "kgs-stats") == {new_manager}
    assert host.stop() == 0
    assert "the stats Manager process died; starting a new one" in host.log.read_text()
    completed_once(conn, ids)
    assert len(server.requests) == 40, "no document was sent twice"


# -- 3. recycling -------------------------------------------------------------------------------


def test_workers_recycle_after_max_documents_and_each_document_completes_once(conn, db_path, fault_server, launch):
    ids = seed(conn, 30)
    server = fault_server()
    proc = launch(db_path, server.url, "--workers", "1", "--exit-when-empty",
                  env={"KG_MAX_DOCUMENTS_PER_WORKER": "5"})
    log = proc.stop(sig=None, timeout=60)  # --exit-when-empty ends it
    assert proc.returncode == 0, log
    pids = set(re.findall(r"worker 0 started \(pid (\d+)\)", log))
    assert len(pids) >= 5, f"30 documents at 5 or 6 per worker need >= 5 workers; log:\n{log}"
    assert len(re.findall(r"recycling after [56] documents", log)) >= 4  # 5 plus jitter
    completed_once(conn, ids)
    assert collections.Counter(p["content_id"] for p in server.requests) == dict.fromkeys(ids, 1)


def test_workers_over_the_rss_limit_are_recycled_and_the_queue_still_drains(conn, db_path, fault_server, launch):
    ids = seed(conn, 30)
    server = fault_server(lambda payload, n: time.sleep(0.05))
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "2", "--exit-when-empty",
                  env={"KG_MAX_WORKER_RSS_MB": "1"})
    # A drain's SIGTERM that lands in a worker's first instants must not be lost (it would
    # keep the supervisor waiting for the 60 s drain timeout).
    log = proc.stop(sig=None, timeout=20)
    assert proc.returncode == 0, log
    assert "drain timeout" not in log
    recycled = re.findall(r"worker (\d) \(pid \d+\) uses \d+ MiB, over the limit: recycling it", log)
    assert set(recycled) == {"0", "1"}, f"every slot takes its turn: {recycled}"
    completed_once(conn, ids)
    assert collections.Counter(p["content_id"] for p in server.requests) == dict.fromkeys(ids, 1)


# -- 4. crash loop ------------------------------------------------------------------------------


def test_workers_that_cannot_boot_back_off_and_recover_when_the_cause_is_gone(conn, db_path, fault_server, api_host):
    server = fault_server()
    host = api_host(db_path, server.url, workers=1)
    sup = host.supervisor_pid
    (worker,) = wait_for(lambda: children_named(sup, "kgs-worker-"), 10, message="a worker")
    # The database file goes away (a wrong mount, a restore in progress): the running worker
    # keeps its open file, so it is killed; every replacement fails in init_process.
    away = db_path + ".away"
    os.rename(db_path, away)
    os.kill(worker, signal.SIGKILL)

    def respawns() -> list[float]:
        return [float(d) for d in re.findall(r"respawn in ([\d.]+)s", host.log.read_text())]

    delays = wait_for(lambda: respawns()[:3] if len(respawns()) >= 3 else None, 15, message="three failed boots")
    assert delays[0] < delays[1] < delays[2], delays
    log = host.log.read_text()
    assert "worker 0 cannot start: database" in log and "does not exist" in log
    boot_delays = [float(d) for d in re.findall(r"exited with status 3; respawn in ([\d.]+)s", log)]
    assert boot_delays and min(boot_delays) >= 1.0, "a boot error waits at least a second"
    states = set()

    def in_backoff() -> bool:
        states.add(host.ask("health")["worker_details"][0]["state"])
        return "backoff" in states

    wait_for(in_backoff, 10, interval=0.05, message="the slot reported in backoff")
    assert states <= {"backoff", "starting"}, "never the state of the worker that was killed"
    os.rename(away, db_path)  # the cause is gone: no one tells the supervisor
    ids = seed(conn, 5)
    wait_for(lambda: status_counts(conn) == {"completed": 5}, 15, message="drain after recovery")
    detail = host.ask("health")["worker_details"][0]
    assert detail["running"] and detail["state"] == "idle"
    assert {detail["pid"]} == children_named(sup, "kgs-worker-")
    assert host.stop() == 0
    completed_once(conn, ids)


# -- 5. two supervisors -------------------------------------------------------------------------


def test_two_supervisors_on_one_database_never_release_or_steal_each_others_claims(conn, db_path, fault_server, launch):
    ids = seed(conn, 24)
    server = fault_server(lambda payload, n: time.sleep(0.3))
    first = launch(db_path, server.url, "--workers", "2", "--batch-size", "2", name="first")
    wait_for(lambda: status_counts(conn).get("processing", 0) == 4, 20, message="the first holds claims")
    # The second starts while the first holds claims on the same host: it must leave them alone.
    second = launch(db_path, server.url, "--workers", "2", "--batch-size", "2", name="second")
    wait_for(lambda: len(worker_pids(second)) == 2 and len(server.requests) >= 8, 20, message="both working")
    wait_for(lambda: completed_count(conn) >= 12, 20, message="half done")
    # The first stops mid-queue: it gives back only its own unstarted claims.
    first_log = first.stop()
    wait_for(lambda: status_counts(conn) == {"completed": 24}, 30, message="the second finishes")
    second_log = second.stop()
    assert first.returncode == 0, first_log
    assert second.returncode == 0, second_log
    assert "dead process" not in second_log
    assert "completed:" in first_log and "completed:" in second_log, "both did work"
    assert collections.Counter(p["content_id"] for p in server.requests) == dict.fromkeys(ids, 1)
    completed_once(conn, ids)


# -- 6. the pidfile -----------------------------------------------------------------------------


def test_pidfile_locks_out_a_second_supervisor_and_drives_reload_and_stop(conn, db_path, fault_server, launch, tmp_path):
    pidfile = str(tmp_path / "kgs.pid")
    server = fault_server(lambda payload, n: time.sleep(1.0))
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "1", "--pidfile", pidfile)
    wait_for(lambda: pid_in(pidfile) == str(proc.pid), 10,
             message="the pidfile holds the supervisor's pid")
    old = wait_for(lambda: worker_pids(proc) if len(worker_pids(proc)) == 2 else None, 10, message="two workers")

    second = run_to_exit("run", "--db", db_path, "--service-url", server.url, "--pidfile", pidfile,
                         "--status-addr", "off", env=FAST)
    assert second.returncode == 1, second.stderr
    assert f"another supervisor (pid {proc.pid}) is running" in one_line(second)
    assert pid_in(pidfile) == str(proc.pid), "the loser leaves the pidfile alone"

    reload = run_to_exit("reload", "--pidfile", pidfile)
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: len(worker_pids(proc)) == 2 and not worker_pids(proc) & old, 15, message="new workers")
    proc.wait_for_log("restart #1", timeout=5)

    seed(conn, 2)
    wait_for(lambda: len(server.requests) == 2, 10, message="two documents in flight")
    stop = run_to_exit("stop", "--pidfile", pidfile)
    assert stop.returncode == 0, stop.stderr
    assert proc.wait(5) == 0, proc.output
    assert status_counts(conn) == {"completed": 2}, "stop drained the documents in flight"
    assert not os.path.exists(pidfile)


def test_a_stale_pidfile_is_taken_over_and_reload_or_stop_on_a_bad_pidfile_is_one_line(db_path, kg_service, launch, tmp_path):
    missing = str(tmp_path / "missing.pid")
    for command in ("reload", "stop"):
        result = run_to_exit(command, "--pidfile", missing)
        assert result.returncode == 1 and "does not exist" in one_line(result)

    pidfile = str(tmp_path / "kgs.pid")
    gone = dead_pid()
    with open(pidfile, "w") as f:
        f.write(f"{gone}\n")
    for command in ("reload", "stop"):
        result = run_to_exit(command, "--pidfile", pidfile)
        assert result.returncode == 1 and f"stale: no supervisor holds it (pid {gone} is gone)" in one_line(result)
    assert pid_in(pidfile) == str(gone), "reload and stop never rewrite a pidfile"

    first = launch(db_path, kg_service, "--workers", "1", "--pidfile", pidfile, name="first")
    wait_for(lambda: pid_in(pidfile) == str(first.pid), 10, message="the stale pidfile taken over")
    wait_for(lambda: worker_pids(first), 10, message="a worker")
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    # Nothing the dead supervisor forked (stats Manager, workers) may keep its lock: the
    # pidfile is stale at once, so a restart by systemd is not refused.
    with pytest.raises(KGSupervisorError, match="is stale"):
        running_pid(pidfile)

    second = launch(db_path, kg_service, "--workers", "1", "--pidfile", pidfile, name="second")
    wait_for(lambda: pid_in(pidfile) == str(second.pid), 10, message="taken over after kill -9")
    wait_for(lambda: worker_pids(second), 10, message="a worker")
    stop = run_to_exit("stop", "--pidfile", pidfile)
    assert stop.returncode == 0, stop.stderr
    assert second.wait(5) == 0, second.output
    assert not os.path.exists(pidfile)


# -- 7. --exit-when-empty -----------------------------------------------------------------------


def test_exit_when_empty_with_nothing_queued_exits_0_by_itself(db_path, kg_service, launch):
    proc = launch(db_path, kg_service, "--workers", "2", "--exit-when-empty")
    log = proc.stop(sig=None, timeout=60)
    assert proc.returncode == 0, log
    assert "draining (queue is empty)" in log and "drained: all workers stopped" in log, log


def test_exit_when_empty_with_work_exits_0_after_everything_completed(conn, db_path, kg_service, launch):
    ids = seed(conn, 12)
    proc = launch(db_path, kg_service, "--workers", "2", "--exit-when-empty")
    log = proc.stop(sig=None, timeout=30)
    assert proc.returncode == 0, log
    completed_once(conn, ids)
