"""Goal: Kafka transactions work with confluent-kafka (librdkafka) unchanged, and what a
read_committed reader sees is exactly what was committed.

Method: one BrokerThread per module; a transactional confluent-kafka Producer commits
and aborts; read_committed and read_uncommitted Consumers read the result. Covers
commit, abort, a multi-partition commit, send_offsets_to_transaction (offsets visible
to the group only on commit), a second instance with the same transactional.id fencing
the first, the last stable offset holding read_committed readers back while a
transaction is open (ListOffsets and Fetch), a broker restart with a transaction open,
the coordinator's describe/list, what the broker's own decoded reads and shared groups
(AMQP / HTTP / SQS / share groups) see: committed records only, never a control record;
and a hanging transaction found and counted after a restart.
"""

from __future__ import annotations

import logging
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
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from conveyor.storage.log_api import AppendInfo, AppendRequest
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.testing.server import BrokerThread

WAIT_S = 30
FAST = {
    "topic.metadata.refresh.interval.ms": 1000,
    "socket.connection.setup.timeout.ms": 5000,
    "reconnect.backoff.max.ms": 200,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("txn") / "data",
                      listeners=("kafka",)) as running:
        yield running


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def create_topic(server: BrokerThread, name: str, partitions: int = 1) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap(server)})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(WAIT_S)


def transactional(server: BrokerThread, transactional_id: str, **config: Any) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap(server),
                         "transactional.id": transactional_id, "linger.ms": 5, **FAST,
                         **config})
    producer.init_transactions(WAIT_S)
    return producer


def consumer(server: BrokerThread, isolation: str = "read_committed",
             group: str | None = None, **config: Any) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap(server),
                     "group.id": group or unique("reader"), "auto.offset.reset": "earliest",
                     "enable.auto.commit": False, "isolation.level": isolation, **FAST,
                     **config})


def read_all(server: BrokerThread, topic: str, partitions: int = 1,
             isolation: str = "read_committed", idle_s: float = 2.0) -> list[bytes]:
    """Every value readable from the start, once nothing new came for ``idle_s``."""
    reader = consumer(server, isolation)
    reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    values: list[bytes] = []
    quiet_since = time.monotonic()
    try:
        while time.monotonic() - quiet_since < idle_s:
            message = reader.poll(0.2)
            if message is None:
                continue
            if message.error():
                if message.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(message.error())
            values.append(message.value())
            quiet_since = time.monotonic()
    finally:
        reader.close()
    return values


def test_commit_and_abort(server: BrokerThread) -> None:
    topic = unique("txn")
    create_topic(server, topic)
    producer = transactional(server, unique("tid"))
    producer.begin_transaction()
    for number in range(5):
        producer.produce(topic, f"committed {number}".encode())
    producer.commit_transaction(WAIT_S)
    producer.begin_transaction()
    for number in range(3):
        producer.produce(topic, f"aborted {number}".encode())
    producer.flush(WAIT_S)
    producer.abort_transaction(WAIT_S)
    producer.begin_transaction()
    producer.produce(topic, b"after")
    producer.commit_transaction(WAIT_S)

    committed = read_all(server, topic)
    assert committed == [f"committed {n}".encode() for n in range(5)] + [b"after"]
    everything = read_all(server, topic, isolation="read_uncommitted")
    assert [v for v in everything if v.startswith(b"aborted")] == [
        f"aborted {n}".encode() for n in range(3)]
    # three markers: 5 + 1 + 3 + 1 + 1 + 1 offsets in all
    offsets = server.call_sync(server.server.broker.offsets, topic, 0)
    assert offsets.high_watermark == 5 + 1 + 3 + 1 + 1 + 1


def test_multi_partition_commit(server: BrokerThread) -> None:
    topic = unique("txn-multi")
    create_topic(server, topic, partitions=3)
    producer = transactional(server, unique("tid"))
    producer.begin_transaction()
    for number in range(30):
        producer.produce(topic, f"v{number}".encode(), partition=number % 3)
    producer.commit_transaction(WAIT_S)
    assert sorted(read_all(server, topic, partitions=3)) == sorted(
        f"v{n}".encode() for n in range(30))


def test_open_transaction_holds_read_committed_back(server: BrokerThread) -> None:
    topic = unique("txn-lso")
    create_topic(server, topic)
    plain = Producer({"bootstrap.servers": bootstrap(server), **FAST})
    plain.produce(topic, b"before")
    plain.flush(WAIT_S)
    producer = transactional(server, unique("tid"))
    producer.begin_transaction()
    producer.produce(topic, b"pending")
    producer.flush(WAIT_S)
    plain.produce(topic, b"plain after")  # non-transactional, but past the LSO
    plain.flush(WAIT_S)

    watcher = consumer(server)
    low, high = watcher.get_watermark_offsets(TopicPartition(topic, 0), WAIT_S)
    assert (low, high) == (0, 1)  # read_committed: the high mark is the LSO
    watcher.close()
    assert read_all(server, topic, idle_s=1.0) == [b"before"]
    assert read_all(server, topic, isolation="read_uncommitted", idle_s=1.0) == [
        b"before", b"pending", b"plain after"]
    # the broker's own reads (AMQP, HTTP, queues, shared groups) stop at the LSO too
    records = server.call(server.server.broker.read_records, topic, 0, 0, 100)
    assert [r.value for r in records] == [b"before"]

    producer.commit_transaction(WAIT_S)
    assert read_all(server, topic) == [b"before", b"pending", b"plain after"]
    records = server.call(server.server.broker.read_records, topic, 0, 0, 100)
    assert [r.value for r in records] == [b"before", b"pending", b"plain after"]


def test_decoded_reads_skip_aborted_and_markers(server: BrokerThread) -> None:
    topic = unique("txn-decoded")
    create_topic(server, topic)
    producer = transactional(server, unique("tid"))
    producer.begin_transaction()
    producer.produce(topic, b"gone")
    producer.flush(WAIT_S)
    producer.abort_transaction(WAIT_S)
    producer.begin_transaction()
    producer.produce(topic, b"kept")
    producer.commit_transaction(WAIT_S)
    records = server.call(server.server.broker.read_records, topic, 0, 0, 100)
    assert [r.value for r in records] == [b"kept"]


def test_send_offsets_to_transaction(server: BrokerThread) -> None:
    source, sink = unique("src"), unique("sink")
    create_topic(server, source)
    create_topic(server, sink)
    plain = Producer({"bootstrap.servers": bootstrap(server), **FAST})
    for number in range(10):
        plain.produce(source, f"in {number}".encode())
    plain.flush(WAIT_S)

    group = unique("ctp")
    reader = consumer(server, group=group)
    reader.subscribe([source])
    producer = transactional(server, unique("tid"))
    seen: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    while len(seen) < 10 and time.monotonic() < deadline:
        message = reader.poll(0.5)
        if message is not None and not message.error():
            seen.append(message)
    assert len(seen) == 10

    def committed() -> int:
        found = reader.committed([TopicPartition(source, 0)], WAIT_S)[0].offset
        return int(found)

    # an aborted transaction's offsets never reach the group
    producer.begin_transaction()
    producer.produce(sink, b"out aborted")
    producer.send_offsets_to_transaction(
        [TopicPartition(source, 0, 5)], reader.consumer_group_metadata(), WAIT_S)
    producer.abort_transaction(WAIT_S)
    assert committed() < 0
    # a committed one's do, with its outputs
    producer.begin_transaction()
    for message in seen:
        producer.produce(sink, b"out " + message.value())
    producer.send_offsets_to_transaction(
        [TopicPartition(source, 0, seen[-1].offset() + 1)], reader.consumer_group_metadata(),
        WAIT_S)
    # not before the commit (the broker's own view: a read_committed consumer asks for
    # stable offsets and is told to retry while the transaction is open, KIP-447)
    broker = server.server.broker
    assert server.call_sync(broker.fetch_offsets, group, [(source, 0)]) == {(source, 0): None}
    producer.commit_transaction(WAIT_S)
    assert committed() == 10
    reader.close()
    assert read_all(server, sink) == [b"out in " + str(n).encode() for n in range(10)]


def test_second_instance_fences_the_first(server: BrokerThread) -> None:
    topic = unique("txn-fence")
    create_topic(server, topic)
    transactional_id = unique("tid")
    first = transactional(server, transactional_id)
    first.begin_transaction()
    first.produce(topic, b"zombie")
    first.flush(WAIT_S)
    second = transactional(server, transactional_id)  # aborts the first's transaction
    second.begin_transaction()
    second.produce(topic, b"successor")
    second.commit_transaction(WAIT_S)

    with pytest.raises(KafkaException) as raised:
        first.produce(topic, b"late zombie")
        first.commit_transaction(WAIT_S)
    error = raised.value.args[0]
    assert error.fatal()
    assert error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED,
                            KafkaError.INVALID_PRODUCER_EPOCH)
    assert read_all(server, topic) == [b"successor"]


def test_describe_and_list_transactions(server: BrokerThread) -> None:
    topic = unique("txn-admin")
    create_topic(server, topic)
    transactional_id = unique("tid")
    producer = transactional(server, transactional_id)
    producer.begin_transaction()
    producer.produce(topic, b"x")
    producer.flush(WAIT_S)
    description = server.call_sync(server.server.broker.describe_transaction,
                                   transactional_id)
    assert description is not None and description.state == "Ongoing"
    assert description.partitions == ((topic, 0),)
    listed = server.call_sync(server.server.broker.list_transactions, ["Ongoing"])
    assert transactional_id in {item.transactional_id for item in listed}
    producer.commit_transaction(WAIT_S)
    description = server.call_sync(server.server.broker.describe_transaction,
                                   transactional_id)
    assert description is not None and description.state == "CompleteCommit"


def test_restart_with_open_transaction(tmp_path: Path) -> None:
    """An open transaction survives a restart (its partitions stay held at the LSO) and
    is then committed by its producer; the aborted index is rebuilt from the log."""
    with BrokerThread(tmp_path / "data", listeners=("kafka",)) as running:
        topic = unique("txn-restart")
        create_topic(running, topic)
        transactional_id = unique("tid")
        producer = transactional(running, transactional_id)
        producer.begin_transaction()
        producer.produce(topic, b"aborted before restart")
        producer.flush(WAIT_S)
        producer.abort_transaction(WAIT_S)
        producer.begin_transaction()
        producer.produce(topic, b"open across restart")
        producer.flush(WAIT_S)
        running.restart()
        assert running.call_sync(running.server.broker.last_stable_offset, topic, 0) == 2
        assert read_all(running, topic, idle_s=1.0) == []
        producer.commit_transaction(WAIT_S)
        assert read_all(running, topic) == [b"open across restart"]
        records = running.call(running.server.broker.read_records, topic, 0, 0, 100)
        assert [r.value for r in records] == [b"open across restart"]


def test_shared_group_delivers_committed_records_only(server: BrokerThread) -> None:
    """A shared group on the topic (what AMQP, SQS and HTTP consumers and Kafka share
    groups read through) gets committed records only, once the transaction ended."""
    topic = unique("txn-shared")
    create_topic(server, topic)
    broker = server.server.broker
    server.call(broker.create_shared_group, topic, "workers", None, "earliest")
    producer = transactional(server, unique("tid"))
    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.flush(WAIT_S)
    producer.abort_transaction(WAIT_S)
    producer.begin_transaction()
    producer.produce(topic, b"committed")
    producer.flush(WAIT_S)
    # still open: nothing to deliver (the record is past the last stable offset)
    assert server.call(broker.acquire, topic, "workers", 10) == []
    producer.commit_transaction(WAIT_S)
    deliveries = server.call(broker.acquire, topic, "workers", 10, None, 5000)
    assert [d.value for d in deliveries] == [b"committed"]
    server.call(broker.ack, [d.receipt for d in deliveries])
    assert server.call(broker.acquire, topic, "workers", 10) == []


def test_hanging_transaction_reported(tmp_path: Path) -> None:
    """An open transaction in a log that the coordinator does not account for (here a
    transactional batch written straight to the log, as no produce can) is found when the
    index is rebuilt, logged and counted."""
    with BrokerThread(tmp_path / "data", listeners=("kafka",)) as running:
        topic = unique("txn-hang")
        create_topic(running, topic)
        producer = transactional(running, unique("tid"))
        producer.begin_transaction()
        producer.produce(topic, b"registers the partition")
        producer.commit_transaction(WAIT_S)
        stray = build_batch([RecordData(None, b"stray", (), 1000)], producer_id=4242,
                            producer_epoch=0, base_sequence=0, is_transactional=True)
        [written] = running.call(running.server.broker.log_store.append,
                                 [AppendRequest(topic, 0, stray)])
        assert isinstance(written, AppendInfo), written
        running.restart()
        broker = running.server.broker
        hanging = running.call_sync(broker.transactions.check_hanging)
        assert hanging == [(topic, 0, 4242, 2)]
        assert running.call_sync(broker.stats).transactions_hanging == 1
        assert running.call_sync(broker.last_stable_offset, topic, 0) == 2


def test_request_log_shows_requests_and_their_error_codes(
        server: BrokerThread, caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, ``conveyor.kafka.requests`` logs every request (Produce and Fetch aside)
    and the error codes of its answer: how a broker log shows what a stalled client last
    asked and was told (docs/kafka.md, "librdkafka and a restarted broker")."""
    caplog.set_level(logging.DEBUG, logger="conveyor.kafka.requests")
    topic = unique("txn-log")
    create_topic(server, topic)
    transactional_id = unique("tid")
    first = transactional(server, transactional_id)
    transactional(server, transactional_id)  # a second instance fences the first
    first.begin_transaction()
    first.produce(topic, b"fenced")
    with pytest.raises(KafkaException):
        first.commit_transaction(WAIT_S)
    lines = [record.getMessage() for record in caplog.records
             if record.name == "conveyor.kafka.requests"]
    assert any(line.startswith("request rdkafka api 22 ") for line in lines)  # InitProducerId
    fenced = [line for line in lines if line.startswith("answer api 24 ")]  # AddPartitions
    assert fenced and fenced[-1].endswith(("error codes [INVALID_PRODUCER_EPOCH 47]",
                                           "error codes [PRODUCER_FENCED 90]")), fenced
    assert not any(" api 0 " in line or " api 1 " in line for line in lines)
