"""A read-process-write loop whose group and transactional id have different coordinators
(issue 12, docs/cluster.md "Transactions across nodes").

Goal: with confluent-kafka's ``send_offsets_to_transaction``, the offsets of a committed
transaction are what OffsetFetch returns afterwards, the offsets of an aborted one never
are, and the records written are those of the committed transactions only. Before this
was built, the group's coordinator (another node) answered the TxnOffsetCommit with
INVALID_PRODUCER_ID_MAPPING.

Method: three ``conveyor serve`` nodes on one PostgreSQL; a transactional id that
rendezvous hashing gives to node 1 and a group it gives to node 2 (FindCoordinator, read
through the admin client's group description, confirms the group's); a consumer of the
group reads ``in`` (read_committed, no auto commit), a transactional producer writes each
batch it read to ``out`` tagged with the transaction's number and sends the consumer's
positions with the transaction. Transaction 2 is aborted, and the consumer rewinds to the
group's committed offsets, as an application does. The long form (``chaos``) SIGKILLs the
group's node between the produce and the commit of a transaction.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from conveyor.cluster.ownership import GROUP, TXN, choose_owner
from conveyor.testing.server import BrokerProcess
from tests.cluster.helpers import bootstrap, cluster, http_json, wait_for

PARTITIONS = 3
RECORDS_PER_PARTITION = 20
BATCH = 10  # records read and written per transaction
NODES = [1, 2, 3]


def name_owned_by(kind: str, prefix: str, owner: int) -> str:
    return next(f"{prefix}-{index}" for index in range(1000)
                if choose_owner(kind, f"{prefix}-{index}", NODES) == owner)


def seed_input(nodes: list[BrokerProcess]) -> None:
    for topic in ("in", "out"):
        http_json(nodes[0], "/topics", {"name": topic, "partitions": PARTITIONS})
    for node in nodes:
        wait_for(lambda node=node: {"in", "out"} <= {
            t["name"] for t in http_json(node, "/topics")["topics"]}, 10, "the topics")
    producer = Producer({"bootstrap.servers": bootstrap(nodes), "enable.idempotence": True})
    for partition in range(PARTITIONS):
        for index in range(RECORDS_PER_PARTITION):
            producer.produce("in", f"p{partition}-{index}".encode(), partition=partition)
    assert producer.flush(30) == 0


def group_coordinator(servers: str, group: str) -> int:
    admin = AdminClient({"bootstrap.servers": servers})
    found = admin.describe_consumer_groups([group])[group].result(30)
    return int(found.coordinator.id)


class Loop:
    """The application: read a batch, write it in a transaction with the positions."""

    def __init__(self, servers: str, group: str, transactional_id: str) -> None:
        self.consumer = Consumer({
            "bootstrap.servers": servers, "group.id": group, "enable.auto.commit": False,
            "auto.offset.reset": "earliest", "isolation.level": "read_committed",
            "session.timeout.ms": 10_000})
        self.consumer.subscribe(["in"])
        self.producer = Producer({
            "bootstrap.servers": servers, "transactional.id": transactional_id,
            "transaction.timeout.ms": 20_000, "request.timeout.ms": 5_000,
            "retry.backoff.max.ms": 500, "topic.metadata.refresh.interval.ms": 1000})
        self.producer.init_transactions(30)
        self.committed: list[str] = []  # "out" values of committed transactions
        self.aborted: list[str] = []

    def read_batch(self) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while len(found) < BATCH:
            assert time.monotonic() < deadline, f"read {len(found)} of {BATCH}"
            message = self.consumer.poll(0.5)
            if message is None or message.error() is not None:
                continue
            found.append((message.partition(), message.value().decode()))
        return found

    def positions(self) -> list[TopicPartition]:
        return [item for item in self.consumer.position(self.consumer.assignment())
                if item.offset >= 0]

    def transaction(self, number: int, abort: bool) -> dict[int, int]:
        batch = self.read_batch()
        self.producer.begin_transaction()
        values = [f"{value}@{number}" for _, value in batch]
        for (partition, _), value in zip(batch, values, strict=True):
            self.producer.produce("out", value.encode(), partition=partition)
        positions = self.positions()
        self.producer.send_offsets_to_transaction(
            positions, self.consumer.consumer_group_metadata(), 30)
        if abort:
            self.producer.abort_transaction(30)
            self.aborted += values
        else:
            commit(self.producer)
            self.committed += values
        return {item.partition: item.offset for item in positions}

    def rewind(self) -> None:
        """After an abort: back to the group's committed offsets (OffsetFetch), or to the
        start of a partition with none (auto.offset.reset earliest)."""
        for item in self.consumer.committed(self.consumer.assignment(), 30):
            self.consumer.seek(TopicPartition("in", item.partition, max(item.offset, 0)))

    def close(self) -> None:
        self.consumer.close()


def commit(producer: Producer) -> int:
    """commit_transaction, again while it fails retriably (a group's coordinator not
    reachable yet: the transaction stays PrepareCommit until it is told); how many
    times it failed so."""
    deadline = time.monotonic() + 60
    failed = 0
    while True:
        try:
            producer.commit_transaction(30)
            return failed
        except KafkaException as exception:
            if not exception.args[0].retriable() or time.monotonic() > deadline:
                raise
            failed += 1


def fetched(servers: str, group: str) -> dict[int, int]:
    """The group's committed offsets as OffsetFetch answers them (a consumer outside the
    group's members, librdkafka asking with require_stable)."""
    consumer = Consumer({"bootstrap.servers": servers, "group.id": group,
                         "enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        found = consumer.committed([TopicPartition("in", index)
                                    for index in range(PARTITIONS)], 30)
    finally:
        consumer.close()
    return {item.partition: item.offset for item in found if item.offset >= 0}


def read_out(servers: str) -> list[str]:
    consumer = Consumer({"bootstrap.servers": servers, "group.id": "checker",
                         "isolation.level": "read_committed", "enable.auto.commit": False,
                         "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition("out", index, 0) for index in range(PARTITIONS)])
    values: list[str] = []
    at_end: set[int] = set()
    deadline = time.monotonic() + 30
    try:
        while len(at_end) < PARTITIONS:
            assert time.monotonic() < deadline, f"partitions at their end: {sorted(at_end)}"
            message = consumer.poll(0.5)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(message.partition())
                continue
            at_end.discard(message.partition())
            values.append(message.value().decode())
    finally:
        consumer.close()
    return values


def check_output(loop: Loop, servers: str) -> None:
    values = read_out(servers)
    assert sorted(values) == sorted(loop.committed), "out holds other than the committed"
    sources = [value.partition("@")[0] for value in values]
    assert len(sources) == len(set(sources)), "an input record processed twice"


def test_read_process_write_with_the_group_on_another_node(tmp_path: Path,
                                                           postgres_dsn: str) -> None:
    group = name_owned_by(GROUP, "rpw-group", 2)
    transactional_id = name_owned_by(TXN, "rpw-txn", 1)
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        seed_input(nodes)
        servers = bootstrap(nodes)
        loop = Loop(servers, group, transactional_id)
        expected: dict[int, int] = {}  # per partition, the last committed position
        try:
            expected.update(loop.transaction(0, abort=False))
            assert group_coordinator(servers, group) == 2  # FindCoordinator's answer
            assert fetched(servers, group) == expected
            expected.update(loop.transaction(1, abort=False))
            assert fetched(servers, group) == expected
            aborted = loop.transaction(2, abort=True)
            assert aborted != {key: expected.get(key) for key in aborted}
            assert fetched(servers, group) == expected  # the aborted offsets never show
            loop.rewind()
            expected.update(loop.transaction(3, abort=False))
            expected.update(loop.transaction(4, abort=False))
            assert fetched(servers, group) == expected
            assert sum(expected.values()) == 4 * BATCH  # four committed batches, read once
        finally:
            loop.close()
        check_output(loop, servers)


@pytest.mark.chaos
def test_read_process_write_across_the_death_of_the_groups_node(
        tmp_path: Path, postgres_dsn: str) -> None:
    """The group's node is SIGKILLed after a transaction's records and offsets were sent
    and before its commit: the commit completes once the group's next owner (which
    reloads the pending offsets at its claim) is told, and OffsetFetch then returns them."""
    group = name_owned_by(GROUP, "rpw-group", 2)
    transactional_id = name_owned_by(TXN, "rpw-txn", 1)
    with cluster(tmp_path, postgres_dsn, 3) as nodes:
        seed_input(nodes)
        servers = bootstrap(nodes)
        loop = Loop(servers, group, transactional_id)
        try:
            loop.transaction(0, abort=False)
            batch = loop.read_batch()
            loop.producer.begin_transaction()
            values = [f"{value}@1" for _, value in batch]
            for (partition, _), value in zip(batch, values, strict=True):
                loop.producer.produce("out", value.encode(), partition=partition)
            positions = loop.positions()
            loop.producer.send_offsets_to_transaction(
                positions, loop.consumer.consumer_group_metadata(), 30)
            nodes[1].kill()
            started = time.monotonic()
            failed = commit(loop.producer)
            print(f"commit across the group node's death: {time.monotonic() - started:.1f} s,"
                  f" {failed} retriable failures")
            loop.committed += values
        finally:
            loop.close()
        survivors = bootstrap([nodes[0], nodes[2]])
        wait_for(lambda: fetched(survivors, group) == {
            item.partition: item.offset for item in positions}, 30,
            "the committed transaction's offsets at the group's new coordinator")
        check_output(loop, survivors)
