"""Broker statistics: plain counters kept where events happen, and snapshots read on demand.

Owns: ``TrafficCounters`` (per topic and partition: records and bytes appended,
records handed to consumers, bytes served by fetches), ``SharedGroupCounters``
(per shared group: deliveries, redeliveries, acks, dead records, consumers seen)
and the value types of a snapshot (``BrokerStats``) that ``Broker.stats`` builds
for the metrics collector, the management API or a CLI.

Must not know: Prometheus or any exposition format (conveyor.server.metrics turns
these into metrics), sockets, protocols.

Cost rule: counting is O(1) per append, fetch, acquire call or settled receipt (the
settle loop is per receipt already); nothing here runs per record on the Kafka path.
Snapshots cost O(partitions + queue windows) and are taken at scrape time only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .ordered_group import GroupState

if TYPE_CHECKING:
    from conveyor.storage.log_api import LogOffsets, LogStore

    from .ordered_group import OrderedGroup
    from .types import TopicInfo

# A consumer counts as attached to a shared group while it holds a lock or acquired
# within this window: longer than the longest acquire long-poll (30 s), so a consumer
# parked in a poll is never missed between two of its polls.
CONSUMER_ACTIVE_MS: Final = 60_000
# Consumer ids remembered per group; past it, expired ids are dropped, and a group with
# more live consumers than this reports this many (a bound, not a real limit).
CONSUMERS_TRACKED_MAX: Final = 10_000


@dataclass(slots=True)
class PartitionCounters:
    records_in: int = 0  # records appended (every protocol)
    bytes_in: int = 0  # record batch bytes appended
    records_out: int = 0  # records handed out: shared-group deliveries and record reads
    bytes_out: int = 0  # record batch bytes served by fetches (the Kafka path)


class TrafficCounters:
    """topic -> partition -> counters; a deleted topic's counters go with it."""

    def __init__(self) -> None:
        self._topics: dict[str, dict[int, PartitionCounters]] = {}

    def partition(self, topic: str, partition: int) -> PartitionCounters:
        partitions = self._topics.get(topic)
        if partitions is None:
            partitions = self._topics[topic] = {}
        counters = partitions.get(partition)
        if counters is None:
            counters = partitions[partition] = PartitionCounters()
        return counters

    def find(self, topic: str, partition: int) -> PartitionCounters | None:
        partitions = self._topics.get(topic)
        return None if partitions is None else partitions.get(partition)

    def forget_topic(self, topic: str) -> None:
        self._topics.pop(topic, None)


@dataclass(slots=True)
class SharedGroupCounters:
    delivered: int = 0  # records handed out by acquire (first deliveries and redeliveries)
    redelivered: int = 0  # of those, deliveries after the first (delivery count > 1)
    acked: int = 0  # receipts acknowledged
    dead_lettered: int = 0  # records that died: rejected, expired, out of deliveries, dropped
    # consumer id -> monotonic ms of its last acquire
    consumers_seen: dict[str, int] = field(default_factory=dict)

    def saw_consumer(self, consumer_id: str, now_ms: int) -> None:
        seen = self.consumers_seen
        if consumer_id not in seen and len(seen) >= CONSUMERS_TRACKED_MAX:
            self.forget_idle(now_ms)
            if len(seen) >= CONSUMERS_TRACKED_MAX:
                return
        seen[consumer_id] = now_ms

    def forget_idle(self, now_ms: int) -> None:
        idle = [consumer for consumer, seen_ms in self.consumers_seen.items()
                if now_ms - seen_ms > CONSUMER_ACTIVE_MS]
        for consumer in idle:
            del self.consumers_seen[consumer]


# --- snapshot value types ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PartitionStats:
    topic: str
    partition: int
    kind: str  # "topic" or "queue"
    log_start_offset: int
    log_end_offset: int  # the high watermark: next offset a reader can see
    size_bytes: int  # bytes of its segments (0 where the store has no segments)
    segments: int
    counters: PartitionCounters
    # corrupt batches set aside since open (recovery or a reader found them; each logged once)
    damaged_batches: int = 0
    failed: bool = False  # appends refused after an fsync failure (restart to recover)


@dataclass(frozen=True, slots=True)
class QueueStats:
    name: str
    ready: int  # available now (records not loaded into the window yet count as ready)
    unacked: int  # acquired, locked until acked, released or expired
    delayed: int  # released with a delay or published with deliver-at, not due yet
    consumers: int  # distinct consumers holding a lock or seen within CONSUMER_ACTIVE_MS
    published: int  # records appended to the queue's topic since start
    delivered: int
    redelivered: int
    acked: int
    dead_lettered: int


@dataclass(frozen=True, slots=True)
class GroupPartitionStats:
    group: str
    topic: str
    partition: int
    committed_offset: int  # -1: nothing committed
    lag: int  # log end - committed offset


@dataclass(frozen=True, slots=True)
class GroupStats:
    group: str
    state: str  # Empty, Stable, PreparingRebalance, ...
    members: int


@dataclass(frozen=True, slots=True)
class BrokerStats:
    partitions: list[PartitionStats]
    queues: list[QueueStats]
    groups: list[GroupStats]
    group_partitions: list[GroupPartitionStats]
    # family -> series left out by the limits ("partitions", "queues", "group_partitions")
    omitted: dict[str, int]
    segments_total: int  # over every partition, exported or not
    size_bytes_total: int


@dataclass(frozen=True, slots=True)
class StatsLimits:
    """How many series a snapshot holds (first by name); the rest are counted as omitted."""

    partitions_max: int = 2_000
    queues_max: int = 1_000
    group_partitions_max: int = 2_000


# --- snapshot builders (called by Broker.stats) -------------------------------------------
def partition_stats(
    topics: Iterable[TopicInfo], log_store: LogStore, traffic: TrafficCounters,
    partitions_max: int,
) -> tuple[list[PartitionStats], int, int, int]:
    """(exported partitions, omitted, segments over all, bytes over all), by topic name."""
    exported: list[PartitionStats] = []
    omitted = segments_total = size_total = 0
    for info in sorted(topics, key=lambda item: item.name):
        for partition in range(info.partitions):
            log = log_store.offsets(info.name, partition)
            usage = log_store.usage(info.name, partition)
            segments, size_bytes = usage.segments, usage.size_bytes
            segments_total += segments
            size_total += size_bytes
            if len(exported) >= partitions_max:
                omitted += 1
                continue
            counters = traffic.find(info.name, partition) or PartitionCounters()
            exported.append(PartitionStats(
                info.name, partition, info.kind, int(log.log_start_offset),
                int(log.high_watermark), size_bytes, segments, counters,
                usage.damaged_batches, usage.failed))
    return exported, omitted, segments_total, size_total


def ordered_group_stats(
    groups: Iterable[OrderedGroup], log_for: Callable[[str, int], LogOffsets],
    topic_partitions: Callable[[str], int | None], group_partitions_max: int,
) -> tuple[list[GroupStats], list[GroupPartitionStats], int]:
    """Every live ordered group, and its committed partitions up to the limit."""
    described: list[GroupStats] = []
    exported: list[GroupPartitionStats] = []
    omitted = 0
    for group in sorted(groups, key=lambda item: item.group_id):
        if group.state is GroupState.DEAD:
            continue
        described.append(GroupStats(group.group_id, group.state.value, len(group.members)))
        for topic, partition in sorted(group.offsets):
            partitions = topic_partitions(topic)
            if partitions is None or partition >= partitions:
                continue  # committed to a topic deleted since, or shrunk
            if len(exported) >= group_partitions_max:
                omitted += 1
                continue
            log = log_for(topic, partition)
            committed = group.offsets[(topic, partition)].offset
            lag = max(0, int(log.high_watermark) - committed)  # as Broker.group_lag
            exported.append(GroupPartitionStats(group.group_id, topic, partition, committed,
                                                lag))
    return described, exported, omitted
