"""What the operator console reads and does: pages of queue rows under a filter (keyset on the
queue id, a bounded amount of work a page), one document's page, failures by class, throughput
by minute, and the retry or fail of every row a filter takes; the same SQL on SQLite and
PostgreSQL."""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kgsupervisor.errors import ConfigError
from kgsupervisor.queue.docfilter import STATUSES, DocumentFilter, filter_sql, statuses_of
from kgsupervisor.queue.failuregroups import FailureGroup
from kgsupervisor.queue.failuregroups import failure_groups as _failure_groups
from kgsupervisor.queue.history import bounded
from kgsupervisor.queue.inspection import SUPERSEDED, story_of
from kgsupervisor.queue.leased import (BULK_BATCH_ROWS, INT64_MAX, INT64_MIN, LeasedQueue, check_int64,
                                       queue_for)
from kgsupervisor.queue.sql import NO_LEASE, db_timestamp, marks
from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.owntables import ATTEMPTS_TABLE

# The statuses of the rows each bulk action changes: a retry takes failed rows back (as `retry
# --failed`); a fail never takes a processing row, which is some worker's claim.
ACTION_STATUSES = {"retry": ("failed",), "fail": ("pending", "skipped")}
# The outcomes the throughput chart counts as failed: failed for good.
FINAL_FAILURES = ("failed", "poison_pill", "bad_row")

# A page's search examines this many queue ids at most: a filter that matches rarely returns a
# partial page and where to go on, never a scan of the queue. A term that looks into another
# table (the document's url, the attempts) costs a probe for each row the other terms let
# through: those probes are held to LOOKUP_PROBES a page.
PAGE_ROWS_EXAMINED = 200_000
LOOKUP_PROBES = 20_000
# A page walks the queue down from `before` in windows of ids that double from the first size
# to the last: a dense match fills a page from a small one, a rare one pays for few statements.
FIRST_WINDOW, LAST_WINDOW = 1024, 16384
# Ids per statement of a bulk count or change (which reads every row its filter may take).
BULK_WINDOW = 50_000
# Statuses with at most this many rows (the trigger-kept counts say) are read whole through the
# status index, the filter asked of each: `processing` or `failed` are a few rows of a million,
# which a walk down the ids would take many pages to meet. Each lookup term makes a row cost
# about as much as LOOKUP_WEIGHT more rows, so fewer are read that way.
STATUS_INDEX_ROWS = 50_000
LOOKUP_WEIGHT = 8


@dataclasses.dataclass(frozen=True)
class DocumentRow:
    """One queue row as the documents page lists it, with its document's url and title."""

    queue_id: int
    content_id: int | None
    status: str | None
    url: str | None
    title: str | None
    retry_count: int | None
    error_message: str | None
    queued_at: str | None
    processed_at: str | None


@dataclasses.dataclass(frozen=True)
class Page:
    """A page of rows, newest queue id first, and where the next one starts."""

    rows: list[DocumentRow]
    next_before: int | None  # pass as `before` for the next page; None when nothing older
    scanned_to: int | None   # the lowest queue id examined (a bounded search may stop early)


@contextmanager
def _reading(conn: Any) -> Iterator[None]:
    """One read-only transaction around a page's statements, so they see one snapshot; on
    PostgreSQL without JIT compilation: the planned cost of a probe a row over a window passes
    its threshold, and compiling took longer than the read (hundreds of ms, measured)."""
    if conn.in_transaction:
        yield
        return
    postgres = backend_of(conn).name == "postgresql"
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if postgres else "BEGIN")
    try:
        if postgres:
            conn.execute("SET LOCAL jit = off")
        yield
    finally:
        conn.execute("ROLLBACK")  # it only read


# -- where to look ---------------------------------------------------------------------------------

def _first(conn: Any, sql: str, params: list[object]) -> Any:
    return conn.execute(sql, params).fetchone()[0]


class _Walk:
    """Every queue id from `high` down, a window at a time, stepping over empty stretches of ids
    (a primary key probe each)."""

    def __init__(self, conn: Any, high: int) -> None:
        self.conn = conn
        self.bottom = _first(conn, "SELECT MIN(id) FROM kg_processing_queue WHERE id <= ?", [high])
        self.top = _first(conn, "SELECT MAX(id) FROM kg_processing_queue WHERE id <= ?", [high])

    @property
    def more(self) -> bool:
        return self.top is not None

    def take(self, most: int) -> tuple[int, int]:
        """The next window of `most` ids at most: its highest and lowest id."""
        high, low = self.top, max(self.top - most + 1, self.bottom)
        self.top = None if low <= self.bottom else _first(
            self.conn, "SELECT MAX(id) FROM kg_processing_queue WHERE id < ?", [low])
        return high, low


def _index_term(chosen: DocumentFilter, statuses: tuple[str, ...], counts: dict[str, int],
                most: int) -> str | None:
    """A WHERE term through which an index finds every row `chosen` may take, when it finds few
    enough to read them all: the document's rows (the filter's own content_id term), or the rows
    of statuses that hold `most` rows at most. The statuses are spelled in the statement (known
    words only): PostgreSQL then plans each by its own frequency, where a prepared `status = $1`
    would get one plan for rare and common alike. None: walk the ids."""
    if chosen.content_id is not None:
        return "TRUE"
    if statuses and sum(counts.get(status, 0) for status in statuses) <= most:
        return f"q.status IN ({', '.join(repr(status) for status in statuses if status in STATUSES)})"
    return None


# -- pages ------------------------------------------------------------------------------------------

def _decoded(value: Any) -> Any:
    """Text read leniently (bytes from a CAST AS BLOB) as str, U+FFFD for what is not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray, memoryview)) else value


def _whole(value: Any) -> int | None:
    return value if type(value) is int else None


def _page_rows(conn: Any, where: str, params: list[object], want: int) -> list[DocumentRow]:
    """Up to `want` rows `where` takes, highest id first; the document's url and title looked up
    for those rows only."""
    lenient = backend_of(conn).lenient_text
    document = "(SELECT {} FROM crawled_content c WHERE c.id = q.content_id)"
    rows = conn.execute(
        f"SELECT q.id, q.content_id, q.status, {document.format(lenient('c.url'))}, "
        f"{document.format(lenient('c.title'))}, q.retry_count, {lenient('q.error_message')}, q.queued_at, "
        f"q.processed_at FROM kg_processing_queue q WHERE {where} ORDER BY q.id DESC LIMIT ?",
        [*params, want]).fetchall()
    return [DocumentRow(qid, _whole(cid), _decoded(status), _decoded(url), _decoded(title), _whole(retries),
                        _decoded(message), _decoded(queued), _decoded(processed))
            for qid, cid, status, url, title, retries, message, queued, processed in rows]


def _indexed_page(conn: Any, term: str, where: str, params: list[object], high: int, limit: int) -> Page:
    """A page of the rows an index finds (`term`): every one of them asked, so never partial."""
    ids = sorted((row[0] for row in conn.execute(
        f"SELECT q.id FROM kg_processing_queue q WHERE {term} AND q.id <= ? AND {where}",
        [high, *params]).fetchall()), reverse=True)
    shown = ids[:limit]
    rows = _page_rows(conn, f"q.id IN ({marks(shown)})", shown, limit) if shown else []
    if len(ids) > limit:
        return Page(rows, shown[-1], shown[-1])
    return Page(rows, None, ids[-1] if ids else None)


def _walked_page(conn: Any, where: str, params: list[object], high: int, limit: int, budget: int) -> Page:
    """A page of the rows `where` takes, walking the ids down from `high`, `budget` ids at most."""
    found: list[DocumentRow] = []
    examined, lowest, size = 0, None, FIRST_WINDOW
    walk = _Walk(conn, high)
    while walk.more and examined < budget:
        top, low = walk.take(min(size, budget - examined))
        found += _page_rows(conn, f"q.id <= ? AND q.id >= ? AND {where}", [top, low, *params],
                            limit + 1 - len(found))
        if len(found) > limit:
            last = found[limit - 1].queue_id
            return Page(found[:limit], last, last)
        examined, lowest, size = examined + top - low + 1, low, min(size * 2, LAST_WINDOW)
    return Page(found, lowest if walk.more else None, lowest)


def _walk_budget(lookups: int, statuses: tuple[str, ...], counts: dict[str, int]) -> int:
    """The ids a walked page examines: PAGE_ROWS_EXAMINED, or fewer when the lookups of the rows
    its status lets through (the share of the queue in it) would pass LOOKUP_PROBES."""
    if not lookups:
        return PAGE_ROWS_EXAMINED
    share = sum(counts.get(status, 0) for status in statuses) / max(counts["total"], 1) if statuses else 1.0
    return max(1, min(PAGE_ROWS_EXAMINED, int(LOOKUP_PROBES / lookups / max(share, 1e-9))))


def documents_page(conn: Any, chosen: DocumentFilter, before: int | None = None, limit: int = 50) -> Page:
    """The rows `chosen` takes with a queue id below `before`, newest first, `limit` at most.

    A rare status or a content id is read through its index, whole. Anything else walks the
    ids down, PAGE_ROWS_EXAMINED at most (fewer when its lookups would cost more than
    LOOKUP_PROBES): when the matches are rare it returns those found so far (maybe none) with
    `next_before` where it stopped, never a scan of the queue.
    """
    check_int64("before", [before] if before is not None else [])
    if limit < 1:
        raise ConfigError("limit", limit, "1 or more")
    if before is not None and before <= INT64_MIN:
        return Page([], None, None)
    high = INT64_MAX if before is None else before - 1
    statuses = statuses_of(chosen, None)
    where, params = filter_sql(conn, chosen, statuses)
    lookups = (chosen.url is not None) + (chosen.endpoint is not None)  # terms that look into another table
    with _reading(conn):
        counts = queue_counts(conn)
        term = _index_term(chosen, statuses, counts, STATUS_INDEX_ROWS // (1 + LOOKUP_WEIGHT * lookups))
        if term is not None:
            return _indexed_page(conn, term, where, params, high, limit)
        return _walked_page(conn, where, params, high, limit, _walk_budget(lookups, statuses, counts))


# -- bulk actions -----------------------------------------------------------------------------------

def _matching(conn: Any, chosen: DocumentFilter, action: str, upto_id: int) -> Iterator[list[int]]:
    """The ids of the rows `action` would change, a batch at a time: those `chosen` takes with
    an id up to `upto_id`, in the statuses the action changes; for a retry only a document's
    newest failed row, and none of a document that has a live row."""
    if action not in ACTION_STATUSES:
        raise ConfigError("action", action, " or ".join(ACTION_STATUSES))
    check_int64("upto_id", [upto_id])
    statuses = statuses_of(chosen, ACTION_STATUSES[action])
    if not statuses:
        return
    where, params = filter_sql(conn, chosen, statuses)
    # Asked in the SELECT list, of the rows the WHERE took (inspection.SUPERSEDED says why).
    select = f"SELECT q.id, {SUPERSEDED if action == 'retry' else 'FALSE'} FROM kg_processing_queue q WHERE "
    with _reading(conn):
        term = _index_term(chosen, statuses, queue_counts(conn), STATUS_INDEX_ROWS)
        if term is None:
            walk = _Walk(conn, upto_id)
        else:
            rows = conn.execute(f"{select}{term} AND q.id <= ? AND {where}", [upto_id, *params]).fetchall()
    if term is not None:
        yield [qid for qid, gone in rows if not gone]
        return
    while walk.more:
        with _reading(conn):
            top, low = walk.take(BULK_WINDOW)
            rows = conn.execute(f"{select}q.id <= ? AND q.id >= ? AND {where}",
                                [top, low, *params]).fetchall()
        yield [qid for qid, gone in rows if not gone]


def count_matching(conn: Any, chosen: DocumentFilter, action: str, upto_id: int) -> int:
    """How many rows `retry_matching` ("retry") or `fail_matching` ("fail") would change now."""
    with _reading(conn):  # one snapshot
        return sum(len(ids) for ids in _matching(conn, chosen, action, upto_id))


def max_queue_id(conn: Any) -> int:
    """The newest queue id (0 for an empty queue): the `upto_id` a confirmation shows the count of."""
    return _first(conn, "SELECT MAX(id) FROM kg_processing_queue", []) or 0


def retry_matching(queue: LeasedQueue, chosen: DocumentFilter, upto_id: int) -> int:
    """Put back to pending, with a fresh attempt budget, the failed rows `chosen` takes up to
    `upto_id`, as `retry --failed` does (LeasedQueue.retry); returns how many rows changed."""
    changed = 0
    for ids in _matching(queue.conn, chosen, "retry", upto_id):
        for start in range(0, len(ids), BULK_BATCH_ROWS):
            # Only while still failed, with no live row: another host may have been quicker.
            changed += queue.retry(ids=ids[start:start + BULK_BATCH_ROWS], id_statuses=("failed",))
    return changed


def fail_matching(queue: LeasedQueue, chosen: DocumentFilter, upto_id: int, reason: str,
                  now: float | None = None) -> int:
    """Fail for good the pending or skipped rows `chosen` takes up to `upto_id`; returns how
    many rows changed. Each UPDATE asks the status again in its own WHERE, so a claim racing it
    either takes the row first (and the fail passes it by) or finds it failed: never both."""
    message = bounded(f"failed by an operator: {' '.join(reason.split())}" if reason and reason.strip()
                      else "failed by an operator")
    stamp = db_timestamp(time.time() if now is None else now)
    statuses = statuses_of(chosen, ACTION_STATUSES["fail"])
    where, params = filter_sql(queue.conn, chosen, statuses)
    assignments = (f"status = 'failed', error_message = ?, processed_at = ?, not_before = NULL, "
                   f"started_at = NULL, {NO_LEASE}")
    changed = 0
    for ids in _matching(queue.conn, chosen, "fail", upto_id):
        changed += queue._update_in_batches(assignments, where, [message, stamp, *params], ids,
                                            BULK_BATCH_ROWS)
    return changed


def retry_document(queue: LeasedQueue, queue_id: int) -> int:
    """Put one failed or skipped row back to pending with a fresh attempt budget (not when its
    document has a live row); returns 1 when it did, else 0."""
    return queue.retry(ids=[queue_id], id_statuses=("failed", "skipped"))


# -- one document, failures, throughput, counts -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DocumentDetail:
    """One document's page: the document, its queue rows and every attempt, oldest first."""

    content_id: int
    url: str | None
    title: str | None
    chunks: int
    entities: int
    relationships: int
    kg_processed: bool | None
    queue_rows: list[dict]
    attempts: list[dict]  # history rows (inspection.ATTEMPT_COLUMNS), oldest first, with error and stack


def document_detail(conn: Any, content_id: int) -> DocumentDetail | None:
    """The document `content_id` as its page shows it; None when the database has neither the
    document nor a queue row of it."""
    story = story_of(conn, content_id=content_id)
    if story is None:
        return None
    document = story.document or {}
    processed = document.get("kg_processed")
    return DocumentDetail(content_id, document.get("url"), document.get("title"), document.get("chunks", 0),
                          document.get("entities_written", 0), document.get("relationships_written", 0),
                          None if processed is None else bool(processed), story.queue_rows, story.attempts)


def failure_groups(conn: Any) -> list[FailureGroup]:
    """The failed documents by error class, the class that failed last first (as `failed`)."""
    with _reading(conn):
        return _failure_groups(conn)


def throughput_series(conn: Any, now: float, minutes: int = 60) -> list[tuple[float, int, int]]:
    """(minute start, completed, failed for good) for each of the last `minutes` minutes, the
    current one included, oldest first, from the attempt history.

    Only the time is asked in the WHERE, so that the range of idx_kga_finished serves it: with the
    outcome there too, SQLite reads every completed attempt ever kept through idx_kga_failures.
    """
    if minutes < 1:
        raise ConfigError("minutes", minutes, "1 or more")
    current = math.floor(now / 60) * 60
    start = current - (minutes - 1) * 60
    # Minutes since `start`, never negative: SQLite's CAST truncates, PostgreSQL's rounds.
    minute = "(finished_at - ?) / 60"
    minute = f"FLOOR({minute})" if backend_of(conn).name == "postgresql" else f"CAST({minute} AS INTEGER)"
    rows = conn.execute(
        f"SELECT {minute}, SUM(CASE WHEN outcome = 'completed' THEN 1 ELSE 0 END), "
        f"SUM(CASE WHEN outcome IN ({marks(FINAL_FAILURES)}) THEN 1 ELSE 0 END) FROM {ATTEMPTS_TABLE} "
        "WHERE finished_at >= ? AND finished_at < ? GROUP BY 1",
        [start, *FINAL_FAILURES, start, current + 60]).fetchall()
    series = {int(index): (int(done), int(failed)) for index, done, failed in rows}
    return [(float(start + index * 60), *series.get(index, (0, 0))) for index in range(minutes)]


def queue_counts(conn: Any) -> dict[str, int]:
    """Rows by status and `total`, read from the trigger-kept counts table (LeasedQueue.counts)."""
    return queue_for(conn).counts()
