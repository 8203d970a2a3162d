"""The failures page (failed documents by error class, newest first) and the audit log page."""
from __future__ import annotations

from flask import Blueprint

from kgsupervisor.ops.console.state import conn
from kgsupervisor.ops.console.web import page
from kgsupervisor.queue import audit, browse

blueprint = Blueprint("pages", __name__)

AUDIT_SHOWN = 200


@blueprint.get("/failures")
def failures() -> str:
    return page("failures.html", groups=browse.failure_groups(conn()))


@blueprint.get("/audit")
def audit_log() -> str:
    return page("audit.html", entries=audit.recent_actions(conn(), AUDIT_SHOWN), shown=AUDIT_SHOWN)
