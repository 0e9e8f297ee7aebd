"""Dead-lettering through an exchange (QueueConfig.dead_letter_exchange), broker level.

Goal: a record that dies in a queue with a dead-letter exchange — rejected,
expired (per-message or queue TTL), out of deliveries, or dropped from the head
by a max_length overflow — is re-published through that exchange (with the
configured routing key, else its own, else the queue's name) to every queue bound
there, carrying a ``conveyor.deaths`` JSON document: newest death first, the count
of a (queue, reason) growing on every cycle while ``first`` stays; the expiry it
died of goes, its exchange and routing key become the dead-letter ones, the rest of
the record stays. No route, or no such exchange, drops
the record (no ``<queue>.dlq`` appears); a queue without a dead-letter exchange
drops what overflows. Cycles made only of automatic deaths (expired, maxlen,
max-deliveries) are dropped as RabbitMQ drops them — counting only the deaths since
the record last died in the target queue; cycles with a rejection in them go on.
Method: a BrokerHarness (MemoryFileSystem, SQLite, SimClock); time moves only by
``SimClock.advance``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from broker_harness import BrokerHarness

from conveyor.broker.broker import Broker, BrokerConfig
from conveyor.broker.types import (
    HEADER_DEAD_REASON,
    HEADER_DEATHS,
    HEADER_EXCHANGE,
    HEADER_EXPIRATION,
    HEADER_EXPIRES_AT,
    HEADER_ROUTING_KEY,
    Delivery,
    ExchangeType,
    Headers,
    Message,
    QueueConfig,
)
from conveyor.testing.memory_fs import MemoryFileSystem

BOUND_S = 5.0  # a publish or settle that does not finish by then is a hang
# The broker's timer never fires in these tests (SimClock advances stay far below it), so
# a record expires when an acquire finds it, deterministically; the timer's own expiry
# pass has a test of its own (test_timer_expires_and_dead_letters_without_a_consumer).
NO_TIMER = BrokerConfig(group_check_interval_ms=30 * 24 * 3600 * 1000)


@asynccontextmanager
async def running(directory: Path, config: BrokerConfig) -> AsyncIterator[BrokerHarness]:
    fs = MemoryFileSystem()
    fs.make_dirs(str(directory))
    result = BrokerHarness(directory, fs, config)
    await result.start()
    try:
        yield result
    finally:
        await result.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[BrokerHarness]:
    """Overrides conftest's two-file-system harness: MemoryFileSystem only (speed)."""
    async with running(tmp_path, NO_TIMER) as result:
        yield result


def header(delivery: Delivery, name: str) -> bytes | None:
    found = None
    for key, value in delivery.headers:
        if key == name:
            found = value
    return found


def deaths(delivery: Delivery) -> dict[str, Any]:
    raw = header(delivery, HEADER_DEATHS)
    assert raw is not None, delivery.headers
    document: dict[str, Any] = json.loads(raw)
    return document


def summary(delivery: Delivery) -> list[tuple[str, str, int]]:
    return [(death["queue"], death["reason"], death["count"])
            for death in deaths(delivery)["deaths"]]


async def take(broker: Broker, queue: str, records_max: int = 10) -> list[Delivery]:
    """What is ready now."""
    return await asyncio.wait_for(
        broker.acquire(queue, queue, records_max=records_max, lock_ms=60_000), BOUND_S)


async def arrived(broker: Broker, queue: str, records_max: int = 10) -> list[Delivery]:
    """Waits for the first record (a dead letter may be on its way from the broker's
    timer): the long poll returns on the append, the SimClock never times it out."""
    return await asyncio.wait_for(
        broker.acquire(queue, queue, records_max=records_max, lock_ms=60_000,
                       wait_ms=30_000), BOUND_S)


async def publish(broker: Broker, queue: str, value: bytes, headers: Headers = (),
                  **fields: Any) -> None:
    await asyncio.wait_for(broker.publish(queue, [Message(value, b"k", headers, **fields)]),
                           BOUND_S)


async def dead_letter_setup(broker: Broker, config: QueueConfig,
                            exchange_type: ExchangeType = "direct",
                            binding_key: str = "work") -> None:
    """Queue ``work`` (``config``) dead-letters through exchange ``dlx`` to queue ``dead``."""
    await broker.declare_exchange("dlx", exchange_type)
    await broker.declare_queue("dead")
    await broker.bind("dlx", "queue", "dead", binding_key)
    await broker.declare_queue("work", config)


async def topic_names(broker: Broker) -> set[str]:
    return {info.name for info in broker.list_topics()}


# --- the four reasons ------------------------------------------------------------------
async def test_rejected_record_goes_through_the_exchange(harness: BrokerHarness,
                                                         broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx"))
    await publish(broker, "work", b"payload", (("app", b"kept"),))
    taken = await take(broker, "work")
    harness.clock.advance(1500)
    await asyncio.wait_for(broker.reject([taken[0].receipt]), BOUND_S)

    dead = await arrived(broker, "dead")
    assert [(d.value, d.key) for d in dead] == [(b"payload", b"k")]
    assert header(dead[0], "app") == b"kept"
    assert header(dead[0], HEADER_DEAD_REASON) == b"rejected"
    now_s = harness.clock.wall_ms() // 1000
    assert deaths(dead[0]) == {
        "deaths": [{"queue": "work", "reason": "rejected", "count": 1, "time": now_s,
                    "exchange": "", "routing-keys": ["work"]}],
        "first": {"queue": "work", "reason": "rejected", "exchange": ""},
    }
    assert dead[0].timestamp_ms == harness.clock.wall_ms()
    info = await broker.get_queue("work")
    assert (info.ready, info.in_flight, info.delayed) == (0, 0, 0)
    assert "work.dlq" not in await topic_names(broker)


async def test_expired_record_keeps_its_original_expiration_and_loses_its_expiry(
        harness: BrokerHarness, broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx"))
    expires_at_ms = harness.clock.wall_ms() + 500
    await publish(broker, "work", b"short-lived", (
        (HEADER_EXPIRATION, b"500"), (HEADER_EXCHANGE, b"orders"),
        (HEADER_ROUTING_KEY, b"work")), expires_at_ms=expires_at_ms)
    harness.clock.advance(501)
    assert await take(broker, "work") == []

    dead = await arrived(broker, "dead")
    assert [d.value for d in dead] == [b"short-lived"]
    entry = deaths(dead[0])["deaths"][0]
    assert (entry["queue"], entry["reason"], entry["count"]) == ("work", "expired", 1)
    assert entry["original-expiration"] == "500"
    assert entry["exchange"] == "orders" and entry["routing-keys"] == ["work"]
    assert deaths(dead[0])["first"] == {"queue": "work", "reason": "expired",
                                        "exchange": "orders"}
    assert header(dead[0], HEADER_EXPIRES_AT) is None
    assert header(dead[0], HEADER_EXPIRATION) is None
    # It was re-published to the dead-letter exchange with the dead-letter routing key
    # (RabbitMQ's delivery of a dead letter says so); x-death keeps where it came from.
    assert header(dead[0], HEADER_EXCHANGE) == b"dlx"
    assert header(dead[0], HEADER_ROUTING_KEY) == b"work"
    # In the dead queue it does not expire again.
    await broker.release([dead[0].receipt])
    harness.clock.advance(3_600_000)
    assert [d.value for d in await arrived(broker, "dead")] == [b"short-lived"]


async def test_timer_expires_and_dead_letters_without_a_consumer(tmp_path: Path) -> None:
    """RabbitMQ expires (and dead-letters) messages nobody consumes: the broker's timer."""
    async with running(tmp_path, BrokerConfig()) as timed:
        broker = timed.broker
        assert broker is not None
        await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx",
                                                    message_ttl_ms=1000))
        await publish(broker, "work", b"unread")
        timed.clock.advance(1001)  # wakes the timer; no acquire on "work" from here on
        dead = await arrived(broker, "dead")
        assert [d.value for d in dead] == [b"unread"]
        assert summary(dead[0]) == [("work", "expired", 1)]


async def test_queue_ttl_expiry_is_dead_lettered(harness: BrokerHarness,
                                                 broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx",
                                                message_ttl_ms=1000))
    await publish(broker, "work", b"old")
    harness.clock.advance(1001)
    await publish(broker, "work", b"fresh")
    assert [d.value for d in await take(broker, "work")] == [b"fresh"]
    dead = await arrived(broker, "dead")
    assert [d.value for d in dead] == [b"old"]
    assert summary(dead[0]) == [("work", "expired", 1)]
    assert "original-expiration" not in deaths(dead[0])["deaths"][0]


async def test_max_deliveries_is_dead_lettered_through_the_exchange(
        harness: BrokerHarness, broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx", max_deliveries=2))
    await publish(broker, "work", b"poison")
    for _ in range(2):
        taken = await take(broker, "work")
        assert [d.value for d in taken] == [b"poison"]
        await broker.release([taken[0].receipt])
    assert await take(broker, "work") == []
    dead = await arrived(broker, "dead")
    assert [d.value for d in dead] == [b"poison"]
    assert summary(dead[0]) == [("work", "max-deliveries", 1)]
    assert header(dead[0], HEADER_DEAD_REASON) == b"max-deliveries"
    assert "work.dlq" not in await topic_names(broker)


async def test_lock_expiry_counts_toward_max_deliveries(harness: BrokerHarness,
                                                        broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx", max_deliveries=1))
    await publish(broker, "work", b"slow")
    taken = await broker.acquire("work", "work", lock_ms=100)
    assert len(taken) == 1
    harness.clock.advance(101)
    assert await take(broker, "work") == []
    assert summary((await arrived(broker, "dead"))[0]) == [("work", "max-deliveries", 1)]


async def test_drop_head_overflow_dead_letters_with_reason_maxlen(
        harness: BrokerHarness, broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx", max_length=2))
    for value in (b"1", b"2", b"3", b"4"):
        await publish(broker, "work", value)
    assert [d.value for d in await take(broker, "work")] == [b"3", b"4"]
    dead = await arrived(broker, "dead")
    assert [d.value for d in dead] == [b"1", b"2"]
    assert [summary(d) for d in dead] == [[("work", "maxlen", 1)]] * 2


async def test_drop_head_overflow_without_a_dead_letter_exchange_drops(
        broker: Broker) -> None:
    before = await topic_names(broker)
    await broker.declare_queue("work", QueueConfig(max_length=1, max_deliveries=3))
    await publish(broker, "work", b"1")
    await publish(broker, "work", b"2")
    assert [d.value for d in await take(broker, "work")] == [b"2"]
    assert await topic_names(broker) == before | {"work"}


# --- routing ---------------------------------------------------------------------------
async def test_routing_key_configured_else_the_records_own_else_the_queue(
        broker: Broker) -> None:
    await broker.declare_exchange("dlx", "direct")
    for queue in ("by-config", "by-record", "by-queue"):
        await broker.declare_queue(queue)
        await broker.bind("dlx", "queue", queue, queue.replace("by-", "key-"))
    await broker.declare_queue("configured", QueueConfig(
        dead_letter_exchange="dlx", dead_letter_routing_key="key-config"))
    await broker.declare_queue("key-queue", QueueConfig(dead_letter_exchange="dlx"))
    own = ((HEADER_ROUTING_KEY, b"key-record"),)
    await publish(broker, "configured", b"a", own)
    await publish(broker, "key-queue", b"b", own)
    await publish(broker, "key-queue", b"c")
    for queue in ("configured", "key-queue"):
        taken = await take(broker, queue)
        await broker.reject([d.receipt for d in taken])
    assert [d.value for d in await arrived(broker, "by-config")] == [b"a"]
    assert [d.value for d in await arrived(broker, "by-record")] == [b"b"]
    assert [d.value for d in await arrived(broker, "by-queue")] == [b"c"]


async def test_fanout_dead_letter_exchange_reaches_every_bound_queue(broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx"),
                            exchange_type="fanout", binding_key="")
    await broker.declare_queue("audit")
    await broker.bind("dlx", "queue", "audit", "")
    await publish(broker, "work", b"x")
    await broker.reject([d.receipt for d in await take(broker, "work")])
    for queue in ("dead", "audit"):
        got = await arrived(broker, queue)
        assert [d.value for d in got] == [b"x"]
        assert summary(got[0]) == [("work", "rejected", 1)]


async def test_no_route_drops_the_record(broker: Broker) -> None:
    await broker.declare_exchange("dlx", "direct")  # no bindings
    await broker.declare_queue("work", QueueConfig(dead_letter_exchange="dlx",
                                                   max_deliveries=1))
    await broker.declare_queue("missing", QueueConfig(dead_letter_exchange="no-such-exchange"))
    before = await topic_names(broker)
    for queue in ("work", "missing"):
        await publish(broker, queue, b"doomed")
        await asyncio.wait_for(broker.reject([d.receipt for d in await take(broker, queue)]),
                               BOUND_S)
        info = await broker.get_queue(queue)
        assert (info.ready, info.in_flight, info.delayed) == (0, 0, 0)
    assert await topic_names(broker) == before


async def test_dead_letter_exchange_survives_a_restart(harness: BrokerHarness,
                                                       broker: Broker) -> None:
    await dead_letter_setup(broker, QueueConfig(dead_letter_exchange="dlx",
                                                dead_letter_routing_key="work"))
    await publish(broker, "work", b"later")
    broker = await harness.restart()
    assert (await broker.get_queue("work")).config.dead_letter_exchange == "dlx"
    await broker.reject([d.receipt for d in await take(broker, "work")])
    assert [d.value for d in await arrived(broker, "dead")] == [b"later"]


# --- repeated deaths -------------------------------------------------------------------
async def test_retry_cycle_counts_each_death_and_keeps_the_first(harness: BrokerHarness,
                                                                 broker: Broker) -> None:
    """RabbitMQ's retry pattern: work rejects into retry; retry's TTL sends it back."""
    await broker.declare_exchange("retry-x", "direct")
    await broker.declare_queue("retry", QueueConfig(
        message_ttl_ms=1000, dead_letter_exchange="", dead_letter_routing_key="work"))
    await broker.bind("retry-x", "queue", "retry", "work")
    await broker.declare_queue("work", QueueConfig(dead_letter_exchange="retry-x"))
    await publish(broker, "work", b"flaky", (("app", b"kept"),))

    expected_first = {"queue": "work", "reason": "rejected", "exchange": ""}
    history: list[list[tuple[str, str, int]]] = []
    for _ in range(3):
        taken = await take(broker, "work")
        assert [d.value for d in taken] == [b"flaky"]
        if history:
            assert summary(taken[0]) == history[-1]
            assert deaths(taken[0])["first"] == expected_first
            assert header(taken[0], "app") == b"kept"
        await broker.reject([taken[0].receipt])
        in_retry = await take(broker, "retry")
        assert [d.value for d in in_retry] == [b"flaky"]
        await broker.release([in_retry[0].receipt])
        harness.clock.advance(1001)
        assert await take(broker, "retry") == []  # expired: back to work
        history.append([("retry", "expired", len(history) + 1),
                        ("work", "rejected", len(history) + 1)])
    final = await take(broker, "work")
    assert summary(final[0]) == [("retry", "expired", 3), ("work", "rejected", 3)]
    assert deaths(final[0])["first"] == expected_first


async def test_rejection_cycle_into_the_same_queue_goes_on(broker: Broker) -> None:
    """A cycle with a rejection in it is the client's choice (RabbitMQ keeps it)."""
    await broker.declare_queue("loop", QueueConfig(dead_letter_exchange=""))
    await publish(broker, "loop", b"again")
    for count in (1, 2, 3):
        taken = await take(broker, "loop")
        assert [d.value for d in taken] == [b"again"]
        await broker.reject([taken[0].receipt])
        back = await take(broker, "loop")
        assert summary(back[0]) == [("loop", "rejected", count)]
        assert deaths(back[0])["first"] == {"queue": "loop", "reason": "rejected",
                                            "exchange": ""}
        await broker.release([back[0].receipt])


class Guarded:
    """A broker for a test that may recurse without end: a RecursionError is recorded
    (pytest's report of a 1000-deep stack takes ages) and the broken broker, which may
    never finish closing, gets a bounded close."""

    def __init__(self, harness: BrokerHarness, broker: Broker) -> None:
        self.harness = harness
        self.broker = broker
        self.recursed = False

    async def publish(self, queue: str, value: bytes) -> None:
        try:
            await publish(self.broker, queue, value)
        except RecursionError:
            self.recursed = True
        assert not self.recursed, "publish -> overflow -> dead-letter -> publish ... no end"


@asynccontextmanager
async def guarded(directory: Path) -> AsyncIterator[Guarded]:
    fs = MemoryFileSystem()
    fs.make_dirs(str(directory))
    harness = BrokerHarness(directory, fs, NO_TIMER)
    result = Guarded(harness, await harness.start())
    try:
        yield result
    finally:
        if result.recursed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(harness.stop(), 2)
        else:
            await harness.stop()


async def test_overflow_cycle_into_the_same_queue_is_dropped(tmp_path: Path) -> None:
    """max_length overflow dead-lettering into the same queue: RabbitMQ drops a message
    whose dead-letter cycle has no rejection in it (it would loop forever); here the
    publish must finish and the queue keep its newest record."""
    async with guarded(tmp_path) as world:
        broker = world.broker
        await broker.declare_queue("self", QueueConfig(max_length=1, dead_letter_exchange=""))
        await world.publish("self", b"first")
        await world.publish("self", b"second")
        assert [d.value for d in await take(broker, "self")] == [b"second"]


async def test_expiry_cycle_into_the_same_queue_is_dropped(harness: BrokerHarness,
                                                           broker: Broker) -> None:
    """A queue TTL dead-lettering into the same queue: dropped on the first expiry."""
    await broker.declare_queue("self", QueueConfig(message_ttl_ms=1000,
                                                   dead_letter_exchange=""))
    await publish(broker, "self", b"stale")
    harness.clock.advance(1001)
    assert await take(broker, "self") == []
    info = await broker.get_queue("self")
    assert (info.ready, info.in_flight, info.delayed) == (0, 0, 0)
    assert await take(broker, "self") == []


async def test_expiry_cycle_through_two_queues_is_dropped(harness: BrokerHarness,
                                                          broker: Broker) -> None:
    await broker.declare_queue("ping", QueueConfig(
        message_ttl_ms=1000, dead_letter_exchange="", dead_letter_routing_key="pong"))
    await broker.declare_queue("pong", QueueConfig(
        message_ttl_ms=1000, dead_letter_exchange="", dead_letter_routing_key="ping"))
    await publish(broker, "ping", b"ball")
    harness.clock.advance(1001)
    assert await take(broker, "ping") == []  # expired: on to pong
    in_pong = await take(broker, "pong")
    assert summary(in_pong[0]) == [("ping", "expired", 1)]
    await broker.release([in_pong[0].receipt])
    harness.clock.advance(1001)
    assert await take(broker, "pong") == []  # expired: ping is where it died: dropped
    for queue in ("ping", "pong"):
        info = await broker.get_queue(queue)
        assert (info.ready, info.in_flight, info.delayed) == (0, 0, 0), queue


async def test_an_old_rejection_does_not_hide_a_later_automatic_cycle(
        harness: BrokerHarness, broker: Broker) -> None:
    """RabbitMQ looks only at the deaths since the message last left the target queue:
    a rejection earlier in its history (in another queue) does not make a later
    expiry loop into the same queue legitimate."""
    await broker.declare_queue("self", QueueConfig(
        message_ttl_ms=1000, dead_letter_exchange="", dead_letter_routing_key="self"))
    await broker.declare_queue("entry", QueueConfig(
        dead_letter_exchange="", dead_letter_routing_key="self"))
    await publish(broker, "entry", b"once rejected")
    await broker.reject([d.receipt for d in await take(broker, "entry")])
    arrived_in_self = await take(broker, "self")
    assert summary(arrived_in_self[0]) == [("entry", "rejected", 1)]
    await broker.release([arrived_in_self[0].receipt])
    harness.clock.advance(1001)
    assert await take(broker, "self") == []  # expired into itself: a cycle, dropped
    info = await broker.get_queue("self")
    assert (info.ready, info.in_flight, info.delayed) == (0, 0, 0)


async def test_an_old_rejection_does_not_hide_a_later_overflow_cycle(tmp_path: Path) -> None:
    """The same with max_length: the record rejected elsewhere, then pushed out of
    ``self`` by a newer one, would come straight back and push the newer one out."""
    async with guarded(tmp_path) as world:
        broker = world.broker
        await broker.declare_queue("self", QueueConfig(
            max_length=1, dead_letter_exchange="", dead_letter_routing_key="self"))
        await broker.declare_queue("entry", QueueConfig(
            dead_letter_exchange="", dead_letter_routing_key="self"))
        await world.publish("entry", b"once rejected")
        await broker.reject([d.receipt for d in await take(broker, "entry")])
        await world.publish("self", b"newer")
        assert [d.value for d in await take(broker, "self")] == [b"newer"]
