"""Goal: the online migration between the classic and the KIP-848 protocol follows
KIP-848's rules step by step, for each group.consumer.migration.policy.

Method: a classic member joins and syncs through the broker API of a real server; the
migration steps go over the wire with kio-encoded requests (JoinGroup, SyncGroup,
Heartbeat, ConsumerGroupHeartbeat, OffsetCommit, DescribeConfigs). Checks that the
upgrade keeps the classic member's partitions until it gives them up (no partition
owned twice), REBALANCE_IN_PROGRESS / ILLEGAL_GENERATION for the classic member,
committed offsets kept, the downgrade when the consumer-protocol member leaves, and
what the policies ``upgrade`` and ``downgrade`` refuse; plus the consumer-protocol
codec on hostile bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kio.schema.describe_configs.v4 import request as describe_configs
from kio.schema.heartbeat.v3.request import HeartbeatRequest
from kio.schema.join_group.v5.request import JoinGroupRequest, JoinGroupRequestProtocol
from kio.schema.offset_commit.v8.request import (
    OffsetCommitRequest,
    OffsetCommitRequestPartition,
    OffsetCommitRequestTopic,
)
from kio.schema.sync_group.v3.request import SyncGroupRequest

from conveyor.broker.ordered_group import JoinResult
from conveyor.protocols.kafka import error_codes
from conveyor.protocols.kafka.consumer_protocol import (
    encode_assignment,
    parse_assignment,
    parse_subscription,
)
from conveyor.server.app import Server
from conveyor.testing.server import run_broker
from tests.integration.test_kafka_consumer_protocol_wire import Client, heartbeat, partitions

ALL = frozenset({0, 1, 2, 3})
BROKER_RESOURCE = 4


def subscription(owned: frozenset[int] | None = None) -> bytes:
    """A ConsumerProtocolSubscription of topic "t": v0, or v1 naming owned partitions."""
    version = 0 if owned is None else 1
    out = struct.pack(">hih", version, 1, 1) + b"t" + struct.pack(">i", -1)
    if owned is not None:
        out += struct.pack(">ih", 1, 1) + b"t" + struct.pack(">i", len(owned))
        out += b"".join(struct.pack(">i", part) for part in sorted(owned))
    return out


@pytest.fixture
async def running(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    policy = getattr(request, "param", "bidirectional")
    settings = {"kafka": {"consumer_migration_policy": policy}}
    async with run_broker(tmp_path / "data", listeners=("kafka",), settings=settings) as server:
        await server.broker.create_topic("t", 4)
        yield server


@pytest.fixture
async def client(running: Server) -> AsyncIterator[Client]:
    reader, writer = await asyncio.open_connection("127.0.0.1", running.ports["kafka"])
    yield Client(reader, writer)
    writer.close()


async def classic_member(server: Server) -> JoinResult:
    """One classic member of group "g" owning every partition of "t", offset 5 committed."""
    joined = await server.broker.join_group("g", "", "consumer", [("range", subscription())],
                                            10_000, require_known_member_id=False)
    assert isinstance(joined, JoinResult)
    await server.broker.sync_group("g", joined.member_id, joined.generation, {
        joined.member_id: encode_assignment({"t": ALL})})
    await server.broker.commit_offsets("g", {("t", 0): 5}, joined.member_id, joined.generation)
    return joined


def join(member_id: str, owned: frozenset[int] | None) -> JoinGroupRequest:
    return JoinGroupRequest(
        group_id="g", session_timeout=datetime.timedelta(seconds=10),
        rebalance_timeout=datetime.timedelta(seconds=10), member_id=member_id,
        group_instance_id=None, protocol_type="consumer",
        protocols=(JoinGroupRequestProtocol(name="range", metadata=subscription(owned)),))


def beat(member_id: str, generation: int) -> HeartbeatRequest:
    return HeartbeatRequest(group_id="g", generation_id=generation, member_id=member_id,
                            group_instance_id=None)


async def synced(client: Client, member_id: str, generation: int) -> frozenset[int]:
    answer = await client.call(SyncGroupRequest(group_id="g", generation_id=generation,
                                                member_id=member_id, group_instance_id=None,
                                                assignments=()))
    assert answer.error_code == error_codes.NONE
    return parse_assignment(answer.assignment).get("t", frozenset())


async def test_upgrade_then_downgrade_step_by_step(running: Server, client: Client) -> None:
    classic = await classic_member(running)
    member = classic.member_id
    joined = await client.call(heartbeat("c", 0, topics=("t",)))
    assert joined.error_code == error_codes.NONE
    assert partitions(joined) == ()  # every partition is still the classic member's
    assert running.broker.describe_group("g").members == ()  # the classic side is empty
    assert (await client.call(beat(member, classic.generation - 1))).error_code == (
        error_codes.ILLEGAL_GENERATION)
    assert (await client.call(beat(member, classic.generation))).error_code == (
        error_codes.REBALANCE_IN_PROGRESS)
    # a cooperative rejoin: it still owns everything; the server takes two away
    rejoined = await client.call(join(member, ALL))
    assert (rejoined.error_code, rejoined.leader, rejoined.members) == (
        error_codes.NONE, "", ())
    generation = rejoined.generation_id
    kept = await synced(client, member, generation)
    assert len(kept) == 2
    waiting = await client.call(heartbeat("c", joined.member_epoch, owned=()))
    assert not partitions(waiting)  # the two taken away are not given up yet
    assert (await client.call(beat(member, generation))).error_code == (
        error_codes.REBALANCE_IN_PROGRESS)
    confirmed = await client.call(join(member, kept))
    assert confirmed.error_code == error_codes.NONE and confirmed.generation_id == generation
    assert await synced(client, member, generation) == kept
    assert (await client.call(beat(member, generation))).error_code == error_codes.NONE
    gained = await client.call(heartbeat("c", waiting.member_epoch, owned=()))
    assert set(partitions(gained) or ()) == ALL - kept  # never owned twice
    commit = await client.call(OffsetCommitRequest(
        group_id="g", generation_id_or_member_epoch=generation, member_id=member,
        group_instance_id=None, topics=(OffsetCommitRequestTopic(
            name="t", partitions=(OffsetCommitRequestPartition(
                partition_index=min(kept), committed_offset=7, committed_leader_epoch=-1,
                committed_metadata=None),)),)))
    assert commit.topics[0].partitions[0].error_code == error_codes.NONE
    offsets = running.broker.fetch_offsets("g")
    assert offsets[("t", 0)] is not None and offsets[("t", 0)].offset == (
        7 if min(kept) == 0 else 5)
    # the last consumer-protocol member leaves: back to a classic group, rebalancing
    left = await client.call(heartbeat("c", -1))
    assert left.error_code == error_codes.NONE
    description = running.broker.describe_group("g")
    assert [m.member_id for m in description.members] == [member]
    assert description.protocol_type == "consumer"
    assert (await client.call(beat(member, generation))).error_code == (
        error_codes.REBALANCE_IN_PROGRESS)
    back = await client.call(join(member, None))
    assert back.error_code == error_codes.NONE and back.leader == member


@pytest.mark.parametrize("running", ["upgrade"], indirect=True)
async def test_policy_upgrade_keeps_the_consumer_group(running: Server, client: Client) -> None:
    classic = await classic_member(running)
    joined = await client.call(heartbeat("c", 0, topics=("t",)))
    assert joined.error_code == error_codes.NONE
    left = await client.call(heartbeat("c", -1))
    assert left.error_code == error_codes.NONE
    assert running.broker.describe_group("g").members == ()  # still a consumer group
    answer = await client.call(beat(classic.member_id, classic.generation))
    assert answer.error_code == error_codes.REBALANCE_IN_PROGRESS  # now its target is all
    assert await config_value(client, "group.consumer.migration.policy") == "upgrade"


@pytest.mark.parametrize("running", ["downgrade"], indirect=True)
async def test_policy_downgrade_refuses_the_upgrade(running: Server, client: Client) -> None:
    await classic_member(running)
    refused = await client.call(heartbeat("c", 0, topics=("t",)))
    assert refused.error_code == error_codes.GROUP_ID_NOT_FOUND
    assert len(running.broker.describe_group("g").members) == 1  # the classic group goes on
    assert await config_value(client, "group.consumer.migration.policy") == "downgrade"


async def config_value(client: Client, name: str) -> str:
    answer = await client.call(describe_configs.DescribeConfigsRequest(
        resources=(describe_configs.DescribeConfigsResource(
            resource_type=BROKER_RESOURCE,
            resource_name="0", configuration_keys=(name,)),),
        include_synonyms=False, include_documentation=False))
    values = {config.name: config.value for config in answer.results[0].configs}
    return str(values[name])


def test_consumer_protocol_codec_on_hostile_bytes() -> None:
    """Truncated or lying subscriptions parse to what they hold, never raise or allocate
    by a count beyond the bytes received; assignments round-trip."""
    whole = subscription(frozenset({1, 3}))
    assert parse_subscription(whole).topics == ("t",)
    assert parse_subscription(whole).owned == {"t": frozenset({1, 3})}
    for cut in range(len(whole)):
        parsed = parse_subscription(whole[:cut])
        assert parsed.owned == {} or cut == len(whole)
    huge = struct.pack(">hi", 0, 2**31 - 1) + b"\x00\x01t"
    assert parse_subscription(huge).topics == () and not parse_subscription(huge).complete
    lying = struct.pack(">hih", 1, 1, 1) + b"t" + struct.pack(">ii", -1, 2**30)
    assert parse_subscription(lying).topics == ("t",) and parse_subscription(lying).owned == {}
    assignment: dict[str, Any] = {"t": frozenset({0, 2}), "u": frozenset({5})}
    assert parse_assignment(encode_assignment(assignment)) == assignment
    assert parse_assignment(b"\x00") == {} and parse_assignment(b"") == {}


async def test_a_static_classic_member_keeps_its_id_across_the_upgrade(
        running: Server, client: Client) -> None:
    """A classic static member (group.instance.id) of an upgraded group that restarts
    (JoinGroup with no member id) comes back under its member id, owning what it owned;
    another member id claiming the instance while it is active is FENCED_INSTANCE_ID."""
    joined = await running.broker.join_group("g", "", "consumer", [("range", subscription())],
                                             10_000, group_instance_id="i1",
                                             require_known_member_id=False)
    assert isinstance(joined, JoinResult)
    await running.broker.sync_group("g", joined.member_id, joined.generation, {
        joined.member_id: encode_assignment({"t": ALL})})
    assert (await client.call(heartbeat("c", 0, topics=("t",)))).error_code == 0
    restart = dataclasses.replace(join("", None), group_instance_id="i1")
    back = await client.call(restart)
    assert (back.error_code, back.member_id) == (error_codes.NONE, joined.member_id)
    assert len(await synced(client, joined.member_id, back.generation_id)) == 2
    fenced = await client.call(dataclasses.replace(join("other", None), group_instance_id="i1"))
    assert fenced.error_code == error_codes.FENCED_INSTANCE_ID
