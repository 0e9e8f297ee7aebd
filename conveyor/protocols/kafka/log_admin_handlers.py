"""Handlers for the log and cluster admin APIs Kafka 4 clients call.

Owns: DeleteRecords (21), OffsetForLeaderEpoch (23), AlterReplicaLogDirs (34),
DescribeLogDirs (35), ElectLeaders (43), AlterPartitionReassignments (45),
ListPartitionReassignments (46), OffsetDelete (47), DescribeClientQuotas (48),
AlterClientQuotas (49), DescribeQuorum (55), DescribeProducers (61) and
DescribeTopicPartitions (75): typed request -> ``Broker`` call -> kio response.

Conveyor is one node (or stateless nodes over one store): every partition has one
replica, its leader (leader epoch 0 on one node, the owner row's epoch in a cluster),
so the answers are true for that shape — no reassignment is ever in progress, an
election has nothing to elect (ELECTION_NOT_NEEDED), and every leader epoch ends at
the log end (the log is never truncated when the leader changes). Conveyor is not
KRaft: its metadata lives in its state store, decided by this node alone, so
DescribeQuorum describes that: a quorum of one voter, this node, leader with epoch 0,
and no metadata log (its offsets and fetch times are -1, Kafka's "unknown").
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Final

from conveyor.errors import OperatingError, UnknownTopicError
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.admin_handlers import Node, topic_id
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker
    from conveyor.protocols.kafka.cluster_routing import KafkaCluster

AUTHORIZED_OPERATIONS_OMITTED: Final = -(2**31)
LOG_DIR: Final = "conveyor"  # one log directory per node, named by what it is
# DescribeTopicPartitions: Kafka's max.request.partition.size.limit default
PARTITIONS_PER_RESPONSE_MAX: Final = 2000
METADATA_TOPIC: Final = "__cluster_metadata"  # the KRaft metadata log DescribeQuorum names
UNKNOWN: Final = -1


def _code(error: OperatingError) -> int:
    return error_codes.error_code_for(error)


async def handle_delete_records(broker: Broker, request: Request) -> Any:
    response_type = response_class(21, request.header.api_version)
    topic_type = nested(response_type, "DeleteRecordsTopicResult")
    partition_type = nested(response_type, "DeleteRecordsPartitionResult")
    topics = []
    for topic in request.body.topics:
        partitions = []
        for item in topic.partitions:
            try:
                low = await broker.delete_records(topic.name, item.partition_index, item.offset)
                code = error_codes.NONE
            except OperatingError as error:
                low, code = -1, _code(error)
            partitions.append(build(partition_type, partition_index=item.partition_index,
                                    low_watermark=low, error_code=code))
        topics.append(build(topic_type, name=topic.name, partitions=tuple(partitions)))
    return build(response_type, topics=tuple(topics))


async def handle_offset_for_leader_epoch(broker: Broker, request: Request,
                                         cluster: KafkaCluster | None = None) -> Any:
    """Where a leader epoch ends. Conveyor's log is never truncated when its leader
    changes (one node, or the nodes' one PostgreSQL), so every epoch up to the current
    one ends at the log end: a client validating its position after a leader change
    finds no truncation. The current epoch is 0 on one node and the partition owner's
    epoch in a cluster (what Metadata reports); a client's newer current epoch is
    UNKNOWN_LEADER_EPOCH, an older one FENCED_LEADER_EPOCH, and a partition another
    node leads NOT_LEADER_OR_FOLLOWER, as Kafka answers them."""
    response_type = response_class(23, request.header.api_version)
    topic_type = nested(response_type, "OffsetForLeaderTopicResult")
    partition_type = nested(response_type, "EpochEndOffset")
    topics = []
    for topic in request.body.topics:
        partitions = []
        for item in topic.partitions:
            code, epoch, end = error_codes.NONE, -1, -1
            try:
                offsets = broker.offsets(topic.topic, item.partition)
                current = 0
                if cluster is not None:
                    if await cluster.serve_partition(topic.topic, item.partition):
                        current = cluster.partition_leader(topic.topic, item.partition)[1]
                    else:
                        code = error_codes.NOT_LEADER_OR_FOLLOWER
                if code != error_codes.NONE:
                    pass
                elif item.current_leader_epoch > current:
                    code = error_codes.UNKNOWN_LEADER_EPOCH
                elif 0 <= item.current_leader_epoch < current:
                    code = error_codes.FENCED_LEADER_EPOCH
                elif item.leader_epoch >= 0:
                    epoch, end = min(item.leader_epoch, current), offsets.high_watermark
            except OperatingError as error:
                code = _code(error)
            partitions.append(build(partition_type, error_code=code, partition=item.partition,
                                    leader_epoch=epoch, end_offset=end))
        topics.append(build(topic_type, topic=topic.topic, partitions=tuple(partitions)))
    return build(response_type, topics=tuple(topics))


def handle_describe_log_dirs(broker: Broker, request: Request) -> Any:
    response_type = response_class(35, request.header.api_version)
    result_type = nested(response_type, "DescribeLogDirsResult")
    topic_type = nested(response_type, "DescribeLogDirsTopic")
    partition_type = nested(response_type, "DescribeLogDirsPartition")
    requested = request.body.topics
    wanted: list[tuple[str, list[int]]] = []
    if requested is None:
        wanted = [(info.name, list(range(info.partitions))) for info in broker.list_topics()]
    else:
        for item in requested:
            info = broker.find_topic(item.topic)
            if info is not None:
                wanted.append((info.name, [p for p in item.partitions
                                           if 0 <= p < info.partitions]))
    topics = tuple(
        build(topic_type, name=name, partitions=tuple(
            build(partition_type, partition_index=index,
                  partition_size=broker.partition_size_bytes(name, index),
                  offset_lag=0, is_future_key=False)
            for index in indexes))
        for name, indexes in wanted)
    result = build(result_type, error_code=error_codes.NONE, log_dir=LOG_DIR, topics=topics,
                   total_bytes=-1, usable_bytes=-1)
    return build(response_type, error_code=error_codes.NONE, results=(result,))


def handle_elect_leaders(broker: Broker, request: Request) -> Any:
    response_type = response_class(43, request.header.api_version)
    topic_type = nested(response_type, "ReplicaElectionResult")
    partition_type = nested(response_type, "PartitionResult")
    requested = request.body.topic_partitions
    pairs = ([(info.name, list(range(info.partitions))) for info in broker.list_topics()]
             if requested is None else [(item.topic, list(item.partitions))
                                        for item in requested])
    results = []
    for name, indexes in pairs:
        info = broker.find_topic(name)
        partitions = tuple(
            build(partition_type, partition_id=index,
                  error_code=(error_codes.ELECTION_NOT_NEEDED
                              if info is not None and 0 <= index < info.partitions
                              else error_codes.UNKNOWN_TOPIC_OR_PARTITION),
                  error_message=None)
            for index in indexes)
        results.append(build(topic_type, topic=name, partition_result=partitions))
    return build(response_type, error_code=error_codes.NONE,
                 replica_election_results=tuple(results))


def handle_list_partition_reassignments(request: Request) -> Any:
    response_type = response_class(46, request.header.api_version)
    return build(response_type, error_code=error_codes.NONE, error_message=None, topics=())


async def handle_offset_delete(broker: Broker, request: Request,
                               subscribed: set[str]) -> Any:
    """``subscribed``: topics members of the group consume now (their offsets stay)."""
    body = request.body
    response_type = response_class(47, request.header.api_version)
    topic_type = nested(response_type, "OffsetDeleteResponseTopic")
    partition_type = nested(response_type, "OffsetDeleteResponsePartition")
    doomed: list[tuple[str, int]] = []
    answers: list[tuple[str, list[tuple[int, int]]]] = []
    for topic in body.topics:
        codes = []
        for item in topic.partitions:
            if topic.name in subscribed:
                codes.append((item.partition_index, error_codes.GROUP_SUBSCRIBED_TO_TOPIC))
            elif broker.find_topic(topic.name) is None:
                codes.append((item.partition_index, error_codes.UNKNOWN_TOPIC_OR_PARTITION))
            else:
                codes.append((item.partition_index, error_codes.NONE))
                doomed.append((topic.name, item.partition_index))
        answers.append((topic.name, codes))
    try:
        await broker.delete_committed_offsets(body.group_id, doomed)
    except OperatingError as error:
        return build(response_type, error_code=_code(error), topics=())
    topics = tuple(
        build(topic_type, name=name, partitions=tuple(
            build(partition_type, partition_index=index, error_code=code)
            for index, code in codes))
        for name, codes in answers)
    return build(response_type, error_code=error_codes.NONE, topics=topics)


def handle_describe_producers(broker: Broker, request: Request) -> Any:
    response_type = response_class(61, request.header.api_version)
    topic_type = nested(response_type, "TopicResponse")
    partition_type = nested(response_type, "PartitionResponse")
    state_type = nested(response_type, "ProducerState")
    topics = []
    for topic in request.body.topics:
        partitions = []
        for index in topic.partition_indexes:
            try:
                states = broker.producer_states(topic.name, index)
                code, message = error_codes.NONE, None
            except OperatingError as error:
                states, code, message = [], _code(error), error.message
            partitions.append(build(
                partition_type, partition_index=index, error_code=code, error_message=message,
                active_producers=tuple(
                    build(state_type, producer_id=producer_id, producer_epoch=epoch,
                          last_sequence=sequence, last_timestamp=-1, coordinator_epoch=-1,
                          current_txn_start_offset=-1)
                    for producer_id, epoch, sequence, _ in states)))
        topics.append(build(topic_type, name=topic.name, partitions=tuple(partitions)))
    return build(response_type, topics=tuple(topics))


def handle_describe_topic_partitions(broker: Broker, node: Node, request: Request) -> Any:
    """Topics in name order from the cursor on, at most ``response_partition_limit``
    partitions per answer; ``next_cursor`` names where the next page starts."""
    body = request.body
    response_type = response_class(75, request.header.api_version)
    topic_type = nested(response_type, "DescribeTopicPartitionsResponseTopic")
    partition_type = nested(response_type, "DescribeTopicPartitionsResponsePartition")
    cursor_type = nested(response_type, "Cursor")
    limit = max(1, min(body.response_partition_limit, PARTITIONS_PER_RESPONSE_MAX))
    names = sorted({item.name for item in body.topics} if body.topics
                   else {info.name for info in broker.list_topics()})
    start_name, start_index = ("", 0)
    if body.cursor is not None:
        start_name, start_index = body.cursor.topic_name, body.cursor.partition_index
    topics, left, next_cursor = [], limit, None
    for name in names:
        if name < start_name:
            continue
        try:
            info = broker.get_topic(name)
        except OperatingError as error:
            code = _code(error) if not isinstance(error, UnknownTopicError) else (
                error_codes.UNKNOWN_TOPIC_OR_PARTITION)
            topics.append(build(topic_type, error_code=code, name=name, topic_id=None,
                                is_internal=False, partitions=(),
                                topic_authorized_operations=AUTHORIZED_OPERATIONS_OMITTED))
            continue
        first = start_index if name == start_name else 0
        if left == 0:
            next_cursor = build(cursor_type, topic_name=name, partition_index=first)
            break
        indexes = list(range(first, info.partitions))
        if len(indexes) > left:
            next_cursor = build(cursor_type, topic_name=name, partition_index=first + left)
            indexes = indexes[:left]
        left -= len(indexes)
        topics.append(build(
            topic_type, error_code=error_codes.NONE, name=name, topic_id=topic_id(name),
            is_internal=False, topic_authorized_operations=AUTHORIZED_OPERATIONS_OMITTED,
            partitions=tuple(
                build(partition_type, error_code=error_codes.NONE, partition_index=index,
                      leader_id=node.node_id, leader_epoch=0, replica_nodes=(node.node_id,),
                      isr_nodes=(node.node_id,), eligible_leader_replicas=None,
                      last_known_elr=None, offline_replicas=())
                for index in indexes)))
        if next_cursor is not None:
            break
    return build(response_type, topics=tuple(topics), next_cursor=next_cursor)


def _partition_exists(broker: Broker, topic: str, partition: int) -> bool:
    info = broker.find_topic(topic)
    return info is not None and 0 <= partition < info.partitions


def handle_alter_replica_log_dirs(broker: Broker, request: Request) -> Any:
    """One log dir: moving a replica to it is a no-op, any other path LOG_DIR_NOT_FOUND."""
    response_type = response_class(34, request.header.api_version)
    topic_type = nested(response_type, "AlterReplicaLogDirTopicResult")
    partition_type = nested(response_type, "AlterReplicaLogDirPartitionResult")
    results = []
    for log_dir in request.body.dirs:
        for topic in log_dir.topics:
            partitions = tuple(
                build(partition_type, partition_index=index, error_code=(
                    error_codes.LOG_DIR_NOT_FOUND if log_dir.path != LOG_DIR
                    else error_codes.NONE if _partition_exists(broker, topic.name, index)
                    else error_codes.UNKNOWN_TOPIC_OR_PARTITION))
                for index in topic.partitions)
            results.append(build(topic_type, topic_name=topic.name, partitions=partitions))
    return build(response_type, results=tuple(results))


def handle_alter_partition_reassignments(broker: Broker, node: Node, request: Request) -> Any:
    """One replica per partition, this node: [node] is already so; cancelling finds
    nothing in progress; any other replica set is INVALID_REPLICA_ASSIGNMENT."""
    response_type = response_class(45, request.header.api_version)
    topic_type = nested(response_type, "ReassignableTopicResponse")
    partition_type = nested(response_type, "ReassignablePartitionResponse")
    responses = []
    for topic in request.body.topics:
        partitions = []
        for item in topic.partitions:
            code, message = error_codes.NONE, None
            if not _partition_exists(broker, topic.name, item.partition_index):
                code = error_codes.UNKNOWN_TOPIC_OR_PARTITION
            elif item.replicas is None:
                code, message = error_codes.NO_REASSIGNMENT_IN_PROGRESS, "nothing to cancel"
            elif tuple(item.replicas) != (node.node_id,):
                code, message = error_codes.INVALID_REPLICA_ASSIGNMENT, (
                    f"every partition has one replica, node {node.node_id}")
            partitions.append(build(partition_type, partition_index=item.partition_index,
                                    error_code=code, error_message=message))
        responses.append(build(topic_type, name=topic.name, partitions=tuple(partitions)))
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 responses=tuple(responses))


def handle_describe_client_quotas(request: Request) -> Any:
    """Conveyor enforces no client quotas (its push-back is memory and disk based), so
    none is set for any entity."""
    response_type = response_class(48, request.header.api_version)
    return build(response_type, error_code=error_codes.NONE, error_message=None, entries=())


def handle_alter_client_quotas(request: Request) -> Any:
    response_type = response_class(49, request.header.api_version)
    entry_type = nested(response_type, "EntryData")
    entity_type = nested(response_type, "EntityData")
    return build(response_type, entries=tuple(
        build(entry_type, error_code=error_codes.INVALID_REQUEST,
              error_message="client quotas are not supported",
              entity=tuple(build(entity_type, entity_type=item.entity_type,
                                 entity_name=item.entity_name) for item in entry.entity))
        for entry in request.body.entries))


def handle_describe_quorum(node: Node, request: Request) -> Any:
    """DescribeQuorum (55): the metadata quorum of one Conveyor node (one voter, leader
    itself). Partitions other than __cluster_metadata-0: UNKNOWN_TOPIC_OR_PARTITION."""
    version = request.header.api_version
    response_type = response_class(55, version)
    topic_type = nested(response_type, "TopicData")
    partition_type = nested(response_type, "PartitionData")
    voter = build(nested(response_type, "ReplicaState"), replica_id=node.node_id,
                  replica_directory_id=uuid.UUID(int=0), log_end_offset=UNKNOWN,
                  last_fetch_timestamp=UNKNOWN, last_caught_up_timestamp=UNKNOWN)
    topics = []
    for topic in request.body.topics:
        partitions = []
        for item in topic.partitions:
            if topic.topic_name == METADATA_TOPIC and item.partition_index == 0:
                partitions.append(build(
                    partition_type, partition_index=0, error_code=error_codes.NONE,
                    error_message=None, leader_id=node.node_id, leader_epoch=0,
                    high_watermark=UNKNOWN, current_voters=(voter,), observers=()))
                continue
            partitions.append(build(
                partition_type, partition_index=item.partition_index,
                error_code=error_codes.UNKNOWN_TOPIC_OR_PARTITION,
                error_message="the only quorum is __cluster_metadata-0", leader_id=UNKNOWN,
                leader_epoch=UNKNOWN, high_watermark=UNKNOWN, current_voters=(),
                observers=()))
        topics.append(build(topic_type, topic_name=topic.topic_name,
                            partitions=tuple(partitions)))
    nodes: tuple[Any, ...] = ()
    if version >= 2:
        listener = build(nested(response_type, "Listener"), name="PLAINTEXT", host=node.host,
                         port=node.port)
        nodes = (build(nested(response_type, "Node"), node_id=node.node_id,
                       listeners=(listener,)),)
    return build(response_type, error_code=error_codes.NONE, error_message=None,
                 topics=tuple(topics), nodes=nodes)
