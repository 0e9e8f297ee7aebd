"""Goal: no Kafka request can make the broker allocate more than the bytes it sent.

Method: a real ``conveyor serve`` process (kio's native reader aborted the whole process
with SIGABRT on these frames: ``memory allocation of 263641566400 bytes failed``). Each
frame is a few dozen bytes whose array count or string length claims far more; after
each one the connection must be closed or answered, the process must still run, and a
normal client (confluent-kafka) must still produce and read back a record.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, Producer

from conveyor.testing.server import BrokerProcess

TIMEOUT_S = 10.0


def frame(api_key: int, version: int, body: bytes, flexible: bool = False) -> bytes:
    header = struct.pack(">hhih", api_key, version, 7, 4) + b"evil"
    if flexible:
        header += b"\x00"  # header tagged fields
    payload = header + body
    return struct.pack(">i", len(payload)) + payload


HOSTILE = {
    # CreateTopics v2: topics array of 2**31-1 entries, then nothing.
    "create_topics_count": frame(19, 2, struct.pack(">i", 0x7FFFFFFF) + b"\x00" * 16),
    # Produce v3: transactional_id null, acks, timeout, then topic_data of 2**31-1 entries.
    "produce_count": frame(0, 3, struct.pack(">hhii", -1, 1, 1000, 0x7FFFFFFF) + b"\x00" * 8),
    # Produce v3 with one topic whose partitions array claims 2**31-1 entries.
    "produce_partitions": frame(0, 3, struct.pack(">hhiih", -1, 1, 1000, 1, 1) + b"t"
                                + struct.pack(">i", 0x7FFFFFFF) + b"\x00" * 8),
    # Metadata v12 (flexible): topics compact array claiming 2**32 entries (varint).
    "metadata_compact_count": frame(3, 12, b"\xff\xff\xff\xff\x0f" + b"\x00" * 4, True),
    # CreateTopics v5 (flexible): a topic name string claiming 2**28 bytes.
    "create_topics_string": frame(19, 5, b"\x02" + b"\xff\xff\xff\x7f" + b"x" * 8, True),
    # Produce v3: null topic_data (a non-nullable array), null partitions inside.
    "produce_null_topics": frame(0, 3, struct.pack(">hhii", -1, 1, 1000, -1)),
    "produce_null_partitions": frame(0, 3, struct.pack(">hhiih", -1, 1, 1000, 1, 1) + b"t"
                                     + struct.pack(">i", -1)),
    # ListOffsets v1 and CreatePartitions v0 with null topics.
    "list_offsets_null_topics": frame(2, 1, struct.pack(">ii", -1, -1)),
    "create_partitions_null_topics": frame(37, 0, struct.pack(">i", -1) + struct.pack(">ib",
                                                                                      1000, 0)),
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    process = BrokerProcess(tmp_path_factory.mktemp("hostile") / "data", listeners=("kafka",))
    process.start()
    try:
        yield process
    finally:
        process.kill()


def send_and_wait_for_close_or_answer(port: int, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        while connection.recv(65536):  # an answer, then the close; or the close at once
            pass


def round_trip(port: int, topic: str) -> bytes | None:
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{port}", "acks": "all"})
    producer.produce(topic, b"still serving")
    assert producer.flush(TIMEOUT_S) == 0
    consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{port}", "group.id": topic,
                         "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        message = consumer.poll(TIMEOUT_S)
        return None if message is None else message.value()
    finally:
        consumer.close()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_frame_leaves_the_process_serving(broker: BrokerProcess, name: str) -> None:
    send_and_wait_for_close_or_answer(broker.ports["kafka"], HOSTILE[name])
    assert broker.process is not None and broker.process.poll() is None, broker.log_path.read_text()
    assert round_trip(broker.ports["kafka"], f"after-{name}") == b"still serving"
    log = broker.log_path.read_text()
    assert "Traceback" not in log, log
    assert "memory allocation" not in log


def test_log_names_the_refusal(broker: BrokerProcess) -> None:
    send_and_wait_for_close_or_answer(broker.ports["kafka"], HOSTILE["produce_count"])
    assert broker.process is not None and broker.process.poll() is None
    assert round_trip(broker.ports["kafka"], "after-log-check") == b"still serving"
    log = broker.log_path.read_text()
    assert "array count larger than the bytes that came with it" in log
    assert "field='topic_data'" in log
