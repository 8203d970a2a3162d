"""The shipped supervisord program section, run for real by an unprivileged supervisord."""
from __future__ import annotations

import configparser
import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from .conftest import free_port, seed, status_counts, wait_for, wait_for_log
from .processes import children_named

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

SHIPPED = pathlib.Path(__file__).parent.parent / "conf" / "supervisord.conf"
BIN = pathlib.Path(sys.executable).parent


def program_section(db_path: str, url: str, tmp: pathlib.Path) -> str:
    """The shipped section with this machine's paths; every semantic option kept as shipped."""
    parser = configparser.RawConfigParser()
    parser.read(SHIPPED)
    program = dict(parser["program:kgsupervisor"])
    program["command"] = (f"{sys.executable} -m kgsupervisor run --log-format json "
                          f"--status-addr 127.0.0.1:{free_port()} --poll-interval 0.2")
    program["environment"] = f'KG_DB_PATH="{db_path}",KG_SERVICE_URL="{url}",KG_DRAIN_TIMEOUT="20"'
    program["directory"] = str(tmp)
    program["stdout_logfile"] = str(tmp / "kgsupervisor.log")
    program.pop("user")
    for kept in ("stopsignal", "stopwaitsecs", "stopasgroup", "killasgroup", "autorestart", "exitcodes"):
        assert kept in program
    return "[program:kgsupervisor]\n" + "\n".join(f"{k}={v}" for k, v in program.items())


@contextlib.contextmanager
def running_supervisord(tmp_path: pathlib.Path, program: str) -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    """An unprivileged supervisord in tmp_path running `program` (a [program:kgsupervisor]
    section), until it is RUNNING; yields supervisorctl, and shuts supervisord down after."""
    if shutil.which("supervisord", path=str(BIN)) is None:
        pytest.fail("supervisord is not installed: the test extras must install `supervisor`")
    sock = tmp_path / "supervisor.sock"
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"""
[unix_http_server]
file={sock}
[supervisord]
nodaemon=true
logfile={tmp_path}/supervisord.log
pidfile={tmp_path}/supervisord.pid
childlogdir={tmp_path}
[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
[supervisorctl]
serverurl=unix://{sock}
{program}
""")
    proc = subprocess.Popen([str(BIN / "supervisord"), "-c", str(conf)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", str(conf), *args], capture_output=True,
                              text=True, timeout=60)

    try:
        wait_for(lambda: "RUNNING" in ctl("status", "kgsupervisor").stdout, 30, interval=0.2, message="RUNNING")
        yield ctl
    finally:
        ctl("shutdown")
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def supervisord(tmp_path, db_path, fault_server):
    server = fault_server(lambda payload, n: time.sleep(0.3))
    with running_supervisord(tmp_path, program_section(db_path, server.url, tmp_path)) as ctl:
        yield ctl, server, tmp_path


def kgsupervisor_pid(ctl) -> int:
    return int(ctl("pid", "kgsupervisor").stdout.strip())


def workers(pid: int) -> set[int]:
    return children_named(pid, "kgs-worker-")


def test_supervisorctl_stop_drains_with_nothing_in_processing(supervisord, conn):
    ctl, server, tmp = supervisord
    seed(conn, 8)
    wait_for(lambda: status_counts(conn).get("processing", 0) > 0, 20, message="documents in flight")
    out = ctl("stop", "kgsupervisor")
    assert "stopped" in out.stdout, out.stdout + out.stderr
    counts = status_counts(conn)
    assert "processing" not in counts, counts
    assert counts.get("completed", 0) >= 1
    assert conn.execute("SELECT MAX(retry_count) FROM kg_processing_queue").fetchone()[0] == 0
    log = (tmp / "kgsupervisor.log").read_text()
    assert "drained: all workers stopped" in log
    # supervisord shows a stopped program as STOPPED whatever its exit status: its own log
    # says which status the stop ended with.
    stops = wait_for_log(tmp / "supervisord.log", "stopped: kgsupervisor (", timeout=10)
    assert "stopped: kgsupervisor (exit status 0)" in stops, stops


def test_supervisorctl_signal_hup_restarts_the_workers(supervisord, conn):
    ctl, server, tmp = supervisord
    pid = kgsupervisor_pid(ctl)
    before = wait_for(lambda: workers(pid) if len(workers(pid)) == 2 else None, 20, message="two workers")
    out = ctl("signal", "HUP", "kgsupervisor")
    assert "signalled" in out.stdout, out.stdout + out.stderr
    wait_for(lambda: len(workers(pid)) == 2 and not (workers(pid) & before), 20, message="new workers")
    assert kgsupervisor_pid(ctl) == pid, "the supervisor itself was not restarted"
    seed(conn, 4)
    wait_for(lambda: status_counts(conn) == {"completed": 4}, 30, message="work after reload")
    assert "restart #1" in (tmp / "kgsupervisor.log").read_text()
