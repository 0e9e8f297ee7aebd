"""SharedGroups: queues and shared groups — the manager the Broker facade calls.

Owns: queue declarations (a queue = a topic with cleanup policy "work-queue" +
a shared group of the same name), shared groups on plain topics (KIP-932),
receipts, long-poll acquires, dead-letter appends, publish admission for
queues (dedup window, max_length overflow), work-queue retention, and
persisting every change through ``SharedStateStore``. The per-partition rules
live in ``shared_group.SharedPartition``; header rules in ``delivery``.

Must not know: protocols, files, sockets. Everything comes in through the
constructor: ``SharedGroups(host)``, where ``SharedGroupsHost`` holds the peers it
may call (state store, clock, rng, topic registry, the fetcher's read_records, the
producer's publish_records and ensure_topic, the exchanges' route). It never calls
the facade: a dead letter through an exchange is routed by the exchanges and
admitted by this coordinator itself, as ``Broker.publish`` would; a deleted queue's
topic is deleted by the facade.

API (all ``async`` unless noted):

    declare_queue(name, config=QueueConfig()) -> QueueInfo  # PreconditionFailedError: conflict
    delete_queue(name, if_unused=False, if_empty=False) -> int  # ready records dropped
    remove_queue(...) -> int     # delete_queue without its COMMIT (the facade then
                                 # deletes the queue's topic and commits both)
    purge_queue(name) -> int
    get_queue(name) -> QueueInfo ; list_queues() -> list[QueueInfo]
    queue_exists(name) -> bool                                   # sync
    create_shared_group(topic, group, config=None, start="latest") -> None
    reset_shared_partition(topic, group, partition, offset) -> int  # new start offset
    acquire(topic, group, records_max=1, lock_ms=None, wait_ms=0, consumer_id=None)
        -> list[Delivery]        # long-poll: woken by appends, releases, expiries
    ack(receipts) -> None        # durable (state-store COMMIT) before it returns
    release(receipts, delay_ms=0) -> None
    extend(receipts, lock_ms) -> list[int]       # new lock deadlines (wall ms)
    reject(receipts, reason="rejected") -> None  # dead-letter now
    release_consumer(consumer_id) -> int         # counts as a delivery (redelivered)
    redrive(name, records_max=1000) -> int       # DLQ (or queue's DLQ) -> source topics
    filter_publish(topic, messages, partition=None) -> list[PublishResult]
    should_drop_duplicate(queue, dedup_id) -> bool                # sync
    notify_appended(topic, partition) -> None                     # sync; facade calls it
    waiting_acquires(topic, group) -> int                         # sync
    tick() -> None               # expire locks, end delays, retention (facade timer)
    open() / close()

Receipts are ``"<topic>:<partition>:<offset>:<token>:<group>"`` (topic names
have no ':'); the token is 63 random bits from ``secrets`` (unguessable: a consumer
cannot settle another's delivery by constructing its receipt) and changes on every
acquire so a stale receipt (of one of the record's last locks) fails with
LockExpiredError, a settled one or one never issued for the record with
UnknownDeliveryError.

Time: lock deadlines, delays and TTL run on the monotonic clock (a wall-clock step
moves none of them); header times and persisted delays are wall ms, converted at
load and save, and deadlines are reported in wall ms.

Faults: at open every piece of state is clamped to the recovered log end
(log_end.py); a dead letter that cannot be appended parks its record in the window
and is retried (``DEAD_LETTER_RETRY_MS``), never dropped with the changes around it.

Durability: windows are saved once per loop turn per partition (shared_persist.py:
start offset + runs of states, never a row per ack); acquire does not wait for that
save (a lost count after a crash only means one delivery fewer is counted); ack,
release, reject, extend and publish admission await it and its COMMIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from conveyor.clock import Clock
from conveyor.errors import (
    InvalidRequestError,
    OffsetOutOfRangeError,
    OperatingError,
    PreconditionFailedError,
    StorageError,
    UnknownDeliveryError,
    UnknownGroupError,
    UnknownPartitionError,
    UnknownQueueError,
)
from conveyor.storage.record_batch import Record, RecordData
from conveyor.storage.shared_state import SharedStateStore
from conveyor.storage.state_store import QueueRow, StateStore
from conveyor.storage.text import check_storable
from conveyor.tasks import Supervisor

from .delivery import (
    DedupWindow,
    dead_letter_cycle,
    dead_letter_exchange_message,
    dead_letter_message,
    dead_letter_routing_key,
    dead_letter_topic,
    record_policy,
    redrive_message,
)
from .keyed_locks import KeyedLocks
from .log_end import LostRange, clamp
from .routing import Destination
from .shared_group import Change, RecordState, SharedPartition
from .shared_persist import WindowPersister
from .shared_remote import ACK, EXTEND, REJECT, RELEASE, SharedRemote, split_settle, unpack
from .shared_timers import SharedTimers
from .stats import (
    CONSUMER_ACTIVE_MS,
    CONSUMERS_TRACKED_MAX,
    QueueStats,
    SharedGroupCounters,
    TrafficCounters,
)
from .topics import TopicRegistry
from .types import (
    Delivery,
    Headers,
    Message,
    PublishResult,
    QueueConfig,
    QueueInfo,
    TopicConfig,
    TopicInfo,
)

ACQUIRE_RECORDS_MAX = 1_000  # KIP-932 ShareFetch max records per fetch is 500; headroom
ACQUIRE_WAIT_MS_MAX = 30_000  # matches the Broker's fetch_wait_ms_max
LOCK_MS_MAX = 12 * 3600 * 1000  # SQS's visibility timeout maximum (12 hours)
APPENDED_CACHE_RECORDS_MAX = 50_000  # over all queues: ~50 MiB of 1 KiB messages
APPENDED_CACHE_BYTES_MAX = 64 << 20  # over all queues, so 16 MiB AMQP bodies stay bounded too
# A queue's records are limited by the listener that accepts them (AMQP 16 MiB by default, as
# RabbitMQ 4; HTTP's body_bytes_max), under the broker-wide record_bytes_max ceiling.
QUEUE_RECORD_BYTES_MAX = 129 << 20
REDRIVE_CONSUMER = "conveyor.redrive"
# a dead letter that could not be appended (too large with its headers, disk full) is
# retried this much later; SQS's redrive and RabbitMQ's dead-lettering have no retry
DEAD_LETTER_RETRY_MS = 60_000
# work-queue retention moves a partition's log start (a small file written with fsyncs on
# the event loop, partition_log.delete_before) at most this often; the acked records
# between stay readable a little longer, nothing else depends on it
RETENTION_INTERVAL_MS = 1_000

logger = logging.getLogger("conveyor.broker.shared")


@dataclass(frozen=True, slots=True)
class SharedGroupsHost:
    """What the share coordinator may call: the peers below it, never the facade."""

    state_store: StateStore
    clock: Clock
    rng: random.Random
    topics: TopicRegistry
    # the fetcher's decoded reads
    read_records: Callable[..., Awaitable[list[Record]]]
    # the producer's raw append path, and its topic auto-creation
    publish_records: Callable[..., Awaitable[list[PublishResult]]]
    ensure_topic: Callable[[str], Awaitable[TopicInfo]]
    # the exchanges' routing (dead-lettering through an exchange)
    route: Callable[[str, str, Headers], list[Destination]]
    # the fetcher's committed reads: (records, offset to read on from), skipping control
    # records and aborted transactions, never past the last stable offset (transactions)
    read_visible: Callable[..., Awaitable[tuple[list[Record], int]]] | None = None
    # (topic, partition) -> the last stable offset (the high watermark without transactions)
    stable_offset: Callable[[str, int], int] | None = None


@dataclass
class SharedGroupWindows:
    """One shared group on one topic: its per-partition in-flight windows and cursors.

    (Not to be confused with ``ordered_group.GroupState``, the lifecycle enum of an
    ordered group.)
    """

    group: str
    topic: str
    config: QueueConfig
    is_queue: bool
    # partition -> its window
    partitions: dict[int, SharedPartition] = field(default_factory=dict)
    # partition -> start offset last written to the state store
    saved_start: dict[int, int] = field(default_factory=dict)
    next_partition: int = 0  # round-robin cursor of acquire
    counters: SharedGroupCounters = field(default_factory=SharedGroupCounters)


# per receipt: None (settled) or its error, for callers that answer each receipt
Outcomes = list[Exception | None] | None


def config_to_json(config: QueueConfig) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_mapping(values: Mapping[str, Any]) -> QueueConfig:
    known = {item.name for item in dataclasses.fields(QueueConfig)}
    return QueueConfig(**{key: value for key, value in values.items() if key in known})


def _resolve_waiter(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def make_receipt(group: str, topic: str, partition: int, offset: int, token: int) -> str:
    return f"{topic}:{partition}:{offset}:{token}:{group}"


def parse_receipt(receipt: str) -> tuple[str, str, int, int, int]:
    """(group, topic, partition, offset, token) or UnknownDeliveryError."""
    parts = receipt.split(":", 4)
    try:
        topic, partition, offset, token, group = parts
        return group, topic, int(partition), int(offset), int(token)
    except ValueError:
        raise UnknownDeliveryError("malformed receipt", receipt=receipt[:80]) from None


class SharedGroups:
    def __init__(self, host: SharedGroupsHost, traffic: TrafficCounters | None = None) -> None:
        self.host = host
        self.traffic = traffic or TrafficCounters()  # records out per partition
        self.clock = host.clock
        self.rng = host.rng
        self.store: SharedStateStore = host.state_store.shared
        self.persister = WindowPersister(self.store, self._wall_skew_ms, self._live)
        self._timers = SharedTimers()
        # (group, topic) -> state
        self._groups: dict[tuple[str, str], SharedGroupWindows] = {}
        # several nodes (conveyor/cluster): groups another node owns are served there
        self.remote: SharedRemote | None = None
        # queue name -> its dedup window
        self._dedup: dict[str, DedupWindow] = {}
        # (group, topic) -> acquires waiting for a record
        self._waiters: dict[tuple[str, str], list[asyncio.Future[None]]] = {}
        # (group, topic) -> how many of its waiting acquires take only some partitions
        self._filtered_waits: dict[tuple[str, str], int] = {}
        # the long polls' deadline sleepers: cancelled when the poll ends, awaited at close
        self._sleepers = Supervisor("conveyor.shared-groups")
        # (topic, partition) -> offset last passed to delete_before (work-queue retention)
        self._retained: dict[tuple[str, int], int] = {}
        # (topic, partition) -> its high watermark at the last notify_appended
        self._seen_ends: dict[tuple[str, int], int] = {}
        # (topic, partition) -> when its log start last moved (monotonic ms)
        self._retained_at: dict[tuple[str, int], int] = {}
        # (topic, partition) -> offset -> record published through Broker.publish and not
        # loaded into a window yet: _fill takes them instead of reading and decoding the log
        self._appended: dict[tuple[str, int], dict[int, Record]] = {}
        self._appended_count = 0  # records in _appended, bounded by APPENDED_CACHE_RECORDS_MAX
        self._appended_bytes = 0  # their keys and values, bounded by APPENDED_CACHE_BYTES_MAX
        # state found past the recovered log end at open (logged; see log_end.py)
        self.lost_ranges: list[LostRange] = []
        # (group, error code) -> dead-letter appends failed since the last success
        self.dead_letter_failures: dict[tuple[str, str], int] = {}
        # queue name -> its declare/delete/purge, one at a time (each awaits in between:
        # a delete during a declare left the declare without its group, found by fuzzing)
        self._lifecycle = KeyedLocks()

    # --- lifecycle -------------------------------------------------------------------
    async def open(self) -> None:
        self.store.create_schema()
        queues = {row.name: config_from_mapping(row.config)
                  for row in await self.host.state_store.load_queues()}
        for group, topic, config_json in await self.store.load_groups():
            config = config_from_mapping(json.loads(config_json))
            is_queue = group == topic and topic in queues
            await self._load_group(group, topic,
                                   queues.get(topic, config) if is_queue else config,
                                   is_queue)
        for name in queues:
            window = self._dedup.setdefault(name, DedupWindow())
            for dedup_id, expires_ms in (await self.store.load_dedup(name)).items():
                window.remember(dedup_id, expires_ms)

    async def _load_group(self, group: str, topic: str, config: QueueConfig,
                          is_queue: bool, keep_loaded: bool = False) -> None:
        """Read a group's state from the store and hold it; ``keep_loaded``: a state
        another task loaded while this one read wins (two loads of a group declared on
        another node must not leave two windows, one of them forgotten)."""
        info = self.host.topics.find(topic)
        if info is None:
            return  # topic deleted under the group: forget it
        state = SharedGroupWindows(group, topic, config, is_queue)
        marks: list[tuple[SharedPartition, bool]] = []
        starts = await self.store.load_start_offsets(group, topic)
        for partition in range(info.partitions):
            log = self.host.topics.offsets(topic, partition)
            log_end = log.high_watermark
            saved = starts.get(partition, -1)
            # a start, ack floor or record state past the recovered log end names
            # records a crash lost: clamped, or new records would count as acked
            start = clamp("shared-group", group, topic, partition,
                          max(starts.get(partition, log.log_start_offset),
                              log.log_start_offset), log_end, self.lost_ranges)
            part = SharedPartition(topic, partition, group, config, start_offset=start,
                                   next_offset=start)
            rows, legacy, delivered_end = await self.store.load_records(group, topic, partition)
            part.delivered_end = min(delivered_end, log_end)
            resave = legacy
            if rows and rows[-1].offset >= log_end:
                clamp("shared-records", group, topic, partition, rows[-1].offset + 1,
                      log_end, self.lost_ranges)
                resave = True  # the rows past the log end go with the next save
            skew_ms = self._wall_skew_ms()
            for row in rows:
                if row.offset < log_end:  # delays are persisted in wall ms
                    part.pending_rows[row.offset] = (
                        RecordState(row.state), row.delivery_count,
                        max(0, row.available_at_ms - skew_ms) if row.available_at_ms else 0)
            state.partitions[partition] = part
            state.saved_start[partition] = saved
            if saved > start or resave:
                marks.append((part, legacy))
        if keep_loaded and (group, topic) in self._groups:
            return
        for partition in state.partitions:
            self._timers.unfilled.add((topic, partition))  # loaded by the first timer pass
        for part, legacy in marks:
            self.persister.mark(group, topic, part, state.saved_start, legacy)
        self._groups[(group, topic)] = state

    async def reload_group(self, group: str, topic: str) -> None:
        """Read one group's state again (another cluster node delivered from it)."""
        state = self._groups.get((group, topic))
        if state is not None:  # waiters on the old state return empty (acquire)
            await self._load_group(group, topic, state.config, state.is_queue)

    async def close(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()
        await self._sleepers.close(cancel=True)
        self.persister.flush()  # what the last turn marked, before the store closes

    # --- declarations ----------------------------------------------------------------
    def group_state(self, group: str, topic: str) -> SharedGroupWindows | None:
        """A group's live state, read-only for browsing and statistics (queue_browse.py)."""
        return self._groups.get((group, topic))

    def delivered_totals(self) -> dict[tuple[str, str], int]:
        """(group, topic) -> records delivered since open; no per-record work to keep."""
        return {key: state.counters.delivered for key, state in self._groups.items()}

    def queue_exists(self, name: str) -> bool:
        state = self._groups.get((name, name))
        return state is not None and state.is_queue

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
        self._wake(group, topic)
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
        self._wake(group, topic)
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
        if if_unused and (in_flight or self._waiters.get((name, name))):
            raise PreconditionFailedError("queue in use", queue=name, in_flight=in_flight)
        if if_empty and ready + in_flight + delayed:
            raise PreconditionFailedError("queue not empty", queue=name, ready=ready)
        for key in [key for key in self._groups if key[1] == name]:
            del self._groups[key]
            self.store.delete_group(*key)
        self._dedup.pop(name, None)
        for cached in [cached for cached in self._appended if cached[0] == name]:
            for record in self._appended.pop(cached).values():
                self._uncache(record)
        self.store.delete_queue(name)
        self.host.state_store.delete_queue(name)
        self._wake(name, name)
        return ready + delayed

    async def alter_queue(self, name: str, config: QueueConfig) -> QueueInfo:
        """Replace a queue's config (SQS SetQueueAttributes); in-flight locks keep their
        deadlines, the new settings apply to the next acquire. Partitions cannot change."""
        state = self._queue(name)
        if config.partitions != state.config.partitions:
            raise InvalidRequestError("partitions cannot change", queue=name)
        state.config = config
        for part in state.partitions.values():
            part.config = config
        self.host.state_store.save_queue(
            QueueRow(name, dataclasses.asdict(config), self.clock.wall_ms()))
        self.store.save_group(name, name, config_to_json(config))
        await self.persister.durable()
        return await self.get_queue(name)

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
        as the last timer tick left them; records not loaded yet count as ready."""
        names = sorted(group for group, topic in self._groups
                       if group == topic and self._groups[(group, topic)].is_queue)
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

    # --- acquire ---------------------------------------------------------------------
    async def acquire(
        self, topic: str, group: str, records_max: int = 1, lock_ms: int | None = None,
        wait_ms: int = 0, consumer_id: str | None = None, local: bool = False,
        partitions: Sequence[int] | None = None,
    ) -> list[Delivery]:
        """Lock up to ``records_max`` records; wait up to ``wait_ms`` for the first one.
        ``local``: this node's window only (a request forwarded by another node).
        ``partitions``: only records of these partitions (a KIP-932 share-partition
        leader serves the partitions it leads); None: any partition."""
        if not local and self.remote is not None and not await self.remote.serves(group, topic):
            return await self.remote.acquire(topic, group, records_max, lock_ms, wait_ms,
                                             consumer_id, partitions)
        state = await self._group_for_acquire(group, topic)
        only = None if partitions is None else frozenset(partitions)
        records_max = max(1, min(records_max, ACQUIRE_RECORDS_MAX))
        lock_ms = state.config.visibility_timeout_ms if lock_ms is None else lock_ms
        lock_ms = max(0, min(lock_ms, LOCK_MS_MAX))
        consumer = consumer_id if consumer_id is not None else f"anonymous-{self._token():x}"
        now_ms = self.clock.monotonic_ms()
        if consumer_id is not None:
            state.counters.saw_consumer(consumer_id, now_ms)
        deadline_ms = now_ms + max(0, min(wait_ms, ACQUIRE_WAIT_MS_MAX))
        while True:
            deliveries: list[Delivery] = []
            try:
                await self._acquire_once(state, records_max, lock_ms, consumer, deliveries,
                                         only)
                if deliveries and not self.store.commits_in_turn:
                    await self._delivered_mark_durable()
            except asyncio.CancelledError:
                # cancelled (the caller went away) after records were locked for it, while
                # a later partition was read or the delivered mark was committed: nobody
                # will see these deliveries, so they go back now, not at their deadline
                if deliveries:
                    await asyncio.shield(self.release([d.receipt for d in deliveries], 0))
                raise
            if deliveries and self._waiters.get((group, topic)) and self._maybe_ready(state):
                self._wake(group, topic, 1)  # pass the baton: more may be there
            remaining_ms = deadline_ms - self.clock.monotonic_ms()
            if deliveries or remaining_ms <= 0:
                return deliveries
            await self._wait(state, remaining_ms, only is not None)
            if self._groups.get((group, topic)) is not state:
                return []  # deleted while waiting

    async def _delivered_mark_durable(self) -> None:
        """On a remote StateStore, the deliveries of a loop turn go out only after that
        turn's save (their delivered mark: AMQP's redelivered flag, the count behind
        max_deliveries) is committed: one commit per turn, shared by every acquire in it.
        If the commit fails they go out anyway (the mark stays queued for the retry) and
        a crash before the retry counts them one delivery fewer, as before."""
        try:
            await self.persister.durable()
        except StorageError:
            return

    async def _acquire_once(
        self, state: SharedGroupWindows, records_max: int, lock_ms: int, consumer: str,
        deliveries: list[Delivery], only: frozenset[int] | None = None,
    ) -> list[Delivery]:
        """Lock up to ``records_max`` records into ``deliveries`` (the caller's list, so
        that what was locked before a cancellation is known) and return it."""
        redelivered = 0
        self._add_new_partitions(state)
        partitions = sorted(state.partitions if only is None
                            else only.intersection(state.partitions))
        for step in range(len(partitions)):
            index = partitions[(state.next_partition + step) % len(partitions)]
            part = state.partitions[index]
            await self._fill(state, part)
            now_ms = self.clock.monotonic_ms()
            delivered_before = part.delivered_end
            chosen = part.acquire(now_ms, records_max - len(deliveries), lock_ms, consumer,
                                  self._token())
            if part.delivered_end != delivered_before:
                # the delivered mark moved: saved with this turn's commit (one save per
                # partition and turn), so a record redelivered after a crash is known to
                # have been delivered before (AMQP's redelivered flag, delivery counts)
                self._save_start(state, index, part)
            await self._flush(state, part)
            if chosen:
                self.traffic.partition(state.topic, index).records_out += len(chosen)
                skew_ms = self._wall_skew_ms()  # deadlines are reported in wall ms
                # the receipt's constant parts, formatted once (make_receipt's layout)
                prefix, suffix = f"{state.topic}:{index}:", f":{state.group}"
            for entry, offset in chosen:
                record = entry.record
                count = entry.delivery_count
                if count > 1:
                    redelivered += 1
                deliveries.append(Delivery(
                    f"{prefix}{offset}:{entry.token}{suffix}", state.topic, index, offset,
                    record.timestamp_ms, record.key, record.value, record.headers, count,
                    entry.deadline_ms + skew_ms,
                ))
            if len(deliveries) >= records_max:
                break
        state.next_partition = (state.next_partition + 1) % max(1, len(partitions))
        state.counters.delivered += len(deliveries)
        state.counters.redelivered += redelivered
        return deliveries

    async def _wait(self, state: SharedGroupWindows, remaining_ms: int,
                    filtered: bool = False) -> None:
        """Until an append, a release, the group's next deadline, or ``remaining_ms``.
        ``filtered``: the acquire takes only some partitions, so a wake meant for one
        record may not be its own: while such an acquire waits, every wake of the group
        wakes all its acquires (``_wake``)."""
        now_ms = self.clock.monotonic_ms()
        deadlines = [d for d in (p.next_deadline_ms() for p in state.partitions.values())
                     if d is not None]
        if deadlines:
            remaining_ms = min(remaining_ms, max(0, min(deadlines) - now_ms))
        for part in state.partitions.values():
            # what this acquire could see: records past it must wake someone (an earlier
            # value only wakes more acquires than needed, never fewer)
            end_key = (part.topic, part.partition)
            seen = self._seen_ends.get(end_key)
            self._seen_ends[end_key] = (part.next_offset if seen is None
                                        else min(seen, part.next_offset))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        key = (state.group, state.topic)
        self._waiters.setdefault(key, []).append(waiter)
        if filtered:
            self._filtered_waits[key] = self._filtered_waits.get(key, 0) + 1
        sleeper = self._sleepers.start(self.clock.sleep_ms(remaining_ms), name="acquire wait")
        sleeper.add_done_callback(lambda _: _resolve_waiter(waiter))
        try:
            await waiter  # resumes straight from _wake: no extra loop hop on the hot path
        finally:
            if filtered:
                left = self._filtered_waits.pop(key, 1) - 1
                if left > 0:
                    self._filtered_waits[key] = left
            sleeper.cancel()  # awaited by close(), not here: that would cost a loop turn
            waiters = self._waiters.get(key)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[key]

    def waiting_acquires(self, topic: str, group: str) -> int:
        """How many acquires of ``group`` are parked in a long poll (metrics, tests)."""
        return len(self._waiters.get((group, topic), ()))

    def remember_appended(self, topic: str, partition: int, base_offset: int,
                          records: Sequence[RecordData]) -> None:
        """Keep the records of an append for ``_fill``; bounded."""
        size_bytes = sum(len(data.value or b"") + len(data.key or b"") for data in records)
        if (self._appended_count + len(records) > APPENDED_CACHE_RECORDS_MAX
                or self._appended_bytes + size_bytes > APPENDED_CACHE_BYTES_MAX):
            return  # consumers are not keeping up: later fills read the log
        cache = self._appended.setdefault((topic, partition), {})
        self._appended_count += len(records)
        self._appended_bytes += size_bytes
        for delta, data in enumerate(records):
            cache[base_offset + delta] = Record(
                base_offset + delta, data.timestamp_ms, data.key, data.value, data.headers)

    def _uncache(self, record: Record) -> None:
        self._appended_count -= 1
        self._appended_bytes -= len(record.value or b"") + len(record.key or b"")

    def notify_appended(self, topic: str, partition: int) -> None:
        """The facade calls this after every append (or when a partition goes): wakes as
        many parked acquires of each of the topic's groups as records arrived since the
        last call (all of them when the partition went or was not seen before), not the
        whole herd; an acquire that got records wakes the next one while more are there
        (``acquire``)."""
        self._timers.unfilled.add((topic, partition))  # for expiry of unconsumed records
        if not self._waiters:
            return
        key = (topic, partition)
        try:
            end: int | None = self.host.topics.offsets(topic, partition).high_watermark
        except OperatingError:
            end = None
        seen = self._seen_ends.get(key)
        arrived = None if end is None or seen is None or end < seen else end - seen
        if end is None:
            self._seen_ends.pop(key, None)
        else:
            self._seen_ends[key] = end
        if arrived == 0:
            return  # an earlier call of this durable group already woke enough
        for group, group_topic in list(self._waiters):
            if group_topic == topic:
                self._wake(group, topic, arrived)

    def _wake(self, group: str, topic: str, count: int | None = None) -> None:
        """Resolve the group's parked acquires: all, or the ``count`` oldest."""
        key = (group, topic)
        waiters = self._waiters.get(key)
        if not waiters:
            return
        if count is None or count >= len(waiters) or key in self._filtered_waits:
            del self._waiters[key]
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            return
        while waiters and count > 0:
            waiter = waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
        if not waiters:
            del self._waiters[key]

    def _maybe_ready(self, state: SharedGroupWindows) -> bool:
        """Records may be left for another acquire (a cheap over-estimate)."""
        return any(part.available or part.delayed or part.next_offset
                   < self._high_watermark(part) for part in state.partitions.values())

    # --- settle ----------------------------------------------------------------------
    async def ack(self, receipts: Iterable[str], wait_durable: bool = True,
                  outcomes: Outcomes = None, local: bool = False) -> None:
        """``wait_durable=False``: return once applied, without waiting for the save and
        its fsync (for protocols whose acks get no answer: AMQP): the ack is saved with
        the loop turn; a crash before that turn's COMMIT is durable may redeliver.
        ``outcomes``: one entry per receipt (None or its error) instead of raising.
        ``local``: this node's windows only (a request forwarded by another node)."""
        async def apply(items: list[str], found: Outcomes) -> list[int]:
            await self._settle(items, lambda part, offset, token, now_ms:
                               part.ack(offset, token, now_ms), wait_durable,
                               count_acked=True, outcomes=found)
            return []

        await self._routed(ACK, receipts, 0, wait_durable, outcomes, local, apply)

    async def release(self, receipts: Iterable[str], delay_ms: int = 0,
                      outcomes: Outcomes = None, local: bool = False) -> None:
        async def apply(items: list[str], found: Outcomes) -> list[int]:
            await self._settle(items, lambda part, offset, token, now_ms:
                               part.release(offset, token, now_ms, max(0, delay_ms)),
                               outcomes=found)
            return []

        await self._routed(RELEASE, receipts, delay_ms, True, outcomes, local, apply)

    async def extend(self, receipts: Iterable[str], lock_ms: int,
                     outcomes: Outcomes = None, local: bool = False) -> list[int]:
        """The new deadlines (wall ms) of the receipts that were extended."""
        lock_ms = max(0, min(lock_ms, LOCK_MS_MAX))

        async def apply(items: list[str], found: Outcomes) -> list[int]:
            deadlines: list[int] = []
            await self._settle(items, lambda part, offset, token, now_ms:
                               deadlines.append(part.extend(offset, token, now_ms, lock_ms)),
                               outcomes=found)
            skew_ms = self._wall_skew_ms()
            return [deadline_ms + skew_ms for deadline_ms in deadlines]  # wall ms

        return await self._routed(EXTEND, receipts, lock_ms, True, outcomes, local, apply)

    async def reject(self, receipts: Iterable[str], reason: str = "rejected",
                     outcomes: Outcomes = None, local: bool = False) -> None:
        """Dead-letter now (reason header "rejected"; ``reason`` is for logs only)."""
        async def apply(items: list[str], found: Outcomes) -> list[int]:
            await self._settle(items, lambda part, offset, token, now_ms:
                               part.reject(offset, token, now_ms), outcomes=found)
            return []

        await self._routed(REJECT, receipts, 0, True, outcomes, local, apply)

    async def _routed(self, op: str, receipts: Iterable[str], arg: int, wait_durable: bool,
                      outcomes: Outcomes, local: bool,
                      apply: Callable[[list[str], Outcomes], Awaitable[list[int]]]) -> list[int]:
        """Settle here, or (several nodes) the receipts of groups another node owns there."""
        items = list(receipts)
        if local or self.remote is None:
            return await apply(items, outcomes)
        results = await split_settle(self.remote, op, items, arg, wait_durable, apply)
        if results is None:
            return await apply(items, outcomes)
        return unpack(results, outcomes)

    async def _settle(self, receipts: Iterable[str], action: Any,
                      wait_durable: bool = True, count_acked: bool = False,
                      outcomes: Outcomes = None) -> None:
        """Apply ``action`` to each receipt; persist; raise the first error afterwards
        (or, with ``outcomes``, append each receipt's error or None to it)."""
        touched: dict[tuple[str, str, int], tuple[SharedGroupWindows, SharedPartition]] = {}
        first_error: Exception | None = None
        now_ms = self.clock.monotonic_ms()
        for receipt in receipts:
            try:
                group, topic, partition, offset, token = parse_receipt(receipt)
                state = self._groups.get((group, topic))
                part = state.partitions.get(partition) if state is not None else None
                if state is None or part is None:
                    raise UnknownDeliveryError("receipt of an unknown group", receipt=receipt)
                touched[(group, topic, partition)] = (state, part)  # lazy expiry persists too
                action(part, offset, token, now_ms)
                if count_acked:
                    state.counters.acked += 1
                if outcomes is not None:
                    outcomes.append(None)
            except OperatingError as error:
                if outcomes is not None:
                    outcomes.append(error)
                    continue
                first_error = first_error or error
        for state, part in touched.values():
            await self._flush(state, part)
        if wait_durable:
            await self.persister.durable()
        if first_error is not None:
            raise first_error

    async def release_consumer(self, consumer_id: str) -> int:
        """Release everything ``consumer_id`` holds (counts as a delivery, as RabbitMQ
        counts an unacked message redelivered after its channel closed)."""
        released = 0
        now_ms = self.clock.monotonic_ms()
        for state in list(self._groups.values()):
            state.counters.consumers_seen.pop(consumer_id, None)  # it went away
            for part in state.partitions.values():
                count = part.release_consumer(consumer_id, now_ms)
                if count:
                    released += count
                    await self._flush(state, part)
        await self.persister.durable()
        if self.remote is not None:  # what it holds through other nodes (several nodes)
            released += await self.remote.release_consumer(consumer_id)
        return released

    async def redrive(self, name: str, records_max: int = 1000) -> int:
        """Move up to ``records_max`` records of a DLQ back to their source topics."""
        dlq = name
        state = self._groups.get((name, name))
        if state is not None:
            dlq = dead_letter_topic(name, state.config) or name
        if not self.queue_exists(dlq):
            raise UnknownQueueError("unknown dead-letter queue", queue=dlq)
        moved = 0
        while moved < records_max:
            deliveries = await self.acquire(dlq, dlq, min(100, records_max - moved),
                                            consumer_id=REDRIVE_CONSUMER)
            if not deliveries:
                break
            for delivery in deliveries:
                record = Record(delivery.offset, delivery.timestamp_ms, delivery.key,
                                delivery.value, delivery.headers)
                target = redrive_message(record)
                if target is not None:
                    await self.filter_publish(target[0], [target[1]])
            await self.ack([delivery.receipt for delivery in deliveries])
            moved += len(deliveries)
        return moved

    # --- publish admission -----------------------------------------------------------
    def should_drop_duplicate(self, queue: str, dedup_id: str) -> bool:
        window = self._dedup.get(queue)
        return window is not None and window.seen(dedup_id, self.clock.wall_ms())

    async def filter_publish(
        self, topic: str, messages: Sequence[Message], partition: int | None = None
    ) -> list[PublishResult]:
        """Publish, applying a queue's dedup window and max_length first."""
        info = self.host.topics.get(topic)
        state = self._groups.get((topic, topic))
        if state is None or not state.is_queue:
            results = await self.host.publish_records(info, messages, partition)
            return results
        now_ms = self.clock.wall_ms()
        window = self._dedup.setdefault(topic, DedupWindow())
        room = await self._room(state)
        # per message: a ready result (duplicate / rejected) or None (published)
        slots: list[PublishResult | None] = []
        accepted: list[Message] = []
        wrote = False  # only admission writes (dedup ids, overflow) need a COMMIT here
        for message in messages:
            if message.dedup_id is not None and window.seen(message.dedup_id, now_ms):
                slots.append(PublishResult(topic, partition or 0, -1, duplicate=True))
                continue
            if room is not None and len(accepted) >= room:
                slots.append(PublishResult(topic, partition or 0, -1))  # reject-publish
                continue
            if message.dedup_id is not None:
                expires_ms = now_ms + state.config.dedup_window_ms
                window.remember(message.dedup_id, expires_ms)
                self.store.save_dedup(topic, message.dedup_id, expires_ms)
                wrote = True
            slots.append(None)
            accepted.append(message)
        published = await self.host.publish_records(info, accepted, partition) if accepted else []
        if state.config.max_length is not None:
            await self._overflow(state)
            wrote = True
        if wrote:
            await self.persister.durable()
        stream = iter(published)
        return [slot if slot is not None else next(stream) for slot in slots]

    async def _room(self, state: SharedGroupWindows) -> int | None:
        """reject-publish: how many more records fit under max_length (None: no limit)."""
        config = state.config
        if config.max_length is None or config.overflow != "reject-publish":
            return None
        ready, _, delayed = await self._counts(state)
        return max(0, config.max_length - ready - delayed)

    async def _overflow(self, state: SharedGroupWindows) -> None:
        """drop-head: drop the oldest ready records above max_length."""
        config = state.config
        if config.max_length is None or config.overflow != "drop-head":
            return
        ready, _, delayed = await self._counts(state)
        excess = ready + delayed - config.max_length
        for part in state.partitions.values():
            if excess <= 0:
                break
            excess -= part.drop_oldest(excess)
            await self._flush(state, part)

    # --- timer -----------------------------------------------------------------------
    async def tick(self) -> None:
        """Expire locks, end delays, forget old dedup ids, apply work-queue retention.

        Visits only the partitions whose deadline came (``SharedTimers``) and the queue
        partitions that got records since the last pass (loaded, so that records
        nobody consumes can expire), not every group x partition."""
        now_ms = self.clock.monotonic_ms()
        visits: dict[tuple[str, str, int], None] = dict.fromkeys(self._timers.due(now_ms))
        for topic, partition in list(self._timers.unfilled):
            self._timers.unfilled.discard((topic, partition))
            for group, group_topic in list(self._groups):
                if group_topic == topic and self._groups[(group, topic)].is_queue:
                    visits[(group, topic, partition)] = None
        for group, topic, partition in visits:
            if self.remote is not None and not await self.remote.serves(group, topic):
                continue  # another node owns its window: expiries and TTLs happen there
            state = self._groups.get((group, topic))  # (after a claim, which reloads it)
            part = state.partitions.get(partition) if state is not None else None
            if state is None or part is None:
                continue  # deleted meanwhile
            if state.is_queue:
                await self._fill(state, part)  # so unconsumed records can expire
                if (part.room() == 0 and part.next_offset < self._high_watermark(part)):
                    self._timers.unfilled.add((topic, partition))  # the rest, later
            woke = part.tick(self.clock.monotonic_ms())
            await self._flush(state, part)
            if woke:
                self._wake(group, topic)
        wall_ms = self.clock.wall_ms()  # dedup windows are persisted in wall ms
        for queue, window in self._dedup.items():
            if window.forget_expired(wall_ms) and self.queue_exists(queue):
                self.store.delete_dedup_before(queue, wall_ms)
        await self._apply_retention()

    async def _apply_retention(self) -> None:
        """Once every shared group of a work-queue topic is past an offset, drop the log
        below it (whole segments go; the log start offset moves)."""
        lowest: dict[tuple[str, int], int] = {}
        for state in self._groups.values():
            info = self.host.topics.find(state.topic)
            if info is None or info.config.cleanup_policy != "work-queue":
                continue
            for partition, part in state.partitions.items():
                key = (state.topic, partition)
                lowest[key] = min(lowest.get(key, part.start_offset), part.start_offset)
        now_ms = self.clock.monotonic_ms()
        for (topic, partition), offset in lowest.items():
            key = (topic, partition)
            if offset > self._retained.get(key, -1):
                if now_ms < self._retained_at.get(key, -RETENTION_INTERVAL_MS) \
                        + RETENTION_INTERVAL_MS:
                    continue  # the log start file is written (and fsynced) at most 1/s
                topics = self.host.topics
                if offset > topics.offsets(topic, partition).log_start_offset:
                    await topics.log_store.delete_before(topic, partition, offset)
                    self._retained_at[key] = now_ms
                self._retained[key] = offset

    # --- internals -------------------------------------------------------------------
    def _wall_skew_ms(self) -> int:
        """Wall minus monotonic now: converts window times (monotonic) to wall ms."""
        return self.clock.wall_ms() - self.clock.monotonic_ms()

    def _token(self) -> int:
        """A delivery token: 63 bits from the OS CSPRNG (``secrets``), never 0 (0 means
        "no lock"). Only the consumer it was handed to knows it, so a receipt cannot be
        guessed or forged from the visible parts (topic, partition, offset, group)."""
        return secrets.randbits(63) or 1

    def _queue(self, name: str) -> SharedGroupWindows:
        state = self._groups.get((name, name))
        if state is None or not state.is_queue:
            raise UnknownQueueError("unknown queue", queue=name)
        return state

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

    async def load_declared(self, group: str, topic: str) -> None:
        """Load the group from the state store if another node declared it (cluster)."""
        if (group, topic) not in self._groups and self.host.topics.find(topic) is not None:
            await self._load_declared(group, topic)

    async def _load_declared(self, group: str, topic: str) -> SharedGroupWindows | None:
        """A queue or shared group in the state store but not loaded here: declared by
        another node of the cluster after this one opened (read, never created anew:
        a queue taken for a new shared group would start at the log's end)."""
        if group == topic:
            for row in await self.host.state_store.load_queues():
                if row.name == topic:
                    self._dedup.setdefault(topic, DedupWindow())
                    await self._load_group(group, topic, config_from_mapping(row.config),
                                           True, keep_loaded=True)
                    return self._groups.get((group, topic))
        for stored_group, stored_topic, config_json in await self.store.load_groups():
            if (stored_group, stored_topic) == (group, topic):
                config = config_from_mapping(json.loads(config_json))
                await self._load_group(group, topic, config, False, keep_loaded=True)
                return self._groups.get((group, topic))
        return None

    def _add_new_partitions(self, state: SharedGroupWindows) -> None:
        """Partitions created after the group was loaded start at their log start."""
        info = self.host.topics.find(state.topic)
        if info is None or info.partitions <= len(state.partitions):
            return
        for partition in range(len(state.partitions), info.partitions):
            start = self.host.topics.offsets(state.topic, partition).log_start_offset
            state.partitions[partition] = SharedPartition(
                state.topic, partition, state.group, state.config, start_offset=start,
                next_offset=start)
            self._save_start(state, partition, state.partitions[partition])

    def _high_watermark(self, part: SharedPartition) -> int:
        """The end of what may be delivered: the last stable offset."""
        if self.host.stable_offset is not None:
            return self.host.stable_offset(part.topic, part.partition)
        return self.host.topics.offsets(part.topic, part.partition).high_watermark

    async def _counts(self, state: SharedGroupWindows) -> tuple[int, int, int]:
        ready = in_flight = delayed = 0
        now_ms = self.clock.monotonic_ms()
        for part in state.partitions.values():
            await self._fill(state, part)
            part.tick(now_ms)
            await self._flush(state, part)
            counted = part.counts(self._high_watermark(part))
            ready += counted[0]
            in_flight += counted[1]
            delayed += counted[2]
        return ready, in_flight, delayed

    async def _fill(self, state: SharedGroupWindows, part: SharedPartition) -> None:
        """Load log records into the window up to its bound."""
        def log_start() -> int:
            return self.host.topics.offsets(part.topic, part.partition).log_start_offset

        if part.next_offset < log_start():
            part.skip_to(log_start())
        cache = self._appended.get((part.topic, part.partition))
        skew_ms = self._wall_skew_ms()
        # read again after every await only: nothing moves it while this loop does not
        # suspend (it was read per record loaded from the cache: 3.9 % of the broker's CPU)
        high_watermark = self._high_watermark(part)
        while part.room() > 0 and part.next_offset < high_watermark:
            if cache:
                cached = cache.pop(part.next_offset, None)
                if cached is not None:
                    self._uncache(cached)
                    part.load(cached, record_policy(cached, state.config, skew_ms))
                    continue
                while cache:  # offsets below next_offset were read from the log meanwhile
                    oldest = next(iter(cache))
                    if oldest >= part.next_offset:
                        break
                    self._uncache(cache.pop(oldest))
            try:
                records, read_end = await self._read_visible(part)
            except OffsetOutOfRangeError:
                part.skip_to(log_start())
                high_watermark = self._high_watermark(part)
                continue
            high_watermark = self._high_watermark(part)
            for record in records:
                # a read that suspends (a LogStore in a database) lets another fill of
                # this partition load the same records meanwhile: keep only what is new
                if record.offset < part.next_offset:
                    continue
                if part.room() <= 0:
                    break  # the window filled meanwhile: read on from here next time
                part.load(record, record_policy(record, state.config, skew_ms))
            else:
                if read_end > part.next_offset:
                    part.skip_to(read_end)  # control records, aborted transactions
                elif not records:
                    break
        if part.start_offset != state.saved_start.get(part.partition):
            self._save_start(state, part.partition, part)
        self._timers.schedule((state.group, state.topic, part.partition), part.next_timer_ms())

    async def _read_visible(self, part: SharedPartition) -> tuple[list[Record], int]:
        """Committed records only (docs/kafka.md, transactions): a queue or shared group
        never delivers a control record, an aborted or a still-open transaction's record."""
        if self.host.read_visible is None:
            records = await self.host.read_records(
                part.topic, part.partition, part.next_offset, part.room(), counted=False)
            return records, records[-1].offset + 1 if records else part.next_offset
        return await self.host.read_visible(
            part.topic, part.partition, part.next_offset, part.room(), counted=False)

    def _save_start(self, state: SharedGroupWindows, partition: int, part: SharedPartition) -> None:
        """Save the partition's window (start offset and runs) at the end of this turn."""
        self.persister.mark(state.group, state.topic, part, state.saved_start)

    def _live(self, group: str, topic: str, part: SharedPartition) -> bool:
        state = self._groups.get((group, topic))
        return state is not None and state.partitions.get(part.partition) is part

    async def _flush(self, state: SharedGroupWindows, part: SharedPartition) -> None:
        """Dead-letter what died, then persist the partition's changes."""
        self._timers.schedule((state.group, state.topic, part.partition), part.next_timer_ms())
        changes, part.changes = part.changes, []
        acked, part.acked_since_flush = part.acked_since_flush, 0
        start_before = state.saved_start.get(part.partition)
        if not changes and not acked and part.start_offset == start_before:
            return
        dying = [change for change in changes
                 if change.state is RecordState.DEAD and change.reason is not None]
        for change in dying:  # saved as unsettled until their dead letters are written
            part.dying[change.offset] = change.delivery_count
        try:
            parked = [await self._dead_letter_or_park(state, part, change) for change in dying]
        finally:
            for change in dying:
                part.dying.pop(change.offset, None)
        changes.extend(change for change in parked if change is not None)
        self._save_start(state, part.partition, part)
        if any(change.state in (RecordState.AVAILABLE, RecordState.DELAYED)
               for change in changes):
            self._wake(state.group, state.topic)
        elif ((part.start_offset != start_before or acked or any(
                change.state in (RecordState.ACKED, RecordState.DEAD) for change in changes))
                and self._waiters.get((state.group, state.topic))
                and (part.next_offset < self._high_watermark(part) or state.config.fifo)):
            # the window has room again (it moved, or records settled behind an unsettled
            # one): records not loaded yet can now be acquired by whoever is parked; in a
            # FIFO queue a settled record also frees the next one of its message group
            self._wake(state.group, state.topic)

    async def _dead_letter_or_park(self, state: SharedGroupWindows, part: SharedPartition,
                                   change: Change) -> Change | None:
        """Dead-letter ``change``; if the append fails the record is parked (kept in the
        window, retried after DEAD_LETTER_RETRY_MS) and the failure logged once."""
        failures = self.dead_letter_failures
        try:
            await self._dead_letter(state, part, change)
            state.counters.dead_lettered += 1
        except OperatingError as error:
            key = (state.group, error.code)
            failures[key] = failures.get(key, 0) + 1
            if failures[key] == 1:
                logger.warning("dead letter of %s/%d offset %d (group %s) failed, kept and "
                               "retried every %d ms: %s", part.topic, part.partition,
                               change.offset, state.group, DEAD_LETTER_RETRY_MS, error)
            assert change.record is not None
            policy = record_policy(change.record, state.config, self._wall_skew_ms())
            return part.park(change, policy, self.clock.monotonic_ms() + DEAD_LETTER_RETRY_MS)
        for key in [key for key in failures if key[0] == state.group]:
            logger.warning("dead letters of group %s written again after %d failures (%s)",
                           state.group, failures.pop(key), key[1])
        return None

    async def _dead_letter(self, state: SharedGroupWindows, part: SharedPartition,
                           change: Change) -> None:
        assert change.record is not None and change.reason is not None
        if state.config.dead_letter_exchange is not None:
            await self._dead_letter_to_exchange(state, change)
            return
        target = dead_letter_topic(state.group, state.config)
        if target is None:
            return  # no DLQ: an expired or rejected record is dropped
        if self.host.topics.find(target) is None:
            await self.declare_queue(target)
        message = dead_letter_message(change.record, part.topic, part.partition, change.reason)
        await self.filter_publish(target, [message])

    async def _dead_letter_to_exchange(self, state: SharedGroupWindows, change: Change) -> None:
        """RabbitMQ's dead-lettering: re-publish through the dead-letter exchange with the
        death recorded; a missing exchange or no route drops the record, as RabbitMQ does."""
        assert change.record is not None and change.reason is not None
        exchange = state.config.dead_letter_exchange or ""
        routing_key = dead_letter_routing_key(change.record, state.group, state.config)
        message = dead_letter_exchange_message(
            change.record, state.group, change.reason, self.clock.wall_ms(), exchange,
            routing_key)
        try:
            destinations = self.host.route(exchange, routing_key, message.headers)
        except OperatingError:
            return
        for destination in destinations:
            if not dead_letter_cycle(message, destination.name):
                info = await self.host.ensure_topic(destination.name)
                await self.filter_publish(info.name, [message])
