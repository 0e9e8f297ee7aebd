"""Goal: the facade wires queues (SharedGroups) to routing: the default exchange and
bindings reach queues, deliveries can be acked, and a restart keeps queue bindings.

Method: declare a queue, publish through "" and amq.direct, acquire and ack through
the Broker, restart, and check the acked record is not redelivered."""

from __future__ import annotations

from broker_harness import BrokerHarness

from conveyor.broker.types import Message


async def test_queue_through_exchanges_and_restart(harness: BrokerHarness) -> None:
    broker = harness.broker
    assert broker is not None
    await broker.declare_queue("jobs")
    assert [q.name for q in await broker.list_queues()] == ["jobs"]
    direct = await broker.publish_to_exchange("", "jobs", [Message(b"one")])
    assert direct.routed and [r.topic for r in direct.results] == ["jobs"]
    await broker.bind("amq.direct", "queue", "jobs", "work")
    routed = await broker.publish_to_exchange("amq.direct", "work", [Message(b"two")])
    assert [r.offset for r in routed.results] == [1]
    deliveries = await broker.acquire("jobs", "jobs", records_max=1)
    assert [d.value for d in deliveries] == [b"one"]
    await broker.ack([deliveries[0].receipt])
    broker = await harness.restart()
    assert broker.list_bindings(destination_kind="queue", destination="jobs")
    deliveries = await broker.acquire("jobs", "jobs", records_max=10)
    assert [d.value for d in deliveries] == [b"two"]
    await broker.delete_queue("jobs")
    assert broker.list_bindings(destination_kind="queue", destination="jobs") == []
    unrouted = await broker.publish_to_exchange("", "jobs", [Message(b"three")])
    assert not unrouted.routed
