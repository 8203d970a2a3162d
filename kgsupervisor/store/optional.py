"""Our tables that no command requires (OPTIONAL_TABLES): found in the catalogue and created on
first use by their writer, so a database migrated by an older version needs no init-db."""
from __future__ import annotations

from typing import Any

from kgsupervisor.store.backend import backend_of
from kgsupervisor.store.owntables import POSTGRES_SPELLING, SQLITE_SPELLING, own_table_ddl


def table_exists(conn: Any, table: str) -> bool:
    """Is `table` there? Asked of the catalogue: a failed SELECT would abort a PostgreSQL
    transaction the caller may have open."""
    if backend_of(conn).name == "postgresql":
        return conn.execute("SELECT to_regclass(?) IS NOT NULL", (table,)).fetchone()[0]
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def ensure_optional_table(conn: Any, table: str) -> None:
    """Create one of OPTIONAL_TABLES when missing, in the backend's spelling. Two first writers
    at once on PostgreSQL: the slower CREATE fails on the catalogue's unique index, and finds
    the table made."""
    if table_exists(conn, table):
        return
    spelling = POSTGRES_SPELLING if backend_of(conn).name == "postgresql" else SQLITE_SPELLING
    try:
        conn.execute(own_table_ddl(table, spelling))
    except Exception as exc:
        if not backend_of(conn).raised(exc) or not table_exists(conn, table):
            raise
