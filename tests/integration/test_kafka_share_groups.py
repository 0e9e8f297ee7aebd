"""Goal: confluent-kafka's ShareConsumer (KIP-932) works against Conveyor's share groups,
and a share group is the same shared group AMQP consumers use.

Method: one BrokerThread per module; every test has its own topic and group, whose
configs it sets with AdminClient.incremental_alter_configs on a GROUP resource (as
Kafka's own tools do). Consumers poll until what the test expects arrived or a
deadline passed; absence (nothing redelivered) is checked by polling a short while.
Covers implicit and explicit acknowledgement (ACCEPT / RELEASE / REJECT), redelivery
after the lock expires, the delivery-count limit dead-lettering to "<group>.dlq",
three consumers sharing one partition with no record delivered twice, a share
consumer and a pika consumer splitting one queue, the admin calls on the group, and a
partition replayed after AlterShareGroupOffsets moved the group's start back.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest
from confluent_kafka import AcknowledgeType, Message, Producer, ShareConsumer
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    ResourceType,
)
from kio.schema.alter_share_group_offsets.v0.request import (
    AlterShareGroupOffsetsRequest,
    AlterShareGroupOffsetsRequestPartition,
    AlterShareGroupOffsetsRequestTopic,
)

from conveyor.broker.types import HEADER_DEAD_REASON
from conveyor.broker.types import Message as BrokerMessage
from conveyor.testing.server import BrokerThread
from tests.protocols.kafka.kafka_wire import parse_response, request_frame

WAIT_S = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("share") / "data"
    with BrokerThread(Path(data), listeners=("kafka", "amqp")) as running:
        yield running


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def set_group_configs(server: BrokerThread, group: str, **configs: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(server)})
    entries = [ConfigEntry(name.replace("_", "."), value,
                           incremental_operation=AlterConfigOpType.SET)
               for name, value in configs.items()]
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=entries)
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=WAIT_S)


def produce(server: BrokerThread, topic: str, count: int, partitions: int = 1) -> None:
    server.call(lambda: server.server.broker.create_topic(topic, partitions))
    producer = Producer({"bootstrap.servers": bootstrap(server), "linger.ms": 5})
    for index in range(count):
        producer.produce(topic, f"v{index}".encode(), key=f"k{index}".encode())
    assert producer.flush(WAIT_S) == 0


def consumer(server: BrokerThread, group: str, topic: str, **extra: Any) -> ShareConsumer:
    share = ShareConsumer({"bootstrap.servers": bootstrap(server), "group.id": group,
                           **{name.replace("_", "."): value for name, value in extra.items()}})
    share.subscribe([topic])
    return share


def poll_until(share: ShareConsumer, count: int, timeout_s: float = WAIT_S) -> list[Message]:
    """Poll until ``count`` records arrived (or the deadline)."""
    received: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count and time.monotonic() < deadline:
        received += [message for message in share.poll(0.5) if message.error() is None]
    return received


def values(messages: list[Message]) -> list[bytes]:
    return [message.value() for message in messages]


def test_implicit_acknowledgement_delivers_every_record_once(server: BrokerThread) -> None:
    topic, group = unique("share-implicit"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    produce(server, topic, 30, partitions=3)
    share = consumer(server, group, topic)
    try:
        received = poll_until(share, 30)
        assert sorted(values(received)) == sorted(f"v{i}".encode() for i in range(30))
        assert {message.partition() for message in received} == {0, 1, 2}
        assert all(message.delivery_count() == 1 for message in received)
        assert poll_until(share, 1, timeout_s=1.5) == []  # accepted on this poll
    finally:
        share.close()
    again = consumer(server, group, topic)
    try:
        assert poll_until(again, 1, timeout_s=2) == []  # nothing comes back
    finally:
        again.close()


def test_explicit_release_redelivers_and_reject_dead_letters(server: BrokerThread) -> None:
    topic, group = unique("share-explicit"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    produce(server, topic, 6)
    share = consumer(server, group, topic, share_acknowledgement_mode="explicit")
    try:
        first = poll_until(share, 6)
        assert len(first) == 6
        by_value = {message.value(): message for message in first}
        for index in range(4):
            share.acknowledge(by_value[f"v{index}".encode()], AcknowledgeType.ACCEPT)
        share.acknowledge(by_value[b"v4"], AcknowledgeType.RELEASE)
        share.acknowledge(by_value[b"v5"], AcknowledgeType.REJECT)
        share.commit_sync(WAIT_S)
        again = poll_until(share, 1)
        assert values(again) == [b"v4"]
        assert again[0].delivery_count() == 2
        share.acknowledge(again[0], AcknowledgeType.ACCEPT)
        share.commit_sync(WAIT_S)
    finally:
        share.close()
    dead = server.call(lambda: server.server.broker.read_records(f"{group}.dlq", 0, 0, 100))
    assert [record.value for record in dead] == [b"v5"]
    assert dict(dead[0].headers).get(HEADER_DEAD_REASON) == b"rejected"


def test_lock_expiry_redelivers_to_another_consumer(server: BrokerThread) -> None:
    topic, group = unique("share-lock"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest",
                      share_record_lock_duration_ms="1000")
    produce(server, topic, 3)
    holder = consumer(server, group, topic, share_acknowledgement_mode="explicit")
    other = consumer(server, group, topic)
    try:
        held = poll_until(holder, 3)
        assert sorted(values(held)) == [b"v0", b"v1", b"v2"]
        started = time.monotonic()
        redelivered = poll_until(other, 3)  # the holder never acknowledges
        assert sorted(values(redelivered)) == [b"v0", b"v1", b"v2"]
        assert time.monotonic() - started >= 0.5
        assert all(message.delivery_count() == 2 for message in redelivered)
    finally:
        other.close()
        holder.close()


def test_delivery_count_limit_dead_letters(server: BrokerThread) -> None:
    topic, group = unique("share-limit"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest",
                      share_delivery_count_limit="2")
    produce(server, topic, 1)
    share = consumer(server, group, topic, share_acknowledgement_mode="explicit")
    try:
        for attempt in (1, 2):
            got = poll_until(share, 1)
            assert values(got) == [b"v0"] and got[0].delivery_count() == attempt
            share.acknowledge(got[0], AcknowledgeType.RELEASE)
            share.commit_sync(WAIT_S)
        assert poll_until(share, 1, timeout_s=1.5) == []
    finally:
        share.close()
    dead = server.call(lambda: server.server.broker.read_records(f"{group}.dlq", 0, 0, 100))
    assert [record.value for record in dead] == [b"v0"]
    assert dict(dead[0].headers).get(HEADER_DEAD_REASON) == b"max-deliveries"


def test_three_consumers_share_one_partition_without_duplicates(server: BrokerThread) -> None:
    topic, group = unique("share-three"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    server.call(lambda: server.server.broker.create_topic(topic, 1))
    consumers = [consumer(server, group, topic) for _ in range(3)]
    received: list[list[bytes]] = [[] for _ in consumers]
    stop = threading.Event()
    all_received = threading.Event()  # set by the poller that sees the 90th record
    count_lock = threading.Lock()

    def run(index: int) -> None:
        while not stop.is_set():
            values = [m.value() for m in consumers[index].poll(0.2) if m.error() is None]
            with count_lock:
                received[index] += values
                if sum(map(len, received)) >= 90:
                    all_received.set()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    try:
        producer = Producer({"bootstrap.servers": bootstrap(server), "linger.ms": 0})
        for index in range(90):
            producer.produce(topic, f"v{index}".encode())
            if index % 10 == 9:
                producer.flush(WAIT_S)
        all_received.wait(WAIT_S)
    finally:
        stop.set()
        for thread in threads:
            thread.join(WAIT_S)
        for share in consumers:
            share.close()
    everything = [value for part in received for value in part]
    assert len(everything) == len(set(everything)) == 90


def test_share_consumer_and_pika_split_one_queue(server: BrokerThread) -> None:
    queue = unique("shared-queue")
    connection = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", server.ports["amqp"]))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True)
    messages = [BrokerMessage(value=f"m{i}".encode()) for i in range(200)]
    server.call(lambda: server.server.broker.publish(queue, messages))
    # the group named after the queue is the queue's own shared group
    share = consumer(server, queue, queue, max_poll_records=5)
    kafka_got: list[bytes] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            kafka_got.extend(m.value() for m in share.poll(0.2) if m.error() is None)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        amqp_got: list[bytes] = []
        deadline = time.monotonic() + WAIT_S
        while len(amqp_got) + len(kafka_got) < 200 and time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue)
            if method is None:
                connection.sleep(0.05)
                continue
            amqp_got.append(body)
            channel.basic_ack(method.delivery_tag)
    finally:
        stop.set()
        thread.join(WAIT_S)
        share.close()
        connection.close()
    assert amqp_got and kafka_got  # both sides consumed
    assert not set(amqp_got) & set(kafka_got)
    assert sorted(amqp_got + kafka_got) == sorted(f"m{i}".encode() for i in range(200))
    info = server.call(lambda: server.server.broker.get_queue(queue))
    assert (info.ready, info.in_flight) == (0, 0)  # every record was acknowledged



def test_broker_restart_keeps_acknowledged_records_acknowledged(server: BrokerThread) -> None:
    topic, group = unique("share-restart"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    produce(server, topic, 10)
    share = consumer(server, group, topic, share_acknowledgement_mode="explicit",
                     max_poll_records=4)
    try:
        first = poll_until(share, 4)
        for message in first:
            share.acknowledge(message, AcknowledgeType.ACCEPT)
        share.commit_sync(WAIT_S)
    finally:
        share.close()
    server.restart()  # memberships and sessions are gone; record states are not
    again = consumer(server, group, topic)
    try:
        rest = poll_until(again, 10 - len(first))
    finally:
        again.close()
    assert sorted(values(first) + values(rest)) == sorted(f"v{i}".encode() for i in range(10))


def test_one_share_consumer_reads_two_topics(server: BrokerThread) -> None:
    first, second, group = unique("share-a"), unique("share-b"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    produce(server, first, 5)
    produce(server, second, 5, partitions=2)
    share = ShareConsumer({"bootstrap.servers": bootstrap(server), "group.id": group})
    share.subscribe([first, second])
    try:
        received = poll_until(share, 10)
    finally:
        share.close()
    assert sorted((m.topic(), m.value()) for m in received) == sorted(
        [(first, f"v{i}".encode()) for i in range(5)]
        + [(second, f"v{i}".encode()) for i in range(5)])


def alter_share_group_offsets(server: BrokerThread, group: str, topic: str,
                              offset: int) -> int:
    """AlterShareGroupOffsets v0 over a plain socket (confluent-kafka 2.16 has no call for
    it); the partition's error code."""
    request = AlterShareGroupOffsetsRequest(group_id=group, topics=(
        AlterShareGroupOffsetsRequestTopic(topic_name=topic, partitions=(
            AlterShareGroupOffsetsRequestPartition(partition_index=0, start_offset=offset),)),))
    with socket.create_connection(("127.0.0.1", server.ports["kafka"]), WAIT_S) as sock:
        sock.sendall(request_frame(request, 1))
        size = struct.unpack(">i", sock.recv(4, socket.MSG_WAITALL))[0]
        _, answer = parse_response(sock.recv(size, socket.MSG_WAITALL), 91, 0)
    if answer.error_code:
        return int(answer.error_code)
    return int(answer.responses[0].partitions[0].error_code)


def test_alter_share_group_offsets_replays_a_partition(server: BrokerThread) -> None:
    """Records a share consumer accepted come back, with delivery count 1, after the
    group's start offset is moved back; refused while a consumer is in the group."""
    topic, group = unique("share-alter"), unique("g")
    set_group_configs(server, group, share_auto_offset_reset="earliest")
    produce(server, topic, 6)
    share = consumer(server, group, topic)
    try:
        assert len(poll_until(share, 6)) == 6
        assert alter_share_group_offsets(server, group, topic, 2) == 68  # NON_EMPTY_GROUP
        assert poll_until(share, 1, timeout_s=1) == []  # accepts the six on this poll
    finally:
        share.close()
    assert alter_share_group_offsets(server, group, topic, 2) == 0
    again = consumer(server, group, topic)
    try:
        replayed = poll_until(again, 4)
    finally:
        again.close()
    assert sorted(values(replayed)) == [b"v2", b"v3", b"v4", b"v5"]
    assert {message.delivery_count() for message in replayed} == {1}
