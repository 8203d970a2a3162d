"""What a document's exchange with the KG service must look like, worked out independently of
kgsupervisor: the request straight from the document's rows, and the KG rows that one answer
leaves by the upstream coordinator's rules (CONTRACT §3), both written out here.

Values are compared with their types (1, 1.0 and True differ), as the columns must hold them.
"""
from __future__ import annotations

import collections
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

from kgsupervisor.store.postgres import PGConnection, is_postgres_url

DOCUMENT_SQL = "SELECT url, title, markdown, metadata, tags FROM crawled_content WHERE id = ?"
# CONTRACT §3: chunks ordered by chunk_index; equal indexes (a careless chunker) by rowid.
CHUNKS_SQL = ("SELECT rowid, chunk_index, char_start, char_end, chunk_text FROM content_chunks "
              "WHERE content_id = ? ORDER BY chunk_index, rowid")
WRITTEN_ENTITIES_SQL = """
    SELECT chunk_rowid, content_id, entity_text, entity_normalized, entity_type_primary, entity_type_sub1,
           entity_type_sub2, entity_type_sub3, confidence, offset_start, offset_end, neo4j_node_id,
           spans_multiple_chunks
      FROM chunk_entities WHERE content_id = ?"""
WRITTEN_RELATIONSHIPS_SQL = """
    SELECT content_id, subject_entity, predicate, object_entity, confidence, context, neo4j_relationship_id,
           spans_chunks, chunk_rowids
      FROM chunk_relationships WHERE content_id = ?"""
# kg_processed_at and created_at hold the time of the write: only whether they are set is known.
WRITTEN_DOCUMENT_SQL = """
    SELECT kg_processed, kg_entity_count, kg_relationship_count, kg_document_id,
           CASE WHEN kg_processed_at IS NULL THEN 0 ELSE 1 END
      FROM crawled_content WHERE id = ?"""
WRITTEN_CHUNKS_SQL = "SELECT rowid, kg_processed FROM content_chunks WHERE content_id = ? ORDER BY rowid"
UNSTAMPED_ROWS_SQL = """
    SELECT (SELECT COUNT(*) FROM chunk_entities WHERE content_id = ? AND created_at IS NULL)
         + (SELECT COUNT(*) FROM chunk_relationships WHERE content_id = ? AND created_at IS NULL)"""


def connect(target: str) -> Any:
    """A plain connection to an SQLite file or a PostgreSQL URL. SQLite text is read leniently:
    a crawler may have stored invalid UTF-8, which is sent with replacement characters
    (docs/document-lifecycle.md), never refused."""
    if is_postgres_url(target):
        return PGConnection(target)
    conn = sqlite3.connect(target, timeout=30)
    conn.text_factory = lambda raw: raw.decode("utf-8", "replace")
    return conn


# -- the request --------------------------------------------------------------------------------

def expected_request(conn: Any, content_id: int) -> dict[str, Any] | None:
    """The ingest body (CONTRACT §3) the document's rows make, or None when there is nothing to
    send (no such document, or no chunks). `conn` comes from connect()."""
    row = conn.execute(DOCUMENT_SQL, (content_id,)).fetchone()
    chunks = [{"vector_rowid": rowid, "chunk_index": _integer(index), "char_start": _integer(start),
               "char_end": _integer(end), "text": "" if text is None else text}
              for rowid, index, start, end, text in conn.execute(CHUNKS_SQL, (content_id,))]
    if row is None or not chunks:
        return None
    url, title, markdown, metadata, tags = row
    return {"content_id": content_id, "url": url, "title": title, "markdown": markdown, "chunks": chunks,
            "metadata": metadata_sent(metadata, tags)}


def _integer(value: Any) -> int | None:
    """A column value that is not an integer (text, a float) is sent as null."""
    return value if type(value) is int else None


def metadata_sent(raw: str | None, tags: str | None) -> dict[str, Any]:
    """The row's metadata JSON object ({} when it is none: not JSON, NaN or Infinity, which no
    request can carry, nested past any decoder, or not an object), plus `tags` when the column
    is non-empty and the metadata has no `tags` of its own."""
    try:
        metadata = json.loads(raw, parse_constant=_no_constant) if raw else {}
    except (ValueError, RecursionError):
        metadata = {}
    if not isinstance(metadata, dict):
        metadata = {}
    if tags and "tags" not in metadata:
        metadata = {**metadata, "tags": tags}
    return metadata


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# -- the rows an answer leaves ------------------------------------------------------------------

def written_answer(exchanges: Sequence[Any]) -> dict | None:
    """The answer a completed document was written from: of its exchanges (faultserver.Exchange,
    in arrival order), the last 200 sent whole (a cut or stalled body never reaches a
    write-back), decoded."""
    for exchange in reversed(exchanges):
        if exchange.status == 200 and exchange.whole:
            return json.loads(exchange.body)
    return None


def stored(value: Any, postgres: bool = False) -> Any:
    """A string as a text column holds it: a lone surrogate (JSON may escape one) becomes "?",
    and PostgreSQL, which holds no NUL, gets U+FFFD for one."""
    if not isinstance(value, str):
        return value
    value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd") if postgres else value


def _confidence(value: Any) -> float | None:
    return None if value is None else float(value)


def entity_rows(answer: dict, content_id: int, postgres: bool = False) -> list[tuple]:
    """chunk_entities: one row per chunk appearance, neo4j_node_id the answer's
    neo4j_document_id, spans_multiple_chunks the entity's own flag as 0/1 (computed, whether it
    appears in more than one chunk, only when the answer leaves it out)."""
    node = stored(answer.get("neo4j_document_id"), postgres)
    rows = []
    for entity in answer.get("entities") or []:
        appearances = entity.get("chunk_appearances") or []
        spans = entity.get("spans_multiple_chunks")
        if spans is None:
            spans = len({a["vector_rowid"] for a in appearances}) > 1
        text = stored(entity["text"], postgres)
        # An older service's answer without a normalized form: the text lower-cased.
        normalized = text.lower() if entity.get("normalized") is None else stored(entity["normalized"], postgres)
        types = tuple(stored(entity.get(k), postgres) for k in ("type_primary", "type_sub1", "type_sub2", "type_sub3"))
        for a in appearances:
            rows.append((a["vector_rowid"], content_id, text, normalized, *types, _confidence(entity.get("confidence")),
                         a.get("offset_start"), a.get("offset_end"), node, int(spans)))
    return rows


def relationship_rows(answer: dict, content_id: int, postgres: bool = False) -> list[tuple]:
    """chunk_relationships: one row per relationship, spans_chunks as given (0/1) and
    chunk_rowids the JSON list given (here as a tuple of its ints)."""
    chunks_of: dict[str, set[int]] = {}
    for entity in answer.get("entities") or []:
        chunks_of.setdefault(entity["text"], set()).update(
            a["vector_rowid"] for a in entity.get("chunk_appearances") or [])
    rows = []
    for r in answer.get("relationships") or []:
        rowids = tuple(r.get("chunk_rowids") or [])
        spans = r.get("spans_chunks")
        if spans is None:
            spans = _share_no_chunk(chunks_of.get(r["subject_text"]), chunks_of.get(r["object_text"]), rowids)
        rows.append((content_id, stored(r["subject_text"], postgres), stored(r["predicate"], postgres),
                     stored(r["object_text"], postgres), _confidence(r.get("confidence")),
                     stored(r.get("context"), postgres), stored(r.get("neo4j_relationship_id"), postgres),
                     int(spans), rowids))
    return rows


def _share_no_chunk(subject: set[int] | None, obj: set[int] | None, rowids: tuple[int, ...]) -> bool:
    """The service's meaning of spans_chunks, for an answer that leaves it out: subject and
    object share no chunk; where the answer places only one of them, whether the relationship
    was found in more than one chunk."""
    if subject and obj:
        return subject.isdisjoint(obj)
    return len(set(rowids)) > 1


def document_columns(answer: dict) -> tuple:
    """crawled_content (kg_processed, kg_entity_count, kg_relationship_count, kg_document_id,
    kg_processed_at set): the counts are of the entities and relationships in the answer."""
    return (1, len(answer.get("entities") or []), len(answer.get("relationships") or []),
            stored(answer.get("neo4j_document_id")), 1)


# -- what was written ---------------------------------------------------------------------------

def written_entity_rows(conn: Any, content_id: int) -> list[tuple]:
    return [tuple(r) for r in conn.execute(WRITTEN_ENTITIES_SQL, (content_id,))]


def written_relationship_rows(conn: Any, content_id: int) -> list[tuple]:
    """Rows with chunk_rowids decoded (a tuple of ints), or left as stored when it is no JSON list."""
    rows = []
    for r in conn.execute(WRITTEN_RELATIONSHIPS_SQL, (content_id,)):
        *columns, rowids = r
        try:
            decoded = json.loads(rowids) if isinstance(rowids, str) else None
        except ValueError:
            decoded = None
        rows.append((*columns, tuple(decoded) if isinstance(decoded, list) else rowids))
    return rows


def rows_difference(want: list[tuple], got: list[tuple]) -> str | None:
    """None when `got` holds exactly the rows of `want`, each as many times and every value of
    the same type; else a short account of the rows missing and the rows extra."""
    missing = _typed(want) - _typed(got)
    extra = _typed(got) - _typed(want)
    if not missing and not extra:
        return None
    def show(rows: collections.Counter) -> str:
        return "; ".join(f"{_untyped(row)!r:.300}" + (f" x{n}" if n > 1 else "") for row, n in list(rows.items())[:3])
    return (f"{sum(missing.values())} row(s) missing, {sum(extra.values())} extra (of {len(want)} expected)"
            + (f"; missing: {show(missing)}" if missing else "") + (f"; extra: {show(extra)}" if extra else ""))


def _typed(rows: list[tuple]) -> collections.Counter:
    return collections.Counter(tuple(_with_type(v) for v in row) for row in rows)


def _with_type(value: Any) -> Any:
    if isinstance(value, tuple):
        return ("tuple", tuple(_with_type(v) for v in value))
    return (type(value).__name__, value)


def _untyped(row: tuple) -> tuple:
    return tuple(_untyped(value) if kind == "tuple" else value for kind, value in row)


def first_difference(want: Any, got: Any, path: str = "") -> str | None:
    """None when two decoded JSON values are equal, types included; else where they first differ."""
    if type(want) is not type(got):
        return f"{path or 'the body'} is {_short(got)} ({type(got).__name__}), expected {_short(want)}"
    if isinstance(want, dict):
        if want.keys() != got.keys():
            return (f"{path or 'the body'} has keys {sorted(got)}, expected {sorted(want)}")
        for key in want:
            found = first_difference(want[key], got[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(want, list):
        if len(want) != len(got):
            return f"{path} has {len(got)} items, expected {len(want)}"
        for i, (w, g) in enumerate(zip(want, got)):
            found = first_difference(w, g, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if want == got else f"{path} is {_short(got)}, expected {_short(want)}"


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:80] + "..."
