"""A stuck worker explains itself: `kgsupervisor dump` shows where each worker of a running
supervisor is, and a worker killed for a missed heartbeat leaves its stack in the log first.
Real supervisors and workers, real signals, the real py-spy (the `test` extra installs it)."""
from __future__ import annotations

import ctypes
import errno
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import requests

from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.pool.stacks import capture_stack, find_py_spy

from .conftest import held_until, seed, status_counts
from .processes import free_port, run_to_exit, wait_for, worker_pids

PTRACE_ATTACH, PTRACE_DETACH = 16, 17
WAIT_ALL = 0x40000000  # __WALL: wait for a traced thread as for a child


def holder_of(db_path: str, content_id: int) -> int:
    """The pid of the worker whose lease the document's queue row is under."""
    import sqlite3
    conn = sqlite3.connect(db_path, timeout=10)
    try:
        (owner,) = conn.execute("SELECT lease_owner FROM kg_processing_queue WHERE content_id = ?",
                                (content_id,)).fetchone()
    finally:
        conn.close()
    return int(owner.rsplit(":", 1)[1])


def listed_holding(status_addr: str, content_id: int) -> bool:
    """The status endpoint lists a worker holding `content_id` (it publishes once a second)."""
    try:
        details = requests.get(f"http://{status_addr}/health", timeout=5).json()["worker_details"]
    except requests.RequestException:
        return False
    return any(d["current_content_id"] == content_id for d in details)


def sections(dump: str) -> dict[int, str]:
    """pid -> its part of `dump`'s output: its header line and the stack under it."""
    parts = re.split(r"^(?=worker \d+ \(pid \d+\))", dump, flags=re.MULTILINE)
    return {int(re.match(r"worker \d+ \(pid (\d+)\)", p).group(1)): p for p in parts if p.strip()}


def logged_stack(log: str, header: str) -> str:
    """The stack lines the supervisor logged under `header`, up to its next log line."""
    after = log[log.index(header) + len(header):]
    return re.split(r"^\d{4}-\d\d-\d\d ", after, maxsplit=1, flags=re.MULTILINE)[0]


def hung_attempt_stack(conn, content_id: int) -> str:
    """The stack recorded with the document's one attempt that ended `hung`."""
    rows = conn.execute("SELECT stack FROM kg_processing_attempts WHERE content_id = ? AND outcome = 'hung'",
                        (content_id,)).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


def test_dump_shows_each_workers_stack_and_the_document_it_holds(conn, db_path, fault_server, processes,
                                                                  tmp_path):
    gate = threading.Event()
    server = fault_server(held_until(gate))
    (content_id,) = seed(conn, 1)
    status_addr, pidfile = f"127.0.0.1:{free_port()}", str(tmp_path / "kgs.pid")
    sup = processes.supervisor(db_path, server.url, "--workers", "2", "--pidfile", pidfile,
                               "--status-addr", status_addr)
    try:
        wait_for(lambda: len(server.requests) == 1, 20, message="the document in flight")
        wait_for(lambda: listed_holding(status_addr, content_id), 20, message="its holder in the status")
        workers = worker_pids(sup)
        holder = holder_of(db_path, content_id)
        (idle,) = workers - {holder}
        through_pidfile = run_to_exit("dump", "--pidfile", pidfile, "--status-addr", status_addr)
        through_status = run_to_exit("dump", "--status-addr", status_addr)
        assert worker_pids(sup) == workers, "a worker asked for its stack must go on running"
        # Each worker unlinked its stack file at once: nothing of it is left in the temporary
        # directory, however the worker ends, and `dump` read it through the worker's descriptor.
        left = [glob.glob(f"{tempfile.gettempdir()}/kgsupervisor-{pid}-*") for pid in workers]
        assert left == [[], []], left
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 20, message="the held document completed")
    finally:
        gate.set()
        log = sup.stop()
    assert sup.returncode == 0, log
    for done in (through_pidfile, through_status):
        assert done.returncode == 0, done.stderr
        shown = sections(done.stdout)
        assert set(shown) == workers, done.stdout
        assert f"(pid {holder}) holding content_id {content_id}; its stack (faulthandler):" in shown[holder]
        assert f"(pid {idle}) holding no document; its stack (faulthandler):" in shown[idle]
        for text in shown.values():  # the lease keeper, beside the main thread
            assert re.search(r'File ".*kgsupervisor/worker/lease\.py", line \d+ in run', text), text
        # The holder's main thread is inside the document's request; the idle one is not.
        assert "kgsupervisor/worker/document.py" in shown[holder] and "document.py" not in shown[idle]


def test_dump_without_a_supervisor_says_so_in_one_line(tmp_path):
    for args in (["--pidfile", str(tmp_path / "none.pid")], ["--status-addr", f"127.0.0.1:{free_port()}"]):
        done = run_to_exit("dump", *args)
        assert done.returncode == 1 and done.stdout == "", done
        assert len(done.stderr.splitlines()) == 1 and done.stderr.startswith("Error: "), done.stderr


def test_a_stopped_worker_leaves_its_stack_in_the_log_before_the_hang_kill(conn, db_path, fault_server,
                                                                          processes):
    gate = threading.Event()
    server = fault_server(held_until(gate))
    (content_id,) = seed(conn, 1)
    sup = processes.supervisor(db_path, server.url, "--workers", "1", env={"KG_HANG_TIMEOUT": "2"})
    try:
        wait_for(lambda: len(server.requests) == 1, 20, message="the document in flight")
        holder = holder_of(db_path, content_id)
        os.kill(holder, signal.SIGSTOP)  # no Python runs in it: faulthandler cannot answer
        header = f"worker 0 (pid {holder}) hung holding content_id {content_id}; its stack (py-spy):\n"
        sup.wait_for_log(f"released 1 claim(s) of worker pid {holder}")
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 20, message="the document completed")
    finally:
        gate.set()
        log = sup.stop()
    assert f"worker 0 (pid {holder}) hung: no heartbeat for" in log
    stack = logged_stack(log, header)
    assert f'Thread {holder} (idle): "MainThread"' in stack, stack
    assert re.search(r"run \(kgsupervisor/worker/lease\.py:\d+\)", stack), stack
    assert re.search(r"\(kgsupervisor/worker/document\.py:\d+\)", stack), stack
    assert hung_attempt_stack(conn, content_id) == stack.rstrip("\n")


def lease_keeper_thread(pid: int) -> int:
    """The thread id of worker `pid`'s lease keeper, the thread that beats its heartbeat, as
    py-spy names it (the kernel knows threads by number only)."""
    dump = subprocess.run([find_py_spy(), "dump", "--pid", str(pid), "--nonblocking"], capture_output=True,
                          text=True, timeout=60).stdout
    return int(re.search(r'^Thread (\d+) \([^)]*\): "lease-keeper"$', dump, flags=re.MULTILINE).group(1))


@contextmanager
def thread_stopped(tid: int) -> Iterator[None]:
    """Thread `tid` held in a ptrace stop while its process's other threads run on. At the end
    it is let go or, if it was killed meanwhile, reaped: until it is, its process cannot be
    reaped by its parent."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(PTRACE_ATTACH, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), f"cannot ptrace thread {tid}")
    os.waitpid(tid, WAIT_ALL)  # it is in its stop now
    try:
        yield
    finally:
        if libc.ptrace(PTRACE_DETACH, tid, None, None) != 0 and ctypes.get_errno() == errno.ESRCH:
            os.waitpid(tid, WAIT_ALL)  # killed: its exit is ours to collect


def test_a_worker_whose_heartbeat_thread_stopped_leaves_its_stack_in_the_log(conn, db_path, fault_server,
                                                                             processes):
    """While the main thread waits in a request, only the lease keeper thread beats (the main
    thread beats as it makes progress): when the keeper stops, the worker is hung though its
    main thread can still run Python, so its faulthandler answers."""
    gate = threading.Event()
    server = fault_server(held_until(gate))
    (content_id,) = seed(conn, 1)
    sup = processes.supervisor(db_path, server.url, "--workers", "1", env={"KG_HANG_TIMEOUT": "2"})
    try:
        wait_for(lambda: len(server.requests) == 1, 20, message="the document in flight")
        holder = holder_of(db_path, content_id)
        header = f"worker 0 (pid {holder}) hung holding content_id {content_id}; its stack (faulthandler):\n"
        with thread_stopped(lease_keeper_thread(holder)):
            sup.wait_for_log(header)
        sup.wait_for_log(f"released 1 claim(s) of worker pid {holder}")
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 20, message="the document completed")
    finally:
        gate.set()
        log = sup.stop()
    assert f"worker 0 (pid {holder}) hung: no heartbeat for" in log
    stack = logged_stack(log, header)
    # The main thread answered (it handles the signal) from inside the document's request ...
    main = stack[stack.index("Current thread"):]
    assert re.search(r'File ".*kgsupervisor/worker/document\.py", line \d+ in ', main), stack
    # ... and the stopped keeper thread is shown where it stopped.
    assert re.search(r'File ".*kgsupervisor/worker/lease\.py", line \d+ in run', stack), stack
    assert hung_attempt_stack(conn, content_id) == stack.rstrip("\n")


def test_without_py_spy_a_stopped_process_gets_a_line_saying_why_there_is_no_stack(processes):
    sleeper = processes.start([sys.executable, "-c", "import time; time.sleep(600)"], "sleeper")
    wait_for(lambda: psutil.Process(sleeper.pid).status() == psutil.STATUS_SLEEPING, 20, message="it sleeps")
    os.kill(sleeper.pid, signal.SIGSTOP)
    wait_for(lambda: psutil.Process(sleeper.pid).status() == psutil.STATUS_STOPPED, 20, message="stopped")
    without = capture_stack(sleeper.pid, py_spy=lambda: None)
    assert without.source == "none"
    assert without.text == ("no stack: the process is stopped and py-spy is not installed "
                            "(pip install 'kgsupervisor[debug]')")
    with_it = capture_stack(sleeper.pid)
    assert with_it.source == "py-spy" and f"Thread {sleeper.pid} (idle)" in with_it.text, with_it.text
    assert "<module> (<string>:1)" in with_it.text, with_it.text


HANG_TIMEOUT = 2.0
# The spinning worker's: json's decoding of the answer (a C call holding the GIL, about a fifth
# of its parse) must end well within it, the validation loop after it well outlast it.
SPIN_HANG_TIMEOUT = 3.0


def answer_with_places(content_id: int, rowid: int, places: int) -> bytes:
    """A valid answer whose one entity appears `places` times in chunk `rowid`: quick to decode
    (json's C code), slow to validate (a Python loop over the places, answer._parse_appearances)."""
    head = json.dumps({"success": True, "content_id": content_id, "neo4j_document_id": "d",
                       "relationships": []})[:-1].encode()
    place = b'{"vector_rowid": %d}' % rowid
    return (head + b', "entities": [{"text": "everywhere", "chunk_appearances": ['
            + b", ".join([place] * places) + b"]}]}")


def places_to_parse_for(seconds: float, sample: float = 1.0) -> int:
    """How many places make parse_answer take `seconds` on this machine now (a worker under the
    same load takes about as long): a calibration, grown until it takes `sample` seconds, then
    scaled. The parse is linear in the places (a place costs a little more in a longer answer,
    so the scaled answer takes no less), and parsing the whole answer here would double the wait."""
    places = 100_000
    while True:
        body = answer_with_places(1, 1, places)
        started = time.perf_counter()
        parse_answer(body, content_id=1, chunk_rowids={1}, max_bytes=len(body))
        took = time.perf_counter() - started
        if took >= min(sample, seconds):
            return math.ceil(places * max(1.0, seconds / took))
        places = int(places * min(10.0, max(1.5, 1.2 * sample / took)))


def test_a_worker_spinning_in_python_is_killed_as_hung_and_leaves_its_stack(conn, db_path, fault_server,
                                                                           processes):
    """Its lease keeper goes on beating, but with the main thread's progress: an answer whose
    validation keeps the main thread in a Python loop past the hang timeout ages the heartbeat,
    and the worker is killed as hung with the stack of that loop."""
    places = places_to_parse_for(2 * SPIN_HANG_TIMEOUT)
    size_mb = math.ceil(len(answer_with_places(1, 1, places)) / 2**20) + 1

    def slow_to_validate_once(payload: dict, n: int):
        if n == 0:
            rowid = payload["chunks"][0]["vector_rowid"]
            return 200, answer_with_places(payload["content_id"], rowid, places)
        return None  # the replacement worker gets the reference answer

    server = fault_server(slow_to_validate_once)
    (content_id,) = seed(conn, 1)
    sup = processes.supervisor(db_path, server.url, "--workers", "1",
                               env={"KG_HANG_TIMEOUT": f"{SPIN_HANG_TIMEOUT:g}",
                                    "KG_MAX_ANSWER_MB": str(size_mb)})
    try:
        wait_for(lambda: len(server.requests) == 1, 20, message="the document in flight")
        holder = holder_of(db_path, content_id)
        header = f"worker 0 (pid {holder}) hung holding content_id {content_id}; its stack (faulthandler):\n"
        sup.wait_for_log(f"released 1 claim(s) of worker pid {holder}", timeout=90)
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 30, message="the document completed")
    finally:
        log = sup.stop()
    assert f"worker 0 (pid {holder}) hung: no heartbeat for" in log
    stack = logged_stack(log, header)
    # Caught in the validation loop (json's decoding, a C call that would stop the keeper's
    # beats too, is over by then), with the keeper thread beside it.
    assert re.search(r'File ".*kgsupervisor/kg/answer\.py", line \d+ in _parse_appearances', stack), stack
    assert re.search(r'File ".*kgsupervisor/worker/document\.py", line \d+ in process', stack), stack
    assert re.search(r'File ".*kgsupervisor/worker/lease\.py", line \d+ in run', stack), stack
    assert hung_attempt_stack(conn, content_id) == stack.rstrip("\n")


def heartbeat_ages(status_addr: str) -> list[float]:
    """The heartbeat age of each worker, as the status endpoint shows it (empty while it cannot)."""
    try:
        details = requests.get(f"http://{status_addr}/health", timeout=5).json()["worker_details"]
    except requests.RequestException:
        return []
    return [d["heartbeat_age"] for d in details if d["heartbeat_age"] is not None]


def test_a_worker_waiting_on_a_long_request_keeps_its_heartbeat_and_is_not_killed(conn, db_path, fault_server,
                                                                                  processes):
    """A request is a wait bounded by its own deadline (KG_SERVICE_TIMEOUT): held for three hang
    timeouts, the worker's heartbeat stays fresh and it keeps its document."""
    gate = threading.Event()
    server = fault_server(held_until(gate))
    (content_id,) = seed(conn, 1)
    status_addr = f"127.0.0.1:{free_port()}"
    sup = processes.supervisor(db_path, server.url, "--workers", "1", "--status-addr", status_addr,
                               env={"KG_HANG_TIMEOUT": f"{HANG_TIMEOUT:g}"})
    ages: list[float] = []
    try:
        wait_for(lambda: len(server.requests) == 1, 20, message="the document in flight")
        holder = holder_of(db_path, content_id)
        held_since = time.monotonic()

        def watched_for_three_hang_timeouts() -> bool:
            ages.extend(heartbeat_ages(status_addr))
            return time.monotonic() - held_since > 3 * HANG_TIMEOUT
        wait_for(watched_for_three_hang_timeouts, 30, interval=0.2,
                 message="three hang timeouts in the request")
        assert worker_pids(sup) == {holder} and holder_of(db_path, content_id) == holder
        gate.set()
        wait_for(lambda: status_counts(conn) == {"completed": 1}, 20, message="the held document completed")
    finally:
        gate.set()
        log = sup.stop()
    assert sup.returncode == 0, log
    assert f"(pid {holder}) hung" not in log
    assert ages and max(ages) < HANG_TIMEOUT, ages
