"""Nothing secret shows: the token, database passwords and URL credentials are masked in logs
(text and JSON, exceptions included), errors, /stats, /health, /metrics, --print-config,
process titles and stored error messages (issue 13, items 12-14)."""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import quote

import psutil
import pytest
import requests

from kgsupervisor import config
from kgsupervisor.errors import DatabaseError, ItemFailure, ServiceUnavailable
from kgsupervisor.kg.client import KGClient
from kgsupervisor.logs import TEXT_FORMAT, JsonFormatter, SecretFilter
from kgsupervisor.masking import Mask, hide_credentials, redact, secrets_in, secrets_of
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.store.postgres import PGConnection

from .chaos.harness import record_hostile
from .conftest import free_port, make_backend, seed, spawn, status_counts, wait_for
from .processes import children_named

TOKEN = "tok-3f9a7c1e5b8d"
URL_PASSWORD = "urlpass-71c2"
DB_USERINFO_PASSWORD = "dbpass-userinfo-5e1"
DB_QUERY_PASSWORD = "dbpass-query-9b4"
BASIC = base64.b64encode(f"kguser:{URL_PASSWORD}".encode()).decode()  # what requests sends for user:pass@
EVERY_SECRET = (TOKEN, URL_PASSWORD, DB_USERINFO_PASSWORD, DB_QUERY_PASSWORD, BASIC)


def shown(text: str | bytes) -> list[str]:
    """The secrets that show in `text` (none, or the test fails naming them)."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return [s for s in EVERY_SECRET if s in text]


# -- the mask over every URL form --------------------------------------------------------------

@pytest.mark.parametrize("text, masked", [
    ("postgresql://kg:pw@db:5432/crawl", "postgresql://kg:***@db:5432/crawl"),
    ("postgresql://kg@db/crawl", "postgresql://kg@db/crawl"),
    ("postgresql://:pw@db/crawl", "postgresql://:***@db/crawl"),
    ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db"),
    ("postgresql://kg:p@ss/w:rd@db/crawl", "postgresql://kg:***@db/crawl"),
    ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
    ("postgresql://kg@db/crawl?password=pw", "postgresql://kg@db/crawl?password=***"),
    ("postgres://kg@db/c?sslmode=require&PASSWORD=pw&x=1", "postgres://kg@db/c?sslmode=require&PASSWORD=***&x=1"),
    ("postgresql://kg@db/crawl?sslpassword=pw", "postgresql://kg@db/crawl?sslpassword=***"),
    ("host=db password=s3cret dbname=crawl", "host=db password=*** dbname=crawl"),
    ("host=db password='s3 cr\\'et' dbname=crawl", "host=db password=*** dbname=crawl"),
    ("PGPASSWORD=s3cret psql", "PGPASSWORD=*** psql"),
    ("http://user:pass@gpu1:8088", "http://user:***@gpu1:8088"),
    ("http://u:p@gpu1,http://v:q@gpu2:8088", "http://u:***@gpu1,http://v:***@gpu2:8088"),
    ("https://apikey@gpu2/kg", "https://apikey@gpu2/kg"),
    ("http://[::1]:8088/api", "http://[::1]:8088/api"),
    ("KG service at http://u:pass@127.0.0.1:9 unreachable: Max retries exceeded with url: /api/v1/ingest",
     "KG service at http://u:***@127.0.0.1:9 unreachable: Max retries exceeded with url: /api/v1/ingest"),
    ('in URI: "postgresql://u:s3cret@[::1/db"', 'in URI: "postgresql://u:***@[::1/db"'),
    ("{'Authorization': 'Bearer abcdefgh12', 'Accept': '*/*'}", "{'Authorization': 'Bearer ********', 'Accept': '*/*'}"),
    ('{"authorization": "Basic dXNlcjpwYXNz"}', '{"authorization": "Basic ********"}'),
    ("echoed: bearer abcdefgh12345", "echoed: bearer ********"),
    ("a bearer token, never logged", "a bearer token, never logged"),
    ("mail kg@example.org about /var/lib/crawl.db", "mail kg@example.org about /var/lib/crawl.db"),
])
def test_credentials_are_hidden_in_every_url_form(text, masked):
    assert hide_credentials(text) == masked
    assert hide_credentials(masked) == masked, "masking twice changes nothing"


@pytest.mark.parametrize("url, password", [
    ("postgresql://u:pass word@h/db", "pass word"),   # a blank: no pattern over free text can see it
    ("postgresql://u:p@ss@h/db", "p@ss"),
    ("postgresql://u:pa/ss@h/db?sslmode=require", "pa/ss"),
])
def test_redact_parses_one_url_for_a_careless_password(url, password):
    assert password not in redact(url) and "u:***@h/db" in redact(url)
    assert password in secrets_in(url)


def test_secrets_of_a_configuration_are_its_token_and_every_url_password():
    settings, _ = config.load({}, {
        "KG_SERVICE_TOKEN": TOKEN, "KG_SERVICE_URL": f"http://kguser:{URL_PASSWORD}@gpu1:8088,http://gpu2",
        "KG_DB_PATH": f"postgresql://kg:{DB_USERINFO_PASSWORD}@db/crawl?sslmode=require&password={DB_QUERY_PASSWORD}"})
    assert set(secrets_of(settings)) >= set(EVERY_SECRET)


def test_the_mask_knows_every_spelling_of_a_secret():
    token = "abc\ndef-7d1e9"
    mask = Mask([token])
    quoted = [token, repr(token), json.dumps(token), quote(token, safe=""),
              "Bearer abc", "def-7d1e9 at the start of a line"]
    for text in quoted:
        assert "abc" not in mask(text) and "def-7d1e9" not in mask(text), text
    assert mask("nothing here") == "nothing here"


# -- logs: message, arguments, exception, stack; text and JSON; every entry point ---------------

class LateSecret:
    """A secret that only shows once logging renders it (an argument's str())."""

    def __str__(self) -> str:
        return f"rendered late: {TOKEN}"


def log_through(formatter: logging.Formatter, emit, secrets: tuple[str, ...] = (TOKEN,)) -> str:
    """What a handler with the secret filter writes for the records `emit(logger)` makes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(SecretFilter(secrets))
    logger = logging.getLogger(f"kgsupervisor.test_secrets.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    try:
        emit(logger)
    finally:
        logger.handlers.clear()
    return stream.getvalue()


def emit_everything(logger: logging.Logger) -> None:
    logger.warning("token %s and %r", TOKEN, {"url": f"http://kguser:{URL_PASSWORD}@h"})
    logger.info("late: %s", LateSecret())
    try:
        raise ValueError(f"service said: Authorization: Bearer {TOKEN}")
    except ValueError:
        logger.exception("failed with %s", "context")
    logger.info("stack", stack_info=True, extra={"worker_id": 1})


@pytest.mark.parametrize("formatter", [logging.Formatter(TEXT_FORMAT), JsonFormatter()], ids=["text", "json"])
def test_the_filter_masks_message_arguments_exception_and_stack(formatter):
    out = log_through(formatter, emit_everything)
    assert not shown(out), out
    assert "Traceback" in out and "ValueError" in out and "********" in out and "kguser:***@h" in out


@pytest.mark.hostile
def test_a_token_with_a_line_break_is_masked_in_requests_invalid_header_error():
    # Config validation refuses such a token; the mask must hold even so (item 13).
    token = "abc\r\ndef-91f3e"
    with pytest.raises(requests.exceptions.InvalidHeader) as raw:
        requests.get("http://127.0.0.1:9", headers={"Authorization": f"Bearer {token}"}, timeout=1)
    assert repr(token)[1:-1] in str(raw.value), "requests quotes the token: the test can fail"

    client = KGClient("http://127.0.0.1:9", 5.0, token=token)
    with pytest.raises(ServiceUnavailable) as caught:
        client.ingest(1, b"{}", set(), retry_blips=False)
    client.close()
    for formatter in (logging.Formatter(TEXT_FORMAT), JsonFormatter()):
        def emit(logger: logging.Logger) -> None:
            logger.error("outage: %s", caught.value)
            logger.error("raw: %s", raw.value)
        out = log_through(formatter, emit, (token,)) + str(caught.value)
        assert "abc" not in out and "def-91f3e" not in out, out
    record_hostile("a token holding CR LF handed to the KG client past validation",
                   "an outage whose InvalidHeader error shows no part of the token, text and JSON logs", "no")


def test_mask_secrets_reaches_a_host_applications_handlers(tmp_path):
    # The API path: the host configured logging; the forked supervisor masks what it writes.
    script = textwrap.dedent(f"""
        import logging, sys
        from kgsupervisor import logs
        logging.basicConfig(stream=sys.stderr, format="%(name)s %(message)s")
        logs.mask_secrets([{TOKEN!r}])
        logging.getLogger("kgsupervisor.worker.kgworker").error("token %s", {TOKEN!r})
        logging.getLogger("kgsupervisor").error("url http://kguser:{URL_PASSWORD}@h")
        logs.mask_secrets(["second-secret-1"])
        logging.getLogger("kgsupervisor.ops.api").error("after a reload: second-secret-1 and {TOKEN}")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("********") == 3 and "kguser:***@h" in out.stderr
    assert not shown(out.stderr) and "second-secret-1" not in out.stderr, out.stderr


# -- errors and stored error messages ------------------------------------------------------------

# The reliability report's table lists the cases marked `hostile`; the others are further spellings.
@pytest.mark.parametrize("url, secret, given", [
    pytest.param("postgresql://u:s3cret-1@127.0.0.1:abc/db", "s3cret-1", "a password and port :abc",
                 marks=pytest.mark.hostile),
    pytest.param("postgresql://u:p@ss-word@127.0.0.1:1/db", "ss-word", "a password holding an unescaped @",
                 marks=pytest.mark.hostile),
    ("postgresql://u:se/cret-2@127.0.0.1:1/db", "cret-2", "a password holding a /"),
    ("postgresql://u@127.0.0.1:1/db?password=s3cret-3&bogus=1", "s3cret-3", "?password= and an unknown parameter"),
    ("postgresql://u@127.0.0.1:1/db?sslmode=x&password=s3cret-4", "s3cret-4", "a bad sslmode, then ?password="),
    ("postgresql://u:s3cret-5@[::1/db", "s3cret-5", "a password and an unclosed ["),
    ("postgresql://u:s3 cret-6@127.0.0.1:1/db", "cret-6", "a password holding a space"),
    ("postgresql://u:s%zzcret-7@127.0.0.1:1/db", "zzcret-7", "a password holding %zz"),
])
def test_a_malformed_postgresql_url_error_shows_no_password(url, secret, given):
    with pytest.raises(DatabaseError) as caught:
        PGConnection(url)
    message = str(caught.value)
    assert secret not in message and message.startswith("cannot connect to PostgreSQL at postgresql://u")
    assert "\n" not in message
    record_hostile(f"a malformed PostgreSQL URL: {given}",
                   "one-line error naming the URL with the password masked", "— (refused at start)")


class EchoingService:
    """A KG service that is up (GET /health) and answers every ingest 500 with a body quoting the
    credential of the request's Authorization header back, as a careless error page does."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self.answer(200, {"status": "healthy"})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                credential = (self.headers.get("Authorization") or "none").split(" ", 1)[-1]
                echo.seen.append(credential)
                self.answer(500, {"error": f"no tenant for credential {credential}"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def echoing() -> Iterator[tuple[EchoingService, EchoingService]]:
    """Two echoing endpoints: the first is given user:password@ (requests sends Basic), the
    second gets the bearer token."""
    services = (EchoingService(), EchoingService())
    yield services
    for s in services:
        s.close()


def service_urls(echoing: tuple[EchoingService, EchoingService]) -> str:
    first, second = echoing
    return f"http://kguser:{URL_PASSWORD}@127.0.0.1:{first.port},http://127.0.0.1:{second.port}"


def test_an_error_body_echoing_the_credentials_is_masked_by_the_client(echoing):
    first, second = echoing
    for url, token in ((f"http://kguser:{URL_PASSWORD}@127.0.0.1:{first.port}", None),
                       (f"http://127.0.0.1:{second.port}", TOKEN)):
        client = KGClient(url, 5.0, token=token)
        with pytest.raises(ItemFailure) as caught:
            client.ingest(1, b"{}", set())
        client.close()
        assert "KG service error 500" in str(caught.value) and "********" in str(caught.value)
        assert not shown(str(caught.value)), caught.value
    assert first.seen == [BASIC] and second.seen == [TOKEN], "the services did echo the secrets"


def test_stored_error_messages_hide_credentials(conn):
    seed(conn, 2)
    queue = queue_for(conn)
    first, second = queue.claim("host:1", "lease-1", 2, 60.0, 1000.0)
    queue.fail(first, f"service at http://kguser:{URL_PASSWORD}@h said: Bearer {TOKEN}", 1001.0)
    queue.retry_later(second, f"db postgresql://kg@db/c?password={DB_QUERY_PASSWORD} down", 1001.0, 5, 0.1, 0.1)
    stored = [r[0] for r in conn.execute("SELECT error_message FROM kg_processing_queue ORDER BY id")]
    assert not shown(" ".join(stored)) and "kguser:***@h" in stored[0] and "password=***" in stored[1]


# -- real processes: `kgsupervisor run` and the Python API ---------------------------------------

def fetch(addr: str, path: str) -> str:
    return requests.get(f"http://{addr}{path}", timeout=5).text


def command_lines(pid: int) -> dict[int, bytes]:
    """/proc/PID/cmdline of a process and of all its descendants, as ps shows them to anyone."""
    found = {}
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                found[p.pid] = f.read()
        except OSError:
            pass
    return found


def error_messages(db) -> str:
    """Every error message the database stores: the queue's and the attempt history's (with its
    endpoints)."""
    c = db.connect()
    try:
        queue = [r[0] or "" for r in c.execute("SELECT error_message FROM kg_processing_queue")]
        attempts = [f"{r[0] or ''} {r[1] or ''}" for r in
                    c.execute("SELECT error_message, endpoint FROM kg_processing_attempts")]
        assert attempts, "the history recorded the failures too"
        return "\n".join(queue + attempts)
    finally:
        c.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("log_format", ["text", pytest.param("json", marks=pytest.mark.hostile)])
def test_a_running_supervisor_shows_no_secret_anywhere(log_format, echoing, tmp_path, request):
    db = make_backend("postgres", tmp_path, request)
    plain_url = db.target
    db_url = (plain_url.replace("postgres@", f"postgres:{DB_USERINFO_PASSWORD}@")
              + f"?connect_timeout=10&password={DB_QUERY_PASSWORD}")
    c = db.connect()
    try:
        seed(c, 6)
    finally:
        c.close()
    addr = f"127.0.0.1:{free_port()}"
    args = ["run", "--db", db_url, "--service-url", service_urls(echoing), "--workers", "2",
            "--max-attempts", "1", "--poll-interval", "0.2", "--log-format", log_format, "--status-addr", addr]
    env = {"KG_SERVICE_TOKEN": TOKEN}

    printed = subprocess.run([sys.executable, "-m", "kgsupervisor", *args, "--print-config"], capture_output=True,
                             text=True, timeout=60, env={**os.environ, **env})
    assert printed.returncode == 0, printed.stderr
    assert not shown(printed.stdout + printed.stderr), printed.stdout
    assert "********" in printed.stdout and "password=***" in printed.stdout

    proc = spawn(args, env=env)
    try:
        def all_failed() -> bool:
            c = db.connect()
            try:
                return status_counts(c) == {"failed": 6}
            finally:
                c.close()
        wait_for(all_failed, 60, message="every document failed on the echoing services")
        wait_for(lambda: len(children_named(proc.pid, "kgs-worker-")) == 2,
                 20, message="two workers")
        bodies = {path: fetch(addr, path) for path in ("/stats", "/health", "/metrics")}
        lines = command_lines(proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)

    assert echoing[0].seen and echoing[1].seen and set(echoing[0].seen) == {BASIC} and set(echoing[1].seen) == {TOKEN}
    stored = error_messages(db)
    assert "KG service error 500" in stored and "********" in stored
    assert not shown(stored), stored
    for path, body in bodies.items():
        assert not shown(body), (path, body)
    assert f"kguser:***@127.0.0.1:{echoing[0].port}" in bodies["/stats"] + bodies["/metrics"]
    assert "postgres:***@" in bodies["/health"] and "password=***" in bodies["/health"]
    assert len(lines) >= 4, "supervisor, two workers and the helpers"
    for pid, line in lines.items():
        assert not shown(line), (pid, line)
    assert any(f"kguser:***@127.0.0.1".encode() in line for line in lines.values())
    assert not shown(stderr), stderr
    assert "supervisor started" in stderr and "kguser:***@" in stderr
    if log_format == "json":
        assert all(json.loads(line) for line in stderr.splitlines() if line.strip())
    record_hostile(f"PostgreSQL password as user:password@ and ?password=, KG URL user:password@, a token, "
                   f"services echoing credentials in 500 bodies ({log_format} log)",
                   "masked in --print-config, log, /stats, /health, /metrics, process titles and error_message",
                   "yes (the service's own 500s)")


API_HOST = """
import json, logging, sys, time
import kgsupervisor
# The host's own logging, as a web application has it: no kgsupervisor setup at all.
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
manager = kgsupervisor.start_kg_workers(sys.argv[1], num_workers=1, poll_interval=0.1, service_url=sys.argv[2],
                                        service_token=sys.argv[3], max_attempts=1)
deadline = time.time() + 60
while kgsupervisor.get_worker_stats()["total_failed"] < 3 and time.time() < deadline:
    time.sleep(0.1)
stats = kgsupervisor.get_worker_stats()
health = manager.check_worker_health()
with open(f"/proc/{manager.process.pid}/cmdline", "rb") as f:
    title = f.read().decode("utf-8", "replace")
kgsupervisor.stop_kg_workers()
print(json.dumps({"stats": stats, "health": health, "title": title}))
"""


@pytest.mark.timeout(120)
def test_the_python_api_path_masks_too(conn, db_path, echoing):
    seed(conn, 3)
    out = subprocess.run([sys.executable, "-c", API_HOST, db_path, service_urls(echoing), TOKEN],
                         capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["stats"]["total_failed"] == 3
    assert "KG service error 500" in out.stderr and "kguser:***@" in out.stderr
    assert not shown(out.stderr), out.stderr
    assert not shown(json.dumps(result)), result
    stored = " ".join(r[0] for r in conn.execute("SELECT error_message FROM kg_processing_queue"))
    assert not shown(stored) and "********" in stored
