"""Goal: the share coordinator's rules over a real broker, with time under test control:
lock expiry hands a record to another member and fences the late acknowledgement;
a silent member is removed and what it held comes back; the delivery-count limit
dead-letters; share-session epochs are checked and closing a session releases; a
partition leader that does not coordinate the group adopts a member at its session's
epoch 0, acquires only from the session's partitions and forgets the member with it.

Method: ShareCoordinator over the broker harness (file log store, SQLite state,
SimClock); time moves only by SimClock.advance.
"""

from __future__ import annotations

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.group_configs import GroupConfigs
from conveyor.broker.share_coordinator import ShareCoordinator
from conveyor.broker.share_state import Acknowledgement
from conveyor.broker.types import HEADER_DEAD_REASON, Message
from conveyor.errors import (
    InvalidRecordStateError,
    InvalidShareSessionEpochError,
    ShareSessionNotFoundError,
    UnknownMemberError,
)


async def coordinator(harness: BrokerHarness, broker: Broker, **configs: str) -> ShareCoordinator:
    group_configs = GroupConfigs(broker.state_store)
    await group_configs.alter("g", {"share.auto.offset.reset": "earliest", **configs}, ())
    await broker.create_topic("t", 1)
    await broker.publish("t", [Message(value=b"v%d" % index) for index in range(3)])
    shares = ShareCoordinator(broker, harness.clock, group_configs)
    for member in ("a", "b"):
        joined = await shares.heartbeat("g", member, 0, ["t"])
        assert joined.assignment == {"t": (0,)}
    return shares


def accept(offset: int) -> Acknowledgement:
    return Acknowledgement("t", 0, offset, offset, (1,))


async def test_lock_expiry_moves_the_record_and_fences_the_late_ack(
        harness: BrokerHarness, broker: Broker) -> None:
    shares = await coordinator(harness, broker, **{"share.record.lock.duration.ms": "1000"})
    held, _ = await shares.acquire("g", "a", ["t"], 10, 0)
    assert [d.offset for d in held] == [0, 1, 2]
    assert (await shares.acquire("g", "b", ["t"], 10, 0))[0] == []
    harness.clock.advance(1_001)
    again, _ = await shares.acquire("g", "b", ["t"], 10, 0)
    assert [(d.offset, d.delivery_count) for d in again] == [(0, 2), (1, 2), (2, 2)]
    late = await shares.acknowledge("g", "a", [accept(0)])
    assert isinstance(late[("t", 0)], InvalidRecordStateError)
    assert await shares.acknowledge("g", "b", [accept(0)]) == {("t", 0): None}


async def test_silent_member_is_removed_and_its_records_come_back(
        harness: BrokerHarness, broker: Broker) -> None:
    shares = await coordinator(harness, broker, **{"share.record.lock.duration.ms": "600000"})
    held, _ = await shares.acquire("g", "a", ["t"], 10, 0)
    assert len(held) == 3
    b_epoch = shares.describe("g").members["b"].epoch
    harness.clock.advance(30_000)
    await shares.heartbeat("g", "b", b_epoch, None)
    harness.clock.advance(16_000)  # a silent for 46 s > share.session.timeout.ms (45 s)
    await shares.heartbeat("g", "b", b_epoch, None)  # touches the group: a is removed
    assert list(shares.describe("g").members) == ["b"]
    back, _ = await shares.acquire("g", "b", ["t"], 10, 0)
    assert [d.offset for d in back] == [0, 1, 2]


async def test_delivery_count_limit_dead_letters(harness: BrokerHarness,
                                                 broker: Broker) -> None:
    shares = await coordinator(harness, broker, **{"share.delivery.count.limit": "2"})
    for _ in range(2):
        held, _ = await shares.acquire("g", "a", ["t"], 1, 0)
        assert [d.offset for d in held] == [0]
        release = Acknowledgement("t", 0, 0, 0, (2,))
        assert await shares.acknowledge("g", "a", [release]) == {("t", 0): None}
    next_up, _ = await shares.acquire("g", "a", ["t"], 1, 0)
    assert [d.offset for d in next_up] == [1]
    dead = await broker.read_records("g.dlq", 0, 0, 10)
    assert [(r.value, dict(r.headers)[HEADER_DEAD_REASON]) for r in dead] == [
        (b"v0", b"max-deliveries")]


async def test_session_epochs_and_closing_releases(harness: BrokerHarness,
                                                   broker: Broker) -> None:
    shares = await coordinator(harness, broker)
    with pytest.raises(ShareSessionNotFoundError):
        await shares.open_session("g", "a", 1, [], [])
    await shares.open_session("g", "a", 0, [("t", 0)], [])
    await shares.open_session("g", "a", 1, [], [])
    with pytest.raises(InvalidShareSessionEpochError):
        await shares.open_session("g", "a", 1, [], [])
    held, _ = await shares.acquire("g", "a", ["t"], 10, 0)
    assert len(held) == 3
    _, closing = await shares.open_session("g", "a", -1, [], [])
    assert closing
    await shares.close_session("g", "a")
    back, _ = await shares.acquire("g", "b", ["t"], 10, 0)
    assert [(d.offset, d.delivery_count) for d in back] == [(0, 2), (1, 2), (2, 2)]


def another_node(harness: BrokerHarness, broker: Broker,
                 shares: ShareCoordinator) -> ShareCoordinator:
    """The ShareCoordinator of another cluster node, over the same broker: a cluster node
    reads a group from the store only when it claims it, so it starts with none."""
    node = ShareCoordinator(broker, harness.clock, shares.configs)
    node.groups.clear()
    return node


async def test_a_leader_that_does_not_coordinate_adopts_the_session_member(
        harness: BrokerHarness, broker: Broker) -> None:
    """Several nodes: the member heartbeats at the coordinator (``shares``); another
    node (``leader``) leads partition 1 and sees the member only in its share session."""
    shares = await coordinator(harness, broker)
    await broker.create_topic("two", 2)
    await broker.publish("two", [Message(value=b"p0")], partition=0)
    await broker.publish("two", [Message(value=b"p1")], partition=1)
    await shares.heartbeat("g", "a", shares.describe("g").members["a"].epoch, ["t", "two"])
    leader = another_node(harness, broker, shares)
    leader.coordinates = lambda group_id: False
    with pytest.raises(UnknownMemberError):  # only a session's epoch 0 adopts
        await leader.open_session("g", "a", 1, [("two", 1)], [])
    session, _ = await leader.open_session("g", "a", 0, [("two", 1)], [])
    assert session is not None and leader.groups["g"].members["a"].adopted
    held, _ = await leader.acquire("g", "a", ["two"], 10, 0, partitions={"two": [1]})
    assert [(d.partition, d.value) for d in held] == [(1, b"p1")]
    # the coordinator's own member takes partition 0 only: partition 1's record is held
    other, _ = await shares.acquire("g", "b", ["two"], 10, 0, partitions={"two": [0, 1]})
    assert [(d.partition, d.value) for d in other] == [(0, b"p0")]
    outcome = await leader.acknowledge("g", "a", [Acknowledgement("two", 1, 0, 0, (1,))])
    assert outcome == {("two", 1): None}
    await leader.close_session("g", "a")
    assert "a" not in leader.groups["g"].members  # forgotten with its session
    await leader.open_session("g", "quiet", 0, [("two", 1)], [])
    harness.clock.advance(46_000)  # past share.session.timeout.ms (45 s), no fetch
    await leader.open_session("g", "a", 0, [("two", 1)], [])
    assert set(leader.groups["g"].members) == {"a"}  # the quiet one expired
    coordinating = another_node(harness, broker, shares)
    coordinating.coordinates = lambda group_id: True
    with pytest.raises(UnknownMemberError):  # the coordinator knows its members
        await coordinating.open_session("g", "z", 0, [("two", 1)], [])
