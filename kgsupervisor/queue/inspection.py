"""What the database knows of processed documents, read for operators: one document's whole
story (`inspect`), the failed documents by error class (`failed`), and the failed rows that
`retry --error/--since` puts back; the same SQL on SQLite and PostgreSQL."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from kgsupervisor.errors import ConfigError
from kgsupervisor.queue.leased import BULK_BATCH_ROWS, LeasedQueue, Progress, check_int64
from kgsupervisor.queue.sql import db_timestamp, live, marks
from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.owntables import ATTEMPTS_TABLE

# --since and any other "how long ago": a number and one unit, as operators say it.
DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_FORM = "a duration like 90s, 15m, 2h or 7d"
LONGEST_DURATION = 36500 * 86400  # a century: anything longer is a typo

# The error class of a row failed before the attempt history existed, read from its
# error_message (the worker's own wordings) as the history names it (worker.document's
# error_class_of): the first pattern that matches, searched after a "gave up after N attempts: "
# prefix; "other" when none does, "unknown" for no message.
LEGACY_CLASSES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^poison pill"), "poison_pill"),
    (re.compile(r"^queue row \d+ has content_id"), "bad_row"),
    (re.compile(r"KG service error (\d{3})|rejected the document \((\d{3})\)"), r"http_\1\2"),
    (re.compile(r"did not (?:answer|finish its answer) within"), "timeout"),
    (re.compile(r"^(?:invalid answer|answer )"), "invalid_answer"),
    (re.compile(r"rejected the document|does not exist in crawled_content|has no chunks|"
                r"cannot be read from the database|cannot be sent as JSON"), "document_rejected"),
    (re.compile(r"^internal error"), "internal_error"),
]
GAVE_UP = re.compile(r"^gave up after \d+ attempts: ")

# A failed row stands for its document unless another row of that document is live or a newer
# one failed: the rows left are exactly those `retry --failed` puts back (LeasedQueue.retry
# takes the newest failed row of a document that has no live row), so that `failed` and a
# retry's counts agree. Asked in the SELECT list, row by row through the content_id index
# (live() keeps status indexes out): in the WHERE, PostgreSQL with stale statistics turns it
# into an anti-join that reads the whole queue for every page.
SUPERSEDED = (f"EXISTS (SELECT 1 FROM kg_processing_queue o "
              f"WHERE o.content_id = q.content_id AND o.id <> q.id "
              f"AND ({live('o')} OR (COALESCE(o.status, '') = 'failed' AND o.id > q.id)))")
# WHERE of a page of ids: still failed, spelled so that no index on status can serve it
# (without statistics SQLite would read every failed row for each page).
STILL_FAILED = "COALESCE(q.status, '') = 'failed'"
# The error class the newest attempt of a queue row recorded (idx_kga_queue: one index probe).
LATEST_CLASS = (f"(SELECT a.error_class FROM {ATTEMPTS_TABLE} a WHERE a.queue_id = q.id "
                f"ORDER BY a.id DESC LIMIT 1)")

QUEUE_ROW_COLUMNS = ("id", "content_id", "status", "priority", "queued_at", "processing_started_at",
                     "processed_at", "retry_count", "crash_count", "error_message", "skipped_reason",
                     "lease_owner", "lease_expires_at", "not_before", "result_summary")
ATTEMPT_COLUMNS = ("id", "queue_id", "content_id", "attempt", "owner", "worker", "endpoint", "claimed_at",
                   "sent_at", "finished_at", "duration", "outcome", "http_status", "error_class",
                   "error_message", "answer_bytes", "entities", "relationships", "stack")


def parse_duration(option: str, value: str) -> float:
    """Seconds in `value` (90s, 15m, 2h, 7d); a one-line ConfigError naming `option` otherwise."""
    match = DURATION.fullmatch(value.strip())
    seconds = float(match[1]) * DURATION_UNITS[match[2]] if match else math.nan
    if not 0 < seconds <= LONGEST_DURATION:  # nan (no match) fails too
        raise ConfigError(option, value, DURATION_FORM)
    return seconds


def legacy_error_class(message: str | None) -> str:
    """The error class of a failed row with no attempt history, read from its message."""
    if not message:
        return "unknown"
    text = GAVE_UP.sub("", message)
    for pattern, error_class in LEGACY_CLASSES:
        found = pattern.search(text)
        if found:
            return found.expand(error_class)
    return "other"


@dataclasses.dataclass(frozen=True)
class FailureFilter:
    """Which failed documents: all, or those whose message or class holds `error` (any case),
    or those that failed at or after `since` (unix seconds)."""

    error: str | None = None
    since: float | None = None

    @classmethod
    def of_options(cls, error: str | None, since: str | None, now: float) -> FailureFilter:
        """The --error and --since of `failed` and `retry`, read the same way by both."""
        return cls(error, now - parse_duration("--since", since) if since is not None else None)

    def matches(self, row: FailedRow) -> bool:
        """Does `row` hold the --error text (--since is asked of the database)?"""
        if self.error is None:
            return True
        wanted = self.error.casefold()
        return wanted in (row.error_message or "").casefold() or wanted in row.error_class.casefold()


@dataclasses.dataclass(frozen=True)
class FailedRow:
    """One failed document: its queue row, when it failed, its message and error class."""

    queue_id: int
    content_id: Any
    failed_at: str | None  # processed_at, UTC `YYYY-MM-DD HH:MM:SS`
    error_message: str | None
    error_class: str


@dataclasses.dataclass
class FailureClass:
    """The failed documents of one error class: how many, and the newest as an example."""

    error_class: str
    count: int
    newest: FailedRow
    url: str | None = None  # the example's document

    def as_json(self) -> dict[str, Any]:
        """The class as `failed --json` prints it."""
        return {"error_class": self.error_class, "count": self.count,
                "example": {**dataclasses.asdict(self.newest), "url": self.url}}


def _newest_key(row: FailedRow) -> tuple[str, int]:
    """Orders failures by when they failed, then by queue row."""
    return (row.failed_at or "", row.queue_id)


def _ids(conn: Any, sql: str, params: Sequence[object] = ()) -> list[int]:
    """The first column of every row `sql` returns."""
    return [row[0] for row in conn.execute(sql, params).fetchall()]


def failed_rows(conn: Any, chosen: FailureFilter, batch_rows: int = BULK_BATCH_ROWS) -> Iterator[FailedRow]:
    """Every failed document `chosen` takes, in queue id order.

    The failed rows' ids come first from the status index (a covering read in SQLite), then
    their details `batch_rows` ids at a time by primary key: never a scan of the whole queue,
    and no sort of every failed row per page.
    """
    since = "" if chosen.since is None else " AND q.processed_at >= ?"
    extra = [] if chosen.since is None else [db_timestamp(chosen.since)]
    # Sorted here, not by ORDER BY: with it SQLite may walk the whole table in id order instead.
    ids = sorted(_ids(conn, "SELECT id FROM kg_processing_queue WHERE status = 'failed'"))
    for start in range(0, len(ids), batch_rows):
        batch = ids[start:start + batch_rows]
        rows = conn.execute(
            f"SELECT q.id, q.content_id, q.processed_at, q.error_message, {LATEST_CLASS}, {SUPERSEDED} "
            f"FROM kg_processing_queue q WHERE q.id IN ({marks(batch)}) AND {STILL_FAILED}{since} "
            "ORDER BY q.id", [*batch, *extra]).fetchall()
        for qid, cid, failed_at, message, error_class, superseded in rows:
            row = FailedRow(qid, cid, failed_at, message, error_class or legacy_error_class(message))
            if not superseded and chosen.matches(row):
                yield row


def failure_classes(conn: Any, chosen: FailureFilter,
                    rows: Iterable[FailedRow] | None = None) -> list[FailureClass]:
    """The failed documents `chosen` takes (or `rows`, read by the caller) by error class, the
    class that failed last first, each with its newest failure as the example (and its url)."""
    classes: dict[str, FailureClass] = {}
    for row in failed_rows(conn, chosen) if rows is None else rows:
        group = classes.get(row.error_class)
        if group is None:
            classes[row.error_class] = FailureClass(row.error_class, 1, row)
            continue
        group.count += 1
        if _newest_key(row) > _newest_key(group.newest):
            group.newest = row
    ordered = sorted(classes.values(), key=lambda g: _newest_key(g.newest), reverse=True)
    urls = _urls(conn, [g.newest.content_id for g in ordered])
    for group in ordered:
        group.url = urls.get(group.newest.content_id)
    return ordered


def _urls(conn: Any, content_ids: list[Any]) -> dict[Any, str]:
    """The url of each of these documents that exists."""
    ids = [cid for cid in content_ids if isinstance(cid, int)]
    if not ids:
        return {}
    column = backend_of(conn).lenient_text("url")
    return {cid: _text(url) for cid, url in conn.execute(
        f"SELECT id, {column} FROM crawled_content WHERE id IN ({marks(ids)})", ids).fetchall()}


def retry_failures(queue: LeasedQueue, chosen: FailureFilter, *, dry_run: bool = False,
                   progress: Progress | None = None) -> int:
    """Put the failed documents `chosen` takes back to pending with a fresh attempt budget, as
    `retry --failed` does; with `dry_run` only count them. Returns how many rows (would) change."""
    ids = [row.queue_id for row in failed_rows(queue.conn, chosen)]
    if dry_run:
        return len(ids)
    changed = 0
    for start in range(0, len(ids), BULK_BATCH_ROWS):
        # Only while still failed: a row another host retried and completed meanwhile stays done.
        changed += queue.retry(ids=ids[start:start + BULK_BATCH_ROWS], id_statuses=("failed",))
        if progress:
            progress(min(start + BULK_BATCH_ROWS, len(ids)), len(ids))
    return changed


# -- one document's story -----------------------------------------------------------------------

@dataclasses.dataclass
class Story:
    """One document as the database tells it: the document, its queue rows, its attempts."""

    content_id: Any
    document: dict[str, Any] | None
    queue_rows: list[dict[str, Any]]
    attempts: list[dict[str, Any]]

    def as_json(self) -> dict[str, Any]:
        """The story as `inspect --json` prints it."""
        return dataclasses.asdict(self)


def _text(value: Any) -> Any:
    """Text read leniently (bytes from a CAST AS BLOB) as str, U+FFFD for what is not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray, memoryview)) \
        else value


def _dicts(cursor: Any, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The cursor's rows as dicts of `columns`, text read leniently."""
    return [{c: _text(v) for c, v in zip(columns, row)} for row in cursor.fetchall()]


def document_of(conn: Any, content_id: int) -> dict[str, Any] | None:
    """The crawled_content row, its chunk count and the KG rows written for it, or None."""
    lenient = backend_of(conn).lenient_text
    row = conn.execute(
        f"SELECT id, {lenient('url')}, {lenient('title')}, kg_processed, kg_processed_at, kg_document_id, "
        "kg_entity_count, kg_relationship_count FROM crawled_content WHERE id = ?", (content_id,)).fetchone()
    if row is None:
        return None
    document = dict(zip(("id", "url", "title", "kg_processed", "kg_processed_at", "kg_document_id",
                         "kg_entity_count", "kg_relationship_count"), map(_text, row)))
    for key, table in (("chunks", "content_chunks"), ("entities_written", "chunk_entities"),
                       ("relationships_written", "chunk_relationships")):
        document[key] = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE content_id = ?",
                                     (content_id,)).fetchone()[0]
    return document


def story_of(conn: Any, *, content_id: int | None = None, queue_id: int | None = None) -> Story | None:
    """The story of a document, named by its content id or by one of its queue rows; None when
    the database has neither such a document nor such a queue row."""
    check_int64("content id", [content_id] if content_id is not None else [])
    check_int64("--queue-id", [queue_id] if queue_id is not None else [])
    columns = ", ".join(QUEUE_ROW_COLUMNS)
    lone_row: list[dict[str, Any]] = []
    if queue_id is not None:
        lone_row = _dicts(conn.execute(f"SELECT {columns} FROM kg_processing_queue WHERE id = ?",
                                       (queue_id,)), QUEUE_ROW_COLUMNS)
        if not lone_row:
            return None
        content_id = lone_row[0]["content_id"]
        if not isinstance(content_id, int):  # a bad row: no document to follow, the row alone
            return Story(content_id, None, lone_row, _attempts(conn, "queue_id", queue_id))
    document = document_of(conn, content_id)
    rows = _dicts(conn.execute(f"SELECT {columns} FROM kg_processing_queue WHERE content_id = ? ORDER BY id",
                               (content_id,)), QUEUE_ROW_COLUMNS)
    if document is None and not rows:
        return None
    return Story(content_id, document, rows, _attempts(conn, "content_id", content_id))


def _attempts(conn: Any, key: str, value: Any) -> list[dict[str, Any]]:
    """The attempt rows of a content id or a queue id, oldest first (idx_kga_content / _queue)."""
    return _dicts(conn.execute(f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM {ATTEMPTS_TABLE} "
                               f"WHERE {key} = ? ORDER BY id", (value,)), ATTEMPT_COLUMNS)

