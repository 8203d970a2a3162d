"""A stuck worker explains itself: `kgsupervisor dump` shows where each worker of a running
supervisor is, and a worker killed for a missed heartbeat leaves its stack in the log first.
Real supervisors and workers, real signals, the real py-spy (the `test` extra installs it)."""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import requests

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
    """The heartbeat comes from the lease keeper thread: a worker is hung when that thread stops
    while the main thread can still run Python, and its faulthandler answers."""
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
