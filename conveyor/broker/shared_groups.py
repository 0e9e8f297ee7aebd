"""SharedGroups: queues and shared groups — the manager the Broker facade calls.

Owns: queue declarations (a queue = a topic with cleanup policy "work-queue" +
a shared group of the same name), shared groups on plain topics (KIP-932),
receipts, long-poll acquires, dead-letter appends, publish admission for
queues (dedup window, max_length overflow), work-queue retention, and
persisting every change through ``SharedStateStore``. The per-partition rules
live in ``shared_group.SharedPartition``; header rules in ``delivery``.

Built in layers, one module each: ``SharedWindows`` (shared_windows.py: the windows
held, loaded, filled and flushed) <- ``SharedQueues`` (shared_queues.py: declare,
alter, purge, delete, counts) <- ``SharedGroups`` (here: acquire, settle, publish
admission, the timer pass). Its parts: ``LongPolls`` (shared_waits.py: parked
acquires and their wake-ups), ``AppendedCache`` (appended_cache.py), ``DeadLetters``
(dead_letters.py), ``WorkQueueRetention`` (shared_retention.py); the data they pass
each other is in shared_model.py.

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
    durable() -> None            # every change so far durable (after ack(durable_later=True))
    release(receipts, delay_ms=0) -> None
    extend(receipts, lock_ms) -> list[int]       # new lock deadlines (wall ms)
    reject(receipts, reason="rejected") -> None  # dead-letter now
    release_consumer(consumer_id) -> int         # counts as a delivery (redelivered)
    redrive(name, records_max=1000) -> int       # DLQ (or queue's DLQ) -> source topics
    filter_publish(topic, messages, partition=None) -> list[PublishResult]
    should_drop_duplicate(queue, dedup_id) -> bool                # sync
    notify_appended(topic, partition) -> None                     # sync; facade calls it
    appended.remember(topic, partition, base_offset, records)     # sync; the producer's
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
and is retried (``dead_letters.DEAD_LETTER_RETRY_MS``), never dropped with the
changes around it.

Durability: windows are saved once per loop turn per partition (shared_persist.py:
start offset + runs of states, never a row per ack); acquire does not wait for that
save (a lost count after a crash only means one delivery fewer is counted); ack,
release, reject, extend and publish admission await it and its COMMIT.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from conveyor.errors import (
    OperatingError,
    StorageError,
    UnknownDeliveryError,
    UnknownQueueError,
)
from conveyor.storage.record_batch import Record

from .dead_letters import DeadLetters
from .delivery import DedupWindow, dead_letter_topic, redrive_message
from .shared_group import SharedPartition
from .shared_model import Outcomes, SharedGroupsHost, SharedGroupWindows, parse_receipt
from .shared_queues import SharedQueues
from .shared_remote import ACK, EXTEND, REJECT, RELEASE, split_settle, unpack
from .shared_retention import WorkQueueRetention
from .stats import TrafficCounters
from .types import Delivery, Message, PublishResult

__all__ = ["SharedGroups", "SharedGroupsHost", "parse_receipt"]

# How far past the last delivered record a caught-up acquire saves the delivered mark:
# the acquires after it deliver below it, with no save and no COMMIT wait of their own
# (at 2,000 msg/s each message was acquired alone and waited for a COMMIT of its own,
# one loop turn more per delivery: bench/README.md, "Fifth pass (amqplat)"). After a
# crash, a record appended after that save and never delivered comes back flagged
# redelivered (AMQP allows a false true, not a false false) and counted as delivered
# once; queues with a delivery limit get no lead (a count there decides dead-lettering).
DELIVERED_MARK_AHEAD_RECORDS = 256
ACQUIRE_RECORDS_MAX = 1_000  # KIP-932 ShareFetch max records per fetch is 500; headroom
ACQUIRE_WAIT_MS_MAX = 30_000  # matches the Broker's fetch_wait_ms_max
LOCK_MS_MAX = 12 * 3600 * 1000  # SQS's visibility timeout maximum (12 hours)
REDRIVE_CONSUMER = "conveyor.redrive"


class SharedGroups(SharedQueues):
    def __init__(self, host: SharedGroupsHost, traffic: TrafficCounters | None = None) -> None:
        super().__init__(host, traffic)
        self.dead_letters = DeadLetters(host, self._wall_skew_ms, self.declare_queue,
                                        self.filter_publish)
        self.retention = WorkQueueRetention(host.topics, self.clock)

    def forget_topic(self, topic: str) -> None:
        """Another cluster node deleted the topic (a queue's among them): its groups go
        from memory, the stores are left alone (that node deleted the rows). Their
        parked acquires return empty; the next one finds no queue. The caller has
        forgotten the topic's partitions first."""
        for key in [key for key in self._groups if key[1] == topic]:
            del self._groups[key]
            self.polls.wake(*key)
        self._dedup.pop(topic, None)
        self.appended.drop_topic(topic)
        for table in (self.retention.retained, self.retention.retained_at):
            for partition_key in [item for item in table if item[0] == topic]:
                del table[partition_key]

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
                if deliveries:
                    await self._delivered_mark_committed(state)
            except asyncio.CancelledError:
                # cancelled (the caller went away) after records were locked for it, while
                # a later partition was read or the delivered mark was committed: nobody
                # will see these deliveries, so they go back now, not at their deadline
                if deliveries:
                    await asyncio.shield(self.release([d.receipt for d in deliveries], 0))
                raise
            if deliveries and self.polls.waiters.get((group, topic)) and self._maybe_ready(state):
                self.polls.wake(group, topic, 1)  # pass the baton: more may be there
            remaining_ms = deadline_ms - self.clock.monotonic_ms()
            if deliveries or remaining_ms <= 0:
                return deliveries
            await self.polls.wait(state, remaining_ms, only is not None)
            if self._groups.get((group, topic)) is not state:
                return []  # deleted while waiting

    async def _delivered_mark_committed(self, state: SharedGroupWindows) -> None:
        """The deliveries of a loop turn leave the process only once their delivered
        mark (AMQP's redelivered flag, the count behind max_deliveries) is committed: at
        once when a mark committed before covers them (it runs ahead, see
        ``DELIVERED_MARK_AHEAD_RECORDS``), else after that turn's save is committed (one
        commit per turn, shared by every acquire in it); with a delivery limit always
        after the turn's save (the counts of records delivered again go with it).
        Committed, not fsynced (SQLite: the COMMIT at the end of the turn; PostgreSQL:
        its commit, which is durable): a kill -9 keeps the mark, a power cut before the
        state store's next fsync may lose it (docs/amqp.md). If the commit fails they
        go out anyway (the mark stays queued for the retry) and a crash before the retry
        counts them one delivery fewer."""
        waiting = [(part, part.delivered_mark) for part in state.partitions.values()
                   if part.delivered_end > part.delivered_mark_committed]
        if not waiting and state.config.max_deliveries <= 0:
            return
        try:
            await self.persister.committed()
        except StorageError:
            return
        for part, mark in waiting:
            part.delivered_mark_committed = max(part.delivered_mark_committed, mark)

    def _delivered_mark_to_save(self, part: SharedPartition) -> int:
        """The mark to save once an acquire moved ``delivered_end`` past the saved one:
        ``DELIVERED_MARK_AHEAD_RECORDS`` beyond it when the acquire took every record
        the log holds and the queue has no delivery limit, else ``delivered_end``
        itself (a record already in the log and not delivered must not count as
        delivered after a crash)."""
        end = part.delivered_end
        if part.config.max_deliveries > 0:
            return end
        if end < self.host.topics.offsets(part.topic, part.partition).high_watermark:
            return end
        return end + DELIVERED_MARK_AHEAD_RECORDS

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
            chosen = part.acquire(now_ms, records_max - len(deliveries), lock_ms, consumer,
                                  self._token())
            if part.delivered_end > part.delivered_mark:
                # past the saved delivered mark: a new one is saved with this turn's
                # commit (one save per partition and turn), so a record redelivered after
                # a crash is known to have been delivered before (AMQP's redelivered
                # flag, delivery counts)
                part.delivered_mark = self._delivered_mark_to_save(part)
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
    # --- settle ----------------------------------------------------------------------
    async def ack(self, receipts: Iterable[str], wait_durable: bool = True,
                  outcomes: Outcomes = None, local: bool = False,
                  durable_later: bool = False) -> None:
        """``wait_durable=False``: return once applied, without waiting for the save and
        its fsync (for protocols whose acks get no answer: AMQP): the ack is saved with
        the loop turn; a crash before that turn's COMMIT is durable may redeliver.
        ``durable_later``: this node's acks are applied and saved with the loop turn,
        and the caller awaits ``durable()`` before it answers (an acquire that carries
        acks: one save and one fsync for both); acks settled by another node still
        wait for their durability there, which ``durable()`` here cannot cover.
        ``outcomes``: one entry per receipt (None or its error) instead of raising.
        ``local``: this node's windows only (a request forwarded by another node)."""
        local_wait_durable = wait_durable and not durable_later

        async def apply(items: list[str], found: Outcomes) -> list[int]:
            # the method itself (part, offset, token, now_ms): no lambda frame per receipt
            await self._settle(items, SharedPartition.ack, local_wait_durable,
                               count_acked=True, outcomes=found)
            return []

        await self._routed(ACK, receipts, 0, wait_durable, outcomes, local, apply)

    async def durable(self) -> None:
        """Every change this node's windows made so far (acks settled with
        ``durable_later`` among them) saved, committed and fsynced."""
        await self.persister.durable()

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
                self.polls.wake(group, topic)
        wall_ms = self.clock.wall_ms()  # dedup windows are persisted in wall ms
        for queue, window in self._dedup.items():
            if window.forget_expired(wall_ms) and self.queue_exists(queue):
                self.store.delete_dedup_before(queue, wall_ms)
        await self.retention.apply(self._groups.values())

