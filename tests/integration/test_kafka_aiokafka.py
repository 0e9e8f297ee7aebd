"""Goal: aiokafka works against Conveyor unchanged.

Method: a broker in the test's own event loop (run_broker). Produce with
idempotence and acks=all (aiokafka sends Produce v7 / Fetch v11, non-flexible)
across partitions and every compression codec; a three-member group (range
assignor, eager) rebalancing as members join and leave, no committed record
handed out again and none lost; seek to beginning and to a timestamp; static
membership keeping a member's partitions across its restart.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from conveyor.broker.ordered_group import MemberIdRequired
from conveyor.server.app import Server
from conveyor.testing.server import run_broker

WAIT_S = 30


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


def bootstrap(server: Server) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def started_producer(server: Server, **config: Any) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap(server), acks="all",
                                enable_idempotence=True, linger_ms=5,
                                metadata_max_age_ms=1000, **config)
    await producer.start()
    return producer


def make_consumer(server: Server, group: str | None, **config: Any) -> AIOKafkaConsumer:
    settings: dict[str, Any] = {
        "auto_offset_reset": "earliest", "enable_auto_commit": False,
        "session_timeout_ms": 6000, "heartbeat_interval_ms": 300, "fetch_max_wait_ms": 100,
        "metadata_max_age_ms": 1000,
    }
    settings.update(config)
    return AIOKafkaConsumer(bootstrap_servers=bootstrap(server), group_id=group, **settings)


async def take(consumer: AIOKafkaConsumer, count: int) -> list[Any]:
    records: list[Any] = []
    async with asyncio.timeout(WAIT_S):
        while len(records) < count:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    return records


async def send_all(producer: AIOKafkaProducer, topic: str, count: int) -> None:
    futures = [await producer.send(topic, key=b"key-%d" % index, value=b"value-%d" % index)
               for index in range(count)]
    await asyncio.gather(*futures)


async def test_idempotent_produce_consume_across_partitions(server: Server) -> None:
    topic = unique("aio-multi")
    await server.broker.create_topic(topic, 3)
    producer = await started_producer(server)
    metadata = await asyncio.gather(*[
        await producer.send(topic, key=b"key-%d" % index, value=b"value-%d" % index,
                            headers=[("n", b"%d" % index)])
        for index in range(60)
    ])
    await producer.stop()
    assert {item.partition for item in metadata} == {0, 1, 2}
    consumer = make_consumer(server, unique("g"))
    consumer.subscribe([topic])
    await consumer.start()
    records = await take(consumer, 60)
    await consumer.stop()
    assert sorted(int(r.key.split(b"-")[1]) for r in records) == list(range(60))
    assert all(r.headers == (("n", r.key.split(b"-")[1]),) for r in records)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
async def test_every_compression_codec(server: Server, codec: str) -> None:
    topic = unique(f"aio-{codec}")
    await server.broker.create_topic(topic, 1)
    producer = await started_producer(server, compression_type=codec)
    await send_all(producer, topic, 100)
    await producer.stop()
    consumer = make_consumer(server, None)
    consumer.assign([TopicPartition(topic, 0)])
    await consumer.start()
    records = await take(consumer, 100)
    await consumer.stop()
    assert [r.value for r in records] == [b"value-%d" % i for i in range(100)]


async def test_seek_to_beginning_and_timestamp(server: Server) -> None:
    topic = unique("aio-seek")
    await server.broker.create_topic(topic, 1)
    producer = await started_producer(server)
    for index in range(10):
        await producer.send_and_wait(topic, value=b"%d" % index,
                                     timestamp_ms=9_000_000 + index * 100)
    await producer.stop()
    partition = TopicPartition(topic, 0)
    consumer = make_consumer(server, None)
    consumer.assign([partition])
    await consumer.start()
    assert [r.value for r in await take(consumer, 10)] == [b"%d" % i for i in range(10)]
    found = await consumer.offsets_for_times({partition: 9_000_000 + 650})
    assert found[partition] is not None and found[partition].offset == 7
    assert found[partition].timestamp == 9_000_700  # the record's own, not the target
    consumer.seek(partition, found[partition].offset)
    assert (await take(consumer, 1))[0].value == b"7"
    await consumer.seek_to_beginning(partition)
    assert (await take(consumer, 1))[0].value == b"0"
    assert (await consumer.end_offsets([partition]))[partition] == 10
    await consumer.stop()


class Ledger:
    def __init__(self) -> None:
        self.committed_max: dict[int, int] = {}
        self.redone: list[tuple[int, int]] = []
        self.count = 0
        self.changed = asyncio.Event()

    def processed(self, partition: int, offset: int) -> None:
        self.count += 1
        if offset < self.committed_max.get(partition, 0):
            self.redone.append((partition, offset))
        self.changed.set()

    def committed(self, partition: int, offset: int) -> None:
        self.committed_max[partition] = max(self.committed_max.get(partition, 0), offset)
        self.changed.set()

    async def wait_for(self, condition: Any) -> None:
        async with asyncio.timeout(WAIT_S):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


async def run_member(consumer: AIOKafkaConsumer, ledger: Ledger, stop: asyncio.Event) -> None:
    await consumer.start()
    try:
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=100)
            if not batches:
                continue
            positions = {}
            for partition, records in batches.items():
                for record in records:
                    ledger.processed(partition.partition, record.offset)
                positions[partition] = records[-1].offset + 1
            try:
                await consumer.commit(positions)
            except (CommitFailedError, KafkaError):
                continue  # lost the partitions in a rebalance: not committed work
            for partition, offset in positions.items():
                ledger.committed(partition.partition, offset)
    finally:
        await consumer.stop()


async def test_three_member_group_rebalances_without_double_or_lost_commits(
    server: Server,
) -> None:
    topic, group = unique("aio-group"), unique("g")
    await server.broker.create_topic(topic, 6)
    producer = await started_producer(server)
    await send_all(producer, topic, 150)
    ledger = Ledger()
    members: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def join() -> None:
        stop = asyncio.Event()
        consumer = make_consumer(server, group, max_poll_interval_ms=10000)
        consumer.subscribe([topic])
        members.append((stop, asyncio.get_running_loop().create_task(
            run_member(consumer, ledger, stop))))

    join()
    await ledger.wait_for(lambda: ledger.count > 0)
    join()
    join()
    await send_all(producer, topic, 150)
    await producer.stop()
    await ledger.wait_for(lambda: sum(ledger.committed_max.values()) >= 200)
    stop, task = members.pop(0)
    stop.set()
    await task
    await ledger.wait_for(lambda: sum(ledger.committed_max.values()) >= 300)
    for stop, _ in members:
        stop.set()
    await asyncio.gather(*(task for _, task in members))
    assert ledger.redone == []
    assert sum(ledger.committed_max.values()) == 300


async def test_static_member_keeps_its_partitions_across_restart(server: Server) -> None:
    topic, group = unique("aio-static"), unique("g")
    await server.broker.create_topic(topic, 4)

    async def assignment_of(consumer: AIOKafkaConsumer) -> set[int]:
        async with asyncio.timeout(WAIT_S):
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=50)  # drives the join, no sleeping
        return {partition.partition for partition in consumer.assignment()}

    def static(instance: str) -> AIOKafkaConsumer:
        consumer = make_consumer(server, group, group_instance_id=instance,
                                 session_timeout_ms=10000)
        consumer.subscribe([topic])
        return consumer

    first, second = static("one"), static("two")
    await first.start()
    await second.start()
    async with asyncio.timeout(WAIT_S):
        while len(first.assignment()) + len(second.assignment()) != 4:
            await asyncio.gather(first.getmany(timeout_ms=50), second.getmany(timeout_ms=50))
    owned = await assignment_of(second)
    description = server.broker.describe_group(group)
    generation = description.generation
    await second.stop()  # a static member leaving does not trigger a rebalance
    restarted = static("two")
    await restarted.start()
    assert await assignment_of(restarted) == owned
    assert server.broker.describe_group(group).generation == generation
    await restarted.stop()
    await first.stop()


async def test_idempotent_retry_after_lost_response_appends_once(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first produce is appended but its connection drops before the answer; the
    idempotent producer resends the same batch (same producer id and sequence) and
    the broker answers with the original offsets instead of appending again."""
    from conveyor.errors import UnavailableError
    from conveyor.protocols.kafka import data_handlers

    topic = unique("aio-retry")
    await server.broker.create_topic(topic, 1)
    real_produce = data_handlers.handle_produce
    dropped: list[int] = []

    async def drop_first_answer(broker: Any, request: Any, *rest: Any) -> Any:
        answer = await real_produce(broker, request, *rest)
        if not dropped:
            dropped.append(request.header.correlation_id)
            raise UnavailableError("simulated lost response")  # closes the connection
        return answer

    monkeypatch.setattr(data_handlers, "handle_produce", drop_first_answer)
    producer = await started_producer(server, retry_backoff_ms=50)
    metadata = await producer.send_and_wait(topic, value=b"once")
    await producer.stop()
    assert dropped and metadata.offset == 0
    assert server.broker.offsets(topic, 0).high_watermark == 1
    records = await server.broker.read_records(topic, 0, 0, 10)
    assert [record.value for record in records] == [b"once"]


async def test_silent_member_is_expelled_after_its_timeouts(server: Server) -> None:
    """A member that joined and then never heartbeats again is removed when its
    rebalance/session timeout passes; the live aiokafka member then owns every partition."""
    import struct

    topic, group = unique("aio-silent"), unique("g")
    await server.broker.create_topic(topic, 3)
    subscription = struct.pack(">hih", 0, 1, len(topic)) + topic.encode() + struct.pack(">i", -1)
    joined = await server.broker.join_group(
        group, "", "consumer", [("roundrobin", subscription), ("range", subscription)],
        session_timeout_ms=1000,
        rebalance_timeout_ms=1000, require_known_member_id=False)
    assert not isinstance(joined, MemberIdRequired)
    await server.broker.sync_group(group, joined.member_id, joined.generation,
                                   {joined.member_id: b""})
    consumer = make_consumer(server, group, session_timeout_ms=6000)
    consumer.subscribe([topic])
    await consumer.start()
    async with asyncio.timeout(WAIT_S):
        while len(consumer.assignment()) != 3:
            await consumer.getmany(timeout_ms=100)
    members = server.broker.describe_group(group).members
    assert [member.member_id for member in members] != [joined.member_id]
    assert len(members) == 1
    await consumer.stop()
