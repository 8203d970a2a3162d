"""Where a worker is: the Python stack of each of its threads, from faulthandler or py-spy, in
bounded time."""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from kgsupervisor.worker.main import STACK_FILE_SUFFIX, STACK_SIGNAL, stack_file_prefix

CAPTURE_TIMEOUT = 2.0  # the supervisor's loop waits this long at most for a stack
FAULTHANDLER_WAIT = 1.0  # a running worker answers within milliseconds; the rest is py-spy's
POLL = 0.01
NOT_RUNNING_PYTHON = (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP)
PY_SPY_HINT = "pip install 'kgsupervisor[debug]'"


def find_py_spy() -> str | None:
    """py-spy beside our interpreter (a virtualenv run without activation), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


@dataclasses.dataclass(frozen=True)
class CapturedStack:
    """A worker's stack as text, and what produced it: faulthandler, py-spy, or none."""

    source: str
    text: str


def capture_stack(pid: int, timeout: float = CAPTURE_TIMEOUT,
                  py_spy: Callable[[], str | None] = find_py_spy) -> CapturedStack:
    """The stacks of worker `pid`'s threads, within `timeout` seconds; else one line why not.

    A running worker dumps its own through faulthandler (STACK_SIGNAL). A stopped one cannot
    run its signal handler: py-spy reads its memory instead, if `py_spy` finds it installed.
    """
    deadline = time.monotonic() + timeout
    status = process_status(pid)
    if status is None:
        return CapturedStack("none", f"no stack: pid {pid} has exited")
    if status in NOT_RUNNING_PYTHON:
        return read_with_py_spy(pid, py_spy(), deadline, "the process is stopped")
    text, why = faulthandler_stack(pid, min(deadline, time.monotonic() + FAULTHANDLER_WAIT))
    if text:
        return CapturedStack("faulthandler", text)
    return read_with_py_spy(pid, py_spy(), deadline, why)


def process_status(pid: int) -> str | None:
    """psutil's status of `pid` ("unknown" if it may not be read); None once it has exited."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return None
    except psutil.Error:
        return "unknown"
    return None if status == psutil.STATUS_ZOMBIE else status


def faulthandler_stack(pid: int, deadline: float) -> tuple[str | None, str]:
    """What the worker's faulthandler writes when asked, by `deadline`; else None and why not."""
    try:
        path = stack_file_of(pid)
    except PermissionError:
        return None, f"not allowed to look into pid {pid} (another user's process?)"
    if path is None:
        return None, f"pid {pid} has no stack file"
    text = ask_faulthandler(pid, path, deadline)
    return text, f"no answer to {STACK_SIGNAL.name} within {FAULTHANDLER_WAIT:g}s"


def stack_file_of(pid: int) -> str | None:
    """The worker's stack file, as its own descriptor (/proc/PID/fd/N): the worker unlinked it
    at once, and this finds it in another mount namespace too (systemd's PrivateTmp)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return None
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if is_stack_file(target.removesuffix(" (deleted)"), pid):
            return f"{fd_dir}/{name}"
    return None


def is_stack_file(path: str, pid: int) -> bool:
    """`path` is worker `pid`'s stack file (see worker.main.register_stack_dump)."""
    name = os.path.basename(path)
    return name.startswith(stack_file_prefix(pid)) and name.endswith(STACK_FILE_SUFFIX)


def ask_faulthandler(pid: int, path: str, deadline: float) -> str | None:
    """Signal the worker and return what its faulthandler appended to `path`; None by `deadline`."""
    try:
        with open(path, "rb") as f:
            start = os.fstat(f.fileno()).st_size
            os.kill(pid, STACK_SIGNAL)
            end = wait_for_growth(f.fileno(), start, deadline)
            if end is None:
                return None
            f.seek(start)
            return f.read(end - start).decode("utf-8", "replace").rstrip("\n")
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        return None


def wait_for_growth(fd: int, start: int, deadline: float) -> int | None:
    """The file's size once it has grown past `start` and then held still for one poll (the
    handler writes every thread in one go); None if it has not grown by `deadline`."""
    size = start
    while time.monotonic() < deadline:
        time.sleep(POLL)
        now = os.fstat(fd).st_size
        if now > start and now == size:
            return now
        size = now
    return None


def read_with_py_spy(pid: int, executable: str | None, deadline: float, why: str) -> CapturedStack:
    """py-spy's dump of `pid` (without pausing it: a stopped process stays as it is), by `deadline`."""
    if executable is None:
        return CapturedStack("none", f"no stack: {why} and py-spy is not installed ({PY_SPY_HINT})")
    command = [executable, "dump", "--pid", str(pid), "--nonblocking"]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return CapturedStack("none", f"no stack: {why}, and py-spy gave none in time")
    except OSError as exc:
        return CapturedStack("none", f"no stack: {why}, and py-spy could not run ({exc.strerror})")
    if done.returncode != 0 or "Thread " not in done.stdout:
        error = next((line for line in done.stderr.splitlines() if line.strip()), "no output")
        return CapturedStack("none", f"no stack: {why}, and py-spy failed: {error}")
    return CapturedStack("py-spy", threads_only(done.stdout))


def threads_only(dump: str) -> str:
    """py-spy's dump from its first thread on: the lines before repeat the command line."""
    lines = dump.rstrip("\n").splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("Thread "))
    return "\n".join(lines[first:])

