"""Idempotent producer: producer ids, epochs and the last batch sequences per partition.

Owns: ``init_producer_id`` (a persisted counter; a transactional id keeps its
producer id and gets the next epoch, fencing the older instance), and the
sequence check of every batch that carries a producer id:

- epoch older than the producer's current epoch -> InvalidProducerEpochError;
- no state for the producer in the partition (never written there, or forgotten):
  any sequence starts it, as Kafka does since KIP-360;
- a newer epoch starts over: its first sequence must be 0 (else out of order);
- same base and last sequence as one of the last ``SEQUENCES_KEPT`` batches ->
  a duplicate: the caller returns the original offsets and appends nothing;
- otherwise base sequence must be last sequence + 1 (wrapping after 2^31-1),
  else OutOfOrderSequenceError (a gap or a reordering). Several nodes on one
  database (``shared_store``): this node's window may be behind the database's, so
  it answers duplicates only and leaves every other verdict on the sequence to the
  store's check under the partition's head lock.

Expiry (Kafka's ``producer.id.expiration.ms``, 1 day by default): a producer id not
used (no append, no InitProducerId) for that long, and not the producer of a live
transactional id, is forgotten with its sequences (memory and state store). A batch
from a forgotten id (at most the highest id handed out) is then taken as Kafka takes an
unknown producer: its first sequence starts the window; an id never handed out is
still UNKNOWN_PRODUCER_ID. An ``IdleExpiry`` heap keeps one entry per producer id,
checked from the broker's timer (``expire_idle``); after a restart every loaded id
counts as used at the load. Several nodes on one database (``shared_store``) keep
their producers: the database's sequences are shared.

Persistence: after an append the partition's entry and a checkpoint (the next
offset the state covers) go to the StateStore in the append's loop turn. On
open the state is loaded, batches past the recovered log end are forgotten
(``clamp_to_logs``: under fsync=interval/never the state can be durable before the
log), and the log tail past each checkpoint is re-scanned (``observe``), so a
crash between the log fsync and the SQLite commit loses nothing. Must not know: protocols, files.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

from conveyor.clock import Clock
from conveyor.errors import (
    InvalidProducerEpochError,
    InvalidRequestError,
    OutOfOrderSequenceError,
    UnknownProducerIdError,
)
from conveyor.storage.log_api import LogStore
from conveyor.storage.record_batch import split_batches
from conveyor.storage.state_store import ProducerRow, ProducerSequenceRow, StateStore

from .idle_expiry import IdleExpiry
from .log_end import LostRange, clamp

SEQUENCES_KEPT = 5  # Kafka keeps the last 5 batches (max.in.flight.requests.per.connection)
SEQUENCE_MAX = (1 << 31) - 1
EPOCH_MAX = (1 << 15) - 1  # int16
EXPIRATION_MS = 24 * 3600 * 1000  # Kafka's producer.id.expiration.ms default (1 day)
NO_PRODUCER_ID = -1
_COUNTER = "producer_id"


@dataclass(frozen=True, slots=True)
class BatchSequence:
    base_sequence: int
    last_sequence: int
    base_offset: int
    last_offset: int


@dataclass(slots=True)
class PartitionProducerEntry:
    epoch: int
    # the last SEQUENCES_KEPT appended batches, oldest first
    batches: deque[BatchSequence] = field(default_factory=lambda: deque(maxlen=SEQUENCES_KEPT))


@dataclass(frozen=True, slots=True)
class IncomingBatch:
    """What the check needs from a batch header."""

    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def last_sequence(self) -> int:
        return (self.base_sequence + self.record_count - 1) & SEQUENCE_MAX


def next_sequence(sequence: int) -> int:
    return 0 if sequence == SEQUENCE_MAX else sequence + 1


class ProducerStates:
    """Producer ids and per-(producer, topic, partition) sequence windows."""

    def __init__(self, state_store: StateStore, clock: Clock | None = None,
                 expiration_ms: int = EXPIRATION_MS) -> None:
        self._state_store = state_store
        self._clock = clock  # None: producer ids never expire (no clock to judge by)
        # producer id -> wall ms of its last use; and their idle deadlines
        self._last_used: dict[int, int] = {}
        self._idle: IdleExpiry[int] = IdleExpiry(expiration_ms)
        self._highest_id = -1  # the highest producer id handed out or loaded
        self._mapped: dict[int, str] = {}  # producer id -> its transactional id
        # producer id -> partitions it has a sequence window in (what expiry removes)
        self._partitions_of: dict[int, set[tuple[str, int]]] = {}
        self.expired = 0  # producer ids forgotten for idleness (a counter)
        # producer id -> current epoch (from init_producer_id)
        self._epochs: dict[int, int] = {}
        # transactional id -> producer id
        self._transactional: dict[str, int] = {}
        # (producer id, topic, partition) -> sequence window
        self._entries: dict[tuple[int, str, int], PartitionProducerEntry] = {}
        # Several nodes on one database (conveyor/cluster): producer ids come from the
        # database and the store checks sequences inside its append transaction, so what
        # this node has not seen (a producer or partition served elsewhere) is left to it.
        self.id_source: Callable[[], Awaitable[int]] | None = None
        self.shared_store = False
        # (topic, partition) -> checkpoint, as loaded at open (read by the recovery scan)
        self._checkpoints: dict[tuple[str, int], int] = {}

    async def load(self) -> None:
        for producer in await self._state_store.load_producers():
            self._epochs[producer.producer_id] = producer.epoch
            self._touch(producer.producer_id)
            if producer.transactional_id is not None:  # a rotated id: the newest producer
                known = self._transactional.get(producer.transactional_id, -1)
                self._map(producer.transactional_id, max(known, producer.producer_id))
        for row in await self._state_store.load_producer_sequences():
            entry = PartitionProducerEntry(row.epoch)
            entry.batches.extend(BatchSequence(*batch) for batch in row.batches)
            self._entries[(row.producer_id, row.topic, row.partition)] = entry
            self._partitions_of.setdefault(row.producer_id, set()).add((row.topic,
                                                                        row.partition))
        self._checkpoints = await self._state_store.load_producer_checkpoints()

    def checkpoints(self) -> dict[tuple[str, int], int]:
        """The checkpoints loaded at open, as clamp_to_logs left them."""
        return dict(self._checkpoints)

    def describe(self, topic: str, partition: int) -> list[tuple[int, int, int, int]]:
        """(producer id, epoch, last sequence, last offset) per producer of a partition."""
        return [
            (producer_id, entry.epoch, entry.batches[-1].last_sequence,
             entry.batches[-1].last_offset)
            for (producer_id, entry_topic, entry_partition), entry in sorted(
                self._entries.items())
            if entry_topic == topic and entry_partition == partition and entry.batches
        ]

    async def init_producer_id(self, transactional_id: str | None = None) -> tuple[int, int]:
        """A new (producer id, epoch 0), or the transactional id's producer with epoch + 1."""
        if transactional_id is not None and transactional_id in self._transactional:
            producer_id = self._transactional[transactional_id]
            epoch = self._epochs.get(producer_id, -1) + 1
            if epoch > EPOCH_MAX:  # epoch exhausted: a fresh producer id
                producer_id, epoch = self._state_store.next_counter(_COUNTER), 0
        elif self.id_source is not None:
            producer_id, epoch = await self.id_source(), 0
        else:
            producer_id, epoch = self._state_store.next_counter(_COUNTER), 0
        self._epochs[producer_id] = epoch
        self._touch(producer_id)
        if transactional_id is not None:
            self._map(transactional_id, producer_id)
        self._state_store.save_producer(ProducerRow(producer_id, epoch, transactional_id))
        await self._state_store.commit()
        return producer_id, epoch

    def _map(self, transactional_id: str, producer_id: int) -> None:
        previous = self._transactional.get(transactional_id)
        if previous is not None and self._mapped.get(previous) == transactional_id:
            del self._mapped[previous]
        self._transactional[transactional_id] = producer_id
        self._mapped[producer_id] = transactional_id

    def _touch(self, producer_id: int) -> None:
        self._highest_id = max(self._highest_id, producer_id)
        if self._clock is None:
            return
        now_ms = self._clock.wall_ms()
        self._last_used[producer_id] = now_ms
        self._idle.arm(producer_id, now_ms)

    def expire_idle(self) -> list[int]:
        """Forget the producer ids idle past ``producer.id.expiration.ms`` (only heap
        entries that came due are looked at; a live transactional id's producer stays)."""
        if self._clock is None or self.shared_store:
            return []
        now_ms = self._clock.wall_ms()
        next_ms = self._idle.next_deadline_ms()
        if next_ms is None or next_ms > now_ms:
            return []
        expired = self._idle.due(now_ms, self._idle_since)
        for producer_id in expired:
            self._epochs.pop(producer_id, None)
            self._last_used.pop(producer_id, None)
            for topic, partition in self._partitions_of.pop(producer_id, ()):
                self._entries.pop((producer_id, topic, partition), None)
            self._state_store.delete_producer(producer_id)
        self.expired += len(expired)
        return expired

    def _idle_since(self, producer_id: int) -> int | None:
        if producer_id in self._mapped:  # lives as long as its transactional id
            return self._clock.wall_ms() if self._clock is not None else None
        return self._last_used.get(producer_id)

    def forget_transactional(self, transactional_id: str, producer_id: int) -> None:
        """The transactional id expired: its producer id is no longer mapped to it (a new
        InitProducerId gets a fresh id); the producer's own state expires on its own."""
        if self._transactional.get(transactional_id) == producer_id:
            del self._transactional[transactional_id]
        if self._mapped.get(producer_id) == transactional_id:
            del self._mapped[producer_id]
        if producer_id in self._epochs:
            self._state_store.save_producer(ProducerRow(producer_id,
                                                        self._epochs[producer_id], None))
            self._touch(producer_id)

    def current_epoch(self, producer_id: int) -> int | None:
        return self._epochs.get(producer_id)

    def adopt(self, transactional_id: str, producer_id: int, epoch: int) -> None:
        """A cluster node took the transactional id over: its producer and epoch as the
        previous coordinator left them (the next InitProducerId bumps from there)."""
        self._epochs[producer_id] = max(epoch, self._epochs.get(producer_id, epoch))
        self._map(transactional_id, producer_id)
        self._touch(producer_id)

    def set_epoch(self, transactional_id: str, producer_id: int, epoch: int) -> None:
        """The coordinator bumped the epoch at a transaction end (``transaction.version``
        2): older epochs are stale from now on. Written with the caller's next commit."""
        self._epochs[producer_id] = epoch
        self._map(transactional_id, producer_id)
        self._touch(producer_id)
        self._state_store.save_producer(ProducerRow(producer_id, epoch, transactional_id))

    async def rotate(self, transactional_id: str, producer_id: int) -> tuple[int, int]:
        """The epochs of ``producer_id`` are exhausted: the transactional id moves to a
        fresh producer id at epoch 0 (the old one keeps its epochs, unmapped)."""
        new_id = (await self.id_source() if self.id_source is not None
                  else self._state_store.next_counter(_COUNTER))
        self._state_store.save_producer(ProducerRow(
            producer_id, self._epochs.get(producer_id, EPOCH_MAX), None))
        self._epochs[new_id] = 0
        self._mapped.pop(producer_id, None)
        self._map(transactional_id, new_id)
        self._touch(new_id)
        self._state_store.save_producer(ProducerRow(new_id, 0, transactional_id))
        return new_id, 0

    def check(
        self, topic: str, partition: int, batches: Sequence[IncomingBatch]
    ) -> BatchSequence | None:
        """Validate batches before an append; a BatchSequence means "duplicate of this"."""
        idempotent = [batch for batch in batches if batch.producer_id != NO_PRODUCER_ID]
        if not idempotent:
            return None
        if len(idempotent) != len(batches) or len({b.producer_id for b in batches}) != 1:
            raise InvalidRequestError(
                "batches of one append mix producers", topic=topic, partition=partition
            )
        first = idempotent[0]
        known_epoch = self._epochs.get(first.producer_id)
        entry = self._entries.get((first.producer_id, topic, partition))
        if self.shared_store and (known_epoch is None or entry is None):
            return None  # served elsewhere before: the store's own check decides
        if known_epoch is None and first.producer_id > self._highest_id:
            raise UnknownProducerIdError(
                "producer id was never allocated", producer_id=first.producer_id
            )
        if known_epoch is None:  # expired (or from before a lost state): Kafka's unknown
            _consecutive(idempotent, topic, partition)  # producer starts anew
            return None
        if first.producer_epoch < known_epoch or (
            entry is not None and first.producer_epoch < entry.epoch
        ):
            raise InvalidProducerEpochError(
                "producer epoch is stale", producer_id=first.producer_id,
                epoch=first.producer_epoch, current_epoch=max(known_epoch, entry.epoch if entry
                                                               else known_epoch),
            )
        if entry is None:  # no state for the producer in this partition: as Kafka
            _consecutive(idempotent, topic, partition)  # (KIP-360), any sequence starts it
            return None
        if entry.epoch == first.producer_epoch:
            for kept in entry.batches:
                if (kept.base_sequence == first.base_sequence
                        and kept.last_sequence == idempotent[-1].last_sequence):
                    return kept
        expected = (
            next_sequence(entry.batches[-1].last_sequence)
            if entry.epoch == first.producer_epoch and entry.batches
            else 0
        )
        if self.shared_store and first.base_sequence != expected:
            # this node's window may be behind the database: another node appended
            # since (the partition moved away and back, a retry went there), or this
            # node's own append was answered as a failure or a store-side duplicate
            # although it committed. Only the store's check, under the head lock,
            # may refuse a sequence (a false OUT_OF_ORDER_SEQUENCE_NUMBER is fatal to
            # the producer, or makes it re-send committed batches under a new epoch)
            _consecutive(idempotent, topic, partition)
            return None
        for batch in idempotent:
            if batch.base_sequence != expected:
                raise OutOfOrderSequenceError(
                    "sequence gap or reordering", producer_id=batch.producer_id,
                    topic=topic, partition=partition, expected=expected,
                    received=batch.base_sequence,
                )
            expected = next_sequence(batch.last_sequence)
        return None

    def observe(
        self,
        topic: str,
        partition: int,
        producer_id: int,
        producer_epoch: int,
        base_sequence: int,
        last_sequence: int,
        base_offset: int,
        last_offset: int,
    ) -> None:
        """Remember an appended batch (in memory; ``persist`` writes it)."""
        if producer_id == NO_PRODUCER_ID:
            return
        key = (producer_id, topic, partition)
        entry = self._entries.get(key)
        if entry is None or entry.epoch != producer_epoch:
            if entry is None:
                self._partitions_of.setdefault(producer_id, set()).add((topic, partition))
            entry = PartitionProducerEntry(producer_epoch)
            self._entries[key] = entry
        self._touch(producer_id)
        entry.batches.append(BatchSequence(base_sequence, last_sequence, base_offset, last_offset))
        if self._epochs.get(producer_id, -1) < producer_epoch:
            self._epochs[producer_id] = producer_epoch

    def persist(
        self, topic: str, partition: int, producer_ids: Iterable[int], next_offset: int
    ) -> None:
        for producer_id in set(producer_ids):
            entry = self._entries.get((producer_id, topic, partition))
            if entry is None:
                continue
            self._state_store.save_producer_sequences(
                ProducerSequenceRow(
                    producer_id, topic, partition, entry.epoch,
                    tuple((b.base_sequence, b.last_sequence, b.base_offset, b.last_offset)
                          for b in entry.batches),
                )
            )
        self._state_store.save_producer_checkpoint(topic, partition, next_offset)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop what this node knows of a partition's producers (it was served elsewhere)."""
        for key in [key for key in self._entries if key[1:] == (topic, partition)]:
            del self._entries[key]

    def clamp_to_logs(self, log_ends: dict[tuple[str, int], int],
                      lost: list[LostRange]) -> None:
        """Forget batches at or past each partition's recovered log end (a crash under
        fsync=interval/never lost them): a retry of a lost batch is appended again,
        not answered "duplicate" with offsets the log no longer holds."""
        for (producer_id, topic, partition), entry in self._entries.items():
            log_end = log_ends.get((topic, partition))
            if log_end is None or not entry.batches or entry.batches[-1].base_offset < log_end:
                continue
            clamp("producer", str(producer_id), topic, partition,
                  entry.batches[-1].last_offset + 1, log_end, lost)
            kept = [batch for batch in entry.batches if batch.base_offset < log_end]
            entry.batches.clear()
            entry.batches.extend(kept)
            self._state_store.save_producer_sequences(ProducerSequenceRow(
                producer_id, topic, partition, entry.epoch,
                tuple((b.base_sequence, b.last_sequence, b.base_offset, b.last_offset)
                      for b in entry.batches)))
        for (topic, partition), checkpoint in self.checkpoints().items():
            log_end = log_ends.get((topic, partition))
            if log_end is not None and checkpoint > log_end:
                self._state_store.save_producer_checkpoint(topic, partition, log_end)
                self._checkpoints[(topic, partition)] = log_end

    async def forget_missing(self, store: LogStore, damaged: set[tuple[str, int]],
                             lost: list[LostRange]) -> None:
        """Forget remembered batches the log no longer holds at their offsets: recovery
        set them aside (an unsynced batch a crash damaged, under fsync=interval/never,
        with valid batches after it). ``damaged``: partitions with set-aside ranges.
        A retry of such a batch is appended again instead of answered "duplicate"."""
        for (producer_id, topic, partition), entry in self._entries.items():
            if (topic, partition) not in damaged or not entry.batches:
                continue
            kept = [batch for batch in entry.batches
                    if await _holds(store, topic, partition, producer_id, batch)]
            if len(kept) == len(entry.batches):
                continue
            for batch in entry.batches:
                if batch not in kept:
                    lost.append(LostRange("producer", str(producer_id), topic, partition,
                                          batch.base_offset, batch.last_offset + 1))
            entry.batches.clear()
            entry.batches.extend(kept)
            self._state_store.save_producer_sequences(ProducerSequenceRow(
                producer_id, topic, partition, entry.epoch,
                tuple((b.base_sequence, b.last_sequence, b.base_offset, b.last_offset)
                      for b in entry.batches)))

    async def recover_from_logs(
        self, store: LogStore, partitions: Iterable[tuple[str, int]], read_bytes_max: int
    ) -> None:
        """Re-scan each partition log past its checkpoint: batches appended (durable in
        the log) whose sequences never reached the state store are remembered again."""
        checkpoints = self.checkpoints()
        for topic, partition in partitions:
            log = store.offsets(topic, partition)
            offset = max(checkpoints.get((topic, partition), 0), log.log_start_offset)
            scanned = False
            while offset < log.high_watermark:
                data = (await store.read(topic, partition, offset, read_bytes_max)).read_bytes()
                if not data:
                    break
                for _, header in split_batches(data):
                    # control batches (transaction markers) carry no sequence
                    if header.last_offset >= offset and header.producer_id >= 0 \
                            and not header.is_control:
                        self.observe(
                            topic, partition, header.producer_id, header.producer_epoch,
                            header.base_sequence,
                            (header.base_sequence + header.record_count - 1) & SEQUENCE_MAX,
                            header.base_offset, header.last_offset,
                        )
                        self.persist(topic, partition, [header.producer_id],
                                     header.last_offset + 1)
                    offset = max(offset, header.last_offset + 1)
                scanned = True
            if scanned:
                self._state_store.save_producer_checkpoint(topic, partition, offset)

    def forget_topic(self, topic: str) -> None:
        for key in [key for key in self._entries if key[1] == topic]:
            del self._entries[key]


def _consecutive(batches: Sequence[IncomingBatch], topic: str, partition: int) -> None:
    """The batches of one append follow each other (from any first sequence)."""
    expected = batches[0].base_sequence
    for batch in batches:
        if batch.base_sequence != expected:
            raise OutOfOrderSequenceError(
                "sequence gap or reordering", producer_id=batch.producer_id,
                topic=topic, partition=partition, expected=expected,
                received=batch.base_sequence)
        expected = next_sequence(batch.last_sequence)


async def _holds(store: LogStore, topic: str, partition: int, producer_id: int,
                 batch: BatchSequence) -> bool:
    """Whether the log's batch at ``batch.base_offset`` is this producer's batch (a read
    there skips a set-aside batch, so a later batch comes back instead)."""
    log = store.offsets(topic, partition)
    if not log.log_start_offset <= batch.base_offset < log.high_watermark:
        return bool(batch.base_offset < log.log_start_offset)  # below the start: retention
    data = (await store.read(topic, partition, batch.base_offset, 1)).read_bytes()
    if not data:
        return False
    _, header = split_batches(data)[0]
    return (header.base_offset == batch.base_offset and header.producer_id == producer_id
            and header.base_sequence == batch.base_sequence)
