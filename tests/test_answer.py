"""Tests for kgsupervisor.kg.answer (with answerfields and result): the KG service's answer parser."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kgsupervisor.errors import InvalidAnswer
from kgsupervisor.kg.answer import parse_answer
from kgsupervisor.kg.result import Appearance, Entity, IngestResult, Relationship

pytestmark = pytest.mark.timeout(60)

CONTENT_ID = 13
CHUNKS = (101, 102, 103)


def entity(**overrides):
    base = {
        "text": "Ada Lovelace",
        "normalized": "ada lovelace",
        "type_primary": "Person",
        "type_sub1": "Scientist",
        "type_sub2": None,
        "type_sub3": None,
        "confidence": 0.9,
        "chunk_appearances": [{"vector_rowid": 101, "offset_start": 0, "offset_end": 12}],
    }
    base.update(overrides)
    return base


def relationship(**overrides):
    base = {
        "subject_text": "Ada Lovelace",
        "predicate": "worked_with",
        "object_text": "Charles Babbage",
        "confidence": 0.8,
        "context": "Ada worked with Babbage.",
        "chunk_rowids": [101, 102],
    }
    base.update(overrides)
    return base


def answer(**overrides):
    base = {
        "success": True,
        "content_id": CONTENT_ID,
        "neo4j_document_id": "4:abc:7",
        "entities_extracted": 2,
        "relationships_extracted": 1,
        "entities": [entity(), entity(text="Charles Babbage", normalized="charles babbage")],
        "relationships": [relationship()],
    }
    base.update(overrides)
    return base


def parse(value, **kwargs):
    body = value if isinstance(value, (bytes, str)) else json.dumps(value).encode()
    kwargs.setdefault("content_id", CONTENT_ID)
    kwargs.setdefault("chunk_rowids", CHUNKS)
    return parse_answer(body, **kwargs)


def rejects(value, fragment, **kwargs):
    with pytest.raises(InvalidAnswer) as info:
        parse(value, **kwargs)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message
    return message


# --- happy path ------------------------------------------------------------------------------


def test_full_answer_round_trip():
    result = parse(answer())
    assert result == IngestResult(
        content_id=CONTENT_ID,
        neo4j_document_id="4:abc:7",
        entities=(
            Entity(
                "Ada Lovelace", "ada lovelace", "Person", "Scientist", None, None, 0.9,
                (Appearance(101, 0, 12),),
            ),
            Entity(
                "Charles Babbage", "charles babbage", "Person", "Scientist", None, None, 0.9,
                (Appearance(101, 0, 12),),
            ),
        ),
        relationships=(
            Relationship(
                "Ada Lovelace", "worked_with", "Charles Babbage", 0.8,
                "Ada worked with Babbage.", (101, 102),
            ),
        ),
        entities_extracted=2,
        relationships_extracted=1,
    )
    assert result.summary() == {
        "neo4j_document_id": "4:abc:7",
        "entities": 2,
        "entity_rows": 2,
        "relationships": 1,
        "entities_extracted": 2,
        "relationships_extracted": 1,
    }


def test_str_body_accepted():
    assert parse(json.dumps(answer())).content_id == CONTENT_ID


def test_value_objects_are_frozen():
    result = parse(answer())
    with pytest.raises(AttributeError):
        result.content_id = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        result.entities[0].text = "x"  # type: ignore[misc]


def test_minimal_answer_defaults():
    result = parse({"success": True, "content_id": CONTENT_ID})
    assert result.neo4j_document_id is None
    assert result.entities == () and result.relationships == ()
    assert result.entities_extracted == 0 and result.relationships_extracted == 0
    assert result.summary()["entity_rows"] == 0


def test_optional_fields_default():
    minimal_entity = {"text": "Ada"}
    minimal_rel = {"subject_text": "a", "predicate": "p", "object_text": "b"}
    result = parse(answer(entities=[minimal_entity], relationships=[minimal_rel],
                          entities_extracted=None, relationships_extracted=None,
                          neo4j_document_id=None))
    assert result.entities == (Entity("Ada", "ada", None, None, None, None, None, ()),)
    assert result.relationships == (Relationship("a", "p", "b", None, None, ()),)
    assert result.entities_extracted == 1 and result.relationships_extracted == 1
    assert result.neo4j_document_id is None


def test_null_lists_are_empty():
    result = parse(answer(entities=None, relationships=None))
    assert result.entities == () and result.relationships == ()


def test_missing_normalized_falls_back_to_text_but_an_empty_one_is_kept_as_the_upstream_writes_it():
    ent = entity(text="ÄDA")
    del ent["normalized"]
    assert parse(answer(entities=[ent])).entities[0].normalized == "äda"
    assert parse(answer(entities=[entity(text="ÄDA", normalized="")])).entities[0].normalized == ""


@pytest.mark.parametrize(("kind", "key"), [
    ("entity", "text"), ("entity", "normalized"), ("entity", "type_sub1"),
    ("relationship", "subject_text"), ("relationship", "predicate"), ("relationship", "object_text"),
    ("relationship", "context"),
])
def test_empty_strings_the_real_model_allows_are_valid(kind, key):
    if kind == "entity":
        result = parse(answer(entities=[entity(**{key: ""})]))
        assert getattr(result.entities[0], key) == ""
    else:
        result = parse(answer(relationships=[relationship(**{key: ""})]))
        assert getattr(result.relationships[0], key) == ""


@pytest.mark.parametrize("value", [-0.01, 1.01, 2, -1])
def test_confidence_outside_0_to_1_is_refused_as_the_real_model_does(value):
    rejects(answer(entities=[entity(confidence=value)]),
            f"answer.entities[0].confidence is {value!r}, must be from 0 to 1")
    rejects(answer(relationships=[relationship(confidence=value)]),
            f"answer.relationships[0].confidence is {value!r}, must be from 0 to 1")


def test_the_services_span_flags_are_kept_and_must_be_booleans():
    result = parse(answer(entities=[entity(spans_multiple_chunks=True)],
                          relationships=[relationship(spans_chunks=False, neo4j_relationship_id="5:r")]))
    assert result.entities[0].spans_multiple_chunks is True
    assert result.relationships[0].spans_chunks is False
    assert result.relationships[0].neo4j_relationship_id == "5:r"
    omitted = parse(answer())
    assert omitted.entities[0].spans_multiple_chunks is None and omitted.relationships[0].spans_chunks is None
    rejects(answer(entities=[entity(spans_multiple_chunks="yes")]),
            "answer.entities[0].spans_multiple_chunks must be true, false or null, got str")
    rejects(answer(relationships=[relationship(spans_chunks=1)]),
            "answer.relationships[0].spans_chunks must be true, false or null, got int")


@pytest.mark.parametrize("value", [2**31, 2**63, 2**64 + 5])
def test_an_offset_no_database_column_holds_is_an_invalid_answer(value):
    rejects(entities_answer(entity(chunk_appearances=[{"vector_rowid": 101, "offset_start": 0,
                                                       "offset_end": value}])),
            f"answer.entities[0].chunk_appearances[0].offset_end is {value}, must be from 0 to 2**31-1")


def test_a_count_beyond_64_bits_is_an_invalid_answer():
    rejects(answer(entities_extracted=2**63), "answer.entities_extracted is 9223372036854775808, must be from 0")


def test_extracted_counts_need_not_match():
    result = parse(answer(entities_extracted=50, relationships_extracted=0))
    assert result.entities_extracted == 50
    assert result.relationships_extracted == 0
    assert len(result.entities) == 2


def test_int_confidence_becomes_float_and_null_offsets_kept():
    result = parse(answer(entities=[entity(
        confidence=1,
        chunk_appearances=[{"vector_rowid": 103, "offset_start": None, "offset_end": 5},
                           {"vector_rowid": 102}],
    )]))
    ent = result.entities[0]
    assert ent.confidence == 1.0 and type(ent.confidence) is float
    assert ent.appearances == (Appearance(103, None, 5), Appearance(102, None, None))
    assert result.summary()["entity_rows"] == 2


def test_chunk_rowids_may_be_any_collection():
    for chunks in (list(CHUNKS), set(CHUNKS), frozenset(CHUNKS), {101: 0, 102: 0}.keys()):
        assert parse(answer(relationships=[]), chunk_rowids=chunks).entities


def test_unknown_keys_ignored():
    result = parse(answer(extra={"x": 1}, entities=[entity(extra=[1, 2])]))
    assert len(result.entities) == 1


def test_hundred_thousand_entities():
    entities = [
        {"text": f"entity {i}", "type_primary": "Thing", "confidence": 0.5,
         "chunk_appearances": [
             {"vector_rowid": 101 + i % 3, "offset_start": i, "offset_end": i + 3}
         ]}
        for i in range(100_000)
    ]
    result = parse(answer(entities=entities, relationships=[], entities_extracted=None))
    assert len(result.entities) == 100_000
    assert result.entities_extracted == 100_000
    assert result.entities[99_999].normalized == "entity 99999"
    assert result.summary()["entity_rows"] == 100_000


# --- strings ---------------------------------------------------------------------------------


def test_lone_surrogates_become_storable():
    body = json.dumps(answer(
        neo4j_document_id="id\ud800",
        entities=[entity(text="bad\ud800x", normalized="\udfff", type_primary="T\ud83d")],
        relationships=[relationship(subject_text="\ud800", context="c\udc00")],
    ))
    assert "\\ud800" in body  # json.dumps escapes them, as a service would
    result = parse(body)
    strings = [result.neo4j_document_id]
    for ent in result.entities:
        strings += [ent.text, ent.normalized, ent.type_primary, ent.type_sub1]
    for rel in result.relationships:
        strings += [rel.subject_text, rel.predicate, rel.object_text, rel.context]
    for text in strings:
        if text is not None:
            text.encode("utf-8")  # strict: would raise on a surrogate
    assert result.entities[0].text == "bad?x"


def test_valid_surrogate_pair_kept():
    result = parse(json.dumps(answer(entities=[entity(text="smile \U0001f600")])))
    assert result.entities[0].text == "smile \U0001f600"


def test_nul_bytes_kept():
    result = parse(answer(entities=[entity(text="a\x00b")],
                          relationships=[relationship(context="\x00")]))
    assert result.entities[0].text == "a\x00b"
    assert result.relationships[0].context == "\x00"


# --- errors: whole answer --------------------------------------------------------------------


def test_too_big():
    message = rejects(b" " * 101, "answer is 101 bytes, over the 100-byte limit", max_bytes=100)
    assert message == "answer is 101 bytes, over the 100-byte limit"


def test_too_big_str_measured_in_utf8_bytes():
    body = json.dumps({"success": True, "content_id": CONTENT_ID, "x": "é" * 50},
                      ensure_ascii=False)
    assert len(body) <= 100
    rejects(body, "bytes, over the 100-byte limit", max_bytes=100)


def test_size_checked_before_json():
    rejects(b"not json" * 20, "over the 100-byte limit", max_bytes=100)


def test_not_json():
    message = rejects(b"", "answer is not JSON: Expecting value at line 1 column 1")
    assert message == "answer is not JSON: Expecting value at line 1 column 1"
    rejects(b"{\"success\": true,", "answer is not JSON:")


def test_invalid_utf8():
    rejects(b"\xff\xfe\xfa", "answer is not JSON:")
    rejects(b'{"a": "\xc3"}', "answer is not JSON:")


def test_huge_integer_literal():
    rejects(b'{"content_id": ' + b"9" * 5000 + b"}", "answer is not JSON:")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a":' * 100_000, "[" * 100_000])
def test_deeply_nested(body):
    rejects(body, "answer is not JSON")


@pytest.mark.parametrize(
    ("value", "kind"), [([], "list"), (1, "int"), (None, "null"), (1.5, "float")]
)
def test_top_level_not_object(value, kind):
    rejects(value, f"answer must be a JSON object, got {kind}")


def test_top_level_string():
    rejects(b'"s"', "answer must be a JSON object, got str")


def test_success_false_with_error():
    message = rejects(answer(success=False, error="model\noverloaded"),
                      "answer.success is false: model overloaded")
    assert message == "answer.success is false: model overloaded"


def test_success_false_with_message():
    rejects({"success": False, "message": "no chunks"}, "answer.success is false: no chunks")


def test_success_false_without_reason():
    rejects({"success": False}, "answer.success is false: no error given")


def test_success_false_error_truncated():
    message = rejects({"success": False, "error": "x" * 10_000}, "answer.success is false: xxx")
    assert len(message) < 250


def test_success_false_structured_error():
    rejects({"success": False, "error": {"code": 5}}, 'answer.success is false: {"code": 5}')


def test_success_false_surrogate_error_is_storable():
    message = rejects(json.dumps({"success": False, "error": "a\ud800"}), "answer.success is false")
    message.encode("utf-8")


@pytest.mark.parametrize("value", [1, "true", None, [True]])
def test_success_not_exactly_true(value):
    rejects(answer(success=value), "answer.success must be true, got")


def test_success_missing():
    body = answer()
    del body["success"]
    rejects(body, "answer.success is missing")


def test_content_id_mismatch():
    message = rejects(answer(content_id=12), "answer.content_id is 12, expected 13")
    assert message == "answer.content_id is 12, expected 13"


@pytest.mark.parametrize(("value", "kind"), [("13", "str"), (13.0, "float"), (True, "bool"),
                                             (None, "null")])
def test_content_id_wrong_type(value, kind):
    rejects(answer(content_id=value), f"answer.content_id must be an integer, got {kind}")


def test_content_id_missing():
    body = answer()
    del body["content_id"]
    rejects(body, "answer.content_id is missing, expected 13")


def test_neo4j_document_id_wrong_type():
    rejects(answer(neo4j_document_id=7),
            "answer.neo4j_document_id must be a string or null, got int")


@pytest.mark.parametrize("key", ["entities", "relationships"])
def test_lists_wrong_type(key):
    rejects(answer(**{key: {"a": 1}}), f"answer.{key} must be a list, got object")
    rejects(answer(**{key: "x"}), f"answer.{key} must be a list, got str")


def test_item_limit():
    message = rejects(
        answer(entities=[{}] * 6, relationships=[{}] * 5),
        "answer has 11 entities and relationships, over the limit of 10",
        max_items=10,
    )
    assert message == "answer has 11 entities and relationships, over the limit of 10"


def test_item_limit_inclusive():
    ok = answer(entities=[entity()] * 6, relationships=[relationship()] * 4)
    assert len(parse(ok, max_items=10).entities) == 6


@pytest.mark.parametrize("key", ["entities_extracted", "relationships_extracted"])
def test_extracted_counts_invalid(key):
    rejects(answer(**{key: -1}), f"answer.{key} is -1, must be from 0 to 2**63-1")
    rejects(answer(**{key: "3"}), f"answer.{key} must be an integer or null, got str")
    rejects(answer(**{key: 2.0}), f"answer.{key} must be an integer or null, got float")
    rejects(answer(**{key: False}), f"answer.{key} must be an integer or null, got bool")


# --- errors: entities ------------------------------------------------------------------------


def entities_answer(*entities):
    return answer(entities=list(entities))


def test_entity_not_object():
    rejects(entities_answer(entity(), [1]), "answer.entities[1] must be an object, got list")


def test_entity_text_wrong_type():
    message = rejects(entities_answer(entity(text=5)),
                      "answer.entities[0].text must be a string, got int")
    assert message == "answer.entities[0].text must be a string, got int"
    rejects(entities_answer(entity(text=None)),
            "answer.entities[0].text must be a string, got null")


def test_entity_text_missing_or_not_a_string():
    ent = entity()
    del ent["text"]
    rejects(entities_answer(entity(), ent), "answer.entities[1].text is missing")
    rejects(entities_answer(entity(text=None)), "answer.entities[0].text must be a string, got null")


@pytest.mark.parametrize("key", ["normalized", "type_primary", "type_sub1", "type_sub2",
                                 "type_sub3"])
def test_entity_optional_string_wrong_type(key):
    rejects(entities_answer(entity(**{key: ["x"]})),
            f"answer.entities[0].{key} must be a string or null, got list")


@pytest.mark.parametrize(("value", "fragment"), [
    ("0.5", "must be a number or null, got str"),
    (True, "must be a number or null, got bool"),
    ({}, "must be a number or null, got object"),
])
def test_entity_confidence_wrong_type(value, fragment):
    rejects(entities_answer(entity(confidence=value)), f"answer.entities[0].confidence {fragment}")


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_entity_confidence_not_finite(literal):
    body = json.dumps(entities_answer(entity(confidence=12345.5))).encode()
    body = body.replace(b"12345.5", literal)
    rejects(body, "answer.entities[0].confidence is")
    rejects(body, "must be finite")


def test_chunk_appearances_wrong_type():
    rejects(entities_answer(entity(chunk_appearances={})),
            "answer.entities[0].chunk_appearances must be a list, got object")


def test_appearance_not_object():
    rejects(entities_answer(entity(chunk_appearances=[101])),
            "answer.entities[0].chunk_appearances[0] must be an object, got int")


def test_appearance_foreign_rowid():
    message = rejects(
        entities_answer(entity(), entity(), entity(),
                        entity(chunk_appearances=[{"vector_rowid": 999}])),
        "answer.entities[3].chunk_appearances[0].vector_rowid 999 is not a chunk of document 13",
    )
    assert message == (
        "answer.entities[3].chunk_appearances[0].vector_rowid 999 is not a chunk of document 13"
    )


@pytest.mark.parametrize(("value", "kind"), [("101", "str"), (101.0, "float"), (True, "bool"),
                                             (None, "null")])
def test_appearance_rowid_wrong_type(value, kind):
    rejects(entities_answer(entity(chunk_appearances=[{"vector_rowid": value}])),
            f"answer.entities[0].chunk_appearances[0].vector_rowid must be an integer, got {kind}")


def test_appearance_rowid_missing():
    rejects(entities_answer(entity(chunk_appearances=[{"offset_start": 1}])),
            "answer.entities[0].chunk_appearances[0].vector_rowid is missing")


@pytest.mark.parametrize("key", ["offset_start", "offset_end"])
def test_appearance_offsets_invalid(key):
    where = f"answer.entities[0].chunk_appearances[0].{key}"
    rejects(entities_answer(entity(chunk_appearances=[{"vector_rowid": 101, key: -1}])),
            f"{where} is -1, must be from 0 to 2**31-1")
    rejects(entities_answer(entity(chunk_appearances=[{"vector_rowid": 101, key: 1.5}])),
            f"{where} must be an integer or null, got float")
    rejects(entities_answer(entity(chunk_appearances=[{"vector_rowid": 101, key: "1"}])),
            f"{where} must be an integer or null, got str")


def test_appearance_start_after_end():
    rejects(entities_answer(entity(chunk_appearances=[
        {"vector_rowid": 101, "offset_start": 0, "offset_end": 0},
        {"vector_rowid": 102, "offset_start": 10, "offset_end": 5},
    ])), "answer.entities[0].chunk_appearances[1].offset_start 10 is after offset_end 5")


# --- errors: relationships -------------------------------------------------------------------


def relationships_answer(*relationships):
    return answer(relationships=list(relationships))


def test_relationship_not_object():
    rejects(relationships_answer(relationship(), "x"),
            "answer.relationships[1] must be an object, got str")


@pytest.mark.parametrize("key", ["subject_text", "predicate", "object_text"])
def test_relationship_required_strings(key):
    rejects(relationships_answer(relationship(**{key: 1})),
            f"answer.relationships[0].{key} must be a string, got int")
    rel = relationship()
    del rel[key]
    rejects(relationships_answer(rel), f"answer.relationships[0].{key} is missing")


def test_relationship_confidence_and_context():
    rejects(relationships_answer(relationship(confidence="high")),
            "answer.relationships[0].confidence must be a number or null, got str")
    rejects(relationships_answer(relationship(context=3)),
            "answer.relationships[0].context must be a string or null, got int")


def test_relationship_chunk_rowids():
    rejects(relationships_answer(relationship(chunk_rowids=101)),
            "answer.relationships[0].chunk_rowids must be a list, got int")
    rejects(relationships_answer(relationship(chunk_rowids=[101, 999])),
            "answer.relationships[0].chunk_rowids[1] 999 is not a chunk of document 13")
    rejects(relationships_answer(relationship(chunk_rowids=[101, "102"])),
            "answer.relationships[0].chunk_rowids[1] must be an integer, got str")
    rejects(relationships_answer(relationship(chunk_rowids=[True])),
            "answer.relationships[0].chunk_rowids[0] must be an integer, got bool")


def test_quoted_values_are_short():
    huge = 10 ** 4000
    message = rejects(answer(content_id=huge), "answer.content_id is")
    assert len(message) < 150
    message = rejects(relationships_answer(relationship(chunk_rowids=[huge])),
                      "is not a chunk of document 13")
    assert len(message) < 200


# --- properties ------------------------------------------------------------------------------

json_text = st.text(st.characters(categories=["L", "N", "P", "S", "Z", "C"]), max_size=12)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
    | st.floats(allow_nan=True, allow_infinity=True) | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(json_text, children, max_size=5),
    max_leaves=30,
)


def field(valid, keys_values=json_values):
    """A field value that is usually plausible and sometimes anything at all."""
    return valid | keys_values


def maybe_dict(**fields):
    """A dict whose keys are each present or absent."""
    return st.fixed_dictionaries({}, optional=fields)


rowid_any = field(st.sampled_from([101, 102, 103, 999]))
answer_shaped = maybe_dict(
    success=field(st.just(True)),
    content_id=field(st.sampled_from([CONTENT_ID, 12])),
    neo4j_document_id=field(json_text),
    entities_extracted=field(st.integers(-1, 5)),
    relationships_extracted=field(st.integers(-1, 5)),
    entities=field(st.lists(field(maybe_dict(
        text=field(json_text),
        normalized=field(json_text),
        type_primary=field(json_text),
        confidence=field(st.floats()),
        chunk_appearances=field(st.lists(field(maybe_dict(
            vector_rowid=rowid_any,
            offset_start=field(st.integers(-1, 10)),
            offset_end=field(st.integers(-1, 10)),
        )), max_size=3)),
    )), max_size=4)),
    relationships=field(st.lists(field(maybe_dict(
        subject_text=field(json_text),
        predicate=field(json_text),
        object_text=field(json_text),
        confidence=field(st.floats()),
        context=field(json_text),
        chunk_rowids=field(st.lists(rowid_any, max_size=3)),
    )), max_size=4)),
)


def check_total(value):
    body = json.dumps(value).encode()
    try:
        result = parse_answer(body, content_id=CONTENT_ID, chunk_rowids=CHUNKS)
    except InvalidAnswer as exc:
        assert "\n" not in str(exc)
        str(exc).encode("utf-8")
        return None
    assert isinstance(result, IngestResult)
    result.summary()
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_value_is_result_or_invalid_answer(value):
    check_total(value)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answer_shaped)
def test_answer_shaped_value_is_result_or_invalid_answer(value):
    check_total(value)


@st.composite
def valid_answers(draw):
    chunks = draw(st.lists(st.integers(1, 10 ** 12), min_size=1, max_size=6, unique=True))
    rowid = st.sampled_from(chunks)
    text = st.text(min_size=1, max_size=10)  # may include surrogates and NUL
    optional_text = st.none() | st.text(max_size=10)
    confidence = st.none() | st.floats(0, 1) | st.integers(0, 1)

    @st.composite
    def appearance(draw):
        start = draw(st.none() | st.integers(0, 10 ** 6))
        end = draw(st.none() | st.integers(start or 0, 10 ** 6 + 10))
        return {"vector_rowid": draw(rowid), "offset_start": start, "offset_end": end}

    entities = draw(st.lists(maybe_dict(
        normalized=optional_text, type_primary=optional_text, type_sub1=optional_text,
        type_sub2=optional_text, type_sub3=optional_text, confidence=confidence,
        chunk_appearances=st.lists(appearance(), max_size=4),
    ).flatmap(lambda d: text.map(lambda t: {**d, "text": t})), max_size=8))
    relationships = draw(st.lists(st.fixed_dictionaries(
        {"subject_text": text, "predicate": text, "object_text": text},
        optional={"confidence": confidence, "context": optional_text,
                  "chunk_rowids": st.lists(rowid, max_size=4)},
    ), max_size=8))
    body = {"success": True, "content_id": CONTENT_ID, "entities": entities,
            "relationships": relationships}
    body.update(draw(maybe_dict(neo4j_document_id=optional_text,
                                entities_extracted=st.none() | st.integers(0, 100),
                                relationships_extracted=st.none() | st.integers(0, 100))))
    return chunks, body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(valid_answers())
def test_valid_answers_parse(case):
    chunks, body = case
    result = parse_answer(json.dumps(body), content_id=CONTENT_ID, chunk_rowids=chunks)
    assert len(result.entities) == len(body["entities"])
    assert len(result.relationships) == len(body["relationships"])
    for parsed, raw in zip(result.entities, body["entities"]):
        raw_rowids = [a["vector_rowid"] for a in raw.get("chunk_appearances", [])]
        assert [a.vector_rowid for a in parsed.appearances] == raw_rowids
        assert parsed.text
        parsed.text.encode("utf-8")
        parsed.normalized.encode("utf-8")
        if parsed.confidence is not None:
            assert math.isfinite(parsed.confidence)
    for parsed, raw in zip(result.relationships, body["relationships"]):
        assert list(parsed.chunk_rowids) == raw.get("chunk_rowids", [])
    summary = result.summary()
    assert summary["entity_rows"] == sum(
        len(e.get("chunk_appearances", [])) for e in body["entities"]
    )
