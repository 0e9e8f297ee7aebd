"""Producer: appends to partition logs, with idempotence and topic auto-creation.

Owns: raw RecordBatch appends (validation of sizes, the idempotent-producer check
under a per-(producer, partition) lock), publishing ``Message``s as batches
(partitioning, the reserved ``conveyor.*`` headers), producer ids, and the
auto-creation of a topic on first produce.
May call: the topic registry, producer state, the partitioner, the state store.
It calls nothing above it: after an append it tells the listeners it was given
(``on_append(topic, partition)``; ``on_records(topic, partition, base_offset, records)``
for a queue), which the facade wires to the fetcher and the share coordinator.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence

from conveyor.clock import Clock
from conveyor.errors import (
    InvalidRequestError,
    InvalidTxnStateError,
    NotLeaderError,
    OperatingError,
    RecordTooLargeError,
    UnknownTopicError,
)
from conveyor.storage.control_batch import build_control_batch
from conveyor.storage.log_api import AppendRequest, PartitionLease
from conveyor.storage.record_batch import (
    BatchHeader,
    RecordData,
    build_batch,
    decode_records,
    split_batches,
)
from conveyor.storage.state_store import StateStore
from conveyor.tasks import Supervisor

from .broker_config import BrokerConfig, Gate
from .keyed_locks import KeyedLocks
from .partitioner import StickyPartitioner
from .producer_state import IncomingBatch, ProducerStates
from .stats import TrafficCounters
from .topics import TopicRegistry
from .types import (
    HEADER_DEDUP_ID,
    HEADER_DELIVER_AT,
    HEADER_EXPIRES_AT,
    HEADER_GROUP,
    HEADER_PRIORITY,
    AppendResult,
    Message,
    PublishResult,
    TopicInfo,
)

AppendListener = Callable[[str, int], None]
RecordsListener = Callable[[str, int, int, list[RecordData]], None]
# (topic, partition, producer id, epoch): raises unless the transaction holds the partition
TransactionalCheck = Callable[[str, int, int, int], None]
# (topic, partition, producer id, epoch): add the partition to the producer's transaction
ImplicitAdd = Callable[[str, int, int, int], Awaitable[None]]
# (topic, partition, producer id, base offset): a transactional batch is being appended
TransactionalListener = Callable[[str, int, int, int], None]


class Producer:
    def __init__(
        self, topics: TopicRegistry, producers: ProducerStates, state_store: StateStore,
        clock: Clock, rng: random.Random, config: BrokerConfig, gate: Gate,
        supervisor: Supervisor, traffic: TrafficCounters,
    ) -> None:
        self.topics = topics
        self.traffic = traffic  # records and bytes in per partition (metrics)
        self.producers = producers
        self.state_store = state_store
        self.clock = clock
        self.config = config
        self.gate = gate
        self.supervisor = supervisor
        self.partitioner = StickyPartitioner(rng)
        # (producer id, topic, partition) -> lock serialising check + append; pruned
        self.producer_locks = KeyedLocks()
        # topic name -> its auto-creation in progress
        self._auto_creating: dict[str, asyncio.Task[TopicInfo]] = {}
        self.on_append: AppendListener = _ignore_append
        self.on_records: RecordsListener | None = None
        # whether a topic is a queue whose group decodes every record (the facade wires
        # it to the share coordinator)
        self.is_queue: Callable[[str], bool] = _no_queue
        # transactions (the facade wires them to the transaction coordinator): the check
        # of a transactional batch, under the producer lock, and the index of open ones
        self.check_transactional: TransactionalCheck | None = None
        self.on_transactional: TransactionalListener | None = None
        self.add_transactional: ImplicitAdd | None = None  # Produce v12+ (KIP-890 part 2)
        # a cluster node: before the lock, the transaction of a producer coordinated by
        # another node (read from the state store; broker/txn_cluster.py)
        self.verify_transactional: ImplicitAdd | None = None
        # a cluster node: its lease on a partition it leads (None: it does not); a Kafka
        # append carries it and the store writes it only while it holds (log_api.py)
        self.lease: Callable[[str, int], PartitionLease | None] | None = None

    def forget_topic(self, name: str) -> None:
        self.producers.forget_topic(name)
        self.partitioner.forget(name)

    async def ensure_topic(self, name: str) -> TopicInfo:
        """The topic, created with defaults when auto_create_topics allows it."""
        info = self.topics.find(name)
        if info is not None:
            return info
        if not self.config.auto_create_topics:
            raise UnknownTopicError("unknown topic", topic=name)
        # concurrent first produces to one new topic share one creation, a task of the
        # producer's supervisor (so a cancelled first caller does not abort it)
        pending = self._auto_creating.get(name)
        if pending is None:
            pending = self.supervisor.start(
                self.topics.create(name, self.config.default_partitions),
                name=f"auto-create {name}")
            self._auto_creating[name] = pending
            pending.add_done_callback(lambda _: self._auto_creating.pop(name, None))
        return await asyncio.shield(pending)

    async def append_batch(
        self, topic: str, partition: int, batch: bytes | bytearray | memoryview,
        implicit_transaction: bool = False,
    ) -> AppendResult:
        """Append raw Kafka RecordBatch(es): validate, limit, idempotence check, append."""
        info = await self.ensure_topic(topic)
        self.topics.check_partition(topic, partition)
        lease = None
        if self.lease is not None:
            lease = self.lease(topic, partition)
            if lease is None:
                raise NotLeaderError("this node does not lead the partition", topic=topic,
                                     partition=partition)
        batches = split_batches(batch)
        headers = [header for _, header in batches]
        size_max = min(info.config.max_message_bytes, self.config.record_bytes_max)
        for header in headers:
            if header.size_bytes > size_max:
                raise RecordTooLargeError(
                    "batch larger than max.message.bytes", topic=topic, partition=partition,
                    size_bytes=header.size_bytes, size_max=size_max,
                )
        if self._has_record_readers(topic, info):
            for position, _ in batches:  # queues decode every record: refuse what cannot be
                decode_records(batch, position)
        incoming = [
            IncomingBatch(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count)
            for h in headers
        ]
        producer_id = incoming[0].producer_id
        if producer_id < 0 and any(h.is_transactional or h.is_control for h in headers):
            raise InvalidRequestError("a transactional batch needs a producer id",
                                      topic=topic, partition=partition)
        if producer_id < 0:
            return await self.append(topic, partition, batch, (), lease)
        appended = await self._append_idempotent(topic, partition, batch, headers, incoming,
                                                 implicit_transaction, lease)
        if not appended.duplicate:
            # the producer's sequences and checkpoint, written in the append's turn: made
            # durable by the next barrier pass, outside the lock, so the producer's next
            # batch is checked and written meanwhile (a crash before that pass loses
            # nothing: recovery re-scans the log past the last durable checkpoint)
            await self.state_store.commit()
        return appended

    async def _append_idempotent(
        self, topic: str, partition: int, batch: bytes | bytearray | memoryview,
        headers: Sequence[BatchHeader], incoming: Sequence[IncomingBatch],
        implicit_transaction: bool, lease: PartitionLease | None,
    ) -> AppendResult:
        """The sequence check and the append, under the (producer, partition) lock; the
        lock is held until the log append is durable, not across the state commit."""
        producer_id = incoming[0].producer_id
        key = (producer_id, topic, partition)
        transactional = headers[0].is_transactional
        if implicit_transaction and transactional and self.add_transactional is not None \
                and not any(header.is_control for header in headers):
            # before the producer lock: the marker write takes it under the transaction's
            await self.add_transactional(topic, partition, producer_id,
                                         headers[0].producer_epoch)
        if transactional and self.verify_transactional is not None:
            # a cluster node reads the transaction of a producer coordinated elsewhere
            await self.verify_transactional(topic, partition, producer_id,
                                            headers[0].producer_epoch)
        async with self.producer_locks.hold(key):
            if transactional or any(header.is_control for header in headers):
                self._check_transactional(topic, partition, headers)
            duplicate = self.producers.check(topic, partition, incoming)
            if duplicate is not None:
                return AppendResult(
                    duplicate.base_offset, duplicate.last_offset, -1,
                    self.topics.log_store.offsets(topic, partition).log_start_offset,
                    duplicate=True,
                )
            if transactional and self.on_transactional is not None:
                # before the append assigns it (at the log end, before the store's first
                # suspension): the LSO must hold the batch back from the moment it can
                # become visible
                log_end = self.topics.log_store.offsets(topic, partition).log_end_offset
                self.on_transactional(topic, partition, producer_id, log_end)
            return await self.append(topic, partition, batch, incoming, lease)

    def _check_transactional(self, topic: str, partition: int,
                             headers: Sequence[BatchHeader]) -> None:
        """KIP-890: a transactional batch is appended only while its producer's ongoing
        transaction holds the partition; clients never write control batches."""
        first = headers[0]
        if any(header.is_control for header in headers) or any(
                header.is_transactional != first.is_transactional for header in headers):
            raise InvalidRequestError("control batches are written by the broker only",
                                      topic=topic, partition=partition)
        if self.check_transactional is None:
            raise InvalidTxnStateError("transactions are not enabled", topic=topic)
        self.check_transactional(topic, partition, first.producer_id, first.producer_epoch)

    async def append_marker(self, topic: str, partition: int, producer_id: int,
                            producer_epoch: int, commit: bool, coordinator_epoch: int) -> int:
        """Append a COMMIT/ABORT control batch under the producer's partition lock (so no
        batch of the transaction lands after it); its offset."""
        marker = build_control_batch(producer_id, producer_epoch, commit, coordinator_epoch,
                                     self.clock.wall_ms())
        async with self.producer_locks.hold((producer_id, topic, partition)):
            appended = await self.append(topic, partition, marker, ())
        return appended.base_offset

    def _has_record_readers(self, topic: str, info: TopicInfo) -> bool:
        """A queue's records are decoded by its consumers (AMQP, SQS, HTTP), so a Kafka
        batch for it is decoded once at ingress; other topics' batches are only CRC-checked
        (the Kafka path creates no object per record; a reader that meets an undecodable
        batch sets it aside, see Fetcher.read_records)."""
        return info.config.cleanup_policy == "work-queue" or self.is_queue(topic)

    async def append(
        self, topic: str, partition: int, batch: bytes | bytearray | memoryview,
        incoming: Sequence[IncomingBatch], lease: PartitionLease | None = None,
    ) -> AppendResult:
        self.gate.check()
        store = self.topics.log_store
        (appended,) = await store.append((AppendRequest(
            topic, partition, batch, check_sequences=bool(incoming),
            lease=lease),))
        if isinstance(appended, OperatingError):
            raise appended
        if appended.duplicate:  # a store shared by nodes saw this retry written before
            return AppendResult(appended.base_offset, appended.last_offset, -1,
                                store.offsets(topic, partition).log_start_offset,
                                duplicate=True)
        counters = self.traffic.partition(topic, partition)
        counters.records_in += appended.last_offset - appended.base_offset + 1
        counters.bytes_in += len(batch)
        if incoming:
            offset = appended.base_offset
            for item in incoming:
                last_offset = offset + item.record_count - 1
                self.producers.observe(
                    topic, partition, item.producer_id, item.producer_epoch, item.base_sequence,
                    item.last_sequence, offset, last_offset,
                )
                offset = last_offset + 1
            self.producers.persist(
                topic, partition, [item.producer_id for item in incoming],
                appended.last_offset + 1,
            )
        self.on_append(topic, partition)
        return AppendResult(
            appended.base_offset, appended.last_offset, appended.log_append_time_ms,
            store.offsets(topic, partition).log_start_offset,
        )

    async def partition_for_key(self, topic: str, key: bytes | None) -> int:
        info = await self.ensure_topic(topic)
        return self.partitioner.partition(topic, key, info.partitions)

    async def publish_records(
        self, info: TopicInfo, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Publish without shared-group admission (dedup/overflow): the raw append path."""
        if partition is not None:
            self.topics.check_partition(info.name, partition)
        now_ms = self.clock.wall_ms()
        # partition -> [(position in messages, record)]
        grouped: dict[int, list[tuple[int, RecordData]]] = {}
        keyless = False
        for index, message in enumerate(messages):
            target = partition
            if target is None:
                target = self.partitioner.partition(info.name, message.key, info.partitions)
                keyless = keyless or message.key is None
            grouped.setdefault(target, []).append((index, to_record_data(message, now_ms)))
        if keyless:
            self.partitioner.next_batch(info.name, info.partitions)
        results: list[PublishResult | None] = [None] * len(messages)
        if len(grouped) == 1:  # the common case: no task per append
            ((target, entries),) = grouped.items()
            await self._publish_partition(info, target, entries, results)
        else:
            # every partition's append runs to its end (a failure of one does not cancel
            # the others mid-fsync); the first failure is raised as itself afterwards
            failures: list[BaseException] = []
            async with asyncio.TaskGroup() as group:
                for target, entries in grouped.items():
                    group.create_task(self._publish_partition_noting_failure(
                        info, target, entries, results, failures))
            if failures:
                raise failures[0]
        return [result for result in results if result is not None]

    async def _publish_partition_noting_failure(
        self, info: TopicInfo, partition: int, entries: list[tuple[int, RecordData]],
        results: list[PublishResult | None], failures: list[BaseException],
    ) -> None:
        try:
            await self._publish_partition(info, partition, entries, results)
        except Exception as error:  # raised by publish_records once all are done
            failures.append(error)

    async def _publish_partition(
        self, info: TopicInfo, partition: int, entries: list[tuple[int, RecordData]],
        results: list[PublishResult | None],
    ) -> None:
        size_max = min(info.config.max_message_bytes, self.config.record_bytes_max)
        batches = build_batches([record for _, record in entries], size_max, info.name)
        appended = await self.append(info.name, partition, b"".join(batches), ())
        for offset_delta, (index, _) in enumerate(entries):
            offset = appended.base_offset + offset_delta
            results[index] = PublishResult(info.name, partition, offset)
        if info.kind == "queue" and self.on_records is not None:
            # the records just written, so a queue's consumers need not decode them back
            self.on_records(info.name, partition, appended.base_offset,
                            [record for _, record in entries])

    async def init_producer_id(self, transactional_id: str | None = None) -> tuple[int, int]:
        return await self.producers.init_producer_id(transactional_id)


def _ignore_append(topic: str, partition: int) -> None:
    return None


def _no_queue(topic: str) -> bool:
    return False


def to_record_data(message: Message, now_ms: int) -> RecordData:
    """A Message as a record, with its queue features in the reserved headers."""
    timestamp_ms = message.timestamp_ms if message.timestamp_ms is not None else now_ms
    if (message.priority is None and message.deliver_at_ms is None
            and message.expires_at_ms is None and message.dedup_id is None
            and message.message_group is None):
        # nothing to add: the message's own tuple (publishers that share one, as AMQP's
        # do per properties, exchange and routing key, keep sharing it in the window)
        return RecordData(message.key, message.value, tuple(message.headers), timestamp_ms)
    headers = list(message.headers)
    if message.priority is not None:
        headers.append((HEADER_PRIORITY, str(message.priority).encode()))
    if message.deliver_at_ms is not None:
        headers.append((HEADER_DELIVER_AT, str(message.deliver_at_ms).encode()))
    if message.expires_at_ms is not None:
        headers.append((HEADER_EXPIRES_AT, str(message.expires_at_ms).encode()))
    if message.dedup_id is not None:
        headers.append((HEADER_DEDUP_ID, message.dedup_id.encode()))
    if message.message_group is not None:
        headers.append((HEADER_GROUP, message.message_group.encode()))
    return RecordData(message.key, message.value, tuple(headers), timestamp_ms)


def build_batches(records: list[RecordData], size_max: int, topic: str) -> list[bytes]:
    """One batch if it fits, else halves recursively; a single record too big is an error."""
    batch = build_batch(records)
    if len(batch) <= size_max:
        return [batch]
    if len(records) == 1:
        raise RecordTooLargeError(
            "record larger than max.message.bytes", topic=topic, size_bytes=len(batch),
            size_max=size_max,
        )
    middle = len(records) // 2
    return build_batches(records[:middle], size_max, topic) + build_batches(
        records[middle:], size_max, topic
    )

