"""How the console writes numbers and times: Jinja filters, all returning plain text (escaped)."""
from __future__ import annotations

from datetime import datetime, timezone

from flask import Flask


def duration(seconds: float | None) -> str:
    """`42s`, `3m 05s`, `2h 10m`, `3d 4h`; an empty string for None."""
    if seconds is None:
        return ""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def parse_time(value: str | float | None) -> float | None:
    """Unix seconds from an ISO 8601 string or a number (a naive time is UTC), else None."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        parsed = datetime.fromisoformat(str(value).replace(" ", "T").replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def when(value: str | float | None) -> str:
    """A time as `2026-11-30 12:00:05` UTC; text that is no time is shown as it is."""
    seconds = parse_time(value)
    if seconds is None:
        return "" if value is None else str(value)
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def mib(size: int | float | None) -> str:
    """Bytes as MiB with one decimal."""
    return "" if not size else f"{size / 1048576:.1f} MiB"


def number(value: int | float | None) -> str:
    """A count with thousands separators; a rate with up to two decimals."""
    if value is None:
        return ""
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.2f}"
    return f"{int(value):,}"


def install(app: Flask) -> None:
    app.jinja_env.filters.update(duration=duration, when=when, mib=mib, number=number)
