"""Goal: the KIP-848 coordinator's time rules: a silent member is removed after
consumer.session.timeout.ms and its partitions go to the others; a member that does
not confirm a revocation within its rebalance timeout is removed too; a static member
that left with -2 keeps its assignment until its session times out.

Method: the coordinator over a stand-in broker (topics, rng and the members' store on an
in-memory SQLite) and a SimClock;
time moves only by SimClock.advance.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from conveyor.broker.consumer_coordinator import ConsumerCoordinator
from conveyor.broker.group_configs import DEFAULTS
from conveyor.broker.group_members import GroupMembers
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock

TOPIC_PARTITIONS = 4


@dataclass
class Info:
    name: str
    partitions: int
    kind: str = "topic"


@dataclass
class Topics:
    known: dict[str, Info] = field(default_factory=lambda: {
        "t": Info("t", TOPIC_PARTITIONS)})

    def find(self, name: str) -> Info | None:
        return self.known.get(name)


def memory_store() -> SqliteStateStore:
    store = SqliteStateStore(":memory:")
    store.sqlite.open_sync()
    store.members.create_schema()
    return store


class StandInBroker:
    def __init__(self, store: SqliteStateStore | None = None) -> None:
        self.topics = Topics()
        self.rng = random.Random(848)
        self.state_store = store or memory_store()
        self.group_members = GroupMembers(self.state_store)

    def list_topics(self) -> list[Info]:
        return list(self.topics.known.values())


class Configs:
    def integer(self, group: str, name: str) -> int:
        return int(DEFAULTS[name])


def coordinator(clock: SimClock) -> ConsumerCoordinator:
    broker: Any = StandInBroker()
    configs: Any = Configs()
    return ConsumerCoordinator(broker, clock, configs)


def owned(answer: Any) -> frozenset[int]:
    assert answer.assignment is not None
    return answer.assignment.get("t", frozenset())


async def test_silent_member_is_removed_and_its_partitions_move() -> None:
    clock = SimClock()
    groups = coordinator(clock)
    a = await groups.heartbeat("g", "a", 0, topic_names=["t"], rebalance_timeout_ms=60_000)
    assert owned(a) == {0, 1, 2, 3}
    clock.advance(44_000)
    b = await groups.heartbeat("g", "b", 0, topic_names=["t"], rebalance_timeout_ms=60_000)
    assert b.assignment == {}  # a still owns everything and has not revoked yet
    clock.advance(2_000)  # a has now been silent for 46 s > 45 s
    again = await groups.heartbeat("g", "b", b.member_epoch, owned={})
    assert owned(again) == {0, 1, 2, 3}
    assert list(groups.describe("g").members) == ["b"]


async def test_member_that_never_confirms_a_revocation_is_removed() -> None:
    clock = SimClock()
    groups = coordinator(clock)
    a = await groups.heartbeat("g", "a", 0, topic_names=["t"], rebalance_timeout_ms=5_000)
    b = await groups.heartbeat("g", "b", 0, topic_names=["t"], rebalance_timeout_ms=5_000)
    revoking = await groups.heartbeat("g", "a", a.member_epoch, owned={"t": frozenset(range(4))})
    assert len(owned(revoking)) == 2
    b_epoch, b_owned = b.member_epoch, frozenset[int]()
    for _ in range(3):  # a keeps heartbeating but keeps reporting all four partitions
        clock.advance(2_000)
        answer = await groups.heartbeat("g", "b", b_epoch, owned={"t": b_owned})
        if answer.assignment is not None:
            b_epoch, b_owned = answer.member_epoch, owned(answer)
        if "a" in groups.describe("g").members:
            await groups.heartbeat("g", "a", a.member_epoch, owned={"t": frozenset(range(4))})
    assert list(groups.describe("g").members) == ["b"]
    assert b_owned == {0, 1, 2, 3}


async def test_static_member_keeps_its_partitions_until_its_session_ends() -> None:
    clock = SimClock()
    groups = coordinator(clock)
    a = await groups.heartbeat("g", "a", 0, instance_id="i", topic_names=["t"],
                               rebalance_timeout_ms=60_000)
    await groups.heartbeat("g", "b", 0, topic_names=["t"], rebalance_timeout_ms=60_000)
    a_owned = owned(await groups.heartbeat("g", "a", a.member_epoch,
                                           owned={"t": frozenset(range(4))}))
    await groups.heartbeat("g", "a", a.member_epoch, owned={"t": a_owned})
    assert (await groups.heartbeat("g", "a", -2, instance_id="i")).member_epoch == -2
    clock.advance(30_000)
    back = await groups.heartbeat("g", "a2", 0, instance_id="i", topic_names=["t"],
                                  rebalance_timeout_ms=60_000)
    assert owned(back) == a_owned  # the same partitions, no rebalance
    await groups.heartbeat("g", "a2", back.member_epoch, owned={"t": a_owned})
    assert (await groups.heartbeat("g", "a2", -2, instance_id="i")).member_epoch == -2
    clock.advance(46_000)
    assert "a2" not in groups.describe("g").members  # its session ended: gone for good
