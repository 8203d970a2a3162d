"""Pause and resume through the database: the claim statement takes nothing while the flag is
set, on SQLite and PostgreSQL, for every supervisor of every host; a paused worker finishes what
it holds; the flag outlasts restarts; status, /stats, /health, /metrics and sd_notify show it."""
from __future__ import annotations

import io
import socket
import threading
import time
from contextlib import closing

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from kgsupervisor.queue import control
from kgsupervisor.queue.leased import CLAIM_SQL, PG_CLAIM_SQL, queue_for
from kgsupervisor.store.commitwatch import NotifyWatch
from kgsupervisor.store.postgres import PGConnection
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

from .conftest import held_until, seed, status_counts
from .processes import Process, Processes, free_port, run_to_exit, wait_for

pytestmark = [pytest.mark.timeout(180)]

PAUSED_LINE = "claims paused by "
RESUMED_LINE = "claims resumed: the pause was lifted"


def queue_rows(conn, n: int) -> list[int]:
    """`n` documents, each queued once; their content ids."""
    ids = add_documents(conn, n, chunks=1, seed=n)
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, 1)",
                     [(i,) for i in ids])
    return ids


def claim(queue, limit: int = 10) -> list[int]:
    """Claim up to `limit` rows now; their content ids."""
    claims = queue.claim("test:1", f"token-{time.monotonic_ns()}", limit, 30, time.time())
    return [c.content_id for c in claims]


# -- the flag and the claim, on both backends ---------------------------------------------------

def test_a_paused_queue_claims_nothing_and_a_resumed_one_claims_again(backend):
    with closing(backend.connect()) as conn:
        ids = queue_rows(conn, 4)
        queue = queue_for(conn)
        assert control.paused_state(conn) is None
        state, added = control.pause(conn, "  disk\nswap  ", "ops:42", 1000.0)
        assert added and state == control.Pause("disk swap", 1000.0, "ops:42"), "one line, whitespace folded"
        assert claim(queue) == []
        assert status_counts(conn) == {"pending": 4}

        # Pausing again keeps when and by whom; a new reason replaces the old, none keeps it.
        again, added = control.pause(conn, "new disk", "other:7", 2000.0)
        assert not added and again == control.Pause("new disk", 1000.0, "ops:42")
        assert control.pause(conn, None, "other:7", 3000.0)[0] == again
        assert claim(queue) == []

        assert control.resume(conn) == again
        assert control.paused_state(conn) is None and control.resume(conn) is None
        assert sorted(claim(queue)) == sorted(ids)


def test_pause_shows_since_as_iso_8601():
    pause = control.Pause("why", 0.0, "h:1")
    assert pause.as_dict() == {"reason": "why", "since": "1970-01-01T00:00:00+00:00", "set_by": "h:1"}


def test_the_watch_view_shows_the_pause_and_only_when_there_is_one():
    from rich.console import Console

    from kgsupervisor.ops.render import RateMeter, status_view

    def shown(paused: dict | None) -> str:
        stats = {"queue_size": {"pending": 2, "total": 2}, "kg_service_status": {}, "paused": paused}
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(status_view({"stats": stats, "health": {"worker_details": []}}, RateMeter()))
        return console.export_text()
    pause = control.Pause("disk swap", 0.0, "ops:42").as_dict()
    assert "PAUSED since 1970-01-01T00:00:00+00:00 by ops:42 (reason: disk swap)" in shown(pause)
    assert "PAUSED" not in shown(None)


def vm_steps(conn, sql: str, params: tuple) -> int:
    """How many SQLite virtual machine instructions `sql` runs (a progress handler counts them)."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0
    conn.set_progress_handler(count, 1)
    try:
        conn.execute(sql, params).fetchall()
    finally:
        conn.set_progress_handler(None, 1)
    return steps[0]


def test_on_sqlite_a_paused_claim_reads_no_queue_row_and_the_claim_keeps_its_index(db_path):
    """The pause is a LIMIT of 0, known before the scan: a WHERE term with a subquery would be
    tested on every row the index scan passes, and a paused claim would read the whole queue."""
    conn = connect(db_path)
    params = ("t", "o", "k", 0.0, time.time(), 5)
    steps = [r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + CLAIM_SQL, params).fetchall()]
    assert "SCAN kg_processing_queue USING INDEX idx_kgq_claim_order" in steps, steps
    assert not any("TEMP B-TREE" in s for s in steps), steps
    control.pause(conn, None, "t:1", time.time())
    conn.execute("INSERT INTO kg_processing_queue (content_id, priority) VALUES (1, 1)")
    small = vm_steps(conn, CLAIM_SQL, params)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, 1)",
                     ((i,) for i in range(2, 20_002)))
    conn.execute("COMMIT")
    assert vm_steps(conn, CLAIM_SQL, params) == small, "a paused claim's work grows with the queue"
    control.resume(conn)
    assert vm_steps(conn, CLAIM_SQL, params) > small  # the same count is not one that ignores the rows
    conn.close()


def explain_claim(conn) -> str:
    """EXPLAIN ANALYZE of the claim statement as workers run it, rolled back."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute("EXPLAIN (ANALYZE, COSTS OFF) " + PG_CLAIM_SQL,
                            ("", "plan:1", "plan", 0.0, time.time(), 5)).fetchall()
    finally:
        conn.execute("ROLLBACK")
    return "\n".join(r[0] for r in rows)


def test_on_postgresql_the_pause_is_a_one_time_filter_over_the_skip_locked_index_scan(pg_backend):
    with closing(pg_backend.connect()) as conn:
        conn.execute("INSERT INTO kg_processing_queue (content_id, priority) "
                     "SELECT g, g % 3 FROM generate_series(1, 20000) g")
        conn.execute("ANALYZE kg_processing_queue")
        plan = explain_claim(conn)
        assert "Index Scan using idx_kgq_claim_order" in plan and "LockRows" in plan, plan
        assert "One-Time Filter" in plan and "Seq Scan on kg_processing_queue" not in plan, plan
        control.pause(conn, None, "t:1", time.time())
        paused = explain_claim(conn)
        [scan] = [line for line in paused.splitlines() if "idx_kgq_claim_order" in line]
        assert "(never executed)" in scan, paused


def test_resume_wakes_postgresql_listeners_and_pause_does_not(pg_backend):
    """Idle PostgreSQL workers wait on NOTIFY, which only queue rows trigger: resume sends one."""
    with closing(pg_backend.connect()) as conn, closing(pg_backend.connect()) as listener:
        watch = NotifyWatch(listener)
        control.pause(conn, None, "t:1", time.time())
        assert not watch.changed()
        control.resume(conn)
        wait_for(watch.changed, 10, message="the NOTIFY of resume")


# -- the commands --------------------------------------------------------------------------------

def test_pause_and_resume_commands(db_path):
    first = run_to_exit("pause", "--db", db_path, "--reason", "disk swap")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("paused since ") and "(reason: disk swap)" in first.stdout
    assert f"by {socket.gethostname()}:" in first.stdout and "until `kgsupervisor resume`" in first.stdout
    since = first.stdout.split()[2]
    again = run_to_exit("pause", "--db", db_path, "--reason", "new disk")
    assert again.returncode == 0 and again.stdout.startswith(f"already paused since {since} ")
    assert "(reason: new disk)" in again.stdout
    resumed = run_to_exit("resume", "--db", db_path)
    assert resumed.returncode == 0
    assert resumed.stdout.startswith(f"resumed: workers claim again (paused since {since}")
    not_paused = run_to_exit("resume", "--db", db_path)
    assert not_paused.returncode == 0 and not_paused.stdout == "not paused: workers are claiming already\n"
    too_long = run_to_exit("pause", "--db", db_path, "--reason", "x" * 501)
    assert too_long.returncode == 2 and too_long.stderr.count("\n") == 1
    assert "--reason=" in too_long.stderr and "at most 500 characters" in too_long.stderr
    with closing(connect(db_path)) as conn:
        assert control.paused_state(conn) is None


# -- real supervisors ----------------------------------------------------------------------------

class Host:
    """A `kgsupervisor run` of the process harness and its status endpoint on a free loopback port."""

    def __init__(self, processes: Processes, db: str, service_url: str, *args: str,
                 env: dict[str, str] | None = None, name: str = "supervisor") -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.proc: Process = processes.supervisor(db, service_url, "--status-addr", self.addr, *args,
                                                  env=env, name=name)

    def get(self, path: str) -> requests.Response | None:
        try:
            return requests.get(f"http://{self.addr}{path}", timeout=5)
        except requests.RequestException:
            return None

    def stats(self) -> dict:
        """/stats, or {} while the endpoint does not answer yet."""
        answer = self.get("/stats")
        return answer.json() if answer is not None and answer.status_code == 200 else {}

    def workers(self) -> list[dict]:
        answer = self.get("/health")
        if answer is None or answer.status_code not in (200, 503):
            return []
        return answer.json()["worker_details"]

    def wait_workers(self, state: str, count: int, what: str = "") -> None:
        """Wait until `count` workers run and each shows `state`."""
        def there() -> bool:
            workers = self.workers()
            return len(workers) == count and all(w["running"] and w["state"] == state for w in workers)
        wait_for(there, 30, interval=0.05, message=what or f"{count} worker(s) {state}")

    def wait_paused(self, shown: bool) -> dict:
        """Wait until /stats shows the pause (or its absence); returns /stats."""
        def shows() -> dict | None:
            stats = self.stats()
            return stats if stats and (stats["paused"] is not None) == shown else None
        return wait_for(shows, 15, interval=0.1, message=f"/stats paused {'shown' if shown else 'gone'}")

    def wait_publishes(self, n: int) -> None:
        """Wait until the supervisor has published `n` more snapshots (one a second): at a
        0.2 s poll, each is five chances for an idle worker to claim."""
        seen: set[str] = set()

        def published() -> bool:
            stamp = self.stats().get("last_health_check")
            if stamp:
                seen.add(stamp)
            return len(seen) > n
        wait_for(published, 10 + 2 * n, interval=0.1, message=f"{n} more published snapshots")

    def metric(self, name: str) -> float:
        families = {f.name: f for f in text_string_to_metric_families(self.get("/metrics").text)}
        return families[name].samples[0].value


@pytest.mark.slow
def test_a_paused_supervisor_finishes_the_document_in_hand_and_claims_nothing_more(
        conn, db_path, processes, fault_server):
    gate = threading.Event()
    service = fault_server(held_until(gate))
    seed(conn, 3, chunks=1)
    host = Host(processes, db_path, service.url, "--workers", "1", "--batch-size", "1")
    wait_for(lambda: len(service.requests) == 1, 30, message="the worker sending its first document")
    host.wait_workers("busy", 1, "the worker busy with its document")
    paused = run_to_exit("pause", "--db", db_path, "--reason", "disk swap")
    assert paused.returncode == 0, paused.stderr
    gate.set()
    # Busy -> idle is a claim that found nothing: the batch was full, so it came at once.
    host.wait_workers("idle", 1, "the worker idle after its document")
    assert status_counts(conn) == {"completed": 1, "pending": 2}
    host.wait_publishes(3)
    assert status_counts(conn) == {"completed": 1, "pending": 2} and len(service.requests) == 1

    stats = host.wait_paused(True)
    pause = stats["paused"]
    assert pause["reason"] == "disk swap" and pause["set_by"].startswith(f"{socket.gethostname()}:")
    assert pause["since"].endswith("+00:00") and stats["total_success"] == 1
    health = host.get("/health")
    assert health.status_code == 200 and health.json()["paused"] == stats["paused"], "paused is not broken"
    assert host.metric("kgsupervisor_paused") == 1
    status = run_to_exit("status", "--status-addr", host.addr)
    assert f"PAUSED since {pause['since']} by {pause['set_by']} (reason: disk swap)" in status.stdout
    assert run_to_exit("health", "--status-addr", host.addr).returncode == 0

    assert run_to_exit("resume", "--db", db_path).returncode == 0
    wait_for(lambda: status_counts(conn) == {"completed": 3}, 30, message="the rest taken after resume")
    assert host.wait_paused(False)["paused"] is None
    assert host.metric("kgsupervisor_paused") == 0
    assert "PAUSED" not in run_to_exit("status", "--status-addr", host.addr).stdout
    log = host.proc.stop()
    assert host.proc.returncode == 0, log[-3000:]
    assert PAUSED_LINE in log and "(reason: disk swap)" in log and RESUMED_LINE in log


@pytest.mark.slow
def test_the_pause_outlasts_a_restart_shows_in_sd_notify_and_resume_wakes_idle_workers_at_once(
        conn, db_path, processes, fault_server, tmp_path):
    """A 300 s poll: only the commit of `resume` can wake the idle workers in time."""
    service = fault_server()
    assert run_to_exit("pause", "--db", db_path, "--reason", "reindexing").returncode == 0
    seed(conn, 4, chunks=1)
    first = Host(processes, db_path, service.url, "--workers", "2", "--poll-interval", "300")
    since = first.wait_paused(True)["paused"]["since"]
    first.proc.wait_for_log("worker started", 2)
    first.wait_publishes(3)
    first.proc.stop()
    assert first.proc.returncode == 0, first.proc.output[-3000:]
    assert service.requests == [] and status_counts(conn) == {"pending": 4}

    with NotifySocket(str(tmp_path / "notify.sock")) as notify:
        again = Host(processes, db_path, service.url, "--workers", "2", "--poll-interval", "300",
                     env={"NOTIFY_SOCKET": notify.path}, name="restarted")
        status = notify.wait_for(f"STATUS=PAUSED since {since} (reason: reindexing), claiming nothing; "
                                 "2/2 workers")
        assert "4 pending" in status
        assert again.wait_paused(True)["paused"]["since"] == since, "the same pause, read from the database"
        again.proc.wait_for_log("worker started", 2)
        again.wait_publishes(3)
        assert service.requests == [] and status_counts(conn) == {"pending": 4}

        assert run_to_exit("resume", "--db", db_path).returncode == 0
        wait_for(lambda: status_counts(conn) == {"completed": 4}, 30,
                 message="the queue drained long before the 300 s poll")
        notify.wait_for("STATUS=2/2 workers, 4 completed")
        log = again.proc.stop()
    assert again.proc.returncode == 0, log[-3000:]
    assert RESUMED_LINE in log


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET; a thread reads every datagram
    (as systemd does: a full socket would block the sender)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)

    def __enter__(self) -> NotifySocket:
        self.reader.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.reader.join(5)
        self.sock.close()

    def read(self) -> None:
        while not self.closed.is_set():
            try:
                self.lines.extend(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def wait_for(self, start: str) -> str:
        """Wait for a line that starts with `start`; returns it."""
        return wait_for(lambda: next((line for line in list(self.lines) if line.startswith(start)), None), 30,
                        interval=0.05, message=f"a line {start!r} among {self.lines[-3:]}")


@pytest.mark.slow
def test_pause_stops_two_supervisors_sharing_a_postgresql_queue_within_one_poll_and_resume_restarts_both(
        pg_backend, processes, fault_server):
    """Two hosts of two workers, one document per claim, a 300 s poll. Each worker holds one
    document when the pause comes: it finishes it, and its next claim (at once, its batch was
    full) takes nothing. After resume every worker of both hosts takes a document, woken by NOTIFY."""
    url = pg_backend.target
    first_hold, second_hold = threading.Event(), threading.Event()

    def behaviour(payload: dict, n: int) -> None:
        """The first four requests wait for `first_hold`, the next four for `second_hold`."""
        if n < 4:
            first_hold.wait(60)
        elif n < 8:
            second_hold.wait(60)
    service = fault_server(behaviour)
    with closing(PGConnection(url)) as conn:
        queue_rows(conn, 12)
    args = ("--workers", "2", "--batch-size", "1", "--poll-interval", "300", "--adaptive", "off")
    hosts = [Host(processes, url, service.url, *args, name=name) for name in ("host-a", "host-b")]
    try:
        wait_for(lambda: len(service.requests) == 4, 30,
                 message="every worker of both hosts sending a document")
        for host in hosts:
            host.wait_workers("busy", 2)
        assert run_to_exit("pause", "--db", url, "--reason", "failover drill").returncode == 0
        first_hold.set()
        for host in hosts:
            host.wait_workers("idle", 2, "both workers idle: the claim after their document took nothing")
        assert pg_counts(url) == {"completed": 4, "pending": 8} and len(service.requests) == 4
        for host in hosts:
            assert host.wait_paused(True)["paused"]["reason"] == "failover drill"

        assert run_to_exit("resume", "--db", url).returncode == 0
        wait_for(lambda: len(service.requests) == 8, 30, message="four documents sent again after resume")
        for host in hosts:
            # Each worker holds one document at a time: every worker of this host took one.
            wait_for(lambda: sum(w["current_content_id"] is not None for w in host.workers()) == 2, 30,
                     message="both of this host's workers holding a document")
        second_hold.set()
        wait_for(lambda: pg_counts(url) == {"completed": 12}, 30, message="the queue drained")
        for host in hosts:
            assert host.wait_paused(False)["paused"] is None
    finally:
        first_hold.set()
        second_hold.set()
    for host in hosts:
        log = host.proc.stop()
        assert host.proc.returncode == 0, log[-3000:]
        assert PAUSED_LINE in log and RESUMED_LINE in log


def pg_counts(url: str) -> dict[str, int]:
    with closing(PGConnection(url)) as conn:
        return status_counts(conn)
