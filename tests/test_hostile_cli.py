"""Careless and hostile use of the commands (issue 13), as real processes, files and signals:
nothing destroyed, one line instead of a traceback, no signal lost in start-up or sent twice."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from kgsupervisor import logs
from kgsupervisor.ops import render
from kgsupervisor.ops.cli import main
from kgsupervisor.ops.statusd import StatusServer
from kgsupervisor.pool.pidfile import Pidfile, parse_pid
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

from .chaos.harness import record_hostile
from .chaos.test_db_faults import _chattr_works
from .conftest import held_until, seed, status_counts, wait_for
from .processes import FAST, Process, run_to_exit, worker_pids

pytestmark = [pytest.mark.timeout(120)]


def cli(*args: str, user: int | None = None) -> subprocess.CompletedProcess:
    """A kgsupervisor command run to its end (as uid `user`, through setpriv, when given)."""
    return run_to_exit(*args, env=FAST, user=user)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The command failed with exactly one line on stderr and no traceback; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0, result
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def sleeper(processes) -> Process:
    """A running process that is not kgsupervisor (killed at teardown by `processes`)."""
    return processes.start(["sleep", "300"], "sleeper")


def pid_in(path: pathlib.Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""


# -- 1. a --pidfile that is not a pidfile is never touched ---------------------------------------


@pytest.mark.hostile
@pytest.mark.parametrize("content, given", [
    (None, "`run --db v.db --pidfile v.db`: the pidfile names the database"),
    (b"notes, not a pid\n", "`--pidfile` naming a text file of notes"),
    (b"123\n456\n", "`--pidfile` naming a file of two pid lines"),
    (b"4242\n" + b" " * 200 + b"data after a pid line\n", "`--pidfile` naming a file with data after a pid line"),
])
def test_a_file_that_is_not_a_pidfile_is_refused_and_left_byte_identical(db_path, kg_service, tmp_path, content,
                                                                          given):
    target = pathlib.Path(db_path) if content is None else tmp_path / "precious.txt"
    if content is not None:
        target.write_bytes(content)
    before = target.read_bytes()
    result = cli("run", "--db", db_path, "--service-url", kg_service, "--status-addr", "off",
                 "--pidfile", str(target))
    assert "is not a pidfile" in one_line(result) and "left untouched" in result.stderr
    assert target.read_bytes() == before
    record_hostile(given, 'refused in one line ("… is not a pidfile … left untouched"); the file byte-identical',
                   "— (refused at start)")


@pytest.mark.parametrize("stale", ["unrelated live pid", "empty"])
def test_a_stale_pidfile_is_replaced_and_removed_at_exit(db_path, kg_service, tmp_path, sleeper, processes,
                                                         stale):
    pidfile = tmp_path / "kgs.pid"
    # An empty file holds nothing to lose: what a package pre-creates to give the pidfile its owner.
    pidfile.write_text(f"{sleeper.pid}\n" if stale == "unrelated live pid" else "")
    proc = processes.supervisor(db_path, kg_service, "--workers", "1", "--status-addr", "off",
                                "--pidfile", str(pidfile))
    wait_for(lambda: pid_in(pidfile) == str(proc.pid), 20, message="the stale pidfile taken over")
    log = proc.stop(signal.SIGTERM, timeout=30)
    assert proc.returncode == 0, log
    assert not pidfile.exists()
    assert sleeper.poll() is None, "the process the stale pidfile named was left alone"


def test_the_live_pidfile_of_a_running_supervisor_is_refused_and_left_as_it_is(
        db_path, kg_service, tmp_path, processes):
    pidfile = tmp_path / "kgs.pid"
    first = processes.supervisor(db_path, kg_service, "--workers", "1", "--status-addr", "off",
                                 "--pidfile", str(pidfile))
    wait_for(lambda: pid_in(pidfile) == str(first.pid), 20, message="the first supervisor's pidfile")
    second = cli("run", "--db", db_path, "--service-url", kg_service, "--status-addr", "off",
                 "--pidfile", str(pidfile))
    assert f"another supervisor (pid {first.pid}) is running" in one_line(second)
    assert pid_in(pidfile) == str(first.pid)
    first.stop(signal.SIGTERM, timeout=30)
    assert first.returncode == 0
    assert not pidfile.exists()


@pytest.mark.hostile
def test_a_pidfile_naming_a_live_kgsupervisor_that_does_not_hold_it_is_refused(db_path, kg_service, tmp_path,
                                                                                processes):
    # A kgsupervisor process (here a dev-service) whose pid the file names, without the lock.
    other = processes.kgsupervisor(["dev-service", "--port", "0"], name="dev-service")
    other.wait_for_log("dev-service listening on")  # its command line is in place
    pidfile = tmp_path / "kgs.pid"
    pidfile.write_text(f"{other.pid}\n")
    result = cli("run", "--db", db_path, "--service-url", kg_service, "--status-addr", "off",
                 "--pidfile", str(pidfile))
    assert f"names pid {other.pid}, a running kgsupervisor that does not hold it" in one_line(result)
    assert pid_in(pidfile) == str(other.pid)
    record_hostile("`--pidfile` naming a live kgsupervisor process that does not hold its lock",
                   "refused in one line naming that pid; the file still holds it", "— (refused at start)")


def test_at_exit_the_pidfile_is_removed_only_while_it_is_still_ours(tmp_path):
    path = tmp_path / "kgs.pid"
    pidfile = Pidfile(str(path))
    pidfile.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    replacement = tmp_path / "replacement"
    replacement.write_text("someone else's file\n")
    os.replace(replacement, path)  # replaced while we ran (by hand, or a restarted supervisor)
    pidfile.release()
    assert path.read_text() == "someone else's file\n"

    pidfile = Pidfile(str(tmp_path / "second.pid"))
    pidfile.acquire()
    pidfile.release()
    assert not (tmp_path / "second.pid").exists()


@pytest.mark.parametrize("text, pid", [("123\n", 123), ("  77 \n", 77), ("", None), ("0\n", None),
                                       ("12\n34\n", None), ("99999999999999999999\n", None), ("x1\n", None)])
def test_only_a_single_pid_line_is_a_pid(text, pid):
    assert parse_pid(text) == pid


# -- 2. one line, not a traceback ----------------------------------------------------------------


# The reliability report's table lists the cases marked `hostile`; the others repeat one of them.
@pytest.mark.parametrize("args, message, given", [
    pytest.param(["enqueue", "--db", "{db}", "99999999999999999999"], "content_id=99999999999999999999: expected an integer from -9223372036854775808 to 9223372036854775807",
                 "`enqueue 99999999999999999999`", marks=pytest.mark.hostile),
    (["enqueue", "--db", "{db}", "--priority", "-99999999999999999999", "1"], "priority=-99999999999999999999: expected an integer from",
     "`enqueue --priority -99999999999999999999`"),
    pytest.param(["retry", "--db", "{db}", "--id", "99999999999999999999"], "queue id=99999999999999999999: expected an integer from",
                 "`retry --id 99999999999999999999`", marks=pytest.mark.hostile),
    pytest.param(["stop", "--pidfile", "{tmp}"], "is a directory, not a pidfile", "`stop --pidfile /tmp` (a directory)",
                 marks=pytest.mark.hostile),
    (["reload", "--pidfile", "{tmp}"], "is a directory, not a pidfile", "`reload --pidfile /tmp` (a directory)"),
    pytest.param(["stop", "--pidfile", "{tmp}/garbage.pid"], "holds no pid: it is not a kgsupervisor pidfile",
                 "`stop --pidfile` naming a file that holds no pid", marks=pytest.mark.hostile),
    (["stop", "--pidfile", "{tmp}/huge.pid"], "holds no pid", "`stop --pidfile` naming a file holding a 20-digit pid"),
    pytest.param(["run", "--db", "{db}", "--service-url", "http://127.0.0.1:1", "--pidfile", "{tmp}"], "is a directory",
                 "`run --pidfile /tmp` (a directory)", marks=pytest.mark.hostile),
    pytest.param(["queue", "--db", "{tmp}/notes.txt/kg.db"], "cannot be reached: Not a directory",
                 "`queue --db notes.txt/kg.db` (a file where a directory is expected)", marks=pytest.mark.hostile),
])
def test_careless_values_are_one_line_errors(db_path, tmp_path, args, message, given):
    (tmp_path / "garbage.pid").write_text("SQLite format 3\n")
    (tmp_path / "huge.pid").write_text("99999999999999999999\n")
    (tmp_path / "notes.txt").write_text("a file where a directory is expected\n")
    result = cli(*[a.format(db=db_path, tmp=tmp_path) for a in args])
    assert message in one_line(result)
    record_hostile(given, f'one line, no traceback: "…{message}…"',
                   "— (refused at start)" if args[0] == "run" else "— (refused)")


@pytest.fixture
def unsearchable_dir() -> Iterator[pathlib.Path]:
    """A database in a directory only root may enter (the test runs as root; the command as nobody)."""
    outer = pathlib.Path(tempfile.mkdtemp(prefix="kgs-unsearchable-"))
    try:
        outer.chmod(0o755)
        inner = outer / "private"
        inner.mkdir(mode=0o700)
        init_db(str(inner / "kg.db"))
        yield inner
    finally:
        shutil.rmtree(outer)


@pytest.mark.hostile
def test_a_database_in_a_directory_the_user_cannot_enter_is_permission_denied_not_missing(unsearchable_dir):
    nobody = 65534
    result = cli("queue", "--db", str(unsearchable_dir / "kg.db"), user=nobody)
    line = one_line(result)
    assert "Permission denied" in line and "does not exist" not in line
    record_hostile("`queue --db` under a directory the user cannot enter",
                   'one line saying "Permission denied", not "does not exist"', "— (refused)")


@pytest.fixture
def immutable_db(tmp_path) -> Iterator[str]:
    """A database with a failed and a pending-less document, whose file is then made immutable
    (chattr +i: root ignores permission bits, not this flag), as a read-only file is to others."""
    why_not = _chattr_works(str(tmp_path))
    if why_not:
        pytest.fail(f"this test needs chattr +i here: {why_not}")
    path = str(tmp_path / "kg.db")
    init_db(path)
    conn = connect(path)
    ids = seed(conn, 2)
    conn.execute("UPDATE kg_processing_queue SET status = 'failed' WHERE content_id = ?", (ids[0],))
    conn.execute("DELETE FROM kg_processing_queue WHERE content_id = ?", (ids[1],))
    conn.close()
    subprocess.run(["chattr", "+i", path], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", path], capture_output=True)


@pytest.mark.parametrize("args", [pytest.param(["enqueue", "2"], marks=pytest.mark.hostile),
                                  ["enqueue", "--all-unprocessed"],
                                  pytest.param(["retry", "--failed"], marks=pytest.mark.hostile)])
def test_writes_to_a_read_only_database_are_one_line(immutable_db, args):
    result = cli(args[0], "--db", immutable_db, *args[1:])
    line = one_line(result)
    assert "read-only" in line and immutable_db in line
    record_hostile(f"`{' '.join(args)}` on a read-only database file",
                   "one line naming the file as read-only", "— (refused)")


@pytest.mark.hostile
def test_an_extra_not_null_column_without_default_is_named_in_one_line(tmp_path):
    path = str(tmp_path / "kg.db")
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE kg_processing_queue (id INTEGER PRIMARY KEY AUTOINCREMENT, content_id, "
                "status TEXT DEFAULT 'pending', priority INTEGER DEFAULT 1, queued_at, processing_started_at, "
                "processed_at, retry_count INTEGER DEFAULT 0, error_message, result_summary, skipped_reason, "
                "tenant TEXT NOT NULL)")
    raw.commit()
    raw.close()
    init_db(path)
    conn = connect(path)
    ids = add_documents(conn, 1, chunks=2, seed=1)
    conn.close()
    for args in ([str(ids[0])], ["--all-unprocessed"]):
        result = cli("enqueue", "--db", path, *args)
        assert "column kg_processing_queue.tenant is NOT NULL without a default" in one_line(result)
    record_hostile("`enqueue` when the queue table has an extra NOT NULL column without a default",
                   "one line naming the column kg_processing_queue.tenant", "— (refused)")


# -- 3. health and status know a kgsupervisor status endpoint from any HTTP service ----------------


def http_service(status: int, content_type: str, body: bytes) -> ThreadingHTTPServer:
    """A real HTTP server on 127.0.0.1 answering every GET the same; shut down by the caller."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.mark.parametrize("content_type, body", [
    ("text/plain", b"OK\n"),
    ("application/json", b'{"status": "healthy"}'),
    ("application/json", b"[1, 2]"),
    ("application/json", b'{"healthy_workers": 1}'),
])
# The reliability report's table lists `health` (marked `hostile`); the other commands answer alike.
@pytest.mark.parametrize("command", [pytest.param(["health"], marks=pytest.mark.hostile), ["health", "--json"],
                                     ["status"], ["status", "--json"]])
def test_health_and_status_refuse_an_http_service_that_is_not_kgsupervisor(content_type, body, command):
    httpd = http_service(200, content_type, body)
    try:
        addr = f"127.0.0.1:{httpd.server_address[1]}"
        result = cli(*command, "--status-addr", addr)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert result.returncode == 2 and result.stdout == ""
    assert f"{addr} is not a kgsupervisor status endpoint" in one_line(result)
    record_hostile(f"`{' '.join(command)}` pointed at an HTTP service answering 200 {content_type} "
                   f"{body.decode().strip()}", '"… is not a kgsupervisor status endpoint", exit 2', "— (no supervisor)")


def test_health_says_unhealthy_when_the_status_process_answers_but_the_supervisor_does_not():
    server = StatusServer(_listening_socket(), fetch=lambda: None)  # the supervisor never answers
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        addr = f"127.0.0.1:{server.server_address[1]}"
        health = cli("health", "--status-addr", addr)
        status = cli("status", "--status-addr", addr)
    finally:
        server.shutdown()
        server.server_close()
    assert health.returncode == 1 and "does not answer its status process" in health.stderr
    assert health.stderr.startswith("unhealthy: ") and "Traceback" not in health.stderr
    assert status.returncode == 1 and "does not answer its status process" in one_line(status)


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


# -- 4. smaller ----------------------------------------------------------------------------------


@pytest.mark.hostile
def test_stop_names_the_unrelated_process_a_stale_pidfile_points_at_and_leaves_it_alone(tmp_path, sleeper):
    pidfile = tmp_path / "kgs.pid"
    pidfile.write_text(f"{sleeper.pid}\n")
    for command in ("stop", "reload"):
        line = one_line(cli(command, "--pidfile", str(pidfile)))
        assert f"pid {sleeper.pid} is a running 'sleep' process, not kgsupervisor; not signalled" in line
    assert sleeper.poll() is None
    assert pid_in(pidfile) == str(sleeper.pid)
    record_hostile("`stop` / `reload` with a pidfile naming a live `sleep` process",
                   "one line: \"pid N is a running 'sleep' process, not kgsupervisor; not signalled\"; "
                   "it lives on", "— (refused)")


@pytest.mark.hostile
def test_queue_shows_statuses_it_does_not_know(db_path):
    conn = connect(db_path)
    ids = seed(conn, 4)
    conn.execute("UPDATE kg_processing_queue SET status = 'weird' WHERE content_id = ?", (ids[0],))
    conn.execute("UPDATE kg_processing_queue SET status = NULL WHERE content_id = ?", (ids[1],))
    conn.close()
    counts = json.loads(cli("queue", "--db", db_path, "--json").stdout)
    assert counts == {"pending": 2, "processing": 0, "completed": 0, "failed": 0, "skipped": 0,
                      "weird": 1, "(none)": 1, "total": 4}
    plain = cli("queue", "--db", db_path)
    assert plain.returncode == 0
    lines = {line.split()[0]: line for line in plain.stdout.splitlines()}
    assert lines["weird"].split()[1] == "1" and "never claimed" in lines["weird"]
    assert lines["(none)"].split()[1] == "1" and "never claimed" not in lines["pending"]
    record_hostile("queue rows with status 'weird' and NULL",
                   "`queue` shows both: weird (noted as never claimed) and (none)", "no")


@pytest.mark.hostile
def test_sigterm_during_start_up_drains_exits_0_and_removes_the_pidfile(db_path, kg_service, tmp_path,
                                                                        processes):
    pidfile = tmp_path / "kgs.pid"
    # A writer holding the database keeps the supervisor in its start-up checks, after the
    # pidfile and before its signal handlers: the SIGTERM lands exactly in that window.
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        proc = processes.supervisor(db_path, kg_service, "--workers", "1", "--status-addr", "off",
                                    "--pidfile", str(pidfile))
        wait_for(lambda: pid_in(pidfile) == str(proc.pid), 20, message="the pidfile written")
        proc.send_signal(signal.SIGTERM)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    log = proc.stop(None, timeout=30)
    assert proc.returncode == 0, log
    assert not pidfile.exists()
    assert "draining (stop signal)" in log and "Traceback" not in log
    record_hostile("SIGTERM during start-up (the database write-locked by another process)",
                   "drains, exits 0, pidfile removed, no traceback", "no")


@pytest.mark.hostile
def test_a_term_to_the_whole_process_group_is_one_drain_every_document_in_flight_completes(
        db_path, fault_server, processes):
    conn = connect(db_path)
    seed(conn, 6)
    answers = threading.Event()  # documents in flight until the TERM is sent
    server = fault_server(held_until(answers))
    proc = processes.supervisor(db_path, server.url, "--workers", "2", "--batch-size", "1", "--adaptive", "off",
                                "--status-addr", "off")
    wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
    workers = worker_pids(proc)
    in_flight = sorted(p["content_id"] for p in server.requests)
    proc.signal_group(signal.SIGTERM)  # what GNU timeout and `kill -- -PGID` do
    answers.set()  # each worker has its TERM pending before its answer can arrive
    err = proc.stop(None, timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "stopped at once" not in err, err
    assert len(workers) == 2
    for pid in workers:
        assert f"(pid {pid}) exited with status 0" in err
    completed = [r[0] for r in conn.execute(
        "SELECT content_id FROM kg_processing_queue WHERE status = 'completed' ORDER BY content_id")]
    assert completed == in_flight, err
    assert status_counts(conn) == {"completed": 2, "pending": 4}
    conn.close()
    record_hostile("SIGTERM to the whole process group (GNU timeout, `kill -- -PGID`), 2 documents in flight",
                   "one drain: both in-flight documents completed, workers exit 0, no KeyboardInterrupt", "no")


@pytest.mark.parametrize("addr, shown", [pytest.param("[::1]:0", "status endpoint on http://[::1]:",
                                                      marks=pytest.mark.hostile),
                                         ("[::]:0", "status endpoint listens on [::]:")])
def test_ipv6_status_addresses_are_logged_in_brackets(db_path, kg_service, processes, addr, shown):
    # [::] listens beyond this host: its console needs an operator token to start.
    proc = processes.supervisor(db_path, kg_service, "--workers", "1", "--status-addr", addr,
                                "--exit-when-empty", env={"KG_CONSOLE_TOKEN": "ipv6-test-operator-token"})
    log = proc.stop(None, timeout=30)
    assert proc.returncode == 0, log
    assert shown in log
    record_hostile(f"`run --status-addr {addr}` (IPv6)", f'logged in brackets: "{shown}…"', "no")


def test_an_unreachable_ipv6_status_address_is_named_in_brackets():
    result = cli("health", "--status-addr", "[::1]:1")
    assert result.returncode == 2 and "no supervisor answering on [::1]:1 " in result.stderr


@pytest.mark.parametrize("host, port, shown", [("127.0.0.1", 9188, "127.0.0.1:9188"), ("::1", 9188, "[::1]:9188"),
                                               ("localhost", 80, "localhost:80")])
def test_host_port_brackets_ipv6_only(host, port, shown):
    assert logs.host_port(host, port) == shown


def test_status_text_lists_statuses_outside_the_known_set():
    queue = {"pending": 1, "processing": 0, "completed": 2, "failed": 0, "skipped": 0, "weird": 3, "total": 6}
    text = render.status_text({"stats": {"queue_size": queue}, "health": {}})
    assert "queue: 1 pending, 0 processing, 2 completed, 0 failed, 0 skipped, 3 weird" in text


def test_run_gives_its_caller_the_signal_mask_back(db_path):
    """`run` holds the stop signals while it starts; called in-process it must not leave them held."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    result = CliRunner().invoke(main, ["run", "--db", db_path, "--print-config"])
    assert result.exit_code == 0, result.output
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
