"""Parse and validate the KG service's answer to an ingest into an IngestResult."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar

from kgsupervisor.errors import InvalidAnswer

_T = TypeVar("_T")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_ITEMS = 200_000

# Quoted values and the service's own error text are clipped so that one bad answer can
# never turn into a megabyte-long log line or queue error column.
_QUOTE_LIMIT = 60
# The largest integer an SQLite INTEGER or a PostgreSQL BIGINT column holds, and the largest
# offset PostgreSQL's INTEGER offset columns hold (offsets are within one chunk: far smaller).
MAX_STORED_INT = 2**63 - 1
MAX_OFFSET = 2**31 - 1
_SERVICE_TEXT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Appearance:
    """One place (a chunk, optionally a character span in it) where an entity occurs."""

    vector_rowid: int
    offset_start: int | None
    offset_end: int | None


@dataclass(frozen=True, slots=True)
class Entity:
    """An entity the service extracted, with every chunk it appears in."""

    text: str
    normalized: str
    type_primary: str | None
    type_sub1: str | None
    type_sub2: str | None
    type_sub3: str | None
    confidence: float | None
    appearances: tuple[Appearance, ...]
    spans_multiple_chunks: bool | None = None  # as the service said; None: it did not say


@dataclass(frozen=True, slots=True)
class Relationship:
    """A subject-predicate-object triple, with the chunks it was found in."""

    subject_text: str
    predicate: str
    object_text: str
    confidence: float | None
    context: str | None
    chunk_rowids: tuple[int, ...]
    # The service's meaning: subject and object share no chunk. None: the service did not say.
    spans_chunks: bool | None = None
    neo4j_relationship_id: str | None = None


@dataclass(frozen=True, slots=True)
class IngestResult:
    """A validated answer: everything the write-back needs and nothing it must re-check."""

    content_id: int
    neo4j_document_id: str | None
    entities: tuple[Entity, ...]
    relationships: tuple[Relationship, ...]
    entities_extracted: int
    relationships_extracted: int

    def summary(self) -> dict:
        """Counts for logs and stats; entity_rows is what the write-back will insert."""
        return {
            "neo4j_document_id": self.neo4j_document_id,
            "entities": len(self.entities),
            "entity_rows": sum(len(entity.appearances) for entity in self.entities),
            "relationships": len(self.relationships),
            "entities_extracted": self.entities_extracted,
            "relationships_extracted": self.relationships_extracted,
        }


# --- message helpers -------------------------------------------------------------------------


def _storable(text: str) -> str:
    """Return text that SQLite can bind as UTF-8.

    JSON may carry lone surrogates ("\\ud800"), which decode to a str that cannot be encoded;
    they are replaced rather than failing the whole document at write-back time.
    """
    if text.isascii():  # the common case, and always valid UTF-8
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text


def _one_line(text: str, limit: int) -> str:
    """Clip text to one storable line of at most `limit` characters (plus an ellipsis)."""
    text = " ".join(text.splitlines())
    if len(text) > limit:
        text = text[:limit] + "..."
    return _storable(text)


def _kind(value: Any) -> str:
    """Name a decoded JSON value's type in the JSON vocabulary where Python's differs."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _quote(value: Any) -> str:
    """A short, single-line rendering of a value for an error message."""
    if isinstance(value, str):
        shown = repr(value[:_QUOTE_LIMIT])
        return _one_line(shown, _QUOTE_LIMIT + 20) + ("..." if len(value) > _QUOTE_LIMIT else "")
    # Containers are described, not rendered: rendering could be huge or deeply nested.
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return _one_line(repr(value), _QUOTE_LIMIT)


# --- field readers ---------------------------------------------------------------------------
# Below the top level, faults raise _Problem with a path relative to the object being read;
# each enclosing loop prepends its own step as the exception unwinds. The happy path thus
# never formats a path, which matters with 100,000 entities.


class _Problem(Exception):
    """A fault at `path` (relative, e.g. ".text" or "[3].vector_rowid"); never escapes."""

    def __init__(self, path: str, complaint: str) -> None:
        super().__init__(path, complaint)
        self.path = path
        self.complaint = complaint


def _object(value: Any) -> dict:
    if type(value) is not dict:
        raise _Problem("", f"must be an object, got {_kind(value)}")
    return value


def _list(obj: dict, key: str) -> list:
    # An absent or null list means "none found", which services commonly omit.
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is not list:
        raise _Problem(f".{key}", f"must be a list, got {_kind(value)}")
    return value


def _required_str(obj: dict, key: str) -> str:
    # Empty strings are valid: the real service's model allows them and the upstream writes them.
    value = obj.get(key)
    if type(value) is str:
        return value if value.isascii() else _storable(value)
    if key not in obj:
        raise _Problem(f".{key}", "is missing")
    raise _Problem(f".{key}", f"must be a string, got {_kind(value)}")


def _optional_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise _Problem(f".{key}", f"must be a string or null, got {_kind(value)}")
    return value if value.isascii() else _storable(value)


def _optional_confidence(obj: dict, key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    # type() rather than isinstance(): bool is an int subclass but never a confidence.
    if type(value) is not float and type(value) is not int:
        raise _Problem(f".{key}", f"must be a number or null, got {_kind(value)}")
    number = float(value)
    # Python's json accepts NaN/Infinity (and 1e999 overflows to inf); SQLite would store junk.
    if not math.isfinite(number):
        raise _Problem(f".{key}", f"is {_quote(value)}, must be finite")
    if not 0.0 <= number <= 1.0:
        raise _Problem(f".{key}", f"is {_quote(value)}, must be from 0 to 1")
    return number


def _optional_bool(obj: dict, key: str) -> bool | None:
    value = obj.get(key)
    if value is None or type(value) is bool:
        return value
    raise _Problem(f".{key}", f"must be true, false or null, got {_kind(value)}")


def _optional_offset(obj: dict, key: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise _Problem(f".{key}", f"must be an integer or null, got {_kind(value)}")
    if not 0 <= value <= MAX_OFFSET:
        raise _Problem(f".{key}", f"is {_quote(value)}, must be from 0 to 2**31-1")
    return value


def _count(obj: dict, key: str, default: int) -> int:
    # The service's own tallies are informational; they may legitimately differ from the
    # lists (deduplication, filtering), so only their shape is checked.
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise _Problem(f".{key}", f"must be an integer or null, got {_kind(value)}")
    if not 0 <= value <= MAX_STORED_INT:
        raise _Problem(f".{key}", f"is {_quote(value)}, must be from 0 to 2**63-1")
    return value


def _chunk_rowid(value: Any, chunks: Collection[int], content_id: int) -> int:
    if type(value) is not int:
        raise _Problem("", f"must be an integer, got {_kind(value)}")
    # A rowid outside the document would attach entities to some other document's chunk.
    if value not in chunks:
        raise _Problem("", f"{_quote(value)} is not a chunk of document {content_id}")
    return value


def _each(items: list, parse_one: Callable[..., _T], *context: Any) -> tuple[_T, ...]:
    """Parse every item, naming the failing item's index in the path if one is bad."""
    parsed: list[_T] = []
    append = parsed.append
    try:
        for item in items:
            append(parse_one(item, *context))
    except _Problem as problem:
        problem.path = f"[{len(parsed)}]{problem.path}"  # len(parsed) is the failing index
        raise
    return tuple(parsed)


def _in_field(key: str, parse: Callable[..., _T], *args: Any) -> _T:
    """Run a parse for the value under `key`, prefixing its faults with that key."""
    try:
        return parse(*args)
    except _Problem as problem:
        problem.path = f".{key}{problem.path}"
        raise


# --- items -----------------------------------------------------------------------------------
# Each item is first checked inline for the ordinary case (plain values of the right types);
# anything else goes through the field readers above, which either accept it (after cleaning)
# or explain what is wrong. Function calls per field would otherwise dominate the run time.


def _parse_appearance(raw: Any, chunks: Collection[int], content_id: int) -> Appearance:
    obj = _object(raw)
    if "vector_rowid" not in obj:
        raise _Problem(".vector_rowid", "is missing")
    rowid = _in_field("vector_rowid", _chunk_rowid, obj["vector_rowid"], chunks, content_id)
    start = _optional_offset(obj, "offset_start")
    end = _optional_offset(obj, "offset_end")
    if start is not None and end is not None and start > end:
        raise _Problem(".offset_start", f"{_quote(start)} is after offset_end {_quote(end)}")
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
        except _Problem as problem:
            problem.path = f".chunk_appearances[{len(parsed)}]{problem.path}"
            raise
    return tuple(parsed)


def _parse_rowids(items: list, chunks: Collection[int], content_id: int) -> tuple[int, ...]:
    for index, rowid in enumerate(items):
        # type() check first: True == 1, so a bool would otherwise pass the membership test.
        if type(rowid) is not int or rowid not in chunks:
            _in_field(f"chunk_rowids[{index}]", _chunk_rowid, rowid, chunks, content_id)
    return tuple(items)


def _parse_entity(raw: Any, chunks: Collection[int], content_id: int) -> Entity:
    obj = _object(raw)
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
        text = _required_str(obj, "text")
    if normalized is not None and not (type(normalized) is str and normalized.isascii()):
        normalized = _optional_str(obj, "normalized")
    if type_primary is not None and not (type(type_primary) is str and type_primary.isascii()):
        type_primary = _optional_str(obj, "type_primary")
    if type_sub1 is not None and not (type(type_sub1) is str and type_sub1.isascii()):
        type_sub1 = _optional_str(obj, "type_sub1")
    if type_sub2 is not None and not (type(type_sub2) is str and type_sub2.isascii()):
        type_sub2 = _optional_str(obj, "type_sub2")
    if type_sub3 is not None and not (type(type_sub3) is str and type_sub3.isascii()):
        type_sub3 = _optional_str(obj, "type_sub3")
    if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
        confidence = _optional_confidence(obj, "confidence")  # turns ints to float, or explains
    if spans is not None and type(spans) is not bool:
        spans = _optional_bool(obj, "spans_multiple_chunks")
    if type(appearances) is list:
        appearances = _parse_appearances(appearances, chunks, content_id)
    else:
        appearances = tuple(_list(obj, "chunk_appearances"))  # null/missing -> (); else raises
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
    obj = _object(raw)
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
        subject = _required_str(obj, "subject_text")
    if not (type(predicate) is str and predicate.isascii()):
        predicate = _required_str(obj, "predicate")
    if not (type(object_text) is str and object_text.isascii()):
        object_text = _required_str(obj, "object_text")
    if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
        confidence = _optional_confidence(obj, "confidence")  # turns ints to float, or explains
    if spans is not None and type(spans) is not bool:
        spans = _optional_bool(obj, "spans_chunks")
    if relationship_id is not None and not (type(relationship_id) is str and relationship_id.isascii()):
        relationship_id = _optional_str(obj, "neo4j_relationship_id")
    if context is not None and not (type(context) is str and context.isascii()):
        context = _optional_str(obj, "context")
    if type(rowids) is list:
        rowids = _parse_rowids(rowids, chunks, content_id)
    else:
        rowids = tuple(_list(obj, "chunk_rowids"))  # null/missing -> (); else raises
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
        raise InvalidAnswer(f"answer is not JSON: {_one_line(str(exc), 160)}") from None
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
            return _one_line(value, _SERVICE_TEXT_LIMIT)
        try:
            rendered = json.dumps(value, ensure_ascii=False)
        except (ValueError, RecursionError):
            rendered = _quote(value)
        return _one_line(rendered, _SERVICE_TEXT_LIMIT)
    return "no error given"


def _check_header(answer: dict, content_id: int) -> None:
    success = answer.get("success")
    if success is not True:
        if success is False:
            raise _Problem(".success", f"is false: {_service_error(answer)}")
        if "success" not in answer:
            raise _Problem(".success", "is missing")
        raise _Problem(".success", f"must be true, got {_quote(success)}")
    if "content_id" not in answer:
        raise _Problem(".content_id", f"is missing, expected {content_id}")
    answered = answer["content_id"]
    if type(answered) is not int:
        raise _Problem(".content_id", f"must be an integer, got {_kind(answered)}")
    # An answer for another document (a mixed-up response) must never be written to this one.
    if answered != content_id:
        raise _Problem(".content_id", f"is {_quote(answered)}, expected {content_id}")


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
        raise InvalidAnswer(f"answer must be a JSON object, got {_kind(answer)}")
    try:
        return _parse_object(answer, content_id, chunk_rowids, max_items)
    except _Problem as problem:
        raise InvalidAnswer(f"answer{problem.path} {problem.complaint}") from None


def _parse_object(
    answer: dict, content_id: int, chunk_rowids: Collection[int], max_items: int
) -> IngestResult:
    _check_header(answer, content_id)
    neo4j_document_id = _optional_str(answer, "neo4j_document_id")
    raw_entities = _list(answer, "entities")
    raw_relationships = _list(answer, "relationships")
    items = len(raw_entities) + len(raw_relationships)
    if items > max_items:
        raise InvalidAnswer(
            f"answer has {items} entities and relationships, over the limit of {max_items}"
        )
    entities_extracted = _count(answer, "entities_extracted", len(raw_entities))
    relationships_extracted = _count(answer, "relationships_extracted", len(raw_relationships))
    # Set membership keeps the per-rowid check O(1) whatever collection the caller passed.
    chunks = chunk_rowids if isinstance(chunk_rowids, (set, frozenset)) else frozenset(chunk_rowids)
    entities = _in_field("entities", _each, raw_entities, _parse_entity, chunks, content_id)
    relationships = _in_field(
        "relationships", _each, raw_relationships, _parse_relationship, chunks, content_id
    )
    return IngestResult(
        content_id=content_id,
        neo4j_document_id=neo4j_document_id,
        entities=entities,
        relationships=relationships,
        entities_extracted=entities_extracted,
        relationships_extracted=relationships_extracted,
    )
