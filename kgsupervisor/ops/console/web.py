"""What the console's pages do alike: the banner, rendering a page, reading a form's numbers,
and recording an action (audit log, log line, flash message)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import flash, redirect, render_template
from werkzeug.wrappers import Response

from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.console.security import who
from kgsupervisor.ops.console.state import conn, now, state
from kgsupervisor.queue import audit, browse, control
from kgsupervisor.queue.leased import INT64_MAX
from kgsupervisor.states import SupervisorState

log = logging.getLogger("kgsupervisor.console")

FILTER_FIELDS = ("status", "error", "endpoint", "since", "until", "content_id", "url")


def local_snapshot() -> dict[str, Any] | None:
    """The local supervisor's snapshot (inside `run`), or None."""
    pool = state().pool
    return pool.snapshot() if pool is not None else None


def banner(snapshot: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the banner says: the pause in force (every host), whether this supervisor drains."""
    if snapshot is None:
        snapshot = local_snapshot()
    extra = (snapshot or {}).get("extra") or {}
    return {"paused": control.paused_state(conn()),
            "draining": extra.get("state") == SupervisorState.STOPPING.value}


def page(template: str, **values: Any) -> str:
    """A full page: the banner and the values the template shows."""
    values.setdefault("banner", banner())
    return render_template(template, **values)


def chosen_filter(fields: Mapping[str, str]) -> browse.DocumentFilter:
    """The documents filter the form's fields ask for; a bad one is a 400 of one line."""
    return browse.DocumentFilter.from_query({name: fields.get(name, "") for name in FILTER_FIELDS}, now())


def whole_number(fields: Mapping[str, str], name: str, expected: str, required: bool = True) -> int | None:
    """A form field holding a queue id; a ConfigError (400) for anything else."""
    text = (fields.get(name) or "").strip()
    if not text and not required:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > INT64_MAX:
        raise ConfigError(name, text[:40], expected)
    return int(text)


def describe_filter(chosen: browse.DocumentFilter) -> str:
    """The filter as the audit log says it: `status=failed error=timeout`, or `every row`."""
    return " ".join(f"{name}={value}" for name, value in chosen.query_args().items()) or "every row"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def record(action: str, detail: str | None, rows: int | None, message: str | None) -> None:
    """An action done: into the audit log (same database), one log line, a flash for the page."""
    actor = who()
    audit.record_action(conn(), actor, action, detail, rows, now())
    shown = " ".join(detail.split())[:300] if detail else ""  # one line: a form's text may hold line breaks
    log.info("console: %s %s%s%s", actor, action, f" ({shown})" if shown else "",
             "" if rows is None else f": {plural(rows, 'row')}")
    if message:
        flash(message)


def back_to(location: str) -> Response:
    """After a POST, the page to show (303: the browser GETs it)."""
    return redirect(location, code=303)
