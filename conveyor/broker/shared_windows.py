"""SharedWindows: the shared groups' windows held in memory, loaded, filled and flushed.

The base of the share coordinator (``SharedQueues`` adds the declarations on it,
``SharedGroups`` the acquire, settle, publish admission and timer paths; see
shared_groups.py for the API). Owns: every (group, topic)'s ``SharedGroupWindows``,
the queues' dedup windows, loading them at open (and when another cluster node
declared them), filling a window from the appended-record cache or the log, and
flushing a window's changes (dead letters first, then the save marked for the end of
the loop turn) with the wake-ups they cause.

Time: lock deadlines, delays and TTL run on the monotonic clock (a wall-clock step
moves none of them); header times and persisted delays are wall ms, converted at
load and save, and deadlines are reported in wall ms.

Faults: at open every piece of state is clamped to the recovered log end
(log_end.py); a dead letter that cannot be appended parks its record in the window
and is retried (dead_letters.py), never dropped with the changes around it.

Durability: windows are saved once per loop turn per partition (shared_persist.py:
start offset + runs of states, never a row per ack).
"""

from __future__ import annotations

import json
import secrets

from conveyor.errors import OffsetOutOfRangeError, UnknownQueueError
from conveyor.storage.record_batch import Record
from conveyor.storage.shared_state import SharedStateStore

from .appended_cache import AppendedCache
from .dead_letters import DeadLetters
from .delivery import PLAIN_POLICY, DedupWindow, record_policy
from .log_end import LostRange, clamp
from .shared_group import RecordState, SharedPartition
from .shared_model import SharedGroupsHost, SharedGroupWindows, config_from_mapping
from .shared_persist import WindowPersister
from .shared_remote import SharedRemote
from .shared_timers import SharedTimers
from .shared_waits import LongPolls
from .stats import TrafficCounters
from .types import QueueConfig


class SharedWindows:
    # set by SharedGroups (it declares the dead-letter queues and admits dead letters)
    dead_letters: DeadLetters

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
        # the acquires parked in a long poll, and their wake-ups
        self.polls = LongPolls(self.clock, host.topics)
        # records published and not loaded into a window yet: _fill takes them instead
        # of reading and decoding the log
        self.appended = AppendedCache()
        # state found past the recovered log end at open (logged; see log_end.py)
        self.lost_ranges: list[LostRange] = []

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
            # committed: the saved mark is at or above it (a mark saved ahead of the log
            # end is saved again clamped, so records appended from now on are not in it)
            part.delivered_mark = part.delivered_mark_committed = part.delivered_end
            resave = legacy or delivered_end > log_end
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
        await self.polls.close()
        self.persister.flush()  # what the last turn marked, before the store closes

    # --- reads -----------------------------------------------------------------------
    def group_state(self, group: str, topic: str) -> SharedGroupWindows | None:
        """A group's live state, read-only for browsing and statistics (queue_browse.py)."""
        return self._groups.get((group, topic))

    def delivered_totals(self) -> dict[tuple[str, str], int]:
        """(group, topic) -> records delivered since open; no per-record work to keep."""
        return {key: state.counters.delivered for key, state in self._groups.items()}

    def queue_exists(self, name: str) -> bool:
        state = self._groups.get((name, name))
        return state is not None and state.is_queue

    def waiting_acquires(self, topic: str, group: str) -> int:
        """How many acquires of ``group`` are parked in a long poll (metrics, tests)."""
        return self.polls.waiting(topic, group)

    def notify_appended(self, topic: str, partition: int) -> None:
        """The facade calls this after every append (or when a partition goes): wakes as
        many parked acquires of each of the topic's groups as records arrived since the
        last call (``LongPolls.appended``)."""
        self._timers.unfilled.add((topic, partition))  # for expiry of unconsumed records
        if self.polls.waiters:
            self.polls.appended(topic, partition)

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
        appended = self.appended
        cache = appended.partitions.get((part.topic, part.partition))
        skew_ms = self._wall_skew_ms()
        # read again after every await only: nothing moves it while this loop does not
        # suspend (it was read per record loaded from the cache: 3.9 % of the broker's CPU)
        high_watermark = self._high_watermark(part)
        while part.room() > 0 and part.next_offset < high_watermark:
            if cache:
                cached = cache.pop(part.next_offset, None)
                if cached is not None:
                    appended.uncache(cached)
                    part.load(cached, record_policy(cached, state.config, skew_ms))
                    continue
                while cache:  # offsets below next_offset were read from the log meanwhile
                    oldest = next(iter(cache))
                    if oldest >= part.next_offset:
                        break
                    appended.uncache(cache.pop(oldest))
            try:
                records, read_end = await self._read_visible(part)
            except OffsetOutOfRangeError:
                part.skip_to(log_start())
                high_watermark = self._high_watermark(part)
                continue
            high_watermark = self._high_watermark(part)
            # the room is counted down, not asked per record: a load of the record at
            # next_offset takes one place (or frees some: a settled saved row), so the
            # count never overfills the window; after a gap in the offsets it is asked
            room = part.room()
            config = state.config
            # records published alike share one headers tuple (record_batch): once one
            # got PLAIN_POLICY (it depends on the headers and the config only), so do
            # the records after it with the same tuple
            plain_headers: object = None
            for record in records:
                # a read that suspends (a LogStore in a database) lets another fill of
                # this partition load the same records meanwhile: keep only what is new
                if record.offset < part.next_offset:
                    continue
                if record.offset != part.next_offset:
                    room = part.room()
                if room <= 0:
                    break  # the window filled meanwhile: read on from here next time
                room -= 1
                if record.headers is plain_headers:
                    part.load(record, PLAIN_POLICY)
                    continue
                policy = record_policy(record, config, skew_ms)
                if policy is PLAIN_POLICY:
                    plain_headers = record.headers
                part.load(record, policy)
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
            write_or_park = self.dead_letters.write_or_park
            parked = [await write_or_park(state, part, change) for change in dying]
        finally:
            for change in dying:
                part.dying.pop(change.offset, None)
        changes.extend(change for change in parked if change is not None)
        self._save_start(state, part.partition, part)
        if any(change.state in (RecordState.AVAILABLE, RecordState.DELAYED)
               for change in changes):
            self.polls.wake(state.group, state.topic)
        elif ((part.start_offset != start_before or acked or any(
                change.state in (RecordState.ACKED, RecordState.DEAD) for change in changes))
                and self.polls.waiters.get((state.group, state.topic))
                and (part.next_offset < self._high_watermark(part) or state.config.fifo)):
            # the window has room again (it moved, or records settled behind an unsettled
            # one): records not loaded yet can now be acquired by whoever is parked; in a
            # FIFO queue a settled record also frees the next one of its message group
            self.polls.wake(state.group, state.topic)


    def _maybe_ready(self, state: SharedGroupWindows) -> bool:
        """Records may be left for another acquire (a cheap over-estimate)."""
        return any(part.available or part.delayed or part.next_offset
                   < self._high_watermark(part) for part in state.partitions.values())

