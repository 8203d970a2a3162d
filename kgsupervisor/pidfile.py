"""A locked pidfile: one supervisor per file, stale files taken over, signals sent through it."""
from __future__ import annotations

import fcntl
import os

from .errors import KGSupervisorError


class Pidfile:
    """Holds an exclusive flock on the file for the life of the supervisor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Lock and write our pid; refuse if a live supervisor holds it, take it over if stale."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise KGSupervisorError(f"cannot open pidfile {self.path!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise KGSupervisorError(
                f"another supervisor (pid {holder or 'unknown'}) is running with pidfile {self.path}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_pid(fd: int) -> int | None:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


def running_pid(path: str) -> int:
    """The pid of the live supervisor holding `path`, or a one-line error saying why not."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KGSupervisorError(f"pidfile {path} does not exist: is the supervisor running with --pidfile {path}?") from None
    except OSError as exc:
        raise KGSupervisorError(f"cannot read pidfile {path}: {exc.strerror}") from None
    try:
        pid = _read_pid(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = True
        else:
            locked = False
    finally:
        os.close(fd)
    if pid is None:
        raise KGSupervisorError(f"pidfile {path} holds no pid")
    if not locked:
        raise KGSupervisorError(f"pidfile {path} is stale: no supervisor holds it (pid {pid} is gone)")
    return pid
