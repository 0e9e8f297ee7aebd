"""Transaction state in the StateStore: its tables and queries.

Owns: the SQL of the transaction coordinator (broker/transactions.py), written once
in the subset SQLite and PostgreSQL share (``?`` placeholders rewritten by the
store's Dialect, standard ``ON CONFLICT`` upserts), as storage/shared_state.py is:

- ``txn_transactions``: one row per transactional id: its producer id and epoch,
  timeout, state (``Empty``, ``Ongoing``, ``PrepareCommit``, ``PrepareAbort``,
  ``CompleteCommit``, ``CompleteAbort``), the partitions and groups in the current
  transaction (JSON), the offsets committed in it (JSON: only rows written by a
  Conveyor before the group's coordinator kept them, txn_offsets_state.py; now ``{}``),
  and when it started. ``PrepareCommit``/``PrepareAbort`` is written (and committed)
  before any marker, so a restart finishes the markers of every partition.
- ``txn_partitions``: the partitions that ever held a transactional batch, with
  the offset of the first one: where a restart re-scans the log to rebuild the
  partition's open transactions and aborted-transaction index (the log is the
  truth; this table only bounds the scan).
- ``txn_activity``: per transactional id, the producer id and epoch before the last
  epoch bump at a transaction end (``transaction.version`` 2: a retried EndTxn v5 carries
  them) and when the id was last used (wall clock; ``transactional.id.expiration.ms``
  counts from it). A separate table so that stores written before it open unchanged
  (a missing row reads as "no previous epoch, used now").

Must not know: the broker's classes or the log. Writes go into the store's
per-loop-turn transaction; callers that need durability await ``commit()``. A cluster
node writes a row with ``save_guarded``: a transaction of its own under the owner fence
of the transactional id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from conveyor.errors import StorageError
from conveyor.storage.sql_engine import (
    GuardedWrites,
    SqlEngine,
    SqlValue,
    WriteGuard,
    upsert_sql,
)

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS txn_transactions (
        transactional_id TEXT NOT NULL PRIMARY KEY, producer_id BIGINT NOT NULL,
        producer_epoch INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, state TEXT NOT NULL,
        partitions TEXT NOT NULL, groups TEXT NOT NULL, offsets TEXT NOT NULL,
        started_ms BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS txn_partitions (
        topic TEXT NOT NULL, partition INTEGER NOT NULL, first_offset BIGINT NOT NULL,
        PRIMARY KEY (topic, partition))""",
    """CREATE TABLE IF NOT EXISTS txn_activity (
        transactional_id TEXT NOT NULL PRIMARY KEY, previous_producer_id BIGINT NOT NULL,
        previous_producer_epoch INTEGER NOT NULL, updated_ms BIGINT NOT NULL)""",
)

# group -> [(topic, partition, offset, metadata)]
PendingOffsets = dict[str, list[tuple[str, int, int, str | None]]]


@dataclass(slots=True)
class TransactionRow:
    transactional_id: str
    producer_id: int
    producer_epoch: int
    timeout_ms: int
    state: str
    partitions: list[tuple[str, int]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    offsets: PendingOffsets = field(default_factory=dict)
    started_ms: int = -1  # wall clock; -1 when no transaction is open
    # producer id and epoch before the last bump at a transaction end (EndTxn v5), so a
    # retry of that EndTxn is recognised; -1 when there was none
    previous_producer_id: int = -1
    previous_producer_epoch: int = -1
    updated_ms: int = -1  # wall clock of the last request that used the id; -1: unknown


class TxnStateStore:
    """Typed reads and writes of the transaction tables over a StateStore."""

    def __init__(self, store: SqlEngine) -> None:
        self.store = store

    def create_schema(self) -> None:
        self.store.add_schema(SCHEMA)

    async def commit(self) -> None:
        await self.store.commit()

    def save(self, row: TransactionRow) -> None:
        for query, values in _row_statements(row):
            self.store.write(query, values)

    async def save_guarded(self, row: TransactionRow, guard: WriteGuard) -> bool:
        """``row`` in a transaction of its own that first takes ``guard`` (a cluster
        node's fence on the transactional id); False, nothing written, when
        the guard finds no row. Needs an engine with guarded writes (PostgreSQL)."""
        if not hasattr(self.store, "write_guarded"):
            raise StorageError("guarded writes need the PostgreSQL state store",
                               engine=type(self.store).__name__)
        return await cast(GuardedWrites, self.store).write_guarded(
            guard, [(query, [values]) for query, values in _row_statements(row)])

    def delete(self, transactional_id: str) -> None:
        """Forget an expired transactional id."""
        for table in ("txn_transactions", "txn_activity"):
            self.store.write(f"DELETE FROM {table} WHERE transactional_id = ?",
                             (transactional_id,))

    async def load(self) -> list[TransactionRow]:
        rows = await self.store.query(_SELECT + " ORDER BY t.transactional_id")
        return [_parsed(row) for row in rows]

    async def load_one(self, transactional_id: str) -> TransactionRow | None:
        """One transactional id's row as the store has it now (a cluster node's claim)."""
        rows = await self.store.query(_SELECT + " WHERE t.transactional_id = ?",
                                      (transactional_id,))
        return _parsed(rows[0]) if rows else None

    async def load_by_producer(self, producer_id: int) -> TransactionRow | None:
        """The transaction of the id whose producer this is (a partition leader checking
        a transactional batch whose coordinator is another node)."""
        rows = await self.store.query(_SELECT + " WHERE t.producer_id = ?", (producer_id,))
        return _parsed(rows[0]) if rows else None

    def save_partition(self, topic: str, partition: int, first_offset: int) -> None:
        """Remember that a partition holds transactional batches from ``first_offset``."""
        self.store.write(
            "INSERT INTO txn_partitions (topic, partition, first_offset) VALUES (?, ?, ?)"
            " ON CONFLICT (topic, partition) DO NOTHING", (topic, partition, first_offset))

    async def load_partitions(self) -> dict[tuple[str, int], int]:
        rows = await self.store.query("SELECT topic, partition, first_offset FROM txn_partitions")
        return {(str(row[0]), int(row[1])): int(row[2]) for row in rows}

    def delete_topic(self, topic: str) -> None:
        self.store.write("DELETE FROM txn_partitions WHERE topic = ?", (topic,))


_SELECT = (
    "SELECT t.transactional_id, t.producer_id, t.producer_epoch, t.timeout_ms, t.state,"
    " t.partitions, t.groups, t.offsets, t.started_ms,"
    " COALESCE(a.previous_producer_id, -1), COALESCE(a.previous_producer_epoch, -1),"
    " COALESCE(a.updated_ms, -1)"
    " FROM txn_transactions t LEFT JOIN txn_activity a"
    " ON a.transactional_id = t.transactional_id")


def _parsed(row: tuple[Any, ...]) -> TransactionRow:
    offsets = {str(group): [(str(t), int(p), int(o), None if m is None else str(m))
                            for t, p, o, m in entries]
               for group, entries in json.loads(str(row[7])).items()}
    return TransactionRow(
        str(row[0]), int(row[1]), int(row[2]), int(row[3]),
        str(row[4]),
        [(str(topic), int(partition)) for topic, partition in json.loads(str(row[5]))],
        [str(group) for group in json.loads(str(row[6]))], offsets, int(row[8]),
        int(row[9]), int(row[10]), int(row[11]))


_TRANSACTION_UPSERT = upsert_sql(
    "txn_transactions", ["transactional_id"],
    ["producer_id", "producer_epoch", "timeout_ms", "state", "partitions", "groups",
     "offsets", "started_ms"])
_ACTIVITY_UPSERT = upsert_sql(
    "txn_activity", ["transactional_id"],
    ["previous_producer_id", "previous_producer_epoch", "updated_ms"])


def _row_statements(row: TransactionRow) -> list[tuple[str, tuple[SqlValue, ...]]]:
    return [
        (_TRANSACTION_UPSERT,
         (row.transactional_id, row.producer_id, row.producer_epoch, row.timeout_ms,
          row.state, json.dumps(sorted(row.partitions)), json.dumps(sorted(row.groups)),
          json.dumps(row.offsets, sort_keys=True), row.started_ms)),
        (_ACTIVITY_UPSERT,
         (row.transactional_id, row.previous_producer_id, row.previous_producer_epoch,
          row.updated_ms)),
    ]
