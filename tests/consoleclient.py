"""A client of the operator console as a browser is one: a requests session that reads the CSRF
token from the page, sends its own Origin, and logs in through the login form."""
from __future__ import annotations

import re

import requests

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def element_text(html: str, element_id: str) -> str | None:
    """The text of the element with `element_id` (no markup inside it), or None."""
    found = re.search(rf'id="{re.escape(element_id)}"[^>]*>([^<]*)<', html)
    return found.group(1).strip() if found else None


class ConsoleClient:
    """One browser's session with the console at `base`."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.http.get(self.base + path, timeout=10, **kwargs)

    def csrf(self, path: str = "/login") -> str:
        """The CSRF token a page of the console carries for this session."""
        return CSRF.search(self.get(path).text).group(1)

    def post(self, path: str, fields: dict[str, str], *, csrf: bool = True, origin: str | None = None,
             headers: dict[str, str] | None = None, follow: bool = True) -> requests.Response:
        """POST `fields` as a form of the console's own page would: its CSRF token (unless
        csrf=False) and its Origin (or `origin`)."""
        data = {**fields, **({"csrf_token": self.csrf()} if csrf else {})}
        sent = {"Origin": origin or self.base, **(headers or {})}
        return self.http.post(self.base + path, data=data, headers=sent, timeout=10, allow_redirects=follow)

    def login(self, token: str, name: str = "alice") -> requests.Response:
        return self.post("/login", {"name": name, "token": token}, follow=False)
