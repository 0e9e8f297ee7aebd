"""Goal: aiokafka's and kafka-python's transactional producers and read_committed
consumers work against Conveyor unchanged.

Method: aiokafka against run_broker in the test's loop; kafka-python (blocking) against
a BrokerThread. Each commits one transaction and aborts another; a read_committed
consumer of the same client library reads only the committed records, a
read_uncommitted one reads both. aiokafka also runs a consume-transform-produce step
with send_offsets_to_transaction, and a second producer with the same transactional id
fences the first (ProducerFenced).
"""

from __future__ import annotations

import asyncio
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError, ProducerFenced

from conveyor.server.app import Server
from conveyor.testing.server import BrokerThread, run_broker

# kafka-python 3 reads its schemas with importlib.resources.read_text, deprecated on 3.11
# (see test_kafka_python.py)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer
    from kafka import TopicPartition as SyncTopicPartition

WAIT_S = 30


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def read_aio(bootstrap: str, topic: str, isolation: str, expected: int,
                   group: str | None = None) -> list[bytes]:
    """Values from the start until ``expected`` arrived or the log end was reached."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation,
                                enable_auto_commit=False, auto_offset_reset="earliest",
                                group_id=group)
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition]
        values: list[bytes] = []
        deadline = time.monotonic() + WAIT_S
        while len(values) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(partition, timeout_ms=500)
            values += [message.value for message in batch.get(partition, [])]
            if await consumer.position(partition) >= end and len(values) >= expected:
                break
        return values
    finally:
        await consumer.stop()


async def test_aiokafka_commit_abort_and_read_committed(server: Server) -> None:
    bootstrap = f"127.0.0.1:{server.ports['kafka']}"
    topic = unique("aio-txn")
    await server.broker.create_topic(topic, 1)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("tid"))
    await producer.start()
    try:
        async with producer.transaction():
            for number in range(3):
                await producer.send_and_wait(topic, f"ok {number}".encode())
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"dropped")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send_and_wait(topic, b"ok 3")
    finally:
        await producer.stop()
    committed = await read_aio(bootstrap, topic, "read_committed", 4)
    assert committed == [b"ok 0", b"ok 1", b"ok 2", b"ok 3"]
    everything = await read_aio(bootstrap, topic, "read_uncommitted", 5)
    assert everything == [b"ok 0", b"ok 1", b"ok 2", b"dropped", b"ok 3"]


async def test_aiokafka_consume_transform_produce(server: Server) -> None:
    bootstrap = f"127.0.0.1:{server.ports['kafka']}"
    source, sink, group = unique("aio-src"), unique("aio-sink"), unique("aio-group")
    await server.broker.create_topic(source, 1)
    await server.broker.create_topic(sink, 1)
    plain = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await plain.start()
    for number in range(5):
        await plain.send_and_wait(source, f"in {number}".encode())
    await plain.stop()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("tid"))
    await producer.start()
    try:
        inputs = await read_aio(bootstrap, source, "read_committed", 5)
        async with producer.transaction():
            for value in inputs:
                await producer.send_and_wait(sink, value.upper())
            await producer.send_offsets_to_transaction({TopicPartition(source, 0): 5}, group)
    finally:
        await producer.stop()
    assert server.broker.fetch_offsets(group, [(source, 0)])[(source, 0)].offset == 5  # type: ignore[union-attr]
    assert await read_aio(bootstrap, sink, "read_committed", 5) == [
        f"IN {n}".encode() for n in range(5)]


async def test_aiokafka_second_instance_fences_the_first(server: Server) -> None:
    bootstrap = f"127.0.0.1:{server.ports['kafka']}"
    topic, transactional_id = unique("aio-fence"), unique("tid")
    await server.broker.create_topic(topic, 1)
    first = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await first.start()
    await first.begin_transaction()
    await first.send_and_wait(topic, b"zombie")
    second = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await second.start()
    async with second.transaction():
        await second.send_and_wait(topic, b"successor")
    with pytest.raises((ProducerFenced, KafkaError)):
        await asyncio.wait_for(first.commit_transaction(), WAIT_S)
    await second.stop()
    await first.stop()
    assert await read_aio(bootstrap, topic, "read_committed", 1) == [b"successor"]


def test_kafka_python_transactions(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", listeners=("kafka",)) as running:
        bootstrap = f"127.0.0.1:{running.ports['kafka']}"
        topic = unique("kp-txn")
        running.call(running.server.broker.create_topic, topic, 1)
        producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=unique("tid"))
        producer.init_transactions()
        producer.begin_transaction()
        producer.send(topic, b"kept 0")
        producer.send(topic, b"kept 1")
        producer.commit_transaction()
        producer.begin_transaction()
        producer.send(topic, b"dropped")
        producer.flush()
        producer.abort_transaction()
        producer.close()

        def read(isolation: str, expected: int) -> list[bytes]:
            consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level=isolation,
                                     enable_auto_commit=False, auto_offset_reset="earliest",
                                     consumer_timeout_ms=3000)
            consumer.assign([SyncTopicPartition(topic, 0)])
            values = []
            for message in consumer:
                values.append(message.value)
                if len(values) >= expected:
                    break
            consumer.close()
            return values

        assert read("read_committed", 2) == [b"kept 0", b"kept 1"]
        assert read("read_uncommitted", 3) == [b"kept 0", b"kept 1", b"dropped"]
