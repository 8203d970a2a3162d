"""Readers for one field of a KG answer: the value, cleaned, or a FieldProblem naming its path."""
from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any, TypeVar

_T = TypeVar("_T")

# Quoted values are clipped so that one bad answer can never turn into a megabyte-long log line
# or queue error column.
_QUOTE_LIMIT = 60
# The largest integer an SQLite INTEGER or a PostgreSQL BIGINT column holds, and the largest
# offset PostgreSQL's INTEGER offset columns hold (offsets are within one chunk: far smaller).
MAX_STORED_INT = 2**63 - 1
MAX_OFFSET = 2**31 - 1


# --- message helpers -------------------------------------------------------------------------


def storable(text: str) -> str:
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


def one_line(text: str, limit: int) -> str:
    """Clip text to one storable line of at most `limit` characters (plus an ellipsis)."""
    text = " ".join(text.splitlines())
    if len(text) > limit:
        text = text[:limit] + "..."
    return storable(text)


def json_kind(value: Any) -> str:
    """Name a decoded JSON value's type in the JSON vocabulary where Python's differs."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def quote(value: Any) -> str:
    """A short, single-line rendering of a value for an error message."""
    if isinstance(value, str):
        shown = repr(value[:_QUOTE_LIMIT])
        return one_line(shown, _QUOTE_LIMIT + 20) + ("..." if len(value) > _QUOTE_LIMIT else "")
    # Containers are described, not rendered: rendering could be huge or deeply nested.
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return one_line(repr(value), _QUOTE_LIMIT)


# --- field readers ---------------------------------------------------------------------------
# Below the top level, faults raise FieldProblem with a path relative to the object being read;
# each enclosing loop prepends its own step as the exception unwinds. The happy path thus
# never formats a path, which matters with 100,000 entities.


class FieldProblem(Exception):
    """A fault at `path`, relative (".text", "[3].vector_rowid"); parse_answer makes it an InvalidAnswer."""

    def __init__(self, path: str, complaint: str) -> None:
        super().__init__(path, complaint)
        self.path = path
        self.complaint = complaint


def read_object(value: Any) -> dict:
    """The value itself, if it is a JSON object."""
    if type(value) is not dict:
        raise FieldProblem("", f"must be an object, got {json_kind(value)}")
    return value


def read_list(obj: dict, key: str) -> list:
    """The list under `key`; absent or null is an empty list."""
    # An absent or null list means "none found", which services commonly omit.
    value = obj.get(key)
    if value is None:
        return []
    if type(value) is not list:
        raise FieldProblem(f".{key}", f"must be a list, got {json_kind(value)}")
    return value


def required_str(obj: dict, key: str) -> str:
    """The string under `key`, made storable; it must be there."""
    # Empty strings are valid: the real service's model allows them and the upstream writes them.
    value = obj.get(key)
    if type(value) is str:
        return value if value.isascii() else storable(value)
    if key not in obj:
        raise FieldProblem(f".{key}", "is missing")
    raise FieldProblem(f".{key}", f"must be a string, got {json_kind(value)}")


def optional_str(obj: dict, key: str) -> str | None:
    """The string under `key`, made storable, or None."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise FieldProblem(f".{key}", f"must be a string or null, got {json_kind(value)}")
    return value if value.isascii() else storable(value)


def optional_confidence(obj: dict, key: str) -> float | None:
    """The number from 0 to 1 under `key`, as a float, or None."""
    value = obj.get(key)
    if value is None:
        return None
    # type() rather than isinstance(): bool is an int subclass but never a confidence.
    if type(value) is not float and type(value) is not int:
        raise FieldProblem(f".{key}", f"must be a number or null, got {json_kind(value)}")
    number = float(value)
    # Python's json accepts NaN/Infinity (and 1e999 overflows to inf); SQLite would store junk.
    if not math.isfinite(number):
        raise FieldProblem(f".{key}", f"is {quote(value)}, must be finite")
    if not 0.0 <= number <= 1.0:
        raise FieldProblem(f".{key}", f"is {quote(value)}, must be from 0 to 1")
    return number


def optional_bool(obj: dict, key: str) -> bool | None:
    """The true or false under `key`, or None."""
    value = obj.get(key)
    if value is None or type(value) is bool:
        return value
    raise FieldProblem(f".{key}", f"must be true, false or null, got {json_kind(value)}")


def optional_offset(obj: dict, key: str) -> int | None:
    """The character offset under `key` (0 to 2**31-1), or None."""
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not int:
        raise FieldProblem(f".{key}", f"must be an integer or null, got {json_kind(value)}")
    if not 0 <= value <= MAX_OFFSET:
        raise FieldProblem(f".{key}", f"is {quote(value)}, must be from 0 to 2**31-1")
    return value


def read_count(obj: dict, key: str, default: int) -> int:
    """The service's own tally under `key` (0 to 2**63-1), or `default`."""
    # The service's own tallies are informational; they may legitimately differ from the
    # lists (deduplication, filtering), so only their shape is checked.
    value = obj.get(key)
    if value is None:
        return default
    if type(value) is not int:
        raise FieldProblem(f".{key}", f"must be an integer or null, got {json_kind(value)}")
    if not 0 <= value <= MAX_STORED_INT:
        raise FieldProblem(f".{key}", f"is {quote(value)}, must be from 0 to 2**63-1")
    return value


def read_chunk_rowid(value: Any, chunks: Collection[int], content_id: int) -> int:
    """The value, if it is the rowid of one of the document's chunks."""
    if type(value) is not int:
        raise FieldProblem("", f"must be an integer, got {json_kind(value)}")
    # A rowid outside the document would attach entities to some other document's chunk.
    if value not in chunks:
        raise FieldProblem("", f"{quote(value)} is not a chunk of document {content_id}")
    return value


def parse_each(items: list, parse_one: Callable[..., _T], *context: Any) -> tuple[_T, ...]:
    """Parse every item, naming the failing item's index in the path if one is bad."""
    parsed: list[_T] = []
    append = parsed.append
    try:
        for item in items:
            append(parse_one(item, *context))
    except FieldProblem as problem:
        problem.path = f"[{len(parsed)}]{problem.path}"  # len(parsed) is the failing index
        raise
    return tuple(parsed)


def in_field(key: str, parse: Callable[..., _T], *args: Any) -> _T:
    """Run a parse for the value under `key`, prefixing its faults with that key."""
    try:
        return parse(*args)
    except FieldProblem as problem:
        problem.path = f".{key}{problem.path}"
        raise

