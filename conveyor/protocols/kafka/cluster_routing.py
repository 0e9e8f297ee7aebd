"""Kafka over several Conveyor nodes: who leads, who coordinates, and refusals.

Owns: the Kafka side of conveyor/cluster. Metadata lists every live node and names
each partition's owner as its leader (the owner row's epoch is the leader epoch);
FindCoordinator names the group's owner. A request that reaches a node that does not
own what it names is answered NOT_LEADER_OR_FOLLOWER (Produce, Fetch) or
NOT_COORDINATOR (group requests), so the client refreshes its metadata and follows.
An offset commit is written only while the owner row still holds (owner, epoch and
a live lease, checked and locked inside the commit's own transaction): a node that
lost the group while it was paused answers NOT_COORDINATOR instead of writing.
SyncGroup is checked against the owner row just before it writes (two statements).
Must not know: PostgreSQL (the view is conveyor.cluster.node.ClusterNode).
"""

from __future__ import annotations

from typing import Any, Final, Protocol

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.codec import Request
from conveyor.protocols.kafka.messages import response_class
from conveyor.protocols.kafka.responses import build, nested

GROUP_APIS: Final = frozenset({8, 9, 11, 12, 13, 14})
# SyncGroup writes group state: the owner row (owner, epoch, live lease) is checked on
# the database first, not only this node's view of its lease. OffsetCommit carries the
# same check inside its own write's transaction (GroupCoordinator.commit_guard).
FENCED_APIS: Final = frozenset({14})


class KafkaCluster(Protocol):
    @property
    def node_id(self) -> int: ...
    def kafka_nodes(self) -> list[tuple[int, str, int]]: ...
    def partition_leader(self, topic: str, partition: int) -> tuple[int, int]: ...
    def group_coordinator(self, group_id: str) -> int: ...
    async def serve_partition(self, topic: str, partition: int) -> bool: ...
    async def serve_group(self, group_id: str) -> bool: ...
    async def refresh_catalog(self) -> None: ...
    async def fence_group(self, group_id: str) -> bool: ...


def address_of(cluster: KafkaCluster, node_id: int) -> tuple[str, int] | None:
    for found, host, port in cluster.kafka_nodes():
        if found == node_id:
            return host, port
    return None


def _group_ids(request: Request) -> list[str]:
    body = request.body
    if request.header.api_key == 9 and request.header.api_version >= 8:
        return [item.group_id for item in body.groups]
    return [body.group_id]


async def group_refusal(cluster: KafkaCluster, request: Request) -> Any | None:
    """NOT_COORDINATOR for a group request this node does not coordinate, else None."""
    api_key = request.header.api_key
    if api_key not in GROUP_APIS:
        return None
    refused = [group_id for group_id in _group_ids(request)
               if not await cluster.serve_group(group_id)]
    if not refused and api_key in FENCED_APIS:  # a write: checked against the database
        refused = [group_id for group_id in _group_ids(request)
                   if not await cluster.fence_group(group_id)]
    if not refused:
        return None
    version = request.header.api_version
    response_type = response_class(api_key, version)
    code = error_codes.NOT_COORDINATOR
    body = request.body
    if api_key == 8:
        topic_type = nested(response_type, "OffsetCommitResponseTopic")
        partition_type = nested(response_type, "OffsetCommitResponsePartition")
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
