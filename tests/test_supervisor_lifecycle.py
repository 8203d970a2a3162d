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

import psutil
import pytest

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.pool.pidfile import running_pid
from kgsupervisor.pool.supervisor import SECOND_SIGNAL_GRACE

from .conftest import KGSUPERVISOR, held_until, kill_groups, seed, status_counts, wait_for, wait_for_log
from .test_supervisor import completed_once, worker_pids

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

FAST = {"KG_RETRY_BACKOFF": "0.05", "KG_RETRY_BACKOFF_MAX": "0.2", "KG_LEASE_SECONDS": "10",
        "PYTHONUNBUFFERED": "1"}

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
    """A real host process running the Python API; its log (and the supervisor's) goes to a file."""

    def __init__(self, db_path: str, url: str, log: pathlib.Path, workers: int, env: dict | None = None) -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(API_HOST), db_path, str(workers)],
                env={**os.environ, **FAST, "KG_SERVICE_URL": url, **(env or {})}, start_new_session=True,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, text=True)
        self.supervisor_pid = self.read()["supervisor_pid"]

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, f"the API host exited: {self.log.read_text()}"
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> int:
        """stop_kg_workers(); returns the supervisor's exit code."""
        exitcode = self.ask("stop")["exitcode"]
        self.proc.communicate(timeout=10)
        return exitcode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


@pytest.fixture
def launch(tmp_path):
    """Starts `kgsupervisor run` logging to a file the test reads while it runs; any still
    running at teardown is killed with its whole process group."""
    started: list[subprocess.Popen] = []

    def run(db_path: str, url: str, *args: str, env: dict | None = None, name: str = "supervisor"):
        log = tmp_path / f"{name}.log"
        if "--status-addr" not in args:
            args += ("--status-addr", "off")
        with log.open("w") as out:
            proc = subprocess.Popen(KGSUPERVISOR + ["run", "--db", db_path, "--service-url", url,
                                                    "--poll-interval", "0.2", *args],
                                    env={**os.environ, **FAST, **(env or {})}, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=out)
        proc.log = log
        started.append(proc)
        return proc

    yield run
    kill_groups(started)


@pytest.fixture
def api_host(tmp_path):
    """Starts ApiHost processes; any still running at teardown is killed with its supervisor."""
    started: list[ApiHost] = []

    def start(db_path: str, url: str, workers: int, env: dict | None = None) -> ApiHost:
        started.append(ApiHost(db_path, url, tmp_path / "api-host.log", workers, env))
        return started[-1]

    yield start
    for host in started:
        host.kill()


def finish(proc, sig: int | None = signal.SIGTERM, timeout: float = 30) -> str:
    """Send `sig` (None: send nothing), wait for the exit, return the log."""
    if sig is not None and proc.poll() is None:
        os.kill(proc.pid, sig)
    proc.wait(timeout)
    return proc.log.read_text()


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(KGSUPERVISOR + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **FAST})


def children_named(pid: int, prefix: str) -> set[int]:
    """Live (not zombie) children of `pid` whose process name starts with `prefix`."""
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for child in children:
        try:
            if child.name().startswith(prefix) and child.status() != psutil.STATUS_ZOMBIE:
                found.add(child.pid)
        except psutil.Error:
            pass
    return found


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
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "1")
    try:
        wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
        workers = worker_pids(proc)
        in_flight = sorted(p["content_id"] for p in server.requests)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        # The answers come once the drain is under way: the documents were in flight throughout.
        wait_for_log(proc.log, "draining (stop signal)")
        answers.set()
        err = finish(proc, sig=None)
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
    proc = launch(db_path, server.url, "--workers", "2", "--batch-size", "1")
    try:
        wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for_log(proc.log, "draining (stop signal)")  # the first Ctrl-C is handled
        assert proc.poll() is None and status_counts(conn) == {"processing": 2}, "still draining"
        # The grace counts from the handling just seen; it is time itself, so only time ends it.
        time.sleep(SECOND_SIGNAL_GRACE + 0.2)
        os.killpg(proc.pid, signal.SIGINT)
        # Within the drain timeout (60 s) and before any answer: only the second Ctrl-C can end it.
        err = finish(proc, sig=None, timeout=45)
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
    log = finish(proc, sig=None, timeout=60)  # --exit-when-empty ends it
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
    log = finish(proc, sig=None, timeout=20)
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
    first_log = finish(first)
    wait_for(lambda: status_counts(conn) == {"completed": 24}, 30, message="the second finishes")
    second_log = finish(second)
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

    second = cli("run", "--db", db_path, "--service-url", server.url, "--pidfile", pidfile, "--status-addr", "off")
    assert second.returncode == 1, second.stderr
    assert f"another supervisor (pid {proc.pid}) is running" in one_line(second)
    assert pid_in(pidfile) == str(proc.pid), "the loser leaves the pidfile alone"

    reload = cli("reload", "--pidfile", pidfile)
    assert reload.returncode == 0, reload.stderr
    wait_for(lambda: len(worker_pids(proc)) == 2 and not worker_pids(proc) & old, 15, message="new workers")
    wait_for(lambda: "restart #1" in proc.log.read_text(), 5, message="the reload logged")

    seed(conn, 2)
    wait_for(lambda: len(server.requests) == 2, 10, message="two documents in flight")
    stop = cli("stop", "--pidfile", pidfile)
    assert stop.returncode == 0, stop.stderr
    assert proc.wait(5) == 0, proc.log.read_text()
    assert status_counts(conn) == {"completed": 2}, "stop drained the documents in flight"
    assert not os.path.exists(pidfile)


def test_a_stale_pidfile_is_taken_over_and_reload_or_stop_on_a_bad_pidfile_is_one_line(db_path, kg_service, launch, tmp_path):
    missing = str(tmp_path / "missing.pid")
    for command in ("reload", "stop"):
        result = cli(command, "--pidfile", missing)
        assert result.returncode == 1 and "does not exist" in one_line(result)

    pidfile = str(tmp_path / "kgs.pid")
    gone = dead_pid()
    with open(pidfile, "w") as f:
        f.write(f"{gone}\n")
    for command in ("reload", "stop"):
        result = cli(command, "--pidfile", pidfile)
        assert result.returncode == 1 and f"stale: no supervisor holds it (pid {gone} is gone)" in one_line(result)
    assert pid_in(pidfile) == str(gone), "reload and stop never rewrite a pidfile"

    first = launch(db_path, kg_service, "--workers", "1", "--pidfile", pidfile, name="first")
    wait_for(lambda: pid_in(pidfile) == str(first.pid), 10, message="the stale pidfile taken over")
    wait_for(lambda: worker_pids(first), 10, message="a worker")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(5)
    # Nothing the dead supervisor forked (stats Manager, workers) may keep its lock: the
    # pidfile is stale at once, so a restart by systemd is not refused.
    with pytest.raises(KGSupervisorError, match="is stale"):
        running_pid(pidfile)

    second = launch(db_path, kg_service, "--workers", "1", "--pidfile", pidfile, name="second")
    wait_for(lambda: pid_in(pidfile) == str(second.pid), 10, message="taken over after kill -9")
    wait_for(lambda: worker_pids(second), 10, message="a worker")
    stop = cli("stop", "--pidfile", pidfile)
    assert stop.returncode == 0, stop.stderr
    assert second.wait(5) == 0, second.log.read_text()
    assert not os.path.exists(pidfile)


# -- 7. --exit-when-empty -----------------------------------------------------------------------


def test_exit_when_empty_with_nothing_queued_exits_0_by_itself(db_path, kg_service, launch):
    proc = launch(db_path, kg_service, "--workers", "2", "--exit-when-empty")
    log = finish(proc, sig=None, timeout=60)
    assert proc.returncode == 0, log
    assert "draining (queue is empty)" in log and "drained: all workers stopped" in log, log


def test_exit_when_empty_with_work_exits_0_after_everything_completed(conn, db_path, kg_service, launch):
    ids = seed(conn, 12)
    proc = launch(db_path, kg_service, "--workers", "2", "--exit-when-empty")
    log = finish(proc, sig=None, timeout=30)
    assert proc.returncode == 0, log
    completed_once(conn, ids)
