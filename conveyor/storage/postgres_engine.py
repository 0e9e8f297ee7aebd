"""PostgresEngine: the SqlEngine on PostgreSQL, through asyncpg.

Rules:
- Group commit, as on SQLite: ``write``/``write_many`` only append to a buffer;
  the first write of an event-loop turn schedules a flush, and the flush sends the
  whole buffer in ONE transaction (consecutive writes of the same statement
  become one pipelined ``executemany``). ``commit()`` resolves once the
  transaction that carries every write made before it has committed.
- One flush at a time, in order: a later turn's writes wait for the earlier
  transaction, so the database sees the writes in the order they were made.
- Every transaction also bumps ``conveyor_commit.sequence``. When the connection
  drops and the outcome of a transaction is unknown (it may have died during
  COMMIT), the engine reconnects and reads the sequence back: the new value means
  it committed, the old one means it did not and it is sent again. Never guessed.
- Lost connections, a database that is starting, shutting down, read-only or
  full: retried with exponential backoff up to ``retry_window_ms``; past that the
  waiting callers get a (retriable) ``StorageError`` and the writes stay buffered
  in order for the next attempt. Other errors (a bug in a query) fail the
  transaction's callers and drop its writes.
- ``query`` first waits for every buffered write (read your writes), then reads
  on the same connection.
- Time (backoff, retry window) comes from the Clock given to the constructor.

Why asyncpg: it speaks PostgreSQL's binary protocol from an asyncio-native C
implementation, and its ``executemany`` pipelines every row of a statement in one
round trip inside the transaction. Measured here (bench/storage/bench_pg_drivers.py,
fsync on, one transaction of 1,000 upserted state rows): asyncpg executemany
~54k rows/s, psycopg 3 executemany in pipeline mode ~27k rows/s; COPY is faster
(asyncpg ~81k, psycopg ~62k rows/s) but only inserts, and the state tables need
upserts and deletes. At 10 rows per transaction every method is bound by the
commit's fsync (~400 transactions/s).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from conveyor.clock import Clock
from conveyor.errors import StorageBusyError, StorageError, StorageFullError
from conveyor.storage.postgres_dsn import (
    COMMAND_TIMEOUT_S,
    NO_PRIMARY_YET,
    SESSION_SETTINGS,
    parse_postgres_url,
)
from conveyor.storage.sql_engine import (
    POSTGRESQL_NUMBERED,
    Dialect,
    GuardedStatement,
    SqlValue,
    WriteGuard,
)
from conveyor.storage.text import check_row
from conveyor.tasks import Supervisor

logger = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 10
RETRY_WINDOW_MS = 30_000
BACKOFF_MS_MIN = 50
BACKOFF_MS_MAX = 2_000
# state writes waiting for a database that is behind (see PostgresEngine.busy)
BACKLOG_ROWS_MAX = 100_000
BACKLOG_BYTES_MAX = 64 << 20

_COMMIT_TABLE = (
    "CREATE TABLE IF NOT EXISTS conveyor_commit ("
    " singleton INTEGER PRIMARY KEY, sequence BIGINT NOT NULL)"
)
_COMMIT_ROW = (
    "INSERT INTO conveyor_commit (singleton, sequence) VALUES ($1, 0)"
    " ON CONFLICT (singleton) DO NOTHING"
)
# one row per writer: 1 for a single node; a cluster node has a row of its own
# (conveyor/cluster), so the nodes neither contend for one row nor misread each other's
_READ_SEQUENCE = "SELECT sequence FROM conveyor_commit WHERE singleton = $1"
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(7140003)"
_WRITE_SEQUENCE = "UPDATE conveyor_commit SET sequence = $1 WHERE singleton = $2"

# Failures of the connection or of the server's state, not of the statement: retried.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,  # "connection is closed" and friends
    asyncpg.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin/crash shutdown, starting
    asyncpg.exceptions.InsufficientResourcesError,  # 53: disk full, out of memory
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # 25006: a standby, or read-only
    NO_PRIMARY_YET,  # a multi-host URL: no host accepts writes yet (failover under way)
)


@dataclass
class _Batch:
    """Buffered statements in order: (sql, rows); rows None for a DDL statement."""

    statements: list[tuple[str, list[tuple[SqlValue, ...]] | None]] = field(
        default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    rows: int = 0  # rows (or DDL statements) buffered: counted against the backlog bound
    size_bytes: int = 0

    def add(self, sql: str, rows: list[tuple[SqlValue, ...]] | None) -> None:
        self.rows += 1 if rows is None else len(rows)
        self.size_bytes += len(sql) if rows is None else sum(map(_row_bytes, rows))
        if rows is not None and self.statements:
            last_sql, last_rows = self.statements[-1]
            if last_sql == sql and last_rows is not None:
                last_rows.extend(rows)
                return
        self.statements.append((sql, rows))


def _row_bytes(row: tuple[SqlValue, ...]) -> int:
    """About what a buffered row holds (its strings and blobs, 8 bytes a number)."""
    return sum(len(value) if isinstance(value, str | bytes | bytearray) else 8
               for value in row)


@functools.lru_cache(maxsize=512)
def _translated(query: str) -> str:
    """``query`` in asyncpg's dialect; the queries are constants, so translate each once."""
    return POSTGRESQL_NUMBERED.sql(query)


def _settle(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


def _where(dsn: str) -> str:
    """host:port[,...]/database of a DSN, without user or password (for messages)."""
    return parse_postgres_url(dsn).where()


def _transient_error(error: BaseException, where: str) -> StorageError:
    if isinstance(error, asyncpg.exceptions.DiskFullError):
        return StorageFullError("PostgreSQL is out of disk space", database=where)
    if isinstance(error, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return StorageError("PostgreSQL is read-only (a standby, or "
                            "default_transaction_read_only)", database=where)
    return StorageError("PostgreSQL is unavailable", database=where,
                        error=f"{type(error).__name__}: {error}")


class PostgresEngine:
    """PostgreSQL behind the SqlEngine interface (see the module docstring)."""

    dialect: Dialect = POSTGRESQL_NUMBERED

    def __init__(self, dsn: str, clock: Clock, *, retry_window_ms: int = RETRY_WINDOW_MS,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 backlog_rows_max: int = BACKLOG_ROWS_MAX,
                 backlog_bytes_max: int = BACKLOG_BYTES_MAX) -> None:
        self.dsn = dsn
        self.where = _where(dsn)
        self.clock = clock
        self.retry_window_ms = retry_window_ms
        self.connect_timeout_s = connect_timeout_s
        self._connection: Any = None
        self._lock = asyncio.Lock()  # one user of the connection at a time
        self._pending = _Batch()  # writes not sent yet
        self._inflight: _Batch | None = None  # the transaction being sent
        # a transaction that failed transiently: sent again, alone, before anything newer
        self._retry: _Batch | None = None
        self._needs_read_back = False  # the connection dropped: was the last one committed?
        self._flusher: asyncio.Task[None] | None = None
        self._supervisor = Supervisor("conveyor.postgres-engine")
        self._sequence = 0  # conveyor_commit.sequence as of our last commit
        self.writer = 1  # this writer's conveyor_commit row (set before open)
        self._open = False
        self.reconnects = 0  # connections made after the first (tests, metrics)
        # writes waiting for a database that is behind (stalled, away): past either bound
        # ``commit()`` answers StorageBusyError at once (the writes stay queued, in order)
        # and the PostgreSQL LogStore refuses new appends (``busy``)
        self.backlog_rows_max = backlog_rows_max
        self.backlog_bytes_max = backlog_bytes_max

    def describe(self) -> str:
        return f"PostgreSQL {self.where}"

    # --- lifecycle -----------------------------------------------------------------
    async def open(self) -> None:
        if self._open:
            return
        try:
            connection = await asyncpg.connect(
                self.dsn, timeout=self.connect_timeout_s, server_settings=SESSION_SETTINGS,
                command_timeout=COMMAND_TIMEOUT_S)
        except (*_TRANSIENT, asyncpg.PostgresError) as error:
            raise StorageError(
                "cannot connect to PostgreSQL; is it running and reachable, and does the "
                "database exist?", database=self.where,
                error=f"{type(error).__name__}: {error}") from error
        self._connection = connection
        try:
            await self._check_server(connection)
            async with connection.transaction():  # one node at a time (see _SCHEMA_LOCK)
                await connection.execute(_SCHEMA_LOCK)
                await connection.execute(_COMMIT_TABLE)
                await connection.execute(_COMMIT_ROW, self.writer)
            self._sequence = int(await connection.fetchval(_READ_SEQUENCE, self.writer))
        except asyncpg.PostgresError as error:
            await connection.close()
            self._connection = None
            raise StorageError("PostgreSQL refused Conveyor's setup", database=self.where,
                               error=f"{type(error).__name__}: {error}") from error
        self._open = True

    async def _check_server(self, connection: Any) -> None:
        read_only = await connection.fetchval(
            "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'")
        if read_only:
            raise StorageError(
                "PostgreSQL is read-only (a standby, or default_transaction_read_only=on): "
                "point --storage at the primary", database=self.where)
        settings = dict(await connection.fetch(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('fsync', 'synchronous_commit', 'full_page_writes')"))
        unsafe = {name: value for name, value in settings.items() if value == "off"}
        if unsafe:
            logger.warning("PostgreSQL %s runs with %s: a committed write can be lost in a "
                           "crash (see docs/postgres.md)", self.where, unsafe)

    async def close(self) -> None:
        if not self._open:
            return
        try:
            await self._committed_all()
        finally:
            self._open = False
            await self._supervisor.close(cancel=True)
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None

    # --- writes ----------------------------------------------------------------------
    def add_schema(self, statements: Iterable[str]) -> None:
        """Idempotent DDL; it runs in the next transaction, before any later query."""
        for statement in statements:
            self._pending.add(_translated(statement), None)
        self._schedule_flush()

    def write(self, query: str, parameters: Sequence[SqlValue] = ()) -> None:
        row = tuple(parameters)
        check_row(row)
        self._pending.add(_translated(query), [row])
        self._schedule_flush()

    def write_many(self, query: str, rows: Iterable[Sequence[SqlValue]]) -> None:
        batch = [tuple(row) for row in rows]
        for row in batch:
            check_row(row)
        if batch:
            self._pending.add(_translated(query), batch)
            self._schedule_flush()

    def backlog(self) -> tuple[int, int]:
        """(rows, bytes) written and not committed yet (pending, in flight, to retry)."""
        batches = [batch for batch in (self._pending, self._inflight, self._retry)
                   if batch is not None]
        return sum(b.rows for b in batches), sum(b.size_bytes for b in batches)

    def busy(self) -> StorageBusyError | None:
        """The error to answer at once while the database is behind and the writes
        waiting for it are past a bound; None otherwise."""
        if self._inflight is None and self._retry is None:
            return None  # nothing waits on the database: a burst is sent now
        rows, size = self.backlog()
        if rows <= self.backlog_rows_max and size <= self.backlog_bytes_max:
            return None
        return StorageBusyError("too many state writes wait for PostgreSQL; retry",
                                database=self.where, rows=rows, bytes=size)

    async def commit(self) -> None:
        """Wait until every write made so far is committed (StorageBusyError at once
        while the backlog is past its bound; the writes stay queued)."""
        busy = self.busy()
        if busy is not None:
            raise busy
        await self._committed_all()

    async def committed(self) -> None:
        """A COMMIT on PostgreSQL is durable: the same wait as ``commit``."""
        await self.commit()

    async def _committed_all(self) -> None:
        """Wait until every write made so far is committed (close, reads: no bound)."""
        if self._pending.statements:
            batch = self._pending
        elif self._inflight is not None:
            batch = self._inflight
        elif self._retry is not None:
            batch = self._retry
        else:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch.waiters.append(waiter)
        self._schedule_flush()
        await waiter

    def _schedule_flush(self) -> None:
        if self._flusher is not None and not self._flusher.done():
            return  # the running flusher takes the new writes after its transaction
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: flushed by the next commit()
        self._flusher = self._supervisor.start(self._flush_all(), name="conveyor.pg-flush")

    async def _flush_all(self) -> None:
        # one loop turn's writes arrive before this runs (it starts as a task)
        while True:
            if self._retry is not None:
                batch, self._retry = self._retry, None
            elif self._pending.statements or self._pending.waiters:
                batch, self._pending = self._pending, _Batch()
            else:
                return
            self._inflight = batch
            try:
                if batch.statements:
                    await self._send(batch)
            except _PermanentError as error:
                logger.error("%s; the transaction's writes are dropped", error)
                self._inflight = None
                _settle(batch.waiters, error)
                continue
            except asyncio.CancelledError:
                closed = StorageError("state store closed", database=self.where)
                _settle(batch.waiters + self._pending.waiters, closed)
                raise
            except StorageError as error:
                # Not committed (or not known to be): kept to be sent again, alone and
                # first, at the next commit() or write; newer writes cannot commit
                # before it, so their waiters get the same retriable error now.
                self._inflight = None
                waiters, batch.waiters = batch.waiters, []
                self._retry = batch
                _settle(waiters + self._pending.waiters, error)
                self._pending.waiters = []
                return
            except Exception as error:
                # a bug: say so and answer the callers rather than leave them waiting
                logger.exception("state transaction failed unexpectedly")
                self._inflight = None
                _settle(batch.waiters, _PermanentError("state transaction failed",
                                                       error=repr(error)))
                continue
            self._inflight = None
            _settle(batch.waiters, None)

    async def _send(self, batch: _Batch) -> None:
        """Commit ``batch`` in one transaction, resolving an unknown outcome by reading
        ``conveyor_commit.sequence`` back."""
        async with self._lock:
            # under the lock: a guarded write (write_guarded) may have taken the number
            sequence = self._sequence + 1

            async def attempt(connection: Any) -> None:
                if await self._committed(connection, sequence):
                    self._sequence = sequence
                    return
                async with connection.transaction():
                    if any(rows is None for _, rows in batch.statements):
                        # DDL: one node at a time (two nodes starting together on a
                        # fresh database raced in CREATE TABLE IF NOT EXISTS and one
                        # failed on pg_type's unique index)
                        await connection.execute(_SCHEMA_LOCK)
                    for sql, rows in batch.statements:
                        if rows is None:
                            await connection.execute(sql)
                        elif len(rows) == 1:
                            await connection.execute(sql, *rows[0])
                        else:
                            await connection.executemany(sql, rows)
                    await connection.execute(_WRITE_SEQUENCE, sequence, self.writer)
                self._sequence = sequence

            await self._retrying(attempt, "a state write", warn=True)

    async def _committed(self, connection: Any, sequence: int) -> bool:
        """After a reconnect: did the transaction of ``sequence`` commit before the drop?"""
        if not self._needs_read_back:
            return False
        self._needs_read_back = False
        found = int(await connection.fetchval(_READ_SEQUENCE, self.writer))
        if found == sequence:
            return True
        if found == sequence - 1:
            return False
        raise _PermanentError(
            "conveyor_commit.sequence moved under this node: another writer uses this "
            "database", database=self.where, expected=sequence - 1, found=found)

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None
        self._needs_read_back = True

    async def _connected(self, deadline_ms: int) -> Any:
        """The connection, reconnecting with backoff until ``deadline_ms``."""
        backoff_ms = BACKOFF_MS_MIN
        while self._connection is None or self._connection.is_closed():
            try:
                self._connection = await asyncpg.connect(
                    self.dsn, timeout=self.connect_timeout_s,
                    server_settings=SESSION_SETTINGS, command_timeout=COMMAND_TIMEOUT_S)
                self.reconnects += 1
                logger.info("reconnected to PostgreSQL %s", self.where)
            except _TRANSIENT as error:
                if self.clock.monotonic_ms() >= deadline_ms:
                    raise _transient_error(error, self.where) from error
                await self.clock.sleep_ms(backoff_ms)
                backoff_ms = min(backoff_ms * 2, BACKOFF_MS_MAX)
        return self._connection

    # --- guarded writes --------------------------------------------------------------
    async def write_guarded(self, guard: WriteGuard,
                            statements: Sequence[GuardedStatement]) -> bool:
        """Run ``statements`` (each a query and its rows) in a transaction of their own,
        after every buffered write, only if ``guard`` (a locking SELECT) returns a row in
        that same transaction; False, and nothing written, if it does not. The guard's locks hold
        until the commit, so whatever would change what it read waits for this write.
        An unknown outcome (the connection dropped during COMMIT) is resolved by the
        commit sequence, as for the batches; a transaction sent again checks the guard
        again."""
        translated = [(_translated(query), [tuple(row) for row in rows])
                      for query, rows in statements]
        for _, values in translated:
            for row in values:
                check_row(row)
        await self.commit()  # in order: every earlier write commits first
        async with self._lock:
            sequence = self._sequence + 1

            async def attempt(connection: Any) -> bool:
                if await self._committed(connection, sequence):
                    self._sequence = sequence
                    return True
                async with connection.transaction():
                    if await connection.fetchrow(guard.sql, *guard.parameters) is None:
                        return False  # the empty transaction commits: nothing written
                    for sql, values in translated:
                        if values:
                            await connection.executemany(sql, values)
                    await connection.execute(_WRITE_SEQUENCE, sequence, self.writer)
                self._sequence = sequence
                return True

            return await self._retrying(attempt, "a guarded state write")

    # --- reads -------------------------------------------------------------------------
    async def query(self, query: str, parameters: Sequence[SqlValue] = ()
                    ) -> list[tuple[Any, ...]]:
        await self._committed_all()  # read your writes
        sql = _translated(query)

        async def attempt(connection: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await connection.fetch(sql, *parameters)]

        async with self._lock:
            return await self._retrying(attempt, "a state query", write=False)

    async def _retrying(self, attempt: Callable[[Any], Awaitable[T]], what: str,
                        write: bool = True, warn: bool = False) -> T:
        """``attempt(connection)`` until it returns: a dropped connection or a database
        going away (``_TRANSIENT``) reconnects and tries again with backoff for
        ``retry_window_ms``, then is a retriable StorageError; a statement PostgreSQL
        rejects is not retried (a write: ``_PermanentError``). The caller holds the
        lock; a write's attempt reads its commit sequence back after a reconnect."""
        deadline_ms = self.clock.monotonic_ms() + self.retry_window_ms
        backoff_ms = BACKOFF_MS_MIN
        while True:
            try:
                return await attempt(await self._connected(deadline_ms))
            except (ValueError, TypeError) as error:
                if not write:
                    raise
                # a value the statement cannot take (asyncpg's DataError): a bug,
                # never fixed by sending it again
                raise _PermanentError(f"{what} has a value PostgreSQL cannot take",
                                      database=self.where, error=str(error)) from error
            except _TRANSIENT as error:
                self._drop_connection()
                if self.clock.monotonic_ms() >= deadline_ms:
                    raise _transient_error(error, self.where) from error
                if warn:
                    logger.warning("PostgreSQL %s: %s; retrying the transaction",
                                   self.where, error)
                await self.clock.sleep_ms(backoff_ms)
                backoff_ms = min(backoff_ms * 2, BACKOFF_MS_MAX)
            except asyncpg.PostgresError as error:
                rejected = _PermanentError if write else StorageError
                raise rejected(f"PostgreSQL rejected {what}", database=self.where,
                               error=f"{type(error).__name__}: {error}") from error


class _PermanentError(StorageError):
    """A transaction PostgreSQL refused for a reason retrying cannot fix."""
