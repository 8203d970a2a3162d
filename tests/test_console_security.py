"""The operator console's guard and pages over real HTTP: the console app served by a real
waitress server on 127.0.0.1 in the test process, a real SQLite file (and PostgreSQL where the
database does the work), requests as a browser sends them. The database is the oracle."""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest
import requests

from kgsupervisor.ops.console.app import create_app
from kgsupervisor.ops.console.settings import ConsoleSettings
from kgsupervisor.ops.statusd import WSGIServer, bind
from kgsupervisor.queue.audit import recent_actions
from kgsupervisor.queue.control import paused_state
from kgsupervisor.store.schema import init_db
from kgsupervisor.store.sqlite import connect
from scripts.sampledata import add_documents

from .consoleclient import CSP, CSRF, ConsoleClient, element_text

pytestmark = pytest.mark.timeout(60)

TOKEN = "console-test-token-7f3a9c"
HOSTILE_TITLE = '<script>alert("title")</script>'
HOSTILE_ERROR = "<img src=x onerror=alert(1)> HTTP 500 from the KG service"


@contextmanager
def serving(settings: ConsoleSettings) -> Iterator[str]:
    """The console of `settings` served by waitress on a free loopback port; its base URL."""
    app = create_app(settings)
    server = WSGIServer(bind(("127.0.0.1", 0)), app, "kgsupervisor-console")
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.server_close()
        app.extensions["kgsupervisor"].stop()


def add_failed(conn, count: int, message: str) -> list[int]:
    """`count` new documents, each with one failed queue row holding `message`; their content ids."""
    ids = add_documents(conn, count, chunks=1)
    for cid in ids:
        conn.execute("INSERT INTO kg_processing_queue (content_id, status, retry_count, error_message) "
                     "VALUES (?, 'failed', 3, ?)", (cid, message))
    return ids


@pytest.fixture
def db(tmp_path) -> str:
    """Three pending documents, the first titled with a script, and two failed with HTML in the error."""
    path = str(tmp_path / "kg.db")
    init_db(path)
    with closing(connect(path)) as conn:
        pending = add_documents(conn, 3, chunks=1)
        conn.executemany("INSERT INTO kg_processing_queue (content_id) VALUES (?)", [(c,) for c in pending])
        conn.execute("UPDATE crawled_content SET title = ? WHERE id = ?", (HOSTILE_TITLE, pending[0]))
        add_failed(conn, 2, HOSTILE_ERROR)
    return path


@pytest.fixture
def console(db) -> Iterator[str]:
    """The console on loopback with an operator token; its base URL."""
    with serving(ConsoleSettings(db, TOKEN, "127.0.0.1")) as base:
        yield base


def logged_in(base: str, name: str = "alice") -> ConsoleClient:
    client = ConsoleClient(base)
    assert client.login(TOKEN, name).status_code == 303
    return client


def what_actions_change(path: str) -> tuple:
    """Every queue row, the pause flag and the audit log: all a POST of the console may change."""
    with closing(connect(path)) as conn:
        rows = conn.execute("SELECT id, status, retry_count FROM kg_processing_queue ORDER BY id").fetchall()
        return (rows,
                paused_state(conn), recent_actions(conn))


# -- the headers and the markup of every page -------------------------------------------------------

def test_every_page_carries_the_policy_and_holds_no_inline_script_or_style(console, db):
    with closing(connect(db)) as conn:
        first = conn.execute("SELECT MIN(content_id) FROM kg_processing_queue").fetchone()[0]
    client = ConsoleClient(console)
    for path, status in (("/", 200), ("/live", 200), ("/documents", 200), ("/documents?status=failed", 200),
                         (f"/document/{first}", 200), ("/failures", 200), ("/audit", 200), ("/login", 200),
                         ("/no-such-page", 404), ("/static/console.js", 200)):
        answer = client.get(path)
        assert answer.status_code == status, path
        assert answer.headers["Content-Security-Policy"] == CSP, path
        assert (answer.headers["X-Content-Type-Options"], answer.headers["Referrer-Policy"],
                answer.headers["Cache-Control"]) == ("nosniff", "same-origin", "no-store"), path
        assert answer.headers["Server"] == "kgsupervisor-console"
        if "html" in answer.headers["Content-Type"]:
            assert not re.search(r"<script(?![^>]*\ssrc=)", answer.text), f"an inline script on {path}"
            assert not re.search(r"<style|<[^>]*\s(style|on[a-z]+)=", answer.text), f"inline style on {path}"


def test_a_title_and_an_error_holding_html_are_escaped(console, db):
    with closing(connect(db)) as conn:
        [hostile] = conn.execute("SELECT id FROM crawled_content WHERE title = ?",
                                 (HOSTILE_TITLE,)).fetchone()
        [failed] = conn.execute("SELECT content_id FROM kg_processing_queue "
                                "WHERE status = 'failed'").fetchone()
    client = ConsoleClient(console)
    for path in (f"/document/{hostile}", "/documents", f"/documents?content_id={hostile}"):
        text = client.get(path).text
        assert HOSTILE_TITLE not in text, path
        assert "&lt;script&gt;alert(&#34;title&#34;)&lt;/script&gt;" in text, path
    for path in (f"/document/{failed}", "/documents?status=failed", "/failures"):
        text = client.get(path).text
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text, path


# -- the guard ---------------------------------------------------------------------------------------

FORGERIES = {
    "no CSRF token": dict(csrf=False),
    "a foreign Origin": dict(origin="http://attacker.example"),
    # DNS rebinding: the attacker's name resolves to 127.0.0.1; its page sends its own origin.
    "a foreign Host": dict(origin="http://rebound.example", headers={"Host": "rebound.example"}),
    "no login": dict(),
}


@pytest.mark.parametrize("forgery", FORGERIES)
@pytest.mark.parametrize("path, fields", [("/pause", {"reason": "forged"}),
                                          ("/documents/bulk", {"action": "retry", "status": "failed",
                                                               "upto_id": "1000"})])
def test_a_forged_post_is_refused_and_changes_nothing(console, db, forgery, path, fields):
    client = ConsoleClient(console) if forgery == "no login" else logged_in(console)
    before = what_actions_change(db)

    answer = client.post(path, fields, **FORGERIES[forgery])

    assert answer.status_code == 403, answer.text
    assert what_actions_change(db) == before
    # The same POST done right is taken: the refusal was the check at work.
    assert logged_in(console).post(path, fields).status_code == 200
    assert what_actions_change(db) != before


@pytest.fixture
def console_log() -> Iterator[list[str]]:
    """The console's log lines while the test runs."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("kgsupervisor.console")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def test_login_sets_a_strict_http_only_cookie_and_logout_ends_what_it_allowed(console, db, console_log):
    client = ConsoleClient(console)
    first = client.get("/login").headers["Set-Cookie"]
    assert first.startswith("kgsupervisor_console=") and "HttpOnly" in first and "SameSite=Strict" in first

    refused = client.login("not-the-token", "mallory")
    assert refused.status_code == 403 and element_text(refused.text, "login-error") == "wrong token"
    assert "console: failed login as mallory from 127.0.0.1" in console_log

    accepted = client.login(TOKEN, "alice")
    cookie = accepted.headers["Set-Cookie"]
    assert accepted.status_code == 303 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback: a Secure cookie would never come back
    assert client.post("/pause", {"reason": "db-2 maintenance"}).status_code == 200
    assert client.post("/logout", {}).status_code == 200
    assert client.post("/resume", {}).status_code == 403

    with closing(connect(db)) as conn:
        assert paused_state(conn).reason == "db-2 maintenance"
        assert [(e.who, e.action) for e in recent_actions(conn)] == [
            ("alice@127.0.0.1", "logout"), ("alice@127.0.0.1", "pause"), ("alice@127.0.0.1", "login")]
    assert not any(TOKEN in line for line in console_log)


def test_behind_a_reverse_proxy_every_page_needs_the_login_and_the_cookie_is_secure(console):
    proxy = {"Host": "console.example.com", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}

    def cookie_of(answer: requests.Response) -> dict[str, str]:
        """The session cookie to send back by hand: requests keeps a Secure one for https alone."""
        assert "Secure" in answer.headers["Set-Cookie"] and "HttpOnly" in answer.headers["Set-Cookie"]
        return {"Cookie": answer.headers["Set-Cookie"].split(";")[0]}

    page = requests.get(f"{console}/documents", headers=proxy, allow_redirects=False, timeout=10)
    assert page.status_code == 302 and page.headers["Location"].endswith("/login?next=/documents")
    assert requests.get(f"{console}/live", headers=proxy, timeout=10).status_code == 401
    form = requests.get(f"{console}/login", headers=proxy, timeout=10)
    fields = {"name": "alice", "token": TOKEN, "csrf_token": CSRF.search(form.text).group(1)}
    login = requests.post(f"{console}/login", data=fields, allow_redirects=False, timeout=10,
                          headers={**proxy, **cookie_of(form), "Origin": "https://console.example.com"})
    assert login.status_code == 303
    after = requests.get(f"{console}/documents", headers={**proxy, **cookie_of(login)}, timeout=10)
    assert after.status_code == 200 and 'id="logout"' in after.text


# -- answers to bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("path, status, line", [
    ("/documents?status=bogus", 400, "status='bogus': expected one of pending, processing"),
    ("/documents?since=yesterday", 400, "since='yesterday': expected a duration"),
    ("/documents?before=ten", 400, "before='ten': expected a queue id"),
    ("/document/424242", 404, "no document with content id 424242"),
    ("/document/99999999999999999999", 400, "content id=99999999999999999999: expected an integer"),
])
def test_bad_input_is_one_line_and_a_client_error(console, path, status, line):
    answer = ConsoleClient(console).get(path)
    assert answer.status_code == status
    shown = element_text(answer.text, "error")
    assert shown.startswith(line.replace("'", "&#39;")) and "\n" not in shown
    assert "Traceback" not in answer.text


def test_a_database_that_cannot_be_read_is_one_line(tmp_path):
    garbage = tmp_path / "not-a-database"
    garbage.write_bytes(b"this is no SQLite file" * 100)
    with serving(ConsoleSettings(str(garbage), TOKEN, "127.0.0.1")) as base:
        answer = ConsoleClient(base).get("/documents")
    assert answer.status_code == 503
    expected = f"{str(garbage)!r} is not an SQLite database".replace("'", "&#39;")
    assert element_text(answer.text, "error") == expected


# -- the live part and a bulk action ---------------------------------------------------------------

def test_live_is_the_fragment_with_the_queue_counts(console, db):
    with closing(connect(db)) as conn:
        counts = dict(conn.execute("SELECT status, COUNT(*) FROM kg_processing_queue GROUP BY status"))
    answer = ConsoleClient(console).get("/live")
    shown = dict(re.findall(r'data-status="(\w+)">(\d+)<', answer.text))
    assert answer.status_code == 200 and "<html" not in answer.text and 'id="queue-counts"' in answer.text
    assert shown == {"pending": "3", "processing": "0", "completed": "0", "failed": "2", "skipped": "0"}
    assert counts == {"pending": 3, "failed": 2}


def test_a_bulk_retry_changes_exactly_the_rows_its_confirmation_counted(backend, tmp_path):
    with closing(backend.connect()) as conn:
        add_failed(conn, 3, "KG service error 500")
        [timeout] = add_failed(conn, 1, "no answer within 30s")
    with serving(ConsoleSettings(backend.target, TOKEN, "127.0.0.1")) as base:
        client = logged_in(base)
        fields = {"action": "retry", "status": "failed", "error": "ERROR 500"}
        confirm = client.post("/documents/confirm", fields)
        count = element_text(confirm.text, "confirm-count")
        upto_id = re.search(r'name="upto_id" value="(\d+)"', confirm.text).group(1)
        with closing(backend.connect()) as conn:  # a failure after the count: not the operator's choice
            [late] = add_failed(conn, 1, "KG service error 500")
        done = client.post("/documents/bulk", {**fields, "upto_id": upto_id})
    assert count == "3" and element_text(done.text, "flash") == "Retried 3 documents"
    with closing(backend.connect()) as conn:
        statuses = dict(conn.execute("SELECT content_id, status FROM kg_processing_queue").fetchall())
        entry = recent_actions(conn)[0]
    assert sorted(statuses.values()) == ["failed", "failed", "pending", "pending", "pending"]
    assert statuses[late] == statuses[timeout] == "failed"
    assert (entry.who, entry.action, entry.rows) == ("alice@127.0.0.1", "retry-matching", 3)
    assert entry.detail == f"status=failed error=ERROR 500 upto_id={upto_id}"
