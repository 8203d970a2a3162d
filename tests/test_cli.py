"""The command line through click's CliRunner and as real subprocesses."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kgsupervisor.ops.cli import main

from .chaos.harness import record_hostile
from .conftest import kill_groups, seed, spawn, status_counts, wait_for

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


# docs/operating.md, Commands: a user mistake exits 1, a bad setting (a value, a config file,
# the command line) 2.
@pytest.mark.parametrize("args, message, code", [
    (["queue", "--db", "{tmp}/missing.db"], "does not exist", 1),
    (["queue", "--db", "{tmp}/notes.txt"], "is not an SQLite database", 1),
    (["queue", "--db", "{tmp}/other.db"], "no kg_processing_queue table", 1),
    (["worker", "--db", "{tmp}/x.db", "--service-url", "localhost:8088"], "--service-url='localhost:8088': expected an http", 2),
    (["worker", "--db", "{tmp}/x.db", "--batch-size", "0"], "--batch-size=0", 2),
    (["worker", "--service-url", "http://127.0.0.1:1"], "KG_DB_PATH", 2),
    (["worker", "--db", "{tmp}/x.db", "--config", "{tmp}/nope.toml"], "--config", 2),
    (["worker", "--db", "{tmp}/x.db", "--config", "{tmp}/bad.toml"], "bogus_key", 2),
    (["enqueue", "--db", "{tmp}/x.db"], "give document ids or --all-unprocessed", 2),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, message, code):
    (tmp_path / "notes.txt").write_text("plain text, not a database\n")
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.commit()
    (tmp_path / "bad.toml").write_text("bogus_key = 1\n")
    from kgsupervisor.store.schema import init_db
    init_db(str(tmp_path / "x.db"))
    proc = run(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == code, proc.stderr
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


# -- hostile and careless settings: one line on stderr, exit 2, before anything forks ------------

def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any KG_* variable of the caller, plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("KG_")}, **extra}


def refused(proc: subprocess.CompletedProcess, *secrets: str) -> str:
    """The one stderr line of a command refused for a bad setting (exit 2, no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert not any(secret in proc.stderr + proc.stdout for secret in secrets), proc.stderr
    return lines[0]


@pytest.mark.hostile
@pytest.mark.parametrize("args, env, files, message, secrets, given", [
    ([], {"KG_SERVICE_TIMEOUT": "1e10"}, {},
     "KG_SERVICE_TIMEOUT=10000000000.0: expected a number > 0 and <= 86400 (1 day)", (), "KG_SERVICE_TIMEOUT=1e10"),
    (["--service-timeout", "nan"], {}, {}, "--service-timeout=nan: expected a number", (), "--service-timeout nan"),
    (["--poll-interval", "inf"], {}, {}, "--poll-interval=inf: expected a number", (), "--poll-interval inf"),
    (["--drain-timeout", "1e6"], {}, {}, "--drain-timeout=1000000.0: expected a number > 0 and <= 86400", (),
     "--drain-timeout 1e6 (11 days)"),
    (["--workers", "0"], {}, {}, "--workers=0: expected a whole number from 1 to 256", (), "--workers 0"),
    ([], {"KG_SERVICE_URL": "http://[::1"}, {}, "KG_SERVICE_URL='http://[::1': expected an http(s) URL whose host", (),
     "KG_SERVICE_URL=http://[::1 (bracket not closed)"),
    ([], {"KG_SERVICE_URL": "http://kg:hunter2@gpu1:99999"}, {},
     "KG_SERVICE_URL='http://***@gpu1:99999': expected an http(s) URL with a port from 1 to 65535", ("hunter2",),
     "a KG_SERVICE_URL holding user:password@ and port 99999"),
    (["--service-url", "http://gpu1:8088/?x=1"], {}, {}, "--service-url='http://gpu1:8088/?x=1': expected", (),
     "--service-url http://gpu1:8088/?x=1 (a query)"),
    ([], {"KG_STATUS_ADDR": "127.0.0.1:\u00b2"}, {}, "KG_STATUS_ADDR='127.0.0.1:\u00b2': expected HOST:PORT", (),
     "KG_STATUS_ADDR=127.0.0.1:\u00b2 (a superscript digit)"),
    (["--config", "{tmp}/kg.toml"], {}, {"kg.toml": b"kgsupervisor = 5\n"},
     "kg.toml: kgsupervisor=5: expected a [kgsupervisor] table of settings", (), "TOML `kgsupervisor = 5`"),
    (["--config", "{tmp}/kg.toml"], {}, {"kg.toml": b'kgsupervisor = "x"\n'},
     "kg.toml: kgsupervisor='x': expected a [kgsupervisor] table of settings", (), 'TOML `kgsupervisor = "x"`'),
    (["--config", "{tmp}/kg.toml"], {}, {"kg.toml": b"batch_size = 2 # \xff\n"},
     "kg.toml': expected a UTF-8 TOML file (byte 18 is not UTF-8)", (), "a config file that is not UTF-8"),
    ([], {"KG_SERVICE_TOKEN_FILE": "{tmp}/token"}, {"token": "t\u00f6ken-hunter2\n".encode()},
     "token': expected a bearer token of printable ASCII characters "
     "(it contains a non-ASCII character at position 2)", ("hunter2",), "a token file holding a non-ASCII letter"),
    ([], {"KG_SERVICE_TOKEN_FILE": "{tmp}/token"}, {"token": b"\n"}, "token': expected a bearer token of printable "
     "ASCII characters (it is empty)", (), "an empty token file (one newline)"),
    ([], {"KG_SERVICE_TOKEN_FILE": "{tmp}/token"}, {"token": b"hunter2\xff"},
     "(it is not UTF-8 text: byte 8 is invalid)", ("hunter2",), "a token file that is not UTF-8"),
    ([], {"KG_SERVICE_TOKEN": "hunter2\nX-Injected: 1"}, {},
     "service_token='********': expected a bearer token of printable ASCII characters "
     "(it contains a control character at position 8)", ("hunter2", "Injected"),
     "a KG_SERVICE_TOKEN holding a newline and a second header"),
], ids=["timeout-1e10", "timeout-nan", "poll-inf", "drain-too-long", "workers-0", "ipv6-open-bracket",
        "url-password", "url-query", "status-addr-superscript", "toml-table-5", "toml-table-str",
        "toml-not-utf8", "token-non-ascii", "token-empty", "token-not-utf8", "token-newline"])
def test_run_refuses_a_hostile_setting_in_one_line_before_forking(tmp_path, db_path, args, env, files, message,
                                                                  secrets, given):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    fill = {k: v.format(tmp=tmp_path) for k, v in env.items()}
    # --exit-when-empty on an empty queue: a setting let through would exit 0, not hang the test.
    proc = run("run", "--db", db_path, "--exit-when-empty", *[a.format(tmp=tmp_path) for a in args],
               env=clean_env(**{"KG_STATUS_ADDR": "off", **fill}))
    line = refused(proc, *secrets)
    assert message in line, line
    assert "--num-workers" not in line and "started" not in proc.stderr
    record_hostile(f"`run` with {given}", f'refused in one line before forking: "… expected '
                   f'{line.split(": expected ", 1)[1]}"', "— (refused at start)")


@pytest.mark.hostile
def test_worker_refuses_a_bad_token_in_one_line(tmp_path, db_path):
    (tmp_path / "token").write_bytes(b"\xef\xbb\xbfhunter2 \x01\n")
    proc = run("worker", "--db", db_path, "--once", env=clean_env(KG_SERVICE_TOKEN_FILE=str(tmp_path / "token")))
    assert "(it contains a control character at position 9)" in refused(proc, "hunter2")
    record_hostile("`worker` with a token file holding a BOM, then a control character inside the token",
                   "refused in one line naming the control character's position, never the token",
                   "— (refused at start)")


@pytest.mark.parametrize("args, message", [
    (["stop", "--pidfile", "{tmp}/kg.pid", "--timeout", "nan"], "Invalid value for '--timeout': 'nan' is not a number."),
    (["stop", "--pidfile", "{tmp}/kg.pid", "--timeout", "inf"], "Invalid value for '--timeout': inf is not in the range"),
    (["status", "--watch", "--interval", "nan"], "Invalid value for '--interval': 'nan' is not a number."),
    (["status", "--watch", "--interval", "0"], "Invalid value for '--interval': 0.0 is not in the range 0<x<=3600."),
    (["dev-service", "--latency", "nan"], "Invalid value for '--latency': 'nan' is not a number."),
    (["dev-service", "--fail-rate", "nan"], "Invalid value for '--fail-rate': 'nan' is not a number."),
    (["health", "--status-addr", "127.0.0.1:\u00b2"], "Error: KG_STATUS_ADDR='127.0.0.1:\u00b2': expected HOST:PORT"),
    (["status", "--status-addr", "127.0.0.1:\u00b9\u00b2"], "Error: KG_STATUS_ADDR='127.0.0.1:\u00b9\u00b2': expected"),
])
def test_nan_and_bad_ports_in_other_commands_are_usage_errors(tmp_path, args, message):
    proc = run(*[a.format(tmp=tmp_path) for a in args], env=clean_env())
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("Error: ") and message in lines[-1], proc.stderr


def test_print_config_masks_url_credentials_and_database_passwords():
    proc = run("run", "--print-config", "--db", "postgresql://kg:dbpass@db/crawl?sslmode=require&password=qpass",
               env=clean_env(KG_SERVICE_URL="http://kg:hunter2@gpu1:8088,http://apikey@gpu2"))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert "http://***@gpu1:8088,http://***@gpu2" in lines["service_url"]
    assert "postgresql://kg:***@db/crawl?sslmode=require&password=***" in lines["db_path"]
    assert not any(secret in proc.stdout for secret in ("hunter2", "apikey", "dbpass", "qpass"))


@pytest.mark.parametrize("command", ["run", "worker"])
def test_every_settings_flag_is_spelled_as_config_names_it_in_errors(command):
    from kgsupervisor import config
    options = [p for p in main.commands[command].params if p.name in config.FIELDS]
    assert {p.name for p in options} >= {"db_path", "service_url", "service_timeout"}
    for option in options:
        assert config.flag_name(option.name) in option.opts, (option.name, option.opts)


@pytest.mark.hostile
def test_a_reload_refuses_a_token_file_turned_unusable_without_logging_the_token(tmp_path, db_path, kg_service):
    token, log = tmp_path / "token", tmp_path / "kg.log"
    token.write_text("s3cret\n")
    proc = spawn(["run", "--db", db_path, "--service-url", kg_service, "--workers", "1"],
                 env={"KG_SERVICE_TOKEN_FILE": str(token), "KG_LOG_FILE": str(log)})
    try:
        wait_for(lambda: log.exists() and "worker 0 started" in log.read_text(), 20, message="a worker started")
        token.write_bytes(b"s3cret\nX-Injected: hunter2\n")
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: "reload refused" in log.read_text(), 20, message="the reload refused")
        (line,) = [line for line in log.read_text().splitlines() if "reload refused" in line]
        assert f"service_token_file='{token}'" in line and "control character at position 7" in line, line
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_groups([proc])
    assert "hunter2" not in log.read_text() and "Injected" not in log.read_text()
    record_hostile("SIGHUP after the token file gained a newline and a second header",
                   "reload refused in one log line naming the file, never its text; exits 0 on SIGTERM", "no")
