"""Goal: ``Broker.stats()`` counts what happened to a queue and a topic — ready, unacked,
delayed, consumers, deliveries, redeliveries, acks, dead records, records in and out,
an ordered group's lag — without changing the queue (a snapshot), and honours its limits.

Method: a queue with max_deliveries=2 driven through the facade (publish, acquire,
release, release with a delay, reject, ack), a topic with a committed offset, and a
snapshot after each step compared with the counts the steps imply."""

from __future__ import annotations

from broker_harness import BrokerHarness

from conveyor.broker.stats import StatsLimits
from conveyor.broker.types import Message, QueueConfig


async def test_queue_counts_and_counters(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.declare_queue("jobs", QueueConfig(max_deliveries=2, dead_letter_topic=""))
    await broker.publish("jobs", [Message(f"m{index}".encode()) for index in range(6)])
    first = await broker.acquire("jobs", "jobs", records_max=4, consumer_id="worker-1")
    await broker.release([first[0].receipt])  # back to ready: redelivered next time
    await broker.release([first[1].receipt], delay_ms=60_000)  # delayed
    await broker.reject([first[2].receipt])  # dead
    await broker.ack([first[3].receipt])
    again = await broker.acquire("jobs", "jobs", records_max=1, consumer_id="worker-2")
    assert again[0].offset == first[0].offset
    (queue,) = broker.stats().queues
    assert (queue.ready, queue.unacked, queue.delayed) == (2, 1, 1)
    assert queue.consumers == 2
    assert (queue.published, queue.delivered, queue.redelivered) == (6, 5, 1)
    assert (queue.acked, queue.dead_lettered) == (1, 1)
    (partition,) = [item for item in broker.stats().partitions if item.topic == "jobs"]
    assert partition.counters.records_in == 6
    assert partition.counters.records_out == 5
    assert partition.log_end_offset == 6
    await broker.release_consumer("worker-2")  # went away: no longer counted
    (queue,) = broker.stats().queues
    assert queue.consumers == 1 and queue.redelivered == 1


async def test_group_lag_and_limits(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.create_topic("events", 2)
    await broker.publish("events", [Message(b"x")] * 5, partition=0)
    await broker.commit_offsets("readers", {("events", 0): 3})
    stats = broker.stats()
    (lag,) = stats.group_partitions
    assert (lag.group, lag.topic, lag.partition, lag.committed_offset, lag.lag) == (
        "readers", "events", 0, 3, 2)
    limited = broker.stats(StatsLimits(partitions_max=1, queues_max=0,
                                       group_partitions_max=0))
    assert len(limited.partitions) == 1 and limited.group_partitions == []
    assert limited.omitted == {"partitions": 1, "queues": 0, "group_partitions": 1}
