"""A throwaway PostgreSQL server for the tests: initdb and pg_ctl in a temp dir, on a free port.

As root (initdb refuses root) the server runs as the `postgres` user through runuser. It never
skips: a machine without the server programs fails with the reason and how to install them
(`make test` installs Debian's postgresql package when it is missing).
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile

INSTALL_HINT = "install the PostgreSQL server (Debian: apt-get install postgresql), or run `make test`"


def server_bin_dir() -> str:
    """The directory of initdb/pg_ctl: PATH first, then Debian's versioned directories."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if not candidates:
        raise RuntimeError(f"no PostgreSQL server programs (initdb, pg_ctl) on this machine: {INSTALL_HINT}")
    return os.path.dirname(candidates[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One private server: trust auth on 127.0.0.1 and a unix socket in its own directory."""

    def __init__(self) -> None:
        self.bin = server_bin_dir()
        self.root = tempfile.mkdtemp(prefix="kgsupervisor-pg-")
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.port = _free_port()
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._started = False

    def _run(self, *args: str, timeout: float = 120) -> None:
        cmd = [os.path.join(self.bin, args[0]), *args[1:]]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = open(self.log).read()[-2000:] if os.path.exists(self.log) else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]} {log}")

    def start(self) -> PostgresServer:
        """Create the cluster (the first time) and start the server; returns self."""
        if not os.path.exists(self.data):
            # fsync off: a test database that outlives a power cut is of no use to anyone.
            self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync", "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-o", options, "-w", "-t", "60", "start")
        self._started = True
        return self

    def halt(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data, as an outage or a restart does (start() again)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop", timeout=60)
        self._started = False

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self._started:
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
