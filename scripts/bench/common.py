"""What every section of the benchmark shares: the database, the service, processes and timing."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field

import psutil
from sampledata import add_documents

from kgsupervisor.kg import devservice
from kgsupervisor.kg.answer import IngestResult
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.leased import db_timestamp
from kgsupervisor.queue.writeback import (DOCUMENT_SQL, ENTITY_SQL, RELATIONSHIP_SQL, _entity_rows,
                                          _relationship_rows)
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect, transaction

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(SCRIPTS)
KG = [sys.executable, "-m", "kgsupervisor"]
CHUNKS_PER_DOCUMENT = 3
# 7 sentences a chunk give ~65 entity rows a document, the upstream's measured average (CONTRACT §2).
SENTENCES_PER_CHUNK = 7


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every process the benchmark starts: no KG_* setting leaks in from ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KG_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SCRIPTS, env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- numbers ---------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


# -- the database ----------------------------------------------------------------------------

def build_database(path: str, documents: int, seed: int = 1) -> list[int]:
    """A fresh database by `init-db` with `documents` sample documents of 3 chunks each, queued."""
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    init_db(path)
    with closing(connect(path)) as conn:
        ids = add_documents(conn, documents, chunks=CHUNKS_PER_DOCUMENT, sentences=SENTENCES_PER_CHUNK, seed=seed)
        conn.execute("ANALYZE")
    reset_database(path)
    return ids


def reset_database(path: str, queued: bool = True) -> None:
    """Back to 'nothing extracted yet': KG rows gone, documents unprocessed, the queue all pending
    (or empty), compacted, WAL truncated. Every contender starts from this same state."""
    with closing(connect(path)) as conn:
        with transaction(conn):
            conn.execute("DELETE FROM chunk_entities")
            conn.execute("DELETE FROM chunk_relationships")
            conn.execute("UPDATE crawled_content SET kg_processed = 0, kg_entity_count = 0, "
                         "kg_relationship_count = 0, kg_document_id = NULL, kg_processed_at = NULL")
            conn.execute("UPDATE content_chunks SET kg_processed = 0")
            conn.execute("DELETE FROM kg_processing_queue")
            if queued:
                conn.execute("INSERT INTO kg_processing_queue (content_id, status, priority, queued_at) "
                             "SELECT id, 'pending', 1, ? FROM crawled_content ORDER BY id",
                             (db_timestamp(time.time()),))
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def count_status(conn: sqlite3.Connection, status: str = "completed") -> int:
    return conn.execute("SELECT COUNT(*) FROM kg_processing_queue WHERE status = ?", (status,)).fetchone()[0]


def precompute_answers(db_path: str, out_path: str) -> dict[int, bytes]:
    """The reference answer of every document, computed once (devservice.extract), pickled."""
    answers = {}
    with closing(connect(db_path)) as conn:
        for (cid,) in conn.execute("SELECT id FROM crawled_content ORDER BY id").fetchall():
            payload, _ = build_payload(conn, cid)
            answers[cid] = json.dumps(devservice.extract(payload)).encode()
    with open(out_path, "wb") as f:
        pickle.dump(answers, f)
    return answers


def write_plain(conn: sqlite3.Connection, queue_id: int, content_id: int, result: IngestResult,
                now: float) -> None:
    """write_back's data writes, with a plain completion UPDATE instead of the fenced one.

    For peers that have their own queue (Huey): the same rows, the same single transaction.
    """
    stamp = db_timestamp(now)
    with transaction(conn):
        conn.execute("UPDATE kg_processing_queue SET status = 'completed', processed_at = ?, "
                     "result_summary = ? WHERE id = ?", (stamp, json.dumps(result.summary()), queue_id))
        conn.execute("DELETE FROM chunk_entities WHERE content_id = ?", (content_id,))
        conn.execute("DELETE FROM chunk_relationships WHERE content_id = ?", (content_id,))
        conn.executemany(ENTITY_SQL, _entity_rows(content_id, result, stamp))
        conn.executemany(RELATIONSHIP_SQL, _relationship_rows(content_id, result, stamp))
        conn.execute(DOCUMENT_SQL, (len(result.entities), len(result.relationships),
                                    result.neo4j_document_id, stamp, content_id))
        conn.execute("UPDATE content_chunks SET kg_processed = 1 WHERE content_id = ?", (content_id,))


# -- processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal one process we started and wait; SIGKILL it (and its children) after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for p in [psutil.Process(proc.pid)] + children:
            try:
                p.kill()
            except psutil.Error:
                pass
        proc.wait(10)
    for child in children:  # a child that outlived its parent (it should not)
        try:
            if child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
                child.kill()
        except psutil.Error:
            pass


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def workers_of(pid: int) -> list[psutil.Process]:
    """The supervisor's live worker processes (named kgs-worker-N)."""
    found = []
    for p in tree(pid)[1:]:
        try:
            if p.name().startswith("kgs-worker") and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_for(predicate, timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


@dataclass
class Service:
    """The benchmark service (default) or `kgsupervisor dev-service`, as a child process."""

    answers_path: str
    latency: float
    kind: str = "bench"
    proc: subprocess.Popen | None = None
    url: str = ""
    log_path: str | None = None

    def start(self) -> "Service":
        if self.kind == "bench":
            cmd = [sys.executable, "-m", "bench.service", "--answers", self.answers_path,
                   "--latency", str(self.latency)]
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, text=True)
            port = int(self.proc.stdout.readline().split()[1])
        else:
            port = free_port()
            cmd = KG + ["dev-service", "--port", str(port), "--latency", str(self.latency)]
            self.proc = subprocess.Popen(cmd, env=child_env(), stderr=subprocess.PIPE, text=True)
            self.proc.stderr.readline()
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> "Service":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds so far of these processes and all their live descendants."""
    total = 0.0
    for pid in pids:
        for p in tree(pid):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


@dataclass
class Progress:
    """(monotonic time, completed rows) samples of one drain, polled from the database, and the
    CPU of the contender's and the service's process trees when 10% and 90% were done."""

    started: float
    samples: list[tuple[float, int]] = field(default_factory=list)
    cpu_marks: list[tuple[int, float, float]] = field(default_factory=list)

    def steady_cpu(self) -> tuple[float, float]:
        """CPU ms per document of the contender and of the service between the two marks."""
        if len(self.cpu_marks) < 2 or self.cpu_marks[-1][0] <= self.cpu_marks[0][0]:
            return float("nan"), float("nan")
        (n0, c0, s0), (n1, c1, s1) = self.cpu_marks[0], self.cpu_marks[-1]
        return 1000 * (c1 - c0) / (n1 - n0), 1000 * (s1 - s0) / (n1 - n0)

    def crossing(self, count: float) -> float | None:
        """When `count` documents were done, interpolated between samples (seconds from start)."""
        prev_t, prev_n = self.started, 0
        for t, n in self.samples:
            if n >= count:
                if n == prev_n:
                    return t - self.started
                return prev_t - self.started + (t - prev_t) * (count - prev_n) / (n - prev_n)
            prev_t, prev_n = t, n
        return None

    def steady_rate(self, total: int, lo: float = 0.1, hi: float = 0.9) -> float:
        """Documents/s between lo and hi of the total: no process start-up, no tail."""
        a, b = self.crossing(total * lo), self.crossing(total * hi)
        if a is None or b is None or b <= a:
            return float("nan")
        return total * (hi - lo) / (b - a)

    def wall(self, total: int) -> float | None:
        return self.crossing(total)


def watch_drain(db_path: str, total: int, procs: list[subprocess.Popen], timeout: float,
                started: float, every: float = 0.02, window: float | None = None,
                service_pid: int | None = None) -> Progress:
    """Poll the completed count until `total` are done, every process exited, the timeout, or
    the end of `window` seconds (for schedules too slow to drain)."""
    progress = Progress(started)
    marks = [total * 0.1, total * 0.9]
    with closing(sqlite3.connect(db_path, timeout=30)) as conn:
        while True:
            now = time.monotonic()
            done = count_status(conn)
            progress.samples.append((now, done))
            if marks and done >= marks[0]:
                while marks and done >= marks[0]:
                    marks.pop(0)
                progress.cpu_marks.append((done, tree_cpu([p.pid for p in procs]),
                                           tree_cpu([service_pid]) if service_pid else 0.0))
            if done >= total or now - started > timeout:
                break
            if window is not None and now - started >= window:
                break
            if all(p.poll() is not None for p in procs):
                progress.samples.append((time.monotonic(), count_status(conn)))
                break
            time.sleep(every)
    return progress


def read_log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Supervisor:
    """`kgsupervisor run` as a child process, with its log in the work directory."""

    db: str
    url: str
    workers: int
    log_path: str
    status: bool = False
    extra: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    status_url: str = ""

    def start(self, ready_timeout: float = 60.0) -> "Supervisor":
        addr = "off"
        if self.status:
            port = free_port()
            addr = f"127.0.0.1:{port}"
            self.status_url = f"http://{addr}"
        cmd = KG + ["run", "--db", self.db, "--service-url", self.url, "--workers", str(self.workers),
                    "--status-addr", addr, "--log-file", self.log_path] + self.extra
        with open(self.log_path + ".stderr", "w") as stderr:
            self.proc = subprocess.Popen(cmd, env=child_env(**self.env), stdout=subprocess.DEVNULL, stderr=stderr)
        if not wait_for(lambda: len(workers_of(self.proc.pid)) >= self.workers or self.proc.poll() is not None,
                        ready_timeout, 0.02) or self.proc.poll() is not None:
            raise RuntimeError(f"supervisor did not start {self.workers} workers: "
                               f"{read_log_tail(self.log_path)}{read_log_tail(self.log_path + '.stderr')}")
        if self.status:
            import requests
            wait_for(lambda: _answers(requests, self.status_url + "/health"), ready_timeout, 0.05)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 90.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout)


def _answers(requests, url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
