"""The fault suite's own checks: the oracle (tests/oracle.py) reads a document's request from its
rows by rules of its own, tells rows apart by type and count, and takes a document's rows from
the last whole answer the fault server sent; a reliability row is written only once its whole
test passed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from kgsupervisor.store.schema import init_db

from . import oracle
from .faultserver import RESET_MID_BODY, STALL_MID_BODY, FaultServer, reference_answer

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def raw(tmp_path):
    """The database as a crawler could leave it, written with plain sqlite3; read by the oracle."""
    path = str(tmp_path / "kg.db")
    init_db(path)
    conn = oracle.connect(path)
    yield conn
    conn.close()


def test_a_request_is_read_from_the_rows_as_the_contract_says(raw):
    raw.execute("INSERT INTO crawled_content (id, url, title, markdown, metadata, tags) VALUES "
                "(7, 'https://example.org/7', CAST(X'41ff42' AS TEXT), 'the markdown', ?, 'ai,policy')",
                ('{"source": "crawler", "depth": 2}',))
    # Inserted out of order, with a repeated index, a NULL one, a text offset and a NULL text.
    raw.executemany("INSERT INTO content_chunks (rowid, content_id, chunk_index, chunk_text, char_start, char_end) "
                    "VALUES (?, 7, ?, ?, ?, ?)",
                    [(30, 1, "second chunk", 20, 32), (10, 0, "first chunk", 0, 11), (20, 1, "twin chunk", "x", 1.5),
                     (40, None, None, None, None)])
    assert oracle.expected_request(raw, 7) == {
        "content_id": 7, "url": "https://example.org/7", "title": "A\ufffdB", "markdown": "the markdown",
        "chunks": [
            {"vector_rowid": 40, "chunk_index": None, "char_start": None, "char_end": None, "text": ""},
            {"vector_rowid": 10, "chunk_index": 0, "char_start": 0, "char_end": 11, "text": "first chunk"},
            {"vector_rowid": 20, "chunk_index": 1, "char_start": None, "char_end": None, "text": "twin chunk"},
            {"vector_rowid": 30, "chunk_index": 1, "char_start": 20, "char_end": 32, "text": "second chunk"},
        ],
        "metadata": {"source": "crawler", "depth": 2, "tags": "ai,policy"},
    }


@pytest.mark.parametrize(("metadata", "tags", "sent"), [
    ('{"tags": ["own"]}', "column", {"tags": ["own"]}),
    ('{"a": 1}', "", {"a": 1}),
    ('{"score": NaN}', "t", {"tags": "t"}),
    ("[1, 2]", None, {}),
    ("[" * 100_000 + "]" * 100_000, None, {}),
    ("not json", "t", {"tags": "t"}),
])
def test_metadata_is_the_rows_object_plus_tags_only_when_it_has_none(metadata, tags, sent):
    assert oracle.metadata_sent(metadata, tags) == sent


def test_a_document_without_chunks_has_nothing_to_send(raw):
    raw.execute("INSERT INTO crawled_content (id, url, markdown) VALUES (8, 'https://example.org/8', 'text')")
    assert oracle.expected_request(raw, 8) is None
    assert oracle.expected_request(raw, 9) is None


def test_rows_differ_by_type_and_by_count():
    row = (1, "Ada", 0.5, None, (3, 4))
    assert oracle.rows_difference([row], [row]) is None
    assert "1 row(s) missing, 1 extra" in oracle.rows_difference([row], [(1, "Ada", 0.5, None, (3,))])
    assert oracle.rows_difference([(1, 1.0)], [(1, 1)]), "1 and 1.0 are not the same column value"
    assert oracle.rows_difference([(1, 1)], [(1, True)])
    assert "0 row(s) missing, 1 extra" in oracle.rows_difference([row], [row, row])
    assert oracle.first_difference({"a": [1, 2]}, {"a": [1, 2.0]}) == ".a[1] is 2.0 (float), expected 2"


def test_answer_rows_follow_the_upstream_coordinators_rules():
    answer = {"content_id": 5, "neo4j_document_id": "doc-5", "entities": [
        {"text": "Ada \ud800", "normalized": "ada", "type_primary": "Person", "confidence": 1,
         "chunk_appearances": [{"vector_rowid": 1, "offset_start": 0, "offset_end": 3},
                               {"vector_rowid": 2, "offset_start": 4, "offset_end": 7}]},
        {"text": "Zurich", "type_primary": "Place", "type_sub1": "City", "spans_multiple_chunks": True,
         "confidence": 0.25, "chunk_appearances": [{"vector_rowid": 2}]},
        {"text": "Nowhere", "normalized": "nowhere", "chunk_appearances": []},
    ], "relationships": [
        {"subject_text": "Ada \ud800", "predicate": "visited", "object_text": "Zurich", "confidence": 0.5,
         "context": "", "chunk_rowids": [2]},
        {"subject_text": "Ada", "predicate": "knew", "object_text": "Alan", "spans_chunks": False,
         "neo4j_relationship_id": "r1", "chunk_rowids": [1, 2]},
    ]}
    assert sorted(oracle.entity_rows(answer, 5), key=repr) == sorted([
        (1, 5, "Ada ?", "ada", "Person", None, None, None, 1.0, 0, 3, "doc-5", 1),
        (2, 5, "Ada ?", "ada", "Person", None, None, None, 1.0, 4, 7, "doc-5", 1),
        (2, 5, "Zurich", "zurich", "Place", "City", None, None, 0.25, None, None, "doc-5", 1),
    ], key=repr)
    assert oracle.relationship_rows(answer, 5, postgres=True) == [
        (5, "Ada ?", "visited", "Zurich", 0.5, "", None, 0, (2,)),
        (5, "Ada", "knew", "Alan", None, None, "r1", 0, (1, 2)),
    ]
    assert oracle.document_columns(answer) == (1, 3, 2, "doc-5", 1)


def test_the_journal_keeps_every_answer_as_sent_and_the_last_whole_200_is_the_written_one():
    earlier = {"success": True, "content_id": 3, "neo4j_document_id": "an earlier answer"}
    plan = [(500, {"error": "boom"}), RESET_MID_BODY, (STALL_MID_BODY, 120.0), (200, earlier), None]
    server = FaultServer(lambda payload, n: plan[n])
    payload = {"content_id": 3, "chunks": [{"vector_rowid": 9, "chunk_index": 0, "text": "Ada Lovelace met Alan."}]}
    try:
        url = f"{server.url}/api/v1/ingest"
        assert requests.post(url, json=payload, timeout=30).status_code == 500
        with pytest.raises(requests.RequestException):
            requests.post(url, json=payload, timeout=30)  # the body is cut half-way
        with pytest.raises(requests.RequestException):
            requests.post(url, json=payload, timeout=1)  # half the body, the rest 120 s later
        answers = [requests.post(url, json=payload, timeout=30).content for _ in range(2)]
    finally:
        server.close()
    exchanges = server.journal.by_document()[3]
    assert [(e.seq, e.status, e.whole) for e in exchanges] == [
        (0, 500, True), (1, 200, False), (2, 200, False), (3, 200, True), (4, 200, True)]
    assert all(e.payload == payload for e in exchanges)
    whole = json.dumps(reference_answer(payload)).encode()
    assert [e.body for e in exchanges[1:]] == [whole[: len(whole) // 2]] * 2 + answers, "as sent"
    assert answers == [json.dumps(earlier).encode(), whole]
    assert oracle.written_answer(exchanges) == reference_answer(payload)
    assert oracle.written_answer(exchanges[:4]) == earlier
    assert oracle.written_answer(exchanges[:3]) is None, "a cut or stalled 200 is never the written answer"


INNER_TESTS = '''
from tests.chaos.harness import Outcome, record


def test_passes():
    record(Outcome("passed", 1, "none"))


def test_fails_after_recording():
    record(Outcome("failed after its check", 1, "none"))
    assert False, "an assertion after check_invariants()"
'''


def test_a_reliability_row_is_written_only_once_its_whole_test_passed(tmp_path):
    """The fault suite's conftest writes a scenario's row at teardown, and only if the test passed."""
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    results = tmp_path / "results.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "-p", "tests.chaos.conftest", str(tmp_path / "test_inner.py")],
        cwd=ROOT, env={**os.environ, "KG_RELIABILITY_RESULTS": str(results)}, capture_output=True, text=True,
        timeout=50)
    assert "1 failed, 1 passed" in run.stdout, run.stdout + run.stderr
    assert [json.loads(line)["scenario"] for line in results.read_text().splitlines()] == ["passed"]
