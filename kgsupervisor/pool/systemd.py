"""sd_notify over NOTIFY_SOCKET and the watchdog interval; a no-op outside systemd."""
from __future__ import annotations

import os
import socket


def _address(raw: str) -> str:
    # A leading '@' names a socket in the abstract namespace.
    return "\0" + raw[1:] if raw.startswith("@") else raw


class Notifier:
    """Sends READY=1, STATUS=..., WATCHDOG=1, RELOADING=1, STOPPING=1 to systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping at half the interval, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *states: str) -> bool:
        """Send one datagram of newline-separated assignments; False if it could not be sent."""
        if not self.address:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.set_inheritable(False)
            # Never wait on a listener that does not read: a full socket drops this status
            # (systemd always reads; a stalled loop would stop the supervisor's own work).
            self._sock.sendto("\n".join(states).encode(), socket.MSG_DONTWAIT, _address(self.address))
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
