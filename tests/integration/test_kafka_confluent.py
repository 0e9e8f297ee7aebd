"""Goal: confluent-kafka (librdkafka) works against Conveyor unchanged.

Method: one BrokerThread per module; each test uses its own topics and groups.
Covers produce/consume across partitions with keys, headers and timestamps;
every compression codec; idempotent acks=all produce; seek to beginning and to
a timestamp; commit then restart of consumer and broker resuming at the
committed offset; a three-member cooperative-sticky group rebalancing on
join/leave with no committed record lost or committed twice; admin calls; the
murmur2 partition of keys published through the broker's own API; records
crossing between the Kafka API and the broker's publish/read API.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
    ResourceType,
)

from conveyor.broker.types import Message as BrokerMessage
from conveyor.testing.server import BrokerThread

WAIT_S = 30
FAST = {
    "topic.metadata.refresh.interval.ms": 1000,
    "socket.connection.setup.timeout.ms": 5000,
    "reconnect.backoff.max.ms": 200,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("confluent") / "data", listeners=("kafka",)) as s:
        yield s


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def producer(server: BrokerThread, **config: Any) -> Producer:
    return Producer({"bootstrap.servers": bootstrap(server), "linger.ms": 5, **FAST, **config})


def consumer(server: BrokerThread, group: str, **config: Any) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap(server), "group.id": group,
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
        "session.timeout.ms": 6000, "heartbeat.interval.ms": 300, "fetch.wait.max.ms": 100,
        **FAST, **config,
    })


def create_topic(server: BrokerThread, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(server)})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(WAIT_S)


def consume(client: Consumer, count: int) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + WAIT_S
    while len(messages) < count and time.monotonic() < deadline:
        message = client.poll(0.2)
        if message is None:
            continue
        assert message.error() is None, message.error()
        messages.append(message)
    return messages


def produce_all(client: Producer, topic: str, count: int, **extra: Any) -> None:
    for index in range(count):
        client.produce(topic, key=b"key-%d" % index, value=b"value-%d" % index, **extra)
    assert client.flush(WAIT_S) == 0


def test_produce_consume_across_partitions_keeps_keys_headers_timestamps(
    server: BrokerThread,
) -> None:
    topic = unique("multi")
    create_topic(server, topic, 3)
    sender = producer(server, acks="all", **{"enable.idempotence": True})
    delivered: list[Any] = []
    for index in range(60):
        sender.produce(topic, key=b"key-%d" % index, value=b"value-%d" % index,
                       headers=[("h", b"%d" % index), ("empty", None)],
                       timestamp=1_700_000_000_000 + index,
                       on_delivery=lambda error, message: delivered.append((error, message)))
    assert sender.flush(WAIT_S) == 0
    assert all(error is None for error, _ in delivered)
    reader = consumer(server, unique("g"))
    reader.subscribe([topic])
    messages = consume(reader, 60)
    reader.close()
    assert len(messages) == 60
    assert {message.partition() for message in messages} == {0, 1, 2}
    for message in messages:
        index = int(message.key().split(b"-")[1])
        assert message.value() == b"value-%d" % index
        assert message.headers() == [("h", b"%d" % index), ("empty", None)]
        assert message.timestamp()[1] == 1_700_000_000_000 + index
    offsets = sorted((m.partition(), m.offset()) for m in messages)
    assert len(set(offsets)) == 60


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_every_compression_codec(server: BrokerThread, codec: str) -> None:
    topic = unique(f"codec-{codec}")
    create_topic(server, topic, 1)
    produce_all(producer(server, **{"compression.type": codec}), topic, 200)
    reader = consumer(server, unique("g"))
    reader.subscribe([topic])
    messages = consume(reader, 200)
    reader.close()
    assert [m.value() for m in messages] == [b"value-%d" % i for i in range(200)]


def test_seek_to_beginning_and_to_timestamp(server: BrokerThread) -> None:
    topic = unique("seek")
    create_topic(server, topic, 1)
    sender = producer(server)
    for index in range(20):
        sender.produce(topic, value=b"%d" % index, timestamp=1_000_000 + index * 10)
    assert sender.flush(WAIT_S) == 0
    reader = consumer(server, unique("g"))
    reader.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    assert [m.value() for m in consume(reader, 20)] == [b"%d" % i for i in range(20)]
    found = reader.offsets_for_times([TopicPartition(topic, 0, 1_000_000 + 125)], WAIT_S)
    assert found[0].offset == 13
    reader.seek(TopicPartition(topic, 0, found[0].offset))
    assert consume(reader, 1)[0].value() == b"13"
    reader.seek(TopicPartition(topic, 0, OFFSET_BEGINNING))
    assert consume(reader, 1)[0].value() == b"0"
    low, high = reader.get_watermark_offsets(TopicPartition(topic, 0), WAIT_S)
    assert (low, high) == (0, 20)
    reader.close()


def test_commit_and_restart_of_consumer_and_broker_resume_at_committed(
    server: BrokerThread,
) -> None:
    topic, group = unique("resume"), unique("g")
    create_topic(server, topic, 2)
    produce_all(producer(server, acks="all"), topic, 40)
    reader = consumer(server, group)
    reader.subscribe([topic])
    first = consume(reader, 15)
    reader.commit(asynchronous=False)
    reader.close()
    second_reader = consumer(server, group)
    second_reader.subscribe([topic])
    second = consume(second_reader, 10)
    second_reader.commit(asynchronous=False)
    second_reader.close()
    server.restart()
    third_reader = consumer(server, group)
    third_reader.subscribe([topic])
    third = consume(third_reader, 15)
    assert third_reader.poll(1.0) is None
    committed = third_reader.committed(
        [TopicPartition(topic, 0), TopicPartition(topic, 1)], WAIT_S)
    third_reader.close()
    seen = [(m.partition(), m.offset()) for m in first + second + third]
    assert len(seen) == len(set(seen)) == 40
    assert all(tp.offset >= 0 for tp in committed)


class GroupMember(threading.Thread):
    """One consumer in its own thread: poll, process, commit each record."""

    def __init__(self, server: BrokerThread, topic: str, group: str, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.consumer = consumer(server, group, **{
            "partition.assignment.strategy": "cooperative-sticky", "max.poll.interval.ms": 10000,
        })
        self.consumer.subscribe([topic])
        self.ledger = ledger
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                message = self.consumer.poll(0.1)
                if message is None:
                    continue
                assert message.error() is None, message.error()
                self.ledger.processed(message.partition(), message.offset())
                try:
                    result = self.consumer.commit(message=message, asynchronous=False)
                except KafkaException:
                    continue  # revoked during a rebalance: not committed work
                self.ledger.committed(result or [])
        except BaseException as error:
            self.failure = error
        finally:
            self.consumer.close()

    def leave(self) -> None:
        self.stop.set()
        self.join(WAIT_S)
        assert self.failure is None, self.failure


class Ledger:
    """Committed offsets per partition, and records handed out below one (violations)."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.committed_max: dict[int, int] = {}
        self.redone: list[tuple[int, int]] = []
        self.count = 0

    def processed(self, partition: int, offset: int) -> None:
        with self.lock:
            self.count += 1
            if offset < self.committed_max.get(partition, 0):
                self.redone.append((partition, offset))
            self.lock.notify_all()

    def committed(self, result: list[TopicPartition]) -> None:
        with self.lock:
            for item in result:
                if item.error is None and item.offset >= 0:
                    self.committed_max[item.partition] = max(
                        self.committed_max.get(item.partition, 0), item.offset)
            self.lock.notify_all()

    def total(self) -> int:
        with self.lock:
            return sum(self.committed_max.values())

    def wait_until(self, condition: Any) -> None:
        """Block until ``condition()`` holds, woken by every update (no polling sleeps)."""
        with self.lock:
            self.lock.wait_for(condition, WAIT_S)


def test_three_member_cooperative_group_no_lost_or_double_committed_work(
    server: BrokerThread,
) -> None:
    """Members commit each record after processing it. While members join and one
    leaves, no member may be handed a record below an offset already committed for
    its partition, and in the end the committed offsets cover every record."""
    topic, group = unique("coop"), unique("g")
    create_topic(server, topic, 6)
    total = 600
    sender = producer(server, acks="all")
    produce_all(sender, topic, total // 2)
    ledger = Ledger()
    members = [GroupMember(server, topic, group, ledger)]
    members[0].start()
    ledger.wait_until(lambda: ledger.count > 0)
    for _ in range(2):
        members.append(GroupMember(server, topic, group, ledger))
        members[-1].start()
        ledger.wait_until(lambda: ledger.count > 50 * len(members))
    produce_all(sender, topic, total // 2)
    members.pop(0).leave()
    ledger.wait_until(lambda: sum(ledger.committed_max.values()) >= total)
    for member in members:
        member.leave()
    assert ledger.redone == [], "records below a committed offset were handed out again"
    assert ledger.total() == total
    assert len(ledger.committed_max) == 6


def test_admin_create_describe_alter_partitions_delete(server: BrokerThread) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(server)})
    topic = unique("admin")
    for future in admin.create_topics(
        [NewTopic(topic, 2, 1, config={"retention.ms": "60000"})]
    ).values():
        assert future.result(WAIT_S) is None
    duplicate = admin.create_topics([NewTopic(topic, 2, 1)])[topic]
    with pytest.raises(Exception) as raised:
        duplicate.result(WAIT_S)
    assert raised.value.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS
    metadata = admin.list_topics(timeout=WAIT_S)
    assert len(metadata.topics[topic].partitions) == 2
    resource = ConfigResource(ResourceType.TOPIC, topic)
    described = admin.describe_configs([resource])[resource].result(WAIT_S)
    assert described["retention.ms"].value == "60000"
    change = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", "120000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("max.message.bytes", "2048", incremental_operation=AlterConfigOpType.SET),
    ])
    for future in admin.incremental_alter_configs([change]).values():
        future.result(WAIT_S)
    described = admin.describe_configs([resource])[resource].result(WAIT_S)
    assert (described["retention.ms"].value, described["max.message.bytes"].value) == (
        "120000", "2048")
    reset = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry("retention.ms", None, incremental_operation=AlterConfigOpType.DELETE),
    ])
    for future in admin.incremental_alter_configs([reset]).values():
        future.result(WAIT_S)
    described = admin.describe_configs([resource])[resource].result(WAIT_S)
    assert described["retention.ms"].value == str(7 * 24 * 3600 * 1000)
    for future in admin.create_partitions([NewPartitions(topic, 4)]).values():
        assert future.result(WAIT_S) is None
    assert len(admin.list_topics(topic, timeout=WAIT_S).topics[topic].partitions) == 4
    cluster = admin.describe_cluster().result(WAIT_S)
    assert cluster.nodes[0].port == server.ports["kafka"]
    for future in admin.delete_topics([topic]).values():
        assert future.result(WAIT_S) is None
    assert topic not in admin.list_topics(timeout=WAIT_S).topics


def test_broker_publish_uses_the_murmur2_partition(server: BrokerThread) -> None:
    topic = unique("murmur")
    create_topic(server, topic, 5)
    keys = [b"user-%d" % index for index in range(40)]
    sender = producer(server, partitioner="murmur2_random")
    kafka_partitions: dict[bytes, int] = {}
    for key in keys:
        sender.produce(topic, key=key, value=b"kafka", on_delivery=lambda error, message:
                       kafka_partitions.__setitem__(message.key(), message.partition()))
    assert sender.flush(WAIT_S) == 0

    async def publish() -> list[Any]:
        return await server.server.broker.publish(
            topic, [BrokerMessage(value=b"broker", key=key) for key in keys])

    results = server.call(publish)
    assert {key: result.partition for key, result in zip(keys, results, strict=True)} == (
        kafka_partitions)


def test_records_cross_between_kafka_and_broker_api(server: BrokerThread) -> None:
    topic = unique("cross")
    create_topic(server, topic, 1)
    sender = producer(server)
    sender.produce(topic, key=b"k", value=b"from-kafka", headers=[("a", b"1")],
                   timestamp=1_650_000_000_000)
    assert sender.flush(WAIT_S) == 0

    async def publish_and_read() -> list[Any]:
        broker = server.server.broker
        await broker.publish(topic, [BrokerMessage(
            value=b"from-broker", key=b"k2", headers=(("b", b"2"),),
            timestamp_ms=1_650_000_000_001)])
        return await broker.read_records(topic, 0, 0, 10)

    records = server.call(publish_and_read)
    assert [(r.key, r.value, r.headers, r.timestamp_ms) for r in records] == [
        (b"k", b"from-kafka", (("a", b"1"),), 1_650_000_000_000),
        (b"k2", b"from-broker", (("b", b"2"),), 1_650_000_000_001),
    ]
    reader = consumer(server, unique("g"))
    reader.subscribe([topic])
    messages = consume(reader, 2)
    reader.close()
    assert [(m.key(), m.value(), m.headers(), m.timestamp()[1]) for m in messages][1] == (
        b"k2", b"from-broker", [("b", b"2")], 1_650_000_000_001)


def test_sasl_plain_with_librdkafka(tmp_path: Path) -> None:
    settings = {"kafka": {"sasl_users": {"alice": "secret"}}}
    with BrokerThread(tmp_path / "data", listeners=("kafka",), settings=settings) as secured:
        def client_config(password: str) -> dict[str, Any]:
            return {"bootstrap.servers": bootstrap(secured), "security.protocol": "SASL_PLAINTEXT",
                    "sasl.mechanisms": "PLAIN", "sasl.username": "alice",
                    "sasl.password": password, **FAST}

        sender = Producer(client_config("secret"))
        sender.produce("sasl-topic", b"authenticated")
        assert sender.flush(WAIT_S) == 0
        denied = AdminClient(client_config("wrong"))
        with pytest.raises(KafkaException):
            denied.list_topics(timeout=1)
        assert secured.server.broker.offsets("sasl-topic", 0).high_watermark == 1


def test_auto_create_off_answers_unknown_topic(tmp_path: Path) -> None:
    with BrokerThread(tmp_path / "data", listeners=("kafka",),
                      broker={"auto_create_topics": False}) as strict:
        sender = Producer({"bootstrap.servers": bootstrap(strict), **FAST})
        metadata = sender.list_topics("missing-topic", timeout=WAIT_S)
        error = metadata.topics["missing-topic"].error
        assert error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART
        assert "missing-topic" not in [info.name for info in strict.server.broker.list_topics()]
