"""Goal: RabbitMQ stream queues map onto Conveyor topics, readable from any offset.

Method: one BrokerThread (AMQP + Kafka) per module; pika declares a stream, publishes
with confirms and consumes with ``x-stream-offset`` first / next / an offset; a topic
produced with confluent-kafka is consumed as a stream over AMQP.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import pytest
from confluent_kafka import Producer
from pika.adapters.blocking_connection import BlockingChannel

from conveyor.testing.server import BrokerThread


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    path: Path = tmp_path_factory.mktemp("streams")
    with BrokerThread(path, listeners=("amqp", "kafka")) as running:
        yield running


@pytest.fixture
def channel(server: BrokerThread) -> Iterator[BlockingChannel]:
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", server.ports["amqp"]))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_qos(prefetch_count=100)
    yield channel
    connection.close()


def _consume(channel: BlockingChannel, queue: str, count: int,
             offset: object) -> list[tuple[bytes, int]]:
    got: list[tuple[bytes, int]] = []
    for method, properties, body in channel.consume(
            queue, arguments={"x-stream-offset": offset}, inactivity_timeout=5):
        if method is None:
            break
        got.append((body, properties.headers["x-stream-offset"]))
        channel.basic_ack(method.delivery_tag)
        if len(got) == count:
            break
    channel.cancel()
    return got


def test_stream_reads_from_first_an_offset_and_next(channel: BlockingChannel) -> None:
    name = f"stream-{uuid.uuid4().hex[:8]}"
    declared = channel.queue_declare(name, durable=True,
                                     arguments={"x-queue-type": "stream"})
    assert declared.method.message_count == 0
    for index in range(5):
        channel.basic_publish("", name, f"m{index}".encode())
    assert _consume(channel, name, 5, "first") == [
        (f"m{index}".encode(), index) for index in range(5)]
    # reading does not remove anything: a second reader starts where it asks
    assert _consume(channel, name, 2, 3) == [(b"m3", 3), (b"m4", 4)]
    assert channel.queue_declare(name, passive=True).method.message_count == 5


def test_stream_next_sees_only_new_messages(server: BrokerThread) -> None:
    name = f"stream-{uuid.uuid4().hex[:8]}"
    reader = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", server.ports["amqp"]))
    writer = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", server.ports["amqp"]))
    try:
        read_channel = reader.channel()
        read_channel.basic_qos(prefetch_count=10)
        write_channel = writer.channel()
        write_channel.confirm_delivery()
        write_channel.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        write_channel.basic_publish("", name, b"old")
        received: list[bytes] = []

        def on_message(ch: BlockingChannel, method: object, properties: object,
                       body: bytes) -> None:
            received.append(body)

        read_channel.basic_consume(name, on_message, auto_ack=True,
                                   arguments={"x-stream-offset": "next"})
        write_channel.basic_publish("", name, b"new")
        deadline = 50
        while not received and deadline:
            reader.process_data_events(time_limit=0.1)
            deadline -= 1
        assert received == [b"new"]
    finally:
        reader.close()
        writer.close()


def test_kafka_topic_is_consumed_as_a_stream(server: BrokerThread,
                                             channel: BlockingChannel) -> None:
    name = f"kafka-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": f"127.0.0.1:{server.ports['kafka']}"})
    for index in range(3):
        producer.produce(name, key=b"k", value=f"v{index}".encode(),
                         headers=[("tenant", b"acme")])
    assert producer.flush(10) == 0
    declared = channel.queue_declare(name, passive=True)
    assert declared.method.message_count == 3
    got = []
    for method, properties, body in channel.consume(
            name, arguments={"x-stream-offset": "first"}, inactivity_timeout=5):
        assert method is not None
        got.append((body, properties.headers["tenant"], method.routing_key))
        channel.basic_ack(method.delivery_tag)
        if len(got) == 3:
            break
    channel.cancel()
    assert got == [(f"v{index}".encode(), "acme", "k") for index in range(3)]


def test_basic_get_on_a_stream_is_refused(server: BrokerThread) -> None:
    name = f"stream-{uuid.uuid4().hex[:8]}"
    connection = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", server.ports["amqp"]))
    try:
        channel = connection.channel()
        channel.queue_declare(name, durable=True, arguments={"x-queue-type": "stream"})
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as raised:
            channel.basic_get(name)
        assert raised.value.reply_code == 406
        assert connection.channel().queue_declare(name, passive=True).method.queue == name
    finally:
        connection.close()
