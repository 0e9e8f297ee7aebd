"""Goal: the classic consumer-group coordinator behaves like Kafka's: join/sync with
a leader, MEMBER_ID_REQUIRED, heartbeats, leave, session and rebalance timeouts,
static membership, generation checks on commits, and committed offsets that survive
a restart.

Method: drive OrderedGroup directly with explicit now_ms (sans-IO), and the Broker
facade with a SimClock for timers and restarts."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.ordered_group import (
    TRANSITIONS,
    CommittedOffset,
    GroupEvent,
    GroupState,
    JoinResult,
    MemberIdRequired,
    OrderedGroup,
    SyncResult,
    decode_assignment,
    range_assign,
    round_robin_assign,
)
from conveyor.errors import (
    FencedInstanceIdError,
    IllegalGenerationError,
    IllegalStateError,
    InconsistentGroupProtocolError,
    NonEmptyGroupError,
    RebalanceInProgressError,
    UnknownMemberError,
)

PROTOCOLS = [("range", b"meta-range"), ("roundrobin", b"meta-rr")]


def new_group() -> OrderedGroup:
    counter = itertools.count(1)
    return OrderedGroup("g", lambda: f"{next(counter):04d}")


async def join(group: OrderedGroup, now_ms: int, member_id: str = "",
               instance: str | None = None, protocols: list[tuple[str, bytes]] = PROTOCOLS,
               ) -> JoinResult | MemberIdRequired | asyncio.Future[JoinResult]:
    return group.join(now_ms, member_id, instance, "consumer", protocols, 10_000, 30_000,
                      client_id="c")


async def test_two_members_join_sync_stable() -> None:
    group = new_group()
    required = await join(group, 0)
    assert isinstance(required, MemberIdRequired)
    first_waiter = await join(group, 1, required.member_id)
    assert isinstance(first_waiter, asyncio.Future)
    first = await first_waiter  # the only member: the join completes at once
    assert group.state is GroupState.COMPLETING_REBALANCE
    assert first.leader_id == first.member_id and first.generation == 1
    assert [m.metadata for m in first.members] == [b"meta-range"]
    leader_sync = group.sync(2, first.member_id, 1, {first.member_id: b"all"})
    assert isinstance(leader_sync, asyncio.Future)
    assert (await leader_sync).assignment == b"all"
    assert group.state is GroupState.STABLE

    # a second member joins: rebalance, the leader must rejoin before it completes
    second_required = await join(group, 3)
    assert isinstance(second_required, MemberIdRequired)
    second_waiter = await join(group, 3, second_required.member_id,
                               protocols=[("roundrobin", b"x"), ("range", b"y")])
    assert isinstance(second_waiter, asyncio.Future) and not second_waiter.done()
    assert group.state is GroupState.PREPARING_REBALANCE
    with pytest.raises(RebalanceInProgressError):
        group.heartbeat(4, first.member_id, 1)
    leader_waiter = await join(group, 5, first.member_id)
    assert isinstance(leader_waiter, asyncio.Future)
    leader, follower = await leader_waiter, await second_waiter
    assert leader.generation == follower.generation == 2
    assert leader.protocol_name == "range"  # first choice of the first member, shared by all
    assert len(leader.members) == 2 and follower.members == ()
    follower_sync = group.sync(6, follower.member_id, 2, {})
    assert isinstance(follower_sync, asyncio.Future) and not follower_sync.done()
    group.sync(6, leader.member_id, 2,
               {leader.member_id: b"p0", follower.member_id: b"p1"})
    assert (await follower_sync).assignment == b"p1"
    assert group.describe().state is GroupState.STABLE


async def test_join_without_member_id_required_and_protocol_checks() -> None:
    group = new_group()
    waiter = group.join(0, "", None, "consumer", PROTOCOLS, 10_000, 10_000,
                        require_known_member_id=False)
    assert isinstance(waiter, asyncio.Future)
    result = await waiter
    assert result.member_id.startswith("member-") or result.member_id.startswith("-")
    with pytest.raises(InconsistentGroupProtocolError):
        await join(group, 1, protocols=[("sticky", b"")])
    with pytest.raises(InconsistentGroupProtocolError):
        group.join(1, "", None, "connect", PROTOCOLS, 10_000, 10_000)
    with pytest.raises(UnknownMemberError):
        await join(group, 1, "nobody")


async def test_session_expiry_and_rebalance_timeout() -> None:
    group = new_group()
    a = await join(group, 0, instance=None)
    assert isinstance(a, MemberIdRequired)
    leader = await (await join(group, 0, a.member_id))  # type: ignore[misc]
    group.sync(0, leader.member_id, 1, {leader.member_id: b""})
    b = await join(group, 100)
    assert isinstance(b, MemberIdRequired)
    b_waiter = await join(group, 100, b.member_id)
    assert isinstance(b_waiter, asyncio.Future)
    # the leader keeps heartbeating (told to rejoin) but never rejoins: after the
    # rebalance timeout (30 s) it is dropped
    for now_ms in (9_000, 18_000, 27_000):
        with pytest.raises(RebalanceInProgressError):
            group.heartbeat(now_ms, leader.member_id, 1)
        group.tick(now_ms)
    assert group.tick(100 + 29_999) is not None and not b_waiter.done()
    group.tick(100 + 30_000)
    result = await b_waiter
    assert result.leader_id == b.member_id and len(result.members) == 1
    assert leader.member_id not in group.members
    sync = group.sync(30_200, b.member_id, result.generation, {b.member_id: b"x"})
    await sync  # type: ignore[misc]
    group.heartbeat(35_000, b.member_id, result.generation)
    group.tick(44_999)
    assert group.state is GroupState.STABLE
    group.tick(45_000)  # 10 s after the last heartbeat: session expired
    assert group.state is GroupState.EMPTY and not group.members
    with pytest.raises(UnknownMemberError):
        group.heartbeat(45_001, b.member_id, result.generation)


async def test_pending_member_id_expires() -> None:
    group = new_group()
    required = await join(group, 0)
    assert isinstance(required, MemberIdRequired)
    assert group.tick(5_000) == 10_000
    group.tick(10_000)
    assert not group.pending_members
    with pytest.raises(UnknownMemberError):
        await join(group, 10_001, required.member_id)


async def test_static_member_keeps_id_without_rebalance() -> None:
    group = new_group()
    first = await (await join(group, 0, instance="host-1"))  # type: ignore[misc]
    await group.sync(0, first.member_id, 1, {first.member_id: b"a"})  # type: ignore[misc]
    again = await join(group, 1, instance="host-1")  # restart of the same instance
    assert isinstance(again, JoinResult)
    assert again.member_id == first.member_id and again.generation == 1
    assert group.state is GroupState.STABLE
    with pytest.raises(FencedInstanceIdError):
        await join(group, 2, "someone-else", instance="host-1")


async def test_leave_and_stale_generation_commit() -> None:
    group = new_group()
    required = await join(group, 0)
    assert isinstance(required, MemberIdRequired)
    result = await (await join(group, 0, required.member_id))  # type: ignore[misc]
    with pytest.raises(RebalanceInProgressError):
        group.check_commit(result.member_id, result.generation)  # CompletingRebalance
    await group.sync(0, result.member_id, 1, {})  # type: ignore[misc]
    group.check_commit(result.member_id, 1)
    with pytest.raises(IllegalGenerationError):
        group.check_commit(result.member_id, 0)
    with pytest.raises(UnknownMemberError):
        group.check_commit("", -1)  # simple commit while the group has members
    group.leave(1, result.member_id)
    assert group.state is GroupState.EMPTY
    group.check_commit("", -1)
    with pytest.raises(UnknownMemberError):
        group.check_commit(result.member_id, 1)
    group.delete()
    assert group.state is GroupState.DEAD


def test_transition_table_rejects_illegal_moves() -> None:
    group = new_group()
    assert (GroupState.STABLE, GroupEvent.DELETE) not in TRANSITIONS
    group.state = GroupState.STABLE
    group.members["m"] = None  # type: ignore[assignment]
    with pytest.raises(NonEmptyGroupError):
        group.delete()
    group.members.clear()
    with pytest.raises(IllegalStateError):
        group.delete()


def test_assignors() -> None:
    subscriptions = {"b": ["t"], "a": ["t", "u"]}
    counts = {"t": 3, "u": 2}
    assert range_assign(subscriptions, counts) == {
        "a": [("t", 0), ("t", 1), ("u", 0), ("u", 1)], "b": [("t", 2)]}
    assert round_robin_assign(subscriptions, counts) == {
        "a": [("t", 0), ("t", 2), ("u", 0), ("u", 1)], "b": [("t", 1)]}


async def broker_member(broker: Broker, group_id: str, **kwargs: object) -> JoinResult:
    required = await broker.join_group(group_id, "", "consumer", PROTOCOLS, 10_000, **kwargs)
    assert isinstance(required, MemberIdRequired)
    result = await broker.join_group(group_id, required.member_id, "consumer", PROTOCOLS,
                                     10_000, **kwargs)
    assert isinstance(result, JoinResult)
    return result


async def test_broker_offsets_lag_and_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    from conveyor.broker.types import Message

    await broker.create_topic("t", 2)
    await broker.publish("t", [Message(b"x")] * 5, partition=0)
    member = await broker_member(broker, "g")
    sync = await broker.sync_group("g", member.member_id, member.generation,
                                   {member.member_id: b"plan"})
    assert isinstance(sync, SyncResult) and sync.assignment == b"plan"
    await broker.commit_offsets("g", {("t", 0): CommittedOffset(3, "meta")},
                                member.member_id, member.generation)
    with pytest.raises(IllegalGenerationError):
        await broker.commit_offsets("g", {("t", 0): 4}, member.member_id, member.generation - 1)
    lag = {(lag.topic, lag.partition): lag.lag for lag in broker.group_lag("g")}
    assert lag == {("t", 0): 2, ("t", 1): 0}
    assert [g.state for g in broker.list_groups()] == [GroupState.STABLE]
    # the session expires through the broker's timer (SimClock)
    for _ in range(120):
        harness.clock.advance(100)
        await asyncio.sleep(0)
    assert broker.describe_group("g").state is GroupState.EMPTY
    generation = broker.describe_group("g").generation
    broker = await harness.restart()
    fetched = broker.fetch_offsets("g", [("t", 0), ("t", 1)])
    assert fetched[("t", 1)] is None
    committed = fetched[("t", 0)]
    assert committed is not None and (committed.offset, committed.metadata) == (3, "meta")
    assert broker.describe_group("g").generation == generation
    with pytest.raises(UnknownMemberError):
        await broker.commit_offsets("g", {("t", 0): 4}, member.member_id, generation)
    await broker.commit_offsets("g", {("t", 1): 1})  # simple commit: group is Empty
    assert (await broker.delete_groups(["g", "missing"]))["g"] is None
    assert broker.fetch_offsets("g") == {}
    broker = await harness.restart()
    assert broker.fetch_offsets("g") == {} and broker.list_groups() == []


async def test_broker_server_assigned_group(broker: Broker) -> None:
    await broker.create_topic("t", 3)
    first = await broker.join_group("w", "", "conveyor", [("range", b"t")], 10_000,
                                    require_known_member_id=False)
    assert isinstance(first, JoinResult)
    assert decode_assignment(first.assignment or b"") == [("t", 0), ("t", 1), ("t", 2)]
    assert broker.describe_group("w").state is GroupState.STABLE


async def test_broker_static_member_survives_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    result = await broker.join_group("s", "", "consumer", PROTOCOLS, 10_000,
                                     group_instance_id="pod-1")
    assert isinstance(result, JoinResult)
    broker = await harness.restart()
    again = await broker.join_group("s", "", "consumer", PROTOCOLS, 10_000,
                                    group_instance_id="pod-1")
    assert isinstance(again, JoinResult)
    assert again.member_id == result.member_id and again.generation == result.generation + 1
