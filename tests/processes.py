"""The suite's one process harness: a `kgsupervisor` command (or any program) as a real process in its
own process group, its output in a log file the test reads while it runs; wait on that log, send
signals, stop it and reap its group, and kill at teardown whatever a test left running."""
from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import psutil

KGSUPERVISOR = [sys.executable, "-m", "kgsupervisor"]
# Retries and leases short enough that a document put back comes round again within a test.
FAST = {"KG_RETRY_BACKOFF": "0.05", "KG_RETRY_BACKOFF_MAX": "0.2", "KG_LEASE_SECONDS": "10"}


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> object:
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def read_log(path: str | os.PathLike) -> str | None:
    """The text of the log file at `path` so far; None while it does not exist."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def wait_for_log(path: str | os.PathLike, text: str, count: int = 1, timeout: float = 30.0) -> str:
    """Wait until the log file at `path` holds `text` at least `count` times; returns the log."""
    def log_with_text() -> str | None:
        log = read_log(path)
        return log if log is not None and log.count(text) >= count else None
    return wait_for(log_with_text, timeout, message=f"{text!r} (x{count}) in {path}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The test run's environment with `env` on top; output unbuffered, so a log shows each line
    as it is written."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def kgsupervisor_command(args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The command line of `kgsupervisor ARGS`. Tests run supervisors side by side: a `run` gets
    a status endpoint on a free port unless it names an address of its own."""
    if args[:1] == ["run"] and "--status-addr" not in args and "KG_STATUS_ADDR" not in (env or {}):
        args = args + ["--status-addr", "127.0.0.1:0"]
    return KGSUPERVISOR + args


def spawn(args: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """Start a kgsupervisor command in its own session, its stdout and stderr on pipes the test
    reads (a line at a time, or all of them at the exit)."""
    return subprocess.Popen(kgsupervisor_command(args, env), env=process_env(env), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def run_to_exit(*args: str, env: dict[str, str] | None = None, timeout: float = 60.0, user: int | None = None
                ) -> subprocess.CompletedProcess:
    """Run `kgsupervisor ARGS` to its exit (as uid and gid `user`, through setpriv, when given);
    its output captured."""
    as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run(as_user + KGSUPERVISOR + list(args), capture_output=True, text=True,
                          timeout=timeout, env=process_env(env))


def kill_group(proc: Process | subprocess.Popen) -> None:
    """SIGKILL the process group of `proc` if its leader still runs, and reap the leader. Once
    the leader is reaped its pid may be reused, so a group whose leader is gone is left alone."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def kill_groups(procs: Iterable[Process | subprocess.Popen]) -> None:
    """Teardown: SIGKILL the process group of every process still running, and reap it."""
    for proc in procs:
        kill_group(proc)


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


def worker_pids(proc: Process | subprocess.Popen) -> set[int]:
    """The supervisor's worker processes, by the name the supervisor gives them."""
    return children_named(proc.pid, "kgs-worker-")


class Process:
    """A real process in its own process group (session). Its output goes to the file `log`: a
    pipe nobody reads fills up and blocks every worker's logging. `popen` may put stdin or stdout
    on a pipe instead (stderr always goes to the log)."""

    def __init__(self, command: list[str], log: str | os.PathLike, env: dict[str, str] | None = None,
                 name: str = "process", **popen) -> None:
        self.name = name
        self.log = pathlib.Path(log)
        with self.log.open("w") as out:
            popen.setdefault("stdout", out)
            self.popen = subprocess.Popen(command, env=process_env(env), start_new_session=True,
                                          stderr=out, **popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    @property
    def output(self) -> str:
        """What it has logged so far."""
        return read_log(self.log) or ""

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code, once it exits (subprocess.TimeoutExpired after `timeout` seconds)."""
        return self.popen.wait(timeout)

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 30.0) -> str:
        """Wait until its log holds `text` `count` times; returns the log."""
        return wait_for_log(self.log, text, count, timeout)

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process itself, if it still runs."""
        if self.poll() is None:
            os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        """Send `sig` to its whole process group, as a terminal does on Ctrl-C."""
        os.killpg(self.pid, sig)

    def children(self, prefix: str) -> set[int]:
        """Its live children whose process name starts with `prefix`."""
        return children_named(self.pid, prefix)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 30.0) -> str:
        """Send `sig` (None: nothing, it exits by itself) and wait for the exit; returns the log.
        One still running after `timeout` seconds is killed with its group and fails the test."""
        if sig is not None:
            self.send_signal(sig)
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s") from None
        return self.output

    def kill(self) -> None:
        """SIGKILL its whole process group if it still runs, reap it, and close its pipes."""
        kill_group(self.popen)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):  # unread input to a dead process
                    pipe.close()


class Processes:
    """The processes one test starts, each logging to its own file in `log_dir`, so that its
    teardown (kill_all) can kill whatever is still running."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = pathlib.Path(log_dir)
        self.started: list[Process] = []

    def start(self, command: list[str], name: str, env: dict[str, str] | None = None, **popen) -> Process:
        """Start `command`, logging to `name`.log (a second one of that name to `name`-2.log)."""
        self.log_dir.mkdir(exist_ok=True)
        log, n = self.log_dir / f"{name}.log", 1
        while log.exists():
            n += 1
            log = self.log_dir / f"{name}-{n}.log"
        self.started.append(Process(command, log, env, name=name, **popen))
        return self.started[-1]

    def kgsupervisor(self, args: list[str], env: dict[str, str] | None = None, name: str = "supervisor",
                     **popen) -> Process:
        """Start `kgsupervisor ARGS` (a `run` gets a free status port unless it names one)."""
        return self.start(kgsupervisor_command(args, env), name, env, **popen)

    def supervisor(self, db_path: str, service_url: str, *args: str, env: dict[str, str] | None = None,
                   name: str = "supervisor") -> Process:
        """Start `kgsupervisor run` on `db_path` for fast tests: polls every 0.2 s, FAST retries."""
        command = ["run", "--db", db_path, "--service-url", service_url, "--poll-interval", "0.2", *args]
        return self.kgsupervisor(command, env={**FAST, **(env or {})}, name=name)

    def kill_all(self) -> None:
        """Teardown: kill every process still running with its whole group."""
        for process in self.started:
            process.kill()

