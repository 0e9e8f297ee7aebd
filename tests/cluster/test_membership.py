"""Membership on a real PostgreSQL: leases by the database clock, claims, epochs, fencing."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from conveyor.clock import SystemClock
from conveyor.cluster.membership import ClusterSettings, Membership
from conveyor.cluster.ownership import GROUP, PARTITION, choose_owner
from conveyor.errors import UnavailableError

# heartbeats only when the test calls them: a node that is never renewed is "paused"
MANUAL = 3_600_000


def node(dsn: str, node_id: int | None, lease_ms: int = 600) -> Membership:
    return Membership(ClusterSettings(dsn, node_id, MANUAL, lease_ms), SystemClock())


async def lease_lapsed(dsn: str, node_id: int) -> None:
    """Wait out the node's lease on the database's clock (no event exists for it)."""
    connection = await asyncpg.connect(dsn)
    try:
        remaining_s = await connection.fetchval(
            "SELECT greatest(0, extract(epoch FROM lease_until - clock_timestamp()))::float8 "
            "FROM conveyor_nodes WHERE node_id = $1", node_id)
        await asyncio.sleep(remaining_s + 0.05)
        assert not await connection.fetchval(
            "SELECT lease_until > clock_timestamp() FROM conveyor_nodes WHERE node_id = $1",
            node_id)
    finally:
        await connection.close()


def test_rendezvous_moves_only_the_items_of_a_leaving_node() -> None:
    names = [f"t/{index}" for index in range(200)]
    before = {name: choose_owner(PARTITION, name, [1, 2, 3]) for name in names}
    after = {name: choose_owner(PARTITION, name, [1, 3]) for name in names}
    moved = [name for name in names if before[name] != after[name]]
    assert moved and all(before[name] == 2 for name in moved)
    assert set(before.values()) == {1, 2, 3}
    assert choose_owner(GROUP, "g", []) is None


async def test_a_paused_node_is_fenced_and_its_successor_keeps_the_item(
        postgres_dsn: str) -> None:
    first, second = node(postgres_dsn, 1), node(postgres_dsn, 2, lease_ms=60_000)
    await first.open({"kafka": "127.0.0.1:1"})
    await second.open({"kafka": "127.0.0.1:2"})
    await first.heartbeat()
    await second.heartbeat()
    # an item node 1 is the rendezvous choice for
    name = next(f"t/{index}" for index in range(100)
                if choose_owner(PARTITION, f"t/{index}", [1, 2]) == 1)
    assert await first.ensure_owned(PARTITION, name)
    assert not await second.ensure_owned(PARTITION, name)  # not its choice
    assert await first.fence(PARTITION, name)
    # node 1 "pauses": no heartbeat; its lease lapses on the database's clock
    await lease_lapsed(postgres_dsn, 1)
    await second.heartbeat()  # node 2 sees node 1 dead: it is the choice now
    assert second.owner_of(PARTITION, name)[0] == 2
    assert await second.ensure_owned(PARTITION, name)
    assert second.owner_of(PARTITION, name)[1] == 2  # the epoch moved with the owner
    # node 1 wakes: its local lease is over, the database fences it, it serves nothing
    assert not first.serving()
    assert not await first.ensure_owned(PARTITION, name)
    assert not await first.fence(PARTITION, name)
    await first.heartbeat()  # finds the lease lapsed and drops every ownership
    assert not first.owns(PARTITION, name)
    assert await second.fence(PARTITION, name)  # node 1's late release changed nothing
    await first.close()
    await second.close()


async def test_drain_hands_items_over_at_once(postgres_dsn: str) -> None:
    first, second = node(postgres_dsn, 1, 60_000), node(postgres_dsn, 2, 60_000)
    await first.open({})
    await second.open({})
    await first.heartbeat()
    name = next(f"g{index}" for index in range(100)
                if choose_owner(GROUP, f"g{index}", [1, 2]) == 1)
    assert await first.ensure_owned(GROUP, name)
    await first.close(drain=True)  # SIGTERM: releases, marks itself draining
    await second.heartbeat()
    assert [info.node_id for info in second.live_nodes()] == [2]
    assert await second.ensure_owned(GROUP, name)  # no wait for a lease to lapse
    await second.close()


async def test_a_node_id_held_by_a_live_node_is_refused(postgres_dsn: str) -> None:
    first = node(postgres_dsn, 7, 60_000)
    await first.open({})
    with pytest.raises(UnavailableError):
        await node(postgres_dsn, 7).open({})
    generated = node(postgres_dsn, None)
    await generated.open({})
    assert generated.node_id >= 1000
    producer_ids = {await generated.allocate_producer_id(),
                    await first.allocate_producer_id()}
    assert len(producer_ids) == 2 and min(producer_ids) >= 1 << 32
    await generated.close()
    await first.close()
