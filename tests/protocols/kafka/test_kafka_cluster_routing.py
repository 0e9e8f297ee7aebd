"""Kafka requests on a cluster node that does not own what they name (cluster_routing.py).

OffsetForLeaderEpoch answers with the owner's leader epoch (what Metadata reports).
KIP-848 consumer-group and KIP-932 share-group requests are answered NOT_COORDINATOR by
a node that does not coordinate the group; ShareFetch and ShareAcknowledge naming a
partition the node does not lead are answered NOT_LEADER_OR_FOLLOWER on every partition,
with the leader and its endpoint. Each answer goes through the codec and is parsed back
as the client would (the wire shape is checked, not only the objects).
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kafka_wire import parse_response

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.admin_handlers import Node, handle_find_coordinator, topic_id
from conveyor.protocols.kafka.cluster_routing import (
    group_refusal,
    share_partition_refusal,
    txn_refusal,
)
from conveyor.protocols.kafka.codec import Request, ServerCodec
from conveyor.protocols.kafka.framing import RequestHeader, is_flexible
from conveyor.protocols.kafka.log_admin_handlers import handle_offset_for_leader_epoch
from conveyor.protocols.kafka.messages import request_class
from conveyor.protocols.kafka.responses import nested

NOT_COORDINATOR = error_codes.NOT_COORDINATOR
NOT_LEADER = error_codes.NOT_LEADER_OR_FOLLOWER


class FakeCluster:
    """This node is 1; it owns the groups and leads the partitions it is given."""

    def __init__(self, groups: set[str], partitions: set[tuple[str, int]],
                 txns: frozenset[str] = frozenset()) -> None:
        self.groups = groups
        self.partitions = partitions
        self.txns = txns

    @property
    def node_id(self) -> int:
        return 1

    def kafka_nodes(self) -> list[tuple[int, str, int]]:
        return [(1, "h1", 9001), (2, "h2", 9002), (3, "h3", 9003)]

    def partition_leader(self, topic: str, partition: int) -> tuple[int, int]:
        return (1, 4) if (topic, partition) in self.partitions else (2, 7)

    def group_coordinator(self, group_id: str) -> int:
        return 1 if group_id in self.groups else 2

    async def serve_partition(self, topic: str, partition: int) -> bool:
        return (topic, partition) in self.partitions

    async def serve_group(self, group_id: str) -> bool:
        return group_id in self.groups

    def txn_coordinator(self, transactional_id: str) -> int:
        return 1 if transactional_id in self.txns else 3

    async def serve_txn(self, transactional_id: str) -> bool:
        return transactional_id in self.txns

    async def refresh_catalog(self) -> None:
        return None

    def on_group_claimed(self, callback: Callable[[str], Awaitable[None]]) -> None:
        return None


def request(api_key: int, version: int, **fields: Any) -> Request:
    header = RequestHeader(api_key, version, 7, "c", is_flexible(api_key, version))
    return Request(header, request_class(api_key, version)(**fields))


def wire(answer: Any, api_key: int, version: int) -> Any:
    """The answer encoded as the server sends it, parsed back as a client reads it."""
    header = RequestHeader(api_key, version, 7, "c", is_flexible(api_key, version))
    data = ServerCodec().send(header, answer)
    correlation_id, parsed = parse_response(bytes(data[4:]), api_key, version)
    assert correlation_id == 7
    return parsed


def group_requests() -> list[tuple[int, int, dict[str, Any]]]:
    share_offsets = nested(request_class(90, 1), "DescribeShareGroupOffsetsRequestGroup")
    return [
        (68, 1, {"group_id": "g", "member_id": "m", "member_epoch": 0,
                 "topic_partitions": None, "rebalance_timeout": datetime.timedelta(0),
                 "subscribed_topic_names": ("t",)}),
        (69, 1, {"group_ids": ("g",), "include_authorized_operations": False}),
        (76, 1, {"group_id": "g", "member_id": "m", "member_epoch": 0,
                 "subscribed_topic_names": ("t",)}),
        (77, 1, {"group_ids": ("g",), "include_authorized_operations": False}),
        (90, 1, {"groups": (share_offsets(group_id="g", topics=None),)}),
        (91, 0, {"group_id": "g", "topics": ()}),
        (92, 0, {"group_id": "g", "topics": ()}),
        (42, 2, {"groups_names": ("g",)}),
    ]


@pytest.mark.parametrize(("api_key", "version", "fields"), group_requests())
async def test_kafka4_group_requests_go_to_the_coordinator(
        api_key: int, version: int, fields: dict[str, Any]) -> None:
    assert await group_refusal(FakeCluster({"g"}, set()), request(
        api_key, version, **fields)) is None  # the owner serves it
    answer = await group_refusal(FakeCluster(set(), set()), request(api_key, version, **fields))
    parsed = wire(answer, api_key, version)
    if api_key in (69, 77, 90):
        assert [(group.group_id, group.error_code) for group in parsed.groups] == [
            ("g", NOT_COORDINATOR)]
    elif api_key == 42:
        assert [(group.group_id, group.error_code) for group in parsed.results] == [
            ("g", NOT_COORDINATOR)]
    else:
        assert parsed.error_code == NOT_COORDINATOR


def share_fetch(partitions: list[int], names: uuid.UUID) -> Request:
    cls = request_class(78, 2)
    topic_type, partition_type = nested(cls, "FetchTopic"), nested(cls, "FetchPartition")
    return request(78, 2, group_id="g", member_id="m", share_session_epoch=0,
                   max_wait=datetime.timedelta(milliseconds=100), min_bytes=1,
                   max_bytes=1 << 20, max_records=10, batch_size=10,
                   topics=(topic_type(topic_id=names, partitions=tuple(
                       partition_type(partition_index=index, acknowledgement_batches=())
                       for index in partitions)),),
                   forgotten_topics_data=())


async def test_a_share_fetch_for_a_partition_led_elsewhere_names_its_leader() -> None:
    identifier = topic_id("t")
    names = {identifier: "t"}
    led_here = FakeCluster({"g"}, {("t", 0)})
    assert await share_partition_refusal(led_here, share_fetch([0], identifier), names) is None
    answer = await share_partition_refusal(led_here, share_fetch([0, 1], identifier), names)
    parsed = wire(answer, 78, 2)
    assert parsed.error_code == 0
    [topic] = parsed.responses
    assert [(p.partition_index, p.error_code, p.acknowledge_error_code,
             p.current_leader.leader_id, p.current_leader.leader_epoch)
            for p in topic.partitions] == [(0, NOT_LEADER, NOT_LEADER, 1, 4),
                                           (1, NOT_LEADER, NOT_LEADER, 2, 7)]
    assert sorted((e.node_id, e.host, e.port) for e in parsed.node_endpoints) == [
        (1, "h1", 9001), (2, "h2", 9002)]


async def test_a_share_acknowledge_to_a_non_leader_is_refused() -> None:
    identifier = topic_id("t")
    cls = request_class(79, 2)
    topic_type, partition_type = (nested(cls, "AcknowledgeTopic"),
                                  nested(cls, "AcknowledgePartition"))
    acknowledge = request(79, 2, group_id="g", member_id="m", share_session_epoch=2,
                          topics=(topic_type(topic_id=identifier, partitions=(
                              partition_type(partition_index=3, acknowledgement_batches=()),
                          )),))
    answer = await share_partition_refusal(FakeCluster({"g"}, set()), acknowledge,
                                           {identifier: "t"})
    parsed = wire(answer, 79, 2)
    [topic] = parsed.responses
    [partition] = topic.partitions
    assert (partition.error_code, partition.current_leader.leader_id) == (NOT_LEADER, 2)
    assert [e.node_id for e in parsed.node_endpoints] == [2]


class LogEnds:
    """The one broker call OffsetForLeaderEpoch makes: a partition's offsets."""

    def offsets(self, topic: str, partition: int) -> Any:
        return type("Offsets", (), {"high_watermark": 42})()


async def test_offset_for_leader_epoch_knows_the_cluster_epoch() -> None:
    """Metadata reports the owner row's epoch (4 here) as the leader epoch, so a client
    validating its position after a leader change asks with current epoch 4: it is
    answered (every epoch ends at the log end: a cluster's log is never truncated when
    its leader moves), a newer epoch is UNKNOWN_LEADER_EPOCH, an older one
    FENCED_LEADER_EPOCH, and a partition led elsewhere NOT_LEADER_OR_FOLLOWER. Before,
    any current epoch above 0 was UNKNOWN_LEADER_EPOCH and librdkafka retried it
    forever, never fetching that partition again."""
    cls = request_class(23, 4)
    topic_type, partition_type = nested(cls, "OffsetForLeaderTopic"), nested(
        cls, "OffsetForLeaderPartition")
    asked = [(0, 4, 0), (0, 4, 4), (0, 5, 0), (0, 3, 0), (1, 7, 0), (0, -1, 2)]
    body = request(23, 4, replica_id=-1, topics=(topic_type(topic="t", partitions=tuple(
        partition_type(partition=index, current_leader_epoch=current, leader_epoch=epoch)
        for index, current, epoch in asked)),))
    broker: Any = LogEnds()
    answer = await handle_offset_for_leader_epoch(broker, body, FakeCluster(set(), {("t", 0)}))
    parsed = wire(answer, 23, 4)
    assert [(p.error_code, p.leader_epoch, p.end_offset)
            for p in parsed.topics[0].partitions] == [
        (error_codes.NONE, 0, 42), (error_codes.NONE, 4, 42),
        (error_codes.UNKNOWN_LEADER_EPOCH, -1, -1), (error_codes.FENCED_LEADER_EPOCH, -1, -1),
        (NOT_LEADER, -1, -1), (error_codes.NONE, 2, 42)]


@pytest.mark.parametrize("version", [0, 3, 4, 5])
async def test_txn_offset_commit_goes_to_the_group_coordinator(version: int) -> None:
    """Kafka clients send TxnOffsetCommit to the group's coordinator: another node answers
    NOT_COORDINATOR on every partition (and writes nothing)."""
    cls = request_class(28, version)
    topic_type = nested(cls, "TxnOffsetCommitRequestTopic")
    partition_type = nested(cls, "TxnOffsetCommitRequestPartition")
    extra: dict[str, Any] = {}
    if version >= 3:
        extra = {"generation_id": -1, "member_id": "", "group_instance_id": None}
    epoch = {"committed_leader_epoch": -1} if version >= 2 else {}
    fields = {"transactional_id": "tx", "group_id": "g", "producer_id": 5,
              "producer_epoch": 0, **extra, "topics": (topic_type(name="t", partitions=tuple(
                  partition_type(partition_index=index, committed_offset=3,
                                 committed_metadata=None, **epoch)
                  for index in (0, 1))),)}
    assert await group_refusal(FakeCluster({"g"}, set()), request(28, version, **fields)) \
        is None
    answer = await group_refusal(FakeCluster(set(), set()), request(28, version, **fields))
    parsed = wire(answer, 28, version)
    assert [(topic.name, [(p.partition_index, p.error_code) for p in topic.partitions])
            for topic in parsed.topics] == [("t", [(0, NOT_COORDINATOR), (1, NOT_COORDINATOR)])]


def txn_requests() -> list[tuple[int, int, dict[str, Any]]]:
    v3_topic = nested(request_class(24, 3), "AddPartitionsToTxnTopic")
    v4 = request_class(24, 4)
    v4_topic = nested(v4, "AddPartitionsToTxnTopic")
    v4_transaction = nested(v4, "AddPartitionsToTxnTransaction")
    timeout = datetime.timedelta(seconds=60)
    return [
        (22, 4, {"transactional_id": "tx", "transaction_timeout": timeout,
                 "producer_id": -1, "producer_epoch": -1}),
        (24, 3, {"v3_and_below_transactional_id": "tx", "v3_and_below_producer_id": 5,
                 "v3_and_below_producer_epoch": 0,
                 "v3_and_below_topics": (v3_topic(name="t", partitions=(0, 1)),)}),
        (24, 4, {"transactions": (v4_transaction(
            transactional_id="tx", producer_id=5, producer_epoch=0, verify_only=True,
            topics=(v4_topic(name="t", partitions=(0, 1)),)),)}),
        (25, 3, {"transactional_id": "tx", "producer_id": 5, "producer_epoch": 0,
                 "group_id": "g"}),
        (26, 3, {"transactional_id": "tx", "producer_id": 5, "producer_epoch": 0,
                 "committed": True}),
        (65, 0, {"transactional_ids": ("tx",)}),
    ]


@pytest.mark.parametrize(("api_key", "version", "fields"), txn_requests())
async def test_transaction_requests_go_to_the_transaction_coordinator(
        api_key: int, version: int, fields: dict[str, Any]) -> None:
    owner = FakeCluster(set(), set(), frozenset({"tx"}))
    assert await txn_refusal(owner, request(api_key, version, **fields)) is None
    answer = await txn_refusal(FakeCluster({"g"}, set()), request(api_key, version, **fields))
    parsed = wire(answer, api_key, version)
    if api_key == 24:
        topics = (parsed.results_by_topic_v3_and_below if version <= 3
                  else parsed.results_by_transaction[0].topic_results)
        assert [(topic.name, [(p.partition_index, p.partition_error_code)
                              for p in topic.results_by_partition]) for topic in topics] == [
            ("t", [(0, NOT_COORDINATOR), (1, NOT_COORDINATOR)])]
    elif api_key == 65:
        assert [(state.transactional_id, state.error_code)
                for state in parsed.transaction_states] == [("tx", NOT_COORDINATOR)]
    else:
        assert parsed.error_code == NOT_COORDINATOR
    if api_key == 22:
        assert (parsed.producer_id, parsed.producer_epoch) == (-1, -1)


async def test_an_idempotent_init_producer_id_is_served_by_any_node() -> None:
    fields = {"transactional_id": None, "transaction_timeout": datetime.timedelta(0),
              "producer_id": -1, "producer_epoch": -1}
    assert await txn_refusal(FakeCluster(set(), set()), request(22, 4, **fields)) is None


@pytest.mark.parametrize("version", [1, 4])
async def test_find_coordinator_names_the_transactional_ids_owner(version: int) -> None:
    """Key type 1 (TRANSACTION) names the transactional id's owner, 0 the group's."""
    node = Node(node_id=1, host="h1", port=9001, cluster_id="c")
    cluster = FakeCluster({"k"}, set())  # "k" is node 1's as a group, node 3's as an id
    for key_type, expected in ((0, 1), (1, 3)):
        fields: dict[str, Any] = {"key_type": key_type}
        if version >= 4:
            fields["coordinator_keys"] = ("k",)
        else:
            fields["key"] = "k"
        parsed = wire(handle_find_coordinator(node, request(10, version, **fields), cluster),
                      10, version)
        found = parsed.coordinators[0] if version >= 4 else parsed
        assert (found.error_code, found.node_id, found.port) == (0, expected, 9000 + expected)
