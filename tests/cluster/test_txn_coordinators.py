"""Transaction coordinators by ownership (issue 12): fenced writes and takeover.

A transactional id has an owner row (kind ``txn``) like a group. Every write of its
transaction's row is made under that row's fence (owner, epoch, live lease, checked
and share-locked inside the write's own transaction), and the node that claims the id
reloads its transaction from the state store and finishes what was in flight as Kafka's
coordinator does on a move: a PrepareCommit gets its markers and completes, an Ongoing
transaction past its timeout is aborted with an epoch bump. The check-then-write race
is forced as in test_fenced_group_writes.py: node 1 pauses past its lease, node 2 claims.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.txn_model import TxnFence
from conveyor.cluster.membership import Membership
from conveyor.cluster.ownership import TXN, choose_owner
from conveyor.errors import NotCoordinatorError
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import split_batches
from conveyor.storage.state_store import SqlStateStore
from conveyor.testing.clock import SimClock
from tests.cluster.test_fenced_commits import two_nodes
from tests.cluster.test_membership import lease_lapsed


def txn_of(owner: int) -> str:
    """A transactional id rendezvous hashing gives to ``owner`` among nodes 1 and 2."""
    return next(f"tx{index}" for index in range(100)
                if choose_owner(TXN, f"tx{index}", [1, 2]) == owner)


async def clustered_broker(dsn: str, membership: Membership, seed: int) -> Broker:
    clock = SimClock()
    broker = Broker(PostgresLogStore(dsn, clock, random.Random(seed), chunk_offsets=8),
                    SqlStateStore(PostgresEngine(dsn, clock)), clock, random.Random(seed + 1))
    await broker.open()
    broker.transactions.clustered(TxnFence(
        lambda name: membership.write_guard(TXN, name),
        lambda name: membership.forget(TXN, name)))

    async def acquired(kind: str, name: str) -> None:  # as ClusterNode._acquired does
        if kind == TXN:
            await broker.topics.load()
            await broker.transactions.reload(name)

    membership.on_acquire = acquired
    return broker


@dataclass
class Setup:
    first: Membership
    second: Membership
    one: Broker  # node 1's broker
    two: Broker  # node 2's broker
    dsn: str
    name: str  # a transactional id node 1 owns while both are live

    async def node_1_pauses(self) -> None:
        """Node 1's lease lapses on the database's clock and node 2 claims the id."""
        await lease_lapsed(self.dsn, 1)
        await self.second.heartbeat()
        assert await self.second.ensure_owned(TXN, self.name)


@pytest.fixture
async def setup(postgres_dsn: str) -> AsyncIterator[Setup]:
    first, second = await two_nodes(postgres_dsn)
    one = await clustered_broker(postgres_dsn, first, 10)
    two = await clustered_broker(postgres_dsn, second, 20)
    found = Setup(first, second, one, two, postgres_dsn, txn_of(1))
    await one.create_topic("t", partitions=2)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(TXN, found.name)
    assert not await second.ensure_owned(TXN, found.name)  # not node 2's while 1 lives
    try:
        yield found
    finally:
        await one.close()
        await two.close()
        await first.close()
        await second.close()


async def stored_state(dsn: str, transactional_id: str) -> tuple[str, int, int] | None:
    connection = await asyncpg.connect(dsn)
    try:
        row = await connection.fetchrow(
            "SELECT state, producer_id, producer_epoch FROM txn_transactions "
            "WHERE transactional_id = $1", transactional_id)
    finally:
        await connection.close()
    return None if row is None else (row["state"], row["producer_id"], row["producer_epoch"])


async def execute(dsn: str, sql: str, *values: object) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql, *values)
    finally:
        await connection.close()


async def eventually(check: Callable[[], Awaitable[bool]], within_s: float = 10) -> None:
    """Wait for the coordinator's own timer to have acted (it reports no event)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "not reached in time"
        await asyncio.sleep(0.02)


async def control_batches(broker: Broker, topic: str, partition: int) -> list[int]:
    """The offsets of the control batches (markers) in a partition."""
    await broker.topics.load()
    store = broker.topics.log_store
    await store.refresh_partition(topic, partition)  # type: ignore[attr-defined]
    end = store.offsets(topic, partition).high_watermark
    found = []
    offset = 0
    while offset < end:
        data = (await store.read(topic, partition, offset, 1 << 20)).read_bytes()
        if not data:
            break
        for _, header in split_batches(data):
            if header.is_control:
                found.append(header.base_offset)
            offset = header.last_offset + 1
    return found


async def test_a_stale_coordinators_transaction_write_is_refused(setup: Setup) -> None:
    one = setup.one
    producer_id, epoch = await one.init_producer_id(setup.name, 60_000)
    await one.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 0)])
    assert await stored_state(setup.dsn, setup.name) == ("Ongoing", producer_id, epoch)
    await setup.node_1_pauses()
    with pytest.raises(NotCoordinatorError):
        await one.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 1)])
    assert await stored_state(setup.dsn, setup.name) == ("Ongoing", producer_id, epoch)
    assert not setup.first.owns(TXN, setup.name)
    # its requests for the id are refused from now on (NOT_COORDINATOR at the router)
    assert not await setup.first.ensure_owned(TXN, setup.name)
    assert one.describe_transaction(setup.name) is None  # dropped: reloaded at a claim
    # node 2 took the transaction over as node 1 left it, and ends it
    described = setup.two.describe_transaction(setup.name)
    assert described is not None and described.state == "Ongoing"
    assert described.partitions == (("t", 0),)
    await setup.two.end_txn(setup.name, producer_id, epoch, commit=True)
    assert await stored_state(setup.dsn, setup.name) == ("CompleteCommit", producer_id, epoch)
    assert await control_batches(setup.two, "t", 0) != []


async def test_a_new_owner_bumps_the_epoch_from_the_stored_one(setup: Setup) -> None:
    producer_id, epoch = await setup.one.init_producer_id(setup.name, 60_000)
    await setup.node_1_pauses()
    # the producer finds the new coordinator and initialises again: same id, next epoch
    assert await setup.two.init_producer_id(setup.name, 60_000) == (producer_id, epoch + 1)
    assert await stored_state(setup.dsn, setup.name) == ("Empty", producer_id, epoch + 1)


async def test_a_prepare_commit_is_completed_by_the_node_that_takes_over(
        setup: Setup) -> None:
    one = setup.one
    producer_id, epoch = await one.init_producer_id(setup.name, 60_000)
    await one.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 0), ("t", 1)])
    # node 1 persisted its decision and died before the markers
    await execute(setup.dsn, "UPDATE txn_transactions SET state = 'PrepareCommit' "
                  "WHERE transactional_id = $1", setup.name)
    assert await control_batches(setup.two, "t", 0) == []
    await setup.node_1_pauses()

    async def completed() -> bool:
        found = await stored_state(setup.dsn, setup.name)
        return found is not None and found[0] == "CompleteCommit"

    await eventually(completed)
    assert len(await control_batches(setup.two, "t", 0)) == 1
    assert len(await control_batches(setup.two, "t", 1)) == 1


async def test_an_ongoing_transaction_past_its_timeout_is_aborted_on_takeover(
        setup: Setup) -> None:
    one = setup.one
    producer_id, epoch = await one.init_producer_id(setup.name, 60_000)
    await one.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 0)])
    # it started long ago by the wall clock: its timeout has passed while node 1 was gone
    await execute(setup.dsn, "UPDATE txn_transactions SET started_ms = started_ms - 120000 "
                  "WHERE transactional_id = $1", setup.name)
    await setup.node_1_pauses()

    async def aborted() -> bool:
        found = await stored_state(setup.dsn, setup.name)
        return found is not None and found[0] == "CompleteAbort"

    await eventually(aborted)
    assert await stored_state(setup.dsn, setup.name) == (
        "CompleteAbort", producer_id, epoch + 1)  # the epoch bump fences the producer
    assert len(await control_batches(setup.two, "t", 0)) == 1


async def test_an_ongoing_transaction_within_its_timeout_goes_on_at_the_new_owner(
        setup: Setup) -> None:
    one = setup.one
    producer_id, epoch = await one.init_producer_id(setup.name, 60_000)
    await one.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 0)])
    await setup.node_1_pauses()
    await setup.two.add_partitions_to_txn(setup.name, producer_id, epoch, [("t", 1)])
    described = setup.two.describe_transaction(setup.name)
    assert described is not None and described.state == "Ongoing"
    assert described.partitions == (("t", 0), ("t", 1))
    assert await stored_state(setup.dsn, setup.name) == ("Ongoing", producer_id, epoch)
