"""Shared groups and queues through the Broker facade, on real storage + SimClock.

Goal: every queue rule of ARCHITECTURE §1 (locks, redelivery, dead-lettering,
TTL, delays, priorities, FIFO groups, dedup, max_length) holds, and holds again
after the broker restarts on the same log + state store. Method: a BrokerHarness
(tests/broker/broker_harness.py) runs a Broker on MemoryFileSystem with SQLite in
tmp_path (the OS file system is covered by tests/sim and the broker's own suite);
time moves only by ``SimClock.advance``; no sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker
from conveyor.broker.dead_letters import DEAD_LETTER_RETRY_MS
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.types import (
    HEADER_DEAD_REASON,
    HEADER_SOURCE,
    Delivery,
    Message,
    QueueConfig,
)
from conveyor.errors import (
    LockExpiredError,
    OffsetOutOfRangeError,
    PreconditionFailedError,
    UnknownDeliveryError,
    UnknownGroupError,
    UnknownPartitionError,
    UnknownQueueError,
)
from conveyor.testing.memory_fs import MemoryFileSystem

DAY_MS = 24 * 3600 * 1000


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    """Overrides conftest's two-file-system harness: MemoryFileSystem only (speed)."""
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


async def restart(harness: BrokerHarness) -> SharedGroups:
    return groups(await harness.restart())


def values(deliveries: list[Delivery]) -> list[bytes | None]:
    return [delivery.value for delivery in deliveries]


def header_of(delivery: Delivery, name: str) -> bytes | None:
    return dict(delivery.headers).get(name)


async def parked(shared: SharedGroups, queue: str) -> None:
    """Yield (zero-time, no clock movement) until an acquire waits on ``queue``."""
    for _ in range(100):
        if shared.waiting_acquires(queue, queue):
            return
        await asyncio.sleep(0)
    raise AssertionError("the acquire never started waiting")


async def publish(broker: Broker, queue: str, *payloads: bytes, **fields: object) -> None:
    messages = [Message(payload, **fields) for payload in payloads]  # type: ignore[arg-type]
    results = await broker.publish(queue, messages)
    assert all(result.offset >= 0 for result in results)


async def test_acquire_ack_release_extend(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(visibility_timeout_ms=1_000))
    await publish(broker, "jobs", b"a", b"b", b"c")
    first = await shared.acquire("jobs", "jobs", records_max=2)
    assert values(first) == [b"a", b"b"]
    assert [d.delivery_count for d in first] == [1, 1]
    await shared.ack([first[0].receipt])
    with pytest.raises(UnknownDeliveryError):
        await shared.ack([first[0].receipt])
    await shared.release([first[1].receipt])
    again = await shared.acquire("jobs", "jobs", records_max=5)
    assert values(again) == [b"b", b"c"]
    assert again[0].delivery_count == 2 and again[1].delivery_count == 1
    with pytest.raises(LockExpiredError):
        await shared.ack([first[1].receipt])  # the stale receipt of b
    harness.clock.advance(800)
    deadlines = await shared.extend([again[0].receipt], 5_000)
    assert deadlines == [harness.clock.wall_ms() + 5_000]
    harness.clock.advance(800)  # c's lock (1 s) expired; b's was extended
    with pytest.raises(LockExpiredError):
        await shared.ack([again[1].receipt])
    await shared.ack([again[0].receipt])
    info = await shared.get_queue("jobs")
    assert (info.ready, info.in_flight, info.delayed) == (1, 0, 0)


async def test_lock_expiry_redelivers_and_restart_keeps_counts(harness: BrokerHarness,
                                                               broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(visibility_timeout_ms=1_000))
    await publish(broker, "jobs", b"a", b"b")
    taken = await shared.acquire("jobs", "jobs", records_max=2)
    await shared.ack([taken[0].receipt])
    harness.clock.advance(1_000)
    redelivered = await shared.acquire("jobs", "jobs", records_max=2)
    assert values(redelivered) == [b"b"] and redelivered[0].delivery_count == 2
    shared = await restart(harness)  # b is acquired at the restart
    after = await shared.acquire("jobs", "jobs", records_max=5)
    assert values(after) == [b"b"] and after[0].delivery_count == 3
    await shared.ack([after[0].receipt])
    shared = await restart(harness)
    assert await shared.acquire("jobs", "jobs", records_max=5) == []


async def test_max_deliveries_dead_letters_then_redrive(harness: BrokerHarness,
                                                        broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(visibility_timeout_ms=100, max_deliveries=2))
    await publish(broker, "jobs", b"poison", headers=(("trace", b"7"),))
    for _ in range(2):
        assert values(await shared.acquire("jobs", "jobs")) == [b"poison"]
        harness.clock.advance(100)
    assert await shared.acquire("jobs", "jobs") == []
    shared = await restart(harness)
    dead = await shared.acquire("jobs.dlq", "jobs.dlq", lock_ms=10)
    assert values(dead) == [b"poison"]
    assert header_of(dead[0], HEADER_DEAD_REASON) == b"max-deliveries"
    assert header_of(dead[0], HEADER_SOURCE) == b"jobs/0/0"
    assert header_of(dead[0], "trace") == b"7"
    harness.clock.advance(10)
    assert await shared.redrive("jobs") == 1
    back = await shared.acquire("jobs", "jobs")
    assert values(back) == [b"poison"] and back[0].delivery_count == 1
    assert header_of(back[0], HEADER_DEAD_REASON) is None
    assert header_of(back[0], "trace") == b"7"
    assert (await shared.get_queue("jobs.dlq")).ready == 0


async def test_reject_dead_letters_now(broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(dead_letter_topic="graveyard"))
    await publish(broker, "jobs", b"bad", b"good")
    taken = await shared.acquire("jobs", "jobs")
    await shared.reject([taken[0].receipt], "cannot parse")
    dead = await shared.acquire("graveyard", "graveyard")
    assert values(dead) == [b"bad"]
    assert header_of(dead[0], HEADER_DEAD_REASON) == b"rejected"
    assert values(await shared.acquire("jobs", "jobs")) == [b"good"]


async def test_ttl_expires_records(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("dropping", QueueConfig(message_ttl_ms=1_000))
    await shared.declare_queue("keeping", QueueConfig(message_ttl_ms=1_000, max_deliveries=5))
    now_ms = harness.clock.wall_ms()
    await publish(broker, "dropping", b"old")
    await publish(broker, "keeping", b"old")
    await publish(broker, "keeping", b"short", expires_at_ms=now_ms + 10)
    harness.clock.advance(500)
    await publish(broker, "dropping", b"young")
    held = await shared.acquire("keeping", "keeping", records_max=5)
    assert values(held) == [b"old"]  # "short" expired already: never handed out
    await shared.release([held[0].receipt])
    harness.clock.advance(600)
    shared = await restart(harness)
    assert values(await shared.acquire("dropping", "dropping", records_max=5)) == [b"young"]
    assert values(await shared.acquire("keeping", "keeping", records_max=5)) == []
    dead = await shared.acquire("keeping.dlq", "keeping.dlq", records_max=5)
    assert values(dead) == [b"short", b"old"]  # in the order they died
    assert {header_of(d, HEADER_DEAD_REASON) for d in dead} == {b"expired"}


async def test_long_delay_does_not_block_later_records(harness: BrokerHarness,
                                                       broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    later_ms = harness.clock.wall_ms() + 3 * DAY_MS
    await publish(broker, "jobs", b"in-three-days", deliver_at_ms=later_ms)
    await publish(broker, "jobs", b"now-1", b"now-2")
    taken = await shared.acquire("jobs", "jobs", records_max=10)
    assert values(taken) == [b"now-1", b"now-2"]
    await shared.ack([d.receipt for d in taken])
    info = await shared.get_queue("jobs")
    assert (info.ready, info.delayed) == (0, 1)
    shared = await restart(harness)
    assert await shared.acquire("jobs", "jobs") == []
    harness.clock.advance(3 * DAY_MS)
    assert values(await shared.acquire("jobs", "jobs")) == [b"in-three-days"]


async def test_release_with_delay_and_queue_delay(harness: BrokerHarness,
                                                  broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("slow", QueueConfig(delay_ms=1_000))
    await publish(broker, "slow", b"x")
    assert await shared.acquire("slow", "slow") == []
    harness.clock.advance(1_000)
    taken = await shared.acquire("slow", "slow")
    assert values(taken) == [b"x"]
    await shared.release([taken[0].receipt], delay_ms=5_000)
    shared = await restart(harness)  # the release delay is persisted
    harness.clock.advance(4_000)
    assert await shared.acquire("slow", "slow") == []
    harness.clock.advance(1_000)
    again = await shared.acquire("slow", "slow")
    assert values(again) == [b"x"] and again[0].delivery_count == 2


async def test_priorities_served_highest_first(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("urgent", QueueConfig(max_priority=9))
    for value, priority in ((b"low", 1), (b"high", 9), (b"mid", 5), (b"high-2", 9)):
        await publish(broker, "urgent", value, priority=priority)
    await publish(broker, "urgent", b"none")
    first = await shared.acquire("urgent", "urgent", records_max=2)
    assert values(first) == [b"high", b"high-2"]
    await shared.ack([first[0].receipt])
    shared = await restart(harness)  # high-2's lock ends with the restart
    assert values(await shared.acquire("urgent", "urgent")) == [b"high-2"]
    assert values(await shared.acquire("urgent", "urgent", records_max=5)) == [
        b"mid", b"low", b"none"]


async def test_fifo_one_in_flight_per_group(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("orders.fifo", QueueConfig(fifo=True, visibility_timeout_ms=500))
    for value, group in ((b"a1", "a"), (b"a2", "a"), (b"b1", "b"), (b"a3", "a"), (b"b2", "b")):
        await publish(broker, "orders.fifo", value, message_group=group)
    first = await shared.acquire("orders.fifo", "orders.fifo", records_max=10)
    assert values(first) == [b"a1", b"b1"]
    assert await shared.acquire("orders.fifo", "orders.fifo", records_max=10) == []
    await shared.ack([first[0].receipt])
    assert values(await shared.acquire("orders.fifo", "orders.fifo", records_max=10)) == [b"a2"]
    harness.clock.advance(500)  # both locks expire: b1 then a2 come back, in order
    shared = await restart(harness)
    again = await shared.acquire("orders.fifo", "orders.fifo", records_max=10)
    assert values(again) == [b"a2", b"b1"]


async def test_dedup_window(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("once", QueueConfig(dedup_window_ms=60_000))
    first = await broker.publish("once", [Message(b"1", dedup_id="order-7")])
    second = await broker.publish("once", [Message(b"2", dedup_id="order-7"),
                                           Message(b"3", dedup_id="order-8")])
    assert first[0].offset == 0
    assert second[0].duplicate and second[0].offset == -1 and second[1].offset == 1
    assert shared.should_drop_duplicate("once", "order-7")
    shared = await restart(harness)
    assert shared.should_drop_duplicate("once", "order-8")
    harness.clock.advance(60_000)
    assert not shared.should_drop_duplicate("once", "order-7")
    third = await harness.broker.publish("once", [Message(b"4", dedup_id="order-7")])  # type: ignore[union-attr]
    assert third[0].offset == 2
    assert values(await shared.acquire("once", "once", records_max=10)) == [b"1", b"3", b"4"]


async def test_max_length_overflow(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("head", QueueConfig(max_length=2))
    await shared.declare_queue("reject", QueueConfig(max_length=2, overflow="reject-publish"))
    await publish(broker, "head", b"1", b"2", b"3")
    results = await broker.publish("reject", [Message(b"1"), Message(b"2"), Message(b"3")])
    assert [result.offset for result in results] == [0, 1, -1]
    shared = await restart(harness)
    assert values(await shared.acquire("head", "head", records_max=5)) == [b"2", b"3"]
    assert values(await shared.acquire("reject", "reject", records_max=5)) == [b"1", b"2"]


async def test_long_poll_woken_by_append(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    waiting = asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=20_000))
    await parked(shared, "jobs")
    started_ms = harness.clock.monotonic_ms()
    await publish(broker, "jobs", b"hello")
    assert values(await waiting) == [b"hello"]
    assert harness.clock.monotonic_ms() == started_ms  # woken, not timed out


async def test_long_poll_woken_by_lock_expiry(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(visibility_timeout_ms=1_000))
    await publish(broker, "jobs", b"x")
    assert values(await shared.acquire("jobs", "jobs", consumer_id="first")) == [b"x"]
    waiting = asyncio.create_task(shared.acquire("jobs", "jobs", wait_ms=10_000))
    await parked(shared, "jobs")
    harness.clock.advance(1_000)
    again = await waiting
    assert values(again) == [b"x"] and again[0].delivery_count == 2


async def test_release_consumer_counts_a_delivery(broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await publish(broker, "jobs", b"a", b"b")
    await shared.acquire("jobs", "jobs", records_max=2, consumer_id="channel-1")
    assert await shared.release_consumer("channel-1") == 2
    again = await shared.acquire("jobs", "jobs", records_max=2, consumer_id="channel-2")
    assert [d.delivery_count for d in again] == [2, 2]


async def test_declare_purge_delete(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs", QueueConfig(max_deliveries=3))
    await shared.declare_queue("jobs", QueueConfig(max_deliveries=3))  # same: fine
    with pytest.raises(PreconditionFailedError):
        await shared.declare_queue("jobs", QueueConfig(max_deliveries=4))
    await publish(broker, "jobs", b"a", b"b", b"c")
    held = await shared.acquire("jobs", "jobs")
    assert await shared.purge_queue("jobs") == 2
    info = await shared.get_queue("jobs")
    assert (info.ready, info.in_flight) == (0, 1)
    with pytest.raises(PreconditionFailedError):
        await shared.delete_queue("jobs", if_empty=True)
    await shared.ack([held[0].receipt])
    shared = await restart(harness)
    assert [q.name for q in await shared.list_queues()] == ["jobs"]
    assert await shared.delete_queue("jobs", if_empty=True) == 0
    assert not shared.queue_exists("jobs")
    with pytest.raises(UnknownQueueError):
        await shared.get_queue("jobs")


async def test_work_queue_retention_after_all_acked(broker: Broker) -> None:
    shared = groups(broker)
    await shared.declare_queue("jobs")
    await publish(broker, "jobs", b"a", b"b", b"c")
    taken = await shared.acquire("jobs", "jobs", records_max=2)
    await shared.ack([d.receipt for d in taken])
    await shared.tick()
    assert broker.offsets("jobs", 0).log_start_offset == 2


async def test_shared_groups_on_a_plain_topic(harness: BrokerHarness, broker: Broker) -> None:
    shared = groups(broker)
    await broker.create_topic("events", partitions=2)
    await broker.publish("events", [Message(b"early")], partition=0)
    await shared.create_shared_group("events", "audit", start="earliest")
    await shared.create_shared_group("events", "billing")  # latest: skips "early"
    await broker.publish("events", [Message(b"e1")], partition=0)
    await broker.publish("events", [Message(b"e2")], partition=1)
    audit = await shared.acquire("events", "audit", records_max=10)
    assert sorted(values(audit)) == [b"e1", b"e2", b"early"]  # type: ignore[type-var]
    billing = await shared.acquire("events", "billing", records_max=10)
    assert sorted(values(billing)) == [b"e1", b"e2"]  # type: ignore[type-var]
    await shared.ack([d.receipt for d in billing])
    shared = await restart(harness)
    assert await shared.acquire("events", "billing", records_max=10) == []
    again = await shared.acquire("events", "audit", records_max=10)
    assert sorted(values(again)) == [b"e1", b"e2", b"early"]  # type: ignore[type-var]


async def test_long_poll_woken_when_acks_move_a_full_window(
        harness: BrokerHarness, broker: Broker) -> None:
    """A full in-flight window holds later records back; when acks move the window,
    a parked acquire must get them at once, not at the end of its wait."""
    shared = groups(broker)
    await shared.declare_queue("window")
    shared._groups[("window", "window")].partitions[0].window_records_max = 2
    await publish(broker, "window", b"a", b"b", b"c")
    held = await shared.acquire("window", "window", records_max=5, consumer_id="first")
    assert values(held) == [b"a", b"b"]  # the window holds two records
    waiting = asyncio.create_task(shared.acquire("window", "window", wait_ms=20_000,
                                                 consumer_id="second"))
    await parked(shared, "window")
    started_ms = harness.clock.monotonic_ms()
    await shared.ack([held[0].receipt])
    assert values(await waiting) == [b"c"]
    assert harness.clock.monotonic_ms() == started_ms  # woken, not timed out


async def test_lock_deadlines_and_delays_ignore_wall_clock_steps(
        harness: BrokerHarness, broker: Broker) -> None:
    """Deadlines run on the monotonic clock: a wall-clock step neither expires every
    lock at once (forward) nor holds them for the step (backward); reported deadlines
    stay wall ms."""
    shared = groups(broker)
    await shared.declare_queue("steps", QueueConfig(visibility_timeout_ms=10_000))
    await publish(broker, "steps", b"a", b"b", b"c")
    held = await shared.acquire("steps", "steps", records_max=2)
    assert values(held) == [b"a", b"b"]
    assert held[0].lock_deadline_ms == harness.clock.wall_ms() + 10_000
    harness.clock.step_wall(3_600_000)  # one hour forward
    assert values(await shared.acquire("steps", "steps", records_max=5)) == [b"c"]
    await shared.ack([held[0].receipt])  # still locked: the ack holds
    harness.clock.step_wall(-7_200_000)  # two hours back
    harness.clock.advance(10_000)
    again = await shared.acquire("steps", "steps", records_max=5)
    assert sorted(values(again)) == [b"b", b"c"]  # type: ignore[type-var]
    await shared.release([again[0].receipt], delay_ms=5_000)
    harness.clock.step_wall(-3_600_000)
    harness.clock.advance(5_000)
    assert len(await shared.acquire("steps", "steps", records_max=5)) == 1


async def test_failed_dead_letter_append_keeps_the_record_and_the_acks(
        harness: BrokerHarness, broker: Broker) -> None:
    """A dead letter that cannot be appended (too large once the headers are added) must
    not lose the record, nor the acks persisted in the same flush; it is retried."""
    shared = groups(broker)
    await broker.create_topic("tiny.dlq", 1, {"max.message.bytes": "150"})
    await shared.declare_queue("jobs", QueueConfig(max_deliveries=1,
                                                   dead_letter_topic="tiny.dlq"))
    await publish(broker, "jobs", b"x" * 100, b"ok")
    big, ok = await shared.acquire("jobs", "jobs", records_max=2)
    await shared.extend([big.receipt], 0)  # its lock ends now: dead (max deliveries 1)
    with pytest.raises(LockExpiredError):
        await shared.ack([ok.receipt, big.receipt])
    shared = await restart(harness)
    assert harness.broker is not None
    await harness.broker.alter_topic_config("tiny.dlq", {"max.message.bytes": "100000"})
    again = await shared.acquire("jobs", "jobs", records_max=5)
    assert values(again) == [b"x" * 100]  # ok stays acked; the restart forgot why big
    # was dead, so it is delivered once more
    await shared.release([again[0].receipt])  # out of deliveries: dead-lettered now
    data = harness.broker.log_store.partition("tiny.dlq", 0)
    assert data.high_watermark == 1


async def test_parked_dead_letter_is_retried_in_place(harness: BrokerHarness,
                                                      broker: Broker) -> None:
    shared = groups(broker)
    await broker.create_topic("tiny.dlq", 1, {"max.message.bytes": "150"})
    await shared.declare_queue("jobs", QueueConfig(dead_letter_topic="tiny.dlq"))
    await publish(broker, "jobs", b"x" * 100)
    (big,) = await shared.acquire("jobs", "jobs")
    await shared.reject([big.receipt])  # the dead letter fails: parked, not lost
    assert (await shared.get_queue("jobs")).delayed == 1
    assert shared.dead_letters.failures == {("jobs", "record_too_large"): 1}
    await broker.alter_topic_config("tiny.dlq", {"max.message.bytes": "100000"})
    harness.clock.advance(DEAD_LETTER_RETRY_MS)
    await shared.tick()
    assert broker.log_store.partition("tiny.dlq", 0).high_watermark == 1
    assert (await shared.get_queue("jobs")).delayed == 0 and not shared.dead_letters.failures
    assert await shared.acquire("jobs", "jobs") == []


async def test_reset_shared_partition_forgets_its_record_states(harness: BrokerHarness,
                                                                broker: Broker) -> None:
    """AlterShareGroupOffsets' storage: a reset start survives a restart, and the record
    states at or above it are gone (acked records come back with count 1)."""
    await broker.create_topic("events", 2)
    await broker.publish("events", [Message(b"a"), Message(b"b"), Message(b"c")], partition=0)
    await broker.publish("events", [Message(b"z")], partition=1)
    shared = groups(broker)
    await shared.create_shared_group("events", "audit", start="earliest")
    taken = await shared.acquire("events", "audit", records_max=5)
    with pytest.raises(PreconditionFailedError):  # records of partition 0 are acquired
        await shared.reset_shared_partition("events", "audit", 0, 0)
    await shared.ack([delivery.receipt for delivery in taken])
    assert shared.shared_group_start_offsets("events", "audit") == {0: 3, 1: 1}
    assert await shared.reset_shared_partition("events", "audit", 0, 1) == 1
    with pytest.raises(OffsetOutOfRangeError):
        await shared.reset_shared_partition("events", "audit", 0, 4)
    with pytest.raises(UnknownPartitionError):
        await shared.reset_shared_partition("events", "audit", 2, 0)
    with pytest.raises(UnknownGroupError):
        await shared.reset_shared_partition("events", "nobody", 0, 0)
    shared = await restart(harness)
    assert shared.shared_group_start_offsets("events", "audit") == {0: 1, 1: 1}
    again = await shared.acquire("events", "audit", records_max=5)
    assert values(again) == [b"b", b"c"] and [d.delivery_count for d in again] == [1, 1]
