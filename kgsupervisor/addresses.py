"""KG service URLs and HOST:PORT addresses as settings give them: checked, split, masked, parsed."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from kgsupervisor.errors import ConfigError

URL_EXPECTED = "an http:// or https:// URL with a host, e.g. http://localhost:8088"


def control_at(text: str) -> int | None:
    """The position (from 1) of the first control character in `text`, or None."""
    for position, char in enumerate(text, 1):
        if ord(char) < 32 or 127 <= ord(char) < 160:
            return position
    return None


def _port_ok(port: str, lowest: int) -> bool:
    """ASCII digits only: str.isdigit() also takes '²', which int() then refuses."""
    return re.fullmatch(r"[0-9]{1,5}", port) is not None and lowest <= int(port) <= 65535


def _host_port_problem(hostport: str) -> str | None:
    """What is wrong with the HOST[:PORT] of a URL (its userinfo already cut off), or None."""
    if hostport.startswith("["):
        rest = hostport.partition("]")[2]
        port_given, port = rest.startswith(":"), rest[1:]
        if rest and not port_given:
            return "an http(s) URL whose host is well-formed, e.g. http://[::1]:8088"
    elif hostport.count(":") > 1:
        return "an http(s) URL with one port, and an IPv6 host in brackets, e.g. http://[::1]:8088"
    else:
        _, port_given, port = hostport.partition(":")
    if port_given and not _port_ok(port, 1):
        return "an http(s) URL with a port from 1 to 65535"
    return None


def _http_url(v: str) -> str | None:
    """What is wrong with one KG service base URL (said as what is expected), or None."""
    if any(c.isspace() for c in v) or control_at(v) is not None:
        return "an http(s) URL without spaces or control characters"
    if "?" in v or "#" in v:
        return "an http(s) base URL without ? or # (/api/v1/ingest is appended to it)"
    if re.search(r"%(?![0-9A-Fa-f]{2})", v):
        return "an http(s) URL whose % escapes are % and two hex digits"
    try:
        parts = urlsplit(v)
    except ValueError:  # "Invalid IPv6 URL": a bracket left open, or not an address inside
        return "an http(s) URL whose host is well-formed, e.g. http://[::1]:8088"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return URL_EXPECTED
    return _host_port_problem(parts.netloc.rpartition("@")[2])


def split_urls(value: str) -> list[str]:
    """KG_SERVICE_URL as a list: one URL, or several separated by commas."""
    return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]


def mask_urls(value: str) -> str:
    """`value` (one URL or several) with the userinfo (user:password@) of each hidden."""
    pieces = value.split("://")
    for i in range(1, len(pieces)):
        # The last @ before the next URL: a password may hold an unescaped @, / or comma.
        at = pieces[i].rfind("@")
        if at >= 0:
            pieces[i] = "***" + pieces[i][at:]
    return "://".join(pieces)


def service_urls_problem(v: str) -> str | None:
    """What is wrong with KG_SERVICE_URL (one URL or several, comma-separated), or None."""
    urls = split_urls(v)
    if not urls:
        return f"{URL_EXPECTED} (or several, comma-separated)"
    for position, url in enumerate(urls, 1):
        problem = _http_url(url)
        if problem and len(urls) > 1:
            # With an @ anywhere, a comma may have cut a password in two: name the URL by position.
            which = f"URL {position}" if "@" in v else repr(url)
            return f"{problem} (or several, comma-separated; {which} is not one)"
        if problem:
            return problem
    if len(set(urls)) != len(urls):
        return "each KG service URL once"
    return None


def parse_addr(value: str) -> tuple[str, int] | None:
    """'127.0.0.1:9188', '[::1]:9188' or 'off' (None); a ConfigError names what is wrong."""
    if value.strip().lower() == "off":
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or control_at(host) is not None or not _port_ok(port, 0):
        raise ConfigError("KG_STATUS_ADDR", value, "HOST:PORT (e.g. 127.0.0.1:9188) or off")
    return host, int(port)


def addr_problem(v: str) -> str | None:
    """What is wrong with a status address (said as what is expected), or None."""
    try:
        parse_addr(v)
    except ConfigError as exc:
        return exc.expected
    return None
