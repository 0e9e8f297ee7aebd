"""Goal: the admin APIs Kafka 4 clients call answer truthfully for one Conveyor node.

Method: one BrokerThread per module; kafka-python's KafkaAdminClient, confluent-kafka's
AdminClient and aiokafka's AIOKafkaAdminClient call DeleteRecords (then read from the
new log start), DescribeLogDirs, ElectLeaders, ListPartitionReassignments,
DescribeTopicPartitions (paged with a cursor), DescribeProducers, OffsetDelete (refused
for a topic the group's members consume), ListGroups with a type filter, and
OffsetForLeaderEpoch (through a raw request: no client exposes it), DescribeQuorum.
DeleteRecords past the high watermark answers OFFSET_OUT_OF_RANGE; AlterReplicaLogDirs and
AlterPartitionReassignments accept only what one node already is. DescribeConfigs
gives broker configs with their real values and Kafka's types, and topic configs
with their synonyms.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import TopicPartition as AioTopicPartition
from confluent_kafka import ElectionType, KafkaException
from confluent_kafka import TopicPartition as ConfluentTopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ResourceType
from confluent_kafka.admin import ConfigResource as ConfluentConfigResource
from confluent_kafka.admin import NewTopic as NewTopicConfluent
from kio.schema.describe_quorum.v0.request import (
    DescribeQuorumRequest,
    PartitionData,
    TopicData,
)
from kio.schema.offset_for_leader_epoch.v4.request import (
    OffsetForLeaderEpochRequest,
    OffsetForLeaderPartition,
    OffsetForLeaderTopic,
)

from conveyor.protocols.kafka import error_codes
from conveyor.testing.server import BrokerThread
from tests.protocols.kafka.kafka_wire import parse_response, request_frame

# kafka-python 3 reads its schemas with importlib.resources.read_text, deprecated on 3.11;
# the warning is attributed to importlib, so pyproject's kafka.* filter misses it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
    from kafka.errors import OffsetOutOfRangeError

WAIT_S = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerThread]:
    data = tmp_path_factory.mktemp("admin4") / "data"
    with BrokerThread(Path(data), listeners=("kafka",)) as running:
        yield running


def bootstrap(server: BrokerThread) -> str:
    return f"127.0.0.1:{server.ports['kafka']}"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(server: BrokerThread) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=bootstrap(server))
    yield client
    client.close()


def topic_with_records(server: BrokerThread, admin: KafkaAdminClient, partitions: int,
                       per_partition: int) -> str:
    topic = unique("admin4")
    admin.create_topics([NewTopic(topic, partitions, 1)])
    if per_partition == 0:
        return topic
    producer = KafkaProducer(bootstrap_servers=bootstrap(server))
    for index in range(partitions * per_partition):
        producer.send(topic, b"v%d" % index, partition=index % partitions)
    producer.flush()
    producer.close()
    return topic


def test_delete_records_moves_the_log_start(server: BrokerThread,
                                            admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 2, 10)
    result = admin.delete_records({TopicPartition(topic, 0): 4})
    assert result[TopicPartition(topic, 0)]["low_watermark"] == 4
    earliest = admin.list_partition_offsets({TopicPartition(topic, 0): -2})
    assert earliest[TopicPartition(topic, 0)].offset == 4
    with pytest.raises(OffsetOutOfRangeError):
        admin.delete_records({TopicPartition(topic, 1): 11})
    confluent = AdminClient({"bootstrap.servers": bootstrap(server)})
    futures = confluent.delete_records([ConfluentTopicPartition(topic, 1, 6)])
    deleted = futures[ConfluentTopicPartition(topic, 1)].result(WAIT_S)
    assert deleted.low_watermark == 6
    reader = KafkaConsumer(bootstrap_servers=bootstrap(server), auto_offset_reset="earliest",
                           consumer_timeout_ms=3000)
    reader.assign([TopicPartition(topic, 1)])
    offsets = [message.offset for message in reader]
    reader.close()
    assert offsets == [6, 7, 8, 9]


def test_aiokafka_delete_records(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 1, 5)

    async def run() -> dict[AioTopicPartition, int]:
        client = AIOKafkaAdminClient(bootstrap_servers=bootstrap(server))
        await client.start()
        try:
            return await client.delete_records(
                {AioTopicPartition(topic, 0): RecordsToDelete(before_offset=3)})
        finally:
            await client.close()

    assert asyncio.run(run()) == {AioTopicPartition(topic, 0): 3}


def test_log_dirs_leaders_reassignments_producers(server: BrokerThread,
                                                  admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 3, 4)
    dirs = admin.describe_log_dirs()
    partitions = {item["partition_index"]: item["partition_size"]
                  for entry in dirs[0]["log_dirs"] for described in entry["topics"]
                  if described["name"] == topic for item in described["partitions"]}
    assert sorted(partitions) == [0, 1, 2] and all(size > 0 for size in partitions.values())
    assert admin.list_partition_reassignments() == {}
    producers = admin.describe_producers([TopicPartition(topic, 0)])
    states = producers[TopicPartition(topic, 0)].active_producers
    assert len(states) == 1 and states[0].last_sequence == 3  # 4 records, idempotent
    confluent = AdminClient({"bootstrap.servers": bootstrap(server)})
    elected = confluent.elect_leaders(ElectionType.PREFERRED,
                                      [ConfluentTopicPartition(topic, 0)]).result(WAIT_S)
    assert "ELECTION_NOT_NEEDED" in str(elected[ConfluentTopicPartition(topic, 0)])


def test_describe_topic_partitions_pages_with_a_cursor(server: BrokerThread,
                                                       admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 5, 0)
    first = admin.describe_topic_partitions([topic], response_partition_limit=3)
    assert [p["partition_index"] for p in first["topics"][0]["partitions"]] == [0, 1, 2]
    assert first["next_cursor"] == {"topic_name": topic, "partition_index": 3}
    second = admin.describe_topic_partitions([topic], response_partition_limit=3,
                                             cursor=first["next_cursor"])
    assert [p["partition_index"] for p in second["topics"][0]["partitions"]] == [3, 4]
    assert second["next_cursor"] is None


def test_offset_delete_and_list_groups_by_type(server: BrokerThread,
                                               admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 2, 3)
    group = unique("g")
    reader = KafkaConsumer(topic, bootstrap_servers=bootstrap(server), group_id=group,
                           auto_offset_reset="earliest", enable_auto_commit=False)
    received = 0
    while received < 6:
        received += sum(len(batch) for batch in reader.poll(1000).values())
    reader.commit()
    refused = admin.delete_group_offsets(group, [TopicPartition(topic, 0)])
    assert refused[TopicPartition(topic, 0)].__name__ == "GroupSubscribedToTopicError"
    reader.close()
    deleted = admin.delete_group_offsets(group, [TopicPartition(topic, 0)])
    assert deleted[TopicPartition(topic, 0)].__name__ == "NoError"
    remaining = admin.list_group_offsets({group: None})
    offsets = {tp.partition: value.offset for tp, value in remaining[group].items()}
    assert offsets == {1: 3}
    classic = admin.list_groups(types_filter=["classic"])
    assert group in {item["group_id"] for item in classic}
    assert group not in {item["group_id"] for item in admin.list_groups(types_filter=["share"])}


def test_offset_for_leader_epoch(server: BrokerThread, admin: KafkaAdminClient) -> None:
    """No client exposes it: a raw OffsetForLeaderEpoch v4. Epoch 0 ends at the log end;
    a current epoch newer than 0 is UNKNOWN_LEADER_EPOCH; an unknown topic its own code."""
    topic = topic_with_records(server, admin, 1, 7)
    request = OffsetForLeaderEpochRequest(replica_id=-1, topics=(
        OffsetForLeaderTopic(topic=topic, partitions=(
            OffsetForLeaderPartition(partition=0, current_leader_epoch=-1, leader_epoch=0),
            OffsetForLeaderPartition(partition=0, current_leader_epoch=3, leader_epoch=0))),
        OffsetForLeaderTopic(topic="missing", partitions=(
            OffsetForLeaderPartition(partition=0, current_leader_epoch=-1, leader_epoch=0),)),
    ))

    async def call() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
        writer.write(request_frame(request, 7))
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        payload = await reader.readexactly(size)
        writer.close()
        return payload

    _, answer = parse_response(asyncio.run(call()), 23, 4)
    ours, missing = answer.topics
    assert [(p.error_code, p.leader_epoch, p.end_offset) for p in ours.partitions] == [
        (error_codes.NONE, 0, 7), (error_codes.UNKNOWN_LEADER_EPOCH, -1, -1)]
    assert missing.partitions[0].error_code == error_codes.UNKNOWN_TOPIC_OR_PARTITION


def test_kafka_python_infers_4_2_and_lists_max_timestamp(server: BrokerThread,
                                                         admin: KafkaAdminClient) -> None:
    """ApiVersions advertises ListOffsets v11, so kafka-python infers Kafka 4.2; the
    v7+ lookups: MAX_TIMESTAMP (-3) finds the record with the largest timestamp,
    EARLIEST_LOCAL (-4) the log start, LATEST_TIERED (-5) nothing (no tiered storage)."""
    assert admin._manager.broker_version == (4, 2)
    topic = unique("admin4-times")
    admin.create_topics([NewTopic(topic, 1, 1)])
    producer = KafkaProducer(bootstrap_servers=bootstrap(server))
    for timestamp_ms in (1_000, 5_000, 3_000):
        producer.send(topic, b"v", timestamp_ms=timestamp_ms)
    producer.flush()
    producer.close()
    partition = TopicPartition(topic, 0)

    def lookup(spec: int) -> tuple[int, int]:
        found = admin.list_partition_offsets({partition: spec})[partition]
        return found.offset, found.timestamp

    assert lookup(-3) == (1, 5_000)
    assert lookup(-4) == (0, -1)
    assert lookup(-5) == (-1, -1)


def test_describe_configs_types_sources_synonyms(server: BrokerThread,
                                                 admin: KafkaAdminClient) -> None:
    """Broker configs carry their real values (advertised.listeners names this
    listener) as read-only static entries with Kafka's types; a topic config set on the
    topic names its broker-level synonym and default."""
    described = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")],
                                       config_filter="static")
    broker = described["broker"]["0"]
    assert broker["advertised.listeners"]["value"] == f"PLAINTEXT://{bootstrap(server)}"
    assert broker["num.partitions"]["config_type"] == "INT"
    assert broker["auto.create.topics.enable"]["config_type"] == "BOOLEAN"
    assert all(entry["read_only"] for entry in broker.values())
    # online classic <-> consumer conversion, as Kafka 4 by default (docs/kafka.md)
    assert broker["group.consumer.migration.policy"]["value"] == "bidirectional"
    topic = unique("admin4-configs")
    admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"retention.ms": "60000"})])
    entries = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)],
                                     include_synonyms=True)["topic"][topic]
    retention = entries["retention.ms"]
    assert (retention["value"], retention["config_type"]) == ("60000", "LONG")
    assert [(item["name"], item["source"]) for item in retention["synonyms"]] == [
        ("retention.ms", "DYNAMIC_TOPIC_CONFIG"), ("log.retention.ms", "DEFAULT_CONFIG")]
    every = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)],
                                   config_filter="all")["topic"][topic]
    assert every["min.insync.replicas"]["read_only"]  # a Kafka config with a fixed value
    assert every["compression.type"]["value"] == "producer"
    assert every["min.cleanable.dirty.ratio"]["config_type"] == "DOUBLE"
    confluent = AdminClient({"bootstrap.servers": bootstrap(server)})
    resource = ConfluentConfigResource(ResourceType.BROKER, "0")
    found = confluent.describe_configs([resource])[resource].result(WAIT_S)
    assert found["group.share.record.lock.duration.ms"].value == "30000"
    assert found["listeners"].is_read_only


def test_list_config_resources(server: BrokerThread, admin: KafkaAdminClient) -> None:
    topic = topic_with_records(server, admin, 1, 0)
    listed = admin.list_config_resources(["TOPIC", "BROKER"])
    assert topic in listed["topic"] and listed["broker"] == ["0"]
    assert "group" not in listed


def test_replica_moves_on_one_node(server: BrokerThread, admin: KafkaAdminClient) -> None:
    """One node, one replica, one log dir: staying put succeeds, anything else is refused
    with Kafka's codes."""
    topic = topic_with_records(server, admin, 2, 0)
    moved = admin.alter_replica_log_dirs({(topic, 0, 0): "conveyor", (topic, 1, 0): "/elsewhere"})
    names = {key[1] if isinstance(key, tuple) else key.partition: value.__name__
             for key, value in moved.items()}
    assert names == {0: "NoError", 1: "LogDirNotFoundError"}
    result = admin.alter_partition_reassignments({TopicPartition(topic, 0): [0],
                                                  TopicPartition(topic, 1): [0, 1]})
    assert result[TopicPartition(topic, 0)] is None
    refused = result[TopicPartition(topic, 1)]
    assert refused.__name__ == "InvalidReplicationAssignmentError"  # code 39


def test_incremental_append_and_subtract(server: BrokerThread, admin: KafkaAdminClient) -> None:
    """APPEND/SUBTRACT work on list configs (cleanup.policy) and the topic judges the
    result: appending a value already there changes nothing, appending "compact" to
    "delete" is INVALID_CONFIG (one policy per topic); on a non-list config both are
    INVALID_CONFIG."""
    topic = topic_with_records(server, admin, 1, 0)
    confluent = AdminClient({"bootstrap.servers": bootstrap(server)})

    def alter(name: str, value: str, operation: AlterConfigOpType) -> str | None:
        resource = ConfluentConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
            ConfigEntry(name, value, incremental_operation=operation)])
        try:
            confluent.incremental_alter_configs([resource])[resource].result(WAIT_S)
        except KafkaException as error:
            return str(error.args[0].name())
        return None

    assert alter("cleanup.policy", "delete", AlterConfigOpType.APPEND) is None
    assert alter("cleanup.policy", "compact", AlterConfigOpType.SUBTRACT) is None
    assert alter("cleanup.policy", "compact", AlterConfigOpType.APPEND) == "INVALID_CONFIG"
    assert alter("retention.ms", "5", AlterConfigOpType.APPEND) == "INVALID_CONFIG"
    resource = ConfluentConfigResource(ResourceType.TOPIC, topic)
    found = confluent.describe_configs([resource])[resource].result(WAIT_S)
    assert found["cleanup.policy"].value == "delete"


def test_kafka_internal_topic_names_are_neither_listed_nor_created(
        server: BrokerThread, admin: KafkaAdminClient) -> None:
    """Conveyor keeps committed offsets in its state store: __consumer_offsets is not a
    topic, so a Metadata lookup (which auto-creates other names) or CreateTopics must not
    make a user topic of that name for offset-reading tools to misread."""
    confluent = AdminClient({"bootstrap.servers": bootstrap(server)})
    looked_up = confluent.list_topics(topic="__consumer_offsets", timeout=WAIT_S)
    assert looked_up.topics["__consumer_offsets"].error.code() == (
        error_codes.UNKNOWN_TOPIC_OR_PARTITION)
    assert confluent.list_topics(topic=unique("auto"), timeout=WAIT_S).topics  # others still
    created = confluent.create_topics([NewTopicConfluent("__consumer_offsets", 1, 1)])
    with pytest.raises(KafkaException) as refused:
        created["__consumer_offsets"].result(timeout=WAIT_S)
    assert refused.value.args[0].code() == error_codes.INVALID_TOPIC_EXCEPTION
    listed = set(admin.list_topics())
    assert "__consumer_offsets" not in listed
    assert all(not name.startswith("__") for name in confluent.list_topics(
        timeout=WAIT_S).topics)


def test_describe_quorum_is_one_voter(server: BrokerThread, admin: KafkaAdminClient) -> None:
    """kafka-python's describe_metadata_quorum (DescribeQuorum v2): one voter, this node,
    leading with epoch 0; no metadata log, so its offsets are -1. Another partition than
    __cluster_metadata-0 (raw v0 request) is UNKNOWN_TOPIC_OR_PARTITION."""
    quorum = admin.describe_metadata_quorum()
    (topic,) = quorum["topics"]
    (partition,) = topic["partitions"]
    assert topic["topic_name"] == "__cluster_metadata"
    assert (partition["leader_id"], partition["leader_epoch"], partition["error"]) == (0, 0,
                                                                                      None)
    assert [voter["replica_id"] for voter in partition["current_voters"]] == [0]
    assert partition["current_voters"][0]["log_end_offset"] == -1
    assert partition["observers"] == []
    (node,) = quorum["nodes"]
    assert node["node_id"] == 0 and node["listeners"][0]["port"] == server.ports["kafka"]
    request = DescribeQuorumRequest(topics=(
        TopicData(topic_name="__cluster_metadata", partitions=(PartitionData(
            partition_index=1),)),))

    async def call() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
        writer.write(request_frame(request, 9))
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        payload = await reader.readexactly(size)
        writer.close()
        return payload

    _, answer = parse_response(asyncio.run(call()), 55, 0)
    assert answer.error_code == error_codes.NONE
    assert answer.topics[0].partitions[0].error_code == error_codes.UNKNOWN_TOPIC_OR_PARTITION
