"""Offset commits fenced inside their own transaction (docs/cluster.md, issue 12).

A cluster node's offset commit carries its owner fence (owner, epoch, live lease) into
the write's transaction, locking the owner row: a node that passed every check and then
lost the group before writing (paused, its lease lapsed, another node claimed the
group) writes nothing, and a claim that comes while a commit is in flight waits for it,
so the new owner's reload sees it. A group's delete is fenced the same way.
"""

from __future__ import annotations

import asyncio
import random
import time
from types import SimpleNamespace

import asyncpg
import pytest

from conveyor.broker.broker_config import BrokerConfig
from conveyor.broker.group_coordinator import GroupCoordinator
from conveyor.clock import SystemClock
from conveyor.cluster.membership import Membership
from conveyor.cluster.ownership import GROUP, choose_owner
from conveyor.errors import NotCoordinatorError
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.state_store import CommittedOffsetRow, SqlStateStore
from tests.cluster.test_membership import lease_lapsed, node


def group_of(owner: int) -> str:
    return next(f"g{index}" for index in range(100)
                if choose_owner(GROUP, f"g{index}", [1, 2]) == owner)


async def store(dsn: str) -> SqlStateStore:
    state = SqlStateStore(PostgresEngine(dsn, SystemClock()))
    await state.open()
    return state


async def two_nodes(dsn: str) -> tuple[Membership, Membership]:
    first, second = node(dsn, 1, lease_ms=2_000), node(dsn, 2, lease_ms=60_000)
    await first.open({})
    await second.open({})
    await first.heartbeat()
    await second.heartbeat()
    return first, second


def row(group: str, offset: int) -> CommittedOffsetRow:
    return CommittedOffsetRow(group, "t", 0, offset, None, -1, 1)


async def test_a_stale_owners_commit_is_refused_after_it_passed_its_checks(
        postgres_dsn: str) -> None:
    first, second = await two_nodes(postgres_dsn)
    state = await store(postgres_dsn)
    group = group_of(1)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(GROUP, group)
    assert await state.save_committed_offsets_guarded([row(group, 5)], first.write_guard(
        GROUP, group) or pytest.fail("node 1 owns the group"))
    # the race, forced: node 1 checks (the old fence, then its guard) and then pauses
    assert await first.fence(GROUP, group)
    guard = first.write_guard(GROUP, group)
    assert guard is not None
    await lease_lapsed(postgres_dsn, 1)
    await second.heartbeat()
    assert await second.ensure_owned(GROUP, group)  # the next owner: epoch + 1
    # node 1 wakes and writes: the guard inside the transaction refuses it
    assert not await state.save_committed_offsets_guarded([row(group, 9)], guard)
    assert [r.committed_offset for r in await state.load_committed_offsets(group)] == [5]
    new_guard = second.write_guard(GROUP, group)
    assert new_guard is not None
    assert await state.save_committed_offsets_guarded([row(group, 7)], new_guard)
    assert [r.committed_offset for r in await state.load_committed_offsets(group)] == [7]
    await state.close()
    await first.close()
    await second.close()


async def test_a_claim_waits_for_a_commit_in_flight(postgres_dsn: str) -> None:
    """The guard locks the owner row: the successor's claim (and so its reload) comes
    after the commit that held it, never between the check and the write."""
    first, second = await two_nodes(postgres_dsn)
    state = await store(postgres_dsn)  # the schema
    group = group_of(1)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(GROUP, group)
    guard = first.write_guard(GROUP, group)
    assert guard is not None
    holder = await asyncpg.connect(postgres_dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        assert await holder.fetchrow(guard.sql, *guard.parameters) is not None
        await lease_lapsed(postgres_dsn, 1)  # node 1 pauses between its check and commit
        await second.heartbeat()
        claim = asyncio.create_task(second.ensure_owned(GROUP, group))
        deadline = time.monotonic() + 10
        while not await watcher.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
            assert time.monotonic() < deadline, "the claim never waited on the owner row"
            assert not claim.done(), "the claim went past a commit in flight"
            await asyncio.sleep(0.02)
        await holder.execute(
            "INSERT INTO group_offsets (group_id, topic, partition, committed_offset, "
            "metadata, leader_epoch, commit_ms) VALUES ($1, 't', 0, 11, NULL, -1, 1)", group)
        await transaction.commit()
        assert await asyncio.wait_for(claim, 10)
        found = await watcher.fetchval(
            "SELECT committed_offset FROM group_offsets WHERE group_id = $1", group)
        assert found == 11  # what the successor's reload reads
    finally:
        await holder.close()
        await watcher.close()
    await state.close()
    await first.close()
    await second.close()


async def test_the_coordinator_answers_not_coordinator_and_keeps_its_view(
        postgres_dsn: str) -> None:
    first, second = await two_nodes(postgres_dsn)
    state = await store(postgres_dsn)
    clock = SystemClock()
    topics = SimpleNamespace(get=lambda name: name)  # commit_offsets only asks it exists
    coordinator = GroupCoordinator(topics, None, state, clock,  # type: ignore[arg-type]
                                   random.Random(1), BrokerConfig())
    coordinator.commit_guard = lambda group_id: first.write_guard(GROUP, group_id)
    group = group_of(1)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(GROUP, group)
    await coordinator.commit_offsets(group, {("t", 0): 3})
    stale = first.write_guard(GROUP, group)
    coordinator.commit_guard = lambda group_id: stale  # checked before the lease lapsed
    await lease_lapsed(postgres_dsn, 1)
    await second.heartbeat()
    assert await second.ensure_owned(GROUP, group)
    with pytest.raises(NotCoordinatorError):
        await coordinator.commit_offsets(group, {("t", 0): 8})
    committed = coordinator.fetch_offsets(group)[("t", 0)]
    assert committed is not None and committed.offset == 3  # the refused 8 is not shown
    assert [r.committed_offset for r in await state.load_committed_offsets(group)] == [3]
    await state.close()
    await first.close()
    await second.close()


async def test_a_stale_owners_group_delete_is_refused_and_deletes_nothing(
        postgres_dsn: str) -> None:
    """A group's delete (HTTP DELETE /groups/<g>, Kafka DeleteGroups) passed its checks,
    then its node lost the group: nothing is deleted, in the store or in memory; the
    new owner's delete goes through."""
    first, second = await two_nodes(postgres_dsn)
    state = await store(postgres_dsn)
    clock = SystemClock()
    topics = SimpleNamespace(get=lambda name: name)  # commit_offsets only asks it exists
    coordinator = GroupCoordinator(topics, None, state, clock,  # type: ignore[arg-type]
                                   random.Random(1), BrokerConfig())
    coordinator.commit_guard = lambda group_id: first.write_guard(GROUP, group_id)
    group = group_of(1)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(GROUP, group)
    await coordinator.commit_offsets(group, {("t", 0): 3})
    stale = first.write_guard(GROUP, group)
    coordinator.commit_guard = lambda group_id: stale  # checked before the lease lapsed
    await lease_lapsed(postgres_dsn, 1)
    await second.heartbeat()
    assert await second.ensure_owned(GROUP, group)
    outcome = await coordinator.delete_groups([group])
    assert isinstance(outcome[group], NotCoordinatorError)
    assert [r.committed_offset for r in await state.load_committed_offsets(group)] == [3]
    kept = coordinator.fetch_offsets(group)[("t", 0)]
    assert kept is not None and kept.offset == 3  # still in memory
    coordinator.commit_guard = lambda group_id: second.write_guard(GROUP, group_id)
    assert await coordinator.delete_groups([group]) == {group: None}
    assert await state.load_committed_offsets(group) == []
    assert coordinator.fetch_offsets(group) == {}
    await state.close()
    await first.close()
    await second.close()
