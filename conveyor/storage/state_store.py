"""StateStore: the broker's durable metadata over one SQL schema.

Owns: topics (+ config), queues, exchanges, bindings, ordered-group committed
offsets and group metadata, producer ids/epochs and their last sequences per
partition, a counter table. Shared-group state (conveyor/storage/shared_state.py)
adds its own tables on the same connection through ``add_schema`` / ``write`` /
``query`` / ``commit``.

Must not know: the broker's classes, protocols, files other than its database.

Rules:
- Every query is written once, with ``?`` placeholders and the standard
  ``INSERT ... ON CONFLICT (...) DO UPDATE SET col = excluded.col`` upsert that
  SQLite (>= 3.24) and PostgreSQL both accept. ``Dialect.sql`` rewrites the
  placeholders for a backend that needs ``%s``: that is the whole dialect seam.
- Group commit: writes made during one event-loop turn run inside one open
  transaction; the first write of a turn schedules the COMMIT with
  ``loop.call_soon``. A caller that needs durability awaits ``commit()``, which
  resolves after that COMMIT (WAL + synchronous=FULL: it survives power loss).
- Outside a running loop (tests, recovery) writes commit at the next
  ``commit()`` call.
- sqlite3 calls are fast (microseconds, one fsync per COMMIT) and stay on the
  event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from conveyor.errors import StorageError
from conveyor.storage.fs import (
    call_in_thread,
    fdatasync_descriptor,
    fdatasync_descriptor_in_thread,
)

SqlValue = int | float | str | bytes | None


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between SQL backends: the placeholder and the blob type name."""

    name: str
    placeholder: str = "?"
    blob_type: str = "BLOB"

    def sql(self, query: str) -> str:
        query = query.replace("{blob}", self.blob_type)
        if self.placeholder == "?":
            return query
        return query.replace("?", self.placeholder)


SQLITE = Dialect("sqlite")
POSTGRESQL = Dialect("postgresql", placeholder="%s", blob_type="BYTEA")


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


SCHEMA: tuple[str, ...] = (
    # counters: next producer id, ...
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    # config: JSON object of TopicConfig field names -> values
    """CREATE TABLE IF NOT EXISTS topics (
        name TEXT PRIMARY KEY, partitions INTEGER NOT NULL, kind TEXT NOT NULL,
        config TEXT NOT NULL, created_ms BIGINT NOT NULL)""",
    # config: JSON object of QueueConfig field names -> values
    """CREATE TABLE IF NOT EXISTS queues (
        name TEXT PRIMARY KEY, config TEXT NOT NULL, created_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS exchanges (
        name TEXT PRIMARY KEY, type TEXT NOT NULL, durable INTEGER NOT NULL,
        auto_delete INTEGER NOT NULL, internal INTEGER NOT NULL, alternate_exchange TEXT,
        arguments TEXT NOT NULL)""",
    # arguments: JSON list of [name, value] pairs, part of a binding's identity
    """CREATE TABLE IF NOT EXISTS bindings (
        source TEXT NOT NULL, destination_kind TEXT NOT NULL, destination TEXT NOT NULL,
        routing_key TEXT NOT NULL, arguments TEXT NOT NULL,
        PRIMARY KEY (source, destination_kind, destination, routing_key, arguments))""",
    """CREATE TABLE IF NOT EXISTS group_offsets (
        group_id TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        committed_offset BIGINT NOT NULL, metadata TEXT, leader_epoch INTEGER NOT NULL,
        commit_ms BIGINT NOT NULL, PRIMARY KEY (group_id, topic, partition))""",
    # state: JSON of what the coordinator needs across restarts (generation, protocol...)
    """CREATE TABLE IF NOT EXISTS groups (
        group_id TEXT PRIMARY KEY, state TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS producers (
        producer_id BIGINT PRIMARY KEY, epoch INTEGER NOT NULL, transactional_id TEXT)""",
    # batches: JSON list of [base_sequence, last_sequence, base_offset, last_offset]
    """CREATE TABLE IF NOT EXISTS producer_sequences (
        producer_id BIGINT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        epoch INTEGER NOT NULL, batches TEXT NOT NULL,
        PRIMARY KEY (producer_id, topic, partition))""",
    # next_offset: producer state reflects the partition's log below this offset;
    # on open the log is scanned from here to the high watermark (crash recovery)
    """CREATE TABLE IF NOT EXISTS producer_checkpoints (
        topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, partition))""",
)


# --- rows ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TopicRow:
    name: str
    partitions: int
    kind: str
    config: dict[str, Any]
    created_ms: int


@dataclass(frozen=True, slots=True)
class QueueRow:
    name: str
    config: dict[str, Any]
    created_ms: int


@dataclass(frozen=True, slots=True)
class ExchangeRow:
    name: str
    type: str
    durable: bool
    auto_delete: bool
    internal: bool
    alternate_exchange: str | None
    arguments: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class BindingRow:
    source: str
    destination_kind: str
    destination: str
    routing_key: str
    arguments: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class CommittedOffsetRow:
    group_id: str
    topic: str
    partition: int
    committed_offset: int
    metadata: str | None
    leader_epoch: int
    commit_ms: int


@dataclass(frozen=True, slots=True)
class ProducerRow:
    producer_id: int
    epoch: int
    transactional_id: str | None


@dataclass(frozen=True, slots=True)
class ProducerSequenceRow:
    producer_id: int
    topic: str
    partition: int
    epoch: int
    # last batches, oldest first: (base_sequence, last_sequence, base_offset, last_offset)
    batches: tuple[tuple[int, int, int, int], ...]


class StateStore(Protocol):
    """What the broker needs from a metadata database (SQLite now, PostgreSQL later)."""

    dialect: Dialect

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # generic access (used by shared_state.py for its own tables)
    def add_schema(self, statements: Iterable[str]) -> None: ...
    def write(self, query: str, parameters: Sequence[SqlValue] = ()) -> None: ...
    def write_many(self, query: str, rows: Iterable[Sequence[SqlValue]]) -> None: ...
    def query(self, query: str, parameters: Sequence[SqlValue] = ()) -> list[tuple[Any, ...]]: ...
    async def commit(self) -> None: ...

    # metadata
    def save_topic(self, row: TopicRow) -> None: ...
    def delete_topic(self, name: str) -> None: ...
    def load_topics(self) -> list[TopicRow]: ...
    def save_queue(self, row: QueueRow) -> None: ...
    def delete_queue(self, name: str) -> None: ...
    def load_queues(self) -> list[QueueRow]: ...
    def save_exchange(self, row: ExchangeRow) -> None: ...
    def delete_exchange(self, name: str) -> None: ...
    def load_exchanges(self) -> list[ExchangeRow]: ...
    def save_binding(self, row: BindingRow) -> None: ...
    def delete_binding(self, row: BindingRow) -> None: ...
    def load_bindings(self) -> list[BindingRow]: ...

    # ordered groups
    def save_committed_offsets(self, rows: Iterable[CommittedOffsetRow]) -> None: ...
    def load_committed_offsets(self, group_id: str | None = None) -> list[CommittedOffsetRow]: ...
    def delete_committed_offsets(self, group_id: str, topic: str | None = None) -> None: ...
    def save_group(self, group_id: str, state: dict[str, Any]) -> None: ...
    def delete_group(self, group_id: str) -> None: ...
    def load_groups(self) -> dict[str, dict[str, Any]]: ...

    # producers
    def next_counter(self, name: str, start: int = 0) -> int: ...
    def save_producer(self, row: ProducerRow) -> None: ...
    def load_producers(self) -> list[ProducerRow]: ...
    def save_producer_sequences(self, row: ProducerSequenceRow) -> None: ...
    def load_producer_sequences(self) -> list[ProducerSequenceRow]: ...
    def delete_producer_sequences_for_topic(self, topic: str) -> None: ...
    def save_producer_checkpoint(self, topic: str, partition: int, next_offset: int) -> None: ...
    def load_producer_checkpoints(self) -> dict[tuple[str, int], int]: ...


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def _pairs_json(pairs: Sequence[tuple[str, str]]) -> str:
    return json.dumps([list(pair) for pair in pairs], sort_keys=False)


# A COMMIT nobody waits for is fsynced by the next awaited commit, or after this long
# (until then it survives a killed process, not a power cut).
UNSYNCED_FSYNC_DELAY_S = 0.2
# SQLite's default auto-checkpoint is 1,000 pages (4 MiB); ours runs off the loop
CHECKPOINT_WAL_BYTES = 4 << 20


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


class SqlStateStore:
    """The queries, over a DB-API connection; subclasses supply the connection + dialect."""

    dialect: Dialect = SQLITE

    def __init__(self) -> None:
        self._connection: Any = None
        self._in_transaction = False
        # waiters of the open transaction, resolved after its COMMIT
        self._commit_waiters: list[asyncio.Future[None]] = []
        self._commit_scheduled = False
        self._background_sync_handle: asyncio.TimerHandle | None = None
        self._unsynced = False  # a COMMIT ran that no fsync has covered yet

    # --- generic ------------------------------------------------------------
    @property
    def connection(self) -> Any:
        """The DB-API connection (read with ``query``; write with ``write``)."""
        assert self._connection is not None, "state store not open"
        return self._connection

    def add_schema(self, statements: Iterable[str]) -> None:
        """Run CREATE TABLE/INDEX IF NOT EXISTS statements (idempotent) and commit them."""
        for statement in statements:
            self.write(statement)
        self._commit_now()

    def write(self, query: str, parameters: Sequence[SqlValue] = ()) -> None:
        """Run one write inside this loop turn's transaction."""
        self._begin()
        try:
            self.connection.execute(self.dialect.sql(query), tuple(parameters))
        except sqlite3.Error as error:
            raise StorageError("state store write failed", error=str(error)) from error

    def write_many(self, query: str, rows: Iterable[Sequence[SqlValue]]) -> None:
        self._begin()
        try:
            self.connection.executemany(self.dialect.sql(query), [tuple(row) for row in rows])
        except sqlite3.Error as error:
            raise StorageError("state store write failed", error=str(error)) from error

    def query(self, query: str, parameters: Sequence[SqlValue] = ()) -> list[tuple[Any, ...]]:
        cursor = self.connection.execute(self.dialect.sql(query), tuple(parameters))
        return [tuple(row) for row in cursor.fetchall()]

    async def commit(self) -> None:
        """Wait until every write made so far is committed (durable)."""
        if not self._in_transaction:
            # committed already, maybe by a COMMIT nobody waited for, or one whose fsync
            # is still running: durable only once an fsync after it has returned
            sync = self._sync_committed()
            if sync is not None:
                await asyncio.shield(sync)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # pragma: no cover - only from sync code
            self._commit_now()
            return
        future: asyncio.Future[None] = loop.create_future()
        self._commit_waiters.append(future)
        self._schedule_commit()
        await future

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
        waiters, self._commit_waiters = self._commit_waiters, []
        if not self._in_transaction or self._connection is None:
            for waiter in waiters:
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
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(failure)
            return
        self._unsynced = True
        if not waiters:
            # nobody waits: the next awaited commit's fsync covers this one, or this timer
            if self._background_sync_handle is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return
                self._background_sync_handle = loop.call_later(UNSYNCED_FSYNC_DELAY_S,
                                                         self._background_sync)
            return
        fsync = self._sync_committed()
        if fsync is None:
            _resolve(waiters, None)
            return
        fsync.add_done_callback(lambda done: _resolve(
            waiters, StorageError("fsync cancelled") if done.cancelled() else done.exception()))

    def _background_sync(self) -> None:
        self._background_sync_handle = None
        self._sync_committed()

    def _sync_committed(self) -> asyncio.Future[None] | None:
        """A future for an fsync covering every COMMIT so far (started now if the last
        COMMIT had none), or None when they are durable already (the base class: the
        COMMIT itself is durable)."""
        self._unsynced = False
        return None

    # --- topics, queues ------------------------------------------------------
    def save_topic(self, row: TopicRow) -> None:
        self.write(
            upsert_sql("topics", ["name"], ["partitions", "kind", "config", "created_ms"]),
            (row.name, row.partitions, row.kind, json.dumps(row.config), row.created_ms),
        )

    def delete_topic(self, name: str) -> None:
        self.write("DELETE FROM topics WHERE name = ?", (name,))

    def load_topics(self) -> list[TopicRow]:
        rows = self.query("SELECT name, partitions, kind, config, created_ms FROM topics")
        return [TopicRow(r[0], int(r[1]), r[2], json.loads(r[3]), int(r[4])) for r in rows]

    def save_queue(self, row: QueueRow) -> None:
        self.write(
            upsert_sql("queues", ["name"], ["config", "created_ms"]),
            (row.name, json.dumps(row.config), row.created_ms),
        )

    def delete_queue(self, name: str) -> None:
        self.write("DELETE FROM queues WHERE name = ?", (name,))

    def load_queues(self) -> list[QueueRow]:
        rows = self.query("SELECT name, config, created_ms FROM queues")
        return [QueueRow(r[0], json.loads(r[1]), int(r[2])) for r in rows]

    # --- exchanges, bindings -------------------------------------------------
    def save_exchange(self, row: ExchangeRow) -> None:
        self.write(
            upsert_sql(
                "exchanges",
                ["name"],
                ["type", "durable", "auto_delete", "internal", "alternate_exchange", "arguments"],
            ),
            (
                row.name, row.type, int(row.durable), int(row.auto_delete), int(row.internal),
                row.alternate_exchange, _pairs_json(row.arguments),
            ),
        )

    def delete_exchange(self, name: str) -> None:
        self.write("DELETE FROM exchanges WHERE name = ?", (name,))
        self.write("DELETE FROM bindings WHERE source = ?", (name,))
        self.write(
            "DELETE FROM bindings WHERE destination_kind = 'exchange' AND destination = ?", (name,)
        )

    def load_exchanges(self) -> list[ExchangeRow]:
        rows = self.query(
            "SELECT name, type, durable, auto_delete, internal, alternate_exchange, arguments"
            " FROM exchanges"
        )
        return [
            ExchangeRow(r[0], r[1], bool(r[2]), bool(r[3]), bool(r[4]), r[5], _pairs(r[6]))
            for r in rows
        ]

    def save_binding(self, row: BindingRow) -> None:
        self.write(
            upsert_sql(
                "bindings",
                ["source", "destination_kind", "destination", "routing_key", "arguments"],
                [],
            ),
            (row.source, row.destination_kind, row.destination, row.routing_key,
             _pairs_json(row.arguments)),
        )

    def delete_binding(self, row: BindingRow) -> None:
        self.write(
            "DELETE FROM bindings WHERE source = ? AND destination_kind = ? AND destination = ?"
            " AND routing_key = ? AND arguments = ?",
            (row.source, row.destination_kind, row.destination, row.routing_key,
             _pairs_json(row.arguments)),
        )

    def load_bindings(self) -> list[BindingRow]:
        rows = self.query(
            "SELECT source, destination_kind, destination, routing_key, arguments FROM bindings"
            " ORDER BY source, destination_kind, destination, routing_key"
        )
        return [BindingRow(r[0], r[1], r[2], r[3], _pairs(r[4])) for r in rows]

    # --- ordered groups ------------------------------------------------------
    def save_committed_offsets(self, rows: Iterable[CommittedOffsetRow]) -> None:
        self.write_many(
            upsert_sql(
                "group_offsets",
                ["group_id", "topic", "partition"],
                ["committed_offset", "metadata", "leader_epoch", "commit_ms"],
            ),
            [
                (r.group_id, r.topic, r.partition, r.committed_offset, r.metadata,
                 r.leader_epoch, r.commit_ms)
                for r in rows
            ],
        )

    def load_committed_offsets(self, group_id: str | None = None) -> list[CommittedOffsetRow]:
        select = (
            "SELECT group_id, topic, partition, committed_offset, metadata, leader_epoch,"
            " commit_ms FROM group_offsets"
        )
        if group_id is None:
            rows = self.query(select)
        else:
            rows = self.query(select + " WHERE group_id = ?", (group_id,))
        return [
            CommittedOffsetRow(r[0], r[1], int(r[2]), int(r[3]), r[4], int(r[5]), int(r[6]))
            for r in rows
        ]

    def delete_committed_offsets(self, group_id: str, topic: str | None = None) -> None:
        if topic is None:
            self.write("DELETE FROM group_offsets WHERE group_id = ?", (group_id,))
        else:
            self.write(
                "DELETE FROM group_offsets WHERE group_id = ? AND topic = ?", (group_id, topic)
            )

    def save_group(self, group_id: str, state: dict[str, Any]) -> None:
        self.write(upsert_sql("groups", ["group_id"], ["state"]), (group_id, json.dumps(state)))

    def delete_group(self, group_id: str) -> None:
        self.write("DELETE FROM groups WHERE group_id = ?", (group_id,))
        self.delete_committed_offsets(group_id)

    def load_groups(self) -> dict[str, dict[str, Any]]:
        return {r[0]: json.loads(r[1]) for r in self.query("SELECT group_id, state FROM groups")}

    # --- producers -----------------------------------------------------------
    def next_counter(self, name: str, start: int = 0) -> int:
        """Return the counter's current value (``start`` if new) and store value + 1."""
        rows = self.query("SELECT value FROM counters WHERE name = ?", (name,))
        value = int(rows[0][0]) if rows else start
        self.write(upsert_sql("counters", ["name"], ["value"]), (name, value + 1))
        return value

    def save_producer(self, row: ProducerRow) -> None:
        self.write(
            upsert_sql("producers", ["producer_id"], ["epoch", "transactional_id"]),
            (row.producer_id, row.epoch, row.transactional_id),
        )

    def load_producers(self) -> list[ProducerRow]:
        rows = self.query("SELECT producer_id, epoch, transactional_id FROM producers")
        return [ProducerRow(int(r[0]), int(r[1]), r[2]) for r in rows]

    def save_producer_sequences(self, row: ProducerSequenceRow) -> None:
        self.write(
            upsert_sql(
                "producer_sequences", ["producer_id", "topic", "partition"], ["epoch", "batches"]
            ),
            (row.producer_id, row.topic, row.partition, row.epoch,
             json.dumps([list(batch) for batch in row.batches])),
        )

    def load_producer_sequences(self) -> list[ProducerSequenceRow]:
        rows = self.query(
            "SELECT producer_id, topic, partition, epoch, batches FROM producer_sequences"
        )
        result = []
        for r in rows:
            batches = tuple(
                (int(b[0]), int(b[1]), int(b[2]), int(b[3])) for b in json.loads(r[4])
            )
            result.append(ProducerSequenceRow(int(r[0]), r[1], int(r[2]), int(r[3]), batches))
        return result

    def delete_producer_sequences_for_topic(self, topic: str) -> None:
        self.write("DELETE FROM producer_sequences WHERE topic = ?", (topic,))
        self.write("DELETE FROM producer_checkpoints WHERE topic = ?", (topic,))

    def save_producer_checkpoint(self, topic: str, partition: int, next_offset: int) -> None:
        self.write(
            upsert_sql("producer_checkpoints", ["topic", "partition"], ["next_offset"]),
            (topic, partition, next_offset),
        )

    def load_producer_checkpoints(self) -> dict[tuple[str, int], int]:
        rows = self.query("SELECT topic, partition, next_offset FROM producer_checkpoints")
        return {(r[0], int(r[1])): int(r[2]) for r in rows}


class SqliteStateStore(SqlStateStore):
    """SQLite in WAL mode: a reported commit survives power loss.

    The COMMIT runs on the event loop with synchronous=NORMAL (it writes the WAL
    frames, no fsync), then an ``fdatasync`` of the WAL file runs in a worker thread and
    the committers are answered when it returns: as durable as synchronous=FULL, but
    the event loop never waits for the disk. Checkpoints too: SQLite's automatic
    checkpoint (which fsyncs the WAL and the database inside a COMMIT) is off, and
    once the WAL passes ``CHECKPOINT_WAL_BYTES`` a PASSIVE checkpoint runs in a worker
    thread on a connection of its own, one at a time.
    """

    dialect = SQLITE

    def __init__(self, path: str | Path = ":memory:") -> None:
        super().__init__()
        self.path = str(path)
        self._in_memory = self.path == ":memory:" or self.path.startswith("file::memory:")
        self._wal_fd: int | None = None
        self._last_sync: asyncio.Future[None] | None = None  # the newest WAL fdatasync
        self._checkpointer: Any = None  # its own connection, used only by worker threads
        self._checkpoint: asyncio.Future[None] | None = None  # the running checkpoint

    async def open(self) -> None:
        self.open_sync()

    def open_sync(self) -> None:
        if self._connection is not None:
            return
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one per loop turn)
        connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL" if self._in_memory else
                           "PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        self._connection = connection
        self.add_schema(SCHEMA)
        if not self._in_memory:
            connection.execute("PRAGMA wal_autocheckpoint=0")  # ours run off the loop
            self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                 check_same_thread=False)
            self._sync_wal()  # the schema's commit, durable before anything else
        self._unsynced = False

    def _open_wal(self) -> int | None:
        if self._wal_fd is None:
            try:
                self._wal_fd = os.open(self.path + "-wal", os.O_RDONLY)
            except FileNotFoundError:
                return None
        return self._wal_fd

    def _sync_wal(self) -> None:
        fd = self._open_wal()
        if fd is not None:
            fdatasync_descriptor(fd)

    def _sync_committed(self) -> asyncio.Future[None] | None:
        if self._unsynced:
            self._unsynced = False
            fd = self._open_wal()
            if fd is not None and not self._in_memory:
                self._last_sync = fdatasync_descriptor_in_thread(fd)
                self._maybe_checkpoint(fd)
        if self._last_sync is not None and self._last_sync.done():
            self._last_sync = None
        return self._last_sync

    def _maybe_checkpoint(self, wal_fd: int) -> None:
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        self._checkpoint = None
        if self._checkpointer is None or os.fstat(wal_fd).st_size < CHECKPOINT_WAL_BYTES:
            return
        self._checkpoint = call_in_thread(self._run_checkpoint)

    def _run_checkpoint(self) -> None:
        """In a worker thread: copy committed WAL frames into the database (and fsync it);
        the next writer then starts the WAL over. A failure is left for the next try."""
        try:
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass

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
        if self._last_sync is not None:
            await asyncio.shield(self._last_sync)
        if not self._in_memory:
            self._sync_wal()
        self._connection.close()
        self._connection = None
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
