"""Goal: a running group migrates online between the classic and the KIP-848 consumer
protocol (group.consumer.migration.policy=bidirectional, Kafka's default), with real
clients, without losing committed offsets or handing a partition to two members.

Method: one BrokerThread per module. Members run in threads, process each record and
commit it. An ownership ledger follows every member's assign / revoke / lost callbacks:
a partition assigned while another member still holds it, or a record processed by a
member that does not hold its partition, is a violation. A roll replaces the group's
members one by one: confluent-kafka classic members by confluent-kafka
group.protocol=consumer members (the upgrade), and back (the downgrade); and
kafka-python classic members with a confluent-kafka consumer-protocol member. In the
end the committed offsets cover every record and no record was handed out below an
offset already committed for its partition.
"""

from __future__ import annotations

import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)
from confluent_kafka.admin import ResourceType as AdminResourceType

from conveyor.testing.server import BrokerThread

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import ConsumerRebalanceListener, KafkaConsumer
    from kafka.errors import KafkaError
    from kafka.structs import OffsetAndMetadata
    from kafka.structs import TopicPartition as PyTopicPartition

WAIT_S = 60


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("migration") / "data"
    with BrokerThread(Path(data), listeners=("kafka",)) as running:
        yield running


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def setup_group(server: BrokerThread, topic: str, partitions: int, group: str) -> None:
    client = AdminClient({"bootstrap.servers": bootstrap(server)})
    for future in client.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(WAIT_S)
    resource = ConfigResource(AdminResourceType.GROUP, group, incremental_configs=[
        ConfigEntry("consumer.heartbeat.interval.ms", "300",
                    incremental_operation=AlterConfigOpType.SET)])
    for future in client.incremental_alter_configs([resource]).values():
        future.result(WAIT_S)


def produce(server: BrokerThread, topic: str, start: int, count: int) -> None:
    sender = Producer({"bootstrap.servers": bootstrap(server), "linger.ms": 5})
    for index in range(start, start + count):
        sender.produce(topic, key=b"key-%d" % index, value=b"value-%d" % index)
    assert sender.flush(WAIT_S) == 0


def group_type(server: BrokerThread, group: str) -> str:
    client = AdminClient({"bootstrap.servers": bootstrap(server)})
    listed = client.list_consumer_groups().result(WAIT_S)
    types = {item.group_id: str(item.type.name).lower() for item in listed.valid}
    return types.get(group, "absent")


class Ledger:
    """Who holds which partition, what was processed and committed, and violations."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.owner: dict[int, str] = {}
        self.committed_max: dict[int, int] = {}
        self.processed_by: dict[str, int] = {}
        self.violations: list[str] = []

    def assigned(self, member: str, partitions: list[int]) -> None:
        with self.lock:
            for partition in partitions:
                holder = self.owner.get(partition)
                if holder is not None and holder != member:
                    self.violations.append(f"{partition} given to {member}, held by {holder}")
                self.owner[partition] = member
            self.lock.notify_all()

    def holds(self, member: str) -> bool:
        with self.lock:
            return member in self.owner.values()

    def revoked(self, member: str, partitions: list[int]) -> None:
        with self.lock:
            for partition in partitions:
                if self.owner.get(partition) == member:
                    del self.owner[partition]

    def processed(self, member: str, partition: int, offset: int) -> None:
        with self.lock:
            if self.owner.get(partition) != member:
                self.violations.append(f"{member} read {partition} held by "
                                       f"{self.owner.get(partition)}")
            if offset < self.committed_max.get(partition, 0):
                self.violations.append(f"{partition}@{offset} below a committed offset")
            self.processed_by[member] = self.processed_by.get(member, 0) + 1
            self.lock.notify_all()

    def committed(self, partition: int, offset: int) -> None:
        with self.lock:
            self.committed_max[partition] = max(self.committed_max.get(partition, 0), offset)
            self.lock.notify_all()

    def total(self) -> int:
        with self.lock:
            return sum(self.committed_max.values())

    def wait_until(self, condition: Any, what: str) -> None:
        """Block until ``condition()`` holds, woken by every update (no polling sleeps)."""
        with self.lock:
            assert self.lock.wait_for(condition, WAIT_S), f"timed out waiting for {what}"

    def count(self, member: str) -> int:
        return self.processed_by.get(member, 0)


class ConfluentMember(threading.Thread):
    """A confluent-kafka consumer (classic or consumer protocol) in its own thread."""

    def __init__(self, server: BrokerThread, topic: str, group: str, ledger: Ledger,
                 name: str, protocol: str, strategy: str = "range,roundrobin") -> None:
        super().__init__(daemon=True, name=name)
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap(server), "group.id": group,
            "group.protocol": protocol, "auto.offset.reset": "earliest",
            "enable.auto.commit": False, "fetch.wait.max.ms": 100,
            "topic.metadata.refresh.interval.ms": 500}
        if protocol == "classic":
            config.update({"session.timeout.ms": 6000, "heartbeat.interval.ms": 300,
                           "partition.assignment.strategy": strategy})
        self.consumer = Consumer(config)
        self.consumer.subscribe([topic], on_assign=self._on_assign,
                                on_revoke=self._on_revoke, on_lost=self._on_revoke)
        self.ledger = ledger
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.ledger.assigned(self.name, [tp.partition for tp in partitions])

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        self.ledger.revoked(self.name, [tp.partition for tp in partitions])

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                message = self.consumer.poll(0.1)
                if message is None:
                    continue
                assert message.error() is None, message.error()
                self.ledger.processed(self.name, message.partition(), message.offset())
                try:
                    result = self.consumer.commit(message=message, asynchronous=False)
                except KafkaException:
                    continue  # revoked during a rebalance: not committed work
                for item in result or []:
                    if item.error is None and item.offset >= 0:
                        self.ledger.committed(item.partition, item.offset)
        except BaseException as error:
            self.failure = error
        finally:
            self.consumer.close()

    def leave(self) -> None:
        self.stop.set()
        self.join(WAIT_S)
        assert not self.is_alive()
        assert self.failure is None, self.failure


class PythonMember(ConfluentMember):
    """A kafka-python (classic protocol) consumer in its own thread."""

    def __init__(self, server: BrokerThread, topic: str, group: str, ledger: Ledger,
                 name: str) -> None:
        threading.Thread.__init__(self, daemon=True, name=name)
        self.ledger = ledger
        self.stop = threading.Event()
        self.failure = None
        self.topic = topic
        self.python = KafkaConsumer(
            bootstrap_servers=bootstrap(server), group_id=group, auto_offset_reset="earliest",
            enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=300,
            fetch_max_wait_ms=100, metadata_max_age_ms=500)
        member = self

        class Listener(ConsumerRebalanceListener):  # type: ignore[misc]
            def on_partitions_revoked(self, revoked: Any) -> None:
                member.ledger.revoked(member.name, [tp.partition for tp in revoked])

            def on_partitions_assigned(self, assigned: Any) -> None:
                member.ledger.assigned(member.name, [tp.partition for tp in assigned])

        self.python.subscribe([topic], listener=Listener())

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                batches = self.python.poll(timeout_ms=100)
                for tp, records in batches.items():
                    for record in records:
                        self.ledger.processed(self.name, tp.partition, record.offset)
                        offset = OffsetAndMetadata(record.offset + 1, "", -1)
                        try:
                            self.python.commit({PyTopicPartition(tp.topic, tp.partition):
                                                offset})
                        except KafkaError:  # revoked mid-rebalance: not committed work
                            break
                        self.ledger.committed(tp.partition, record.offset + 1)
        except BaseException as error:
            self.failure = error
        finally:
            self.python.close()


@pytest.mark.parametrize("strategy", ["range,roundrobin", "cooperative-sticky"])
def test_confluent_roll_classic_to_consumer_and_back(server: BrokerThread,
                                                     strategy: str) -> None:
    """Two classic members; each is replaced by a consumer-protocol member (the first
    arrival upgrades the group), then each of those by a classic member again (the last
    consumer-protocol member leaving downgrades it), all while records flow. Classic
    members rebalance eagerly (range) or incrementally (cooperative-sticky: they keep
    what they own across a rejoin and give up only what the server takes away)."""
    topic, group = unique("migrate"), unique("g")
    setup_group(server, topic, 4, group)
    produce(server, topic, 0, 200)
    ledger = Ledger()
    members: list[ConfluentMember] = []

    def add(name: str, protocol: str) -> None:
        member = ConfluentMember(server, topic, group, ledger, name, protocol, strategy)
        member.start()
        members.append(member)

    def roll(name: str, protocol: str, produced: int) -> None:
        add(name, protocol)
        ledger.wait_until(lambda: ledger.holds(name), f"{name} to be assigned partitions")
        produce(server, topic, produced, 100)
        ledger.wait_until(lambda: ledger.count(name) > 0, f"{name} to consume")
        members.pop(0).leave()

    add("classic-a", "classic")
    add("classic-b", "classic")
    ledger.wait_until(lambda: ledger.holds("classic-a") and ledger.holds("classic-b"),
                      "both classic members to be assigned partitions")
    produce(server, topic, 200, 100)
    ledger.wait_until(lambda: ledger.count("classic-a") and ledger.count("classic-b"),
                      "both classic members to consume")
    assert group_type(server, group) == "classic"
    roll("consumer-c", "consumer", 300)
    assert group_type(server, group) == "consumer"
    roll("consumer-d", "consumer", 400)
    roll("classic-e", "classic", 500)
    assert group_type(server, group) == "consumer"  # consumer-d is still in
    roll("classic-f", "classic", 600)
    assert group_type(server, group) == "classic"
    produce(server, topic, 700, 100)
    ledger.wait_until(lambda: ledger.total() >= 800, "every record committed")
    for member in members:
        member.leave()
    assert ledger.violations == []
    assert ledger.total() == 800


def test_kafka_python_classic_with_a_confluent_consumer_protocol_member(
        server: BrokerThread) -> None:
    """kafka-python classic members and a confluent-kafka group.protocol=consumer member
    share the group: the confluent member upgrades it, the classic members keep working
    through JoinGroup/SyncGroup/Heartbeat, and when the confluent member leaves the
    group goes back to classic with the kafka-python members consuming on."""
    topic, group = unique("migrate-py"), unique("g")
    setup_group(server, topic, 4, group)
    produce(server, topic, 0, 200)
    ledger = Ledger()
    python_members = [PythonMember(server, topic, group, ledger, "python-a")]
    python_members[0].start()
    ledger.wait_until(lambda: ledger.count("python-a") > 0, "python-a to consume")
    modern = ConfluentMember(server, topic, group, ledger, "consumer-b", "consumer")
    modern.start()
    ledger.wait_until(lambda: ledger.holds("consumer-b"), "consumer-b to be assigned")
    produce(server, topic, 200, 100)
    ledger.wait_until(lambda: ledger.count("consumer-b") > 0, "consumer-b to consume")
    assert group_type(server, group) == "consumer"
    python_members.append(PythonMember(server, topic, group, ledger, "python-c"))
    python_members[1].start()
    produce(server, topic, 300, 100)
    ledger.wait_until(lambda: ledger.total() >= 400, "records committed so far")
    modern.leave()
    assert group_type(server, group) == "classic"
    produce(server, topic, 400, 100)
    ledger.wait_until(lambda: ledger.total() >= 500, "every record committed")
    for member in python_members:
        member.leave()
    assert ledger.violations == []
    assert ledger.total() == 500
