"""Masking secrets: the running configuration's token and passwords, and whatever credentials a
URL, a libpq connection string or an Authorization header carries, wherever text may show them."""
from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, quote_plus, unquote

from kgsupervisor.errors import KGSupervisorError

HIDDEN = "********"        # a secret known by its value, or an Authorization credential
HIDDEN_PASSWORD = "***"    # the password of a URL or connection string (as redact always showed it)
# Shorter "secrets" would hide ordinary words and digits all over the logs; a URL password that
# short is still hidden where it stands (after user: or password=).
MIN_SECRET = 3

# scheme://user:password@host. The password runs to the LAST @ before a blank or the next URL:
# a careless password may hold an unescaped @ or /, and all of it is still the password.
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:)(?P<secret>(?:(?!://)\S)*)(?=@)")
# password=... in a URL query (?password=, &password=) or a libpq key=value string, whose value
# may be quoted ('s3 cr\'et', libpq's escape) or bare; sslpassword and PGPASSWORD too.
_PASSWORD_PARAM = re.compile(r"(?i)(?P<head>(?:ssl|pg)?password\s*=\s*)"
                             r"(?P<secret>'(?:[^'\\]|\\.)*'?|[^\s&#'\"]*)")
# An Authorization header quoted back (an error body echoing our request, a repr of headers).
_AUTHORIZATION = re.compile(r"(?i)(?P<head>\bauthorization[\"']?\s*[:=]\s*[\"']?(?:(?:bearer|basic|token)\s+)?)"
                            r"(?P<secret>[^\s'\",;}]+)")
# A bearer credential anywhere; eight characters at least, so prose ("bearer token") stays.
_BEARER = re.compile(r"(?i)(?P<head>\bbearer\s+)(?P<secret>[^\s'\",;}]{8,})")
_URL_START = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")


def _hidden(replacement: str) -> Callable[[re.Match], str]:
    return lambda m: m["head"] + replacement


def hide_credentials(text: str) -> str:
    """`text` with every URL password, password= value and Authorization or bearer credential
    hidden; needs no knowledge of the secrets, so it is safe wherever text is stored or shown."""
    if "://" in text:
        text = _USERINFO.sub(_hidden(HIDDEN_PASSWORD), text)
    text = _PASSWORD_PARAM.sub(_hidden(HIDDEN_PASSWORD), text)
    text = _AUTHORIZATION.sub(_hidden(HIDDEN), text)
    return _BEARER.sub(_hidden(HIDDEN), text)


def _unquoted(value: str) -> str:
    """A libpq value as given: 'quoted' with \\' and \\\\ escapes, or bare."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def password_span(url: str) -> tuple[int, int] | None:
    """Where the password of one URL given alone lies, as (start, end), or None: from after
    `user:` to the last @ before the query, so that all of a careless password (an unescaped @,
    /, or blank in it, which no pattern over free text can tell from what follows) is found."""
    start = _URL_START.match(url)
    if start is None or url.count("://") != 1:
        return None
    query = re.search(r"[?#]", url[start.end():])
    end = start.end() + query.start() if query else len(url)
    at = url.rfind("@", start.end(), end)
    colon = url.find(":", start.end(), at) if at >= 0 else -1
    return (colon + 1, at) if colon >= 0 else None


def secrets_in(text: str) -> list[str]:
    """The passwords the URLs or connection string in `text` carry, as written and decoded, and
    the HTTP Basic credential a URL's user:password becomes (requests sends it)."""
    pairs: list[tuple[str, str]] = []
    span = password_span(text)
    if span is not None:
        user = text[:span[0] - 1].partition("://")[2]
        pairs.append((user, text[span[0]:span[1]]))
    pairs += [(m["head"].rpartition("://")[2][:-1], m["secret"]) for m in _USERINFO.finditer(text)]
    found: list[str] = []
    for user, password in pairs:
        credential = f"{unquote(user)}:{unquote(password)}".encode("utf-8", "surrogateescape")
        found += [password, unquote(password), base64.b64encode(credential).decode("ascii")]
    for m in _PASSWORD_PARAM.finditer(text):
        password = _unquoted(m["secret"])
        found += [password, unquote(password)]
    return [s for s in dict.fromkeys(found) if len(s) >= MIN_SECRET]


class HoldsSecrets(Protocol):
    """What secrets_of reads of a configuration (config.Settings has it)."""

    service_token: str | None
    console_token: str | None
    db_path: str | None
    service_url: str

    def token(self) -> str | None: ...

    def console_key(self) -> str | None: ...


def secrets_of(settings: HoldsSecrets) -> list[str]:
    """The secrets of a configuration: its bearer token, the console's operator token and every
    password its URLs carry."""
    found = [settings.service_token or "", settings.console_token or ""]
    for read in (settings.token, settings.console_key):
        try:
            found.append(read() or "")
        except KGSupervisorError:  # an unreadable or refused token is reported where it is used
            pass
    for text in (settings.db_path or "", settings.service_url or ""):
        found += secrets_in(text)
    return [s for s in dict.fromkeys(found) if len(s) >= MIN_SECRET]


def _spellings(secret: str) -> set[str]:
    """The ways a message may quote a secret: as is, escaped by repr() or JSON, percent-encoded,
    and line by line (a token holding a line break, split where it breaks)."""
    escaped = secret.encode("unicode_escape").decode("ascii")
    return {secret, repr(secret)[1:-1], escaped, escaped.replace("'", "\\'"),
            json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1],
            quote(secret, safe=""), quote(secret), quote_plus(secret), *secret.splitlines()}


class Mask:
    """Hides the given secrets, in every spelling a message may quote them, then any credentials
    (hide_credentials); call it on text. Immutable: `with_secrets` makes a wider one."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = frozenset(s for s in secrets if s and len(s) >= MIN_SECRET)
        spellings = {form for s in self.secrets for form in _spellings(s) if len(form) >= MIN_SECRET}
        # Longest first: a secret that contains another is hidden whole, not around the other.
        ordered = sorted(spellings, key=len, reverse=True)
        self._known = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def with_secrets(self, secrets: Iterable[str]) -> "Mask":
        return Mask(self.secrets | set(secrets))

    def __call__(self, text: str) -> str:
        if self._known is not None:
            text = self._known.sub(HIDDEN, text)
        return hide_credentials(text)


def hide_in(value: Any, mask: Callable[[str], str] = hide_credentials) -> Any:
    """A copy of JSON-like `value` (dicts, lists, scalars) with every string masked."""
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, Mapping):
        return {key: hide_in(item, mask) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(hide_in(item, mask) for item in value)
    return value

def redact(url: str) -> str:
    """The URL (or a message quoting URLs) without its password, wherever it is given: after
    `user:` (up to the last @, so a careless password is hidden whole), in a password=
    parameter, or in a key=value string. The one masking of database URLs: beyond the parse of
    one URL, it is masking.hide_credentials, which the logs apply to every line."""
    span = password_span(url)
    if span is not None:
        url = url[:span[0]] + HIDDEN_PASSWORD + url[span[1]:]
    return hide_credentials(url)
