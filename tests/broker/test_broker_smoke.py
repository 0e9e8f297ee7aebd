"""Goal: the facade's core path works end to end on the real FileLogStore.

Method: create a topic, publish, append a raw batch, fetch and read records back,
then restart and check everything is still there."""

from __future__ import annotations

from broker_harness import BrokerHarness

from conveyor.broker.types import Message
from conveyor.storage.record_batch import RecordData, build_batch, iter_records


async def test_publish_fetch_and_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    info = await broker.create_topic("orders", partitions=2)
    assert info.partitions == 2
    results = await broker.publish("orders", [Message(b"v1", key=b"k"), Message(b"v2", key=b"k")])
    assert [r.offset for r in results] == [0, 1]
    assert results[0].partition == results[1].partition
    raw = build_batch([RecordData(b"k2", b"raw", (), harness.clock.wall_ms())])
    appended = await broker.append_batch("orders", 1 - results[0].partition, raw)
    assert appended.base_offset == 0
    records = await broker.read_records("orders", results[0].partition, 0, 10)
    assert [r.value for r in records] == [b"v1", b"v2"]
    data, offsets = await broker.fetch("orders", results[0].partition, 1, 1 << 20)
    assert offsets.high_watermark == 2
    assert [r.value for r in iter_records(data.read_bytes())][-1] == b"v2"
    broker = await harness.restart()
    assert broker.get_topic("orders").partitions == 2
    records = await broker.read_records("orders", results[0].partition, 0, 10)
    assert [r.value for r in records] == [b"v1", b"v2"]
