"""The real KG service's exchange (shared/fixtures): the request we build and the rows we write,
checked column by column against the upstream coordinator's rules, on SQLite and PostgreSQL.

The expected rows follow from the fixture by the upstream coordinator's rules (CONTRACT §3, "what
the upstream coordinator writes"), as tests/oracle.py spells them out for the fault suite too,
not computed by the code under test.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.queue.documents import build_payload, encode_payload
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.queue.writeback import write_back

from .oracle import entity_rows, relationship_rows

pytestmark = pytest.mark.timeout(60)


def _fixture_path() -> Path:
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "shared" / "fixtures" / "real-ingest-exchange.json"
        if candidate.exists():
            return candidate
    raise AssertionError("shared/fixtures/real-ingest-exchange.json not found beside the repository")


EXCHANGE = json.loads(_fixture_path().read_text(encoding="utf-8"))
REQUEST, ANSWER = EXCHANGE["request"], EXCHANGE["answer"]


@pytest.fixture
def conn(backend):
    c = backend.connect()
    yield c
    c.close()


def store_the_crawled_document(conn, tags=None) -> None:
    """Document 3 as the crawler's database held it when the fixture's request was built."""
    conn.execute("INSERT INTO crawled_content (id, url, title, markdown, metadata, tags) VALUES (?, ?, ?, ?, ?, ?)",
                 (REQUEST["content_id"], REQUEST["url"], REQUEST["title"], REQUEST["markdown"],
                  json.dumps(REQUEST["metadata"]), tags))
    for chunk in REQUEST["chunks"]:
        conn.execute("INSERT INTO content_chunks (rowid, content_id, chunk_index, chunk_text, char_start, char_end) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (chunk["vector_rowid"], REQUEST["content_id"], chunk["chunk_index"],
                                                   chunk["text"], chunk["char_start"], chunk["char_end"]))
    conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (REQUEST["content_id"],))


def test_the_request_built_from_the_database_is_the_real_request(conn):
    store_the_crawled_document(conn)
    payload, notes = build_payload(conn, REQUEST["content_id"])
    assert notes == []
    assert payload == REQUEST, "no tags key: the upstream adds tags only when the column has some"
    assert json.loads(encode_payload(payload)) == REQUEST


def test_tags_are_sent_only_when_present_and_never_over_the_metadatas_own(conn):
    store_the_crawled_document(conn, tags="ai,research")
    assert build_payload(conn, REQUEST["content_id"])[0]["metadata"]["tags"] == "ai,research"
    conn.execute("UPDATE crawled_content SET tags = '', metadata = ? WHERE id = ?",
                 (json.dumps({"source": "x"}), REQUEST["content_id"]))
    assert "tags" not in build_payload(conn, REQUEST["content_id"])[0]["metadata"]
    conn.execute("UPDATE crawled_content SET tags = 'column', metadata = ? WHERE id = ?",
                 (json.dumps({"tags": ["from", "metadata"]}), REQUEST["content_id"]))
    assert build_payload(conn, REQUEST["content_id"])[0]["metadata"]["tags"] == ["from", "metadata"]


def expected_entity_rows() -> list[tuple]:
    """One row per chunk appearance; neo4j_node_id is the document's id; the span flag as given."""
    return entity_rows(ANSWER, ANSWER["content_id"])


def expected_relationship_rows() -> list[tuple]:
    """One row per relationship; spans_chunks as given; chunk_rowids (a tuple here) as given."""
    return relationship_rows(ANSWER, ANSWER["content_id"])


def test_the_real_answer_is_written_as_the_upstream_writes_it(conn):
    store_the_crawled_document(conn)
    (claim,) = queue_for(conn).claim("me", "t", 1, 60, time.time())
    result = parse_answer(json.dumps(ANSWER).encode(), content_id=REQUEST["content_id"],
                          chunk_rowids={c["vector_rowid"] for c in REQUEST["chunks"]})
    write_back(conn, claim, result, time.time())

    entities = conn.execute(
        "SELECT chunk_rowid, content_id, entity_text, entity_normalized, entity_type_primary, entity_type_sub1, "
        "entity_type_sub2, entity_type_sub3, confidence, offset_start, offset_end, neo4j_node_id, "
        "spans_multiple_chunks FROM chunk_entities").fetchall()
    assert sorted(map(tuple, entities), key=repr) == sorted(expected_entity_rows(), key=repr)
    assert len(entities) == 5, "the six entities without chunk appearances leave no row"
    assert all(row[0] is not None for row in conn.execute("SELECT created_at FROM chunk_entities"))

    relationships = [tuple(r[:-1]) + (tuple(json.loads(r[-1])),) for r in conn.execute(
        "SELECT content_id, subject_entity, predicate, object_entity, confidence, context, neo4j_relationship_id, "
        "spans_chunks, chunk_rowids FROM chunk_relationships")]
    assert sorted(relationships, key=repr) == sorted(expected_relationship_rows(), key=repr)
    assert any(r[7] == 1 and len(r[8]) == 1 for r in relationships), \
        "the service's spans_chunks is kept even with one chunk rowid"

    doc = conn.execute("SELECT kg_processed, kg_entity_count, kg_relationship_count, kg_document_id, kg_processed_at "
                       "FROM crawled_content WHERE id = ?", (REQUEST["content_id"],)).fetchone()
    assert tuple(doc[:4]) == (1, ANSWER["entities_extracted"], ANSWER["relationships_extracted"],
                              ANSWER["neo4j_document_id"]) and doc[4]
    assert [tuple(r) for r in conn.execute("SELECT rowid, kg_processed FROM content_chunks")] == [(45206, 1)]
    assert conn.execute("SELECT status FROM kg_processing_queue").fetchone()[0] == "completed"
