"""Pending transactional offsets in the StateStore: what a group's coordinator keeps of a
TxnOffsetCommit until the transaction ends (Kafka keeps them as transactional records in
``__consumer_offsets``, made visible or dropped by the COMMIT/ABORT marker the
transaction coordinator writes there).

Owns: the table ``txn_group_offsets`` and its queries, written once in the subset SQLite
and PostgreSQL share (as storage/txn_state.py is), and the row type
``PendingOffsetRow``:

- one row per (group, producer id, topic, partition): the offset and metadata a
  transaction of that producer committed for the group, the transactional id it names
  and the producer epoch it was written with. The epoch is a column, not part of the
  key: a transaction's end finishes the producer's rows of every epoch up to the
  marker's (``transaction.version`` 2 writes its markers with the epoch bumped by one),
  and a write of a newer epoch replaces the older one's row, as Kafka's group
  coordinator keeps one pending map per producer id.

- ``txn_group_ended``: one row per (group, producer id): the highest epoch of a marker
  that ended a transaction of that producer at the group, and when (wall ms). It is the
  epoch fence a claim or a restart reloads (Kafka keeps it as the producer's state in
  the offsets partition); rows older than the producer's expiry are pruned
  (``prune_ended``).

``finish`` is the marker: in one transaction the rows of the producer up to an epoch
are deleted, the ended epoch is raised (never lowered) and, on a commit, the given
offsets upserted into ``group_offsets`` (the committed offsets, state_store.py).
``delete_group`` / ``delete_topic`` drop the pending rows of a deleted group or topic
(the ended epochs stay: they fence the producer, not the group's data). Unguarded
writes ride in the store's per-loop-turn transaction (one node: with the transaction's
own row, atomically); ``guard`` (a cluster node's owner fence of the group, an opaque
``WriteGuard``) makes it a transaction of its own that writes only while the guard
holds.

Must not know: the broker's classes, the transaction coordinator, the log.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from conveyor.errors import StorageError
from conveyor.storage.sql_engine import (
    GuardedStatement,
    GuardedWrites,
    SqlEngine,
    WriteGuard,
    upsert_sql,
)

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS txn_group_offsets (
        group_id TEXT NOT NULL, producer_id BIGINT NOT NULL, topic TEXT NOT NULL,
        partition INTEGER NOT NULL, transactional_id TEXT NOT NULL,
        producer_epoch INTEGER NOT NULL, committed_offset BIGINT NOT NULL, metadata TEXT,
        commit_ms BIGINT NOT NULL, PRIMARY KEY (group_id, producer_id, topic, partition))""",
    """CREATE TABLE IF NOT EXISTS txn_group_ended (
        group_id TEXT NOT NULL, producer_id BIGINT NOT NULL, producer_epoch INTEGER NOT NULL,
        ended_ms BIGINT NOT NULL, PRIMARY KEY (group_id, producer_id))""",
)

_PENDING_UPSERT = upsert_sql(
    "txn_group_offsets", ["group_id", "producer_id", "topic", "partition"],
    ["transactional_id", "producer_epoch", "committed_offset", "metadata", "commit_ms"])
_PENDING_DELETE = ("DELETE FROM txn_group_offsets"
                   " WHERE group_id = ? AND producer_id = ? AND producer_epoch <= ?")
# the committed offsets' upsert (state_store.py writes the same statement)
_COMMITTED_UPSERT = upsert_sql("group_offsets", ["group_id", "topic", "partition"],
                               ["committed_offset", "metadata", "leader_epoch", "commit_ms"])
# the ended epoch only goes up: a marker of an older epoch (a retried end) keeps the row
_ENDED_UPSERT = (upsert_sql("txn_group_ended", ["group_id", "producer_id"],
                            ["producer_epoch", "ended_ms"])
                 + " WHERE txn_group_ended.producer_epoch <= excluded.producer_epoch")
_ENDED_SELECT = "SELECT group_id, producer_id, producer_epoch, ended_ms FROM txn_group_ended"
_SELECT = ("SELECT group_id, transactional_id, producer_id, producer_epoch, topic, partition,"
           " committed_offset, metadata, commit_ms FROM txn_group_offsets")


@dataclass(frozen=True, slots=True)
class PendingOffsetRow:
    group_id: str
    transactional_id: str
    producer_id: int
    producer_epoch: int
    topic: str
    partition: int
    offset: int
    metadata: str | None
    commit_ms: int  # wall clock of the TxnOffsetCommit


@dataclass(frozen=True, slots=True)
class EndedEpochRow:
    """The highest epoch whose marker ended a transaction of a producer at a group."""

    group_id: str
    producer_id: int
    producer_epoch: int
    ended_ms: int  # wall clock of the end (its expiry counts from it)


class TxnOffsetsStateStore:
    """Typed reads and writes of the pending transactional offsets."""

    def __init__(self, engine: SqlEngine) -> None:
        self.engine = engine

    def create_schema(self) -> None:
        self.engine.add_schema(SCHEMA)

    async def save(self, rows: Sequence[PendingOffsetRow],
                   guard: WriteGuard | None = None) -> bool:
        """Keep ``rows`` (durable when this returns); with ``guard``, False and nothing
        written when the guard finds no row."""
        return await self._write([(_PENDING_UPSERT, [
            (row.group_id, row.producer_id, row.topic, row.partition, row.transactional_id,
             row.producer_epoch, row.offset, row.metadata, row.commit_ms) for row in rows])],
            guard, wait=True)

    async def finish(self, group_id: str, producer_id: int, epoch_max: int,
                     committed: Sequence[PendingOffsetRow], guard: WriteGuard | None = None,
                     *, ended_ms: int) -> bool:
        """The producer's transaction ended: its rows for ``group_id`` up to ``epoch_max``
        go, its ended epoch becomes ``epoch_max`` (at ``ended_ms``) unless a higher one is
        stored, and ``committed`` (empty on an abort) become the group's committed
        offsets, at their ``commit_ms``, in one transaction. Unguarded: in the loop turn's
        transaction (not awaited); guarded: its own, False and nothing written when the
        guard finds no row."""
        return await self._write([
            (_COMMITTED_UPSERT, [(row.group_id, row.topic, row.partition, row.offset,
                                  row.metadata, -1, row.commit_ms) for row in committed]),
            (_PENDING_DELETE, [(group_id, producer_id, epoch_max)]),
            (_ENDED_UPSERT, [(group_id, producer_id, epoch_max, ended_ms)]),
        ], guard, wait=False)

    async def load_ended(self, group_id: str | None = None) -> list[EndedEpochRow]:
        """Every ended epoch, or one group's (a claim), oldest end first."""
        if group_id is None:
            rows = await self.engine.query(_ENDED_SELECT + " ORDER BY ended_ms")
        else:
            rows = await self.engine.query(
                _ENDED_SELECT + " WHERE group_id = ? ORDER BY ended_ms", (group_id,))
        return [EndedEpochRow(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def prune_ended(self, before_ms: int) -> None:
        """Forget the ended epochs of ends older than ``before_ms`` (their producers
        expired); in the loop turn's transaction."""
        self.engine.write("DELETE FROM txn_group_ended WHERE ended_ms < ?", (before_ms,))

    def delete_group(self, group_id: str) -> None:
        """The group was deleted: its pending offsets go (loop turn's transaction)."""
        self.engine.write("DELETE FROM txn_group_offsets WHERE group_id = ?", (group_id,))

    def delete_topic(self, topic: str) -> None:
        """The topic was deleted: every group's pending offsets of it go (loop turn)."""
        self.engine.write("DELETE FROM txn_group_offsets WHERE topic = ?", (topic,))

    async def load(self, group_id: str | None = None) -> list[PendingOffsetRow]:
        """Every pending row, or one group's (a cluster node claiming the group)."""
        if group_id is None:
            rows = await self.engine.query(_SELECT)
        else:
            rows = await self.engine.query(_SELECT + " WHERE group_id = ?", (group_id,))
        return [PendingOffsetRow(str(r[0]), str(r[1]), int(r[2]), int(r[3]), str(r[4]),
                                 int(r[5]), int(r[6]), None if r[7] is None else str(r[7]),
                                 int(r[8])) for r in rows]

    async def _write(self, statements: Sequence[GuardedStatement], guard: WriteGuard | None,
                     wait: bool) -> bool:
        if guard is not None:
            if not hasattr(self.engine, "write_guarded"):
                raise StorageError("guarded writes need the PostgreSQL state store",
                                   engine=type(self.engine).__name__)
            return await cast(GuardedWrites, self.engine).write_guarded(guard, statements)
        for query, rows in statements:
            if rows:
                self.engine.write_many(query, rows)
        if wait:
            await self.engine.commit()
        return True
