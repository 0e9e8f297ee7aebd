"""Browsing a queue: its pending records and their shared state, without consuming them.

Owns: ``browse_queue`` — read a queue's (or shared group's) log from its start
offset and report each record that is not settled yet (available, delayed or
acquired) with its delivery count. Nothing is acquired, locked or loaded into the
group's window: a browse never changes what a consumer gets next.
Must not know: protocols, files.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.errors import OffsetOutOfRangeError, UnknownQueueError

from .shared_group import FINAL, RecordState
from .shared_groups import SharedGroups
from .types import Headers

BROWSE_RECORDS_MAX = 500  # one page of a browser; more is what a consumer is for
READ_BATCH_RECORDS = 200  # records read from the log per step


@dataclass(frozen=True, slots=True)
class BrowsedRecord:
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    state: str  # "available", "delayed" or "acquired"
    delivery_count: int


async def browse_queue(
    shared: SharedGroups, name: str, records_max: int = 50, group: str | None = None
) -> list[BrowsedRecord]:
    """Up to ``records_max`` unsettled records of queue ``name`` (or of ``group`` on it),
    oldest first within each partition, partitions in order."""
    state = shared.group_state(group or name, name)
    if state is None:
        raise UnknownQueueError("unknown queue", queue=name)
    records_max = max(1, min(records_max, BROWSE_RECORDS_MAX))
    found: list[BrowsedRecord] = []
    for partition in sorted(state.partitions):
        part = state.partitions[partition]
        offsets = shared.host.topics.offsets
        offset = max(part.start_offset, offsets(name, partition).log_start_offset)
        while len(found) < records_max and offset < offsets(name, partition).high_watermark:
            try:
                records = await shared.host.read_records(name, partition, offset,
                                                         READ_BATCH_RECORDS)
            except OffsetOutOfRangeError:
                offset = offsets(name, partition).log_start_offset
                continue
            if not records:
                break
            for record in records:
                offset = record.offset + 1
                record_state, count = RecordState.AVAILABLE, 0
                entry = part.entries.get(record.offset)
                if entry is not None:
                    record_state, count = entry.state, entry.delivery_count
                elif record.offset in part.pending_rows:
                    record_state, count, _ = part.pending_rows[record.offset]
                if record_state in FINAL:
                    continue
                found.append(BrowsedRecord(
                    partition, record.offset, record.timestamp_ms, record.key, record.value,
                    record.headers, record_state.value, count))
                if len(found) >= records_max:
                    break
    return found
