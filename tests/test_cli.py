"""The command line through click's CliRunner and as real subprocesses."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kgsupervisor.cli import main

from .conftest import seed, status_counts

pytestmark = pytest.mark.timeout(60)


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kgsupervisor", *args], capture_output=True, text=True,
                          timeout=30, env=env)


def test_init_db_creates_then_is_idempotent(tmp_path):
    path = str(tmp_path / "x.db")
    runner = CliRunner()
    first = runner.invoke(main, ["init-db", "--db", path])
    assert first.exit_code == 0 and "created table kg_processing_queue" in first.output
    second = runner.invoke(main, ["init-db", "--db", path])
    assert second.exit_code == 0 and "(0 change(s))" in second.output


def test_enqueue_queue_and_retry(conn, db_path):
    ids = seed(conn, 3)
    conn.execute("DELETE FROM kg_processing_queue")
    runner = CliRunner()
    r = runner.invoke(main, ["enqueue", "--db", db_path, str(ids[0]), str(ids[1]), "--priority", "5"])
    assert r.exit_code == 0 and "queued 2 document(s)" in r.output
    r = runner.invoke(main, ["enqueue", "--db", db_path, str(ids[0])])
    assert "queued 0" in r.output and f"already pending or processing: {ids[0]}" in r.output
    r = runner.invoke(main, ["enqueue", "--db", db_path, "--all-unprocessed"])
    assert "queued 1 unprocessed" in r.output
    r = runner.invoke(main, ["queue", "--db", db_path, "--json"])
    assert json.loads(r.output) == {"pending": 3, "processing": 0, "completed": 0, "failed": 0,
                                    "skipped": 0, "total": 3}
    conn.execute("UPDATE kg_processing_queue SET status = 'failed', retry_count = 5")
    r = runner.invoke(main, ["retry", "--db", db_path, "--failed"])
    assert r.exit_code == 0 and "3 row(s) back to pending" in r.output
    assert status_counts(conn) == {"pending": 3}


def test_enqueue_of_unknown_ids_says_so_and_exits_1(conn, db_path):
    r = CliRunner().invoke(main, ["enqueue", "--db", db_path, "12345"])
    assert r.exit_code == 1 and "not in crawled_content, not queued: 12345" in r.output


@pytest.mark.parametrize("args, message", [
    (["queue", "--db", "{tmp}/missing.db"], "does not exist"),
    (["queue", "--db", "{tmp}/notes.txt"], "is not an SQLite database"),
    (["queue", "--db", "{tmp}/other.db"], "no kg_processing_queue table"),
    (["worker", "--db", "{tmp}/x.db", "--service-url", "localhost:8088"], "--service-url='localhost:8088': expected an http"),
    (["worker", "--db", "{tmp}/x.db", "--batch-size", "0"], "--batch-size=0"),
    (["worker", "--service-url", "http://127.0.0.1:1"], "KG_DB_PATH"),
    (["worker", "--db", "{tmp}/x.db", "--config", "{tmp}/nope.toml"], "--config"),
    (["worker", "--db", "{tmp}/x.db", "--config", "{tmp}/bad.toml"], "bogus_key"),
    (["enqueue", "--db", "{tmp}/x.db"], "give document ids or --all-unprocessed"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("plain text, not a database\n")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    (tmp_path / "bad.toml").write_text("bogus_key = 1\n")
    from kgsupervisor.schema import init_db
    init_db(str(tmp_path / "x.db"))
    proc = run(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(message in line for line in lines), proc.stderr
    assert lines[-1].startswith("Error"), proc.stderr


def test_env_config_file_and_flag_precedence(tmp_path, db_path):
    from kgsupervisor import config
    cfg = tmp_path / "kg.toml"
    cfg.write_text('batch_size = 7\npoll_interval = 2.0\nservice_url = "http://file:1"\n')
    settings, sources = config.load({"service_url": "http://flag:1"},
                                    {"KG_POLL_INTERVAL": "3.5", "KG_DB_PATH": db_path}, str(cfg))
    assert (settings.batch_size, sources["batch_size"]) == (7, f"file {cfg}")
    assert (settings.poll_interval, sources["poll_interval"]) == (3.5, "env")
    assert (settings.service_url, sources["service_url"]) == ("http://flag:1", "flag")
    assert settings.num_workers == 2 and sources["num_workers"] == "default"


def test_every_command_has_help():
    runner = CliRunner()
    for name, command in main.commands.items():
        r = runner.invoke(main, [name, "--help"])
        assert r.exit_code == 0 and command.help, name


def test_queue_plain_output_as_a_subprocess(conn, db_path):
    seed(conn, 2)
    proc = run("queue", "--db", db_path)
    assert proc.returncode == 0
    assert [line.split() for line in proc.stdout.splitlines()][0] == ["pending", "2"]
