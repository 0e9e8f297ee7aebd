"""A flipped bit in a sealed segment never wedges a real server (issue 9 item 5).

Goal: after one bit flips inside a sealed segment while Conveyor is stopped, HTTP
reads of the partition, every acquire on the queue and a Kafka consumer all skip the
damaged batch and go on with the rest; the log names the file, the position and the
skipped offsets once. Method: a real ``conveyor serve`` (HTTP + Kafka), a topic and
a queue with 1 KiB segments filled one record per batch over HTTP, stop, flip a bit
in the middle of the first segment of each, start again and read everything back
through each protocol.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from conveyor.client.sync import Client
from conveyor.storage.record_batch import read_header
from conveyor.testing.server import BrokerProcess

COUNT = 40
PAD = "-" * 100  # ~170-byte batches: several sealed 1 KiB segments


def value(index: int) -> bytes:
    return f"m{index:03d}{PAD}".encode()


def flip_third_batch(segment: Path) -> int:
    """Flip one bit inside the third batch of ``segment``; its base offset."""
    data = bytearray(segment.read_bytes())
    position = 0
    for _ in range(2):
        position += read_header(data, position).size_bytes
    damaged = read_header(data, position).base_offset
    data[position + 80] ^= 0x10  # inside the record: the CRC no longer matches
    segment.write_bytes(bytes(data))
    return damaged


def kafka_values(port: int, topic: str, expected: int) -> list[bytes]:
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": "readers",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    values: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(values) < expected and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None:
            assert message.error() is None, message.error()
            values.append(message.value())
    consumer.close()
    return values


def test_flipped_bit_in_sealed_segments_is_skipped_by_every_reader(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = BrokerProcess(data_dir, listeners=("http", "kafka"))
    with process:
        with Client(f"http://127.0.0.1:{process.ports['http']}") as client:
            client.create_topic("events", config={"segment.bytes": "1024"})
            client.create_queue("jobs")
            client.alter_topic("jobs", set={"segment.bytes": "1024"})
            for index in range(COUNT):
                client.publish("events", value(index).decode())
                client.publish("jobs", value(index).decode())
    segments = {name: sorted((data_dir / "logs" / f"{name}-0").glob("*.log"))
                for name in ("events", "jobs")}
    assert all(len(found) >= 3 for found in segments.values()), segments
    damaged = {name: flip_third_batch(found[0]) for name, found in segments.items()}
    expected = {name: [value(i) for i in range(COUNT) if i != damaged[name]]
                for name in damaged}

    with process:
        with Client(f"http://127.0.0.1:{process.ports['http']}") as client:
            got: list[bytes] = []
            offsets = {0: 0}
            for _ in range(COUNT):  # reads go on past the damage, never a 4xx/5xx
                result = client.fetch("events", offsets=offsets, limit=7)
                got += [message.value for message in result.messages]
                if result.next_offsets == offsets:
                    break
                offsets = result.next_offsets
            assert got == expected["events"]
            for _ in range(2):  # acquires are not wedged either
                messages = client.acquire("jobs", limit=100)
                assert sorted(m.value for m in messages) == expected["jobs"]
                client.release("jobs", "jobs", [m.receipt for m in messages])
        assert kafka_values(process.ports["kafka"], "events", COUNT - 1) == expected["events"]
        # and the damage is visible to operators: one set-aside batch per partition
        scraped = httpx.get(f"http://127.0.0.1:{process.ports['http']}/metrics").text
        for name in ("events", "jobs"):
            sample = f'conveyor_partition_damaged_batches{{partition="0",topic="{name}"}} 1.0'
            assert sample in scraped, [line for line in scraped.splitlines()
                                       if "damaged" in line]
    log = process.log_path.read_text()
    for name, found in segments.items():
        lines = [line for line in log.splitlines()
                 if "corrupt batch" in line and str(found[0]) in line]
        assert len(lines) == 1, lines  # once per damaged batch, with its file
        assert f"first_offset={damaged[name]}" in lines[0] or \
            f'"first_offset": {damaged[name]}' in lines[0], lines[0]
