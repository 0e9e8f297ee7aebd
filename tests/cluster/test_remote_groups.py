"""The HTTP API's ordered-group operations on a cluster node (cluster/remote_groups.py).

Goal: a group this node serves runs here; any other is forwarded to its owner over the
internal channel and comes back as the same value (offsets, a describe's summary) or the
owner's error; an owner that answers "not the owner" (the group moved) is asked again,
and the call runs here once the group has moved here; with no owner to reach the caller
gets UnavailableError. On the owner side, a peer's malformed arguments are
InvalidRequestError before anything runs, a node that does not serve the group answers
NotOwnerError, and a topic it does not know is looked up again once, then refused.
Method: two ``RemoteGroups`` in one process, each with a stand-in membership (who owns
the group, the other's internal address) and a recording stand-in for its coordinator;
the asking side reaches the owner through a real ``InternalServer`` on a local port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from conveyor.broker.group_operations import GroupSummary
from conveyor.broker.types import PartitionLag
from conveyor.cluster import remote_groups
from conveyor.cluster.internal_api import InternalServer, NotOwnerError
from conveyor.cluster.remote_groups import COMMIT, COMMITTED, DELETE, DESCRIBE, RemoteGroups
from conveyor.errors import (
    InvalidRequestError,
    NonEmptyGroupError,
    UnavailableError,
    UnknownGroupError,
    UnknownTopicError,
)

SECRET = bytes(range(32))


@dataclass
class Node:
    node_id: int
    addresses: dict[str, str]


@dataclass
class FakeMembership:
    node_id: int
    owner: int | None = None
    nodes: list[Node] = field(default_factory=list)
    incarnation: int = 1

    def owner_of(self, kind: str, name: str) -> tuple[int | None, int]:
        return self.owner, 1

    def live_nodes(self) -> list[Node]:
        return self.nodes


class Coordinator:
    """Records what it is asked; ``offsets`` is what it has committed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.offsets: dict[tuple[str, int], int] = {}
        self.members = 0

    async def commit(self, group: str, offsets: Mapping[tuple[str, int], int]) -> None:
        self.calls.append(("commit", (group, dict(offsets))))
        self.offsets.update(offsets)

    async def committed(self, group: str, partitions: Sequence[tuple[str, int]]
                        ) -> dict[tuple[str, int], int]:
        self.calls.append(("committed", (group, list(partitions))))
        return {key: self.offsets[key] for key in partitions if key in self.offsets}

    async def describe(self, group: str) -> GroupSummary:
        self.calls.append(("describe", group))
        if not self.offsets:
            raise UnknownGroupError("unknown group", group_id=group)
        return GroupSummary(group, "Empty", self.members, tuple(
            PartitionLag(topic, partition, offset, 10, 10 - offset)
            for (topic, partition), offset in sorted(self.offsets.items())))

    async def delete(self, group: str) -> None:
        self.calls.append(("delete", group))
        if self.members:
            raise NonEmptyGroupError("group has members", group_id=group)
        self.offsets.clear()


class Topics:
    def __init__(self, known: set[str]) -> None:
        self.known = known

    def find(self, name: str) -> object | None:
        return object() if name in self.known else None


@dataclass
class Side:
    groups: RemoteGroups
    coordinator: Coordinator
    membership: FakeMembership
    serves: list[bool]  # [does this node serve the group]
    refreshed: list[int]


def side(node_id: int, serves: bool, topics: set[str] | None = None,
         created_by_refresh: str | None = None) -> Side:
    coordinator = Coordinator()
    membership = FakeMembership(node_id)
    serving = [serves]
    refreshed: list[int] = []
    known = Topics(topics if topics is not None else {"t"})

    async def serve(group: str) -> bool:
        return serving[0]

    async def refresh() -> None:
        refreshed.append(1)
        if created_by_refresh is not None:
            known.known.add(created_by_refresh)

    groups = RemoteGroups(cast(Any, membership), coordinator, serve, cast(Any, known),
                          refresh, SECRET)
    return Side(groups, coordinator, membership, serving, refreshed)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Side, Side]]:
    """Node 1 asks; node 2 owns the group and listens on its internal port."""
    asking, owner = side(1, serves=False), side(2, serves=True)

    async def handler(op: str, args: dict[str, Any], node: int, incarnation: int) -> Any:
        return await owner.groups.handle(op, args)

    server = InternalServer(SECRET, handler)
    port = await server.start("127.0.0.1")
    asking.membership.owner = 2
    asking.membership.nodes = [Node(2, {"internal": f"127.0.0.1:{port}"})]
    try:
        yield asking, owner
    finally:
        await asking.groups.close()
        await server.close()


async def test_the_owner_answers_what_a_non_owner_asks(pair: tuple[Side, Side]) -> None:
    asking, owner = pair
    await asking.groups.commit("g", {("t", 0): 5, ("t", 1): 7})
    assert owner.coordinator.offsets == {("t", 0): 5, ("t", 1): 7}
    assert await asking.groups.committed("g", [("t", 0), ("t", 1), ("t", 2)]) == {
        ("t", 0): 5, ("t", 1): 7}
    summary = await asking.groups.describe("g")
    assert summary == GroupSummary("g", "Empty", 0, (PartitionLag("t", 0, 5, 10, 5),
                                                     PartitionLag("t", 1, 7, 10, 3)))
    owner.coordinator.members = 1  # the owner's error comes back as itself
    with pytest.raises(NonEmptyGroupError):
        await asking.groups.delete("g")
    owner.coordinator.members = 0
    await asking.groups.delete("g")
    with pytest.raises(UnknownGroupError):
        await asking.groups.describe("g")
    assert asking.coordinator.calls == []  # nothing ran on the asking node
    assert (asking.groups.forwarded, owner.groups.served) == (6, 6)


async def test_a_group_this_node_serves_runs_here() -> None:
    here = side(1, serves=True)
    await here.groups.commit("g", {("t", 0): 3})
    assert await here.groups.committed("g", [("t", 0)]) == {("t", 0): 3}
    assert (await here.groups.describe("g")).partitions == (PartitionLag("t", 0, 3, 10, 7),)
    assert here.groups.forwarded == 0


async def test_a_moved_group_is_asked_again_then_runs_here(
        pair: tuple[Side, Side], monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner no longer serves the group and it moves to the asking node: the commit
    is written once, here."""
    asking, owner = pair
    owner.serves[0] = False
    original = owner.groups.handle

    async def refused_then_moved(op: str, args: dict[str, Any]) -> Any:
        try:
            return await original(op, args)
        finally:
            asking.serves[0] = True  # the asking node is the choice now

    monkeypatch.setattr(owner.groups, "handle", refused_then_moved)
    await asking.groups.commit("g", {("t", 0): 9})
    assert asking.coordinator.offsets == {("t", 0): 9}
    assert owner.coordinator.calls == []


async def test_no_reachable_owner_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_groups, "RETRY_MS", 150)
    lonely = side(1, serves=False)
    lonely.membership.owner = 2  # no live node advertises its internal address
    with pytest.raises(UnavailableError):
        await lonely.groups.committed("g", [("t", 0)])
    assert lonely.coordinator.calls == []


GOOD: dict[str, dict[str, Any]] = {
    COMMIT: {"group": "g", "offsets": [["t", 0, 5]]},
    COMMITTED: {"group": "g", "partitions": [["t", 0]]},
    DESCRIBE: {"group": "g"},
    DELETE: {"group": "g"},
}


@pytest.mark.parametrize(("op", "bad"), [
    (COMMIT, {"group": ""}), (COMMIT, {"group": 5}), (COMMIT, {"group": "g" * 40_000}),
    (COMMIT, {"offsets": None}), (COMMIT, {"offsets": [["t", 0]]}),
    (COMMIT, {"offsets": [["t", -1, 5]]}), (COMMIT, {"offsets": [["t", 0, True]]}),
    (COMMIT, {"offsets": [["", 0, 5]]}), (COMMIT, {"offsets": [["t", 0, 2**63]]}),
    (COMMIT, {"offsets": [[None, 0, 5]]}), (COMMIT, {"offsets": "t"}),
    (COMMITTED, {"partitions": [["t", "0"]]}), (COMMITTED, {"partitions": {"t": 0}}),
    (COMMITTED, {"partitions": [["t", 0, 1]]}), (DESCRIBE, {"group": None}),
    (DELETE, {"group": []}),
])
async def test_malformed_arguments_are_refused_before_anything_runs(
        op: str, bad: dict[str, Any]) -> None:
    owner = side(2, serves=True)
    with pytest.raises(InvalidRequestError):
        await owner.groups.handle(op, {**GOOD[op], **bad})
    assert owner.coordinator.calls == []
    assert owner.groups.served == 0


async def test_too_many_partitions_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_groups, "PARTITIONS_MAX", 3)
    owner = side(2, serves=True)
    with pytest.raises(InvalidRequestError):
        await owner.groups.handle(COMMITTED, {"group": "g", "partitions": [["t", p]
                                                                          for p in range(4)]})
    assert owner.coordinator.calls == []


async def test_an_unknown_op_is_refused() -> None:
    owner = side(2, serves=True)
    with pytest.raises(InvalidRequestError):
        await owner.groups.handle("group_whatever", {"group": "g"})
    assert owner.coordinator.calls == []


@pytest.mark.parametrize("op", sorted(GOOD))
async def test_a_node_that_does_not_serve_the_group_answers_not_owner(op: str) -> None:
    other = side(2, serves=False)
    with pytest.raises(NotOwnerError):
        await other.groups.handle(op, GOOD[op])
    assert other.coordinator.calls == []


async def test_a_topic_is_looked_up_again_once_then_refused() -> None:
    owner = side(2, serves=True, topics=set(), created_by_refresh="fresh")
    await owner.groups.handle(COMMIT, {"group": "g", "offsets": [["fresh", 1, 4]]})
    assert owner.coordinator.offsets == {("fresh", 1): 4}
    assert owner.refreshed == [1]
    with pytest.raises(UnknownTopicError):
        await owner.groups.handle(COMMIT, {"group": "g", "offsets": [["nowhere", 0, 1]]})
    assert owner.refreshed == [1, 1]
    assert owner.coordinator.offsets == {("fresh", 1): 4}
