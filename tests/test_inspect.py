"""`inspect`, `failed` and `retry --error/--since/--dry-run` on SQLite and PostgreSQL: the
attempt rows are seeded with plain INSERTs (the columns of store/owntables.py)."""
from __future__ import annotations

import json
import threading
import time
from contextlib import closing

import pytest
from click.testing import CliRunner

from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.cli import main
from kgsupervisor.queue.inspection import (FailureFilter, failed_rows, failure_classes, legacy_error_class,
                                           parse_duration, story_of)
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.queue.sql import db_timestamp
from scripts.sampledata import add_documents

from .conftest import seed, status_counts
from .processes import run_to_exit

pytestmark = pytest.mark.timeout(120)

HTTP_500 = "gave up after 3 attempts: KG service error 500: {\"detail\": \"boom\"}"
TIMEOUT = "gave up after 3 attempts: KG service did not answer within 30s"
REJECTED = "KG service rejected the document (422): bad chunk"


def cli(*args: str) -> tuple[int, str]:
    """`kgsupervisor ARGS` through click's runner: exit status and everything it printed."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def add_queue_row(conn, content_id, status: str, now: float, *, message: str | None = None, ago: float = 60.0) -> int:
    """A queue row of `content_id`; a failed one failed `ago` seconds before `now`."""
    failed_at = db_timestamp(now - ago) if status == "failed" else None
    return conn.execute("INSERT INTO kg_processing_queue (content_id, status, priority, queued_at, processed_at, "
                        "retry_count, error_message) VALUES (?, ?, 1, ?, ?, 3, ?) RETURNING id",
                        (content_id, status, db_timestamp(now - 3600), failed_at, message)).fetchone()[0]


def add_attempt(conn, queue_id: int, content_id: int, attempt: int, outcome: str, now: float, *,
                error_class=None, message=None, http_status=None, finished_ago: float = 60.0) -> None:
    """One attempt row, as the history records it."""
    conn.execute(
        "INSERT INTO kg_processing_attempts (queue_id, content_id, attempt, claim_key, owner, worker, "
        "endpoint, claimed_at, sent_at, finished_at, duration, outcome, http_status, error_class, "
        "error_message) VALUES (?, ?, ?, ?, 'web-1:4242', 2, 'http://kg.example:8088', ?, ?, ?, 0.25, "
        "?, ?, ?, ?)",
        (queue_id, content_id, attempt, f"token-{queue_id}-{attempt}", now - finished_ago - 0.25,
         now - finished_ago - 0.2, now - finished_ago, outcome, http_status, error_class, message))


def seed_failures(conn, now: float) -> dict[str, list[int]]:
    """Failed documents of several classes, with and without history; returns content ids by role."""
    ids = add_documents(conn, 10, seed=15)
    # Two http_500 failures recorded by the history (the error class comes from the last attempt).
    for cid, ago in ((ids[0], 300), (ids[1], 30)):
        qid = add_queue_row(conn, cid, "failed", now, message=HTTP_500, ago=ago)
        for n in (1, 2, 3):
            add_attempt(conn, qid, cid, n, "retried" if n < 3 else "failed", now, error_class="http_500",
                        message="KG service error 500", http_status=500, finished_ago=ago + 3 - n)
    # Failed before the history existed: classes read from the message.
    add_queue_row(conn, ids[2], "failed", now, message=TIMEOUT, ago=7200)
    add_queue_row(conn, ids[3], "failed", now, message=REJECTED, ago=20)
    # A document failed twice: only its newest failed row stands for it.
    add_queue_row(conn, ids[4], "failed", now, message=HTTP_500, ago=90000)
    add_queue_row(conn, ids[4], "failed", now, message=HTTP_500, ago=80000)
    # A failed document queued again: it is pending now, not failed.
    add_queue_row(conn, ids[5], "failed", now, message=HTTP_500, ago=500)
    add_queue_row(conn, ids[5], "pending", now)
    # Rows that did not fail.
    add_queue_row(conn, ids[6], "completed", now)
    add_queue_row(conn, ids[7], "pending", now)
    return {"http_500": [ids[0], ids[1], ids[4]], "timeout": [ids[2]], "http_422": [ids[3]],
            "requeued": [ids[5]], "all": ids}


def queue_snapshot(conn) -> list[tuple]:
    return conn.execute("SELECT * FROM kg_processing_queue ORDER BY id").fetchall()


# -- durations and classes ------------------------------------------------------------------------

@pytest.mark.parametrize("value, seconds", [("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800),
                                             ("1.5h", 5400), (" 30m ", 1800)])
def test_a_duration_is_a_number_and_one_unit(value, seconds):
    assert parse_duration("--since", value) == seconds


@pytest.mark.parametrize("value", ["2x", "", "h", "-1h", "0s", "2 h", "1e3s", "nan", "99999999d", "2hours"])
def test_a_bad_duration_names_the_option_the_value_and_the_form(value):
    with pytest.raises(ConfigError) as caught:
        parse_duration("--since", value)
    assert str(caught.value) == f"--since={value!r}: expected a duration like 90s, 15m, 2h or 7d"


@pytest.mark.parametrize("message, error_class", [
    (HTTP_500, "http_500"),
    ("KG service error 503: down", "http_503"),
    (TIMEOUT, "timeout"),
    ("KG service did not finish its answer within 5s", "timeout"),
    ("gave up after 2 attempts: invalid answer: answer is not JSON: x", "invalid_answer"),
    (REJECTED, "http_422"),
    ("content_id 7 has no chunks in content_chunks", "document_rejected"),
    ("poison pill: a worker died 3 times while processing this document (last: SIGKILL); not retried",
     "poison_pill"),
    ("queue row 9 has content_id 'abc' (str), not a crawled_content id", "bad_row"),
    ("gave up after 3 attempts: internal error: RecursionError: deep", "internal_error"),
    ("something nobody wrote yet", "other"),
    (None, "unknown"),
])
def test_rows_failed_before_the_history_get_a_class_from_their_message(message, error_class):
    assert legacy_error_class(message) == error_class


@pytest.mark.parametrize("args", [["failed", "--since", "2x"], ["retry", "--since", "soon", "--dry-run"],
                                  ["failed", "--since", "-5m"]])
def test_a_bad_since_is_one_line_and_exit_2(db_path, args):
    proc = run_to_exit(*args, "--db", db_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"Error: --since={args[2]!r}: expected a duration like 90s, 15m, 2h or 7d"]


# -- failed ---------------------------------------------------------------------------------------

def test_failed_groups_documents_by_class_newest_first_with_an_example(backend):
    with closing(backend.connect()) as conn:
        ids = seed_failures(conn, time.time())
        classes = failure_classes(conn, FailureFilter())
    assert [(c.error_class, c.count) for c in classes] == [("http_422", 1), ("http_500", 3),
                                                          ("timeout", 1)]
    http = classes[1]
    assert (http.newest.content_id, http.newest.error_message) == (ids["http_500"][1], HTTP_500)
    assert http.url and http.url.endswith(f"/{ids['http_500'][1]}")
    code, out = cli("failed", "--db", backend.target, "--json")
    assert code == 0
    shown = json.loads(out)
    assert shown["failed"] == 5
    assert [(c["error_class"], c["count"], c["example"]["content_id"]) for c in shown["classes"]] == [
        ("http_422", 1, ids["http_422"][0]), ("http_500", 3, ids["http_500"][1]),
        ("timeout", 1, ids["timeout"][0])]
    code, out = cli("failed", "--db", backend.target)
    assert code == 0
    assert out.splitlines()[0] == "5 failed document(s) in 3 error class(es), the last to fail first"
    assert f"  e.g. content {ids['http_500'][1]} " in out and f"       {HTTP_500}" in out


def test_failed_error_and_retry_error_dry_run_agree_and_the_dry_run_changes_nothing(backend):
    with closing(backend.connect()) as conn:
        ids = seed_failures(conn, time.time())
        before = queue_snapshot(conn)
        for text, expected in (("500", 3), ("HTTP_5", 3), ("within 30S", 1), ("rejected", 1), ("nothing such", 0)):
            code, out = cli("failed", "--db", backend.target, "--error", text, "--json")
            assert code == 0 and json.loads(out)["failed"] == expected
            code, out = cli("retry", "--db", backend.target, "--error", text, "--dry-run")
            assert (code, out) == (0, f"{expected} row(s) would go back to pending (dry run: nothing changed)\n")
        code, out = cli("retry", "--db", backend.target, "--failed", "--dry-run")
        assert out == "5 row(s) would go back to pending (dry run: nothing changed)\n"
        assert queue_snapshot(conn) == before

        code, out = cli("retry", "--db", backend.target, "--error", "500")
        assert (code, out) == (0, "3 row(s) back to pending\n")
        live = {cid for (cid,) in conn.execute("SELECT content_id FROM kg_processing_queue "
                                               "WHERE status = 'pending' AND retry_count = 0")}
        assert live == set(ids["http_500"])
        assert json.loads(cli("failed", "--db", backend.target, "--error", "500", "--json")[1])["failed"] == 0
        # What is left is what plain --failed puts back, as --failed --dry-run said.
        assert cli("retry", "--db", backend.target, "--failed", "--dry-run")[1].startswith("2 row(s)")
        assert cli("retry", "--db", backend.target, "--failed")[1] == "2 row(s) back to pending\n"


def test_a_failure_completed_elsewhere_after_the_selection_stays_completed(backend):
    # retry --error picks its rows, then puts them back by id, only while they are still failed:
    # one that another host retried and completed in between is not revived.
    with closing(backend.connect()) as conn:
        now = time.time()
        cid = add_documents(conn, 1, seed=3)[0]
        qid = add_queue_row(conn, cid, "failed", now, message=HTTP_500)
        assert [row.queue_id for row in failed_rows(conn, FailureFilter.of_options("500", None, now))] == [qid]
        conn.execute("UPDATE kg_processing_queue SET status = 'completed' WHERE id = ?", (qid,))
        q = queue_for(conn)
        assert q.retry(ids=[qid], id_statuses=("failed",)) == 0
        assert status_counts(conn) == {"completed": 1}
        assert q.retry(ids=[qid]) == 1, "by id alone (retry --id) a completed row is put back on purpose"


def test_since_takes_the_recent_failures_and_combines_with_error(backend):
    with closing(backend.connect()) as conn:
        ids = seed_failures(conn, time.time())
    code, out = cli("failed", "--db", backend.target, "--since", "2m", "--json")
    assert code == 0
    assert {c["example"]["content_id"] for c in json.loads(out)["classes"]} == {ids["http_500"][1],
                                                                                ids["http_422"][0]}
    assert json.loads(cli("failed", "--db", backend.target, "--since", "1h", "--json")[1])["failed"] == 3
    assert cli("retry", "--db", backend.target, "--since", "1h", "--error", "500", "--dry-run")[1].startswith("2 row")
    assert cli("retry", "--db", backend.target, "--since", "1h", "--error", "500")[1] == "2 row(s) back to pending\n"
    assert json.loads(cli("failed", "--db", backend.target, "--since", "3h", "--json")[1])["failed"] == 2


def test_dry_run_refuses_what_it_cannot_count(db_path):
    code, out = cli("retry", "--db", db_path, "--skipped", "--dry-run")
    assert code == 2 and "--dry-run counts failed rows" in out
    code, out = cli("retry", "--db", db_path)
    assert code == 2 and "--error TEXT or --since DURATION" in out


# -- inspect --------------------------------------------------------------------------------------

def test_inspect_tells_a_documents_whole_story(backend):
    now = time.time()
    with closing(backend.connect()) as conn:
        ids = seed_failures(conn, now)
        cid = ids["http_500"][1]
        qid = conn.execute("SELECT id FROM kg_processing_queue WHERE content_id = ?", (cid,)).fetchone()[0]
        conn.execute("UPDATE kg_processing_attempts SET stack = ? WHERE queue_id = ? AND attempt = 2",
                     ('File "kgworker.py", line 10, in send\n    wait()', qid))
        story = story_of(conn, content_id=cid)
    assert story.document["id"] == cid and story.document["chunks"] == 3
    assert [r["id"] for r in story.queue_rows] == [qid]
    assert [(a["attempt"], a["outcome"]) for a in story.attempts] == [(1, "retried"), (2, "retried"), (3, "failed")]

    code, out = cli("inspect", "--db", backend.target, str(cid))
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == f"document {cid}: {story.document['url']}"
    assert f"queue row {qid}: failed, priority 1, retry_count 3" in out
    assert "attempts: 3" in lines
    header = lines.index("attempts: 3") + 1
    assert lines[header].split() == ["#", "finished", "(UTC)", "outcome", "took", "owner", "worker", "endpoint",
                                     "http", "error", "or", "result"]
    assert lines[header + 3].split() == ["3", *db_timestamp(now - 30).split(), "failed", "0.25s", "web-1:4242", "2",
                                         "http://kg.example:8088", "500", "http_500:", "KG", "service", "error", "500"]
    assert lines[-3:] == [f"  stack of attempt 2 (queue row {qid}):", '      File "kgworker.py", line 10, in send',
                          "          wait()"]

    code, out = cli("inspect", "--db", backend.target, "--queue-id", str(qid), "--json")
    assert code == 0
    assert json.loads(out)["attempts"][1]["stack"].endswith("wait()")
    assert json.loads(out) == json.loads(json.dumps(story.as_json()))


def test_inspect_of_a_document_without_history_and_of_nothing(backend):
    with closing(backend.connect()) as conn:
        ids = seed_failures(conn, time.time())
    code, out = cli("inspect", "--db", backend.target, str(ids["timeout"][0]))
    assert code == 0 and out.splitlines()[-1] == "attempts: none recorded" and f"error     {TIMEOUT}" in out
    code, out = cli("inspect", "--db", backend.target, str(ids["requeued"][0]))
    assert code == 0 and [line.split(":")[1].split(",")[0] for line in out.splitlines()
                          if line.startswith("queue row")] == [" failed", " pending"]
    code, out = cli("inspect", "--db", backend.target, "987654")
    assert (code, out.count("\n")) == (1, 1) and "has no document 987654 and no queue row for it" in out
    code, out = cli("inspect", "--db", backend.target, "--queue-id", "987654")
    assert code == 1 and "has no queue row 987654" in out


def test_inspect_wants_one_name_for_the_document(db_path):
    assert cli("inspect", "--db", db_path)[0] == 2
    assert cli("inspect", "--db", db_path, "3", "--queue-id", "4")[0] == 2


@pytest.mark.parametrize("args", [["2" + "0" * 19], ["--queue-id", "-" + "9" * 20]])
def test_an_id_beyond_the_databases_range_is_one_line_and_exit_2(db_path, args):
    proc = run_to_exit("inspect", "--db", db_path, *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "64-bit range" in proc.stderr, proc.stderr


def test_an_unknown_content_id_is_one_line_and_exit_1_as_a_real_process(db_path):
    proc = run_to_exit("inspect", "--db", db_path, "4711")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"Error: {db_path} has no document 4711 and no queue row for it"]


# -- end to end: what real workers recorded -------------------------------------------------------

def test_real_workers_history_answers_inspect_failed_and_retry(db_path, conn, processes, fault_server):
    """One document always answered 500 (failed after 2 attempts), one answered 500 once and then
    ingested, one ingested at once: the history the workers wrote tells each story."""
    broken, flaky, fine = seed(conn, 3)
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def behaviour(payload: dict, n: int):
        with lock:
            seen[payload["content_id"]] = tries = seen.get(payload["content_id"], 0) + 1
        if payload["content_id"] == broken or (payload["content_id"] == flaky and tries == 1):
            return 500, {"success": False, "error": "model crashed"}
        return None

    server = fault_server(behaviour)
    supervisor = processes.supervisor(db_path, server.url, "--exit-when-empty", "--max-attempts", "2",
                                      "--workers", "1")
    assert supervisor.wait(timeout=60) == 0, supervisor.output

    stories = {cid: json.loads(run_to_exit("inspect", "--db", db_path, str(cid), "--json").stdout)
               for cid in (broken, flaky, fine)}
    outcomes = {cid: [(a["outcome"], a["error_class"]) for a in s["attempts"]] for cid, s in stories.items()}
    assert outcomes == {broken: [("retried", "http_500"), ("failed", "http_500")],
                        flaky: [("retried", "http_500"), ("completed", None)],
                        fine: [("completed", None)]}
    assert stories[flaky]["document"]["kg_processed"] == 1 and stories[flaky]["queue_rows"][0]["status"] == "completed"

    shown = json.loads(run_to_exit("failed", "--db", db_path, "--error", "model crashed", "--json").stdout)
    assert [(c["error_class"], c["count"], c["example"]["content_id"]) for c in shown["classes"]] == [
        ("http_500", 1, broken)]
    dry = run_to_exit("retry", "--db", db_path, "--error", "model crashed", "--since", "1h", "--dry-run")
    assert dry.stdout == "1 row(s) would go back to pending (dry run: nothing changed)\n"
    assert status_counts(conn) == {"completed": 2, "failed": 1}
