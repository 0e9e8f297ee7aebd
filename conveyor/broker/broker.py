"""Broker: the one async, protocol-free API every protocol adapter calls.

Owns: wiring the domain modules (topics, partitioner, producer state, ordered
groups, routing, shared groups) to the two stores, fetch long-polling (woken by
appends, never by polling), and the background timer (retention, group session
expiry) driven by the Clock. It stays a thin facade: rules live in the modules.

Must not know: sockets, protocols' wire formats, file paths.
Invariants: nothing is appended from a batch that fails validation, a size limit
or an idempotence check; every method that reports success has made its change
durable (log fsync per the topic's policy, state-store COMMIT).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from conveyor.clock import Clock
from conveyor.errors import (
    CorruptRecordError,
    InvalidRequestError,
    InvalidSessionTimeoutError,
    NonEmptyGroupError,
    OffsetOutOfRangeError,
    OperatingError,
    RecordTooLargeError,
    TopicExistsError,
    UnavailableError,
    UnknownExchangeError,
    UnknownGroupError,
    UnknownQueueError,
    UnknownTopicError,
)
from conveyor.storage.log_store import LogConfig, LogStore
from conveyor.storage.partition_log import LogSlice
from conveyor.storage.record_batch import (
    Record,
    RecordData,
    build_batch,
    decode_records,
    split_batches,
)
from conveyor.storage.state_store import (
    BindingRow,
    CommittedOffsetRow,
    ExchangeRow,
    StateStore,
)

from .keyed_locks import KeyedLocks
from .log_end import LostRange, clamp
from .ordered_group import (
    ASSIGNORS,
    CommittedOffset,
    GroupDescription,
    GroupListing,
    GroupState,
    JoinResult,
    MemberIdRequired,
    OrderedGroup,
    SyncResult,
    decode_assignment,
    encode_assignment,
    parse_subscription,
)
from .partitioner import StickyPartitioner
from .producer_state import IncomingBatch, ProducerStates
from .routing import PREDECLARED, Destination, RoutingTable, exchange_info
from .shared_groups import SharedGroups
from .topics import (
    TopicRegistry,
    config_from_mapping,
    config_to_mapping,
    validate_partitions,
    validate_topic_name,
)
from .types import (
    HEADER_DEDUP_ID,
    HEADER_DELIVER_AT,
    HEADER_EXCHANGE,
    HEADER_EXPIRES_AT,
    HEADER_GROUP,
    HEADER_PRIORITY,
    HEADER_ROUTING_KEY,
    AppendResult,
    Binding,
    Delivery,
    DestinationKind,
    ExchangeInfo,
    ExchangeType,
    Headers,
    Message,
    PartitionOffsets,
    PublishResult,
    QueueConfig,
    QueueInfo,
    RouteResult,
    TopicConfig,
    TopicInfo,
)

logger = logging.getLogger("conveyor.broker")

__all__ = [
    "Broker", "BrokerConfig", "CommittedOffset", "GroupDescription", "GroupListing",
    "GroupState", "JoinResult", "MemberIdRequired", "PartitionLag", "SyncResult",
]


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    auto_create_topics: bool = True
    default_partitions: int = 1
    # Broker-wide ceiling on one record batch: AMQP's largest configurable message (128 MiB)
    # plus room for its properties. Each topic's max.message.bytes (1 MiB by default, as
    # Kafka's) applies below it; queues take what their listener accepts.
    record_bytes_max: int = 129 << 20
    retention_check_interval_ms: int = 60_000  # Kafka's log.retention.check.interval.ms is 5 min
    group_check_interval_ms: int = 100  # session-expiry resolution
    fetch_wait_ms_max: int = 30_000  # Kafka clients default fetch.max.wait.ms to 500
    read_bytes_max: int = 4 << 20  # read_records' slice per call
    session_timeout_ms_min: int = 1_000  # Kafka: group.min.session.timeout.ms = 6 s
    session_timeout_ms_max: int = 30 * 60_000  # Kafka: group.max.session.timeout.ms
    # an Empty group whose last commit is this old is deleted with its offsets
    offsets_retention_ms: int = 7 * 24 * 3600 * 1000  # Kafka offsets.retention.minutes=10080


@dataclass(frozen=True, slots=True)
class PartitionLag:
    topic: str
    partition: int
    committed_offset: int  # -1: nothing committed
    high_watermark: int
    lag: int  # high_watermark - committed (or - log_start_offset when nothing committed)


class Broker:
    def __init__(
        self,
        log_store: LogStore,
        state_store: StateStore,
        clock: Clock,
        rng: random.Random,
        config: BrokerConfig | None = None,
    ) -> None:
        self.log_store = log_store
        self.state_store = state_store
        self.clock = clock
        self.rng = rng
        self.config = config or BrokerConfig()
        self.topics = TopicRegistry(log_store, state_store, clock, LogConfig)
        self.producers = ProducerStates(state_store)
        self.routing = RoutingTable(self._queue_exists)
        self._partitioner = StickyPartitioner(rng)
        # group id -> coordinator state
        self._groups: dict[str, OrderedGroup] = {}
        # (topic, partition) -> fetches waiting for an append
        self._append_waiters: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        # (producer id, topic, partition) -> lock serialising check + append
        self._producer_locks = KeyedLocks()  # (producer id, topic, partition); pruned
        self._timer_task: asyncio.Task[None] | None = None
        self._timer_sleeping = False
        # state found past the recovered log end at the last open (log_end.py)
        self.lost_ranges: list[LostRange] = []
        # (topic, partition) -> (base offset, crc, records) of the batch decoded last
        self._decoded: dict[tuple[str, int], tuple[int, int, list[Record]]] = {}
        # topic name -> its auto-creation in progress
        self._auto_creating: dict[str, asyncio.Future[TopicInfo]] = {}
        self._next_retention_ms = 0
        self.shared_groups: SharedGroups | None = None  # created in open()
        self._opened = False
        self._closing = False  # close() started: new work is refused with UnavailableError

    # --- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        self._closing = False
        await self.state_store.open()
        await self.log_store.open()
        await self.topics.load()
        self.producers.load()
        self.lost_ranges = []
        self.producers.clamp_to_logs(self._log_ends(), self.lost_ranges)
        self.producers.forget_missing(self._damaged_logs(), self.lost_ranges)
        self.producers.recover_from_logs(
            [(topic, partition, self.log_store.partition(topic, partition))
             for topic, partition in self.log_store.partitions()
             if self.topics.find(topic) is not None],
            self.config.read_bytes_max,
        )
        self._load_exchanges()
        self._load_groups()
        await self._open_shared_groups()
        if self.shared_groups is not None:
            self.lost_ranges.extend(self.shared_groups.lost_ranges)
        await self.state_store.commit()
        interval_ms = self.config.retention_check_interval_ms
        self._next_retention_ms = self.clock.monotonic_ms() + interval_ms
        self._timer_task = asyncio.get_running_loop().create_task(self._run_timers())
        self._opened = True

    def _check_open(self) -> None:
        if self._closing:
            raise UnavailableError("broker is shutting down")

    async def close(self) -> None:
        self._closing = True
        if self._timer_task is not None:
            # A pass in progress finishes (its dead letters and their state rows land
            # together); a sleeping timer is simply cancelled.
            if self._timer_sleeping:
                self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
            self._timer_task = None
        for waiters in self._append_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if self.shared_groups is not None:
            await self.shared_groups.close()
        for group in self._groups.values():
            for member in list(group.members.values()):
                closing = UnavailableError("broker is shutting down", group_id=group.group_id)
                if member.join_waiter is not None and not member.join_waiter.done():
                    member.join_waiter.set_exception(closing)
                if member.sync_waiter is not None and not member.sync_waiter.done():
                    member.sync_waiter.set_exception(closing)
        if self._opened:
            for topic, partition in self.log_store.partitions():
                log = self.log_store.partition(topic, partition)
                self.state_store.save_producer_checkpoint(topic, partition, log.high_watermark)
        await self.log_store.close()
        await self.state_store.commit()
        await self.state_store.close()
        self._opened = False  # _closing stays set: a closed broker refuses work

    async def _open_shared_groups(self) -> None:
        self.shared_groups = SharedGroups(self)
        await self.shared_groups.open()

    async def _run_timers(self) -> None:
        while not self._closing:
            self._timer_sleeping = True
            try:
                await self.clock.sleep_ms(self.config.group_check_interval_ms)
            finally:
                self._timer_sleeping = False
            now_ms = self.clock.monotonic_ms()
            self._tick_groups(now_ms)
            try:
                if self.shared_groups is not None:
                    await self.shared_groups.tick()
                if now_ms >= self._next_retention_ms:
                    self._next_retention_ms = now_ms + self.config.retention_check_interval_ms
                    await self.log_store.run_retention()
                    await self.expire_groups()
            except OperatingError:
                # a full disk or an I/O error must not stop session expiry; the next
                # tick retries, and the error is in the log with its evidence
                logger.exception("background pass failed")

    async def run_retention(self) -> None:
        """One retention/compaction pass now (also run by the timer)."""
        await self.log_store.run_retention()

    # --- topics ----------------------------------------------------------------------
    async def create_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str | None] | None = None
    ) -> TopicInfo:
        orphan = self.topics.find(name) is None and not self.topics.is_creating(name)
        if orphan and (name, 0) in set(self.log_store.partitions()):
            for topic, partition in list(self.log_store.partitions()):
                if topic == name:  # orphan of a delete interrupted by a crash
                    await self.log_store.delete_partition(topic, partition)
        return await self.topics.create(name, partitions, config)

    def validate_topic(
        self, name: str, partitions: int = 1, config: Mapping[str, str | None] | None = None
    ) -> TopicConfig:
        """Check what create_topic would check, creating nothing (Kafka validate_only)."""
        validate_topic_name(name)
        validate_partitions(partitions)
        topic_config = config_from_mapping(config or {})
        if self.topics.find(name) is not None:
            raise TopicExistsError("topic already exists", topic=name)
        return topic_config

    async def delete_topic(self, name: str) -> None:
        info = await self.topics.delete(name)
        self.producers.forget_topic(name)
        self._partitioner.forget(name)
        for binding in self.routing.remove_destination("topic", name):
            self.state_store.delete_binding(_binding_row(binding))
        for group in self._groups.values():  # as Kafka: offsets of a deleted topic go too
            if any(topic == name for topic, _ in group.offsets):
                group.offsets = {k: v for k, v in group.offsets.items() if k[0] != name}
                self.state_store.delete_committed_offsets(group.group_id, name)
        for partition in range(info.partitions):
            self._wake((name, partition))
        await self.state_store.commit()

    def list_topics(self) -> list[TopicInfo]:
        return self.topics.list_topics()

    def get_topic(self, name: str) -> TopicInfo:
        return self.topics.get(name)

    def topic_config(self, name: str) -> dict[str, str]:
        """The topic's settings under Kafka names (for DescribeConfigs)."""
        return config_to_mapping(self.topics.get(name).config)

    async def alter_topic_config(
        self,
        name: str,
        set: Mapping[str, str | None] | None = None,
        delete: Iterable[str] = (),
    ) -> TopicInfo:
        return await self.topics.alter_config(name, set, delete)

    async def create_partitions(self, name: str, total: int) -> TopicInfo:
        return await self.topics.create_partitions(name, total)

    async def ensure_topic(self, name: str) -> TopicInfo:
        """The topic, created with defaults when auto_create_topics allows it."""
        info = self.topics.find(name)
        if info is not None:
            return info
        if not self.config.auto_create_topics:
            raise UnknownTopicError("unknown topic", topic=name)
        # concurrent first produces to one new topic share one creation
        pending = self._auto_creating.get(name)
        if pending is None:
            pending = asyncio.ensure_future(
                self.topics.create(name, self.config.default_partitions)
            )
            self._auto_creating[name] = pending
            pending.add_done_callback(lambda _: self._auto_creating.pop(name, None))
        return await asyncio.shield(pending)

    # --- produce ---------------------------------------------------------------------
    async def append_batch(
        self, topic: str, partition: int, batch: bytes | bytearray | memoryview
    ) -> AppendResult:
        """Append raw Kafka RecordBatch(es): validate, limit, idempotence check, append."""
        info = await self.ensure_topic(topic)
        log = self.topics.partition_log(topic, partition)
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
        if producer_id < 0:
            return await self._append(topic, partition, log, batch, ())
        key = (producer_id, topic, partition)
        async with self._producer_locks.hold(key):
            duplicate = self.producers.check(topic, partition, incoming)
            if duplicate is not None:
                return AppendResult(
                    duplicate.base_offset, duplicate.last_offset, -1, log.log_start_offset,
                    duplicate=True,
                )
            return await self._append(topic, partition, log, batch, incoming)

    def _has_record_readers(self, topic: str, info: TopicInfo) -> bool:
        """A queue's records are decoded by its consumers (AMQP, SQS, HTTP), so a Kafka
        batch for it is decoded once at ingress; other topics' batches are only CRC-checked
        (the Kafka path creates no object per record; a reader that meets an undecodable
        batch sets it aside, see read_records)."""
        return info.config.cleanup_policy == "work-queue" or (
            self.shared_groups is not None and self.shared_groups.queue_exists(topic))

    async def _append(
        self,
        topic: str,
        partition: int,
        log: Any,
        batch: bytes | bytearray | memoryview,
        incoming: Sequence[IncomingBatch],
    ) -> AppendResult:
        self._check_open()
        appended = await log.append(batch)
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
        self._wake((topic, partition))
        if incoming:
            await self.state_store.commit()
        return AppendResult(
            appended.base_offset, appended.last_offset, appended.log_append_time_ms,
            log.log_start_offset,
        )

    async def partition_for_key(self, topic: str, key: bytes | None) -> int:
        info = await self.ensure_topic(topic)
        return self._partitioner.partition(topic, key, info.partitions)

    async def publish(
        self, topic: str, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Build batches (reserved conveyor.* headers included) and append them."""
        info = await self.ensure_topic(topic)
        if self.shared_groups is not None:
            return await self.shared_groups.filter_publish(info.name, messages, partition)
        return await self.publish_records(info, messages, partition)

    async def publish_records(
        self, info: TopicInfo, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Publish without shared-group admission (dedup/overflow): the raw append path."""
        if partition is not None:
            self.topics.partition_log(info.name, partition)  # raises UnknownPartitionError
        now_ms = self.clock.wall_ms()
        # partition -> [(position in messages, record)]
        grouped: dict[int, list[tuple[int, RecordData]]] = {}
        keyless = False
        for index, message in enumerate(messages):
            target = partition
            if target is None:
                target = self._partitioner.partition(info.name, message.key, info.partitions)
                keyless = keyless or message.key is None
            grouped.setdefault(target, []).append((index, to_record_data(message, now_ms)))
        if keyless:
            self._partitioner.next_batch(info.name, info.partitions)
        results: list[PublishResult | None] = [None] * len(messages)
        if len(grouped) == 1:  # the common case: no task per append
            ((target, entries),) = grouped.items()
            await self._publish_partition(info, target, entries, results)
        else:
            await asyncio.gather(*(
                self._publish_partition(info, target, entries, results)
                for target, entries in grouped.items()
            ))
        return [result for result in results if result is not None]

    async def _publish_partition(
        self,
        info: TopicInfo,
        partition: int,
        entries: list[tuple[int, RecordData]],
        results: list[PublishResult | None],
    ) -> None:
        size_max = min(info.config.max_message_bytes, self.config.record_bytes_max)
        batches = _build_batches([record for _, record in entries], size_max, info.name)
        log = self.topics.partition_log(info.name, partition)
        appended = await self._append(info.name, partition, log, b"".join(batches), ())
        for offset_delta, (index, _) in enumerate(entries):
            offset = appended.base_offset + offset_delta
            results[index] = PublishResult(info.name, partition, offset)
        if info.kind == "queue" and self.shared_groups is not None:
            # the records just written, so a queue's consumers need not decode them back
            self.shared_groups.remember_appended(
                info.name, partition, appended.base_offset,
                [record for _, record in entries])

    # --- read ------------------------------------------------------------------------
    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        log = self.topics.partition_log(topic, partition)
        return PartitionOffsets(log.log_start_offset, log.high_watermark)

    def offset_for_timestamp(self, topic: str, partition: int, timestamp_ms: int) -> int | None:
        """First offset with timestamp >= timestamp_ms; None when there is none.

        Kafka's special values: -1 = latest (high watermark), -2 = earliest.
        """
        log = self.topics.partition_log(topic, partition)
        if timestamp_ms == -1:
            return int(log.high_watermark)
        if timestamp_ms == -2:
            return int(log.log_start_offset)
        found = log.record_for_timestamp(timestamp_ms)
        return None if found is None else int(found[0])

    def record_for_timestamp(self, topic: str, partition: int,
                             timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, the record's own timestamp) of the first record at or after
        ``timestamp_ms`` (>= 0), or None: what Kafka's ListOffsets answers."""
        found = self.topics.partition_log(topic, partition).record_for_timestamp(timestamp_ms)
        return None if found is None else (int(found[0]), int(found[1]))

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int,
        bytes_max: int,
        wait_ms: int = 0,
        bytes_min: int = 1,
    ) -> tuple[LogSlice, PartitionOffsets]:
        """Whole batches from ``offset``; waits up to wait_ms for bytes_min bytes."""
        deadline_ms = self.clock.monotonic_ms() + min(wait_ms, self.config.fetch_wait_ms_max)
        while True:
            self._check_open()
            log = self.topics.partition_log(topic, partition)
            data = log.read(offset, bytes_max)
            remaining_ms = deadline_ms - self.clock.monotonic_ms()
            if data.size_bytes >= bytes_min or remaining_ms <= 0:
                return data, PartitionOffsets(log.log_start_offset, log.high_watermark)
            await self.wait_for_append([(topic, partition)], remaining_ms)

    async def wait_for_append(
        self, partitions: Iterable[tuple[str, int]], wait_ms: int
    ) -> bool:
        """Wait until one of ``partitions`` gets an append (True) or wait_ms passes (False)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        keys = list(partitions)
        for key in keys:
            self._append_waiters.setdefault(key, []).append(waiter)
        sleeper = loop.create_task(self.clock.sleep_ms(max(0, wait_ms)))
        try:
            await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
            return waiter.done()
        finally:
            sleeper.cancel()
            for key in keys:
                waiters = self._append_waiters.get(key)
                if waiters is not None:
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
                    if not waiters:
                        del self._append_waiters[key]

    def _wake(self, key: tuple[str, int]) -> None:
        if self.shared_groups is not None:
            self.shared_groups.notify_appended(*key)
        for waiter in self._append_waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(None)

    async def read_records(
        self, topic: str, partition: int, offset: int, records_max: int, wait_ms: int = 0
    ) -> list[Record]:
        """Decoded records from ``offset`` (at most records_max), waiting like fetch.

        Reads in chunks of ``READ_CHUNK_BYTES`` (a whole batch at least) until it has
        ``records_max`` records, and keeps the last batch decoded per partition: queue
        consumers read a batch a few hundred records at a time, decoding it once.
        """
        records: list[Record] = []
        position = offset
        chunk_bytes = min(self.config.read_bytes_max, READ_CHUNK_BYTES)
        key = (topic, partition)
        while len(records) < records_max:
            data, offsets = await self.fetch(
                topic, partition, position, chunk_bytes, wait_ms if not records else 0)
            if position < offsets.log_start_offset:
                raise OffsetOutOfRangeError(
                    "offset below log start", offset=position,
                    log_start_offset=offsets.log_start_offset,
                )
            raw = data.read_bytes()
            if not raw:
                break
            for batch_position, header in split_batches(raw):
                cached = self._decoded.get(key)
                if cached is not None and cached[0] == header.base_offset \
                        and cached[1] == header.crc:
                    batch = cached[2]
                else:
                    try:
                        batch = decode_records(raw, batch_position)
                    except CorruptRecordError as error:
                        # CRC-valid but undecodable: set aside (logged once, skipped by
                        # every reader) instead of failing this read forever
                        log = self.topics.partition_log(topic, partition)
                        log.set_aside_batch(header.base_offset, f"undecodable: {error}")
                        batch = []
                    self._decoded.pop(key, None)
                    if len(self._decoded) >= DECODED_BATCHES_MAX:
                        self._decoded.pop(next(iter(self._decoded)))
                    self._decoded[key] = (header.base_offset, header.crc, batch)
                for record in batch:
                    if record.offset >= position and len(records) < records_max:
                        records.append(record)
                position = max(position, header.base_offset + header.last_offset_delta + 1)
            if position >= offsets.high_watermark:
                break
        return records

    # --- idempotent producer ---------------------------------------------------------
    async def init_producer_id(self, transactional_id: str | None = None) -> tuple[int, int]:
        return await self.producers.init_producer_id(transactional_id)

    # --- ordered groups --------------------------------------------------------------
    def _group(self, group_id: str, create: bool = False) -> OrderedGroup:
        group = self._groups.get(group_id)
        if group is None or group.state is GroupState.DEAD:
            if not create:
                raise UnknownGroupError("unknown group", group_id=group_id)
            group = OrderedGroup(group_id, self._member_suffix)
            self._groups[group_id] = group
        return group

    def _member_suffix(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _log_ends(self) -> dict[tuple[str, int], int]:
        """Each known partition's log end after recovery (what state is clamped to)."""
        return {(topic, partition): int(self.log_store.partition(topic, partition).high_watermark)
                for topic, partition in self.log_store.partitions()
                if self.topics.find(topic) is not None}

    def _damaged_logs(self) -> dict[tuple[str, int], Any]:
        """Partitions where recovery set corrupt batches aside (their offsets are gone)."""
        found: dict[tuple[str, int], Any] = {}
        for topic, partition in self.log_store.partitions():
            log = self.log_store.partition(topic, partition)
            recovery = getattr(log, "recovery", None)
            if recovery is not None and recovery.skipped_offsets and self.topics.find(topic):
                found[(topic, partition)] = log
        return found

    def _load_groups(self) -> None:
        for group_id, snapshot in self.state_store.load_groups().items():
            self._group(group_id, create=True).restore(snapshot)
        log_ends = self._log_ends()
        for row in self.state_store.load_committed_offsets():
            log_end = log_ends.get((row.topic, row.partition))
            offset = row.committed_offset
            if log_end is not None:
                offset = clamp("ordered-group", row.group_id, row.topic, row.partition,
                               offset, log_end, self.lost_ranges)
            if offset != row.committed_offset:
                self.state_store.save_committed_offsets([dataclasses.replace(
                    row, committed_offset=offset)])
            self._group(row.group_id, create=True).offsets[(row.topic, row.partition)] = (
                CommittedOffset(offset, row.metadata, row.leader_epoch, row.commit_ms)
            )

    def _save_group(self, group: OrderedGroup) -> None:
        self.state_store.save_group(group.group_id, group.snapshot())

    def _server_assign(
        self, protocol_name: str, metadata: Mapping[str, bytes]
    ) -> dict[str, bytes]:
        assignor = ASSIGNORS.get(protocol_name, ASSIGNORS["range"])
        subscriptions = {member: parse_subscription(data) for member, data in metadata.items()}
        counts = {}
        for topics in subscriptions.values():
            for topic in topics:
                info = self.topics.find(topic)
                counts[topic] = info.partitions if info is not None else 0
        assigned = assignor(subscriptions, counts)
        return {member: encode_assignment(parts) for member, parts in assigned.items()}

    def _tick_groups(self, now_ms: int) -> None:
        for group in list(self._groups.values()):
            generation = group.generation
            group.tick(now_ms, self._server_assign)
            if group.generation != generation:
                self._save_group(group)

    async def join_group(
        self,
        group_id: str,
        member_id: str,
        protocol_type: str,
        protocols: Sequence[tuple[str, bytes]],
        session_timeout_ms: int,
        rebalance_timeout_ms: int | None = None,
        group_instance_id: str | None = None,
        client_id: str = "",
        client_host: str = "",
        require_known_member_id: bool = True,
    ) -> JoinResult | MemberIdRequired:
        """Join (or rejoin) a group; waits until the rebalance's join phase completes."""
        if not group_id:
            raise InvalidRequestError("group id is empty")
        timeout_min = self.config.session_timeout_ms_min
        timeout_max = self.config.session_timeout_ms_max
        if not timeout_min <= session_timeout_ms <= timeout_max:
            raise InvalidSessionTimeoutError(
                "session timeout out of range", session_timeout_ms=session_timeout_ms,
                minimum=timeout_min, maximum=timeout_max,
            )
        group = self._group(group_id, create=True)
        generation = group.generation
        outcome = group.join(
            self.clock.monotonic_ms(), member_id, group_instance_id, protocol_type, protocols,
            session_timeout_ms, rebalance_timeout_ms or session_timeout_ms, client_id,
            client_host, require_known_member_id, self._server_assign,
        )
        if group.generation != generation or group_instance_id is not None:
            self._save_group(group)
        if isinstance(outcome, JoinResult | MemberIdRequired):
            return outcome
        result = await outcome
        self._save_group(group)
        await self.state_store.commit()
        return result

    async def sync_group(
        self,
        group_id: str,
        member_id: str,
        generation: int,
        assignments: Mapping[str, bytes] | None = None,
    ) -> SyncResult:
        """Leader sends assignments; every member waits for its own."""
        group = self._group(group_id)
        outcome = group.sync(self.clock.monotonic_ms(), member_id, generation, assignments or {})
        if isinstance(outcome, SyncResult):
            return outcome
        return await outcome

    async def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        self._group(group_id).heartbeat(self.clock.monotonic_ms(), member_id, generation)

    async def leave_group(
        self,
        group_id: str,
        member_id: str = "",
        group_instance_id: str | None = None,
    ) -> None:
        group = self._group(group_id)
        now_ms = self.clock.monotonic_ms()
        if group_instance_id is not None and not member_id:
            group.leave_instance(now_ms, group_instance_id, self._server_assign)
        else:
            if group_instance_id is not None:
                group.static_members.pop(group_instance_id, None)
            group.leave(now_ms, member_id, self._server_assign)
        self._save_group(group)
        await self.state_store.commit()

    async def commit_offsets(
        self,
        group_id: str,
        offsets: Mapping[tuple[str, int], CommittedOffset | int],
        member_id: str = "",
        generation: int = -1,
    ) -> None:
        """Commit per-partition offsets; generation -1 + empty member = simple commit."""
        group = self._group(group_id, create=True)
        group.check_commit(member_id, generation)
        now_ms = self.clock.wall_ms()
        normalized = {
            key: value if isinstance(value, CommittedOffset) else CommittedOffset(value)
            for key, value in offsets.items()
        }
        normalized = {
            key: dataclasses.replace(value, commit_ms=value.commit_ms or now_ms)
            for key, value in normalized.items()
        }
        for topic, _ in normalized:
            self.topics.get(topic)
        group.commit(normalized)
        self.state_store.save_committed_offsets(
            CommittedOffsetRow(group_id, topic, partition, value.offset, value.metadata,
                               value.leader_epoch, value.commit_ms)
            for (topic, partition), value in normalized.items()
        )
        await self.state_store.commit()

    def fetch_offsets(
        self, group_id: str, partitions: Iterable[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], CommittedOffset | None]:
        """Committed offsets (None: nothing committed); partitions None = all committed."""
        group = self._groups.get(group_id)
        stored = group.offsets if group is not None else {}
        if partitions is None:
            return dict(stored)
        return {key: stored.get(key) for key in partitions}

    def describe_group(self, group_id: str) -> GroupDescription:
        group = self._groups.get(group_id)
        if group is None:
            return GroupDescription(group_id, GroupState.DEAD, "", "", 0, "", ())
        return group.describe()

    def list_groups(self) -> list[GroupListing]:
        return [
            GroupListing(group.group_id, group.protocol_type, group.state)
            for group in sorted(self._groups.values(), key=lambda g: g.group_id)
            if group.state is not GroupState.DEAD
        ]

    async def delete_groups(self, group_ids: Iterable[str]) -> dict[str, Exception | None]:
        """Delete Empty groups and their offsets; per group: None or the error."""
        outcome: dict[str, Exception | None] = {}
        for group_id in group_ids:
            try:
                group = self._group(group_id)
                group.delete()
            except (UnknownGroupError, NonEmptyGroupError) as error:
                outcome[group_id] = error
                continue
            del self._groups[group_id]
            self.state_store.delete_group(group_id)
            outcome[group_id] = None
        await self.state_store.commit()
        return outcome

    async def expire_groups(self) -> list[str]:
        """Delete Empty ordered groups whose newest commit is older than
        ``offsets_retention_ms`` (wall ms, as commit times are; KIP-211): a simple
        offset commit creates a group, and without this none would ever go."""
        now_ms = self.clock.wall_ms()
        expired = [
            group_id for group_id, group in self._groups.items()
            if group.state is GroupState.EMPTY and not group.members
            and max((o.commit_ms for o in group.offsets.values()), default=0)
            + self.config.offsets_retention_ms <= now_ms
        ]
        for group_id in expired:
            del self._groups[group_id]
            self.state_store.delete_group(group_id)
            logger.info("ordered group %s expired (empty, no commit for %d ms)", group_id,
                        self.config.offsets_retention_ms)
        if expired:
            await self.state_store.commit()
        return expired

    def group_lag(self, group_id: str) -> list[PartitionLag]:
        """Lag of every partition of every topic the group committed to."""
        group = self._group(group_id)
        topics = sorted({topic for topic, _ in group.offsets})
        lags = []
        for topic in topics:
            info = self.topics.find(topic)
            if info is None:
                continue
            for partition in range(info.partitions):
                log = self.log_store.partition(topic, partition)
                committed = group.offsets.get((topic, partition))
                start = committed.offset if committed is not None else log.log_start_offset
                lags.append(PartitionLag(
                    topic, partition, committed.offset if committed is not None else -1,
                    log.high_watermark, max(0, log.high_watermark - start),
                ))
        return lags

    @staticmethod
    def decode_server_assignment(assignment: bytes) -> list[tuple[str, int]]:
        """Partitions of a server-assigned ("conveyor" protocol type) group member."""
        return decode_assignment(assignment)

    # --- queues and shared groups (delegated to SharedGroups) -------------------------
    def _shared(self) -> SharedGroups:
        if self.shared_groups is None:
            raise UnavailableError("shared groups are not available")
        return self.shared_groups

    async def declare_queue(self, name: str, config: QueueConfig | None = None) -> QueueInfo:
        """A queue = a work-queue topic + a shared group of the same name.

        Redeclaring with another config (or over a plain topic) is PreconditionFailedError.
        """
        return await self._shared().declare_queue(name, config)

    async def delete_queue(
        self, name: str, if_unused: bool = False, if_empty: bool = False
    ) -> int:
        """Delete the queue, its topic and bindings to it; returns the ready records dropped."""
        dropped = await self._shared().delete_queue(name, if_unused, if_empty)
        for binding in self.routing.remove_destination("queue", name):
            self.state_store.delete_binding(_binding_row(binding))
        await self.state_store.commit()
        return dropped

    async def purge_queue(self, name: str) -> int:
        return await self._shared().purge_queue(name)

    async def alter_queue(self, name: str, config: QueueConfig) -> QueueInfo:
        """Replace a queue's config (same partitions); applies from the next acquire."""
        return await self._shared().alter_queue(name, config)

    async def get_queue(self, name: str) -> QueueInfo:
        return await self._shared().get_queue(name)

    async def list_queues(self) -> list[QueueInfo]:
        return await self._shared().list_queues()

    async def create_shared_group(
        self,
        topic: str,
        group: str,
        config: QueueConfig | None = None,
        start: Literal["earliest", "latest"] = "latest",
    ) -> None:
        """A shared group (KIP-932 share group) on any topic."""
        await self._shared().create_shared_group(topic, group, config, start)

    async def acquire(
        self,
        topic: str,
        group: str,
        records_max: int = 1,
        lock_ms: int | None = None,
        wait_ms: int = 0,
        consumer_id: str | None = None,
    ) -> list[Delivery]:
        """Lock up to records_max records for this consumer (queue: group == topic)."""
        return await self._shared().acquire(
            topic, group, records_max, lock_ms, wait_ms, consumer_id
        )

    async def ack(self, receipts: Iterable[str], wait_durable: bool = True) -> None:
        await self._shared().ack(receipts, wait_durable)

    async def release(self, receipts: Iterable[str], delay_ms: int = 0) -> None:
        await self._shared().release(receipts, delay_ms)

    async def extend(self, receipts: Iterable[str], lock_ms: int) -> list[int]:
        return await self._shared().extend(receipts, lock_ms)

    async def reject(self, receipts: Iterable[str], reason: str = "rejected") -> None:
        await self._shared().reject(receipts, reason)

    async def release_consumer(self, consumer_id: str) -> int:
        return await self._shared().release_consumer(consumer_id)

    async def redrive(self, name: str, records_max: int = 1000) -> int:
        return await self._shared().redrive(name, records_max)

    # --- exchanges -------------------------------------------------------------------
    def _queue_exists(self, name: str) -> bool:
        if self.shared_groups is not None:
            return self.shared_groups.queue_exists(name)
        info = self.topics.find(name)
        return info is not None and info.kind == "queue"

    def _load_exchanges(self) -> None:
        for exchange in self.state_store.load_exchanges():
            self.routing.declare(ExchangeInfo(
                exchange.name, exchange.type,  # type: ignore[arg-type]
                exchange.durable, exchange.auto_delete, exchange.internal,
                exchange.alternate_exchange, exchange.arguments,
            ))
        for name, exchange_type in PREDECLARED:
            if not self.routing.exists(name):
                self.routing.declare(exchange_info(name, exchange_type))
                self.state_store.save_exchange(_exchange_row(self.routing.get(name)))
        for row in self.state_store.load_bindings():
            binding = Binding(
                row.source, row.destination_kind,  # type: ignore[arg-type]
                row.destination, row.routing_key, row.arguments,
            )
            if not self.routing.exists(row.source) or (
                row.destination_kind == "exchange" and not self.routing.exists(row.destination)
            ):
                # an exchange of the binding was not durable: the binding went with it
                self.state_store.delete_binding(row)
                continue
            self.routing.bind(binding)

    async def declare_exchange(
        self,
        name: str,
        type: ExchangeType,
        durable: bool = True,
        auto_delete: bool = False,
        internal: bool = False,
        alternate_exchange: str | None = None,
        arguments: Mapping[str, str] | None = None,
    ) -> ExchangeInfo:
        """Declare; redeclaring with another type is PreconditionFailedError."""
        info, created = self.routing.declare(exchange_info(
            name, type, durable, auto_delete, internal, alternate_exchange, arguments
        ))
        if created and durable:
            self.state_store.save_exchange(_exchange_row(info))
            await self.state_store.commit()
        return info

    async def delete_exchange(self, name: str, if_unused: bool = False) -> None:
        info = self.routing.get(name)
        removed = self.routing.delete(name, if_unused)
        for binding in removed:
            self.state_store.delete_binding(_binding_row(binding))
        if info.durable:
            self.state_store.delete_exchange(name)
        await self.state_store.commit()

    def get_exchange(self, name: str) -> ExchangeInfo:
        return self.routing.get(name)

    def list_exchanges(self) -> list[ExchangeInfo]:
        return self.routing.list_exchanges()

    async def bind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> Binding:
        binding = _binding(source, destination_kind, destination, routing_key, arguments)
        self._check_destination(destination_kind, destination)
        if self.routing.bind(binding) and self._durable_binding(binding):
            self.state_store.save_binding(_binding_row(binding))
            await self.state_store.commit()
        return binding

    def _durable_binding(self, binding: Binding) -> bool:
        """Persist a binding only when the exchanges it joins outlive a restart."""
        if not self.routing.get(binding.source).durable:
            return False
        if binding.destination_kind == "exchange":
            return self.routing.get(binding.destination).durable
        return True

    async def unbind(
        self,
        source: str,
        destination_kind: DestinationKind,
        destination: str,
        routing_key: str = "",
        arguments: Mapping[str, str] | None = None,
    ) -> bool:
        binding = _binding(source, destination_kind, destination, routing_key, arguments)
        removed, auto_deleted = self.routing.unbind(binding)
        if removed:
            self.state_store.delete_binding(_binding_row(binding))
        if auto_deleted is not None:
            self.state_store.delete_exchange(auto_deleted.name)
        await self.state_store.commit()
        return removed

    def list_bindings(
        self,
        source: str | None = None,
        destination_kind: DestinationKind | None = None,
        destination: str | None = None,
    ) -> list[Binding]:
        target = None
        if destination_kind is not None and destination is not None:
            target = (destination_kind, destination)
        return self.routing.bindings(source, target)

    def _check_destination(self, kind: DestinationKind, name: str) -> None:
        if kind == "exchange":
            if not self.routing.exists(name):
                raise UnknownExchangeError("unknown exchange", exchange=name)
        elif kind == "queue":
            if not self._queue_exists(name):
                raise UnknownQueueError("unknown queue", queue=name)
        elif self.topics.find(name) is None:
            raise UnknownTopicError("unknown topic", topic=name)

    def route(self, exchange: str, routing_key: str, headers: Headers = ()) -> list[Destination]:
        """Where a message would go (no publish)."""
        return self.routing.route(exchange, routing_key, headers)

    async def publish_to_exchange(
        self, exchange: str, routing_key: str, messages: Sequence[Message]
    ) -> RouteResult:
        """Route each message by routing key (+ its headers) and publish it everywhere it goes.

        Messages sharing a destination set are published together (one batch per
        partition). ``routed`` is False when some message reached no destination.
        """
        if self.routing.get(exchange).internal:
            raise InvalidRequestError(
                "internal exchanges take messages only from other exchanges", exchange=exchange
            )
        # destinations -> messages (in order)
        plans: dict[tuple[Destination, ...], list[Message]] = {}
        routed = True
        for message in messages:
            if not any(name == HEADER_ROUTING_KEY for name, _ in message.headers):
                # where it was published travels with it (AMQP consumers see it; a
                # dead-letter exchange routes by it)
                message = dataclasses.replace(message, headers=(
                    *message.headers, (HEADER_EXCHANGE, exchange.encode()),
                    (HEADER_ROUTING_KEY, routing_key.encode())))
            destinations = tuple(self.routing.route(exchange, routing_key, message.headers))
            if not destinations:
                routed = False
                continue
            plans.setdefault(destinations, []).append(message)
        results: list[PublishResult] = []
        for destinations, planned in plans.items():
            for destination in destinations:
                results.extend(await self.publish(destination.name, planned))
        return RouteResult(routed=routed and bool(messages), results=tuple(results))


READ_CHUNK_BYTES = 256 * 1024  # read_records: bytes per fetch (a whole batch at least)
DECODED_BATCHES_MAX = 256  # read_records: partitions whose last decoded batch is kept


def to_record_data(message: Message, now_ms: int) -> RecordData:
    """A Message as a record, with its queue features in the reserved headers."""
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
    timestamp_ms = message.timestamp_ms if message.timestamp_ms is not None else now_ms
    return RecordData(message.key, message.value, tuple(headers), timestamp_ms)


def _build_batches(records: list[RecordData], size_max: int, topic: str) -> list[bytes]:
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
    return _build_batches(records[:middle], size_max, topic) + _build_batches(
        records[middle:], size_max, topic
    )


def _binding(
    source: str,
    destination_kind: DestinationKind,
    destination: str,
    routing_key: str,
    arguments: Mapping[str, str] | None,
) -> Binding:
    return Binding(
        source, destination_kind, destination, routing_key,
        tuple(sorted((str(k), str(v)) for k, v in (arguments or {}).items())),
    )


def _binding_row(binding: Binding) -> BindingRow:
    return BindingRow(binding.source, binding.destination_kind, binding.destination,
                      binding.routing_key, binding.arguments)


def _exchange_row(info: ExchangeInfo) -> ExchangeRow:
    return ExchangeRow(info.name, info.type, info.durable, info.auto_delete, info.internal,
                       info.alternate_exchange, info.arguments)

