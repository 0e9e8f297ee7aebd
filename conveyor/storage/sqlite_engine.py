"""SqliteEngine: the embedded SqlEngine, SQLite in WAL mode on the event loop.

Rules:
- Group commit: writes made during one event-loop turn run inside one open
  transaction; the first write of a turn schedules the COMMIT with
  ``loop.call_soon``. A caller that needs durability awaits ``commit()``, which
  resolves after that COMMIT and an ``fdatasync`` of the WAL (it survives power loss).
- Outside a running loop (tests, recovery) writes commit at the next
  ``commit()`` call.
- sqlite3 calls are fast (microseconds, no fsync with synchronous=NORMAL) and stay
  on the event loop; the WAL fdatasync is a job of the loop's durability barrier
  (storage/durability.py): the engine is a standing source of it, so the pass that
  fsyncs the partitions' appends of a turn also COMMITs and fsyncs this turn's state
  writes, concurrently, in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from conveyor.errors import StorageError
from conveyor.storage.durability import DurabilityBarrier, SyncJob, barrier_for_loop
from conveyor.storage.fs import call_in_thread, fdatasync_descriptor
from conveyor.storage.sql_engine import SQLITE, Dialect, SqlValue
from conveyor.storage.text import check_row

# A COMMIT nobody waits for is fsynced by the next awaited commit, or after this long
# (until then it survives a killed process, not a power cut).
UNSYNCED_FSYNC_DELAY_S = 0.2
# SQLite's default auto-checkpoint is 1,000 pages (4 MiB); ours runs off the loop
CHECKPOINT_WAL_BYTES = 4 << 20
# A checkpointed WAL is reused from its start but keeps its size (no journal_size_limit,
# so its fdatasyncs stay overwrites): once the file has reached CHECKPOINT_WAL_BYTES its
# size no longer says how much is new, and every WAL fdatasync was followed by a
# checkpoint (~360 a second under AMQP acks at 2,000 msg/s, each with an fsync of the
# database file: the p99's neighbours). So past the bound a checkpoint waits for this
# many WAL fdatasyncs since the last one, or for the file to grow by another
# CHECKPOINT_WAL_BYTES (a checkpoint that ran beside COMMITs does not restart the WAL).
CHECKPOINT_SYNCS_MIN = 256
# Only a transaction that begins on a WAL whose every frame is copied starts it over from
# its beginning, and under steady COMMITs (one per loop turn) a checkpoint beside them
# never ends that way: the WAL grew without bound (40 MB after 3,200 AMQP messages at
# 2,000 msg/s, ~12 KB each, every fdatasync allocating new blocks). So a checkpoint runs
# in rounds: the bulk beside the COMMITs, then more beside them, each copying what came
# during the one before, until one copied at most CHECKPOINT_HOLD_FRAMES_MAX frames (4 KiB
# pages: the next one is short too); then a last round while the loop's writes wait in
# memory (``SqlEngine`` writes only buffer; a query releases them at once), after which
# the next transaction restarts the WAL. After CHECKPOINT_ROUNDS_MAX rounds beside the
# COMMITs without getting there, no hold this time (the WAL starts over at a later one).
CHECKPOINT_HOLD_FRAMES_MAX = 128
CHECKPOINT_ROUNDS_MAX = 4


def _resolve(waiters: list[asyncio.Future[None]], error: BaseException | None) -> None:
    failure = None if error is None else StorageError("state store fsync failed",
                                                      error=str(error))
    for waiter in waiters:
        if waiter.done():
            continue
        if failure is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(failure)


class SqliteEngine:
    """SQLite in WAL mode: a reported commit survives power loss.

    The COMMIT runs on the event loop with synchronous=NORMAL (it writes the WAL
    frames, no fsync), then the durability barrier's next pass runs an ``fdatasync`` of
    the WAL file in a worker thread and the committers are answered when it returns:
    as durable as synchronous=FULL, but the event loop never waits for the disk.
    Checkpoints too: SQLite's automatic
    checkpoint (which fsyncs the WAL and the database inside a COMMIT) is off, and
    once the WAL passes ``CHECKPOINT_WAL_BYTES`` a PASSIVE checkpoint runs in a worker
    thread on a connection of its own, one at a time (past the bound, one per
    ``CHECKPOINT_SYNCS_MIN`` WAL fdatasyncs or per ``CHECKPOINT_WAL_BYTES`` of growth).
    """

    dialect: Dialect = SQLITE

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = os.fspath(path)
        self._in_memory = self.path == ":memory:" or self.path.startswith("file::memory:")
        self._connection: Any = None
        self._in_transaction = False
        # waiters of the open transaction, resolved after its COMMIT and the WAL fsync
        self._commit_waiters: list[asyncio.Future[None]] = []
        # waiters of the open transaction's COMMIT alone (committed(): no fsync)
        self._committed_waiters: list[asyncio.Future[None]] = []
        self._commit_scheduled = False
        self._background_sync_handle: asyncio.TimerHandle | None = None
        self._unsynced = False  # a COMMIT ran that no fsync has covered yet
        self._wal_fd: int | None = None
        # committed, waiting for the barrier's next pass / taken by the running pass
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._pass_waiters: list[asyncio.Future[None]] = []
        self._syncing = False  # the running pass fsyncs the WAL for this engine
        self._barrier: DurabilityBarrier | None = None  # the loop's, on first use
        self._checkpointer: Any = None  # its own connection, used only by worker threads
        self._checkpoint: asyncio.Future[None] | None = None  # the running checkpoint
        # a checkpoint's last round runs: writes wait here (query, rows, many)
        self._holding = False
        self._held: list[tuple[str, list[tuple[SqlValue, ...]], bool]] = []
        self._syncs_since_checkpoint = 0  # WAL fdatasyncs since the last checkpoint began
        self._checkpoint_wal_size = 0  # the WAL file's size when it began

    def describe(self) -> str:
        return f"SQLite {self.path}"

    # --- lifecycle ------------------------------------------------------------
    async def open(self) -> None:
        self.open_sync()

    def open_sync(self) -> None:
        if self._connection is not None:
            return
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one per loop turn)
        try:
            connection = sqlite3.connect(self.path, isolation_level=None,
                                         check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as error:
            raise StorageError("cannot open the state database", path=self.path,
                               error=str(error)) from error
        connection.execute("PRAGMA synchronous=FULL" if self._in_memory else
                           "PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        self._connection = connection
        if not self._in_memory:
            connection.execute("PRAGMA wal_autocheckpoint=0")  # ours run off the loop
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                 check_same_thread=False)

    async def close(self) -> None:
        if self._connection is None:
            return
        if self._checkpoint is not None:
            await asyncio.shield(self._checkpoint)
            self._checkpoint = None
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self._commit_now()
        if self._background_sync_handle is not None:
            self._background_sync_handle.cancel()
            self._background_sync_handle = None
        while self._syncing or self._sync_waiters or self._unsynced:
            await self.barrier.flush(self)
        if self._barrier is not None:
            self._barrier.remove_standing(self)
            self._barrier = None
        self._connection.close()
        self._connection = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # --- generic ------------------------------------------------------------
    @property
    def connection(self) -> Any:
        """The sqlite3 connection (for tests and diagnostics)."""
        assert self._connection is not None, "state store not open"
        return self._connection

    def add_schema(self, statements: Iterable[str]) -> None:
        """Run CREATE TABLE/INDEX IF NOT EXISTS statements (idempotent) and commit them."""
        for statement in statements:
            self.write(statement)
        self._commit_now()

    def write(self, query: str, parameters: Sequence[SqlValue] = ()) -> None:
        """Run one write inside this loop turn's transaction."""
        row = tuple(parameters)
        check_row(row)
        if self._holding:
            self._held.append((query, [row], False))
            return
        self._begin()
        try:
            self.connection.execute(self.dialect.sql(query), row)
        except sqlite3.Error as error:
            raise StorageError("state store write failed", error=str(error)) from error

    def write_many(self, query: str, rows: Iterable[Sequence[SqlValue]]) -> None:
        batch = [tuple(row) for row in rows]
        for row in batch:
            check_row(row)
        if self._holding:
            self._held.append((query, batch, True))
            return
        self._begin()
        try:
            self.connection.executemany(self.dialect.sql(query), batch)
        except sqlite3.Error as error:
            raise StorageError("state store write failed", error=str(error)) from error

    def query_now(self, query: str, parameters: Sequence[SqlValue] = ()
                  ) -> list[tuple[Any, ...]]:
        if self._held:
            self._release()  # read your writes (this checkpoint restarts no WAL then)
        try:
            cursor = self.connection.execute(self.dialect.sql(query), tuple(parameters))
            return [tuple(row) for row in cursor.fetchall()]
        except sqlite3.Error as error:
            raise StorageError("state store query failed", error=str(error)) from error

    async def query(self, query: str, parameters: Sequence[SqlValue] = ()
                    ) -> list[tuple[Any, ...]]:
        # Synchronous underneath (microseconds): no await, so no interleaving either.
        return self.query_now(query, parameters)

    async def commit(self) -> None:
        """Wait until every write made so far is committed (durable)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._held:
            self._commit_waiters.append(future)  # the writes go in when the round ends
        elif self._in_transaction:
            self._commit_waiters.append(future)
            self._schedule_commit()
            self.barrier.mark_dirty(self)  # the pass COMMITs it, if it comes first
        elif self._unsynced:
            # committed already by a COMMIT nobody waited for: the next pass fsyncs it
            self._sync_waiters.append(future)
            self.barrier.mark_dirty(self)
        elif self._syncing:
            self._pass_waiters.append(future)  # the running pass's fsync covers it
        else:
            return
        await future

    async def committed(self) -> None:
        """Wait until every write made so far is COMMITted, not fsynced: it is in the
        WAL file, so it survives a killed process (the page cache stays), not a power
        cut (``commit()`` waits for that). The COMMIT runs at the end of this loop turn
        as scheduled by the first write; nothing is scheduled for it here."""
        if not self._in_transaction and not self._held:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._committed_waiters.append(future)
        await future

    @property
    def barrier(self) -> DurabilityBarrier:
        if self._barrier is None:
            self._barrier = barrier_for_loop()
            self._barrier.add_standing(self)  # every pass commits and fsyncs this turn's writes
        return self._barrier

    # --- group commit -----------------------------------------------------------
    def _begin(self) -> None:
        if self._in_transaction:
            return
        self.connection.execute("BEGIN")
        self._in_transaction = True
        # every write commits at the end of this loop turn; who awaits commit() also
        # waits for the fsync, the rest is fsynced later (see _commit_now)
        self._schedule_commit()

    def _schedule_commit(self) -> None:
        """Someone awaits durability: COMMIT at the end of this loop turn."""
        if self._commit_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # committed by the next commit()/close()
        self._commit_scheduled = True
        loop.call_soon(self._commit_now)

    def _commit_now(self) -> None:
        self._commit_scheduled = False
        if self._held:
            return  # the waiters wait for the held writes: _release begins their turn
        waiters, self._commit_waiters = self._commit_waiters, []
        committed, self._committed_waiters = self._committed_waiters, []
        if not self._in_transaction or self._connection is None:
            for waiter in waiters + committed:
                if not waiter.done():
                    waiter.set_result(None)
            return
        self._in_transaction = False
        try:
            self._connection.execute("COMMIT")
        except sqlite3.Error as error:
            failure = StorageError("state store commit failed", error=str(error))
            if self._connection.in_transaction:
                # the turn's writes are lost as a whole; their callers get the error
                self._connection.execute("ROLLBACK")
            for waiter in waiters + committed:
                if not waiter.done():
                    waiter.set_exception(failure)
            return
        self._unsynced = True
        for waiter in committed:
            if not waiter.done():
                waiter.set_result(None)
        if self._in_memory:
            _resolve(waiters, None)  # nothing to fsync
            return
        try:
            barrier = self.barrier
        except RuntimeError:  # no running loop: the next commit()/close() syncs
            return
        if waiters:
            self._sync_waiters += waiters
            barrier.mark_dirty(self)
        elif self._background_sync_handle is None:
            # nobody waits: the next pass (someone's append or commit) covers it, or this
            self._background_sync_handle = asyncio.get_running_loop().call_later(
                UNSYNCED_FSYNC_DELAY_S, self._background_sync)

    def _background_sync(self) -> None:
        self._background_sync_handle = None
        if self._unsynced and self._connection is not None:
            self.barrier.mark_dirty(self)

    # --- the barrier's source -------------------------------------------------------
    def prepare_sync(self) -> list[SyncJob]:
        """The pass begins: COMMIT the open transaction, take the waiters, and fsync the
        WAL (when a COMMIT since the last pass needs it)."""
        if self._in_transaction:
            self._commit_now()
        self._pass_waiters, self._sync_waiters = self._pass_waiters + self._sync_waiters, []
        if self._connection is None or self._in_memory:
            self._unsynced = False  # nothing to fsync
        if not self._unsynced:
            return []
        self._unsynced = False
        if self._background_sync_handle is not None:
            self._background_sync_handle.cancel()
            self._background_sync_handle = None
        fd = self._open_wal()
        if fd is None:
            return []
        self._syncing = True
        return [self._wal_sync_job(fd)]

    def sync_done(self, error: BaseException | None) -> None:
        waiters, self._pass_waiters = self._pass_waiters, []
        synced, self._syncing = self._syncing, False
        _resolve(waiters, error)
        if synced and error is None and self._wal_fd is not None:
            self._maybe_checkpoint(self._wal_fd)

    def _wal_sync_job(self, wal_fd: int) -> SyncJob:
        """The blocking call that makes every COMMIT so far durable (a worker thread)."""
        return functools.partial(fdatasync_descriptor, wal_fd)

    # --- the WAL fdatasync --------------------------------------------------------
    def _open_wal(self) -> int | None:
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
            except FileNotFoundError:
                return None
        return self._wal_fd

    def _maybe_checkpoint(self, wal_fd: int) -> None:
        self._syncs_since_checkpoint += 1
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._checkpoint = None
        if self._checkpointer is None:
            return
        size = os.fstat(wal_fd).st_size
        if size < CHECKPOINT_WAL_BYTES:
            return
        if (self._syncs_since_checkpoint < CHECKPOINT_SYNCS_MIN
                and size < self._checkpoint_wal_size + CHECKPOINT_WAL_BYTES):
            return
        self._syncs_since_checkpoint = 0
        self._checkpoint_wal_size = size
        self._checkpoint = asyncio.get_running_loop().create_future()
        self._checkpoint_round(held=False, frames_before=0, number=1)

    def _checkpoint_round(self, held: bool, frames_before: int, number: int) -> None:
        """One round of a checkpoint (``CHECKPOINT_SYNCS_MIN``'s comment): the bulk and
        then rounds beside the COMMITs, each copying what came during the one before,
        until one copied at most ``CHECKPOINT_HOLD_FRAMES_MAX`` frames (so the next is
        short too); then a last round with the loop's writes held, after which the WAL
        starts over. ``_checkpoint`` ends with the last round."""
        if held:
            if self._in_transaction:
                self._commit_now()  # this turn's writes so far: COMMITted now, not held
            self._holding = True
        call_in_thread(self._run_checkpoint).add_done_callback(
            functools.partial(self._round_done, held, frames_before, number))

    def _round_done(self, held: bool, frames_before: int, number: int,
                    round_: asyncio.Future[int | None]) -> None:
        frames = None if round_.cancelled() or round_.exception() else round_.result()
        if held:
            self._release()
        elif self._connection is not None and frames is not None:
            if frames - frames_before <= CHECKPOINT_HOLD_FRAMES_MAX:
                self._checkpoint_round(held=True, frames_before=frames, number=number + 1)
                return
            if number < CHECKPOINT_ROUNDS_MAX:
                self._checkpoint_round(held=False, frames_before=frames, number=number + 1)
                return
            # the COMMITs outpace it: no hold (nor restart) this time
        if self._checkpoint is not None and not self._checkpoint.done():
            self._checkpoint.set_result(None)

    def _release(self) -> None:
        """End the hold: the held writes go into this turn's transaction, in order. A
        failed one fails the turn as a failed COMMIT does (its writes lost as a whole,
        every waiter told)."""
        self._holding = False
        held, self._held = self._held, []
        if self._connection is None:
            return
        if held:
            self._begin()
        try:
            for query, rows, many in held:
                sql = self.dialect.sql(query)
                if many:
                    self._connection.executemany(sql, rows)
                else:
                    self._connection.execute(sql, rows[0])
        except sqlite3.Error as error:
            self._fail_transaction(StorageError("state store write failed",
                                                error=str(error)))
            return
        if self._commit_waiters or self._committed_waiters:
            self._schedule_commit()

    def _fail_transaction(self, failure: StorageError) -> None:
        self._in_transaction = False
        if self._connection is not None and self._connection.in_transaction:
            self._connection.execute("ROLLBACK")
        waiters, self._commit_waiters = self._commit_waiters, []
        committed, self._committed_waiters = self._committed_waiters, []
        for waiter in waiters + committed:
            if not waiter.done():
                waiter.set_exception(failure)

    def _run_checkpoint(self) -> int | None:
        """In a worker thread: copy committed WAL frames into the database (and fsync
        it). The WAL's frames when it began (since its last start over); None: it failed,
        left for the next try."""
        try:
            _, frames, _ = self._checkpointer.execute(
                "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return None
        return int(frames)
