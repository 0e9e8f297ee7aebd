"""AppendedCache: records just published to a queue or shared topic, kept for the fill.

Owns: per (topic, partition), offset -> the ``Record`` an append through the producer
wrote, not loaded into a shared window yet. ``SharedWindows._fill`` takes them from
here instead of reading and decoding the log again. Bounded over all topics (records
and bytes): when consumers fall behind, appends stop being kept and later fills read
the log. Must not know: windows, stores, the clock. Sans-IO.
"""

from __future__ import annotations

from collections.abc import Sequence

from conveyor.storage.record_batch import Record, RecordData

APPENDED_CACHE_RECORDS_MAX = 50_000  # over all queues: ~50 MiB of 1 KiB messages
APPENDED_CACHE_BYTES_MAX = 64 << 20  # over all queues, so 16 MiB AMQP bodies stay bounded too


class AppendedCache:
    def __init__(self) -> None:
        # (topic, partition) -> offset -> record published through Broker.publish and not
        # loaded into a window yet
        self.partitions: dict[tuple[str, int], dict[int, Record]] = {}
        self.count = 0  # records held, bounded by APPENDED_CACHE_RECORDS_MAX
        self.size_bytes = 0  # their keys and values, bounded by APPENDED_CACHE_BYTES_MAX

    def remember(self, topic: str, partition: int, base_offset: int,
                 records: Sequence[RecordData]) -> None:
        """Keep the records of an append for the fill; bounded (the producer calls it)."""
        size_bytes = sum(len(data.value or b"") + len(data.key or b"") for data in records)
        if (self.count + len(records) > APPENDED_CACHE_RECORDS_MAX
                or self.size_bytes + size_bytes > APPENDED_CACHE_BYTES_MAX):
            return  # consumers are not keeping up: later fills read the log
        cache = self.partitions.setdefault((topic, partition), {})
        self.count += len(records)
        self.size_bytes += size_bytes
        for delta, data in enumerate(records):
            cache[base_offset + delta] = Record(
                base_offset + delta, data.timestamp_ms, data.key, data.value, data.headers)

    def uncache(self, record: Record) -> None:
        """Count out a record popped from ``partitions``."""
        self.count -= 1
        self.size_bytes -= len(record.value or b"") + len(record.key or b"")

    def drop_topic(self, topic: str) -> None:
        """Forget every record kept for ``topic`` (its queue was deleted)."""
        for key in [key for key in self.partitions if key[0] == topic]:
            for record in self.partitions.pop(key).values():
                self.uncache(record)
