"""Bounded maps (issue 9, "unbounded maps"): per-producer locks, groups created by
simple offset commits, dedup windows, and the lazily-cleaned heaps of a window.

Goal: each map or heap stays within its named bound however long the workload
runs. Method: drive each through many more keys or events than its bound.
"""

from __future__ import annotations

import asyncio

from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker, BrokerConfig
from conveyor.broker.delivery import HEAP_SLACK_ITEMS, DedupWindow, record_policy
from conveyor.broker.keyed_locks import KeyedLocks
from conveyor.broker.shared_group import SharedPartition
from conveyor.broker.types import QueueConfig
from conveyor.storage.record_batch import Record, RecordData, build_batch


async def test_producer_locks_are_forgotten_after_use(broker: Broker) -> None:
    await broker.create_topic("t")
    for _ in range(20):
        producer_id, epoch = await broker.init_producer_id()
        data = build_batch([RecordData(None, b"v")], producer_id=producer_id,
                           producer_epoch=epoch, base_sequence=0)
        await broker.append_batch("t", 0, data)
    assert len(broker._producer_locks) == 0


async def test_keyed_locks_exclude_while_waiters_queue() -> None:
    locks = KeyedLocks()
    inside: list[int] = []
    order: list[str] = []

    async def worker(name: str) -> None:
        async with locks.hold("k"):
            inside.append(1)
            assert len(inside) == 1, "two holders at once"
            order.append(name)
            await asyncio.sleep(0)
            inside.pop()

    await asyncio.gather(*(worker(str(index)) for index in range(5)))
    assert order == ["0", "1", "2", "3", "4"] and len(locks) == 0


async def test_empty_groups_expire_after_offsets_retention(harness: BrokerHarness) -> None:
    assert harness.broker is not None
    await harness.stop()
    harness.config = BrokerConfig(offsets_retention_ms=60_000)
    broker = await harness.start()
    await broker.create_topic("t")
    await broker.commit_offsets("old", {("t", 0): 0})
    harness.clock.advance(30_000)
    await broker.commit_offsets("recent", {("t", 0): 0})
    harness.clock.advance(30_000)
    assert await broker.expire_groups() == ["old"]
    assert broker.fetch_offsets("old", [("t", 0)]) == {("t", 0): None}
    broker = await harness.restart()
    assert broker.fetch_offsets("old", [("t", 0)]) == {("t", 0): None}
    assert broker.fetch_offsets("recent", [("t", 0)])[("t", 0)] is not None


def test_dedup_window_is_bounded_by_count() -> None:
    window = DedupWindow(ids_max=100)
    for index in range(1_000):
        window.remember(f"id-{index}", 10_000 + index)
        window.remember(f"id-{index}", 20_000 + index)  # re-remembered: a stale heap item
    assert len(window.expiry_ms_by_id) == 100
    assert window.seen("id-999", 0) and not window.seen("id-0", 0)
    assert len(window._by_expiry) <= 2 * 100 + HEAP_SLACK_ITEMS + 1


def test_window_heaps_drop_stale_items() -> None:
    part = SharedPartition("t", 0, "g", QueueConfig())
    for offset in range(3):
        record = Record(offset, 0, None, b"v")
        part.load(record, record_policy(record, part.config))
    taken = part.acquire(0, 3, 1_000, "c", 1)
    for step in range(10_000):  # each extend and release leaves a stale heap item
        part.extend(taken[0].offset, 1, step, 1_000)
    part.release(taken[1].offset, 1, 0)
    for step in range(1, 5_000):
        (again,) = part.acquire(0, 1, 1_000, "c", step + 1)
        part.release(again.offset, step + 1, 0)
    bound = 2 * len(part.entries) + HEAP_SLACK_ITEMS
    assert len(part.locks) <= bound + 1 and len(part.available) <= bound + 1
