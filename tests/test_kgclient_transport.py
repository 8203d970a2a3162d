"""The KG client's HTTP transport against real servers on 127.0.0.1: one deadline for a whole
request (an answer trickled a byte at a time cannot hold a worker), Retry-After capped (and
`retry` bringing waiting rows back), and no redirect followed on ingest."""
from __future__ import annotations

import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest
import requests

from kgsupervisor.errors import ItemFailure, ServiceUnavailable
from kgsupervisor.kg.client import HEALTH_MAX_BYTES, INGEST_PATH, HealthVerdict, KGClient
from kgsupervisor.queue.leased import queue_for
from scripts.sampledata import add_documents

from .chaos.harness import record_hostile
from .conftest import seed, status_counts, wait_for
from .faultserver import FaultServer

pytestmark = pytest.mark.timeout(120)

REQUEST_BODY = b'{"content_id": 1}'  # what the servers here answer does not depend on it
TRICKLE_EVERY = 0.2  # seconds between two bytes: far below the 1 s read timeout


class TrickleServer:
    """A raw-socket HTTP server that answers every request one byte every TRICKLE_EVERY seconds.

    `phase="headers"` trickles the whole answer from its status line on; `phase="body"` sends the
    status line and headers at once, then trickles the body. Either would take over a minute.
    `closed_early` is set when a client closes its connection before the last byte. With `tls`
    (a server-side SSLContext) it speaks HTTPS.
    """

    def __init__(self, phase: str, tls: ssl.SSLContext | None = None, healthy: bool = False) -> None:
        self.phase = phase
        self.healthy = healthy  # answer GET /health at once with "healthy" instead of trickling
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.closed_early = threading.Event()
        self.bytes_left: list[int] = []  # per connection closed early: how much was never sent
        threading.Thread(target=self._serve, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        if self.tls:
            conn = self.tls.wrap_socket(conn, server_side=True)
        with conn:
            head = _read_request(conn)
            if self.healthy and head.startswith(b"GET /health"):
                conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 21\r\n'
                             b'Connection: close\r\n\r\n{"status": "healthy"}')
                return
            body = b'{"success": true,' + b" " * 300 + b'"content_id": 1}'
            head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " + b"p" * 300
                    + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
            if self.phase == "body":
                conn.sendall(head)
                self._trickle(conn, body)
            else:
                self._trickle(conn, head + body)

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            try:
                conn.sendall(data[i:i + 1])
            except OSError:
                closed = True
            else:
                closed = _peer_closed(conn, TRICKLE_EVERY)
            if closed:
                self.bytes_left.append(len(data) - i - 1)
                self.closed_early.set()
                return


def _read_request(conn: socket.socket) -> bytes:
    """Read one request: its head (returned), then as many body bytes as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head


def _peer_closed(conn: socket.socket, wait: float) -> bool:
    """Wait up to `wait` (the trickle's pace) for the client to close the connection."""
    readable, _, _ = select.select([conn], [], [], wait)
    if not readable:
        return False
    try:
        return conn.recv(1) == b""
    except OSError:  # reset (or, over TLS, cut without a close_notify)
        return True


@pytest.fixture
def trickle_server():
    servers: list[TrickleServer] = []

    def start(phase: str, tls: ssl.SSLContext | None = None, healthy: bool = False) -> TrickleServer:
        servers.append(TrickleServer(phase, tls, healthy))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def exit_code(pid: int) -> list[int]:
    """[the child's exit code] once it has exited, else [] (without blocking)."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return [os.waitstatus_to_exitcode(status)] if done else []


def deadline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kg-request-deadlines"]


# -- 11: one deadline for the whole request ----------------------------------------------------

@pytest.mark.hostile
@pytest.mark.parametrize("phase, message", [
    ("headers", "KG service did not answer within 1s"),
    ("body", "KG service did not finish its answer within 1s"),
])
def test_a_trickled_answer_is_cut_at_the_deadline_as_an_item_failure(trickle_server, phase, message):
    """A byte every 0.2 s never trips the 1 s read timeout; the 1 s deadline of the whole request
    cuts the connection long before the answer would end."""
    server = trickle_server(phase)
    client = KGClient(server.url, read_timeout=1.0)
    try:
        with pytest.raises(ItemFailure, match=message) as caught:
            client.ingest(1, REQUEST_BODY, {1}, retry_blips=False)
    finally:
        client.close()
    assert type(caught.value) is ItemFailure  # a timeout, charged like today's read timeout
    assert server.closed_early.wait(10), "the server never saw the client close the connection"
    assert server.bytes_left[0] > 0
    record_hostile(f"an answer trickled one byte every 0.2 s from its {'status line' if phase == 'headers' else 'body'}"
                   " on (timeout 1 s)",
                   f'cut at the 1 s deadline of the whole request: "{message}"', "yes (as a timeout)")


def test_a_trickled_answer_over_tls_is_cut_too(trickle_server, tmp_path, monkeypatch):
    """HTTPS: the deadline shuts down the socket under the TLS layer the reading thread uses."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-keyout", key,
                    "-out", cert, "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = trickle_server("body", tls=context)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)  # read when the client is built
    client = KGClient(server.url, read_timeout=1.0)
    try:
        with pytest.raises(ItemFailure, match="did not finish its answer within 1s"):
            client.ingest(1, REQUEST_BODY, {1}, retry_blips=False)
    finally:
        client.close()
    assert server.closed_early.wait(10), "the server never saw the client close the connection"


def test_requests_within_the_deadline_share_one_watchdog_thread_that_close_ends(fault_server):
    """Deadlines cost no thread per request: one watchdog serves them all, and close() ends it.

    Counted by identity, not by the number of such threads alive: a client an earlier test
    closed may still be ending its own."""
    server = fault_server(lambda payload, n: (200, b'"not an answer"'))
    client = KGClient(server.url, read_timeout=5.0)
    before = set(deadline_threads())
    for _ in range(20):
        assert client._post_once(REQUEST_BODY) == b'"not an answer"'
    started = [t for t in deadline_threads() if t not in before]
    assert len(started) == 1, started
    client.close()
    wait_for(lambda: not started[0].is_alive(), message="the watchdog thread to end")


def test_a_client_used_before_a_fork_still_cuts_trickles_in_the_child(trickle_server):
    """The watchdog's thread does not survive fork(): the child starts its own."""
    server = trickle_server("body")
    client = KGClient(server.url, read_timeout=1.0)
    with pytest.raises(ItemFailure):
        client.ingest(1, REQUEST_BODY, {1}, retry_blips=False)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its own request was cut too
        try:
            client.ingest(1, REQUEST_BODY, {1}, retry_blips=False)
        except ItemFailure:
            os._exit(0)
        except BaseException:  # noqa: BLE001 - anything else is a failure the parent reports
            pass
        os._exit(1)
    try:
        (code,) = wait_for(lambda: exit_code(pid), timeout=30, message="the forked child's request to be cut")
    except BaseException:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise
    finally:
        client.close()
    assert code == 0


# -- 4: Retry-After capped, `retry` makes waiting rows due ---------------------------------------

@pytest.mark.parametrize("value, on_429, on_503", [
    ("12", 12.0, 12.0),
    ("1e300", 30.0, 30.0),
    ("Fri, 31 Dec 9999 23:59:59 GMT", 30.0, 30.0),
    ("inf", 1.0, None),
    ("nan", 1.0, None),
    ("-5", 1.0, None),
    ("Wed, 21 Oct 99999 07:28:00 GMT", 1.0, None),  # a year Python cannot hold
    ("Wed, 21 Oct 2015 07:28:00 -0000", 1.0, 0.0),  # a past date without a zone: now
])
def test_retry_after_is_capped_and_must_be_a_finite_time(fault_server, value, on_429, on_503):
    """Capped at the client's max_retry_after (KG_RETRY_BACKOFF_MAX); not a finite time, it is
    ignored: a 429 then waits its default second, a 503 nothing in particular."""
    for status, expected in ((429, on_429), (503, on_503)):
        server = fault_server(lambda payload, n, s=status: (s, {"error": "busy"}, {"Retry-After": value}))
        client = KGClient(server.url, read_timeout=5.0, max_retry_after=30.0)
        try:
            with pytest.raises(ServiceUnavailable) as caught:
                client.ingest(1, REQUEST_BODY, {1}, retry_blips=False)
        finally:
            client.close()
        assert caught.value.retry_after == expected, (status, caught.value.retry_after)


def run_kg(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgsupervisor", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def worker_once(db_path: str, url: str) -> subprocess.CompletedProcess:
    """A real `kgsupervisor worker --once`: one claimed batch, then exit."""
    return run_kg("worker", "--once", "--db", db_path, "--service-url", url, "--batch-size", "1",
                  env={"KG_RETRY_BACKOFF": "0.1", "KG_RETRY_BACKOFF_MAX": "600"})


@pytest.mark.hostile
def test_a_worker_is_never_held_by_a_trickled_answer(conn, db_path, trickle_server):
    """A real worker against a service that trickles its answer (and says healthy): the request
    is cut at KG_SERVICE_TIMEOUT and charged as the timeout it is; the worker goes on."""
    (cid,) = seed(conn, 1)
    server = trickle_server("body", healthy=True)
    done = run_kg("worker", "--once", "--db", db_path, "--service-url", server.url,
                  env={"KG_SERVICE_TIMEOUT": "1", "KG_RETRY_BACKOFF": "0.1"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert server.closed_early.is_set(), "the worker cut the trickle, it did not wait it out"
    row = conn.execute("SELECT status, retry_count, error_message FROM kg_processing_queue WHERE content_id = ?",
                       (cid,)).fetchone()
    assert tuple(row[:2]) == ("pending", 1) and "did not finish its answer within 1s" in row[2], row
    record_hostile("a KG answer trickled one byte every 0.2 s to a real worker (KG_SERVICE_TIMEOUT=1)",
                   "cut at the timeout; charged as a timeout while /health says healthy; the worker goes on",
                   "yes (as a timeout)")


def not_before(conn, content_id: int) -> float | None:
    return conn.execute("SELECT not_before FROM kg_processing_queue WHERE content_id = ?", (content_id,)).fetchone()[0]


@pytest.mark.hostile
@pytest.mark.parametrize("value", ["1e300", "inf", "nan", "Fri, 31 Dec 9999 23:59:59 GMT"])
def test_a_worker_told_to_wait_for_ever_parks_the_document_at_most_the_backoff_max(
        conn, db_path, fault_server, value):
    (cid,) = seed(conn, 1)
    server = fault_server(lambda payload, n: (429, {"error": "slow down"}, {"Retry-After": value}))
    started = time.time()
    proc = worker_once(db_path, server.url)
    finished = time.time()
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "rate limiting (429)" in proc.stderr
    assert status_counts(conn) == {"pending": 1}
    assert conn.execute("SELECT retry_count FROM kg_processing_queue").fetchone()[0] == 0
    assert started < not_before(conn, cid) <= finished + 600
    record_hostile(f"Retry-After: {value} on a 429",
                   "document waits at most KG_RETRY_BACKOFF_MAX (600 s); the worker exits 0, no traceback", "no")


@pytest.mark.hostile
def test_retry_makes_rows_waiting_for_a_retry_after_due_now(conn, db_path, fault_server):
    """`retry --id N` and `retry --pending` clear the wait of pending rows (their attempt counts
    stay); `retry --failed` leaves them waiting. A row made due is claimed at once."""
    first, second = seed(conn, 2)
    busy = fault_server(lambda payload, n: (503, {"error": "overloaded"}, {"Retry-After": "1e300"}))
    for _ in (first, second):
        assert worker_once(db_path, busy.url).returncode == 0
    assert all(not_before(conn, cid) > time.time() + 60 for cid in (first, second))
    conn.execute("UPDATE kg_processing_queue SET retry_count = 2")
    (first_row,) = conn.execute("SELECT id FROM kg_processing_queue WHERE content_id = ?", (first,)).fetchone()

    untouched = run_kg("retry", "--db", db_path, "--failed")
    assert untouched.stdout.strip() == "0 row(s) back to pending"
    assert all(not_before(conn, cid) for cid in (first, second))

    by_id = run_kg("retry", "--db", db_path, "--id", str(first_row))
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout.splitlines() == ["0 row(s) back to pending", "1 pending row(s) due now instead of later"]
    assert not_before(conn, first) is None and not_before(conn, second) > time.time() + 60

    healthy = fault_server()
    assert worker_once(db_path, healthy.url).returncode == 0
    assert [p["content_id"] for p in healthy.requests] == [first]
    assert status_counts(conn) == {"completed": 1, "pending": 1}

    every = run_kg("retry", "--db", db_path, "--pending")
    assert every.stdout.splitlines()[-1] == "1 pending row(s) due now instead of later"
    assert not_before(conn, second) is None
    assert conn.execute("SELECT retry_count FROM kg_processing_queue WHERE content_id = ?",
                        (second,)).fetchone()[0] == 2
    record_hostile("`retry --id N` / `retry --pending` on rows parked by Retry-After: 1e300 on a 503",
                   "made due now and claimed at once, attempt counts kept (`retry --failed` leaves them)", "no")


def test_make_due_clears_the_waits_of_pending_rows_only(backend):
    """By id or all at once; a row not waiting, processing or failed is left as it is."""
    conn = backend.connect()
    try:
        rows = [("pending", 1e300), ("pending", 1e300), ("pending", 1.0), ("processing", 1e300), ("failed", 1e300)]
        for cid, (status, wait_until) in zip(add_documents(conn, len(rows), seed=5), rows):
            conn.execute("INSERT INTO kg_processing_queue (content_id, status, not_before) VALUES (?, ?, ?)",
                         (cid, status, wait_until))
        qids = [r[0] for r in conn.execute("SELECT id FROM kg_processing_queue ORDER BY id").fetchall()]
        queue, now = queue_for(conn), time.time()
        assert queue.make_due(now, ids=[qids[0], qids[2], qids[3], qids[4]]) == 1
        assert queue.make_due(now, every_pending=True) == 1
        assert queue.make_due(now) == 0
        left = [tuple(r) for r in conn.execute("SELECT status, not_before FROM kg_processing_queue ORDER BY id")]
    finally:
        conn.close()
    assert left == [("pending", None), ("pending", None), ("pending", 1.0), ("processing", 1e300), ("failed", 1e300)]


# -- 15: no redirect followed on ingest ----------------------------------------------------------

class Witness:
    """A listening socket that never answers: after the fact, says whether anyone connected."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def connections(self) -> int:
        """Connections made so far (each waits in the backlog until accepted here)."""
        n = 0
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return n
            conn.close()
            n += 1

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def witness():
    w = Witness()
    yield w
    w.close()


def redirecting(status: int, location: str) -> FaultServer:
    return FaultServer(lambda payload, n: (status, {"detail": "moved"}, {"Location": location}))


def test_the_witness_sees_a_client_that_follows_the_redirect(witness):
    """The redirect below is live: a client following it (requests' default) reaches the witness."""
    server = redirecting(307, witness.url + INGEST_PATH)
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(server.url + INGEST_PATH, data=REQUEST_BODY, timeout=(5, 0.3))
    finally:
        server.close()
    assert witness.connections() == 1


@pytest.mark.hostile
@pytest.mark.parametrize("status", [302, 307, 308])
def test_a_redirect_on_ingest_is_an_uncharged_outage_never_followed(conn, db_path, witness, status):
    """The document goes nowhere else and is not charged; the log names where it was sent."""
    (cid,) = seed(conn, 1)
    location = witness.url.replace("http://", "http://kg:s3cret@") + INGEST_PATH
    server = redirecting(status, location)
    try:
        proc = worker_once(db_path, server.url)
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert len(server.requests) >= 1
    assert witness.connections() == 0
    assert conn.execute("SELECT status, retry_count FROM kg_processing_queue").fetchall() == [("pending", 0)]
    assert conn.execute("SELECT kg_processed FROM crawled_content WHERE id = ?", (cid,)).fetchone()[0] == 0
    named = f"KG service redirects {INGEST_PATH} ({status}) to http://***@{witness.url[7:]}{INGEST_PATH}"
    assert named in proc.stderr, proc.stderr
    assert "s3cret" not in proc.stderr and "Traceback" not in proc.stderr
    record_hostile(f"a {status} redirect on ingest to another host",
                   "not followed (the other host never reached): an outage, the document left pending; "
                   "the log names the Location, credentials masked", "no")


def test_a_redirecting_health_check_is_not_healthy(witness):
    server = FaultServer()
    server.httpd.RequestHandlerClass.do_GET = lambda handler: handler._send(
        302, b"", {"Location": witness.url + "/health"})
    client = KGClient(server.url, read_timeout=5.0)
    try:
        assert not client.check_health().answering
    finally:
        client.close()
        server.close()
    assert witness.connections() == 0


def test_a_trickled_health_answer_is_cut_at_its_deadline_and_says_down(trickle_server):
    """Without the deadline this /health would take minutes and then say "answering"."""
    server = trickle_server("body")
    client = KGClient(server.url, read_timeout=5.0, connect_timeout=0.5, health_timeout=1.0)
    try:
        assert client.check_health() is HealthVerdict.DOWN
    finally:
        client.close()
    assert server.closed_early.wait(10), "the server never saw the client close the connection"
    assert server.bytes_left[0] > 0


def test_a_health_answer_over_the_size_limit_says_down():
    server = FaultServer()
    huge = json.dumps({"status": "healthy", "padding": "x" * (HEALTH_MAX_BYTES + 10)}).encode()
    server.httpd.RequestHandlerClass.do_GET = lambda handler: handler._send(200, huge)
    client = KGClient(server.url, read_timeout=5.0)
    try:
        assert client.check_health() is HealthVerdict.DOWN
        server.httpd.RequestHandlerClass.do_GET = lambda handler: handler._send(200, b'{"status": "healthy"}')
        assert client.check_health() is HealthVerdict.HEALTHY
    finally:
        client.close()
        server.close()
