"""The console's settings, as `run` and `kgsupervisor console` give them: its database, its
operator token, where it listens. No web library here: the supervisor imports this before it forks."""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import TYPE_CHECKING

from kgsupervisor.errors import ConfigError
from kgsupervisor.logs import host_port

if TYPE_CHECKING:
    from kgsupervisor.config import Settings


def is_loopback(host: str) -> bool:
    """A loopback address, or the name localhost."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclasses.dataclass(frozen=True)
class ConsoleSettings:
    """What the console needs to serve: its database, its operator token, where it listens, and
    (inside `run`) the pid of the supervisor its pool actions signal."""

    db_target: str
    token: str | None
    bind_host: str
    lease_seconds: float = 60.0
    supervisor_pid: int | None = None  # None: `kgsupervisor console`, no pool to act on

    @property
    def beyond_host(self) -> bool:
        """Listening on more than loopback: every page then needs a login."""
        return not is_loopback(self.bind_host)

    def access(self) -> str:
        """Who may do what, as the start-up log line says it."""
        if self.beyond_host:
            return "every page needs a login with the operator token"
        if self.token is None:
            return "reading open on loopback; no action until KG_CONSOLE_TOKEN is set"
        return "reading open on loopback; actions need a login with the operator token"


def console_settings(settings: Settings, addr: tuple[str, int]) -> ConsoleSettings:
    """The console's settings at `addr`; a one-line ConfigError when it would listen beyond this
    host without an operator token (or the token cannot be used)."""
    token = settings.console_key()
    host = addr[0]
    if token is None and not is_loopback(host):
        raise ConfigError("KG_CONSOLE_TOKEN", None,
                          f"an operator token (KG_CONSOLE_TOKEN or KG_CONSOLE_TOKEN_FILE) for a console at "
                          f"{host_port(*addr)}, beyond this host (or listen on 127.0.0.1)")
    return ConsoleSettings(db_target=settings.db_path or "", token=token, bind_host=host,
                           lease_seconds=settings.lease_seconds)
