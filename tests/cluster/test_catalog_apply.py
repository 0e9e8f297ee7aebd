"""Another node's deletes and alters applied to this node's memory, in one process over
one embedded PostgreSQL (conveyor/cluster/catalog_apply.py): two brokers on the same
database stand for two nodes; node B's re-read is called as a notification would.

A queue deleted on A goes from B (its topic, its window copy, its partitions' view); a
queue deleted and declared again on A is the new one on B (new partition ids, new
config) and stays through a late re-read; an alter on A reaches B's copy; a re-read
during a topic created on B itself keeps it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.types import QueueConfig
from conveyor.cluster.catalog import KINDS
from conveyor.cluster.catalog_apply import CatalogApply
from conveyor.storage.postgres_engine import PostgresEngine
from conveyor.storage.postgres_log import PostgresLogStore
from conveyor.storage.state_store import SqlStateStore
from conveyor.testing.clock import SimClock

EVERYTHING = frozenset(KINDS)


async def node(dsn: str, seed: int) -> Broker:
    clock = SimClock()
    broker = Broker(PostgresLogStore(dsn, clock, random.Random(seed)),
                    SqlStateStore(PostgresEngine(dsn, clock)), clock, random.Random(seed + 1))
    await broker.open()
    broker.catalog_shared = True
    return broker


@pytest.fixture
async def nodes(postgres_dsn: str) -> AsyncIterator[tuple[Broker, Broker]]:
    a = await node(postgres_dsn, 1)
    b = await node(postgres_dsn, 3)
    yield a, b
    await b.close()
    await a.close()


def partition_id(broker: Broker, topic: str) -> int:
    log_store = broker.log_store
    assert isinstance(log_store, PostgresLogStore)
    return log_store._partitions[(topic, 0)].partition_id


async def test_a_delete_and_a_declare_again_on_a_reach_b(nodes: tuple[Broker, Broker]
                                                         ) -> None:
    a, b = nodes
    apply_b = CatalogApply(b)
    await a.declare_queue("q")
    await apply_b.reread(EVERYTHING)
    assert b.queue_exists("q") and b.find_topic("q") is not None
    old_id = partition_id(b, "q")
    # deleted and declared again before B hears of either: the name is the same
    await a.delete_queue("q")
    await a.declare_queue("q", QueueConfig(visibility_timeout_ms=7_000))
    await apply_b.reread(EVERYTHING)
    assert partition_id(b, "q") == partition_id(a, "q") != old_id
    assert (await b.get_queue("q")).config.visibility_timeout_ms == 7_000
    assert apply_b.topics_forgotten == 1
    await apply_b.reread(EVERYTHING)  # a late notification of the delete drops nothing
    assert b.queue_exists("q") and apply_b.topics_forgotten == 1
    # an alter on A reaches B's copy (in memory)
    await a.alter_queue("q", QueueConfig(visibility_timeout_ms=9_000))
    await apply_b.reread(frozenset({"queues"}))
    assert (await b.get_queue("q")).config.visibility_timeout_ms == 9_000
    # deleted on A: gone from B, its topic too
    await a.delete_queue("q")
    await apply_b.reread(EVERYTHING)
    assert not b.queue_exists("q") and b.find_topic("q") is None
    assert ("q", 0) not in set(b.log_store.partitions())


async def test_a_reread_during_a_topic_created_here_keeps_it(
        nodes: tuple[Broker, Broker]) -> None:
    """B's own create is in B's registry before its row commits: a re-read meanwhile
    must not take it for a topic deleted elsewhere. (Two things keep it today: the
    state store's reads see this node's queued writes, and a re-read during a change
    made here forgets nothing.)"""
    _, b = nodes
    apply_b = CatalogApply(b)
    original = b.state_store.commit
    paused, release = asyncio.Event(), asyncio.Event()

    async def held_commit() -> Any:
        paused.set()
        await release.wait()
        return await original()

    b.state_store.commit = held_commit  # type: ignore[method-assign]
    create = asyncio.create_task(b.create_topic("mine"))
    await asyncio.wait_for(paused.wait(), 10)
    assert b.find_topic("mine") is not None  # held here, its row not committed yet
    await asyncio.wait_for(apply_b.reread(EVERYTHING), 10)
    assert b.find_topic("mine") is not None, "the re-read dropped B's own new topic"
    release.set()
    await asyncio.wait_for(create, 10)
    b.state_store.commit = original  # type: ignore[method-assign]
    await apply_b.reread(EVERYTHING)
    assert b.find_topic("mine") is not None and apply_b.topics_forgotten == 0
