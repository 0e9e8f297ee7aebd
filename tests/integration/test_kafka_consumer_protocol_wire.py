"""Goal: KIP-848 ConsumerGroupHeartbeat follows the protocol's rules and answers bad
input with Kafka's own codes, over the wire.

Method: a raw asyncio client (kio-encoded requests) against run_broker(). Checks the
revoke-first reconciliation step by step with two members (a partition is never
owned twice), static membership (UNRELEASED_INSTANCE_ID, then take-over after a
temporary leave), and INVALID_REGULAR_EXPRESSION, UNSUPPORTED_ASSIGNOR,
FENCED_MEMBER_EPOCH, UNKNOWN_MEMBER_ID and STALE_MEMBER_EPOCH on commits and on
OffsetFetch v8-v10 (several groups per request, topic ids in v10).
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
from kio.schema.consumer_group_describe.v1.request import ConsumerGroupDescribeRequest
from kio.schema.consumer_group_heartbeat.v1.request import (
    ConsumerGroupHeartbeatRequest,
    TopicPartitions,
)
from kio.schema.describe_groups.v5 import request as describe_v5
from kio.schema.describe_groups.v6 import request as describe_v6
from kio.schema.join_group.v3.request import JoinGroupRequest, JoinGroupRequestProtocol
from kio.schema.offset_commit.v8.request import (
    OffsetCommitRequest,
    OffsetCommitRequestPartition,
    OffsetCommitRequestTopic,
)
from kio.schema.offset_fetch.v8 import request as fetch_v8
from kio.schema.offset_fetch.v9 import request as fetch_v9
from kio.schema.offset_fetch.v10 import request as fetch_v10

from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.admin_handlers import topic_id
from conveyor.server.app import Server
from conveyor.testing.server import run_broker
from tests.protocols.kafka.kafka_wire import parse_response, request_frame

TIMEOUT_S = 10


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
        _, response = parse_response(payload, int(entity.__api_key__),
                                     int(entity.__version__))
        return response


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with run_broker(tmp_path / "data", listeners=("kafka",)) as running:
        await running.broker.create_topic("t", 4)
        yield running


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
    yield Client(reader, writer)
    writer.close()


def heartbeat(member: str, epoch: int, *, topics: tuple[str, ...] | None = None,
              owned: tuple[int, ...] | None = None, instance: str | None = None,
              regex: str | None = None, assignor: str | None = None) -> Any:
    return ConsumerGroupHeartbeatRequest(
        group_id="g", member_id=member, member_epoch=epoch, instance_id=instance,
        rebalance_timeout=datetime.timedelta(seconds=30), subscribed_topic_names=topics,
        subscribed_topic_regex=regex, server_assignor=assignor,
        topic_partitions=None if owned is None else (
            TopicPartitions(topic_id=topic_id("t"), partitions=owned),))


def partitions(answer: Any) -> tuple[int, ...] | None:
    if answer.assignment is None:
        return None
    parts = [p for item in answer.assignment.topic_partitions for p in item.partitions]
    return tuple(sorted(parts))


async def test_revoke_first_reconciliation(client: Client) -> None:
    first = await client.call(heartbeat("a", 0, topics=("t",)))
    assert first.error_code == error_codes.NONE
    assert (first.member_epoch, partitions(first)) == (1, (0, 1, 2, 3))
    joined = await client.call(heartbeat("b", 0, topics=("t",)))
    # b is in the new epoch but gets nothing a still owns
    assert (joined.member_epoch, partitions(joined)) == (2, ())
    revoking = await client.call(heartbeat("a", 1, owned=(0, 1, 2, 3)))
    assert revoking.member_epoch == 1 and len(partitions(revoking) or ()) == 2
    kept = partitions(revoking) or ()
    waiting = await client.call(heartbeat("b", 2, owned=()))
    assert partitions(waiting) is None  # still owned by a: nothing new yet
    confirmed = await client.call(heartbeat("a", 1, owned=kept))
    assert confirmed.member_epoch == 2
    given = await client.call(heartbeat("b", 2, owned=()))
    assert set(partitions(given) or ()) == {0, 1, 2, 3} - set(kept)
    described = await client.call(ConsumerGroupDescribeRequest(
        group_ids=("g",), include_authorized_operations=False))
    group = described.groups[0]
    assert group.group_state == "Stable" and group.assignor_name == "uniform"
    assert group.group_epoch == group.assignment_epoch == 2


async def test_static_member_takes_over_after_a_temporary_leave(client: Client) -> None:
    first = await client.call(heartbeat("a", 0, topics=("t",), instance="i1"))
    assert first.member_epoch == 1
    clash = await client.call(heartbeat("a2", 0, topics=("t",), instance="i1"))
    assert clash.error_code == error_codes.UNRELEASED_INSTANCE_ID
    left = await client.call(heartbeat("a", -2, instance="i1"))
    assert (left.error_code, left.member_epoch) == (error_codes.NONE, -2)
    back = await client.call(heartbeat("a2", 0, topics=("t",), instance="i1"))
    assert back.error_code == error_codes.NONE
    assert (back.member_epoch, partitions(back)) == (1, (0, 1, 2, 3))  # same as before


async def test_bad_input_codes(client: Client) -> None:
    bad_regex = await client.call(heartbeat("a", 0, regex="t(["))
    assert bad_regex.error_code == error_codes.INVALID_REGULAR_EXPRESSION
    bad_assignor = await client.call(heartbeat("a", 0, topics=("t",), assignor="magic"))
    assert bad_assignor.error_code == error_codes.UNSUPPORTED_ASSIGNOR
    no_subscription = await client.call(heartbeat("a", 0))
    assert no_subscription.error_code == error_codes.INVALID_REQUEST
    joined = await client.call(heartbeat("a", 0, topics=("t",)))
    assert joined.member_epoch == 1
    assert (await client.call(heartbeat("a", 9))).error_code == error_codes.FENCED_MEMBER_EPOCH
    assert (await client.call(heartbeat("zz", 1))).error_code == error_codes.UNKNOWN_MEMBER_ID

    def commit(member: str, epoch: int) -> OffsetCommitRequest:
        return OffsetCommitRequest(
            group_id="g", generation_id_or_member_epoch=epoch, member_id=member,
            group_instance_id=None, topics=(OffsetCommitRequestTopic(name="t", partitions=(
                OffsetCommitRequestPartition(partition_index=0, committed_offset=0,
                                             committed_leader_epoch=-1,
                                             committed_metadata=None),)),))

    stale = await client.call(commit("a", 7))
    assert stale.topics[0].partitions[0].error_code == error_codes.STALE_MEMBER_EPOCH
    unknown = await client.call(commit("zz", 1))
    assert unknown.topics[0].partitions[0].error_code == error_codes.UNKNOWN_MEMBER_ID
    good = await client.call(commit("a", 1))
    assert good.topics[0].partitions[0].error_code == error_codes.NONE
    # the member and its group still work
    assert (await client.call(heartbeat("a", 1))).error_code == error_codes.NONE


async def test_a_pathological_regex_is_refused_not_run_forever(
        server: Server, client: Client) -> None:
    """(a|aa)+$ against 40 a's and a dash backtracks exponentially; the evaluation has a
    time budget, so the heartbeat is answered promptly and the broker stays usable."""
    await server.broker.create_topic("a" * 40 + "-", 1)
    answer = await client.call(heartbeat("a", 0, regex="(a|aa)+$"))
    assert answer.error_code == error_codes.INVALID_REGULAR_EXPRESSION
    assert (await client.call(heartbeat("b", 0, topics=("t",)))).error_code == (
        error_codes.NONE)


async def test_one_protocol_per_group_id_at_a_time(tmp_path: Path) -> None:
    """group.consumer.migration.policy=disabled: a classic JoinGroup to a KIP-848 group
    with members is INCONSISTENT_GROUP_PROTOCOL, a KIP-848 join to a classic group with
    members is GROUP_ID_NOT_FOUND; each group carries on."""
    settings = {"kafka": {"consumer_migration_policy": "disabled"}}
    async with run_broker(tmp_path / "data", listeners=("kafka",), settings=settings) as server:
        await server.broker.create_topic("t", 4)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.ports["kafka"])
        try:
            await _one_protocol_per_group(server, Client(reader, writer))
        finally:
            writer.close()


async def _one_protocol_per_group(server: Server, client: Client) -> None:
    assert (await client.call(heartbeat("a", 0, topics=("t",)))).member_epoch == 1
    join = JoinGroupRequest(
        group_id="g", session_timeout=datetime.timedelta(seconds=10),
        rebalance_timeout=datetime.timedelta(seconds=10), member_id="", protocol_type="consumer",
        protocols=(JoinGroupRequestProtocol(name="range", metadata=b""),))
    refused = await client.call(join)
    assert refused.error_code == error_codes.INCONSISTENT_GROUP_PROTOCOL
    await server.broker.join_group("classic", "", "consumer", [("range", b"")], 10_000,
                                   require_known_member_id=False)
    other = await client.call(dataclasses.replace(heartbeat("b", 0, topics=("t",)),
                                                  group_id="classic"))
    assert other.error_code == error_codes.GROUP_ID_NOT_FOUND
    assert (await client.call(heartbeat("a", 1))).error_code == error_codes.NONE


async def test_offset_fetch_of_several_groups_with_member_checks(server: Server,
                                                               client: Client) -> None:
    """OffsetFetch v8 asks for several groups at once, v9 names the KIP-848 member (checked
    as a commit is: UNKNOWN_MEMBER_ID / STALE_MEMBER_EPOCH for that group only), v10 names
    topics by id (an unknown id: UNKNOWN_TOPIC_ID for its partitions)."""
    assert (await client.call(heartbeat("a", 0, topics=("t",)))).member_epoch == 1
    await server.broker.commit_offsets("g", {("t", 0): 5, ("t", 1): 6})
    await server.broker.commit_offsets("other", {("t", 2): 7})
    v8 = await client.call(fetch_v8.OffsetFetchRequest(groups=(
        fetch_v8.OffsetFetchRequestGroup(group_id="g", topics=(fetch_v8.OffsetFetchRequestTopics(
            name="t", partition_indexes=(0, 1, 3)),)),
        fetch_v8.OffsetFetchRequestGroup(group_id="other", topics=None),
        fetch_v8.OffsetFetchRequestGroup(group_id="nobody", topics=None))))
    answered = {group.group_id: (group.error_code, {
        (topic.name, partition.partition_index): partition.committed_offset
        for topic in group.topics for partition in topic.partitions}) for group in v8.groups}
    assert answered == {"g": (0, {("t", 0): 5, ("t", 1): 6, ("t", 3): -1}),
                        "other": (0, {("t", 2): 7}), "nobody": (0, {})}

    def v9_group(member: str | None, epoch: int) -> Any:
        return fetch_v9.OffsetFetchRequestGroup(
            group_id="g", member_id=member, member_epoch=epoch,
            topics=(fetch_v9.OffsetFetchRequestTopics(name="t", partition_indexes=(0,)),))

    v9 = await client.call(fetch_v9.OffsetFetchRequest(groups=(
        v9_group("a", 1), v9_group("a", 7), v9_group("zz", 1), v9_group(None, -1))))
    assert [group.error_code for group in v9.groups] == [
        error_codes.NONE, error_codes.STALE_MEMBER_EPOCH, error_codes.UNKNOWN_MEMBER_ID,
        error_codes.NONE]
    assert v9.groups[0].topics[0].partitions[0].committed_offset == 5
    assert v9.groups[1].topics == ()
    missing = uuid.uuid4()
    v10 = await client.call(fetch_v10.OffsetFetchRequest(groups=(
        fetch_v10.OffsetFetchRequestGroup(group_id="g", member_id="a", member_epoch=1, topics=(
            fetch_v10.OffsetFetchRequestTopics(topic_id=topic_id("t"), partition_indexes=(1,)),
            fetch_v10.OffsetFetchRequestTopics(topic_id=missing, partition_indexes=(0,)))),)))
    topics = {topic.topic_id: [(p.partition_index, p.committed_offset, p.error_code)
                               for p in topic.partitions] for topic in v10.groups[0].topics}
    assert topics == {topic_id("t"): [(1, 6, error_codes.NONE)],
                      missing: [(0, -1, error_codes.UNKNOWN_TOPIC_ID)]}


async def test_describe_groups_shows_only_classic_groups(server: Server,
                                                        client: Client) -> None:
    """As Kafka 4 (KIP-1043): a KIP-848 group is Dead to DescribeGroups, and from v6 it
    and an unknown id are GROUP_ID_NOT_FOUND with a message; a classic group describes."""
    assert (await client.call(heartbeat("a", 0, topics=("t",)))).member_epoch == 1
    await server.broker.commit_offsets("g", {("t", 0): 5})  # the KIP-848 group's offsets
    await server.broker.join_group("classic", "", "consumer", [("range", b"")], 10_000,
                                   require_known_member_id=False)
    names = ("g", "classic", "absent")
    v6 = await client.call(describe_v6.DescribeGroupsRequest(
        groups=names, include_authorized_operations=False))
    assert [(group.group_id, group.error_code, group.group_state, group.error_message)
            for group in v6.groups] == [
        ("g", error_codes.GROUP_ID_NOT_FOUND, "Dead", "Group g is not a classic group."),
        ("classic", error_codes.NONE, v6.groups[1].group_state, None),
        ("absent", error_codes.GROUP_ID_NOT_FOUND, "Dead", "Group absent not found.")]
    assert v6.groups[1].protocol_type == "consumer" and v6.groups[1].members
    assert v6.groups[0].members == () and v6.groups[0].protocol_type == ""
    v5 = await client.call(describe_v5.DescribeGroupsRequest(
        groups=names, include_authorized_operations=False))
    assert [(group.error_code, group.group_state) for group in v5.groups] == [
        (error_codes.NONE, "Dead"), (error_codes.NONE, v6.groups[1].group_state),
        (error_codes.NONE, "Dead")]
