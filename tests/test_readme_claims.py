"""Documented promises (docs/operating.md, docs/document-lifecycle.md) that had no test (issue 21),
each over real processes, signals and sockets: the next `run` releases a SIGKILLed tree's claims
at start, WATCHDOG=1 and /health follow the workers, and a late answer from a worker whose lease
was taken over commits nothing."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests

from kgsupervisor.kg.devextract import extract

from .conftest import seed, status_counts, wait_for
from .test_reload import supervisor  # noqa: F401 - the fixture that starts `run`s logging to files
from .test_supervisor import completed_once

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

HOST = socket.gethostname()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan may wait for init to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tree(pid: int) -> set[int]:
    """`pid` and every descendant of it."""
    return {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}


def claims(conn) -> dict[str, float]:
    """lease_owner -> lease_expires_at of every row in processing."""
    return dict(conn.execute("SELECT lease_owner, lease_expires_at FROM kg_processing_queue "
                             "WHERE status = 'processing'").fetchall())


# -- the next run releases the claims of a killed tree at start ----------------------------------

def test_the_next_run_releases_the_claims_of_a_sigkilled_tree_at_start_not_after_the_lease(
        conn, db_path, fault_server, supervisor):
    ids = seed(conn, 4)
    gate = threading.Event()

    def first_two_held(payload: dict, n: int) -> None:
        if n < 2:  # the killed tree's two documents stay in flight until it is gone
            gate.wait(60)

    server = fault_server(first_two_held)
    long_lease = {"KG_LEASE_SECONDS": "600"}
    first = supervisor("--db", db_path, "--service-url", server.url, "--workers", "2", "--batch-size", "1",
                       "--adaptive", "off", env=long_lease)
    wait_for(lambda: len(server.requests) == 2, 30, message="two documents in flight")
    held = claims(conn)
    assert set(held) == {f"{HOST}:{pid}" for pid in first.workers()}, held

    # The whole tree at once (power loss, OOM killer on the cgroup): no worker can give back anything.
    doomed = tree(first.proc.pid)
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    wait_for(lambda: not any(alive(pid) for pid in doomed), 20, message="the killed tree gone")
    gate.set()
    assert claims(conn) == held, "nothing but the next run gives the dead tree's claims back"

    second = supervisor("--db", db_path, "--service-url", server.url, "--workers", "2", env=long_lease)
    wait_for(lambda: status_counts(conn) == {"completed": 4}, 30, message="every document completed")
    assert time.time() < min(held.values()) - 500, "back long before their 600 s lease would end"
    log = second.text()
    for owner in held:
        line = f"released 1 claim(s) of dead process {owner} left by an earlier run"
        assert line in log, log
        assert log.index(line) < log.index("worker 0 started"), "released at start, before any fork"
    assert "expired leases" not in log
    completed_once(conn, ids)
    assert conn.execute("SELECT MAX(retry_count), MAX(COALESCE(crash_count, 0)) FROM kg_processing_queue"
                        ).fetchone() == (0, 0), "released uncharged"
    second.stop()


# -- WATCHDOG=1 and /health follow the workers ---------------------------------------------------

class NotifyListener:
    """A NOTIFY_SOCKET of the test's own: records every sd_notify datagram, in order, in a thread."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.datagrams: list[str] = []
        self.arrived: list[float] = []  # time.monotonic() of each datagram
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                datagram = self.sock.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            self.arrived.append(time.monotonic())
            self.datagrams.append(datagram)

    def since(self, mark: int) -> list[str]:
        return list(self.datagrams[mark:])

    def wait_for_watchdog(self, mark: int = 0, timeout: float = 30) -> None:
        wait_for(lambda: "WATCHDOG=1" in self.since(mark), timeout, message=f"WATCHDOG=1 after datagram {mark}")

    def wait_for_silence(self, mark: int, seconds: float, timeout: float = 30) -> None:
        """Wait until STATUS= datagrams keep coming for `seconds` with no WATCHDOG=1 among them.

        Timed, not counted: a status request forces a STATUS= at once while WATCHDOG=1 is sent at
        most once a ping interval, so a burst of STATUS= without one proves nothing.
        """
        def silent_for() -> bool:
            first = None
            for at, datagram in list(zip(self.arrived, self.datagrams))[mark:]:
                if datagram == "WATCHDOG=1":
                    first = None
                elif "STATUS=" in datagram:
                    first = at if first is None else first
                    if at - first >= seconds:
                        return True
            return False
        wait_for(silent_for, timeout, message=f"{seconds}s of STATUS= datagrams without WATCHDOG=1")

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self.sock.close()


def health_code(addr: str) -> int | None:
    """The HTTP status of /health, or None while nothing answers."""
    try:
        return requests.get(f"http://{addr}/health", timeout=5).status_code
    except requests.RequestException:
        return None


def health_command(addr: str) -> int:
    """The exit status of `kgsupervisor health`."""
    return subprocess.run([sys.executable, "-m", "kgsupervisor", "health", "--status-addr", addr],
                          capture_output=True, text=True, timeout=60).returncode


def test_watchdog_health_and_the_health_command_follow_the_workers_heartbeat(
        tmp_path, conn, db_path, kg_service, supervisor):
    notify = NotifyListener(tmp_path / "notify.sock")
    try:
        sup = supervisor("--db", db_path, "--service-url", kg_service, "--workers", "2",
                          env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000", "KG_HANG_TIMEOUT": "3"})
        wedged = sup.wait_workers(2)
        notify.wait_for_watchdog()
        assert health_code(sup.addr) == 200 and health_command(sup.addr) == 0

        # A wedged pool whose replacements cannot start either: the workers stop beating, the
        # supervisor kills them, and every new worker fails at boot (a table it needs is gone).
        conn.execute("ALTER TABLE chunk_relationships RENAME TO chunk_relationships_away")
        for pid in wedged:
            os.kill(pid, signal.SIGSTOP)
        # WATCHDOG=1 stops once no running worker has beaten within KG_HANG_TIMEOUT, the very age
        # at which the supervisor kills a worker: a stopped worker is replaced, never resumed by a
        # SIGCONT, so the pings come back with working replacements.
        wait_for(lambda: all(f"(pid {pid}) hung: no heartbeat" in sup.text() for pid in wedged), 30,
                 message="the supervisor's hang detection of both stopped workers")
        # Pings are due every 0.5 s (WATCHDOG_USEC / 2): 3 s of status without one is 6 missed.
        notify.wait_for_silence(len(notify.datagrams), seconds=3)
        wait_for(lambda: health_code(sup.addr) == 503, 20, message="/health 503 with no worker running")
        wait_for(lambda: health_command(sup.addr) == 1, 20, message="`kgsupervisor health` exits 1")
        assert "cannot start" in sup.text() and "chunk_relationships" in sup.text()

        conn.execute("ALTER TABLE chunk_relationships_away RENAME TO chunk_relationships")
        mark = len(notify.datagrams)
        sup.wait_workers(2, other_than=wedged)
        notify.wait_for_watchdog(mark)
        wait_for(lambda: health_code(sup.addr) == 200, 20, message="/health 200 again")
        assert health_command(sup.addr) == 0
        sup.stop()
    finally:
        notify.close()


def test_health_says_503_while_every_worker_is_stopped_and_200_once_they_go_on(db_path, kg_service, supervisor):
    """docs/operating.md, Watching it: /health is 200 while its workers run. A SIGSTOPped worker
    is alive but does not run: after STALE_HEARTBEAT without a heartbeat it no longer counts as
    healthy."""
    sup = supervisor("--db", db_path, "--service-url", kg_service, "--workers", "2",
                      env={"KG_HANG_TIMEOUT": "600"})
    workers = sup.wait_workers(2)
    wait_for(lambda: health_code(sup.addr) == 200, 20, message="/health 200")
    try:
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: health_code(sup.addr) == 503, 60, message="/health 503 with both workers stopped")
        assert health_command(sup.addr) == 1
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    wait_for(lambda: health_code(sup.addr) == 200, 30, message="/health 200 once they go on")
    assert health_command(sup.addr) == 0
    assert sup.workers() == workers, "the same workers, resumed, not replaced"
    sup.stop()


# -- a late answer from a worker whose lease was taken over commits nothing -----------------------

LATE_CONFIDENCE = 0.111


def late_variant(answer: dict) -> dict:
    """A valid answer unlike the reference one in every row it would write: another document
    node, other confidences, one relationship fewer."""
    late = json.loads(json.dumps(answer))
    late["neo4j_document_id"] = "doc-late-answer"
    for item in late["entities"] + late["relationships"]:
        item["confidence"] = LATE_CONFIDENCE
    late["relationships"] = late["relationships"][:-1]
    late["relationships_extracted"] = len(late["relationships"])
    return late


def rows_of(answer: dict, content_id: int) -> tuple[list[tuple], list[tuple], tuple]:
    """The rows one application of `answer`, as sent on the wire, must leave: entity rows (one per
    chunk appearance), relationship rows, and the document's KG columns."""
    node = answer["neo4j_document_id"]
    entities = sorted((a["vector_rowid"], content_id, e["text"], e["normalized"], e["type_primary"], e["type_sub1"],
                       e["type_sub2"], e["type_sub3"], e["confidence"], a["offset_start"], a["offset_end"], node,
                       int(e["spans_multiple_chunks"]))
                      for e in answer["entities"] for a in e["chunk_appearances"])
    relationships = sorted((content_id, r["subject_text"], r["predicate"], r["object_text"], r["confidence"],
                            r["context"], r["neo4j_relationship_id"], int(r["spans_chunks"]), r["chunk_rowids"])
                           for r in answer["relationships"])
    document = (1, len(answer["entities"]), len(answer["relationships"]), node)
    return entities, relationships, document


def rows_in(conn, content_id: int) -> tuple[list[tuple], list[tuple], tuple]:
    """The same three, as the database holds them."""
    entities = sorted(conn.execute(
        "SELECT chunk_rowid, content_id, entity_text, entity_normalized, entity_type_primary, entity_type_sub1, "
        "entity_type_sub2, entity_type_sub3, confidence, offset_start, offset_end, neo4j_node_id, "
        "spans_multiple_chunks FROM chunk_entities WHERE content_id = ?", (content_id,)).fetchall())
    relationships = sorted(row[:-1] + (json.loads(row[-1]),) for row in conn.execute(
        "SELECT content_id, subject_entity, predicate, object_entity, confidence, context, neo4j_relationship_id, "
        "spans_chunks, chunk_rowids FROM chunk_relationships WHERE content_id = ?", (content_id,)).fetchall())
    document = conn.execute("SELECT kg_processed, kg_entity_count, kg_relationship_count, kg_document_id "
                            "FROM crawled_content WHERE id = ?", (content_id,)).fetchone()
    return entities, relationships, tuple(document)


def queue_row(conn, content_id: int) -> tuple:
    return conn.execute("SELECT status, processed_at, result_summary, retry_count, lease_token "
                        "FROM kg_processing_queue WHERE content_id = ?", (content_id,)).fetchone()


def test_a_late_answer_from_a_worker_whose_lease_was_taken_over_commits_nothing(
        conn, db_path, fault_server, supervisor):
    (content_id,) = seed(conn, 1)
    gate = threading.Event()
    sent: dict[int, dict] = {}

    def first_answer_late(payload: dict, n: int) -> tuple[int, dict]:
        if n == 0:  # the first worker's request: answered only once the document is done elsewhere
            gate.wait(60)
        sent[n] = late_variant(extract(payload)) if n == 0 else extract(payload)
        return 200, sent[n]

    server = fault_server(first_answer_late)
    # A short lease, and no hang kill: the stopped worker must live to get its answer.
    sup = supervisor("--db", db_path, "--service-url", server.url, "--workers", "2", "--batch-size", "1",
                     "--adaptive", "off", env={"KG_LEASE_SECONDS": "2", "KG_HANG_TIMEOUT": "600"})
    sup.wait_workers(2)
    wait_for(lambda: len(server.requests) == 1, 30, message="the document in flight")
    (owner,) = claims(conn)
    late_pid = int(owner.rsplit(":", 1)[1])
    os.kill(late_pid, signal.SIGSTOP)  # its lease keeper stops too: the lease runs out

    try:
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 30, message="the other worker completed it")
        assert len(server.requests) == 2 and "put 1 row(s) with expired leases back to pending" in sup.text()
        completed_row = queue_row(conn, content_id)
        gate.set()
    finally:
        os.kill(late_pid, signal.SIGCONT)
    late_lines = f" pid {late_pid} content_id={content_id}] "

    def late_outcome() -> str | None:
        """The late worker's line about its answer: dropped, as it must be, or written."""
        return next((line for line in sup.text().splitlines() if late_lines in line
                     and ("its answer was dropped" in line or "completed:" in line)), None)

    outcome = wait_for(late_outcome, 30, message="the late worker's answer arriving")

    assert rows_in(conn, content_id) == rows_of(sent[1], content_id), "exactly the answer that completed it"
    assert rows_of(sent[0], content_id) != rows_of(sent[1], content_id), "the late answer would show"
    assert queue_row(conn, content_id) == completed_row, "completed once, by the worker that held the lease"
    assert completed_row[0] == "completed" and completed_row[3] == 0 and completed_row[4] is None
    assert len(server.requests) == 2, "neither worker sent it again"
    (queue_id,) = conn.execute("SELECT id FROM kg_processing_queue WHERE content_id = ?", (content_id,)).fetchone()
    assert outcome.endswith(f"queue row {queue_id} (content_id {content_id}) is no longer held by this worker; "
                            "its answer was dropped"), outcome
    assert late_pid in sup.workers(), "the late worker lives on"
    sup.stop()
