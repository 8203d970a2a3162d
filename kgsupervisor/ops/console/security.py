"""The console's guard: who may read, who may act, and the checks every state-changing request
passes (login, CSRF token, Origin, Host), with the headers every answer carries.

Loopback: reading needs no login, acting needs a login with the operator token. Beyond this
host (a non-loopback bind, or a request a reverse proxy forwarded): every page needs the login.
Every POST carries the session's CSRF token and an Origin (or Referer) of this very console;
on loopback the Host must be a loopback name, so that a DNS-rebound page cannot read or act."""
from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, Response, abort, redirect, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

from kgsupervisor.ops.console.settings import ConsoleSettings, is_loopback
from kgsupervisor.ops.console.state import state

COOKIE_NAME = "kgsupervisor_console"
LOGIN_LIFETIME = timedelta(hours=12)  # a stolen cookie is worth nothing after this
HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                "script-src 'self'; object-src 'none'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
# Any of these says a reverse proxy forwarded the request: it is then treated as from beyond this
# host (login for every page). Their values are never trusted, only their presence.
PROXY_HEADERS = ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Real-IP", "Forwarded")
LOGIN_ENDPOINTS = ("auth.login", "auth.login_post")  # served to anyone, logged in or not
DEFAULT_NAME = "operator"
MAX_NAME = 40


def session_key(token: str | None) -> bytes:
    """Flask's secret key: derived from the token, so a restart keeps logins and a new token
    ends them all; random without a token (nobody can log in then)."""
    if token is None:
        return secrets.token_bytes(32)
    return hmac.new(token.encode(), b"kgsupervisor console session", hashlib.sha256).digest()


class ConsoleSessions(SecureCookieSessionInterface):
    """Flask's signed cookie session, marked Secure when the browser reached us over TLS (a
    TLS-terminating proxy says so in X-Forwarded-Proto)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return seen_scheme() == "https"


def seen_scheme() -> str:
    """The scheme the browser used: ours, or the one a forwarding proxy names."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").strip().lower()
    return forwarded if proxied() and forwarded in ("http", "https") else request.scheme


def proxied() -> bool:
    """Did a reverse proxy forward this request?"""
    return any(name in request.headers for name in PROXY_HEADERS)


def console_settings() -> ConsoleSettings:
    return state().settings


def login_needed_to_read() -> bool:
    """Every page needs a login when the console is reachable beyond this host."""
    return console_settings().beyond_host or proxied()


def logged_in() -> bool:
    return bool(session.get("who"))


def can_act() -> bool:
    """A token is configured and this session logged in with it."""
    return console_settings().token is not None and logged_in()


def who() -> str:
    """Who acts, for the audit log and the log line: the login name and the client address."""
    return f"{session.get('who') or DEFAULT_NAME}@{request.remote_addr or '?'}"


def login_name(typed: str | None) -> str:
    """The name typed at login on one line and bounded, or the default."""
    name = " ".join((typed or "").split())[:MAX_NAME]
    return name or DEFAULT_NAME


def token_matches(typed: str | None) -> bool:
    """The typed token is the operator token (compared in constant time)."""
    token = console_settings().token
    return token is not None and hmac.compare_digest((typed or "").strip().encode(), token.encode())


def csrf_token() -> str:
    """This session's CSRF token, made at its first use."""
    if "csrf" not in session:
        session["csrf"] = secrets.token_urlsafe(32)
    return session["csrf"]


def start_login(name: str) -> None:
    """A fresh session for `name`: a new CSRF token, nothing kept from before the login."""
    session.clear()
    session["who"] = name
    session["csrf"] = secrets.token_urlsafe(32)


def end_login() -> None:
    """Forget the login; a new CSRF token for the pages still open."""
    session.clear()
    session["csrf"] = secrets.token_urlsafe(32)


def _without_default_port(scheme: str, netloc: str) -> str:
    default = {"http": ":80", "https": ":443"}.get(scheme, "")
    netloc = netloc.lower()
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def _origin_of_request() -> str | None:
    """The Origin header, or the origin of the Referer when a browser sent none."""
    origin = request.headers.get("Origin")
    if origin is None and request.referrer:
        parts = urlsplit(request.referrer)
        origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
    return origin


def same_origin() -> bool:
    """The request comes from a page of this console: its Origin is our scheme://Host."""
    origin = _origin_of_request()
    if not origin or origin == "null":
        return False
    parts = urlsplit(origin)
    own = _without_default_port(seen_scheme(), request.host)
    return parts.scheme == seen_scheme() and _without_default_port(parts.scheme, parts.netloc) == own


def host_name(host_header: str) -> str:
    """The host part of a Host header: `[::1]:9188` -> `::1`, `localhost:80` -> `localhost`."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    return host_header.rpartition(":")[0] if host_header.count(":") == 1 else host_header


def host_is_ours() -> bool:
    """On a loopback bind, a direct request names a loopback host: a page whose name was rebound
    to 127.0.0.1 (DNS rebinding) names its own. Beyond this host a login guards every page."""
    if login_needed_to_read():
        return True
    name = host_name(request.host).lower()
    return is_loopback(name) or name == console_settings().bind_host.lower()


def refuse(status: int, line: str) -> None:
    """Stop this request: the error page says `line`."""
    abort(status, description=line)


def check_request() -> Any:
    """before_request: the Host, then a login where one is needed, then the POST checks."""
    if request.endpoint == "static":
        return None
    if not host_is_ours():
        refuse(403, f"Host {request.host!r} is not this console's: open it at a loopback address "
                    "(or, behind a reverse proxy, forward X-Forwarded-For; see docs/console.md)")
    if request.method == "POST":
        return check_post()
    if login_needed_to_read() and not logged_in() and request.endpoint not in LOGIN_ENDPOINTS:
        return ask_login()
    return None


def ask_login() -> Any:
    """A page asks for the login; the live fragment, fetched by script, is refused instead."""
    if request.endpoint == "overview.live":
        refuse(401, "log in first")
    return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))


def check_post() -> None:
    """A POST needs this console's Origin, the session's CSRF token, and (but to log in) a login."""
    if not same_origin():
        refuse(403, "refused: this request did not come from a page of this console (Origin)")
    sent = request.form.get("csrf_token", "")
    if "csrf" not in session or not hmac.compare_digest(sent.encode(), session["csrf"].encode()):
        refuse(403, "refused: the form's CSRF token is missing or stale; reload the page and try again")
    if request.endpoint in LOGIN_ENDPOINTS:
        return
    if console_settings().token is None:
        refuse(403, "refused: the console has no operator token (set KG_CONSOLE_TOKEN and restart)")
    if not logged_in():
        refuse(403, "refused: log in with the operator token first")


def add_headers(response: Response) -> Response:
    """after_request: CSP and the other protective headers on every console answer."""
    for name, value in HEADERS.items():
        response.headers[name] = value
    return response


def install(app: Flask, settings: ConsoleSettings) -> None:
    """The guard on `app`: its session cookie, its checks before each request, its headers."""
    app.secret_key = session_key(settings.token)
    app.session_interface = ConsoleSessions()
    app.config.update(SESSION_COOKIE_NAME=COOKIE_NAME, SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", PERMANENT_SESSION_LIFETIME=LOGIN_LIFETIME,
                      MAX_CONTENT_LENGTH=64 * 1024)
    app.before_request(check_request)
    app.after_request(add_headers)
    app.jinja_env.globals.update(csrf_token=csrf_token, logged_in=logged_in, can_act=can_act,
                                 token_configured=lambda: settings.token is not None)
