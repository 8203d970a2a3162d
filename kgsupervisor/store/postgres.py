"""PostgreSQL connections that take the same SQL and calls as the SQLite ones (qmark, explicit BEGIN)."""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from kgsupervisor.errors import DatabaseError
from kgsupervisor.masking import Mask, redact, secrets_in

URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str | None) -> bool:
    """KG_DB_PATH / --db names a PostgreSQL database rather than an SQLite file."""
    return bool(value) and value.strip().lower().startswith(URL_SCHEMES)


def unescaped_at(url: str) -> str | None:
    """Why `url` cannot be right when its user:password part holds an unescaped @ or /, else None.

    libpq ends the userinfo at the first @ (or takes it for the host at a /), makes a host or a
    port of the rest of the password, then quotes that in its error: say what is wrong instead.
    """
    userinfo = re.split(r"[?#]", url.partition("://")[2], maxsplit=1)[0].rpartition("@")[0]
    if "@" in userinfo or "/" in userinfo:
        return "the user:password part holds an unescaped @ or / (write them as %40 and %2F)"
    return None


@functools.lru_cache(maxsize=256)
def translate(sql: str, with_params: bool = True) -> str:
    """SQLite spelling -> psycopg's: `?` placeholders become `%s` (and a literal `%` is doubled)
    when there are parameters; BEGIN IMMEDIATE (SQLite's take-the-write-lock-now) is a plain
    BEGIN, since PostgreSQL locks rows, not the database."""
    if with_params:
        sql = sql.replace("%", "%%").replace("?", "%s")
    return re.sub(r"^\s*BEGIN\s+IMMEDIATE\b", "BEGIN", sql, flags=re.I)


class PGConnection:
    """psycopg 3 in autocommit mode, used as kgsupervisor uses sqlite3: transactions are explicit."""

    def __init__(self, url: str, *, application_name: str = "kgsupervisor") -> None:
        self.url = url
        self.application_name = application_name
        self.channels: list[str] = []  # LISTENed to; listened to again after a reconnect
        self.raw = self._connect()

    def _connect(self) -> Any:
        import psycopg  # only a PostgreSQL database needs the driver
        problem = unescaped_at(self.url)
        if problem:
            raise DatabaseError(f"cannot connect to PostgreSQL at {redact(self.url)}: {problem}")
        try:
            raw = psycopg.connect(self.url, autocommit=True, application_name=self.application_name,
                                  connect_timeout=10)
        except psycopg.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            # libpq quotes what it could not parse: the whole URL, or a piece of the password.
            shown = Mask(secrets_in(self.url))(first)
            raise DatabaseError(f"cannot connect to PostgreSQL at {redact(self.url)}: {shown}") from None
        for channel in self.channels:
            raw.execute(f"LISTEN {channel}")
        return raw

    def _live(self) -> Any:
        """The connection, opened again if the server dropped it (a restart, a failover): the
        statement that saw it drop has already failed, so nothing half-done is lost."""
        if self.raw.closed:
            self.raw = self._connect()
        return self.raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        params = tuple(params)
        return self._live().execute(translate(sql, bool(params)), params or None)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> Any:
        cur = self._live().cursor()
        cur.executemany(translate(sql), [tuple(p) for p in seq])
        return cur

    def listen(self, channel: str) -> None:
        self._live().execute(f"LISTEN {channel}")
        self.channels.append(channel)

    def notified(self) -> bool:
        """Did a NOTIFY arrive on a LISTENed channel since the last look? Never blocks."""
        return sum(1 for _ in self._live().notifies(timeout=0)) > 0  # drain them all

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus
        return not self.raw.closed and self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()

    def __repr__(self) -> str:
        return f"PGConnection({redact(self.url)!r})"


def connect_pg(url: str) -> PGConnection:
    """Open `url` (postgresql://user@host:port/dbname)."""
    return PGConnection(url)
