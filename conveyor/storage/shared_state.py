"""Shared-group state in the StateStore: its tables and queries.

Owns: the SQL of shared groups, written once in the subset SQLite and
PostgreSQL share (``?`` placeholders rewritten by the store's Dialect, standard
``ON CONFLICT`` upserts):

- ``shared_groups``: one row per (group, topic): the group's QueueConfig (JSON).
- ``shared_partitions``: per (group, topic, partition) the start offset —
  every record below it is acked or dead.
- ``shared_records``: per record at or above the start offset whose state
  matters across a restart: acked/dead records, and the delivery count and
  delay (``available_at_ms``, the delayed index) of unsettled ones. A restart
  turns acquired records back into available ones with their counts kept.
- ``shared_dedup``: dedup ids per queue and when they leave the window.

Must not know: the broker's classes or the log. Writes go into the engine's
per-loop-turn transaction; callers that need durability await ``commit()``.
Loads are async (a round trip on PostgreSQL). The StateStore offers this class
as its ``shared`` attribute, over the same engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from conveyor.storage.sql_engine import SqlEngine, upsert_sql

SCHEMA: tuple[str, ...] = (
    # config: JSON object of QueueConfig fields
    """CREATE TABLE IF NOT EXISTS shared_groups (
        group_name TEXT NOT NULL, topic TEXT NOT NULL, config TEXT NOT NULL,
        PRIMARY KEY (group_name, topic))""",
    """CREATE TABLE IF NOT EXISTS shared_partitions (
        group_name TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        start_offset BIGINT NOT NULL, PRIMARY KEY (group_name, topic, partition))""",
    # state: "acked" | "dead" | "available" | "acquired" | "delayed"
    """CREATE TABLE IF NOT EXISTS shared_records (
        group_name TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        record_offset BIGINT NOT NULL, state TEXT NOT NULL, delivery_count INTEGER NOT NULL,
        available_at_ms BIGINT NOT NULL,
        PRIMARY KEY (group_name, topic, partition, record_offset))""",
    """CREATE TABLE IF NOT EXISTS shared_dedup (
        queue TEXT NOT NULL, dedup_id TEXT NOT NULL, expires_ms BIGINT NOT NULL,
        PRIMARY KEY (queue, dedup_id))""",
)


@dataclass(frozen=True, slots=True)
class RecordRow:
    offset: int
    state: str
    delivery_count: int
    available_at_ms: int


class SharedStateStore:
    """Typed reads and writes of the shared-group tables over an SqlEngine."""

    def __init__(self, store: SqlEngine) -> None:
        self.store = store

    def create_schema(self) -> None:
        self.store.add_schema(SCHEMA)

    async def commit(self) -> None:
        await self.store.commit()

    # --- groups -------------------------------------------------------------------
    def save_group(self, group: str, topic: str, config_json: str) -> None:
        self.store.write(
            upsert_sql("shared_groups", ["group_name", "topic"], ["config"]),
            (group, topic, config_json),
        )

    async def load_groups(self) -> list[tuple[str, str, str]]:
        """(group, topic, config JSON) of every shared group."""
        rows = await self.store.query("SELECT group_name, topic, config FROM shared_groups")
        return [(str(row[0]), str(row[1]), str(row[2])) for row in rows]

    def delete_group(self, group: str, topic: str) -> None:
        for table in ("shared_groups", "shared_partitions", "shared_records"):
            self.store.write(
                f"DELETE FROM {table} WHERE group_name = ? AND topic = ?", (group, topic))

    # --- partitions ---------------------------------------------------------------
    def save_start_offset(self, group: str, topic: str, partition: int, offset: int) -> None:
        self.store.write(
            upsert_sql("shared_partitions", ["group_name", "topic", "partition"],
                       ["start_offset"]),
            (group, topic, partition, offset),
        )
        self.store.write(
            "DELETE FROM shared_records WHERE group_name = ? AND topic = ? AND partition = ?"
            " AND record_offset < ?",
            (group, topic, partition, offset),
        )

    async def load_start_offsets(self, group: str, topic: str) -> dict[int, int]:
        rows = await self.store.query(
            "SELECT partition, start_offset FROM shared_partitions"
            " WHERE group_name = ? AND topic = ?", (group, topic))
        return {int(row[0]): int(row[1]) for row in rows}

    # --- records ------------------------------------------------------------------
    def save_records(
        self, group: str, topic: str, partition: int, rows: Iterable[RecordRow]
    ) -> None:
        self.store.write_many(
            upsert_sql("shared_records", ["group_name", "topic", "partition", "record_offset"],
                       ["state", "delivery_count", "available_at_ms"]),
            [(group, topic, partition, row.offset, row.state, row.delivery_count,
              row.available_at_ms) for row in rows],
        )

    async def load_records(self, group: str, topic: str, partition: int) -> list[RecordRow]:
        rows = await self.store.query(
            "SELECT record_offset, state, delivery_count, available_at_ms FROM shared_records"
            " WHERE group_name = ? AND topic = ? AND partition = ? ORDER BY record_offset",
            (group, topic, partition))
        return [RecordRow(int(r[0]), str(r[1]), int(r[2]), int(r[3])) for r in rows]

    def delete_records_from(self, group: str, topic: str, partition: int, offset: int) -> None:
        """Forget the rows of offsets at or above ``offset`` (past a recovered log end)."""
        self.store.write(
            "DELETE FROM shared_records WHERE group_name = ? AND topic = ? AND partition = ?"
            " AND record_offset >= ?",
            (group, topic, partition, offset),
        )

    def delete_partition_records(self, group: str, topic: str, partition: int) -> None:
        """Forget every record row of one partition (its start offset is reset)."""
        self.store.write(
            "DELETE FROM shared_records WHERE group_name = ? AND topic = ? AND partition = ?",
            (group, topic, partition),
        )

    # --- dedup --------------------------------------------------------------------
    def save_dedup(self, queue: str, dedup_id: str, expires_ms: int) -> None:
        self.store.write(
            upsert_sql("shared_dedup", ["queue", "dedup_id"], ["expires_ms"]),
            (queue, dedup_id, expires_ms),
        )

    async def load_dedup(self, queue: str) -> dict[str, int]:
        rows = await self.store.query(
            "SELECT dedup_id, expires_ms FROM shared_dedup WHERE queue = ?", (queue,))
        return {str(row[0]): int(row[1]) for row in rows}

    def delete_dedup_before(self, queue: str, now_ms: int) -> None:
        self.store.write(
            "DELETE FROM shared_dedup WHERE queue = ? AND expires_ms <= ?", (queue, now_ms))

    def delete_queue(self, queue: str) -> None:
        self.store.write("DELETE FROM shared_dedup WHERE queue = ?", (queue,))
