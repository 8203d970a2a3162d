"""The reference KG service, driven over real HTTP on 127.0.0.1 and as a real subprocess."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from kgsupervisor.devservice import extract
from kgsupervisor.devservice import make_server
from kgsupervisor.devservice import validate_ingest_request

pytestmark = pytest.mark.timeout(30)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

TWO_CHUNKS = {
    "content_id": 42,
    "url": "https://example.org/acme",
    "title": "Acme",
    "markdown": "...",
    "chunks": [
        {"vector_rowid": 101, "chunk_index": 0, "char_start": 0, "char_end": 70,
         "text": "Jane Doe joined Acme Corp in Paris. The Hudson River is far from Paris."},
        {"vector_rowid": 102, "chunk_index": 1, "char_start": 70, "char_end": 130,
         "text": "Later, Jane Doe left Acme Corp for Stanford University!"},
    ],
    "metadata": {"tags": ["demo"]},
}


@pytest.fixture
def start_service():
    """Start real dev services on free ports; shut each down and close its socket afterwards."""
    running = []

    def start(**options) -> str:
        server = make_server("127.0.0.1", 0, **options)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in running:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def service(start_service) -> str:
    return start_service()


def ingest(base: str, payload: object, **kwargs) -> requests.Response:
    return requests.post(f"{base}/api/v1/ingest", json=payload, timeout=5, **kwargs)


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


def test_health_answers_200_with_healthy_status(service):
    answer = requests.get(f"{service}/health", timeout=5)
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == "healthy"
    assert body["service"] == "kgsupervisor-dev-service"
    assert body["requests_served"] >= 1


def test_health_counts_requests_served(service):
    with requests.Session() as session:
        counts = [session.get(f"{service}/health", timeout=5).json()["requests_served"]
                  for _ in range(3)]
    assert counts == [counts[0], counts[0] + 1, counts[0] + 2]


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
    paris = next(e for e in body["entities"] if e["normalized"] == "paris")
    assert len(paris["chunk_appearances"]) == 2


def test_entity_fields_follow_the_contract(service):
    body = ingest(service, TWO_CHUNKS).json()
    types = {e["normalized"]: e["type_primary"] for e in body["entities"]}
    assert types == {"jane doe": "Person", "acme corp": "Organization", "paris": "Location",
                     "hudson river": "Location", "stanford university": "Organization"}
    for entity in body["entities"]:
        assert 0.5 <= entity["confidence"] <= 1.0
        for key in ("type_sub1", "type_sub2", "type_sub3"):
            assert entity[key] is None or isinstance(entity[key], str)


def test_same_payload_twice_gives_identical_answers(service):
    first = ingest(service, TWO_CHUNKS).json()
    second = ingest(service, TWO_CHUNKS).json()
    assert first == second
    assert extract(TWO_CHUNKS) == first


def test_entities_in_one_sentence_are_related_and_merged_across_chunks(service):
    body = ingest(service, TWO_CHUNKS).json()
    pairs = {(r["subject_text"], r["object_text"]): r for r in body["relationships"]}
    jane_acme = pairs[("Jane Doe", "Acme Corp")]
    assert jane_acme["predicate"] == "co_occurs_with"
    assert jane_acme["chunk_rowids"] == [101, 102]
    assert jane_acme["context"] == "Jane Doe joined Acme Corp in Paris."
    assert 0.0 <= jane_acme["confidence"] <= 1.0
    # Paris and Stanford never share a sentence.
    assert ("Paris", "Stanford University") not in pairs
    assert ("Paris", "Hudson River") in pairs  # Paris came first in the document


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
    answer = ingest(service, {"content_id": 5, "chunks": []})
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert (body["entities_extracted"], body["relationships_extracted"]) == (0, 0)
    assert body["entities"] == [] and body["relationships"] == []


def test_invalid_json_is_400(service):
    answer = requests.post(f"{service}/api/v1/ingest", data=b"{not json",
                           headers={"Content-Type": "application/json"}, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["success"] is False


def test_missing_content_id_is_400_with_a_reason(service):
    answer = ingest(service, {"chunks": []})
    assert answer.status_code == 400
    assert answer.json() == {"success": False, "error": "content_id is required"}


@pytest.mark.parametrize("payload", [
    [],
    {"content_id": "7", "chunks": []},
    {"content_id": True, "chunks": []},
    {"content_id": 7, "chunks": {}},
    {"content_id": 7},
    {"content_id": 7, "chunks": [{"text": "x"}]},
    {"content_id": 7, "chunks": [{"vector_rowid": 1}]},
    {"content_id": 7, "chunks": [{"vector_rowid": 1, "text": None}]},
    {"content_id": 7, "chunks": ["text"]},
    {"content_id": 7, "chunks": [{"vector_rowid": False, "text": "x"}]},
])
def test_validation_names_the_problem(payload):
    reason = validate_ingest_request(payload)
    assert isinstance(reason, str) and reason


def test_validation_accepts_a_contract_payload():
    assert validate_ingest_request(TWO_CHUNKS) is None
    assert validate_ingest_request({"content_id": 1, "chunks": []}) is None


def test_token_is_required_when_set(start_service):
    base = start_service(token="s3cret")
    payload = {"content_id": 1, "chunks": []}
    # One keep-alive session: the 401 must leave the connection usable for the next request.
    with requests.Session() as session:
        refused = session.post(f"{base}/api/v1/ingest", json=payload, timeout=5)
        wrong = session.post(f"{base}/api/v1/ingest", json=payload, timeout=5,
                             headers={"Authorization": "Bearer nope"})
        accepted = session.post(f"{base}/api/v1/ingest", json=payload, timeout=5,
                                headers={"Authorization": "Bearer s3cret"})
    assert (refused.status_code, wrong.status_code, accepted.status_code) == (401, 401, 200)
    assert refused.json() == {"success": False, "error": "unauthorized"}
    assert accepted.json()["success"] is True


def test_fail_rate_half_fails_exactly_half_of_ten(start_service):
    base = start_service(fail_rate=0.5)
    with requests.Session() as session:
        answers = [session.post(f"{base}/api/v1/ingest", json=TWO_CHUNKS, timeout=5)
                   for _ in range(10)]
    codes = [answer.status_code for answer in answers]
    assert codes.count(500) == 5 and codes.count(200) == 5
    failed = next(answer for answer in answers if answer.status_code == 500)
    assert failed.json() == {"success": False, "error": "injected failure"}


def test_latency_delays_ingest_answers(start_service):
    base = start_service(latency=0.2)
    answer = ingest(base, {"content_id": 1, "chunks": []})
    assert answer.status_code == 200
    assert answer.elapsed.total_seconds() >= 0.2


def test_unknown_path_is_404_and_wrong_method_is_405(service):
    with requests.Session() as session:
        missing = session.get(f"{service}/nope", timeout=5)
        wrong_ingest = session.get(f"{service}/api/v1/ingest", timeout=5)
        wrong_health = session.post(f"{service}/health", json={}, timeout=5)
        head = session.head(f"{service}/health", timeout=5)
        still_fine = session.get(f"{service}/health", timeout=5)
    assert missing.status_code == 404 and missing.json()["success"] is False
    assert wrong_ingest.status_code == 405 and wrong_ingest.headers["Allow"] == "POST"
    assert wrong_health.status_code == 405
    assert head.status_code == 405 and head.content == b""
    assert still_fine.status_code == 200


def test_nul_bytes_and_odd_unicode_do_not_crash(service):
    text = "Acme\x00Corp met Zoë Ångström\u200b Bob\ufeff Lee. 🙂 Émile Ünal \ud800 Tokyo\x00."
    payload = {"content_id": 9, "chunks": [
        {"vector_rowid": 1, "text": text},
        {"vector_rowid": 2, "text": ""},
        {"vector_rowid": 3, "text": "\x00" * 50},
    ]}
    answer = requests.post(f"{service}/api/v1/ingest", timeout=5,
                           data=json.dumps(payload).encode("ascii"),
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["success"] is True
    assert_offsets_exact(payload, body)
    assert "tokyo" in [e["normalized"] for e in body["entities"]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("AaBbZ .!?'-\t\n\x00é"), max_size=80),
                max_size=3))
def test_offsets_are_exact_for_any_text(texts):
    payload = {"content_id": 3,
               "chunks": [{"vector_rowid": i, "text": t} for i, t in enumerate(texts)]}
    answer = extract(payload)
    assert_offsets_exact(payload, answer)
    assert answer == extract(payload)


def test_extract_handles_a_two_megabyte_text():
    text = "Alice Smith met Bob Jones at Acme Corp in Paris. " * 41_000
    answer = extract({"content_id": 1, "chunks": [{"vector_rowid": 1, "text": text}]})
    assert answer["entities_extracted"] == 4
    assert answer["relationships_extracted"] == 6
    assert len(answer["entities"][0]["chunk_appearances"]) == 41_000


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_runs_until_signalled_and_exits_cleanly(signum):
    code = ("from kgsupervisor.devservice import serve; "
            "serve('127.0.0.1', 0, ready=lambda p: print(p, flush=True))")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = int(process.stdout.readline())
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.json()["status"] == "healthy"
        process.send_signal(signum)
        assert process.wait(timeout=5) == 0
        assert process.stdout.read() == ""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_refuses_to_run_outside_the_main_thread():
    from kgsupervisor.devservice import serve

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


@pytest.mark.parametrize("options", [{"fail_rate": 1.5}, {"fail_rate": -0.1}, {"latency": -1}])
def test_make_server_refuses_impossible_settings(options):
    with pytest.raises(ValueError):
        make_server("127.0.0.1", 0, **options)
