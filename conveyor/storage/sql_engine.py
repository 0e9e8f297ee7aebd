"""SqlEngine: the SQL seam under the StateStore (SQLite or PostgreSQL behind it).

Owns: the engine interface the per-domain state modules (state_store.py,
shared_state.py, group_config_state.py) write their queries against, the
``Dialect`` that turns those queries into a backend's text, and ``upsert_sql``.

Rules:
- Queries are written once, with ``?`` placeholders, plain types (TEXT,
  INTEGER, BIGINT, ``{blob}``) and the standard ``INSERT ... ON CONFLICT (...)
  DO UPDATE SET col = excluded.col`` upsert that SQLite (>= 3.24) and PostgreSQL
  both accept. ``Dialect.sql`` rewrites placeholders and the blob type name: that
  is the whole dialect seam.
- ``write``/``write_many`` are synchronous and only buffer: the writes of one
  event-loop turn go to the database in one transaction, and a caller that needs
  them durable awaits ``commit()``. ``query`` is async (a network round trip on
  PostgreSQL) and sees every write made before it (read your writes).
- ``add_schema`` takes idempotent CREATE ... IF NOT EXISTS statements; they run
  before any later query.
- A ``WriteGuard`` (an engine that has ``write_guarded``: PostgreSQL) makes a write
  conditional inside its own transaction: the guard is a locking SELECT that must
  return a row, or nothing is written. A cluster node fences its coordinator writes
  this way (conveyor/cluster/membership.py writes the guard; it is opaque here).

Must not know: the broker, the domain rows, files.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SqlValue = int | float | str | bytes | None


@dataclass(frozen=True, slots=True)
class WriteGuard:
    """A SELECT (asyncpg's ``$n`` placeholders) that locks what it reads, and its values:
    the write it guards happens in the same transaction only if it returns a row."""

    sql: str
    parameters: tuple[SqlValue, ...]


# one statement of a guarded write: the query (``?`` placeholders) and its rows
GuardedStatement = tuple[str, Sequence[Sequence[SqlValue]]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQL backends: the placeholder and the blob type name.

    ``placeholder`` is ``?`` (SQLite), ``%s`` (DB-API drivers such as psycopg) or
    ``$`` meaning numbered ``$1, $2, ...`` (asyncpg, PostgreSQL's own protocol).
    """

    name: str
    placeholder: str = "?"
    blob_type: str = "BLOB"

    def sql(self, query: str) -> str:
        query = query.replace("{blob}", self.blob_type)
        if self.placeholder == "?":
            return query
        if self.placeholder == "$":
            numbers = itertools.count(1)
            parts = query.split("?")
            return parts[0] + "".join(f"${next(numbers)}{part}" for part in parts[1:])
        return query.replace("?", self.placeholder)


SQLITE = Dialect("sqlite")
# PostgreSQL through a DB-API driver (psycopg's %s placeholders)
POSTGRESQL = Dialect("postgresql", placeholder="%s", blob_type="BYTEA")
# PostgreSQL through asyncpg ($1, $2, ...): what PostgresEngine uses
POSTGRESQL_NUMBERED = Dialect("postgresql", placeholder="$", blob_type="BYTEA")


def upsert_sql(table: str, keys: Sequence[str], columns: Sequence[str]) -> str:
    """INSERT of keys+columns that updates columns when the keys exist (both dialects)."""
    names = [*keys, *columns]
    placeholders = ", ".join("?" for _ in names)
    if columns:
        updates = ", ".join(f"{column} = excluded.{column}" for column in columns)
        action = f"DO UPDATE SET {updates}"
    else:
        action = "DO NOTHING"
    return (
        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({placeholders}) "
        f"ON CONFLICT ({', '.join(keys)}) {action}"
    )


class SqlEngine(Protocol):
    """One SQL database with per-loop-turn group commit (see the module docstring)."""

    dialect: Dialect

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    def add_schema(self, statements: Iterable[str]) -> None: ...
    def write(self, query: str, parameters: Sequence[SqlValue] = ()) -> None: ...
    def write_many(self, query: str, rows: Iterable[Sequence[SqlValue]]) -> None: ...
    async def query(self, query: str, parameters: Sequence[SqlValue] = ()
                    ) -> list[tuple[Any, ...]]: ...
    async def commit(self) -> None: ...
    # every write so far committed, fsynced or not (a kill -9 keeps it, a power cut may
    # not); PostgreSQL's commit is both at once
    async def committed(self) -> None: ...


class GuardedWrites(Protocol):
    """An engine that can write under a ``WriteGuard`` (PostgresEngine)."""

    async def write_guarded(self, guard: WriteGuard,
                            statements: Sequence[GuardedStatement]) -> bool: ...
