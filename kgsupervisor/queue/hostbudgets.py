"""Rate budgets per KG endpoint shared by every host on one PostgreSQL database (issue 17).

The same budgets as kg.budgets.RateBudgets (one request and the document's estimated tokens per
spend, both kinds checked before either is spent, every sliding window of `window_s` within the
budget), kept as one row per spend in a table of ours instead of a supervisor's manager process,
so every worker of every supervisor on the database spends from one budget. One clock judges the
windows: the database server's (clock_timestamp()), never a host's. Spends on one endpoint are
serialised by a transaction-scoped advisory lock taken before the clock is read, so the stamps
reach the table in time order and no two hosts both see the same room.

Not pyrate-limiter's PostgresBucket (4.5.1, a dependency already), which fits none of the needs:
a bucket is one log whose put() checks and spends at once, so requests and tokens cannot both be
checked before either is spent; it takes its table lock NOWAIT and refuses on contention, a refusal
that says nothing about room (wait_for could not tell when to wake); it writes a row per unit of
weight (a 40,000-character document is 10,000 token rows to insert and later delete); its clock
falls back to the host's own when the query fails, and it stamps TIMESTAMP without time zone in the
session's zone, so hosts with another TimeZone setting disagree; and it wants a psycopg_pool pool
(not installed), made before the fork and shared by the children.
"""
from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from kgsupervisor.errors import DatabaseError
from kgsupervisor.kg.budgets import (DEFAULT_CHARS_PER_TOKEN, REQUESTS, TOKENS, WINDOW_S, Budget, OverBudget,
                                     estimated_tokens)
from kgsupervisor.masking import redact
from kgsupervisor.store.backend import is_driver_error
from kgsupervisor.store.faults import describe_database_fault
from kgsupervisor.store.optional import ensure_optional_table
from kgsupervisor.store.owntables import BUDGET_SPENDS_TABLE
from kgsupervisor.store.pgschema import MIGRATION_LOCK
from kgsupervisor.store.postgres import PGConnection

T = TypeVar("T")

APPLICATION_NAME = "kgsupervisor budgets"  # how pg_stat_activity shows these connections
SPENDS_INDEX = "idx_kgbs_endpoint"


def _int4(value: int) -> int:
    """An unsigned 32-bit value as the signed int4 pg_advisory_xact_lock(int4, int4) takes."""
    return value - (1 << 32) if value >= 1 << 31 else value


# pg_advisory_xact_lock(class, endpoint): the two-key space, apart from the migration's one-key lock.
LOCK_CLASS = _int4(zlib.crc32(BUDGET_SPENDS_TABLE.encode()))

# One look at an endpoint's window, under its lock: the server's now, what the window holds, and
# per kind the newest entry that leaves too little room while it stays (None: room now). Walking
# from the newest spend back, an entry blocks once it and the newer ones leave less than the
# request needs; the first such entry leaves the window at its stamp + window + 1 ms (the window
# holds [now - window, now], both ends included, as RateBudgets' does). Older entries are deleted.
LOOK_SQL = f"""
WITH now AS (SELECT FLOOR(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT AS ms),
pruned AS (DELETE FROM {BUDGET_SPENDS_TABLE} WHERE endpoint = ? AND spent_ms < (SELECT ms FROM now) - ?),
inside AS (
    SELECT spent_ms, tokens,
           ROW_NUMBER() OVER newest AS requests_so_far, SUM(tokens) OVER newest AS tokens_so_far
    FROM {BUDGET_SPENDS_TABLE}
    WHERE endpoint = ? AND spent_ms >= (SELECT ms FROM now) - ?
    WINDOW newest AS (ORDER BY spent_ms DESC ROWS UNBOUNDED PRECEDING))
SELECT now.ms, COUNT(inside.spent_ms), COALESCE(SUM(inside.tokens), 0),
       MAX(inside.spent_ms) FILTER (WHERE requests_so_far > ?),
       MAX(inside.spent_ms) FILTER (WHERE tokens_so_far > ?)
FROM now LEFT JOIN inside ON TRUE GROUP BY now.ms
"""
SPEND_SQL = f"INSERT INTO {BUDGET_SPENDS_TABLE} (endpoint, spent_ms, tokens) VALUES (?, ?, ?)"


def endpoint_lock(endpoint: str) -> int:
    """The endpoint's advisory lock key, the same in every process (str hash() is salted)."""
    return _int4(zlib.crc32(endpoint.encode()))


@dataclass(frozen=True)
class Look:
    """One locked look at an endpoint's window, in server milliseconds."""

    now_ms: int
    free_at_ms: int  # the first millisecond the request fits: now_ms when it fits now
    used: dict[str, int]
    spent: bool


class PostgresRateBudgets:
    """RateBudgets shared by every process on every host using the PostgreSQL database at `url`.
    Times (next_free_at, wait_for's deadline, last_spent_at) are unix seconds of the database
    server's clock: a deadline from a host's time.time() is close enough, since clock skew only
    moves when a wait gives up, never what is spent. Each process opens its own connection on
    first use; the object may be made before a fork."""

    def __init__(self, url: str, budgets: Mapping[str, Budget],
                 chars_per_token: float = DEFAULT_CHARS_PER_TOKEN, window_s: float = WINDOW_S,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url = url
        self.chars_per_token = chars_per_token
        self.window_ms = round(window_s * 1000)
        self.last_spent_at: float | None = None  # per process: when this process last spent
        self._sleep = sleep
        self._limits = {e: b.limits() for e, b in budgets.items()}
        self._conn: PGConnection | None = None
        self._conn_pid: int | None = None

    def close(self) -> None:
        """Close this process's connection (one inherited from another process is not ours)."""
        if self._conn is not None and self._conn_pid == os.getpid():
            self._conn.close()
        self._conn = None

    def tokens(self, chars: int) -> int:
        return estimated_tokens(chars, self.chars_per_token)

    def try_spend(self, endpoint: str, chars: int) -> bool:
        """Spend one request and the document's tokens if the budget has room now; never waits."""
        return self._look(endpoint, chars, spend=True).spent

    def next_free_at(self, endpoint: str, chars: int) -> float:
        """When the document would fit (now if it fits now), unless others spend first."""
        return self._look(endpoint, chars, spend=False).free_at_ms / 1000

    def seconds_until_room(self, endpoint: str, chars: int) -> float:
        """How long until the document would fit (0: it fits now), unless others spend first."""
        look = self._look(endpoint, chars, spend=False)
        return (look.free_at_ms - look.now_ms) / 1000

    def wait_for(self, endpoint: str, chars: int, deadline: float) -> bool:
        """Spend as soon as the budget has room, asleep and holding nothing meanwhile; False as
        soon as it is clear the room comes after `deadline` (server unix seconds)."""
        while True:
            look = self._look(endpoint, chars, spend=True)
            if look.spent:
                return True
            if look.free_at_ms / 1000 > deadline:
                return False
            # Both ends on the server's clock: the sleep ends as the blocking entry leaves.
            self._sleep((look.free_at_ms - look.now_ms) / 1000)

    def used(self, endpoint: str) -> dict[str, int]:
        """Requests and tokens spent in the last window, per limited kind; for status and metrics."""
        if not self._limits.get(endpoint):
            return {}
        return self._look(endpoint, 0, spend=False).used

    def limits(self, endpoint: str) -> dict[str, int]:
        return dict(self._limits.get(endpoint, {}))

    def _weights(self, chars: int) -> dict[str, int]:
        return {REQUESTS: 1, TOKENS: self.tokens(chars)}

    def _rooms(self, endpoint: str, chars: int) -> dict[str, int | None]:
        """What each kind's window may hold besides this request (None: not limited); OverBudget
        when the request alone is more than a kind's whole budget."""
        weights = self._weights(chars)
        rooms: dict[str, int | None] = {REQUESTS: None, TOKENS: None}
        for kind, limit in self._limits.get(endpoint, {}).items():
            if weights[kind] > limit:
                raise OverBudget(f"{endpoint} {kind}: {weights[kind]} needed, "
                                 f"the whole budget is {limit} a window")
            rooms[kind] = limit - weights[kind]
        return rooms

    def _look(self, endpoint: str, chars: int, spend: bool) -> Look:
        """Look at the endpoint's window under its lock, spending when `spend` and it fits."""
        rooms = self._rooms(endpoint, chars)
        look = self._locked(endpoint, lambda conn: self._look_locked(conn, endpoint, chars, rooms, spend))
        if look.spent:
            self.last_spent_at = look.now_ms / 1000
        return look

    def _look_locked(self, conn: PGConnection, endpoint: str, chars: int, rooms: dict[str, int | None],
                     spend: bool) -> Look:
        """The look itself, inside the endpoint's locked transaction."""
        now_ms, requests, tokens, requests_block, tokens_block = conn.execute(
            LOOK_SQL, (endpoint, self.window_ms, endpoint, self.window_ms,
                       rooms[REQUESTS], rooms[TOKENS])).fetchone()
        blocking = [stamp for stamp in (requests_block, tokens_block) if stamp is not None]
        free_at_ms = max([now_ms] + [stamp + self.window_ms + 1 for stamp in blocking])
        used = {kind: n for kind, n in ((REQUESTS, requests), (TOKENS, tokens))
                if kind in self._limits.get(endpoint, {})}
        # An endpoint without limits spends nothing: there is no window to keep.
        spent = spend and free_at_ms <= now_ms
        if spent and self._limits.get(endpoint):
            conn.execute(SPEND_SQL, (endpoint, now_ms, self.tokens(chars)))
        return Look(now_ms, free_at_ms, used, spent)

    def _locked(self, endpoint: str, step: Callable[[PGConnection], T]) -> T:
        """Run `step` in a transaction holding the endpoint's advisory lock (released at COMMIT).
        A driver error becomes a DatabaseError, and the connection is dropped: the next call
        opens another rather than use one left inside a failed transaction."""
        try:
            conn = self._connection()
            conn.execute("BEGIN")
            conn.execute("SELECT pg_advisory_xact_lock(?, ?)", (LOCK_CLASS, endpoint_lock(endpoint)))
            result = step(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            self._drop()
            if is_driver_error(exc):
                raise DatabaseError(f"rate budgets at {redact(self.url)}: "
                                    f"{describe_database_fault(exc)}") from exc
            raise

    def _connection(self) -> PGConnection:
        """This process's connection, opened (and the table made) on first use in each process:
        one inherited over a fork is the parent's session and never used here."""
        if self._conn is None or self._conn_pid != os.getpid():
            self._conn = None
            conn = PGConnection(self.url, application_name=APPLICATION_NAME)
            self._conn, self._conn_pid = conn, os.getpid()
            self._ensure_table(conn)
        return self._conn

    @staticmethod
    def _ensure_table(conn: PGConnection) -> None:
        """The spends table and its index, made under the migration's lock: no race with another
        first user or with init-db."""
        conn.execute("BEGIN")
        conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        ensure_optional_table(conn, BUDGET_SPENDS_TABLE)
        conn.execute(f"CREATE INDEX IF NOT EXISTS {SPENDS_INDEX} "
                     f"ON {BUDGET_SPENDS_TABLE} (endpoint, spent_ms)")
        conn.execute("COMMIT")

    def _drop(self) -> None:
        """Forget this process's connection after a failure, closing it if it is ours."""
        conn, self._conn = self._conn, None
        if conn is not None and self._conn_pid == os.getpid():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too; it is gone
                pass

