"""Shared fixtures: real SQLite files, real HTTP servers on 127.0.0.1, real processes."""
from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kgsupervisor import config
from kgsupervisor.kg.devservice import make_server
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

from .faultserver import FaultServer
from .pgserver import PostgresServer
# The process helpers live in tests/processes.py; tests import these names from here too.
from .processes import (KGSUPERVISOR, Processes, free_port, kill_groups, spawn,  # noqa: F401 - re-exported
                        wait_for, wait_for_log)


def held_until(gate: threading.Event, timeout: float = 60.0) -> Callable[[dict, int], None]:
    """A fault-server behaviour: hold each answer until `gate` is set (`timeout` s at most), then
    answer like the reference service. Documents stay in flight until the test says."""
    def behaviour(payload: dict, n: int) -> None:
        gate.wait(timeout)
    return behaviour


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    """Starts real processes for one test, each logging to a file in tmp_path/processes (apart from
    the files the test makes); whatever is still running at teardown is killed with its whole group."""
    started = Processes(tmp_path / "processes")
    yield started
    started.kill_all()


@pytest.fixture
def db_path(tmp_path) -> str:
    """A fresh, migrated, file-backed WAL database (never :memory:: the queue spans processes)."""
    path = str(tmp_path / "kg.db")
    init_db(path)
    return path


@pytest.fixture
def conn(db_path) -> Iterator[sqlite3.Connection]:
    c = connect(db_path)
    yield c
    c.close()


def seed(conn: sqlite3.Connection, count: int, chunks: int = 3, priority: int = 1) -> list[int]:
    """Add `count` documents and queue each of them; returns their content ids."""
    ids = add_documents(conn, count, chunks=chunks, seed=count)
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, ?)",
                     [(i, priority) for i in ids])
    return ids


@pytest.fixture
def kg_service() -> Iterator[str]:
    """The reference KG service on 127.0.0.1, in a thread; yields its base URL."""
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fault_server() -> Iterator[Callable[..., FaultServer]]:
    """Factory of scripted faulty KG services; all are closed at teardown."""
    servers: list[FaultServer] = []

    def start(behaviour=None, healthy: bool = True, health_status: str = "healthy") -> FaultServer:
        servers.append(FaultServer(behaviour, healthy, health_status=health_status))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def worker_factory():
    """Factory of in-process workers (init_process done); each is shut down at teardown."""
    from kgsupervisor.worker.kgworker import KGWorker
    workers = []

    def make(settings: config.Settings) -> KGWorker:
        w = KGWorker(settings)
        w.init_process()
        workers.append(w)
        return w

    yield make
    for w in workers:
        w.shutdown()


def drive(worker, until: Callable[[], object], timeout: float = 20.0) -> None:
    """Run loop_once steps (as the real loop does, waits included) until `until()` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "worker did not reach the expected state"
        wait = worker.loop_once(time.time())
        if wait:
            worker.wait_for_work(min(wait, 0.05))


def make_settings(db_path: str, service_url: str, **overrides) -> config.Settings:
    """Settings for fast tests: short polls and backoffs."""
    values = dict(db_path=db_path, service_url=service_url, poll_interval=0.1, retry_backoff=0.05,
                  retry_backoff_max=0.2, service_timeout=5.0, lease_seconds=10.0)
    values.update(overrides)
    settings = config.Settings(**values)
    config.validate(settings)
    return settings


def status_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status").fetchall())


def pytest_addoption(parser) -> None:
    parser.addoption("--soak", action="store_true", default=False,
                     help="fault suite: many more documents and longer runs (minutes, not seconds)")


@pytest.fixture
def soak(request) -> bool:
    """True under --soak: scenarios scale their documents and durations up."""
    return request.config.getoption("--soak")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL server for the whole run; a test database per test."""
    try:
        server = PostgresServer().start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"cannot start a PostgreSQL server for the tests: {exc}", pytrace=False)
    yield server
    server.stop()


@dataclasses.dataclass
class Backend:
    """One migrated test database, SQLite file or PostgreSQL database, and how to open it."""

    kind: str
    target: str  # a path or a postgresql:// URL

    def connect(self):
        if self.kind == "sqlite":
            return connect(self.target)
        from kgsupervisor.store.postgres import PGConnection
        return PGConnection(self.target)


def make_backend(kind: str, tmp_path, request) -> Backend:
    """A fresh migrated database of `kind`: a file in tmp_path, or a database on the test server."""
    if kind == "sqlite":
        path = str(tmp_path / "kg.db")
        init_db(path)
        return Backend("sqlite", path)
    from kgsupervisor.store.pgschema import migrate_pg
    from kgsupervisor.store.postgres import PGConnection
    server = request.getfixturevalue("pg_server")
    url = server.create_database(f"t_{os.getpid()}_{time.monotonic_ns()}")
    conn = PGConnection(url)
    try:
        migrate_pg(conn)
    finally:
        conn.close()
    return Backend("postgres", url)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request, tmp_path) -> Backend:
    """The queue contract runs once per backend."""
    return make_backend(request.param, tmp_path, request)


@pytest.fixture
def pg_backend(request, tmp_path) -> Backend:
    """A PostgreSQL database, for what only that backend has (SKIP LOCKED, striped counts)."""
    return make_backend("postgres", tmp_path, request)
