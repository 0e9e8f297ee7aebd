"""Goal: kafka-python 3 works against Conveyor unchanged.

Method: one BrokerThread per module. Produce (idempotent by default in
kafka-python 3, acks=all) and consume across partitions with keys and headers;
every compression codec; a three-member eager (range) group rebalancing on
join/leave with no committed record handed out again and none lost; commit and
broker restart resuming at the committed offset; seek and offsets_for_times;
admin create/describe/delete topics and groups.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

from conveyor.testing.server import BrokerThread

# kafka-python 3 reads its schemas with importlib.resources.read_text, deprecated on 3.11;
# the warning is attributed to importlib, so pyproject's kafka.* filter misses it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType, NewPartitions, NewTopic
    from kafka.errors import CommitFailedError, KafkaError, TopicAlreadyExistsError

WAIT_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    with BrokerThread(tmp_path_factory.mktemp("kafka-python") / "data",
                      listeners=("kafka",)) as running:
        yield running


@pytest.fixture(scope="module")
def admin(server: BrokerThread) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=bootstrap(server))
    yield client
    client.close()


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def producer(server: BrokerThread, **config: Any) -> KafkaProducer:
    return KafkaProducer(bootstrap_servers=bootstrap(server), acks="all", linger_ms=5,
                         metadata_max_age_ms=1000, **config)


def consumer(server: BrokerThread, group: str | None, **config: Any) -> KafkaConsumer:
    return KafkaConsumer(
        bootstrap_servers=bootstrap(server), group_id=group, auto_offset_reset="earliest",
        enable_auto_commit=False, session_timeout_ms=6000, heartbeat_interval_ms=300,
        fetch_max_wait_ms=100, metadata_max_age_ms=1000, **config,
    )


def poll_records(client: KafkaConsumer, count: int) -> list[Any]:
    records: list[Any] = []
    deadline = time.monotonic() + WAIT_S
    while len(records) < count and time.monotonic() < deadline:
        for batch in client.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


def create(admin: KafkaAdminClient, topic: str, partitions: int) -> None:
    admin.create_topics([NewTopic(topic, partitions, 1)])


def send_all(sender: KafkaProducer, topic: str, count: int, **extra: Any) -> None:
    for index in range(count):
        sender.send(topic, key=b"key-%d" % index, value=b"value-%d" % index, **extra)
    sender.flush(WAIT_S)


def test_produce_consume_across_partitions(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic = unique("kp-multi")
    create(admin, topic, 3)
    sender = producer(server)
    futures = [sender.send(topic, key=b"key-%d" % index, value=b"value-%d" % index,
                           headers=[("n", b"%d" % index)]) for index in range(60)]
    metadata = [future.get(WAIT_S) for future in futures]
    sender.close()
    assert {item.partition for item in metadata} == {0, 1, 2}
    reader = consumer(server, unique("g"))
    reader.subscribe([topic])
    records = poll_records(reader, 60)
    reader.close()
    assert len(records) == 60
    for record in records:
        index = int(record.key.split(b"-")[1])
        assert record.value == b"value-%d" % index
        assert record.headers == [("n", b"%d" % index)]


# kafka-python needs python-snappy / lz4 / zstandard for the other codecs; confluent-kafka
# covers every codec in test_kafka_confluent.py.
@pytest.mark.parametrize("codec", ["gzip"])
def test_every_compression_codec(server: BrokerThread, admin: KafkaAdminClient,
                                 codec: str) -> None:
    topic = unique(f"kp-{codec}")
    create(admin, topic, 1)
    sender = producer(server, compression_type=codec)
    send_all(sender, topic, 100)
    sender.close()
    reader = consumer(server, None)
    reader.assign([TopicPartition(topic, 0)])
    reader.seek_to_beginning()
    records = poll_records(reader, 100)
    reader.close()
    assert [record.value for record in records] == [b"value-%d" % i for i in range(100)]


def test_seek_and_offsets_for_times(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic = unique("kp-seek")
    create(admin, topic, 1)
    sender = producer(server)
    for index in range(10):
        sender.send(topic, value=b"%d" % index, timestamp_ms=5_000_000 + index * 100)
    sender.flush(WAIT_S)
    sender.close()
    reader = consumer(server, None)
    partition = TopicPartition(topic, 0)
    reader.assign([partition])
    found = reader.offsets_for_times({partition: 5_000_000 + 450})[partition]
    assert found is not None and found.offset == 5
    assert found.timestamp == 5_000_500  # the record's own timestamp, not the target
    reader.seek(partition, found.offset)
    assert poll_records(reader, 5)[0].value == b"5"
    reader.seek_to_beginning(partition)
    assert poll_records(reader, 1)[0].value == b"0"
    assert reader.end_offsets([partition])[partition] == 10
    assert reader.beginning_offsets([partition])[partition] == 0
    reader.close()


def test_commit_then_broker_restart_resumes(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic, group = unique("kp-resume"), unique("g")
    create(admin, topic, 2)
    sender = producer(server)
    send_all(sender, topic, 30)
    sender.close()
    reader = consumer(server, group)
    reader.subscribe([topic])
    first = poll_records(reader, 12)
    reader.commit()
    reader.close()
    server.restart()
    reader = consumer(server, group)
    reader.subscribe([topic])
    rest = poll_records(reader, 30 - len(first))
    assert not reader.poll(timeout_ms=500)
    reader.close()
    seen = [(record.partition, record.offset) for record in first + rest]
    assert len(seen) == len(set(seen)) == 30


class Member(threading.Thread):
    def __init__(self, server: BrokerThread, topic: str, group: str, ledger: Ledger) -> None:
        super().__init__(daemon=True)
        self.consumer = consumer(server, group, max_poll_interval_ms=10000)
        self.consumer.subscribe([topic])
        self.ledger = ledger
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                batches = self.consumer.poll(timeout_ms=100)
                if not batches:
                    continue
                for partition, records in batches.items():
                    for record in records:
                        self.ledger.processed(partition.partition, record.offset)
                try:  # commits the positions after everything just processed
                    self.consumer.commit()
                except (CommitFailedError, KafkaError):
                    continue
                for item in self.consumer.assignment():
                    committed = self.consumer.committed(item)
                    if committed is not None:
                        self.ledger.committed(item.partition, committed)
        except BaseException as error:
            self.failure = error
        finally:
            self.consumer.close()

    def leave(self) -> None:
        self.stop.set()
        self.join(WAIT_S)
        assert self.failure is None, self.failure


class Ledger:
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

    def committed(self, partition: int, offset: int) -> None:
        with self.lock:
            self.committed_max[partition] = max(self.committed_max.get(partition, 0), offset)
            self.lock.notify_all()

    def total(self) -> int:
        with self.lock:
            return sum(self.committed_max.values())

    def wait_until(self, condition: Any) -> None:
        """Block until ``condition()`` holds, woken by every update (no polling sleeps)."""
        with self.lock:
            self.lock.wait_for(condition, WAIT_S)


def test_three_member_eager_group(server: BrokerThread, admin: KafkaAdminClient) -> None:
    """Eager (range) rebalancing as members join and one leaves: no record below a
    committed offset is handed out again, and the commits end covering every record."""
    topic, group = unique("kp-group"), unique("g")
    create(admin, topic, 6)
    sender = producer(server)
    send_all(sender, topic, 150)
    ledger = Ledger()
    members = [Member(server, topic, group, ledger)]
    members[0].start()
    ledger.wait_until(lambda: ledger.count > 0)
    for _ in range(2):
        members.append(Member(server, topic, group, ledger))
        members[-1].start()
    send_all(sender, topic, 150)
    sender.close()
    members.pop(0).leave()
    ledger.wait_until(lambda: sum(ledger.committed_max.values()) >= 300)
    for member in members:
        member.leave()
    assert ledger.redone == []
    assert ledger.total() == 300


def test_admin_topics_configs_groups(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic = unique("kp-admin")
    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic(topic, 1, 1)], raise_errors=True)
    admin.create_partitions({topic: NewPartitions(3)})
    described = admin.describe_topics([topic])
    assert len(described[0]["partitions"]) == 3
    configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    assert "'compact'" in str(configs)
    # AlterConfigs (not the incremental API) replaces the whole set; kafka-python
    # re-sends the other dynamic (non-default) settings, so cleanup.policy survives.
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                        configs={"retention.ms": "3600000"})],
                        incremental=False)
    configs = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    assert "3600000" in str(configs) and "'compact'" in str(configs)
    group = unique("g")
    reader = consumer(server, group)
    reader.subscribe([topic])
    reader.poll(timeout_ms=500)
    reader.commit()
    reader.close()
    listed = str(admin.list_groups())
    assert group in listed
    assert group in str(admin.describe_groups([group]))
    admin.delete_groups([group])
    assert group not in str(admin.list_groups())
    admin.delete_topics([topic])
    assert topic not in admin.list_topics()
