"""Noticing a commit by someone else (an enqueue, a release) without polling where the system
allows: on SQLite an inotify watch on the database's -wal file, on PostgreSQL the LISTEN
connection's socket. Where that cannot work, a look every so often (PRAGMA data_version, the
notifications already received)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("kgsupervisor.worker")

# Channel of the NOTIFY that pgschema's triggers send when a row becomes claimable.
QUEUE_CHANNEL = "kgsupervisor_queue"
# KG_COMMIT_WATCH: `auto` waits on events where it can, `poll` always looks every so often.
WATCH_MODES = ("auto", "poll")
# File systems on which inotify does not see another host's writes (or any, through FUSE).
# A commit writes its frames to the -wal file (the event) before it publishes them in the -shm
# index (no event): a look right after the event may miss it. After an event with no commit to
# be seen, look again after these pauses (half a second in all) before trusting the quiet.
SETTLE_LOOKS = (0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256)
REMOTE_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "lustre",
                       "gpfs", "virtiofs", "fuse")


class DataVersionWatch:
    """SQLite: PRAGMA data_version changes when another connection commits; a few microseconds a look."""

    interval: float | None = 0.15  # an idle worker looks this often
    how = "looks for commits every 0.15 s (PRAGMA data_version)"

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._version: int | None = None
        self.changed()  # from now on: a commit before the first wait must wake it too

    def fileno(self) -> int | None:
        return None

    def changed(self) -> bool:
        try:
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        except Exception:
            return False
        changed = self._version is not None and version != self._version
        self._version = version
        return changed

    def close(self) -> None:
        """Nothing to close."""


class WalWatch(DataVersionWatch):
    """SQLite in WAL mode on Linux: every commit writes the -wal file, and inotify says so.

    The watch covers the directory too, so a -wal file deleted (the last connection closed) and
    made again is watched again; until then it looks every 0.15 s. A change of the file by this
    connection itself (its own write-back) leaves data_version as it was, and wakes nobody; a
    commit caught half-way is seen by the looks of SETTLE_LOOKS.
    """

    def __init__(self, conn: Any, path: str) -> None:
        from inotify_simple import INotify, flags  # Linux only: imported where it can work
        self.flags = flags
        self.wal = path + "-wal"
        self.inotify = INotify()
        try:
            self.inotify.add_watch(os.path.dirname(self.wal) or ".", flags.CREATE | flags.MOVED_TO)
            self.wal_watch: int | None = None
            self.watch_wal()
        except BaseException:
            self.inotify.close()
            raise
        self.settling: list[float] = []  # pauses still to look after, when an event showed nothing
        self.how = f"waits for commits on {self.wal} (inotify)"
        super().__init__(conn)  # its first look, with the watch in place

    @property
    def interval(self) -> float | None:  # type: ignore[override]
        if self.wal_watch is None:
            return DataVersionWatch.interval
        return self.settling[0] if self.settling else None

    def watch_wal(self) -> None:
        try:
            self.wal_watch = self.inotify.add_watch(self.wal, self.flags.MODIFY)
        except FileNotFoundError:
            self.wal_watch = None

    def fileno(self) -> int | None:
        return self.inotify.fileno()

    def changed(self) -> bool:
        """Take the events the watch holds; whether someone else committed since the last look."""
        events = self.inotify.read(timeout=0)
        for event in events:
            if event.wd == self.wal_watch and event.mask & self.flags.IGNORED:
                self.wal_watch = None  # deleted: wait for the directory to say it is back
            elif event.wd != self.wal_watch and event.name == os.path.basename(self.wal):
                self.watch_wal()
        changed = super().changed()
        if changed:
            self.settling = []
        elif events:  # perhaps a commit half-way (or our own write): look again shortly
            self.settling = list(SETTLE_LOOKS)
        elif self.settling:
            self.settling.pop(0)
        return changed

    def close(self) -> None:
        self.inotify.close()


def sqlite_commit_watch(conn: Any, mode: str = "auto") -> DataVersionWatch:
    """The watch for a SQLite connection: inotify where it works, else data_version looked at."""
    if mode == "poll":
        return DataVersionWatch(conn)
    path = database_file(conn)
    problem = inotify_problem(conn, path)
    if problem is None:
        try:
            return WalWatch(conn, path)
        except OSError as exc:  # inotify limits (max_user_instances, max_user_watches)
            problem = f"inotify refused ({exc})"
    watch = DataVersionWatch(conn)
    watch.how = f"{watch.how}: {problem}"
    return watch


def database_file(conn: Any) -> str:
    """The file of the connection's main database ('' for an in-memory one)."""
    for _, name, file in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return file or ""
    return ""


def inotify_problem(conn: Any, path: str) -> str | None:
    """Why an inotify watch cannot see every commit to `path`; None when it can."""
    if not sys.platform.startswith("linux"):
        return "inotify is Linux only"
    if not path:
        return "the database has no file"
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
    if mode != "wal":
        return f"journal_mode is {mode}, not wal"
    fs = file_system_of(path)
    if fs is not None and (fs in REMOTE_FILE_SYSTEMS or fs.startswith("fuse.")):
        return f"the database is on a {fs} file system, whose writes elsewhere inotify does not see"
    try:
        import inotify_simple  # noqa: F401
    except ImportError:
        return "the inotify_simple package is missing"
    return None


def file_system_of(path: str) -> str | None:
    """The type of the file system holding `path`, from /proc/self/mountinfo (None if unknown)."""
    target = os.path.realpath(path)
    best, fs = "", None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                point = fields[4].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fs = point, line.split(" - ", 1)[1].split()[0]
    except OSError:
        return None
    return fs


class NotifyWatch:
    """PostgreSQL: LISTEN on the queue's channel, and wait on the connection's socket for a NOTIFY."""

    def __init__(self, conn: Any, mode: str = "auto") -> None:
        self.conn = conn
        self.polled = mode == "poll"
        self.broken = False
        conn.listen(QUEUE_CHANNEL)
        self.how = ("looks for notifications every 0.05 s (LISTEN)" if self.polled
                    else "waits for a NOTIFY on the connection's socket (LISTEN)")

    @property
    def interval(self) -> float | None:
        return 0.05 if self.fileno() is None else None

    def fileno(self) -> int | None:
        """The socket to wait on; None when polled, or when the connection broke (the worker's
        next statement reconnects, with a fresh watch)."""
        raw = getattr(self.conn, "raw", None)
        if self.polled or self.broken or raw is None or raw.closed:
            return None
        return raw.fileno()

    def changed(self) -> bool:
        try:
            return self.conn.notified()
        except Exception:  # a dropped connection: its socket stays readable, so look by interval
            self.broken = True
            return False

    def close(self) -> None:
        """The connection is the worker's: it closes it."""
