"""Truncation of a PostgreSQL partition's tail (the LogStore seam's ``truncate``).

One transaction: the partition's rewrite lock (storage/postgres_compaction.py: a
compaction transaction is either before it, and the rows it inserted go too, or
after it, and finds its rows gone), the head row's lock (as an append takes it), the
batch rows whose last offset is >= the cut deleted (a batch is never split), the
head's ``next_offset`` set to the end of the last batch kept (never below the log
start), and every idempotent producer whose batches went given the epoch and last
sequence of its last batch kept (none left: its row goes, and it starts afresh).
"""

from __future__ import annotations

from typing import Any

from conveyor.errors import OffsetOutOfRangeError
from conveyor.storage import postgres_log_schema as sql

SEQUENCE_MAX = (1 << 31) - 1


async def truncate_tail(connection: Any, partition_id: int, offset: int) -> int:
    """Cut the tail at ``offset`` (see the module docstring); return the new log end
    (the current one when ``offset`` is at or past it). Runs its own transaction."""
    async with connection.transaction():
        await connection.execute(sql.PARTITION_WRITE_LOCK, partition_id)
        head = await connection.fetchrow(sql.LOCK_HEAD, partition_id)
        if head is None:
            raise OffsetOutOfRangeError("partition gone", partition_id=partition_id)
        if offset >= head["next_offset"]:
            return int(head["next_offset"])
        if offset < head["log_start_offset"]:
            raise OffsetOutOfRangeError("truncation below the log start", offset=offset,
                                        log_start_offset=head["log_start_offset"])
        gone = await connection.fetch(sql.TRUNCATE_TAIL, partition_id, offset)
        kept_last = await connection.fetchval(sql.KEPT_LAST_OFFSET, partition_id, offset)
        new_end = max(int(head["log_start_offset"]), int(kept_last) + 1)
        await connection.execute(sql.SET_NEXT_OFFSET, partition_id, new_end)
        for producer_id in sorted({row["producer_id"] for row in gone
                                   if row["producer_id"] >= 0}):
            await _rewind_producer(connection, partition_id, producer_id)
    return new_end


async def _rewind_producer(connection: Any, partition_id: int, producer_id: int) -> None:
    row = await connection.fetchrow(sql.PRODUCER_LAST_BATCH, partition_id, producer_id)
    if row is None:
        await connection.execute(sql.DELETE_PRODUCER, partition_id, producer_id)
        return
    last = (row["base_sequence"] + row["record_count"] - 1) & SEQUENCE_MAX
    await connection.execute(sql.SAVE_PRODUCERS, [partition_id], [producer_id],
                             [row["producer_epoch"]], [last])


__all__ = ["truncate_tail"]
