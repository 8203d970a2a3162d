"""The real service's ingest request model, checked as pydantic v2 does, with FastAPI's 422 detail."""
from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

# The real service validates the body with a pydantic v2 model, and FastAPI answers 422 with
# every error found. The wording below is pydantic's, so a client sees what it would see there.

MESSAGES = {
    "missing": "Field required",
    "model_attributes_type": "Input should be a valid dictionary or object to extract fields from",
    "dict_type": "Input should be a valid dictionary",
    "list_type": "Input should be a valid list",
    "int_type": "Input should be a valid integer",
    "int_parsing": "Input should be a valid integer, unable to parse string as an integer",
    "int_parsing_size": "Unable to parse input string as an integer, exceeded maximum size",
    "int_from_float": "Input should be a valid integer, got a number with a fractional part",
    "finite_number": "Input should be a finite number",
    "greater_than": "Input should be greater than {gt}",
    "greater_than_equal": "Input should be greater than or equal to {ge}",
    "string_type": "Input should be a valid string",
    "string_unicode": "Input should be a valid string, unable to parse raw data as a unicode string",
    "string_too_short": "String should have at least {min_length} characters",
    "string_too_long": "String should have at most {max_length} characters",
    "json_invalid": "JSON decode error",
}
# pydantic reads "  +1_000.00 " as 1000 in lax mode, and nothing that is not ASCII digits.
INT_STRING_RE = re.compile(r"[+-]?(\d+(?:_\d+)*)(?:\.0*)?", re.ASCII)
MAX_INT_STRING_DIGITS = 4300  # Python's own int() limit; pydantic refuses longer ones too

_INVALID = object()  # what a check returns after recording its error


class _Errors:
    """FastAPI's `detail` list: one entry per error, in the model's field order."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, loc: tuple, kind: str, value: object, ctx: dict | None = None,
            msg: str | None = None) -> object:
        error = {"type": kind, "loc": list(loc), "msg": msg or MESSAGES[kind].format(**(ctx or {})),
                 "input": value}
        if ctx:
            error["ctx"] = ctx
        self.items.append(error)
        return _INVALID


def error_detail(loc: tuple, kind: str, value: object, ctx: dict | None = None) -> list[dict]:
    """FastAPI's 422 `detail` list holding the one error `kind` at `loc`."""
    errors = _Errors()
    errors.add(loc, kind, value, ctx)
    return errors.items


Check = Callable[[object, tuple, _Errors], object]


class _Field(NamedTuple):
    name: str
    check: Check
    required: bool = True
    # A model validator of the field: (value, fields valid so far) -> None or what is wrong.
    relation: Callable[[Any, dict], str | None] | None = None


def parse_ingest_request(payload: object) -> tuple[dict | None, list[dict]]:
    """Validate a decoded ingest body as the real service's model does.

    Returns (the body with pydantic's lax conversions applied, []) or (None, FastAPI's 422
    `detail` list naming every error).
    """
    errors = _Errors()
    request = _request(payload, ("body",), errors)
    return (None, errors.items) if errors.items else (request, [])


def validate_ingest_request(payload: object) -> list[dict]:
    """FastAPI's 422 `detail` list for an ingest body; empty when the real service accepts it."""
    return parse_ingest_request(payload)[1]


def _integer(*, gt: int | None = None, ge: int | None = None) -> Check:
    def check(value: object, loc: tuple, errors: _Errors) -> object:
        number = _lax_int(value, loc, errors)
        if number is _INVALID:
            return _INVALID
        if gt is not None and not number > gt:
            return errors.add(loc, "greater_than", value, {"gt": gt})
        if ge is not None and not number >= ge:
            return errors.add(loc, "greater_than_equal", value, {"ge": ge})
        return number
    return check


def _lax_int(value: object, loc: tuple, errors: _Errors) -> object:
    """pydantic's lax int: true is 1, 7.0 is 7, " 7 " is 7; 7.5, "x" and null are errors."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return errors.add(loc, "finite_number", value)
        return int(value) if value.is_integer() else errors.add(loc, "int_from_float", value)
    if not isinstance(value, str):
        return errors.add(loc, "int_type", value)
    match = INT_STRING_RE.fullmatch(value.strip())
    if match is None:
        return errors.add(loc, "int_parsing", value)
    if len(match.group(1)) > MAX_INT_STRING_DIGITS:
        return errors.add(loc, "int_parsing_size", value)
    return int(match.group(0).split(".")[0])


def _string(*, min_length: int = 0, max_length: int | None = None) -> Check:
    def check(value: object, loc: tuple, errors: _Errors) -> object:
        if not isinstance(value, str):
            return errors.add(loc, "string_type", value)
        if not _encodable(value):
            return errors.add(loc, "string_unicode", value)
        if len(value) < min_length:
            return errors.add(loc, "string_too_short", value, {"min_length": min_length})
        if max_length is not None and len(value) > max_length:
            return errors.add(loc, "string_too_long", value, {"max_length": max_length})
        return value
    return check


def _encodable(text: str) -> bool:
    # JSON's "\ud800" decodes to a lone surrogate, which no UTF-8 string can hold.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _mapping(value: object, loc: tuple, errors: _Errors) -> object:
    return value if isinstance(value, dict) else errors.add(loc, "dict_type", value)


def _list_of(item: Check) -> Check:
    def check(value: object, loc: tuple, errors: _Errors) -> object:
        if not isinstance(value, list):
            return errors.add(loc, "list_type", value)
        return [item(element, loc + (index,), errors) for index, element in enumerate(value)]
    return check


def _model(fields: tuple[_Field, ...]) -> Check:
    def check(value: object, loc: tuple, errors: _Errors) -> object:
        if not isinstance(value, dict):
            return errors.add(loc, "model_attributes_type", value)
        return _check_fields(value, fields, loc, errors)
    return check


def _check_fields(value: dict, fields: tuple[_Field, ...], loc: tuple, errors: _Errors) -> dict:
    """Check every field in order, recording each error; returns the fields that passed."""
    valid: dict = {}
    for field in fields:
        if field.name not in value:
            if field.required:
                errors.add(loc + (field.name,), "missing", value)
            continue
        checked = field.check(value[field.name], loc + (field.name,), errors)
        if checked is not _INVALID and field.relation is not None:
            problem = field.relation(checked, valid)
            if problem is not None:
                checked = errors.add(loc + (field.name,), "value_error", value[field.name],
                                     {"error": {}}, msg=f"Value error, {problem}")
        if checked is not _INVALID:
            valid[field.name] = checked
    return valid


def _after_char_start(char_end: int, chunk: dict) -> str | None:
    # Only judged when char_start itself was valid, as a pydantic field validator sees it.
    if "char_start" in chunk and char_end <= chunk["char_start"]:
        return "char_end must be greater than char_start"
    return None


CHUNK_FIELDS = (
    _Field("vector_rowid", _integer(gt=0)),
    _Field("chunk_index", _integer(ge=0)),
    _Field("char_start", _integer(ge=0)),
    _Field("char_end", _integer(), relation=_after_char_start),
    _Field("text", _string(min_length=10, max_length=10_000)),
)
REQUEST_FIELDS = (
    _Field("content_id", _integer()),
    _Field("url", _string(max_length=2_048)),
    _Field("title", _string(max_length=500)),
    _Field("markdown", _string(min_length=50, max_length=1_000_000)),
    _Field("chunks", _list_of(_model(CHUNK_FIELDS))),
    _Field("metadata", _mapping, required=False),
)
_request = _model(REQUEST_FIELDS)
