"""Kafka over several Conveyor nodes: who leads, who coordinates, and refusals.

Owns: the Kafka side of conveyor/cluster. Metadata lists every live node and names
each partition's owner as its leader (the owner row's epoch is the leader epoch);
FindCoordinator names the group's owner (key type GROUP) or the transactional id's
owner (key type TRANSACTION). A request that reaches a node that does not own what it
names is answered NOT_LEADER_OR_FOLLOWER (Produce, Fetch) or NOT_COORDINATOR (group
requests, transaction requests), so the client refreshes its metadata and follows.
The group writes (OffsetCommit, a leader's SyncGroup, TxnOffsetCommit) are made only
while the owner row still holds (owner, epoch and a live lease, checked and locked
inside the write's own transaction, by the broker under the cluster's WriteGuard): a
node that lost the group while it was paused answers NOT_COORDINATOR instead of
writing.
Must not know: PostgreSQL (the view is conveyor.cluster.node.ClusterNode).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.authorization import default_value, refusal
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested

# classic groups, TxnOffsetCommit (28: sent to the group's coordinator, as in Kafka),
# KIP-848 consumer groups (68, 69), KIP-932 share groups (76, 77 and the share-group
# offset APIs 90, 91, 92) and DeleteGroups (42: its delete is written under the owner
# fence): served by the group's owner only
GROUP_APIS: Final = frozenset({8, 9, 11, 12, 13, 14, 28, 42, 68, 69, 76, 77, 90, 91, 92})
# the transaction coordinator's APIs: InitProducerId naming a transactional id,
# AddPartitionsToTxn, AddOffsetsToTxn, EndTxn, DescribeTransactions: served by the
# transactional id's owner only
TXN_APIS: Final = frozenset({22, 24, 25, 26, 65})
# answered per group: one entry each (the others: one top-level error code)
DESCRIBE_APIS: Final = frozenset({69, 77, 90})
# KIP-932 sends these to each partition's leader
SHARE_PARTITION_APIS: Final = frozenset({78, 79})


class KafkaCluster(Protocol):
    @property
    def node_id(self) -> int: ...
    def kafka_nodes(self) -> list[tuple[int, str, int]]: ...
    def partition_leader(self, topic: str, partition: int) -> tuple[int, int]: ...
    def group_coordinator(self, group_id: str) -> int: ...
    def txn_coordinator(self, transactional_id: str) -> int: ...
    async def serve_txn(self, transactional_id: str) -> bool: ...
    async def serve_partition(self, topic: str, partition: int) -> bool: ...
    async def serve_group(self, group_id: str) -> bool: ...
    async def refresh_catalog(self) -> None: ...
    def on_group_claimed(self, callback: Callable[[str], Awaitable[None]]) -> None: ...


def address_of(cluster: KafkaCluster, node_id: int) -> tuple[str, int] | None:
    for found, host, port in cluster.kafka_nodes():
        if found == node_id:
            return host, port
    return None


def _group_ids(request: Request) -> list[str]:
    body = request.body
    api_key = request.header.api_key
    if (api_key == 9 and request.header.api_version >= 8) or api_key == 90:
        return [item.group_id for item in body.groups]
    if api_key in (69, 77):
        return list(body.group_ids)
    if api_key == 42:
        return list(body.groups_names)
    return [body.group_id]


def _entity(cls: type[Any], code: int, **given: Any) -> Any:
    """``cls`` with ``given`` and every other required field at its empty value, the
    error code ``code``."""
    values: dict[str, Any] = dict(given)
    for item in dataclasses.fields(cls):
        has_default = (item.default is not dataclasses.MISSING
                       or item.default_factory is not dataclasses.MISSING)
        if item.name not in values and (
                not has_default or item.metadata.get("kafka_type") == "error_code"):
            values[item.name] = default_value(item, code)
    return build(cls, **values)


async def group_refusal(cluster: KafkaCluster, request: Request) -> Any | None:
    """NOT_COORDINATOR for a group request this node does not coordinate, else None."""
    api_key = request.header.api_key
    if api_key not in GROUP_APIS:
        return None
    refused = [group_id for group_id in _group_ids(request)
               if not await cluster.serve_group(group_id)]
    if not refused:
        return None
    version = request.header.api_version
    response_type = response_class(api_key, version)
    code = error_codes.NOT_COORDINATOR
    body = request.body
    if api_key in DESCRIBE_APIS:
        # every entry is refused (clients batch groups by coordinator, so a mixed
        # request comes from a stale lookup: they look each group up again)
        entry_type = nested(response_type, "DescribedGroup" if api_key != 90
                            else "DescribeShareGroupOffsetsResponseGroup")
        return build(response_type, groups=tuple(
            _entity(entry_type, code, group_id=group_id)
            for group_id in _group_ids(request)))
    if api_key in (68, 76, 91, 92):
        return refusal(api_key, version, code)
    if api_key == 42:  # every group refused, as for the describes above
        result_type = nested(response_type, "DeletableGroupResult")
        return _entity(response_type, error_codes.NONE, results=tuple(
            _entity(result_type, code, group_id=group_id)
            for group_id in _group_ids(request)))
    if api_key in (8, 28):
        prefix = "OffsetCommitResponse" if api_key == 8 else "TxnOffsetCommitResponse"
        topic_type = nested(response_type, f"{prefix}Topic")
        partition_type = nested(response_type, f"{prefix}Partition")
        return build(response_type, topics=tuple(
            build(topic_type, name=topic.name, partitions=tuple(
                build(partition_type, partition_index=partition.partition_index,
                      error_code=code) for partition in topic.partitions))
            for topic in body.topics))
    if api_key == 9 and version >= 8:
        group_type = nested(response_type, "OffsetFetchResponseGroup")
        return build(response_type, groups=tuple(
            build(group_type, group_id=item.group_id, topics=(), error_code=code)
            for item in body.groups))
    if api_key == 9 and version < 2:
        # no top-level error code before v2: every asked partition carries it
        topic_type = nested(response_type, "OffsetFetchResponseTopic")
        partition_type = nested(response_type, "OffsetFetchResponsePartition")
        return build(response_type, error_code=code, topics=tuple(
            build(topic_type, name=topic.name, partitions=tuple(
                build(partition_type, partition_index=index, committed_offset=-1,
                      committed_leader_epoch=-1, metadata="", error_code=code)
                for index in topic.partition_indexes))
            for topic in body.topics or ()))
    return build(response_type, error_code=code, topics=(), generation_id=-1,
                 protocol_type=None, protocol_name=None if version >= 7 else "",
                 leader="", member_id=getattr(body, "member_id", ""), members=(),
                 assignment=b"")


def _transactional_ids(request: Request) -> list[str]:
    body = request.body
    api_key = request.header.api_key
    if api_key == 22:
        return [] if body.transactional_id is None else [body.transactional_id]
    if api_key == 24:
        if request.header.api_version <= 3:
            return [body.v3_and_below_transactional_id]
        return [item.transactional_id for item in body.transactions]
    if api_key == 65:
        return list(body.transactional_ids)
    return [body.transactional_id]


async def txn_refusal(cluster: KafkaCluster, request: Request) -> Any | None:
    """NOT_COORDINATOR for a transaction request naming a transactional id this node
    does not coordinate, else None. A batched request (AddPartitionsToTxn v4+,
    DescribeTransactions) naming one such id is refused for every id it names (clients
    batch by coordinator, so a mixed one comes from a stale lookup)."""
    api_key = request.header.api_key
    if api_key not in TXN_APIS:
        return None
    names = _transactional_ids(request)
    refused = [name for name in names if not await cluster.serve_txn(name)]
    if not refused:
        return None
    version = request.header.api_version
    response_type = response_class(api_key, version)
    code = error_codes.NOT_COORDINATOR
    body = request.body
    if api_key == 22:
        return build(response_type, error_code=code, producer_id=-1, producer_epoch=-1)
    if api_key == 65:
        state_type = nested(response_type, "TransactionState")
        return build(response_type, transaction_states=tuple(
            build(state_type, error_code=code, transactional_id=name, transaction_state="",
                  transaction_timeout=0, transaction_start_time=0, producer_id=-1,
                  producer_epoch=-1, topics=()) for name in names))
    if api_key == 24:
        topic_type = nested(response_type, "AddPartitionsToTxnTopicResult")
        partition_type = nested(response_type, "AddPartitionsToTxnPartitionResult")

        def results(topics: Any) -> tuple[Any, ...]:
            return tuple(build(topic_type, name=topic.name, results_by_partition=tuple(
                build(partition_type, partition_index=partition, partition_error_code=code)
                for partition in topic.partitions)) for topic in topics)

        if version <= 3:
            return build(response_type,
                         results_by_topic_v3_and_below=results(body.v3_and_below_topics))
        result_type = nested(response_type, "AddPartitionsToTxnResult")
        return build(response_type, error_code=error_codes.NONE, results_by_transaction=tuple(
            build(result_type, transactional_id=item.transactional_id,
                  topic_results=results(item.topics)) for item in body.transactions))
    return refusal(api_key, version, code)


async def share_partition_refusal(cluster: KafkaCluster, request: Request,
                                  names: dict[uuid.UUID, str]) -> Any | None:
    """ShareFetch / ShareAcknowledge naming a partition this node does not lead: every
    partition of the request answers NOT_LEADER_OR_FOLLOWER (fetch and acknowledgement
    alike: nothing of it was done), with its leader and the leaders' endpoints, so the
    client refreshes its metadata and sends each partition to its leader."""
    api_key = request.header.api_key
    if api_key not in SHARE_PARTITION_APIS:
        return None
    body = request.body
    refused = False
    leaders: dict[tuple[uuid.UUID | None, int], tuple[int, int]] = {}
    for topic in body.topics:
        name = names.get(topic.topic_id) if topic.topic_id is not None else None
        for partition in topic.partitions:
            index = partition.partition_index
            if name is None:
                continue  # an unknown topic id: the handler answers UNKNOWN_TOPIC_ID
            if not await cluster.serve_partition(name, index):
                refused = True
            leaders[(topic.topic_id, index)] = cluster.partition_leader(name, index)
    if not refused:
        return None
    code = error_codes.NOT_LEADER_OR_FOLLOWER
    response_type = response_class(api_key, request.header.api_version)
    topic_type = nested(response_type, "ShareFetchableTopicResponse" if api_key == 78
                        else "ShareAcknowledgeTopicResponse")
    partition_type = nested(response_type, "PartitionData")
    leader_type = nested(response_type, "LeaderIdAndEpoch")
    endpoint_type = nested(response_type, "NodeEndpoint")
    extra: dict[str, Any] = {}
    if api_key == 78:
        extra = {"acknowledge_error_code": code, "records": b""}
    topics = []
    for topic in body.topics:
        partitions = []
        for partition in topic.partitions:
            leader, epoch = leaders.get((topic.topic_id, partition.partition_index), (-1, -1))
            partitions.append(_entity(
                partition_type, code, partition_index=partition.partition_index,
                current_leader=build(leader_type, leader_id=leader, leader_epoch=epoch),
                **extra))
        topics.append(build(topic_type, topic_id=topic.topic_id, partitions=tuple(partitions)))
    wanted = {leader for leader, _ in leaders.values()}
    endpoints = tuple(build(endpoint_type, node_id=node_id, host=host, port=port, rack=None)
                      for node_id, host, port in cluster.kafka_nodes() if node_id in wanted)
    return _entity(response_type, error_codes.NONE, responses=tuple(topics),
                   node_endpoints=endpoints, acquisition_lock_timeout=0)
