"""SIGHUP on a real `kgsupervisor run`: what a reload keeps, what it refuses, and in which order
new workers replace old ones."""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from kgsupervisor.kg.devservice import make_server
from kgsupervisor.store.schema import init_db

from .chaos.harness import record_hostile
from .conftest import seed, status_counts, wait_for
from .processes import FAST, Process, Processes, free_port, worker_pids
from .test_supervisor import completed_once

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

REFUSED = "reload refused, keeping the running configuration and workers"


class Running:
    """A `kgsupervisor run` started by the process harness (`proc`), and its status endpoint on a
    free loopback port."""

    def __init__(self, processes: Processes, *args: str, env: dict | None = None) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.proc: Process = processes.kgsupervisor(
            ["run", "--poll-interval", "0.2", "--status-addr", self.addr, *args], env={**FAST, **(env or {})})

    def text(self) -> str:
        return self.proc.output

    def workers(self) -> set[int]:
        return worker_pids(self.proc)

    def stats(self) -> dict:
        """/stats, or {} while the endpoint does not answer yet."""
        try:
            return requests.get(f"http://{self.addr}/stats", timeout=5).json()
        except requests.RequestException:
            return {}

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def wait_workers(self, count: int, other_than: set[int] = frozenset()) -> set[int]:
        """Wait until exactly `count` workers run, none of them in `other_than`; returns their pids."""
        def ready() -> set[int] | None:
            pids = self.workers()
            return pids if len(pids) == count and not pids & other_than else None
        return wait_for(ready, 20, message=f"{count} worker(s) other than {sorted(other_than)}")

    def wait_restarts(self, n: int) -> None:
        wait_for(lambda: self.stats().get("workers_restarted") == n, 20, message=f"workers_restarted == {n}")

    def stop(self) -> str:
        """SIGTERM, wait for the exit 0, return the log."""
        log = self.proc.stop(signal.SIGTERM, timeout=30)
        assert self.proc.returncode == 0, log
        return log


@pytest.fixture
def supervisor(processes) -> Callable[..., Running]:
    """Starts Running supervisors (`kgsupervisor run ARGS`) through the `processes` fixture, which
    kills any still running at teardown with its process group."""
    def start(*args: str, env: dict | None = None) -> Running:
        return Running(processes, *args, env=env)
    return start


@pytest.fixture
def token_service() -> Iterator[str]:
    """The reference KG service requiring the bearer token `s3cret`; yields its base URL."""
    server = make_server("127.0.0.1", 0, token="s3cret")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def completed(conn, n: int) -> None:
    wait_for(lambda: status_counts(conn) == {"completed": n}, 30, message=f"{n} completed")


@pytest.mark.hostile
def test_a_reload_after_the_token_file_vanished_is_refused_and_the_workers_keep_going(
        tmp_path, conn, db_path, token_service, supervisor):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    sup = supervisor("--db", db_path, "--service-url", token_service, "--workers", "2",
                     env={"KG_SERVICE_TOKEN_FILE": str(token)})
    old = sup.wait_workers(2)
    seed(conn, 4)
    completed(conn, 4)

    token.unlink()
    sup.hup()
    wait_for(lambda: REFUSED in sup.text(), 20, message="the refusal logged")
    (refusal,) = [line for line in sup.text().splitlines() if REFUSED in line]
    assert f"service_token_file='{token}'" in refusal, refusal
    seed(conn, 4)
    completed(conn, 8)  # the running workers hold the token they started with
    assert sup.workers() == old, "no worker was replaced"
    assert sup.stats()["workers_restarted"] == 0

    token.write_text("s3cret\n")
    sup.hup()
    sup.wait_restarts(1)
    sup.wait_workers(2, other_than=old)
    seed(conn, 2)
    completed(conn, 10)
    log = sup.stop()
    assert log.count(REFUSED) == 1 and "exited with status 3" not in log and "cannot start" not in log, log
    record_hostile("SIGHUP after the token file vanished",
                   "reload refused in one line naming the file; the old workers keep completing documents; "
                   "a later SIGHUP with the file back reloads", "no")


def test_a_reload_to_a_bad_toml_file_or_another_database_is_refused_and_the_old_config_kept(
        tmp_path, conn, db_path, kg_service, supervisor):
    cfg = tmp_path / "kgsupervisor.toml"
    cfg.write_text(f'db_path = "{db_path}"\nnum_workers = 2\n')
    sup = supervisor("--config", str(cfg), "--service-url", kg_service)
    old = sup.wait_workers(2)

    cfg.write_text("num_workers = = 3\n")
    sup.hup()
    wait_for(lambda: sup.text().count(REFUSED) == 1, 20, message="the bad TOML refused")
    assert "expected valid TOML" in sup.text()

    other = str(tmp_path / "other.db")
    init_db(other)
    cfg.write_text(f'db_path = "{other}"\nnum_workers = 2\n')
    sup.hup()
    wait_for(lambda: sup.text().count(REFUSED) == 2, 20, message="the other database refused")
    assert f"KG_DB_PATH='{other}': expected the running database {db_path}" in sup.text()

    seed(conn, 4)
    completed(conn, 4)
    assert sup.workers() == old and sup.stats()["workers_restarted"] == 0

    cfg.write_text(f'db_path = "{db_path}"\nnum_workers = 3\n')
    sup.hup()
    sup.wait_restarts(1)
    sup.wait_workers(3, other_than=old)
    sup.stop()


@pytest.mark.hostile
def test_a_worker_count_set_by_sigttin_survives_a_reload_unless_the_config_changes_it(
        tmp_path, db_path, kg_service, supervisor):
    cfg = tmp_path / "kgsupervisor.toml"
    cfg.write_text("num_workers = 2\n")
    sup = supervisor("--config", str(cfg), "--db", db_path, "--service-url", kg_service)
    sup.wait_workers(2)
    sup.proc.send_signal(signal.SIGTTIN)
    three = sup.wait_workers(3)

    sup.hup()  # the file still says 2: the count set by SIGTTIN stays
    sup.wait_restarts(1)
    three_again = sup.wait_workers(3, other_than=three)
    assert "keeping 3 worker(s) set by SIGTTIN/SIGTTOU (configured: 2)" in sup.text()

    cfg.write_text("num_workers = 1\n")
    sup.hup()  # the file changed the count: it wins
    sup.wait_restarts(2)
    sup.wait_workers(1, other_than=three_again)
    sup.stop()
    record_hostile("SIGHUP after SIGTTIN raised the worker count from 2 to 3",
                   "3 workers kept, logged as set by SIGTTIN/SIGTTOU; a count changed in the file wins", "no")


def test_on_reload_new_workers_start_before_the_old_ones_leave(conn, db_path, fault_server, supervisor):
    ids = seed(conn, 2)
    gate = threading.Event()

    def held_until_the_gate_opens(payload: dict, n: int) -> None:
        assert gate.wait(30), "the gate never opened"

    server = fault_server(held_until_the_gate_opens)
    sup = supervisor("--db", db_path, "--service-url", server.url, "--workers", "2", "--batch-size", "1",
                     "--adaptive", "off")
    try:
        old = sup.wait_workers(2)
        wait_for(lambda: len(server.requests) == 2, 20, message="two documents in flight")
        sup.hup()
        # Both old workers still hold their document while their replacements already run.
        wait_for(lambda: len(sup.workers() - old) == 2, 20, message="two new workers")
        assert old <= sup.workers()
        assert status_counts(conn) == {"processing": 2}
    finally:
        gate.set()
    sup.wait_workers(2, other_than=old)
    completed(conn, 2)
    sup.stop()
    completed_once(conn, ids)
    assert len(server.requests) == 2, "the old workers finished their documents; none was sent again"
