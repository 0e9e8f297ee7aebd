"""Goal: KIP-848 and KIP-932 members outlive their coordinator. A new coordinator over
the same state store (a restart, or a cluster node claiming the group) goes on with the
same group epoch, member epochs, assignments, target and static members; a heartbeat
that changes nothing writes nothing; a member whose session lapsed while nobody
coordinated the group is expired a session timeout after the load, not at it; a
deleted group is gone from the store.

Method: the consumer coordinator over the stand-in broker of test_consumer_coordinator
(topics, rng, a real SQLite state store in memory) and a SimClock; "restart" is a new
GroupMembers loaded from the same store and a new coordinator over it. The share
coordinator runs over a real Broker (BrokerHarness), restarted by the harness.
"""

from __future__ import annotations

from typing import Any

from broker_harness import BrokerHarness
from test_consumer_coordinator import Configs, StandInBroker, owned

from conveyor.broker.broker import Broker
from conveyor.broker.consumer_coordinator import ConsumerCoordinator
from conveyor.broker.group_members import GroupMembers
from conveyor.broker.share_coordinator import ShareCoordinator
from conveyor.errors import FencedMemberEpochError
from conveyor.storage.member_state import CONSUMER
from conveyor.testing.clock import SimClock

SESSION_MS = 45_000


async def restarted(broker: StandInBroker, clock: SimClock) -> ConsumerCoordinator:
    broker.group_members = GroupMembers(broker.state_store)
    await broker.group_members.load()
    stand_in: Any = broker
    configs: Any = Configs()
    return ConsumerCoordinator(stand_in, clock, configs)


async def test_consumer_members_keep_epochs_and_assignments_across_a_restart() -> None:
    clock = SimClock()
    broker = StandInBroker()
    first = await restarted(broker, clock)
    a = await first.heartbeat("g", "a", 0, topic_names=["t"], rebalance_timeout_ms=60_000)
    b = await first.heartbeat("g", "b", 0, topic_names=["t"], rebalance_timeout_ms=60_000,
                              instance_id="static-b")
    a = await first.heartbeat("g", "a", a.member_epoch, owned=owned_dict(a))
    a = await first.heartbeat("g", "a", a.member_epoch, owned={"t": frozenset(owned(a))})
    b = await first.heartbeat("g", "b", b.member_epoch, owned={})
    before = first.describe("g")
    epochs = {member_id: member.epoch for member_id, member in before.members.items()}
    assigned = {member_id: member.assigned for member_id, member in before.members.items()}
    assert owned(b) and set(owned(b)).isdisjoint(set(assigned["a"]["t"]))

    second = await restarted(broker, clock)
    after = second.describe("g")
    assert (after.epoch, after.assignment_epoch) == (before.epoch, before.assignment_epoch)
    assert {m: member.epoch for m, member in after.members.items()} == epochs
    assert {m: member.assigned for m, member in after.members.items()} == assigned
    assert after.target == before.target and after.static == {"static-b": "b"}
    writes = second.members.writes
    again = await second.heartbeat("g", "a", epochs["a"], owned=assigned["a"])
    assert again.member_epoch == epochs["a"]
    assert again.assignment == assigned["a"]  # the new coordinator answers it once in full
    quiet = await second.heartbeat("g", "a", epochs["a"], owned=assigned["a"])
    assert quiet.assignment is None and second.describe("g").epoch == before.epoch
    assert second.members.writes == writes  # nothing changed: nothing written


async def test_a_wrong_epoch_is_still_fenced_after_a_restart() -> None:
    clock = SimClock()
    broker = StandInBroker()
    first = await restarted(broker, clock)
    a = await first.heartbeat("g", "a", 0, topic_names=["t"])
    await first.heartbeat("g", "b", 0, topic_names=["t"])
    second = await restarted(broker, clock)
    member = second.describe("g").members["a"]
    wrong = member.epoch + 7  # neither its epoch nor the one before: fenced, as before
    try:
        await second.heartbeat("g", "a", wrong, owned={})
    except FencedMemberEpochError:
        pass
    else:
        raise AssertionError("a wrong member epoch was accepted after the restart")
    answer = await second.heartbeat("g", "a", member.epoch, owned={})
    assert answer.member_epoch == member.epoch and a.member_id == "a"


async def test_session_of_a_restored_member_counts_from_the_load() -> None:
    clock = SimClock()
    broker = StandInBroker()
    first = await restarted(broker, clock)
    a = await first.heartbeat("g", "a", 0, topic_names=["t"])
    b = await first.heartbeat("g", "b", 0, topic_names=["t"])
    clock.advance(SESSION_MS * 2)  # nobody coordinated the group for two sessions
    second = await restarted(broker, clock)
    assert set(second.describe("g").members) == {"a", "b"}  # not expired at load
    clock.advance(SESSION_MS - 1_000)
    await second.heartbeat("g", "b", b.member_epoch, owned={})
    clock.advance(2_000)  # a silent for a session since the load; b heard 2 s ago
    assert set(second.describe("g").members) == {"b"}
    await second.heartbeat("g", "b", second.describe("g").members["b"].epoch, owned={})
    third = await restarted(broker, clock)
    assert set(third.describe("g").members) == {"b"}  # a's removal was written
    assert a.member_id == "a"


async def test_deleted_consumer_group_is_gone_from_the_store() -> None:
    clock = SimClock()
    broker = StandInBroker()
    first = await restarted(broker, clock)
    a = await first.heartbeat("g", "a", 0, topic_names=["t"])
    await first.heartbeat("g", "a", -1)
    assert a.member_epoch > 0
    first.delete_group("g")
    await broker.state_store.commit()
    assert await broker.state_store.members.load(CONSUMER) == []
    second = await restarted(broker, clock)
    assert not second.is_consumer_group("g")


def owned_dict(answer: Any) -> dict[str, frozenset[int]]:
    assert answer.assignment is not None
    return dict(answer.assignment)


async def test_share_members_keep_their_epochs_across_a_restart(
        harness: BrokerHarness, broker: Broker) -> None:
    await broker.create_topic("jobs", 2)
    shares = ShareCoordinator(broker, harness.clock, broker.group_configs)
    joined = await shares.heartbeat("s", "m1", 0, ["jobs"])
    await shares.heartbeat("s", "m2", 0, ["jobs"])
    assert joined.assignment == {"jobs": (0, 1)}
    epoch = shares.groups["s"].members["m1"].epoch
    group_epoch = shares.groups["s"].epoch

    broker = await harness.restart()
    again = ShareCoordinator(broker, harness.clock, broker.group_configs)
    assert set(again.groups["s"].members) == {"m1", "m2"}
    assert again.groups["s"].epoch == group_epoch
    writes = again.members.writes
    beat = await again.heartbeat("s", "m1", epoch, ["jobs"])
    assert beat.member_epoch == epoch
    assert again.members.writes == writes  # nothing changed, nothing written
    await again.heartbeat("s", "m2", -1, None)

    broker = await harness.restart()
    third = ShareCoordinator(broker, harness.clock, broker.group_configs)
    assert set(third.groups["s"].members) == {"m1"}
