"""Fault suite, hostile input: documents and KG answers built to hurt, drained by a real
`kgsupervisor run` beside ordinary documents.

Each hostile document must reach a clear outcome of its own (completed, with what had to be
dropped noted, or failed with an error_message naming the cause) and no worker may die of it:
at the end every slot of /health has restarts == 0 and the log has no "killed by" and no
traceback. The ordinary documents are checked by harness.check_invariants as usual.

Documents are hostile through their rows (a 10 MB markdown, NUL bytes, odd and invalid Unicode
inserted as raw bytes with CAST(X'..' AS TEXT), no chunks, offsets out of range, metadata that
is not JSON); answers through a FaultServer behaviour per content_id (100,000 entities, nesting
deeper than any decoder recursion, wrong types, vector_rowids that are not the document's).
"""
from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable

import pytest
import requests

from kgsupervisor.kg.devextract import extract
from kgsupervisor.store.sqlite import transaction
from scripts.sampledata import _sentence

from ..conftest import seed, wait_for
from ..faultserver import FaultServer
from .harness import Outcome, Supervisor, check_invariants, queue_done

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow, pytest.mark.chaos]

ENV = {"KG_MAX_ATTEMPTS": "3"}

ODD = ("Ada Lovelace\x00 met Alan Turing in Zürich \u202eevil\u202c, \U0001F9EC\u200d\U0001F52C "
       "e\u0301\u0301\u0301 \ufeff\uffff\u2028Grace Hopper\u2029 \x01\x7f tab\there.")
INVALID_UTF8 = b"Grace Hopper visited Kyoto \xff\xfe with Bell Labs \xc3\x28 and \xed\xa0\x80 then \xf8\x88\x80\x80\x80."


# -- documents ----------------------------------------------------------------------------------

def add_doc(conn: sqlite3.Connection, cid: int, chunks: list[tuple], *, markdown: str | None = None,
            metadata: str | None = '{"source": "hostile"}', title: str = "hostile", tags: str = "hostile") -> None:
    """One crawled_content row with `chunks` as (chunk_index, text, char_start, char_end), queued."""
    if markdown is None:
        markdown = "\n\n".join(str(c[1]) for c in chunks)
    with transaction(conn):
        conn.execute("INSERT INTO crawled_content (id, url, title, markdown, metadata, tags) VALUES (?, ?, ?, ?, ?, ?)",
                     (cid, f"https://hostile.example/{cid}", title, markdown, metadata, tags))
        conn.executemany("INSERT INTO content_chunks (content_id, chunk_index, chunk_text, char_start, char_end, "
                         "word_count) VALUES (?, ?, ?, ?, ?, 1)", [(cid, *c) for c in chunks])
        conn.execute("INSERT INTO kg_processing_queue (content_id) VALUES (?)", (cid,))


def big_chunks(megabytes: int = 10) -> list[tuple]:
    """~2 KB chunks of mostly lowercase prose with one sample sentence each, `megabytes` in all."""
    rng = random.Random(5)
    words = ("the of and a to in is was for on that with as by at from this be or an are which it "
             "data graph system report river market signal").split()
    chunks, offset = [], 0
    while offset < megabytes * 1024 * 1024:
        text = _sentence(rng) + " " + " ".join(rng.choice(words) for _ in range(300)) + "."
        chunks.append((len(chunks), text, offset, offset + len(text)))
        offset += len(text) + 2
    return chunks


def rows(conn: sqlite3.Connection, cid: int) -> tuple:
    return conn.execute("SELECT status, error_message, result_summary, retry_count FROM kg_processing_queue "
                        "WHERE content_id = ?", (cid,)).fetchone()


def chunk_rowids(conn: sqlite3.Connection, cid: int) -> list[int]:
    return [r[0] for r in conn.execute("SELECT rowid FROM content_chunks WHERE content_id = ? ORDER BY chunk_index",
                                       (cid,))]


# -- answers ------------------------------------------------------------------------------------

def answer_100k_entities(payload: dict) -> tuple:
    rowid = payload["chunks"][0]["vector_rowid"]
    entities = [{"text": f"Entity {i}", "normalized": f"entity {i}", "type_primary": "CONCEPT",
                 "type_sub1": None, "type_sub2": None, "type_sub3": None, "confidence": 0.5,
                 "chunk_appearances": [{"vector_rowid": rowid, "offset_start": 0, "offset_end": 5}]}
                for i in range(100_000)]
    return 200, {"success": True, "content_id": payload["content_id"], "neo4j_document_id": "doc-100k",
                 "entities_extracted": len(entities), "relationships_extracted": 0,
                 "entities": entities, "relationships": []}


def answer_nested(payload: dict) -> tuple:
    depth = 200_000
    return 200, (b'{"success": true, "content_id": %d, "entities": ' % payload["content_id"]
                 + b"[" * depth + b"]" * depth + b"}")


def mutated(change: Callable[[dict], None]) -> Callable[[dict], tuple]:
    """The reference answer with `change` applied to it."""
    def build(payload: dict) -> tuple:
        answer = extract(payload)
        change(answer)
        return 200, answer
    return build


def set_path(*path_and_value) -> Callable[[dict], None]:
    *path, value = path_and_value

    def change(answer: dict) -> None:
        target = answer
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
    return change


def odd_strings(answer: dict) -> None:
    """A lone surrogate and a NUL in entity texts (JSON allows both as escapes)."""
    answer["entities"][0]["text"] = "Ada \ud800 Lovelace"
    answer["entities"][0]["normalized"] = "ada \udfff lovelace"
    answer["entities"][1]["text"] = "Alan\x00Turing"


def offsets_past_chunk(answer: dict) -> None:
    for entity in answer["entities"]:
        for appearance in entity["chunk_appearances"]:
            appearance["offset_start"], appearance["offset_end"] = 10**9, 10**9 + 7


# -- the scenario -------------------------------------------------------------------------------

def test_hostile_documents_and_answers(conn, db_path):
    normal = seed(conn, 40)
    answer_docs = seed(conn, 9)  # ordinary documents whose answers are hostile
    other_rowid = chunk_rowids(conn, normal[0])[0]
    (huge, nested, entities_str, offset_float, unknown_rowid, foreign_rowid, content_id_str, odd_answer,
     past_chunk) = answer_docs
    behaviours: dict[int, Callable[[dict], tuple]] = {
        huge: answer_100k_entities,
        nested: answer_nested,
        entities_str: mutated(set_path("entities", "Ada Lovelace, Alan Turing")),
        offset_float: mutated(set_path("entities", 0, "chunk_appearances", 0, "offset_start", 1.5)),
        unknown_rowid: mutated(set_path("entities", 0, "chunk_appearances", 0, "vector_rowid", 999_999_999)),
        foreign_rowid: mutated(set_path("entities", 0, "chunk_appearances", 0, "vector_rowid", other_rowid)),
        content_id_str: mutated(lambda a: a.update(content_id=str(a["content_id"]))),
        odd_answer: mutated(odd_strings),
        past_chunk: mutated(offsets_past_chunk),
    }

    BIG, ODD_DOC, BAD_UTF8, NO_CHUNKS, OFFSETS, META_TEXT, META_LIST = range(1001, 1008)
    big = big_chunks(10)
    add_doc(conn, BIG, big, markdown="\n\n".join(c[1] for c in big))
    add_doc(conn, ODD_DOC, [(0, ODD, 0, len(ODD)), (1, "\x00" * 64, 0, 64), (2, "", 0, 0)],
            title="NUL\x00title \U0001F600", tags="a\x00b")
    add_doc(conn, BAD_UTF8, [(0, "placeholder", 0, 10)], markdown="placeholder")
    with transaction(conn):
        conn.execute("UPDATE content_chunks SET chunk_text = CAST(? AS TEXT) WHERE content_id = ?",
                     (INVALID_UTF8, BAD_UTF8))
        conn.execute("UPDATE crawled_content SET title = CAST(X'4c6f6e656c792083ff' AS TEXT), "
                     "markdown = CAST(? AS TEXT), url = CAST(X'68747470733a2f2fc0af' AS TEXT) WHERE id = ?",
                     (INVALID_UTF8, BAD_UTF8))
    add_doc(conn, NO_CHUNKS, [], markdown="a document whose chunker produced nothing")
    text = _sentence(random.Random(9))
    add_doc(conn, OFFSETS, [(0, text, -5, 10**12), (1, text, 500, 3), (None, text, None, None),
                            (7, text, "abc", 1e300), (7, text, 2**62, -(2**62))])
    add_doc(conn, META_TEXT, [(0, text, 0, len(text))], metadata="{not json, 'single quotes'")
    add_doc(conn, META_LIST, [(0, text, 0, len(text))], metadata="[1, 2, 3]")
    total = len(normal) + len(answer_docs) + 7

    server = FaultServer(lambda payload, n: behaviours.get(payload["content_id"], lambda p: None)(payload))
    sup = Supervisor(db_path, server.url, "--workers", "2", env=ENV)
    try:
        sup.wait_ready()
        wait_for(lambda: sup.proc.poll() is not None or queue_done(db_path, total), 180, interval=0.2,
                 message=f"all {total} documents to reach an end state")
        assert sup.proc.poll() is None, sup.stderr[-3000:]
        health = requests.get(f"http://{sup.addr}/health", timeout=5).json()
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    log = sup.stderr

    poison = {
        NO_CHUNKS: "has no chunks",
        nested: "nested too deeply",
        entities_str: "answer.entities must be a list, got str",
        offset_float: "answer.entities[0].chunk_appearances[0].offset_start must be an integer or null, got float",
        unknown_rowid: "answer.entities[0].chunk_appearances[0].vector_rowid 999999999 is not a chunk of document",
        foreign_rowid: f"vector_rowid {other_rowid} is not a chunk of document {foreign_rowid}",
        content_id_str: "answer.content_id must be an integer, got str",
    }
    # Checked like any ordinary document: its request against its rows, its rows against the
    # answer the server sent it (hostile or not).
    reference = normal + [BIG, ODD_DOC, BAD_UTF8, OFFSETS, META_TEXT, META_LIST, huge, odd_answer, past_chunk]
    outcome = check_invariants(db_path, reference + list(poison), Outcome(
        "hostile documents and answers", total,
        "10 MB document, NUL/odd/invalid UTF-8 text, no chunks, bad offsets, non-JSON metadata; answers with "
        "100,000 entities, 200,000-deep nesting, wrong types, foreign vector_rowids",
        exit_code=code, notes=f"{len(poison)} documents failed on purpose"), queue_rows=total, poison=poison,
        journal=server.journal)
    assert code == 0
    assert outcome.failed == len(poison)

    # No worker died of any of it.
    assert [d["restarts"] for d in health["worker_details"]] == [0, 0], health
    assert "killed by" not in log and "Traceback" not in log, log[-4000:]

    # A document rejected at once costs no attempt; an invalid answer costs all of them, then says why.
    assert rows(conn, NO_CHUNKS)[3] == 0
    for cid in set(poison) - {NO_CHUNKS}:
        status, error, _, attempts = rows(conn, cid)
        assert attempts == 3 and error.startswith("gave up after 3 attempts: invalid answer: "), (cid, error)
        assert len(error) < 400, error  # clipped: never a megabyte in a column or a log line

    sent = {}
    for payload in server.requests:
        sent.setdefault(payload["content_id"], payload)

    # 10 MB: sent whole, in chunks of normal size, written back.
    assert len(sent[BIG]["markdown"]) >= 10 * 1024 * 1024 and len(sent[BIG]["chunks"]) == len(big)
    assert rows(conn, BIG)[0] == "completed"

    # NUL bytes and odd Unicode travel intact.
    assert sent[ODD_DOC]["chunks"][0]["text"] == ODD and sent[ODD_DOC]["chunks"][1]["text"] == "\x00" * 64
    assert sent[ODD_DOC]["title"] == "NUL\x00title \U0001F600" and sent[ODD_DOC]["metadata"]["tags"] == "a\x00b"

    # Invalid UTF-8 costs replacement characters, not the document.
    assert sent[BAD_UTF8]["chunks"][0]["text"] == INVALID_UTF8.decode("utf-8", "replace")
    assert "\ufffd" in sent[BAD_UTF8]["title"] and "\ufffd" in sent[BAD_UTF8]["url"]

    # Offsets out of range are passed through when they are integers; what is not an integer is null.
    got = [(c["chunk_index"], c["char_start"], c["char_end"]) for c in sent[OFFSETS]["chunks"]]
    assert sorted(got, key=repr) == sorted([(0, -5, 10**12), (1, 500, 3), (None, None, None), (7, None, None),
                                            (7, 2**62, -(2**62))], key=repr), got

    # Metadata that is not a JSON object is dropped, and the result says so.
    for cid, note in ((META_TEXT, "metadata is not JSON"), (META_LIST, "metadata is JSON list")):
        assert sent[cid]["metadata"] == {"tags": "hostile"}
        assert note in json.loads(rows(conn, cid)[2])["notes"][0]

    # 100,000 entities are under the item limit (200,000): written, all of them, in one transaction.
    assert rows(conn, huge)[0] == "completed"
    assert conn.execute("SELECT COUNT(*) FROM chunk_entities WHERE content_id = ?", (huge,)).fetchone()[0] == 100_000
    assert conn.execute("SELECT kg_entity_count, kg_processed FROM crawled_content WHERE id = ?",
                        (huge,)).fetchone() == (100_000, 1)

    # Lone surrogates in an answer are replaced (answer._storable: "?"), not a failed write-back;
    # a NUL in an entity is kept.
    assert rows(conn, odd_answer)[0] == "completed"
    texts = {r[0] for r in conn.execute("SELECT entity_text FROM chunk_entities WHERE content_id = ?", (odd_answer,))}
    assert "Ada ? Lovelace" in texts and "Alan\x00Turing" in texts
    normalized = {r[0] for r in conn.execute("SELECT entity_normalized FROM chunk_entities WHERE content_id = ?",
                                             (odd_answer,))}
    assert "ada ? lovelace" in normalized

    # Offsets past the end of the chunk are not checked against its text: stored as given.
    assert rows(conn, past_chunk)[0] == "completed"
    assert conn.execute("SELECT MIN(offset_start) FROM chunk_entities WHERE content_id = ?",
                        (past_chunk,)).fetchone()[0] == 10**9


def test_deeply_nested_metadata_kills_no_worker(conn, db_path):
    """crawled_content.metadata nested 100,000 deep (json.loads raises RecursionError, not
    ValueError): the document reaches an outcome of its own and no worker dies of it.

    It is dropped with a note, like any other unusable metadata, and never kills a worker (a
    death is given back uncharged by the dying worker itself, so it would loop forever)."""
    normal = seed(conn, 10)
    text = _sentence(random.Random(3))
    add_doc(conn, 2001, [(0, text, 0, len(text))], metadata="[" * 100_000 + "]" * 100_000)
    total = len(normal) + 1
    server = FaultServer()
    sup = Supervisor(db_path, server.url, "--workers", "2", env=ENV)
    try:
        sup.wait_ready()
        wait_for(lambda: sup.proc.poll() is not None or queue_done(db_path, total), 60, interval=0.2,
                 message=f"all {total} documents to reach an end state")
        health = requests.get(f"http://{sup.addr}/health", timeout=5).json()
        code = sup.stop()
    finally:
        if sup.proc.poll() is None:
            sup.kill_tree()
        server.close()
    status, error, summary, _ = rows(conn, 2001)
    restarts = [d["restarts"] for d in health["worker_details"]]
    check_invariants(db_path, normal, Outcome(
        "metadata nested 100,000 deep", total, "crawled_content.metadata = [[[...]]] 100,000 levels",
        exit_code=code, notes=f"status {status}, worker restarts {sum(restarts)}: {(error or '')[:120]}"),
        queue_rows=total, journal=server.journal)
    assert code == 0
    assert restarts == [0, 0], (status, error, sup.stderr[-3000:])
    assert "killed by" not in sup.stderr
    assert status == "completed", error
    assert "metadata" in json.loads(summary)["notes"][0]
