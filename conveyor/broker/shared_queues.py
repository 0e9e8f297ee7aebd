"""SharedQueues: declaring, altering, purging, deleting and counting queues and groups.

The middle layer of the share coordinator (on ``SharedWindows``; ``SharedGroups`` is
the whole, see shared_groups.py for the API). Owns: queue declarations (a queue = a
topic with cleanup policy "work-queue" + a shared group of the same name), shared
groups on plain topics (KIP-932: created, reset, deleted), one declare/delete/purge
of a queue at a time (``hold_queue``), and the queues' counts and statistics. A
deleted queue's topic is the facade's to delete.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from conveyor.errors import (
    InvalidRequestError,
    OffsetOutOfRangeError,
    PreconditionFailedError,
    UnknownGroupError,
    UnknownPartitionError,
    UnknownQueueError,
)
from conveyor.storage.state_store import QueueRow
from conveyor.storage.text import check_storable

from .delivery import DedupWindow
from .keyed_locks import KeyedLocks
from .shared_group import RecordState, SharedPartition
from .shared_model import (
    SharedGroupsHost,
    SharedGroupWindows,
    config_from_mapping,
    config_to_json,
)
from .shared_windows import SharedWindows
from .stats import CONSUMER_ACTIVE_MS, CONSUMERS_TRACKED_MAX, QueueStats, TrafficCounters
from .types import QueueConfig, QueueInfo, TopicConfig

# A queue's records are limited by the listener that accepts them (AMQP 16 MiB by default, as
# RabbitMQ 4; HTTP's body_bytes_max), under the broker-wide record_bytes_max ceiling.
QUEUE_RECORD_BYTES_MAX = 129 << 20


class SharedQueues(SharedWindows):
    def __init__(self, host: SharedGroupsHost, traffic: TrafficCounters | None = None) -> None:
        super().__init__(host, traffic)
        # queue name -> its declare/delete/purge, one at a time (each awaits in between:
        # a delete during a declare left the declare without its group, found by fuzzing)
        self._lifecycle = KeyedLocks()
        # queue configs altered here: started and finished (conveyor/cluster/catalog_apply.py
        # throws away a re-read that overlapped one)
        self.config_changes = 0
        self.configs_changing = 0

    # --- declarations ----------------------------------------------------------------
    async def declare_queue(self, name: str, config: QueueConfig | None = None) -> QueueInfo:
        async with self._lifecycle.hold(name):
            return await self._declare_queue(name, config)

    async def _declare_queue(self, name: str, config: QueueConfig | None) -> QueueInfo:
        config = config or QueueConfig()
        if config.max_priority is not None and not 0 <= config.max_priority <= 9:
            raise InvalidRequestError("max_priority must be 0..9", max_priority=config.max_priority)
        existing = self._groups.get((name, name))
        if existing is not None and existing.is_queue:
            if existing.config != config:
                raise PreconditionFailedError(
                    "queue exists with a different config", queue=name)
            return await self.get_queue(name)
        info = self.host.topics.find(name)
        if info is not None and info.kind != "queue":
            raise PreconditionFailedError("a topic of this name exists", queue=name)
        if info is None:
            topic_config = TopicConfig(cleanup_policy="work-queue", fsync=config.fsync,
                                       max_message_bytes=QUEUE_RECORD_BYTES_MAX)
            await self.host.topics.create(name, config.partitions, topic_config, kind="queue")
        self.host.state_store.save_queue(
            QueueRow(name, dataclasses.asdict(config), self.clock.wall_ms()))
        self.store.save_group(name, name, config_to_json(config))
        self._dedup.setdefault(name, DedupWindow())
        await self._load_group(name, name, config, True)
        state = self._groups.get((name, name))
        if state is None:  # its topic was deleted (as a topic) while this awaited
            raise UnknownQueueError("queue deleted while it was declared", queue=name)
        for partition, part in state.partitions.items():
            self._save_start(state, partition, part)
        await self.persister.durable()
        return await self.get_queue(name)

    async def create_shared_group(
        self, topic: str, group: str, config: QueueConfig | None = None,
        start: Literal["earliest", "latest"] = "latest",
    ) -> None:
        """A shared group on any topic; ``start`` as KIP-932 share.auto.offset.reset."""
        check_storable("group name", (group,))
        config = config or QueueConfig()
        existing = self._groups.get((group, topic))
        if existing is not None:
            if existing.config != config:
                raise PreconditionFailedError(
                    "shared group exists with a different config", group=group, topic=topic)
            return
        info = self.host.topics.get(topic)
        # saved before (by another cluster node, which served the group until it died):
        # its start offsets and record states are the group's, not a fresh start
        saved = await self.store.load_start_offsets(group, topic)
        self.store.save_group(group, topic, config_to_json(config))
        await self._load_group(group, topic, config, False)
        state = self._groups[(group, topic)]
        for partition in range(info.partitions):
            if partition in saved:
                continue
            log = self.host.topics.offsets(topic, partition)
            offset = log.high_watermark if start == "latest" else log.log_start_offset
            part = state.partitions[partition]
            part.start_offset = part.next_offset = offset
            self._save_start(state, partition, part)
        await self.persister.durable()

    def shared_group_start_offsets(self, topic: str, group: str) -> dict[int, int] | None:
        """Per partition, the offset below which every record is settled (KIP-932's
        share-partition start offset); None when the group does not read the topic."""
        state = self._groups.get((group, topic))
        if state is None:
            return None
        return {partition: part.start_offset for partition, part in state.partitions.items()}

    async def reset_shared_partition(self, topic: str, group: str, partition: int,
                                     offset: int) -> int:
        """Move one partition's start offset to ``offset`` (KIP-932's AlterShareGroupOffsets):
        the record states of that partition are forgotten, so records from ``offset`` on
        are delivered afresh, their delivery counts starting again. An offset below the
        log start starts at the log start; past the high watermark is
        OffsetOutOfRangeError. Refused for a queue's own group and while a record of the
        partition is acquired. Returns the new start offset."""
        state = self._groups.get((group, topic))
        if state is None:
            raise UnknownGroupError("no such shared group", group=group, topic=topic)
        if state.is_queue:
            raise PreconditionFailedError("a queue's own group is reset by purging the queue",
                                          group=group)
        self._add_new_partitions(state)
        part = state.partitions.get(partition)
        if part is None:
            raise UnknownPartitionError("no such partition", topic=topic, partition=partition)
        if any(entry.state is RecordState.ACQUIRED for entry in part.entries.values()):
            raise PreconditionFailedError("records of the partition are acquired",
                                          group=group, topic=topic, partition=partition)
        log = self.host.topics.offsets(topic, partition)
        if offset < 0 or offset > log.high_watermark:
            raise OffsetOutOfRangeError("start offset outside the log", topic=topic,
                                        partition=partition, offset=offset,
                                        high_watermark=int(log.high_watermark))
        await self._flush(state, part)  # dead letters of records that died go out first
        start = max(offset, self.host.topics.offsets(topic, partition).log_start_offset)
        fresh = SharedPartition(topic, partition, group, state.config, start_offset=start,
                                next_offset=start)
        state.partitions[partition] = fresh
        self._save_start(state, partition, fresh)
        await self.persister.durable()
        self.polls.wake(group, topic)
        return start

    async def delete_shared_group(self, topic: str, group: str) -> None:
        """Forget a shared group on a plain topic (not a queue's own group): its record
        states go, and a later create_shared_group starts it afresh."""
        state = self._groups.get((group, topic))
        if state is None:
            raise UnknownGroupError("no such shared group", group=group, topic=topic)
        if state.is_queue:
            raise PreconditionFailedError("a queue's own group goes with the queue",
                                          group=group)
        del self._groups[(group, topic)]
        self.store.delete_group(group, topic)
        self.polls.wake(group, topic)
        await self.persister.durable()

    async def delete_queue(self, name: str, if_unused: bool = False,
                           if_empty: bool = False) -> int:
        """Forget the queue and its groups (durably), one at a time with its declare and
        purge; its topic is the facade's to delete (``Broker.delete_queue`` does both
        under ``hold_queue``, in one COMMIT)."""
        async with self._lifecycle.hold(name):
            dropped = await self.remove_queue(name, if_unused, if_empty)
        await self.persister.durable()
        return dropped

    def hold_queue(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The queue's declare/delete/purge lock (not reentrant)."""
        return self._lifecycle.hold(name)

    async def remove_queue(self, name: str, if_unused: bool = False,
                           if_empty: bool = False) -> int:
        """delete_queue without the COMMIT: the ready and delayed records dropped. The
        caller holds ``hold_queue(name)``."""
        state = self._queue(name)
        ready, in_flight, delayed = await self._counts(state)
        if if_unused and (in_flight or self.polls.waiters.get((name, name))):
            raise PreconditionFailedError("queue in use", queue=name, in_flight=in_flight)
        if if_empty and ready + in_flight + delayed:
            raise PreconditionFailedError("queue not empty", queue=name, ready=ready)
        for key in [key for key in self._groups if key[1] == name]:
            del self._groups[key]
            self.store.delete_group(*key)
        self._dedup.pop(name, None)
        self.appended.drop_topic(name)
        self.store.delete_queue(name)
        self.host.state_store.delete_queue(name)
        self.polls.wake(name, name)
        return ready + delayed

    async def alter_queue(self, name: str, config: QueueConfig) -> QueueInfo:
        """Replace a queue's config (SQS SetQueueAttributes); in-flight locks keep their
        deadlines, the new settings apply to the next acquire. Partitions cannot change."""
        state = self._queue(name)
        if config.partitions != state.config.partitions:
            raise InvalidRequestError("partitions cannot change", queue=name)
        self.config_changes += 1  # a cluster node's re-read overlapping it reads again
        self.configs_changing += 1
        try:
            _set_config(state, config)
            self.host.state_store.save_queue(
                QueueRow(name, dataclasses.asdict(config), self.clock.wall_ms()))
            self.store.save_group(name, name, config_to_json(config))
            await self.persister.durable()
        finally:
            self.configs_changing -= 1
            self.config_changes += 1
        return await self.get_queue(name)

    def apply_config(self, name: str, values: Mapping[str, Any]) -> None:
        """A queue's config as stored by another cluster node that altered it: held here
        from the next acquire on (memory only: that node wrote the rows)."""
        state = self._groups.get((name, name))
        config = config_from_mapping(values)
        if state is not None and state.is_queue and state.config != config \
                and config.partitions == state.config.partitions:
            _set_config(state, config)

    async def purge_queue(self, name: str, local: bool = False) -> int:
        """``local``: this node's window only (a request forwarded by another node)."""
        self._queue(name)
        if not local and self.remote is not None and not await self.remote.serves(name, name):
            return await self.remote.purge(name)  # the owner's window is the one to purge
        async with self._lifecycle.hold(name):
            return await self._purge_queue(name)

    async def _purge_queue(self, name: str) -> int:
        state = self._queue(name)
        purged = 0
        for part in state.partitions.values():
            while True:
                await self._fill(state, part)
                count = part.purge()
                purged += count
                await self._flush(state, part)
                if count == 0 or part.next_offset >= self._high_watermark(part):
                    break
        await self.persister.durable()
        return purged

    async def get_queue(self, name: str, local: bool = False) -> QueueInfo:
        """``local``: this node's counts (another node asks; see SharedRemote.counts)."""
        state = self._queue(name)
        counted = None
        if not local and self.remote is not None and not await self.remote.serves(name, name):
            counted = await self.remote.counts(name)  # None: owner unreachable
        ready, in_flight, delayed = counted or await self._counts(state)
        return QueueInfo(name, state.config, ready, in_flight, delayed)

    async def list_queues(self) -> list[QueueInfo]:
        names = sorted(group for group, topic in self._groups if self.queue_exists(topic)
                       and group == topic)
        return [await self.get_queue(name) for name in names]

    def queue_stats(self, queues_max: int) -> tuple[list[QueueStats], int]:
        """Counts of the first ``queues_max`` queues by name, and how many were left out.

        Read-only and never suspends (metrics scrapes call it): the windows are counted
        as the last timer tick left them; records not loaded yet count as ready. On a
        cluster node, the queues it owns only (another node's copy may be stale)."""
        remote = self.remote  # several nodes: only the owner's window is the truth
        names = sorted(group for group, topic in self._groups
                       if group == topic and self._groups[(group, topic)].is_queue
                       and (remote is None or remote.exports(group, topic)))
        now_ms = self.clock.monotonic_ms()
        exported = []
        for name in names[:queues_max]:
            state = self._groups[(name, name)]
            ready = unacked = delayed = 0
            holders: set[str] = set()
            for part in state.partitions.values():
                counted = part.counts(self._high_watermark(part))
                ready, unacked, delayed = (ready + counted[0], unacked + counted[1],
                                           delayed + counted[2])
                if counted[1]:
                    holders.update(entry.consumer_id for entry in part.entries.values()
                                   if entry.state is RecordState.ACQUIRED
                                   and entry.consumer_id is not None)
            counters = state.counters
            holders.update(consumer for consumer, seen_ms in counters.consumers_seen.items()
                           if now_ms - seen_ms <= CONSUMER_ACTIVE_MS)
            published = sum(item.records_in for item in (
                self.traffic.find(name, partition) for partition in state.partitions)
                if item is not None)
            exported.append(QueueStats(
                name, ready, unacked, delayed, min(len(holders), CONSUMERS_TRACKED_MAX),
                published, counters.delivered, counters.redelivered, counters.acked,
                counters.dead_lettered))
        return exported, max(0, len(names) - queues_max)

    async def _group_for_acquire(self, group: str, topic: str) -> SharedGroupWindows:
        state = self._groups.get((group, topic))
        if state is not None:
            return state
        info = self.host.topics.find(topic)
        if info is None:
            if group == topic:
                raise UnknownQueueError("unknown queue", queue=topic)
            raise UnknownGroupError("unknown topic for shared group", topic=topic, group=group)
        stored = await self._load_declared(group, topic)
        if stored is not None:
            return stored
        await self.create_shared_group(topic, group)  # KIP-932: created on first use
        return self._groups[(group, topic)]


def _set_config(state: SharedGroupWindows, config: QueueConfig) -> None:
    state.config = config
    for part in state.partitions.values():
        part.config = config
