"""Shared-group state in the StateStore: its tables and queries.

Owns: the SQL of shared groups, written once in the subset SQLite and
PostgreSQL share (``?`` placeholders rewritten by the store's Dialect, standard
``ON CONFLICT`` upserts):

- ``shared_groups``: one row per (group, topic): the group's QueueConfig (JSON).
- ``shared_partitions``: per (group, topic, partition) the start offset —
  every record below it is acked or dead.
- ``shared_ranges``: KIP-932's state batches: per partition, runs of offsets at or
  above the start offset that share one persisted state — acked (settled: acked or
  dead) runs behind an unsettled record, and runs of unsettled records with their
  delivery count and delay (``available_at_ms``, wall ms). Records whose state
  is the default (available, never delivered) have no row. The acquired state is
  not persisted (a lock does not survive a restart): an acquired record is
  written as available with its count. The broker replaces a partition's runs and
  start offset together, at most once per event-loop turn (``save_partition``),
  so an ack costs no row of its own.
  One more row per partition, of state ``delivered`` at first offset -2, is a mark:
  one past the highest offset ever delivered, so an unsettled record below it comes
  back after a restart as delivered once, without a count saved per acquire.
- ``shared_records``: the per-record table of earlier versions, read once at open
  (``load_records``) and emptied as its partition's runs are saved.
- ``shared_dedup``: dedup ids per queue and when they leave the window.

Must not know: the broker's classes or the log. Writes go into the engine's
per-loop-turn transaction; callers that need durability await ``commit()``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
    # state: "acked" | "dead" | "available" | "delayed"; one row per run of offsets
    """CREATE TABLE IF NOT EXISTS shared_ranges (
        group_name TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL,
        first_offset BIGINT NOT NULL, last_offset BIGINT NOT NULL, state TEXT NOT NULL,
        delivery_count INTEGER NOT NULL, available_at_ms BIGINT NOT NULL,
        PRIMARY KEY (group_name, topic, partition, first_offset))""",
    # earlier versions: one row per record (read at open, then emptied)
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


@dataclass(frozen=True, slots=True)
class RangeRow:
    """Offsets ``first``..``last`` (inclusive) in one persisted state."""

    first: int
    last: int
    state: str
    delivery_count: int
    available_at_ms: int


# the one run of state "delivered" is a mark, not offsets: its last_offset + 1 is one past
# the highest offset ever delivered; it sits at first_offset -2 (no offset is negative)
DELIVERED_STATE = "delivered"
DELIVERED_FIRST = -2


def delivered_mark(delivered_end: int) -> RangeRow:
    return RangeRow(DELIVERED_FIRST, delivered_end - 1, DELIVERED_STATE, 1, 0)


def runs(rows: Iterable[RecordRow]) -> list[RangeRow]:
    """Consecutive offsets (in ascending order) with equal state folded into one run."""
    out: list[RangeRow] = []
    first = last = -2
    key: tuple[str, int, int] = ("", 0, 0)
    for row in rows:
        row_key = (row.state, row.delivery_count, row.available_at_ms)
        if row.offset == last + 1 and row_key == key:
            last = row.offset
            continue
        if last >= 0:
            out.append(RangeRow(first, last, *key))
        first = last = row.offset
        key = row_key
    if last >= 0:
        out.append(RangeRow(first, last, *key))
    return out


class SharedStateStore:
    """Typed reads and writes of the shared-group tables over an SqlEngine."""

    def __init__(self, store: SqlEngine) -> None:
        self.store = store

    def create_schema(self) -> None:
        self.store.add_schema(SCHEMA)

    async def commit(self) -> None:
        await self.store.commit()

    async def committed(self) -> None:
        """Every write so far committed (survives a kill -9; ``commit``: a power cut)."""
        await self.store.committed()

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
        for table in ("shared_groups", "shared_partitions", "shared_records",
                      "shared_ranges"):
            self.store.write(
                f"DELETE FROM {table} WHERE group_name = ? AND topic = ?", (group, topic))

    # --- partitions ---------------------------------------------------------------
    def save_partition(self, group: str, topic: str, partition: int, start_offset: int,
                       ranges: Sequence[RangeRow], legacy_rows: bool = False) -> None:
        """Replace one partition's start offset and runs (three statements, whatever the
        number of records); ``legacy_rows``: also empty its rows in the old table."""
        self.store.write(
            upsert_sql("shared_partitions", ["group_name", "topic", "partition"],
                       ["start_offset"]),
            (group, topic, partition, start_offset),
        )
        self.store.write(
            "DELETE FROM shared_ranges WHERE group_name = ? AND topic = ? AND partition = ?",
            (group, topic, partition),
        )
        if legacy_rows:
            self.delete_partition_records(group, topic, partition)
        if ranges:
            self.store.write_many(
                "INSERT INTO shared_ranges (group_name, topic, partition, first_offset,"
                " last_offset, state, delivery_count, available_at_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(group, topic, partition, run.first, run.last, run.state,
                  run.delivery_count, run.available_at_ms) for run in ranges],
            )

    async def load_start_offsets(self, group: str, topic: str) -> dict[int, int]:
        rows = await self.store.query(
            "SELECT partition, start_offset FROM shared_partitions"
            " WHERE group_name = ? AND topic = ?", (group, topic))
        return {int(row[0]): int(row[1]) for row in rows}

    # --- records ------------------------------------------------------------------
    async def load_records(self, group: str, topic: str, partition: int
                     ) -> tuple[list[RecordRow], bool, int]:
        """The persisted state of each offset with one, ascending; whether any came from
        the old per-record table (the caller saves the partition again); and one past the
        highest offset ever delivered (0: none saved)."""
        found: dict[int, RecordRow] = {}
        legacy = await self.store.query(
            "SELECT record_offset, state, delivery_count, available_at_ms FROM shared_records"
            " WHERE group_name = ? AND topic = ? AND partition = ?",
            (group, topic, partition))
        for r in legacy:
            state = "available" if str(r[1]) == "acquired" else str(r[1])
            found[int(r[0])] = RecordRow(int(r[0]), state, int(r[2]), int(r[3]))
        ranges = await self.store.query(
            "SELECT first_offset, last_offset, state, delivery_count, available_at_ms"
            " FROM shared_ranges WHERE group_name = ? AND topic = ? AND partition = ?",
            (group, topic, partition))
        delivered_end = 0
        for first, last, state, count, available_at_ms in ranges:
            if str(state) == DELIVERED_STATE:
                delivered_end = int(last) + 1
                continue
            for offset in range(int(first), int(last) + 1):
                found[offset] = RecordRow(offset, str(state), int(count), int(available_at_ms))
        return [found[offset] for offset in sorted(found)], bool(legacy), delivered_end

    def delete_partition_records(self, group: str, topic: str, partition: int) -> None:
        """Forget the old table's rows of one partition."""
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
