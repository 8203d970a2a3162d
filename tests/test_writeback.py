"""Write-back: one transaction, replaces earlier rows, commits only while the claim is held; the
same contract on SQLite and PostgreSQL."""
from __future__ import annotations

import json
import time

import pytest

from kgsupervisor.errors import DocumentRejected, LeaseLost
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.kg.devextract import extract
from kgsupervisor.queue.documents import build_payload
from kgsupervisor.queue.leased import queue_for
from kgsupervisor.queue.writeback import Answered, write_back, write_back_group
from kgsupervisor.store.sqlite import connect

from .conftest import seed

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def conn(backend):
    c = backend.connect()
    yield c
    c.close()


def result_for(conn, content_id):
    payload, _ = build_payload(conn, content_id)
    body = json.dumps(extract(payload))
    return parse_answer(body, content_id=content_id, chunk_rowids={c["vector_rowid"] for c in payload["chunks"]})


def kg_rows(conn, content_id):
    ents = conn.execute("SELECT chunk_rowid, entity_text, offset_start, offset_end FROM chunk_entities "
                        "WHERE content_id = ? ORDER BY chunk_rowid, offset_start", (content_id,)).fetchall()
    rels = conn.execute("SELECT subject_entity, predicate, object_entity, chunk_rowids FROM chunk_relationships "
                        "WHERE content_id = ? ORDER BY subject_entity, object_entity", (content_id,)).fetchall()
    return ents, rels


def everything(conn) -> list:
    """Every row the write-back could touch, to compare before and after."""
    return [conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in
            ("kg_processing_queue", "crawled_content", "content_chunks", "chunk_entities", "chunk_relationships")]


def test_write_back_writes_one_row_per_appearance_and_completes(conn):
    (cid,) = seed(conn, 1)
    q = queue_for(conn)
    (claim,) = q.claim("me", "t", 1, 60, time.time())
    result = result_for(conn, cid)
    summary = write_back(conn, claim, result, time.time())
    ents, rels = kg_rows(conn, cid)
    assert len(ents) == sum(len(e.appearances) for e in result.entities) > 0
    assert len(rels) == len(result.relationships) > 0
    texts = dict(conn.execute("SELECT rowid, chunk_text FROM content_chunks WHERE content_id = ?", (cid,)))
    for rowid, text, start, end in ents:
        assert texts[rowid][start:end] == text, "offsets point at the entity in its chunk"
    status, summary_json = conn.execute("SELECT status, result_summary FROM kg_processing_queue").fetchone()
    assert status == "completed" and json.loads(summary_json)["entities"] == summary["entities"]
    doc = conn.execute("SELECT kg_processed, kg_entity_count, kg_relationship_count, kg_document_id, "
                       "kg_processed_at FROM crawled_content WHERE id = ?", (cid,)).fetchone()
    assert doc[:4] == (1, len(result.entities), len(result.relationships), result.neo4j_document_id) and doc[4]
    assert conn.execute("SELECT MIN(kg_processed) FROM content_chunks WHERE content_id = ?", (cid,)).fetchone()[0] == 1


def test_the_same_document_processed_twice_leaves_one_set_of_rows(conn):
    (cid,) = seed(conn, 1)
    q = queue_for(conn)
    (claim,) = q.claim("me", "t1", 1, 60, time.time())
    write_back(conn, claim, result_for(conn, cid), time.time())
    first = kg_rows(conn, cid)
    conn.execute("UPDATE kg_processing_queue SET status = 'pending'")  # retried by an operator
    (claim,) = q.claim("me", "t2", 1, 60, time.time())
    write_back(conn, claim, result_for(conn, cid), time.time())
    assert kg_rows(conn, cid) == first


def test_a_fenced_out_write_back_commits_nothing(conn):
    (cid,) = seed(conn, 1)
    q = queue_for(conn)
    (stale,) = q.claim("host:1", "old", 1, 0.001, time.time())
    q.requeue_expired(time.time() + 1)          # the lease ran out...
    (fresh,) = q.claim("host:2", "new", 1, 60, time.time())   # ...and another worker took the row
    before = everything(conn)
    with pytest.raises(LeaseLost, match="no longer held"):
        write_back(conn, stale, result_for(conn, cid), time.time())
    assert everything(conn) == before, "not a row changed"
    assert kg_rows(conn, cid) == ([], [])
    row = conn.execute("SELECT status, lease_token FROM kg_processing_queue").fetchone()
    assert row == ("processing", "new")
    write_back(conn, fresh, result_for(conn, cid), time.time())
    assert conn.execute("SELECT status FROM kg_processing_queue").fetchone()[0] == "completed"


def test_a_group_write_back_drops_only_the_fenced_out_document(conn):
    ids = seed(conn, 3)
    q = queue_for(conn)
    claims = q.claim("host:1", "batch", 3, 60, time.time())
    # The middle row's lease was taken over by another worker meanwhile.
    conn.execute("UPDATE kg_processing_queue SET lease_token = 'theirs' WHERE id = ?", (claims[1].id,))
    outcomes = write_back_group(conn, [Answered(c, result_for(conn, c.content_id)) for c in claims], time.time())
    assert isinstance(outcomes[1], LeaseLost)
    assert [o["entities"] for o in (outcomes[0], outcomes[2])] == [len(result_for(conn, ids[0]).entities),
                                                                   len(result_for(conn, ids[2]).entities)]
    statuses = [r[0] for r in conn.execute("SELECT status FROM kg_processing_queue ORDER BY id")]
    assert statuses == ["completed", "processing", "completed"]
    assert kg_rows(conn, ids[1]) == ([], []), "nothing of the fenced-out document was written"
    assert kg_rows(conn, ids[0])[0] and kg_rows(conn, ids[2])[0]
    assert not conn.in_transaction


def test_payload_follows_contract_and_tolerates_bad_metadata(conn):
    (cid,) = seed(conn, 1)
    conn.execute("UPDATE crawled_content SET metadata = 'not json {' WHERE id = ?", (cid,))
    payload, notes = build_payload(conn, cid)
    assert set(payload) == {"content_id", "url", "title", "markdown", "chunks", "metadata"}
    assert payload["metadata"] == {"tags": payload["metadata"]["tags"]}
    assert notes == ["metadata is not JSON; sent without it"]
    assert [c["chunk_index"] for c in payload["chunks"]] == [0, 1, 2]
    assert set(payload["chunks"][0]) == {"vector_rowid", "chunk_index", "char_start", "char_end", "text"}


def test_missing_document_or_no_chunks_is_rejected(conn):
    (cid,) = seed(conn, 1)
    with pytest.raises(DocumentRejected, match="does not exist"):
        build_payload(conn, 424242)
    conn.execute("DELETE FROM content_chunks WHERE content_id = ?", (cid,))
    with pytest.raises(DocumentRejected, match="no chunks"):
        build_payload(conn, cid)


def test_sqlite_text_that_is_not_utf8_is_sent_with_replacement_characters(db_path):
    # PostgreSQL cannot hold such text at all; an SQLite file written by anyone can.
    conn = connect(db_path)
    try:
        (cid,) = seed(conn, 1)
        conn.execute("UPDATE crawled_content SET markdown = CAST(X'41FF42' AS TEXT) WHERE id = ?", (cid,))
        assert build_payload(conn, cid)[0]["markdown"] == "A\ufffdB"
    finally:
        conn.close()


def test_an_answer_with_nul_in_its_strings_is_written_on_either_backend(conn):
    (cid,) = seed(conn, 1)
    (claim,) = queue_for(conn).claim("me", "t", 1, 60, time.time())
    payload, _ = build_payload(conn, cid)
    answer = extract(payload)
    answer["entities"][0]["text"] = "Ada\x00Lovelace"
    answer["relationships"][0]["context"] = "said\x00so"
    result = parse_answer(json.dumps(answer), content_id=cid,
                          chunk_rowids={c["vector_rowid"] for c in payload["chunks"]})
    write_back(conn, claim, result, time.time())
    assert conn.execute("SELECT status FROM kg_processing_queue").fetchone()[0] == "completed"
    texts = {r[0] for r in conn.execute("SELECT entity_text FROM chunk_entities WHERE content_id = ?", (cid,))}
    assert texts & {"Ada\x00Lovelace", "Ada\ufffdLovelace"}, "kept as sent (SQLite) or with U+FFFD (PostgreSQL)"
