"""Fault suite, database: locked by another program, made read-only, disk full, not SQLite at all.

The rule under test: a database problem (locked, read-only, full) never turns into a document
failure, never charges an attempt, never corrupts the file, and never leaves a worker dying in a
loop; when the cause goes away everything completes by itself, nothing lost.

Faults are real: a second process holding `BEGIN IMMEDIATE`; `chattr +i` on the database, its
-wal and -shm files and their directory (root ignores permission bits, not the immutable flag:
even writes through descriptors opened before fail with EPERM); a tmpfs mount of its own that a
filler file fills to the last byte (SQLITE_FULL), freed by deleting the filler.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect

from ..conftest import KGSUPERVISOR, seed, wait_for
from ..faultserver import FaultServer
from .harness import Outcome, Supervisor, check_invariants, completed, queue_done, record, scalar

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.chaos]

LOCK_HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
print("held", flush=True)
sys.stdin.readline()  # the test has read the queue while the lock was still held
conn.execute("ROLLBACK")
"""


# -- helpers ------------------------------------------------------------------------------------

def jitter(seed_: int, low: float = 0.005, high: float = 0.02) -> Callable[[dict, int], None]:
    """A FaultServer behaviour: a seeded 5-20 ms think time, then the reference answer."""
    rng = random.Random(seed_)

    def behaviour(payload: dict, n: int) -> None:
        time.sleep(rng.uniform(low, high))

    return behaviour


def charged(conn: sqlite3.Connection) -> int:
    """Rows that failed or carry any charge (an attempt or a crash)."""
    return scalar(conn, "SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'failed' "
                        "OR retry_count > 0 OR COALESCE(crash_count, 0) > 0")


def integrity(db_path: str) -> str:
    with sqlite3.connect(db_path, timeout=30) as c:
        return c.execute("PRAGMA integrity_check").fetchone()[0]


def first_error(sup: Supervisor) -> str:
    """The first error line of the log, without its `[worker N pid P]` prefix, for the report."""
    for e in log_lines(sup):
        if e.get("level") == "error":
            return re.sub(r"^\[worker \d+ pid \d+\] ", "", e["message"])[:200]
    return "-"


def log_lines(sup: Supervisor) -> list[dict]:
    lines = []
    for line in sup.stderr.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            lines.append({"level": "raw", "message": line})
    return lines


def log_has(sup: Supervisor, *needles: str, level: str | None = None) -> bool:
    return any(all(n in (e.get("message") or "") for n in needles) and (level is None or e.get("level") == level)
               for e in log_lines(sup))


def health(sup: Supervisor) -> dict:
    return requests.get(f"http://{sup.addr}/health", timeout=5).json()


def lock_retries(h: dict) -> int:
    return sum(int((d.get("stats") or {}).get("db_lock_retries") or 0) for d in h["worker_details"])


def exits_and_errors(sup: Supervisor) -> str:
    """Every worker exit the supervisor logged and every error line: why a worker restarted."""
    return "\n".join(f"{e.get('level')}: {e.get('message')}" for e in log_lines(sup)
                     if e.get("level") in ("error", "raw") or re.match(r"worker \d+ \(pid \d+\)", e.get("message", "")))


def owner_of(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


def restarts(h: dict) -> list[int]:
    return [d["restarts"] for d in h["worker_details"]]


def wait_drained(db_path: str, n: int, sup: Supervisor, timeout: float) -> None:
    def done() -> bool:
        assert sup.proc.poll() is None, f"supervisor exited early ({sup.proc.returncode}):\n{sup.stderr[-3000:]}"
        return queue_done(db_path, n)
    wait_for(done, timeout, interval=0.1, message=f"all {n} documents to reach an end state")


def stop(sup: Supervisor, timeout: float = 60) -> int:
    try:
        return sup.stop(timeout=timeout)
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()


def assert_clean_log(sup: Supervisor) -> None:
    text = sup.stderr
    assert "Traceback" not in text, text[-4000:]
    assert "killed by" not in text, text[-4000:]


def db_files(db_path: str) -> list[str]:
    return [p for p in (db_path, db_path + "-wal", db_path + "-shm") if os.path.exists(p)]


# -- fixtures -----------------------------------------------------------------------------------

def _chattr_works(directory: str) -> str | None:
    """None when `chattr +i` really stops root from writing here; else why not."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = os.path.join(directory, "chattr-probe")
    fd = os.open(probe, os.O_RDWR | os.O_CREAT)
    try:
        r = subprocess.run(["chattr", "+i", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return f"chattr +i does not work on this filesystem: {r.stderr.strip()}"
        try:
            os.pwrite(fd, b"x", 0)
            return "the immutable flag does not stop writes through an open descriptor here"
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.EROFS):
                return f"unexpected error writing an immutable file: {exc}"
        return None
    finally:
        subprocess.run(["chattr", "-i", probe], capture_output=True)
        os.close(fd)
        os.unlink(probe)


@pytest.fixture
def immutable_dir(tmp_path) -> Iterator[Callable[[bool], None]]:
    """A directory holding a fresh database, and a switch that makes it and its files immutable."""
    directory = tmp_path / "db"
    directory.mkdir()
    why_not = _chattr_works(str(directory))
    if why_not:
        pytest.fail(f"the read-only scenarios need chattr +i on this filesystem: {why_not}")
    db_path = str(directory / "kg.db")
    init_db(db_path)

    def set_readonly(on: bool) -> None:
        targets = db_files(db_path) + [str(directory)]
        if on:
            # Clean pages of the -shm mapping, as the kernel's writeback leaves them sooner or
            # later: a worker's next write to one then faults with SIGBUS on an immutable file.
            os.sync()
        subprocess.run(["chattr", "+i" if on else "-i", *targets], check=True, capture_output=True)

    set_readonly.db_path = db_path  # type: ignore[attr-defined]
    try:
        yield set_readonly
    finally:
        # Never leave an immutable file behind: nobody (pytest included) could delete it.
        subprocess.run(["chattr", "-R", "-i", str(directory)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path) -> Iterator[str]:
    """A tmpfs of its own (64 MiB) for the database, so that it can be filled for real."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"the disk-full scenario needs a tmpfs of its own (run as root): {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: str) -> str:
    """Write a filler file until the filesystem has not one byte left; returns its path."""
    path = os.path.join(directory, "filler")
    block = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 4096, 1):
            while True:
                try:
                    f.write(block[:size])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return path


# -- scenarios ----------------------------------------------------------------------------------

def test_write_lock_held_3s_by_another_process(conn, db_path, soak):
    """Another program holds the write lock for 3 s: the workers wait, nothing is charged."""
    n = 2000 if soak else 200
    ids = seed(conn, n)
    server = FaultServer(jitter(1))
    sup = Supervisor(db_path, server.url, "--workers", "3")
    holder = None
    try:
        sup.wait_ready()
        wait_for(lambda: completed(conn) >= n // 4, 60, message="a quarter done")
        holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, db_path, "3"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "locked"
        locked_at = completed(conn)
        assert holder.stdout.readline().strip() == "held"
        # While it held the lock nobody could commit anything (WAL readers still read).
        assert completed(conn) == locked_at
        holder.stdin.write("release\n")
        holder.stdin.close()
        assert holder.wait(30) == 0
        back = time.monotonic()
        after = completed(conn)
        wait_for(lambda: completed(conn) > after, 30, message="progress after the lock is released")
        recovered = time.monotonic() - back
        assert charged(conn) == 0, "a lock charged a document"
        wait_drained(db_path, n, sup, 120)
        h = health(sup)
        stats = sup.stats_counting(n)
        code = stop(sup)
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait()
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    outcome = check_invariants(db_path, ids, Outcome(
        "write lock held 3 s by another process", n, "BEGIN IMMEDIATE in a separate process for 3 s",
        recover_seconds=round(recovered, 2), exit_code=code,
        notes=f"db_lock_retries={lock_retries(h)} (busy_timeout 5 s absorbs a 3 s lock)"), queue_rows=n,
        journal=server.journal)
    assert code == 0 and outcome.failed == 0
    assert charged(conn) == 0
    assert restarts(h) == [0, 0, 0], exits_and_errors(sup)
    assert stats["total_success"] == n and stats["total_failed"] == 0
    assert integrity(db_path) == "ok"
    assert_clean_log(sup)


def test_database_read_only_mid_run(immutable_dir, tmp_path, soak):
    """Database, -wal, -shm and directory made immutable (chattr +i) for a while mid-run."""
    set_readonly = immutable_dir
    db_path = set_readonly.db_path
    conn = connect(db_path)
    n = 2000 if soak else 200
    ids = seed(conn, n)
    server = FaultServer(jitter(2))
    sup = Supervisor(db_path, server.url, "--workers", "2", log_path=str(tmp_path / "supervisor.log"))
    try:
        sup.wait_ready()
        wait_for(lambda: completed(conn) >= n // 4, 60, message="a quarter done")
        set_readonly(True)
        ro_at = time.monotonic()
        try:
            # A clear error in the log, and then some time of it being read-only.
            wait_for(lambda: log_has(sup, "database") and any(
                e.get("level") == "error" and "database" in e.get("message", "") for e in log_lines(sup)),
                30, interval=0.1, message="a database error in the log")
            # A worker started now can open the file only read-only; once the file is writable
            # it must write again, not pause for ever on that connection.
            # Killed while paused on the fault, with no document in hand: charged nothing.
            victim = wait_for(lambda: (lambda d: d["state"] == "paused" and d["pid"])(health(sup)["worker_details"][1]),
                              20, interval=0.05, message="worker 1 paused on the read-only database")
            os.kill(victim, signal.SIGKILL)
            replacement = wait_for(lambda: (lambda d: d["pid"] if d.get("pid") not in (None, victim)
                                            and d["state"] == "paused" else None)(health(sup)["worker_details"][1]),
                                   20, interval=0.1, message="a replacement worker paused on the read-only file")
            time.sleep(max(0.0, ro_at + 5 - time.monotonic()))  # read-only for 5 s at least
            assert sup.proc.poll() is None, sup.stderr[-3000:]
            # No read of our own while immutable: a read transaction may write its read mark into
            # a clean page of the -shm mapping, and that write faults with SIGBUS here too (it
            # killed pytest). Nothing can be written meanwhile anyway: charges are checked below.
        finally:
            set_readonly(False)
        back = time.monotonic()
        after = completed(conn)
        wait_for(lambda: completed(conn) > after, 60, message="progress once writable again")
        assert charged(conn) == 0, "the read-only spell charged a document"
        recovered = time.monotonic() - back
        wait_drained(db_path, n, sup, 120)
        wait_for(lambda: log_has(sup, f"pid {replacement}]", "database works again"), 30,
                 message="the worker started while read-only to write again")
        # The claims of the killed worker came back once the database took them, uncharged
        # (it was paused, no document in hand), without waiting for their leases.
        assert log_has(sup, f"could not release claims of {owner_of(victim)}", level="error")
        assert log_has(sup, "database writable again: released", f"of gone worker pid {victim} back to pending")
        h = health(sup)
        code = stop(sup)
    finally:
        set_readonly(False)
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    assert integrity(db_path) == "ok"
    outcome = check_invariants(db_path, ids, Outcome(
        "database read-only 5 s mid-run", n, "chattr +i on the database, -wal, -shm and directory for "
        "5 s; a worker SIGKILLed meanwhile", recover_seconds=round(recovered, 2), exit_code=code,
        notes=f"worker restarts {sum(restarts(h))}; log: {first_error(sup)}"),
        queue_rows=n, journal=server.journal)
    assert code == 0 and outcome.failed == 0
    assert charged(conn) == 0, conn.execute("SELECT content_id, status, retry_count, crash_count, error_message "
                                            "FROM kg_processing_queue WHERE status = 'failed' OR retry_count > 0 "
                                            "OR crash_count > 0 LIMIT 5").fetchall()
    # SIGBUS is how a worker learns that the -shm it had mapped became immutable; any other
    # exit would be a worker dying of a database fault.
    exits = [e["message"] for e in log_lines(sup)
             if re.match(r"worker \d+ \(pid \d+\) (killed|exited with status [1-9]|hung)", e.get("message", ""))
             and f"(pid {victim}) killed by SIGKILL" not in e["message"]]
    assert all("killed by SIGBUS" in m for m in exits), exits_and_errors(sup)
    assert sum(restarts(h)) == 1 + len(exits), exits_and_errors(sup)
    assert "Traceback" not in sup.stderr, sup.stderr[-4000:]
    conn.close()


def test_disk_full_mid_run(small_fs, tmp_path, soak):
    """The database's filesystem (a tmpfs) filled to the last byte mid-run, then space freed."""
    db_path = os.path.join(small_fs, "kg.db")
    init_db(db_path)
    conn = connect(db_path)
    n = 2000 if soak else 300
    ids = seed(conn, n)
    server = FaultServer(jitter(3))
    sup = Supervisor(db_path, server.url, "--workers", "2", log_path=str(tmp_path / "supervisor.log"))
    filler = None
    try:
        sup.wait_ready()
        wait_for(lambda: completed(conn) >= n // 5, 60, message="a fifth done")
        filler = fill(small_fs)
        full_at = time.monotonic()
        wait_for(lambda: log_has(sup, "full"), 30, interval=0.1, message="a disk-full error in the log")
        time.sleep(max(0.0, full_at + 5 - time.monotonic()))  # full for 5 s in all
        assert sup.proc.poll() is None, sup.stderr[-3000:]
        during = conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = 'failed' "
                              "OR retry_count > 0").fetchone()[0]
        assert during == 0, "a full disk charged a document"
        os.unlink(filler)
        filler = None
        back = time.monotonic()
        after = completed(conn)
        wait_for(lambda: completed(conn) > after, 60, message="progress once space is freed")
        recovered = time.monotonic() - back
        wait_drained(db_path, n, sup, 120)
        h = health(sup)
        code = stop(sup)
    finally:
        if filler is not None:
            os.unlink(filler)
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    assert integrity(db_path) == "ok"
    outcome = check_invariants(db_path, ids, Outcome(
        "disk full 5 s mid-run", n, "tmpfs holding the database filled by a filler file for 5 s",
        recover_seconds=round(recovered, 2), exit_code=code,
        notes=f"worker restarts {sum(restarts(h))}; log: {first_error(sup)}"),
        queue_rows=n, journal=server.journal)
    assert code == 0 and outcome.failed == 0
    assert charged(conn) == 0, conn.execute("SELECT content_id, status, retry_count, crash_count, error_message "
                                            "FROM kg_processing_queue WHERE status = 'failed' OR retry_count > 0 "
                                            "OR crash_count > 0 LIMIT 5").fetchall()
    assert restarts(h) == [0, 0], exits_and_errors(sup)
    assert_clean_log(sup)
    conn.close()


NOT_SQLITE = {
    "text": b"id,url,title\n1,https://example.org,hello\n",
    "random bytes": bytes(random.Random(7).randrange(256) for _ in range(8192)),
    "sqlite header, garbage after": b"SQLite format 3\0" + bytes(random.Random(8).randrange(256) for _ in range(8192)),
}


@pytest.mark.parametrize("kind", sorted(NOT_SQLITE))
def test_not_sqlite_file_as_db(tmp_path, kind):
    """`run --db` on a file that is not SQLite: one clear line, non-zero exit, no traceback,
    the file untouched and no -wal/-shm created beside it."""
    path = tmp_path / "not-a.db"
    path.write_bytes(NOT_SQLITE[kind])
    started = time.monotonic()
    sup = Supervisor(str(path), "http://127.0.0.1:9", log_path=str(tmp_path / "out.log"))
    try:
        code = sup.proc.wait(30)
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
    out = [line for line in sup.stderr.splitlines() if line.strip()]
    record(Outcome(f"--db is not SQLite ({kind})", 0, "run --db on a non-SQLite file",
                   exit_code=code, wall_seconds=round(time.monotonic() - started, 1),
                   notes=out[0].replace(str(tmp_path) + "/", "")[:160] if out else ""))
    assert code == 1, out
    assert len(out) == 1, out
    assert "Traceback" not in out[0]
    assert str(path) in out[0] and ("not an SQLite database" in out[0] or "malformed" in out[0]), out
    assert path.read_bytes() == NOT_SQLITE[kind]
    assert sorted(os.listdir(tmp_path)) == ["not-a.db", "out.log"]


@pytest.mark.parametrize("command", [["worker", "--once"], ["queue"], ["enqueue", "--all-unprocessed"],
                                     ["retry", "--failed"], ["init-db"]])
def test_not_sqlite_file_other_commands(tmp_path, command):
    """The other commands that take --db say the same in one line, and init-db never overwrites it."""
    path = tmp_path / "not-a.db"
    path.write_bytes(NOT_SQLITE["text"])
    r = subprocess.run(KGSUPERVISOR + command + ["--db", str(path)], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "KG_SERVICE_URL": "http://127.0.0.1:9"})
    out = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert r.returncode == 1, out
    assert out == [f"Error: {str(path)!r} is not an SQLite database"], out
    assert path.read_bytes() == NOT_SQLITE["text"]
    assert os.listdir(tmp_path) == ["not-a.db"]


@pytest.mark.parametrize("what", ["file and directory", "file only"])
def test_read_only_database_at_start(immutable_dir, tmp_path, what):
    """A database that is read-only before `run` starts: refused in one line naming the cause,
    exit non-zero, no traceback, nothing forked. ("file only": SQLite silently opens such a file
    read-only, and a read-only connection even accepts BEGIN IMMEDIATE.)"""
    set_readonly = immutable_dir
    db_path = set_readonly.db_path
    set_readonly(True)
    if what == "file only":
        subprocess.run(["chattr", "-i", os.path.dirname(db_path)], check=True)
    sup = Supervisor(db_path, "http://127.0.0.1:9", log_path=str(tmp_path / "out.log"))
    try:
        # It refuses (exits), or it is up and answering on its status endpoint.
        wait_for(lambda: sup.proc.poll() is not None or sup.stats(), 20, interval=0.05, message="exit or start")
        code = sup.proc.poll()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        set_readonly(False)
    out = [line for line in sup.stderr.splitlines() if line.strip()]
    assert code == 1, out[-10:]
    assert len(out) == 1 and "read-only" in out[0] and "Traceback" not in out[0], out
