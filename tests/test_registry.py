"""The registry of hosts: every supervisor keeps a row in the database, `status --all` lists them
from the database alone. Real supervisors on a real SQLite file and a throwaway PostgreSQL, a
real `kgsupervisor status --all` process; the loop's cadence on a fake clock."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
from contextlib import closing

import pytest

from kgsupervisor import __version__
from kgsupervisor.pool.registry import KEEP_UNHEARD, REFRESH_EVERY, host_state
from kgsupervisor.pool.supervisor import Supervisor
from kgsupervisor.states import SupervisorState
from kgsupervisor.store.hosts import HostRow, read_hosts, upsert_host
from kgsupervisor.store.sqlite import connect

from .conftest import make_settings, seed, status_counts, wait_for
from .processes import run_to_exit
from .test_pool_decisions import T0, FakeLauncher, LocalStats, RecordingReporter

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

LEASE = "3"  # short: a killed supervisor's row shows gone three seconds after its last heartbeat
HOST = socket.gethostname()


def status_all(db: str, *args: str, lease: str = LEASE):
    """Run `kgsupervisor status --all --db DB ARGS` to its exit; the completed process."""
    return run_to_exit("status", "--all", "--db", db, *args, env={"KG_LEASE_SECONDS": lease})


def hosts_json(db: str, lease: str = LEASE) -> dict:
    """`status --all --json`, parsed; it must succeed."""
    result = status_all(db, "--json", lease=lease)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def host_of(document: dict, pid: int) -> dict | None:
    """The entry of the supervisor `pid` of this host, if listed."""
    return next((h for h in document["hosts"] if h["host"] == HOST and h["pid"] == pid), None)


def state_of(db: str, pid: int, lease: str = LEASE) -> str | None:
    """The state `status --all` shows for supervisor `pid` of this host."""
    entry = host_of(hosts_json(db, lease), pid)
    return entry and entry["state"]


def status_address(log: str) -> str:
    """The status endpoint's address as the supervisor logged it."""
    return re.search(r"status endpoint on http://(\S+) ", log).group(1)


def start(processes, db: str, service: str, name: str, workers: str = "1", lease: str = LEASE):
    """A supervisor on `db`, started (its row is written before it says so)."""
    proc = processes.supervisor(db, service, "--workers", workers, env={"KG_LEASE_SECONDS": lease}, name=name)
    proc.wait_for_log("supervisor started")
    return proc


# -- real processes ----------------------------------------------------------------------------

def test_two_supervisors_sharing_a_postgresql_queue_are_listed_and_a_killed_one_shows_gone(
        pg_backend, kg_service, processes):
    url = pg_backend.target
    with closing(pg_backend.connect()) as conn:
        seed(conn, 6)
    a = start(processes, url, kg_service, "host-a")
    b = start(processes, url, kg_service, "host-b")
    wait_for(lambda: hosts_json(url)["queue_size"]["completed"] == 6, 60, interval=0.2,
             message="queue drained")
    document = hosts_json(url)
    for proc in (a, b):
        entry = host_of(document, proc.pid)
        assert entry is not None, document
        assert (entry["state"], entry["workers_running"], entry["workers_wanted"]) == ("running", 1, 1)
        assert entry["version"] == __version__ and entry["status_addr"] == status_address(proc.output)
        assert entry["heartbeat_age"] < float(LEASE)
    assert document["database"]["backend"] == "postgresql" and document["queue_size"]["total"] == 6
    text = status_all(url)
    assert text.returncode == 0, text.stderr
    rows = [line.split() for line in text.stdout.splitlines() if line.startswith(HOST + " ")]
    assert sorted((int(r[1]), r[2], r[3]) for r in rows) == sorted([(a.pid, "running", "1/1"),
                                                                   (b.pid, "running", "1/1")])
    assert "queue: 0 pending, 0 processing, 6 completed" in text.stdout

    a.kill()  # SIGKILL to its whole group: nothing gets to write `stopped`
    wait_for(lambda: state_of(url, a.pid) == "gone", 30, interval=0.2, message="host A shown gone")
    assert state_of(url, b.pid) == "running", "a live host is refreshed well within the lease"

    assert b.stop() and b.returncode == 0
    document = hosts_json(url)
    assert host_of(document, b.pid)["state"] == "stopped" and host_of(document, b.pid)["workers_running"] == 0
    assert host_of(document, a.pid)["state"] == "gone"


def test_sqlite_lists_its_one_supervisor_and_a_clean_stop_shows_stopped(db_path, kg_service, processes):
    proc = start(processes, db_path, kg_service, "supervisor", workers="2")
    text = status_all(db_path)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"database {db_path} (sqlite): 1 supervisor(s), 1 running")
    header, row = lines[-2].split(), lines[-1].split()
    assert header[:4] == ["host", "pid", "state", "workers"]
    assert row[:6] == [HOST, str(proc.pid), "running", "2/2", __version__, status_address(proc.output)]
    proc.stop()
    assert proc.returncode == 0
    [entry] = hosts_json(db_path)["hosts"]
    assert (entry["pid"], entry["state"]) == (proc.pid, "stopped")


def test_a_paused_supervisor_is_shown_paused_until_resumed(db_path, kg_service, processes):
    proc = start(processes, db_path, kg_service, "supervisor")
    assert run_to_exit("pause", "--db", db_path, "--reason", "registry test").returncode == 0
    wait_for(lambda: state_of(db_path, proc.pid) == "paused", 30, interval=0.1, message="shown paused")
    assert run_to_exit("resume", "--db", db_path).returncode == 0
    wait_for(lambda: state_of(db_path, proc.pid) == "running", 30, interval=0.1,
             message="shown running again")
    assert proc.stop() and proc.returncode == 0


def test_a_registry_the_database_refuses_does_not_stop_the_supervisor(db_path, kg_service, processes):
    """Triggers make the database refuse every write to the registry (and only there): the
    supervisor's row goes stale and shows gone while its workers go on draining the queue; the
    refusal is logged once, and the row is written again once the database takes it."""
    proc = start(processes, db_path, kg_service, "supervisor", lease="1")
    with closing(connect(db_path)) as conn:
        for event in ("INSERT", "UPDATE"):
            conn.execute(f"CREATE TRIGGER refuse_{event.lower()} BEFORE {event} ON kg_supervisor_hosts "
                         "BEGIN SELECT RAISE(ABORT, 'the registry is refused by this test'); END")
        wait_for(lambda: state_of(db_path, proc.pid, "1") == "gone", 30, interval=0.1,
                 message="the stale row shown gone")
        seed(conn, 5)
        wait_for(lambda: status_counts(conn) == {"completed": 5}, 30, message="documents drained meanwhile")
        assert proc.poll() is None
        log = proc.output
        assert log.count("could not write this supervisor's row in the registry of hosts") == 1, log
        assert "the registry is refused by this test" in log and "Traceback" not in log
        for event in ("insert", "update"):
            conn.execute(f"DROP TRIGGER refuse_{event}")
    wait_for(lambda: state_of(db_path, proc.pid, "1") == "running", 30, interval=0.1,
             message="the row written again")
    proc.wait_for_log("registry of hosts written again")
    assert proc.stop() and proc.returncode == 0


def test_status_all_errors_are_one_line(db_path):
    for args, env, text in (
            (["status", "--all"], {"KG_DB_PATH": ""}, "a database with --all"),
            (["status", "--db", db_path], {}, "--all with it"),
            (["status", "--all", "--watch", "--db", db_path], {}, "no --watch with --all"),
            (["status", "--all", "--db", db_path + ".missing"], {}, "does not exist")):
        result = run_to_exit(*args, env=env)
        assert result.returncode == (1 if text == "does not exist" else 2), (args, result.stderr)
        assert result.stderr.count("\n") == 1 and text in result.stderr and result.stdout == "", result.stderr


# -- the loop's cadence, on a fake clock ---------------------------------------------------------

@pytest.fixture
def supervisor(db_path):
    """A started supervisor on fake processes (lease 10 s: refreshed every 10/3 s), at T0."""
    settings = make_settings(db_path, "http://127.0.0.1:9", num_workers=2)
    launcher = FakeLauncher()
    sup = Supervisor(settings, RecordingReporter(), stats=LocalStats(), launch=launcher)
    return sup, launcher


def rows(db_path: str) -> dict[int, HostRow]:
    with closing(connect(db_path)) as conn:
        return {row.pid: row for row in read_hosts(conn)}


def test_the_row_is_written_at_start_refreshed_when_due_and_at_once_on_a_drain(supervisor, db_path):
    sup, launcher = supervisor
    sup.start(T0)
    first = rows(db_path)[sup.pid]
    assert (first.host, first.state, first.workers_running, first.workers_wanted) == (HOST, "running", 2, 2)
    assert first.status_addr is None  # the status endpoint is off
    sup.pool.num_workers = 1  # as SIGTTOU does: worker 1 is retired, and exits
    launcher.started[1].process.exit(0)
    sup.loop_once([], T0 + 1)
    assert rows(db_path)[sup.pid] == first, "refreshed before it was due"
    refresh = min(REFRESH_EVERY, sup.settings.lease_seconds / 3)
    sup.loop_once([], T0 + refresh)
    second = rows(db_path)[sup.pid]
    assert second.heartbeat_at > first.heartbeat_at
    assert (second.workers_running, second.workers_wanted) == (1, 1)
    sup.loop_once([signal.SIGTERM], T0 + refresh + 0.1)
    assert rows(db_path)[sup.pid].state == "draining", "a drain is shown at once"
    sup.halt()
    assert rows(db_path)[sup.pid].state == "stopped"


def test_rows_unheard_of_for_a_day_are_pruned_at_start(supervisor, db_path):
    sup, _ = supervisor
    now = time.time()
    with closing(connect(db_path)) as conn:
        for pid, beat, state in ((1, now - KEEP_UNHEARD - 60, "running"),
                                 (2, now - KEEP_UNHEARD - 60, "stopped"),
                                 (3, now - KEEP_UNHEARD + 600, "running")):
            upsert_host(conn, HostRow("elsewhere", pid, beat - 10, beat, 1, 1, "0.0.1", None, state))
    sup.start(T0)
    assert sorted(rows(db_path)) == sorted([3, sup.pid])


@pytest.mark.parametrize("state, age, shown", [
    ("running", 59.0, "running"), ("running", 61.0, "gone"), ("draining", 61.0, "gone"),
    ("paused", 30.0, "paused"), ("stopped", 10 * KEEP_UNHEARD, "stopped")])
def test_a_row_is_shown_gone_once_its_heartbeat_is_older_than_the_lease(state, age, shown):
    now = 1_700_000_000.0
    row = HostRow("h", 1, now - 1000, now - age, 2, 2, __version__, None, state)
    assert row.shown_state(now, 60.0) == shown


def test_the_registry_names_the_supervisor_states():
    assert [host_state(s) for s in SupervisorState] == ["starting", "running", "draining", "stopped"]
    assert host_state(SupervisorState.RUNNING, paused=True) == "paused"
    assert host_state(SupervisorState.STOPPING, paused=True) == "draining"
