"""The reference KG service, driven over real HTTP on 127.0.0.1 and as a real subprocess: the
real service's validation, answer and error bodies, health states and model-loading mode."""
from __future__ import annotations

import copy
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from kgsupervisor.kg.devextract import extract
from kgsupervisor.kg.devservice import MAX_BODY_BYTES, make_server
from kgsupervisor.kg.devvalidate import parse_ingest_request, validate_ingest_request
from kgsupervisor.queue.documents import build_payload
from scripts.sampledata import add_documents

pytestmark = pytest.mark.timeout(30)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_NAME = "fixtures/real-ingest-exchange.json"

TEXTS = ["Jane Doe joined Acme Corp in Paris. The Hudson River is far from Paris.",
         "Later, Jane Doe left Acme Corp for Stanford University!"]
TWO_CHUNKS = {
    "content_id": 42,
    "url": "https://example.org/acme",
    "title": "Acme",
    "markdown": "\n\n".join(TEXTS),
    "chunks": [
        {"vector_rowid": 101, "chunk_index": 0, "char_start": 0, "char_end": 70, "text": TEXTS[0]},
        {"vector_rowid": 102, "chunk_index": 1, "char_start": 72, "char_end": 127, "text": TEXTS[1]},
    ],
    "metadata": {"tags": ["demo"]},
}
NO_CHUNKS = {**TWO_CHUNKS, "content_id": 5, "chunks": []}
ERROR_BODY_KEYS = {"success", "error", "error_type", "timestamp"}


def fixture_path() -> Path:
    """shared/ sits beside the repository (CI lays it there too); /work/shared is the fallback."""
    for shared in (PROJECT_ROOT.parent / "shared", Path("/work/shared")):
        if (shared / FIXTURE_NAME).is_file():
            return shared / FIXTURE_NAME
    pytest.fail(f"{FIXTURE_NAME} not found beside the repository ({PROJECT_ROOT.parent / 'shared'})")


@pytest.fixture(scope="module")
def real_exchange() -> dict:
    return json.loads(fixture_path().read_text())


def serve_in_thread(server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return thread


def url_of(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def start_service():
    """Start real dev services on free ports; shut each down and close its socket afterwards."""
    running = []

    def start(**options):
        server = make_server("127.0.0.1", 0, **options)
        running.append((server, serve_in_thread(server)))
        return server

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def service(start_service) -> str:
    return url_of(start_service())


@pytest.fixture(scope="module")
def shared_service():
    """One service for the many validation cases: they change nothing in it."""
    server = make_server("127.0.0.1", 0)
    thread = serve_in_thread(server)
    yield url_of(server)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def ingest(base: str, payload: object, **kwargs) -> requests.Response:
    return requests.post(f"{base}/api/v1/ingest", json=payload, timeout=5, **kwargs)


DELETE = object()  # as a value for changed(): remove the key


def changed(payload: dict, *path_and_value) -> dict:
    """A deep copy of `payload` with the value at `path` replaced (or deleted, for DELETE)."""
    *path, value = path_and_value
    result = copy.deepcopy(payload)
    target = result
    for step in path[:-1]:
        target = target[step]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return result


def text_of(payload: dict, rowid: int) -> str:
    return next(c["text"] for c in payload["chunks"] if c["vector_rowid"] == rowid)


def assert_offsets_exact(payload: dict, answer: dict) -> None:
    rowids = {c["vector_rowid"] for c in payload["chunks"]}
    for entity in answer["entities"]:
        assert entity["chunk_appearances"], entity
        for seen in entity["chunk_appearances"]:
            assert seen["vector_rowid"] in rowids
            text = text_of(payload, seen["vector_rowid"])
            surface = text[seen["offset_start"]:seen["offset_end"]]
            assert " ".join(surface.lower().split()) == entity["normalized"]
        first = entity["chunk_appearances"][0]
        assert text_of(payload, first["vector_rowid"])[first["offset_start"]:first["offset_end"]] \
            == entity["text"]


def assert_spans_follow_the_service_meaning(answer: dict) -> None:
    """spans_chunks: subject and object share no chunk; spans_multiple_chunks: in 2+ chunks."""
    chunks = {e["text"]: {a["vector_rowid"] for a in e["chunk_appearances"]} for e in answer["entities"]}
    for entity in answer["entities"]:
        assert entity["spans_multiple_chunks"] is (len(chunks[entity["text"]]) > 1), entity
    for relation in answer["relationships"]:
        shared = chunks[relation["subject_text"]] & chunks[relation["object_text"]]
        assert relation["spans_chunks"] is (not shared), relation


def assert_error_body(answer: requests.Response, status: int, error_type: str, error: str) -> dict:
    """The real service's error body: success false, the error, its type and an ISO timestamp."""
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == ERROR_BODY_KEYS, body
    assert body["success"] is False and body["error_type"] == error_type
    assert body["error"] == error, body["error"]
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    return body


def without_timing(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key != "processing_time_ms"}


# ---------------------------------------------------------------- the answer


def test_the_real_services_request_is_accepted_and_answered_with_every_field_it_has(service, real_exchange):
    answer = ingest(service, real_exchange["request"])
    assert answer.status_code == 200, answer.text
    ours, theirs = answer.json(), real_exchange["answer"]
    assert set(ours) == set(theirs)
    assert set(ours["summary"]) == set(theirs["summary"])
    assert ours["entities"] and ours["relationships"]
    for entity in ours["entities"]:
        assert set(entity) == set(theirs["entities"][0])
        for appearance in entity["chunk_appearances"]:
            assert set(appearance) == set(theirs["entities"][0]["chunk_appearances"][0])
    for relation in ours["relationships"]:
        assert set(relation) == set(theirs["relationships"][0])


def test_answer_fields_have_the_real_models_types(service, real_exchange):
    body = ingest(service, real_exchange["request"]).json()
    assert body["success"] is True and body["content_id"] == 3
    assert isinstance(body["neo4j_document_id"], str)
    assert type(body["processing_time_ms"]) is int and body["processing_time_ms"] >= 0
    for entity in body["entities"]:
        assert entity["neo4j_node_id"] is None
        for key in ("context_before", "context_after", "sentence"):
            assert isinstance(entity[key], str)
        assert isinstance(entity["spans_multiple_chunks"], bool)
        assert 0.0 <= entity["confidence"] <= 1.0
    for relation in body["relationships"]:
        assert (relation["subject_neo4j_id"], relation["object_neo4j_id"],
                relation["neo4j_relationship_id"]) == (None, None, None)
        assert isinstance(relation["spans_chunks"], bool)
        assert all(type(rowid) is int for rowid in relation["chunk_rowids"])


def test_type_full_joins_the_primary_type_and_the_subtypes_that_are_set(service):
    body = ingest(service, TWO_CHUNKS).json()
    full = {e["normalized"]: e["type_full"] for e in body["entities"]}
    assert full == {"jane doe": "Person", "acme corp": "Organization::Company",
                    "paris": "Location::Place", "hudson river": "Location::River",
                    "stanford university": "Organization::Academic"}
    for entity in body["entities"]:
        subtypes = [entity[k] for k in ("type_sub1", "type_sub2", "type_sub3") if entity[k] is not None]
        assert entity["type_full"] == "::".join([entity["type_primary"], *subtypes])


def test_entity_context_sentence_and_chunk_index_come_from_its_first_appearance(service):
    body = ingest(service, TWO_CHUNKS).json()
    entities = {e["normalized"]: e for e in body["entities"]}
    jane, stanford = entities["jane doe"], entities["stanford university"]
    assert (jane["context_before"], jane["sentence"]) == ("", "Jane Doe joined Acme Corp in Paris.")
    assert jane["context_after"] == TEXTS[0][len("Jane Doe"):].strip()
    assert stanford["context_before"] == "Later, Jane Doe left Acme Corp for"
    assert stanford["context_after"] == "!"
    assert [a["chunk_index"] for a in jane["chunk_appearances"]] == [0, 1]


def test_summary_counts_what_the_answer_holds(service):
    body = ingest(service, TWO_CHUNKS).json()
    assert body["summary"] == {
        "entities_by_type": {"Person": 1, "Organization": 2, "Location": 2},
        "relationships_by_predicate": {"co_occurs_with": len(body["relationships"])},
        "chunks_with_entities": 2,
        # jane 2, acme 2, paris 2, hudson 1, stanford 1 appearances over 2 chunks
        "avg_entities_per_chunk": 4.0,
    }


def test_ingest_of_two_chunks_has_exact_offsets_and_only_its_own_rowids(service):
    answer = ingest(service, TWO_CHUNKS)
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert body["content_id"] == 42
    assert body["neo4j_document_id"].startswith("doc-")
    assert body["entities_extracted"] == len(body["entities"]) > 0
    assert body["relationships_extracted"] == len(body["relationships"])
    assert_offsets_exact(TWO_CHUNKS, body)
    names = [e["normalized"] for e in body["entities"]]
    assert names == ["jane doe", "acme corp", "paris", "hudson river", "stanford university"]


def test_entity_appears_once_per_document_with_every_appearance(service):
    body = ingest(service, TWO_CHUNKS).json()
    jane = next(e for e in body["entities"] if e["normalized"] == "jane doe")
    assert [a["vector_rowid"] for a in jane["chunk_appearances"]] == [101, 102]
    assert jane["spans_multiple_chunks"] is True
    paris = next(e for e in body["entities"] if e["normalized"] == "paris")
    assert len(paris["chunk_appearances"]) == 2
    hudson = next(e for e in body["entities"] if e["normalized"] == "hudson river")
    assert hudson["spans_multiple_chunks"] is False


def test_entity_fields_follow_the_contract(service):
    body = ingest(service, TWO_CHUNKS).json()
    types = {e["normalized"]: e["type_primary"] for e in body["entities"]}
    assert types == {"jane doe": "Person", "acme corp": "Organization", "paris": "Location",
                     "hudson river": "Location", "stanford university": "Organization"}
    for entity in body["entities"]:
        assert 0.5 <= entity["confidence"] <= 1.0
        for key in ("type_sub1", "type_sub2", "type_sub3"):
            assert entity[key] is None or isinstance(entity[key], str)


def test_same_payload_twice_gives_identical_answers_but_for_the_time_taken(service):
    first = ingest(service, TWO_CHUNKS).json()
    second = ingest(service, TWO_CHUNKS).json()
    assert without_timing(first) == without_timing(second)
    assert extract(TWO_CHUNKS) == {**first, "processing_time_ms": 0}


def test_entities_in_one_sentence_are_related_and_merged_across_chunks(service):
    body = ingest(service, TWO_CHUNKS).json()
    pairs = {(r["subject_text"], r["object_text"]): r for r in body["relationships"]}
    jane_acme = pairs[("Jane Doe", "Acme Corp")]
    assert jane_acme["predicate"] == "co_occurs_with"
    assert jane_acme["chunk_rowids"] == [101, 102]
    assert jane_acme["context"] == "Jane Doe joined Acme Corp in Paris."
    assert 0.0 <= jane_acme["confidence"] <= 1.0
    assert jane_acme["spans_chunks"] is False  # they share both chunks
    # Paris and Stanford never share a sentence.
    assert ("Paris", "Stanford University") not in pairs
    assert ("Paris", "Hudson River") in pairs  # Paris came first in the document


def test_a_sentence_cut_by_a_chunk_boundary_relates_entities_that_share_no_chunk():
    payload = changed(TWO_CHUNKS, "chunks", [
        {"vector_rowid": 7, "chunk_index": 0, "char_start": 0, "char_end": 36,
         "text": "Alice Smith went to Paris. Bob Jones"},
        {"vector_rowid": 8, "chunk_index": 1, "char_start": 36, "char_end": 60,
         "text": "met Carol King at Oslo Labs."},
    ])
    answer = extract(payload)
    pairs = {(r["subject_text"], r["object_text"]): r for r in answer["relationships"]}
    across = pairs[("Bob Jones", "Carol King")]
    assert across["spans_chunks"] is True and across["chunk_rowids"] == [7, 8]
    assert across["context"] == "Bob Jones met Carol King at Oslo Labs."
    assert pairs[("Alice Smith", "Paris")]["spans_chunks"] is False
    assert pairs[("Carol King", "Oslo Labs")]["spans_chunks"] is False
    assert ("Alice Smith", "Carol King") not in pairs, "different sentences"
    assert_spans_follow_the_service_meaning(answer)


def test_spans_chunks_is_false_when_the_pair_also_shares_a_chunk():
    payload = changed(TWO_CHUNKS, "chunks", [
        {"vector_rowid": 7, "chunk_index": 0, "char_start": 0, "char_end": 40,
         "text": "Bob Jones thanked Carol King. Bob Jones"},
        {"vector_rowid": 8, "chunk_index": 1, "char_start": 40, "char_end": 60,
         "text": "called Carol King."},
    ])
    [relation] = extract(payload)["relationships"]
    assert relation["spans_chunks"] is False and relation["chunk_rowids"] == [7, 8]


def test_an_unfinished_last_sentence_is_still_related():
    payload = changed(TWO_CHUNKS, "chunks", [
        {"vector_rowid": 7, "chunk_index": 0, "char_start": 0, "char_end": 30,
         "text": "Alice Smith met Bob Jones and"}])
    [relation] = extract(payload)["relationships"]
    assert (relation["subject_text"], relation["object_text"]) == ("Alice Smith", "Bob Jones")


def test_subject_is_the_entity_that_appeared_first_in_the_document():
    payload = {"content_id": 1, "chunks": [
        {"vector_rowid": 1, "text": "Alice Smith met Bob Jones."},
        {"vector_rowid": 2, "text": "Bob Jones thanked Alice Smith."},
    ]}
    [relation] = extract(payload)["relationships"]
    assert (relation["subject_text"], relation["object_text"]) == ("Alice Smith", "Bob Jones")
    assert relation["chunk_rowids"] == [1, 2]


def test_a_crowded_sentence_cannot_explode_into_pairs():
    names = " ".join(f"Name{i}." for i in range(200)).replace(".", ",")
    answer = extract({"content_id": 1, "chunks": [{"vector_rowid": 1, "text": names}]})
    assert answer["entities_extracted"] == 200
    assert answer["relationships_extracted"] == 20 * 19 // 2


def test_empty_chunks_list_succeeds_with_nothing_extracted(service):
    answer = ingest(service, NO_CHUNKS)
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert (body["entities_extracted"], body["relationships_extracted"]) == (0, 0)
    assert body["entities"] == [] and body["relationships"] == []
    assert body["summary"]["chunks_with_entities"] == 0
    assert body["summary"]["avg_entities_per_chunk"] == 0.0


def test_nul_bytes_and_odd_unicode_do_not_crash(service):
    text = "Acme\x00Corp met Zoë Ångström\u200b Bob\ufeff Lee. 🙂 Émile Ünal Tokyo\x00."
    payload = changed(TWO_CHUNKS, "chunks", [
        {"vector_rowid": 1, "chunk_index": 0, "char_start": 0, "char_end": 60, "text": text},
        {"vector_rowid": 2, "chunk_index": 1, "char_start": 60, "char_end": 70, "text": " " * 10},
        {"vector_rowid": 3, "chunk_index": 2, "char_start": 70, "char_end": 120, "text": "\x00" * 50},
    ])
    answer = requests.post(f"{service}/api/v1/ingest", timeout=5,
                           data=json.dumps(payload).encode("ascii"),
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["success"] is True
    assert_offsets_exact(payload, body)
    assert "tokyo" in [e["normalized"] for e in body["entities"]]


CHUNK_TEXT = st.text(alphabet=st.sampled_from("AaBbZ .!?'-\t\n\x00é"), max_size=80)


@settings(max_examples=200, deadline=None)
@given(st.lists(CHUNK_TEXT, max_size=3))
def test_offsets_are_exact_and_spans_follow_the_service_meaning_for_any_text(texts):
    payload = {"content_id": 3,
               "chunks": [{"vector_rowid": i + 1, "chunk_index": i, "text": t} for i, t in enumerate(texts)]}
    answer = extract(payload)
    assert_offsets_exact(payload, answer)
    assert_spans_follow_the_service_meaning(answer)
    assert answer == extract(payload)


def test_extract_handles_a_two_megabyte_text():
    text = "Alice Smith met Bob Jones at Acme Corp in Paris. " * 41_000
    answer = extract({"content_id": 1, "chunks": [{"vector_rowid": 1, "text": text}]})
    assert answer["entities_extracted"] == 4
    assert answer["relationships_extracted"] == 6
    assert len(answer["entities"][0]["chunk_appearances"]) == 41_000


# ---------------------------------------------------------------- validation: one rule each

LONG = "x" * 10_001
RULES = [
    # (path to the bad value, the value, pydantic's type, its message, its ctx)
    (("content_id",), DELETE, "missing", "Field required", None),
    (("content_id",), "abc", "int_parsing",
     "Input should be a valid integer, unable to parse string as an integer", None),
    (("content_id",), None, "int_type", "Input should be a valid integer", None),
    (("content_id",), 7.5, "int_from_float",
     "Input should be a valid integer, got a number with a fractional part", None),
    (("url",), 5, "string_type", "Input should be a valid string", None),
    (("url",), "u" * 2_049, "string_too_long", "String should have at most 2048 characters",
     {"max_length": 2_048}),
    (("title",), None, "string_type", "Input should be a valid string", None),
    (("title",), "t" * 501, "string_too_long", "String should have at most 500 characters",
     {"max_length": 500}),
    (("markdown",), DELETE, "missing", "Field required", None),
    (("markdown",), "m" * 49, "string_too_short", "String should have at least 50 characters",
     {"min_length": 50}),
    (("markdown",), "m" * 1_000_001, "string_too_long",
     "String should have at most 1000000 characters", {"max_length": 1_000_000}),
    (("chunks",), {}, "list_type", "Input should be a valid list", None),
    (("chunks", 0), "text", "model_attributes_type",
     "Input should be a valid dictionary or object to extract fields from", None),
    (("chunks", 0, "vector_rowid"), 0, "greater_than", "Input should be greater than 0", {"gt": 0}),
    (("chunks", 0, "vector_rowid"), "one", "int_parsing",
     "Input should be a valid integer, unable to parse string as an integer", None),
    (("chunks", 0, "chunk_index"), -1, "greater_than_equal",
     "Input should be greater than or equal to 0", {"ge": 0}),
    (("chunks", 0, "char_start"), -1, "greater_than_equal",
     "Input should be greater than or equal to 0", {"ge": 0}),
    (("chunks", 0, "char_end"), 0, "value_error",
     "Value error, char_end must be greater than char_start", {"error": {}}),
    (("chunks", 0, "text"), DELETE, "missing", "Field required", None),
    (("chunks", 0, "text"), "too short", "string_too_short",
     "String should have at least 10 characters", {"min_length": 10}),
    (("chunks", 0, "text"), LONG, "string_too_long", "String should have at most 10000 characters",
     {"max_length": 10_000}),
    (("chunks", 0, "text"), "\ud800" * 10, "string_unicode",
     "Input should be a valid string, unable to parse raw data as a unicode string", None),
    (("metadata",), [], "dict_type", "Input should be a valid dictionary", None),
]


@pytest.mark.parametrize("path, value, kind, msg, ctx", RULES,
                         ids=[f"{'.'.join(map(str, r[0]))}-{r[2]}" for r in RULES])
def test_each_rule_of_the_real_model_answers_422_with_fastapis_detail(shared_service, path, value, kind, msg, ctx):
    payload = changed(TWO_CHUNKS, *path, value)
    answer = ingest(shared_service, payload)
    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", *path]
    assert (error["type"], error["msg"], error.get("ctx")) == (kind, msg, ctx)
    parent = payload
    for step in path[:-1]:
        parent = parent[step]
    assert error["input"] == (parent if value is DELETE else value)


def test_every_error_is_listed_in_the_models_field_order(shared_service):
    payload = changed(TWO_CHUNKS, "url", "u" * 3_000)
    payload = changed(payload, "chunks", 0, "text", "short")
    payload = changed(payload, "chunks", 1, "vector_rowid", 0)
    payload = changed(payload, "chunks", 1, "char_end", DELETE)
    payload = changed(payload, "metadata", "tags")
    answer = ingest(shared_service, payload)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert [(e["loc"], e["type"]) for e in detail] == [
        (["body", "url"], "string_too_long"),
        (["body", "chunks", 0, "text"], "string_too_short"),
        (["body", "chunks", 1, "vector_rowid"], "greater_than"),
        (["body", "chunks", 1, "char_end"], "missing"),
        (["body", "metadata"], "dict_type"),
    ]
    assert validate_ingest_request(payload) == detail


def test_the_bounds_themselves_and_pydantics_lax_conversions_are_accepted(shared_service):
    payload = changed(TWO_CHUNKS, "url", "u" * 2_048)
    payload = changed(payload, "title", "")
    payload = changed(payload, "markdown", "m" * 50)
    payload = changed(payload, "content_id", "  42 ")
    payload = changed(payload, "chunks", [
        {"vector_rowid": 1, "chunk_index": 0, "char_start": 0, "char_end": 1, "text": "x" * 10},
        {"vector_rowid": "2", "chunk_index": 1.0, "char_start": 1, "char_end": 2, "text": "y" * 10_000},
    ])
    answer = ingest(shared_service, changed(payload, "metadata", DELETE))
    assert answer.status_code == 200, answer.text
    assert answer.json()["content_id"] == 42
    request, errors = parse_ingest_request(payload)
    assert errors == [] and request["chunks"][1]["vector_rowid"] == 2 and request["chunks"][1]["chunk_index"] == 1


def test_char_end_is_only_compared_with_a_valid_char_start(shared_service):
    payload = changed(TWO_CHUNKS, "chunks", 0, "char_start", -5)
    payload = changed(payload, "chunks", 0, "char_end", 0)
    detail = ingest(shared_service, payload).json()["detail"]
    assert [e["loc"][-1] for e in detail] == ["char_start"]


@pytest.mark.parametrize("body, loc, kind", [
    (b"{not json", ["body", 1], "json_invalid"),
    (b"", ["body"], "missing"),
    (b"[]", ["body"], "model_attributes_type"),
    (b'"a string"', ["body"], "model_attributes_type"),
])
def test_a_body_that_is_no_object_is_422_as_fastapi_answers_it(shared_service, body, loc, kind):
    answer = requests.post(f"{shared_service}/api/v1/ingest", data=body, timeout=5,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, kind)


def test_invalid_json_says_where_and_why(shared_service):
    answer = requests.post(f"{shared_service}/api/v1/ingest", data=b'{"content_id": 1,}', timeout=5,
                           headers={"Content-Type": "application/json"})
    [error] = answer.json()["detail"]
    assert error == {"type": "json_invalid", "loc": ["body", 17], "msg": "JSON decode error", "input": {},
                     "ctx": {"error": "Expecting property name enclosed in double quotes"}}


def test_a_body_not_sent_as_json_is_not_read_as_json(shared_service):
    answer = requests.post(f"{shared_service}/api/v1/ingest", data=json.dumps(TWO_CHUNKS), timeout=5,
                           headers={"Content-Type": "text/plain"})
    assert answer.status_code == 422
    [error] = answer.json()["detail"]
    assert error["type"] == "model_attributes_type" and error["input"] == json.dumps(TWO_CHUNKS)


def test_a_body_that_is_not_utf8_is_400_in_the_error_body(shared_service):
    answer = requests.post(f"{shared_service}/api/v1/ingest", data=b'{"url": "\xff"}', timeout=5,
                           headers={"Content-Type": "application/json"})
    assert_error_body(answer, 400, "HTTPException", "There was an error parsing the body")


def test_validation_runs_before_any_processing(start_service):
    base = url_of(start_service(fail_rate=1.0, not_initialized=True))
    assert ingest(base, changed(TWO_CHUNKS, "title", None)).status_code == 422


# ---------------------------------------------------------------- errors


def test_token_is_required_when_set(start_service):
    base = url_of(start_service(token="s3cret"))
    # One keep-alive session: the 401 must leave the connection usable for the next request.
    with requests.Session() as session:
        refused = session.post(f"{base}/api/v1/ingest", json=NO_CHUNKS, timeout=5)
        wrong = session.post(f"{base}/api/v1/ingest", json=NO_CHUNKS, timeout=5,
                             headers={"Authorization": "Bearer nope"})
        accepted = session.post(f"{base}/api/v1/ingest", json=NO_CHUNKS, timeout=5,
                                headers={"Authorization": "Bearer s3cret"})
    for answer in (refused, wrong):
        assert_error_body(answer, 401, "HTTPException", "Invalid or missing bearer token")
        assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert accepted.status_code == 200 and accepted.json()["success"] is True


def test_authentication_comes_before_validation(start_service):
    base = url_of(start_service(token="s3cret"))
    assert ingest(base, {"not": "a document"}).status_code == 401


def test_fail_rate_half_fails_exactly_half_of_ten_with_the_real_error_body(start_service):
    base = url_of(start_service(fail_rate=0.5))
    with requests.Session() as session:
        answers = [session.post(f"{base}/api/v1/ingest", json=TWO_CHUNKS, timeout=5)
                   for _ in range(10)]
    codes = [answer.status_code for answer in answers]
    assert codes.count(500) == 5 and codes.count(200) == 5
    failed = next(answer for answer in answers if answer.status_code == 500)
    assert_error_body(failed, 500, "ProcessingError", "Processing failed: injected failure (--fail-rate)")


def test_latency_delays_ingest_answers_and_counts_as_processing_time(start_service):
    base = url_of(start_service(latency=0.2))
    answer = ingest(base, NO_CHUNKS)
    assert answer.status_code == 200
    assert answer.elapsed.total_seconds() >= 0.2
    assert answer.json()["processing_time_ms"] >= 200


def test_unknown_path_is_404_and_wrong_method_is_405_in_the_error_body(service):
    with requests.Session() as session:
        missing = session.get(f"{service}/nope", timeout=5)
        wrong_ingest = session.get(f"{service}/api/v1/ingest", timeout=5)
        wrong_health = session.post(f"{service}/health", json={}, timeout=5)
        head = session.head(f"{service}/health", timeout=5)
        still_fine = session.get(f"{service}/health", timeout=5)
    assert_error_body(missing, 404, "HTTPException", "Not Found")
    assert_error_body(wrong_ingest, 405, "HTTPException", "Method Not Allowed")
    assert wrong_ingest.headers["Allow"] == "POST"
    assert_error_body(wrong_health, 405, "HTTPException", "Method Not Allowed")
    assert head.status_code == 405 and head.content == b""
    assert still_fine.status_code == 200


@pytest.mark.parametrize("headers, status, error", [
    ({"Content-Length": str(MAX_BODY_BYTES + 1)}, 413, "Request body too large"),
    ({"Content-Length": "many"}, 400, "Invalid Content-Length header"),
    ({"Transfer-Encoding": "chunked"}, 411, "Content-Length required"),
])
def test_a_body_that_cannot_be_read_is_refused_in_the_error_body_and_the_connection_closed(service, headers, status, error):
    connection = http.client.HTTPConnection(service.removeprefix("http://"), timeout=5)
    try:
        connection.putrequest("POST", "/api/v1/ingest")
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        answer = connection.getresponse()
        body = json.loads(answer.read())
    finally:
        connection.close()
    assert answer.status == status and answer.getheader("Connection") == "close"
    assert set(body) == ERROR_BODY_KEYS and (body["error"], body["error_type"]) == (error, "HTTPException")


# ---------------------------------------------------------------- health and model loading

HEALTH_KEYS = {"status", "services", "version", "uptime_seconds", "timestamp"}


def health_of(base: str) -> dict:
    answer = requests.get(f"{base}/health", timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == HEALTH_KEYS, body
    return body


def test_health_answers_200_with_the_real_services_fields(service):
    body = health_of(service)
    assert body["status"] == "healthy"
    assert body["services"] == {"neo4j": "connected", "llm": "connected", "entity_model": "loaded"}
    assert isinstance(body["version"], str) and body["uptime_seconds"] >= 0
    assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None


@pytest.mark.parametrize("status, services", [
    ("degraded", {"neo4j": "connected", "llm": "disconnected", "entity_model": "loaded"}),
    ("unhealthy", {"neo4j": "disconnected", "llm": "connected", "entity_model": "loaded"}),
])
def test_health_status_is_set_at_start(start_service, status, services):
    body = health_of(url_of(start_service(health=status)))
    assert (body["status"], body["services"]) == (status, services)


def test_health_status_switches_while_serving_and_ingests_go_on(start_service):
    server = start_service()
    base = url_of(server)
    seen = []
    for status in ("degraded", "unhealthy", "healthy"):
        server.health_status = status
        seen.append(health_of(base)["status"])
        assert ingest(base, NO_CHUNKS).status_code == 200
    assert seen == ["degraded", "unhealthy", "healthy"]
    with pytest.raises(ValueError, match="health must be one of"):
        server.health_status = "fine"
    assert health_of(base)["status"] == "healthy"


def test_health_counts_requests_served(start_service):
    server = start_service()
    with requests.Session() as session:
        counts = []
        for _ in range(3):
            session.get(f"{url_of(server)}/health", timeout=5)
            counts.append(server.requests_served)
    assert counts == [1, 2, 3]


NOT_INITIALIZED = "Processing failed: 503: KG processor not initialized"


def test_while_models_load_every_ingest_is_a_500_and_health_says_degraded(start_service):
    server = start_service(not_initialized=True)
    base = url_of(server)
    with requests.Session() as session:
        answers = [session.post(f"{base}/api/v1/ingest", json=TWO_CHUNKS, timeout=5) for _ in range(3)]
    for answer in answers:
        assert_error_body(answer, 500, "ProcessingError", NOT_INITIALIZED)
    body = health_of(base)
    assert body["status"] == "degraded" and body["services"]["entity_model"] == "loading"
    server.not_initialized = False  # the models finished loading
    assert ingest(base, TWO_CHUNKS).status_code == 200
    assert health_of(base)["status"] == "healthy"


def test_models_can_start_loading_while_serving(start_service):
    server = start_service()
    base = url_of(server)
    assert ingest(base, NO_CHUNKS).status_code == 200
    server.not_initialized = True
    assert_error_body(ingest(base, NO_CHUNKS), 500, "ProcessingError", NOT_INITIALIZED)


def test_an_unhealthy_service_stays_unhealthy_while_models_load(start_service):
    body = health_of(url_of(start_service(health="unhealthy", not_initialized=True)))
    assert body["status"] == "unhealthy" and body["services"]["entity_model"] == "loading"


def test_dev_service_command_takes_health_and_not_initialized():
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "kgsupervisor", "dev-service", "--port", "0",
                                "--health", "degraded", "--not-initialized"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        base = re.search(r"http://\S+", line).group(0)
        assert health_of(base)["status"] == "degraded"
        assert_error_body(ingest(base, TWO_CHUNKS), 500, "ProcessingError", NOT_INITIALIZED)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_dev_service_command_refuses_an_unknown_health_in_one_line():
    out = subprocess.run([sys.executable, "-m", "kgsupervisor", "dev-service", "--health", "fine"],
                         capture_output=True, text=True, timeout=20,
                         env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "'fine' is not one of 'healthy', 'degraded', 'unhealthy'" in out.stderr


# ---------------------------------------------------------------- the sample documents


@pytest.mark.parametrize("chunks, sentences", [(1, 1), (3, 4), (4, 5), (3, 7), (1, 90)])
def test_sample_documents_pass_the_real_services_validation(conn, chunks, sentences):
    ids = add_documents(conn, 30, chunks=chunks, sentences=sentences, seed=chunks * 100 + sentences)
    for cid in ids:
        payload, _ = build_payload(conn, cid)
        assert validate_ingest_request(payload) == [], cid


@pytest.mark.parametrize("chunks, sentences", [(0, 3), (3, 0), (1, 91), (200, 90)])
def test_sample_documents_the_service_could_refuse_are_not_made(conn, chunks, sentences):
    with pytest.raises(ValueError, match="could be refused by the KG service"):
        add_documents(conn, 1, chunks=chunks, sentences=sentences)


# ---------------------------------------------------------------- serving


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_until_signalled_and_exits_cleanly(signum):
    code = ("from kgsupervisor.kg.devservice import serve; "
            "serve('127.0.0.1', 0, ready=lambda p: print(p, flush=True))")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = int(process.stdout.readline())
        assert health_of(f"http://127.0.0.1:{port}")["status"] == "healthy"
        process.send_signal(signum)
        assert process.wait(timeout=5) == 0
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_to_run_outside_the_main_thread():
    from kgsupervisor.kg.devservice import serve

    errors = []
    thread = threading.Thread(target=lambda: _capture(errors, serve, "127.0.0.1", 0))
    thread.start()
    thread.join(timeout=5)
    assert errors and isinstance(errors[0], RuntimeError)


def _capture(errors: list, function, *args) -> None:
    try:
        function(*args)
    except Exception as exc:  # noqa: BLE001 - handed back to the test thread
        errors.append(exc)


@pytest.mark.parametrize("options", [{"fail_rate": 1.5}, {"fail_rate": -0.1}, {"latency": -1},
                                     {"health": "fine"}])
def test_make_server_refuses_impossible_settings(options):
    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, **options)
