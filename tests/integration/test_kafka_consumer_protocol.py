"""Goal: confluent-kafka consumers with group.protocol=consumer (KIP-848) work against
Conveyor as they do with the classic protocol.

Method: one BrokerThread per module; each test has its own topics and group, whose
consumer.heartbeat.interval.ms it lowers through a GROUP config (so reconciliation
takes a fraction of a second instead of Kafka's 5 s default). Covers join, consume,
commit, leave and resume (across a broker restart); two members keeping their epochs
and partitions across a broker restart (no rebalance); three members joining and one
leaving while each record is committed after processing, with no record handed out
below a committed offset; a regex subscription that picks up a topic created later;
the range assignor; and the group as AdminClient describes and lists it (and as
kafka-python's DescribeGroups v6 and OffsetFetch v8+ see it).
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from conveyor.testing.server import BrokerThread

# kafka-python 3 reads its schemas with importlib.resources.read_text, deprecated on 3.11.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka.admin import KafkaAdminClient
from tests.integration.test_kafka_confluent import Ledger

WAIT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("kip848") / "data"
    with BrokerThread(Path(data), listeners=("kafka",)) as running:
        yield running


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def admin(server: BrokerThread) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap(server)})


def fast_group(server: BrokerThread, group: str) -> None:
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=[
        ConfigEntry("consumer.heartbeat.interval.ms", "300",
                    incremental_operation=AlterConfigOpType.SET)])
    client = admin(server)  # kept alive until its futures resolve
    for future in client.incremental_alter_configs([resource]).values():
        future.result(timeout=WAIT_S)


def create_topic(server: BrokerThread, name: str, partitions: int) -> None:
    client = admin(server)
    for future in client.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(WAIT_S)


def produce_all(server: BrokerThread, topic: str, count: int) -> None:
    sender = Producer({"bootstrap.servers": bootstrap(server), "linger.ms": 5})
    for index in range(count):
        sender.produce(topic, key=b"key-%d" % index, value=b"value-%d" % index)
    assert sender.flush(WAIT_S) == 0


def consumer(server: BrokerThread, group: str, **config: Any) -> Consumer:
    return Consumer({
        "bootstrap.servers": bootstrap(server), "group.id": group,
        "group.protocol": "consumer", "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "fetch.wait.max.ms": 100,
        "topic.metadata.refresh.interval.ms": 500,
        **{name.replace("_", "."): value for name, value in config.items()},
    })


def consume(client: Consumer, count: int, timeout_s: float = WAIT_S) -> list[Message]:
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < count and time.monotonic() < deadline:
        message = client.poll(0.2)
        if message is None:
            continue
        assert message.error() is None, message.error()
        messages.append(message)
    return messages


def test_join_commit_leave_and_resume_across_a_restart(server: BrokerThread) -> None:
    topic, group = unique("kip848-resume"), unique("g")
    create_topic(server, topic, 2)
    fast_group(server, group)
    produce_all(server, topic, 40)
    first_reader = consumer(server, group)
    first_reader.subscribe([topic])
    first = consume(first_reader, 15)
    assert {tp.partition for tp in first_reader.assignment()} == {0, 1}
    first_reader.commit(asynchronous=False)
    first_reader.close()
    server.restart()
    second_reader = consumer(server, group)
    second_reader.subscribe([topic])
    second = consume(second_reader, 25)
    second_reader.commit(asynchronous=False)
    assert second_reader.poll(0.5) is None
    committed = second_reader.committed(
        [TopicPartition(topic, 0), TopicPartition(topic, 1)], WAIT_S)
    second_reader.close()
    seen = [(m.partition(), m.offset()) for m in first + second]
    assert len(seen) == len(set(seen)) == 40
    assert sum(tp.offset for tp in committed) == 40


def stored_epochs(server: BrokerThread, group: str) -> tuple[int, dict[str, int]]:
    """The group epoch and member epochs as the broker last wrote them to its store."""
    def read() -> tuple[int, dict[str, int]]:
        stored = server.server.broker.group_members.saved[("consumer", group)]
        return int(stored.state["epoch"]), {member_id: int(record["epoch"])
                                            for member_id, record in stored.members.items()}
    return server.call_sync(read)


def test_members_keep_their_assignments_across_a_broker_restart(server: BrokerThread) -> None:
    """The coordinator's restart is no rebalance: the members go on with their epochs
    and partitions (no revocation, no lost partitions, no new assignment), and read
    what is produced after the restart."""
    topic, group = unique("kip848-keep"), unique("g")
    create_topic(server, topic, 4)
    fast_group(server, group)
    events: list[tuple[int, str, list[int]]] = []
    readers = [consumer(server, group) for _ in range(2)]
    for index, reader in enumerate(readers):
        def record(kind: str, index: int = index) -> Any:
            def called(_: Consumer, partitions: list[TopicPartition]) -> None:
                if partitions:  # an empty change is no rebalance
                    events.append((index, kind, sorted(tp.partition for tp in partitions)))
            return called
        reader.subscribe([topic], on_assign=record("assign"), on_revoke=record("revoke"),
                         on_lost=record("lost"))

    def poll_all(count: int, seconds: float) -> list[Message]:
        got: list[Message] = []
        deadline = time.monotonic() + seconds
        while len(got) < count and time.monotonic() < deadline:
            for reader in readers:
                message = reader.poll(0.05)
                if message is not None:
                    assert message.error() is None, message.error()
                    got.append(message)
        return got

    def assignments() -> list[list[int]]:
        return sorted(sorted(tp.partition for tp in reader.assignment()) for reader in readers)

    try:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and (
                sorted(part for parts in assignments() for part in parts) != [0, 1, 2, 3]
                or [] in assignments()):
            poll_all(1, 0.2)
        produce_all(server, topic, 40)
        assert len(poll_all(40, WAIT_S)) == 40
        before, settled = stored_epochs(server, group), assignments()
        assert len(before[1]) == 2 and set(before[1].values()) == {before[0]}
        events.clear()
        server.restart()
        produce_all(server, topic, 40)
        after_restart = poll_all(40, WAIT_S)
        poll_all(1_000, 2.0)  # several heartbeats on the restarted broker
        assert len(after_restart) == 40
        assert events == [], "the restart made the members rebalance"
        assert assignments() == settled
        assert stored_epochs(server, group) == before
    finally:
        for reader in readers:
            reader.close()


class Member(threading.Thread):
    """One consumer in its own thread: poll, process, commit each record."""

    def __init__(self, server: BrokerThread, topic: str, group: str, ledger: Ledger,
                 **config: Any) -> None:
        super().__init__(daemon=True)
        self.consumer = consumer(server, group, **config)
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


def test_three_members_rebalance_without_lost_or_redone_work(server: BrokerThread) -> None:
    """Members commit each record after processing it. While two members join and the
    first leaves, no member is handed a record below an offset already committed for
    its partition, and in the end the committed offsets cover every record."""
    topic, group = unique("kip848-three"), unique("g")
    create_topic(server, topic, 6)
    fast_group(server, group)
    total = 600
    produce_all(server, topic, total // 2)
    ledger = Ledger()
    members = [Member(server, topic, group, ledger)]
    members[0].start()
    ledger.wait_until(lambda: ledger.count > 0)
    for _ in range(2):
        members.append(Member(server, topic, group, ledger))
        members[-1].start()
        ledger.wait_until(lambda: ledger.count > 50 * len(members))
    produce_all(server, topic, total // 2)
    members.pop(0).leave()
    ledger.wait_until(lambda: sum(ledger.committed_max.values()) >= total)
    client = admin(server)
    description = client.describe_consumer_groups([group])[group].result(WAIT_S)
    for member in members:
        member.leave()
    assert ledger.redone == [], "records below a committed offset were handed out again"
    assert ledger.total() == total
    assert len(description.members) == 2
    owned = [tp.partition for member in description.members
             for tp in member.assignment.topic_partitions]
    assert sorted(owned) == [0, 1, 2, 3, 4, 5]  # each partition owned once


def test_regex_subscription_follows_new_topics(server: BrokerThread) -> None:
    prefix, group = unique("rx"), unique("g")
    create_topic(server, f"{prefix}-a", 1)
    create_topic(server, f"{prefix}-b", 2)
    create_topic(server, f"other-{prefix}", 1)
    fast_group(server, group)
    for name in (f"{prefix}-a", f"{prefix}-b", f"other-{prefix}"):
        produce_all(server, name, 5)
    reader = consumer(server, group)
    reader.subscribe([f"^{prefix}-.*"])
    try:
        got = consume(reader, 10)
        assert sorted({m.topic() for m in got}) == [f"{prefix}-a", f"{prefix}-b"]
        create_topic(server, f"{prefix}-c", 1)
        produce_all(server, f"{prefix}-c", 3)
        later = consume(reader, 3)
        assert [m.topic() for m in later] == [f"{prefix}-c"] * 3
    finally:
        reader.close()


def test_range_assignor_gives_contiguous_ranges(server: BrokerThread) -> None:
    topic, group = unique("kip848-range"), unique("g")
    create_topic(server, topic, 4)
    fast_group(server, group)
    readers = [consumer(server, group, group_remote_assignor="range") for _ in range(2)]
    for reader in readers:
        reader.subscribe([topic])
    try:
        deadline = time.monotonic() + WAIT_S
        assignments: list[list[int]] = [[], []]
        while time.monotonic() < deadline:
            for reader in readers:
                reader.poll(0.1)
            assignments = [sorted(tp.partition for tp in reader.assignment())
                           for reader in readers]
            if sorted(assignments) == [[0, 1], [2, 3]]:
                break
        assert sorted(assignments) == [[0, 1], [2, 3]]
        client = admin(server)
        description = client.describe_consumer_groups([group])[group].result(WAIT_S)
        assert description.partition_assignor == "range"
        listed = client.list_consumer_groups().result(WAIT_S)
        assert group in {item.group_id for item in listed.valid}
        server.call(lambda: server.server.broker.commit_offsets(group, {(topic, 2): 4}))
        python_admin = KafkaAdminClient(bootstrap_servers=bootstrap(server))
        try:  # DescribeGroups v6 and OffsetFetch v8+, as kafka-python sends them
            described = python_admin.describe_groups([group])[group]
            assert described["group_state"] == "Dead"
            assert "GroupIdNotFound" in described["error"]
            offsets = python_admin.list_group_offsets(group)
            assert {(tp.topic, tp.partition): meta.offset
                    for tp, meta in offsets[group].items()} == {(topic, 2): 4}
        finally:
            python_admin.close()
    finally:
        for reader in readers:
            reader.close()


def test_upgrade_from_classic_and_back_resumes_at_the_committed_offsets(
        server: BrokerThread) -> None:
    """Offline migration, as Kafka allows it for an empty group: a classic group
    commits and leaves; the same group id with group.protocol=consumer resumes at its
    offsets, commits and leaves; a classic consumer then resumes after those."""
    topic, group = unique("kip848-upgrade"), unique("g")
    create_topic(server, topic, 2)
    fast_group(server, group)
    produce_all(server, topic, 30)
    seen: list[tuple[int, int]] = []
    for protocol, count in (("classic", 10), ("consumer", 10), ("classic", 10)):
        config: dict[str, Any] = {"group_protocol": protocol}
        if protocol == "classic":
            config["session_timeout_ms"] = 6000
        reader = consumer(server, group, **config)
        reader.subscribe([topic])
        got = consume(reader, count)
        reader.commit(asynchronous=False)
        reader.close()
        seen += [(m.partition(), m.offset()) for m in got]
    assert len(seen) == len(set(seen)) == 30
