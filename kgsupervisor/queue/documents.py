"""Turn a claimed queue row and its chunks into the ingest payload of CONTRACT §3."""
from __future__ import annotations

import functools
import json
import re
import sqlite3
from typing import Any

from kgsupervisor.errors import DocumentRejected
from kgsupervisor.store.backend import Backend, backend_of


# TEXT(column) marks a text column that may hold what is not UTF-8: each backend spells its
# read (Backend.lenient_text; SQLite reads bytes and decodes them leniently).
DOCUMENT_SQL = """
    SELECT TEXT(url), TEXT(title), TEXT(markdown), TEXT(metadata), TEXT(tags)
      FROM crawled_content WHERE id = ?"""
CHUNKS_SQL = """
    SELECT rowid, chunk_index, char_start, char_end, TEXT(chunk_text)
      FROM content_chunks WHERE content_id = ? ORDER BY chunk_index, rowid"""


@functools.cache
def document_reads(backend: Backend) -> tuple[str, str]:
    """DOCUMENT_SQL and CHUNKS_SQL as `backend` spells them."""
    def spelled(sql: str) -> str:
        return re.sub(r"TEXT\((\w+)\)", lambda m: backend.lenient_text(m.group(1)), sql)
    return spelled(DOCUMENT_SQL), spelled(CHUNKS_SQL)


def _text(raw: bytes | str | None) -> str | None:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _metadata(raw: str | None, tags: str | None, notes: list[str]) -> dict[str, Any]:
    """crawled_content.metadata as a dict plus `tags`; unusable metadata is noted and dropped."""
    meta: dict[str, Any] = {}
    if raw:
        try:
            parsed = json.loads(raw, parse_constant=_refuse_constant)
        except ValueError:
            parsed = None
            notes.append("metadata is not JSON; sent without it")
        except RecursionError:  # nested deeper than the decoder goes: unusable, not fatal
            parsed = None
            notes.append("metadata is nested too deeply to decode; sent without it")
        else:
            if isinstance(parsed, dict):
                meta = parsed
            else:
                notes.append(f"metadata is JSON {type(parsed).__name__}, not an object; sent without it")
    # The upstream's rule: tags only when the column has some, never over the metadata's own.
    if tags and "tags" not in meta:
        meta["tags"] = tags
    return meta


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: Python reads them, but no request could carry them."""
    raise ValueError(f"{name} is not JSON")


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The request body; a document that cannot be put into JSON is rejected (its own fault,
    never taken for an outage of the service)."""
    try:
        return json.dumps(payload, allow_nan=False).encode("ascii")
    except (TypeError, ValueError, RecursionError) as exc:
        raise DocumentRejected(f"document cannot be sent as JSON: {type(exc).__name__}: {str(exc)[:200]}") from None


def build_payload(conn: sqlite3.Connection, content_id: int) -> tuple[dict[str, Any], list[str]]:
    """The ingest payload for one document and notes about what had to be dropped from it.

    Raises DocumentRejected when the document is missing or has no chunks: no retry can help.
    """
    document_sql, chunks_sql = document_reads(backend_of(conn))
    row = conn.execute(document_sql, (content_id,)).fetchone()
    if row is None:
        raise DocumentRejected(f"content_id {content_id} does not exist in crawled_content")
    chunks = [
        {"vector_rowid": r[0], "chunk_index": _int_or_none(r[1]), "char_start": _int_or_none(r[2]),
         "char_end": _int_or_none(r[3]), "text": _text(r[4]) or ""}
        for r in conn.execute(chunks_sql, (content_id,))
    ]
    if not chunks:
        raise DocumentRejected(f"content_id {content_id} has no chunks in content_chunks")
    url, title, markdown, metadata, tags = (_text(v) for v in row)
    notes: list[str] = []
    payload = {
        "content_id": content_id, "url": url, "title": title, "markdown": markdown,
        "chunks": chunks, "metadata": _metadata(metadata, tags, notes),
    }
    return payload, notes


def document_chars(conn: Any, content_id: int) -> int:
    """Characters of a document's chunk text, counted in SQL: what a rate budget is charged for
    it before the worker reads it."""
    row = conn.execute("SELECT COALESCE(SUM(LENGTH(chunk_text)), 0) FROM content_chunks WHERE content_id = ?",
                       (content_id,)).fetchone()
    return int(row[0] or 0)
