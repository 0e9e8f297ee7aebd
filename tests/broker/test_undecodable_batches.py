"""A batch whose CRC holds but whose records cannot be decoded (issue 9, suspicion 6).

Goal: such a batch never wedges a reader. A queue refuses it at ingress (its
consumers decode every record); a plain topic accepts it (the Kafka path only checks
CRCs), and the first reader that decodes records sets it aside: logged once, counted,
skipped by record readers, shared groups and Kafka fetches alike. Method: Kafka-style
batches built with a valid CRC over broken records, appended through
``Broker.append_batch`` as a Kafka produce would.
"""

from __future__ import annotations

import logging
import struct

import crc32c
import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.types import Message
from conveyor.errors import CorruptRecordError
from conveyor.storage.record_batch import CRC_START, RecordData, build_batch, iter_records


def batch(values: list[bytes]) -> bytes:
    return build_batch([RecordData(None, value) for value in values])


def resealed(data: bytearray) -> bytes:
    """The batch with a CRC computed over whatever it now holds."""
    data[17:21] = struct.pack(">I", crc32c.crc32c(bytes(data[CRC_START:])))
    return bytes(data)


def record_length_past_the_body(values: list[bytes]) -> bytes:
    data = bytearray(batch(values))
    data[61] = 0x7E  # the first record's length varint: 63 bytes, past the batch end
    return resealed(data)


def unknown_codec(values: list[bytes]) -> bytes:
    data = bytearray(batch(values))
    data[22] |= 5  # attributes: compression codec 5 does not exist
    return resealed(data)


def offsets_out_of_order(values: list[bytes]) -> bytes:
    data = bytearray(batch(values))
    data[64] = 0x02  # the first record's offset delta: 1 (the second's is 1 too)
    return resealed(data)


BROKEN = [record_length_past_the_body, unknown_codec, offsets_out_of_order]


@pytest.mark.parametrize("broken", BROKEN)
async def test_queue_refuses_an_undecodable_batch_at_ingress(
    broker: Broker, broken: object,
) -> None:
    assert callable(broken) and broker.shared_groups is not None
    await broker.shared_groups.declare_queue("jobs")
    await broker.publish("jobs", [Message(b"before")])
    with pytest.raises(CorruptRecordError):
        await broker.append_batch("jobs", 0, broken([b"x", b"y"]))
    await broker.publish("jobs", [Message(b"after")])
    got = await broker.shared_groups.acquire("jobs", "jobs", records_max=10, lock_ms=1_000)
    assert [(d.offset, d.value) for d in got] == [(0, b"before"), (1, b"after")]


async def test_unknown_codec_is_refused_by_every_topic(broker: Broker) -> None:
    await broker.create_topic("events")
    with pytest.raises(CorruptRecordError, match="unknown compression codec"):
        await broker.append_batch("events", 0, unknown_codec([b"x"]))


@pytest.mark.parametrize("broken", [record_length_past_the_body, offsets_out_of_order])
async def test_reader_sets_an_undecodable_batch_aside_once(
    broker: Broker, broken: object, caplog: pytest.LogCaptureFixture,
) -> None:
    assert callable(broken) and broker.shared_groups is not None
    await broker.create_topic("events")
    await broker.append_batch("events", 0, batch([b"a"]))
    await broker.append_batch("events", 0, broken([b"x", b"y"]))  # offsets 1, 2
    await broker.append_batch("events", 0, batch([b"b"]))
    await broker.append_batch("events", 0, broken([b"z"]))  # offset 4: the last batch
    await broker.create_shared_group("events", "workers", start="earliest")
    with caplog.at_level(logging.ERROR, logger="conveyor.storage.partition_log"):
        for _ in range(3):  # not wedged, and not logged again on every read
            records = await broker.read_records("events", 0, 0, 100)
            assert [(r.offset, r.value) for r in records] == [(0, b"a"), (3, b"b")]
        got = await broker.shared_groups.acquire("events", "workers", records_max=10,
                                                 lock_ms=1_000)
        assert [(d.offset, d.value) for d in got] == [(0, b"a"), (3, b"b")]
        again = await broker.shared_groups.acquire("events", "workers", records_max=10,
                                                   lock_ms=1_000)
        assert again == []
    lines = [r for r in caplog.records if "corrupt batch" in r.getMessage()]
    assert [(r.first_offset, r.next_offset) for r in lines] == [(1, 3), (4, 5)]  # type: ignore[attr-defined]
    assert all("undecodable" in r.reason for r in lines)  # type: ignore[attr-defined]
    log = broker.log_store.partition("events", 0)  # type: ignore[attr-defined]
    assert log.damaged_batches == 2
    # a Kafka fetch now skips the set-aside batches too
    offset, values = 0, []
    while offset < log.high_watermark:
        data, _ = await broker.fetch("events", 0, offset, 1 << 20)
        records = [r for r in iter_records(data.read_bytes()) if r.offset >= offset]
        if not records:
            break
        values += [(r.offset, r.value) for r in records]
        offset = records[-1].offset + 1
    assert values == [(0, b"a"), (3, b"b")]
