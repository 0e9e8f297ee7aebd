"""Shared-group windows saved KIP-932 style (conveyor/broker/shared_persist.py).

Goal: an ack costs no row of its own (a partition is saved as its start offset plus
runs of states, at most once per loop turn), and what a restart reads back is what
the windows held: acked offsets stay acked in and out of order, released records keep
their delivery counts, and rows of the old per-record table are read and replaced.
Method: the BrokerHarness (MemoryFileSystem logs, SQLite state in tmp_path); the
SQLite file is read with a connection of its own after acks that waited for it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import DELIVERED_MARK_AHEAD_RECORDS, SharedGroups
from conveyor.broker.types import Message, QueueConfig
from conveyor.testing.memory_fs import MemoryFileSystem


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    fs = MemoryFileSystem()
    fs.make_dirs(str(tmp_path))
    result = BrokerHarness(tmp_path, fs)
    await result.start()
    try:
        yield result
    finally:
        await result.stop()


def groups(broker: Broker) -> SharedGroups:
    assert isinstance(broker.shared_groups, SharedGroups)
    return broker.shared_groups


def rows(harness: BrokerHarness, query: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(harness.directory / "state.sqlite3") as reader:
        return list(reader.execute(query))


async def fill(broker: Broker, queue: str, count: int) -> None:
    await broker.publish(queue, [Message(str(i).encode()) for i in range(count)])


@pytest.mark.file_storage  # reads/writes state.sqlite3 itself
async def test_a_batch_of_acks_is_one_save_and_no_record_rows(
        harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await fill(broker, "jobs", 100)
    taken = await shared.acquire("jobs", "jobs", records_max=100)
    assert len(taken) == 100
    saves = shared.persister.saves
    await shared.ack([delivery.receipt for delivery in taken])
    assert shared.persister.saves == saves + 1
    assert rows(harness, "SELECT start_offset FROM shared_partitions") == [(100,)]
    # the one range left is the delivered mark, saved ahead of the log end (caught up)
    assert rows(harness, "SELECT first_offset, last_offset, state FROM shared_ranges") == [
        (-2, 99 + DELIVERED_MARK_AHEAD_RECORDS, "delivered")]
    assert rows(harness, "SELECT COUNT(*) FROM shared_records") == [(0,)]


@pytest.mark.file_storage  # reads/writes state.sqlite3 itself
async def test_out_of_order_acks_are_runs_that_survive_a_restart(
        harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await fill(broker, "jobs", 6)
    taken = await shared.acquire("jobs", "jobs", records_max=6)
    await shared.ack([taken[1].receipt, taken[2].receipt, taken[4].receipt])
    assert rows(harness, "SELECT first_offset, last_offset, state FROM shared_ranges"
                " ORDER BY first_offset") == [  # mark: 0..5 delivered, and the lead
        (-2, 5 + DELIVERED_MARK_AHEAD_RECORDS, "delivered"), (1, 2, "acked"), (4, 4, "acked")]
    shared = groups(await harness.restart())
    again = await shared.acquire("jobs", "jobs", records_max=10)
    assert [delivery.offset for delivery in again] == [0, 3, 5]


async def test_delivery_counts_survive_a_restart(
        harness: BrokerHarness, broker: Broker) -> None:
    """A released record keeps its count; one delivered and never given back counts as
    delivered once (the delivered mark); one never delivered starts afresh."""
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await fill(broker, "jobs", 4)
    taken = await shared.acquire("jobs", "jobs", records_max=2)
    await shared.release([taken[0].receipt])
    again = await shared.acquire("jobs", "jobs", records_max=1)  # offset 0, 2nd delivery
    await shared.release([again[0].receipt])
    shared = groups(await harness.restart())
    after = await shared.acquire("jobs", "jobs", records_max=4)
    assert [(d.offset, d.delivery_count) for d in after] == [(0, 3), (1, 2), (2, 1), (3, 1)]


async def test_a_caught_up_acquire_saves_the_delivered_mark_ahead_of_the_log_end(
        harness: BrokerHarness, broker: Broker) -> None:
    """An acquire that took every record in the log saves the delivered mark
    DELIVERED_MARK_AHEAD_RECORDS past it, so the acquires after it (a consumer keeping
    up, one record each) need no save and no COMMIT of their own. After a restart a
    record published under that mark and never delivered counts as delivered once (a
    false redelivered=true, which AMQP allows); the mark is clamped to the log end, so
    a record published after the restart starts afresh."""
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await fill(broker, "jobs", 1)
    assert [d.offset for d in await shared.acquire("jobs", "jobs")] == [0]
    await shared.persister.committed()
    saves = shared.persister.saves
    await fill(broker, "jobs", 1)
    assert [d.offset for d in await shared.acquire("jobs", "jobs")] == [1]
    await shared.persister.committed()
    assert shared.persister.saves == saves, "an acquire under the saved mark saved again"
    await fill(broker, "jobs", 1)  # offset 2: under the mark, never delivered
    restarted = await harness.restart()
    shared = groups(restarted)
    after = await shared.acquire("jobs", "jobs", records_max=3)
    assert [(d.offset, d.delivery_count) for d in after] == [(0, 2), (1, 2), (2, 2)]
    await fill(restarted, "jobs", 1)
    later = await shared.acquire("jobs", "jobs")
    assert [(d.offset, d.delivery_count) for d in later] == [(3, 1)]


@pytest.mark.file_storage  # reads/writes state.sqlite3 itself
async def test_with_max_deliveries_every_delivery_counts_across_a_restart(
        harness: BrokerHarness, broker: Broker) -> None:
    """The delivered mark goes with the next save (here an ack of another record)."""
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(max_deliveries=2))
    await fill(broker, "jobs", 2)
    taken = await shared.acquire("jobs", "jobs", records_max=2)
    await shared.ack([taken[1].receipt])
    assert rows(harness, "SELECT last_offset FROM shared_ranges WHERE state = 'delivered'"
                ) == [(1,)]
    shared = groups(await harness.restart())
    again = await shared.acquire("jobs", "jobs")
    assert [(d.offset, d.delivery_count) for d in again] == [(0, 2)]


@pytest.mark.file_storage  # reads/writes state.sqlite3 itself
async def test_rows_of_the_old_per_record_table_are_read_and_replaced(
        harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await fill(broker, "jobs", 3)
    await harness.stop()
    with sqlite3.connect(harness.directory / "state.sqlite3") as writer:
        writer.executemany(
            "INSERT INTO shared_records VALUES ('jobs', 'jobs', 0, ?, ?, ?, 0)",
            [(0, "acked", 1), (1, "acquired", 3)])
    shared = groups(await harness.start())
    again = await shared.acquire("jobs", "jobs", records_max=3)
    assert [(d.offset, d.delivery_count) for d in again] == [(1, 4), (2, 1)]
    await shared.ack([again[1].receipt])
    assert rows(harness, "SELECT COUNT(*) FROM shared_records") == [(0,)]
    assert rows(harness, "SELECT start_offset FROM shared_partitions") == [(1,)]
    assert rows(harness, "SELECT first_offset, last_offset, state, delivery_count"
                " FROM shared_ranges ORDER BY first_offset") == [  # the mark: caught up
        (-2, 2 + DELIVERED_MARK_AHEAD_RECORDS, "delivered", 1), (1, 1, "available", 4),
        (2, 2, "acked", 0)]


@pytest.mark.file_storage  # reads/writes state.sqlite3 itself
async def test_a_record_whose_dead_letter_is_not_written_yet_is_saved_unsettled(
        harness: BrokerHarness, broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ack saved while another record's dead letter is still being written must not
    save that record as settled: a crash then would lose it with its dead letter."""
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(max_deliveries=1))
    await fill(broker, "jobs", 3)
    taken = await shared.acquire("jobs", "jobs", records_max=3)
    gate = asyncio.Event()
    dead_letter = shared.dead_letters.write

    async def slow(*arguments: Any) -> None:
        await gate.wait()
        await dead_letter(*arguments)

    monkeypatch.setattr(shared.dead_letters, "write", slow)
    releasing = asyncio.create_task(shared.release([taken[0].receipt]))  # dies: 1 delivery
    for _ in range(5):
        await asyncio.sleep(0)
    await shared.ack([taken[1].receipt, taken[2].receipt])
    assert rows(harness, "SELECT start_offset FROM shared_partitions"
                " WHERE group_name = 'jobs'") == [(0,)]
    assert rows(harness, "SELECT first_offset, last_offset, state FROM shared_ranges"
                " WHERE group_name = 'jobs' ORDER BY first_offset") == [
        (-2, 2, "delivered"), (0, 0, "available"), (1, 2, "acked")]
    gate.set()
    await releasing
    await shared.ack([])
    assert rows(harness, "SELECT start_offset FROM shared_partitions"
                " WHERE group_name = 'jobs'") == [(3,)]
