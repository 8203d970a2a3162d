"""The operator console in a real headless Chromium, served by a real `kgsupervisor run` on a
loopback status address, draining a real SQLite queue through the reference KG service. The
database, read with sqlite3 directly, is the oracle of every action."""
from __future__ import annotations

import sqlite3
import time
from contextlib import closing

import pytest
import requests
from selenium.webdriver.support.ui import Select

from scripts.sampledata import add_documents

from ..processes import wait_for
from .pages import (element, elements, input_named, loaded, logged_in_session, login, logout, open_page,
                    press, save_screenshot, shows_counts, submit, text_of, type_into, wait)
from .servers import TOKEN, Console, ForeignSite

pytestmark = [pytest.mark.timeout(60), pytest.mark.slow]

HOSTILE_TITLE = "<script>window.__pwned=1</script><b>bold</b>"


def queue_documents(conn: sqlite3.Connection, count: int) -> list[int]:
    """`count` new sample documents, each queued once; their content ids."""
    ids = add_documents(conn, count, chunks=2)
    conn.executemany("INSERT INTO kg_processing_queue (content_id, priority) VALUES (?, 1)",
                     [(i,) for i in ids])
    return ids


# -- the overview -------------------------------------------------------------------------------

def test_the_overview_counts_follow_a_drain_without_a_page_reload(console, driver, tmp_path):
    console.service.hold()
    try:
        with closing(console.connect()) as conn:
            queue_documents(conn, 12)
        # Each worker holds one document, its answer held back: nothing moves until allowed.
        held = wait_for(lambda: (c := console.counts()).get("processing") == 2 and c, 20,
                        message="both workers holding a document")
        open_page(driver, console.base + "/", "#queue-counts")
        wait(driver, shows_counts(held), f"the overview showing {held}")
        driver.execute_script("window.__sameDocument = 'not reloaded'")

        console.service.allow(4)
        moved = {**held, "pending": held["pending"] - 4, "completed": held.get("completed", 0) + 4}
        wait_for(lambda: console.counts() == moved, 20, message=f"four more completed: {moved}")
        wait(driver, shows_counts(moved), f"the overview following to {moved}")
        wait(driver, lambda d: len(elements(d, "#workers tr[data-pid]")) == 2, "both workers listed")
        save_screenshot(driver, tmp_path, "console-overview.png")

        console.service.open()
        drained = {**moved, "pending": 0, "processing": 0,
                   "completed": moved["completed"] + moved["pending"] + 2}
        wait_for(lambda: console.counts() == {k: v for k, v in drained.items() if v}, 20,
                 message="the drain")
        wait(driver, shows_counts(drained), f"the overview showing the drained queue {drained}")
    finally:
        console.service.open()
    assert driver.execute_script("return window.__sameDocument") == "not reloaded"


# -- documents: filter, retry what matches --------------------------------------------------------

SERVER_ERROR = 'gave up after 3 attempts: KG service error 500: {"detail": "upstream database locked"}'
TIMEOUT_ERROR = "gave up after 3 attempts: KG service did not answer within 30s"
HANG_STACK = ('Thread 0x7f2c (most recent call first):\n'
              '  File "kgsupervisor/kg/client.py", line 212 in send\n'
              '  File "kgsupervisor/worker/kgworker.py", line 141 in process')


def add_failed_row(conn: sqlite3.Connection, content_id: int, message: str, ago: float) -> int:
    """A queue row of `content_id` that failed for good `ago` seconds ago with `message`."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - ago))
    return conn.execute("INSERT INTO kg_processing_queue (content_id, status, priority, queued_at, "
                        "processed_at, retry_count, error_message) VALUES (?, 'failed', 1, ?, ?, 3, ?) "
                        "RETURNING id", (content_id, when, when, message)).fetchone()[0]


def add_attempt(conn: sqlite3.Connection, queue_id: int, content_id: int, attempt: int, outcome: str,
                error_class: str, message: str, stack: str | None = None) -> None:
    """One attempt of the history, as a worker (or, for a hang, the supervisor) records it."""
    finished = time.time() - 120 + attempt
    conn.execute("INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, owner, "
                 "worker, endpoint, claimed_at, sent_at, finished_at, duration, outcome, http_status, "
                 "error_class, error_message, stack) VALUES (?, ?, ?, ?, 'web-1:4242', 1, "
                 "'http://kg.example:8088', ?, ?, ?, 0.4, ?, ?, ?, ?, ?)",
                 (queue_id, content_id, attempt, f"seeded-{queue_id}-{attempt}", finished - 0.4,
                  finished - 0.3, finished, outcome, 500 if error_class == "http_500" else None,
                  error_class, message, stack))


def seed_failures(conn: sqlite3.Connection) -> tuple[list[int], list[int]]:
    """Documents failed with a server error (one of them failed twice, each with a hang and a
    500 in its history) and with a timeout; returns (server error ids, timeout ids)."""
    server, timeout, stale = add_documents(conn, 4), add_documents(conn, 2), add_documents(conn, 1)
    for cid in server:
        qid = add_failed_row(conn, cid, SERVER_ERROR, ago=90)
        add_attempt(conn, qid, cid, 1, "hung", "hung", "no heartbeat for 30s: worker killed",
                    HANG_STACK)
        add_attempt(conn, qid, cid, 2, "failed", "http_500",
                    "KG service error 500: upstream database locked")
    add_failed_row(conn, server[0], SERVER_ERROR, ago=30)  # failed again: one document, two rows
    for cid in timeout:
        add_failed_row(conn, cid, TIMEOUT_ERROR, ago=60)
    # Completed, though it once held the same error: nothing a retry of failed rows takes.
    conn.execute("INSERT INTO kg_processing_queue (content_id, status, error_message) "
                 "VALUES (?, 'completed', ?)", (stale[0], SERVER_ERROR))
    return server, timeout


def retryable_count(conn: sqlite3.Connection, error_text: str) -> int:
    """The oracle: failed documents whose error holds `error_text` (any case) and that have no
    pending or processing row, each once."""
    return conn.execute("SELECT COUNT(DISTINCT q.content_id) FROM kg_processing_queue q "
                        "WHERE q.status = 'failed' AND instr(lower(q.error_message), lower(?)) > 0 "
                        "AND NOT EXISTS (SELECT 1 FROM kg_processing_queue o WHERE o.content_id = "
                        "q.content_id AND o.status IN ('pending', 'processing'))",
                        (error_text,)).fetchone()[0]


def newest_status(console: Console, content_id: int) -> str:
    """The status of the newest queue row of `content_id`."""
    return console.rows("SELECT status FROM kg_processing_queue WHERE content_id = ? "
                        "ORDER BY id DESC LIMIT 1", (content_id,))[0][0]


def test_retry_every_failed_document_matching_an_error_after_confirming_the_exact_count(
        console, driver, tmp_path):
    with closing(console.connect()) as conn:
        server, timeout = seed_failures(conn)
        expected = retryable_count(conn, "ERROR 500")
        matching_rows = {qid for (qid,) in conn.execute(
            "SELECT id FROM kg_processing_queue WHERE status = 'failed' "
            "AND error_message LIKE '%error 500%'")}
    assert expected == len(server) and len(matching_rows) == len(server) + 1
    login(driver, console.base, TOKEN)
    open_page(driver, console.base + "/documents", "#filter")
    Select(element(driver, "#filter-status")).select_by_value("failed")
    type_into(driver, "#filter-error", "ERROR 500")
    submit(driver, "#apply-filter", "#documents")
    rows = elements(driver, "#documents tr[data-queue-id]")
    assert {int(row.get_attribute("data-queue-id")) for row in rows} == matching_rows

    submit(driver, "#retry-matching", "#confirm-count")
    assert text_of(driver, "#confirm-count") == str(expected)
    submit(driver, "#confirm", "#flash")
    assert f"Retried {expected} document{'' if expected == 1 else 's'}" in text_of(driver, "#flash")
    wait_for(lambda: all(newest_status(console, cid) == "completed" for cid in server), 30,
             message="every retried document completed")
    assert all(newest_status(console, cid) == "failed" for cid in timeout), "a timeout was retried"
    assert ("alice@127.0.0.1", "retry-matching", expected) in console.audit()

    # The document page of one of them: its history, the two seeded attempts and the real one.
    open_page(driver, f"{console.base}/document/{server[1]}", "#attempts")
    wait(driver, lambda d: len(elements(d, "#attempts .attempt")) == 3, "three attempts shown")
    [(url, chunks)] = console.rows("SELECT url, (SELECT COUNT(*) FROM content_chunks WHERE content_id = "
                                   "c.id) FROM crawled_content c WHERE id = ?", (server[1],))
    assert text_of(driver, "#doc-url") == url and text_of(driver, "#doc-chunks") == str(chunks)
    errors = [e.get_attribute("textContent") for e in elements(driver, "#attempts .attempt .error")]
    assert any("no heartbeat for 30s" in e for e in errors)
    assert any("upstream database locked" in e for e in errors)
    stacks = [s.get_attribute("textContent") for s in elements(driver, "#attempts .attempt .stack")]
    assert any("kgworker.py\", line 141 in process" in s for s in stacks)
    save_screenshot(driver, tmp_path, "console-document.png")


# -- pause and resume -----------------------------------------------------------------------------

def test_pause_with_a_reason_shows_a_banner_sets_the_flag_and_resume_clears_both(console, driver):
    login(driver, console.base, TOKEN)
    open_page(driver, console.base + "/", "#pause-form")
    assert not elements(driver, "#banner")
    type_into(driver, "#pause-reason", "disk swap on db-2")
    submit(driver, "#pause", "#banner")
    banner = text_of(driver, "#banner")
    assert "Paused" in banner and "disk swap on db-2" in banner
    assert console.pause_reason() == ("disk swap on db-2",)

    submit(driver, "#resume", "#pause-form")
    wait(driver, lambda d: not elements(d, "#banner"), "the banner gone after resume")
    assert console.pause_reason() is None
    actions = [(who, action) for who, action, _ in console.audit()]
    assert actions[-2:] == [("alice@127.0.0.1", "pause"), ("alice@127.0.0.1", "resume")]
    open_page(driver, console.base + "/audit", "#audit")
    shown = [(text_of(row, ".who"), text_of(row, ".action"))
             for row in elements(driver, "#audit tr.audit-entry")]
    assert shown[:2] == [("alice@127.0.0.1", "resume"), ("alice@127.0.0.1", "pause")], "newest first"


# -- login and logout -----------------------------------------------------------------------------

def test_login_takes_the_token_and_after_logout_an_action_is_refused(console, driver):
    open_page(driver, f"{console.base}/login", "#login-form")
    type_into(driver, "#login-name", "bob")
    type_into(driver, "#login-token", "not-the-token")
    submit(driver, "#login-submit", "#login-error")
    assert not elements(driver, "#logout")

    login(driver, console.base, TOKEN, name="bob")
    [cookie] = [c for c in driver.get_cookies() if c["name"] == "kgsupervisor_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    open_page(driver, console.base + "/", "#pause-form")
    overview = driver.current_window_handle
    # Log out in a second tab: the first still holds the pause form of the logged-in session.
    driver.switch_to.new_window("tab")
    open_page(driver, console.base + "/", "#logout")
    logout(driver)
    driver.switch_to.window(overview)
    type_into(driver, "#pause-reason", "after logout")
    press(driver, "#pause")
    assert console.pause_reason() is None
    assert not elements(driver, "#banner")
    bobs = [action for who, action, _ in console.audit() if who == "bob@127.0.0.1"]
    assert bobs == ["login", "logout"], "a refused action is no action"


# -- cross-site requests --------------------------------------------------------------------------

def auto_submitting_form(action: str, fields: dict[str, str]) -> str:
    """A page whose script posts a form (without the console's CSRF token) to `action` at once."""
    inputs = "".join(f'<input type="hidden" name="{name}" value="{value}">'
                     for name, value in fields.items())
    return (f'<html><body><form id="f" method="post" action="{action}">{inputs}</form>'
            '<script>document.getElementById("f").submit()</script></body></html>')


def what_actions_change(console: Console) -> tuple:
    """Every queue row's state, the pause and the audit log: what a POST could change."""
    return (console.rows("SELECT id, status, retry_count FROM kg_processing_queue ORDER BY id"),
            console.pause_reason(), console.audit())


def post(client, url: str, fields: dict[str, str], headers: dict[str, str]) -> int:
    """The status of a POST of `fields` to `url` by `client` (a requests session, or requests),
    its redirect not followed."""
    return client.post(url, data=fields, headers=headers, timeout=10, allow_redirects=False).status_code


def test_a_cross_site_post_is_refused_and_changes_nothing(console, driver):
    with closing(console.connect()) as conn:
        [cid] = add_documents(conn, 1)
        add_failed_row(conn, cid, "cross-site target", ago=5)
    login(driver, console.base, TOKEN)
    session = logged_in_session(console.base, TOKEN)
    csrf = input_named(session.get(console.base + "/", timeout=10).text, "csrf_token")
    foreign = "http://127.0.0.1:1"
    retry = {"action": "retry", "status": "failed", "error": "cross-site target",
             "upto_id": str(console.rows("SELECT MAX(id) FROM kg_processing_queue")[0][0])}
    before = what_actions_change(console)
    pause, bulk = f"{console.base}/pause", f"{console.base}/documents/bulk"
    reason = {"reason": "cross-site", "csrf_token": csrf}
    refused = {
        "no session": post(requests, pause, reason, {"Origin": console.base}),
        "no CSRF token": post(session, pause, {"reason": "cross-site"}, {"Origin": console.base}),
        "foreign Origin": post(session, pause, reason, {"Origin": foreign}),
        "foreign Referer, no Origin": post(session, pause, reason, {"Referer": foreign + "/page"}),
        # DNS rebinding: a name of the attacker's that resolves to 127.0.0.1, its own origin.
        "foreign Host": post(session, pause, reason, {"Host": "rebound.example",
                                                      "Origin": "http://rebound.example"}),
        "bulk, foreign Origin": post(session, bulk, {**retry, "csrf_token": csrf}, {"Origin": foreign}),
    }
    assert refused == dict.fromkeys(refused, 403)
    assert what_actions_change(console) == before

    # The browser, logged in, opens a page of another origin that posts a form to the console.
    site = ForeignSite(auto_submitting_form(f"{console.base}/documents/bulk", retry))
    try:
        driver.get(site.url)
        wait(driver, lambda d: loaded(d, f"location.href === '{bulk}'"), "the cross-site form's answer")
    finally:
        site.close()
    assert what_actions_change(console) == before

    # The same request from the console's own page, with its token, is taken: the refusals above
    # were the checks at work, not a request the console could not have served.
    taken = session.post(bulk, data={**retry, "csrf_token": csrf}, headers={"Origin": console.base},
                         timeout=10)
    assert taken.status_code == 200 and "Retried 1 document" in taken.text
    wait_for(lambda: newest_status(console, cid) == "completed", 30,
             message="the retried document completed")


# -- hostile documents ----------------------------------------------------------------------------

HOSTILE_ERROR = '<img src=x onerror="window.__pwned=2">KG service rejected the document (422)'
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def test_a_title_and_an_error_holding_html_show_as_text(console, driver):
    with closing(console.connect()) as conn:
        [cid] = add_documents(conn, 1)
        conn.execute("UPDATE crawled_content SET title = ? WHERE id = ?", (HOSTILE_TITLE, cid))
        qid = add_failed_row(conn, cid, HOSTILE_ERROR, ago=5)
        add_attempt(conn, qid, cid, 1, "failed", "http_422", HOSTILE_ERROR)
    open_page(driver, f"{console.base}/document/{cid}", "#doc-title")
    assert text_of(driver, "#doc-title") == HOSTILE_TITLE and not elements(driver, "#doc-title *")
    assert text_of(driver, "#attempts .attempt .error") == HOSTILE_ERROR
    assert not elements(driver, "#attempts img")
    assert driver.execute_script("return typeof window.__pwned") == "undefined"

    open_page(driver, f"{console.base}/documents?content_id={cid}", "#documents")
    row = element(driver, f"#documents tr[data-queue-id='{qid}']")
    assert HOSTILE_TITLE in row.get_attribute("textContent") and not elements(row, "b, script, img")
    assert driver.execute_script("return typeof window.__pwned") == "undefined"

    # Escaped in the HTML itself, and the policy that would stop a script that slipped through.
    answer = requests.get(f"{console.base}/document/{cid}", timeout=10)
    assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in answer.text
    assert HOSTILE_TITLE not in answer.text
    assert answer.headers["Content-Security-Policy"] == CSP
