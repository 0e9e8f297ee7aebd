"""Goal: compacting a topic that holds committed and aborted transactions never exposes an
aborted record, to read_committed or read_uncommitted readers: the cleaner drops aborted
records first (they never shadow a committed value of their key), keeps the COMMIT
markers of transactions that still have records and every ABORT marker, removes the
other COMMIT markers after delete.retention.ms, and leaves an open transaction alone.

Method: raw Kafka requests (TV1: AddPartitionsToTxn, Produce, EndTxn) against one broker
with a compacted topic of tiny segments; one retention/compaction pass; Fetch at both
isolation levels, with the records filtered as a Kafka client does (control batches
skipped; read_committed also drops the batches of the aborted transactions the broker
lists), compared with the latest committed value of every key.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.fetch.v12.request import FetchPartition, FetchRequest, FetchTopic
from kio.schema.produce.v9.request import PartitionProduceData, ProduceRequest, TopicProduceData
from test_kafka_txn_wire import add, end, init
from test_kafka_wire import RawClient, connect

from conveyor.clock import SystemClock
from conveyor.server.app import Server
from conveyor.storage.record_batch import RecordData, build_batch, decode_records, split_batches
from conveyor.testing import server as testing_server

CONFIG = {"cleanup.policy": "compact", "segment.bytes": "200", "delete.retention.ms": "0"}


class ShiftedClock(SystemClock):
    """The real clocks, the wall clock moved forward by ``shift_ms`` when a test says."""

    shift_ms = 0

    def wall_ms(self) -> int:
        return super().wall_ms() + self.shift_ms


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    running = Server(testing_server.test_config(tmp_path / "data", ("kafka",)),
                     clock=ShiftedClock())
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def produce(client: RawClient, transactional_id: str, producer: tuple[int, int],
                  sequence: int, pairs: list[tuple[bytes, bytes]]) -> None:
    batch = build_batch([RecordData(key, value, (), 1000) for key, value in pairs],
                        producer_id=producer[0], producer_epoch=producer[1],
                        base_sequence=sequence, is_transactional=True)
    answer = await client.call(ProduceRequest(
        transactional_id=transactional_id, acks=-1, timeout=datetime.timedelta(seconds=5),
        topic_data=(TopicProduceData(name="c-txn", partition_data=(
            PartitionProduceData(index=0, records=batch),)),)))
    assert answer.responses[0].partition_responses[0].error_code == 0


async def transaction(client: RawClient, producer: tuple[int, int], sequence: int,
                      pairs: list[tuple[bytes, bytes]], commit: bool) -> int:
    assert await add(client, "compactor", producer, "c-txn", 0) == {0: 0}
    await produce(client, "compactor", producer, sequence, pairs)
    assert await end(client, "compactor", producer, commit) == 0
    return sequence + len(pairs)


async def fetch(client: RawClient, isolation: int) -> tuple[list[tuple[bytes, bytes]],
                                                          list[Any], int]:
    """What a Kafka client hands its application (reading until nothing more comes), the
    headers of every batch fetched, and how many aborted transactions it was told of."""
    seen: list[tuple[bytes, bytes]] = []
    headers: list[Any] = []
    told = 0
    offset = 0
    dropping: set[int] = set()
    while True:
        answer = await client.call(FetchRequest(
            replica_id=-1, max_wait=datetime.timedelta(0), min_bytes=0, max_bytes=1 << 20,
            isolation_level=isolation, session_id=0, session_epoch=-1, rack_id="",
            topics=(FetchTopic(topic="c-txn", partitions=(FetchPartition(
                partition=0, current_leader_epoch=-1, fetch_offset=offset,
                last_fetched_epoch=-1, log_start_offset=-1,
                partition_max_bytes=1 << 20),)),), forgotten_topics_data=()))
        partition = answer.responses[0].partitions[0]
        data = bytes(partition.records or b"")
        if not data:
            return seen, headers, told
        aborted = sorted((int(a.first_offset), int(a.producer_id))
                         for a in partition.aborted_transactions or ())
        told += len(aborted)
        for position, header in split_batches(data):
            headers.append(header)
            offset = header.last_offset + 1
            while aborted and aborted[0][0] <= header.base_offset:
                dropping.add(aborted.pop(0)[1])
            if header.is_control:
                dropping.discard(header.producer_id)  # the ABORT marker ends its range
                continue
            if header.is_transactional and header.producer_id in dropping:
                continue
            seen += [(r.key, r.value) for r in decode_records(data, position)
                     if r.key is not None and r.value is not None]


async def test_compaction_drops_aborted_records_and_spent_markers(server: Server) -> None:
    await server.broker.create_topic("c-txn", 1, CONFIG)
    client = await connect(server)
    producer = await init(client, "compactor")
    sequence = await transaction(client, producer, 0, [(b"a", b"a1"), (b"b", b"b1")], True)
    sequence = await transaction(client, producer, sequence,
                                 [(b"a", b"a-aborted"), (b"c", b"c-aborted")], False)
    sequence = await transaction(client, producer, sequence, [(b"b", b"b2")], True)
    sequence = await transaction(client, producer, sequence, [(b"b", b"b-aborted")], False)
    sequence = await transaction(client, producer, sequence, [(b"b", b"b3")], True)
    sequence = await transaction(client, producer, sequence, [(b"d", b"d1")], True)
    # an open transaction at the end: never cleaned, never shadowing
    assert await add(client, "compactor", producer, "c-txn", 0) == {0: 0}
    await produce(client, "compactor", producer, sequence, [(b"d", b"d-open")])
    before_uncommitted, _, _ = await fetch(client, 0)
    assert (b"a", b"a-aborted") in before_uncommitted  # what compaction must remove
    # markers are stamped with the wall clock: a minute later, delete.retention.ms=0 has
    # passed for every one of them (the cleaner compares strictly)
    assert isinstance(server.clock, ShiftedClock)
    server.clock.shift_ms = 60_000
    await server.broker.run_retention()
    # PostgreSQL compacts in the background from run_retention: one pass now, awaited
    # (on files the pass above already compacted; a second finds nothing more to do)
    await server.broker.log_store.compact("c-txn", 0)
    expected = [(b"a", b"a1"), (b"b", b"b3"), (b"d", b"d1")]
    committed, _, told = await fetch(client, 1)
    assert committed == expected
    assert told > 0  # the aborted transactions are still listed (their markers end them)
    uncommitted, headers, _ = await fetch(client, 0)
    assert uncommitted == [*expected, (b"d", b"d-open")]
    # data: a1 @0, b3 @10, d1 @12 and the open d-open @14; markers: the first commit's
    # stays (a1 survives), the aborted ones stay (5, 9), the commit whose only record
    # b2 @6 was shadowed by b3 is gone (7), the later commits stay (11, 13)
    assert [(header.base_offset, header.is_control) for header in headers] == [
        (0, False), (2, True), (5, True), (9, True), (10, False), (11, True), (12, False),
        (13, True), (14, False)]
    assert await end(client, "compactor", producer, True) == 0
    committed, _, _ = await fetch(client, 1)
    assert committed == [*expected, (b"d", b"d-open")]
    client.close()
