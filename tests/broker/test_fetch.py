"""Goal: fetch long-polls: it returns at once when data is there, is woken by an
append (not by polling), and gives up after wait_ms on the Clock.

Method: start a fetch at the high watermark as a task, check it is still waiting,
append, and see it finish without the clock moving; then a fetch that times out when
the SimClock advances."""

from __future__ import annotations

import asyncio

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.types import HEADER_PRIORITY, Message
from conveyor.errors import OffsetOutOfRangeError, RecordTooLargeError
from conveyor.storage.record_batch import RecordData, build_batch, iter_records


async def test_fetch_woken_by_append(broker: Broker) -> None:
    await broker.create_topic("t")
    waiting = asyncio.create_task(broker.fetch("t", 0, 0, 1 << 20, wait_ms=10_000))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    await broker.publish("t", [Message(b"hello")])
    data, offsets = await asyncio.wait_for(waiting, timeout=5)
    assert offsets.high_watermark == 1
    assert [r.value for r in iter_records(data.read_bytes())] == [b"hello"]


async def test_fetch_times_out_on_the_clock(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    waiting = asyncio.create_task(broker.fetch("t", 0, 0, 1 << 20, wait_ms=500))
    for _ in range(10):  # let the fetch reach its sleep on the clock
        await asyncio.sleep(0)
    harness.clock.advance(499)
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done()
    harness.clock.advance(1)
    data, _ = await asyncio.wait_for(waiting, timeout=5)
    assert data.size_bytes == 0


async def test_wait_for_append_across_partitions(broker: Broker) -> None:
    await broker.create_topic("t", 3)
    waiting = asyncio.create_task(broker.wait_for_append([("t", 0), ("t", 2)], 10_000))
    await asyncio.sleep(0)
    await broker.publish("t", [Message(b"x")], partition=1)
    await asyncio.sleep(0)
    assert not waiting.done()
    await broker.publish("t", [Message(b"y")], partition=2)
    assert await asyncio.wait_for(waiting, timeout=5) is True


async def test_read_records_and_reserved_headers(broker: Broker) -> None:
    await broker.create_topic("t")
    await broker.publish("t", [
        Message(b"a", priority=7, deliver_at_ms=5, expires_at_ms=9, dedup_id="d",
                message_group="g", headers=(("h", b"1"),)),
        Message(b"b"), Message(b"c"),
    ])
    records = await broker.read_records("t", 0, 1, 1)
    assert [r.offset for r in records] == [1]
    first = (await broker.read_records("t", 0, 0, 10))[0]
    assert dict(first.headers) == {
        "h": b"1", HEADER_PRIORITY: b"7", "conveyor.deliver-at": b"5",
        "conveyor.expires-at": b"9", "conveyor.dedup-id": b"d", "conveyor.group": b"g"}
    with pytest.raises(OffsetOutOfRangeError):
        await broker.read_records("t", 0, 4, 1)


async def test_limits_and_bad_batches_append_nothing(broker: Broker) -> None:
    await broker.create_topic("small", 1, {"max.message.bytes": "200"})
    with pytest.raises(RecordTooLargeError):
        await broker.publish("small", [Message(b"x" * 500)])
    big = build_batch([RecordData(None, b"x" * 500, (), 0)])
    with pytest.raises(RecordTooLargeError):
        await broker.append_batch("small", 0, big)
    corrupt = bytearray(build_batch([RecordData(None, b"ok", (), 0)]))
    corrupt[-1] ^= 0xFF
    good = build_batch([RecordData(None, b"ok", (), 0)])
    from conveyor.errors import CorruptRecordError

    with pytest.raises(CorruptRecordError):
        await broker.append_batch("small", 0, good + bytes(corrupt))
    assert broker.offsets("small", 0).high_watermark == 0
    # many small messages that together exceed the limit are split into batches
    results = await broker.publish("small", [Message(b"y" * 50) for _ in range(10)])
    assert [r.offset for r in results] == list(range(10))


async def test_background_retention_runs_on_the_clock(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("old", 1, {"segment.bytes": "200", "retention.ms": "1000"})
    stale_ms = harness.clock.wall_ms() - 60_000
    for index in range(5):
        await broker.publish("old", [Message(b"x" * 100, timestamp_ms=stale_ms + index)])
    assert broker.offsets("old", 0).log_start_offset == 0
    for _ in range(broker.config.retention_check_interval_ms // 100 + 2):
        harness.clock.advance(100)
        for _ in range(3):
            await asyncio.sleep(0)
    offsets = broker.offsets("old", 0)
    assert offsets.log_start_offset == 4 and offsets.high_watermark == 5


async def test_close_ends_a_waiting_fetch(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("t")
    waiting = asyncio.create_task(broker.fetch("t", 0, 0, 1 << 20, wait_ms=10_000))
    for _ in range(5):
        await asyncio.sleep(0)
    broker = await harness.restart()
    from conveyor.errors import UnavailableError

    with pytest.raises(UnavailableError):
        await asyncio.wait_for(waiting, timeout=5)
    await broker.publish("t", [Message(b"after")])
    assert broker.offsets("t", 0).high_watermark == 1
