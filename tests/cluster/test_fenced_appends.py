"""Kafka appends fenced by the partition lease inside the append transaction (issue 12).

A cluster node takes a Kafka append while it leads the partition and carries the owner
row's epoch of that moment into the append; the append transaction, after taking the
partition head lock, share-locks the owner row and writes the append only if it is
still this node's at that epoch with a live lease. An append queued when the lease
lapsed (here: held up behind the head lock while node 1 pauses and node 2 claims the
partition) is answered NOT_LEADER_OR_FOLLOWER and writes nothing, so the client
refreshes its metadata and follows the new leader. Appends without an epoch (queue
publishes, transaction markers: any node writes them) are not fenced.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from conveyor.broker.broker import Broker
from conveyor.cluster.membership import Membership
from conveyor.cluster.ownership import PARTITION, choose_owner, item_name
from conveyor.errors import NotLeaderError
from conveyor.storage.log_api import AppendInfo, AppendRequest
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.record_batch import RecordData, build_batch
from conveyor.storage.state_store import SqliteStateStore
from conveyor.testing.clock import SimClock
from tests.cluster.test_fenced_commits import two_nodes
from tests.cluster.test_membership import lease_lapsed

TOPIC = next(f"t{index}" for index in range(100)
             if choose_owner(PARTITION, item_name(PARTITION, f"t{index}", 0), [1, 2]) == 1)
NAME = item_name(PARTITION, TOPIC, 0)


def records(value: bytes) -> bytes:
    return build_batch([RecordData(None, value, (), 1000)])


async def wait_until_blocked(watcher: asyncpg.Connection, task: asyncio.Task[object]) -> None:
    """Until ``task`` waits on a row lock the test holds (no event exists for it)."""
    deadline = time.monotonic() + 10
    while not await watcher.fetchval("SELECT count(*) FROM pg_locks WHERE NOT granted"):
        assert time.monotonic() < deadline, "it never waited on the held row"
        assert not task.done(), "it went past a held row"
        await asyncio.sleep(0.02)


class Nodes:
    def __init__(self, broker: Broker, first: Membership, second: Membership) -> None:
        self.broker, self.first, self.second = broker, first, second


@pytest.fixture
async def nodes(postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Nodes]:
    first, second = await two_nodes(postgres_dsn)
    clock = SimClock()
    store = PostgresLogStore(postgres_dsn, clock, random.Random(1), chunk_offsets=8)
    broker = Broker(store, SqliteStateStore(tmp_path / "state.sqlite3"), clock,
                    random.Random(2))
    await broker.open()
    broker.producers.shared_store = True
    broker.producer.lease = lambda topic, partition: first.lease(
        PARTITION, item_name(PARTITION, topic, partition))  # as ClusterNode.open sets it
    await broker.create_topic(TOPIC)
    await first.heartbeat()  # a fresh lease for what follows
    assert await first.ensure_owned(PARTITION, NAME)
    try:
        yield Nodes(broker, first, second)
    finally:
        await broker.close()
        await first.close()
        await second.close()


async def test_an_append_queued_past_the_lease_is_not_written(nodes: Nodes,
                                                             postgres_dsn: str) -> None:
    broker = nodes.broker
    assert (await broker.append_batch(TOPIC, 0, records(b"a"))).base_offset == 0
    holder = await asyncpg.connect(postgres_dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM conveyor_log_partitions WHERE topic = $1 "
                             "FOR UPDATE", TOPIC)
        # node 1 takes the append (it leads at its epoch); it queues behind the head lock
        append = asyncio.create_task(broker.append_batch(TOPIC, 0, records(b"late")))
        await wait_until_blocked(watcher, append)
        # node 1 pauses past its lease; node 2 claims the partition
        await lease_lapsed(postgres_dsn, 1)
        await nodes.second.heartbeat()
        assert await nodes.second.ensure_owned(PARTITION, NAME)
        await transaction.rollback()
        with pytest.raises(NotLeaderError):
            await asyncio.wait_for(append, 10)
        written = await watcher.fetchval(
            "SELECT count(*) FROM conveyor_log_batches b JOIN conveyor_log_partitions p "
            "USING (partition_id) WHERE p.topic = $1", TOPIC)
        assert written == 1  # only "a"
    finally:
        await holder.close()
        await watcher.close()
    # a node that does not lead refuses at once; an unfenced append (a queue publish,
    # a marker) is still written by any node
    with pytest.raises(NotLeaderError):
        await broker.append_batch(TOPIC, 0, records(b"refused"))
    (published,) = await broker.log_store.append([AppendRequest(TOPIC, 0, records(b"q"))])
    assert isinstance(published, AppendInfo) and published.base_offset == 1


async def test_a_claim_waits_for_an_append_in_flight(nodes: Nodes, postgres_dsn: str) -> None:
    """The append share-locks the owner row until COMMIT: the successor's claim (and its
    reload of the head) comes after it, so the append it let through is in its view."""
    broker = nodes.broker
    holder = await asyncpg.connect(postgres_dsn)
    watcher = await asyncpg.connect(postgres_dsn)
    try:
        transaction = holder.transaction()
        await transaction.start()
        # stands for an append transaction past its fence: the owner row share-locked
        lease = nodes.first.lease(PARTITION, NAME)
        assert lease is not None
        found = await holder.fetch(lease.check, [NAME], [lease.epoch], *lease.parameters)
        assert [(row["name"], row["epoch"]) for row in found] == [(NAME, lease.epoch)]
        await lease_lapsed(postgres_dsn, 1)
        await nodes.second.heartbeat()
        claim = asyncio.create_task(nodes.second.ensure_owned(PARTITION, NAME))
        await wait_until_blocked(watcher, claim)  # on the owner row
        await transaction.commit()
        assert await asyncio.wait_for(claim, 10)
    finally:
        await holder.close()
        await watcher.close()
    assert nodes.first.lease(PARTITION, NAME) is None  # lapsed locally too
    with pytest.raises(NotLeaderError):
        await broker.append_batch(TOPIC, 0, records(b"x"))
