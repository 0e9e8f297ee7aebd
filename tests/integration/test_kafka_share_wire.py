"""Goal: the share-group APIs answer bad input with Kafka's own error codes, over the wire.

Method: a raw asyncio client sends kio-encoded ShareGroupHeartbeat, ShareFetch,
ShareAcknowledge, ShareGroupDescribe, ListGroups, DescribeConfigs and
IncrementalAlterConfigs, DescribeShareGroupOffsets, AlterShareGroupOffsets,
DeleteShareGroupOffsets and DeleteGroups requests to a run_broker() listener and checks the codes:
UNKNOWN_MEMBER_ID, FENCED_MEMBER_EPOCH, SHARE_SESSION_NOT_FOUND,
INVALID_SHARE_SESSION_EPOCH, INVALID_RECORD_STATE (a record the member does not
hold), INVALID_REQUEST (acknowledgement batches that overlap), INVALID_CONFIG;
and that the connection and the group keep working after each.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import struct
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.alter_share_group_offsets.v0.request import (
    AlterShareGroupOffsetsRequest,
    AlterShareGroupOffsetsRequestPartition,
    AlterShareGroupOffsetsRequestTopic,
)
from kio.schema.api_versions.v3.request import ApiVersionsRequest
from kio.schema.delete_groups.v2.request import DeleteGroupsRequest
from kio.schema.delete_share_group_offsets.v0.request import (
    DeleteShareGroupOffsetsRequest,
    DeleteShareGroupOffsetsRequestTopic,
)
from kio.schema.describe_configs.v4.request import DescribeConfigsRequest, DescribeConfigsResource
from kio.schema.describe_share_group_offsets.v1.request import (
    DescribeShareGroupOffsetsRequest,
    DescribeShareGroupOffsetsRequestGroup,
)
from kio.schema.incremental_alter_configs.v1.request import (
    AlterableConfig,
    AlterConfigsResource,
    IncrementalAlterConfigsRequest,
)
from kio.schema.list_groups.v5.request import ListGroupsRequest
from kio.schema.share_acknowledge.v1 import request as ack_v1
from kio.schema.share_fetch.v1 import request as fetch_v1
from kio.schema.share_group_describe.v1.request import ShareGroupDescribeRequest
from kio.schema.share_group_heartbeat.v1.request import ShareGroupHeartbeatRequest

from conveyor.broker.types import Message
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.admin_handlers import topic_id
from conveyor.server.app import Server
from conveyor.testing.server import run_broker
from tests.protocols.kafka.kafka_wire import parse_response, request_frame

TIMEOUT_S = 10
GROUP_RESOURCE = 32


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.correlation_id = 0

    async def call(self, entity: Any) -> Any:
        self.correlation_id += 1
        self.writer.write(request_frame(entity, self.correlation_id))
        await self.writer.drain()
        size = struct.unpack(">i", await asyncio.wait_for(self.reader.readexactly(4),
                                                          TIMEOUT_S))[0]
        payload = await asyncio.wait_for(self.reader.readexactly(size), TIMEOUT_S)
        correlation_id, response = parse_response(
            payload, int(entity.__api_key__), int(entity.__version__))
        assert correlation_id == self.correlation_id
        return response


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    yield Client(reader, writer)
    writer.close()


def heartbeat(member: str, epoch: int, topics: tuple[str, ...] | None = ("t",),
              group: str = "g") -> ShareGroupHeartbeatRequest:
    return ShareGroupHeartbeatRequest(group_id=group, member_id=member, member_epoch=epoch,
                                      subscribed_topic_names=topics)


def share_fetch(member: str, epoch: int, acks: tuple[Any, ...] = (),
                group: str = "g", wait_ms: int = 0) -> Any:
    return fetch_v1.ShareFetchRequest(
        group_id=group, member_id=member, share_session_epoch=epoch,
        max_wait=datetime.timedelta(milliseconds=wait_ms), min_bytes=1, max_records=100,
        batch_size=100, forgotten_topics_data=(),
        topics=(fetch_v1.FetchTopic(topic_id=topic_id("t"), partitions=(
            fetch_v1.FetchPartition(partition_index=0, acknowledgement_batches=acks),)),))


def batch(first: int, last: int, kind: int) -> Any:
    return fetch_v1.AcknowledgementBatch(first_offset=first, last_offset=last,
                                         acknowledge_types=(kind,))


async def joined(server: Server, client: Client, records: int = 3) -> None:
    await server.broker.create_topic("t", 1)
    answer = await client.call(heartbeat("m1", 0))
    assert answer.error_code == error_codes.NONE and answer.member_epoch == 1
    assert answer.assignment.topic_partitions[0].topic_id == topic_id("t")
    assert answer.assignment.topic_partitions[0].partitions == (0,)
    await server.broker.publish("t", [Message(value=b"v%d" % i) for i in range(records)])


async def test_api_versions_advertise_the_share_apis(client: Client) -> None:
    answer = await client.call(ApiVersionsRequest(client_software_name="t",
                                                  client_software_version="1"))
    versions = {entry.api_key: (entry.min_version, entry.max_version)
                for entry in answer.api_keys}
    assert versions[76] == (1, 1) and versions[77] == (1, 1)
    assert versions[78] == (1, 2) and versions[79] == (1, 2)
    assert versions[16] == (0, 5)


async def test_heartbeat_errors(server: Server, client: Client) -> None:
    await joined(server, client)
    assert (await client.call(heartbeat("nobody", 3))).error_code == (
        error_codes.UNKNOWN_MEMBER_ID)
    assert (await client.call(heartbeat("m1", 7))).error_code == error_codes.FENCED_MEMBER_EPOCH
    assert (await client.call(heartbeat("", 0))).error_code == error_codes.INVALID_REQUEST
    same = await client.call(heartbeat("m1", 1, topics=None))
    assert same.error_code == error_codes.NONE and same.assignment is None  # unchanged
    left = await client.call(heartbeat("m1", -1, topics=None))
    assert left.error_code == error_codes.NONE and left.member_epoch == -1
    assert (await client.call(heartbeat("m1", 1))).error_code == error_codes.UNKNOWN_MEMBER_ID


async def test_fetch_session_epochs_and_acknowledgement_errors(
        server: Server, client: Client) -> None:
    await joined(server, client)
    missing = await client.call(share_fetch("m1", 1))
    assert missing.error_code == error_codes.SHARE_SESSION_NOT_FOUND
    opened = await client.call(share_fetch("m1", 0))
    assert opened.error_code == error_codes.NONE
    partition = opened.responses[0].partitions[0]
    assert [(r.first_offset, r.last_offset, r.delivery_count)
            for r in partition.acquired_records] == [(0, 2, 1)]
    assert (await client.call(share_fetch("m1", 5))).error_code == (
        error_codes.INVALID_SHARE_SESSION_EPOCH)
    # offset 7 was never acquired: that partition answers INVALID_RECORD_STATE
    wrong = await client.call(share_fetch("m1", 1, (batch(7, 7, 1),)))
    assert wrong.error_code == error_codes.NONE
    assert wrong.responses[0].partitions[0].acknowledge_error_code == (
        error_codes.INVALID_RECORD_STATE)
    overlapping = await client.call(share_fetch("m1", 2, (batch(0, 1, 1), batch(1, 2, 1))))
    assert overlapping.responses[0].partitions[0].acknowledge_error_code == (
        error_codes.INVALID_REQUEST)
    # the session and the records are unaffected: accept 0-1, release 2, get 2 back
    settled = await client.call(share_fetch("m1", 3, (batch(0, 1, 1), batch(2, 2, 2))))
    result = settled.responses[0].partitions[0]
    assert result.acknowledge_error_code == error_codes.NONE
    assert [(r.first_offset, r.last_offset, r.delivery_count)
            for r in result.acquired_records] == [(2, 2, 2)]
    acknowledge = ack_v1.ShareAcknowledgeRequest(
        group_id="g", member_id="m1", share_session_epoch=4, topics=(
            ack_v1.AcknowledgeTopic(topic_id=topic_id("t"), partitions=(
                ack_v1.AcknowledgePartition(partition_index=0, acknowledgement_batches=(
                    ack_v1.AcknowledgementBatch(first_offset=2, last_offset=2,
                                                acknowledge_types=(3,)),)),)),))
    rejected = await client.call(acknowledge)
    assert rejected.error_code == error_codes.NONE
    assert rejected.responses[0].partitions[0].error_code == error_codes.NONE
    again = await client.call(acknowledge)  # epoch 4 again: stale
    assert again.error_code == error_codes.INVALID_SHARE_SESSION_EPOCH
    dead = await server.broker.read_records("g.dlq", 0, 0, 10)
    assert [record.value for record in dead] == [b"v2"]


async def test_describe_list_and_group_configs(server: Server, client: Client) -> None:
    await joined(server, client, records=0)
    described = await client.call(ShareGroupDescribeRequest(
        group_ids=("g", "missing"), include_authorized_operations=False))
    group, missing = described.groups
    assert group.error_code == error_codes.NONE and group.group_state == "Stable"
    assert [member.member_id for member in group.members] == ["m1"]
    assert group.members[0].assignment.topic_partitions[0].topic_name == "t"
    assert missing.error_code == error_codes.GROUP_ID_NOT_FOUND
    listed = await client.call(ListGroupsRequest(states_filter=(), types_filter=("share",)))
    assert [(item.group_id, item.group_type) for item in listed.groups] == [("g", "share")]
    bad = await client.call(IncrementalAlterConfigsRequest(validate_only=False, resources=(
        AlterConfigsResource(resource_type=GROUP_RESOURCE, resource_name="g", configs=(
            AlterableConfig(name="share.record.lock.duration.ms", config_operation=0,
                            value="ten"),)),)))
    assert bad.responses[0].error_code == error_codes.INVALID_CONFIG
    good = await client.call(IncrementalAlterConfigsRequest(validate_only=False, resources=(
        AlterConfigsResource(resource_type=GROUP_RESOURCE, resource_name="g", configs=(
            AlterableConfig(name="share.record.lock.duration.ms", config_operation=0,
                            value="2000"),)),)))
    assert good.responses[0].error_code == error_codes.NONE
    configs = await client.call(DescribeConfigsRequest(resources=(
        DescribeConfigsResource(resource_type=GROUP_RESOURCE, resource_name="g",
                                configuration_keys=None),)))
    entries = {entry.name: entry for entry in configs.results[0].configs}
    assert entries["share.record.lock.duration.ms"].value == "2000"
    assert entries["share.record.lock.duration.ms"].config_source == 8  # DYNAMIC_GROUP_CONFIG
    assert entries["share.auto.offset.reset"].value == "latest"
    assert entries["share.auto.offset.reset"].config_source == 5  # DEFAULT_CONFIG


async def test_share_group_offsets_and_deletion(server: Server, client: Client) -> None:
    await joined(server, client, records=4)
    await client.call(share_fetch("m1", 0))  # acquires 0-3
    await client.call(share_fetch("m1", 1, (batch(0, 1, 1),)))  # accept 0-1
    described = await client.call(DescribeShareGroupOffsetsRequest(groups=(
        DescribeShareGroupOffsetsRequestGroup(group_id="g", topics=None),)))
    partition = described.groups[0].topics[0].partitions[0]
    assert (described.groups[0].topics[0].topic_name, partition.start_offset,
            partition.lag) == ("t", 2, 2)
    busy = await client.call(DeleteShareGroupOffsetsRequest(group_id="g", topics=(
        DeleteShareGroupOffsetsRequestTopic(topic_name="t"),)))
    assert busy.error_code == error_codes.NON_EMPTY_GROUP
    refused = await client.call(DeleteGroupsRequest(groups_names=("g",)))
    assert refused.results[0].error_code == error_codes.NON_EMPTY_GROUP
    await client.call(heartbeat("m1", -1, topics=None))
    deleted = await client.call(DeleteShareGroupOffsetsRequest(group_id="g", topics=(
        DeleteShareGroupOffsetsRequestTopic(topic_name="t"),)))
    assert deleted.error_code == error_codes.NONE
    assert deleted.responses[0].error_code == error_codes.NONE
    assert server.broker.shared_group_start_offsets("t", "g") is None
    gone = await client.call(DeleteGroupsRequest(groups_names=("g",)))
    assert gone.results[0].error_code == error_codes.NONE
    listed = await client.call(ListGroupsRequest(states_filter=(), types_filter=("share",)))
    assert listed.groups == ()


async def test_closing_the_connection_releases_what_its_session_held(
        server: Server, client: Client) -> None:
    await joined(server, client, records=2)
    assert (await client.call(heartbeat("m2", 0))).error_code == error_codes.NONE
    held = await client.call(share_fetch("m1", 0))
    assert held.responses[0].partitions[0].acquired_records[0].last_offset == 1
    client.writer.close()  # m1's session ends with its connection (lock: 30 s)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    other = Client(reader, writer)
    try:  # a long poll: the release wakes it
        answer = await other.call(share_fetch("m2", 0, wait_ms=5_000))
        ranges = answer.responses[0].partitions[0].acquired_records
        assert [(r.first_offset, r.last_offset, r.delivery_count) for r in ranges] == [
            (0, 1, 2)]
    finally:
        writer.close()


async def test_fetch_stops_near_max_bytes(server: Server, client: Client) -> None:
    """40 records of 1000 bytes, max_bytes 20000: about 20 are acquired (sizes are learnt
    from the first chunk of 16), the rest stay available with no delivery counted."""
    await server.broker.create_topic("t", 1)
    assert (await client.call(heartbeat("m1", 0))).error_code == error_codes.NONE
    await server.broker.publish("t", [Message(value=bytes(1000)) for _ in range(40)])
    request = dataclasses.replace(share_fetch("m1", 0), max_bytes=20_000)
    answer = await client.call(request)
    ranges = answer.responses[0].partitions[0].acquired_records
    acquired = sum(r.last_offset - r.first_offset + 1 for r in ranges)
    assert 16 <= acquired <= 21
    rest = await client.call(share_fetch("m1", 1))
    later = rest.responses[0].partitions[0].acquired_records
    assert later[0].first_offset == acquired and later[0].delivery_count == 1


async def test_huge_acknowledgement_ranges_cost_nothing(server: Server, client: Client) -> None:
    """A batch naming 2**62 offsets is refused (INVALID_RECORD_STATE: the member holds
    3) without walking them; GAP batches of any length are skipped; the 3 held records
    are then accepted normally."""
    await joined(server, client, records=3)
    await client.call(share_fetch("m1", 0))
    huge = await client.call(share_fetch("m1", 1, (batch(0, 2**62, 1),)))
    assert huge.responses[0].partitions[0].acknowledge_error_code == (
        error_codes.INVALID_RECORD_STATE)
    gaps = tuple(batch(10 + index * 2**40, 10 + index * 2**40 + 2**39, 0)
                 for index in range(1000))
    fine = await client.call(share_fetch("m1", 2, (batch(0, 2, 1), *gaps)))
    assert fine.responses[0].partitions[0].acknowledge_error_code == error_codes.NONE
    offsets = server.broker.shared_group_start_offsets("t", "g")
    assert offsets == {0: 3}


async def test_unknown_topic_ids_answer_unknown_topic_id(server: Server, client: Client) -> None:
    await joined(server, client, records=1)
    await client.call(share_fetch("m1", 0))
    stranger = uuid.UUID(int=12345)
    acknowledge = ack_v1.ShareAcknowledgeRequest(
        group_id="g", member_id="m1", share_session_epoch=1, topics=(
            ack_v1.AcknowledgeTopic(topic_id=stranger, partitions=(
                ack_v1.AcknowledgePartition(partition_index=0, acknowledgement_batches=(
                    ack_v1.AcknowledgementBatch(first_offset=0, last_offset=0,
                                                acknowledge_types=(1,)),)),)),))
    answer = await client.call(acknowledge)
    assert answer.error_code == error_codes.NONE
    assert answer.responses[0].partitions[0].error_code == error_codes.UNKNOWN_TOPIC_ID
    fetch = fetch_v1.ShareFetchRequest(
        group_id="g", member_id="m1", share_session_epoch=2,
        max_wait=datetime.timedelta(0), min_bytes=1, max_records=10, batch_size=10,
        forgotten_topics_data=(), topics=(fetch_v1.FetchTopic(topic_id=stranger, partitions=(
            fetch_v1.FetchPartition(partition_index=0, acknowledgement_batches=()),)),))
    fetched = await client.call(fetch)
    by_id = {topic.topic_id: topic.partitions[0] for topic in fetched.responses}
    assert by_id[stranger].error_code == error_codes.UNKNOWN_TOPIC_ID


def alter(group: str, *items: tuple[str, int, int]) -> AlterShareGroupOffsetsRequest:
    topics: dict[str, list[AlterShareGroupOffsetsRequestPartition]] = {}
    for topic, partition, offset in items:
        topics.setdefault(topic, []).append(AlterShareGroupOffsetsRequestPartition(
            partition_index=partition, start_offset=offset))
    return AlterShareGroupOffsetsRequest(group_id=group, topics=tuple(
        AlterShareGroupOffsetsRequestTopic(topic_name=name, partitions=tuple(partitions))
        for name, partitions in topics.items()))


def partition_codes(answer: Any) -> dict[tuple[str, int], int]:
    return {(topic.topic_name, partition.partition_index): partition.error_code
            for topic in answer.responses for partition in topic.partitions}


async def test_alter_share_group_offsets_resets_the_start(server: Server,
                                                         client: Client) -> None:
    await joined(server, client, records=4)
    await client.call(share_fetch("m1", 0))  # acquires 0-3
    await client.call(share_fetch("m1", 1, (batch(0, 3, 1),)))  # accept all: start 4
    assert server.broker.shared_group_start_offsets("t", "g") == {0: 4}
    busy = await client.call(alter("g", ("t", 0, 0)))
    assert busy.error_code == error_codes.NON_EMPTY_GROUP and busy.responses == ()
    await client.call(share_fetch("m1", -1))
    await client.call(heartbeat("m1", -1, topics=None))
    answer = await client.call(alter("g", ("t", 0, 1), ("t", 5, 0), ("t", 0, 1),))
    assert answer.error_code == error_codes.INVALID_REQUEST  # a partition named twice
    answer = await client.call(alter("g", ("t", 0, 1), ("t", 5, 0), ("missing", 0, 0)))
    assert answer.error_code == error_codes.NONE
    assert partition_codes(answer) == {("t", 0): error_codes.NONE,
                                       ("t", 5): error_codes.UNKNOWN_TOPIC_OR_PARTITION,
                                       ("missing", 0): error_codes.UNKNOWN_TOPIC_OR_PARTITION}
    assert answer.responses[0].topic_id == topic_id("t")
    past = await client.call(alter("g", ("t", 0, 99)))
    assert partition_codes(past) == {("t", 0): error_codes.OFFSET_OUT_OF_RANGE}
    described = await client.call(DescribeShareGroupOffsetsRequest(groups=(
        DescribeShareGroupOffsetsRequestGroup(group_id="g", topics=None),)))
    partition = described.groups[0].topics[0].partitions[0]
    assert (partition.start_offset, partition.lag) == (1, 3)
    # records 1-3, accepted before the reset, are delivered afresh (count 1)
    rejoined = await client.call(heartbeat("m2", 0))
    assert rejoined.error_code == error_codes.NONE
    opened = await client.call(share_fetch("m2", 0))
    acquired = opened.responses[0].partitions[0].acquired_records
    assert [(r.first_offset, r.last_offset, r.delivery_count) for r in acquired] == [(1, 3, 1)]


async def test_alter_share_group_offsets_names_only_share_groups(server: Server,
                                                                client: Client) -> None:
    await server.broker.create_topic("t", 1)
    await server.broker.publish("t", [Message(value=b"v%d" % i) for i in range(3)])
    await server.broker.commit_offsets("classic", {("t", 0): 1})
    refused = await client.call(alter("classic", ("t", 0, 0)))
    assert refused.error_code == error_codes.GROUP_ID_NOT_FOUND
    empty = await client.call(alter("", ("t", 0, 0)))
    assert empty.error_code == error_codes.INVALID_REQUEST
    # a group id never seen becomes an empty share group starting where it was told
    fresh = await client.call(alter("new", ("t", 0, 2)))
    assert partition_codes(fresh) == {("t", 0): error_codes.NONE}
    assert server.broker.shared_group_start_offsets("t", "new") == {0: 2}
    listed = await client.call(ListGroupsRequest(states_filter=(), types_filter=("share",)))
    assert [(item.group_id, item.group_state) for item in listed.groups] == [("new", "Empty")]


async def test_alter_share_group_offsets_leaves_held_records_and_queues_alone(
        server: Server, client: Client) -> None:
    await joined(server, client, records=3)
    await client.call(share_fetch("m1", 0))  # acquires 0-2, the session stays open
    await client.call(heartbeat("m1", -1, topics=None))  # left; its records still held
    held = await client.call(alter("g", ("t", 0, 0)))
    assert partition_codes(held) == {("t", 0): error_codes.NON_EMPTY_GROUP}
    await server.broker.declare_queue("q")
    queue = await client.call(alter("q", ("q", 0, 0)))
    assert partition_codes(queue) == {("q", 0): error_codes.INVALID_REQUEST}
