"""The operator console as a Flask app: create_app() wires the guard, the pages and the error pages.

Flask with Jinja2 templates, served by waitress (threads, nothing to carry across a fork; our
data path is synchronous sqlite3/psycopg). Every database value reaches the page through Jinja's
autoescape; no page holds inline script or style (the CSP forbids both)."""
from __future__ import annotations

import logging

from flask import Flask, render_template
from werkzeug.exceptions import HTTPException

from kgsupervisor.errors import ConfigError, DatabaseError, KGSupervisorError
from kgsupervisor.masking import hide_credentials
from kgsupervisor.ops.console import (formats, security, views_auth, views_documents, views_overview,
                                      views_pages)
from kgsupervisor.ops.console.samples import Fetch
from kgsupervisor.ops.console.state import ConsoleState, state
from kgsupervisor.ops.console.settings import ConsoleSettings
from kgsupervisor.store import backend

log = logging.getLogger("kgsupervisor.console")


def create_app(settings: ConsoleSettings, fetch: Fetch | None = None) -> Flask:
    """The console for `settings`; `fetch` asks the local supervisor for its snapshot (in `run`)."""
    app = Flask(__name__)
    app.extensions["kgsupervisor"] = ConsoleState(settings, fetch)
    security.install(app, settings)
    formats.install(app)
    for views in (views_overview, views_documents, views_pages, views_auth):
        app.register_blueprint(views.blueprint)
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)
    return app


def error_page(status: int, line: str) -> tuple[str, int]:
    """A page of one line, with the status it deserves."""
    return render_template("error.html", status=status, line=line), status


def http_error(exc: HTTPException) -> tuple[str, int]:
    """404, 405, 403 ... : one line (the description a view or the guard gave)."""
    status = exc.code or 500
    line = exc.description if status != 404 or "requested URL" not in (exc.description or "") \
        else "no such page"
    return error_page(status, line)


def unexpected_error(exc: Exception) -> tuple[str, int]:
    """A bad value is 400, a database that refuses 503, both one line; a bug 500, logged."""
    if isinstance(exc, ConfigError):
        return error_page(400, str(exc))
    if backend.is_driver_error(exc) or isinstance(exc, DatabaseError):
        state().connections.drop()
        return error_page(503, database_line(exc))
    if isinstance(exc, KGSupervisorError):
        return error_page(409, str(exc))
    log.error("console: %s failed: %s: %s", _request_line(), type(exc).__name__, hide_credentials(str(exc)),
              exc_info=exc)
    return error_page(500, "the console failed on this request (see the supervisor's log)")


def database_line(exc: BaseException) -> str:
    """One line: which database refused, and why (a password never shown)."""
    if not backend.is_driver_error(exc):
        return str(exc)
    from kgsupervisor.store.faults import describe_database_fault
    target = state().settings.db_target
    return f"database {backend.describe(target)}: {describe_database_fault(exc)}"


def _request_line() -> str:
    from flask import request
    return f"{request.method} {request.path}"
