"""StateStore: the broker's durable metadata, as domain operations.

Owns: the ``StateStore`` interface the broker calls (save/load/delete of topics,
queues, exchanges, bindings, ordered-group committed offsets and group metadata,
group configs, producer ids/epochs and their last sequences per partition,
counters, shared-group state through ``shared``, Kafka transactions through
``txn``, a transaction's pending offsets at the group's coordinator through
``txn_offsets`` and KIP-848 / KIP-932 group members through ``members``), its row types, and
``SqlStateStore``: those operations as SQL over an ``SqlEngine`` (SQLite or
PostgreSQL; see sql_engine.py). No SQL text crosses the interface.

Must not know: the broker's classes, protocols, files other than its database.

Rules:
- Saves and deletes are synchronous and land in the engine's per-loop-turn
  transaction; a caller that needs them durable awaits ``commit()``.
- A cluster node's offset commit is ``save_committed_offsets_guarded``: its own
  transaction, written only if the node's owner fence (an opaque ``WriteGuard``
  from conveyor/cluster) still holds inside it.
- Loads are async (a round trip on PostgreSQL) and run when the broker opens,
  plus the shared-group loads of a group declared at run time.
- The schema carries a version (table ``conveyor_schema``); ``open()`` applies
  the missing migrations and refuses a database of a newer version.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from conveyor.errors import StorageError
from conveyor.storage.member_state import MemberStateStore
from conveyor.storage.security_state import SecurityStateStore
from conveyor.storage.shared_state import SCHEMA as SHARED_SCHEMA
from conveyor.storage.shared_state import SharedStateStore
from conveyor.storage.sql_engine import (
    POSTGRESQL,
    POSTGRESQL_NUMBERED,
    SQLITE,
    Dialect,
    GuardedStatement,
    GuardedWrites,
    SqlEngine,
    SqlValue,
    WriteGuard,
    upsert_sql,
)
from conveyor.storage.sqlite_engine import SqliteEngine
from conveyor.storage.txn_offsets_state import TxnOffsetsStateStore
from conveyor.storage.txn_state import TxnStateStore

__all__ = [
    "POSTGRESQL", "POSTGRESQL_NUMBERED", "SCHEMA", "SQLITE", "Dialect", "SqlStateStore",
    "SqlValue", "SqliteStateStore", "StateStore", "upsert_sql",
]

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
    # config: JSON object of a group's explicitly set Kafka 4 group configs
    """CREATE TABLE IF NOT EXISTS group_configs (
        group_name TEXT PRIMARY KEY, config TEXT NOT NULL)""",
)

# Schema versions: migration N brings a database from version N-1 to N. Every
# statement is idempotent, so a database made before versioning (no conveyor_schema
# row) is brought to version 1 by running migration 1.
SCHEMA_VERSION = 1
MIGRATIONS: dict[int, tuple[str, ...]] = {1: SCHEMA + SHARED_SCHEMA}
VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS conveyor_schema ("
    " singleton INTEGER PRIMARY KEY, version INTEGER NOT NULL)"
)


_OFFSETS_UPSERT = upsert_sql("group_offsets", ["group_id", "topic", "partition"],
                             ["committed_offset", "metadata", "leader_epoch", "commit_ms"])

_GROUP_UPSERT = upsert_sql("groups", ["group_id"], ["state"])


async def guarded(engine: SqlEngine, guard: WriteGuard,
                  statements: Sequence[GuardedStatement]) -> bool:
    """``statements`` in a transaction of their own under ``guard`` (sql_engine.py);
    needs an engine with guarded writes (PostgreSQL)."""
    if not hasattr(engine, "write_guarded"):
        raise StorageError("guarded writes need the PostgreSQL state store",
                           engine=type(engine).__name__)
    return await cast(GuardedWrites, engine).write_guarded(guard, statements)


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
    """What the broker needs from a metadata database: domain operations only."""

    shared: SharedStateStore  # shared-group state (shared_state.py)
    security: SecurityStateStore  # users, vhosts, permissions, ACLs (security_state.py)
    txn: TxnStateStore  # Kafka transactions (txn_state.py)
    txn_offsets: TxnOffsetsStateStore  # pending transactional offsets (txn_offsets_state.py)
    members: MemberStateStore  # KIP-848 / KIP-932 group members (member_state.py)

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def commit(self) -> None: ...
    def describe(self) -> str: ...

    # metadata
    def save_topic(self, row: TopicRow) -> None: ...
    def delete_topic(self, name: str) -> None: ...
    async def load_topics(self) -> list[TopicRow]: ...
    def save_queue(self, row: QueueRow) -> None: ...
    def delete_queue(self, name: str) -> None: ...
    async def load_queues(self) -> list[QueueRow]: ...
    def save_exchange(self, row: ExchangeRow) -> None: ...
    def delete_exchange(self, name: str) -> None: ...
    async def load_exchanges(self) -> list[ExchangeRow]: ...
    def save_binding(self, row: BindingRow) -> None: ...
    def delete_binding(self, row: BindingRow) -> None: ...
    async def load_bindings(self) -> list[BindingRow]: ...

    # ordered groups
    def save_committed_offsets(self, rows: Iterable[CommittedOffsetRow]) -> None: ...
    async def save_committed_offsets_guarded(self, rows: Sequence[CommittedOffsetRow],
                                             guard: WriteGuard) -> bool: ...
    async def load_committed_offsets(self, group_id: str | None = None
                                     ) -> list[CommittedOffsetRow]: ...
    def delete_committed_offsets(self, group_id: str, topic: str | None = None) -> None: ...
    def save_group(self, group_id: str, state: dict[str, Any]) -> None: ...
    async def save_group_guarded(self, group_id: str, state: dict[str, Any],
                                 guard: WriteGuard) -> bool: ...
    def delete_group(self, group_id: str) -> None: ...
    async def delete_group_guarded(self, group_id: str, guard: WriteGuard) -> bool: ...
    async def load_groups(self) -> dict[str, dict[str, Any]]: ...
    def save_group_config(self, group: str, config: dict[str, str]) -> None: ...
    def delete_group_config(self, group: str) -> None: ...
    async def load_group_configs(self) -> dict[str, dict[str, str]]: ...

    # producers
    def next_counter(self, name: str, start: int = 0) -> int: ...
    def save_producer(self, row: ProducerRow) -> None: ...
    def delete_producer(self, producer_id: int) -> None: ...
    async def load_producers(self) -> list[ProducerRow]: ...
    def save_producer_sequences(self, row: ProducerSequenceRow) -> None: ...
    async def load_producer_sequences(self) -> list[ProducerSequenceRow]: ...
    def delete_producer_sequences_for_topic(self, topic: str) -> None: ...
    def save_producer_checkpoint(self, topic: str, partition: int, next_offset: int) -> None: ...
    async def load_producer_checkpoints(self) -> dict[tuple[str, int], int]: ...


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def _pairs_json(pairs: Sequence[tuple[str, str]]) -> str:
    return json.dumps([list(pair) for pair in pairs], sort_keys=False)


class SqlStateStore:
    """The StateStore's operations as SQL over an engine (SqliteEngine, PostgresEngine)."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine
        self.shared = SharedStateStore(engine)
        self.security = SecurityStateStore(engine)
        self.txn = TxnStateStore(engine)
        self.txn_offsets = TxnOffsetsStateStore(engine)
        self.members = MemberStateStore(engine)
        self._counters: dict[str, int] = {}  # name -> next value (loaded at open)

    @property
    def dialect(self) -> Dialect:
        return self.engine.dialect

    def describe(self) -> str:
        describe = getattr(self.engine, "describe", None)
        return str(describe()) if describe is not None else type(self.engine).__name__

    async def open(self) -> None:
        await self.engine.open()
        await self._migrate()
        self.members.create_schema()
        self.txn_offsets.create_schema()
        self._counters = {
            str(name): int(value)
            for name, value in await self.engine.query("SELECT name, value FROM counters")
        }

    async def _migrate(self) -> None:
        self.engine.add_schema([VERSION_TABLE])
        rows = await self.engine.query("SELECT version FROM conveyor_schema")
        found = int(rows[0][0]) if rows else 0
        if found > SCHEMA_VERSION:
            raise StorageError(
                "the state database has a newer schema than this Conveyor understands: "
                "upgrade Conveyor (or point it at another database)",
                database=self.describe(), schema_version=found, supported=SCHEMA_VERSION)
        for version in range(found + 1, SCHEMA_VERSION + 1):
            self.engine.add_schema(MIGRATIONS[version])
            self.engine.write(upsert_sql("conveyor_schema", ["singleton"], ["version"]),
                              (1, version))
        await self.engine.commit()

    async def close(self) -> None:
        await self.engine.close()

    async def commit(self) -> None:
        """Wait until every write made so far is committed (durable)."""
        await self.engine.commit()

    # --- topics, queues ------------------------------------------------------
    def save_topic(self, row: TopicRow) -> None:
        self.engine.write(
            upsert_sql("topics", ["name"], ["partitions", "kind", "config", "created_ms"]),
            (row.name, row.partitions, row.kind, json.dumps(row.config), row.created_ms),
        )

    def delete_topic(self, name: str) -> None:
        self.engine.write("DELETE FROM topics WHERE name = ?", (name,))

    async def load_topics(self) -> list[TopicRow]:
        rows = await self.engine.query(
            "SELECT name, partitions, kind, config, created_ms FROM topics")
        return [TopicRow(r[0], int(r[1]), r[2], json.loads(r[3]), int(r[4])) for r in rows]

    def save_queue(self, row: QueueRow) -> None:
        self.engine.write(
            upsert_sql("queues", ["name"], ["config", "created_ms"]),
            (row.name, json.dumps(row.config), row.created_ms),
        )

    def delete_queue(self, name: str) -> None:
        self.engine.write("DELETE FROM queues WHERE name = ?", (name,))

    async def load_queues(self) -> list[QueueRow]:
        rows = await self.engine.query("SELECT name, config, created_ms FROM queues")
        return [QueueRow(r[0], json.loads(r[1]), int(r[2])) for r in rows]

    # --- exchanges, bindings -------------------------------------------------
    def save_exchange(self, row: ExchangeRow) -> None:
        self.engine.write(
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
        self.engine.write("DELETE FROM exchanges WHERE name = ?", (name,))
        self.engine.write("DELETE FROM bindings WHERE source = ?", (name,))
        self.engine.write(
            "DELETE FROM bindings WHERE destination_kind = 'exchange' AND destination = ?", (name,)
        )

    async def load_exchanges(self) -> list[ExchangeRow]:
        rows = await self.engine.query(
            "SELECT name, type, durable, auto_delete, internal, alternate_exchange, arguments"
            " FROM exchanges"
        )
        return [
            ExchangeRow(r[0], r[1], bool(r[2]), bool(r[3]), bool(r[4]), r[5], _pairs(r[6]))
            for r in rows
        ]

    def save_binding(self, row: BindingRow) -> None:
        self.engine.write(
            upsert_sql(
                "bindings",
                ["source", "destination_kind", "destination", "routing_key", "arguments"],
                [],
            ),
            (row.source, row.destination_kind, row.destination, row.routing_key,
             _pairs_json(row.arguments)),
        )

    def delete_binding(self, row: BindingRow) -> None:
        self.engine.write(
            "DELETE FROM bindings WHERE source = ? AND destination_kind = ? AND destination = ?"
            " AND routing_key = ? AND arguments = ?",
            (row.source, row.destination_kind, row.destination, row.routing_key,
             _pairs_json(row.arguments)),
        )

    async def load_bindings(self) -> list[BindingRow]:
        rows = await self.engine.query(
            "SELECT source, destination_kind, destination, routing_key, arguments FROM bindings"
            " ORDER BY source, destination_kind, destination, routing_key"
        )
        return [BindingRow(r[0], r[1], r[2], r[3], _pairs(r[4])) for r in rows]

    # --- ordered groups ------------------------------------------------------
    def save_committed_offsets(self, rows: Iterable[CommittedOffsetRow]) -> None:
        self.engine.write_many(
            _OFFSETS_UPSERT,
            [
                (r.group_id, r.topic, r.partition, r.committed_offset, r.metadata,
                 r.leader_epoch, r.commit_ms)
                for r in rows
            ],
        )

    async def save_committed_offsets_guarded(self, rows: Sequence[CommittedOffsetRow],
                                             guard: WriteGuard) -> bool:
        """Commit ``rows`` in a transaction of their own that first takes ``guard`` (a
        cluster node's owner fence); False, nothing written, when the guard finds no row.
        Needs an engine with guarded writes (PostgreSQL)."""
        return await guarded(self.engine, guard, [(_OFFSETS_UPSERT, [
            (r.group_id, r.topic, r.partition, r.committed_offset, r.metadata,
             r.leader_epoch, r.commit_ms) for r in rows])])

    async def load_committed_offsets(self, group_id: str | None = None) -> list[CommittedOffsetRow]:
        select = (
            "SELECT group_id, topic, partition, committed_offset, metadata, leader_epoch,"
            " commit_ms FROM group_offsets"
        )
        if group_id is None:
            rows = await self.engine.query(select)
        else:
            rows = await self.engine.query(select + " WHERE group_id = ?", (group_id,))
        return [
            CommittedOffsetRow(r[0], r[1], int(r[2]), int(r[3]), r[4], int(r[5]), int(r[6]))
            for r in rows
        ]

    def delete_committed_offsets(self, group_id: str, topic: str | None = None) -> None:
        if topic is None:
            self.engine.write("DELETE FROM group_offsets WHERE group_id = ?", (group_id,))
        else:
            self.engine.write(
                "DELETE FROM group_offsets WHERE group_id = ? AND topic = ?", (group_id, topic)
            )

    def save_group(self, group_id: str, state: dict[str, Any]) -> None:
        self.engine.write(_GROUP_UPSERT, (group_id, json.dumps(state)))

    async def save_group_guarded(self, group_id: str, state: dict[str, Any],
                                 guard: WriteGuard) -> bool:
        """A cluster node's group-state write (SyncGroup): its own transaction that
        first takes ``guard``; False, nothing written, when the guard finds no row."""
        return await guarded(self.engine, guard,
                             [(_GROUP_UPSERT, [(group_id, json.dumps(state))])])

    def delete_group(self, group_id: str) -> None:
        self.engine.write("DELETE FROM groups WHERE group_id = ?", (group_id,))
        self.delete_committed_offsets(group_id)

    async def delete_group_guarded(self, group_id: str, guard: WriteGuard) -> bool:
        """A cluster node's group delete (its state and committed offsets): its own
        transaction that first takes ``guard``; False, nothing deleted, when the guard
        finds no row."""
        return await guarded(self.engine, guard, [
            ("DELETE FROM groups WHERE group_id = ?", [(group_id,)]),
            ("DELETE FROM group_offsets WHERE group_id = ?", [(group_id,)])])

    async def load_groups(self) -> dict[str, dict[str, Any]]:
        rows = await self.engine.query("SELECT group_id, state FROM groups")
        return {r[0]: json.loads(r[1]) for r in rows}

    def save_group_config(self, group: str, config: dict[str, str]) -> None:
        self.engine.write(upsert_sql("group_configs", ["group_name"], ["config"]),
                          (group, json.dumps(config, sort_keys=True)))

    def delete_group_config(self, group: str) -> None:
        self.engine.write("DELETE FROM group_configs WHERE group_name = ?", (group,))

    async def load_group_configs(self) -> dict[str, dict[str, str]]:
        configs: dict[str, dict[str, str]] = {}
        rows = await self.engine.query("SELECT group_name, config FROM group_configs")
        for name, text in rows:
            loaded = json.loads(text)
            if isinstance(loaded, dict):
                configs[str(name)] = {str(k): str(v) for k, v in loaded.items()}
        return configs

    # --- producers -----------------------------------------------------------
    def next_counter(self, name: str, start: int = 0) -> int:
        """Return the counter's current value (``start`` if new) and store value + 1.

        The values live in memory (loaded at open): this node is the counters' only
        writer, and the write rides in the loop turn's transaction like every save.
        """
        value = self._counters.get(name, start)
        self._counters[name] = value + 1
        self.engine.write(upsert_sql("counters", ["name"], ["value"]), (name, value + 1))
        return value

    def save_producer(self, row: ProducerRow) -> None:
        self.engine.write(
            upsert_sql("producers", ["producer_id"], ["epoch", "transactional_id"]),
            (row.producer_id, row.epoch, row.transactional_id),
        )

    def delete_producer(self, producer_id: int) -> None:
        """Forget an expired producer id: its row and its sequences."""
        self.engine.write("DELETE FROM producers WHERE producer_id = ?", (producer_id,))
        self.engine.write("DELETE FROM producer_sequences WHERE producer_id = ?",
                          (producer_id,))

    async def load_producers(self) -> list[ProducerRow]:
        rows = await self.engine.query("SELECT producer_id, epoch, transactional_id FROM producers")
        return [ProducerRow(int(r[0]), int(r[1]), r[2]) for r in rows]

    def save_producer_sequences(self, row: ProducerSequenceRow) -> None:
        self.engine.write(
            upsert_sql(
                "producer_sequences", ["producer_id", "topic", "partition"], ["epoch", "batches"]
            ),
            (row.producer_id, row.topic, row.partition, row.epoch,
             json.dumps([list(batch) for batch in row.batches])),
        )

    async def load_producer_sequences(self) -> list[ProducerSequenceRow]:
        rows = await self.engine.query(
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
        self.engine.write("DELETE FROM producer_sequences WHERE topic = ?", (topic,))
        self.engine.write("DELETE FROM producer_checkpoints WHERE topic = ?", (topic,))

    def save_producer_checkpoint(self, topic: str, partition: int, next_offset: int) -> None:
        self.engine.write(
            upsert_sql("producer_checkpoints", ["topic", "partition"], ["next_offset"]),
            (topic, partition, next_offset),
        )

    async def load_producer_checkpoints(self) -> dict[tuple[str, int], int]:
        rows = await self.engine.query(
            "SELECT topic, partition, next_offset FROM producer_checkpoints")
        return {(r[0], int(r[1])): int(r[2]) for r in rows}


class SqliteStateStore(SqlStateStore):
    """The embedded default: SqlStateStore over a SqliteEngine at ``path``."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.sqlite = SqliteEngine(os.fspath(path))
        super().__init__(self.sqlite)
        self.path = self.sqlite.path

    @property
    def connection(self) -> Any:
        """The sqlite3 connection (tests and diagnostics)."""
        return self.sqlite.connection
