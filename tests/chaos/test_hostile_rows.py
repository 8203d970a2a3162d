"""Fault suite, hostile rows and values: one bad queue row, document or answer value fails (or
completes) alone, charged only for its own fault; no worker dies and the queue never stalls.

A real `kgsupervisor run --exit-when-empty` drains a queue holding, beside ordinary documents: a
queue row whose content_id is text, one whose priority is text, a document whose metadata holds
NaN and Infinity (Python's json reads them, no request can carry them), a document whose answer
has an offset no database column holds, and a document whose chunk sits on a damaged page.
"""
from __future__ import annotations

import json
import re
import sqlite3

import pytest

from kgsupervisor.kg.devextract import extract
from kgsupervisor.store.sqlite import transaction

from ..conftest import seed
from ..faultserver import FaultServer
from .harness import Outcome, check_invariants, drain_until_empty, record_hostile, scalar

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow, pytest.mark.chaos, pytest.mark.hostile]


def queue_row(conn: sqlite3.Connection, content_id: object) -> tuple:
    return conn.execute("SELECT status, retry_count, error_message, result_summary FROM kg_processing_queue "
                        "WHERE content_id = ?", (content_id,)).fetchone()


def damage_overflow_pages_of(db_path: str, conn: sqlite3.Connection, table: str) -> int:
    """Point the first overflow page of `table` at a page past the end of the file: SQLite
    reports SQLITE_CORRUPT when a read follows it, and only rows spilling there are hurt."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = [r[0] for r in conn.execute("SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'overflow' "
                                        "ORDER BY pageno", (table,))]
    assert pages, f"{table} has no overflow page to damage"
    # Closed first: a raw write to the file from this process while a connection of ours is open
    # would drop that connection's POSIX locks (closing any descriptor of a file drops them all),
    # and a later connection of this process would read through its stale WAL index.
    conn.close()
    with open(db_path, "r+b") as f:
        f.seek((pages[0] - 1) * page_size)
        f.write(b"\xff\xff\xff\xf0")
    return len(pages)


def test_bad_rows_and_values_fail_alone_and_stall_nothing(conn, db_path):
    normal = seed(conn, 40)
    text_priority, nan_metadata, huge_offset, damaged = seed(conn, 4)
    with transaction(conn):
        conn.execute("INSERT INTO kg_processing_queue (content_id, priority) VALUES ('abc', 5)")
        conn.execute("UPDATE kg_processing_queue SET priority = 'high' WHERE content_id = ?", (text_priority,))
        conn.execute("""UPDATE crawled_content SET metadata = '{"score": NaN, "weight": Infinity}' WHERE id = ?""",
                     (nan_metadata,))
        conn.execute("UPDATE content_chunks SET chunk_text = ? WHERE content_id = ? AND chunk_index = 0",
                     ("Ada Lovelace met Alan Turing. " * 1500, damaged))
    damage_overflow_pages_of(db_path, conn, "content_chunks")  # closes conn
    total = len(normal) + 5

    def answer(payload: dict, n: int):
        if payload["content_id"] != huge_offset:
            return None
        reference = extract(payload)
        reference["entities"][0]["chunk_appearances"][0]["offset_end"] = 2**63
        return 200, reference

    server = FaultServer(answer)
    code, log = drain_until_empty(db_path, server, "--workers", "2", env={"KG_MAX_ATTEMPTS": "2"})
    assert code == 0, log[-3000:]
    # A fresh connection: the test's own one cached pages from before they were damaged.
    conn.close()
    conn = sqlite3.connect(db_path)
    assert "killed by" not in log and "Traceback" not in log, log[-3000:]
    assert not re.search(r"exited with status [1-9]", log), "no worker died of a bad row or value"
    assert "pausing" not in log, "no bad row or value paused a worker"

    status, attempts, error, _ = queue_row(conn, "abc")
    assert (status, attempts) == ("failed", 0) and "content_id 'abc'" in error, error

    assert queue_row(conn, text_priority)[0] == "completed", "a text priority only orders the row"

    status, attempts, _, summary = queue_row(conn, nan_metadata)
    assert (status, attempts) == ("completed", 0)
    assert "metadata is not JSON" in json.loads(summary)["notes"][0]
    sent = [p for p in server.requests if p["content_id"] == nan_metadata]
    assert sent and sent[0]["metadata"] == {"tags": sent[0]["metadata"]["tags"]}, "sent without the metadata"

    status, attempts, error, _ = queue_row(conn, huge_offset)
    assert (status, attempts) == ("failed", 2), "an answer no column can hold is an invalid answer, charged"
    assert "offset_end is 9223372036854775808, must be from 0 to 2**31-1" in error, error

    status, attempts, error, _ = queue_row(conn, damaged)
    assert (status, attempts) == ("failed", 0), "no retry can mend a damaged page: failed at once"
    assert "cannot be read from the database" in error and "CORRUPT" in error, error

    outcome = check_invariants(db_path, normal + [text_priority, nan_metadata, huge_offset], Outcome(
        "hostile rows and values", total,
        "text content_id and priority in the queue, NaN metadata, an answer offset of 2**63, a damaged chunk page",
        exit_code=code, notes="3 failed on purpose, alone"), queue_rows=total,
        poison={huge_offset: "offset_end is 9223372036854775808"}, journal=server.journal)
    assert outcome.failed == 3
    assert scalar(conn, "SELECT COUNT(*) FROM kg_processing_queue WHERE retry_count > 0 AND content_id != ?",
                  huge_offset) == 0
    record_hostile("queue row with content_id 'abc' (text)", "failed at once, the value named; the batch goes on", "no")
    record_hostile("queue row with priority 'high' (text)", "processed as priority 0, completed", "no")
    record_hostile("metadata holding NaN and Infinity", "sent without the metadata, completed, noted in result_summary",
                   "no")
    record_hostile("answer with an offset of 2**63", "invalid answer: failed after KG_MAX_ATTEMPTS, the worker lives",
                   "yes (its own answer)")
    record_hostile("a document's chunk on a damaged page (SQLITE_CORRUPT)",
                   "failed at once with the SQLite error; the rest of the queue drains", "no")
