"""Write KG answers back into the database: one document, or a group of them, per fenced transaction."""
from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import Sequence

from kgsupervisor.errors import LeaseLost
from kgsupervisor.kg.answer import IngestResult
from kgsupervisor.queue.history import Attempt, Outcome, record_attempt
from kgsupervisor.queue.leased import Claim, db_timestamp
from kgsupervisor.queue.sql import FENCED, NO_LEASE
from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.sqlite import transaction

COMPLETE_SQL = f"""
    UPDATE kg_processing_queue
       SET status = 'completed', processed_at = ?, result_summary = ?, error_message = NULL,
           skipped_reason = NULL, {NO_LEASE}, not_before = NULL
     WHERE {FENCED}"""
ENTITY_SQL = """
    INSERT INTO chunk_entities (chunk_rowid, content_id, entity_text, entity_normalized,
        entity_type_primary, entity_type_sub1, entity_type_sub2, entity_type_sub3, confidence,
        offset_start, offset_end, neo4j_node_id, spans_multiple_chunks, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
RELATIONSHIP_SQL = """
    INSERT INTO chunk_relationships (content_id, subject_entity, predicate, object_entity,
        confidence, context, neo4j_relationship_id, spans_chunks, chunk_rowids, created_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
DOCUMENT_SQL = """
    UPDATE crawled_content SET kg_processed = 1, kg_entity_count = ?, kg_relationship_count = ?,
           kg_document_id = ?, kg_processed_at = ? WHERE id = ?"""


def _entity_rows(content_id: int, result: IngestResult, stamp: str) -> list[tuple]:
    """One row per chunk appearance, as the upstream writes them: neo4j_node_id is the
    document's node, and spans_multiple_chunks the service's own flag (0/1: PostgreSQL's
    column is an integer too), computed only when an older service leaves it out."""
    rows = []
    node_id = result.neo4j_document_id
    for e in result.entities:
        spans = e.spans_multiple_chunks
        if spans is None:
            spans = len({a.vector_rowid for a in e.appearances}) > 1
        for a in e.appearances:
            rows.append((a.vector_rowid, content_id, e.text, e.normalized, e.type_primary,
                         e.type_sub1, e.type_sub2, e.type_sub3, e.confidence,
                         a.offset_start, a.offset_end, node_id, int(spans), stamp))
    return rows


def _relationship_rows(content_id: int, result: IngestResult, stamp: str) -> list[tuple]:
    """One row per relationship; spans_chunks as the service gave it (see _spans_chunks)."""
    chunks_of: dict[str, set[int]] | None = None
    rows = []
    for r in result.relationships:
        spans = r.spans_chunks
        if spans is None:
            if chunks_of is None:
                chunks_of = _chunks_by_entity_text(result)
            spans = _spans_chunks(r.subject_text, r.object_text, r.chunk_rowids, chunks_of)
        rows.append((content_id, r.subject_text, r.predicate, r.object_text, r.confidence, r.context,
                     r.neo4j_relationship_id, int(spans), _json_int_list(r.chunk_rowids), stamp))
    return rows


def _chunks_by_entity_text(result: IngestResult) -> dict[str, set[int]]:
    chunks_of: dict[str, set[int]] = {}
    for e in result.entities:
        chunks_of.setdefault(e.text, set()).update(a.vector_rowid for a in e.appearances)
    return chunks_of


def _spans_chunks(subject: str, obj: str, rowids: tuple[int, ...],
                  chunks_of: dict[str, set[int]]) -> bool:
    """The service's definition for an answer that omits it: subject and object share no chunk.

    Where the answer does not place both entities, the best the relationship itself tells is
    whether it was found in more than one chunk.
    """
    subject_chunks, object_chunks = chunks_of.get(subject), chunks_of.get(obj)
    if subject_chunks and object_chunks:
        return subject_chunks.isdisjoint(object_chunks)
    return len(set(rowids)) > 1


def _json_int_list(values: tuple[int, ...]) -> str:
    """json.dumps of validated ints: the same text at a tenth of the cost (~70 lists a document)."""
    return "[" + ", ".join(map(str, values)) + "]"


@dataclasses.dataclass(frozen=True, slots=True)
class Answered:
    """A document whose answer is in hand and not yet written."""

    claim: Claim
    result: IngestResult
    notes: list[str] | None = None
    at: float = 0.0    # time.monotonic() when the answer came
    took: float = 0.0  # seconds the service took for it
    attempt: Attempt | None = None  # for the attempt history


def write_back(conn: sqlite3.Connection, claim: Claim, result: IngestResult, now: float,
               notes: list[str] | None = None, attempt: Attempt | None = None) -> dict:
    """Replace the document's KG rows with `result` and complete its queue row, all or nothing.

    The queue row is completed first and only if `claim.token` still holds it: a worker whose
    lease was taken over commits nothing (LeaseLost) instead of writing a second copy, but the
    attempt history's lease_lost row.
    """
    with transaction(conn):
        try:
            return _write_one(conn, Answered(claim, result, notes, attempt=attempt), now)
        except LeaseLost as exc:
            lost = exc
            _record_lost(conn, claim, now, attempt)
    raise lost


def write_back_group(conn: sqlite3.Connection, answered: Sequence[Answered],
                     now: float) -> list[dict | LeaseLost]:
    """Write several documents in one transaction: per document its summary, or the LeaseLost
    that dropped it alone (a savepoint each, so one fenced-out document spoils nothing else).

    One commit for a claimed batch instead of one per document: the ten upstream indexes make
    each commit write ~220 pages, many of them the same pages from one document to the next.
    """
    outcomes: list[dict | LeaseLost] = []
    with transaction(conn):
        for item in answered:
            conn.execute("SAVEPOINT document")
            try:
                outcomes.append(_write_one(conn, item, now))
            except LeaseLost as exc:
                conn.execute("ROLLBACK TO document")
                _record_lost(conn, item.claim, now, item.attempt)
                outcomes.append(exc)
            conn.execute("RELEASE document")
    return outcomes


def _record_lost(conn: sqlite3.Connection, claim: Claim, now: float, attempt: Attempt | None) -> None:
    """A fenced-out write-back is the claim's outcome only if nobody else recorded one for it
    (whoever took the row over, a crash release or the lease-expiry backstop, usually has)."""
    record_attempt(conn, claim, Outcome.LEASE_LOST, now, attempt,
                   "lease lost: the row was no longer held by this worker; its answer was dropped")


def _write_one(conn: sqlite3.Connection, item: Answered, now: float) -> dict:
    """The statements of one write-back and its attempt row, inside the caller's transaction."""
    claim, result, stamp = item.claim, item.result, db_timestamp(now)
    summary = result.summary()
    if item.notes:
        summary["notes"] = item.notes
    cur = conn.execute(COMPLETE_SQL, (stamp, json.dumps(summary), claim.id, claim.token))
    if cur.rowcount != 1:
        raise LeaseLost(f"queue row {claim.id} (content_id {claim.content_id}) is no longer "
                        f"held by this worker; its answer was dropped")
    record_attempt(conn, claim, Outcome.COMPLETED, now, dataclasses.replace(
        item.attempt or Attempt(), entities=len(result.entities), relationships=len(result.relationships)))
    # Replace, never append: a retried document must not leave a second set of rows.
    conn.execute("DELETE FROM chunk_entities WHERE content_id = ?", (claim.content_id,))
    conn.execute("DELETE FROM chunk_relationships WHERE content_id = ?", (claim.content_id,))
    storable = backend_of(conn).storable
    entities = storable(_entity_rows(claim.content_id, result, stamp))
    relationships = storable(_relationship_rows(claim.content_id, result, stamp))
    conn.executemany(ENTITY_SQL, entities)
    conn.executemany(RELATIONSHIP_SQL, relationships)
    conn.execute(DOCUMENT_SQL, (len(result.entities), len(result.relationships),
                                result.neo4j_document_id, stamp, claim.content_id))
    conn.execute("UPDATE content_chunks SET kg_processed = 1 WHERE content_id = ?",
                 (claim.content_id,))
    return summary
