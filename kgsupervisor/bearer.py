"""The KG service's bearer token: read from its file, cleaned, checked fit for an HTTP header."""
from __future__ import annotations

from kgsupervisor.addresses import control_at
from kgsupervisor.errors import ConfigError

# A bearer token is far shorter; the bound keeps KG_SERVICE_TOKEN_FILE=/dev/zero from filling memory.
TOKEN_FILE_LIMIT = 65536


def _clean_token(text: str) -> str:
    """The token without the byte-order mark or surrounding whitespace an editor or `echo` adds."""
    return text.strip().removeprefix("\ufeff").strip()


def _token_problem(token: str) -> str | None:
    """Why `token` cannot go in an Authorization header; it names a position, never a character."""
    if not token:
        return "it is empty"
    control = control_at(token)
    if control is not None:
        return f"it contains a control character at position {control}"
    for position, char in enumerate(token, 1):
        if not char.isascii():
            return f"it contains a non-ASCII character at position {position}"
    return None


def read_token_file(path: str, setting: str = "service_token_file", what: str = "the bearer token") -> str:
    """The token file's text; a ConfigError naming `setting` if it is unreadable, oversized or not UTF-8."""
    def refused(why: str) -> ConfigError:
        return ConfigError(setting, path, f"a readable file holding {what} ({why})")
    try:
        with open(path, "rb") as f:
            data = f.read(TOKEN_FILE_LIMIT + 1)
    except OSError as exc:
        raise refused(exc.strerror or type(exc).__name__) from None
    except ValueError:  # a NUL in the path
        raise refused("the path contains a control character") from None
    if len(data) > TOKEN_FILE_LIMIT:
        raise refused(f"it is larger than {TOKEN_FILE_LIMIT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refused(f"it is not UTF-8 text: byte {exc.start + 1} is invalid") from None


def checked_token(text: str, setting: str, shown: str) -> str:
    """`text` cleaned into a bearer token; a ConfigError naming `setting` with `shown` (never the
    token) if it is empty or not printable ASCII."""
    token = _clean_token(text)
    problem = _token_problem(token)
    if problem:
        raise ConfigError(setting, shown, f"a bearer token of printable ASCII characters ({problem})")
    return token
