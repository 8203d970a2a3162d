"""Parse and validate the KG service's answer to an ingest into an IngestResult."""
from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from kgsupervisor.errors import InvalidAnswer
from kgsupervisor.kg.answerfields import (MAX_OFFSET, FieldProblem, in_field, json_kind, one_line,
                                          optional_bool, optional_confidence, optional_offset, optional_str,
                                          parse_each, quote, read_chunk_rowid, read_count, read_list,
                                          read_object, required_str)
from kgsupervisor.kg.result import Appearance, Entity, IngestResult, Relationship

# The result types come along with the parser that builds them: `from kgsupervisor.kg.answer import
# IngestResult` keeps working for the callers that read both.
__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ITEMS", "Appearance", "Entity", "IngestResult", "Relationship",
           "parse_answer"]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ITEMS = 200_000

# The service's own error text is clipped like a quoted value: one short line in a log or an error column.
_SERVICE_TEXT_LIMIT = 200


# --- items -----------------------------------------------------------------------------------
# Each item is first checked inline for the ordinary case (plain values of the right types);
# anything else goes through the field readers of answerfields, which either accept it (after
# cleaning) or explain what is wrong. Function calls per field would otherwise dominate the run time.


def _parse_appearance(raw: Any, chunks: Collection[int], content_id: int) -> Appearance:
    obj = read_object(raw)
    if "vector_rowid" not in obj:
        raise FieldProblem(".vector_rowid", "is missing")
    rowid = in_field("vector_rowid", read_chunk_rowid, obj["vector_rowid"], chunks, content_id)
    start = optional_offset(obj, "offset_start")
    end = optional_offset(obj, "offset_end")
    if start is not None and end is not None and start > end:
        raise FieldProblem(".offset_start", f"{quote(start)} is after offset_end {quote(end)}")
    return Appearance(rowid, start, end)


def _parse_appearances(
    items: list, chunks: Collection[int], content_id: int
) -> tuple[Appearance, ...]:
    parsed: list[Appearance] = []
    append = parsed.append
    for item in items:
        if type(item) is dict:
            rowid = item.get("vector_rowid")
            start = item.get("offset_start")
            end = item.get("offset_end")
            if (
                type(rowid) is int
                and rowid in chunks
                and (start is None or (type(start) is int and 0 <= start <= MAX_OFFSET))
                and (end is None or (type(end) is int and 0 <= end <= MAX_OFFSET))
                and (start is None or end is None or start <= end)
            ):
                append(Appearance(rowid, start, end))
                continue
        # The inline test above is complete, so this only runs to say what is wrong.
        try:
            append(_parse_appearance(item, chunks, content_id))
        except FieldProblem as problem:
            problem.path = f".chunk_appearances[{len(parsed)}]{problem.path}"
            raise
    return tuple(parsed)


def _parse_rowids(items: list, chunks: Collection[int], content_id: int) -> tuple[int, ...]:
    for index, rowid in enumerate(items):
        # type() check first: True == 1, so a bool would otherwise pass the membership test.
        if type(rowid) is not int or rowid not in chunks:
            in_field(f"chunk_rowids[{index}]", read_chunk_rowid, rowid, chunks, content_id)
    return tuple(items)


def _parse_entity(raw: Any, chunks: Collection[int], content_id: int) -> Entity:
    obj = read_object(raw)
    get = obj.get
    text = get("text")
    normalized = get("normalized")
    type_primary = get("type_primary")
    type_sub1 = get("type_sub1")
    type_sub2 = get("type_sub2")
    type_sub3 = get("type_sub3")
    confidence = get("confidence")
    appearances = get("chunk_appearances")
    spans = get("spans_multiple_chunks")
    if not (type(text) is str and text.isascii()):
        text = required_str(obj, "text")
    if normalized is not None and not (type(normalized) is str and normalized.isascii()):
        normalized = optional_str(obj, "normalized")
    if type_primary is not None and not (type(type_primary) is str and type_primary.isascii()):
        type_primary = optional_str(obj, "type_primary")
    if type_sub1 is not None and not (type(type_sub1) is str and type_sub1.isascii()):
        type_sub1 = optional_str(obj, "type_sub1")
    if type_sub2 is not None and not (type(type_sub2) is str and type_sub2.isascii()):
        type_sub2 = optional_str(obj, "type_sub2")
    if type_sub3 is not None and not (type(type_sub3) is str and type_sub3.isascii()):
        type_sub3 = optional_str(obj, "type_sub3")
    if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
        confidence = optional_confidence(obj, "confidence")  # turns ints to float, or explains
    if spans is not None and type(spans) is not bool:
        spans = optional_bool(obj, "spans_multiple_chunks")
    if type(appearances) is list:
        appearances = _parse_appearances(appearances, chunks, content_id)
    else:
        appearances = tuple(read_list(obj, "chunk_appearances"))  # null/missing -> (); else raises
    return Entity(
        text,
        # Only an absent normalized form is derived (older services); an empty one is written as given.
        text.lower() if normalized is None else normalized,
        type_primary,
        type_sub1,
        type_sub2,
        type_sub3,
        confidence,
        appearances,
        spans,
    )


def _parse_relationship(raw: Any, chunks: Collection[int], content_id: int) -> Relationship:
    obj = read_object(raw)
    get = obj.get
    subject = get("subject_text")
    predicate = get("predicate")
    object_text = get("object_text")
    confidence = get("confidence")
    context = get("context")
    rowids = get("chunk_rowids")
    spans = get("spans_chunks")
    relationship_id = get("neo4j_relationship_id")
    if not (type(subject) is str and subject.isascii()):
        subject = required_str(obj, "subject_text")
    if not (type(predicate) is str and predicate.isascii()):
        predicate = required_str(obj, "predicate")
    if not (type(object_text) is str and object_text.isascii()):
        object_text = required_str(obj, "object_text")
    if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
        confidence = optional_confidence(obj, "confidence")  # turns ints to float, or explains
    if spans is not None and type(spans) is not bool:
        spans = optional_bool(obj, "spans_chunks")
    if relationship_id is not None and not (type(relationship_id) is str and relationship_id.isascii()):
        relationship_id = optional_str(obj, "neo4j_relationship_id")
    if context is not None and not (type(context) is str and context.isascii()):
        context = optional_str(obj, "context")
    if type(rowids) is list:
        rowids = _parse_rowids(rowids, chunks, content_id)
    else:
        rowids = tuple(read_list(obj, "chunk_rowids"))  # null/missing -> (); else raises
    return Relationship(subject, predicate, object_text, confidence, context, rowids, spans, relationship_id)


# --- top level -------------------------------------------------------------------------------


def _check_size(body: bytes | str, max_bytes: int) -> None:
    size = len(body)
    # A str is measured in UTF-8 bytes; its length in characters is a lower bound, so the
    # encode (surrogatepass: lone surrogates must not fail the measurement) is only paid
    # when that bound does not already decide.
    if isinstance(body, str) and size <= max_bytes and not body.isascii():
        size = len(body.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidAnswer(f"answer is {size} bytes, over the {max_bytes}-byte limit")


def _decode(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise InvalidAnswer(
            f"answer is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:  # UnicodeDecodeError, over-long integer literals
        raise InvalidAnswer(f"answer is not JSON: {one_line(str(exc), 160)}") from None
    except RecursionError:
        # The C decoder recurses per nesting level; a hostile "[[[[..." must not escape as
        # a RecursionError that the worker would mistake for a bug of its own.
        raise InvalidAnswer("answer is not JSON: nested too deeply") from None


def _service_error(answer: dict) -> str:
    """The service's own explanation of a failure, clipped to one short line."""
    for key in ("error", "message"):
        value = answer.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            return one_line(value, _SERVICE_TEXT_LIMIT)
        try:
            rendered = json.dumps(value, ensure_ascii=False)
        except (ValueError, RecursionError):
            rendered = quote(value)
        return one_line(rendered, _SERVICE_TEXT_LIMIT)
    return "no error given"


def _check_header(answer: dict, content_id: int) -> None:
    success = answer.get("success")
    if success is not True:
        if success is False:
            raise FieldProblem(".success", f"is false: {_service_error(answer)}")
        if "success" not in answer:
            raise FieldProblem(".success", "is missing")
        raise FieldProblem(".success", f"must be true, got {quote(success)}")
    if "content_id" not in answer:
        raise FieldProblem(".content_id", f"is missing, expected {content_id}")
    answered = answer["content_id"]
    if type(answered) is not int:
        raise FieldProblem(".content_id", f"must be an integer, got {json_kind(answered)}")
    # An answer for another document (a mixed-up response) must never be written to this one.
    if answered != content_id:
        raise FieldProblem(".content_id", f"is {quote(answered)}, expected {content_id}")


def parse_answer(
    body: bytes | str,
    *,
    content_id: int,
    chunk_rowids: Collection[int],
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_items: int = DEFAULT_MAX_ITEMS,
) -> IngestResult:
    """Validate the service's answer for `content_id` whose chunks are `chunk_rowids`.

    Raises InvalidAnswer with one line naming the JSON path at fault.
    """
    _check_size(body, max_bytes)
    answer = _decode(body)
    if type(answer) is not dict:
        raise InvalidAnswer(f"answer must be a JSON object, got {json_kind(answer)}")
    try:
        return _parse_object(answer, content_id, chunk_rowids, max_items)
    except FieldProblem as problem:
        raise InvalidAnswer(f"answer{problem.path} {problem.complaint}") from None


def _parse_object(
    answer: dict, content_id: int, chunk_rowids: Collection[int], max_items: int
) -> IngestResult:
    _check_header(answer, content_id)
    neo4j_document_id = optional_str(answer, "neo4j_document_id")
    raw_entities = read_list(answer, "entities")
    raw_relationships = read_list(answer, "relationships")
    items = len(raw_entities) + len(raw_relationships)
    if items > max_items:
        raise InvalidAnswer(
            f"answer has {items} entities and relationships, over the limit of {max_items}"
        )
    entities_extracted = read_count(answer, "entities_extracted", len(raw_entities))
    relationships_extracted = read_count(answer, "relationships_extracted", len(raw_relationships))
    # Set membership keeps the per-rowid check O(1) whatever collection the caller passed.
    chunks = chunk_rowids if isinstance(chunk_rowids, (set, frozenset)) else frozenset(chunk_rowids)
    entities = in_field("entities", parse_each, raw_entities, _parse_entity, chunks, content_id)
    relationships = in_field(
        "relationships", parse_each, raw_relationships, _parse_relationship, chunks, content_id
    )
    return IngestResult(
        content_id=content_id,
        neo4j_document_id=neo4j_document_id,
        entities=entities,
        relationships=relationships,
        entities_extracted=entities_extracted,
        relationships_extracted=relationships_extracted,
    )
