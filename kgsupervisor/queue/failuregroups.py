"""The console's Failures page: the failed documents by error class, counted and ranked by the
database itself, the class that failed last first (as `kgsupervisor failed` groups them)."""
from __future__ import annotations

import dataclasses
from typing import Any

from kgsupervisor.queue.inspection import (LATEST_CLASS, SUPERSEDED, FailedRow, FailureFilter,
                                           failure_classes, legacy_error_class)
from kgsupervisor.queue.sql import marks
from kgsupervisor.store.backend import backend_of


@dataclasses.dataclass(frozen=True)
class FailureGroup:
    """The failed documents of one error class, and its newest as the example."""

    error_class: str
    count: int
    newest_at: str | None
    example_queue_id: int
    example_content_id: int | None
    example_message: str | None


# One row per error class: its count and its newest failure. The superseded test is asked in a
# MATERIALIZED step's SELECT list, row by row through the content_id index (in the WHERE,
# PostgreSQL may turn it into an anti-join over the whole queue: inspection.SUPERSEDED). A NULL
# class is a row failed before the attempt history existed: its class is read from its message.
GROUPED = f"""
WITH failed AS MATERIALIZED (
    SELECT q.id, q.content_id, q.processed_at, {LATEST_CLASS} AS error_class, {SUPERSEDED} AS superseded
    FROM kg_processing_queue q WHERE q.status = 'failed'),
ranked AS (
    SELECT id, content_id, processed_at, error_class, COUNT(*) OVER (PARTITION BY error_class) AS n,
           ROW_NUMBER() OVER (PARTITION BY error_class ORDER BY processed_at DESC NULLS LAST, id DESC) AS rn
    FROM failed WHERE NOT superseded)
SELECT error_class, n, processed_at, id, content_id FROM ranked WHERE rn = 1"""


def _decoded(value: Any) -> Any:
    """Text read leniently (bytes from a CAST AS BLOB) as str, U+FFFD for what is not UTF-8."""
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray, memoryview)) else value


def _whole(value: Any) -> int | None:
    return value if type(value) is int else None


def failure_groups(conn: Any) -> list[FailureGroup]:
    """The failed documents by error class, the class that failed last first.

    Counted in SQL, so the page costs one pass over the failed rows' index probes and no row
    reaches Python but one per class. A database with failures older than the attempt history
    (no class recorded) is grouped row by row, as `failed` does, since their class is read from
    the message.
    """
    winners = conn.execute(GROUPED).fetchall()
    if any(error_class is None for error_class, *_ in winners):
        return _grouped_row_by_row(conn)
    messages = _messages(conn, [qid for *_, qid, _ in winners])
    groups = [FailureGroup(_decoded(error_class), int(n), _decoded(failed_at), qid, _whole(cid), messages.get(qid))
              for error_class, n, failed_at, qid, cid in winners]
    return sorted(groups, key=lambda g: (g.newest_at or "", g.example_queue_id), reverse=True)


def _messages(conn: Any, queue_ids: list[int]) -> dict[int, str | None]:
    """The error message of each of these queue rows."""
    if not queue_ids:
        return {}
    column = backend_of(conn).lenient_text("error_message")
    return {qid: _decoded(message) for qid, message in conn.execute(
        f"SELECT id, {column} FROM kg_processing_queue WHERE id IN ({marks(queue_ids)})", queue_ids)}


def _grouped_row_by_row(conn: Any) -> list[FailureGroup]:
    """The same groups with every failed row read, for classes only a message tells."""
    lenient = backend_of(conn).lenient_text
    rows = conn.execute(f"SELECT q.id, q.content_id, q.processed_at, {lenient('q.error_message')}, "
                        f"{LATEST_CLASS}, {SUPERSEDED} FROM kg_processing_queue q WHERE q.status = 'failed'")
    standing = [FailedRow(qid, cid, _decoded(failed_at), _decoded(message),
                          error_class or legacy_error_class(_decoded(message)))
                for qid, cid, failed_at, message, error_class, superseded in rows.fetchall() if not superseded]
    return [FailureGroup(group.error_class, group.count, group.newest.failed_at, group.newest.queue_id,
                         _whole(group.newest.content_id), group.newest.error_message)
            for group in failure_classes(conn, FailureFilter(), standing)]
