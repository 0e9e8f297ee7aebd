"""The log side of transactions: open transactions, the last stable offset and the
aborted-transaction index of every partition that holds transactional batches.

Owns, per (topic, partition), in memory:

- ``open``: producer id -> offset of the first batch of its transaction that has no
  marker yet. The last stable offset (LSO) is the smallest of these, or the high
  watermark when there is none: a read_committed reader never reads at or past it.
- ``aborted``: per producer id, the (first offset, marker offset) of each aborted
  transaction, sorted; Kafka's ``.txnindex``. Fetch with read_committed returns the
  ones overlapping what it sends (``aborted_transactions``); decoded reads (shared
  groups, queues, HTTP/AMQP readers) drop the records inside them.

It is rebuilt from the log on open (``rebuild``, the log being the truth: a batch
with the transactional bit opens a transaction, a control batch ends it), from
the first transactional offset the state store remembers for the partition.
Must not know: protocols, files, the coordinator's state. Pure bookkeeping.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field

from conveyor.errors import CorruptRecordError
from conveyor.storage.control_batch import CONTROL_COMMIT, control_type
from conveyor.storage.record_batch import BatchHeader, decode_records, split_batches


@dataclass(slots=True)
class PartitionTransactions:
    # producer id -> first offset of its transaction without a marker yet
    open: dict[int, int] = field(default_factory=dict)
    # producer id -> sorted [(first offset, marker offset)] of its aborted transactions
    aborted: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # every aborted transaction as (marker offset, producer id, first offset), sorted
    aborted_by_end: list[tuple[int, int, int]] = field(default_factory=list)


class TransactionIndex:
    def __init__(self) -> None:
        self._partitions: dict[tuple[str, int], PartitionTransactions] = {}

    def partitions(self) -> dict[tuple[str, int], PartitionTransactions]:
        return self._partitions

    def observe_data(self, topic: str, partition: int, producer_id: int,
                     base_offset: int) -> bool:
        """A transactional data batch was appended; True when it opened a transaction."""
        entry = self._partitions.setdefault((topic, partition), PartitionTransactions())
        if producer_id in entry.open:
            return False
        entry.open[producer_id] = base_offset
        return True

    def observe_marker(self, topic: str, partition: int, producer_id: int, offset: int,
                       commit: bool) -> None:
        """A COMMIT/ABORT marker was appended at ``offset``."""
        entry = self._partitions.get((topic, partition))
        if entry is None:
            return
        first = entry.open.pop(producer_id, None)
        if first is None or commit:
            return  # a marker for a partition the producer wrote nothing to: nothing aborted
        bisect.insort(entry.aborted.setdefault(producer_id, []), (first, offset))
        bisect.insort(entry.aborted_by_end, (offset, producer_id, first))

    def is_open(self, topic: str, partition: int, producer_id: int) -> bool:
        entry = self._partitions.get((topic, partition))
        return entry is not None and producer_id in entry.open

    def stable_offset(self, topic: str, partition: int, high_watermark: int) -> int:
        entry = self._partitions.get((topic, partition))
        if entry is None or not entry.open:
            return high_watermark
        return min(high_watermark, min(entry.open.values()))

    def aborted_between(self, topic: str, partition: int, start: int,
                        end: int) -> list[tuple[int, int]]:
        """(producer id, first offset) of the aborted transactions with records in
        [start, end): what a read_committed Fetch from ``start`` must be told."""
        entry = self._partitions.get((topic, partition))
        if entry is None or not entry.aborted_by_end:
            return []
        index = bisect.bisect_left(entry.aborted_by_end, (start, -1, -1))
        return [(producer_id, first) for _, producer_id, first in entry.aborted_by_end[index:]
                if first < end]

    def is_aborted(self, topic: str, partition: int, producer_id: int, offset: int) -> bool:
        entry = self._partitions.get((topic, partition))
        if entry is None:
            return False
        ranges = entry.aborted.get(producer_id)
        if not ranges:
            return False
        index = bisect.bisect_right(ranges, (offset, 1 << 62)) - 1
        return index >= 0 and ranges[index][0] <= offset <= ranges[index][1]

    def open_transactions(self) -> list[tuple[str, int, int, int]]:
        """(topic, partition, producer id, first offset) of every open transaction."""
        return [(topic, partition, producer_id, first)
                for (topic, partition), entry in sorted(self._partitions.items())
                for producer_id, first in sorted(entry.open.items())]

    def forget_topic(self, topic: str) -> None:
        for key in [key for key in self._partitions if key[0] == topic]:
            del self._partitions[key]

    def rebuild(self, topic: str, partition: int, chunks: Iterable[bytes]) -> None:
        """Replay a partition's batches (read from the log, in order) into the index."""
        self.reset(topic, partition)
        for raw in chunks:
            self.replay_chunk(topic, partition, raw)

    def reset(self, topic: str, partition: int) -> None:
        """Forget a partition before replaying its log (``replay_chunk``, in order)."""
        self._partitions[(topic, partition)] = PartitionTransactions()

    def replay_chunk(self, topic: str, partition: int, raw: bytes) -> None:
        for position, header in split_batches(raw):
            self._replay(topic, partition, raw, position, header)

    def _replay(self, topic: str, partition: int, raw: bytes, position: int,
                header: BatchHeader) -> None:
        if not header.is_transactional or header.producer_id < 0:
            return
        if not header.is_control:
            self.observe_data(topic, partition, header.producer_id, header.base_offset)
            return
        try:
            records = decode_records(raw, position)
        except CorruptRecordError:
            return  # an undecodable marker ends nothing (readers set the batch aside)
        kind = control_type(records[0]) if records else None
        if kind is not None:
            self.observe_marker(topic, partition, header.producer_id, header.base_offset,
                                kind == CONTROL_COMMIT)


def batches_below(raw: bytes, offset: int) -> bytes:
    """The whole batches of ``raw`` that start below ``offset`` (a read capped at the LSO;
    the LSO is always the base offset of a batch)."""
    end = 0
    for position, header in split_batches(raw):
        if header.base_offset >= offset:
            break
        end = position + header.size_bytes
    return raw[:end]
