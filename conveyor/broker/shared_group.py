"""SharedPartition: one shared group's in-flight window over one partition (sans-IO).

Rules (every transition of a shared record lives in this file; it does not know
which protocol asked, and it does no I/O — the manager feeds it records read
from the log and persists the changes it reports):

- The window starts at ``start_offset``: every offset below it is ACKED or DEAD.
  Records from ``start_offset`` to ``next_offset`` are loaded: unsettled ones in
  ``entries`` (at most ``window_records_max``), settled ones (ACKED or DEAD behind
  an unsettled one) only as offsets in ``settled``, so acks behind one unacked
  delivery never fill the window; the span ``next_offset - start_offset`` is
  bounded by ``span_records_max``. Records at or above ``next_offset`` are in the
  log but not yet loaded (they count as available).
- A record is AVAILABLE, DELAYED (not before ``available_at_ms``), ACQUIRED
  (by a consumer, locked until ``deadline_ms``), ACKED or DEAD. Transitions are
  the ``TRANSITIONS`` table; anything else raises.
- ``delivery_count`` grows by one on every acquire (1 on the first delivery).
  When a lock ends (release, expiry, consumer gone) and the count has reached
  ``max_deliveries`` the record goes DEAD ("max-deliveries") instead.
- A record past its ``expires_at_ms`` is never handed out: it goes DEAD
  ("expired") when found.
- Served order: highest priority first, then lowest offset. FIFO queues: only
  the lowest non-final offset of each message group can be acquired, one at a
  time per group.
- Delayed records sit in a deadline heap, outside the scan path, so a delay of
  days never holds back the records behind it.
- All times are monotonic ms (``Clock.monotonic_ms``): a wall-clock step neither
  expires every lock at once nor holds them for the step. The manager converts at
  the edges: header times and persisted delays in, reported deadlines out.
"""

from __future__ import annotations

import enum
import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from conveyor.errors import IllegalStateError, LockExpiredError, UnknownDeliveryError
from conveyor.storage.record_batch import Record

from .delivery import HEAP_SLACK_ITEMS, NEVER_MS, DeadReason, RecordPolicy, exhausted
from .types import QueueConfig

if TYPE_CHECKING:
    from conveyor.storage.shared_state import RangeRow

WINDOW_RECORDS_MAX = 2_000  # KIP-932 group.share.partition.max.record.locks (default 2000)
# KIP-932 bounds the records in flight, not the span behind one stuck record; we bound
# the span too so the set of settled offsets behind the start stays small (~4 MiB)
SPAN_RECORDS_MAX = 100_000
# receipts of earlier locks of a record still answer "lock expired" (not "unknown"):
# a few are enough to tell a late consumer from a forged receipt (SQS keeps none)
PAST_TOKENS_MAX = 4


class RecordState(enum.Enum):
    AVAILABLE = "available"
    DELAYED = "delayed"
    ACQUIRED = "acquired"
    ACKED = "acked"
    DEAD = "dead"

    # members are singletons compared by identity: hash them by identity too, in C.
    # Enum's own __hash__ is Python code, and TRANSITIONS is looked up on every
    # acquire and ack (Enum.__hash__ was 9.8 % of the broker's CPU on HTTP acquire + ack)
    __hash__ = object.__hash__


class RecordEvent(enum.Enum):
    ACQUIRE = "acquire"
    ACK = "ack"
    RELEASE = "release"  # consumer gave it back, or its lock expired
    DELAY = "delay"  # release with a delay
    EXTEND = "extend"
    DUE = "due"  # a delay ended
    KILL = "kill"  # dead: rejected, expired, out of deliveries, dropped by overflow
    PURGE = "purge"

    __hash__ = object.__hash__  # as RecordState's


S, E = RecordState, RecordEvent
TRANSITIONS: dict[tuple[RecordState, RecordEvent], RecordState] = {
    (S.AVAILABLE, E.ACQUIRE): S.ACQUIRED,
    (S.AVAILABLE, E.KILL): S.DEAD,
    (S.AVAILABLE, E.PURGE): S.ACKED,
    (S.DELAYED, E.DUE): S.AVAILABLE,
    (S.DELAYED, E.KILL): S.DEAD,
    (S.DELAYED, E.PURGE): S.ACKED,
    (S.ACQUIRED, E.ACK): S.ACKED,
    (S.ACQUIRED, E.RELEASE): S.AVAILABLE,
    (S.ACQUIRED, E.DELAY): S.DELAYED,
    (S.ACQUIRED, E.EXTEND): S.ACQUIRED,
    (S.ACQUIRED, E.KILL): S.DEAD,
}
FINAL = (S.ACKED, S.DEAD)


@dataclass(slots=True)
class Entry:
    """One loaded record of the window and its shared state."""

    record: Record
    policy: RecordPolicy
    state: RecordState = RecordState.AVAILABLE
    delivery_count: int = 0
    available_at_ms: int = 0  # monotonic ms, for DELAYED
    consumer_id: str | None = None  # holder while ACQUIRED
    deadline_ms: int = 0  # lock deadline while ACQUIRED (monotonic ms)
    token: int = 0  # changes on every acquire: a stale receipt never matches
    past_tokens: tuple[int, ...] = ()  # tokens of earlier locks, newest first (bounded)
    dead_reason: DeadReason | None = None  # parked dead letter: killed again when due
    heap_version: int = 0  # matches the live available-heap item


@dataclass(frozen=True, slots=True)
class Change:
    """A state change the manager must persist (and for DEAD, dead-letter)."""

    offset: int
    state: RecordState
    delivery_count: int
    available_at_ms: int = 0
    reason: DeadReason | None = None
    record: Record | None = None


class Acquired(NamedTuple):
    """An acquired record (a tuple: one per delivered record, cheaper than a dataclass)."""

    entry: Entry
    offset: int


@dataclass
class SharedPartition:
    topic: str
    partition: int
    group: str
    config: QueueConfig
    start_offset: int = 0
    window_records_max: int = WINDOW_RECORDS_MAX
    span_records_max: int = SPAN_RECORDS_MAX
    # offset -> entry, for every loaded unsettled offset in [start_offset, next_offset)
    entries: dict[int, Entry] = field(default_factory=dict)
    # loaded offsets above start_offset that are ACKED or DEAD (their entries are gone)
    settled: set[int] = field(default_factory=set)
    next_offset: int = 0
    # (-priority, offset, version): AVAILABLE entries, stale items skipped lazily
    available: list[tuple[int, int, int]] = field(default_factory=list)
    # (available_at_ms, offset): DELAYED entries, by when they become available
    delayed: list[tuple[int, int]] = field(default_factory=list)
    # (deadline_ms, offset, token): ACQUIRED entries, by lock deadline
    locks: list[tuple[int, int, int]] = field(default_factory=list)
    # (expires_at_ms, offset): loaded entries that expire, so a timer can dead-letter
    # them while nobody consumes (RabbitMQ expires messages without a consumer too)
    expiring: list[tuple[int, int]] = field(default_factory=list)
    # FIFO message groups with a record in flight
    groups_in_flight: set[str] = field(default_factory=set)
    # persisted state of offsets not loaded yet: offset -> (state, count, available_at)
    pending_rows: dict[int, tuple[RecordState, int, int]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    # acks since the manager last flushed this partition (acks report no Change)
    acked_since_flush: int = 0
    version: int = 0
    # loaded unsettled offsets whose delivery count is saved: released or parked ones
    # and those delivered before a restart; with ``settled``, ``pending_rows`` and
    # ``delivered_end``, what a snapshot saves
    counted: set[int] = field(default_factory=set)
    # one past the highest offset ever acquired: after a restart an unsettled record
    # below it without a saved count was delivered once (AMQP's redelivered flag, SQS's
    # receive count, max_deliveries), which costs one integer instead of a count each
    delivered_end: int = 0
    # the delivered mark saved (or being saved): at or above ``delivered_end``, ahead of
    # it when the saving acquire had delivered everything in the log (see
    # ``SharedGroups._delivered_mark_to_save``), so the acquires after it below it need
    # no save and no COMMIT wait
    delivered_mark: int = 0
    # the highest delivered mark known COMMITted: a delivery at or below it may leave
    delivered_mark_committed: int = 0
    # the (start, runs) last saved, so an unchanged window is not written again
    saved_snapshot: tuple[int, list[RangeRow]] | None = None
    # offset -> delivery count of a dead record whose dead letter is being written: saved
    # as unsettled until it is (a crash then judges it again, never loses it)
    dying: dict[int, int] = field(default_factory=dict)

    # --- loading --------------------------------------------------------------------
    def room(self) -> int:
        span = self.next_offset - self.start_offset
        return max(0, min(self.window_records_max - len(self.entries),
                          self.span_records_max - span))

    def load(self, record: Record, policy: RecordPolicy) -> None:
        """Add the record at ``next_offset`` (the manager reads the log in order)."""
        assert record.offset >= self.next_offset, (record.offset, self.next_offset)
        self.next_offset = record.offset + 1
        if record.offset < self.start_offset:
            return
        saved = self.pending_rows.pop(record.offset, None)
        entry = Entry(record, policy)
        if saved is not None:
            entry.state, entry.delivery_count, entry.available_at_ms = saved
        elif record.offset < self.delivered_end:
            entry.delivery_count = 1  # delivered before a restart, never given back
        if entry.delivery_count > 0:
            self.counted.add(record.offset)
        self.entries[record.offset] = entry
        if entry.state in FINAL:
            self._settle(record.offset)
            return
        if entry.state is S.ACQUIRED:  # a lock does not survive a restart
            entry.state = S.AVAILABLE
        available_at_ms = max(policy.available_at_ms, entry.available_at_ms)
        if entry.state is S.DELAYED or available_at_ms > 0:
            entry.state = S.DELAYED
            entry.available_at_ms = available_at_ms
            heapq.heappush(self.delayed, (available_at_ms, record.offset))
        else:
            self._push_available(record.offset, entry)

    def skip_to(self, offset: int) -> None:
        """The log has nothing between next_offset and ``offset`` (gap or retention)."""
        self.next_offset = max(self.next_offset, offset)
        if self.start_offset < offset and not any(o < offset for o in self.entries):
            self.start_offset = max(self.start_offset, min(offset, self.next_offset))
            self.settled = {o for o in self.settled if o >= self.start_offset}

    # --- time -------------------------------------------------------------------------
    def tick(self, now_ms: int) -> bool:
        """Expire locks and end delays whose time has come; True if any record changed."""
        changed = False
        while self.locks and self.locks[0][0] <= now_ms:
            _, offset, token = heapq.heappop(self.locks)
            entry = self.entries.get(offset)
            if (entry is not None and entry.state is S.ACQUIRED and entry.token == token
                    and entry.deadline_ms <= now_ms):
                self._unlock(offset, entry, now_ms, 0)
                changed = True
        while self.delayed and self.delayed[0][0] <= now_ms:
            _, offset = heapq.heappop(self.delayed)
            entry = self.entries.get(offset)
            if entry is not None and entry.state is S.DELAYED and entry.available_at_ms <= now_ms:
                if entry.dead_reason is not None:  # retry its dead letter
                    self._kill(offset, entry, entry.dead_reason)
                    continue
                self._move(entry, E.DUE)
                self._push_available(offset, entry)
                changed = True
        while self.expiring and self.expiring[0][0] <= now_ms:
            _, offset = heapq.heappop(self.expiring)
            entry = self.entries.get(offset)
            # only an AVAILABLE record expires here; one in flight or delayed is pushed
            # again when it next becomes available (_push_available)
            if entry is not None and entry.state is S.AVAILABLE:
                self._kill(offset, entry, "expired")
        return changed

    def next_deadline_ms(self) -> int | None:
        candidates = [heap[0][0] for heap in (self.locks, self.delayed) if heap]
        return min(candidates) if candidates else None

    def next_timer_ms(self) -> int | None:
        """When ``tick`` next has something to do: a lock, a delay or a record expiry."""
        candidates = [heap[0][0] for heap in (self.locks, self.delayed, self.expiring)
                      if heap]
        return min(candidates) if candidates else None

    # --- acquire ----------------------------------------------------------------------
    def acquire(
        self, now_ms: int, records_max: int, lock_ms: int, consumer_id: str, token: int
    ) -> list[Acquired]:
        self.tick(now_ms)
        chosen: list[Acquired] = []
        for offset in self._candidates(now_ms, records_max):
            entry = self.entries[offset]
            self._move(entry, E.ACQUIRE)
            if entry.token:
                entry.past_tokens = (entry.token, *entry.past_tokens)[:PAST_TOKENS_MAX]
            entry.delivery_count += 1
            entry.consumer_id = consumer_id
            entry.deadline_ms = now_ms + lock_ms
            entry.token = token
            if entry.policy.message_group is not None:
                self.groups_in_flight.add(entry.policy.message_group)
            heapq.heappush(self.locks, (entry.deadline_ms, offset, token))
            if offset >= self.delivered_end:
                self.delivered_end = offset + 1
            chosen.append(Acquired(entry, offset))
        self._bound_heaps()
        return chosen

    def _candidates(self, now_ms: int, records_max: int) -> list[int]:
        if self.config.fifo:
            return self._fifo_candidates(now_ms, records_max)
        found: list[int] = []
        while self.available and len(found) < records_max:
            _, offset, version = heapq.heappop(self.available)
            entry = self.entries.get(offset)
            if entry is None or entry.state is not S.AVAILABLE or entry.heap_version != version:
                continue
            if entry.policy.expires_at_ms <= now_ms:
                self._kill(offset, entry, "expired")
                continue
            found.append(offset)
        return found

    def _fifo_candidates(self, now_ms: int, records_max: int) -> list[int]:
        """The lowest non-final offset of each group not in flight, in offset order."""
        blocked = set(self.groups_in_flight)
        found: list[int] = []
        for offset in sorted(self.entries):
            if len(found) >= records_max:
                break
            entry = self.entries[offset]
            if entry.state in FINAL:
                continue
            group = entry.policy.message_group
            if group is not None and group in blocked:
                continue
            if entry.state is S.AVAILABLE and entry.policy.expires_at_ms <= now_ms:
                self._kill(offset, entry, "expired")
                continue
            if group is not None:
                blocked.add(group)
            if entry.state is S.AVAILABLE:
                found.append(offset)
        return found

    # --- settle -----------------------------------------------------------------------
    def held(self, offset: int, token: int, now_ms: int) -> Entry:
        """The entry a receipt names, still locked by that receipt; else a typed error."""
        entry = self.entries.get(offset)
        if entry is None or entry.state in FINAL:
            raise UnknownDeliveryError(
                "delivery unknown or already settled", topic=self.topic,
                partition=self.partition, offset=offset, group=self.group,
            )
        if entry.state is S.ACQUIRED and entry.token == token and entry.deadline_ms <= now_ms:
            self._unlock(offset, entry, now_ms, 0)
        if entry.state is S.ACQUIRED and entry.token == token:
            return entry
        if token != entry.token and token not in entry.past_tokens:
            # never issued for this record (forged, mistyped, or from before a restart)
            raise UnknownDeliveryError(
                "no such delivery: the receipt was not issued for this record",
                topic=self.topic, partition=self.partition, offset=offset, group=self.group,
            )
        raise LockExpiredError(
                "the lock of this delivery expired", topic=self.topic,
                partition=self.partition, offset=offset, group=self.group,
            )

    def ack(self, offset: int, token: int, now_ms: int) -> None:
        entry = self.held(offset, token, now_ms)
        self._end_lock(entry)
        self._move(entry, E.ACK)
        # no Change per ack (the hot path): what is saved is the window itself
        # (shared_persist.snapshot); the manager only needs to know that acks happened
        self.acked_since_flush += 1
        self._settle(offset)

    def release(self, offset: int, token: int, now_ms: int, delay_ms: int = 0) -> None:
        entry = self.held(offset, token, now_ms)
        self._unlock(offset, entry, now_ms, delay_ms)

    def extend(self, offset: int, token: int, now_ms: int, lock_ms: int) -> int:
        entry = self.held(offset, token, now_ms)
        self._move(entry, E.EXTEND)
        entry.deadline_ms = now_ms + lock_ms
        heapq.heappush(self.locks, (entry.deadline_ms, offset, token))
        self._bound_heaps()
        return entry.deadline_ms

    def reject(self, offset: int, token: int, now_ms: int) -> None:
        entry = self.held(offset, token, now_ms)
        self._end_lock(entry)
        self._kill(offset, entry, "rejected")

    def release_consumer(self, consumer_id: str, now_ms: int) -> int:
        held = [
            (offset, entry) for offset, entry in self.entries.items()
            if entry.state is S.ACQUIRED and entry.consumer_id == consumer_id
        ]
        for offset, entry in held:
            self._unlock(offset, entry, now_ms, 0)
        return len(held)

    def purge(self) -> int:
        """Ack every AVAILABLE / DELAYED loaded record (RabbitMQ purge: ready messages)."""
        purged = 0
        for offset, entry in list(self.entries.items()):
            if entry.state in (S.AVAILABLE, S.DELAYED):
                self._move(entry, E.PURGE)
                self.changes.append(Change(offset, S.ACKED, entry.delivery_count))
                self._settle(offset)
                purged += 1
        return purged

    def drop_oldest(self, count: int) -> int:
        """Overflow drop-head: the oldest ready records go DEAD ("maxlen": dead-lettered
        only through a dead-letter exchange, as RabbitMQ does)."""
        dropped = 0
        for offset in sorted(self.entries):
            if dropped >= count:
                break
            entry = self.entries[offset]
            if entry.state in (S.AVAILABLE, S.DELAYED):
                self._move(entry, E.KILL)
                reason: DeadReason | None = (
                    "maxlen" if self.config.dead_letter_exchange is not None else None)
                self.changes.append(Change(offset, S.DEAD, entry.delivery_count,
                                           reason=reason, record=entry.record))
                self._settle(offset)
                dropped += 1
        return dropped

    def park(self, change: Change, policy: RecordPolicy, retry_at_ms: int) -> Change:
        """The dead letter of ``change`` could not be written: the record comes back into
        the window as DELAYED until ``retry_at_ms``, then is killed again (its dead letter
        retried). The start offset moves back to it if it had passed it (not persisted
        yet: the manager saves the start after the dead letters). Returns the change to
        persist (a restart forgets the reason: a record out of deliveries or rejected is
        then delivered once more; an expired one dies again at once)."""
        assert change.record is not None and change.reason is not None
        offset = change.offset
        entry = Entry(change.record, policy, state=S.DELAYED,
                      delivery_count=change.delivery_count, available_at_ms=retry_at_ms,
                      dead_reason=change.reason)
        if offset < self.start_offset:
            self.settled.update(range(offset + 1, self.start_offset))
            self.start_offset = offset
        self.settled.discard(offset)
        self.entries[offset] = entry
        self.counted.add(offset)
        heapq.heappush(self.delayed, (retry_at_ms, offset))
        # persisted as available: a restart judges the record afresh (it expires or
        # runs out of deliveries again, and its dead letter is retried then)
        return Change(offset, S.AVAILABLE, entry.delivery_count)

    # --- counts -----------------------------------------------------------------------
    def counts(self, high_watermark: int) -> tuple[int, int, int]:
        """(ready, in_flight, delayed); records not loaded yet count as ready."""
        ready = in_flight = delayed = 0
        for entry in self.entries.values():
            if entry.state is S.AVAILABLE:
                ready += 1
            elif entry.state is S.ACQUIRED:
                in_flight += 1
            elif entry.state is S.DELAYED:
                delayed += 1
        unloaded = max(0, high_watermark - max(self.next_offset, self.start_offset))
        unloaded -= sum(1 for offset, (state, _, _) in self.pending_rows.items()
                        if offset >= self.next_offset and state in FINAL)
        return ready + max(0, unloaded), in_flight, delayed

    # --- internals --------------------------------------------------------------------
    def _move(self, entry: Entry, event: RecordEvent) -> None:
        target = TRANSITIONS.get((entry.state, event))
        if target is None:
            raise IllegalStateError(
                "illegal shared-record transition", state=entry.state.value,
                event=event.value, offset=entry.record.offset, group=self.group,
            )
        entry.state = target

    def _push_available(self, offset: int, entry: Entry) -> None:
        self.version += 1
        entry.heap_version = self.version
        heapq.heappush(self.available, (-entry.policy.priority, offset, self.version))
        if entry.policy.expires_at_ms < NEVER_MS:
            heapq.heappush(self.expiring, (entry.policy.expires_at_ms, offset))

    def _end_lock(self, entry: Entry) -> None:
        entry.consumer_id = None
        if entry.policy.message_group is not None:
            self.groups_in_flight.discard(entry.policy.message_group)

    def _unlock(self, offset: int, entry: Entry, now_ms: int, delay_ms: int) -> None:
        """A lock ends without an ack: redeliver, delay, or dead-letter."""
        self._end_lock(entry)
        if exhausted(entry.delivery_count, self.config):
            self._kill(offset, entry, "max-deliveries")
            return
        self.counted.add(offset)  # redelivered: its count is saved from now on
        if delay_ms > 0:
            self._move(entry, E.DELAY)
            entry.available_at_ms = now_ms + delay_ms
            heapq.heappush(self.delayed, (entry.available_at_ms, offset))
            self.changes.append(
                Change(offset, S.DELAYED, entry.delivery_count, entry.available_at_ms))
            return
        self._move(entry, E.RELEASE)
        self._push_available(offset, entry)
        self.changes.append(Change(offset, S.AVAILABLE, entry.delivery_count))
        self._bound_heaps()

    def _kill(self, offset: int, entry: Entry, reason: DeadReason) -> None:
        self._move(entry, E.KILL)
        self.changes.append(
            Change(offset, S.DEAD, entry.delivery_count, reason=reason, record=entry.record))
        self._settle(offset)

    def _bound_heaps(self) -> None:
        """Rebuild a heap from the live entries once its stale items (skipped lazily)
        outnumber them: extends and releases each leave one behind."""
        bound = 2 * len(self.entries) + HEAP_SLACK_ITEMS
        if len(self.locks) > bound:
            self.locks = [(e.deadline_ms, offset, e.token) for offset, e in self.entries.items()
                          if e.state is S.ACQUIRED]
            heapq.heapify(self.locks)
        if len(self.available) > bound:
            self.available = [(-e.policy.priority, offset, e.heap_version)
                              for offset, e in self.entries.items() if e.state is S.AVAILABLE]
            heapq.heapify(self.available)
        if len(self.delayed) > bound:
            self.delayed = [(e.available_at_ms, offset) for offset, e in self.entries.items()
                            if e.state is S.DELAYED]
            heapq.heapify(self.delayed)
        if len(self.expiring) > bound:
            self.expiring = [(e.policy.expires_at_ms, offset) for offset, e in self.entries.items()
                             if e.state is S.AVAILABLE and e.policy.expires_at_ms < NEVER_MS]
            heapq.heapify(self.expiring)

    def _settle(self, offset: int) -> None:
        """The entry at ``offset`` reached ACKED or DEAD: drop it from the window."""
        del self.entries[offset]
        self.counted.discard(offset)
        if offset != self.start_offset:
            self.settled.add(offset)
            return
        self.start_offset += 1
        while self.start_offset in self.settled:
            self.settled.discard(self.start_offset)
            self.start_offset += 1

