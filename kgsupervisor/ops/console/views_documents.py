"""The documents page (a filter, keyset pages), a bulk retry or fail of every row a filter takes
after a confirmation showing the exact count, one document's page, and its retry."""
from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from flask import Blueprint, abort, request, url_for

from kgsupervisor.errors import ConfigError
from kgsupervisor.ops.console.state import conn
from kgsupervisor.ops.console.web import (FILTER_FIELDS, back_to, chosen_filter, describe_filter, page,
                                          record, whole_number)
from kgsupervisor.queue import browse
from kgsupervisor.queue.control import MAX_REASON
from kgsupervisor.queue.leased import queue_for

blueprint = Blueprint("documents", __name__)

ACTIONS = {"retry": ("retry-matching", "Retried"), "fail": ("fail-matching", "Failed")}
LIVE = ("pending", "processing")
RETRYABLE = ("failed", "skipped")


def documents_url(chosen: browse.DocumentFilter, **more: Any) -> str:
    """The documents page of `chosen` (and `more`, e.g. before=N)."""
    args = {**chosen.query_args(), **{k: str(v) for k, v in more.items()}}
    return url_for("documents.documents") + (f"?{urlencode(args)}" if args else "")


@blueprint.get("/documents")
def documents() -> str:
    chosen = chosen_filter(request.args)
    before = whole_number(request.args, "before", "a queue id (a whole number)", required=False)
    found = browse.documents_page(conn(), chosen, before=before)
    next_url = documents_url(chosen, before=found.next_before) if found.next_before is not None else None
    return page("documents.html", form={name: request.args.get(name, "") for name in FILTER_FIELDS},
                chosen=chosen, hidden=chosen.query_args(), found=found, next_url=next_url,
                statuses=browse.STATUSES)


def chosen_action() -> str:
    action = request.form.get("action", "")
    if action not in ACTIONS:
        raise ConfigError("action", action[:40], "retry or fail")
    return action


@blueprint.post("/documents/confirm")
def confirm() -> str:
    """How many rows the action would change now, and the form that changes exactly those."""
    action = chosen_action()
    chosen = chosen_filter(request.form)
    db = conn()
    upto_id = browse.max_queue_id(db)
    count = browse.count_matching(db, chosen, action, upto_id)
    return page("confirm.html", action=action, count=count, upto_id=upto_id, hidden=chosen.query_args(),
                described=describe_filter(chosen), cancel_url=documents_url(chosen), max_reason=MAX_REASON)


@blueprint.post("/documents/bulk")
def bulk() -> Any:
    """Retry or fail the rows the filter takes up to the confirmation's newest queue id."""
    action = chosen_action()
    chosen = chosen_filter(request.form)
    upto_id = whole_number(request.form, "upto_id", "the queue id the confirmation counted up to")
    queue = queue_for(conn())
    if action == "retry":
        rows = browse.retry_matching(queue, chosen, upto_id)
        detail = f"{describe_filter(chosen)} upto_id={upto_id}"
    else:
        reason = " ".join(request.form.get("reason", "").split())
        if len(reason) > MAX_REASON:
            raise ConfigError("reason", f"{reason[:40]}...", f"at most {MAX_REASON} characters")
        rows = browse.fail_matching(queue, chosen, upto_id, reason)
        detail = f"{describe_filter(chosen)} upto_id={upto_id}" + (f" reason: {reason}" if reason else "")
    audit_name, verb = ACTIONS[action]
    record(audit_name, detail, rows, f"{verb} {rows} document{'' if rows == 1 else 's'}")
    return back_to(documents_url(chosen))


# -- one document ----------------------------------------------------------------------------------

def retryable_row(detail: browse.DocumentDetail) -> int | None:
    """The queue row a retry puts back: the newest, when it failed or was skipped and no row of
    the document is live."""
    rows = sorted(detail.queue_rows, key=lambda r: r.get("id") or 0)
    if not rows or any(r.get("status") in LIVE for r in rows) or rows[-1].get("status") not in RETRYABLE:
        return None
    return rows[-1]["id"]


def detail_of(content_id: int) -> browse.DocumentDetail:
    detail = browse.document_detail(conn(), content_id)
    if detail is None:
        abort(404, description=f"no document with content id {content_id} (nor a queue row of it)")
    return detail


@blueprint.get("/document/<int:content_id>")
def document(content_id: int) -> str:
    detail = detail_of(content_id)
    return page("document.html", doc=detail, retry_queue_id=retryable_row(detail))


@blueprint.post("/document/<int:content_id>/retry")
def retry(content_id: int) -> Any:
    detail = detail_of(content_id)
    queue_id = whole_number(request.form, "queue_id", "a queue id of this document")
    if queue_id not in {r.get("id") for r in detail.queue_rows}:
        raise ConfigError("queue_id", queue_id, f"a queue row of content id {content_id}")
    rows = browse.retry_document(queue_for(conn()), queue_id)
    message = ("Retried 1 document" if rows else
               f"Nothing retried: queue row {queue_id} is no longer failed or skipped, "
               "or a newer row is live")
    record("retry", f"content_id={content_id} queue_id={queue_id}", rows, message)
    return back_to(url_for("documents.document", content_id=content_id))
