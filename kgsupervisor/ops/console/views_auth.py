"""Login with the operator token, and logout: a session cookie (HttpOnly, SameSite=Strict) that
carries the name typed and a CSRF token; each recorded in the audit log, a failed login logged."""
from __future__ import annotations

import logging
from typing import Any

from flask import Blueprint, flash, request, session, url_for

from kgsupervisor.ops.console import security
from kgsupervisor.ops.console.state import state
from kgsupervisor.ops.console.web import back_to, page, record

log = logging.getLogger("kgsupervisor.console")

blueprint = Blueprint("auth", __name__)


def next_page() -> str:
    """Where to go after the login: a path of this console, never another site."""
    target = request.values.get("next") or ""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("overview.index")
    return target


def login_page(error: str | None = None, status: int = 200) -> tuple[str, int]:
    return page("login.html", banner=None, error=error, next=next_page(),
                has_token=state().settings.token is not None), status


@blueprint.get("/login")
def login() -> Any:
    return login_page()


@blueprint.post("/login")
def login_post() -> Any:
    if not security.token_matches(request.form.get("token")):
        log.warning("console: failed login as %s from %s", security.login_name(request.form.get("name")),
                    request.remote_addr or "?")
        why = ("this console has no operator token: set KG_CONSOLE_TOKEN and restart"
               if state().settings.token is None else "wrong token")
        return login_page(why, 403)
    security.start_login(security.login_name(request.form.get("name")))
    record("login", None, None, f"Logged in as {session['who']}")
    return back_to(next_page())


@blueprint.post("/logout")
def logout() -> Any:
    record("logout", None, None, None)
    security.end_login()
    flash("Logged out")
    return back_to(url_for("overview.index"))
