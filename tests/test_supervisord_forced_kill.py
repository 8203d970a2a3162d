"""The shipped supervisord section's `killasgroup=true`, under a real supervisord: when a stop
runs out of time, the SIGKILL reaches every worker too, so none is left behind (issue 21)."""
from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator

import psutil
import pytest

from .conftest import seed, status_counts, wait_for
from .faultserver import FaultServer
from .test_supervisord import program_section, running_supervisord
from .processes import children_named

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

STOPWAITSECS = 3


def forced_kill_section(db_path: str, url: str, tmp: pathlib.Path) -> str:
    """The shipped section, but with a stop that cannot finish in time: a drain allowed 60 s,
    supervisord waiting only STOPWAITSECS, and no hang kill to free the workers meanwhile; one
    document a claim, so that each worker holds one."""
    section = program_section(db_path, url, tmp)
    section = re.sub(r"(?m)^stopwaitsecs=.*$", f"stopwaitsecs={STOPWAITSECS}", section)
    section = re.sub(r'KG_DRAIN_TIMEOUT="\d+"',
                     'KG_DRAIN_TIMEOUT="60",KG_HANG_TIMEOUT="600",KG_BATCH_SIZE="1",KG_ADAPTIVE="off"', section)
    assert f"stopwaitsecs={STOPWAITSECS}\n" in section and 'KG_HANG_TIMEOUT="600"' in section, section
    return section


@pytest.fixture
def supervisord(tmp_path, db_path, fault_server) -> Iterator[tuple[Callable[..., subprocess.CompletedProcess],
                                                                   pathlib.Path, FaultServer, threading.Event]]:
    """A real supervisord running the forced-kill section against a KG service that holds the
    first two documents until the gate opens; yields (supervisorctl, its directory, the
    service, the gate)."""
    gate = threading.Event()

    def first_two_held(payload: dict, n: int) -> None:
        if n < 2:
            gate.wait(60)

    server = fault_server(first_two_held)
    with running_supervisord(tmp_path, forced_kill_section(db_path, server.url, tmp_path)) as ctl:
        try:
            yield ctl, tmp_path, server, gate
        finally:
            gate.set()


def workers_of(pid: int) -> set[int]:
    return children_named(pid, "kgs-worker-")


def survivors(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a killed orphan may stay a zombie until init reaps it)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.Error:
            pass
    return alive


def claims(conn) -> dict[str, str]:
    """lease_owner -> status of every claimed row."""
    return dict(conn.execute("SELECT lease_owner, status FROM kg_processing_queue WHERE lease_owner IS NOT NULL"))


def test_a_stop_that_runs_out_of_time_kills_every_worker_with_the_supervisor(supervisord, conn):
    ctl, tmp, server, gate = supervisord
    pid = int(ctl("pid", "kgsupervisor").stdout.strip())
    wedged = wait_for(lambda: workers_of(pid) if len(workers_of(pid)) == 2 else None, 20, message="two workers")
    seed(conn, 2)
    wait_for(lambda: len(server.requests) == 2, 20, message="a document in flight in each worker")
    held = claims(conn)
    assert held == {f"{socket.gethostname()}:{worker}": "processing" for worker in wedged}, held
    # Wedged workers cannot drain. A worker that outlives its supervisor gives its claims back
    # and exits by itself (and the kernel wakes stopped members of an orphaned process group):
    # claims still held after the stop prove that the SIGKILL itself ended every worker.
    for worker in wedged:
        os.kill(worker, signal.SIGSTOP)
    try:
        out = ctl("stop", "kgsupervisor")
        assert "stopped" in out.stdout, out.stdout + out.stderr
        assert "stopped: kgsupervisor (terminated by SIGKILL)" in (tmp / "supervisord.log").read_text(), \
            "supervisord had to force the stop"
        wait_for(lambda: not survivors(wedged | {pid}), 10, message=f"no worker of {sorted(wedged)} left running")
        assert claims(conn) == held, "no worker lived past the kill long enough to give its document back"
    finally:
        for worker in survivors(wedged):  # only when the claim is broken: leave nothing behind
            os.kill(worker, signal.SIGKILL)

    gate.set()
    assert "started" in ctl("start", "kgsupervisor").stdout
    wait_for(lambda: status_counts(conn) == {"completed": 2}, 30, message="the killed tree's documents completed")
    log = (tmp / "kgsupervisor.log").read_text()
    for owner in held:
        assert f"released 1 claim(s) of dead process {owner} left by an earlier run" in log, log
