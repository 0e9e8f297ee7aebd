"""SyncGroup and TxnOffsetCommit fenced inside their own write's transaction (issue 12).

Like an offset commit (test_fenced_commits.py), a leader's SyncGroup and a
TxnOffsetCommit are written under the group's owner fence (owner, epoch, live lease,
checked and share-locked inside the write's transaction). The race is forced: node 1
owns the group and takes its guard, then pauses (its lease lapses on the database's
clock) and node 2 claims the group; when node 1 goes on it must answer NOT_COORDINATOR,
hand out no assignment, write nothing and stop serving the group. The group's next
owner keeps fencing by epoch what node 1's ended transactions fenced (the ended epoch is
stored with the end and reloaded at the claim).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.ordered_group import JoinResult
from conveyor.cluster.membership import Membership
from conveyor.cluster.ownership import GROUP
from conveyor.errors import NotCoordinatorError, ProducerFencedError, UnavailableError
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.sql_engine import WriteGuard
from conveyor.storage.state_store import SqlStateStore
from conveyor.testing.clock import SimClock
from tests.cluster.test_fenced_commits import group_of, two_nodes
from tests.cluster.test_membership import lease_lapsed


@dataclass
class Setup:
    broker: Broker
    first: Membership
    second: Membership
    group: str
    dsn: str
    guard: WriteGuard | None = None  # what node 1's broker writes under (None: its own)

    def current(self, group_id: str) -> WriteGuard | None:
        return self.guard or self.first.write_guard(GROUP, group_id)

    async def node_1_pauses(self) -> None:
        """Node 1 took its guard, then its lease lapses and node 2 claims the group."""
        self.guard = self.first.write_guard(GROUP, self.group)
        assert self.guard is not None
        await lease_lapsed(self.dsn, 1)
        await self.second.heartbeat()
        assert await self.second.ensure_owned(GROUP, self.group)


def node_broker(dsn: str, seed: int) -> Broker:
    clock = SimClock()
    return Broker(PostgresLogStore(dsn, clock, random.Random(seed), chunk_offsets=8),
                  SqlStateStore(PostgresEngine(dsn, clock)), clock, random.Random(seed + 1))


@pytest.fixture
async def setup(postgres_dsn: str) -> AsyncIterator[Setup]:
    first, second = await two_nodes(postgres_dsn)
    broker = node_broker(postgres_dsn, 1)
    await broker.open()
    found = Setup(broker, first, second, group_of(1), postgres_dsn)
    coordinator = broker.group_coordinator
    coordinator.commit_guard = found.current
    coordinator.guard_refused = lambda group_id: first.forget(GROUP, group_id)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(GROUP, found.group)
    try:
        yield found
    finally:
        await broker.close()
        await first.close()
        await second.close()


async def test_a_stale_coordinators_sync_hands_out_nothing(setup: Setup) -> None:
    coordinator = setup.broker.group_coordinator
    joined = await coordinator.join_group(
        setup.group, "", "consumer", [("range", b"meta")], 10_000,
        require_known_member_id=False)
    assert isinstance(joined, JoinResult) and joined.leader_id == joined.member_id
    await setup.node_1_pauses()
    with pytest.raises(NotCoordinatorError):
        await coordinator.sync_group(setup.group, joined.member_id, joined.generation,
                                     {joined.member_id: b"assignment"})
    assert not setup.first.owns(GROUP, setup.group)  # it stops serving the group
    # the group was not completed here: nothing was handed out
    assert coordinator.groups[setup.group].members[joined.member_id].assignment == b""


async def test_the_owners_sync_is_written_under_its_fence(setup: Setup) -> None:
    coordinator = setup.broker.group_coordinator
    joined = await coordinator.join_group(
        setup.group, "", "consumer", [("range", b"meta")], 10_000,
        require_known_member_id=False)
    assert isinstance(joined, JoinResult)
    synced = await coordinator.sync_group(setup.group, joined.member_id, joined.generation,
                                          {joined.member_id: b"assignment"})
    assert synced.assignment == b"assignment"
    assert setup.first.owns(GROUP, setup.group)


async def stored_offsets(dsn: str, group_id: str) -> dict[tuple[str, int], tuple[int, int]]:
    """The group's pending transactional offsets as stored: (topic, partition) ->
    (offset, producer epoch)."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT topic, partition, committed_offset, producer_epoch FROM txn_group_offsets"
            " WHERE group_id = $1", group_id)
    finally:
        await connection.close()
    return {(row["topic"], row["partition"]): (row["committed_offset"], row["producer_epoch"])
            for row in rows}


async def test_a_stale_coordinators_txn_offset_commit_writes_nothing(setup: Setup) -> None:
    broker = setup.broker
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id("tx", 60_000)
    await broker.add_offsets_to_txn("tx", producer_id, epoch, setup.group)
    written = await broker.txn_offset_commit("tx", setup.group, producer_id, epoch,
                                             [("t", 0, 3, None)])
    assert written == {("t", 0): None}
    assert await stored_offsets(setup.dsn, setup.group) == {("t", 0): (3, epoch)}
    await setup.node_1_pauses()
    with pytest.raises(NotCoordinatorError):
        await broker.txn_offset_commit("tx", setup.group, producer_id, epoch,
                                       [("t", 0, 9, None)])
    assert await stored_offsets(setup.dsn, setup.group) == {("t", 0): (3, epoch)}
    assert broker.pending_txn_offsets(setup.group) == {("t", 0)}  # 9 not kept either
    description = broker.describe_transaction("tx")
    assert description is not None and description.state == "Ongoing"
    assert not setup.first.owns(GROUP, setup.group)


async def test_a_stale_coordinator_cannot_end_a_transactions_offsets(setup: Setup) -> None:
    """The end of a transaction (its marker) reaches a node that lost the group: refused
    (the client is told to retry), nothing committed or dropped there or in the store, the
    transaction left PrepareCommit for the timer's retry (the group's next owner answers
    it: tests/cluster/test_cluster_txn_offsets.py, the chaos form)."""
    broker = setup.broker
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id("tx3", 60_000)
    await broker.add_offsets_to_txn("tx3", producer_id, epoch, setup.group)
    await broker.txn_offset_commit("tx3", setup.group, producer_id, epoch,
                                   [("t", 0, 5, None)])
    await setup.node_1_pauses()
    with pytest.raises(UnavailableError):  # COORDINATOR_NOT_AVAILABLE: the client retries
        await broker.end_txn("tx3", producer_id, epoch, commit=True)
    assert not setup.first.owns(GROUP, setup.group)
    description = broker.describe_transaction("tx3")
    assert description is not None and description.state == "PrepareCommit"
    assert await stored_offsets(setup.dsn, setup.group) == {("t", 0): (5, epoch)}
    assert broker.fetch_offsets(setup.group).get(("t", 0)) is None
    connection = await asyncpg.connect(setup.dsn)
    try:
        committed = await connection.fetch(
            "SELECT committed_offset FROM group_offsets WHERE group_id = $1", setup.group)
    finally:
        await connection.close()
    assert committed == []


async def test_an_implicit_txn_offset_commit_refused_keeps_nothing(setup: Setup) -> None:
    """TV2 (v5): the group joins the transaction at the TxnOffsetCommit (first, as Kafka's
    group coordinator adds it at the transaction coordinator); refused, no offset is
    kept: the transaction's end finds nothing pending for the group."""
    broker = setup.broker
    await broker.create_topic("t")
    producer_id, epoch = await broker.init_producer_id("tx2", 60_000)
    await setup.node_1_pauses()
    with pytest.raises(NotCoordinatorError):
        await broker.txn_offset_commit("tx2", setup.group, producer_id, epoch,
                                       [("t", 0, 4, None)], implicit=True)
    assert await stored_offsets(setup.dsn, setup.group) == {}
    assert broker.pending_txn_offsets(setup.group) == set()


async def test_the_groups_next_owner_fences_an_ended_epoch(setup: Setup) -> None:
    """Node 1 ends a transaction of producer 42 at the group (TV2: the marker's epoch 4),
    then pauses; node 2, open since before the end, claims the group and reloads it: a
    zombie's TxnOffsetCommit of epoch 3 is PRODUCER_FENCED there, nothing kept; the
    producer's next transaction (epoch 4) is kept."""
    await setup.broker.create_topic("t")
    second = node_broker(setup.dsn, 3)
    await second.open()  # loads nothing of the group yet
    try:
        group = setup.group
        second.group_coordinator.commit_guard = (
            lambda group_id: setup.second.write_guard(GROUP, group_id))
        second.group_coordinator.guard_refused = (
            lambda group_id: setup.second.forget(GROUP, group_id))
        first_side = setup.broker.txn_offsets
        await first_side.commit(group, "tx", 42, 3, [("t", 0, 3, None)])
        await first_side.finish(group, "tx", 42, 4, commit=True)
        await setup.node_1_pauses()
        side = second.txn_offsets
        await side.reload_group(group)  # what ClusterNode runs at the claim
        with pytest.raises(ProducerFencedError):
            await side.commit(group, "tx", 42, 3, [("t", 0, 9, None)])
        assert await stored_offsets(setup.dsn, group) == {}
        assert second.pending_txn_offsets(group) == set()
        assert await side.commit(group, "tx", 42, 4, [("t", 0, 5, None)]) == {("t", 0): None}
        assert await stored_offsets(setup.dsn, group) == {("t", 0): (5, 4)}
    finally:
        await second.close()
