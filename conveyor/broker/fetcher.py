"""Fetcher: reads of partition logs and the waits for new appends.

Owns: fetch (whole batches, long-polling up to ``fetch_wait_ms_max``), decoded reads
(``read_records``, with the last decoded batch per partition kept), offset lookups,
and the waiters woken by ``wake`` when a partition gets an append.
May call: the topic registry (partition logs) and the clock. Nothing calls back up:
the producer's append notification reaches ``wake`` through the facade's wiring.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from conveyor.clock import Clock
from conveyor.errors import CorruptRecordError, OffsetOutOfRangeError
from conveyor.storage.log_api import LogSlice
from conveyor.storage.record_batch import Record, decode_records, split_batches

from .broker_config import BrokerConfig, Gate
from .stats import TrafficCounters
from .topics import TopicRegistry
from .types import PartitionOffsets

READ_CHUNK_BYTES = 256 * 1024  # read_records: bytes per fetch (a whole batch at least)
DECODED_BATCHES_MAX = 256  # read_records: partitions whose last decoded batch is kept


class Fetcher:
    def __init__(self, topics: TopicRegistry, clock: Clock, config: BrokerConfig,
                 gate: Gate, traffic: TrafficCounters) -> None:
        self.topics = topics
        self.traffic = traffic  # records and bytes out per partition (metrics)
        self.clock = clock
        self.config = config
        self.gate = gate
        # (topic, partition) -> fetches waiting for an append
        self._append_waiters: dict[tuple[str, int], list[asyncio.Future[None]]] = {}
        # (topic, partition) -> (base offset, crc, records) of the batch decoded last
        self._decoded: dict[tuple[str, int], tuple[int, int, list[Record]]] = {}

    def offsets(self, topic: str, partition: int) -> PartitionOffsets:
        log = self.topics.offsets(topic, partition)
        return PartitionOffsets(log.log_start_offset, log.high_watermark)

    async def offset_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> int | None:
        """First offset with timestamp >= timestamp_ms; None when there is none.

        Kafka's special values: -1 = latest (high watermark), -2 = earliest.
        """
        log = self.topics.offsets(topic, partition)
        if timestamp_ms == -1:
            return log.high_watermark
        if timestamp_ms == -2:
            return log.log_start_offset
        found = await self.topics.log_store.record_for_timestamp(topic, partition, timestamp_ms)
        return None if found is None else found[0]

    async def record_for_timestamp(self, topic: str, partition: int,
                                   timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, the record's own timestamp) of the first record at or after
        ``timestamp_ms`` (>= 0), or None: what Kafka's ListOffsets answers."""
        self.topics.check_partition(topic, partition)
        return await self.topics.log_store.record_for_timestamp(topic, partition, timestamp_ms)

    async def fetch(
        self, topic: str, partition: int, offset: int, bytes_max: int, wait_ms: int = 0,
        bytes_min: int = 1,
    ) -> tuple[LogSlice, PartitionOffsets]:
        """Whole batches from ``offset``; waits up to wait_ms for bytes_min bytes."""
        data, offsets = await self._fetch(topic, partition, offset, bytes_max, wait_ms,
                                          bytes_min)
        if data.size_bytes:
            self.traffic.partition(topic, partition).bytes_out += data.size_bytes
        return data, offsets

    async def _fetch(
        self, topic: str, partition: int, offset: int, bytes_max: int, wait_ms: int,
        bytes_min: int,
    ) -> tuple[LogSlice, PartitionOffsets]:
        deadline_ms = self.clock.monotonic_ms() + min(wait_ms, self.config.fetch_wait_ms_max)
        while True:
            self.gate.check()
            self.topics.check_partition(topic, partition)
            store = self.topics.log_store
            data = await store.read(topic, partition, offset, bytes_max)
            remaining_ms = deadline_ms - self.clock.monotonic_ms()
            if data.size_bytes >= bytes_min or remaining_ms <= 0:
                log = store.offsets(topic, partition)
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
        try:
            async with asyncio.TaskGroup() as group:
                sleeper = group.create_task(self.clock.sleep_ms(max(0, wait_ms)))
                await asyncio.wait([waiter, sleeper], return_when=asyncio.FIRST_COMPLETED)
                sleeper.cancel()
            return waiter.done()
        finally:
            for key in keys:
                waiters = self._append_waiters.get(key)
                if waiters is not None:
                    with contextlib.suppress(ValueError):
                        waiters.remove(waiter)
                    if not waiters:
                        del self._append_waiters[key]

    def wake(self, key: tuple[str, int]) -> None:
        """A partition got an append (or went away): every wait on it returns."""
        for waiter in self._append_waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(None)

    def wake_all(self) -> None:
        for waiters in self._append_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def read_records(
        self, topic: str, partition: int, offset: int, records_max: int, wait_ms: int = 0,
        counted: bool = True,
    ) -> list[Record]:
        """Decoded records from ``offset`` (at most records_max), waiting like fetch.

        Reads in chunks of ``READ_CHUNK_BYTES`` (a whole batch at least) until it has
        ``records_max`` records, and keeps the last batch decoded per partition: queue
        consumers read a batch a few hundred records at a time, decoding it once.
        """
        records: list[Record] = []
        position = offset
        chunk_bytes = min(self.config.read_bytes_max, READ_CHUNK_BYTES)
        while len(records) < records_max:
            data, offsets = await self._fetch(
                topic, partition, position, chunk_bytes, wait_ms if not records else 0, 1)
            if position < offsets.log_start_offset:
                raise OffsetOutOfRangeError(
                    "offset below log start", offset=position,
                    log_start_offset=offsets.log_start_offset,
                )
            raw = data.read_bytes()
            if not raw:
                break
            position = self._take_records(topic, partition, raw, position, records,
                                          records_max)
            if position >= offsets.high_watermark:
                break
        if counted and records:  # False: the broker's own reads (shared-group windows)
            self.traffic.partition(topic, partition).records_out += len(records)
        return records

    def _take_records(self, topic: str, partition: int, raw: bytes, position: int,
                      records: list[Record], records_max: int) -> int:
        """Append the records of ``raw`` from ``position`` on; the position after them."""
        key = (topic, partition)
        for batch_position, header in split_batches(raw):
            cached = self._decoded.get(key)
            if cached is not None and cached[0] == header.base_offset \
                    and cached[1] == header.crc:
                batch = cached[2]
            else:
                try:
                    batch = decode_records(raw, batch_position)
                except CorruptRecordError as error:
                    # CRC-valid but undecodable: set aside (logged once, skipped by every
                    # reader) instead of failing this read forever
                    self.topics.log_store.set_aside(topic, partition, header.base_offset,
                                                    f"undecodable: {error}")
                    batch = []
                self._decoded.pop(key, None)
                if len(self._decoded) >= DECODED_BATCHES_MAX:
                    self._decoded.pop(next(iter(self._decoded)))
                self._decoded[key] = (header.base_offset, header.crc, batch)
            for record in batch:
                if record.offset >= position and len(records) < records_max:
                    records.append(record)
            position = max(position, header.base_offset + header.last_offset_delta + 1)
        return position
