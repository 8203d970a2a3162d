"""A locked pidfile: one supervisor per file, stale ones of ours taken over, anything else left alone."""
from __future__ import annotations

import fcntl
import os
import re
import stat

import psutil

from kgsupervisor.errors import KGSupervisorError

# What a pidfile of ours holds: one pid and a newline. Anything else is somebody's data.
PID_LINE = re.compile(r"\s*([1-9][0-9]{0,9})\s*")
PID_LIMIT = 2**31  # pid_t is 32 bits; a larger number is no pid (and os.kill would overflow)
READ_AT_MOST = 64
OPEN_ATTEMPTS = 3  # the file may be replaced between open and lock (a supervisor exiting)
# What process_kind() says of a pid besides its process name.
KGSUPERVISOR = "kgsupervisor"
UNKNOWN = ""  # a process this user may not inspect


class Pidfile:
    """Holds an exclusive flock on the file for the life of the supervisor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None
        self.pid = os.getpid()

    def acquire(self) -> None:
        """Create the file exclusively, or take over a stale pidfile of ours; refuse anything else.

        A file that is not a pidfile (a database given as --pidfile by mistake) is never
        truncated: it is refused in one line and left as it was.
        """
        for _ in range(OPEN_ATTEMPTS):
            fd = self._open()
            if fd is None:
                continue
            try:
                self._lock(fd)
                if _same_file(fd, self.path):
                    self._take(fd)
                    self.fd = fd
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise KGSupervisorError(f"pidfile {self.path} vanished or changed while it was being opened "
                                f"(a dangling symlink, or another supervisor starting or stopping?)")

    def _open(self) -> int | None:
        """A descriptor of the file, created if it did not exist; None if it vanished meanwhile."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _open_error(self.path, exc) from None
        try:
            return os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _open_error(self.path, exc) from None

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = parse_pid(_read(fd))
            raise KGSupervisorError(
                f"another supervisor (pid {holder or 'unknown'}) is running with pidfile {self.path}") from None

    def _take(self, fd: int) -> None:
        """Write our pid into a file that is empty or holds a stale pid of ours; refuse otherwise."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KGSupervisorError(f"--pidfile {self.path} is not a regular file: left untouched")
        text = _read(fd)
        pid = parse_pid(text)
        if st.st_size > READ_AT_MOST or (text.strip() and pid is None):
            raise KGSupervisorError(
                f"--pidfile {self.path} exists and is not a pidfile (it holds more than a single pid "
                f"line): left untouched; give the supervisor a path of its own, e.g. /run/kgsupervisor.pid")
        if pid is not None and pid != self.pid and process_kind(pid) == KGSUPERVISOR:
            raise KGSupervisorError(
                f"pidfile {self.path} names pid {pid}, a running kgsupervisor that does not hold it: "
                f"left untouched (stop that process, or give this one another --pidfile)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.pid}\n".encode(), 0)

    def release(self) -> None:
        """Close the file, and remove it if it is still ours: the same file, holding our pid."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path) and parse_pid(_read(self.fd)) == self.pid:
                os.unlink(self.path)
        except OSError:
            pass  # it is gone or not ours any more: nothing of ours to remove
        finally:
            os.close(self.fd)
            self.fd = None


def parse_pid(text: str) -> int | None:
    """The pid a pidfile's text holds, or None when it is not a single pid line."""
    match = PID_LINE.fullmatch(text)
    if match is None or text.strip().count("\n") or int(match.group(1)) >= PID_LIMIT:
        return None
    return int(match.group(1))


def process_kind(pid: int) -> str | None:
    """None when `pid` is gone, KGSUPERVISOR when it is one of ours, else its process name."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        name, cmdline = proc.name(), proc.cmdline()
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return UNKNOWN
    return KGSUPERVISOR if is_kgsupervisor(name, cmdline) else name


def is_kgsupervisor(name: str, cmdline: list[str]) -> bool:
    """`kgsupervisor ...`, `python -m kgsupervisor ...` or one of its named children (kgs-*)."""
    if name == KGSUPERVISOR or name.startswith("kgs-"):
        return True
    if any(os.path.basename(arg) == KGSUPERVISOR for arg in cmdline[:2]):
        return True
    return any(a == "-m" and b.split(".")[0] == KGSUPERVISOR for a, b in zip(cmdline, cmdline[1:]))


def _read(fd: int) -> str:
    return os.pread(fd, READ_AT_MOST, 0).decode(errors="replace")


def _same_file(fd: int, path: str) -> bool:
    """Does `path` still name the file open on `fd` (not removed or replaced meanwhile)?"""
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _open_error(path: str, exc: OSError) -> KGSupervisorError:
    if isinstance(exc, IsADirectoryError):
        return KGSupervisorError(f"--pidfile {path} is a directory, not a file")
    return KGSupervisorError(f"cannot open pidfile {path}: {exc.strerror}")


def running_pid(path: str) -> int:
    """The pid of the live supervisor holding `path`, or a one-line error saying why not."""
    pid, locked = _read_pidfile(path)
    kind = process_kind(pid)
    if kind == KGSUPERVISOR and locked:
        return pid
    if not locked:
        raise KGSupervisorError(f"pidfile {path} is stale: no supervisor holds it ({_describe(pid, kind)})")
    raise KGSupervisorError(f"pidfile {path} is locked, but {_describe(pid, kind)}")


def _describe(pid: int, kind: str | None) -> str:
    if kind is None:
        return f"pid {pid} is gone"
    if kind == UNKNOWN:
        return f"pid {pid} is a running process this user may not inspect; not signalled"
    if kind == KGSUPERVISOR:
        return f"pid {pid} is another kgsupervisor process, which does not hold this pidfile; not signalled"
    return f"pid {pid} is a running {kind!r} process, not kgsupervisor; not signalled"


def _read_pidfile(path: str) -> tuple[int, bool]:
    """The pid a pidfile names and whether a process holds its lock; a one-line error otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KGSupervisorError(f"pidfile {path} does not exist: is the supervisor running with --pidfile {path}?") from None
    except OSError as exc:
        raise KGSupervisorError(f"cannot read pidfile {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise KGSupervisorError(f"pidfile {path} is a directory, not a pidfile")
        if not stat.S_ISREG(mode):
            raise KGSupervisorError(f"pidfile {path} is not a regular file")
        pid = parse_pid(_read(fd))
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            locked = False
        except BlockingIOError:
            locked = True
    finally:
        os.close(fd)
    if pid is None:
        raise KGSupervisorError(f"pidfile {path} holds no pid: it is not a kgsupervisor pidfile")
    return pid, locked
