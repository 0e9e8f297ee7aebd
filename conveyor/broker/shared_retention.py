"""WorkQueueRetention: a work-queue topic's log shrinks behind its shared groups.

Owns: per (topic, partition), the offset last passed to ``delete_before`` and when.
Once every shared group of a work-queue topic is past an offset, the log below it is
dropped (whole segments go; the log start offset moves), at most once per
``RETENTION_INTERVAL_MS`` per partition. Must not know: records, receipts.
"""

from __future__ import annotations

from collections.abc import Iterable

from conveyor.clock import Clock

from .shared_model import SharedGroupWindows
from .topics import TopicRegistry

# work-queue retention moves a partition's log start (a small file written with fsyncs on
# the event loop, partition_log.delete_before) at most this often; the acked records
# between stay readable a little longer, nothing else depends on it
RETENTION_INTERVAL_MS = 1_000


class WorkQueueRetention:
    def __init__(self, topics: TopicRegistry, clock: Clock) -> None:
        self.topics = topics
        self.clock = clock
        # (topic, partition) -> offset last passed to delete_before
        self.retained: dict[tuple[str, int], int] = {}
        # (topic, partition) -> when its log start last moved (monotonic ms)
        self.retained_at: dict[tuple[str, int], int] = {}

    async def apply(self, groups: Iterable[SharedGroupWindows]) -> None:
        """Once every shared group of a work-queue topic is past an offset, drop the log
        below it (whole segments go; the log start offset moves)."""
        lowest: dict[tuple[str, int], int] = {}
        for state in groups:
            info = self.topics.find(state.topic)
            if info is None or info.config.cleanup_policy != "work-queue":
                continue
            for partition, part in state.partitions.items():
                key = (state.topic, partition)
                lowest[key] = min(lowest.get(key, part.start_offset), part.start_offset)
        now_ms = self.clock.monotonic_ms()
        for (topic, partition), offset in lowest.items():
            key = (topic, partition)
            if offset > self.retained.get(key, -1):
                if now_ms < self.retained_at.get(key, -RETENTION_INTERVAL_MS) \
                        + RETENTION_INTERVAL_MS:
                    continue  # the log start file is written (and fsynced) at most 1/s
                if offset > self.topics.offsets(topic, partition).log_start_offset:
                    await self.topics.log_store.delete_before(topic, partition, offset)
                    self.retained_at[key] = now_ms
                self.retained[key] = offset
