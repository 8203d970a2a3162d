"""`make demo`: build a sample crawl database, start the reference KG service, drain the queue."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

from sampledata import add_documents

from kgsupervisor.ops.render import RateMeter, progress_line, queue_progress
from kgsupervisor.queue.leased import SQLiteQueue
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect

HERE = os.path.dirname(os.path.abspath(__file__))
# `demo.py DIR` puts the demo elsewhere (the test suite runs it in a temp dir).
DATA = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.join(os.path.dirname(HERE), "demo-data")
DB = os.path.join(DATA, "demo.db")
DOCUMENTS = 200
KG = [sys.executable, "-m", "kgsupervisor"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_database() -> None:
    shutil.rmtree(DATA, ignore_errors=True)
    os.makedirs(DATA)
    init_db(DB)
    conn = connect(DB)
    add_documents(conn, DOCUMENTS, chunks=4, sentences=5, seed=7)
    SQLiteQueue(conn).enqueue_all_unprocessed(1, time.time())
    conn.close()
    print(f"sample database: {DB} ({DOCUMENTS} documents, {DOCUMENTS * 4} chunks, all queued)")


def start_service(port: int) -> subprocess.Popen:
    service = subprocess.Popen(KG + ["dev-service", "--port", str(port), "--latency", "0.05"],
                               stderr=subprocess.PIPE, text=True)
    print(service.stderr.readline().strip())
    return service


def progress(counts: dict[str, int], meter: RateMeter) -> str:
    """The supervisor's own progress line (kgsupervisor.ops.render), with a bar in front."""
    done, total = queue_progress(counts)
    bar = "#" * int(30 * done / max(total, 1))
    return f"[{bar:<30}] " + progress_line({"queue_size": counts, "total_failed": counts["failed"]}, meter)


def drain(port: int) -> tuple[int, float]:
    log_path = os.path.join(DATA, "supervisor.log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        supervisor = subprocess.Popen(
            KG + ["run", "--db", DB, "--service-url", f"http://127.0.0.1:{port}", "--workers", "4",
                  "--poll-interval", "0.5", "--exit-when-empty"], stderr=log)
        conn = sqlite3.connect(DB)
        # On a terminal the line redraws in place; in a log (CI) it prints once a second.
        tty, every = sys.stdout.isatty(), 0.2 if sys.stdout.isatty() else 1.0
        meter = RateMeter(window=5.0)
        while supervisor.poll() is None:
            line = progress(SQLiteQueue(conn).counts(), meter)
            print("\r\033[K" + line if tty else line, end="" if tty else "\n", flush=True)
            time.sleep(every)
        print(("\r\033[K" if tty else "") + progress(SQLiteQueue(conn).counts(), meter))
        conn.close()
    print(f"supervisor exited with status {supervisor.returncode} (log: {log_path})")
    return supervisor.returncode, time.monotonic() - started


def report(elapsed: float) -> bool:
    conn = sqlite3.connect(DB)
    counts = SQLiteQueue(conn).counts()
    entities = conn.execute("SELECT COUNT(*) FROM chunk_entities").fetchone()[0]
    relationships = conn.execute("SELECT COUNT(*) FROM chunk_relationships").fetchone()[0]
    top = conn.execute("SELECT entity_text, COUNT(*) FROM chunk_entities GROUP BY entity_normalized "
                       "ORDER BY 2 DESC LIMIT 5").fetchall()
    conn.close()
    rows = [("documents completed", counts["completed"]), ("documents failed", counts["failed"]),
            ("still pending / processing", counts["pending"] + counts["processing"]),
            ("entity rows written", entities), ("relationship rows written", relationships),
            ("wall time", f"{elapsed:.1f} s"), ("throughput", f"{counts['completed'] / elapsed:.1f} docs/s")]
    print("\n  result")
    for name, value in rows:
        print(f"  {name:<28} {value:>10}")
    print("  most mentioned: " + ", ".join(f"{t} ({n})" for t, n in top))
    return counts["completed"] == DOCUMENTS


def main() -> int:
    build_database()
    port = free_port()
    service = start_service(port)
    try:
        status, elapsed = drain(port)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(10)
    ok = report(elapsed) and status == 0
    print("\ndemo " + ("succeeded: every document completed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
