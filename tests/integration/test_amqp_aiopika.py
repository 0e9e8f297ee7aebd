"""Goal: aio-pika (over aiormq) works unchanged against Conveyor's AMQP 0-9-1 listener.

Method: one Conveyor per module in the tests' own event loop (``run_broker``, module
loop scope), or the external broker named by CONVEYOR_AMQP_TEST_URL; unique names per
test. Covers declare / confirmed publish / manual-ack consume with prefetch, nack and
requeue, dead-lettering with x-death (rejected and expired), queue and message TTL,
priorities, topic and headers routing, mandatory returns (on_return callback and
DeliveryError), reject-publish overflow nacks, exclusive / auto-delete / server-named
queues, 404 / 405 / 406 channel errors leaving the connection usable, message properties,
basic.get / get-empty, purge, redelivery after a consumer's connection dies, and a
robust connection (connect_robust) that reconnects after the broker is killed (-9) and
restarted, restoring its consumer, with the unacked persistent messages delivered again.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from amqp_support import (
    QUIET_S,
    ROUND_TRIP_HEADERS,
    WAIT_S,
    amqp_url,
    external_url,
    skip_if_external,
    unique,
    x_death_entry,
)

from conveyor.testing.server import BrokerProcess, run_broker

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    external = external_url()
    if external is not None:
        yield external
        return
    async with run_broker(tmp_path_factory.mktemp("aiopika") / "data",
                          listeners=("amqp",)) as server:
        yield amqp_url(server.ports["amqp"])


@pytest_asyncio.fixture(loop_scope="module")
async def connection(url: str) -> AsyncIterator[aio_pika.abc.AbstractConnection]:
    connected = await aio_pika.connect(url, timeout=WAIT_S)
    try:
        yield connected
    finally:
        await connected.close()


class Collector:
    """A consumer callback that queues what it receives (manual ack unless no_ack)."""

    def __init__(self) -> None:
        self.messages: list[AbstractIncomingMessage] = []
        self._arrived = asyncio.Condition()

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        async with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    async def wait_for(self, count: int,
                       timeout_s: float = WAIT_S) -> list[AbstractIncomingMessage]:
        async def enough() -> None:
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.messages) >= count)

        try:
            await asyncio.wait_for(enough(), timeout_s)
        except TimeoutError:
            pytest.fail(f"expected {count} deliveries, got {len(self.messages)}")
        return self.messages

    async def settle_quietly(self, quiet_s: float = QUIET_S) -> list[AbstractIncomingMessage]:
        """Give the broker ``quiet_s`` to (wrongly) deliver more; returns what arrived."""
        await asyncio.sleep(quiet_s)
        return self.messages


async def consume(queue: AbstractQueue, count: int, no_ack: bool = True,
                  ) -> list[AbstractIncomingMessage]:
    collector = Collector()
    tag = await queue.consume(collector, no_ack=no_ack)
    try:
        return list((await collector.wait_for(count))[:count])
    finally:
        await queue.cancel(tag)


async def drain(queue: AbstractQueue) -> list[bytes]:
    bodies: list[bytes] = []
    while (message := await queue.get(no_ack=True, fail=False, timeout=WAIT_S)) is not None:
        bodies.append(message.body)
    return bodies


async def dead_letter_pair(channel: AbstractChannel, queue: str,
                           arguments: dict[str, Any]) -> tuple[AbstractQueue, AbstractQueue]:
    exchange = await channel.declare_exchange(f"{queue}.dlx", aio_pika.ExchangeType.DIRECT)
    dead_letters = await channel.declare_queue(f"{queue}.dlq")
    await dead_letters.bind(exchange, routing_key=queue)
    source = await channel.declare_queue(
        queue, arguments={"x-dead-letter-exchange": exchange.name, **arguments}
    )
    return source, dead_letters


async def test_declare_confirmed_publish_consume_with_prefetch(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel(publisher_confirms=True)
    queue = await channel.declare_queue(unique("aio-basic"), durable=True)
    assert queue.declaration_result.message_count == 0
    for index in range(5):
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(f"m{index}".encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue.name,
        )
        assert isinstance(confirmation, aiormq.spec.Basic.Ack)

    await channel.set_qos(prefetch_count=2)
    collector = Collector()
    tag = await queue.consume(collector)
    await collector.wait_for(2)
    assert len(await collector.settle_quietly()) == 2, "prefetch_count=2 but more delivered"
    await collector.messages[0].ack()
    await collector.wait_for(3)
    assert len(await collector.settle_quietly()) == 3
    for message in collector.messages[1:]:
        await message.ack()
    await collector.wait_for(5)
    for message in collector.messages[3:]:
        await message.ack()
    assert [message.body for message in collector.messages] == [
        b"m0", b"m1", b"m2", b"m3", b"m4",
    ]
    assert not any(message.redelivered for message in collector.messages)
    await queue.cancel(tag)
    await queue.delete()


async def test_nack_requeue_sets_redelivered(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("aio-nack"))
    await channel.default_exchange.publish(aio_pika.Message(b"again"), routing_key=queue.name)
    collector = Collector()
    tag = await queue.consume(collector)
    first = (await collector.wait_for(1))[0]
    assert not first.redelivered
    await first.nack(requeue=True)
    second = (await collector.wait_for(2))[1]
    assert second.body == b"again"
    assert second.redelivered
    await second.ack()
    await queue.cancel(tag)
    await queue.delete()


async def test_reject_dead_letters_with_x_death(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    name = unique("aio-reject")
    queue, dead_letters = await dead_letter_pair(channel, name, {})
    await channel.default_exchange.publish(aio_pika.Message(b"poison"), routing_key=name)
    message = (await consume(queue, 1, no_ack=False))[0]
    await message.reject(requeue=False)

    dead = (await consume(dead_letters, 1))[0]
    assert dead.body == b"poison"
    entry = x_death_entry(dead.headers)
    assert entry["queue"] == name
    assert entry["reason"] == "rejected"
    assert entry["count"] == 1
    assert entry["exchange"] == ""
    assert entry["routing-keys"] == [name]
    await queue.delete()
    await dead_letters.delete()
    await channel.exchange_delete(f"{name}.dlx")


async def test_queue_ttl_and_message_expiration(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    name = unique("aio-ttl")
    queue_ttl, dead_queue_ttl = await dead_letter_pair(channel, f"{name}.q", {"x-message-ttl": 100})
    message_ttl, dead_message_ttl = await dead_letter_pair(channel, f"{name}.m", {})
    plain = await channel.declare_queue(f"{name}.plain")
    await channel.default_exchange.publish(aio_pika.Message(b"queue ttl"),
                                           routing_key=queue_ttl.name)
    for target in (message_ttl.name, plain.name):
        await channel.default_exchange.publish(
            aio_pika.Message(b"message ttl", expiration=0.1), routing_key=target,
        )
    await channel.default_exchange.publish(aio_pika.Message(b"keeper"), routing_key=plain.name)

    for dead_letters, source, body in (
        (dead_queue_ttl, queue_ttl.name, b"queue ttl"),
        (dead_message_ttl, message_ttl.name, b"message ttl"),
    ):
        dead = (await consume(dead_letters, 1))[0]
        assert dead.body == body
        entry = x_death_entry(dead.headers)
        assert entry["reason"] == "expired"
        assert entry["queue"] == source
    # Without a dead-letter exchange the expired message is simply gone.
    assert await drain(plain) == [b"keeper"]
    for queue in (queue_ttl, dead_queue_ttl, message_ttl, dead_message_ttl, plain):
        await queue.delete()
    await channel.exchange_delete(f"{name}.q.dlx")
    await channel.exchange_delete(f"{name}.m.dlx")


async def test_priority_order(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("aio-priority"), arguments={"x-max-priority": 10})
    for priority in (1, 5, 9):
        await channel.default_exchange.publish(
            aio_pika.Message(f"p{priority}".encode(), priority=priority), routing_key=queue.name,
        )
    received = await consume(queue, 3)
    assert [message.body for message in received] == [b"p9", b"p5", b"p1"]
    await queue.delete()


async def test_topic_and_headers_routing(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    base = unique("aio-route")
    topic = await channel.get_exchange("amq.topic")
    declared = await channel.declare_exchange(f"{base}.topic", aio_pika.ExchangeType.TOPIC)
    star = await channel.declare_queue(f"{base}.star")
    hash_ = await channel.declare_queue(f"{base}.hash")
    await star.bind(topic, routing_key=f"{base}.*.created")
    await hash_.bind(declared, routing_key=f"{base}.#")
    for key in (f"{base}.eu.created", f"{base}.eu.x.created"):
        await topic.publish(aio_pika.Message(key.encode()), routing_key=key)
        await declared.publish(aio_pika.Message(key.encode()), routing_key=key)
    assert await drain(star) == [f"{base}.eu.created".encode()]
    assert await drain(hash_) == [f"{base}.eu.created".encode(), f"{base}.eu.x.created".encode()]

    headers = await channel.declare_exchange(f"{base}.headers", aio_pika.ExchangeType.HEADERS)
    match_all = await channel.declare_queue(f"{base}.all")
    match_any = await channel.declare_queue(f"{base}.any")
    await match_all.bind(headers, arguments={"x-match": "all", "a": "1", "b": "2"})
    await match_any.bind(headers, arguments={"x-match": "any", "a": "1", "b": "2"})
    await headers.publish(aio_pika.Message(b"both", headers={"a": "1", "b": "2"}), "")
    await headers.publish(aio_pika.Message(b"one", headers={"a": "1", "b": "3"}), "")
    await headers.publish(aio_pika.Message(b"neither", headers={"a": "0"}), "")
    assert await drain(match_all) == [b"both"]
    assert await drain(match_any) == [b"both", b"one"]
    for queue in (star, hash_, match_all, match_any):
        await queue.delete()
    await declared.delete()
    await headers.delete()


async def test_mandatory_return_callback_and_delivery_error(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    returned: asyncio.Future[AbstractIncomingMessage] = asyncio.get_running_loop().create_future()

    def on_return(channel: Any, message: AbstractIncomingMessage) -> None:
        if not returned.done():
            returned.set_result(message)

    channel.return_callbacks.add(on_return)
    key = unique("nowhere")
    await channel.default_exchange.publish(aio_pika.Message(b"bounce"), routing_key=key,
                                           mandatory=True)
    message = await asyncio.wait_for(returned, WAIT_S)
    assert message.body == b"bounce"
    assert message.routing_key == key

    raising = await connection.channel(on_return_raises=True)
    with pytest.raises(aio_pika.exceptions.DeliveryError) as raised:
        await raising.default_exchange.publish(aio_pika.Message(b"bounce"), routing_key=key,
                                               mandatory=True)
    assert isinstance(raised.value.frame, aiormq.spec.Basic.Return)
    assert raised.value.frame.reply_code == 312


async def test_reject_publish_overflow_nacks(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(
        unique("aio-overflow"), arguments={"x-max-length": 1, "x-overflow": "reject-publish"},
    )
    await channel.default_exchange.publish(aio_pika.Message(b"fits"), routing_key=queue.name)
    with pytest.raises(aio_pika.exceptions.DeliveryError) as raised:
        await channel.default_exchange.publish(aio_pika.Message(b"full"), routing_key=queue.name)
    assert isinstance(raised.value.frame, aiormq.spec.Basic.Nack)
    assert await drain(queue) == [b"fits"]
    await queue.delete()


async def test_exclusive_auto_delete_and_server_named(
    url: str, connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    exclusive = await channel.declare_queue("", exclusive=True)
    assert exclusive.name
    other = await aio_pika.connect(url, timeout=WAIT_S)
    try:
        other_channel = await other.channel()
        with pytest.raises(aiormq.exceptions.ChannelLockedResource):
            await other_channel.declare_queue(exclusive.name, passive=True)
        still = await other.channel()
        name = unique("aio-autodelete")
        auto = await still.declare_queue(name, auto_delete=True)
        tag = await auto.consume(Collector())
        await auto.cancel(tag)
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await (await other.channel()).declare_queue(name, passive=True)
        assert not other.is_closed
    finally:
        await other.close()


async def test_channel_errors_keep_the_connection(
    connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await channel.declare_queue(unique("aio-missing"), passive=True)
    name = unique("aio-conflict")
    channel = await connection.channel()
    await channel.declare_queue(name, arguments={"x-max-length": 5})
    with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
        await channel.declare_queue(name, arguments={"x-max-length": 6})
    assert not connection.is_closed
    channel = await connection.channel()
    queue = await channel.declare_queue(name, arguments={"x-max-length": 5})
    await channel.default_exchange.publish(aio_pika.Message(b"fine"), routing_key=name)
    assert await drain(queue) == [b"fine"]
    await queue.delete()


async def test_properties_round_trip(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("aio-props"))
    timestamp = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    await channel.default_exchange.publish(
        aio_pika.Message(
            b"payload",
            headers=ROUND_TRIP_HEADERS,
            content_type="text/plain",
            content_encoding="utf-8",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            priority=4,
            correlation_id="corr-9",
            reply_to="replies",
            expiration=60,
            message_id="id-9",
            timestamp=timestamp,
            type="kind",
            user_id="guest",
            app_id="aio-tests",
        ),
        routing_key=queue.name,
    )
    message = (await consume(queue, 1))[0]
    assert message.body == b"payload"
    assert message.headers == ROUND_TRIP_HEADERS
    assert message.content_type == "text/plain"
    assert message.content_encoding == "utf-8"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.priority == 4
    assert message.correlation_id == "corr-9"
    assert message.reply_to == "replies"
    assert message.properties.expiration == "60000"
    assert message.message_id == "id-9"
    assert message.timestamp == timestamp
    assert message.type == "kind"
    assert message.user_id == "guest"
    assert message.app_id == "aio-tests"
    await queue.delete()


async def test_get_get_empty_and_purge(connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("aio-get"))
    assert await queue.get(fail=False, timeout=WAIT_S) is None
    with pytest.raises(aio_pika.exceptions.QueueEmpty):
        await queue.get(timeout=WAIT_S)
    for body in (b"a", b"b", b"c"):
        await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
    message = await queue.get(timeout=WAIT_S)
    assert message.body == b"a"
    await message.ack()
    purged = await queue.purge()
    assert purged.message_count == 2
    assert await queue.get(fail=False, timeout=WAIT_S) is None
    await queue.delete()


async def test_dead_consumer_connection_redelivers(
    url: str, connection: aio_pika.abc.AbstractConnection,
) -> None:
    channel = await connection.channel()
    queue = await channel.declare_queue(unique("aio-killed"))
    for index in range(3):
        await channel.default_exchange.publish(aio_pika.Message(f"j{index}".encode()),
                                               routing_key=queue.name)
    doomed = await aio_pika.connect(url, timeout=WAIT_S)
    doomed_channel = await doomed.channel()
    await doomed_channel.set_qos(prefetch_count=2)
    doomed_queue = await doomed_channel.declare_queue(queue.name, passive=True)
    collector = Collector()
    await doomed_queue.consume(collector)
    await collector.wait_for(2)
    await doomed.close()

    received = await consume(queue, 3)
    assert sorted(message.body for message in received) == [b"j0", b"j1", b"j2"]
    assert {message.body: message.redelivered for message in received} == {
        b"j0": True, b"j1": True, b"j2": False,
    }
    await queue.delete()


async def test_robust_connection_recovers_after_kill_9(tmp_path: Path) -> None:
    skip_if_external("kills the broker")
    process = BrokerProcess(tmp_path / "data", listeners=("amqp",))
    await asyncio.to_thread(process.start)
    try:
        connection = await aio_pika.connect_robust(
            amqp_url(process.ports["amqp"]) + "?reconnect_interval=0.1", timeout=WAIT_S,
        )
        reconnected = asyncio.Event()
        connection.reconnect_callbacks.add(lambda *arguments: reconnected.set())
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue(unique("aio-robust"), durable=True)
        for body in (b"j0", b"j1", b"j2"):
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue.name,
            )
        collector = Collector()
        await queue.consume(collector)
        await (await collector.wait_for(1))[0].ack()
        assert (await collector.wait_for(2))[1].body == b"j1"  # delivered, never acked

        await asyncio.to_thread(process.kill)
        await asyncio.to_thread(process.start)
        await asyncio.wait_for(reconnected.wait(), WAIT_S)

        # The restored consumer gets j1 again (redelivered) and then j2; j0's ack was
        # fire-and-forget, so a broker may or may not have made it durable before the kill.
        seen: list[tuple[bytes, bool]] = []
        while b"j2" not in [body for body, _ in seen]:
            message = (await collector.wait_for(len(seen) + 3))[len(seen) + 2]
            seen.append((message.body, bool(message.redelivered)))
            await message.ack()
        bodies = [body for body, _ in seen]
        assert bodies in ([b"j1", b"j2"], [b"j0", b"j1", b"j2"]), seen
        assert dict(seen)[b"j1"] is True
        assert dict(seen)[b"j2"] is False
        await connection.close()
    finally:
        await asyncio.to_thread(process.stop)
