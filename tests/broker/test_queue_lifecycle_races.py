"""Queue declare, delete and the background pass interleaved (found by the AMQP fuzz run).

Goal: a queue deleted while another task is inside a declare of it, or while the
timer's pass is working through its partitions, never leaves a traceback behind
(``KeyError`` in declare_queue; ``UnknownPartitionError`` in "background pass
failed"). Method: the awaits inside those operations are parked on an event the test
controls, the competing operation runs meanwhile, then the first one resumes.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from conveyor.broker.broker import Broker
from conveyor.broker.shared_groups import SharedGroups
from conveyor.broker.types import Message
from conveyor.errors import UnknownQueueError


def shared_of(broker: Broker) -> SharedGroups:
    assert isinstance(broker.shared_groups, SharedGroups)
    return broker.shared_groups


async def test_delete_waits_for_a_declare_of_the_same_queue(broker: Broker) -> None:
    shared = shared_of(broker)
    # through the facade: it deletes the queue's topic too, under the queue's lock
    declared, deleted = await asyncio.gather(broker.declare_queue("jobs"),
                                             broker.delete_queue("jobs"))
    assert declared.name == "jobs" and deleted == 0
    assert not shared.queue_exists("jobs") and broker.topics.find("jobs") is None
    again = await shared.declare_queue("jobs")  # and the name can be used again
    assert again.name == "jobs"


async def test_topic_deleted_under_a_declare_is_a_clean_error(
    broker: Broker, monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = shared_of(broker)
    parked, release = asyncio.Event(), asyncio.Event()
    create = broker.topics.create

    async def slow_create(*args: object, **kwargs: object) -> object:
        result = await create(*args, **kwargs)  # type: ignore[arg-type]
        parked.set()
        await release.wait()
        return result

    monkeypatch.setattr(broker.topics, "create", slow_create)
    declaring = asyncio.ensure_future(shared.declare_queue("jobs"))
    await parked.wait()
    await broker.delete_topic("jobs")  # e.g. a Kafka DeleteTopics on the queue's topic
    release.set()
    with pytest.raises(UnknownQueueError):
        await declaring


async def test_background_pass_skips_a_queue_deleted_under_it(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    shared = shared_of(broker)
    await shared.declare_queue("jobs")
    await shared.declare_queue("other")
    await broker.publish("jobs", [Message(b"x")])
    parked, release = asyncio.Event(), asyncio.Event()
    flush = shared._flush

    async def slow_flush(state: object, part: object) -> None:
        await flush(state, part)  # type: ignore[arg-type]
        if not release.is_set():
            parked.set()
            await release.wait()

    monkeypatch.setattr(shared, "_flush", slow_flush)
    with caplog.at_level(logging.ERROR):
        ticking = asyncio.ensure_future(shared.tick())
        await parked.wait()
        monkeypatch.setattr(shared, "_flush", flush)
        await broker.delete_queue("jobs")
        await broker.delete_queue("other")
        release.set()
        await ticking  # raised UnknownPartitionError before
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
