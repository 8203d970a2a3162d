"""The commands that answer an operator's questions from the database: `inspect` (one document's
whole story) and `failed` (the failed documents by error class)."""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import click

from kgsupervisor.errors import KGSupervisorError
from kgsupervisor.ops.cli_options import db_option
from kgsupervisor.ops.cli_queue import database_errors
from kgsupervisor.queue.inspection import FailureClass, FailureFilter, Story, failure_classes, story_of
from kgsupervisor.store import backend

ATTEMPT_HEADERS = ("#", "finished (UTC)", "outcome", "took", "owner", "worker", "endpoint", "http",
                   "error or result")


def utc(seconds: float | None) -> str:
    """Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC (the queue's own timestamps are in that form)."""
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def text_table(headers: Sequence[str], rows: list[Sequence[Any]], indent: str = "  ") -> list[str]:
    """Plain columns, each as wide as its widest cell; the last one left ragged."""
    cells = [[str(h) for h in headers], *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers) - 1)]
    return [indent + "  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[-1]]).rstrip()
            for row in cells]


@click.command()
@db_option
@click.argument("content_id", type=int, required=False)
@click.option("--queue-id", type=int, metavar="N", help="Name the document by one of its queue rows instead.")
@click.option("--json", "as_json", is_flag=True, help="Print it all as one JSON object.")
def inspect(db_path: str, content_id: int | None, queue_id: int | None, as_json: bool) -> None:
    """One document's whole story: the document, its queue rows and every attempt at it."""
    if (content_id is None) == (queue_id is None):
        raise click.UsageError("give a CONTENT_ID or --queue-id N (one of them)")
    with database_errors(db_path):
        conn = backend.open_database(db_path)
        try:
            story = story_of(conn, content_id=content_id, queue_id=queue_id)
        finally:
            conn.close()
    if story is None:
        named = (f"queue row {queue_id}" if queue_id is not None
                 else f"document {content_id} and no queue row for it")
        raise KGSupervisorError(f"{backend.describe(db_path)} has no {named}")
    if as_json:
        click.echo(json.dumps(story.as_json()))
        return
    click.echo("\n".join(story_lines(story)))


def story_lines(story: Story) -> list[str]:
    """`inspect` as plain text: the document, its queue rows, then its attempts as a table."""
    return [*document_lines(story), *(line for row in story.queue_rows for line in queue_row_lines(row)),
            *attempt_lines(story.attempts)]


def document_lines(story: Story) -> list[str]:
    """The document, its chunks and the KG rows written for it."""
    doc = story.document
    if doc is None:
        return [f"document {story.content_id}: not in crawled_content"]
    return [f"document {doc['id']}: {doc['url']}",
            f"  title     {doc['title'] or '-'}",
            f"  chunks    {doc['chunks']}",
            f"  KG rows   {doc['entities_written']} in chunk_entities, {doc['relationships_written']} in "
            f"chunk_relationships",
            f"  KG marks  kg_processed={doc['kg_processed']} at {doc['kg_processed_at'] or '-'}, "
            f"kg_document_id={doc['kg_document_id'] or '-'}, kg_entity_count={doc['kg_entity_count']}, "
            f"kg_relationship_count={doc['kg_relationship_count']}"]


def queue_row_lines(row: dict[str, Any]) -> list[str]:
    """One queue row: its status and counts, who holds it, why it failed or was skipped."""
    lines = [f"queue row {row['id']}: {row['status']}, priority {row['priority']}, "
             f"retry_count {row['retry_count'] or 0}, crash_count {row['crash_count'] or 0}, "
             f"queued {row['queued_at'] or '-'}, processed {row['processed_at'] or '-'}"]
    if row["status"] == "processing":
        lines.append(f"  held by   {row['lease_owner']} until {utc(row['lease_expires_at'])}")
    if row["not_before"] and row["status"] == "pending":
        lines.append(f"  due at    {utc(row['not_before'])}")
    for key in ("error_message", "skipped_reason"):
        if row[key]:
            lines.append(f"  {key.split('_')[0]:<9} {row[key]}")
    return lines


def attempt_lines(attempts: list[dict[str, Any]]) -> list[str]:
    """The attempts as a table, then any stack, indented under its attempt."""
    if not attempts:
        return ["attempts: none recorded"]
    rows = [(a["attempt"], utc(a["finished_at"]), a["outcome"],
             f"{a['duration']:.2f}s" if a["duration"] is not None else None, a["owner"], a["worker"],
             a["endpoint"], a["http_status"], _error_or_result(a)) for a in attempts]
    lines = [f"attempts: {len(attempts)}", *text_table(ATTEMPT_HEADERS, rows)]
    for a in attempts:
        if a["stack"]:
            lines.append(f"  stack of attempt {a['attempt']} (queue row {a['queue_id']}):")
            lines.extend("      " + line for line in a["stack"].splitlines())
    return lines


def _error_or_result(attempt: dict[str, Any]) -> str | None:
    """What went wrong (class: message), or what an answer brought."""
    parts = [p for p in (attempt["error_class"], attempt["error_message"]) if p]
    if parts:
        return ": ".join(parts)
    if attempt["entities"] is None and attempt["relationships"] is None:
        return None
    return (f"{attempt['entities'] or 0} entities, {attempt['relationships'] or 0} relationships"
            + (f", {attempt['answer_bytes']} bytes" if attempt["answer_bytes"] is not None else ""))


@click.command()
@db_option
@click.option("--error", "error_text", metavar="TEXT",
              help="Only failures whose message or error class contains TEXT (any case).")
@click.option("--since", metavar="DURATION",
              help="Only failures within the last DURATION: 90s, 15m, 2h, 7d.")
@click.option("--json", "as_json", is_flag=True, help="Print the classes as one JSON object.")
def failed(db_path: str, error_text: str | None, since: str | None, as_json: bool) -> None:
    """Failed documents grouped by error class, with a count and the newest failure of each."""
    chosen = FailureFilter.of_options(error_text, since, time.time())
    with database_errors(db_path):
        conn = backend.open_database(db_path)
        try:
            classes = failure_classes(conn, chosen)
        finally:
            conn.close()
    total = sum(c.count for c in classes)
    if as_json:
        click.echo(json.dumps({"failed": total, "error": error_text, "since": since,
                               "classes": [c.as_json() for c in classes]}))
        return
    click.echo("\n".join(failed_lines(total, classes)))


def failed_lines(total: int, classes: list[FailureClass]) -> list[str]:
    """`failed` as plain text: a summary line, then a line per class and its example."""
    lines = [f"{total} failed document(s) in {len(classes)} error class(es), the last to fail first"]
    if not classes:
        return lines
    rows = [(c.error_class, c.count, c.newest.failed_at) for c in classes]
    table = text_table(("error class", "docs", "last failed (UTC)"), rows, indent="")
    lines.append(table[0])
    for c, line in zip(classes, table[1:]):
        example = c.newest
        lines += [line, f"  e.g. content {example.content_id} (queue row {example.queue_id}) {c.url or '-'}",
                  f"       {example.error_message or '-'}"]
    return lines


COMMANDS = (inspect, failed)
