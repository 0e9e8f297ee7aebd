"""Log administration behind Kafka 4's admin APIs: deleting the records below an offset
(DeleteRecords), a partition's size on disk (DescribeLogDirs) and its largest record
timestamp (ListOffsets -3).

Owns nothing: pure functions over the topic registry's partition logs, called by the
facade. Must not know: wire formats.
"""

from __future__ import annotations

from conveyor.errors import OffsetOutOfRangeError

from .topics import TopicRegistry


async def delete_records(topics: TopicRegistry, topic: str, partition: int,
                         offset: int) -> int:
    """Drop the records below ``offset`` (-1: the high watermark); the new log start.
    Past the high watermark is OffsetOutOfRangeError, as DeleteRecords answers it."""
    log = topics.offsets(topic, partition)
    target = log.high_watermark if offset == -1 else offset
    if not 0 <= target <= log.high_watermark:
        raise OffsetOutOfRangeError("delete offset past the high watermark", topic=topic,
                                    partition=partition, offset=offset,
                                    high_watermark=log.high_watermark)
    await topics.log_store.delete_before(topic, partition, target)
    return topics.log_store.offsets(topic, partition).log_start_offset


def partition_size_bytes(topics: TopicRegistry, topic: str, partition: int) -> int:
    """Bytes the partition's data takes in its store."""
    topics.check_partition(topic, partition)
    return topics.log_store.usage(topic, partition).size_bytes


def max_timestamp(topics: TopicRegistry, topic: str, partition: int) -> int:
    """The largest record timestamp in the partition (-1: none)."""
    topics.check_partition(topic, partition)
    return topics.log_store.usage(topic, partition).max_timestamp_ms
