"""The documents filter of the operator console: read from the form's fields (hostile input:
bounded, one-line errors), written back as the fields of a link, and spelled as SQL (parameters
only, the LIKE wildcards of the user's text escaped) on SQLite and PostgreSQL."""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from kgsupervisor.errors import ConfigError
from kgsupervisor.queue.inspection import DURATION, parse_duration
from kgsupervisor.queue.leased import INT64_MAX, INT64_MIN
from kgsupervisor.queue.sql import db_timestamp, marks
from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.owntables import ATTEMPTS_TABLE

STATUSES = ("pending", "processing", "completed", "failed", "skipped")
MAX_TEXT = 500  # characters of a text field: a search, not a document
TIME_FORM = "a duration like 90s, 15m, 2h or 7d, or a UTC date like 2026-11-30 or 2026-11-30T12:00"
WHOLE_NUMBER = re.compile(r"-?[0-9]{1,19}")


def _given(value: str | None) -> str | None:
    """A form field's text, None when it is empty or blank."""
    return value.strip() if value is not None and value.strip() else None


def _status_field(value: str | None) -> str | None:
    text = _given(value)
    if text is not None and text not in STATUSES:
        raise ConfigError("status", text[:40], f"one of {', '.join(STATUSES)}")
    return text


def _text_field(name: str, value: str | None) -> str | None:
    """A substring to search for: hostile, so bounded and without NUL (PostgreSQL text has none)."""
    text = _given(value)
    if text is not None and len(text) > MAX_TEXT:
        raise ConfigError(name, text[:40] + "...", f"at most {MAX_TEXT} characters")
    if text is not None and "\x00" in text:
        raise ConfigError(name, text[:40], "text without NUL characters")
    return text


def _content_id_field(value: str | None) -> int | None:
    text = _given(value)
    if text is None:
        return None
    if not WHOLE_NUMBER.fullmatch(text) or not INT64_MIN <= int(text) <= INT64_MAX:
        raise ConfigError("content_id", text[:40], "a whole number (a crawled_content id)")
    return int(text)


def _time_field(name: str, value: str | None, now: float) -> float | None:
    """A time as unix seconds (whole: the database keeps seconds): a duration ago, or an ISO
    date or date and time, UTC unless it says otherwise."""
    text = _given(value)
    if text is None:
        return None
    try:
        if DURATION.fullmatch(text):
            return math.floor(now - parse_duration(name, text))
        moment = datetime.fromisoformat(text)
        return math.floor((moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp())
    except (ConfigError, ValueError, OverflowError):
        raise ConfigError(name, text[:40], TIME_FORM) from None


def _iso(seconds: float | None) -> str | None:
    """Unix seconds as the form writes them back: an ISO date and time, UTC."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


@dataclasses.dataclass(frozen=True)
class DocumentFilter:
    """Which queue rows the documents page shows: those every field set holds for."""

    status: str | None = None        # one of STATUSES
    error: str | None = None         # substring of error_message (any case)
    endpoint: str | None = None      # substring of an attempt's endpoint (the history)
    # unix seconds: the row's last change (processed_at, else queued_at) >= since, < until
    since: float | None = None
    until: float | None = None
    content_id: int | None = None
    url: str | None = None           # substring of crawled_content.url (any case)

    @classmethod
    def from_query(cls, args: Mapping[str, str], now: float) -> DocumentFilter:
        """The filter the form's fields ask for (an empty field is not set); a bad value is a
        one-line ConfigError naming the field."""
        return cls(status=_status_field(args.get("status")), error=_text_field("error", args.get("error")),
                   endpoint=_text_field("endpoint", args.get("endpoint")),
                   since=_time_field("since", args.get("since"), now),
                   until=_time_field("until", args.get("until"), now),
                   content_id=_content_id_field(args.get("content_id")),
                   url=_text_field("url", args.get("url")))

    def query_args(self) -> dict[str, str]:
        """The form fields that ask for this filter again (times as UTC dates: a link to the next
        page keeps the window of the first); unset fields left out."""
        values = {"status": self.status, "error": self.error, "endpoint": self.endpoint,
                  "since": _iso(self.since), "until": _iso(self.until),
                  "content_id": None if self.content_id is None else str(self.content_id), "url": self.url}
        return {name: value for name, value in values.items() if value is not None}

    def is_empty(self) -> bool:
        """Does it take every row?"""
        return all(getattr(self, field.name) is None for field in dataclasses.fields(self))


# -- the filter as SQL ---------------------------------------------------------------------------

def _like(text: str) -> str:
    """A LIKE pattern that finds `text` anywhere, its own wildcards and escapes taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def statuses_of(chosen: DocumentFilter, allowed: tuple[str, ...] | None) -> tuple[str, ...]:
    """The statuses a row must have: the filter's, within those an action changes (`allowed`);
    empty with `allowed` given means no row can match."""
    if chosen.status is not None and chosen.status not in STATUSES:
        raise ConfigError("status", chosen.status, f"one of {', '.join(STATUSES)}")
    if allowed is None:
        return (chosen.status,) if chosen.status else ()
    return tuple(s for s in allowed if chosen.status in (None, s))


def filter_sql(conn: Any, chosen: DocumentFilter, statuses: tuple[str, ...]) -> tuple[str, list[object]]:
    """The WHERE of `chosen` over `kg_processing_queue q`, and its parameters.

    Spelled so that the queue's primary key drives every plan: the status in COALESCE (no status
    index for a range of ids), the document's url and the attempts as scalar subqueries, which
    PostgreSQL cannot turn into a join that reads the whole of the other table.
    """
    like = "ILIKE" if backend_of(conn).name == "postgresql" else "LIKE"  # SQLite's LIKE ignores case
    terms: list[str] = []
    params: list[object] = []
    if statuses:
        terms.append(f"COALESCE(q.status, '') IN ({marks(statuses)})")
        params += statuses
    if chosen.content_id is not None:
        terms.append("q.content_id = ?")
        params.append(chosen.content_id)
    if chosen.error is not None:
        terms.append(f"q.error_message {like} ? ESCAPE '\\'")
        params.append(_like(chosen.error))
    if chosen.url is not None:
        terms.append(f"(SELECT c.url FROM crawled_content c WHERE c.id = q.content_id) {like} ? ESCAPE '\\'")
        params.append(_like(chosen.url))
    if chosen.endpoint is not None:
        terms.append(f"(SELECT 1 FROM {ATTEMPTS_TABLE} a WHERE a.queue_id = q.id "
                     f"AND a.endpoint {like} ? ESCAPE '\\' LIMIT 1) IS NOT NULL")
        params.append(_like(chosen.endpoint))
    for bound, operator in ((chosen.since, ">="), (chosen.until, "<")):
        if bound is not None:
            terms.append(f"COALESCE(q.processed_at, q.queued_at) {operator} ?")
            params.append(db_timestamp(bound))
    return " AND ".join(terms) or "1 = 1", params
