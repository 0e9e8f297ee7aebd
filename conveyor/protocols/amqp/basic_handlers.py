"""Handlers of the AMQP basic methods, and the dispatch of every channel method.

Owns: Basic.Qos, Consume (queue, stream and direct reply-to consumers), Cancel, Get
and Recover against the broker; ``dispatch``, which finds a method's handler and
turns broker errors into the channel errors the spec names. Publishes, settlements
and the confirm/tx mode methods never come here: the channel's mode machine
(``channel_machine.py``) takes them.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pamqp import base as pamqp_base
from pamqp import commands

from conveyor.errors import (
    InvalidRequestError,
    NotFoundError,
    OperatingError,
    PreconditionFailedError,
    UnknownExchangeError,
    UnknownQueueError,
)
from conveyor.protocols.amqp.names import QualifiedNameError, queue_topic

from . import frames as f
from . import queue_handlers as q
from .arguments import ArgumentError, generated_name
from .channel import (
    REPLY_TO_QUEUE,
    Channel,
    ChannelError,
    ConnectionError_,
    is_stream,
    method_ids,
)
from .messages import outgoing
from .permissions import authorize
from .server import Consumer, StreamConsumer

if TYPE_CHECKING:
    from conveyor.broker.broker import Broker


async def dispatch(channel: Channel, method: pamqp_base.Frame) -> None:
    handler = HANDLERS.get(type(method))
    if handler is None:
        raise ConnectionError_(f.NOT_IMPLEMENTED, f"{method.name} is not implemented",
                               *method_ids(method))
    connection = channel.connection
    authorize(connection.server.security, connection.principal, connection.vhost, method)
    try:
        await handler(channel, method)
    except QualifiedNameError as error:
        raise ChannelError(f.ACCESS_REFUSED, str(error), *method_ids(method)) from None
    except ArgumentError as error:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                           *method_ids(method)) from None
    except PreconditionFailedError as error:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                           *method_ids(method)) from None
    except (UnknownQueueError, UnknownExchangeError, NotFoundError) as error:
        raise ChannelError(f.NOT_FOUND, f"NOT_FOUND - {error}", *method_ids(method)) from None
    except InvalidRequestError as error:
        raise ChannelError(f.PRECONDITION_FAILED, f"PRECONDITION_FAILED - {error}",
                           *method_ids(method)) from None
    except OperatingError as error:
        raise ChannelError(f.PRECONDITION_FAILED, f"{error.code} - {error}",
                           *method_ids(method)) from None


async def on_qos(channel: Channel, method: commands.Basic.Qos) -> None:
    if method.global_:
        channel.prefetch_global = method.prefetch_count
    else:
        channel.prefetch_consumer = method.prefetch_count
        for consumer in channel.consumers.values():
            consumer.prefetch = method.prefetch_count
    channel.wake_consumers()
    channel.reply(commands.Basic.QosOk())


async def on_consume(channel: Channel, method: commands.Basic.Consume) -> None:
    connection = channel.connection
    server = connection.server
    name = q.queue_name(channel, method.queue, method)
    tag = method.consumer_tag or generated_name("amq.ctag", os.urandom(16))
    if tag in channel.consumers:
        raise ConnectionError_(f.NOT_ALLOWED, f"NOT_ALLOWED - attempt to reuse consumer "
                               f"tag '{tag}'", 60, 20)
    if name == REPLY_TO_QUEUE:
        if not method.no_ack:
            raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - reply "
                               "consumer cannot acknowledge", 60, 20)
        consumer = Consumer(channel, tag, "", name, True, 0, False)
        channel.reply_to_name = REPLY_TO_QUEUE + "." + generated_name("g", os.urandom(18))
        server.reply_channels[channel.reply_to_name] = channel
        channel.consumers[tag] = consumer
        if not method.nowait:
            channel.reply(commands.Basic.ConsumeOk(tag))
        return
    topic = queue_topic(connection.vhost, name)
    q.check_exclusive(channel, topic, name, method)
    if is_stream(server.broker, topic):
        offsets = await _stream_offsets(server.broker, topic, (method.arguments or {}).get(
            "x-stream-offset", "next"))
        stream_consumer = StreamConsumer(channel, tag, topic, name, bool(method.no_ack),
                                         channel.prefetch_consumer, offsets)
        channel.consumers[tag] = stream_consumer
        server.use(topic).consumers.append(stream_consumer)
        if not method.nowait:
            channel.reply(commands.Basic.ConsumeOk(tag))
        stream_consumer.task = server.tasks.start(stream_consumer.run(), name="amqp-consumer")
        return
    await q.require_queue(channel, topic, name, method)
    use = server.use(topic)
    if method.exclusive and use.consumers:
        raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - queue '{name}' in vhost "
                           f"'{connection.vhost}' in exclusive use", 60, 20)
    if any(other.exclusive for other in use.consumers):
        raise ChannelError(f.ACCESS_REFUSED, f"ACCESS_REFUSED - queue '{name}' in vhost "
                           f"'{connection.vhost}' in exclusive use", 60, 20)
    consumer = Consumer(channel, tag, topic, name, bool(method.no_ack), channel.prefetch_consumer,
                        bool(method.exclusive))
    channel.consumers[tag] = consumer
    use.consumers.append(consumer)
    use.had_consumer = True
    if not method.nowait:
        channel.reply(commands.Basic.ConsumeOk(tag))
    consumer.task = server.tasks.start(consumer.run(), name="amqp-consumer")


async def on_cancel(channel: Channel, method: commands.Basic.Cancel) -> None:
    consumer = channel.consumers.pop(method.consumer_tag or "", None)
    if consumer is not None:
        if consumer.queue == REPLY_TO_QUEUE and channel.reply_to_name is not None:
            channel.server.reply_channels.pop(channel.reply_to_name, None)
        await channel.stop_consumer(consumer)
    if not method.nowait:
        channel.reply(commands.Basic.CancelOk(method.consumer_tag))


async def on_cancel_ok(channel: Channel, method: commands.Basic.CancelOk) -> None:
    return None


async def on_get(channel: Channel, method: commands.Basic.Get) -> None:
    server = channel.server
    name = q.queue_name(channel, method.queue, method)
    topic = queue_topic(channel.connection.vhost, name)
    q.check_exclusive(channel, topic, name, method)
    if is_stream(server.broker, topic):
        raise ChannelError(f.PRECONDITION_FAILED, "PRECONDITION_FAILED - basic.get is "
                           "not supported by stream queues", 60, 70)
    await q.require_queue(channel, topic, name, method)
    deliveries = await server.broker.acquire(
        topic, topic, records_max=1, lock_ms=server.settings.consumer_timeout_ms,
        wait_ms=0, consumer_id=channel.holder_id)
    if not deliveries:
        channel.reply(commands.Basic.GetEmpty())
        return
    delivery = deliveries[0]
    info = await server.broker.get_queue(topic)
    if method.no_ack:
        tag = channel.tags.next()
        await server.broker.ack([delivery.receipt])
    else:
        tag = channel.tags.hold(delivery.receipt, None)
    out = outgoing(delivery.headers, delivery.key, name)
    channel.connection.write_parts(f.get_ok_frames(
        channel.number, tag, delivery.delivery_count > 1, out.exchange,
        out.routing_key, info.ready, out.properties, delivery.value or b"",
        channel.connection.frame_bytes_max))


async def on_recover(channel: Channel, method: commands.Basic.Recover) -> None:
    taken = channel.take(0, True, method)
    await channel.settle_receipts([item.receipt for item in taken if item.receipt is not None],
                       "requeue")
    channel.reply(commands.Basic.RecoverOk())


async def on_recover_async(channel: Channel, method: commands.Basic.RecoverAsync) -> None:
    taken = channel.take(0, True, method)
    await channel.settle_receipts([item.receipt for item in taken if item.receipt is not None],
                       "requeue")

# confirms and transactions


_INTERVAL_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "D": 86_400_000,
            "M": 30 * 86_400_000, "Y": 365 * 86_400_000}


async def _stream_offsets(broker: Broker, topic: str, spec: Any) -> dict[int, int]:
    """Start offsets per partition for x-stream-offset: first, last, next, an offset,
    a timestamp, or an interval such as "1h" (RabbitMQ's forms)."""
    partitions = broker.get_topic(topic).partitions
    offsets: dict[int, int] = {}
    now_ms = broker.clock.wall_ms()
    timestamp_ms: int | None = None
    if isinstance(spec, datetime.datetime):
        timestamp_ms = int(spec.timestamp() * 1000)
    elif isinstance(spec, bytes | bytearray):
        spec = spec.decode("utf-8", "replace")
    if isinstance(spec, str) and spec[:-1].isdigit() and spec[-1:] in _INTERVAL_MS:
        timestamp_ms = now_ms - int(spec[:-1]) * _INTERVAL_MS[spec[-1]]
    for partition in range(partitions):
        bounds = broker.offsets(topic, partition)
        if timestamp_ms is not None:
            found = await broker.offset_for_timestamp(topic, partition, timestamp_ms)
            offsets[partition] = bounds.high_watermark if found is None else found
        elif spec == "first":
            offsets[partition] = bounds.log_start_offset
        elif spec == "last":
            offsets[partition] = max(bounds.log_start_offset, bounds.high_watermark - 1)
        elif isinstance(spec, int) and not isinstance(spec, bool):
            offsets[partition] = min(max(spec, bounds.log_start_offset), bounds.high_watermark)
        else:
            offsets[partition] = bounds.high_watermark
    return offsets


Handler = Callable[[Channel, Any], Awaitable[None]]
HANDLERS: dict[type[pamqp_base.Frame], Handler] = {
    commands.Channel.Open: q.on_channel_open,
    commands.Channel.Close: q.on_channel_close,
    commands.Channel.CloseOk: q.on_channel_close_ok,
    commands.Channel.Flow: q.on_flow,
    commands.Channel.FlowOk: q.on_flow_ok,
    commands.Exchange.Declare: q.on_exchange_declare,
    commands.Exchange.Delete: q.on_exchange_delete,
    commands.Exchange.Bind: q.on_exchange_bind,
    commands.Exchange.Unbind: q.on_exchange_unbind,
    commands.Queue.Declare: q.on_queue_declare,
    commands.Queue.Bind: q.on_queue_bind,
    commands.Queue.Unbind: q.on_queue_unbind,
    commands.Queue.Purge: q.on_queue_purge,
    commands.Queue.Delete: q.on_queue_delete,
    commands.Basic.Qos: on_qos,
    commands.Basic.Consume: on_consume,
    commands.Basic.Cancel: on_cancel,
    commands.Basic.CancelOk: on_cancel_ok,
    commands.Basic.Get: on_get,
    commands.Basic.Recover: on_recover,
    commands.Basic.RecoverAsync: on_recover_async,
}
