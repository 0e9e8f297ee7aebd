"""Targeted wake-ups of parked acquires (SharedGroups.notify_appended).

Goal: an append wakes as many parked long-poll acquires as records arrived, not every
acquire of the group, and no record is left behind while acquires stay parked (a
woken acquire that got records wakes the next). Method: the BrokerHarness (real
storage, SimClock: the parked acquires only end by a record or a wake, never by time).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.types import Delivery, Message, QueueConfig


@pytest.fixture(autouse=True)
async def cancel_leftovers(harness: BrokerHarness) -> AsyncIterator[None]:
    """A failing test must not leave parked acquires behind for the broker's close."""
    yield
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task() and "acquire" in repr(task.get_coro()):
            task.cancel()


def groups(broker: Broker) -> SharedGroups:
    assert isinstance(broker.shared_groups, SharedGroups)
    return broker.shared_groups


async def until(condition: Callable[[], bool], describe: Callable[[], str]) -> None:
    """Wait for ``condition``: zero-time yields first (file storage settles within
    them), then 1 ms steps up to 10 s, for a state store whose writes are real I/O
    (the PostgreSQL pass: a publish or an acquire waits for the database)."""
    for step in range(10_200):
        if condition():
            return
        await asyncio.sleep(0 if step < 200 else 0.001)
    raise AssertionError(describe())


async def parked(shared: SharedGroups, count: int) -> None:
    """Until ``count`` acquires of "jobs" wait."""
    await until(lambda: shared.waiting_acquires("jobs", "jobs") == count,
                lambda: f"{shared.waiting_acquires('jobs', 'jobs')} parked, not {count}")


async def settled(tasks: list[asyncio.Task[list[Delivery]]], count: int) -> None:
    await until(lambda: sum(task.done() for task in tasks) >= count,
                lambda: f"{sum(task.done() for task in tasks)} done, not {count}")


async def test_one_record_wakes_one_of_three_parked_acquires(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    tasks = [asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=60_000))
             for _ in range(3)]
    await parked(shared, 3)
    attempts = 0
    acquire_once = shared._acquire_once

    async def counted(*arguments: Any) -> list[Delivery]:
        nonlocal attempts
        attempts += 1
        return await acquire_once(*arguments)

    monkeypatch.setattr(shared, "_acquire_once", counted)
    await broker.publish("jobs", [Message(b"one")])
    await settled(tasks, 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert attempts == 1  # the other two were not woken to find nothing
    assert sum(task.done() for task in tasks) == 1
    assert shared.waiting_acquires("jobs", "jobs") == 2
    await broker.publish("jobs", [Message(b"two"), Message(b"three")])
    await settled(tasks, 3)
    got = sorted(delivery.value or b"" for task in tasks for delivery in task.result())
    assert got == [b"one", b"three", b"two"]


async def test_a_woken_acquire_passes_on_what_it_left(broker: Broker) -> None:
    """Three records arrive in one append while two single-record acquires wait: both
    are woken, and the third record goes to an acquire that parks after them."""
    shared = groups(broker)
    await shared.declare_queue("jobs")
    tasks = [asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=60_000))
             for _ in range(2)]
    await parked(shared, 2)
    await broker.publish("jobs", [Message(b"a"), Message(b"b"), Message(b"c")])
    await settled(tasks, 2)
    late = await shared.acquire("jobs", "jobs", wait_ms=60_000)
    assert [d.value for d in late] == [b"c"]


async def test_the_timer_visits_only_partitions_with_something_due(
        harness: BrokerHarness, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle queues cost the timer nothing; a lock that expires is still found."""
    shared = groups(broker)
    for index in range(30):
        await shared.declare_queue(f"idle-{index}")
    await shared.declare_queue("jobs")
    await broker.publish("jobs", [Message(b"x")])
    taken = await shared.acquire("jobs", "jobs", lock_ms=1_000)
    await shared.tick()  # the first pass loads what was appended or declared
    visited: list[str] = []
    fill = shared._fill

    async def counted(state: Any, part: Any) -> None:
        visited.append(state.topic)
        await fill(state, part)

    monkeypatch.setattr(shared, "_fill", counted)
    await shared.tick()
    assert visited == []
    harness.clock.advance(1_001)
    await shared.tick()
    assert visited == ["jobs"]
    again = await shared.acquire("jobs", "jobs")
    assert [d.offset for d in again] == [taken[0].offset]
    assert again[0].delivery_count == 2


async def test_an_acquire_cancelled_after_locking_gives_the_records_back(
        broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller goes away (an HTTP client disconnects, a cancelled task) while the
    acquire, having locked partition 0's record, reads partition 1: the record it locked
    is released at once, not held until its lock expires unseen."""
    shared = groups(broker)
    await broker.create_topic("events", partitions=2)
    await shared.create_shared_group("events", "audit", start="earliest")
    await broker.publish("events", [Message(b"p0")], partition=0)
    await broker.publish("events", [Message(b"p1")], partition=1)
    fill = shared._fill
    reading = asyncio.Event()
    never = asyncio.Event()

    async def stuck_on_partition_one(state: Any, part: Any) -> None:
        if part.partition == 1:
            reading.set()
            await never.wait()
        await fill(state, part)

    monkeypatch.setattr(shared, "_fill", stuck_on_partition_one)
    shared._groups[("audit", "events")].next_partition = 0
    task = asyncio.create_task(shared.acquire("events", "audit", records_max=2,
                                              lock_ms=60_000))
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.setattr(shared, "_fill", fill)
    again = await shared.acquire("events", "audit", records_max=2, lock_ms=60_000)
    assert sorted(d.value or b"" for d in again) == [b"p0", b"p1"]


async def test_a_record_wakes_the_acquire_that_may_take_its_partition(broker: Broker) -> None:
    """Acquires that take only some partitions (a KIP-932 share-partition leader's): a
    record on partition 1 reaches the acquire waiting for partition 1, though an older
    acquire waits for partition 0 only (a wake of one would have woken that one)."""
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(partitions=2))
    first = asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=60_000, partitions=[0]))
    await parked(shared, 1)
    second = asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=60_000,
                                                partitions=[1]))
    await parked(shared, 2)
    await broker.publish("jobs", [Message(b"on one")], partition=1)
    await settled([second], 1)
    assert [(d.partition, d.value) for d in second.result()] == [(1, b"on one")]
    assert not first.done()
    await broker.publish("jobs", [Message(b"on zero")], partition=0)
    await settled([first], 1)
    assert [(d.partition, d.value) for d in first.result()] == [(0, b"on zero")]
